"""The compiled augmentation against the tutorial's Keras layers, and the compiled training step."""

import os
import subprocess
import sys

import numpy as np
import pytest
from keras import layers, ops, random

from conftest import REPO
from scan.augmentations import (
    ImageAugmentation,
    affine_resample,
    create_data_augmentation,
    random_colour_distortion,
    random_resized_crop_transforms,
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


@pytest.mark.parametrize("kind", ["tutorial", "simclr", "scan"])
def test_augmentation_writes_views_of_the_requested_side(kind):
    images = smooth_images()
    augmentation = ImageAugmentation(kind, seed=3, output_size=12)
    views = ops.convert_to_numpy(augmentation(images, training=True))
    assert views.shape == (len(images), 12, 12, 3)
    assert views.min() >= -1e-3 and views.max() <= 255 + 1e-3


@pytest.mark.parametrize("kind", ["weak", "SimCLR", "tutorial-layers", ""])
def test_an_unknown_kind_is_an_error_not_scans_strong_augmentation(kind):
    with pytest.raises(ValueError, match=f"^unknown augmentation kind '{kind}'; choose one of tutorial, simclr, scan$"):
        ImageAugmentation(kind, seed=0)
    if kind != "tutorial-layers":  # the tutorial's own Keras layers, which create_data_augmentation builds
        with pytest.raises(ValueError, match="unknown augmentation kind"):
            create_data_augmentation(kind, seed=0)


def twin_uniform(seed, shape):
    """`draw(low, high)`: the values that keras.random.uniform draws from SeedGenerator(`seed`), call after call, as
    the augmentation's own generator of that seed draws them."""
    generator = random.SeedGenerator(seed)
    return lambda low=0.0, high=1.0: ops.convert_to_numpy(random.uniform(shape, low, high, seed=generator))


def test_simclr_crops_are_those_of_its_definition_read_back_from_a_ramp():
    # Red is each pixel's column, green its row: bilinear resampling keeps a ramp a ramp, so each view's red and green
    # give where its crop lies in the image and how large it is, away from the clamped first and last row and column.
    count = 400
    rows, columns = np.mgrid[0:HEIGHT, 0:WIDTH].astype("float32")
    ramps = np.repeat(np.stack([columns, rows, np.zeros_like(rows)], axis=-1)[None], count, axis=0)
    transforms = random_resized_crop_transforms(count, HEIGHT, WIDTH, random.SeedGenerator(5))
    views = ops.convert_to_numpy(affine_resample(ops.convert_to_tensor(ramps), transforms))[:, 1:-1, 1:-1]
    np.testing.assert_allclose(views[..., 0], views[:, :1, :, 0].repeat(HEIGHT - 2, axis=1), atol=1e-3)  # no rotation
    np.testing.assert_allclose(views[..., 1], views[:, :, :1, 1].repeat(WIDTH - 2, axis=2), atol=1e-3)
    x_step, y_step = views[:, 0, 1, 0] - views[:, 0, 0, 0], views[:, 1, 0, 1] - views[:, 0, 0, 1]
    # The output pixel x samples the crop at its left edge + (x + 0.5) x its width share (mirrored when flipped).
    crop_width, crop_height, flipped = np.abs(x_step), y_step, x_step < 0
    left = np.where(flipped, views[:, 0, 0, 0] + (WIDTH - 1.5) * x_step, views[:, 0, 0, 0] - 1.5 * crop_width) + 0.5
    top = views[:, 0, 0, 1] - 1.5 * crop_height + 0.5
    # SimCLR's random resized crop as SCAN configures it: area 0.2-1 of the image, aspect ratio 3/4-4/3 drawn
    # log-uniformly, each side at most the image's, a uniform position inside the image, a horizontal flip half the time.
    draw = twin_uniform(5, (count,))
    area, aspect = draw(0.2, 1.0), np.exp(draw(np.log(3 / 4), np.log(4 / 3)))
    width_share, height_share = np.minimum(np.sqrt(area * aspect), 1), np.minimum(np.sqrt(area / aspect), 1)
    np.testing.assert_allclose(crop_width, width_share, atol=1e-4)
    np.testing.assert_allclose(crop_height, height_share, atol=1e-4)
    np.testing.assert_allclose(left, draw() * (1 - width_share) * WIDTH, atol=2e-3)
    np.testing.assert_allclose(top, draw() * (1 - height_share) * HEIGHT, atol=2e-3)
    np.testing.assert_array_equal(flipped, draw() < 0.5)
    # Whatever the draws, every crop lies in the image, its area and shape within the definition's ranges.
    assert (left >= -2e-3).all() and (left + crop_width * WIDTH <= WIDTH + 2e-3).all()
    assert (top >= -2e-3).all() and (top + crop_height * HEIGHT <= HEIGHT + 2e-3).all()
    uncapped = (crop_width < 1) & (crop_height < 1)
    assert uncapped.mean() > 0.8 and flipped.mean() == pytest.approx(0.5, abs=0.1)
    assert (crop_width * crop_height)[uncapped].min() >= 0.2 - 1e-4 and (crop_width * crop_height).max() <= 1 + 1e-4
    assert (
        3 / 4 - 1e-3 <= (crop_width / crop_height)[uncapped].min() <= (crop_width / crop_height).max() <= 4 / 3 + 1e-3
    )


YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])  # NTSC's RGB -> YIQ


