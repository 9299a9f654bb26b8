"""Decoding photos (scan/images.py) against hand-made images, numpy references and a copy of the decoder before it:
upright by EXIF, the centre crop, draft mode, HEIC, parallel decoding, the memory warning."""

import concurrent.futures
import io
import math
import re

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

import scan.images as photos
from scan.settings import CHOICES

SIZE = 32


def baseline_decode_image(source, size):
    """A copy of today's `decode_image` of scan_cifar10.py: full decode, then the whole image resized to a square."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def smooth_pixels(height, width, seed=0, noise=0.0):
    """A uint8 RGB [height, width, 3] image of smooth gradients (plus Gaussian noise of `noise` grey levels)."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    channels = [200 * x + 40 * y, 128 + 100 * np.sin(3 * x + 2 * y + seed), 230 * y * (1 - 0.5 * x)]
    pixels = np.stack(channels, axis=-1) + np.random.default_rng(seed).normal(0, noise, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encoded(image, format, **options):
    """The bytes of `image` (a PIL image) saved in `format`."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def same_size_images():
    """Today's CIFAR-like inputs: 32x32 files of every mode the loader meets."""
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    rgba = Image.fromarray(np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8))
    return {
        "jpeg": encoded(rgb, "JPEG", quality=90),
        "png": encoded(rgb, "PNG"),
        "palette png": encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"),
        "grey png": encoded(rgb.convert("L"), "PNG"),
        "grey jpeg": encoded(rgb.convert("L"), "JPEG", quality=85),
        "rgba png": encoded(rgba, "PNG"),
    }


@pytest.mark.parametrize("fit", CHOICES["image_fit"])
@pytest.mark.parametrize("kind", same_size_images())
def test_same_size_images_decode_as_today(kind, fit, tmp_path):
    data = same_size_images()[kind]
    path = tmp_path / "image"
    path.write_bytes(data)
    for source in (data, str(path)):
        decoded = photos.decode_image(source, SIZE, fit)
        assert decoded.dtype == np.uint8 and decoded.shape == (SIZE, SIZE, 3)
        assert np.array_equal(decoded, baseline_decode_image(source, SIZE))


@pytest.mark.parametrize("shape", [(30, 50), (40, 17), (64, 64), (16, 16), (45, 90)])
def test_squash_of_png_is_todays_resize(shape):
    data = encoded(Image.fromarray(smooth_pixels(*shape, noise=20)), "PNG")
    assert np.array_equal(photos.decode_image(data, SIZE, "squash"), baseline_decode_image(data, SIZE))


def test_squash_of_large_jpeg_is_within_a_few_grey_levels_of_today():
    data = encoded(Image.fromarray(smooth_pixels(900, 1200, noise=4)), "JPEG", quality=90)
    difference = photos.decode_image(data, SIZE, "squash").astype(float) - baseline_decode_image(data, SIZE)
    assert np.abs(difference).mean() < 2


