"""Training machinery: the optimizers, one resumable `fit` for every stage, checkpoints, SIGTERM and keeping the best
clustering epoch.

Weight decay. The tutorial trains with tensorflow-addons' AdamW, which shrinks every weight by `weight_decay`
(1e-4) at each step. Keras's AdamW (like PyTorch's) multiplies its `weight_decay` by the learning rate first:
given 1e-4 at a rate of 1e-3, it would shrink them by 1e-7, in effect not at all. So `WEIGHT_DECAY` keeps the
tutorial's meaning: Keras is given WEIGHT_DECAY / the initial learning rate. SCAN's optimizers (SGD for SimCLR,
Adam for clustering and self-labeling) are PyTorch's, whose `weight_decay` is an L2 term added to the gradient
before the momentum: there WEIGHT_DECAY is that L2 coefficient, exactly as in SCAN's configuration.

Resuming. At the end of an epoch, once `CHECKPOINT_SECONDS` have passed since the stage started or since the last
save, the weights, the optimizer state and the loss history are saved to the stage's backup folder, so a killed
run continues from its last saved epoch. `keras.callbacks.BackupAndRestore` is not used: it saves every epoch (or
every N batches) and writes its files in place, where this checkpoint saves by time, atomically (a kill mid-write
leaves the last one), with the loss history of every epoch, and on SIGTERM. `TerminateOnNaN` stops a diverging
stage, which then fails with advice.

SIGTERM (a preempted cloud machine, `docker stop`, a batch scheduler's time limit) is handled like Ctrl-C, but
training first finishes the epoch it is in and saves it, whatever `CHECKPOINT_SECONDS` says: the epoch-based
resume cannot continue from the middle of an epoch. Outside training, the run stops at once, as it does on a
second SIGTERM.
"""

import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager

import keras
import numpy as np
from keras import ops

from scan.backend import synchronize_batch_normalization
from scan.batches import fit_verbosity, predict_in_full_batches
from scan.files import DiskFullError, read_json, save_json, save_weights
from scan.losses import scan_head_losses
from scan.names import display_name
from scan.settings import UsageError


class CoupledL2:
    """An optimizer whose weight decay adds `l2` times each weight to its gradient before the optimizer's own step, as
    PyTorch's `weight_decay` does in SCAN's SGD and Adam (Keras's own `weight_decay` is decoupled)."""

    def __init__(self, l2, **kwargs):
        super().__init__(**kwargs)
        self.l2 = l2

    def update_step(self, gradient, variable, learning_rate):
        gradient = ops.cast(gradient, variable.dtype)
        super().update_step(gradient + ops.cast(self.l2, variable.dtype) * variable, variable, learning_rate)


class CoupledL2SGD(CoupledL2, keras.optimizers.SGD):
    """SGD with momentum and L2 weight decay, as `torch.optim.SGD(weight_decay=l2)`. The momentum is Keras's
    (velocity = momentum x velocity - rate x gradient), the same step as PyTorch's at a constant rate."""


class CoupledL2Adam(CoupledL2, keras.optimizers.Adam):
    """Adam with L2 weight decay, as `torch.optim.Adam(weight_decay=l2)`."""


def create_optimizer(name, learning_rate, weight_decay, initial_learning_rate):
    """The optimizer "adamw", "sgd" (momentum 0.9, SCAN's SimCLR) or "adam" (SCAN's clustering and self-labeling)
    at `learning_rate` (a rate or a schedule that starts from, or warms up to, `initial_learning_rate`), with
    `weight_decay` meaning what this module's first lines say."""
    if name == "sgd":
        return CoupledL2SGD(weight_decay, learning_rate=learning_rate, momentum=0.9)
    if name == "adam":  # PyTorch's epsilon, as in SCAN's code
        return CoupledL2Adam(weight_decay, learning_rate=learning_rate, epsilon=1e-8)
    return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay / initial_learning_rate)


def learning_rate_schedule(learning_rate, total_steps, decay_steps, decay_alpha, warmup_steps):
    """The tutorial's cosine decay of `learning_rate` over `decay_steps` (0: the `total_steps` after the warm-up)
    down to `decay_alpha` times it, after a linear rise from 0 over `warmup_steps` (none when 0)."""
    if not warmup_steps:
        return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps or total_steps, alpha=decay_alpha)
    return keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps or total_steps - warmup_steps,
        alpha=decay_alpha,
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )


