"""
# Benchmark: pretext candidates for the cpu recipe, screened side by side

Each candidate is a few settings added to `--recipe=cpu`; each runs the whole script, one after another in this
process, on the same images with the same hold-out and a short SimCLR schedule, every stage computed afresh (its own
OUTPUT_DIR, `--resume=false`). Per candidate it prints one row as soon as it is done: SimCLR's minutes and seconds
per epoch (the stage's time over its epochs, the first step's tracing included), the neighbours' label purity, the
held-out images' weighted kNN accuracy (encoder features) and their Hungarian accuracy (the clusters the recipe
assigns; with `--draws=N`, also their mean, lowest and highest over the run's clustering stage and N more, seeds 1
to N (N+1 in place of the run's own), each on the candidate's cached encoder: one draw of that stage varies by 3-5
points), and the rate of a 4096x4096 float32 matrix product measured just before the candidate
(`benchmarks/matmul_rate.py`): shared machines change speed from hour to hour, so compare minutes only beside that
rate. A short schedule ranks the pretext choices, it does not measure them: give the best a full run.

Run from the repository root:

    python benchmarks/pretext.py --data=path/to/cifar10-train-jpeg                 # every candidate, 10 epochs
    python benchmarks/pretext.py --data=path/to/cifar10-train-jpeg --candidates=cpu,vicreg-1024 --draws=8
    python benchmarks/pretext.py --data=path/to/cifar10-train-jpeg --candidate="mine:--projection_units=512"

The last adds a candidate of your own to every listed one; one that sets `--representation_epochs` itself trains that
many (e.g. the recipe given the minutes a dearer candidate takes: "cpu-12:--representation_epochs=12"). Rows and
settings also land in OUTPUT_DIR/pretext.json.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keras  # noqa: E402
import numpy as np  # noqa: E402
from matmul_rate import matmul_gflops  # noqa: E402

import scan_cifar10 as script  # noqa: E402  (chooses the Keras backend, as the script does)
from scan.cache import STAGE_SETTINGS, stage_fingerprints  # noqa: E402
from scan.settings import UsageError  # noqa: E402

VICREG = ["--pretext_loss=vicreg", "--projection_head=vicreg"]
# The candidates, each the settings it adds to `--recipe=cpu`: the recipe itself (NT-Xent, an MLP head 256-128);
# VICReg with its expander 512 and 1024 wide (by FLOPs, 512 adds about 11 % to a step, 1024 about 40 %, solo-learn's
# 2048 about 150 %), and at 1024 with the neighbours and the head on the encoder's features instead of
# the expander's; NT-Xent with 2 or 4 small views of 16 px (each 0.44 of a 24 px view's FLOPs); VICReg with 2 of them.
CANDIDATES = {
    "cpu": [],
    "vicreg-512": [*VICREG, "--projection_units=512"],
    "vicreg-1024": [*VICREG, "--projection_units=1024"],
    "vicreg-1024-encoder": [
        *VICREG, "--projection_units=1024", "--mining_features=encoder", "--head_features=encoder",
    ],
    "ntxent-small-2x16": ["--small_views=2", "--small_view_size=16"],
    "ntxent-small-4x16": ["--small_views=4", "--small_view_size=16"],
    "vicreg-1024-small-2x16": [*VICREG, "--projection_units=1024", "--small_views=2", "--small_view_size=16"],
}  # fmt: skip
COLUMNS = [
    "candidate", "GFLOP/s", "epochs", "SimCLR min", "s/epoch", "total min", "purity", "kNN", "held-out acc", "head acc",
    "draws", "settings",
]  # fmt: skip


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip("\n# "))
    parser.add_argument("--data", required=True, help="the images (folder or archive), e.g. path/to/cifar10-train-jpeg")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated: " + ", ".join(CANDIDATES))
    parser.add_argument(
        "--candidate", action="append", default=[], metavar="NAME:SETTINGS",
        help='one more candidate, its settings separated by spaces, e.g. "mine:--projection_units=512"; repeatable',
    )  # fmt: skip
    parser.add_argument("--representation_epochs", type=int, default=10, help="SimCLR epochs (default 10)")
    parser.add_argument("--holdout_images", type=int, default=10000, help="images held out (default 10000)")
    parser.add_argument(
        "--settings", default="", help='settings added to every candidate, e.g. "--max_images=600 --seed=1"'
    )
    parser.add_argument(
        "--draws", type=int, default=0,
        help="clustering stages more per candidate, seeds 1 to N (N+1 in place of the run's own seed), on its cached "
        "encoder (issue 41: nine draws in all)",
    )  # fmt: skip
    parser.add_argument("--output_dir", default="outputs/pretext", help="one folder per candidate inside it")
    arguments = parser.parse_args(argv)
    candidates = {}
    for name in filter(None, arguments.candidates.split(",")):
        if name not in CANDIDATES:
            parser.error(f"--candidates: {name} is none of {', '.join(CANDIDATES)}")
        candidates[name] = CANDIDATES[name]
    for given in arguments.candidate:
        name, separator, settings = given.partition(":")
        if not separator or not name:
            parser.error(f'--candidate="{given}": write NAME:SETTINGS, e.g. "mine:--projection_units=512"')
        candidates[name] = settings.split()
    return arguments, candidates


def screen(name, settings, arguments):
    """Runs the cpu recipe with `settings` in this process; returns the candidate's row ({column: value})."""
    argv = [
        "--recipe=cpu", f"--data={arguments.data}", f"--holdout_images={arguments.holdout_images}",
        f"--representation_epochs={arguments.representation_epochs}", "--resume=false",
        f"--output_dir={os.path.join(arguments.output_dir, name)}", *arguments.settings.split(), *settings,
    ]  # fmt: skip
    row = {"candidate": name, "GFLOP/s": matmul_gflops(), "settings": " ".join(settings) or "(the recipe)"}
    started = time.perf_counter()
    try:
        metrics = script.main(argv)
    except UsageError as error:
        return {**row, "error": str(error)}
    finally:
        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session()
    simclr_seconds, held_out = metrics["timings_seconds"]["representation_learning"], metrics["splits"]["eval"]
    draws = [held_out.get("acc")]  # No labels, no accuracy: no draws.
    if draws[0] is not None:  # seeds 1, 2, ... other than the run's own, whose draw is the run's
        seeds = [seed for seed in range(1, arguments.draws + 2) if seed != metrics["settings"]["seed"]]
        draws += [clustering_draw(argv, seed)["acc"] for seed in seeds[: arguments.draws]]
    return {
        **row,
        "SimCLR min": simclr_seconds / 60,
        "epochs": metrics["settings"]["representation_epochs"],  # a candidate may set its own
        "s/epoch": simclr_seconds / metrics["settings"]["representation_epochs"],
        "total min": (time.perf_counter() - started) / 60,
        "purity": metrics["neighbour_purity"],
        "kNN": metrics["knn_accuracy"],
        "held-out acc": held_out.get("acc"),
        "head acc": held_out.get("head_acc"),  # the head's own, before the recipe's vote (PREDICTION_NEIGHBOURS)
        "draws": draws,  # the held-out accuracy of the run's clustering stage, then of each draw's
        "argv": argv,
    }


