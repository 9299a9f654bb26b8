"""The augmentations, as Keras layers that compile (`keras.ops` only).

The tutorial applies a random translation, horizontal flip, rotation and zoom to every image. Its four Keras layers
(`AUGMENTATION = "tutorial-layers"`) cannot be XLA-compiled, which keeps the whole training step out of `jax.jit`;
so `"tutorial"` draws the same four transforms from the same ranges and applies them as one batched affine
resampling. The transforms are geometric and fill with the nearest pixel, so applying them to the raw images
before the per-channel normalisation gives the same result as the tutorial's order. `"simclr"` is SimCLR's
(random resized crop, horizontal flip, colour jitter, random grayscale).

SCAN's strong augmentation (`"scan"`, its `augmentation_strategy: ours`) flips the image horizontally with
probability 0.5, applies 4 operations drawn with replacement from a RandAugment-like list of 14, each with a
magnitude drawn uniformly from its range, then cuts out one square hole (its side up to half the image) filled
with the mean colour. It is drawn per image and applied as one batched function: the geometric operations
(rotation, shear, translation) compose into the flip's affine map, resampled once with black fill as PIL does;
each of the 4 slots then applies its drawn pixel operation through per-image selections. Two approximations, both
small: the geometry comes before every pixel operation (SCAN interleaves them in the drawn order), and one bilinear
resampling replaces PIL's nearest-pixel one per operation.

`FeatureViews` stands in for augmentation when the clustering head learns on cached features.
"""

import keras
import numpy as np
from keras import layers, ops

from scan.backend import gather_replicas, replica_rows

# The share of the image's area that a "simclr" crop covers: the full views' (SimCLR's), and the small extra views'
# (SMALL_VIEWS), a moderate range of their own, since small networks learn less from crops of very different scales
# (SSLight, Tan et al. 2023) than from DINO's 5-40 %.
CROP_AREA = (0.2, 1.0)
SMALL_VIEW_CROP_AREA = (0.2, 0.6)


def create_data_augmentation(kind, seed, output_size=None, crop_area=CROP_AREA):
    """The augmentation layer; with `output_size`, its augmented images have that side (VIEW_SIZE); `crop_area` is
    the range of the "simclr" crops' share of the image."""
    if kind != "tutorial-layers":
        return ImageAugmentation(
            kind, seed=seed, output_size=output_size, crop_area=crop_area, name="data_augmentation"
        )
    resize = [layers.Resizing(output_size, output_size)] if output_size else []
    return keras.Sequential(
        [
            layers.RandomTranslation(
                height_factor=(-0.2, 0.2), width_factor=(-0.2, 0.2), fill_mode="nearest", seed=seed
            ),
            layers.RandomFlip(mode="horizontal", seed=seed + 1),
            layers.RandomRotation(factor=0.15, fill_mode="nearest", seed=seed + 2),
            layers.RandomZoom(height_factor=(-0.3, 0.1), width_factor=(-0.3, 0.1), fill_mode="nearest", seed=seed + 3),
            *resize,
        ],
        name="data_augmentation",
    )


def sized_view_layers(augmentation_kind, normalization, size, seed, crop_area=CROP_AREA):
    """The preprocessing and the augmentation of views of side `size`: the augmentation resamples each view to that
    side (from a crop of `crop_area`, a share of the image, with "simclr"), the already adapted `normalization` follows."""
    preprocessing = keras.Sequential([layers.Resizing(size, size), normalization])
    return preprocessing, create_data_augmentation(augmentation_kind, seed, size, crop_area)


def simclr_view_layers(settings, data_preprocessing, data_augmentation):
    """The (preprocessing, augmentation) of SimCLR's full views and of its SMALL_VIEWS ((None, None) without them).
    The full views are `data_preprocessing`'s and `data_augmentation`'s, or VIEW_SIZE-sided when it is set; the small
    views are SMALL_VIEW_SIZE-sided, drawn by augmentations of their own from crops of a moderate area
    (SMALL_VIEW_CROP_AREA); all are normalised by `data_preprocessing`'s already adapted normalisation layer."""
    views, small_views = (data_preprocessing, data_augmentation), (None, None)
    normalization = data_preprocessing.layers[-1]
    if settings.view_size:
        views = sized_view_layers(settings.augmentation, normalization, settings.view_size, settings.seed)
    if settings.small_views:
        small_views = sized_view_layers(
            settings.augmentation, normalization, settings.small_view_size, settings.seed + 21, SMALL_VIEW_CROP_AREA
        )
    return views, small_views


