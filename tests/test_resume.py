"""The stage cache, resuming after SIGKILL, broken artifacts and diverging training, run as a user would."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import scan.training
import scan_cifar10 as script
from conftest import REPO, SCRIPT, make_image_folder, run_script, with_settings
from scan.backend import resolve_mixed_precision
from scan.cache import NOT_FINGERPRINTED, STAGE_SETTINGS, data_fingerprint, stage_fingerprints
from scan.data import CIFAR10_SPLITS, Dataset
from scan.files import write_atomically
from scan.run import Run
from scan.settings import parse_settings, read_settings_block
from scan.training import EpochCheckpoint

TINY = ["--encoder=small", "--representation_batch_size=8", "--clustering_batch_size=8", "--self_label_batch_size=8", "--representation_epochs=2", "--clustering_epochs=2",
        "--num_clusters=3", "--k_neighbours=2", "--embedding_batch_size=10"]  # fmt: skip
STAGES = ["representation", "embeddings", "neighbours", "clustering", "predictions"]


def cache_files(output_dir):
    """{stage: (file name, modification time in ns)} of the cached artifacts."""
    folder = os.path.join(output_dir, "cache")
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def stage_of(name):
    return name.split("-")[0]


@pytest.fixture
def run_dir(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    # Partial corruption: two unreadable files among 24 good ones still run, with one warning.
    (tmp_path / "images" / "class_0" / "broken.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "images" / "class_1" / "empty.jpg").write_bytes(b"")
    return tmp_path, [f"--data={folder}", f"--output_dir={tmp_path / 'out'}"]


def test_cache_skips_finished_stages_and_reruns_only_what_a_setting_changes(run_dir, run_here):
    tmp_path, data_args = run_dir
    first = run_here([*data_args, *TINY], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("warning: skipped 2 unreadable image files of 26") == 1
    assert "done before" not in first.stdout
    after_first = cache_files(tmp_path / "out")
    assert sorted({stage_of(name) for name in after_first}) == sorted(STAGES)

    again = run_here([*data_args, *TINY], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(re.findall(r"^[a-z ]+: done before, reusing ", again.stdout, flags=re.MULTILINE)) == 5
    assert "Epoch 1/" not in again.stdout  # nothing trained
    assert cache_files(tmp_path / "out") == after_first  # nothing rewritten
    sizes = lambda out: re.findall(r"^cluster \d+ : \d+$", out, flags=re.MULTILINE)  # noqa: E731
    assert sizes(again.stdout) == sizes(first.stdout)

    changed = run_here([*data_args, *with_settings(TINY, "--num_clusters=4")], cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "representation learning: done before" in changed.stdout
    assert "neighbour mining: done before" in changed.stdout
    assert "clustering: done before" not in changed.stdout and "cluster assignment: done before" not in changed.stdout
    after_change = cache_files(tmp_path / "out")
    for name, modified in after_first.items():  # earlier stages untouched, old clustering kept
        assert after_change[name] == modified, name
    new = {stage_of(name) for name in set(after_change) - set(after_first)}
    assert new == {"clustering", "predictions"}
    assert len(sizes(changed.stdout)) == 4

    fresh = run_here([*data_args, *TINY, "--resume=false"], cwd=tmp_path)
    assert fresh.returncode == 0 and "done before" not in fresh.stdout
    assert all(cache_files(tmp_path / "out")[name] > modified for name, modified in after_first.items())


# Runs the script, whose checkpoint is due at the end of epoch argv[1] only, and which is killed (SIGKILL) once epoch
# argv[2] has ended, as a machine that dies between two checkpoints: a real kill, after a known epoch, not a timed one.
KILLED_RUNNER = """
import os, runpy, signal, sys
import scan.training

save_at, kill_after = int(sys.argv[1]), int(sys.argv[2])
on_epoch_end = scan.training.EpochCheckpoint.on_epoch_end

def save_at_one_epoch(checkpoint, epoch, logs=None):
    checkpoint.every_seconds = 0 if epoch + 1 == save_at else float("inf")
    on_epoch_end(checkpoint, epoch, logs)

def die(checkpoint, epoch, logs=None):
    if epoch == kill_after:  # epoch `kill_after` has ended, its line printed; the next one begins
        os.kill(os.getpid(), signal.SIGKILL)