class Terminated(BaseException):
    """Raised on SIGTERM (a BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it)."""


class TerminationRequest:
    """SIGTERM's handler: during training (`while_training`) it asks the current epoch to save and stop; otherwise
    it raises Terminated at once."""

    def __init__(self):
        self.requested = False
        self.training = False

    def install(self):
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.training and not self.requested:
            self.requested = True
            print("\nSIGTERM: saving at the end of this epoch, then stopping", file=sys.stderr, flush=True)
            return
        raise Terminated("terminated (SIGTERM): run the same command again to resume from the last completed epoch")

    @contextmanager
    def while_training(self):
        """Within the block, SIGTERM saves the current epoch; Terminated is raised at its end if it was asked to."""
        self.training = True
        try:
            yield
        finally:
            self.training = False
        if self.requested:
            raise Terminated("terminated (SIGTERM) after saving this epoch: run the same command again to resume")


TERMINATION = TerminationRequest()  # The process's one SIGTERM handler, installed by the `__main__` block.


class EpochCheckpoint(keras.callbacks.Callback):
    """Records the history of every epoch; saves the model (optimizer included) and the history at the end of an
    epoch whose losses are finite once `every_seconds` have passed since the last save (0: every epoch), or once
    `termination` (a TerminationRequest) is requested, which also stops training."""

    def __init__(self, backup_dir, history, every_seconds, termination=None):
        super().__init__()
        self.backup_dir = backup_dir
        self.history = history
        self.every_seconds = every_seconds
        self.termination = termination
        self.last_save = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        for name, value in logs.items():
            self.history.setdefault(name, []).append(float(value))
        now = time.monotonic()
        terminating = self.termination is not None and self.termination.requested
        if terminating:
            self.model.stop_training = True
        if not np.all(np.isfinite(list(logs.values()))) or (
            now - self.last_save < self.every_seconds and not terminating
        ):
            return
        self.last_save = now
        os.makedirs(self.backup_dir, exist_ok=True)
        weights_name = f"epoch-{epoch + 1:04d}.weights.h5"
        save_weights(self.model, os.path.join(self.backup_dir, weights_name))
        state = {"epoch": epoch + 1, "weights": weights_name, "history": self.history}
        save_json(state, os.path.join(self.backup_dir, "state.json"))
        for name in os.listdir(self.backup_dir):
            if name.startswith("epoch-") and name != weights_name:
                os.remove(os.path.join(self.backup_dir, name))


def restore_checkpoint(model, backup_dir):
    """Loads the last checkpoint of `backup_dir` into the compiled, built `model`; returns (epochs done, history)."""
    state_path = os.path.join(backup_dir, "state.json")
    if not os.path.exists(state_path):
        return 0, {}
    try:
        state = read_json(state_path)
        model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(backup_dir, state["weights"]))
    except Exception as error:  # noqa: BLE001  (whatever broke the checkpoint, the stage starts again)
        print(
            f"warning: discarding unreadable checkpoint {display_name(backup_dir)} ({type(error).__name__}); starting the stage again"
        )
        shutil.rmtree(backup_dir)
        return 0, {}
    return state["epoch"], state["history"]