def colour_distortion_by_hand(images, brightness, contrast, saturation, hue, jitter, gray):
    """SimCLR's colour distortion in numpy, from per-image draws [B, 1, 1, 1]: brightness, contrast (about the image's
    mean luma), saturation (about each pixel's luma) and hue (a turn of `hue` x 360 degrees of the YIQ chroma), each
    clipped to [0, 1], where `jitter` < 0.8; then, where `gray` < 0.2, the luma in all three channels."""
    luma = lambda x: x @ YIQ[0]  # noqa: E731  ([..., 3] -> [...])
    jittered = np.clip(images * brightness, 0, 1)
    mean = luma(jittered).mean(axis=(1, 2))[:, None, None, None]
    jittered = np.clip((jittered - mean) * contrast + mean, 0, 1)
    jittered = np.clip((jittered - luma(jittered)[..., None]) * saturation + luma(jittered)[..., None], 0, 1)
    angle = hue[:, 0, 0, 0] * 2 * np.pi
    cos, sin, zeros, ones = np.cos(angle), np.sin(angle), np.zeros_like(angle), np.ones_like(angle)
    turn = np.array([[ones, zeros, zeros], [zeros, cos, -sin], [zeros, sin, cos]]).transpose(
        2, 0, 1
    )  # Y kept, I-Q turned
    jittered = np.clip(np.einsum("dc,bce,ef,bhwf->bhwd", np.linalg.inv(YIQ), turn, YIQ, jittered), 0, 1)
    distorted = np.where(jitter < 0.8, jittered, images)
    return np.where(gray < 0.2, luma(distorted)[..., None].repeat(3, axis=-1), distorted)


def test_simclr_colour_distortion_changes_two_colour_images_as_its_formulas_say():
    # Each image is two flat colours side by side, so that contrast (about the image's mean) and saturation (about
    # each pixel's own luma) differ; SimCLR's strength 0.5 for CIFAR-10: jitter 0.4, 0.4, 0.4 and hue 0.1.
    count = 600
    colours = np.random.default_rng(4).uniform(0.05, 0.95, (count, 1, 2, 3)).astype("float32")
    images = colours.repeat(2, axis=1).repeat(3, axis=2)  # [600, 2, 6, 3]
    distorted = ops.convert_to_numpy(random_colour_distortion(ops.convert_to_tensor(images), random.SeedGenerator(9)))
    draw = twin_uniform(9, (count, 1, 1, 1))
    draws = [draw(1 - 0.4, 1 + 0.4), draw(1 - 0.4, 1 + 0.4), draw(1 - 0.4, 1 + 0.4), draw(-0.1, 0.1), draw(), draw()]
    np.testing.assert_allclose(distorted, colour_distortion_by_hand(images, *draws), atol=1e-5)
    # Each flat colour stays flat; a fifth of the images turn gray, and 0.2 x 0.8 stay as they were (no jitter, no gray).
    assert np.ptp(distorted.reshape(count, 2, 2, 3, 3), axis=(1, 3)).max() < 1e-6  # [B, rows, halves, columns, RGB]
    gray = np.ptp(distorted, axis=-1).max(axis=(1, 2)) < 1e-5
    unchanged = np.abs(distorted - images).max(axis=(1, 2, 3)) < 1e-6
    assert gray.mean() == pytest.approx(0.2, abs=0.05) and unchanged.mean() == pytest.approx(0.16, abs=0.05)


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
