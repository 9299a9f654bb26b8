"""SCAN's strong augmentation ("scan"): each operation against PIL, which SCAN's code applies, or a hand-worked case."""

import numpy as np
import pytest
from keras import ops, random
from PIL import Image, ImageEnhance, ImageOps

from scan.augmentations import (
    RANDAUGMENT_INDEX,
    ImageAugmentation,
    affine_resample,
    autocontrast,
    blend,
    cutout,
    equalize,
    grayscale,
    posterize,
    randaugment_matrices,
    randaugment_pixel_operation,
    randaugment_transforms,
    sample_randaugment_parameters,
    smooth,
    solarize,
)

SIZE = 16


def random_image(seed=0, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, (SIZE, SIZE, 3)).astype(np.uint8)


def ours(function, image, *arguments):
    """`function` on a batch of the one image, the magnitude given per image; back to an [H, W, C] float array."""
    batch = ops.convert_to_tensor(image[None].astype("float32"))
    magnitudes = [ops.convert_to_tensor(np.full((1, 1, 1, 1), value, "float32")) for value in arguments]
    return ops.convert_to_numpy(function(batch, *magnitudes))[0]


@pytest.mark.parametrize(
    "function, reference, magnitude",
    [
        (autocontrast, ImageOps.autocontrast, None),
        (equalize, ImageOps.equalize, None),
        (solarize, ImageOps.solarize, 100),
        (posterize, ImageOps.posterize, 5),
        (lambda x, v: blend(grayscale(x), x, v), lambda im, v: ImageEnhance.Color(im).enhance(v), 0.3),
        (lambda x, v: blend(ops.zeros_like(x), x, v), lambda im, v: ImageEnhance.Brightness(im).enhance(v), 0.6),
        (lambda x, v: blend(smooth(x), x, v), lambda im, v: ImageEnhance.Sharpness(im).enhance(v), 0.2),
    ],
)
def test_each_pixel_operation_equals_pil_to_its_rounding(function, reference, magnitude):
    image = random_image(low=20, high=230)  # autocontrast then has something to stretch
    arguments = () if magnitude is None else (magnitude,)
    expected = np.asarray(reference(Image.fromarray(image), *arguments), dtype="float32")
    # PIL rounds its intermediate luma and truncates its blends to integers: within 1.5 levels.
    np.testing.assert_allclose(ours(function, image, *arguments), expected, atol=1.5)


def test_contrast_blends_towards_the_rounded_mean_luma_as_pil():
    image = random_image(1)
    expected = np.asarray(ImageEnhance.Contrast(Image.fromarray(image)).enhance(0.4), dtype="float32")
    operation = RANDAUGMENT_INDEX["contrast"]
    result = randaugment_pixel_operation(
        image[None].astype("float32"), np.array([operation], "int32"), np.array([0.4], "float32")
    )
    np.testing.assert_allclose(ops.convert_to_numpy(result)[0], expected, atol=1.5)


def test_equalize_on_a_hand_worked_channel():
    # 300 pixels at level 0, 211 at 100, 5 at 200: PIL's step is (516 - 5) // 255 = 2, and level l maps to
    # (step // 2 + the pixels below l) // step: 0 -> 0, 100 -> (1 + 300) // 2 = 150, 200 -> (1 + 511) // 2 = 256,
    # clipped to 255.
    levels = np.array([0] * 300 + [100] * 211 + [200] * 5, dtype="float32")
    image = np.repeat(levels.reshape(1, 1, -1, 1), 3, axis=-1)  # [1, 1, 516, 3]
    result = ops.convert_to_numpy(equalize(ops.convert_to_tensor(image)))[0, 0, :, 0]
    np.testing.assert_array_equal(result, [0.0] * 300 + [150.0] * 211 + [255.0] * 5)
    # Fewer than 255 pixels outside the top level: a step of 0, and PIL leaves the image as it is.
    image = np.array([[[[7.0] * 3] * 4] * 3 + [[[9.0] * 3] * 4]], dtype="float32")  # [1, 4, 4, 3]
    np.testing.assert_array_equal(ops.convert_to_numpy(equalize(ops.convert_to_tensor(image))), image)


def geometric(name, magnitude, image):
    """Our resampling of one slot holding `name` with `magnitude`, black fill."""
    operations = np.array([RANDAUGMENT_INDEX[name]], "int32")
    matrices = randaugment_matrices(operations, np.array([magnitude], "float32"), SIZE, SIZE)
    transforms = ops.reshape(matrices[:, :2, :], (-1, 6))
    return ops.convert_to_numpy(affine_resample(image[None].astype("float32"), transforms, fill_value=0.0))[0]


