"""Data sources: CIFAR-10 through `keras.datasets` or a local `cifar-10-batches-py` folder, a folder of images or a
.zip/.tar archive of one (class sub-folders one folder deep give the labels; a photo library's nested folders are
unlabelled), decoded by `scan.images`; and the seeded split of a held-out set.
"""

import math
import os
import pickle
import tarfile
import textwrap
import zipfile
import zlib
from typing import NamedTuple

import keras
import numpy as np
from PIL import Image

from scan.images import decode_images, image_extensions, memory_warning
from scan.names import display_name
from scan.settings import UsageError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


ARCHIVE_EXTENSIONS = (".zip", ".tar", ".tar.gz", ".tgz")
# What zipfile and tarfile raise for a corrupt or truncated archive (or a zip member name flagged UTF-8 that is
# not); reading one also meets OSError.
CORRUPT_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, UnicodeDecodeError)


class Dataset(NamedTuple):
    images: np.ndarray  # uint8, shape [num_images, INPUT_SIZE, INPUT_SIZE, 3]
    labels: np.ndarray | None  # int, shape [num_images], or None without class folders one folder deep
    class_names: list | None  # class name of each label id
    source: str  # where the images came from, for the report
    names: list | None = (
        None  # each image as the user knows it: a path in the folder, an archive member, "cifar10-train:12"
    )
    root: str | None = None  # the folder or archive that `names` are in; None for CIFAR-10's arrays


def load_cifar10_download(split):
    """Loads CIFAR-10 through `keras.datasets` (downloaded once into ~/.keras/datasets): "train", "test" or both."""
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # noqa: BLE001  (any download or cache failure gets the same advice)
        raise UsageError(
            f"could not download CIFAR-10 ({shorten(str(error).splitlines()[0])}); without internet, point DATA at "
            "local files: --data=path/to/cifar-10-batches-py, or --data=path/to/images (a folder of images or an archive of one)"
        ) from None
    images = {"train": [x_train], "test": [x_test], "train+test": [x_train, x_test]}[split]
    labels = {"train": [y_train], "test": [y_test], "train+test": [y_train, y_test]}[split]
    labels = np.concatenate(labels).reshape(-1)  # [n, 1] -> [n]
    # Each image as "cifar10-train:1234": its split and index in keras.datasets' arrays.
    names = [
        f"cifar10-{part}:{i}" for part, rows in zip(split.split("+"), images, strict=True) for i in range(len(rows))
    ]
    return Dataset(np.concatenate(images), labels, list(CIFAR10_CLASSES), f"cifar10 {split} (keras.datasets)", names)


def shorten(cause, width=120):
    """A long cause cut at a word boundary (never mid-word), for a one-line error message."""
    return textwrap.shorten(cause, width, placeholder=" ...")


def is_cifar10_batches_folder(path):
    return os.path.isfile(os.path.join(path, "data_batch_1")) or os.path.isfile(os.path.join(path, "test_batch"))


def read_cifar10_pickle(path, kind, read):
    """`read(the unpickled contents of path)`, a CIFAR-10 `kind` of file; any sign of a corrupt or truncated file is
    one UsageError."""
    try:
        with open(path, "rb") as file:
            return read(pickle.load(file, encoding="bytes"))
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
        raise UsageError(
            f"{path} is truncated or not a CIFAR-10 {kind} ({type(error).__name__}); download it again"
        ) from None


def batch_arrays(batch):
    """The images [n, 3, 32, 32] and labels [n] of an unpickled CIFAR-10 batch (its data: [n, 3072] uint8)."""
    return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], np.int64)


def load_cifar10_batches(folder):
    """Loads the python-pickle CIFAR-10 batches of `folder` (data_batch_1..5, then test_batch if present), and the
    class names of its batches.meta. The folder is trusted input: Python's pickle runs whatever code a file holds."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images, labels, image_names = [], [], []
    for name in [name for name in names if os.path.isfile(os.path.join(folder, name))]:
        path = os.path.join(folder, name)
        data, batch_labels = read_cifar10_pickle(path, "batch", batch_arrays)
        if len(batch_labels) != len(data):
            raise UsageError(f"{path} has {len(data)} images but {len(batch_labels)} labels; download it again")
        images.append(data.transpose(0, 2, 3, 1))  # [n, 3, 32, 32] -> [n, 32, 32, 3]
        labels.append(batch_labels)
        image_names += [f"{name}:{index}" for index in range(len(data))]
    class_names = list(CIFAR10_CLASSES)
    meta_path = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta_path):
        class_names = read_cifar10_pickle(
            meta_path, "batches.meta", lambda meta: [name.decode() for name in meta[b"label_names"]]
        )
    labels = np.concatenate(labels)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise UsageError(
            f"{folder}: its batches have labels from {labels.min()} to {labels.max()}, but "
            f"{'batches.meta names' if os.path.isfile(meta_path) else 'CIFAR-10 has'} {len(class_names)} classes; "
            "download it again"
        )
    return Dataset(np.concatenate(images), labels, class_names, f"cifar-10-batches-py folder {folder}", image_names)


def is_image_name(name):
    """Whether a file is an image the loader reads, by its name's extension (hidden files are skipped)."""
    return name.lower().endswith(image_extensions()) and not name.startswith(".")