def train(
    model,
    batches,
    epochs,
    optimizer,
    backup_dir,
    stage,
    remedy,
    checkpoint_seconds,
    loss=None,
    callbacks=(),
    termination=TERMINATION,
    jit_compile="auto",
):
    """Every stage's training: compiles `model` with `optimizer` (and `loss`, where the model does not compute its
    own) and `jit_compile` (as Keras takes it), then `model.fit` on `batches` (RowBatches) from the last epoch saved
    in `backup_dir`, saving at most every `checkpoint_seconds`; returns the history of all `epochs`. `callbacks` run
    before the checkpoint, so the logs they add are in the history.

    Raises UsageError naming the stage, the epoch and `remedy` when a loss becomes NaN or infinite, and Terminated
    once the epoch during which `termination` (a TerminationRequest) was requested is saved.
    """
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile)
    print(
        f"{stage}: training step {'XLA-compiled' if model.jit_compile else 'not XLA-compiled'} (jit_compile={model.jit_compile})"
    )
    left_over = batches.num_rows % batches.batch_size
    print(
        f"{stage}: {len(batches)} steps of {batches.batch_size} per epoch"
        + (f"; after each shuffle, {left_over} rows wait for a later epoch" if left_over else "")
    )
    first_epoch, history = restore_checkpoint(model, backup_dir)
    if first_epoch:
        print(f"{stage}: resuming after epoch {first_epoch} of {epochs} (from {display_name(backup_dir)})")
    checkpoint = EpochCheckpoint(backup_dir, history, checkpoint_seconds, termination)
    callbacks = [keras.callbacks.TerminateOnNaN(), *callbacks, checkpoint]
    synchronize_batch_normalization(model)
    # RowBatches shuffles its rows itself; Keras's shuffle of the batches' order would draw on the global random state.
    with termination.while_training():
        model.fit(
            batches,
            epochs=epochs,
            initial_epoch=first_epoch,
            callbacks=callbacks,
            verbose=fit_verbosity(),
            shuffle=False,
        )
    for epoch, losses in enumerate(zip(*history.values(), strict=True), start=1):
        if not np.all(np.isfinite(losses)):
            raise UsageError(
                f"{stage} diverged at epoch {epoch} (a loss became NaN or infinite); {remedy}, then run again"
            )
    return history


class KeepBestEpoch(keras.callbacks.Callback):
    """After each epoch, the lowest SCAN loss of `model`'s heads over every row of `inputs` and all its neighbours,
    logged as `scan_loss`; when training ends, `model` gets back the weights of the epoch where it was lowest.

    SCAN's code keeps that epoch rather than the last: the loss needs no labels, and a head can drift after its
    best epoch. That epoch's weights and loss are kept in `backup_dir`, so a resumed stage still knows them.
    `keras.callbacks.ModelCheckpoint(save_best_only=True)` does not do this: it saves the whole learner being
    fitted, in place rather than atomically, forgets its best loss when a run resumes, and restores nothing.
    """

    def __init__(self, model, inputs, neighbour_indices, batch_size, backup_dir, stage):
        super().__init__()
        self.evaluated = model  # (`self.model` is the learner being fitted, of which `model` is a part)
        self.inputs = inputs
        self.neighbour_indices = neighbour_indices
        self.batch_size = batch_size
        self.weights_path = os.path.join(backup_dir, "best.weights.h5")
        self.state_path = os.path.join(backup_dir, "best.json")
        self.stage = stage
        self.best, self.last = None, None

    def on_train_begin(self, logs=None):
        if os.path.exists(self.state_path) and os.path.exists(self.weights_path):
            self.best = read_json(self.state_path)

    def on_epoch_end(self, epoch, logs=None):
        probabilities = predict_in_full_batches(self.evaluated, self.inputs, self.batch_size)
        if probabilities.ndim == 2:  # one head: [num_images, num_clusters] -> [num_images, 1, num_clusters]
            probabilities = probabilities[:, None]
        self.last = float(np.min(scan_head_losses(probabilities, self.neighbour_indices)))
        logs["scan_loss"] = self.last
        if np.isfinite(self.last) and (self.best is None or self.last < self.best["loss"]):
            os.makedirs(os.path.dirname(self.weights_path), exist_ok=True)
            save_weights(self.evaluated, self.weights_path)
            self.best = {"epoch": epoch + 1, "loss": self.last}
            save_json(self.best, self.state_path)

    def on_train_end(self, logs=None):
        if self.best is None:
            return
        self.evaluated.load_weights(self.weights_path)
        last = "" if self.last is None else f" (the last epoch's: {self.last:.4f})"
        best = self.best
        print(f"{self.stage}: kept epoch {best['epoch']}, whose SCAN loss {best['loss']:.4f} is the lowest{last}")


def run_as_command(main):
    """Runs `main()` as the command does: SIGTERM saves the current epoch, then stops like Ctrl-C; a problem the user
    can fix is one line on stderr and exit status 2, an interruption 130, SIGTERM 143."""
    TERMINATION.install()
    try:
        main()
    except DiskFullError as error:
        print(f"error: {display_name(str(error))}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Skips the interpreter's exit, where HDF5 would crash flushing a weights file that ran out of space.
        os._exit(2)
    except UsageError as error:
        print(f"error: {display_name(str(error))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last completed epoch", file=sys.stderr)
        sys.exit(130)
    except Terminated as error:
        print(f"\n{error}", file=sys.stderr)
        sys.exit(143)
