"""What a finished run keeps when an output after it fails: metrics.json and the RESULT line come before clusters.csv,
the contact sheets, report.html and the sorting, and such a failure is one error line. report.html shows only the
figures this run drew. Each test reruns one tiny training from a copy of its stage cache."""

import errno
import html.parser
import json
import os
import shutil

import keras
import numpy as np
import pytest
from PIL import Image

import scan.html_report
import scan.sorting
import scan_cifar10 as script
from conftest import make_image_folder

TINY = ["--encoder=small", "--representation_batch_size=8", "--clustering_batch_size=8", "--representation_epochs=1",
        "--clustering_epochs=1", "--num_clusters=3", "--k_neighbours=2", "--embedding_batch_size=10"]  # fmt: skip
RESULT = "RESULT split=train images=24 clusters=3"
KEPT = (
    "; what the run computed is kept (the RESULT line, metrics.json and the stage cache): run the same command again "
    "to write the rest from the cache"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder of 24 unlabelled images and the stage cache of a tiny run on it, which later runs reuse."""
    root = tmp_path_factory.mktemp("trained")
    images = make_image_folder(root / "images", labelled=False)
    script.main([f"--data={images}", f"--output_dir={root / 'out'}", *TINY])
    keras.mixed_precision.set_global_policy("float32")
    return images, root / "out" / "cache"


def arguments(trained, tmp_path, *extra):
    """The trained command, with a copy of its stage cache alone in a new OUTPUT_DIR, tmp_path/out."""
    images, cache = trained
    shutil.copytree(cache, tmp_path / "out" / "cache")
    return [f"--data={images}", f"--output_dir={tmp_path / 'out'}", *TINY, *extra]


def check_one_error_line(result, message):
    """Exit status 2, one error line (the last on stderr), no traceback; the RESULT line last on stdout."""
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [result.stderr.strip().splitlines()[-1]] and "Traceback" not in result.stderr
    assert errors[0] == f"error: {message}{KEPT}"
    assert result.stdout.strip().splitlines()[-1] == RESULT


def test_a_sorting_that_fails_after_training_keeps_the_metrics_and_the_result_line(
    trained, tmp_path, monkeypatch, run_here
):
    placed, place_photo = [], scan.sorting.place_photo

    def disk_fills_up(source, destination, copy):
        if placed:  # one photo laid out, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), destination)
        placed.append(destination)
        return place_photo(source, destination, copy)

    monkeypatch.setattr(scan.sorting, "place_photo", disk_fills_up)
    target = tmp_path / "sorted"
    result = run_here(arguments(trained, tmp_path, f"--sort_into={target}"), cwd=tmp_path)
    check_one_error_line(
        result,
        f"sorting into {target} stopped (No space left on device); nothing of it was written, {target} is as it was",
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert sum(metrics["cluster_sizes"]) == 24 and metrics["images"] == 24
    assert placed and not os.path.exists(placed[0])  # the layout built beside the target was removed
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no target, nothing beside it
    assert (tmp_path / "out" / "clusters.csv").is_file() and (tmp_path / "out" / "report.html").is_file()


def test_a_page_that_cannot_be_written_keeps_the_metrics_and_the_result_line(trained, tmp_path, monkeypatch, run_here):
    def refused(path, data):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(scan.html_report, "write_bytes_atomically", refused)
    result = run_here(arguments(trained, tmp_path), cwd=tmp_path)
    page = os.path.join(str(tmp_path / "out"), "report.html")
    check_one_error_line(result, f"writing {page} failed (Permission denied)")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["images"] == 24
    assert not os.path.exists(page)


class FigureSources(html.parser.HTMLParser):
    """The sources of a page's <img> elements inside its figures section."""

    def __init__(self):
        super().__init__()
        self.in_figures, self.sources = False, []

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        if tag == "section":
            self.in_figures = attributes.get("class") == "figures"
        if tag == "img" and self.in_figures:
            self.sources.append(attributes["src"])


def test_the_page_shows_only_the_figures_this_run_drew(trained, tmp_path, run_here):
    command = arguments(trained, tmp_path)
    # An earlier labelled run in the same OUTPUT_DIR drew these; this unlabelled run draws none of them.
    stale = ["confusion_matrix_train.png", "confusion_matrix_eval.png", "self_label_loss.png"]
    for name in stale:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "out" / name)
    result = run_here(command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == RESULT
    parser = FigureSources()
    parser.feed((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    drawn = ["prototypes.png", "augmentations.png", "representation_loss.png", "neighbours.png", "clustering_loss.png"]
    assert parser.sources == drawn
    assert all((tmp_path / "out" / name).is_file() for name in stale)  # left as they were, only not shown