def with_labels(names):
    """Each relative image name with its label folder: its parent path ('' for an image at the top)."""
    return [(name, name.rpartition("/")[0]) for name in names]


def first_names(names, count=3):
    """The first `count` of `names`, shown (display_name) and joined for a warning line, with ', ...' for the rest."""
    return ", ".join(display_name(name) for name in names[:count]) + (", ..." if len(names) > count else "")


def entry_identity(entry, device):
    """(is a folder, (st_dev, st_ino)) of an entry of a folder on `device`, links followed; a broken link is
    (False, None). A file that is not a link needs no stat: its folder's device and its inode say which it is."""
    try:
        if not entry.is_symlink() and not entry.is_dir(follow_symlinks=False):
            return False, (device, entry.inode())
        found = entry.stat()
        return entry.is_dir(), (found.st_dev, found.st_ino)
    except OSError:
        return False, None


def find_image_files(folder):
    """Lists the image files under `folder`: (path relative to it, label folder ('' for none)), each folder's files
    (sorted) before its sub-folders (sorted). Symbolic links to folders and files are followed; each real folder is
    walked once and each real file listed once, under the first path that reaches it, and links that lead back into
    a folder above them (a loop) are one warning line. A broken link is listed like any file, and found unreadable."""
    names, loops, files_seen = [], [], set()
    top = os.stat(folder)
    top_identity = (top.st_dev, top.st_ino)
    folders_seen, pending = {top_identity}, [("", (top_identity,))]  # (folder relative to `folder`, those above it)
    while pending:
        relative, above = pending.pop()
        try:
            with os.scandir(os.path.join(folder, relative)) as scanned:
                entries = sorted(scanned, key=lambda entry: entry.name)
        except OSError:  # an unreadable folder is skipped, as os.walk skips it
            continue
        subfolders = []
        for entry in entries:
            name = f"{relative}/{entry.name}" if relative else entry.name
            is_folder, identity = entry_identity(entry, above[-1][0])
            if is_folder and identity in above:
                loops.append(name)
            elif is_folder and identity not in folders_seen:
                folders_seen.add(identity)
                subfolders.append((name, (*above, identity)))
            elif not is_folder and is_image_name(entry.name) and (identity is None or identity not in files_seen):
                files_seen.add(identity)
                names.append(name)
        pending += reversed(subfolders)
    if loops:
        plural = "s" if len(loops) != 1 else ""
        print(
            f"warning: a loop of symbolic links: not following {len(loops)} link{plural} back into a folder above "
            f"({first_names(loops)})"
        )
    return with_labels(names)


def find_archive_images(path):
    """Lists the image members of a .zip or .tar(.gz) archive as `find_image_files` lists a folder's files: (member
    name, label folder), relative to the single top folder that holds every image (an archive of a folder), else
    to the archive's root. Returns ([(relative name, label)], that top folder's prefix)."""
    try:
        if path.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                names = [info.filename for info in archive.infolist() if not info.is_dir()]
        else:
            with tarfile.open(path) as archive:
                names = [member.name for member in archive.getmembers() if member.isfile()]
    except (*CORRUPT_ARCHIVE_ERRORS, OSError) as error:
        raise archive_error(path, error) from None
    names = sorted(name.removeprefix("./") for name in names if is_image_name(name.rpartition("/")[2]))
    tops = {name.partition("/")[0] for name in names}
    prefix = f"{tops.pop()}/" if len(tops) == 1 and all("/" in name for name in names) else ""
    return with_labels([name.removeprefix(prefix) for name in names]), prefix


