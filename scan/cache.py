"""The stage cache: each stage's result is saved in `OUTPUT_DIR/cache` under a fingerprint of the data and of the
settings behind it and every earlier stage, so a re-run skips what is done, and a changed setting re-runs its
stage and the stages after it, never one before.
"""

import hashlib
import json
import os
import shutil

import numpy as np

from scan.files import megabytes, read_json, save_array, save_json, save_weights, warn_if_short_of_space
from scan.names import display_name
from scan.settings import UsageError

# The settings each cached stage depends on; a stage's fingerprint also covers the data and every earlier stage.
STAGE_SETTINGS = {
    "representation": [
        "mixed_precision", "seed", "encoder", "target_size", "augmentation", "view_size", "representation_dim",
        "torch_conventions", "projection_head", "projection_units", "pretext_loss", "num_augmentations",
        "small_views", "small_view_size", "temperature", "dropout_rate", "l2_normalize", "representation_batch_size",
        "representation_epochs",
        "representation_optimizer", "representation_learning_rate", "learning_rate_decay_steps",
        "learning_rate_decay_alpha", "warmup_epochs", "weight_decay",
    ],
    "embeddings": ["mining_features"],
    "neighbours": ["k_neighbours"],
    "feature_views": ["encoder_during_clustering", "head_features", "feature_views", "strong_augmentation", "augmentation"],
    "clustering": [
        "seed", "num_clusters", "num_heads", "clustering_loss", "sample_one_neighbour", "encoder_during_clustering",
        "head_features", "entropy_loss_weight", "clustering_batch_size", "clustering_epochs", "clustering_optimizer",
        "clustering_learning_rate", "weight_decay", "strong_augmentation", "keep_best_clustering_epoch",
    ],
    "self_labeling": [
        "self_label_epochs", "self_label_threshold", "self_label_batch_size", "self_label_learning_rate",
        "self_label_guard",
    ],
    "predictions": [],
}  # fmt: skip
# The settings that change no stage's result, each with why. With STAGE_SETTINGS they name every setting once, so a
# new setting is a choice between the two (tests/test_resume.py): one forgotten would let a stale result be reused.
NOT_FINGERPRINTED = {
    "recipe": "it sets other settings' defaults, fingerprinted as they end up",
    "data": "the data fingerprint covers the training images",
    "holdout_images": "the data fingerprint covers the training images",
    "max_images": "the data fingerprint covers the training images",
    "input_size": "the data fingerprint covers the training images",
    "image_fit": "the data fingerprint covers the training images",
    "eval_data": "no cached stage sees the evaluated images",
    "assign_data": "new images are assigned after the stages, by the cached ones",
    "output_dir": "where the cache is, not what it holds",
    "resume": "whether the cache is read, not what it holds",
    "prune_cache": "what is deleted after the run",
    "embedding_batch_size": "batched predictions agree to float rounding (feature views have batches of their own)",
    "prediction_neighbours": "the vote is counted after the stages, from the cached predictions",
    "prototypes_per_cluster": "an output of the cluster analysis",
    "sheet_images": "an output of the cluster analysis",
    "sort_into": "an output of the cluster analysis",
    "sort_copies": "an output of the cluster analysis",
    "data_on_device": "where the rows wait, not which rows a batch holds",
    "compilation_cache": "where compiled steps are kept",
    "checkpoint_seconds": "how often training saves its state, not what it trains",
    "distribution": "a data-parallel step is the whole batch's step, to float rounding",
}
# The representation stage's fingerprint keeps the names its batch size and its loss had, and the SGD momentum that
# was a setting, from before the settings were renamed, so that an encoder trained then (hours of SimCLR on a GPU) is
# still reused; the settings added since are left out of it at the values that compute what the stage computed
# before they existed.
EARLIER_NAMES = {"representation_batch_size": "batch_size", "pretext_loss": "contrastive_loss"}
FIXED_SINCE = {"representation": {"momentum": 0.9}}
ADDED_SINCE = {"small_views": 0, "small_view_size": 16}


def data_fingerprint(dataset):
    """A digest of the images, labels and class names: different data or MAX_IMAGES, different results."""
    digest = hashlib.blake2b(np.ascontiguousarray(dataset.images).data, digest_size=8)
    if dataset.labels is not None:
        digest.update(dataset.labels.astype(np.int64).tobytes())
        digest.update(json.dumps(dataset.class_names).encode())
    return digest.hexdigest()