class ImageAugmentation(layers.Layer):
    """Random augmentation of raw [0, 255] images: one batched affine resampling, then colour operations.

    kind "tutorial": the tutorial's translation (0.2), horizontal flip, rotation (0.15) and zoom (-0.3 to 0.1).
    kind "simclr": random resized crop (area 0.2-1, aspect ratio 3/4-4/3), horizontal flip, colour jitter
    (brightness, contrast, saturation 0.4, hue 0.1) with probability 0.8, grayscale with probability 0.2.
    kind "scan": SCAN's strong augmentation, drawn per image: horizontal flip, 4 operations drawn from its RandAugment
    list with random magnitudes, then a cut-out hole (this module's first lines).
    With `output_size`, the resampling writes augmented images of that side directly (no second resize); `crop_area`
    is the range of the "simclr" crops' area, as a share of the image.
    """

    KINDS = ("tutorial", "simclr", "scan")

    def __init__(self, kind, seed=None, output_size=None, crop_area=CROP_AREA, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})  # Pixels stay float32 under mixed precision.
        if kind not in self.KINDS:  # A misspelt kind would otherwise train silently on SCAN's strong augmentation.
            raise ValueError(f"unknown augmentation kind {kind!r}; choose one of {', '.join(self.KINDS)}")
        self.kind = kind
        self.output_size = output_size
        self.crop_area = crop_area
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        images = ops.cast(images, self.compute_dtype)
        if not training:
            return images
        # On TensorFlow replicas each augments the global batch and keeps its own rows: the draws are one device's.
        num_rows = ops.shape(images)[0]
        images = gather_replicas(images)
        batch_size, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
        if self.kind == "tutorial":
            parameters = sample_tutorial_parameters(batch_size, self.seed_generator)
            transforms = tutorial_transforms(parameters, height, width)
        elif self.kind == "simclr":
            transforms = random_resized_crop_transforms(batch_size, height, width, self.seed_generator, self.crop_area)
        else:
            parameters = sample_randaugment_parameters(batch_size, 4, self.seed_generator)
            transforms = randaugment_transforms(parameters, height, width)
        output_size = (self.output_size or height, self.output_size or width)
        if output_size != (height, width):
            transforms = rescale_transforms(transforms, height / output_size[0], width / output_size[1])
        if self.kind == "scan":
            images = scan_strong_augmentation(images, parameters, transforms, output_size)
        else:
            images = affine_resample(images, transforms, output_size)
        if self.kind == "simclr":
            images = random_colour_distortion(images / 255.0, self.seed_generator) * 255.0
        return replica_rows(images, num_rows)


def affine_resample(images, transforms, output_size=None, fill_value=None):
    """Bilinear resampling of images [B, H, W, C] by one affine map per image, edges extended ("nearest" fill), or,
    with `fill_value`, points outside the image (as PIL's nearest pixel sees them) take that value.

    transforms [B, 6] = (a0, a1, a2, b0, b1, b2) map each output pixel (x, y) to the input point
    (a0 x + a1 y + a2, b0 x + b1 y + b2), as in `keras.ops.image.affine_transform`. The output is
    [B, *output_size, C], by default the input's size.
    """
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    output_height, output_width = output_size or (height, width)
    transforms = ops.cast(transforms, "float32")
    ys, xs = ops.meshgrid(
        ops.arange(output_height, dtype="float32"), ops.arange(output_width, dtype="float32"), indexing="ij"
    )
    # Each coefficient [B] -> [B, 1, 1]. (Reshape, not [:, i, None, None]: TensorFlow's graph optimizer can drop
    # the new axes of a slice of a stacked tensor.)
    a0, a1, a2, b0, b1, b2 = [ops.reshape(transforms[:, i], (-1, 1, 1)) for i in range(6)]
    # Source coordinates [B, H, W], clamped so that points outside take the nearest edge pixel.
    x_unclamped, y_unclamped = a0 * xs + a1 * ys + a2, b0 * xs + b1 * ys + b2
    x, y = ops.clip(x_unclamped, 0.0, width - 1.0), ops.clip(y_unclamped, 0.0, height - 1.0)
    x0, y0 = ops.floor(x), ops.floor(y)
    weight_x, weight_y = ops.cast((x - x0)[..., None], images.dtype), ops.cast((y - y0)[..., None], images.dtype)
    x0, y0 = ops.cast(x0, "int32"), ops.cast(y0, "int32")
    x1, y1 = ops.minimum(x0 + 1, width - 1), ops.minimum(y0 + 1, height - 1)
    # pixels shape: [B * H * W, C]; a pixel's row is its image's offset plus y * W + x.
    pixels = ops.reshape(images, (-1, channels))
    offsets = ops.reshape(ops.arange(ops.shape(images)[0], dtype="int32") * (height * width), (-1, 1, 1))
    gather = lambda yy, xx: ops.take(pixels, offsets + yy * width + xx, axis=0)  # noqa: E731  ([B, H, W, C])
    top = gather(y0, x0) * (1 - weight_x) + gather(y0, x1) * weight_x
    bottom = gather(y1, x0) * (1 - weight_x) + gather(y1, x1) * weight_x
    resampled = top * (1 - weight_y) + bottom * weight_y
    if fill_value is None:
        return resampled
    inside = (x_unclamped >= -0.5) & (x_unclamped < width - 0.5) & (y_unclamped >= -0.5) & (y_unclamped < height - 0.5)
    return ops.where(inside[..., None], resampled, ops.cast(fill_value, images.dtype))


