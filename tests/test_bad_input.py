"""The bad-input matrix: each case ends with one clear error line, exit status 2, and no file in OUTPUT_DIR changed.
The cases run the command's own path in this process (`run_as_command(main)`), those that need a fresh process (an
unknown KERAS_BACKEND, a download into an empty Keras home) as a user runs the script."""

import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest

from conftest import make_image_folder, run_script, write_cifar_batch


def folder_of(tmp_path, *files):
    root = tmp_path / "data"
    root.mkdir()
    for name, content in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return [f"--data={root}"]


def truncated_cifar_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    write_cifar_batch(root / "data_batch_1", np.zeros((20, 3, 32, 32), np.uint8), [0] * 20)
    write_cifar_batch(root / "data_batch_2", np.zeros((20, 3, 32, 32), np.uint8), [1] * 20)
    data = (root / "data_batch_2").read_bytes()
    (root / "data_batch_2").write_bytes(data[:1000])
    return [f"--data={root}"]


def good_folder(tmp_path, *extra):
    return [f"--data={make_image_folder(tmp_path / 'data', num_classes=3, per_class=8)}", *extra]


def truncated_archive(tmp_path):
    folder = make_image_folder(tmp_path / "images", num_classes=3, per_class=8)
    archive = shutil.make_archive(
        str(tmp_path / "images"), "gztar", root_dir=tmp_path, base_dir=os.path.basename(folder)
    )
    data = open(archive, "rb").read()
    open(archive, "wb").write(data[: len(data) // 2])
    return [f"--data={archive}"]


def cifar_batches_with_meta(tmp_path, meta):
    """A cifar-10-batches-py folder of one good batch (labels 0 and 1) and a batches.meta file of bytes `meta`."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    write_cifar_batch(root / "data_batch_1", np.zeros((20, 3, 32, 32), np.uint8), [0, 1] * 10)
    (root / "batches.meta").write_bytes(meta)
    return [f"--data={root}"]


def photo_archive(tmp_path, *extra_names):
    """--data: a zip of 24 photos in one top folder, and members `extra_names` (more photos) beside them."""
    folder = make_image_folder(tmp_path / "photos", num_classes=3, per_class=8, labelled=False)
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as packed:
        for name in sorted(os.listdir(folder)):
            packed.write(os.path.join(folder, name), f"photos/{name}")
        for name in extra_names:
            packed.write(os.path.join(folder, "c0_000.png"), f"photos/{name}")
    shutil.rmtree(folder)
    return [f"--data={archive}"]


def file_as_output_parent(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return [*good_folder(tmp_path), f"--output_dir={tmp_path / 'a_file' / 'out'}"]


CASES = {
    "missing path": (lambda tmp: [f"--data={tmp / 'nowhere'}"], {}, "no such file or folder"),
    "empty folder": (lambda tmp: folder_of(tmp), {}, "/.heic/.heif files found; point --data at a folder of images"),
    "only non-images": (lambda tmp: folder_of(tmp, ("a.txt", b"text"), ("b/c.csv", b"1,2")), {}, "files found"),
    "all images corrupt": (
        lambda tmp: folder_of(tmp, ("a/x.png", b"junk"), ("a/y.jpg", b""), ("b/z.gif", b"GIF8")),
        {},
        "none of the 3 image files could be read",
    ),
    "truncated cifar batch": (truncated_cifar_batches, {}, "data_batch_2 is truncated or not a CIFAR-10 batch"),
    "truncated archive": (truncated_archive, {}, "images.tar.gz: the archive is corrupt or truncated"),
    "k >= images": (
        lambda tmp: good_folder(tmp, "--k_neighbours=24"),
        {},
        "--k_neighbours=24 needs more than 24 images",
    ),
    "too many clusters": (
        lambda tmp: good_folder(tmp, "--num_clusters=25"),
        {},
        "--num_clusters=25 is more than the 24 images",
    ),
    "one cluster": (lambda tmp: good_folder(tmp, "--num_clusters=1"), {}, "clustering needs at least 2 clusters"),
    "negative epochs": (
        lambda tmp: good_folder(tmp, "--representation_epochs=-3"),
        {},
        "--representation_epochs=-3: must be at least 1",
    ),
    "zero epochs": (
        lambda tmp: good_folder(tmp, "--clustering_epochs=0"),
        {},
        "--clustering_epochs=0: must be at least 1",
    ),
    "zero batch size": (
        lambda tmp: good_folder(tmp, "--clustering_batch_size=0"),
        {},
        "--clustering_batch_size=0: must be at least 1",
    ),
    "unknown override": (
        lambda tmp: good_folder(tmp, "--num_cluster=3"),
        {},
        "unrecognized arguments: --num_cluster=3",
    ),
    "wrong-typed override": (
        lambda tmp: good_folder(tmp, "--num_clusters=many"),
        {},
        "--num_clusters=many: expected int",
    ),
    "unknown backend": (
        good_folder,
        {"KERAS_BACKEND": "pytorch-lightning"},
        "KERAS_BACKEND=pytorch-lightning cannot be used",
    ),
    "output dir not writable": (
        lambda tmp: good_folder(tmp, "--output_dir=/proc/scan-outputs"),
        {},
        "cannot write in /proc",
    ),
    "output dir below a file": (file_as_output_parent, {}, "is a file, not a folder"),
    "failed download": (lambda tmp: ["--data=cifar10"], {"KERAS_HOME": "keras-home"}, "could not download CIFAR-10"),
    "unknown encoder": (lambda tmp: good_folder(tmp, "--encoder=vgg"), {}, "--encoder=vgg: choose one of"),
    "views too small": (
        lambda tmp: good_folder(tmp, "--encoder=small", "--view_size=4"),
        {},
        "--view_size=4: the small encoder needs images of at least 8x8",
    ),
    "removed setting": (
        lambda tmp: good_folder(tmp, "--batch_size=64"),
        {},
        "--batch_size=64 was split in this version: use --representation_batch_size=64 --clustering_batch_size=64 "
        "--self_label_batch_size=64",
    ),
    "eval data and holdout both given": (
        lambda tmp: good_folder(tmp, "--recipe=cpu", f"--eval_data={tmp / 'data'}", "--holdout_images=5"),
        {},
        "both choose the images evaluated: give one of them",
    ),
    "sort target inside the data": (
        lambda tmp: good_folder(tmp, f"--sort_into={tmp / 'data' / 'sorted'}"),
        {},
        "lies inside --data=",
    ),
    "sort target inside the archive": (
        lambda tmp: [*photo_archive(tmp), f"--sort_into={tmp / 'photos.zip' / 'sorted'}"],
        {},
        "/photos.zip/sorted lies inside --data=",
    ),
    "photo name too long to sort": (
        lambda tmp: [*photo_archive(tmp, "é" * 150 + ".png"), f"--sort_into={tmp / 'sorted'}"],
        {},
        "has a file name of 304 bytes, more than the 255 a file system takes; rename it to sort it",
    ),
    "sort target name too long": (
        lambda tmp: good_folder(tmp, f"--sort_into={tmp / ('s' * 300)}"),
        {},
        "is 300 bytes, more than the 255 a file system takes; choose a shorter one",
    ),
    "corrupt batches.meta": (
        lambda tmp: cifar_batches_with_meta(tmp, b"\x80\x04 not a pickle"),
        {},
        "batches.meta is truncated or not a CIFAR-10 batches.meta",
    ),
    "batches.meta without the batches' classes": (
        lambda tmp: cifar_batches_with_meta(tmp, pickle.dumps({b"label_names": [b"airplane"]})),
        {},
        "its batches have labels from 0 to 1, but batches.meta names 1 classes",
    ),
    "feature views of a tuned encoder": (
        lambda tmp: good_folder(tmp, "--encoder_during_clustering=tuned", "--feature_views=2"),
        {},
        "--feature_views=2 does nothing with --encoder_during_clustering=tuned (only with cached); set "
        "--feature_views=0 or --encoder_during_clustering=cached",
    ),
}


def snapshot(path):
    """Every file under `path` with its size and modification time (empty if `path` does not exist)."""
    return {
        os.path.join(root, name): (
            os.stat(os.path.join(root, name)).st_size,
            os.stat(os.path.join(root, name)).st_mtime_ns,
        )
        for root, _, names in os.walk(path)
        for name in names
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_one_clear_line_and_changes_nothing(tmp_path, case, run_here):
    make_args, environment, message = CASES[case]
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "metrics.json").write_text('{"from": "an earlier run"}')
    args = make_args(tmp_path)
    if not any(arg.startswith("--output_dir=") for arg in args):
        args.append(f"--output_dir={output_dir}")
    before = snapshot(tmp_path)
    if environment:  # a fresh process: another backend, another Keras home
        result = run_script(args, cwd=tmp_path, env=environment, timeout=300)
    else:
        result = run_here(args, cwd=tmp_path)
    status, out, err = result.returncode, result.stdout, result.stderr
    assert status == 2, (out[-2000:], err[-2000:])
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and err.strip().splitlines()[-1] == error_lines[0]
    assert message in error_lines[0], error_lines[0]
    assert "Traceback" not in err
    after = snapshot(tmp_path)
    assert {path: stat for path, stat in after.items() if "keras-home" not in path} == before
