"""A photo library as people have it, run as a user runs it: nested folders of EXIF-rotated photos and a HEIC file,
report.html to browse the clusters, and the photos sorted into one folder per cluster."""

import collections
import html.parser
import os
import zipfile

import keras
import numpy as np
import pytest
from PIL import Image

import scan_cifar10 as script
from conftest import check_sorted_as_listed
from scan.images import heif_support
from scan.settings import UsageError

TINY = ["--recipe=cpu", "--representation_epochs=1", "--clustering_epochs=1", "--num_clusters=3", "--k_neighbours=2",
        "--representation_batch_size=8", "--clustering_batch_size=8", "--holdout_images=4", "--sheet_images=8"]  # fmt: skip


def write_library(root):
    """Photos of three colours in nested folders, every other one stored sideways with EXIF orientation 6 (as phones
    store portrait photos), one HEIC file and one unreadable file; returns the readable photos' paths."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(20):
        folder = ["2024/05", "2024/06/trip", "scans", ""][index % 4]
        path = root / folder / f"IMG_{index:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = [(200, 40, 40), (40, 200, 40), (40, 40, 200)][index % 3]
        photo = Image.fromarray(np.clip(np.array(colour) + rng.normal(0, 25, (120, 160, 3)), 0, 255).astype(np.uint8))
        exif = Image.Exif()
        exif[0x0112] = 6 if index % 2 else 1
        photo.save(path, quality=90, exif=exif)
        paths.append(str(path))
    assert heif_support()  # pillow-heif, a requirement, registers the format
    Image.new("RGB", (64, 48), (200, 40, 40)).save(root / "scans" / "iphone.heic", format="HEIF")
    (root / "scans" / "broken.jpg").write_bytes(b"not a photo")
    return [*paths, str(root / "scans" / "iphone.heic")]


class Page(html.parser.HTMLParser):
    """The images and cluster cards of a page."""

    def __init__(self, path):
        super().__init__()
        self.images, self.cards = [], collections.Counter()
        with open(path, encoding="utf-8") as file:
            self.feed(file.read())

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        if tag == "img":
            self.images.append(attributes["src"])
        if tag == "article":
            self.cards[attributes["id"]] += 1


def check_page(path, num_clusters):
    """Every image the page names exists beside it, and every cluster has exactly one card."""
    page = Page(path)
    assert page.cards == collections.Counter(f"cluster-{cluster:02d}" for cluster in range(num_clusters))
    for source in page.images:
        assert os.path.isfile(os.path.join(os.path.dirname(path), source)), source
    return page


def sorted_files(target):
    """{file name in its cluster folder: its bytes} of every photo laid out under `target`."""
    files = {}
    for folder in os.listdir(target):
        if folder.startswith("cluster-"):
            for name in os.listdir(os.path.join(target, folder)):
                files[f"{folder}/{name}"] = open(os.path.join(target, folder, name), "rb").read()
    return files


def test_a_nested_photo_library_runs_unlabelled_with_a_page_and_its_photos_sorted(tmp_path, capsys):
    photos = write_library(tmp_path / "Pictures")
    originals = {path: (open(path, "rb").read(), os.stat(path).st_mtime_ns) for path in photos}
    out, target = tmp_path / "out", tmp_path / "sorted"
    arguments = [f"--data={tmp_path / 'Pictures'}", f"--output_dir={out}", f"--sort_into={target}", *TINY]
    script.main(arguments)
    keras.mixed_precision.set_global_policy("float32")
    printed = capsys.readouterr().out
    assert "22 images in nested folders: clustered unlabelled" in printed
    assert "warning: skipped 1 unreadable image files of 22 (scans/broken.jpg)" in printed
    page = check_page(out / "report.html", 3)
    assert "prototypes.png" in page.images and any(source.startswith("clusters/") for source in page.images)
    # Every readable photo linked once, under its own name, with its original's bytes; no original changed.
    laid_out = sorted_files(target)
    assert sorted(name.split("/")[1] for name in laid_out) == sorted(os.path.basename(path) for path in photos)
    by_name = {os.path.basename(path): originals[path][0] for path in photos}
    assert all(data == by_name[name.split("/")[1]] for name, data in laid_out.items())
    assert {path: (open(path, "rb").read(), os.stat(path).st_mtime_ns) for path in photos} == originals
    assert "sorted 21 photos into " in printed and "hard links" in printed
    check_sorted_as_listed(target, out / "clusters.csv", tmp_path / "Pictures")

    # New photos into the clusters learned: assigned.html, and the sorting laid out again for them.
    new = tmp_path / "next-week"
    new.mkdir()
    for index in (0, 1):
        Image.open(photos[index]).save(new / f"new_{index}.jpg")
    script.main([*arguments, f"--assign_data={new}"])
    keras.mixed_precision.set_global_policy("float32")
    check_page(out / "assigned.html", 3)
    assert sorted(name.split("/")[1] for name in sorted_files(target)) == ["new_0.jpg", "new_1.jpg"]
    check_sorted_as_listed(target, out / "assigned.csv", new)


def test_a_portrait_photo_is_decoded_upright_in_the_run(tmp_path):
    # A red top half and a blue bottom half, stored rotated a quarter turn with the EXIF tag that turns it back.
    upright = np.zeros((40, 30, 3), np.uint8)
    upright[:20, :, 0], upright[20:, :, 2] = 255, 255
    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored image is to be turned 90 degrees clockwise to be seen upright
    Image.fromarray(np.rot90(upright, k=1)).save(folder / "portrait.png", exif=exif)
    Image.fromarray(upright).save(folder / "plain.png")
    dataset = script.load_splits(script_settings(f"--data={folder}"))[0]
    for image in dataset.images:  # the centred square of each, upright: red above, blue below
        assert image[2, 16, 0] > 200 and image[2, 16, 2] < 50 and image[29, 16, 2] > 200 and image[29, 16, 0] < 50


def script_settings(*arguments):
    comments = script.read_settings_block(open(script.__file__).read())
    defaults = {name: getattr(script, name) for name in comments}
    return script.parse_settings(list(arguments), defaults, comments, script.RECIPES, tuple(script.CIFAR10_SPLITS))


@pytest.mark.parametrize("member", ["../evil.jpg", "/tmp/evil.jpg"])
def test_sorting_an_archive_that_climbs_out_is_one_line_before_anything_is_written(tmp_path, member):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as packed:
        for index in range(12):
            image = Image.fromarray(np.full((32, 32, 3), 20 * index, np.uint8))
            path = tmp_path / f"{index}.png"
            image.save(path)
            packed.writestr(zipfile.ZipInfo(member if index == 0 else f"photos/{index}.png"), path.read_bytes())
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=f"member '{member}' .*; refusing to extract it"):
        script.main([f"--data={archive}", f"--output_dir={out}", f"--sort_into={tmp_path / 'sorted'}", *TINY])
    keras.mixed_precision.set_global_policy("float32")
    assert not out.exists() and not (tmp_path / "sorted").exists()