def clustering_draw(argv, seed):
    """The clustering stage again, its seed `seed` (the head's weights, the order of its batches, the feature views
    drawn), on the encoder, neighbours and feature views that the run `argv` cached; returns the held-out split's
    metrics. Only the clustering stage and those after it take the seed and are computed afresh."""
    learn_clusters = script.learn_clusters
    redrawn = list(STAGE_SETTINGS)[list(STAGE_SETTINGS).index("clustering") :]

    def learn_drawn_clusters(run, *stage_inputs):
        run.settings.seed = seed
        fingerprints = stage_fingerprints(run.data_digest, vars(run.settings), run.stage_settings)
        run.fingerprints.update({stage: fingerprints[stage] for stage in redrawn})
        keras.utils.set_random_seed(seed)
        return learn_clusters(run, *stage_inputs)

    script.learn_clusters = learn_drawn_clusters
    try:
        held_out = script.main([*argv, "--resume=true"])["splits"]["eval"]
    finally:
        script.learn_clusters = learn_clusters
        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session()
    print(f"clustering draw {seed}: held-out accuracy {held_out['acc']:.2%}", flush=True)
    return held_out


def table_row(row):
    if "error" in row:
        return f"| {row['candidate']} | {row['GFLOP/s']:.0f} | error: {row['error']} |"
    cells = []
    for column in COLUMNS:
        value = row[column]
        if column == "draws":  # None where the held-out images have no labels
            cells.append(
                "n/a" if None in value else f"{np.mean(value):.2%} ({min(value):.2%}-{max(value):.2%}, {len(value)})"
            )
        elif column in ("purity", "kNN", "held-out acc", "head acc"):
            cells.append("n/a" if value is None else f"{value:.2%}")
        elif isinstance(value, float):
            cells.append(f"{value:.1f}" if column != "GFLOP/s" else f"{value:.0f}")
        else:
            cells.append(f"`{value}`" if column == "settings" else str(value))
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    arguments, candidates = parse_arguments(argv)
    print(
        f"Screening {len(candidates)} candidates: --recipe=cpu --data={arguments.data} "
        f"--holdout_images={arguments.holdout_images} --representation_epochs={arguments.representation_epochs} "
        f"{arguments.settings}".rstrip()
        + f"; Keras {keras.__version__}, backend {keras.backend.backend()}; speed reference now: "
        f"{matmul_gflops():.0f} GFLOP/s"
    )
    rows = []
    for name, settings in candidates.items():
        print(f"\n# candidate {name}: {' '.join(settings) or '(the recipe)'}", flush=True)
        rows.append(screen(name, settings, arguments))
        print(f"\nscreened: {table_row(rows[-1])}", flush=True)
        os.makedirs(arguments.output_dir, exist_ok=True)
        with open(os.path.join(arguments.output_dir, "pretext.json"), "w") as file:
            json.dump(rows, file, indent=1)
    print("\n| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS))
    for row in rows:
        print(table_row(row))
    print(f"\nrows in {os.path.join(arguments.output_dir, 'pretext.json')}")
    return rows


if __name__ == "__main__":
    main()
