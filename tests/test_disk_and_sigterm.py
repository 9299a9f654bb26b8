"""A full disk, SIGTERM and the stage cache's size, run as a user of a shared machine would meet them."""

import errno
import json
import os
import re
import signal
from collections import namedtuple

import keras
import numpy as np
import pytest

import scan.cache
import scan.files
import scan.training
from conftest import make_image_folder, with_settings
from scan.cache import StageCache, cache_report
from scan.files import DiskFullError, save_array, save_weights, weights_bytes, write_atomically
from scan.training import create_optimizer

TINY = ["--encoder=small", "--representation_batch_size=8", "--clustering_batch_size=8", "--representation_epochs=2", "--clustering_epochs=2",
        "--num_clusters=3", "--k_neighbours=2", "--embedding_batch_size=10"]  # fmt: skip
DISK_FULL = re.compile(
    r"^error: no space left on device writing (\S+) \((\d+\.\d\d) MB needed, (\d+\.\d\d) MB free\); free space or "
    r"set --output_dir to another disk, then run the same command again$"
)
Usage = namedtuple("Usage", "total used free")


def writer_that_fills_the_disk(after_bytes, error_number=errno.ENOSPC):
    def write(temporary):
        with open(temporary, "wb") as file:
            file.write(b"x" * after_bytes)
        raise OSError(error_number, os.strerror(error_number))

    return write


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_and_keeps_the_earlier_file(tmp_path, error_number):
    target = tmp_path / "embeddings.npy"
    save_array(np.arange(10.0), str(target))
    with pytest.raises(DiskFullError) as raised:
        write_atomically(str(target), writer_that_fills_the_disk(3_000_000, error_number))
    match = DISK_FULL.match(f"error: {raised.value}")
    assert match and match.group(1) == str(target)
    assert match.group(2) == "3.00"  # what the temporary file had reached
    assert float(match.group(3)) == pytest.approx(scan.files.shutil.disk_usage(tmp_path).free / 1e6, abs=50)
    assert os.listdir(tmp_path) == ["embeddings.npy"]  # the temporary file is gone
    np.testing.assert_array_equal(np.load(target), np.arange(10.0))


def test_other_write_errors_stay_what_they_are(tmp_path):
    with pytest.raises(OSError) as raised:
        write_atomically(str(tmp_path / "a.json"), writer_that_fills_the_disk(10, errno.EACCES))
    assert not isinstance(raised.value, DiskFullError) and os.listdir(tmp_path) == []


def tiny_model():
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(300), keras.layers.Dense(40)])
    model.compile(optimizer=create_optimizer("adamw", 0.001, 0.0, 0.001), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_weights_are_refused_before_hdf5_writes_anything_when_space_is_short(tmp_path, monkeypatch):
    model = tiny_model()
    checkpoint = tmp_path / "epoch-0001.weights.h5"
    save_weights(model, str(checkpoint))
    # The estimate covers the real file (weights and both AdamW slots) and overshoots it by less than 100 kB.
    assert checkpoint.stat().st_size <= weights_bytes(model) <= checkpoint.stat().st_size + 100_000
    saved = checkpoint.read_bytes()
    monkeypatch.setattr(scan.files.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 5000, 5000))
    writes = []
    monkeypatch.setattr(model, "save_weights", writes.append)
    with pytest.raises(DiskFullError) as raised:
        save_weights(model, str(checkpoint))
    match = DISK_FULL.match(f"error: {raised.value}")
    assert match and match.groups() == (str(checkpoint), f"{weights_bytes(model) / 1e6:.2f}", "0.01")
    assert writes == [] and checkpoint.read_bytes() == saved and os.listdir(tmp_path) == [checkpoint.name]


def test_a_stage_warns_before_it_starts_when_its_files_will_not_fit(tmp_path, monkeypatch, capsys):
    model = tiny_model()
    cache = StageCache(str(tmp_path / "cache"), resume=True)
    os.makedirs(cache.folder)
    monkeypatch.setattr(scan.files.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 100_000, 100_000))
    written = []  # what the cache would have saved: the patches are where StageCache looks them up
    monkeypatch.setattr(scan.cache, "save_weights", lambda model, path: written.append(os.path.basename(path)))
    monkeypatch.setattr(scan.cache, "save_json", lambda data, path: written.append(os.path.basename(path)))
    cache.trained_model("clustering", "abc", "clustering", model, lambda backup_dir: {})
    assert written == ["clustering-abc.weights.h5", "clustering-abc.json"]
    needed = model.count_params() * 4 * 3 * 2  # two checkpoints of the weights and two AdamW slots, while rotating
    assert capsys.readouterr().out.splitlines() == [
        f"warning: clustering will write about {needed / 1e6:.2f} MB to {cache.folder}, but only 0.10 MB are free; "
        "free space or set --output_dir to another disk"
    ]
    monkeypatch.setattr(scan.cache, "save_array", lambda array, path: written.append(os.path.basename(path)))
    cache.array("neighbours", "def", "neighbour mining", lambda: np.zeros(3), expected_bytes=99_999)
    cache.array("predictions", "0ab", "cluster assignment", lambda: np.zeros(3), expected_bytes=100_001)
    assert written[2:] == ["neighbours-def.npy", "predictions-0ab.npy"]
    assert capsys.readouterr().out.splitlines() == [
        f"warning: cluster assignment will write about 0.10 MB to {cache.folder}, but only 0.10 MB are free; "
        "free space or set --output_dir to another disk"
    ]


