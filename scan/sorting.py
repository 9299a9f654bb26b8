"""Sorts the photos of a run into one folder per cluster (target/cluster-00/, ...), never moving or changing one.

Each folder holds a link to each of its photos: a hard link where the target is on the photo's disk, else a
symbolic link (to the photo's absolute path), a copy only when asked. Photos inside a .zip/.tar(.gz) archive have no
file to link to, so they are extracted. The target folder gets a marker file listing what was made, so a later
sorting replaces the layout (and only it), and deleting the target folder undoes everything.

Nothing is written in place: the layout is built in a hidden folder beside the target (`.scan-sorting-PID`, on the
same disk, so hard links behave the same), then renamed into place; a sorting that fails (a full disk) removes it
and leaves the target as it was (a killed one leaves that folder, which can be deleted). Every name is checked (at most NAME_MAX bytes), and the target must lie outside the
data it sorts, before anything is written.
"""

import collections
import errno
import json
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
from typing import NamedTuple

from scan.data import ARCHIVE_EXTENSIONS, CIFAR10_SPLITS, CORRUPT_ARCHIVE_ERRORS, archive_error
from scan.settings import UsageError

MARKER_NAME = ".scan-sorted"
MARKER_MAKER = "scan sort_into_folders"
FOLDER_PATTERN = re.compile(r"cluster-\d+")
LINK_FALLBACK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
NAME_MAX = 255  # bytes of a file or folder name on common file systems
BUILDING_PREFIX = ".scan-sorting-"  # the hidden folder beside the target where a layout is built, then renamed
KINDS = {  # the ways a photo is laid out: (singular, plural) for the summary line
    "hard_links": ("hard link", "hard links"),
    "symbolic_links": ("symbolic link", "symbolic links"),
    "copies": ("copy", "copies"),
    "extracted": ("extracted from an archive", "extracted from archives"),
}


class Placement(NamedTuple):
    """Where one photo goes: its cluster folder's name, its file name there, and its source (a path or
    (archive path, member name))."""

    folder: str
    name: str
    source: object


class SortedLayout(NamedTuple):
    """What `sort_into_folders` made: the number of photos and folders, and the photos of each of KINDS."""

    photos: int
    folders: int
    kinds: dict


def is_member(source):
    """Whether a source is (archive path, member name) rather than a file path."""
    return isinstance(source, tuple)


def unsafe_name_reason(name):
    """Why an archive member's name cannot be extracted (absolute, climbs out with '..', a folder), or None."""
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "has an absolute name"
    if ".." in parts:
        return "climbs out of the archive with '..'"
    if parts[-1] in ("", "."):
        return "is a folder"
    return None


def refuse_member(archive, name, reason):
    """The UsageError that refuses member `name` of `archive` for `reason`."""
    return UsageError(f"{archive}: member '{name}' {reason}; refusing to extract it (nothing was written)")


