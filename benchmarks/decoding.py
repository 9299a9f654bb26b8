"""
# Benchmark: the data stage of scan_cifar10.py on a phone's photos, against plain Pillow loops in the same run

    python benchmarks/decoding.py                                   # 120 generated 12 MP photos, a temporary folder
    python benchmarks/decoding.py --photos=12 --folder=path/to/photos   # keeps (and reuses) the photos there

The photos are 4032x3024 JPEGs (quality 90, about 3.6 MB: smooth gradients plus noise), half of them portrait
through the EXIF orientation tag (6), as a phone stores them, in the nested folders of a photo library. Rows:
(a) a plain Pillow loop with draft mode (`Image.draft`, `ImageOps.exif_transpose`, `ImageOps.fit`), one process;
(b) the script's data stage (`prepare_data`: listing the folder, decoding in parallel processes, the checks);
(c) a plain Pillow loop that decodes each photo at full size, as the script did before draft mode, one process.
Every method reads the same files from the page cache.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scan_cifar10 as script  # noqa: E402  (chooses the Keras backend, as the script does)
from scan.images import worker_count  # noqa: E402
from scan.run import Run  # noqa: E402

WIDTH, HEIGHT = 4032, 3024
NOISE = 31  # the largest noise in grey levels, a bit mask (2**k - 1): makes the files as large as a phone's (3 MB)
PORTRAIT_ORIENTATION = 6  # the EXIF orientation of a photo taken holding the phone upright


def photo_pixels(index):
    """The uint8 RGB [HEIGHT, WIDTH, 3] pixels of generated photo `index`: smooth gradients (drawn at 1/8 of the
    size and enlarged) in 0..224 plus uniform noise in 0..NOISE."""
    y = np.linspace(0, 1, HEIGHT // 8)[:, None]
    x = np.linspace(0, 1, WIDTH // 8)[None, :]
    gradients = [190 * x + 30 * y, 115 + 90 * np.sin(5 * x + 3 * y + index), 200 * y * (1 - 0.5 * x) + 20]
    small = Image.fromarray(np.stack(gradients, axis=-1).astype(np.uint8))
    smooth = np.asarray(small.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))
    noise = np.frombuffer(np.random.default_rng(index).bytes(smooth.size), np.uint8).reshape(smooth.shape) & NOISE
    return np.minimum(smooth, 255 - NOISE) + noise


def make_photos(folder, count):
    """Writes folder/YYYY/MM/photo-NNN.jpg for the first `count` photos, keeping those already there; returns their
    paths."""
    paths = [os.path.join(folder, "2024", f"{index % 12 + 1:02d}", f"photo-{index:03d}.jpg") for index in range(count)]
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    missing = [index for index, path in enumerate(paths) if not os.path.isfile(path)]
    for index in tqdm(missing, desc="generating photos", unit="photo", disable=not missing):
        exif = Image.Exif()
        if index % 2:
            exif[0x0112] = PORTRAIT_ORIENTATION
        temporary = f"{paths[index]}.tmp"
        Image.fromarray(photo_pixels(index)).save(temporary, format="JPEG", quality=90, exif=exif.tobytes())
        os.replace(temporary, paths[index])
    return paths


def pillow_loop(paths, size):
    """Decodes the photos one after another with plain Pillow: draft, EXIF orientation, centred fit, BICUBIC."""
    decoded = []
    for path in paths:
        with Image.open(path) as image:
            image.draft("RGB", (128, 128))
            image = ImageOps.fit(ImageOps.exif_transpose(image), (size, size), Image.Resampling.BICUBIC)
            decoded.append(np.asarray(image.convert("RGB")))
    return decoded


def full_size_loop(paths, size):
    """Decodes the photos one after another at full size, then squashes each to size x size (no draft, no EXIF)."""
    decoded = []
    for path in paths:
        with Image.open(path) as image:
            decoded.append(np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)))
    return decoded


def data_stage(folder, size):
    """The script's data stage on `folder`, as `python scan_cifar10.py --data=folder --input_size=size` runs it."""
    comments = script.read_settings_block(open(script.__file__).read())
    defaults = {name: getattr(script, name) for name in comments}
    arguments = [f"--data={folder}", f"--input_size={size}", "--num_clusters=10", "--k_neighbours=5"]
    settings = script.parse_settings(arguments, defaults, comments, script.RECIPES, tuple(script.CIFAR10_SPLITS))
    return list(script.prepare_data(Run(settings, [], 1, None)).train.images)


def timed(function, *arguments):
    """(result, seconds) of calling `function(*arguments)`."""
    start = time.perf_counter()
    result = function(*arguments)
    return result, time.perf_counter() - start


def run_benchmark(folder, paths, size):
    """Times the three methods over the photos and prints one table row each, then how far their images differ."""
    for path in paths:  # into the page cache, so that no method pays for the disk
        with open(path, "rb") as file:
            file.read()
    plain, plain_seconds = timed(pillow_loop, sorted(paths), size)
    staged, stage_seconds = timed(data_stage, folder, size)
    _, full_seconds = timed(full_size_loop, paths, size)
    print("\n| method | photos | seconds | ms per photo | against (a) |\n| --- | ---: | ---: | ---: | ---: |")
    rows = [
        ("(a) plain Pillow loop, draft mode, 1 process", plain_seconds),
        (f"(b) the script's data stage, {worker_count()} processes", stage_seconds),
        ("(c) plain Pillow loop, full-size decode, 1 process", full_seconds),
    ]
    for name, seconds in rows:
        per_photo = 1000 * seconds / len(paths)
        print(f"| {name} | {len(paths)} | {seconds:.2f} | {per_photo:.1f} | {seconds / plain_seconds:.2f}x |")
    difference = np.mean([np.abs(a.astype(float) - b).mean() for a, b in zip(plain, staged, strict=True)])
    print(f"\nmean absolute difference between (a) and (b): {difference:.2f} grey levels")


def main():
    """Parses the command line, makes (or reuses) the photos and runs the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--photos", type=int, default=120, help="photos to generate and decode (default 120)")
    parser.add_argument("--folder", help="keep the photos here and reuse them (default: a temporary folder)")
    parser.add_argument("--size", type=int, default=32, help="side of the decoded images (default 32)")
    arguments = parser.parse_args()
    if arguments.folder:
        run_benchmark(arguments.folder, make_photos(arguments.folder, arguments.photos), arguments.size)
        return
    with tempfile.TemporaryDirectory(prefix="bench-decoding-") as folder:
        run_benchmark(folder, make_photos(folder, arguments.photos), arguments.size)


if __name__ == "__main__":
    main()