def read_archive_members(path, names):
    """The bytes of the members `names` of the archive at `path`, in that order (a tar is read once, in its order)."""
    try:
        if path.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                return [archive.read(name) for name in names]
        wanted, contents = set(names), {}
        with tarfile.open(path) as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if name in wanted:
                    contents[name] = archive.extractfile(member).read()
        return [contents[name] for name in names]
    except (*CORRUPT_ARCHIVE_ERRORS, OSError, KeyError) as error:
        raise archive_error(path, error) from None


def archive_error(path, error):
    return UsageError(
        f"{path}: the archive is corrupt or truncated ({type(error).__name__}: {shorten(str(error), 80)}); "
        "download or pack it again"
    )


def list_images(data):
    """The image files of a folder, or of a .zip/.tar/.tar.gz archive of one, read in place: ([(name, label folder)],
    a description, each name as the user knows it, and a function that reads the named files for decoding)."""
    if os.path.isdir(data):
        found, kind = find_image_files(data), "image folder"
        member = lambda name: name  # noqa: E731  (a folder's images go by their paths in it)
        read = lambda names: [os.path.join(data, name) for name in names]  # noqa: E731
    else:
        (found, prefix), kind = find_archive_images(data), "image archive"
        member = lambda name: prefix + name  # noqa: E731  (an archive's images go by their member names)
        read = lambda names: read_archive_members(data, [prefix + name for name in names])  # noqa: E731
    if not found:
        raise UsageError(
            f"--data={data}: no {'/'.join(image_extensions())} files found; point --data at a folder of images"
        )
    return found, kind, member, read


def load_image_folder(data, input_size, max_images, seed, fit="crop"):
    """Loads a folder, or an archive of one. Class sub-folders give the labels when every image sits one folder
    deep; images at other depths (a photo library's nested folders) are clustered unlabelled, as a flat folder's."""
    found, kind, member, read = list_images(data)
    depths = {label.count("/") + 1 if label else 0 for _, label in found}
    if depths not in ({0}, {1}):
        print(
            f"{len(found)} images in nested folders: clustered unlabelled (class folders give the labels only when "
            "every image sits one folder deep)"
        )
    if max_images and max_images < len(found):
        chosen = np.sort(np.random.default_rng(seed).choice(len(found), max_images, replace=False))
        found = [found[i] for i in chosen]
    warning = memory_warning(len(found), input_size)
    if warning:
        print(warning)
    decoded = decode_images(read([name for name, _ in found]), input_size, fit)
    unreadable = [name for (name, _), image in zip(found, decoded, strict=True) if image is None]
    if len(unreadable) == len(found):
        raise UsageError(f"--data={data}: none of the {len(found)} image files could be read; check the files")
    if unreadable:
        print(f"warning: skipped {len(unreadable)} unreadable image files of {len(found)} ({first_names(unreadable)})")
    kept = [(label, image) for (_, label), image in zip(found, decoded, strict=True) if image is not None]
    names = [member(name) for (name, _), image in zip(found, decoded, strict=True) if image is not None]
    images = np.stack([image for _, image in kept])
    if depths != {1}:
        description = "no class sub-folders" if depths == {0} else "nested folders, unlabelled"
        return Dataset(images, None, None, f"{kind} {data} ({description})", names, data)
    class_names = sorted({label for label, _ in kept})
    labels = np.array([class_names.index(label) for label, _ in kept], dtype=np.int64)
    return Dataset(images, labels, class_names, f"{kind} {data}", names, data)


CIFAR10_SPLITS = {"cifar10": "train+test", "cifar10-train": "train", "cifar10-test": "test"}


def load_dataset(data, input_size, max_images, seed, fit="crop"):
    """Loads the images named by `data`: a CIFAR10_SPLITS name, a cifar-10-batches-py folder, an image folder or an
    archive of one (each image `fit` to a square: IMAGE_FIT)."""
    if data in CIFAR10_SPLITS:
        dataset = load_cifar10_download(CIFAR10_SPLITS[data])
    elif not os.path.exists(data):
        raise UsageError(
            f"--data={data}: no such file or folder; use {', '.join(CIFAR10_SPLITS)}, a cifar-10-batches-py folder, "
            "an image folder or an archive of one"
        )
    elif is_cifar10_batches_folder(data):
        dataset = load_cifar10_batches(data)
    elif os.path.isdir(data) or data.lower().endswith(ARCHIVE_EXTENSIONS):
        return load_image_folder(data, input_size, max_images, seed, fit)
    else:
        raise UsageError(
            f"--data={data}: is a file; point --data at a folder of images, an archive of one "
            f"({', '.join(ARCHIVE_EXTENSIONS)}) or a cifar-10-batches-py folder"
        )
    if dataset.images.shape[1:3] != (input_size, input_size):
        resized = [
            np.asarray(Image.fromarray(image).resize((input_size, input_size), Image.Resampling.BICUBIC))
            for image in dataset.images
        ]
        dataset = dataset._replace(images=np.stack(resized))
    if max_images and max_images < len(dataset.images):
        chosen = np.sort(np.random.default_rng(seed).choice(len(dataset.images), max_images, replace=False))
        dataset = dataset._replace(
            images=dataset.images[chosen], labels=dataset.labels[chosen], names=[dataset.names[i] for i in chosen]
        )
    return dataset