def rescale_transforms(transforms, scale_y, scale_x):
    """Affine maps [B, 6] for an output grid `scale_y` x `scale_x` times coarser than the one `transforms` map from:
    the new output pixel (x, y) has its centre at the old output point (scale_x (x + 0.5) - 0.5, ...)."""
    a0, a1, a2, b0, b1, b2 = [transforms[:, i] for i in range(6)]
    offset_x, offset_y = (scale_x - 1) / 2, (scale_y - 1) / 2
    return ops.stack(
        [
            a0 * scale_x, a1 * scale_y, a2 + a0 * offset_x + a1 * offset_y,
            b0 * scale_x, b1 * scale_y, b2 + b0 * offset_x + b1 * offset_y,
        ],
        axis=1,
    )  # fmt: skip


def sample_tutorial_parameters(batch_size, seed):
    """Per-image parameters of the tutorial's four layers, drawn from the same ranges."""
    uniform = lambda low=0.0, high=1.0: keras.random.uniform((batch_size,), low, high, seed=seed)  # noqa: E731
    return {
        "translate_x": uniform(-0.2, 0.2),  # RandomTranslation: a share of the width
        "translate_y": uniform(-0.2, 0.2),  # ... and of the height
        "flip": uniform() < 0.5,  # RandomFlip("horizontal")
        "angle": uniform(-0.15, 0.15) * 2 * np.pi,  # RandomRotation(0.15): a share of a full turn, in radians
        "zoom_x": 1.0 + uniform(-0.3, 0.1),  # RandomZoom(width_factor=(-0.3, 0.1)): below 1 zooms in
        "zoom_y": 1.0 + uniform(-0.3, 0.1),  # RandomZoom(height_factor=(-0.3, 0.1))
    }


def tutorial_transforms(parameters, height, width):
    """Affine maps [B, 6] equal to the tutorial's translate, flip, rotate and zoom layers applied in turn.

    Each layer samples its input at (its matrix) x (output point), so the composed matrix is T F R Z; the
    matrices are those of the Keras layers, about the centre ((W - 1) / 2, (H - 1) / 2).
    """
    angle, zoom_x, zoom_y = parameters["angle"], parameters["zoom_x"], parameters["zoom_y"]
    ones, zeros = ops.ones_like(angle), ops.zeros_like(angle)
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    cos, sin = ops.cos(angle), ops.sin(angle)
    translate = affine_matrices(
        ones, zeros, -parameters["translate_x"] * width, zeros, ones, -parameters["translate_y"] * height
    )
    mirror = ops.where(parameters["flip"], -ones, ones)
    flip = affine_matrices(mirror, zeros, ops.where(parameters["flip"], ones * (width - 1), zeros), zeros, ones, zeros)
    rotate = affine_matrices(
        cos, -sin, centre_x - centre_x * cos + centre_y * sin, sin, cos, centre_y - centre_x * sin - centre_y * cos
    )
    zoom = affine_matrices(zoom_x, zeros, centre_x * (1 - zoom_x), zeros, zoom_y, centre_y * (1 - zoom_y))
    composed = ops.matmul(ops.matmul(translate, flip), ops.matmul(rotate, zoom))
    return ops.reshape(composed[:, :2, :], (-1, 6))  # [B, 2, 3] -> [B, 6]