scan.training.EpochCheckpoint.on_epoch_end = save_at_one_epoch
scan.training.EpochCheckpoint.on_epoch_begin = die
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# On JAX, data-parallel over two virtual devices: the checkpoint of the replicated weights, the hardest case. The same
# checkpoints resume a TensorFlow run after SIGTERM (test_disk_and_sigterm.py).
def test_sigkill_between_checkpoints_resumes_from_the_last_saved_epoch(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    output_dir = tmp_path / "out"
    args = [f"--data={folder}", f"--output_dir={output_dir}", *with_settings(TINY, "--representation_epochs=6"),
            "--distribution=data_parallel"]  # fmt: skip
    devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    environment = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONUNBUFFERED": "1", "PYTHONPATH": REPO, **devices}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUNNER, "2", "4", SCRIPT, *args], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not os.path.exists(output_dir / "metrics.json")
    assert sum(bool(re.match(r"^\d+/\d+ - .*loss: ", line)) for line in killed.stdout.splitlines()) == 4
    (state,) = [json.loads((backup / "state.json").read_text()) for backup in (output_dir / "cache").glob("*.backup")]
    assert state["epoch"] == 2 and len(state["history"]["loss"]) == 2  # epochs 3 and 4 were lost with the process

    resumed = run_script(args, cwd=tmp_path, backend="jax", env=devices)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "data-parallel over 2 devices (global batches: SimCLR 8, clustering 8" in resumed.stdout
    assert "representation learning: resuming after epoch 2 of 6" in resumed.stdout
    assert "Epoch 3/6" in resumed.stdout and "Epoch 1/6" not in resumed.stdout
    metrics = json.loads((output_dir / "metrics.json").read_text())
    losses = metrics["losses"]["representation"]
    assert len(losses) == 6 and np.all(np.isfinite(losses))  # the history covers every epoch
    assert not [name for name in os.listdir(output_dir / "cache") if name.endswith(".backup")]


def test_checkpoints_are_saved_by_time_not_every_epoch(tmp_path, monkeypatch):
    clock = iter([0.0, 10.0, 30.0, 61.0, 70.0, 125.0])  # the start, then the end of each epoch
    monkeypatch.setattr(scan.training.time, "monotonic", lambda: next(clock))
    history = {}
    checkpoint = EpochCheckpoint(str(tmp_path / "backup"), history, every_seconds=60)
    saved = []
    monkeypatch.setattr(scan.training, "save_weights", lambda model, path: saved.append(os.path.basename(path)))
    for epoch in range(5):
        checkpoint.on_epoch_end(epoch, {"loss": float(epoch)})
    assert saved == ["epoch-0003.weights.h5", "epoch-0005.weights.h5"]  # at 61 s and at 125 s (64 s after 61 s)
    assert history == {"loss": [0.0, 1.0, 2.0, 3.0, 4.0]}
    assert json.loads((tmp_path / "backup" / "state.json").read_text())["epoch"] == 5


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_truncated_artifacts_are_discarded_and_recomputed(run_dir, run_here):
    tmp_path, data_args = run_dir
    # Neighbours mined among the projection head's outputs, so re-embedding needs the head from the cache too.
    args = [*data_args, *TINY, "--mining_features=projection", "--projection_units=6"]
    assert run_here(args, cwd=tmp_path).returncode == 0
    cache_dir = tmp_path / "out" / "cache"
    embeddings = np.load(next(cache_dir.glob("embeddings-*.npy")))
    assert embeddings.shape == (24, 6)  # the projection head's outputs, not the encoder's 512 features

    truncate(next(cache_dir.glob("clustering-*.weights.h5")))
    result = run_here(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"warning: discarding unreadable .*clustering-\w+\.weights\.h5", result.stdout)
    assert "neighbour mining: done before" in result.stdout and "Epoch 1/2" in result.stdout  # clustering retrained

    truncate(next(cache_dir.glob("embeddings-*.npy")))
    result = run_here(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"warning: discarding unreadable .*embeddings-\w+\.npy", result.stdout)
    assert "representation learning: done before" in result.stdout
    # The embeddings are computed again, so every later stage is recomputed from them, not reused.
    assert "neighbour mining: done before" not in result.stdout
    assert "clustering: done before" not in result.stdout and "cluster assignment: done before" not in result.stdout
    assert np.load(next(cache_dir.glob("neighbours-*.npy"))).shape == (24, 2)
    # Embedded again by the restored encoder and projection head: the same vectors as right after training.
    np.testing.assert_allclose(np.load(next(cache_dir.glob("embeddings-*.npy"))), embeddings, atol=1e-5)


def test_diverging_training_stops_with_advice_and_caches_nothing(tmp_path, run_here):
    folder = make_image_folder(tmp_path / "images")
    result = run_here(
        [f"--data={folder}", f"--output_dir={tmp_path / 'out'}", *TINY, "--temperature=1e-30"], cwd=tmp_path
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: representation learning diverged at epoch 1")
    assert "--representation_learning_rate" in last and "--temperature" in last
    assert not [name for name in os.listdir(tmp_path / "out" / "cache") if name.startswith("representation-")]


def test_write_atomically_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def failing_writer(temporary):
        with open(temporary, "w") as file:
            file.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(str(target), failing_writer)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_fingerprints_change_from_the_changed_stage_on():
    settings = {name: 1 for names in STAGE_SETTINGS.values() for name in names}
    base = stage_fingerprints("data", settings, STAGE_SETTINGS)
    clusters = stage_fingerprints("data", {**settings, "num_clusters": 2}, STAGE_SETTINGS)
    assert [base[stage] == clusters[stage] for stage in STAGES] == [True, True, True, False, False]
    views = stage_fingerprints("data", {**settings, "feature_views": 2}, STAGE_SETTINGS)
    assert [base[stage] == views[stage] for stage in STAGES] == [True, True, True, False, False]
    assert views["feature_views"] != base["feature_views"]
    neighbours = stage_fingerprints("data", {**settings, "k_neighbours": 2}, STAGE_SETTINGS)
    assert [base[stage] == neighbours[stage] for stage in STAGES] == [True, True, False, False, False]
    other_data = stage_fingerprints("other", settings, STAGE_SETTINGS)
    assert all(base[stage] != other_data[stage] for stage in STAGES)


def test_every_setting_is_fingerprinted_or_listed_as_changing_no_stage():
    with open(script.__file__) as file:
        settings = {name.lower() for name in read_settings_block(file.read())}
    fingerprinted = {name for names in STAGE_SETTINGS.values() for name in names}
    listed = set(NOT_FINGERPRINTED)
    assert settings - fingerprinted - listed == set()  # in neither: a stale stage would be reused after it changed
    assert fingerprinted & listed == set()  # in both: the list would say something untrue
    assert (fingerprinted | listed) - settings == set()  # no name of a setting that does not exist


def test_data_fingerprint_covers_pixels_and_labels():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    base = Dataset(images, np.array([0, 1, 0, 1]), ["a", "b"], "x")
    assert data_fingerprint(base) == data_fingerprint(base._replace(source="y"))
    changed_pixel = images.copy()
    changed_pixel[3, 7, 7, 2] = 1
    assert data_fingerprint(base) != data_fingerprint(base._replace(images=changed_pixel))
    assert data_fingerprint(base) != data_fingerprint(base._replace(labels=np.array([1, 1, 0, 1])))
    assert data_fingerprint(base) != data_fingerprint(base._replace(images=images[:3], labels=base.labels[:3]))


# Each stage's fingerprint for 3 x 40 generated images (20 held out): a run of the code as it is now must reuse the
# stage cache of an earlier run. The representation stage's are those recorded before the stages became functions
# (issue 21; the cpu recipe's since its BATCH_SIZE went from 256 to 128), kept when the script's machinery moved into
# the package and BATCH_SIZE became REPRESENTATION_BATCH_SIZE. The stages from the embeddings on were recorded again
# when EMBED_RAW_PIXELS and MINING_FEATURES became one setting, CLUSTER_ON_FEATURES and TUNE_ENCODER_DURING_CLUSTERING
# became ENCODER_DURING_CLUSTERING and the clustering and self-labeling stages got batch sizes of their own.
PINNED_FINGERPRINTS = {
    "tutorial": {
        "representation": "e436a691862c", "embeddings": "db26d25acd79", "neighbours": "6b02965c2695",
        "feature_views": "d59292039fcb", "clustering": "1b03ec07dd30", "self_labeling": "1a40223784ca",
        "predictions": "9712d0428ba8",
    },
    "cpu": {
        "representation": "8476fdd51e40", "embeddings": "bfabfd21c47d", "neighbours": "8b17471ff782",
        "feature_views": "b10b5317a59e", "clustering": "b36f147d9ece", "self_labeling": "5cebcb1dc083",
        "predictions": "49fcb52c47d8",
    },
}  # fmt: skip


@pytest.mark.parametrize("recipe", ["tutorial", "cpu"])
def test_stage_fingerprints_are_those_of_earlier_runs(tmp_path, recipe):
    folder = make_image_folder(tmp_path / "images", num_classes=3, per_class=40)
    with open(script.__file__) as file:
        comments = read_settings_block(file.read())
    defaults = {name: getattr(script, name) for name in comments}
    arguments = [f"--recipe={recipe}", f"--data={folder}", "--encoder=small", "--num_clusters=3", "--k_neighbours=3"]
    settings = parse_settings(
        [*arguments, "--holdout_images=20", f"--output_dir={tmp_path / 'out'}"],
        defaults,
        comments,
        script.RECIPES,
        tuple(CIFAR10_SPLITS),
    )
    settings.mixed_precision = resolve_mixed_precision(settings.mixed_precision, [])
    # The way the script takes: the data stage, then the stage cache.
    run = Run(settings, gpus=[], num_devices=1, times=None)
    data = script.prepare_data(run)
    assert data.digest == "3b0915b1bca8bad9" and len(data.train.images) == 100 and len(data.eval.images) == 20
    run.open_cache(data.digest, STAGE_SETTINGS)
    assert run.fingerprints == PINNED_FINGERPRINTS[recipe]
    assert run.cache.path("clustering", run.fingerprints["clustering"], ".npy") == str(
        tmp_path / "out" / "cache" / f"clustering-{PINNED_FINGERPRINTS[recipe]['clustering']}.npy"
    )
