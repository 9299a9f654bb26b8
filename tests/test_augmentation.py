"""The compiled augmentation against the tutorial's Keras layers, and the compiled training step."""

import os
import subprocess
import sys

import numpy as np
import pytest
from keras import layers, ops

from conftest import REPO
from scan.augmentations import (
    ImageAugmentation,
    affine_resample,
    rescale_transforms,
    sample_tutorial_parameters,
    tutorial_transforms,
)

HEIGHT, WIDTH = 20, 24


def smooth_images():
    """Two images without sharp edges, so that interpolation differences stay small."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([128 + 100 * np.sin(x / 4), 128 + 100 * np.cos(y / 5), 128 + 50 * np.sin((x + y) / 6)], axis=-1)
    return np.stack([image, image[::-1]]).astype("float32")


def fused(images, **parameters):
    """Our single resampling with fixed tutorial parameters (identity for the ones not given)."""
    values = {"translate_x": 0.0, "translate_y": 0.0, "flip": False, "angle": 0.0, "zoom_x": 1.0, "zoom_y": 1.0}
    values.update(parameters)
    tensors = {
        name: ops.convert_to_tensor(np.full(len(images), value, dtype=bool if name == "flip" else "float32"))
        for name, value in values.items()
    }
    transforms = tutorial_transforms(tensors, HEIGHT, WIDTH)
    return ops.convert_to_numpy(affine_resample(ops.convert_to_tensor(images), transforms))


@pytest.mark.parametrize(
    "layer, parameters",
    [
        (layers.RandomRotation((0.1, 0.1), fill_mode="nearest"), {"angle": 0.1 * 2 * np.pi}),
        (layers.RandomRotation((-0.15, -0.15), fill_mode="nearest"), {"angle": -0.15 * 2 * np.pi}),
        (
            layers.RandomTranslation((0.1, 0.1), (-0.15, -0.15), fill_mode="nearest"),
            {"translate_x": -0.15, "translate_y": 0.1},
        ),
        (layers.RandomZoom((-0.2, -0.2), (0.05, 0.05), fill_mode="nearest"), {"zoom_x": 1.05, "zoom_y": 0.8}),
    ],
)
def test_each_fixed_transform_equals_the_keras_layer(layer, parameters):
    images = smooth_images()
    expected = ops.convert_to_numpy(layer(images, training=True))
    np.testing.assert_allclose(fused(images, **parameters), expected, atol=1e-3)


def test_flip_mirrors_the_image():
    images = smooth_images()
    np.testing.assert_allclose(fused(images, flip=True), images[:, :, ::-1], atol=1e-4)


def test_the_composed_transform_matches_the_layers_in_turn_to_interpolation_tolerance():
    images = smooth_images()
    expected = images
    for layer in [
        layers.RandomTranslation((0.05, 0.05), (-0.1, -0.1), fill_mode="nearest"),
        layers.RandomRotation((0.03, 0.03), fill_mode="nearest"),
        layers.RandomZoom((-0.2, -0.2), (-0.1, -0.1), fill_mode="nearest"),
    ]:
        expected = ops.convert_to_numpy(layer(expected, training=True))
    ours = fused(images, translate_x=-0.1, translate_y=0.05, angle=0.03 * 2 * np.pi, zoom_x=0.9, zoom_y=0.8)
    interior = (slice(None), slice(3, -3), slice(3, -3))  # the layers clamp at every step, we clamp once
    assert np.abs(ours - expected)[interior].max() < 4.0  # of 255: three bilinear passes blur a little more than one
    assert np.abs(ours - expected)[interior].mean() < 1.0


def test_random_parameters_cover_the_tutorial_ranges():
    from keras import random

    parameters = sample_tutorial_parameters(20000, random.SeedGenerator(0))
    values = {name: ops.convert_to_numpy(value).astype("float64") for name, value in parameters.items()}
    for name, (low, high) in {
        "translate_x": (-0.2, 0.2),
        "translate_y": (-0.2, 0.2),
        "angle": (-0.15 * 2 * np.pi, 0.15 * 2 * np.pi),
        "zoom_x": (0.7, 1.1),
        "zoom_y": (0.7, 1.1),
    }.items():
        assert low <= values[name].min() and values[name].max() <= high, name
        width = high - low
        assert values[name].min() < low + 0.01 * width and values[name].max() > high - 0.01 * width, name
        assert abs(values[name].mean() - (low + high) / 2) < 0.02 * width, name
        assert abs(values[name].std() - width / np.sqrt(12)) < 0.02 * width, name  # uniform
    assert abs(values["flip"].mean() - 0.5) < 0.02
    assert abs(np.corrcoef(values["zoom_x"], values["zoom_y"])[0, 1]) < 0.03  # independent axes, as in RandomZoom


def test_a_halved_output_grid_of_the_identity_map_is_2x2_average_pooling():
    images = smooth_images()
    identity = ops.convert_to_tensor(np.tile([[1.0, 0, 0, 0, 1.0, 0]], (len(images), 1)).astype("float32"))
    rescaled = rescale_transforms(identity, 2.0, 2.0)
    ours = affine_resample(ops.convert_to_tensor(images), rescaled, (HEIGHT // 2, WIDTH // 2))
    # Each output pixel centre lies midway between four input pixel centres.
    pooled = images.reshape(len(images), HEIGHT // 2, 2, WIDTH // 2, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(ops.convert_to_numpy(ours), pooled, atol=1e-3)


@pytest.mark.parametrize("kind", ["tutorial", "simclr", "weak"])
def test_augmentation_writes_views_of_the_requested_side(kind):
    images = smooth_images()
    augmentation = ImageAugmentation(kind, seed=3, output_size=12)
    views = ops.convert_to_numpy(augmentation(images, training=True))
    assert views.shape == (len(images), 12, 12, 3)
    assert views.min() >= -1e-3 and views.max() <= 255 + 1e-3


def test_tutorial_augmentation_layer_is_random_and_keeps_shape():
    images = smooth_images()
    augmentation = ImageAugmentation("tutorial", seed=1)
    first, second = (ops.convert_to_numpy(augmentation(images, training=True)) for _ in range(2))
    assert first.shape == images.shape and not np.allclose(first, second)
    assert images.min() - 1e-3 <= first.min() and first.max() <= images.max() + 1e-3  # bilinear, nearest fill


# Keras decides on jax.jit when the learner compiles; the script prints that decision (training.train). Only the
# decision needs JAX, so a small JAX process builds both learners instead of a whole run.
JIT_DECISION = """
import keras, numpy as np
import scan_cifar10 as script
from scan.augmentations import create_data_augmentation
from scan.models import create_encoder
images = np.zeros((4, 16, 16, 3), "uint8")
for kind in ["tutorial", "tutorial-layers"]:
    learner = script.RepresentationLearner(create_encoder("small", 8), 8, 2, script.create_data_preprocessing(16, images),
                                           create_data_augmentation(kind, seed=1))
    learner(images[:2])
    learner.compile(optimizer=keras.optimizers.AdamW())
    print(kind, learner.jit_compile)
"""


def test_the_tutorial_keras_layers_keep_the_step_out_of_jit_on_jax():
    environment = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", JIT_DECISION], env=environment, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    # The fused default is jitted on JAX (its whole run is shown in test_end_to_end); the tutorial's layers are not.
    assert result.stdout.splitlines()[-2:] == ["tutorial True", "tutorial-layers False"]