def affine_matrices(a0, a1, a2, b0, b1, b2):
    """Homogeneous matrices [B, 3, 3] from six coefficient vectors [B]."""
    zeros, ones = ops.zeros_like(a0), ops.ones_like(a0)
    rows = [ops.stack(row, axis=-1) for row in ((a0, a1, a2), (b0, b1, b2), (zeros, zeros, ones))]
    return ops.stack(rows, axis=1)


def random_resized_crop_transforms(batch_size, height, width, seed, scale=CROP_AREA, ratio=(3 / 4, 4 / 3)):
    """Affine maps [B, 6] of random crops (area share `scale`, aspect `ratio`), resized to the full image and
    flipped horizontally with probability 0.5."""
    uniform = lambda low=0.0, high=1.0: keras.random.uniform((batch_size,), low, high, seed=seed)  # noqa: E731
    area = uniform(*scale)
    aspect = ops.exp(uniform(np.log(ratio[0]), np.log(ratio[1])))
    crop_width = ops.minimum(ops.sqrt(area * aspect), 1.0)  # as a share of the width
    crop_height = ops.minimum(ops.sqrt(area / aspect), 1.0)
    left = uniform() * (1.0 - crop_width) * width
    top = uniform() * (1.0 - crop_height) * height
    flip = uniform() < 0.5
    # Pixel centres: output x + 0.5 lands on left + (x + 0.5) * crop_width; a flip first maps x to W - 1 - x.
    a0 = ops.where(flip, -crop_width, crop_width)
    a2 = left - 0.5 + crop_width * ops.where(flip, width - 0.5, 0.5)
    zeros = ops.zeros_like(a0)
    return ops.stack([a0, zeros, a2, zeros, crop_height, top - 0.5 + 0.5 * crop_height], axis=1)


RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


# A hue rotation by theta is YIQ_TO_RGB @ rotation(theta) @ RGB_TO_YIQ = HUE_FIXED + cos * HUE_COS + sin * HUE_SIN.
HUE_FIXED = np.linalg.inv(RGB_TO_YIQ) @ np.diag([1.0, 0.0, 0.0]) @ RGB_TO_YIQ


HUE_COS = np.linalg.inv(RGB_TO_YIQ) @ np.diag([0.0, 1.0, 1.0]) @ RGB_TO_YIQ


HUE_SIN = np.linalg.inv(RGB_TO_YIQ) @ np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]) @ RGB_TO_YIQ


def grayscale(images):
    """Luma of RGB images [B, H, W, 3] -> [B, H, W, 1] (ITU-R 601 weights)."""
    return ops.sum(images * ops.convert_to_tensor([0.299, 0.587, 0.114], dtype=images.dtype), axis=-1, keepdims=True)


def random_colour_distortion(images, seed, strength=(0.4, 0.4, 0.4, 0.1), jitter_probability=0.8, gray_probability=0.2):
    """SimCLR's colour distortion of [0, 1] images: jitter brightness, contrast, saturation and hue (in that
    order, each clipped to [0, 1]) with probability `jitter_probability`, then grayscale with `gray_probability`."""
    batch_size = ops.shape(images)[0]
    uniform = lambda low=0.0, high=1.0: keras.random.uniform((batch_size, 1, 1, 1), low, high, seed=seed)  # noqa: E731
    brightness, contrast, saturation, hue = strength
    jittered = ops.clip(images * uniform(1 - brightness, 1 + brightness), 0, 1)
    mean = ops.mean(grayscale(jittered), axis=(1, 2, 3), keepdims=True)
    jittered = ops.clip((jittered - mean) * uniform(1 - contrast, 1 + contrast) + mean, 0, 1)
    gray = grayscale(jittered)
    jittered = ops.clip((jittered - gray) * uniform(1 - saturation, 1 + saturation) + gray, 0, 1)
    angle = uniform(-hue, hue)[:, 0, 0] * 2 * np.pi  # [B, 1]
    # hue_matrices shape: [B, 3, 3].
    hue_matrices = HUE_FIXED + ops.cos(angle)[..., None] * HUE_COS + ops.sin(angle)[..., None] * HUE_SIN
    jittered = ops.clip(ops.einsum("bhwc,bdc->bhwd", jittered, ops.cast(hue_matrices, images.dtype)), 0, 1)
    images = ops.where(uniform() < jitter_probability, jittered, images)
    return ops.where(uniform() < gray_probability, ops.repeat(grayscale(images), 3, axis=-1), images)


