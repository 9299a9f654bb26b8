"""Data parallelism on two virtual devices, each engine in a subprocess (devices are fixed when an engine starts):
one step of each stage gives the loss and weights of one device, mining the same neighbours."""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SCRIPT, make_image_folder
from scan.backend import join_machines, resolve_distribution
from scan.batches import RowBatches
from scan.settings import UsageError, check_divisible

TINY = ["--recipe=cpu", "--holdout_images=6", "--representation_batch_size=8", "--clustering_batch_size=8", "--representation_epochs=1", "--clustering_epochs=1",
        "--self_label_epochs=1", "--self_label_threshold=0.34", "--num_clusters=3", "--k_neighbours=2", "--embedding_batch_size=16"]  # fmt: skip


@pytest.fixture(scope="module")
def two_device_run(tmp_path_factory):
    """`run(backend)`: data_parallel_steps.py in a process that sees two devices, once per backend for this module;
    returns its report, the image folder and the run's output folder (the tiny data-parallel run's metrics.json)."""
    runs = {}

    def run(backend):
        if backend not in runs:
            tmp_path = tmp_path_factory.mktemp(f"two-devices-{backend}")
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
            runs[backend] = json.loads(result.stdout.strip().splitlines()[-1]), folder, tmp_path / "out"
        return runs[backend]

    return run


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_two_devices_train_as_one_and_mine_the_same_neighbours(two_device_run, backend):
    report, _, output_dir = two_device_run(backend)
    assert report["devices"] == 2
    for stage in ["representation", "representation_on_device", "representation_vicreg", "clustering", "self_labeling"]:
        one, two = report[stage]["losses"]
        assert one.keys() == two.keys() and one, stage
        for name in one:
            np.testing.assert_allclose(two[name], one[name], rtol=1e-5, err_msg=f"{stage} {name}")
        # The step moved the weights, and moved them the same way on two devices as on one.
        assert report[stage]["weight_change"] > 1e-3, stage
        assert report[stage]["weight_difference"] < 1e-5, stage
    assert report["mining"]["one"] == report["mining"]["two"]
    assert report["odd_batch"] == (
        "--representation_batch_size=7: data-parallel over 2 devices needs a multiple of 2; use 6 or 8"
    )
    run = report["run"]
    assert (
        "data-parallel over 2 devices (global batches: SimCLR 8, clustering 8, self-labeling 512 images, split evenly "
        "over the devices)"
    ) in run
    assert re.fullmatch(r"RESULT split=eval images=6 clusters=3 acc=[\d.]+ nmi=[\d.]+ ari=-?[\d.]+", run[-1])
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["devices"] == 2


def test_auto_is_data_parallel_with_several_gpus_only():
    assert [resolve_distribution("auto", gpus) for gpus in (0, 1, 2, 8)] == [False, False, True, True]
    assert resolve_distribution("data_parallel", 0) and not resolve_distribution("none", 8)


@pytest.mark.parametrize(
    "value, devices, nearest", [(512, 3, "510 or 513"), (6, 8, "8"), (100, 8, "96 or 104"), (64, 8, None)]
)
def test_a_batch_that_does_not_split_names_the_nearest_that_do(value, devices, nearest):
    if nearest is None:
        check_divisible("clustering_batch_size", value, devices)  # 64 splits over 8
        return
    message = f"--clustering_batch_size={value}: data-parallel over {devices} devices needs a multiple of {devices}; use {nearest}"
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        check_divisible("clustering_batch_size", value, devices)


