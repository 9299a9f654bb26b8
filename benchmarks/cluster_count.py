"""
# Benchmark: how well `--num_clusters=0` chooses the number of clusters, on class subsets of a labelled image folder

    python benchmarks/cluster_count.py --source=path/to/cifar10-train-jpeg     # the table of docs/cluster-count.md
    python benchmarks/cluster_count.py --source=path/to/cifar10-train-jpeg --classes=2,3 --seeds=1 \\
        --per_class=60 --representation_epochs=3                             # a quick check that it works

`--source` is a folder of class sub-folders (CIFAR-10's training JPEGs, one folder per class). For each number of
classes and each seed, the benchmark copies `--per_class` random images of as many random classes into a subset
folder; then one imbalanced subset of `--imbalanced` classes whose sizes fall evenly from `--per_class` to a fifth of
it. Each subset is clustered by the script, in this process, with `--recipe=cpu --num_clusters=0` (the recipe holds
a fifth of your own images out), then with the true number of classes: every stage before clustering comes from the
stage cache. Settings after the benchmark's own (`--representation_epochs=3`) go to both runs.

Prints one markdown row per subset: its classes and images (trained on + held out), the seed, the number chosen,
whether it is the true one or within one of it, the held-out NMI at the chosen and at the true number, the sweep's
seconds and the minutes of both runs; then the hit rates. Each run's own output is in `--work`/SUBSET/run-N.log, and
the subsets and their stage caches stay in `--work`, so that running it again reuses them.
"""

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scan_cifar10 as script  # noqa: E402  (chooses the Keras backend, as the script does)
from scan.data import is_image_name  # noqa: E402

SMALLEST_SHARE = 0.2  # the imbalanced subset's smallest class holds this share of its largest (five times fewer)


def parse_arguments(argv=None):
    """The benchmark's own arguments, and the script settings to pass on (`--name=value`)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0].lstrip("# "))
    parser.add_argument("--source", required=True, help="a folder of class sub-folders of images")
    parser.add_argument("--classes", default="2,3,5,7,10", help="the numbers of classes of the subsets")
    parser.add_argument("--seeds", type=int, default=3, help="subsets of each number of classes (seeds 0, 1, ...)")
    parser.add_argument("--per_class", type=int, default=500, help="images of each class in a subset")
    parser.add_argument("--imbalanced", type=int, default=5, help="classes of the imbalanced subset (0 = none)")
    parser.add_argument(
        "--work", default="", help="where the subsets and their outputs go (default: a new temp folder)"
    )
    arguments, settings = parser.parse_known_args(argv)
    arguments.classes = [int(number) for number in arguments.classes.split(",")]
    return arguments, settings


def class_images(source):
    """{class folder name: its image file names, sorted}, of the class sub-folders of `source`."""
    classes = {}
    for name in sorted(os.listdir(source)):
        if os.path.isdir(os.path.join(source, name)):
            classes[name] = sorted(file for file in os.listdir(os.path.join(source, name)) if is_image_name(file))
    return classes


def subsets(classes, arguments):
    """[(subset name, seed, {class name: images in the subset})]: balanced subsets of each number of classes and
    seed, then the imbalanced one."""
    names, planned = list(classes), []
    for number in arguments.classes:
        for seed in range(arguments.seeds):
            chosen = np.random.default_rng([number, seed]).choice(len(names), number, replace=False)
            planned.append((f"{number}-classes-seed-{seed}", seed, {names[i]: arguments.per_class for i in chosen}))
    if arguments.imbalanced:
        chosen = np.random.default_rng([arguments.imbalanced, 99]).choice(len(names), arguments.imbalanced, False)
        shares = np.linspace(1.0, SMALLEST_SHARE, arguments.imbalanced)
        sizes = {names[i]: int(round(share * arguments.per_class)) for i, share in zip(chosen, shares, strict=True)}
        planned.append((f"{arguments.imbalanced}-classes-imbalanced", 0, sizes))
    return planned


def build_subset(source, classes, sizes, seed, folder):
    """Copies `sizes[name]` random images of each class of `sizes` into folder/NAME/ (kept if already there)."""
    for name, size in sizes.items():
        target = os.path.join(folder, name)
        if os.path.isdir(target) and len(os.listdir(target)) == size:
            continue
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        rng = np.random.default_rng([seed, size, *name.encode()])
        for file in rng.choice(classes[name], size, replace=False):
            shutil.copyfile(os.path.join(source, name, file), os.path.join(target, file))


def run_script(arguments, log_path):
    """Runs scan_cifar10.main(`arguments`) with its output in `log_path`; returns (its metrics, seconds)."""
    started = time.time()
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        metrics = script.main(arguments)  # Each run sets its own mixed-precision policy.
    return metrics, time.time() - started


def measure(name, seed, sizes, folder, settings):
    """Runs the subset with --num_clusters=0, then with the true number; returns its table row's values."""
    common = ["--recipe=cpu", f"--data={folder}/images", f"--output_dir={folder}/out", *settings]
    chosen_metrics, chosen_seconds = run_script([*common, "--num_clusters=0"], f"{folder}/run-1.log")
    true_metrics, true_seconds = run_script([*common, f"--num_clusters={len(sizes)}"], f"{folder}/run-2.log")
    chosen = chosen_metrics["cluster_count"]["chosen"]
    held_out = chosen_metrics["splits"]["eval"]["images"]
    return {
        "classes": len(sizes), "images": f"{chosen_metrics['images']} + {held_out}", "seed": seed, "chosen": chosen,
        "hit": chosen == len(sizes), "within_one": abs(chosen - len(sizes)) <= 1,
        "nmi_chosen": chosen_metrics["splits"]["eval"]["nmi"], "nmi_true": true_metrics["splits"]["eval"]["nmi"],
        "sweep_seconds": chosen_metrics["timings_seconds"]["cluster_count"],
        "minutes": (chosen_seconds + true_seconds) / 60, "name": name,
    }  # fmt: skip


