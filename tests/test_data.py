"""Each data source on tiny generated files."""

import os
import pickle
import re
import shutil
import tarfile

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import class_image, make_image_folder, write_cifar_batch
from scan.data import CIFAR10_CLASSES, Dataset, load_dataset, split_holdout
from scan.settings import UsageError


def test_cifar10_download_path_concatenates_train_and_test(monkeypatch):
    x_train = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    x_test = np.random.default_rng(1).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    y_train, y_test = np.arange(6).reshape(-1, 1), np.array([[9], [8], [7], [6]])
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", lambda: ((x_train, y_train), (x_test, y_test)))
    dataset = load_dataset("cifar10", input_size=32, max_images=0, seed=0)
    np.testing.assert_array_equal(dataset.images, np.concatenate([x_train, x_test]))
    assert dataset.labels.tolist() == [0, 1, 2, 3, 4, 5, 9, 8, 7, 6]
    assert dataset.class_names[0] == "airplane" and dataset.class_names[9] == "truck"


def test_failed_download_says_how_to_use_local_files(monkeypatch):
    def offline():
        raise Exception(
            "URL fetch failure on https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz: None -- [Errno -2]"
        )

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(
        UsageError, match=r"could not download CIFAR-10 \(URL fetch failure.*--data=path/to/cifar-10-batches-py"
    ):
        load_dataset("cifar10", input_size=32, max_images=0, seed=0)


def test_a_long_cause_is_shortened_at_a_word_boundary(monkeypatch):
    words = "URL fetch failure on https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz: None -- [Errno -2] Name or service not known".split()

    def offline():
        raise Exception(" ".join(words))

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(UsageError) as raised:
        load_dataset("cifar10", input_size=32, max_images=0, seed=0)
    cause = re.search(r"could not download CIFAR-10 \((.*?)\); without internet", str(raised.value)).group(1)
    assert cause.endswith(" ...") and len(cause) <= 120
    kept = cause.removesuffix(" ...").split(" ")
    assert kept == words[: len(kept)]  # whole words only, in order


def test_cifar10_batches_folder(tmp_path):
    rng = np.random.default_rng(0)
    batches = {
        name: rng.integers(0, 255, (n, 3, 32, 32), dtype=np.uint8)
        for name, n in [("data_batch_1", 5), ("data_batch_2", 3), ("test_batch", 2)]
    }
    labels = {"data_batch_1": [0, 1, 2, 3, 4], "data_batch_2": [5, 6, 7], "test_batch": [8, 9]}
    for name, images in batches.items():
        write_cifar_batch(tmp_path / name, images, labels[name])
    dataset = load_dataset(str(tmp_path), input_size=32, max_images=0, seed=0)
    expected = np.concatenate([batches[name] for name in ["data_batch_1", "data_batch_2", "test_batch"]]).transpose(
        0, 2, 3, 1
    )
    np.testing.assert_array_equal(dataset.images, expected)  # CHW batches become HWC images
    assert dataset.labels.tolist() == list(range(10))
    assert dataset.class_names == CIFAR10_CLASSES


def test_cifar10_batches_max_images_is_a_seeded_subset(tmp_path):
    images = np.arange(20 * 3072, dtype=np.uint32).astype(np.uint8).reshape(20, 3, 32, 32)
    write_cifar_batch(tmp_path / "data_batch_1", images, list(range(20)))
    with open(tmp_path / "batches.meta", "wb") as file:  # 20 classes, so that each image's label is its index
        pickle.dump({b"label_names": [f"image {index}".encode() for index in range(20)]}, file)
    first = load_dataset(str(tmp_path), input_size=32, max_images=7, seed=3)
    again = load_dataset(str(tmp_path), input_size=32, max_images=7, seed=3)
    other = load_dataset(str(tmp_path), input_size=32, max_images=7, seed=4)
    assert len(first.labels) == 7 and len(set(first.labels.tolist())) == 7
    assert first.labels.tolist() == again.labels.tolist() != other.labels.tolist()
    np.testing.assert_array_equal(
        first.images, images.transpose(0, 2, 3, 1)[first.labels]
    )  # labels are the indices here