def holdout_count(maximum, share, num_images):
    """How many of `num_images` to hold out: `maximum`, or with a `share` (a recipe's hold-out of the user's own
    images) that share of them, at most `maximum`."""
    return min(maximum, int(num_images * share)) if share else maximum


def split_holdout(dataset, holdout_images, seed):
    """Splits a seeded random `holdout_images` images off `dataset`: returns (training set, held-out set)."""
    if holdout_images >= len(dataset.images):
        raise UsageError(
            f"--holdout_images={holdout_images} leaves none of the {len(dataset.images)} images to train on; "
            "lower --holdout_images (with your own data, a recipe holds images out unless it is given)"
        )
    held_out = np.zeros(len(dataset.images), dtype=bool)
    held_out[np.random.default_rng(seed + 1).choice(len(dataset.images), holdout_images, replace=False)] = True
    subset = lambda mask, name: Dataset(  # noqa: E731
        dataset.images[mask],
        None if dataset.labels is None else dataset.labels[mask],
        dataset.class_names,
        f"{dataset.source}, {name}",
        None if dataset.names is None else [dataset.names[i] for i in np.flatnonzero(mask)],
        dataset.root,
    )
    return subset(~held_out, f"{len(dataset.images) - holdout_images} images"), subset(
        held_out, f"{holdout_images} held-out images"
    )


def load_splits(settings):
    """The images to train on (DATA, a MAX_IMAGES subset of it) and those evaluated and never trained on: EVAL_DATA,
    or HOLDOUT_IMAGES held out of DATA (a recipe's share of the user's own images, said in one line), else None."""
    holdout_for = lambda num_images: holdout_count(settings.holdout_images, settings.holdout_share, num_images)  # noqa: E731
    subset_size = 0
    if settings.max_images:  # MAX_IMAGES to train on, and the hold-out that leaves them
        subset_size = settings.max_images + holdout_for(math.ceil(settings.max_images / (1 - settings.holdout_share)))
    dataset = load_dataset(settings.data, settings.input_size, subset_size, settings.seed, settings.image_fit)
    if settings.holdout_images:
        holdout = holdout_for(len(dataset.images))
        if settings.holdout_share:
            print(
                f"holding out {holdout} of the {len(dataset.images)} images to evaluate on: the recipe's share of your "
                f"own data (a fifth, at most {settings.holdout_images}; --holdout_images=N sets it)"
            )
        return split_holdout(dataset, holdout, settings.seed)
    if settings.eval_data:
        return dataset, load_dataset(settings.eval_data, settings.input_size, 0, settings.seed, settings.image_fit)
    return dataset, None


def load_assign_data(path, input_size, seed, fit):
    """The images of ASSIGN_DATA (any form DATA takes), with the loader's errors naming --assign_data."""
    try:
        return load_dataset(path, input_size, 0, seed, fit)
    except UsageError as error:
        raise UsageError(str(error).replace(f"--data={path}", f"--assign_data={path}")) from None


def describe_data(dataset, eval_set):
    """Prints what a run learns on, the Dataset `dataset`: its source, the tutorial's x_data and y_data shapes and its
    classes; and what it evaluates: the Dataset `eval_set`, or (None) the training images themselves."""
    x_data, y_data, classes = dataset.images, dataset.labels, dataset.class_names
    print(f"data: {display_name(dataset.source)}")
    print("x_data shape:", x_data.shape, "- y_data shape:", None if y_data is None else y_data.shape)
    if classes is not None:
        print(f"{len(classes)} classes: {', '.join(display_name(name) for name in classes)}")
    if eval_set is not None:
        print(f"evaluation data: {display_name(eval_set.source)} (never trained on)")
    else:
        print("evaluation data: the training images (set --holdout_images or --eval_data to hold images out)")
