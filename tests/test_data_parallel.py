"""Data parallelism on two virtual devices, each engine in a subprocess (devices are fixed when an engine starts):
one step of each stage gives the loss and weights of one device, mining the same neighbours."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import scan_cifar10 as scan
from conftest import REPO, make_image_folder, run_script

TINY = ["--recipe=cpu", "--holdout_images=6", "--batch_size=8", "--representation_epochs=1", "--clustering_epochs=1",
        "--self_label_epochs=0", "--num_clusters=3", "--k_neighbours=2", "--embedding_batch_size=16"]  # fmt: skip


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_two_devices_train_as_one_and_mine_the_same_neighbours(tmp_path, backend):
    folder = make_image_folder(tmp_path / "images", num_classes=3, per_class=10)
    environment = {
        **os.environ, "KERAS_BACKEND": backend, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "data_parallel_steps.py"), f"--data={folder}",
         f"--output_dir={tmp_path / 'out'}", *TINY],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2
    for stage in ["representation", "representation_on_device", "clustering", "self_labeling"]:
        one, two = report[stage]["losses"]
        assert one.keys() == two.keys() and one, stage
        for name in one:
            np.testing.assert_allclose(two[name], one[name], rtol=1e-5, err_msg=f"{stage} {name}")
        # The step moved the weights, and moved them the same way on two devices as on one.
        assert report[stage]["weight_change"] > 1e-3, stage
        assert report[stage]["weight_difference"] < 1e-5, stage
    assert report["mining"]["one"] == report["mining"]["two"]
    assert report["odd_batch"] == "--batch_size=7: data-parallel over 2 devices needs a multiple of 2; use 6 or 8"
    run = report["run"]
    assert "data-parallel over 2 devices (global batch 8, 4 per device)" in run
    assert re.fullmatch(r"RESULT split=eval images=6 clusters=3 acc=[\d.]+ nmi=[\d.]+ ari=-?[\d.]+", run[-1])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["devices"] == 2


def test_auto_is_data_parallel_with_several_gpus_only():
    assert [scan.resolve_distribution("auto", gpus) for gpus in (0, 1, 2, 8)] == [False, False, True, True]
    assert scan.resolve_distribution("data_parallel", 0) and not scan.resolve_distribution("none", 8)


@pytest.mark.parametrize(
    "value, devices, nearest", [(512, 3, "510 or 513"), (6, 8, "8"), (100, 8, "96 or 104"), (64, 8, None)]
)
def test_a_batch_that_does_not_split_names_the_nearest_that_do(value, devices, nearest):
    if nearest is None:
        scan.check_divisible("batch_size", value, devices)  # 64 splits over 8
        return
    message = f"--batch_size={value}: data-parallel over {devices} devices needs a multiple of {devices}; use {nearest}"
    with pytest.raises(scan.UsageError, match=f"^{re.escape(message)}$"):
        scan.check_divisible("batch_size", value, devices)


def test_several_machines_are_refused_rather_than_trained_apart():
    scan.check_one_machine({"CUDA_VISIBLE_DEVICES": "0,1"})  # one machine: nothing to refuse
    for name in ["TF_CONFIG", "KERAS_DISTRIBUTION_JOB_ADDRESSES"]:
        with pytest.raises(scan.UsageError, match=f"^{name} is set, but training over several machines is not"):
            scan.check_one_machine({name: "10.0.0.1:1234"})


def test_tensorflow_data_parallel_takes_one_step_per_call(tmp_path):
    result = run_script(
        ["--distribution=data_parallel", "--steps_per_execution=2", f"--output_dir={tmp_path / 'out'}"], cwd=tmp_path
    )
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --steps_per_execution=2: TensorFlow's MirroredStrategy runs one step per call; set 1, or use "
        "KERAS_BACKEND=jax"
    )