def check_zip_members(archive_path, names):
    """Raises UsageError unless every member `names` of the zip is a regular file (no folder, no symbolic link)."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            for name in names:
                try:
                    info = archive.getinfo(name)
                except KeyError:
                    raise refuse_member(archive_path, name, "is not in the archive (was it changed?)") from None
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise refuse_member(archive_path, name, "is a symbolic link")
                if info.is_dir():
                    raise refuse_member(archive_path, name, "is a folder")
    except (*CORRUPT_ARCHIVE_ERRORS, OSError) as error:
        raise archive_error(archive_path, error) from None
    return {}


def check_tar_members(archive_path, names):
    """Raises UsageError unless every member `names` of the tar (its last of that name, './' aside, as the loader
    reads it) is a regular file, not a link; returns {name: header offset of that member}."""
    chosen = {}
    try:
        with tarfile.open(archive_path) as archive:
            for member in archive:
                if member.name.removeprefix("./") in names:
                    chosen[member.name.removeprefix("./")] = member
    except (*CORRUPT_ARCHIVE_ERRORS, OSError) as error:
        raise archive_error(archive_path, error) from None
    for name in names:
        member = chosen.get(name)
        if member is None:
            raise refuse_member(archive_path, name, "is not in the archive (was it changed?)")
        if member.issym() or member.islnk():
            raise refuse_member(archive_path, name, f"is a link (to {member.linkname!r})")
        if not member.isfile():
            raise refuse_member(archive_path, name, "is not a regular file")
    return {name: member.offset for name, member in chosen.items()}


def check_archives(members):
    """Checks the members of each archive ({archive path: set of member names}) before anything is written;
    returns {archive path: what its check returned (tar header offsets)}."""
    checked = {}
    for archive_path, names in members.items():
        for name in sorted(names):
            reason = unsafe_name_reason(name)
            if reason:
                raise refuse_member(archive_path, name, reason)
        check = check_zip_members if archive_path.lower().endswith(".zip") else check_tar_members
        checked[archive_path] = check(archive_path, names)
    return checked


def inside(path, folder):
    """Whether `path` is `folder` or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_target_outside(target, inputs):
    """Raises UsageError when `target` lies inside a folder or archive that the run reads (`inputs`: {setting: its
    value}, CIFAR-10's names aside): the next run would read the sorted photos as new ones."""
    for setting, path in inputs.items():
        if path and path not in CIFAR10_SPLITS and os.path.exists(path) and inside(target, path):
            raise UsageError(
                f"--sort_into={target} lies inside --{setting}={path}: the next run would read the sorted photos as "
                "new ones; choose a folder outside it"
            )


def name_bytes(name):
    """The length of a file or folder name in bytes, as the file system stores it."""
    return len(os.fsencode(name))


def check_name_lengths(target, sources):
    """Raises UsageError for a folder name of `target`, or a file name of one of the photos `sources`, longer than
    NAME_MAX bytes: it could not be written (unique_names keeps the names it makes within NAME_MAX)."""
    for part in os.path.abspath(target).split(os.sep):
        if name_bytes(part) > NAME_MAX:
            raise UsageError(
                f"--sort_into={target}: the folder name {part[:40]}... is {name_bytes(part)} bytes, more than the "
                f"{NAME_MAX} a file system takes; choose a shorter one"
            )
    for source in sources:
        name = re.split(r"[/\\]", source[1])[-1] if is_member(source) else os.path.basename(source)
        if name_bytes(name) > NAME_MAX:
            where = f"{source[0]}: member {source[1][:60]!r}..." if is_member(source) else f"{source[:60]}..."
            raise UsageError(
                f"{where} has a file name of {name_bytes(name)} bytes, more than the {NAME_MAX} a file system takes; "
                "rename it to sort it (nothing was sorted)"
            )


def check_sources(target, sources):
    """Raises UsageError for a photo that no longer exists, or a photo or archive inside the target (which sorting
    would replace)."""
    for source in sources:
        path = source[0] if is_member(source) else source
        if not os.path.isfile(path):
            raise UsageError(f"{path} no longer exists (moved or deleted since it was clustered); nothing was sorted")
        if inside(path, target):
            raise UsageError(f"{path} lies inside the target folder {target}; choose a target outside the photos")


def archive_stem(path):
    """An archive's file name without its archive extension."""
    name = os.path.basename(path)
    for extension in ARCHIVE_EXTENSIONS:
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return name


def source_parts(source, root):
    """The parts that name a photo: its folders under `root` and its file name, or for an archive member the
    archive's name (without extension), the member's folders and its file name."""
    if is_member(source):
        return [archive_stem(source[0]), *re.split(r"[/\\]", source[1])]
    return os.path.relpath(os.path.abspath(source), root).split(os.sep)


