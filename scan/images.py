"""Fast, upright, undistorted decoding of photos (phone libraries: 12 MP JPEGs, EXIF-rotated, HEIC) to small squares.

`decode_image` asks the decoder for a reduced image first (`Image.draft`: JPEG's DCT scaling by 1/2, 1/4 or 1/8,
or a HEIF file's embedded thumbnail), turns it upright by its EXIF orientation, keeps its centred square (or squashes
the whole image, as before) and resizes that to the input size. Images that already have the input size (CIFAR-10's
32x32 files) decode exactly as before.
"""

import concurrent.futures
import functools
import io
import math
import multiprocessing
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, features
from tqdm import tqdm

ALWAYS_DECODED = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
DECODED_WITH_FEATURE = {".webp": "webp", ".avif": "avif"}  # read only when this Pillow was built with the codec
HEIF_EXTENSIONS = (".heic", ".heif")
READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)  # pillow-heif raises ValueError for broken files
PARALLEL_SOURCES = 2000  # decode in parallel from this many images (small CIFAR-like files) ...
PARALLEL_BYTES = 16 * 2**20  # ... or from this many bytes of files (about five phone photos, 0.15 s in one process)
CHUNK_BYTES = 4 * 2**20  # bytes of files per task sent to a worker (one or two phone photos, 500 CIFAR images)
MAX_CHUNK = 500
TRAINING_MEMORY_FACTOR = 5  # training holds about this many times the decoded uint8 images (its float32 copies)


@functools.cache
def heif_support():
    """Whether Pillow reads HEIC/HEIF files: pillow-heif (a requirement) registers its opener on the first call."""
    try:
        import pillow_heif
    except ImportError:  # without pillow-heif (pip install pillow-heif), .heic/.heif files are not read
        return False
    pillow_heif.register_heif_opener()
    return True


@functools.cache
def image_extensions():
    """The image file extensions this Pillow (with pillow-heif) decodes: AVIF and WebP only where it was built with
    them."""
    extensions = list(ALWAYS_DECODED)
    extensions += [extension for extension, feature in DECODED_WITH_FEATURE.items() if features.check(feature)]
    return tuple(extensions + (list(HEIF_EXTENSIONS) if heif_support() else []))


def centre_square(width, height):
    """The crop box (left, top, right, bottom) of the centred square of the shorter side of a width x height image."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def decode_image(source, size, fit="crop"):
    """Reads one image (a file path, or a file's bytes) as uint8 RGB [size, size, 3], upright by its EXIF
    orientation, or returns None if it cannot.

    fit="crop" keeps the centred square of the shorter side (torchvision's Resize + CenterCrop, Keras'
    crop_to_aspect_ratio); fit="squash" resizes the whole image to a square. The decoder is first asked for an image
    reduced to no less than `size` on each side (`draft`: JPEG's DCT scaling, a HEIF file's embedded thumbnail, a
    no-op for other formats), so a 4032x3024 JPEG decodes at 504x378 for size 32; as the draft keeps both sides at
    least `size`, the shorter side, and so the crop, is at least `size` too. Images that already are size x size
    are not resized: they decode exactly as without draft, crop or orientation (unless their EXIF rotates them).
    """
    heif_support()  # registers pillow-heif's opener, once
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.draft("RGB", (size, size))
            ImageOps.exif_transpose(image, in_place=True)
            image = image.convert("RGB")
            if fit == "crop":
                image = image.crop(centre_square(*image.size))
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8)
    except READ_ERRORS:
        return None


def source_bytes(source):
    """The size in bytes of a source: a file's bytes, or the file at a path (0 if it cannot be read)."""
    if isinstance(source, bytes):
        return len(source)
    try:
        return os.path.getsize(source)
    except OSError:
        return 0


def sample_bytes(sources, limit):
    """(bytes, count) of the first sources, read until their bytes reach `limit` (all sources if they never do)."""
    total = count = 0
    for source in sources:
        if total >= limit:
            break
        total, count = total + source_bytes(source), count + 1
    return total, count


def worker_count():
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def chunk_size(num_sources, average_bytes, workers):
    """Sources per task: about CHUNK_BYTES of files (at most MAX_CHUNK), and at least four tasks per worker."""
    by_bytes = CHUNK_BYTES // max(1, average_bytes)
    return int(max(1, min(MAX_CHUNK, by_bytes, math.ceil(num_sources / (4 * workers)))))


def decode_images(sources, size, fit="crop"):
    """Decodes the images (`decode_image` of each source, in order) in parallel processes from PARALLEL_SOURCES
    images or PARALLEL_BYTES bytes of files, else in this one (starting the workers costs more than a few images)."""
    workers = min(worker_count(), len(sources))
    sampled_bytes, sampled = sample_bytes(sources, PARALLEL_BYTES)
    small = len(sources) < PARALLEL_SOURCES and sampled_bytes < PARALLEL_BYTES
    if small or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [decode_image(source, size, fit) for source in sources]
    chunksize = chunk_size(len(sources), sampled_bytes // sampled, workers)
    context = multiprocessing.get_context("fork")
    with warnings.catch_warnings():  # JAX warns about any fork; the workers run Pillow only, never the backend.
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            decoded = pool.map(decode_image, sources, [size] * len(sources), [fit] * len(sources), chunksize=chunksize)
            return list(tqdm(decoded, total=len(sources), desc="decoding images", unit="image", mininterval=1))


def total_memory_bytes():
    """This machine's physical memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def gigabytes(num_bytes):
    """`num_bytes` as a short text in GB."""
    return f"{num_bytes / 1e9:.1f} GB"


def memory_warning(num_images, size):
    """One warning line when `num_images` decoded images of size x size (uint8 RGB), and the float32 copies that
    training makes of them (TRAINING_MEMORY_FACTOR times their bytes in all), would not fit into this machine's
    memory, saying how far to lower --input_size or --max_images; None when they fit or the memory is unknown."""
    memory = total_memory_bytes()
    decoded = num_images * size * size * 3
    needed = decoded * TRAINING_MEMORY_FACTOR
    if not memory or needed <= memory:
        return None
    fitting_size = math.isqrt(memory // (num_images * 3 * TRAINING_MEMORY_FACTOR))
    fitting_images = memory // (size * size * 3 * TRAINING_MEMORY_FACTOR)
    return (
        f"warning: {num_images} images of {size}x{size} take {gigabytes(decoded)} decoded and about "
        f"{gigabytes(needed)} while training, more than this machine's {gigabytes(memory)} of memory; "
        f"lower --input_size (to {fitting_size} or less) or --max_images (to {fitting_images} or less)"
    )