def table_row(row):
    """One markdown table row of `measure`'s values."""
    yes = {True: "yes", False: "no"}
    return (
        f"| {row['classes']}{' (imbalanced)' if 'imbalanced' in row['name'] else ''} | {row['images']} | {row['seed']} "
        f"| {row['chosen']} | {yes[row['hit']]} | {yes[row['within_one']]} | {row['nmi_chosen']:.3f} "
        f"| {row['nmi_true']:.3f} | {row['sweep_seconds']:.0f} | {row['minutes']:.1f} |"
    )


def main(argv=None):
    arguments, settings = parse_arguments(argv)
    classes = class_images(arguments.source)
    work = arguments.work or tempfile.mkdtemp(prefix="cluster-count-")
    print(f"subsets and outputs in {work}; settings: --recipe=cpu {' '.join(settings)}")
    print("| classes | images (trained + held out) | seed | chosen | true | within one | NMI at chosen | NMI at true "
          "| sweep (s) | minutes |\n| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")  # fmt: skip
    rows = []
    for name, seed, sizes in subsets(classes, arguments):
        folder = os.path.join(work, name)
        build_subset(arguments.source, classes, sizes, seed, os.path.join(folder, "images"))
        rows.append(measure(name, seed, sizes, folder, settings))
        print(table_row(rows[-1]), flush=True)
    hits, near = sum(row["hit"] for row in rows), sum(row["within_one"] for row in rows)
    print(
        f"\nthe true number: {hits} of {len(rows)} subsets; within one: {near} of {len(rows)}; held-out NMI on average "
        f"{np.mean([row['nmi_chosen'] for row in rows]):.3f} at the chosen number, "
        f"{np.mean([row['nmi_true'] for row in rows]):.3f} at the true one"
    )
    return rows


if __name__ == "__main__":
    main()