def upright_test_pattern(height=64, width=48):
    """A portrait image as a viewer should show it: a red top half (its left third green), a blue bottom half."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2] = (255, 0, 0)
    pixels[: height // 2, : width // 3] = (0, 255, 0)
    pixels[height // 2 :] = (0, 0, 255)
    return pixels


# How a camera stores the upright picture for each EXIF orientation (the viewer undoes it), in numpy terms.
STORED_FOR_ORIENTATION = {3: lambda p: np.rot90(p, 2), 6: lambda p: np.rot90(p, 1), 8: lambda p: np.rot90(p, -1)}


@pytest.mark.parametrize("fit", CHOICES["image_fit"])
@pytest.mark.parametrize("orientation", sorted(STORED_FOR_ORIENTATION))
def test_exif_orientation_decodes_upright(orientation, fit):
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](upright_test_pattern()))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    decoded = photos.decode_image(data, SIZE, fit).astype(int)
    top, bottom = decoded[: SIZE // 2 - 4], decoded[SIZE // 2 + 4 :]
    third = SIZE // 3
    assert np.all(np.abs(top[:, third + 3 :] - (255, 0, 0)) < 40)  # red
    assert np.all(np.abs(top[:, : third - 3] - (0, 255, 0)) < 40)  # green on the left, not mirrored
    assert np.all(np.abs(bottom - (0, 0, 255)) < 40)  # blue


@pytest.mark.parametrize("landscape", [True, False])
def test_centre_crop_keeps_the_middle_square_exactly(landscape):
    middle = smooth_pixels(30, 30, noise=10)
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[:] = (0, 255, 0)
    pixels[:, 5:35] = middle
    if not landscape:
        pixels, middle = pixels.transpose(1, 0, 2), middle.transpose(1, 0, 2)
    data = encoded(Image.fromarray(np.ascontiguousarray(pixels)), "PNG")
    assert np.array_equal(photos.decode_image(data, 30), middle)
    reference = Image.fromarray(np.ascontiguousarray(middle)).resize((15, 15), Image.Resampling.BICUBIC)
    assert np.array_equal(photos.decode_image(data, 15), np.asarray(reference))


def full_decode_crop_resize(data, size):
    """The reference for draft decoding: the whole JPEG decoded, its centred square cut with numpy, resized."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    side = min(height, width)
    square = pixels[(height - side) // 2 :][:side, (width - side) // 2 :][:, :side]
    return np.asarray(Image.fromarray(np.ascontiguousarray(square)).resize((size, size), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("size", [32, 100, 224])
def test_draft_decoding_of_a_large_jpeg_is_close_to_the_full_decode(size, monkeypatch):
    data = encoded(Image.fromarray(smooth_pixels(1500, 2000, noise=3)), "JPEG", quality=90)
    drafts = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(image, mode, requested):
        result = original_draft(image, mode, requested)
        drafts.append(image.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    decoded = photos.decode_image(data, size)
    (draft_size,) = drafts
    assert draft_size[0] < 2000 and min(draft_size) >= size  # reduced, never below what the crop needs
    assert np.abs(decoded.astype(float) - full_decode_crop_resize(data, size)).mean() < 2


def test_every_listed_extension_decodes():
    pixels = smooth_pixels(48, 64)
    formats = Image.registered_extensions()
    for extension in photos.image_extensions():
        data = encoded(Image.fromarray(pixels), formats[extension])
        decoded = photos.decode_image(data, SIZE, "squash")
        assert decoded is not None, extension
        reference = baseline_decode_image(encoded(Image.fromarray(pixels), "PNG"), SIZE)
        assert np.abs(decoded.astype(float) - reference).mean() < 8, extension


def test_heic_file_decodes(tmp_path):
    assert {".heic", ".heif"} <= set(photos.image_extensions())  # pillow-heif is a requirement
    pixels = smooth_pixels(300, 400, noise=2)
    path = tmp_path / "photo.heic"
    Image.fromarray(pixels).save(path, format="HEIF", quality=90)
    decoded = photos.decode_image(str(path), SIZE)
    reference = full_decode_crop_resize(encoded(Image.fromarray(pixels), "PNG"), SIZE)
    assert np.abs(decoded.astype(float) - reference).mean() < 4
    assert np.array_equal(decoded, photos.decode_image(path.read_bytes(), SIZE))


def test_unreadable_files_decode_to_none(tmp_path):
    jpeg = encoded(Image.fromarray(smooth_pixels(64, 64)), "JPEG")
    (tmp_path / "text.jpg").write_text("not an image")
    sources = [b"", b"garbage" * 10, jpeg[: len(jpeg) // 2], str(tmp_path / "text.jpg"), str(tmp_path / "missing.png")]
    heic = encoded(Image.fromarray(smooth_pixels(64, 64)), "HEIF")
    sources += [heic[: len(heic) // 2], heic[:100]]
    for source in sources:
        assert photos.decode_image(source, SIZE) is None


@pytest.mark.parametrize("fit", CHOICES["image_fit"])
def test_parallel_and_serial_decoding_give_identical_arrays(fit, monkeypatch, tmp_path):
    sources = [encoded(Image.fromarray(smooth_pixels(60 + 7 * i, 90, seed=i, noise=5)), "JPEG") for i in range(6)]
    (tmp_path / "photo.png").write_bytes(encoded(Image.fromarray(smooth_pixels(50, 40)), "PNG"))
    sources += [b"unreadable", str(tmp_path / "photo.png")]
    serial = photos.decode_images(sources, SIZE, fit)
    pools = []

    class RecordingPool(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(photos, "PARALLEL_BYTES", 1)
    monkeypatch.setattr(photos, "worker_count", lambda: 2)
    monkeypatch.setattr(photos.concurrent.futures, "ProcessPoolExecutor", RecordingPool)
    parallel = photos.decode_images(sources, SIZE, fit)
    assert len(pools) == 1 and pools[0]["max_workers"] == 2
    assert [image is None for image in serial] == [image is None for image in parallel] == [False] * 6 + [True, False]
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True) if a is not None)


class PoolStarted(Exception):
    """Raised by a stand-in for the process pool, to tell that `decode_images` started one."""


def test_large_photos_go_parallel_sooner_than_small_images(monkeypatch):
    def refusing_pool(**options):
        raise PoolStarted()

    monkeypatch.setattr(photos, "worker_count", lambda: 2)
    monkeypatch.setattr(photos.concurrent.futures, "ProcessPoolExecutor", refusing_pool)
    assert len(photos.decode_images([b"x" * 1000] * 10, SIZE)) == 10  # a few small files: decoded here
    with pytest.raises(PoolStarted):  # four files of a quarter of PARALLEL_BYTES each (about five photos in all)
        photos.decode_images([b"x" * (photos.PARALLEL_BYTES // 4 + 1)] * 4, SIZE)
    with pytest.raises(PoolStarted):  # many small files, as today
        photos.decode_images([b"x" * 10] * photos.PARALLEL_SOURCES, SIZE)


def test_chunks_stay_small_for_photos_and_large_for_small_images():
    photo_chunk = photos.chunk_size(120, 3_000_000, 2)
    assert photo_chunk == 1 or photo_chunk * 3_000_000 <= photos.CHUNK_BYTES
    cifar_chunk = photos.chunk_size(60000, 2500, 16)
    assert cifar_chunk * 2500 <= photos.CHUNK_BYTES and cifar_chunk <= photos.MAX_CHUNK
    assert cifar_chunk >= 100 and math.ceil(60000 / cifar_chunk) >= 4 * 16
    assert photos.chunk_size(10, 2500, 4) == 1  # few sources: spread over the workers


def fits(num_images, size, memory):
    """Whether `num_images` images of `size` fit into `memory` bytes with training's float32 copies."""
    return num_images * size * size * 3 * photos.TRAINING_MEMORY_FACTOR <= memory


def test_memory_warning_names_settings_that_fit(monkeypatch):
    memory = 8 * 10**9
    monkeypatch.setattr(photos, "total_memory_bytes", lambda: memory)
    assert photos.memory_warning(50000, 32) is None
    warning = photos.memory_warning(50000, 224)
    assert not fits(50000, 224, memory) and "\n" not in warning
    input_size = int(re.search(r"--input_size \(to (\d+)", warning)[1])
    max_images = int(re.search(r"--max_images \(to (\d+)", warning)[1])
    assert fits(50000, input_size, memory) and not fits(50000, input_size + 1, memory)
    assert fits(max_images, 224, memory) and not fits(max_images + 1, 224, memory)


def test_memory_warning_is_silent_when_memory_is_unknown(monkeypatch):
    assert photos.total_memory_bytes() > 0
    monkeypatch.setattr(photos, "total_memory_bytes", lambda: None)
    assert photos.memory_warning(10**9, 1024) is None
