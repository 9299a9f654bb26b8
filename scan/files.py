"""Writing files safely: every file is written under a temporary name and renamed, so an interrupted run never leaves
a truncated file that a later run would trust; a full disk is one `DiskFullError` line, found before writing
where the size is known.
"""

import errno
import json
import math
import os
import shutil

import numpy as np

from scan.names import display_name
from scan.settings import UsageError


class DiskFullError(UsageError):
    """A write ran out of disk space (or quota); `main` prints it as one line and exits with 2."""

    def __init__(self, path, needed_bytes):
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        super().__init__(
            f"no space left on device writing {path} ({megabytes(needed_bytes)} needed, {megabytes(free)} free); "
            "free space or set --output_dir to another disk, then run the same command again"
        )


def megabytes(num_bytes):
    return f"{num_bytes / 1e6:.2f} MB"


def write_atomically(path, write, needed_bytes=0):
    """Calls `write(temporary_path)` on a sibling of `path` with the same extension, then renames it to `path`.

    Raises DiskFullError, with the temporary file removed and `path` as it was, when the disk is full: before
    writing if fewer than `needed_bytes` (an estimate) are free, or when the write fails for want of space.
    """
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
    if shutil.disk_usage(folder or ".").free < needed_bytes:
        raise DiskFullError(path, needed_bytes)
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        written = os.path.getsize(temporary) if os.path.exists(temporary) else 0
        raise DiskFullError(path, max(needed_bytes, written)) from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_bytes_atomically(path, data):
    """Writes `data` (bytes) to `path` atomically; its size is known, so a full disk is found before writing."""

    def write(temporary):
        with open(temporary, "wb") as file:
            file.write(data)

    write_atomically(path, write, needed_bytes=len(data))


def save_json(data, path):
    write_bytes_atomically(path, json.dumps(data, indent=2).encode())


def read_json(path):
    with open(path) as file:
        return json.load(file)


def save_array(array, path):
    write_atomically(path, lambda temporary: np.save(temporary, array), needed_bytes=array.nbytes + 128)


def weights_bytes(model):
    """The bytes of `model`'s weights and optimizer state, as a `.weights.h5` file stores them (plus its headers)."""
    variables = list(model.weights) + (list(model.optimizer.variables) if getattr(model, "optimizer", None) else [])
    data = sum(math.prod(variable.shape) * np.dtype(variable.dtype).itemsize for variable in variables)
    return data + 2048 * len(variables) + 2**16


def save_weights(model, path):
    # Checked before h5py starts: a weights file that runs out of space mid-write stays open inside HDF5, which
    # then crashes (segmentation fault) when the interpreter exits.
    write_atomically(path, model.save_weights, needed_bytes=weights_bytes(model))


def warn_if_short_of_space(folder, needed_bytes, title):
    """Prints one warning line when fewer than `needed_bytes` are free in `folder` (or its nearest existing parent);
    returns whether it did."""
    while not os.path.isdir(folder):
        folder = os.path.dirname(os.path.abspath(folder))
    free = shutil.disk_usage(folder).free
    if free >= needed_bytes:
        return False
    print(
        f"warning: {title} will write about {megabytes(needed_bytes)} to {display_name(folder)}, but only {megabytes(free)} are "
        "free; free space or set --output_dir to another disk"
    )
    return True