def unique_names(sources, root):
    """A file name for each of one folder's photos, unique even where case is not told apart: the photo's own name;
    for names that several share, its folders joined by '_' before it; then a counter, where still taken."""
    parts = [source_parts(source, root) for source in sources]
    shared = collections.Counter(part[-1].casefold() for part in parts)
    names = []
    for part in parts:
        long_name = "_".join(part)
        fits = name_bytes(long_name) <= NAME_MAX
        names.append(part[-1] if shared[part[-1].casefold()] == 1 or not fits else long_name)
    taken, unique = set(), []
    for name in names:
        candidate, number = name, 1
        while candidate.casefold() in taken:
            number += 1
            candidate = numbered_name(name, number)
        taken.add(candidate.casefold())
        unique.append(candidate)
    return unique


def numbered_name(name, number):
    """`name` with `-number` before its extension, its stem cut short where the name would pass NAME_MAX bytes."""
    stem, extension = os.path.splitext(name)
    while stem and name_bytes(f"{stem}-{number}{extension}") > NAME_MAX:
        stem = stem[:-1]
    return f"{stem}-{number}{extension}"


def plan_layout(assignments):
    """The Placement of every photo of `assignments` [(cluster, source)], in their order."""
    files = [os.path.dirname(os.path.abspath(source)) for _, source in assignments if not is_member(source)]
    root = os.path.commonpath(files) if files else None
    by_folder = collections.defaultdict(list)
    for index, (cluster, _) in enumerate(assignments):
        by_folder[f"cluster-{int(cluster):02d}"].append(index)
    placements = [None] * len(assignments)
    for folder, indices in by_folder.items():
        names = unique_names([assignments[index][1] for index in indices], root)
        for index, name in zip(indices, names, strict=True):
            placements[index] = Placement(folder, name, assignments[index][1])
    return placements


def read_marker(target):
    """The (folders, files) an earlier sorting made in `target`, as its marker lists them ('/'-separated)."""
    try:
        with open(os.path.join(target, MARKER_NAME), encoding="utf-8") as file:
            marker = json.load(file)
        folders, files = set(marker["folders"]), set(marker["files"])
    except (OSError, ValueError, KeyError, TypeError):
        marker, folders, files = None, set(), set()
    well_formed = all(FOLDER_PATTERN.fullmatch(folder) for folder in folders) and all(
        path.count("/") == 1 and path.partition("/")[0] in folders and path.partition("/")[2] not in ("", ".", "..")
        for path in files
    )
    if not isinstance(marker, dict) or marker.get("made_by") != MARKER_MAKER or not well_formed:
        raise UsageError(f"{target}: its {MARKER_NAME} file cannot be read; delete the folder, or choose another one")
    return folders, files


def relative_entries(target):
    """Every folder and file (links included) under `target`, as '/'-separated paths relative to it."""
    entries = []
    for root, folders, files in os.walk(target):
        for name in folders + files:
            entries.append(os.path.relpath(os.path.join(root, name), target).replace(os.sep, "/"))
    return entries


def check_target(target):
    """What an earlier sorting made in `target` that a new one replaces ((folders, files), '/'-separated): nothing
    when it is missing or an empty folder; UsageError for any other file or folder."""
    if not os.path.lexists(target):
        return set(), set()
    entries = os.listdir(target) if os.path.isdir(target) else None
    if entries == []:
        return set(), set()
    if entries is None or MARKER_NAME not in entries:
        raise UsageError(
            f"--sort_into={target} exists and is not an empty folder (nor one an earlier sorting made); "
            "choose a new or empty folder"
        )
    folders, files = read_marker(target)
    foreign = [path for path in relative_entries(target) if path not in folders | files | {MARKER_NAME}]
    if foreign:
        raise UsageError(
            f"--sort_into={target} holds {len(foreign)} files or folders the earlier sorting did not make "
            f"({foreign[0]}); move them out or choose another folder"
        )
    return folders, files