# SCAN's operations (data/augment.py) in its order, with the range its magnitude is drawn from.
RANDAUGMENT_OPERATIONS = [
    ("identity", 0, 1), ("autocontrast", 0, 1), ("equalize", 0, 1), ("rotate", -30, 30), ("solarize", 0, 256),
    ("color", 0.05, 0.95), ("contrast", 0.05, 0.95), ("brightness", 0.05, 0.95), ("sharpness", 0.05, 0.95),
    ("shear_x", -0.1, 0.1), ("translate_x", -0.1, 0.1), ("translate_y", -0.1, 0.1), ("posterize", 4, 8),
    ("shear_y", -0.1, 0.1),
]  # fmt: skip


RANDAUGMENT_INDEX = {name: index for index, (name, _, _) in enumerate(RANDAUGMENT_OPERATIONS)}


# The operations whose sign SCAN flips with probability 0.5 (its `random_mirror`).
MIRRORED_OPERATIONS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def sample_randaugment_parameters(batch_size, num_operations, seed):
    """Per-image draws of SCAN's strong augmentation: a flip [B], and per slot [num_operations, B] the operation's
    index and its signed magnitude; the cut-out hole's centre (shares of the side) and length (share of the side)."""
    uniform = lambda shape=(batch_size,), low=0.0, high=1.0: keras.random.uniform(shape, low, high, seed=seed)  # noqa: E731
    slots = (num_operations, batch_size)
    operations = keras.random.randint(slots, 0, len(RANDAUGMENT_OPERATIONS), seed=seed)
    low = ops.take(ops.convert_to_tensor([low for _, low, _ in RANDAUGMENT_OPERATIONS], "float32"), operations)
    high = ops.take(ops.convert_to_tensor([high for _, _, high in RANDAUGMENT_OPERATIONS], "float32"), operations)
    mirrored = ops.convert_to_tensor([name in MIRRORED_OPERATIONS for name, _, _ in RANDAUGMENT_OPERATIONS])
    sign = ops.where(ops.logical_and(ops.take(mirrored, operations), uniform(slots) < 0.5), -1.0, 1.0)
    return {
        "flip": uniform() < 0.5,
        "operations": operations,
        "magnitudes": sign * (low + uniform(slots) * (high - low)),
        "cutout_y": uniform(),
        "cutout_x": uniform(),
        "cutout_length": uniform(),  # SCAN: an integer from 1 to half the side, uniformly
    }


def randaugment_matrices(operations, magnitudes, height, width):
    """Homogeneous affine maps [B, 3, 3] (output pixel -> input pixel, pixel centres at integers) of one slot's
    operations [B] with magnitudes [B]; the identity for the pixel operations. They are PIL's maps: a rotation by
    the magnitude in degrees, counter-clockwise about the centre; shears and translations (shares of the side)."""
    ones, zeros = ops.ones_like(magnitudes), ops.zeros_like(magnitudes)
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    # PIL's rotate samples at angle -magnitude (in its y-down coordinates).
    cos, sin = ops.cos(-magnitudes * np.pi / 180), ops.sin(-magnitudes * np.pi / 180)
    # PIL's AFFINE (a, b, c, d, e, f) maps pixel centres (x + 0.5, y + 0.5); in pixel indices its offset is
    # c + (a + b - 1) / 2, so a shear also moves the image by half its magnitude.
    maps = {
        "rotate": (cos, sin, centre_x - centre_x * cos - centre_y * sin, -sin, cos, centre_y + centre_x * sin - centre_y * cos),
        "shear_x": (ones, magnitudes, magnitudes / 2, zeros, ones, zeros),
        "shear_y": (ones, zeros, zeros, magnitudes, ones, magnitudes / 2),
        "translate_x": (ones, zeros, magnitudes * width, zeros, ones, zeros),
        "translate_y": (ones, zeros, zeros, zeros, ones, magnitudes * height),
    }  # fmt: skip
    matrices = affine_matrices(ones, zeros, zeros, zeros, ones, zeros)
    for name, coefficients in maps.items():
        selected = ops.reshape(operations == RANDAUGMENT_INDEX[name], (-1, 1, 1))
        matrices = ops.where(selected, affine_matrices(*coefficients), matrices)
    return matrices