def test_image_folder_with_mixed_formats_modes_sizes_and_a_corrupt_file(tmp_path, capsys):
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(class_image(0, 0)).save(root / "cat" / "a.png")
    Image.fromarray(class_image(0, 1, size=50)).save(
        root / "cat" / "b.JPG", quality=95
    )  # odd size, upper-case extension
    Image.fromarray(class_image(0, 2)[:, :, 0]).save(root / "cat" / "c.bmp")  # grayscale
    Image.fromarray(np.dstack([class_image(1, 0, size=17), np.full((17, 17), 128, np.uint8)])).save(
        root / "dog" / "d.png"
    )  # RGBA, odd size
    Image.fromarray(class_image(1, 1, size=40)).save(root / "dog" / "e.webp")
    Image.fromarray(class_image(1, 2)).save(root / "dog" / "f.gif")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    dataset = load_dataset(str(root), input_size=32, max_images=0, seed=0)
    assert dataset.images.shape == (6, 32, 32, 3) and dataset.images.dtype == np.uint8
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(dataset.images[0], class_image(0, 0))  # a 32x32 PNG is loaded unchanged
    gray = dataset.images[2]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()  # grayscale -> RGB
    warning = capsys.readouterr().out
    assert "warning: skipped 1 unreadable image files of 7 (dog/broken.jpg)" in warning


def test_flat_image_folder_has_no_labels(tmp_path):
    root = make_image_folder(tmp_path / "flat", num_classes=2, per_class=3, labelled=False)
    dataset = load_dataset(root, input_size=16, max_images=0, seed=0)
    assert dataset.images.shape == (6, 16, 16, 3)
    assert dataset.labels is None and dataset.class_names is None


def test_image_folder_max_images(tmp_path):
    root = make_image_folder(tmp_path / "images", num_classes=3, per_class=5)
    dataset = load_dataset(root, input_size=32, max_images=4, seed=0)
    assert dataset.images.shape == (4, 32, 32, 3) and len(dataset.labels) == 4


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "no such file or folder"),
        (lambda root: root.mkdir(), "no .png/.jpg/.jpeg/.bmp/.gif/.* files found; point --data at a folder of images"),
        (lambda root: (root.mkdir(), (root / "x.png").write_bytes(b"junk")), "none of the 1 image files could be read"),
        (lambda root: root.write_text("a,b"), "is a file; point --data at a folder of images, an archive of one"),
    ],
)
def test_unusable_folders_raise_usage_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(UsageError, match=message):
        load_dataset(str(root), input_size=32, max_images=0, seed=0)


@pytest.mark.parametrize("nested", [["cat", "dog/puppies"], ["2024/05", "2024/06"], ["", "scans"]])
def test_a_library_of_nested_folders_is_clustered_unlabelled_and_keeps_each_path(tmp_path, capsys, nested):
    root = tmp_path / "Pictures"
    for index, folder in enumerate(nested):
        for image in range(3):
            path = root / folder / f"photo_{image}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(class_image(index, image)).save(path)
    dataset = load_dataset(str(root), input_size=32, max_images=0, seed=0)
    assert dataset.labels is None and dataset.class_names is None and len(dataset.images) == 6
    assert sorted(dataset.names) == sorted(f"{folder}/photo_{i}.png".lstrip("/") for folder in nested for i in range(3))
    assert dataset.root == str(root) and dataset.source.endswith("(nested folders, unlabelled)")
    assert capsys.readouterr().out == (
        "6 images in nested folders: clustered unlabelled (class folders give the labels only when every image sits "
        "one folder deep)\n"
    )
    for name, image in zip(dataset.names, dataset.images, strict=True):  # each image is its file's
        np.testing.assert_array_equal(image, np.asarray(Image.open(root / name).convert("RGB")))


def test_labels_come_from_class_folders_when_every_image_sits_one_folder_deep(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images", num_classes=2, per_class=3)
    dataset = load_dataset(root, input_size=32, max_images=0, seed=0)
    assert dataset.class_names == ["class_0", "class_1"] and dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert capsys.readouterr().out == ""


def test_truncated_cifar_batch_is_rejected(tmp_path):
    write_cifar_batch(tmp_path / "data_batch_1", np.zeros((4, 3, 32, 32), np.uint8), [0, 1, 2, 3])
    data = (tmp_path / "data_batch_1").read_bytes()
    (tmp_path / "data_batch_1").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="data_batch_1 is truncated or not a CIFAR-10 batch"):
        load_dataset(str(tmp_path), input_size=32, max_images=0, seed=0)
    assert os.path.exists(tmp_path / "data_batch_1")