class StageCache:
    """Finished stage results in `folder`, each named by the stage and its fingerprint.

    Once a stage is computed afresh, the stages after it are too: training is not bit-reproducible, so a
    later stage's cached result may not come from this new one.
    """

    def __init__(self, folder, resume):
        self.folder = folder
        self.resume = resume
        self.recomputed = False
        self.reuse_only = False  # True (ASSIGN_DATA): a stage missing from the cache is an error, not a computation

    @staticmethod
    def fingerprint(previous, stage, settings):
        """Chains the previous stage's fingerprint with this stage's name and settings ({name: value})."""
        text = json.dumps({"previous": previous, "stage": stage, "settings": settings}, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    def path(self, stage, fingerprint, suffix):
        return os.path.join(self.folder, f"{stage}-{fingerprint}{suffix}")

    def read(self, path, reader):
        """Returns `reader(path)`, or None if the file is missing, RESUME is off, an earlier stage was recomputed,
        or it cannot be read."""
        if not self.resume or self.recomputed or not os.path.exists(path):
            return None
        try:
            return reader(path)
        except Exception as error:  # noqa: BLE001  (whatever broke the file, it is recomputed)
            print(f"warning: discarding unreadable {display_name(path)} ({type(error).__name__}); recomputing it")
            os.remove(path)
            return None

    def array(self, stage, fingerprint, title, compute, expected_bytes=0, later_stages_follow=True):
        """The stage's array from the cache, or `compute()`, saved there; warns first if fewer than `expected_bytes`
        (rows x columns x item size) are free. `later_stages_follow=False`: the later stages depend on this array
        only through their fingerprints (the sweep of NUM_CLUSTERS = 0), so computing it does not recompute them."""
        path = self.path(stage, fingerprint, ".npy")
        array = self.read(path, lambda path: np.load(path, allow_pickle=False))
        if array is not None:
            print(f"{title}: done before, reusing {display_name(path)}")
            return array
        self.refuse_to_compute(title)
        warn_if_short_of_space(self.folder, expected_bytes, title)
        self.recomputed = self.recomputed or later_stages_follow
        array = compute()
        save_array(array, path)
        return array

    def refuse_to_compute(self, title):
        """With `reuse_only`, a stage that is not in the cache stops the run with one line that says how to train it."""
        if self.reuse_only:
            raise UsageError(
                f"--assign_data: no finished {title} in {self.folder} matches these settings and data; train it first "
                "with the same command without --assign_data, then assign"
            )

    def trained_model(self, stage, fingerprint, title, model, train):
        """Loads `model`'s weights if the stage finished before, else runs `train(backup_dir)` and saves them.

        Returns the stage's per-epoch history.
        """
        weights_path, record_path = self.path(stage, fingerprint, ".weights.h5"), self.path(stage, fingerprint, ".json")
        record = self.read(record_path, read_json)
        if record is not None and self.read(weights_path, lambda path: model.load_weights(path) or True):
            print(f"{title}: done before, reusing {display_name(weights_path)}")
            return record["history"]
        self.refuse_to_compute(title)
        backup_dir = self.path(stage, fingerprint, ".backup")
        if not self.resume or self.recomputed:  # A checkpoint of this stage may come from other inputs.
            shutil.rmtree(backup_dir, ignore_errors=True)
        # A checkpoint holds the float32 weights and AdamW's two slots per weight; at its peak the stage holds two
        # (the last one stays until the next is renamed), which is more than a checkpoint and the result.
        warn_if_short_of_space(self.folder, model.count_params() * 4 * 3 * 2, title)
        self.recomputed = True
        history = train(backup_dir)
        save_weights(model, weights_path)
        save_json({"history": history}, record_path)
        shutil.rmtree(backup_dir, ignore_errors=True)
        return history


def cache_report(folder, fingerprints, prune):
    """Deletes the results in the stage cache `folder` that `fingerprints` ({stage: fingerprint}) do not name when
    `prune`, keeping `compiled/`; returns one line with the number of results and the megabytes left there."""
    kept = {f"{stage}-{fingerprint}" for stage, fingerprint in fingerprints.items()}
    names = sorted(name for name in os.listdir(folder) if name != "compiled") if os.path.isdir(folder) else []
    results, total, deleted = set(), 0, set()
    for name in names:
        # `{stage}-{fingerprint}{suffix}`; a `.tmp-...` file is what a killed run left half-written.
        path, result = os.path.join(folder, name), name.split(".")[0] or name
        if prune and result not in kept:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            deleted.update([result] if not name.startswith(".") else [])
            continue
        if not name.startswith("."):
            results.add(result)
        files = [os.path.join(root, file) for root, _, found in os.walk(path) for file in found] or [path]
        total += sum(os.path.getsize(file) for file in files)
    line = f"stage cache: {len(results)} results, {megabytes(total)} in {display_name(folder)}"
    if prune:
        return line + f" (pruned {len(deleted)} results these settings do not use)"
    return line + " (--prune_cache=true keeps only this run's)"


def stage_fingerprints(data_digest, settings, stage_settings):
    """Returns {stage: fingerprint}, each chained to the data and to every earlier stage."""
    fingerprints, previous = {}, data_digest
    for stage, names in stage_settings.items():
        names = [name for name in names if name not in ADDED_SINCE or settings[name] != ADDED_SINCE[name]]
        values = {EARLIER_NAMES.get(name, name): settings[name] for name in names} | FIXED_SINCE.get(stage, {})
        previous = fingerprints[stage] = StageCache.fingerprint(previous, stage, values)
    return fingerprints