def randaugment_transforms(parameters, height, width):
    """Affine maps [B, 6] of the flip followed by every slot's geometric operation, in the drawn order."""
    flip = ops.cast(parameters["flip"], "float32")
    ones, zeros = ops.ones_like(flip), ops.zeros_like(flip)
    composed = affine_matrices(1 - 2 * flip, zeros, flip * (width - 1), zeros, ones, zeros)
    for slot in range(parameters["operations"].shape[0]):
        slot_maps = randaugment_matrices(parameters["operations"][slot], parameters["magnitudes"][slot], height, width)
        composed = ops.matmul(composed, slot_maps)  # Each operation samples the previous one's output.
    return ops.reshape(composed[:, :2, :], (-1, 6))  # [B, 2, 3] -> [B, 6]


def autocontrast(images):
    """PIL's ImageOps.autocontrast of [0, 255] images [B, H, W, C]: each channel stretched to the full range."""
    low = ops.min(images, axis=(1, 2), keepdims=True)
    high = ops.max(images, axis=(1, 2), keepdims=True)
    stretched = (images - low) * (255.0 / ops.maximum(high - low, 1e-3))
    return ops.where(high > low, ops.clip(stretched, 0, 255), images)


def equalize(images):
    """PIL's ImageOps.equalize of [0, 255] images [B, H, W, C]: each channel's levels through its cumulative histogram
    (PIL's step: the pixels outside the top level over 255; a channel with a step of 0 stays as it is)."""
    batch_size, channels = ops.shape(images)[0], images.shape[-1]
    levels = ops.cast(ops.clip(ops.round(images), 0, 255), "int32")
    # bins shape: [B, H, W, C]; each pixel's bin among the B * C histograms of 256 levels.
    image_channel = ops.arange(batch_size, dtype="int32")[:, None, None, None] * channels
    bins = ops.reshape((image_channel + ops.arange(channels, dtype="int32")) * 256 + levels, (-1,))
    histograms = ops.reshape(
        ops.segment_sum(ops.ones_like(bins, dtype="float32"), bins, num_segments=batch_size * channels * 256),
        (-1, 256),
    )  # [B * C, 256]
    top_level = ops.max(ops.reshape(ops.transpose(levels, (0, 3, 1, 2)), (batch_size * channels, -1)), axis=1)
    top_count = ops.take_along_axis(histograms, top_level[:, None], axis=1)[:, 0]
    step = ops.floor((ops.sum(histograms, axis=1) - top_count) / 255.0)[:, None]  # [B * C, 1]
    below = ops.cumsum(histograms, axis=1) - histograms  # pixels below each level
    lookup = ops.clip(ops.floor((ops.floor(step / 2) + below) / ops.maximum(step, 1.0)), 0, 255)
    lookup = ops.where(step > 0, lookup, ops.arange(256, dtype="float32"))
    return ops.reshape(ops.take(ops.reshape(lookup, (-1,)), bins), ops.shape(images))


def solarize(images, threshold):
    """PIL's ImageOps.solarize: levels at or above `threshold` [B, 1, 1, 1] inverted."""
    return ops.where(images < threshold, images, 255.0 - images)


def posterize(images, bits):
    """PIL's ImageOps.posterize: each level keeps its top `bits` [B, 1, 1, 1] bits (SCAN: int of the magnitude)."""
    quantum = 2.0 ** (8 - ops.floor(bits))
    return ops.floor(ops.round(images) / quantum) * quantum


def smooth(images):
    """PIL's ImageFilter.SMOOTH: the 3 x 3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13; the border stays."""
    height, width = images.shape[1], images.shape[2]
    padded = ops.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    total = 4 * images
    for dy in range(3):
        for dx in range(3):
            total = total + padded[:, dy : dy + height, dx : dx + width, :]
    border = np.ones((1, height, width, 1), dtype=bool)
    border[:, 1:-1, 1:-1] = False
    return ops.where(border, images, total / 13.0)


def blend(degenerate, images, factor):
    """PIL's ImageEnhance: `degenerate` + `factor` [B, 1, 1, 1] x (images - degenerate), clipped to [0, 255]."""
    return ops.clip(degenerate + factor * (images - degenerate), 0, 255)


