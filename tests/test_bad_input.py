"""The bad-input matrix: each case ends with one clear error line, exit status 2, and no file in OUTPUT_DIR changed.
The cases run the command's own path in this process (`run_as_command(main)`), those that need a fresh process (an
unknown KERAS_BACKEND, a download into an empty Keras home) as a user runs the script."""

import os
import shutil

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
