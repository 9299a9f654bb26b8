"""Shared helpers: tiny generated data sets, so no test touches the network or the real CIFAR-10."""

import csv
import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scan_cifar10.py")


def class_image(class_id, index, size=32):
    """A small RGB image whose colour says its class, with a little per-image noise."""
    rng = np.random.default_rng(class_id * 1000 + index)
    colour = np.array([(class_id * 97) % 256, (class_id * 53 + 80) % 256, (class_id * 31 + 160) % 256])
    image = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255)
    return image.astype(np.uint8)


def make_image_folder(root, num_classes=3, per_class=8, size=32, labelled=True):
    """Writes `num_classes * per_class` PNG images, in class sub-folders when `labelled`."""
    for class_id in range(num_classes):
        folder = os.path.join(root, f"class_{class_id}") if labelled else root
        os.makedirs(folder, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(class_image(class_id, index, size)).save(
                os.path.join(folder, f"c{class_id}_{index:03d}.png")
            )
    return str(root)


def write_cifar_batch(path, images_chw, labels):
    """Writes one python-pickle CIFAR-10 batch: data [n, 3072] uint8 in CHW order, labels a list."""
    with open(path, "wb") as file:
        pickle.dump({b"data": images_chw.reshape(len(images_chw), -1), b"labels": list(labels)}, file)


def with_settings(arguments, *changes):
    """`arguments` (["--name=value", ...]) with each of `changes` in place of the argument of the same name."""
    names = {change.split("=", 1)[0]: change for change in changes}
    return [names.get(argument.split("=", 1)[0], argument) for argument in arguments]


def run_script(args, cwd, backend="tensorflow", timeout=600, env=None):
    """Runs scan_cifar10.py as a user would; returns the CompletedProcess."""
    environment = {**os.environ, "KERAS_BACKEND": backend, "https_proxy": "http://127.0.0.1:9", **(env or {})}
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def run_here(monkeypatch, capsys):
    """`run(args, cwd, backend=None)`: the command's own path, `run_as_command(main)`, in this process, with what
    `run_script` returns (returncode, stdout, stderr); it saves the seconds a new process spends importing
    TensorFlow. A `backend` other than this process's runs in a new process (an engine is fixed once imported)."""
    import keras

    import scan.training
    import scan_cifar10

    monkeypatch.setattr(scan.training.TERMINATION, "install", lambda: None)  # pytest keeps its own SIGTERM handler

    def run(args, cwd, backend=None):
        if backend not in (None, keras.backend.backend()):
            return run_script(args, cwd, backend=backend)
        monkeypatch.chdir(cwd)
        returncode = 0
        try:
            scan.training.run_as_command(lambda: scan_cifar10.main(args))
        except SystemExit as exited:
            returncode = exited.code
        finally:
            keras.mixed_precision.set_global_policy("float32")
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(args, returncode, printed.out, printed.err)

    return run


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


def check_sorted_as_listed(target, table, data_root):
    """Checks that each image that `table` (clusters.csv or assigned.csv) lists lies, under the sorting `target`, in
    the folder `cluster-NN` its row names, and that nothing else lies there: files are matched by their bytes to the
    sources (paths relative to `data_root`)."""
    with open(table, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    digest = lambda path: hashlib.sha256(open(path, "rb").read()).hexdigest()  # noqa: E731
    listed = [(f"cluster-{int(row['cluster']):02d}", digest(os.path.join(data_root, row["source"]))) for row in rows]
    found = [
        (folder, digest(os.path.join(target, folder, name)))
        for folder in os.listdir(target)
        if folder.startswith("cluster-")
        for name in os.listdir(os.path.join(target, folder))
    ]
    assert sorted(found) == sorted(listed)