def randaugment_pixel_operation(images, operations, magnitudes):
    """One slot's pixel operations [B] with magnitudes [B] applied to [0, 255] images; the geometric ones (applied by
    the resampling) and the identity leave an image as it is."""
    factor = ops.reshape(magnitudes, (-1, 1, 1, 1))
    gray = grayscale(images)
    mean_gray = ops.round(ops.mean(gray, axis=(1, 2, 3), keepdims=True))  # PIL: int(mean + 0.5) of the L image
    results = {
        "autocontrast": autocontrast(images),
        "equalize": equalize(images),
        "solarize": solarize(images, factor),
        "color": blend(gray, images, factor),
        "contrast": blend(mean_gray, images, factor),
        "brightness": blend(ops.zeros_like(images), images, factor),
        "sharpness": blend(smooth(images), images, factor),
        "posterize": posterize(images, factor),
    }
    for name, result in results.items():
        images = ops.where(ops.reshape(operations == RANDAUGMENT_INDEX[name], (-1, 1, 1, 1)), result, images)
    return images


def cutout(images, centre_y, centre_x, length, fill):
    """SCAN's Cutout: per image, the rows [y - length // 2, y + length // 2) and the same columns around the pixel
    (y, x) (each [B], integers; the hole clipped to the image) take the colour `fill` [C]."""
    height, width = images.shape[1], images.shape[2]
    half, centre_y, centre_x = (ops.reshape(value, (-1, 1)) for value in (length // 2, centre_y, centre_x))
    rows, columns = ops.arange(height, dtype="int32")[None], ops.arange(width, dtype="int32")[None]
    in_rows = ops.logical_and(rows >= centre_y - half, rows < centre_y + half)  # [B, H]
    in_columns = ops.logical_and(columns >= centre_x - half, columns < centre_x + half)  # [B, W]
    hole = ops.logical_and(in_rows[:, :, None, None], in_columns[:, None, :, None])  # [B, H, W, 1]
    return ops.where(hole, ops.cast(fill, images.dtype), images)


def scan_strong_augmentation(images, parameters, transforms, output_size):
    """SCAN's strong view of [0, 255] images: the resampling by `transforms` (flip and geometric operations) with
    black fill, each slot's pixel operation, then the cut-out filled with the batch's mean colour (SCAN's zero after
    normalisation is the data's mean colour)."""
    images = affine_resample(images, transforms, output_size, fill_value=0.0)
    for slot in range(parameters["operations"].shape[0]):
        images = randaugment_pixel_operation(images, parameters["operations"][slot], parameters["magnitudes"][slot])
    height, width = images.shape[1], images.shape[2]
    max_length = max(1, min(height, width) // 2)
    length = 1 + ops.cast(ops.floor(parameters["cutout_length"] * max_length), "int32")
    centre_y = ops.cast(ops.floor(parameters["cutout_y"] * height), "int32")
    centre_x = ops.cast(ops.floor(parameters["cutout_x"] * width), "int32")
    return cutout(images, centre_y, centre_x, length, ops.mean(images, axis=(0, 1, 2)))


def strong_augmentation_kind(strong_augmentation, augmentation):
    """The kind of augmentation STRONG_AUGMENTATION names: AUGMENTATION's ("augmentation") or SCAN's ("scan")."""
    return augmentation if strong_augmentation == "augmentation" else strong_augmentation


class FeatureViews(layers.Layer):
    """Cached features with their augmented views, rows [batch_size, 1 + views, dims], to [batch_size, dims]: in
    training each row takes one of its 1 + views, drawn at random (the image's own features among them); otherwise,
    or with `draw=False`, the image's own, view 0. It stands in for SCAN's strong augmentation of every anchor and
    neighbour when the head learns on cached features."""

    def __init__(self, draw=True, seed=None, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.draw = draw
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, rows, training=False):
        if not (training and self.draw):
            return rows[:, 0]
        # On TensorFlow replicas each draws for the global batch and keeps its own rows, as ImageAugmentation does.
        num_rows = ops.shape(rows)[0]
        rows = gather_replicas(rows)
        num_views = rows.shape[1]
        views = keras.random.randint((ops.shape(rows)[0],), 0, num_views, seed=self.seed_generator)
        chosen = ops.sum(rows * ops.one_hot(views, num_views, dtype=rows.dtype)[:, :, None], axis=1)
        return replica_rows(chosen, num_rows)
