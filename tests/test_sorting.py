"""Sorting into folders (scan/sorting.py) on photo folders with nested sub-folders, duplicate names, and good and malicious archives."""

import errno
import hashlib
import io
import os
import re
import shutil
import stat
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

import scan.sorting as sorting
from scan.settings import UsageError

NUM_CLUSTERS = 3
PHOTO_NAMES = [  # nested folders; IMG_0001.jpg 4 times (once in other case), beach.jpg twice, c.jpg twice as a_b_c.jpg
    "IMG_0001.jpg",
    "2023/IMG_0001.jpg",
    "2023/trip/IMG_0001.jpg",
    "2023/trip/img_0001.JPG",
    "2023/trip/beach.jpg",
    "2024/beach.jpg",
    "2024/IMG_0002.jpg",
    "2024/x/y/z/IMG_0003.jpg",
    "a_b/c.jpg",
    "a/b/c.jpg",
]


def jpeg_bytes(seed):
    """A small real JPEG whose bytes differ for every seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def digest(data):
    """The SHA-256 of `data` (bytes)."""
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def library(tmp_path):
    """A folder of photos under tmp_path/photos; returns their paths."""
    paths = []
    for seed, name in enumerate(PHOTO_NAMES):
        path = tmp_path / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(seed))
        paths.append(str(path))
    return paths


def snapshot(paths):
    """What must not change about the originals: their bytes, modification time and inode."""
    return {path: (open(path, "rb").read(), os.stat(path).st_mtime_ns, os.stat(path).st_ino) for path in paths}


def layout(target):
    """{(cluster folder, file name): content} of everything sorted under `target` (links followed)."""
    files = {}
    for folder in sorted(os.listdir(target)):
        if folder != sorting.MARKER_NAME:
            for name in os.listdir(os.path.join(target, folder)):
                with open(os.path.join(target, folder, name), "rb") as file:
                    files[(folder, name)] = file.read()
    return files


def check_every_photo_once(target, assignments, contents):
    """Checks that each assigned photo lies exactly once in its cluster's folder, with its content (`contents`:
    the bytes of each source), under a name unique there even where case is not told apart."""
    files = layout(target)
    assert len(files) == len(assignments)
    expected = sorted((f"cluster-{cluster:02d}", digest(contents[source])) for cluster, source in assignments)
    assert sorted((folder, digest(data)) for (folder, _), data in files.items()) == expected
    for folder in {folder for folder, _ in files}:
        names = [name.casefold() for name_folder, name in files if name_folder == folder]
        assert len(names) == len(set(names))
    return files


def test_photos_are_hard_linked_once_each_and_originals_stay(library, tmp_path):
    assignments = [(index % NUM_CLUSTERS, path) for index, path in enumerate(library)]
    before = snapshot(library)
    target = tmp_path / "sorted"
    result = sorting.sort_into_folders(str(target), assignments)
    files = check_every_photo_once(target, assignments, {path: before[path][0] for path in library})
    assert snapshot(library) == before  # same bytes, times and inodes: nothing moved, renamed or rewritten
    for cluster, path in assignments:
        linked = [name for (folder, name) in files if folder == f"cluster-{cluster:02d}"]
        assert any(os.path.samefile(target / f"cluster-{cluster:02d}" / name, path) for name in linked)
        assert os.stat(path).st_nlink == 2
    assert result == (len(library), NUM_CLUSTERS, {**dict.fromkeys(sorting.KINDS, 0), "hard_links": len(library)})
    line = sorting.describe_sorting(str(target), result)
    count = len(library)
    assert line == f"sorted {count} photos into {NUM_CLUSTERS} folders under {target} ({count} hard links)"
    shutil.rmtree(target)  # undone by deleting the folder
    assert snapshot(library) == before


def test_shared_names_get_their_folders_then_a_counter(library, tmp_path):
    target = tmp_path / "sorted"
    sorting.sort_into_folders(str(target), [(0, path) for path in library])
    names = os.listdir(target / "cluster-00")
    for path in library:
        (name,) = [name for name in names if os.path.samefile(target / "cluster-00" / name, path)]
        base = os.path.basename(path)
        if sum(os.path.basename(other).casefold() == base.casefold() for other in library) == 1:
            assert name == base
        else:  # its folders under photos/ joined by "_", and where that is taken too, "-2" before the extension
            joined = os.path.relpath(path, tmp_path / "photos").replace(os.sep, "_")
            assert re.sub(r"-\d+(\.\w+)$", r"\1", name).casefold() == joined.casefold()


def test_symbolic_links_when_hard_links_fail(library, tmp_path, monkeypatch):
    def cross_device_link(source, destination, **options):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(sorting.os, "link", cross_device_link)
    monkeypatch.chdir(tmp_path)  # photos named by relative paths still get absolute link targets
    library = [os.path.relpath(path, tmp_path) for path in library]
    before = snapshot(library)
    assignments = [(index % 2, path) for index, path in enumerate(library)]
    target = tmp_path / "sorted"
    result = sorting.sort_into_folders(str(target), assignments)
    check_every_photo_once(target, assignments, {path: before[path][0] for path in library})
    for folder, name in layout(target):
        link = target / folder / name
        assert link.is_symlink() and os.path.isabs(os.readlink(link))
        assert os.readlink(link) in {os.path.abspath(path) for path in library}
    assert result.kinds["symbolic_links"] == len(library) and snapshot(library) == before


def test_copies_are_independent(library, tmp_path):
    before = snapshot(library)
    assignments = [(0, path) for path in library]
    target = tmp_path / "sorted"
    result = sorting.sort_into_folders(str(target), assignments, copy=True)
    check_every_photo_once(target, assignments, {path: before[path][0] for path in library})
    for folder, name in layout(target):
        copy = target / folder / name
        assert not copy.is_symlink() and all(not os.path.samefile(copy, path) for path in library)
        copy.write_bytes(b"edited")
    assert result.kinds["copies"] == len(library) and snapshot(library) == before


def test_a_foreign_non_empty_target_is_refused_untouched(library, tmp_path):
    target = tmp_path / "documents"
    (target / "cluster-00").mkdir(parents=True)
    (target / "cluster-00" / "notes.txt").write_text("mine")
    (target / "thesis.pdf").write_bytes(b"%PDF")
    before = sorted(os.walk(target))
    with pytest.raises(UsageError, match="not an empty folder") as error:
        sorting.sort_into_folders(str(target), [(0, library[0])])
    assert "\n" not in str(error.value)
    assert sorted(os.walk(target)) == before and (target / "cluster-00" / "notes.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UsageError):
        sorting.sort_into_folders(str(tmp_path / "a-file"), [(0, library[0])])


def test_a_second_sorting_replaces_the_first(library, tmp_path):
    target = tmp_path / "sorted"
    sorting.sort_into_folders(str(target), [(index % NUM_CLUSTERS, path) for index, path in enumerate(library)])
    second = [(5, path) for path in library[:4]] + [(0, library[4])]
    before = snapshot(library)
    sorting.sort_into_folders(str(target), second)
    check_every_photo_once(target, second, {path: before[path][0] for path in library})
    assert sorted(os.listdir(target)) == sorted([sorting.MARKER_NAME, "cluster-00", "cluster-05"])
    assert snapshot(library) == before


def test_a_sorted_folder_with_foreign_files_is_refused(library, tmp_path):
    target = tmp_path / "sorted"
    sorting.sort_into_folders(str(target), [(0, path) for path in library])
    (target / "cluster-00" / "my-own-notes.txt").write_text("keep me")
    before = layout(target)
    with pytest.raises(UsageError, match="my-own-notes.txt"):
        sorting.sort_into_folders(str(target), [(1, library[0])])
    assert layout(target) == before


def test_missing_photos_and_photos_inside_the_target_are_refused(library, tmp_path):
    target = tmp_path / "sorted"
    with pytest.raises(UsageError, match="no longer exists"):
        sorting.sort_into_folders(str(target), [(0, library[0]), (1, str(tmp_path / "gone.jpg"))])
    assert not target.exists()
    with pytest.raises(UsageError, match="inside the target"):
        sorting.sort_into_folders(str(tmp_path / "photos"), [(0, library[0])])


MEMBERS = ["holiday/a/IMG_1.jpg", "holiday/b/IMG_1.jpg", "holiday/c.jpg"]


def make_zip(path, members):
    """Packs a zip of {member name: bytes} (names stored exactly as given)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2021, 6, 1, 12, 0, 0)), data)