def test_a_full_disk_mid_run_ends_with_one_line_and_the_rerun_resumes(tmp_path, run_here, monkeypatch):
    folder = make_image_folder(tmp_path / "images")
    output_dir = tmp_path / "out"
    args = [f"--data={folder}", f"--output_dir={output_dir}", *TINY]

    # numpy.save fails for want of space once a few bytes are written: the first array saved is the embeddings, after
    # the representation has been trained and cached.
    def save(file, array, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    def exit_at_once(status):  # the command's os._exit, as a SystemExit that run_here reads the status of
        raise SystemExit(status)

    with monkeypatch.context() as patch:
        patch.setattr(np, "save", save)
        patch.setattr(scan.training.os, "_exit", exit_at_once)
        full = run_here(args, cwd=tmp_path)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    match = DISK_FULL.match(full.stderr.strip().splitlines()[-1])
    assert match and os.path.basename(match.group(1)).startswith("embeddings-")
    assert match.group(2) == f"{24 * 512 * 4 / 1e6:.2f}"  # the embeddings' size: 24 images x 512 float32 features
    cache = output_dir / "cache"
    assert not [name for root, _, names in os.walk(output_dir) for name in names if name.startswith(".tmp-")]
    assert sorted(name.split("-")[0] for name in os.listdir(cache)) == ["representation", "representation"]

    rerun = run_here(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "representation learning: done before" in rerun.stdout and "Epoch 1/2" in rerun.stdout  # clustering's


def test_sigterm_saves_the_epoch_it_is_in_and_the_rerun_resumes_after_it(tmp_path, run_here, monkeypatch):
    folder = make_image_folder(tmp_path / "images")
    output_dir = tmp_path / "out"
    # No checkpoint is due for an hour, so only the SIGTERM save can explain where the rerun resumes.
    args = [f"--data={folder}", f"--output_dir={output_dir}", *with_settings(TINY, "--representation_epochs=6"),
            "--checkpoint_seconds=3600"]  # fmt: skip

    # SIGTERM arrives, with the command's handler installed, as the third epoch begins.
    def signal_in_epoch_3(checkpoint, epoch, logs=None):
        if epoch + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:  # undone after it: the rerun is a new command, asked to stop by nothing
        patch.setattr(scan.training.EpochCheckpoint, "on_epoch_begin", signal_in_epoch_3, raising=False)
        patch.setattr(scan.training.TERMINATION, "requested", False)
        previous_handler = signal.signal(signal.SIGTERM, scan.training.TERMINATION.handle)
        try:
            terminated = run_here(args, cwd=tmp_path)
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
    assert terminated.returncode == 143, terminated.stderr[-3000:]
    assert "SIGTERM: saving at the end of this epoch, then stopping" in terminated.stderr
    last = terminated.stderr.strip().splitlines()[-1]
    assert last == "terminated (SIGTERM) after saving this epoch: run the same command again to resume"
    completed = sum(bool(re.match(r"^\d+/\d+ - .*loss: ", line)) for line in terminated.stdout.splitlines())
    assert completed == 3 and not os.path.exists(output_dir / "metrics.json")
    backup = next((output_dir / "cache").glob("representation-*.backup"))
    assert json.loads((backup / "state.json").read_text())["epoch"] == completed

    # A result of other settings and a compiled program: --prune_cache deletes the one and keeps the other.
    stale = output_dir / "cache" / "clustering-000000000000.weights.h5"
    stale.write_bytes(b"old")
    (output_dir / "cache" / "compiled").mkdir()
    (output_dir / "cache" / "compiled" / "program").write_bytes(b"xla")
    resumed = run_here([*args, "--prune_cache=true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"representation learning: resuming after epoch {completed} of 6" in resumed.stdout
    assert f"Epoch {completed + 1}/6" in resumed.stdout and "Epoch 1/6" not in resumed.stdout
    assert len(json.loads((output_dir / "metrics.json").read_text())["losses"]["representation"]) == 6
    assert not stale.exists() and (output_dir / "cache" / "compiled" / "program").exists()
    results = [name for name in os.listdir(output_dir / "cache") if name != "compiled"]
    assert len({name.split(".")[0] for name in results}) == 5  # representation, embeddings, neighbours, ...
    size = sum(os.path.getsize(output_dir / "cache" / name) for name in results)
    assert (
        f"stage cache: 5 results, {size / 1e6:.2f} MB in {output_dir / 'cache'} (pruned 1 results these settings do "
        "not use)" in resumed.stdout.splitlines()
    )


def test_the_cache_report_counts_results_and_prunes_only_what_other_settings_made(tmp_path):
    folder = tmp_path / "cache"
    files = {
        "representation-aaa.weights.h5": 1000, "representation-aaa.json": 10, "embeddings-bbb.npy": 500,
        "embeddings-old.npy": 700, "clustering-old.weights.h5": 300, "clustering-old.json": 5,
        ".tmp-1-predictions-ccc.npy": 40, "compiled/program": 9000, "clustering-old.backup/state.json": 20,
    }  # fmt: skip
    for name, size in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x" * size * 100)
    fingerprints = {"representation": "aaa", "embeddings": "bbb", "clustering": "ccc"}
    assert cache_report(str(folder), fingerprints, prune=False) == (
        f"stage cache: 4 results, 0.26 MB in {folder} (--prune_cache=true keeps only this run's)"
    )
    assert sorted(os.listdir(folder)) == sorted({name.split("/")[0] for name in files})  # nothing deleted
    assert cache_report(str(folder), fingerprints, prune=True) == (
        f"stage cache: 2 results, 0.15 MB in {folder} (pruned 2 results these settings do not use)"
    )
    assert sorted(os.listdir(folder)) == ["compiled", "embeddings-bbb.npy", "representation-aaa.json",
                                          "representation-aaa.weights.h5"]  # fmt: skip
    assert (folder / "compiled" / "program").stat().st_size == 900_000
