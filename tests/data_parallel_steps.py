"""Run by test_data_parallel.py in a subprocess that sees two devices (JAX: XLA_FLAGS; TensorFlow: two logical
CPUs, configured here before anything else touches TensorFlow). Prints one JSON line: for each stage, one training
step on one device and on both, from the same weights; the neighbours mined both ways; a tiny data-parallel run."""

import contextlib
import io
import json
import os
import sys
import tempfile

if os.environ["KERAS_BACKEND"] == "tensorflow":
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
import keras  # noqa: E402
import numpy as np  # noqa: E402

import scan_cifar10 as scan  # noqa: E402
from conftest import class_image  # noqa: E402

BATCH_SIZE, SIZE = 8, 16
IMAGES = np.stack([class_image(index % 3, index, SIZE) for index in range(BATCH_SIZE)])
NEIGHBOURS = (np.arange(BATCH_SIZE)[:, None] + np.array([1, 2])) % BATCH_SIZE
# Plain SGD, so the updated weights show the gradients themselves (Adam's first step is about lr * sign(gradient)).
scan.create_optimizer = lambda name, learning_rate, *unused, **unused_keywords: keras.optimizers.SGD(learning_rate)


def clustering_model(num_heads):
    preprocessing = scan.create_data_preprocessing(SIZE, IMAGES)
    head = scan.create_clustering_head(3, num_heads=num_heads)
    return scan.create_clustering_model(scan.create_encoder("small", 16), head, SIZE, preprocessing)


def build(stage):
    """The stage's learner, built, and the function that trains it for one step of the whole batch."""
    augmentation = scan.ImageAugmentation("simclr", seed=1)
    if stage.startswith("representation"):
        # "representation_on_device": the images held on the devices (DATA_ON_DEVICE), the batches their indices.
        rows = scan.DeviceRows(IMAGES) if stage == "representation_on_device" else None
        learner = scan.RepresentationLearner(
            scan.create_encoder("small", 16), 8, 2, scan.create_data_preprocessing(SIZE, IMAGES), augmentation,
            temperature=0.5, projection_head="mlp", contrastive_loss="ntxent", rows=rows,
        )  # fmt: skip
        learner(np.arange(2) if rows else IMAGES[:2])
        batches = scan.RowBatches(BATCH_SIZE, BATCH_SIZE, seed=0, rows=None if rows else IMAGES)
        return learner, lambda folder: scan.train_representation_learner(
            learner, batches, 1, 0.05, 0, 0.0, 0, "sgd", 0.0, 0.0, 1, 0, folder
        )
    if stage == "clustering":
        learner = scan.create_clustering_learner(clustering_model(2), augmentation, 1, IMAGES.shape[1:])
        batches = scan.RowBatches(
            BATCH_SIZE, BATCH_SIZE, seed=0, rows=IMAGES, neighbour_indices=NEIGHBOURS, sample_one_neighbour=True
        )
        return learner, lambda folder: scan.train_clustering_learner(
            learner, batches, 1, 0.05, 0.0, 5.0, True, 1, 0, folder
        )
    # SCAN's strong view: each replica draws it for the global batch, whose mean colour fills the cut-out.
    strong = scan.ImageAugmentation("scan", seed=3)
    learner = scan.SelfLabelLearner(clustering_model(1), scan.ImageAugmentation("weak", seed=2), strong, 0.34)
    learner(IMAGES[:2])
    batches = scan.RowBatches(BATCH_SIZE, BATCH_SIZE, seed=0, rows=IMAGES)
    return learner, lambda folder: scan.train_self_labeling(learner, batches, 1, 0.05, 0.0, 1, 0, folder)


def one_step(stage, scope, initial_weights=None):
    keras.utils.set_random_seed(0)
    with scope:
        learner, train = build(stage)
        if initial_weights is not None:
            learner.set_weights(initial_weights)
        before = [np.array(weight) for weight in learner.get_weights()]
        with tempfile.TemporaryDirectory() as folder:
            history = train(folder)
        return before, [np.array(weight) for weight in learner.get_weights()], history


def data_parallel():
    return scan.start_data_parallel(keras.backend.backend())[0].scope()


report = {"devices": scan.start_data_parallel(keras.backend.backend())[1]}
for stage in ["representation", "representation_on_device", "clustering", "self_labeling"]:
    before, one, one_history = one_step(stage, contextlib.nullcontext())
    _, two, two_history = one_step(stage, data_parallel(), initial_weights=before)
    report[stage] = {
        "losses": [one_history, two_history],
        "weight_difference": max(float(np.abs(a - b).max()) for a, b in zip(one, two, strict=True)),
        "weight_change": max(float(np.abs(a - b).max()) for a, b in zip(one, before, strict=True)),
    }

features = np.random.default_rng(0).normal(size=(40, 8)).astype("float32")
features /= np.linalg.norm(features, axis=1, keepdims=True)
with data_parallel():
    on_two = scan.mine_neighbours(features, 5, 10)
report["mining"] = {"one": scan.mine_neighbours(features, 5, 10).tolist(), "two": on_two.tolist()}

try:
    scan.main([*sys.argv[1:], "--distribution=data_parallel", "--batch_size=7"])
except scan.UsageError as error:
    report["odd_batch"] = str(error)
output = io.StringIO()
with contextlib.redirect_stdout(output):
    scan.main([*sys.argv[1:], "--distribution=data_parallel"])
report["run"] = output.getvalue().splitlines()
print(json.dumps(report))