def remove_layout(folder):
    """Deletes an earlier sorting's layout, `folder`: only what its marker lists, then the marker and the folder."""
    folders, files = check_target(folder)
    for path in sorted(files):
        if os.path.lexists(os.path.join(folder, path)):
            os.remove(os.path.join(folder, path))
    for name in sorted(folders):
        if os.path.isdir(os.path.join(folder, name)):
            os.rmdir(os.path.join(folder, name))
    os.remove(os.path.join(folder, MARKER_NAME))
    os.rmdir(folder)


def write_marker(target, placements):
    """Writes the marker that lists the folders and files of the layout (before any is made), atomically."""
    marker = {
        "made_by": MARKER_MAKER,
        "folders": sorted({placement.folder for placement in placements}),
        "files": sorted(f"{placement.folder}/{placement.name}" for placement in placements),
    }
    temporary = os.path.join(target, f".tmp-{os.getpid()}-{MARKER_NAME}")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(marker, file, indent=1)
    os.replace(temporary, os.path.join(target, MARKER_NAME))


def place_photo(source, destination, copy):
    """Lays out photo file `source` at `destination`: a copy if `copy`, else a hard link, else (where the disk
    refuses hard links) a symbolic link to its absolute path; returns the kind (a key of KINDS)."""
    if copy:
        shutil.copy2(source, destination)
        return "copies"
    try:
        os.link(source, destination)
        return "hard_links"
    except OSError as error:
        if error.errno not in LINK_FALLBACK_ERRNOS:
            raise
    try:
        os.symlink(os.path.abspath(source), destination)
        return "symbolic_links"
    except OSError as error:
        if error.errno not in LINK_FALLBACK_ERRNOS:
            raise
        raise UsageError(
            f"{os.path.dirname(destination)}: this disk takes neither hard nor symbolic links ({error.strerror}); "
            "sort into copies instead"
        ) from None


def write_member(stream, destinations, modified):
    """Writes an archive member's `stream` to the first of `destinations` (never over a file), copies it to the
    others, and gives them the member's modification time (seconds since the epoch)."""
    with open(destinations[0], "xb") as file:
        shutil.copyfileobj(stream, file)
    for destination in destinations[1:]:
        shutil.copyfile(destinations[0], destination)
    for destination in destinations:
        os.utime(destination, (modified, modified))


def extract_members(archive_path, destinations, offsets):
    """Extracts members of an archive ({member name: [destination paths]}); `offsets` are a tar's header offsets
    of the members (the last of each name) from `check_tar_members`."""
    try:
        if archive_path.lower().endswith(".zip"):
            with zipfile.ZipFile(archive_path) as archive:
                for name, paths in destinations.items():
                    info = archive.getinfo(name)
                    with archive.open(info) as stream:
                        write_member(stream, paths, time.mktime((*info.date_time, 0, 0, -1)))
            return
        with tarfile.open(archive_path) as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if name in destinations and member.offset == offsets[name]:
                    write_member(archive.extractfile(member), destinations[name], member.mtime)
    except CORRUPT_ARCHIVE_ERRORS as error:  # a write error (a full disk) stays what it is
        raise archive_error(archive_path, error) from None


def check_sortable(target, sources):
    """Checks, before anything is written, that the photos `sources` (paths, or (archive path, member name)) can be
    laid out in `target`; returns what check_archives returned."""
    check_sources(target, sources)
    members = collections.defaultdict(set)
    for source in sources:
        if is_member(source):
            members[source[0]].add(source[1])
    offsets = check_archives(members)
    check_target(target)
    check_name_lengths(target, sources)
    return offsets


def build_layout(folder, placements, offsets, copy):
    """Lays the photos of `placements` out in the empty folder `folder`, the marker first; `offsets` are what
    check_archives returned. Returns how many photos were laid out each way ({kind of KINDS: count})."""
    write_marker(folder, placements)
    kinds = dict.fromkeys(KINDS, 0)
    extracted = collections.defaultdict(lambda: collections.defaultdict(list))
    for placement in placements:
        os.makedirs(os.path.join(folder, placement.folder), exist_ok=True)
        destination = os.path.join(folder, placement.folder, placement.name)
        if is_member(placement.source):
            extracted[placement.source[0]][placement.source[1]].append(destination)
            kinds["extracted"] += 1
        else:
            kinds[place_photo(placement.source, destination, copy)] += 1
    for archive_path, destinations in extracted.items():
        extract_members(archive_path, destinations, offsets[archive_path])
    return kinds