def make_tar(path, members, links=()):
    """Packs a tar.gz of {member name: bytes}, plus links [(name, kind, target)] (names stored as given)."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_600_000_000
            archive.addfile(info, io.BytesIO(data))
        for name, kind, link_target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link_target
            archive.addfile(info)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_members_are_extracted_into_their_folders(kind, library, tmp_path):
    contents = {name: jpeg_bytes(100 + index) for index, name in enumerate(MEMBERS)}
    archive = str(tmp_path / f"holiday.{kind}")
    (make_zip if kind == "zip" else make_tar)(archive, contents)
    before = snapshot(library + [archive])
    assignments = [(0, (archive, MEMBERS[0])), (0, (archive, MEMBERS[1])), (1, (archive, MEMBERS[2])), (1, library[0])]
    target = tmp_path / "sorted"
    result = sorting.sort_into_folders(str(target), assignments)
    sources = {**{(archive, name): data for name, data in contents.items()}, library[0]: before[library[0]][0]}
    check_every_photo_once(target, assignments, sources)
    assert result.kinds["extracted"] == 3 and result.kinds["hard_links"] == 1
    assert snapshot(library + [archive]) == before
    if kind == "tar.gz":
        assert os.stat(target / "cluster-01" / "c.jpg").st_mtime == 1_600_000_000


def malicious_archive(kind, folder):
    """Packs one malicious archive of `kind` into `folder` (with a good member, fine.jpg); returns its path and the
    member that must be refused."""
    good = {"fine.jpg": jpeg_bytes(1)}
    if kind in ("zip-climb", "zip-absolute"):
        path, name = str(folder / "bad.zip"), "../evil.jpg" if kind == "zip-climb" else f"{folder}/abs.jpg"
        make_zip(path, {**good, name: b"payload"})
    elif kind == "zip-symlink":
        path, name = str(folder / "bad.zip"), "link.jpg"
        make_zip(path, good)
        with zipfile.ZipFile(path, "a") as archive:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    elif kind == "tar-climb":
        path, name = str(folder / "bad.tar.gz"), "photos/../../evil.jpg"
        make_tar(path, {**good, name: b"payload"})
    else:
        path, name = str(folder / "bad.tar.gz"), "link.jpg"
        link_type = tarfile.SYMTYPE if kind == "tar-symlink" else tarfile.LNKTYPE
        make_tar(path, good, links=[(name, link_type, "/etc/passwd")])
    return path, name


REFUSALS = {
    "zip-climb": "climbs out",
    "zip-absolute": "absolute",
    "zip-symlink": "symbolic link",
    "tar-climb": "climbs out",
    "tar-symlink": "is a link",
    "tar-hardlink": "is a link",
}


@pytest.mark.parametrize("kind", REFUSALS)
def test_malicious_archives_are_refused_before_anything_is_written(kind, library, tmp_path):
    (tmp_path / "archives").mkdir()
    archive, member = malicious_archive(kind, tmp_path / "archives")
    target = tmp_path / "archives" / "deep" / "sorted"
    assignments = [(0, library[0]), (0, (archive, "fine.jpg")), (1, (archive, member))]
    with pytest.raises(UsageError) as error:
        sorting.sort_into_folders(str(target), assignments)
    message = str(error.value)
    assert member in message and archive in message and REFUSALS[kind] in message and "\n" not in message
    assert not (tmp_path / "archives" / "deep").exists()
    assert sorted(os.listdir(tmp_path / "archives")) == [os.path.basename(archive)]
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "archives" / "abs.jpg").exists()


def test_a_sorting_that_fails_midway_leaves_the_earlier_layout_as_it_was(library, tmp_path, monkeypatch):
    target = tmp_path / "sorted"
    sorting.sort_into_folders(str(target), [(index % NUM_CLUSTERS, path) for index, path in enumerate(library)])
    before, entries = layout(target), sorted(os.walk(target))
    placed = []

    def disk_fills_up(source, destination, copy):
        if len(placed) == 3:  # three photos laid out, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), destination)
        shutil.copy(source, destination)
        placed.append(destination)
        return "copies"

    monkeypatch.setattr(sorting, "place_photo", disk_fills_up)
    with pytest.raises(UsageError) as error:
        sorting.sort_into_folders(str(target), [(1, path) for path in library])
    assert str(error.value) == (
        f"sorting into {target} stopped (No space left on device); nothing of it was written, {target} is as it was"
    )
    assert all(not os.path.exists(path) for path in placed)  # built beside the target, then removed
    assert layout(target) == before and sorted(os.walk(target)) == entries
    assert sorted(os.listdir(tmp_path)) == ["photos", "sorted"]


def test_a_sorting_into_a_new_folder_that_fails_leaves_nothing(library, tmp_path, monkeypatch):
    def disk_full(source, destination, copy):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), destination)

    monkeypatch.setattr(sorting, "place_photo", disk_full)
    with pytest.raises(UsageError, match=r"stopped \(No space left on device\)"):
        sorting.sort_into_folders(str(tmp_path / "new" / "sorted"), [(0, path) for path in library])
    assert os.listdir(tmp_path / "new") == [] and sorted(os.listdir(tmp_path)) == ["new", "photos"]


def test_a_name_longer_than_a_file_system_takes_is_refused_before_anything_is_written(tmp_path):
    long_name = "é" * 150 + ".jpg"  # 154 characters, 304 bytes in UTF-8
    archive = str(tmp_path / "photos.zip")
    make_zip(archive, {"photos/short.jpg": jpeg_bytes(1), f"photos/{long_name}": jpeg_bytes(2)})
    target = tmp_path / "sorted"
    with pytest.raises(UsageError, match="has a file name of 304 bytes, more than the 255 a file system takes"):
        sorting.sort_into_folders(
            str(target), [(0, (archive, "photos/short.jpg")), (1, (archive, f"photos/{long_name}"))]
        )
    assert os.listdir(tmp_path) == ["photos.zip"]
    with pytest.raises(UsageError, match="the folder name s+... is 300 bytes, more than the 255"):
        sorting.sort_into_folders(str(tmp_path / ("s" * 300) / "sorted"), [(0, (archive, "photos/short.jpg"))])
    assert os.listdir(tmp_path) == ["photos.zip"]


def test_numbered_names_are_cut_to_fit_the_file_system(tmp_path):
    # Two 255-byte names that differ only in case, in folders whose names cannot be joined to them within 255 bytes.
    stems = ["A" * 251, "a" * 251]
    sources = [str(tmp_path / "one" / f"{stems[0]}.jpg"), str(tmp_path / "two" / f"{stems[1]}.jpg")]
    first, second = sorting.unique_names(sources, str(tmp_path))
    assert first == f"{stems[0]}.jpg" and second == "a" * 249 + "-2.jpg"
    for path, name in zip(sources, (first, second), strict=True):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").write(jpeg_bytes(len(name)))
    target = tmp_path / "sorted"
    sorting.sort_into_folders(str(target), [(0, path) for path in sources])
    assert sorted(os.listdir(target / "cluster-00")) == sorted([first, second])


def test_a_target_inside_the_data_it_sorts_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos.zip").write_bytes(b"")
    inputs = {"data": str(tmp_path / "photos"), "eval_data": "", "assign_data": str(tmp_path / "photos.zip")}
    for target, setting in [("photos/sorted", "data"), ("photos", "data"), ("photos.zip/sorted", "assign_data")]:
        with pytest.raises(UsageError) as error:
            sorting.check_target_outside(str(tmp_path / target), inputs)
        assert str(error.value) == (
            f"--sort_into={tmp_path / target} lies inside --{setting}={inputs[setting]}: the next run would read the "
            "sorted photos as new ones; choose a folder outside it"
        )
    sorting.check_target_outside(str(tmp_path / "sorted"), inputs)  # beside the photos: accepted
    (tmp_path / "cifar10").mkdir()  # a folder named as CIFAR-10's download is not what --data=cifar10 reads
    sorting.check_target_outside(str(tmp_path / "cifar10" / "sorted"), {"data": "cifar10"})