@pytest.mark.parametrize(
    "name, magnitude, reference",
    [
        ("rotate", 90.0, lambda im: im.rotate(90)),
        ("rotate", -90.0, lambda im: im.rotate(-90)),
        ("translate_x", 0.25, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0.25 * SIZE, 0, 1, 0))),
        ("translate_y", -0.125, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, -0.125 * SIZE))),
    ],
)
def test_whole_pixel_geometric_operations_equal_pil_exactly(name, magnitude, reference):
    image = random_image(2)
    expected = np.asarray(reference(Image.fromarray(image)), dtype="float32")
    np.testing.assert_allclose(geometric(name, magnitude, image), expected, atol=1e-3)


@pytest.mark.parametrize("name, coefficients", [("shear_x", (1, 0.1, 0, 0, 1, 0)), ("shear_y", (1, 0, 0, 0.1, 1, 0))])
def test_shears_sample_where_pil_samples(name, coefficients):
    # A smooth ramp: bilinear sampling at PIL's points equals PIL's bilinear transform away from the border.
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    image = np.stack([x * 12, y * 12, (x + y) * 6], axis=-1).astype(np.uint8)
    expected = np.asarray(
        Image.fromarray(image).transform(image.shape[:2], Image.AFFINE, coefficients, resample=Image.BILINEAR),
        "float32",
    )
    interior = (slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(geometric(name, 0.1, image)[interior], expected[interior], atol=1.0)


def test_the_flip_and_the_slots_compose_in_the_drawn_order():
    image = random_image(3)
    translate = RANDAUGMENT_INDEX["translate_x"]
    rotate = RANDAUGMENT_INDEX["rotate"]
    parameters = {
        "flip": np.array([True]),
        "operations": np.array([[translate], [rotate]], "int32"),
        "magnitudes": np.array([[0.25], [90.0]], "float32"),
    }
    transforms = randaugment_transforms(parameters, SIZE, SIZE)
    result = ops.convert_to_numpy(affine_resample(image[None].astype("float32"), transforms, fill_value=0.0))[0]
    pil = Image.fromarray(image).transpose(Image.FLIP_LEFT_RIGHT)
    pil = pil.transform(pil.size, Image.AFFINE, (1, 0, 0.25 * SIZE, 0, 1, 0)).rotate(90)
    np.testing.assert_allclose(result, np.asarray(pil, dtype="float32"), atol=1e-3)


def test_cutout_fills_scans_hole_and_nothing_else():
    images = np.arange(2 * 8 * 8 * 3, dtype="float32").reshape(2, 8, 8, 3)
    fill = np.array([1.0, 2.0, 3.0], "float32")
    # Image 0: centre (row 2, column 5), length 5: rows 0-3 and columns 3-6 (length // 2 = 2 either side, end
    # excluded). Image 1: length 1, so SCAN's hole is empty.
    result = ops.convert_to_numpy(cutout(images, *np.array([[2, 4], [5, 4], [5, 1]], "int32"), fill))
    expected = images.copy()
    expected[0, 0:4, 3:7] = fill
    np.testing.assert_array_equal(result, expected)


def test_scan_kind_draws_per_image_keeps_shape_and_varies():
    images = np.stack([random_image(seed) for seed in range(64)]).astype("float32")
    layer = ImageAugmentation("scan", seed=0)
    first, second = (ops.convert_to_numpy(layer(images, training=True)) for _ in range(2))
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 255
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer(images, training=False)), images)
    parameters = sample_randaugment_parameters(20000, 4, random.SeedGenerator(0))
    operations = ops.convert_to_numpy(parameters["operations"])
    # Each of the 14 operations is drawn about as often, independently per slot and image.
    counts = np.bincount(operations.ravel(), minlength=14) / operations.size
    np.testing.assert_allclose(counts, 1 / 14, atol=0.01)
    assert (operations[0] != operations[1]).mean() > 0.9
    magnitudes = ops.convert_to_numpy(parameters["magnitudes"])
    rotations = magnitudes[operations == RANDAUGMENT_INDEX["rotate"]]
    assert -30 <= rotations.min() < -25 and 25 < rotations.max() <= 30
    posterize = magnitudes[operations == RANDAUGMENT_INDEX["posterize"]]
    assert 4 <= posterize.min() and posterize.max() < 8