def put_in_place(building, target):
    """Renames the layout built in `building` to `target`: over an empty (or missing) target folder, or, where an
    earlier sorting's layout is, after renaming that aside; the earlier layout is then deleted."""
    if os.path.isdir(target) and os.listdir(target):
        earlier = f"{building}-earlier"
        os.rename(target, earlier)
        os.rename(building, target)
        remove_layout(earlier)
        return
    if os.path.isdir(target):
        os.rmdir(target)
    os.rename(building, target)


def sort_into_folders(target, assignments, copy=False):
    """Lays out the photos of `assignments` [(cluster number, source)], a source being a photo's path or
    (archive path, member name), in one folder per cluster under `target` (see the module's docstring). Everything
    is checked (the photos, the archives' members, the names, the target) before anything is written; the layout is
    built beside the target and renamed into place. Returns a SortedLayout."""
    offsets = check_sortable(target, [source for _, source in assignments])
    placements = plan_layout(assignments)
    parent = os.path.dirname(os.path.abspath(target))
    building = os.path.join(parent, f"{BUILDING_PREFIX}{os.getpid()}")
    os.makedirs(parent, exist_ok=True)
    os.mkdir(building)
    try:
        kinds = build_layout(building, placements, offsets, copy)
    except BaseException as error:
        shutil.rmtree(building)
        if isinstance(error, OSError):
            raise UsageError(
                f"sorting into {target} stopped ({error.strerror or error}); nothing of it was written, {target} is "
                "as it was"
            ) from None
        raise
    put_in_place(building, target)
    return SortedLayout(len(placements), len({placement.folder for placement in placements}), kinds)


def describe_sorting(target, layout):
    """One line that tells what `sort_into_folders` made, e.g. 'sorted 120 photos into 10 folders under sorted
    (118 hard links, 2 extracted from archives)'."""
    kinds = [f"{count} {KINDS[kind][count != 1]}" for kind, count in layout.kinds.items() if count]
    photos = f"{layout.photos} photo{'s' if layout.photos != 1 else ''}"
    folders = f"{layout.folders} folder{'s' if layout.folders != 1 else ''}"
    return f"sorted {photos} into {folders} under {target}" + (f" ({', '.join(kinds)})" if kinds else "")


def dataset_sources(dataset):
    """Each image of a Dataset as sorting takes it: its file's path, or (archive path, member name); UsageError for
    images that are no files (CIFAR-10's arrays)."""
    if dataset.root is None:
        raise UsageError(
            f"--sort_into: {dataset.source} holds arrays, not files; sort images of a folder or an archive"
        )
    if os.path.isdir(dataset.root):
        return [os.path.join(dataset.root, name) for name in dataset.names]
    return [(dataset.root, name) for name in dataset.names]


def check_sortable_datasets(target, datasets):
    """check_sortable for every image of `datasets` (Datasets, or None for a split there is not)."""
    check_sortable(
        target, [source for dataset in datasets if dataset is not None for source in dataset_sources(dataset)]
    )


def sort_images(target, assigned, copy=False):
    """Sorts every image of `assigned` [(Dataset, cluster probabilities)] into `target` by its most probable cluster;
    returns the line that says what was made."""
    assignments = [
        (int(cluster), source)
        for dataset, probabilities in assigned
        for cluster, source in zip(probabilities.argmax(axis=-1), dataset_sources(dataset), strict=True)
    ]
    return describe_sorting(target, sort_into_folders(target, assignments, copy))
