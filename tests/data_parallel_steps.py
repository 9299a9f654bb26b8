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

import scan_cifar10 as script  # noqa: E402
from conftest import class_image  # noqa: E402
from scan.augmentations import SMALL_VIEW_CROP_AREA, ImageAugmentation, sized_view_layers  # noqa: E402
from scan.backend import start_data_parallel  # noqa: E402
from scan.batches import DeviceRows, RowBatches  # noqa: E402
from scan.losses import ClustersConsistencyLoss, ClustersEntropyLoss  # noqa: E402
from scan.models import create_clustering_head, create_clustering_model, create_encoder  # noqa: E402
from scan.neighbours import mine_neighbours  # noqa: E402
from scan.self_labeling import SelfLabelLearner  # noqa: E402
from scan.settings import UsageError  # noqa: E402
from scan.training import train  # noqa: E402

BATCH_SIZE, SIZE = 8, 16
IMAGES = np.stack([class_image(index % 3, index, SIZE) for index in range(BATCH_SIZE)])
NEIGHBOURS = (np.arange(BATCH_SIZE)[:, None] + np.array([1, 2])) % BATCH_SIZE


def train_one_step(learner, batches, folder, loss=None):
    """One epoch (here one step) of `train`, the script's training of every stage, with plain SGD at 0.05, so the
    updated weights show the gradients themselves (Adam's first step is about lr * sign(gradient))."""
    return train(learner, batches, 1, keras.optimizers.SGD(0.05), folder, "step", "", 0, loss=loss)


def clustering_model(num_heads):
    preprocessing = script.create_data_preprocessing(SIZE, IMAGES)
    head = create_clustering_head(3, num_heads=num_heads)
    return create_clustering_model(create_encoder("small", 16), head, SIZE, preprocessing)


def build(stage):
    """The stage's learner, built, and the function that trains it for one step of the whole batch."""
    augmentation = ImageAugmentation("simclr", seed=1)
    if stage == "representation_vicreg":
        # VICReg's batch statistics and its expander's batch norm over the global batch, with 2 small views of 8 px.
        preprocessing = script.create_data_preprocessing(SIZE, IMAGES)
        small = sized_view_layers("simclr", preprocessing.layers[-1], 8, 2, SMALL_VIEW_CROP_AREA)
        learner = script.RepresentationLearner(
            create_encoder("small", 16), 8, 2, preprocessing, augmentation, projection_head="vicreg",
            pretext_loss="vicreg", small_views=2, small_view_preprocessing=small[0], small_view_augmentation=small[1],
        )  # fmt: skip
        learner(IMAGES[:2])
        batches = RowBatches(BATCH_SIZE, BATCH_SIZE, seed=0, rows=IMAGES)
        return learner, lambda folder: train_one_step(learner, batches, folder)
    if stage.startswith("representation"):
        # "representation_on_device": the images held on the devices (DATA_ON_DEVICE), the batches their indices.
        rows = DeviceRows(IMAGES) if stage == "representation_on_device" else None
        learner = script.RepresentationLearner(
            create_encoder("small", 16), 8, 2, script.create_data_preprocessing(SIZE, IMAGES), augmentation,
            temperature=0.5, projection_head="mlp", pretext_loss="ntxent", rows=rows,
        )  # fmt: skip
        learner(np.arange(2) if rows else IMAGES[:2])
        batches = RowBatches(BATCH_SIZE, BATCH_SIZE, seed=0, rows=None if rows else IMAGES)
        return learner, lambda folder: train_one_step(learner, batches, folder)
    if stage == "clustering":
        learner = script.create_clustering_learner(clustering_model(2), augmentation, 1, IMAGES.shape[1:])
        batches = RowBatches(
            BATCH_SIZE, BATCH_SIZE, seed=0, rows=IMAGES, neighbour_indices=NEIGHBOURS, sample_one_neighbour=True
        )
        losses = [ClustersConsistencyLoss(from_logits=False), ClustersEntropyLoss(5.0, apply_weight=True)]
        return learner, lambda folder: train_one_step(learner, batches, folder, losses)
    # SCAN's strong view: each replica draws it for the global batch, whose mean colour fills the cut-out.
    strong = ImageAugmentation("scan", seed=3)
    learner = SelfLabelLearner(clustering_model(1), None, strong, 0.34)
    learner(IMAGES[:2])
    batches = RowBatches(BATCH_SIZE, BATCH_SIZE, seed=0, rows=IMAGES)
    return learner, lambda folder: train_one_step(learner, batches, folder)


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
    return start_data_parallel(keras.backend.backend())[0].scope()


report = {"devices": start_data_parallel(keras.backend.backend())[1]}
for stage in ["representation", "representation_on_device", "representation_vicreg", "clustering", "self_labeling"]:
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
    on_two = mine_neighbours(features, 5, 10)
report["mining"] = {"one": mine_neighbours(features, 5, 10).tolist(), "two": on_two.tolist()}

try:
    script.main([*sys.argv[1:], "--distribution=data_parallel", "--representation_batch_size=7"])
except UsageError as error:
    report["odd_batch"] = str(error)
output = io.StringIO()
with contextlib.redirect_stdout(output):
    script.main([*sys.argv[1:], "--distribution=data_parallel"])
report["run"] = output.getvalue().splitlines()
print(json.dumps(report))
