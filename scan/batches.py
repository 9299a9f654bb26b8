"""How rows reach the training and prediction steps.

Every training step sees a full batch: after each epoch's shuffle, the `num_rows % batch_size` rows left over wait
for a later epoch (each epoch leaves out others). A step of one shape compiles once, where a smaller last batch
would compile a second step function; predictions pad their last batch for the same reason. The rows (images, or
cached features) stay on the accelerator when they fit (DATA_ON_DEVICE): a batch is then a vector of row indices,
and the `DeviceRows` layer at the front of each learner gathers its rows on the device, so no step copies images
from the host.
"""

import functools
import sys

import keras
import numpy as np
from keras import layers, ops

from scan.backend import ReplicatedOutputs, device_memory_bytes, process_share, resolve_data_on_device, this_process


class DeviceRows(layers.Layer):
    """Holds `rows` [num_rows, ...] on the device as a non-trainable variable; maps indices [...] to rows [..., ...].

    The rows are data, not weights: checkpoints neither save nor load them.
    """

    def __init__(self, rows, **kwargs):
        super().__init__(**kwargs)
        self.rows = self.add_weight(
            shape=rows.shape, dtype=rows.dtype, initializer="zeros", trainable=False, autocast=False, name="rows"
        )
        self.rows.assign(rows)

    def call(self, indices):
        return ops.take(self.rows, ops.cast(indices, "int32"), axis=0)

    def save_own_variables(self, store):
        pass

    def load_own_variables(self, store):
        pass


def hold_on_device(rows, setting):
    """A DeviceRows layer holding `rows` where DATA_ON_DEVICE (`setting`) keeps them on the device, else None."""
    if resolve_data_on_device(setting, rows.nbytes, keras.backend.backend(), device_memory_bytes()):
        return DeviceRows(rows, name="device_rows")
    return None


class RowBatches(keras.utils.PyDataset):
    """Shuffled full batches of `batch_size` rows (all rows in one batch when there are fewer).

    A batch is the rows' indices, or with `rows` (rows fed from the host) the rows themselves. With
    `neighbour_indices` [num_rows, K] each anchor comes with its neighbours, all of them (the tutorial) or with
    `sample_one_neighbour` one drawn at random (SCAN), as the inputs "anchors" and "neighbours" of the clustering
    learner, and targets that its losses ignore. With several processes (`process`: this one's index and their
    count, JAX's by default), each yields only its own part of every batch.
    """

    def __init__(
        self,
        num_rows,
        batch_size,
        seed,
        rows=None,
        neighbour_indices=None,
        sample_one_neighbour=False,
        process=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.process = process or this_process()  # (index, count) among the processes that train together
        self.num_rows = num_rows
        self.batch_size = min(batch_size, num_rows)
        self.rows = rows
        self.neighbour_indices = neighbour_indices
        self.sample_one_neighbour = sample_one_neighbour
        self.seed, self.epoch = seed, 0
        self.order = self.shuffled_rows()

    def __len__(self):
        return self.num_rows // self.batch_size

    def __getitem__(self, index):
        """Batch `index`: the global batch, or with several processes (`process`) this one's part of it."""
        if self.process[1] == 1:
            return self.global_batch(index)
        return keras.tree.map_structure(lambda rows: process_share(rows, self.process), self.global_batch(index))

    def global_batch(self, index):
        anchors = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        take = (lambda indices: indices) if self.rows is None else (lambda indices: self.rows[indices])  # noqa: E731
        if self.neighbour_indices is None:
            return take(anchors)
        neighbours = self.neighbour_indices[anchors].astype("int32")  # [batch_size, k_neighbours]
        if self.sample_one_neighbour:
            # Drawn from the epoch and the batch alone, so a batch read twice (Keras peeks at the first) is the same.
            rng = np.random.default_rng([self.seed, self.epoch, index + 1])
            neighbours = np.take_along_axis(neighbours, rng.integers(neighbours.shape[1], size=(len(anchors), 1)), 1)
        # The losses ignore their targets, as in the tutorial.
        targets = np.ones(len(anchors), dtype="float32")
        return {"anchors": take(anchors), "neighbours": take(neighbours)}, (targets, targets)

    def shuffled_rows(self):
        """This epoch's order of the rows, drawn from the seed and the epoch alone."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows).astype("int32")

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self.shuffled_rows()


def predict_in_full_batches(model, inputs, batch_size, verbose=0):
    """`model.predict` with the last batch padded to `batch_size` (and its padding cut from the outputs), so that one
    compiled prediction step serves every call of the model. Several processes each feed their part of every batch
    and each receive every output."""
    padding = -len(inputs) % batch_size
    padded = np.concatenate([inputs, np.zeros((padding, *inputs.shape[1:]), inputs.dtype)]) if padding else inputs
    index, count = this_process()
    if count > 1:
        batches = padded.reshape(-1, batch_size, *inputs.shape[1:])
        padded = np.concatenate([process_share(batch, (index, count)) for batch in batches])
        batch_size //= count
        model = with_replicated_outputs(model, inputs.shape[1:])
    return model.predict(padded, batch_size=batch_size, verbose=verbose)[: len(inputs)]


@functools.cache  # One wrapper per model and input shape, so that its prediction step compiles once, as in one process.
def with_replicated_outputs(model, input_shape):
    """`model` with its outputs copied to every device (ReplicatedOutputs), for several processes to read."""
    model_inputs = keras.Input(input_shape)
    return keras.Model(model_inputs, ReplicatedOutputs()(model(model_inputs)))


def fit_verbosity():
    """A live progress bar on a terminal, one line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2