def test_tensorflow_multi_worker_is_refused_and_one_machine_joins_nothing():
    assert join_machines({"CUDA_VISIBLE_DEVICES": "0,1"}, "jax") == (0, 1)  # one machine: nothing to join
    with pytest.raises(UsageError, match="^TF_CONFIG is set, but Keras 3 cannot train under TensorFlow's Multi"):
        join_machines({"TF_CONFIG": '{"cluster": {}}'}, "tensorflow")
    with pytest.raises(UsageError, match="^KERAS_DISTRIBUTION_JOB_ADDRESSES is set, but .* on JAX only; set KERAS"):
        join_machines({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234"}, "tensorflow")
    # Without both numbers, or with a process number that is not below the count, nothing tries to join.
    for count, index in [(None, None), ("2", None), ("2", "2"), ("two", "0"), ("2", "-1")]:
        environment = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234"}
        environment.update({"KERAS_DISTRIBUTION_NUM_PROCESSES": count} if count else {})
        environment.update({"KERAS_DISTRIBUTION_PROCESS_ID": index} if index else {})
        message = (
            f"KERAS_DISTRIBUTION_NUM_PROCESSES={count or ''!r} and KERAS_DISTRIBUTION_PROCESS_ID={index or ''!r}: "
        )
        with pytest.raises(UsageError, match=f"^{re.escape(message)}with KERAS_DISTRIBUTION_JOB_ADDRESSES set"):
            join_machines(environment, "jax")


def test_each_process_feeds_its_own_part_of_every_global_batch():
    rows = np.arange(40).reshape(20, 2)
    neighbour_indices = (np.arange(20)[:, None] + np.arange(1, 4)) % 20
    whole = RowBatches(20, 8, seed=3, rows=rows, neighbour_indices=neighbour_indices, process=(0, 1))
    parts = [
        RowBatches(20, 8, seed=3, rows=rows, neighbour_indices=neighbour_indices, process=(index, 2))
        for index in (0, 1)
    ]
    for batch in range(len(whole)):
        (inputs, targets), halves = whole[batch], [part[batch] for part in parts]
        for name in ["anchors", "neighbours"]:
            np.testing.assert_array_equal(np.concatenate([half[0][name] for half in halves]), inputs[name])
            assert len(halves[0][0][name]) == 4
        np.testing.assert_array_equal(np.concatenate([half[1][0] for half in halves]), targets[0])


def free_port():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def run_two_processes(args, cwd):
    """The script in two JAX processes joined by keras.distribution.initialize(), as on two machines."""
    port, started = free_port(), []
    for index in range(2):
        environment = {
            **os.environ, "KERAS_BACKEND": "jax", "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"localhost:{port}",
            "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": str(index),
        }  # fmt: skip
        started.append(
            subprocess.Popen(
                [sys.executable, SCRIPT, *args],
                cwd=cwd,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    finished = [process.communicate(timeout=600) for process in started]
    for process, (_, stderr) in zip(started, finished, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in finished]


def test_two_processes_train_as_one_process_on_two_devices_and_resume(two_device_run, tmp_path):
    # The reference: the tiny data-parallel run of one JAX process on two devices, made by data_parallel_steps.py.
    report, folder, one = two_device_run("jax")
    expected = json.loads((one / "metrics.json").read_text())
    args = [f"--data={folder}", *TINY]
    outputs = run_two_processes([*args, f"--output_dir={tmp_path / 'two'}"], cwd=tmp_path)
    for index, output in enumerate(outputs):
        assert "data-parallel over 2 devices in 2 processes (global batches: SimCLR 8, clustering 8" in output
        # Each process gets every prediction, so each reports the whole run, the same as one process on two devices.
        assert output.strip().splitlines()[-1] == report["run"][-1]
        assert f"figures and metrics.json are in {tmp_path / 'two' / f'process-{index}'}" in output
        metrics = json.loads((tmp_path / "two" / f"process-{index}" / "metrics.json").read_text())
        assert metrics["devices"] == 2 and metrics["neighbour_purity"] == expected["neighbour_purity"]
        assert metrics["splits"] == expected["splits"]
        for stage, losses in expected["losses"].items():
            for name, values in losses.items() if isinstance(losses, dict) else [("loss", losses)]:
                got = (
                    metrics["losses"][stage]
                    if name == "loss" and stage == "representation"
                    else metrics["losses"][stage][name]
                )
                np.testing.assert_allclose(got, values, rtol=1e-6, err_msg=f"{stage} {name}")
    # Run again, each process finds its own finished stages.
    for index, output in enumerate(run_two_processes([*args, f"--output_dir={tmp_path / 'two'}"], cwd=tmp_path)):
        assert (
            "self-labeling: done before" in output
            and output.strip().splitlines()[-1] == outputs[index].strip().splitlines()[-1]
        )