@pytest.mark.parametrize(
    "data, expected", [("cifar10-train", [0, 1, 2]), ("cifar10-test", [7, 8]), ("cifar10", [0, 1, 2, 7, 8])]
)
def test_cifar10_split_names(monkeypatch, data, expected):
    x_train, x_test = np.zeros((3, 32, 32, 3), np.uint8), np.ones((2, 32, 32, 3), np.uint8)
    y_train, y_test = np.array([[0], [1], [2]]), np.array([[7], [8]])
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", lambda: ((x_train, y_train), (x_test, y_test)))
    assert load_dataset(data, input_size=32, max_images=0, seed=0).labels.tolist() == expected


def test_split_holdout_is_a_seeded_disjoint_split(tmp_path):
    images = np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1).repeat(3, axis=-1)
    dataset = Dataset(images, np.arange(30), [str(i) for i in range(30)], "numbers")
    train, held_out = split_holdout(dataset, 10, seed=5)
    assert len(train.images) == 20 and len(held_out.images) == 10
    assert set(train.labels.tolist()).isdisjoint(held_out.labels.tolist())
    assert sorted(train.labels.tolist() + held_out.labels.tolist()) == list(range(30))
    np.testing.assert_array_equal(held_out.images[:, 0, 0, 0], held_out.labels)  # images travel with their labels
    again = split_holdout(dataset, 10, seed=5)[1]
    assert again.labels.tolist() == held_out.labels.tolist()
    with pytest.raises(UsageError, match="--holdout_images=30 leaves none of the 30 images to train on"):
        split_holdout(dataset, 30, seed=5)


@pytest.mark.parametrize("archive_format, extension", [("zip", ".zip"), ("tar", ".tar"), ("gztar", ".tar.gz")])
def test_an_archive_gives_the_arrays_of_its_unpacked_folder(tmp_path, archive_format, extension):
    folder = make_image_folder(tmp_path / "images", num_classes=3, per_class=5)
    (tmp_path / "images" / "class_1" / "broken.png").write_bytes(b"\x89PNG truncated")
    archive = shutil.make_archive(str(tmp_path / "packed"), archive_format, root_dir=tmp_path, base_dir="images")
    assert archive.endswith(extension)
    from_folder = load_dataset(folder, input_size=16, max_images=0, seed=0)
    from_archive = load_dataset(archive, input_size=16, max_images=0, seed=0)
    np.testing.assert_array_equal(from_archive.images, from_folder.images)
    np.testing.assert_array_equal(from_archive.labels, from_folder.labels)
    assert from_archive.class_names == from_folder.class_names == ["class_0", "class_1", "class_2"]
    assert from_archive.source == f"image archive {archive}"
    subset = load_dataset(archive, input_size=16, max_images=7, seed=3)
    np.testing.assert_array_equal(subset.images, load_dataset(folder, 16, 7, 3).images)


def test_an_archive_of_loose_images_is_unlabelled_and_a_broken_member_is_skipped(tmp_path, capsys):
    archive = tmp_path / "loose.tgz"
    with tarfile.open(archive, "w:gz") as packed:
        for index in range(4):
            Image.fromarray(class_image(0, index)).save(tmp_path / f"{index}.png")
            packed.add(tmp_path / f"{index}.png", arcname=f"{index}.png")
        (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
        packed.add(tmp_path / "bad.jpg", arcname="bad.jpg")
    dataset = load_dataset(str(archive), input_size=32, max_images=0, seed=0)
    assert dataset.images.shape == (4, 32, 32, 3) and dataset.labels is None
    np.testing.assert_array_equal(dataset.images[2], class_image(0, 2))
    assert capsys.readouterr().out.count("warning: skipped 1 unreadable image files of 5 (bad.jpg)") == 1


@pytest.mark.parametrize("name, content", [("junk.zip", b"PK\x03\x04 not really"), ("junk.tar.gz", b"\x1f\x8b junk")])
def test_a_corrupt_archive_is_one_usage_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UsageError, match=f"{name}: the archive is corrupt or truncated"):
        load_dataset(str(tmp_path / name), input_size=32, max_images=0, seed=0)
