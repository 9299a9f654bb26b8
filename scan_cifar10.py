"""
# Semantic Image Clustering (SCAN) on CIFAR-10, Keras 3

A faithful, runnable port of the Keras example "Semantic Image Clustering" (Khalid Salama), which applies
SCAN (Semantic Clustering by Adopting Nearest neighbours, Van Gansbeke et al. 2020) to CIFAR-10:

1. learn visual representations with a SimCLR-style contrastive learner (ResNet50V2 encoder);
2. mine the k nearest neighbours of every image in that representation space;
3. train a clustering head so that neighbours share cluster assignments (consistency loss) while the
   clusters stay balanced (entropy loss);
4. report cluster sizes and the majority-label accuracy of every cluster.

Run:

    python scan_cifar10.py                                  # the tutorial, unchanged (downloads CIFAR-10)
    python scan_cifar10.py --data=path/to/images            # any folder (or .zip/.tar archive) of images, offline
    python scan_cifar10.py --recipe=scan                    # the SCAN paper's recipe (GPU hours)
    KERAS_BACKEND=jax python scan_cifar10.py --recipe=gpu   # SCAN cut to 10 minutes on one GPU
    python scan_cifar10.py --help                           # every setting with its default

Edit the constants below, or override any of them as `--name=value`. Figures and `metrics.json` land in
OUTPUT_DIR. Finished stages are cached there and interrupted training resumes: run the same command again.
The script runs on TensorFlow (default) or JAX: `KERAS_BACKEND=jax python scan_cifar10.py`. With several GPUs,
every stage runs data-parallel over all of them (DISTRIBUTION), BATCH_SIZE being the global batch.

Measured (docs/speed.md and docs/cpu-recipe.md have the full reports):
- the tutorial's defaults (60,000 images, 50 + 50 epochs), `KERAS_BACKEND=jax python scan_cifar10.py
  --data=path/to/images`, on one NVIDIA H100 with JAX 0.11.2 and Keras 3.15.1: 4.9 minutes in all (1.6 of them
  compiling; a second run loads every compiled program from OUTPUT_DIR/cache/compiled), 25.05 % overall
  majority-label accuracy (the tutorial's log: 25.3 % after about 20 minutes), measured while Keras decayed the
  weights by 1e-7 a step, not the tutorial's 1e-4 (README, "Weight decay"; unmeasured since);
- `--recipe=cpu --data=path/to/cifar10-train-jpeg` on a 2-core CPU, TensorFlow 2.21 (docs/cpu-recipe.md), on
  2026-11-30: 17.4 minutes in all, 48.94 % Hungarian accuracy (NMI 0.352, ARI 0.259) on 10,000 held-out images,
  each voted by its 50 most similar training images (the clustering model alone: 47.74 %), the head having also
  learned on a SCAN-augmented view of each image; neighbour purity 52.1 %, weighted kNN accuracy 63.6 % (three
  SimCLR seeds, nine clustering draws each: 46.6 % on average, 25 of the 27 draws at 45 % or more);
- `--recipe=gpu --data=path/to/cifar10-train-jpeg` on one NVIDIA H200 with JAX 0.11.2 (docs/gpu-recipe.md): about
  5.1 minutes summed from measured stages, 56.79 % Hungarian accuracy (NMI 0.445, ARI 0.358) on 10,000 held-out
  images, neighbour purity 60.8 % (SCAN reaches 81.8-88.3 % after hours).
"""

import argparse
import concurrent.futures
import csv
import errno
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import sys
import tarfile
import textwrap
import time
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TensorFlow's C++ start-up chatter out of the report.

try:
    import keras  # noqa: E402  (the backend must be chosen before Keras is imported)
except (ImportError, ValueError) as error:  # an unknown or uninstalled KERAS_BACKEND
    if __name__ != "__main__":
        raise
    print(
        f"error: KERAS_BACKEND={os.environ['KERAS_BACKEND']} cannot be used ({error}); set KERAS_BACKEND=tensorflow or jax",
        file=sys.stderr,
    )
    sys.exit(2)
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score  # noqa: E402
from tqdm import tqdm  # noqa: E402

matplotlib.use("Agg")  # Figures are saved as PNG files, so no display is needed.
import matplotlib.pyplot as plt  # noqa: E402

# ------------------------------------------------------------------------------------------------ settings
# Recipe
RECIPE = "tutorial"  # "tutorial" (the constants below), "scan" (the SCAN paper), "cpu" (2 cores), "gpu": see RECIPES

# Data
DATA = "cifar10"  # "cifar10" (train+test), "cifar10-train", "cifar10-test", a cifar-10-batches-py folder, images (folder or archive)
EVAL_DATA = ""  # a second source, same forms as DATA, to evaluate the trained model on ("" = none)
ASSIGN_DATA = ""  # new images, same forms as DATA, to put into the clusters learned before, training nothing
HOLDOUT_IMAGES = 0  # hold this many DATA images out of training and evaluate on them (0 = none)
MAX_IMAGES = 0  # 0 = all images; otherwise a seeded random subset of this many to train on
INPUT_SIZE = 32  # side of the stored images in pixels (CIFAR-10: 32); folder images are resized to it
SEED = 42  # seed for the subsets, the weights and the augmentations
OUTPUT_DIR = "outputs"  # figures, metrics.json and the stage cache (OUTPUT_DIR/cache) are written here
RESUME = True  # reuse finished stages and resume interrupted training; False recomputes everything
PRUNE_CACHE = False  # at the end of a run, delete the cached results these settings do not use (compiled steps stay)

# Preprocessing and augmentation
TARGET_SIZE = 32  # images are resized to this side inside the model; ResNet50V2 needs >= 32
AUGMENTATION = "tutorial"  # "tutorial" (shift, flip, rotate, zoom), "tutorial-layers" (same, as Keras layers), "simclr"
VIEW_SIZE = 0  # side of SimCLR's augmented training views (0 = TARGET_SIZE); smaller views train faster
STRONG_AUGMENTATION = "augmentation"  # of clustering and self-labeling: "augmentation" (AUGMENTATION's) or "scan"

# Representation learning
ENCODER = "resnet50v2"  # "resnet50v2" (the tutorial's), "resnet18" (CIFAR ResNet-18) or "small" (4-layer CNN)
REPRESENTATION_DIM = 512  # units of the dense layer ending the encoder (0 = none: the backbone's features, as SCAN)
TORCH_CONVENTIONS = False  # build the CNNs as SCAN's PyTorch code: stride-2 padding on every side, its init, batch norm
PROJECTION_HEAD = "tutorial"  # "tutorial" (dropout, dense, batch norm, ReLU) or "mlp" (dense, ReLU, dense)
PROJECTION_UNITS = 128  # units of the projection head of the representation learner
CONTRASTIVE_LOSS = "tutorial"  # "tutorial" (its quirks kept) or "ntxent" (SimCLR's NT-Xent)
NUM_AUGMENTATIONS = 2  # augmented views per image in the contrastive loss (>= 2)
TEMPERATURE = 0.1  # softmax temperature of the contrastive loss (> 0)
DROPOUT_RATE = 0.1  # dropout before the "tutorial" projection head, in [0, 1)
L2_NORMALIZE = False  # L2-normalise projections in the "tutorial" contrastive loss (NT-Xent always does)
BATCH_SIZE = 512  # images per training step, for representation learning, clustering and self-labeling
REPRESENTATION_EPOCHS = 50  # SimCLR training epochs (the tutorial suggests 500 for better results)
REPRESENTATION_OPTIMIZER = "adamw"  # "adamw" (the tutorial's) or "sgd" (SCAN's SimCLR: momentum, L2 weight decay)
MOMENTUM = 0.9  # momentum of the "sgd" representation optimizer, in [0, 1)
REPRESENTATION_LEARNING_RATE = 0.001  # initial learning rate of the cosine decay
LEARNING_RATE_DECAY_STEPS = 500  # steps of the cosine decay, then the rate stays at its floor (0 = all steps)
LEARNING_RATE_DECAY_ALPHA = 0.1  # floor of the cosine decay as a fraction of the initial rate
WARMUP_EPOCHS = 0  # epochs over which the SimCLR learning rate first rises linearly from 0 (SimCLR: 10)
WEIGHT_DECAY = 0.0001  # AdamW: shrinks weights this much a step at the initial rate (tutorial); SGD: L2 (SCAN)

# Neighbours
EMBEDDING_BATCH_SIZE = 500  # images per batch when embedding, mining neighbours and predicting clusters
EMBED_RAW_PIXELS = True  # tutorial quirk: embed images without the normalisation the encoder learned with
K_NEIGHBOURS = 5  # neighbours of each image used during cluster learning (>= 1)
MINING_FEATURES = "encoder"  # neighbours among "encoder" features (the tutorial) or "projection" outputs (SCAN)

# Clustering
NUM_CLUSTERS = 20  # number of clusters (>= 2)
NUM_HEADS = 1  # clustering heads trained side by side; the one with the lowest SCAN loss is kept (SCAN: 10)
CLUSTERING_LOSS = "tutorial"  # "tutorial" (its quirks kept) or "scan" (-log <p_anchor, p_neighbour>, weighted entropy)
SAMPLE_ONE_NEIGHBOUR = False  # False: each step uses all K neighbours; True: one random neighbour per anchor (SCAN)
TUNE_ENCODER_DURING_CLUSTERING = False  # False freezes the encoder while the clustering head learns
CLUSTER_ON_FEATURES = False  # True (frozen encoder): clustering and self-labeling train the head on cached features
FEATURE_VIEWS = 0  # with CLUSTER_ON_FEATURES: strongly augmented views per image, their features drawn too (0 = none)
HEAD_FEATURES = "encoder"  # what the clustering head sits on: the "encoder" (tutorial, SCAN) or SimCLR's "projection"
ENTROPY_LOSS_WEIGHT = 5.0  # weight of the entropy term; the "tutorial" loss stores it but never uses it
CLUSTERING_EPOCHS = 50  # clustering training epochs
CLUSTERING_LEARNING_RATE = 0.0005  # AdamW learning rate of cluster learning
KEEP_BEST_CLUSTERING_EPOCH = False  # keep the epoch whose SCAN loss over all images is the lowest (SCAN), not the last

# Self-labeling
SELF_LABEL_EPOCHS = 0  # epochs of training on confident pseudo-labels after clustering (0 = none, as in the tutorial)
SELF_LABEL_THRESHOLD = 0.99  # confidence above which an image's cluster becomes its pseudo-label, in (0, 1)
SELF_LABEL_LEARNING_RATE = 0.0001  # AdamW learning rate of self-labeling
SELF_LABEL_WEAK_VIEW = "none"  # the view pseudo-labels come from: "none" (the image itself, as SCAN) or "flip-shift"
SELF_LABEL_EMA = 0.0  # self-labeling ends on a moving average of its weights with this momentum, in [0, 1) (0 = off)
SELF_LABEL_GUARD = True  # keep the model from before self-labeling if it raised the SCAN loss or emptied a cluster

# Cluster analysis
PREDICTION_NEIGHBOURS = 0  # 0: an image's clusters are the head's; N: the vote of its N most similar training images
PROTOTYPES_PER_CLUSTER = 8  # most confident images shown per cluster in prototypes.png
SHEET_IMAGES = 64  # most confident images on each cluster's contact sheet, clusters/cluster-NN.jpg (0 = no sheets)

# Speed
MIXED_PRECISION = "auto"  # "auto" (mixed_bfloat16 on a GPU that has it, else float32), "float32", "mixed_bfloat16"
STEPS_PER_EXECUTION = 1  # training steps per compiled call; more cuts the per-step overhead on a fast GPU
DATA_ON_DEVICE = "auto"  # keep training images on the accelerator: "auto" (JAX, if they fit), "true", "false"
COMPILATION_CACHE = True  # keep compiled steps in OUTPUT_DIR/cache/compiled (JAX): later runs load them
CHECKPOINT_SECONDS = 60  # save training state at most this often (0 = every epoch); a killed run resumes there
DISTRIBUTION = "auto"  # "auto" (data-parallel when several GPUs are visible), "none", "data_parallel" (all devices)
# --------------------------------------------------------------------------------------- end of settings

# Each recipe is a coherent set of defaults; a setting given on the command line always wins over it.
RECIPES = {
    "tutorial": {},
    # The official SCAN code for CIFAR-10: SimCLR with SGD at 0.4 (batch 512), cosine decay to 0.4 x 0.1^3 over 500
    # epochs, weight decay 1e-4 in the gradient, the ResNet-18 built as in PyTorch with no dense layer after it.
    "scan": {
        "data": "cifar10-train", "eval_data": "cifar10-test", "encoder": "resnet18", "augmentation": "simclr",
        "representation_dim": 0, "torch_conventions": True, "projection_head": "mlp", "contrastive_loss": "ntxent",
        "representation_epochs": 500, "representation_optimizer": "sgd", "momentum": 0.9,
        "representation_learning_rate": 0.4, "weight_decay": 0.0001,
        "learning_rate_decay_steps": 0, "learning_rate_decay_alpha": 0.001, "embed_raw_pixels": False,
        "mining_features": "projection", "k_neighbours": 20, "num_clusters": 10, "num_heads": 10,
        "clustering_loss": "scan", "sample_one_neighbour": True, "tune_encoder_during_clustering": True,
        "clustering_epochs": 50, "clustering_learning_rate": 0.0001, "strong_augmentation": "scan",
        "keep_best_clustering_epoch": True,
        "self_label_epochs": 200, "self_label_threshold": 0.99, "self_label_learning_rate": 0.0001,
    },
    # Meaningful clusters on a 2-core CPU within 20 minutes, evaluated on 10,000 held-out images: nearly all the
    # time goes to SimCLR on 24x24 views, at batch 128 (twice the steps of 256 for the same arithmetic: it learned
    # more); clustering and self-labeling train the head on cached features, those of the images and of one
    # SCAN-augmented view of each (2.4 points more, on average); each image's clusters are then voted by its 50 most
    # similar training images (1.1 points more on held-out images than the head's own, on average).
    "cpu": {
        "holdout_images": 10000, "encoder": "small", "augmentation": "simclr", "view_size": 24,
        "projection_head": "mlp", "contrastive_loss": "ntxent", "representation_dim": 256, "batch_size": 128,
        "representation_epochs": 40, "learning_rate_decay_steps": 0, "learning_rate_decay_alpha": 0.0,
        "embed_raw_pixels": False, "mining_features": "projection", "k_neighbours": 20, "num_clusters": 10,
        "num_heads": 10, "clustering_loss": "scan", "sample_one_neighbour": True,
        "tune_encoder_during_clustering": False, "cluster_on_features": True, "clustering_epochs": 20,
        "head_features": "projection", "clustering_learning_rate": 0.001, "strong_augmentation": "scan",
        "keep_best_clustering_epoch": True, "self_label_epochs": 10, "self_label_threshold": 0.99,
        "self_label_learning_rate": 0.0001, "prediction_neighbours": 50, "feature_views": 1,
    },
    # SCAN cut to 10 minutes on one GPU, as measured on an H200 (docs/gpu-recipe.md): 200 SimCLR epochs after a
    # 10-epoch warm-up; the clustering head then learns on the frozen encoder's cached features, and self-labeling
    # is off: both scored better than SCAN's tuned encoder and self-labeling at this budget.
    "gpu": {
        "data": "cifar10-train", "eval_data": "cifar10-test", "encoder": "resnet18", "augmentation": "simclr",
        "projection_head": "mlp", "contrastive_loss": "ntxent", "representation_epochs": 200, "warmup_epochs": 10,
        "learning_rate_decay_steps": 0, "learning_rate_decay_alpha": 0.0, "embed_raw_pixels": False,
        "mining_features": "projection", "k_neighbours": 20, "num_clusters": 10, "num_heads": 10,
        "clustering_loss": "scan", "sample_one_neighbour": True, "tune_encoder_during_clustering": False,
        "cluster_on_features": True, "clustering_epochs": 20, "clustering_learning_rate": 0.001,
        "self_label_epochs": 0,
        # The measured run's weight decay: Keras's AdamW took 1e-4 times the learning rate 0.001 per step.
        "weight_decay": 1e-7,
    },
}  # fmt: skip
RENAMED_RECIPES = {"quick": "cpu"}  # old name: new name
# The allowed values of the settings that name a component.
CHOICES = {
    "recipe": list(RECIPES),
    "encoder": ["resnet50v2", "resnet18", "small"],
    "augmentation": ["tutorial", "tutorial-layers", "simclr"],
    "strong_augmentation": ["augmentation", "scan"],
    "self_label_weak_view": ["none", "flip-shift"],
    "projection_head": ["tutorial", "mlp"],
    "mining_features": ["encoder", "projection"],
    "head_features": ["encoder", "projection"],
    "contrastive_loss": ["tutorial", "ntxent"],
    "representation_optimizer": ["adamw", "sgd"],
    "clustering_loss": ["tutorial", "scan"],
    "mixed_precision": ["auto", "float32", "mixed_bfloat16", "mixed_float16"],
    "data_on_device": ["auto", "true", "false"],
    "distribution": ["auto", "none", "data_parallel"],
}
# The settings each cached stage depends on; a stage's fingerprint also covers the data and every earlier stage.
STAGE_SETTINGS = {
    "representation": [
        "mixed_precision", "seed", "encoder", "target_size", "augmentation", "view_size", "representation_dim",
        "torch_conventions", "projection_head", "projection_units", "contrastive_loss", "num_augmentations",
        "temperature", "dropout_rate", "l2_normalize", "batch_size", "representation_epochs",
        "representation_optimizer", "momentum", "representation_learning_rate", "learning_rate_decay_steps",
        "learning_rate_decay_alpha", "warmup_epochs", "weight_decay",
    ],
    "embeddings": ["embed_raw_pixels", "mining_features"],
    "neighbours": ["k_neighbours"],
    "feature_views": ["cluster_on_features", "head_features", "feature_views", "strong_augmentation", "augmentation"],
    "clustering": [
        "seed", "num_clusters", "num_heads", "clustering_loss", "sample_one_neighbour",
        "tune_encoder_during_clustering", "cluster_on_features", "head_features", "entropy_loss_weight",
        "clustering_epochs", "clustering_learning_rate", "weight_decay", "batch_size", "strong_augmentation",
        "keep_best_clustering_epoch",
    ],
    "self_labeling": [
        "self_label_epochs", "self_label_threshold", "self_label_learning_rate", "self_label_weak_view",
        "self_label_ema", "self_label_guard",
    ],
    "predictions": [],
}  # fmt: skip
# Upper bounds of the settings whose larger values would exhaust memory rather than do more work.
SETTING_LIMITS = {
    "input_size": 1024, "target_size": 1024, "view_size": 1024, "num_augmentations": 64, "num_heads": 1000,
    "representation_dim": 65536, "projection_units": 65536, "k_neighbours": 1000, "prediction_neighbours": 1000, "feature_views": 64, "prototypes_per_cluster": 100, "sheet_images": 10000,
    "batch_size": 65536, "embedding_batch_size": 10000,
}  # fmt: skip
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".tar.gz", ".tgz")
SUPPORTED_BACKENDS = ("tensorflow", "jax")


class UsageError(ValueError):
    """A problem the user can fix (a setting or the data); `main` prints it as one line and exits with 2."""


"""
## Settings and command-line overrides

Every constant of the settings block can be overridden as `--name=value` (lower-case name). The value is
parsed to the constant's type; `--help` lists each constant with its default and its comment.
"""


def read_settings_block(source_text):
    """Returns `{NAME: comment}` for each `NAME = value  # comment` line between the settings markers."""
    block = re.search(r"^# -+ settings\n(.*)^# -+ end of settings$", source_text, flags=re.MULTILINE | re.DOTALL)
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*) = .+?  # (.+)$", block.group(1), flags=re.MULTILINE))


def parse_setting_value(name, text, default):
    """Parses `text` to the type of `default`, or raises a UsageError naming the setting."""
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text.lower() in words:
            return words[text.lower()]
        raise UsageError(f"--{name}={text}: expected true or false")
    try:
        return type(default)(text)
    except ValueError:
        raise UsageError(f"--{name}={text}: expected {type(default).__name__}, e.g. --{name}={default}") from None


class _RaisingArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message + " (see --help for every setting)")


def parse_settings(argv, defaults, comments, recipes, cifar10_names=(), own_data_holdout=10000, renamed_recipes=None):
    """Returns a namespace of lower-case settings: `defaults`, then the chosen recipe's, then `--name=value`.

    A recipe's CIFAR-10 evaluation images (an EVAL_DATA among `cifar10_names`) apply to CIFAR-10 only: with DATA
    the user's own images, and no --eval_data given, the recipe holds `own_data_holdout` of them out instead
    (unless --holdout_images is given).
    """
    parser = _RaisingArgumentParser(
        prog="scan_cifar10.py",
        description="SCAN image clustering. Each setting is a constant at the top of scan_cifar10.py; a recipe "
        f"({', '.join(recipes)}) supplies a coherent set of defaults, and --name=value always wins.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    for name, default in defaults.items():
        parser.add_argument(
            f"--{name.lower()}",
            help=f"{comments.get(name, '')} (default: {default})",
            metavar=type(default).__name__.upper(),
        )
    given = {
        name: parse_setting_value(name, text, defaults[name.upper()])
        for name, text in vars(parser.parse_args(argv)).items()
    }
    settings = {name.lower(): value for name, value in defaults.items()}
    recipe = given.get("recipe", settings.get("recipe", "tutorial"))
    if recipe in (renamed_recipes or {}):
        raise UsageError(
            f"--recipe={recipe} is now --recipe={renamed_recipes[recipe]}: the recipe names say where each runs"
        )
    if recipe not in recipes:
        raise UsageError(f"--recipe={recipe}: choose one of {', '.join(recipes)}")
    settings.update(recipes[recipe])
    settings.update(given)
    own_data = settings["data"] not in cifar10_names
    holdout_from_recipe = "holdout_images" not in given and "holdout_images" in recipes[recipe]
    if own_data and "eval_data" not in given and settings.get("eval_data") in cifar10_names:
        settings["eval_data"] = ""
        settings["holdout_images"] = given.get("holdout_images", own_data_holdout)
        holdout_from_recipe = "holdout_images" not in given
    # A recipe's hold-out fits the user's own images: a fifth of them, at most HOLDOUT_IMAGES (holdout_count).
    settings["holdout_share"] = 0.2 if own_data and holdout_from_recipe else 0.0
    return argparse.Namespace(**settings)


def validate_settings(settings, choices):
    """Rejects settings that cannot work, before any data is loaded or any output is written."""
    for name, allowed in choices.items():
        if getattr(settings, name) not in allowed:
            raise UsageError(f"--{name}={getattr(settings, name)}: choose one of {', '.join(allowed)}")
    for name, value in vars(settings).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name}={value}: must be a finite number")
    for name, limit in SETTING_LIMITS.items():
        if getattr(settings, name) > limit:
            raise UsageError(f"--{name}={getattr(settings, name)}: must be at most {limit}")
    if not 0 <= settings.seed < 2**31:
        raise UsageError(f"--seed={settings.seed}: must be between 0 and {2**31 - 1}")
    if not settings.output_dir:
        raise UsageError("--output_dir is empty: name the folder for figures, metrics.json and the cache")
    positive = [
        "batch_size", "embedding_batch_size", "representation_epochs", "clustering_epochs", "input_size",
        "projection_units", "k_neighbours", "num_heads", "prototypes_per_cluster",
        "steps_per_execution",
    ]  # fmt: skip
    for name in positive:
        if getattr(settings, name) <= 0:
            raise UsageError(f"--{name}={getattr(settings, name)}: must be at least 1")
    for name in [
        "max_images", "holdout_images", "self_label_epochs", "sheet_images", "learning_rate_decay_steps", "view_size", "warmup_epochs",
        "representation_dim", "prediction_neighbours", "feature_views",
    ]:  # fmt: skip
        if getattr(settings, name) < 0:
            raise UsageError(f"--{name}={getattr(settings, name)}: must be 0 (none or all) or positive")
    if settings.checkpoint_seconds < 0:
        raise UsageError(f"--checkpoint_seconds={settings.checkpoint_seconds}: must be 0 (save every epoch) or more")
    for name in ["temperature", "representation_learning_rate", "clustering_learning_rate", "self_label_learning_rate"]:
        if not getattr(settings, name) > 0:
            raise UsageError(f"--{name}={getattr(settings, name)}: must be greater than 0")
    if settings.num_clusters < 2:
        raise UsageError(f"--num_clusters={settings.num_clusters}: clustering needs at least 2 clusters")
    if settings.num_augmentations < 2:
        raise UsageError(f"--num_augmentations={settings.num_augmentations}: contrastive learning needs >= 2 views")
    minimum_size = ENCODER_MINIMUM_SIZES[settings.encoder]
    for name, size in [("target_size", settings.target_size), ("view_size", settings.view_size or minimum_size)]:
        if size < minimum_size:
            raise UsageError(
                f"--{name}={size}: the {settings.encoder} encoder needs images of at least {minimum_size}x{minimum_size}"
            )
    if not 0 <= settings.dropout_rate < 1:
        raise UsageError(f"--dropout_rate={settings.dropout_rate}: must be in [0, 1)")
    if not 0 < settings.self_label_threshold < 1:
        raise UsageError(f"--self_label_threshold={settings.self_label_threshold}: must be between 0 and 1")
    if not 0 <= settings.self_label_ema < 1:
        raise UsageError(f"--self_label_ema={settings.self_label_ema}: must be in [0, 1) (0 = off, e.g. 0.999)")
    if not 0 <= settings.learning_rate_decay_alpha <= 1 or settings.weight_decay < 0:
        raise UsageError("--learning_rate_decay_alpha must be in [0, 1] and --weight_decay at least 0")
    if not 0 <= settings.momentum < 1:
        raise UsageError(f"--momentum={settings.momentum}: must be in [0, 1)")
    if settings.entropy_loss_weight < 0:
        raise UsageError(f"--entropy_loss_weight={settings.entropy_loss_weight}: must be 0 or more")
    if settings.warmup_epochs >= settings.representation_epochs:
        raise UsageError(
            f"--warmup_epochs={settings.warmup_epochs}: must be fewer than --representation_epochs="
            f"{settings.representation_epochs}; lower --warmup_epochs"
        )
    if settings.cluster_on_features and settings.tune_encoder_during_clustering:
        raise UsageError(
            "--cluster_on_features=true learns on features of a frozen encoder; set --tune_encoder_during_clustering=false"
        )
    if settings.eval_data and settings.holdout_images:
        raise UsageError("set either --eval_data or --holdout_images, not both (use --eval_data= to clear it)")


def validate_against_data(settings, num_images, num_devices=1):
    """Rejects settings that the training images (and data parallelism over `num_devices`) cannot satisfy."""
    if num_images < settings.batch_size and num_images % num_devices:  # every step would take all the images
        raise UsageError(
            f"--batch_size={settings.batch_size} is more than the {num_images} images to train on, and those do not "
            f"split over {num_devices} devices; use --batch_size={num_images // num_devices * num_devices}"
        )
    check_divisible("embedding_batch_size", settings.embedding_batch_size, num_devices)
    if settings.k_neighbours >= num_images:
        raise UsageError(
            f"--k_neighbours={settings.k_neighbours} needs more than {settings.k_neighbours} images, "
            f"but the data has {num_images} to train on; lower --k_neighbours or add images"
        )
    if settings.num_clusters > num_images:
        raise UsageError(
            f"--num_clusters={settings.num_clusters} is more than the {num_images} images to train on; "
            "lower --num_clusters"
        )


def check_output_dir(path):
    """Checks that `path` is, or can become, a writable folder, without creating anything."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output_dir={path}: {existing} is a file, not a folder; choose another --output_dir")
    try:
        with open(os.path.join(existing, f".write-test-{os.getpid()}"), "wb"):
            pass
        os.remove(os.path.join(existing, f".write-test-{os.getpid()}"))
    except OSError as error:
        raise UsageError(
            f"--output_dir={path}: cannot write in {existing} ({error.strerror}); choose another --output_dir"
        ) from None


def find_gpus():
    """Returns (name, compute capability (major, minor)) for each GPU the Keras backend sees."""
    if keras.backend.backend() == "jax":
        import jax

        return [
            (
                device.device_kind,
                tuple(int(part) for part in str(getattr(device, "compute_capability", "0.0")).split(".")),
            )
            for device in jax.devices()
            if device.platform == "gpu"
        ]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        details = [tf.config.experimental.get_device_details(gpu) for gpu in gpus]
        return [
            (d.get("device_name", gpu.name), d.get("compute_capability", (0, 0)))
            for gpu, d in zip(gpus, details, strict=True)
        ]
    return []


def describe_devices(gpus):
    """Says which Keras backend runs and on which devices, e.g. 'tensorflow on GPU: NVIDIA H100'."""
    return f"{keras.backend.backend()} on " + (f"GPU: {', '.join(name for name, _ in gpus)}" if gpus else "CPU only")


def resolve_mixed_precision(setting, gpus):
    """ "auto" is mixed_bfloat16 on GPUs that compute in bfloat16 (compute capability 8.0 and up), else float32.

    On this project's 2-core CPU, bfloat16 made a SimCLR step only 6% faster, so the CPU stays in float32.
    """
    if setting != "auto":
        return setting
    return "mixed_bfloat16" if gpus and all(capability >= (8, 0) for _, capability in gpus) else "float32"


def device_memory_bytes():
    """The memory of the first device in bytes where the backend reports it (JAX on a GPU), else None."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return stats.get("bytes_limit") if stats else None


def resolve_data_on_device(setting, num_bytes, backend, memory_bytes):
    """Whether the training rows (`num_bytes`) are held on the device, so that no step copies its batch from the host.

    "auto": on JAX, when the rows take at most a quarter of the device's memory (`memory_bytes`; None for the
    host's memory, on a CPU). TensorFlow feeds its batches from host memory through its input pipeline.
    """
    if setting != "auto":
        return setting == "true"
    return backend == "jax" and (memory_bytes is None or num_bytes <= memory_bytes / 4)


def enable_compilation_cache(folder):
    """JAX keeps every program it compiles in `folder` and loads it from there in later runs; returns whether it does.

    Even small programs are kept: a run compiles hundreds of them (Keras builds the models with eager operations).
    """
    if keras.backend.backend() != "jax":
        return False
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return True


"""
### Data parallelism over every device

With several GPUs (`DISTRIBUTION`), every stage splits each global batch of `BATCH_SIZE` (and of
`EMBEDDING_BATCH_SIZE`) evenly over them, so a run's math does not change with the device count. JAX compiles
one program for the global batch (`keras.distribution.DataParallel`), in which every operation sees the whole
batch. TensorFlow runs a copy of the step on each replica (`tf.distribute.MirroredStrategy`) and sums their
gradients, so there the parts of a step that look at the whole batch gather it from every replica: the
contrastive, entropy and self-label losses, batch normalisation and the augmentations' random draws. The
functions below are the only engine-specific code of the training steps; off TensorFlow's replicas they change
nothing. Several machines join on JAX alone (`keras.distribution.initialize()`): each process feeds its own part of
every batch and receives every prediction.
"""


def resolve_distribution(setting, num_gpus):
    """Whether every stage runs data-parallel: "auto" does when more than one GPU is visible."""
    if setting == "auto":
        return num_gpus > 1
    return setting == "data_parallel"


@functools.cache  # Once per process: a second TensorFlow strategy's collectives would clash with the first's.
def start_data_parallel(backend):
    """Spreads training over every device of this machine: returns (the engine, whose `scope()` the models are
    built, trained and used in; the number of devices)."""
    if backend == "jax":
        # Every device of every process; each process feeds its own part of each batch (RowBatches), not a shard of
        # a dataset that Keras would split.
        devices = keras.distribution.list_devices()
        return keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False), len(devices)
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    return strategy, strategy.num_replicas_in_sync


def join_machines(environment, backend):
    """Joins the processes of several machines into one JAX job when KERAS_DISTRIBUTION_JOB_ADDRESSES (with
    KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID) asks, through `keras.distribution.initialize()`;
    returns this process's (index, count). Runs before any JAX computation, as JAX requires. Refuses TF_CONFIG: Keras
    3's `fit` does not run under TensorFlow's MultiWorkerMirroredStrategy (README, "Several machines")."""
    if environment.get("TF_CONFIG"):
        raise UsageError(
            "TF_CONFIG is set, but Keras 3 cannot train under TensorFlow's MultiWorkerMirroredStrategy; unset it, and "
            "for several machines use KERAS_BACKEND=jax with KERAS_DISTRIBUTION_JOB_ADDRESSES"
        )
    job_addresses = environment.get("KERAS_DISTRIBUTION_JOB_ADDRESSES")
    if not job_addresses:
        return 0, 1
    if backend != "jax":
        raise UsageError(
            "KERAS_DISTRIBUTION_JOB_ADDRESSES is set, but several machines train together on JAX only; set "
            "KERAS_BACKEND=jax (or unset it to train on this machine)"
        )
    count, index = (environment.get(f"KERAS_DISTRIBUTION_{name}", "") for name in ("NUM_PROCESSES", "PROCESS_ID"))
    if not (count.isdigit() and index.isdigit() and int(index) < int(count)):
        raise UsageError(
            f"KERAS_DISTRIBUTION_NUM_PROCESSES={count!r} and KERAS_DISTRIBUTION_PROCESS_ID={index!r}: with "
            "KERAS_DISTRIBUTION_JOB_ADDRESSES set, give every machine the number of processes and its own number "
            "from 0 below it"
        )
    keras.distribution.initialize(job_addresses, int(count), int(index))
    return this_process()


def this_process():
    """(index, count) of this process among those that train together: several with JAX on several machines."""
    if keras.backend.backend() != "jax":
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def process_share(rows, process):
    """The rows of a global batch that `process` (index, count) feeds: each process feeds its own equal part."""
    index, count = process
    share = len(rows) // count
    return rows[index * share : (index + 1) * share]


class ReplicatedOutputs(layers.Layer):
    """Copies a data-parallel output to every device, so that each process of several can read all of it."""

    def call(self, outputs):
        layout = keras.distribution.TensorLayout(
            [None] * len(outputs.shape), keras.distribution.distribution().device_mesh
        )
        return keras.distribution.distribute_tensor(outputs, layout)


def check_divisible(name, value, num_devices):
    """Rejects a global batch that does not split evenly over the devices, naming the nearest sizes that do."""
    if value % num_devices:
        lower, upper = value // num_devices * num_devices, (value // num_devices + 1) * num_devices
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise UsageError(
            f"--{name}={value}: data-parallel over {num_devices} devices needs a multiple of {num_devices}; use {nearest}"
        )


def tensorflow_replicas():
    """TensorFlow's replica context while a step runs on several replicas, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def gather_replicas(tensor, axis=0):
    """The global batch of `tensor`: every replica's part, concatenated along `axis` in the global batch's order."""
    context = tensorflow_replicas()
    if context is None:
        return tensor
    import tensorflow as tf

    shape = list(tensor.shape)
    shape[axis] = None
    return tf.ensure_shape(context.all_gather(tensor, axis=axis), shape)


def replica_rows(tensor, num_rows):
    """This replica's `num_rows` rows of a global-batch `tensor`."""
    context = tensorflow_replicas()
    if context is None:
        return tensor
    return ops.take(tensor, context.replica_id_in_sync_group * num_rows + ops.arange(num_rows), axis=0)


def replica_share(loss):
    """What each replica returns of a global-batch loss: its replica count's share, since the gradients are summed."""
    context = tensorflow_replicas()
    return loss if context is None else loss / context.num_replicas_in_sync


def synchronize_batch_normalization(model):
    """On several TensorFlow replicas, batch normalisation takes its statistics over the global batch."""
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        for layer in layers_within(model):
            if isinstance(layer, layers.BatchNormalization):
                layer.synchronized = True


def layers_within(layer):
    """`layer` and every layer inside it, however deeply nested."""
    yield layer
    for inner in getattr(layer, "layers", []):
        yield from layers_within(inner)


class CompilationLog:
    """The compilations that JAX reports through its monitoring events: each program's name and seconds (a load from
    the persistent cache counts as one, with its loading time), and how many came from that cache. Other backends
    report none."""

    def __init__(self):
        self.compilations = []  # (function name, seconds)
        self.cache_hits = 0
        if keras.backend.backend() == "jax":
            from jax import monitoring

            monitoring.register_event_duration_secs_listener(self.on_duration)
            monitoring.register_event_listener(self.on_event)

    def on_duration(self, event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.compilations.append((kwargs.get("fun_name", "").removeprefix("jit(").removesuffix(")"), seconds))

    def on_event(self, event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def mark(self):
        return len(self.compilations), self.cache_hits

    def since(self, mark):
        """What was compiled after `mark`: programs, seconds, loads from the cache and the count of each training or
        prediction step (Keras's `train_step` and `predict_step`)."""
        compilations = self.compilations[mark[0] :]
        names = [name for name, _ in compilations]
        return {
            "programs": len(compilations),
            "seconds": round(sum(seconds for _, seconds in compilations), 2),
            "from_cache": self.cache_hits - mark[1],
            "steps": {name: names.count(name) for name in ("train_step", "predict_step") if name in names},
        }


"""
## Prepare the data

The tutorial trains on all 60,000 CIFAR-10 images (train and test concatenated): labels are only used to
evaluate the clusters. `DATA` also accepts a local `cifar-10-batches-py` folder or any folder of images.
"""


class Dataset(NamedTuple):
    images: np.ndarray  # uint8, shape [num_images, INPUT_SIZE, INPUT_SIZE, 3]
    labels: np.ndarray | None  # int, shape [num_images], or None for a folder without class sub-folders
    class_names: list | None  # class name of each label id
    source: str  # where the images came from, for the report
    names: list | None = (
        None  # each image as the user knows it: a path in the folder, an archive member, "cifar10-train:12"
    )


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


def load_cifar10_batches(folder):
    """Loads the python-pickle CIFAR-10 batches of `folder` (data_batch_1..5, then test_batch if present)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images, labels, image_names = [], [], []
    for name in [name for name in names if os.path.isfile(os.path.join(folder, name))]:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as file:
                batch = pickle.load(file, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # [n, 3072] -> [n, 3, 32, 32]
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as error:
            raise UsageError(
                f"{path} is truncated or not a CIFAR-10 batch ({type(error).__name__}); download it again"
            ) from None
        if len(batch_labels) != len(data):
            raise UsageError(f"{path} has {len(data)} images but {len(batch_labels)} labels; download it again")
        images.append(data.transpose(0, 2, 3, 1))  # [n, 3, 32, 32] -> [n, 32, 32, 3]
        labels.append(batch_labels)
        image_names += [f"{name}:{index}" for index in range(len(data))]
    class_names = list(CIFAR10_CLASSES)
    meta_path = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta_path):
        with open(meta_path, "rb") as file:
            class_names = [name.decode() for name in pickle.load(file, encoding="bytes")[b"label_names"]]
    return Dataset(
        np.concatenate(images), np.concatenate(labels), class_names, f"cifar-10-batches-py folder {folder}", image_names
    )


def is_image_name(name):
    """Whether a file is an image the loader reads, by its name's extension (hidden files are skipped)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def with_labels(names):
    """Each relative image name with its label folder: its parent path ('' for an image at the top)."""
    return [(name, name.rpartition("/")[0]) for name in names]


def find_image_files(folder):
    """Lists the image files under `folder`: (path relative to it, label folder ('' for none)), in sorted order."""
    names = []
    for root, directories, files in os.walk(folder):
        directories.sort()
        for name in sorted(files):
            if is_image_name(name):
                names.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
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
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as error:
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
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, KeyError) as error:
        raise archive_error(path, error) from None


def archive_error(path, error):
    return UsageError(
        f"{path}: the archive is corrupt or truncated ({type(error).__name__}: {shorten(str(error), 80)}); "
        "download or pack it again"
    )


def decode_image(source, size):
    """Reads one image (a file path, or a file's bytes) as uint8 RGB [size, size, 3], or returns None if it cannot."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def decode_images(sources, size):
    """Decodes the images in parallel processes (threads would serialise on the GIL for such small images)."""
    if len(sources) < 2000 or "fork" not in multiprocessing.get_all_start_methods():
        return [decode_image(source, size) for source in sources]
    context = multiprocessing.get_context("fork")
    with warnings.catch_warnings():  # JAX warns about any fork; the workers run Pillow only, never the backend.
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=context) as pool:
            decoded = pool.map(decode_image, sources, [size] * len(sources), chunksize=500)
            return list(tqdm(decoded, total=len(sources), desc="decoding images", unit="image", mininterval=1))


def load_image_folder(data, input_size, max_images, seed):
    """Loads a folder, or a .zip/.tar/.tar.gz archive of one, read in place; class sub-folders (all at the same
    depth) give the labels."""
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
            f"--data={data}: no {'/'.join(IMAGE_EXTENSIONS)} files found; point --data at a folder of images"
        )
    depths = {label.count("/") + 1 if label else 0 for _, label in found}
    if len(depths) > 1:
        examples = {label.count("/") + 1 if label else 0: name for name, label in found}
        raise UsageError(
            f"--data={data}: images sit at different folder depths ({', '.join(examples[d] for d in sorted(examples))}); "
            "put every image one class folder deep (or all directly in the folder for unlabelled data)"
        )
    if max_images and max_images < len(found):
        chosen = np.sort(np.random.default_rng(seed).choice(len(found), max_images, replace=False))
        found = [found[i] for i in chosen]
    decoded = decode_images(read([name for name, _ in found]), input_size)
    unreadable = [name for (name, _), image in zip(found, decoded, strict=True) if image is None]
    if len(unreadable) == len(found):
        raise UsageError(f"--data={data}: none of the {len(found)} image files could be read; check the files")
    if unreadable:
        shown = ", ".join(unreadable[:3])
        print(
            f"warning: skipped {len(unreadable)} unreadable image files of {len(found)} ({shown}{', ...' if len(unreadable) > 3 else ''})"
        )
    kept = [(label, image) for (_, label), image in zip(found, decoded, strict=True) if image is not None]
    names = [member(name) for (name, _), image in zip(found, decoded, strict=True) if image is not None]
    images = np.stack([image for _, image in kept])
    if depths == {0}:
        return Dataset(images, None, None, f"{kind} {data} (no class sub-folders)", names)
    class_names = sorted({label for label, _ in kept})
    labels = np.array([class_names.index(label) for label, _ in kept], dtype=np.int64)
    return Dataset(images, labels, class_names, f"{kind} {data}", names)


CIFAR10_SPLITS = {"cifar10": "train+test", "cifar10-train": "train", "cifar10-test": "test"}


def load_dataset(data, input_size, max_images, seed):
    """Loads the images named by `data`: a CIFAR10_SPLITS name, a cifar-10-batches-py folder, an image folder or an
    archive of one."""
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
        return load_image_folder(data, input_size, max_images, seed)
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
    )
    return subset(~held_out, f"{len(dataset.images) - holdout_images} images"), subset(
        held_out, f"{holdout_images} held-out images"
    )


class Data(NamedTuple):
    """What the data stage gives every later one."""

    train: Dataset  # the images every stage learns on
    eval: Dataset | None  # the images evaluated on and never trained on, or None: the training images are evaluated
    digest: str  # data_fingerprint of `train`, the start of every stage's fingerprint

    def evaluated(self):
        """The split that the last line reports: ("eval", held-out images) when there are some, else ("train", ...)."""
        return ("train", self.train) if self.eval is None else ("eval", self.eval)


def prepare_data(run):
    """Loads DATA (and EVAL_DATA, or holds HOLDOUT_IMAGES out of it) and checks the settings against it: a mistake
    shows here, before anything is written."""
    settings = run.settings
    holdout_for = lambda num_images: holdout_count(settings.holdout_images, settings.holdout_share, num_images)  # noqa: E731
    subset_size = 0
    if settings.max_images:  # MAX_IMAGES to train on, and the hold-out that leaves them
        subset_size = settings.max_images + holdout_for(math.ceil(settings.max_images / (1 - settings.holdout_share)))
    dataset = load_dataset(settings.data, settings.input_size, subset_size, settings.seed)
    eval_set = None
    if settings.holdout_images:
        holdout = holdout_for(len(dataset.images))
        if settings.holdout_share:
            print(
                f"holding out {holdout} of the {len(dataset.images)} images to evaluate on: the recipe's share of your "
                f"own data (a fifth, at most {settings.holdout_images}; --holdout_images=N sets it)"
            )
        dataset, eval_set = split_holdout(dataset, holdout, settings.seed)
    elif settings.eval_data:
        eval_set = load_dataset(settings.eval_data, settings.input_size, 0, settings.seed)
    validate_against_data(settings, len(dataset.images), run.num_devices)
    # A batch of predictions larger than the data (rounded up to whole batches per device) would only be padding.
    whole_batches = math.ceil(len(dataset.images) / run.num_devices) * run.num_devices
    settings.embedding_batch_size = min(settings.embedding_batch_size, whole_batches)
    x_data, y_data, classes = dataset.images, dataset.labels, dataset.class_names
    print(f"data: {dataset.source}")
    print("x_data shape:", x_data.shape, "- y_data shape:", None if y_data is None else y_data.shape)
    if classes is not None:
        print(f"{len(classes)} classes: {', '.join(classes)}")
    if eval_set is not None:
        print(f"evaluation data: {eval_set.source} (never trained on)")
    else:
        print("evaluation data: the training images (set --holdout_images or --eval_data to hold images out)")
    return Data(dataset, eval_set, data_fingerprint(dataset))


"""
### Batches for the training steps

Every training step sees a full batch: after each epoch's shuffle, the `num_rows % batch_size` rows left over wait
for a later epoch (each epoch leaves out others). A step of one shape compiles once, where a smaller last batch
would compile a second step function. The rows (images, or cached features) stay on the accelerator when they fit
(DATA_ON_DEVICE): a batch is then a vector of row indices, and the `DeviceRows` layer at the front of each learner
gathers its rows on the device, so no step copies images from the host.
"""


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


"""
## Implement data preprocessing

The data preprocessing step resizes the input images to the desired `target_size` and applies
feature-wise normalization, with the mean and variance computed from the data.
"""


def create_data_preprocessing(target_size, images):
    data_preprocessing = keras.Sequential([layers.Resizing(target_size, target_size), layers.Normalization()])
    # Compute the mean and the variance from the data for normalization.
    data_preprocessing.layers[-1].adapt(images)
    return data_preprocessing


"""
## Data augmentation

Unlike SimCLR, which randomly picks a single augmentation function, the tutorial applies a set of
augmentation functions to every input image: a random translation, horizontal flip, rotation and zoom,
filled with the nearest pixel. The tutorial's four Keras layers (`AUGMENTATION = "tutorial-layers"`) cannot
be XLA-compiled, which keeps the whole training step out of `jax.jit`. So the default `"tutorial"` draws the
same four transforms from the same ranges and applies them as one batched affine resampling written with
`keras.ops`, which compiles. The transforms are geometric and fill with the nearest pixel, so applying them
to the raw images before the per-channel normalization, as done here, gives the same result as the
tutorial's order. `"simclr"` uses SimCLR's augmentations instead (random resized crop, horizontal flip,
colour jitter, random grayscale).
"""


def create_data_augmentation(kind, seed, output_size=None):
    """The augmentation layer; with `output_size`, its augmented images have that side (VIEW_SIZE)."""
    if kind != "tutorial-layers":
        return ImageAugmentation(kind, seed=seed, output_size=output_size, name="data_augmentation")
    resize = [layers.Resizing(output_size, output_size)] if output_size else []
    return keras.Sequential(
        [
            layers.RandomTranslation(
                height_factor=(-0.2, 0.2), width_factor=(-0.2, 0.2), fill_mode="nearest", seed=seed
            ),
            layers.RandomFlip(mode="horizontal", seed=seed + 1),
            layers.RandomRotation(factor=0.15, fill_mode="nearest", seed=seed + 2),
            layers.RandomZoom(height_factor=(-0.3, 0.1), width_factor=(-0.3, 0.1), fill_mode="nearest", seed=seed + 3),
            *resize,
        ],
        name="data_augmentation",
    )


class ImageAugmentation(layers.Layer):
    """Random augmentation of raw [0, 255] images: one batched affine resampling, then colour operations.

    kind "tutorial": the tutorial's translation (0.2), horizontal flip, rotation (0.15) and zoom (-0.3 to 0.1).
    kind "simclr": random resized crop (area 0.2-1, aspect ratio 3/4-4/3), horizontal flip, colour jitter
    (brightness, contrast, saturation 0.4, hue 0.1) with probability 0.8, grayscale with probability 0.2.
    kind "scan": SCAN's strong augmentation, drawn per image: horizontal flip, 4 operations drawn from its RandAugment
    list with random magnitudes, then a cut-out hole (see "SCAN's strong augmentation" below).
    kind "weak": horizontal flip and a whole-pixel shift of up to 1/8 of the side (the usual CIFAR crop).
    With `output_size`, the resampling writes augmented images of that side directly (no second resize).
    """

    def __init__(self, kind, seed=None, output_size=None, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})  # Pixels stay float32 under mixed precision.
        self.kind = kind
        self.output_size = output_size
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        images = ops.cast(images, self.compute_dtype)
        if not training:
            return images
        # On TensorFlow replicas each augments the global batch and keeps its own rows: the draws are one device's.
        num_rows = ops.shape(images)[0]
        images = gather_replicas(images)
        batch_size, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
        if self.kind == "tutorial":
            parameters = sample_tutorial_parameters(batch_size, self.seed_generator)
            transforms = tutorial_transforms(parameters, height, width)
        elif self.kind == "simclr":
            transforms = random_resized_crop_transforms(batch_size, height, width, self.seed_generator)
        elif self.kind == "scan":
            parameters = sample_randaugment_parameters(batch_size, 4, self.seed_generator)
            transforms = randaugment_transforms(parameters, height, width)
        else:
            transforms = random_shift_transforms(batch_size, height, width, 0.125, self.seed_generator)
        output_size = (self.output_size or height, self.output_size or width)
        if output_size != (height, width):
            transforms = rescale_transforms(transforms, height / output_size[0], width / output_size[1])
        if self.kind == "scan":
            images = scan_strong_augmentation(images, parameters, transforms, output_size)
        else:
            images = affine_resample(images, transforms, output_size)
        if self.kind == "simclr":
            images = random_colour_distortion(images / 255.0, self.seed_generator) * 255.0
        return replica_rows(images, num_rows)


def affine_resample(images, transforms, output_size=None, fill_value=None):
    """Bilinear resampling of images [B, H, W, C] by one affine map per image, edges extended ("nearest" fill), or,
    with `fill_value`, points outside the image (as PIL's nearest pixel sees them) take that value.

    transforms [B, 6] = (a0, a1, a2, b0, b1, b2) map each output pixel (x, y) to the input point
    (a0 x + a1 y + a2, b0 x + b1 y + b2), as in `keras.ops.image.affine_transform`. The output is
    [B, *output_size, C], by default the input's size.
    """
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    output_height, output_width = output_size or (height, width)
    transforms = ops.cast(transforms, "float32")
    ys, xs = ops.meshgrid(
        ops.arange(output_height, dtype="float32"), ops.arange(output_width, dtype="float32"), indexing="ij"
    )
    # Each coefficient [B] -> [B, 1, 1]. (Reshape, not [:, i, None, None]: TensorFlow's graph optimizer can drop
    # the new axes of a slice of a stacked tensor.)
    a0, a1, a2, b0, b1, b2 = [ops.reshape(transforms[:, i], (-1, 1, 1)) for i in range(6)]
    # Source coordinates [B, H, W], clamped so that points outside take the nearest edge pixel.
    x_unclamped, y_unclamped = a0 * xs + a1 * ys + a2, b0 * xs + b1 * ys + b2
    x, y = ops.clip(x_unclamped, 0.0, width - 1.0), ops.clip(y_unclamped, 0.0, height - 1.0)
    x0, y0 = ops.floor(x), ops.floor(y)
    weight_x, weight_y = ops.cast((x - x0)[..., None], images.dtype), ops.cast((y - y0)[..., None], images.dtype)
    x0, y0 = ops.cast(x0, "int32"), ops.cast(y0, "int32")
    x1, y1 = ops.minimum(x0 + 1, width - 1), ops.minimum(y0 + 1, height - 1)
    # pixels shape: [B * H * W, C]; a pixel's row is its image's offset plus y * W + x.
    pixels = ops.reshape(images, (-1, channels))
    offsets = ops.reshape(ops.arange(ops.shape(images)[0], dtype="int32") * (height * width), (-1, 1, 1))
    gather = lambda yy, xx: ops.take(pixels, offsets + yy * width + xx, axis=0)  # noqa: E731  ([B, H, W, C])
    top = gather(y0, x0) * (1 - weight_x) + gather(y0, x1) * weight_x
    bottom = gather(y1, x0) * (1 - weight_x) + gather(y1, x1) * weight_x
    resampled = top * (1 - weight_y) + bottom * weight_y
    if fill_value is None:
        return resampled
    inside = (x_unclamped >= -0.5) & (x_unclamped < width - 0.5) & (y_unclamped >= -0.5) & (y_unclamped < height - 0.5)
    return ops.where(inside[..., None], resampled, ops.cast(fill_value, images.dtype))


def rescale_transforms(transforms, scale_y, scale_x):
    """Affine maps [B, 6] for an output grid `scale_y` x `scale_x` times coarser than the one `transforms` map from:
    the new output pixel (x, y) has its centre at the old output point (scale_x (x + 0.5) - 0.5, ...)."""
    a0, a1, a2, b0, b1, b2 = [transforms[:, i] for i in range(6)]
    offset_x, offset_y = (scale_x - 1) / 2, (scale_y - 1) / 2
    return ops.stack(
        [
            a0 * scale_x, a1 * scale_y, a2 + a0 * offset_x + a1 * offset_y,
            b0 * scale_x, b1 * scale_y, b2 + b0 * offset_x + b1 * offset_y,
        ],
        axis=1,
    )  # fmt: skip


def sample_tutorial_parameters(batch_size, seed):
    """Per-image parameters of the tutorial's four layers, drawn from the same ranges."""
    uniform = lambda low=0.0, high=1.0: keras.random.uniform((batch_size,), low, high, seed=seed)  # noqa: E731
    return {
        "translate_x": uniform(-0.2, 0.2),  # RandomTranslation: a share of the width
        "translate_y": uniform(-0.2, 0.2),  # ... and of the height
        "flip": uniform() < 0.5,  # RandomFlip("horizontal")
        "angle": uniform(-0.15, 0.15) * 2 * np.pi,  # RandomRotation(0.15): a share of a full turn, in radians
        "zoom_x": 1.0 + uniform(-0.3, 0.1),  # RandomZoom(width_factor=(-0.3, 0.1)): below 1 zooms in
        "zoom_y": 1.0 + uniform(-0.3, 0.1),  # RandomZoom(height_factor=(-0.3, 0.1))
    }


def tutorial_transforms(parameters, height, width):
    """Affine maps [B, 6] equal to the tutorial's translate, flip, rotate and zoom layers applied in turn.

    Each layer samples its input at (its matrix) x (output point), so the composed matrix is T F R Z; the
    matrices are those of the Keras layers, about the centre ((W - 1) / 2, (H - 1) / 2).
    """
    angle, zoom_x, zoom_y = parameters["angle"], parameters["zoom_x"], parameters["zoom_y"]
    ones, zeros = ops.ones_like(angle), ops.zeros_like(angle)
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    cos, sin = ops.cos(angle), ops.sin(angle)
    translate = affine_matrices(
        ones, zeros, -parameters["translate_x"] * width, zeros, ones, -parameters["translate_y"] * height
    )
    mirror = ops.where(parameters["flip"], -ones, ones)
    flip = affine_matrices(mirror, zeros, ops.where(parameters["flip"], ones * (width - 1), zeros), zeros, ones, zeros)
    rotate = affine_matrices(
        cos, -sin, centre_x - centre_x * cos + centre_y * sin, sin, cos, centre_y - centre_x * sin - centre_y * cos
    )
    zoom = affine_matrices(zoom_x, zeros, centre_x * (1 - zoom_x), zeros, zoom_y, centre_y * (1 - zoom_y))
    composed = ops.matmul(ops.matmul(translate, flip), ops.matmul(rotate, zoom))
    return ops.reshape(composed[:, :2, :], (-1, 6))  # [B, 2, 3] -> [B, 6]


def affine_matrices(a0, a1, a2, b0, b1, b2):
    """Homogeneous matrices [B, 3, 3] from six coefficient vectors [B]."""
    zeros, ones = ops.zeros_like(a0), ops.ones_like(a0)
    rows = [ops.stack(row, axis=-1) for row in ((a0, a1, a2), (b0, b1, b2), (zeros, zeros, ones))]
    return ops.stack(rows, axis=1)


def random_resized_crop_transforms(batch_size, height, width, seed, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Affine maps [B, 6] of random crops (area share `scale`, aspect `ratio`), resized to the full image and
    flipped horizontally with probability 0.5."""
    uniform = lambda low=0.0, high=1.0: keras.random.uniform((batch_size,), low, high, seed=seed)  # noqa: E731
    area = uniform(*scale)
    aspect = ops.exp(uniform(np.log(ratio[0]), np.log(ratio[1])))
    crop_width = ops.minimum(ops.sqrt(area * aspect), 1.0)  # as a share of the width
    crop_height = ops.minimum(ops.sqrt(area / aspect), 1.0)
    left = uniform() * (1.0 - crop_width) * width
    top = uniform() * (1.0 - crop_height) * height
    flip = uniform() < 0.5
    # Pixel centres: output x + 0.5 lands on left + (x + 0.5) * crop_width; a flip first maps x to W - 1 - x.
    a0 = ops.where(flip, -crop_width, crop_width)
    a2 = left - 0.5 + crop_width * ops.where(flip, width - 0.5, 0.5)
    zeros = ops.zeros_like(a0)
    return ops.stack([a0, zeros, a2, zeros, crop_height, top - 0.5 + 0.5 * crop_height], axis=1)


def random_shift_transforms(batch_size, height, width, max_shift, seed):
    """Affine maps [B, 6] of whole-pixel shifts up to `max_shift` of the side, flipped with probability 0.5."""
    uniform = lambda low, high: keras.random.uniform((batch_size,), low, high, seed=seed)  # noqa: E731
    shift_x = ops.round(uniform(-max_shift, max_shift) * width)
    shift_y = ops.round(uniform(-max_shift, max_shift) * height)
    flip = uniform(0.0, 1.0) < 0.5
    ones, zeros = ops.ones_like(shift_x), ops.zeros_like(shift_x)
    a0 = ops.where(flip, -ones, ones)
    a2 = ops.where(flip, width - 1.0, 0.0) - shift_x
    return ops.stack([a0, zeros, a2, zeros, ones, -shift_y], axis=1)


RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
# A hue rotation by theta is YIQ_TO_RGB @ rotation(theta) @ RGB_TO_YIQ = HUE_FIXED + cos * HUE_COS + sin * HUE_SIN.
HUE_FIXED = np.linalg.inv(RGB_TO_YIQ) @ np.diag([1.0, 0.0, 0.0]) @ RGB_TO_YIQ
HUE_COS = np.linalg.inv(RGB_TO_YIQ) @ np.diag([0.0, 1.0, 1.0]) @ RGB_TO_YIQ
HUE_SIN = np.linalg.inv(RGB_TO_YIQ) @ np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]) @ RGB_TO_YIQ


def grayscale(images):
    """Luma of RGB images [B, H, W, 3] -> [B, H, W, 1] (ITU-R 601 weights)."""
    return ops.sum(images * ops.convert_to_tensor([0.299, 0.587, 0.114], dtype=images.dtype), axis=-1, keepdims=True)


def random_colour_distortion(images, seed, strength=(0.4, 0.4, 0.4, 0.1), jitter_probability=0.8, gray_probability=0.2):
    """SimCLR's colour distortion of [0, 1] images: jitter brightness, contrast, saturation and hue (in that
    order, each clipped to [0, 1]) with probability `jitter_probability`, then grayscale with `gray_probability`."""
    batch_size = ops.shape(images)[0]
    uniform = lambda low=0.0, high=1.0: keras.random.uniform((batch_size, 1, 1, 1), low, high, seed=seed)  # noqa: E731
    brightness, contrast, saturation, hue = strength
    jittered = ops.clip(images * uniform(1 - brightness, 1 + brightness), 0, 1)
    mean = ops.mean(grayscale(jittered), axis=(1, 2, 3), keepdims=True)
    jittered = ops.clip((jittered - mean) * uniform(1 - contrast, 1 + contrast) + mean, 0, 1)
    gray = grayscale(jittered)
    jittered = ops.clip((jittered - gray) * uniform(1 - saturation, 1 + saturation) + gray, 0, 1)
    angle = uniform(-hue, hue)[:, 0, 0] * 2 * np.pi  # [B, 1]
    # hue_matrices shape: [B, 3, 3].
    hue_matrices = HUE_FIXED + ops.cos(angle)[..., None] * HUE_COS + ops.sin(angle)[..., None] * HUE_SIN
    jittered = ops.clip(ops.einsum("bhwc,bdc->bhwd", jittered, ops.cast(hue_matrices, images.dtype)), 0, 1)
    images = ops.where(uniform() < jitter_probability, jittered, images)
    return ops.where(uniform() < gray_probability, ops.repeat(grayscale(images), 3, axis=-1), images)


"""
### SCAN's strong augmentation

SCAN's code (`augmentation_strategy: ours`) flips the image horizontally with probability 0.5, applies 4 operations
drawn with replacement from a RandAugment-like list of 14, each with a magnitude drawn uniformly from its range,
then cuts out one square hole (its side up to half the image) filled with the mean colour. `"scan"` draws all of
this per image and applies it as one batched function: the geometric operations (rotation, shear, translation)
compose into the flip's affine map, resampled once with black fill as PIL does; each of the 4 slots then
applies its drawn pixel operation through per-image selections. Two approximations, both small: the geometry comes
before every pixel operation (SCAN interleaves them in the drawn order), and one bilinear resampling replaces PIL's
nearest-pixel one per operation.
"""

# SCAN's operations (data/augment.py) in its order, with the range its magnitude is drawn from.
RANDAUGMENT_OPERATIONS = [
    ("identity", 0, 1), ("autocontrast", 0, 1), ("equalize", 0, 1), ("rotate", -30, 30), ("solarize", 0, 256),
    ("color", 0.05, 0.95), ("contrast", 0.05, 0.95), ("brightness", 0.05, 0.95), ("sharpness", 0.05, 0.95),
    ("shear_x", -0.1, 0.1), ("translate_x", -0.1, 0.1), ("translate_y", -0.1, 0.1), ("posterize", 4, 8),
    ("shear_y", -0.1, 0.1),
]  # fmt: skip
RANDAUGMENT_INDEX = {name: index for index, (name, _, _) in enumerate(RANDAUGMENT_OPERATIONS)}
# The operations whose sign SCAN flips with probability 0.5 (its `random_mirror`).
MIRRORED_OPERATIONS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def sample_randaugment_parameters(batch_size, num_operations, seed):
    """Per-image draws of SCAN's strong augmentation: a flip [B], and per slot [num_operations, B] the operation's
    index and its signed magnitude; the cut-out hole's centre (shares of the side) and length (share of the side)."""
    uniform = lambda shape=(batch_size,), low=0.0, high=1.0: keras.random.uniform(shape, low, high, seed=seed)  # noqa: E731
    slots = (num_operations, batch_size)
    operations = keras.random.randint(slots, 0, len(RANDAUGMENT_OPERATIONS), seed=seed)
    low = ops.take(ops.convert_to_tensor([low for _, low, _ in RANDAUGMENT_OPERATIONS], "float32"), operations)
    high = ops.take(ops.convert_to_tensor([high for _, _, high in RANDAUGMENT_OPERATIONS], "float32"), operations)
    mirrored = ops.convert_to_tensor([name in MIRRORED_OPERATIONS for name, _, _ in RANDAUGMENT_OPERATIONS])
    sign = ops.where(ops.logical_and(ops.take(mirrored, operations), uniform(slots) < 0.5), -1.0, 1.0)
    return {
        "flip": uniform() < 0.5,
        "operations": operations,
        "magnitudes": sign * (low + uniform(slots) * (high - low)),
        "cutout_y": uniform(),
        "cutout_x": uniform(),
        "cutout_length": uniform(),  # SCAN: an integer from 1 to half the side, uniformly
    }


def randaugment_matrices(operations, magnitudes, height, width):
    """Homogeneous affine maps [B, 3, 3] (output pixel -> input pixel, pixel centres at integers) of one slot's
    operations [B] with magnitudes [B]; the identity for the pixel operations. They are PIL's maps: a rotation by
    the magnitude in degrees, counter-clockwise about the centre; shears and translations (shares of the side)."""
    ones, zeros = ops.ones_like(magnitudes), ops.zeros_like(magnitudes)
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    # PIL's rotate samples at angle -magnitude (in its y-down coordinates).
    cos, sin = ops.cos(-magnitudes * np.pi / 180), ops.sin(-magnitudes * np.pi / 180)
    # PIL's AFFINE (a, b, c, d, e, f) maps pixel centres (x + 0.5, y + 0.5); in pixel indices its offset is
    # c + (a + b - 1) / 2, so a shear also moves the image by half its magnitude.
    maps = {
        "rotate": (cos, sin, centre_x - centre_x * cos - centre_y * sin, -sin, cos, centre_y + centre_x * sin - centre_y * cos),
        "shear_x": (ones, magnitudes, magnitudes / 2, zeros, ones, zeros),
        "shear_y": (ones, zeros, zeros, magnitudes, ones, magnitudes / 2),
        "translate_x": (ones, zeros, magnitudes * width, zeros, ones, zeros),
        "translate_y": (ones, zeros, zeros, zeros, ones, magnitudes * height),
    }  # fmt: skip
    matrices = affine_matrices(ones, zeros, zeros, zeros, ones, zeros)
    for name, coefficients in maps.items():
        selected = ops.reshape(operations == RANDAUGMENT_INDEX[name], (-1, 1, 1))
        matrices = ops.where(selected, affine_matrices(*coefficients), matrices)
    return matrices


def randaugment_transforms(parameters, height, width):
    """Affine maps [B, 6] of the flip followed by every slot's geometric operation, in the drawn order."""
    flip = ops.cast(parameters["flip"], "float32")
    ones, zeros = ops.ones_like(flip), ops.zeros_like(flip)
    composed = affine_matrices(1 - 2 * flip, zeros, flip * (width - 1), zeros, ones, zeros)
    for slot in range(parameters["operations"].shape[0]):
        slot_maps = randaugment_matrices(parameters["operations"][slot], parameters["magnitudes"][slot], height, width)
        composed = ops.matmul(composed, slot_maps)  # Each operation samples the previous one's output.
    return ops.reshape(composed[:, :2, :], (-1, 6))  # [B, 2, 3] -> [B, 6]


def autocontrast(images):
    """PIL's ImageOps.autocontrast of [0, 255] images [B, H, W, C]: each channel stretched to the full range."""
    low = ops.min(images, axis=(1, 2), keepdims=True)
    high = ops.max(images, axis=(1, 2), keepdims=True)
    stretched = (images - low) * (255.0 / ops.maximum(high - low, 1e-3))
    return ops.where(high > low, ops.clip(stretched, 0, 255), images)


def equalize(images):
    """PIL's ImageOps.equalize of [0, 255] images [B, H, W, C]: each channel's levels through its cumulative histogram
    (PIL's step: the pixels outside the top level over 255; a channel with a step of 0 stays as it is)."""
    batch_size, channels = ops.shape(images)[0], images.shape[-1]
    levels = ops.cast(ops.clip(ops.round(images), 0, 255), "int32")
    # bins shape: [B, H, W, C]; each pixel's bin among the B * C histograms of 256 levels.
    image_channel = ops.arange(batch_size, dtype="int32")[:, None, None, None] * channels
    bins = ops.reshape((image_channel + ops.arange(channels, dtype="int32")) * 256 + levels, (-1,))
    histograms = ops.reshape(
        ops.segment_sum(ops.ones_like(bins, dtype="float32"), bins, num_segments=batch_size * channels * 256),
        (-1, 256),
    )  # [B * C, 256]
    top_level = ops.max(ops.reshape(ops.transpose(levels, (0, 3, 1, 2)), (batch_size * channels, -1)), axis=1)
    top_count = ops.take_along_axis(histograms, top_level[:, None], axis=1)[:, 0]
    step = ops.floor((ops.sum(histograms, axis=1) - top_count) / 255.0)[:, None]  # [B * C, 1]
    below = ops.cumsum(histograms, axis=1) - histograms  # pixels below each level
    lookup = ops.clip(ops.floor((ops.floor(step / 2) + below) / ops.maximum(step, 1.0)), 0, 255)
    lookup = ops.where(step > 0, lookup, ops.arange(256, dtype="float32"))
    return ops.reshape(ops.take(ops.reshape(lookup, (-1,)), bins), ops.shape(images))


def solarize(images, threshold):
    """PIL's ImageOps.solarize: levels at or above `threshold` [B, 1, 1, 1] inverted."""
    return ops.where(images < threshold, images, 255.0 - images)


def posterize(images, bits):
    """PIL's ImageOps.posterize: each level keeps its top `bits` [B, 1, 1, 1] bits (SCAN: int of the magnitude)."""
    quantum = 2.0 ** (8 - ops.floor(bits))
    return ops.floor(ops.round(images) / quantum) * quantum


def smooth(images):
    """PIL's ImageFilter.SMOOTH: the 3 x 3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13; the border stays."""
    height, width = images.shape[1], images.shape[2]
    padded = ops.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    total = 4 * images
    for dy in range(3):
        for dx in range(3):
            total = total + padded[:, dy : dy + height, dx : dx + width, :]
    border = np.ones((1, height, width, 1), dtype=bool)
    border[:, 1:-1, 1:-1] = False
    return ops.where(border, images, total / 13.0)


def blend(degenerate, images, factor):
    """PIL's ImageEnhance: `degenerate` + `factor` [B, 1, 1, 1] x (images - degenerate), clipped to [0, 255]."""
    return ops.clip(degenerate + factor * (images - degenerate), 0, 255)


def randaugment_pixel_operation(images, operations, magnitudes):
    """One slot's pixel operations [B] with magnitudes [B] applied to [0, 255] images; the geometric ones (applied by
    the resampling) and the identity leave an image as it is."""
    factor = ops.reshape(magnitudes, (-1, 1, 1, 1))
    gray = grayscale(images)
    mean_gray = ops.round(ops.mean(gray, axis=(1, 2, 3), keepdims=True))  # PIL: int(mean + 0.5) of the L image
    results = {
        "autocontrast": autocontrast(images),
        "equalize": equalize(images),
        "solarize": solarize(images, factor),
        "color": blend(gray, images, factor),
        "contrast": blend(mean_gray, images, factor),
        "brightness": blend(ops.zeros_like(images), images, factor),
        "sharpness": blend(smooth(images), images, factor),
        "posterize": posterize(images, factor),
    }
    for name, result in results.items():
        images = ops.where(ops.reshape(operations == RANDAUGMENT_INDEX[name], (-1, 1, 1, 1)), result, images)
    return images


def cutout(images, centre_y, centre_x, length, fill):
    """SCAN's Cutout: per image, the rows [y - length // 2, y + length // 2) and the same columns around the pixel
    (y, x) (each [B], integers; the hole clipped to the image) take the colour `fill` [C]."""
    height, width = images.shape[1], images.shape[2]
    half, centre_y, centre_x = (ops.reshape(value, (-1, 1)) for value in (length // 2, centre_y, centre_x))
    rows, columns = ops.arange(height, dtype="int32")[None], ops.arange(width, dtype="int32")[None]
    in_rows = ops.logical_and(rows >= centre_y - half, rows < centre_y + half)  # [B, H]
    in_columns = ops.logical_and(columns >= centre_x - half, columns < centre_x + half)  # [B, W]
    hole = ops.logical_and(in_rows[:, :, None, None], in_columns[:, None, :, None])  # [B, H, W, 1]
    return ops.where(hole, ops.cast(fill, images.dtype), images)


def scan_strong_augmentation(images, parameters, transforms, output_size):
    """SCAN's strong view of [0, 255] images: the resampling by `transforms` (flip and geometric operations) with
    black fill, each slot's pixel operation, then the cut-out filled with the batch's mean colour (SCAN's zero after
    normalisation is the data's mean colour)."""
    images = affine_resample(images, transforms, output_size, fill_value=0.0)
    for slot in range(parameters["operations"].shape[0]):
        images = randaugment_pixel_operation(images, parameters["operations"][slot], parameters["magnitudes"][slot])
    height, width = images.shape[1], images.shape[2]
    max_length = max(1, min(height, width) // 2)
    length = 1 + ops.cast(ops.floor(parameters["cutout_length"] * max_length), "int32")
    centre_y = ops.cast(ops.floor(parameters["cutout_y"] * height), "int32")
    centre_x = ops.cast(ops.floor(parameters["cutout_x"] * width), "int32")
    return cutout(images, centre_y, centre_x, length, ops.mean(images, axis=(0, 1, 2)))


def plot_augmentations(image, title, data_augmentation, path):
    """Saves the image and 9 augmented versions of it."""
    figure = plt.figure(figsize=(10, 11))
    figure.add_subplot(4, 3, 2).imshow(image)
    figure.axes[0].set_title(f"original: {title}" if title else "original")
    for i in range(9):
        augmented_images = data_augmentation(image[None].astype("float32"), training=True)
        axis = figure.add_subplot(4, 3, i + 4)
        axis.imshow(np.clip(ops.convert_to_numpy(augmented_images[0]), 0, 255).astype("uint8"))
    for axis in figure.axes:
        axis.axis("off")
    save_figure(figure, path)


class Preprocessing(NamedTuple):
    """What the preprocessing stage gives the learning stages."""

    data_preprocessing: keras.Sequential  # resizes to TARGET_SIZE and normalises as the training images were
    data_augmentation: layers.Layer  # AUGMENTATION's random views, for representation learning and clustering
    image_rows: DeviceRows | None  # the training images held on the device, or None: copied batch by batch


def prepare_preprocessing(run, data):
    """Adapts the normalisation to the training images, creates the augmentation (saving augmentations.png to show
    it), and holds the images on the device where DATA_ON_DEVICE says so."""
    settings, x_data, y_data, classes = run.settings, data.train.images, data.train.labels, data.train.class_names
    data_preprocessing = create_data_preprocessing(settings.target_size, x_data)
    data_augmentation = create_data_augmentation(settings.augmentation, settings.seed)
    image_idx = np.random.default_rng(settings.seed).integers(len(x_data))
    title = classes[y_data[image_idx]] if classes else ""
    plot_augmentations(x_data[image_idx], title, data_augmentation, run.output_path("augmentations.png"))
    # The images every training stage learns on; None when each batch is copied from host memory.
    image_rows = hold_on_device(x_data, settings.data_on_device)
    print(
        f"training images: {x_data.nbytes / 2**20:.0f} MiB, "
        + ("held on the device, where each step gathers its batch" if image_rows else "copied batch by batch")
    )
    return Preprocessing(data_preprocessing, data_augmentation, image_rows)


"""
## Self-supervised representation learning

### Implement the vision encoder

The tutorial's encoder is a ResNet50V2 trained from scratch, followed by a dense layer that outputs the
representation vector. The SCAN paper's CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool, four stages of
two basic blocks, 64-128-256-512 channels) and a small 4-layer CNN, fast enough for a CPU, can replace it.
"""

ENCODER_MINIMUM_SIZES = {"resnet50v2": 32, "resnet18": 8, "small": 8}  # smallest TARGET_SIZE of each encoder


def create_encoder(encoder_name, representation_dim, torch_conventions=False):
    """The backbone, then a dense layer of `representation_dim` units (the tutorial's; none when 0, as in SCAN)."""
    # Any image side: SimCLR may train on smaller views (VIEW_SIZE) than the TARGET_SIZE images it then embeds.
    dense = [layers.Dense(representation_dim)] if representation_dim else []
    return keras.Sequential(
        [keras.Input((None, None, 3)), create_backbone(encoder_name, torch_conventions), *dense], name="encoder"
    )


def create_backbone(encoder_name, torch_conventions=False):
    """The convolutional part of the encoder: images -> pooled features. `torch_conventions` builds the ResNet-18
    and the small CNN as SCAN's PyTorch code does (see `conv_block`); ResNet50V2 is Keras's own."""
    if encoder_name == "resnet50v2":
        return keras.applications.ResNet50V2(include_top=False, weights=None, pooling="avg")
    if encoder_name == "resnet18":
        return create_cifar_resnet18(torch_conventions)
    # The small CNN's first convolution has a bias instead of batch normalisation: normalising its large
    # 32-channel map cost a quarter of a SimCLR step on a CPU and did not change the neighbours' purity.
    return keras.Sequential(
        [
            layers.Conv2D(32, 3, padding="same", kernel_initializer=convolution_initializer(torch_conventions)),
            layers.ReLU(),  # 32x32
            layers.MaxPooling2D(),
            *conv_block(64, torch_conventions=torch_conventions),  # 16x16
            layers.MaxPooling2D(),
            *conv_block(128, torch_conventions=torch_conventions),  # 8x8
            layers.MaxPooling2D(),
            *conv_block(256, torch_conventions=torch_conventions),  # 4x4
            layers.GlobalAveragePooling2D(),
        ],
        name="small_cnn",
    )


def convolution_initializer(torch_conventions):
    """Keras's Glorot-uniform, or SCAN's He-normal of the fan-out (`kaiming_normal_(mode="fan_out")`)."""
    if torch_conventions:
        return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")
    return "glorot_uniform"


def conv_block(filters, strides=1, torch_conventions=False):
    """3x3 convolution, batch normalisation, ReLU.

    With `torch_conventions`, as PyTorch builds them: a stride-2 convolution pads one pixel on every side, so its
    output pixel i is centred on input pixel 2i, where the 1x1 shortcut of a residual block samples (Keras's "same"
    pads only after, centring it on 2i + 1, half a stride away); batch normalisation keeps 0.9 of its running
    statistics per step (PyTorch's momentum 0.1) with epsilon 1e-5; the convolution's init is He-normal.
    """
    padding = [layers.ZeroPadding2D(1)] if torch_conventions and strides != 1 else []
    return [
        *padding,
        layers.Conv2D(
            filters,
            3,
            strides=strides,
            padding="valid" if padding else "same",
            use_bias=False,
            kernel_initializer=convolution_initializer(torch_conventions),
        ),
        batch_normalization(torch_conventions),
        layers.ReLU(),
    ]


def batch_normalization(torch_conventions):
    """Keras's batch normalisation, or PyTorch's: 0.9 of the running statistics kept per step, epsilon 1e-5."""
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5) if torch_conventions else layers.BatchNormalization()


def create_cifar_resnet18(torch_conventions=False):
    """ResNet-18 for 32x32 images, as in the SCAN code: 512 pooled features, about 11.2M parameters."""
    inputs = keras.Input((None, None, 3))
    x = inputs
    for layer in conv_block(64, torch_conventions=torch_conventions):
        x = layer(x)
    for filters, strides in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        x = basic_block(x, filters, strides, torch_conventions)
        x = basic_block(x, filters, 1, torch_conventions)
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(x), name="resnet18")


def basic_block(x, filters, strides, torch_conventions=False):
    """Two 3x3 convolutions with a shortcut, projected by a 1x1 convolution when the shape changes."""
    residual = x
    for layer in conv_block(filters, strides, torch_conventions):
        residual = layer(residual)
    initializer = convolution_initializer(torch_conventions)
    residual = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=initializer)(residual)
    residual = batch_normalization(torch_conventions)(residual)
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False, kernel_initializer=initializer)(x)
        shortcut = batch_normalization(torch_conventions)(shortcut)
    return layers.ReLU()(layers.Add()([residual, shortcut]))


"""
### Implement the unsupervised contrastive loss

The learner produces `num_augmentations` views of each image; the contrastive loss pulls the views of one
image together and pushes other images away.
"""


def tutorial_contrastive_loss(feature_vectors, batch_size, temperature, l2_normalize):
    """The tutorial's contrastive loss, quirks kept, averaged over the rows of the logits matrix."""
    num_augmentations = ops.shape(feature_vectors)[0] // batch_size
    feature_vectors = ops.cast(feature_vectors, "float32")  # Losses stay float32 under mixed precision.
    if l2_normalize:
        feature_vectors = ops.normalize(feature_vectors, axis=-1)
    # The logits shape is [num_augmentations * batch_size, num_augmentations * batch_size].
    logits = ops.matmul(feature_vectors, ops.transpose(feature_vectors)) / temperature
    # Tutorial quirk: the max is taken without keepdims, so column j is shifted by the max of row j.
    logits = logits - ops.max(logits, axis=1)
    # Tutorial quirk: the targets tile the identity, so a view's similarity to itself counts as a positive.
    targets = ops.tile(ops.eye(batch_size), [num_augmentations, num_augmentations])
    # The tutorial differentiates the sum over rows; Adam is invariant to that scale, so the mean is used.
    return ops.mean(keras.losses.categorical_crossentropy(targets, logits, from_logits=True))


def nt_xent_loss(feature_vectors, batch_size, temperature):
    """SimCLR's NT-Xent: each view's positive is the other view of its image; its own similarity is masked out."""
    num_augmentations = ops.shape(feature_vectors)[0] // batch_size
    feature_vectors = ops.normalize(ops.cast(feature_vectors, "float32"), axis=-1)
    # The logits shape is [num_augmentations * batch_size, num_augmentations * batch_size].
    logits = ops.matmul(feature_vectors, ops.transpose(feature_vectors)) / temperature
    is_self = ops.eye(num_augmentations * batch_size, dtype=logits.dtype)
    logits = logits - 1e9 * is_self
    positives = ops.tile(ops.eye(batch_size, dtype=logits.dtype), [num_augmentations, num_augmentations]) - is_self
    targets = positives / ops.cast(num_augmentations - 1, logits.dtype)
    return ops.mean(keras.losses.categorical_crossentropy(targets, logits, from_logits=True))


class RepresentationLearner(keras.Model):
    def __init__(
        self,
        encoder,
        projection_units,
        num_augmentations,
        data_preprocessing,
        data_augmentation,
        temperature=1.0,
        dropout_rate=0.1,
        l2_normalize=False,
        projection_head="tutorial",
        contrastive_loss="tutorial",
        rows=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # With the images on the device (a DeviceRows layer), the inputs are their indices.
        self.rows = rows
        self.encoder = encoder
        # Create projection head: the tutorial's, or SimCLR's two-layer MLP.
        if projection_head == "tutorial":
            head = [
                layers.Dropout(dropout_rate),
                layers.Dense(units=projection_units, use_bias=False),
                layers.BatchNormalization(),
                layers.ReLU(),
            ]
        else:
            head = [layers.Dense(encoder.output_shape[-1], activation="relu"), layers.Dense(projection_units)]
        self.projector = keras.Sequential(head, name="projector")
        self.num_augmentations = num_augmentations
        self.data_preprocessing = data_preprocessing
        self.data_augmentation = data_augmentation
        self.temperature = temperature
        self.l2_normalize = l2_normalize
        self.contrastive_loss = contrastive_loss

    def call(self, inputs, training=False):
        images = inputs if self.rows is None else self.rows(inputs)
        # Create augmented versions of the images: [num_augmentations * batch_size, height, width, 3].
        augmented = ops.concatenate(
            [self.data_augmentation(images, training=training) for _ in range(self.num_augmentations)], axis=0
        )
        # Preprocess the augmented images.
        preprocessed = self.data_preprocessing(augmented)
        # Generate embedding representations of the images.
        features = self.encoder(preprocessed, training=training)
        # Apply projection head.
        return self.projector(features, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # The views of the global batch, view by view: [num_augmentations * batch_size, projection_units].
        views = gather_replicas(ops.reshape(y_pred, (self.num_augmentations, -1, y_pred.shape[-1])), axis=1)
        y_pred, batch_size = ops.reshape(views, (-1, y_pred.shape[-1])), ops.shape(views)[1]
        if self.contrastive_loss == "ntxent":
            return replica_share(nt_xent_loss(y_pred, batch_size, self.temperature))
        return replica_share(tutorial_contrastive_loss(y_pred, batch_size, self.temperature, self.l2_normalize))


"""
### Optimizers and what their weight decay means

The tutorial trains with tensorflow-addons' AdamW, which shrinks every weight by `weight_decay` (1e-4) at each step.
Keras's AdamW (like PyTorch's) multiplies its `weight_decay` by the learning rate first: given 1e-4 at a rate of
1e-3, it would shrink them by 1e-7, in effect not at all. So `WEIGHT_DECAY` keeps the tutorial's meaning: Keras is
given WEIGHT_DECAY / the initial learning rate, so that each step at that rate decays the weights by WEIGHT_DECAY,
and the decay then follows the rate's schedule. SCAN's SimCLR (`REPRESENTATION_OPTIMIZER = "sgd"`) uses PyTorch's
SGD, whose `weight_decay` is an L2 term added to the gradient before the momentum, not a decoupled decay: there
WEIGHT_DECAY is that L2 coefficient, exactly as in SCAN's configuration.
"""


class CoupledWeightDecaySGD(keras.optimizers.SGD):
    """SGD with momentum whose weight decay adds `l2` times each weight to its gradient before the momentum, as
    PyTorch's `torch.optim.SGD(weight_decay=l2)` does (Keras's own `weight_decay` is decoupled). The momentum is
    Keras's (velocity = momentum x velocity - rate x gradient), the same step as PyTorch's at a constant rate."""

    def __init__(self, l2, **kwargs):
        super().__init__(**kwargs)
        self.l2 = l2

    def update_step(self, gradient, variable, learning_rate):
        gradient = ops.cast(gradient, variable.dtype)
        super().update_step(gradient + ops.cast(self.l2, variable.dtype) * variable, variable, learning_rate)


def create_optimizer(name, learning_rate, weight_decay, initial_learning_rate, momentum=0.9, ema_momentum=0.0):
    """The optimizer "adamw" or "sgd" at `learning_rate` (a rate or a schedule that starts from, or warms up to,
    `initial_learning_rate`), with `weight_decay` meaning what the section above says. With `ema_momentum` > 0,
    AdamW also keeps a moving average of the weights, which replaces them when `fit` ends."""
    if name == "sgd":
        return CoupledWeightDecaySGD(weight_decay, learning_rate=learning_rate, momentum=momentum)
    average = {"use_ema": True, "ema_momentum": ema_momentum} if ema_momentum else {}
    return keras.optimizers.AdamW(
        learning_rate=learning_rate, weight_decay=weight_decay / initial_learning_rate, **average
    )


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


def train_representation_learner(
    learner,
    batches,
    epochs,
    learning_rate,
    decay_steps,
    decay_alpha,
    warmup_epochs,
    optimizer,
    weight_decay,
    momentum,
    steps_per_execution,
    checkpoint_seconds,
    backup_dir,
):
    """Trains the contrastive learner on `batches` (RowBatches) with `optimizer` ("adamw" or "sgd"), resuming from
    `backup_dir`; returns the history of every epoch."""
    lr_scheduler = learning_rate_schedule(
        learning_rate, epochs * len(batches), decay_steps, decay_alpha, warmup_epochs * len(batches)
    )
    learner.compile(
        optimizer=create_optimizer(optimizer, lr_scheduler, weight_decay, learning_rate, momentum),
        steps_per_execution=steps_per_execution,
    )
    return fit_resumable(
        learner,
        backup_dir,
        "representation learning",
        "lower --representation_learning_rate or raise --temperature",
        checkpoint_seconds,
        x=batches,
        epochs=epochs,
    )


"""
### Resume interrupted training

At the end of an epoch, once `CHECKPOINT_SECONDS` have passed since the stage started or since the last save,
the weights, the optimizer state and the loss history are saved to the stage's backup folder (like Keras's
`BackupAndRestore`, but atomically, with the history and by time), so a killed run continues from its last saved
epoch and loses at most that much training; a fast GPU does not spend its time writing files every epoch. The
end of a stage is saved as the stage's result. `TerminateOnNaN` stops a diverging stage, which then fails with
advice.

SIGTERM (a preempted cloud machine, `docker stop`, a batch scheduler's time limit) is handled like Ctrl-C, but
training first finishes the epoch it is in and saves it, whatever `CHECKPOINT_SECONDS` says: the epoch-based
resume cannot continue from the middle of an epoch. Outside training, the run stops at once. A second SIGTERM
stops at once too. Give the run an epoch's time to save (`docker stop -t`, the scheduler's grace period).
"""


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
            f"warning: discarding unreadable checkpoint {backup_dir} ({type(error).__name__}); starting the stage again"
        )
        shutil.rmtree(backup_dir)
        return 0, {}
    return state["epoch"], state["history"]


def fit_resumable(
    model, backup_dir, stage, remedy, checkpoint_seconds, callbacks=(), termination=TERMINATION, **fit_arguments
):
    """`model.fit` from the last epoch saved in `backup_dir`, saving at most every `checkpoint_seconds`; returns the
    history of all epochs. `callbacks` run before the checkpoint, so the logs they add are in the history.

    Raises UsageError naming the stage, the epoch and `remedy` when a loss becomes NaN or infinite, and Terminated
    once the epoch during which `termination` (a TerminationRequest) was requested is saved.
    """
    print(
        f"{stage}: training step {'XLA-compiled' if model.jit_compile else 'not XLA-compiled'} (jit_compile={model.jit_compile})"
    )
    batches = fit_arguments["x"]
    left_over = batches.num_rows % batches.batch_size
    print(
        f"{stage}: {len(batches)} steps of {batches.batch_size} per epoch"
        + (f"; after each shuffle, {left_over} rows wait for a later epoch" if left_over else "")
    )
    first_epoch, history = restore_checkpoint(model, backup_dir)
    if first_epoch:
        print(f"{stage}: resuming after epoch {first_epoch} of {fit_arguments['epochs']} (from {backup_dir})")
    checkpoint = EpochCheckpoint(backup_dir, history, checkpoint_seconds, termination)
    callbacks = [keras.callbacks.TerminateOnNaN(), *callbacks, checkpoint]
    synchronize_batch_normalization(model)
    # RowBatches shuffles its rows itself; Keras's shuffle of the batches' order would draw on the global random state.
    with termination.while_training():
        model.fit(
            initial_epoch=first_epoch, callbacks=callbacks, verbose=fit_verbosity(), shuffle=False, **fit_arguments
        )
    for epoch, losses in enumerate(zip(*history.values(), strict=True), start=1):
        if not np.all(np.isfinite(losses)):
            raise UsageError(
                f"{stage} diverged at epoch {epoch} (a loss became NaN or infinite); {remedy}, then run again"
            )
    return history


def fit_verbosity():
    """A live progress bar on a terminal, one line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2


def plot_loss_history(histories, path):
    """Saves the per-epoch curves of `histories` ({name: [value per epoch]})."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, values in histories.items():
        axis.plot(range(1, len(values) + 1), values, label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    axis.legend()
    save_figure(figure, path)


"""
### Train the model

The stage: the contrastive learner trains the encoder, whose weights (with the projection head's) are cached, so
a rerun with the same data and settings reuses them.
"""


class Representation(NamedTuple):
    """What representation learning gives the later stages."""

    encoder: keras.Model  # preprocessed images -> [batch_size, REPRESENTATION_DIM] features
    projected_encoder: keras.Sequential  # the encoder, then SimCLR's projection head (MINING_FEATURES="projection")
    history: dict  # {"loss": [contrastive loss per epoch]}


def learn_representation(run, data, preprocessing):
    """Trains the encoder with SimCLR's contrastive learner (or reuses the cached one); saves representation_loss.png.
    The stage keeps the encoder and the projection head: SCAN's code mines neighbours among the latter's outputs."""
    settings, x_data, image_rows = run.settings, data.train.images, preprocessing.image_rows
    encoder = create_encoder(settings.encoder, settings.representation_dim, settings.torch_conventions)
    # SimCLR's views are VIEW_SIZE-sided when it is set, normalised by the same (already adapted) layer.
    view_preprocessing, view_augmentation = preprocessing.data_preprocessing, preprocessing.data_augmentation
    if settings.view_size:
        resize_views = layers.Resizing(settings.view_size, settings.view_size)
        view_preprocessing = keras.Sequential([resize_views, preprocessing.data_preprocessing.layers[-1]])
        view_augmentation = create_data_augmentation(settings.augmentation, settings.seed, settings.view_size)
    representation_learner = RepresentationLearner(
        encoder,
        settings.projection_units,
        settings.num_augmentations,
        view_preprocessing,
        view_augmentation,
        temperature=settings.temperature,
        dropout_rate=settings.dropout_rate,
        l2_normalize=settings.l2_normalize,
        projection_head=settings.projection_head,
        contrastive_loss=settings.contrastive_loss,
        rows=image_rows,
    )
    # Builds the projection head, so it can be restored.
    representation_learner(np.arange(2) if image_rows else x_data[:2].astype("float32"))
    projected_encoder = keras.Sequential([encoder, representation_learner.projector], name="projected_encoder")
    history = run.cache.trained_model(
        "representation",
        run.fingerprints["representation"],
        "representation learning",
        projected_encoder,
        lambda backup_dir: train_representation_learner(
            representation_learner,
            RowBatches(len(x_data), settings.batch_size, settings.seed, rows=None if image_rows else x_data),
            settings.representation_epochs,
            settings.representation_learning_rate,
            settings.learning_rate_decay_steps,
            settings.learning_rate_decay_alpha,
            settings.warmup_epochs,
            settings.representation_optimizer,
            settings.weight_decay,
            settings.momentum,
            settings.steps_per_execution,
            settings.checkpoint_seconds,
            backup_dir,
        ),
    )
    plot_loss_history({"contrastive loss": history["loss"]}, run.output_path("representation_loss.png"))
    return Representation(encoder, projected_encoder, history)


"""
## Compute the nearest neighbours

### Generate the embeddings for the images

The features of every image are L2-normalised, so a dot product is a cosine similarity. With MINING_FEATURES =
"projection" they are the outputs of SimCLR's projection head, the space the contrastive loss shaped, as in
SCAN's code; the clustering head still learns on the encoder's features.
"""


def compute_embeddings(encoder, images, batch_size, data_preprocessing=None):
    """L2-normalised `encoder` outputs of the images; `data_preprocessing=None` keeps the tutorial's raw-pixel quirk.

    `encoder` may also be the encoder followed by SimCLR's projection head (MINING_FEATURES = "projection").
    """
    # Tutorial quirk: the encoder embeds the raw pixels, without the normalization it was trained with.
    embedder = encoder if data_preprocessing is None else keras.Sequential([data_preprocessing, encoder])
    feature_vectors = predict_in_full_batches(embedder, images, batch_size, verbose=fit_verbosity())
    if not np.isfinite(feature_vectors).all():
        raise UsageError("the encoder produced NaN or infinite features; lower --representation_learning_rate")
    return feature_vectors / np.maximum(np.linalg.norm(feature_vectors, axis=-1, keepdims=True), 1e-12)


"""
### Find the k nearest neighbours for each embedding

Similarities are computed one batch of anchors at a time, so memory stays at `batch_size x num_images`.
Unlike the tutorial, whose loop drops the last `num_images % batch_size` anchors and assumes each image is
its own first match, every image is covered and the image itself is masked out explicitly.
"""


class MostSimilarRows(DeviceRows):
    """Holds feature vectors [num_rows, dims] on the device (float32, under mixed precision too); maps anchors
    [batch_size, dims] to the indices of their `k` most similar rows [batch_size, k], best first."""

    def __init__(self, rows, k, **kwargs):
        super().__init__(rows, dtype="float32", **kwargs)
        self.k = k

    def call(self, anchors):
        # similarities shape: [batch_size, num_rows]; one matmul and one top-k on the device per batch.
        similarities = ops.matmul(anchors, ops.transpose(self.rows))
        return ops.top_k(similarities, k=self.k, sorted=True)[1]


def mine_neighbours(feature_vectors, k_neighbours, batch_size):
    """Returns the indices [num_images, k_neighbours] of each row's most similar other rows, best first."""
    feature_vectors = np.asarray(feature_vectors, dtype="float32")
    num_images = len(feature_vectors)
    # The anchors are batches of a prediction, so they use every device, and the image itself is among the k + 1.
    miner = keras.Sequential([MostSimilarRows(feature_vectors, k_neighbours + 1)], name="neighbour_mining")
    indices = predict_in_full_batches(miner, feature_vectors, batch_size, verbose=fit_verbosity())
    # Keep the best k that are not the image itself: drop it, or the (k+1)-th when it is not among them.
    is_other = indices != np.arange(num_images)[:, None]
    keep = is_other & (np.cumsum(is_other, axis=1) <= k_neighbours)
    return indices[keep].reshape(num_images, k_neighbours).astype(np.int64)


def neighbour_purity(neighbour_indices, labels):
    """The share of mined neighbours whose label equals their anchor's (the SCAN paper's check of the features)."""
    return float(np.mean(labels[neighbour_indices] == labels[:, None]))


def weighted_knn_votes(query_features, reference_features, reference_votes, k=200, temperature=0.1):
    """Each query's `k` most similar reference rows vote with their rows of `reference_votes` [num_references, C]
    (one-hot labels, or cluster probabilities), each weighted by exp(cosine similarity / `temperature`): the kNN
    monitor of SimCLR codebases (SCAN's `MemoryBank.weighted_knn`, lightly's benchmarks). Features are L2-normalised
    rows [n, dims]; returns the votes [num_queries, C], each row normalised to sum to 1."""
    k = min(k, len(reference_features))
    votes = np.zeros((len(query_features), reference_votes.shape[1]), dtype="float32")
    # At most 1,000 queries at a time: memory batch x len(reference), and batch x k x C for the gathered votes.
    batch = max(1, min(1000, 2**25 // (k * reference_votes.shape[1])))
    for start in range(0, len(query_features), batch):
        similarity = query_features[start : start + batch] @ reference_features.T  # [batch, num_references]
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # [batch, k], unordered
        weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)  # [batch, k]
        votes[start : start + batch] = np.einsum("bk,bkc->bc", weights, reference_votes[nearest])
    return votes / votes.sum(axis=1, keepdims=True)


def weighted_knn_accuracy(
    query_features, query_labels, reference_features, reference_labels, num_classes, k=200, temperature=0.1
):
    """The share of query images whose label wins the weighted vote (`weighted_knn_votes`) of their `k` most similar
    reference images."""
    votes = weighted_knn_votes(
        query_features, reference_features, np.eye(num_classes)[reference_labels], k, temperature
    )
    return float(np.mean(votes.argmax(axis=1) == query_labels))


def plot_neighbours(images, labels, class_names, neighbour_indices, anchors, path):
    """Saves one row per anchor: the anchor image, then its neighbours."""
    ncols = neighbour_indices.shape[1] + 1
    figure = plt.figure(figsize=(2 * ncols, 2.2 * len(anchors)))
    for row, anchor_idx in enumerate(anchors):
        for col, image_idx in enumerate([anchor_idx] + neighbour_indices[anchor_idx].tolist()):
            axis = figure.add_subplot(len(anchors), ncols, row * ncols + col + 1)
            axis.imshow(images[image_idx])
            if labels is not None:
                axis.set_title(class_names[labels[image_idx]])
            axis.axis("off")
    save_figure(figure, path)


def mining_embedder(settings, preprocessing, representation):
    """The model that embeds images in the space neighbours are mined in (MINING_FEATURES), with the normalisation
    the encoder learned with unless EMBED_RAW_PIXELS; `compute_embeddings` L2-normalises its outputs."""
    encoder = representation.projected_encoder if settings.mining_features == "projection" else representation.encoder
    return encoder if settings.embed_raw_pixels else keras.Sequential([preprocessing.data_preprocessing, encoder])


class Neighbours(NamedTuple):
    """What the neighbours stage gives clustering and the report."""

    feature_vectors: np.ndarray  # [num_images, dimensions]: the L2-normalised embeddings mined in
    indices: np.ndarray  # [num_images, K_NEIGHBOURS]: each image's nearest neighbours, nearest first
    purity: float | None  # the share of neighbours that share their anchor's label; None without labels
    encoder_features: np.ndarray | None  # [num_images, dimensions]: the encoder's L2-normalised features, if computed
    projection_features: np.ndarray | None  # [num_images, PROJECTION_UNITS]: the projection head's, if computed
    knn_accuracy: float | None  # the evaluation images' weighted kNN accuracy; None without labelled evaluation images


def find_neighbours(run, data, preprocessing, representation, knn_monitor=True):
    """Embeds every training image and mines its K_NEIGHBOURS nearest neighbours (or reuses both from the cache);
    prints their label purity and saves neighbours.png. With `knn_monitor`, and labelled evaluation images, also
    prints their weighted kNN accuracy."""
    settings, x_data, y_data = run.settings, data.train.images, data.train.labels
    feature_vectors = run.cache.array(
        "embeddings",
        run.fingerprints["embeddings"],
        "embeddings",
        lambda: compute_embeddings(
            mining_embedder(settings, preprocessing, representation), x_data, settings.embedding_batch_size
        ),
        # Its size, for the free-space check: rows x features x float32.
        expected_bytes=len(x_data)
        * 4
        * (
            settings.projection_units
            if settings.mining_features == "projection"
            else representation.encoder.output_shape[-1]
        ),
    )
    neighbours = run.cache.array(
        "neighbours",
        run.fingerprints["neighbours"],
        "neighbour mining",
        lambda: mine_neighbours(feature_vectors, settings.k_neighbours, settings.embedding_batch_size),
        expected_bytes=len(x_data) * settings.k_neighbours * 8,  # For the free-space check: int64 indices.
    )
    purity = None if y_data is None else neighbour_purity(neighbours, y_data)
    if purity is not None:
        print(f"neighbour purity: {purity:.2%} of the {settings.k_neighbours} neighbours share their anchor's label")
    anchors = np.random.default_rng(settings.seed + 1).choice(len(x_data), 4, replace=False)
    plot_neighbours(x_data, y_data, data.train.class_names, neighbours, anchors, run.output_path("neighbours.png"))
    # The embeddings are the features of a space, the encoder's or the projection head's, unless they were of raw
    # pixels: the kNN monitor and a head on cached features (HEAD_FEATURES) reuse them.
    mined_space = None if settings.embed_raw_pixels else settings.mining_features
    encoder_features = feature_vectors if mined_space == "encoder" else None
    projection_features = feature_vectors if mined_space == "projection" else None
    knn_accuracy = None
    evaluated = data.eval
    if knn_monitor and y_data is not None and evaluated is not None and evaluated.labels is not None:
        if evaluated.class_names == data.train.class_names:
            # One model embeds both splits, so that its prediction compiles once.
            encoder_embedder = keras.Sequential([preprocessing.data_preprocessing, representation.encoder])
            embed = lambda images: compute_embeddings(encoder_embedder, images, settings.embedding_batch_size)  # noqa: E731
            encoder_features = embed(x_data) if encoder_features is None else encoder_features
            knn_accuracy = weighted_knn_accuracy(
                embed(evaluated.images), evaluated.labels, encoder_features, y_data, len(data.train.class_names)
            )
            print(
                f"kNN accuracy: {knn_accuracy:.2%} of the {len(evaluated.labels)} evaluation images take the label "
                "that their 200 most similar training images vote for (encoder features, temperature 0.1)"
            )
    return Neighbours(feature_vectors, neighbours, purity, encoder_features, projection_features, knn_accuracy)


"""
## Semantic clustering with nearest neighbours

### Implement clustering consistency loss

This loss tries to make sure that neighbours have the same clustering assignments.
"""


class ClustersConsistencyLoss(keras.losses.Loss):
    def __init__(self, from_logits=True, name="clusters_consistency"):
        super().__init__(name=name)
        self.from_logits = from_logits

    def call(self, target, similarity):
        # Set targets to be ones.
        target = ops.ones_like(similarity)
        # Tutorial quirk (from_logits=True): `similarity` is a dot product of probabilities, yet it is treated as
        # a logit. With from_logits=False this is SCAN's loss, -log <p_anchor, p_neighbour>.
        loss = keras.losses.binary_crossentropy(y_true=target, y_pred=similarity, from_logits=self.from_logits)
        return replica_share(ops.mean(loss))


"""
### Implement the clusters entropy loss

This loss tries to make sure that the cluster distribution is roughly uniform, to avoid assigning most of
the instances to one cluster.
"""


class ClustersEntropyLoss(keras.losses.Loss):
    def __init__(self, entropy_loss_weight=1.0, apply_weight=False, name="clusters_entropy"):
        super().__init__(name=name)
        # Tutorial quirk (apply_weight=False): the weight is stored but never used.
        self.entropy_loss_weight = entropy_loss_weight
        self.apply_weight = apply_weight

    def call(self, target, cluster_probabilities):
        # Ideal entropy = log(num_clusters).
        num_clusters = ops.cast(ops.shape(cluster_probabilities)[-1], "float32")
        target = ops.log(num_clusters)
        # Compute the overall clusters distribution: [num_clusters], or [num_heads, num_clusters] (NUM_HEADS > 1).
        cluster_probabilities = ops.mean(gather_replicas(ops.cast(cluster_probabilities, "float32")), axis=0)
        # Replacing zero probabilities - if any - with a very small value.
        cluster_probabilities = ops.clip(cluster_probabilities, 1e-8, 1.0)
        # Compute the entropy over the clusters (of each head, then their mean).
        entropy = ops.mean(-ops.sum(cluster_probabilities * ops.log(cluster_probabilities), axis=-1))
        # Compute the difference between the target and the actual (SCAN: minus the weighted entropy, up to a constant).
        return replica_share((self.entropy_loss_weight if self.apply_weight else 1.0) * (target - entropy))


"""
### Implement clustering model

This model takes a raw image as input, generates its feature vector with the trained encoder, and
produces a probability distribution over the clusters given the feature vector. The learners below apply the
data augmentation to its inputs during training (the tutorial applies it inside; the result is the same).
With CLUSTER_ON_FEATURES (frozen encoder), the head learns instead on the features of the un-augmented images,
computed once: far cheaper, and the standardisation of those features makes the head learn better.
"""


def create_clustering_head(num_clusters, cached_features=None, num_heads=1):
    """The tutorial's softmax layer over the encoder's features: [batch_size, num_clusters] (a Dense layer, then a
    Softmax, so that self-labeling can learn on the logits). With `num_heads` > 1,
    that many softmax layers side by side: [batch_size, num_heads, num_clusters]. When the head learns on
    `cached_features` (CLUSTER_ON_FEATURES), it first L2-normalises and standardises them with their mean and
    variance: on a frozen encoder's features that conditioning is worth several points of accuracy."""
    head = [layers.Dense(units=num_clusters, dtype="float32"), layers.Softmax(dtype="float32")]
    if num_heads > 1:
        head = [
            layers.Dense(units=num_heads * num_clusters, dtype="float32"),
            layers.Reshape((num_heads, num_clusters), dtype="float32"),
            layers.Softmax(dtype="float32"),
        ]
    if cached_features is not None:
        unit_normalize, standardize = layers.UnitNormalization(dtype="float32"), layers.Normalization(dtype="float32")
        standardize.adapt(unit_normalize(cached_features))
        head = [unit_normalize, standardize, *head]
    return keras.Sequential(head, name="clustering_head")


def create_clustering_model(encoder, clustering_head, input_size, data_preprocessing, name=None):
    inputs = keras.Input(shape=(input_size, input_size, 3))
    # Preprocess the input images.
    preprocessed = data_preprocessing(inputs)
    # Generate embedding representations of the images.
    features = encoder(preprocessed)
    # Assign the images to clusters.
    outputs = clustering_head(features)
    # Create the model.
    return keras.Model(inputs=inputs, outputs=outputs, name=name)


"""
### Implement clustering learner

This model receives the anchor images and their neighbours, assigns clusters to all of them with the
clustering model, and produces two outputs:
1. `similarity`: the similarity between the cluster assignments of the anchor and of its neighbours,
   fed to `ClustersConsistencyLoss`;
2. `anchor_clustering`: the cluster assignment of the anchors, fed to `ClustersEntropyLoss`.
The outputs are named after their losses, so the progress lines, `metrics.json` and `clustering_loss.png` read
`consistency_loss`, `entropy_loss` and `loss` (their sum).
"""


def create_clustering_learner(clustering_model, data_augmentation, k_neighbours, row_shape, device_rows=None):
    """`k_neighbours` is the number of neighbours given per anchor: K, or 1 when one is sampled per step.

    The rows are images of `row_shape`, augmented here; or, with CLUSTER_ON_FEATURES, the clustering model is the
    head alone, the rows are cached feature vectors and `data_augmentation` is None. With `device_rows` (a
    DeviceRows layer), the inputs are the rows' indices and the rows are gathered on the device.
    """
    augment = (lambda inputs: inputs) if data_augmentation is None else data_augmentation
    if device_rows is None:
        anchor = keras.Input(shape=row_shape, name="anchors")
        neighbours = keras.Input(shape=(k_neighbours,) + row_shape, name="neighbours")
        anchor_rows, neighbour_rows = anchor, neighbours
    else:
        anchor = keras.Input(shape=(), dtype="int32", name="anchors")
        neighbours = keras.Input(shape=(k_neighbours,), dtype="int32", name="neighbours")
        anchor_rows, neighbour_rows = device_rows(anchor), device_rows(neighbours)
    # Changes neighbours shape to [batch_size * k_neighbours, height, width, channels] (or features).
    neighbours_reshaped = ops.reshape(neighbour_rows, (-1,) + row_shape)
    # anchor_clustering shape: [batch_size, num_clusters] (with NUM_HEADS > 1: [batch_size, num_heads, num_clusters]).
    anchor_clustering = clustering_model(augment(anchor_rows))
    # neighbours_clustering shape: [batch_size * k_neighbours, (num_heads,) num_clusters].
    neighbours_clustering = clustering_model(augment(neighbours_reshaped))
    # Converts neighbours_clustering shape to [batch_size, k_neighbours, (num_heads,) num_clusters].
    neighbours_clustering = ops.reshape(neighbours_clustering, (-1, k_neighbours, *neighbours_clustering.shape[1:]))
    # similarity shape: [batch_size, (num_heads,) k_neighbours]; each head's anchor and neighbour assignments dotted.
    similarity = ops.einsum("b...j,bk...j->b...k", anchor_clustering, neighbours_clustering)
    similarity = layers.Identity(name="consistency")(similarity)
    anchor_clustering = layers.Identity(name="entropy")(anchor_clustering)
    return keras.Model(inputs=[anchor, neighbours], outputs=[similarity, anchor_clustering], name="clustering_learner")


def train_clustering_learner(
    clustering_learner,
    batches,
    epochs,
    learning_rate,
    weight_decay,
    entropy_loss_weight,
    scan_loss,
    steps_per_execution,
    checkpoint_seconds,
    backup_dir,
    callbacks=(),
):
    """Trains the clustering learner on `batches` (RowBatches with neighbours), resuming from `backup_dir`; returns
    the history of every epoch. `callbacks`: e.g. KeepBestEpoch."""
    # Instantiate the model losses: the tutorial's, or SCAN's when `scan_loss`.
    losses = [
        ClustersConsistencyLoss(from_logits=not scan_loss),
        ClustersEntropyLoss(entropy_loss_weight=entropy_loss_weight, apply_weight=scan_loss),
    ]
    clustering_learner.compile(
        optimizer=create_optimizer("adamw", learning_rate, weight_decay, learning_rate),
        loss=losses,
        steps_per_execution=steps_per_execution,
    )
    return fit_resumable(
        clustering_learner,
        backup_dir,
        "clustering",
        "lower --clustering_learning_rate",
        checkpoint_seconds,
        callbacks=callbacks,
        x=batches,
        epochs=epochs,
    )


"""
### Keep the best of several heads

SCAN's code trains NUM_HEADS heads side by side on the same features and keeps the one whose SCAN loss over every
anchor and all its mined neighbours is the lowest: choosing needs no labels, and it leaves behind the heads that
settled on a poor partition.
"""


def scan_head_losses(probabilities, neighbour_indices):
    """Each head's SCAN loss, as SCAN's code ranks heads: mean -log <p_anchor, p_neighbour> over every anchor and all
    its neighbours, plus log(num_clusters) minus the entropy of the mean cluster distribution (the two losses above,
    the entropy unweighted). [num_images, num_heads, num_clusters] -> [num_heads]."""
    consistency_loss, entropy_loss = ClustersConsistencyLoss(from_logits=False), ClustersEntropyLoss()
    losses = []
    for head_probabilities in np.moveaxis(probabilities, 1, 0):  # [num_images, num_clusters]
        # similarity shape: [num_images, k_neighbours].
        similarity = np.einsum("nc,nkc->nk", head_probabilities, head_probabilities[neighbour_indices])
        targets = np.ones(len(similarity), dtype="float32")  # ignored, as in training
        loss = consistency_loss(targets, similarity) + entropy_loss(targets, head_probabilities)
        losses.append(float(ops.convert_to_numpy(loss)))
    return np.array(losses)


def copy_head(heads, head, index):
    """Copies head `index` of the side-by-side `heads` into the single `head`; the layers before their Dense match."""
    for source, target in zip(heads.layers, head.layers, strict=False):  # `heads` ends in Reshape and Softmax
        if isinstance(target, layers.Dense):
            kernel, bias = source.get_weights()
            columns = slice(index * target.units, (index + 1) * target.units)
            target.set_weights([kernel[:, columns], bias[columns]])
            return
        target.set_weights(source.get_weights())


"""
### Keep the best epoch

SCAN's code also evaluates that loss after every clustering epoch and keeps the epoch (and head) where it was
lowest, rather than the last one: the loss needs no labels, and a head can drift after its best epoch.
"""


class KeepBestEpoch(keras.callbacks.Callback):
    """After each epoch, the lowest SCAN loss of `model`'s heads over every row of `inputs` and all its neighbours,
    logged as `scan_loss`; when training ends, `model` gets back the weights of the epoch where it was lowest.

    That epoch's weights and loss are kept in `backup_dir`, so a resumed stage still knows them.
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


"""
### Train the model

Two decisions shape the stage, each made in one place. What the head learns on (`choose_head_inputs`): the images,
through the encoder and the augmentation, as in the tutorial; or, with CLUSTER_ON_FEATURES, the frozen encoder's
features of the un-augmented images, computed once, so each step trains the head alone. SCAN augments every anchor
and neighbour strongly; on a frozen encoder, FEATURE_VIEWS computes (and caches) the features of that many strongly
augmented views of each image, and each anchor and neighbour of a step is drawn among the image's own and its
views'. Either way the head sits on the encoder, or with HEAD_FEATURES = "projection" on SimCLR's projection head
after it (`head_backbone`): the space where the neighbours were mined, whose features the neighbours stage has
already computed. How many heads (`create_clustering_models`): the tutorial's one, or NUM_HEADS side by side, of
which the best is kept. Self-labeling learns on the same inputs.
"""


class HeadInputs(NamedTuple):
    """What the clustering head learns on, in clustering and in self-labeling."""

    on_features: bool  # True: the head alone learns, on the frozen encoder's cached features
    inputs: np.ndarray  # [num_images, ...]: the training images, or their cached features, as the model predicts them
    training_rows: np.ndarray  # what training draws: `inputs`, or with FEATURE_VIEWS [num_images, 1 + views, dims]
    rows: DeviceRows | None  # `training_rows` held on the device, or None: copied batch by batch
    augmentation: layers.Layer | None  # the images' augmentation, FeatureViews, or None: plain features


def head_backbone(representation, head_features):
    """What the clustering head sits on: the encoder (the tutorial, SCAN's code), or with HEAD_FEATURES = "projection"
    the encoder followed by SimCLR's projection head, the space where MINING_FEATURES = "projection" finds each
    image's neighbours."""
    return representation.projected_encoder if head_features == "projection" else representation.encoder


def strong_augmentation_kind(strong_augmentation, augmentation):
    """The kind of augmentation STRONG_AUGMENTATION names: AUGMENTATION's ("augmentation") or SCAN's ("scan")."""
    return augmentation if strong_augmentation == "augmentation" else strong_augmentation


class FeatureViews(layers.Layer):
    """Cached features with their augmented views, rows [batch_size, 1 + views, dims], to [batch_size, dims]: in
    training each row takes one of its 1 + views, drawn at random (the image's own features among them); otherwise,
    or with `draw=False`, the image's own, view 0. It stands in for SCAN's strong augmentation of every anchor and
    neighbour when the head learns on cached features."""

    def __init__(self, draw=True, seed=None, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.draw = draw
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, rows, training=False):
        if not (training and self.draw):
            return rows[:, 0]
        # On TensorFlow replicas each draws for the global batch and keeps its own rows, as ImageAugmentation does.
        num_rows = ops.shape(rows)[0]
        rows = gather_replicas(rows)
        num_views = rows.shape[1]
        views = keras.random.randint((ops.shape(rows)[0],), 0, num_views, seed=self.seed_generator)
        chosen = ops.sum(rows * ops.one_hot(views, num_views, dtype=rows.dtype)[:, :, None], axis=1)
        return replica_rows(chosen, num_rows)


def augmented_features(embedder, images, augmentation, num_views, batch_size):
    """[num_images, num_views, dims]: the L2-normalised `embedder` features of `num_views` views of each image, each
    drawn by `augmentation` (in training mode), batch by batch."""
    views = []
    for _ in range(num_views):
        augmented = np.concatenate(
            [
                ops.convert_to_numpy(augmentation(images[start : start + batch_size].astype("float32"), training=True))
                for start in range(0, len(images), batch_size)
            ]
        )
        views.append(compute_embeddings(embedder, augmented, batch_size))
    return np.stack(views, axis=1)


def choose_head_inputs(run, data, preprocessing, representation, neighbours):
    """The images (the tutorial), or with CLUSTER_ON_FEATURES the frozen encoder's (or projection head's: HEAD_FEATURES)
    features of the un-augmented images, as the neighbours stage computed them or computed here; with FEATURE_VIEWS,
    training draws among them and the features of as many strongly augmented views of each image (cached)."""
    settings = run.settings
    if not settings.cluster_on_features:
        augmentation = preprocessing.data_augmentation
        if settings.strong_augmentation != "augmentation":  # SCAN's strong view (STRONG_AUGMENTATION)
            augmentation = create_data_augmentation(settings.strong_augmentation, settings.seed)
        return HeadInputs(False, data.train.images, data.train.images, preprocessing.image_rows, augmentation)
    backbone = head_backbone(representation, settings.head_features)
    features = neighbours.encoder_features if settings.head_features == "encoder" else neighbours.projection_features
    if features is None:  # The neighbours stage did not compute them.
        features = compute_embeddings(
            backbone, data.train.images, settings.embedding_batch_size, preprocessing.data_preprocessing
        )
    if not settings.feature_views:
        return HeadInputs(True, features, features, hold_on_device(features, settings.data_on_device), None)

    def compute_views():
        started = time.perf_counter()
        kind = strong_augmentation_kind(settings.strong_augmentation, settings.augmentation)
        views = augmented_features(
            keras.Sequential([preprocessing.data_preprocessing, backbone]),
            data.train.images,
            create_data_augmentation(kind, settings.seed + 13),
            settings.feature_views,
            settings.embedding_batch_size,
        )
        print(
            f"feature views: {settings.feature_views} {kind}-augmented view{'s' if settings.feature_views > 1 else ''} "
            f"of each of the {len(features)} training images, embedded in {time.perf_counter() - started:.1f} s"
        )
        return views

    views = run.cache.array(
        "feature_views",
        run.fingerprints["feature_views"],
        "feature views",
        compute_views,
        expected_bytes=features.size * settings.feature_views * 4,  # For the free-space check: float32 features.
    )
    training_rows = np.concatenate([features[:, None], views], axis=1)
    augmentation = FeatureViews(seed=settings.seed)
    return HeadInputs(
        True, features, training_rows, hold_on_device(training_rows, settings.data_on_device), augmentation
    )


class ClusteringModels(NamedTuple):
    """The model the stage keeps, and what trains to make it."""

    model: keras.Model  # the kept clustering model: images -> encoder -> one head -> [batch_size, num_clusters]
    head: keras.Sequential  # its head
    heads: keras.Sequential  # the heads that train: `head` itself, or NUM_HEADS side by side
    training_model: keras.Model  # `heads`, behind the encoder unless the head inputs are features
    self_labeling_model: keras.Model  # what self-labeling trains: `head` alone on features, else `model`


def create_clustering_models(run, preprocessing, representation, head_inputs):
    """The kept model with one head and, when NUM_HEADS > 1, the side-by-side heads that train in its place."""
    settings, backbone = run.settings, head_backbone(representation, run.settings.head_features)
    features = head_inputs.inputs if head_inputs.on_features else None
    head = create_clustering_head(settings.num_clusters, features)
    clustering_model = create_clustering_model(
        backbone, head, settings.input_size, preprocessing.data_preprocessing, name="clustering"
    )
    # SCAN trains NUM_HEADS heads side by side, then keeps the one with the lowest loss; one is the tutorial's.
    heads = head
    if settings.num_heads > 1:
        heads = create_clustering_head(settings.num_clusters, features, settings.num_heads)
    if head_inputs.on_features:
        return ClusteringModels(clustering_model, head, heads, heads, head)
    training_model = clustering_model
    if heads is not head:
        training_model = create_clustering_model(backbone, heads, settings.input_size, preprocessing.data_preprocessing)
    return ClusteringModels(clustering_model, head, heads, training_model, clustering_model)


def keep_best_head(models, head_inputs, neighbour_indices, batch_size):
    """Copies the trained head with the lowest SCAN loss into the kept model's head."""
    probabilities = predict_in_full_batches(models.training_model, head_inputs.inputs, batch_size)
    head_losses = scan_head_losses(probabilities, neighbour_indices)
    best = int(np.argmin(head_losses))
    print(
        f"clustering: kept head {best + 1} of {len(head_losses)}, whose SCAN loss {head_losses[best]:.4f} "
        f"is the lowest (the highest: {head_losses.max():.4f})"
    )
    copy_head(models.heads, models.head, best)


class Clustering(NamedTuple):
    """What clustering gives self-labeling and the cluster analysis."""

    model: keras.Model  # images -> [batch_size, num_clusters] cluster probabilities
    head_inputs: HeadInputs  # what the head learned on; self-labeling learns on the same
    self_labeling_model: keras.Model  # what self-labeling trains: the head alone on features, else `model`
    history: dict  # {loss name: [value per epoch]}


def learn_clusters(run, data, preprocessing, representation, neighbours):
    """Trains the clustering model so that neighbours share clusters (or reuses the cached one); saves
    clustering_loss.png."""
    settings = run.settings
    # If tune_encoder_during_clustering is set to False, then freeze the encoder weights.
    for layer in head_backbone(representation, settings.head_features).layers:
        layer.trainable = settings.tune_encoder_during_clustering
    head_inputs = choose_head_inputs(run, data, preprocessing, representation, neighbours)
    models = create_clustering_models(run, preprocessing, representation, head_inputs)
    neighbours_per_anchor = 1 if settings.sample_one_neighbour else settings.k_neighbours
    inputs, training_rows, rows = head_inputs.inputs, head_inputs.training_rows, head_inputs.rows
    clustering_learner = create_clustering_learner(
        models.training_model, head_inputs.augmentation, neighbours_per_anchor, training_rows.shape[1:], rows
    )

    def train_clustering(backup_dir):
        # With KEEP_BEST_CLUSTERING_EPOCH, the epoch of the lowest SCAN loss is kept, as in SCAN's code.
        keep_best = [
            KeepBestEpoch(
                models.training_model, inputs, neighbours.indices, settings.embedding_batch_size, backup_dir, "clustering"
            )
        ] if settings.keep_best_clustering_epoch else []  # fmt: skip
        history = train_clustering_learner(
            clustering_learner,
            RowBatches(
                len(inputs),
                settings.batch_size,
                settings.seed,
                rows=None if rows else training_rows,
                neighbour_indices=neighbours.indices,
                sample_one_neighbour=settings.sample_one_neighbour,
            ),
            settings.clustering_epochs,
            settings.clustering_learning_rate,
            settings.weight_decay,
            settings.entropy_loss_weight,
            settings.clustering_loss == "scan",
            settings.steps_per_execution,
            settings.checkpoint_seconds,
            backup_dir,
            callbacks=keep_best,
        )
        if models.heads is not models.head:
            keep_best_head(models, head_inputs, neighbours.indices, settings.embedding_batch_size)
        return history

    history = run.cache.trained_model(
        "clustering", run.fingerprints["clustering"], "clustering", models.model, train_clustering
    )
    plot_loss_history(history, run.output_path("clustering_loss.png"))
    return Clustering(models.model, head_inputs, models.self_labeling_model, history)


"""
## Self-labeling

SCAN's last step (not in the tutorial): the clustering model is fine-tuned on its own confident predictions. An
image whose cluster probability exceeds `SELF_LABEL_THRESHOLD` on the image itself (SCAN; or a flipped and shifted
view, `SELF_LABEL_WEAK_VIEW`) takes that cluster as its pseudo-label; the model learns it on a strongly augmented
view (`STRONG_AUGMENTATION`) with cross-entropy on the logits (SCAN's ConfidenceBasedCE), weighted so that every
cluster counts equally. With CLUSTER_ON_FEATURES the head alone learns, on the cached features, which serve as both
views (with FEATURE_VIEWS the strong view is drawn among the image's own and its views' features). `SELF_LABEL_EMA`
ends the stage on a moving average of the weights; `SELF_LABEL_GUARD` keeps the model from before when self-labeling
raised the label-free SCAN loss or emptied a cluster that had confident images.
"""


def self_label_targets(weak_probabilities, threshold):
    """Returns (pseudo-labels, weights) for probabilities [B, K]: weight 0 below `threshold`, else the confident
    count over the count of confident images with the same pseudo-label (class balancing)."""
    num_clusters = ops.shape(weak_probabilities)[-1]
    pseudo_labels = ops.argmax(weak_probabilities, axis=-1)
    confident = ops.cast(ops.max(weak_probabilities, axis=-1) > threshold, "float32")
    # counts shape: [num_clusters]; confident images per pseudo-label.
    counts = ops.sum(ops.one_hot(pseudo_labels, num_clusters) * confident[:, None], axis=0)
    weights = confident * ops.sum(confident) / ops.maximum(ops.take(counts, pseudo_labels), 1.0)
    return pseudo_labels, weights


def self_label_loss(weak_logits, strong_logits, threshold):
    """Class-balanced cross-entropy of the strong view's logits [B, K] against the weak view's confident
    pseudo-labels: log_softmax keeps a gradient however small the pseudo-label's probability."""
    weak_probabilities = ops.softmax(ops.cast(ops.stop_gradient(weak_logits), "float32"), axis=-1)
    pseudo_labels, weights = self_label_targets(weak_probabilities, threshold)
    log_probabilities = ops.log_softmax(ops.cast(strong_logits, "float32"), axis=-1)
    cross_entropy = -ops.take_along_axis(log_probabilities, pseudo_labels[:, None], axis=1)[:, 0]
    return ops.sum(weights * cross_entropy) / ops.maximum(ops.sum(weights), 1e-12)


def clustering_logits_model(clustering_model):
    """The clustering model (or the head alone) without the head's last layer, its softmax: the same layers and
    weights, logits out."""
    if isinstance(clustering_model, keras.Sequential):  # the head, on cached features
        return keras.Sequential(clustering_model.layers[:-1], name="clustering_logits")
    inputs = keras.Input(shape=clustering_model.inputs[0].shape[1:])
    outputs = inputs
    for layer in clustering_model.layers:  # preprocessing, encoder, head: a chain
        if isinstance(layer, layers.InputLayer):
            continue
        for part in layer.layers[:-1] if layer.name == "clustering_head" else [layer]:
            outputs = part(outputs)
    return keras.Model(inputs, outputs, name="clustering_logits")


class SelfLabelLearner(keras.Model):
    def __init__(self, clustering_model, weak_augmentation, strong_augmentation, threshold, rows=None, **kwargs):
        super().__init__(**kwargs)
        # With the rows on the device (a DeviceRows layer), the inputs are their indices.
        self.rows = rows
        self.clustering_logits = clustering_logits_model(clustering_model)
        self.weak_augmentation = weak_augmentation
        self.strong_augmentation = strong_augmentation
        self.threshold = threshold

    def call(self, inputs, training=False):
        # Pseudo-labels come from the weak view (in the same mode, as in SCAN's code): the image itself when there is
        # no weak augmentation; the model learns on the strong view. On cached features both are the features.
        inputs = inputs if self.rows is None else self.rows(inputs)
        weak, strong = inputs, inputs
        if self.weak_augmentation is not None:
            weak = self.weak_augmentation(inputs, training=training)
        if self.strong_augmentation is not None:
            strong = self.strong_augmentation(inputs, training=training)
        return self.clustering_logits(weak, training=training), self.clustering_logits(strong, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        weak_logits, strong_logits = gather_replicas(y_pred[0]), gather_replicas(y_pred[1])
        return replica_share(self_label_loss(weak_logits, strong_logits, self.threshold))


def train_self_labeling(
    learner,
    batches,
    epochs,
    learning_rate,
    weight_decay,
    steps_per_execution,
    checkpoint_seconds,
    backup_dir,
    ema_momentum=0.0,
):
    """Trains the self-label learner on `batches` (RowBatches), resuming from `backup_dir`; returns the history of
    every epoch. With `ema_momentum` > 0, the weights end as their moving average (Keras's optimizer EMA)."""
    learner.compile(
        optimizer=create_optimizer("adamw", learning_rate, weight_decay, learning_rate, ema_momentum=ema_momentum),
        steps_per_execution=steps_per_execution,
    )
    return fit_resumable(
        learner,
        backup_dir,
        "self-labeling",
        "lower --self_label_learning_rate",
        checkpoint_seconds,
        x=batches,
        epochs=epochs,
    )


def self_label_augmentations(weak_view, strong_augmentation, augmentation, seed):
    """Self-labeling's weak and strong augmentations of images: the weak one None ("none": the image itself, as SCAN)
    or a flip and shift ("flip-shift"); the strong one AUGMENTATION's kind ("augmentation") or SCAN's ("scan")."""
    weak = None if weak_view == "none" else ImageAugmentation("weak", seed=seed + 7)
    return weak, create_data_augmentation(strong_augmentation_kind(strong_augmentation, augmentation), seed + 11)


def self_labeling_verdict(before, after, neighbour_indices, threshold):
    """Whether self-labeling, which changed the probabilities [num_images, num_clusters] `before` into `after`, is
    kept: not if a cluster that had images more than `threshold` confident is now empty, nor if it raised the
    label-free SCAN loss over every image and all its neighbours. Returns (keep, the reason in words)."""
    loss_before, loss_after = scan_head_losses(np.stack([before, after], axis=1), neighbour_indices)
    confident_clusters = np.unique(np.argmax(before[np.max(before, axis=-1) > threshold], axis=-1))
    sizes_after = np.bincount(np.argmax(after, axis=-1), minlength=before.shape[-1])
    emptied = [int(cluster) for cluster in confident_clusters if sizes_after[cluster] == 0]
    if emptied:
        return False, f"it emptied {len(emptied)} clusters that had confident images ({', '.join(map(str, emptied))})"
    if loss_after > loss_before:
        return False, f"it raised the SCAN loss from {loss_before:.4f} to {loss_after:.4f}"
    return True, f"the SCAN loss went from {loss_before:.4f} to {loss_after:.4f} and no cluster was emptied"


"""
### Train the model

Self-labeling learns on what clustering learned on (`Clustering.head_inputs`): on images, it fine-tunes the
encoder too, between a weak and a strong augmentation; on cached features, the head alone.
"""


class SelfLabeling(NamedTuple):
    """What self-labeling gives the report."""

    history: dict  # {"loss": [value per epoch]}; {} when it was skipped
    before: dict | None  # accuracy, NMI and ARI of the evaluated split before self-labeling; None without labels


def self_label(run, data, representation, neighbours, clustering):
    """Fine-tunes the clustering model on its own confident predictions (or reuses the cached result); saves
    self_label_loss.png. SCAN reports the accuracy before self-labeling too, so that the stage's own gain (or loss)
    shows."""
    settings, head_inputs = run.settings, clustering.head_inputs
    split, evaluated = data.evaluated()
    before = None
    if evaluated.labels is not None:
        probabilities = predict_in_full_batches(clustering.model, evaluated.images, settings.embedding_batch_size)
        before = split_metrics(probabilities, evaluated.labels, evaluated.class_names)[0]
        del before["matching"]
        print(
            f"self-labeling starts from: {split} split accuracy {before['acc']:.2%}, "
            f"NMI {before['nmi']:.4f}, ARI {before['ari']:.4f}"
        )
    augmentations = (None, None)  # Cached features alone: no augmentation can vary them.
    if isinstance(head_inputs.augmentation, FeatureViews):  # FEATURE_VIEWS: the strong view is drawn among them.
        augmentations = (FeatureViews(draw=False), FeatureViews(seed=settings.seed + 11))
    if not head_inputs.on_features:  # Self-labeling fine-tunes the whole network on images, as in SCAN.
        for layer in head_backbone(representation, settings.head_features).layers:
            layer.trainable = True
        augmentations = self_label_augmentations(
            settings.self_label_weak_view, settings.strong_augmentation, settings.augmentation, settings.seed
        )
    history = run.cache.trained_model(
        "self_labeling",
        run.fingerprints["self_labeling"],
        "self-labeling",
        clustering.model,
        lambda backup_dir: run_self_labeling(
            clustering.self_labeling_model,
            head_inputs,
            augmentations,
            settings,
            backup_dir,
            neighbours.indices,
        ),
    )
    if history:
        plot_loss_history({"self-label loss": history["loss"]}, run.output_path("self_label_loss.png"))
    return SelfLabeling(history, before)


def run_self_labeling(clustering_model, head_inputs, augmentations, settings, backup_dir, neighbour_indices=None):
    """Self-labels the clustering model (or its head, on cached features) unless no image is confident enough; it
    learns on `head_inputs` (HeadInputs); `augmentations` are the weak and the strong one (None: the rows
    themselves). With SELF_LABEL_GUARD, the model from before is kept when self_labeling_verdict on all the inputs and
    their `neighbour_indices` says so. Returns the history."""
    inputs, training_rows, device_rows = head_inputs.inputs, head_inputs.training_rows, head_inputs.rows
    probabilities = predict_in_full_batches(clustering_model, inputs, settings.embedding_batch_size)
    is_confident = np.max(probabilities, axis=-1) > settings.self_label_threshold
    confident = int(np.sum(is_confident))
    # A cluster without a confident image has no pseudo-label to learn: self-labeling can only shrink it.
    confident_clusters = len(np.unique(np.argmax(probabilities[is_confident], axis=-1)))
    print(
        f"self-labeling: {confident} of {len(inputs)} images are more than {settings.self_label_threshold:.0%} "
        f"confident, in {confident_clusters} of {probabilities.shape[-1]} clusters"
    )
    if not confident:
        print("self-labeling: no image passes --self_label_threshold, so the SCAN model is kept as it is")
        return {}
    weights_before = clustering_model.get_weights()
    learner = SelfLabelLearner(clustering_model, *augmentations, settings.self_label_threshold, rows=device_rows)
    # Builds the learner, so that a checkpoint can be restored.
    learner(np.arange(2) if device_rows else training_rows[:2].astype("float32"))
    history = train_self_labeling(
        learner,
        RowBatches(len(inputs), settings.batch_size, settings.seed, rows=None if device_rows else training_rows),
        settings.self_label_epochs,
        settings.self_label_learning_rate,
        settings.weight_decay,
        settings.steps_per_execution,
        settings.checkpoint_seconds,
        backup_dir,
        settings.self_label_ema,
    )
    if settings.self_label_guard and neighbour_indices is not None:
        after = predict_in_full_batches(clustering_model, inputs, settings.embedding_batch_size)
        keep, reason = self_labeling_verdict(probabilities, after, neighbour_indices, settings.self_label_threshold)
        if not keep:
            clustering_model.set_weights(weights_before)
        print(f"self-labeling: {'kept' if keep else 'undone, the clustering model is kept'}: {reason}")
    return history


"""
## Cluster analysis

### Assign images to clusters

Each image goes to its most probable cluster; that probability is its clustering confidence, and the most
confident images of a cluster are its prototypes.
"""


def assign_clusters(clustering_probs):
    """Returns each image's most probable cluster and that probability, its clustering confidence."""
    return np.argmax(clustering_probs, axis=-1), np.max(clustering_probs, axis=-1)


"""
### Compute clustering accuracy

Each cluster gets the majority label of its images; its accuracy is the share of its images with that label.
The overall accuracy is the size-weighted mean, i.e. the share of all images that carry their cluster's
majority label.
"""


def contingency_table(cluster_assignments, labels, num_clusters, num_classes):
    """Returns counts [num_clusters, num_classes]: how many images of each class each cluster holds."""
    counts = np.bincount(cluster_assignments * num_classes + labels, minlength=num_clusters * num_classes)
    return counts.reshape(num_clusters, num_classes)  # [num_clusters * num_classes] -> [num_clusters, num_classes]


def majority_label_report(cluster_assignments, labels, num_clusters, num_classes):
    """Returns sizes, majority labels and accuracies (in %) per cluster, and the overall accuracy (in %)."""
    counts = contingency_table(cluster_assignments, labels, num_clusters, num_classes)
    sizes = counts.sum(axis=1)
    majority_labels = counts.argmax(axis=1)
    correct = counts.max(axis=1)
    accuracies = np.where(sizes > 0, np.round(correct / np.maximum(sizes, 1) * 100, 2), 0.0)
    overall = round(float(correct.sum() / sizes.sum() * 100), 2)
    return {
        "sizes": sizes.tolist(),
        "majority_labels": majority_labels.tolist(),
        "accuracies": accuracies.tolist(),
        "overall_accuracy": overall,
    }


"""
### Hungarian accuracy, NMI and ARI

Beyond the tutorial, the SCAN paper's metrics: the accuracy of the best one-to-one matching of clusters to
classes (the Hungarian method, scipy's `linear_sum_assignment`), normalised mutual information and the
adjusted Rand index (scikit-learn). With more clusters than classes a one-to-one matching leaves clusters
unmatched, so `acc` then uses the many-to-one majority mapping of the report above.
"""


def clustering_scores(cluster_assignments, labels, num_clusters, num_classes):
    """Returns acc, hungarian_acc, majority_acc, nmi, ari, the mapping behind acc, and the matching."""
    counts = contingency_table(cluster_assignments, labels, num_clusters, num_classes)
    matched_clusters, matched_classes = linear_sum_assignment(counts, maximize=True)
    hungarian = counts[matched_clusters, matched_classes].sum() / len(labels)
    majority = counts.max(axis=1).sum() / len(labels)
    many_to_one = num_clusters > num_classes
    return {
        "acc": float(majority if many_to_one else hungarian),
        "accuracy_mapping": "many-to-one majority" if many_to_one else "one-to-one Hungarian",
        "hungarian_acc": float(hungarian),
        "majority_acc": float(majority),
        "nmi": float(normalized_mutual_info_score(labels, cluster_assignments)),
        "ari": float(adjusted_rand_score(labels, cluster_assignments)),
        "matching": {int(c): int(k) for c, k in zip(matched_clusters, matched_classes, strict=True)},
    }


def plot_confusion_matrix(counts, class_names, matching, title, path):
    """Saves the cluster x class counts, clusters ordered by their matched class."""
    order = sorted(range(len(counts)), key=lambda cluster: matching.get(cluster, len(class_names) + cluster))
    figure, axis = plt.subplots(figsize=(1 + 0.6 * len(class_names), 1 + 0.45 * len(counts)))
    axis.imshow(counts[order], cmap="Blues", aspect="auto")
    for row, cluster in enumerate(order):
        for col in range(len(class_names)):
            axis.text(col, row, counts[cluster, col], ha="center", va="center", fontsize=7)
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axis.set_yticks(range(len(order)), [f"cluster {cluster}" for cluster in order])
    axis.set_title(title)
    save_figure(figure, path)


def split_metrics(clustering_probs, labels, class_names):
    """A split's image count and cluster sizes, and with `labels` its SCAN metrics (clustering_scores); returns them
    and each image's cluster."""
    num_clusters = clustering_probs.shape[1]
    cluster_assignments, _ = assign_clusters(clustering_probs)
    metrics = {
        "images": len(clustering_probs),
        "cluster_sizes": np.bincount(cluster_assignments, minlength=num_clusters).tolist(),
    }
    if labels is not None:
        metrics.update(clustering_scores(cluster_assignments, labels, num_clusters, len(class_names)))
    return metrics, cluster_assignments


def evaluate_split(split, description, clustering_probs, labels, class_names, output_path):
    """Prints the SCAN metrics of one split and saves its confusion matrix; returns the metrics."""
    num_clusters = clustering_probs.shape[1]
    metrics, cluster_assignments = split_metrics(clustering_probs, labels, class_names)
    if labels is None:
        print(f"{split} split ({description}): no labels, so no accuracy")
        return metrics
    print(
        f"{split} split ({description}): accuracy {metrics['acc']:.2%} ({metrics['accuracy_mapping']} mapping), "
        f"NMI {metrics['nmi']:.4f}, ARI {metrics['ari']:.4f}"
    )
    if num_clusters > len(class_names):
        print(
            f"  {num_clusters} clusters for {len(class_names)} classes: accuracy maps each cluster to its majority class"
        )
    counts = contingency_table(cluster_assignments, labels, num_clusters, len(class_names))
    title = f"{split} split: {len(labels)} images, accuracy {metrics['acc']:.2%}"
    plot_confusion_matrix(
        counts, class_names, metrics.pop("matching"), title, output_path(f"confusion_matrix_{split}.png")
    )
    return metrics


"""
### Visualise the cluster images

The prototypes of each cluster: its instances with the highest clustering confidence.
"""


def cluster_prototypes(cluster_assignments, cluster_confidence, num_clusters, num_images):
    """Returns, per cluster, the indices of its `num_images` most confident images (fewer if it is small)."""
    prototypes = []
    for cluster in range(num_clusters):
        members = np.flatnonzero(cluster_assignments == cluster)
        prototypes.append(members[np.argsort(-cluster_confidence[members], kind="stable")[:num_images]].tolist())
    return prototypes


def plot_prototypes(images, labels, class_names, prototypes, path):
    """Saves one row per cluster with its prototypes, titled with their labels when known."""
    ncols = max(1, max(len(row) for row in prototypes))
    figure = plt.figure(figsize=(2 * ncols, 2.1 * len(prototypes)))
    for cluster, indices in enumerate(prototypes):
        if not indices:
            axis = figure.add_subplot(len(prototypes), ncols, cluster * ncols + 1)
            axis.set_title(f"c{cluster}: empty")
            axis.axis("off")
        for col, image_idx in enumerate(indices):
            axis = figure.add_subplot(len(prototypes), ncols, cluster * ncols + col + 1)
            axis.imshow(images[image_idx])
            axis.set_title(
                f"c{cluster}: {class_names[labels[image_idx]]}" if labels is not None else f"cluster {cluster}"
            )
            axis.axis("off")
    save_figure(figure, path)


def report_clusters(clustering_probs, labels, class_names, prototypes_per_cluster, images, output_path):
    """Prints the cluster sizes, then each cluster's majority label and accuracy; saves prototypes.png."""
    num_clusters = clustering_probs.shape[1]
    cluster_assignments, cluster_confidence = assign_clusters(clustering_probs)
    sizes = np.bincount(cluster_assignments, minlength=num_clusters)
    for c in range(num_clusters):
        print("cluster", c, ":", sizes[c])
    empty = np.flatnonzero(sizes == 0).tolist()
    if empty:
        print(
            f"warning: {len(empty)} of {num_clusters} clusters ended empty ({', '.join(map(str, empty))}); to keep "
            "every cluster in use, raise --entropy_loss_weight (with --clustering_loss=scan) or lower --num_clusters"
        )
    prototypes = cluster_prototypes(cluster_assignments, cluster_confidence, num_clusters, prototypes_per_cluster)
    plot_prototypes(images, labels, class_names, prototypes, output_path("prototypes.png"))
    metrics = {"cluster_sizes": sizes.tolist()}
    if labels is None:
        print("no labels (a folder without class sub-folders): see prototypes.png for what each cluster holds")
        return metrics
    report = majority_label_report(cluster_assignments, labels, num_clusters, len(class_names))
    for c in range(num_clusters):
        if report["sizes"][c]:
            label = class_names[report["majority_labels"][c]]
            print(f"cluster {c} label is: {label} - accuracy: {report['accuracies'][c]} %")
        else:
            print(f"cluster {c} is empty")
    print(f"overall majority-label accuracy: {report['overall_accuracy']} % of {len(labels)} images")
    metrics["clusters"] = [
        {"cluster": c, "size": size, "label": class_names[label], "accuracy": accuracy}
        for c, (size, label, accuracy) in enumerate(
            zip(report["sizes"], report["majority_labels"], report["accuracies"], strict=True)
        )
    ]
    metrics["overall_accuracy"] = report["overall_accuracy"]
    return metrics


"""
### Analyse the clusters

The stage: every training image's cluster probabilities (cached), the tutorial's report on them, then the SCAN
metrics of each split.

Not in the tutorial or in SCAN: with `PREDICTION_NEIGHBOURS = N` an image's cluster probabilities are the vote of
its N most similar training images (their clustering model's probabilities, weighted by exp(cosine similarity /
0.1), among the embeddings the neighbours were mined in), the weighted kNN classifier of the kNN monitor with the
clusters as labels. A vote overrules the linear head where an image's neighbourhood disagrees with it. On the
`cpu` recipe's three SimCLR encoders it raised the held-out accuracy in each of 27 draws of the clustering stage,
by 1.1 points on average (docs/cpu-recipe.md). New images (ASSIGN_DATA) are voted for by the same training images.
"""


class Analysis(NamedTuple):
    """What the cluster analysis gives the metrics."""

    report: dict  # report_clusters's: cluster sizes and, with labels, each cluster's majority label and accuracy
    splits: dict  # {"train": its metrics, and "eval": the held-out images' when there are some}


def head_predictions(run, data, clustering):
    """The clustering model's probabilities [num_images, NUM_CLUSTERS] for the training images (or the cached ones)."""
    settings = run.settings
    return run.cache.array(
        "predictions",
        run.fingerprints["predictions"],
        "cluster assignment",
        lambda: predict_in_full_batches(
            clustering.model, data.train.images, settings.embedding_batch_size, verbose=fit_verbosity()
        ),
        expected_bytes=len(data.train.images) * settings.num_clusters * 4,  # For the free-space check: float32.
    )


def predict_clusters(settings, clustering_model, embedder, neighbours, train_probabilities, images=None):
    """The cluster probabilities of `images` (None: the training images, whose clustering model's probabilities are
    `train_probabilities`): the clustering model's, or with PREDICTION_NEIGHBOURS the weighted vote of their most
    similar training images' (`weighted_knn_votes` among the mined embeddings; a training image is among its own).
    `embedder` is a new `mining_embedder`: the model the neighbours stage embedded with has had its encoder frozen
    by the clustering stage since, and a data-parallel JAX prediction cannot reuse it."""
    if not settings.prediction_neighbours:
        if images is None:
            return train_probabilities
        return predict_in_full_batches(clustering_model, images, settings.embedding_batch_size)
    queries = (
        neighbours.feature_vectors
        if images is None
        else compute_embeddings(embedder, images, settings.embedding_batch_size)
    )
    return weighted_knn_votes(queries, neighbours.feature_vectors, train_probabilities, settings.prediction_neighbours)


def analyse_clusters(run, data, preprocessing, representation, neighbours, clustering):
    """Assigns every image to a cluster, prints the tutorial's report and each split's accuracy, NMI and ARI, and
    saves prototypes.png and the confusion matrices."""
    settings, train, evaluated = run.settings, data.train, data.eval
    head_probs = head_predictions(run, data, clustering)
    embedder = mining_embedder(settings, preprocessing, representation)
    predict = functools.partial(predict_clusters, settings, clustering.model, embedder, neighbours, head_probs)
    clustering_probs = predict()
    if settings.prediction_neighbours:
        print(
            f"cluster assignment: each image takes the clusters that its {settings.prediction_neighbours} most "
            "similar training images vote for (PREDICTION_NEIGHBOURS), not the clustering model's own"
        )
    labels, class_names = train.labels, train.class_names
    report = report_clusters(
        clustering_probs, labels, class_names, settings.prototypes_per_cluster, train.images, run.output_path
    )
    splits = {
        "train": evaluate_split(
            "train", "the images trained on", clustering_probs, labels, class_names, run.output_path
        )
    }
    assigned = [("train", train, clustering_probs)]
    if evaluated is not None:
        eval_probs = predict(evaluated.images)
        splits["eval"] = evaluate_split(
            "eval", "held-out images", eval_probs, evaluated.labels, evaluated.class_names, run.output_path
        )
        assigned.append(("eval", evaluated, eval_probs))
        if settings.prediction_neighbours and evaluated.labels is not None:
            # What the vote added: the clustering model's own accuracy on the same images.
            head_alone, _ = split_metrics(
                predict_in_full_batches(clustering.model, evaluated.images, settings.embedding_batch_size),
                evaluated.labels,
                evaluated.class_names,
            )
            splits["eval"]["head_acc"] = head_alone["acc"]
            print(f"  the clustering model alone: accuracy {head_alone['acc']:.2%}, NMI {head_alone['nmi']:.4f}")
    save_cluster_table(assigned, run.output_path("clusters.csv"))
    if settings.sheet_images:
        save_contact_sheets(train.images, clustering_probs, settings.sheet_images, run.output_path("clusters"))
    return Analysis(report, splits)


def cluster_table_rows(split, dataset, probabilities):
    """One row per image of `dataset`: split, source (the image as the user knows it), cluster, confidence (that
    cluster's probability) and label (its class name; empty without labels)."""
    clusters, confidence = assign_clusters(probabilities)
    names = dataset.names or [f"{split}:{index}" for index in range(len(clusters))]
    labels = [""] * len(clusters) if dataset.labels is None else [dataset.class_names[i] for i in dataset.labels]
    return [
        (split, name, int(cluster), f"{score:.4f}", label)
        for name, cluster, score, label in zip(names, clusters, confidence, labels, strict=True)
    ]


def contact_sheet(images, title, columns=8, scale=2):
    """A JPEG's bytes: `images` [n, side, side, 3] uint8 in a grid `columns` wide, each `scale` times its size, under
    a line of `title`."""
    side = images.shape[1] * scale
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * side, rows * side + 16), "white")
    ImageDraw.Draw(sheet).text((4, 2), title, fill="black")
    for index, image in enumerate(images):
        tile = Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST)
        sheet.paste(tile, ((index % columns) * side, 16 + (index // columns) * side))
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def save_contact_sheets(images, probabilities, sheet_images, folder):
    """Writes folder/cluster-NN.jpg for each cluster: its `sheet_images` most confident images, most confident first,
    titled with its size; removes the sheets of clusters a previous run had beyond these."""
    num_clusters = probabilities.shape[1]
    clusters, confidence = assign_clusters(probabilities)
    os.makedirs(folder, exist_ok=True)
    for cluster, members in enumerate(cluster_prototypes(clusters, confidence, num_clusters, sheet_images)):
        size = int(np.sum(clusters == cluster))
        title = f"cluster {cluster}: {size} images" + (
            f", the {len(members)} most confident" if size > len(members) else ""
        )
        write_bytes_atomically(
            os.path.join(folder, f"cluster-{cluster:02d}.jpg"), contact_sheet(images[members], title)
        )
    for name in os.listdir(folder):
        if re.fullmatch(r"cluster-(\d+)\.jpg", name) and int(name[8:-4]) >= num_clusters:
            os.remove(os.path.join(folder, name))


def save_cluster_table(assigned, path):
    """Writes clusters.csv: the header, then `cluster_table_rows` of each (split, dataset, probabilities)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["split", "source", "cluster", "confidence", "label"])
    for split, dataset, probabilities in assigned:
        writer.writerows(cluster_table_rows(split, dataset, probabilities))
    write_bytes_atomically(path, text.getvalue().encode())


"""
## Outputs and the stage cache

Every file is written under a temporary name and renamed, so an interrupted run never leaves a truncated
file that a later run would trust. Each stage's result is saved in `OUTPUT_DIR/cache` under a fingerprint
of the data and of the settings behind it and every earlier stage: a re-run skips what is done, and a
changed setting re-runs its stage and the stages after it, never one before.
"""


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


def save_figure(figure, path):
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=80)
    plt.close(figure)
    write_bytes_atomically(path, png.getvalue())


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


def data_fingerprint(dataset):
    """A digest of the images, labels and class names: different data or MAX_IMAGES, different results."""
    digest = hashlib.blake2b(np.ascontiguousarray(dataset.images).data, digest_size=8)
    if dataset.labels is not None:
        digest.update(dataset.labels.astype(np.int64).tobytes())
        digest.update(json.dumps(dataset.class_names).encode())
    return digest.hexdigest()


def warn_if_short_of_space(folder, needed_bytes, title):
    """Prints one warning line when fewer than `needed_bytes` are free in `folder` (or its nearest existing parent);
    returns whether it did."""
    while not os.path.isdir(folder):
        folder = os.path.dirname(os.path.abspath(folder))
    free = shutil.disk_usage(folder).free
    if free >= needed_bytes:
        return False
    print(
        f"warning: {title} will write about {megabytes(needed_bytes)} to {folder}, but only {megabytes(free)} are "
        "free; free space or set --output_dir to another disk"
    )
    return True


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
            print(f"warning: discarding unreadable {path} ({type(error).__name__}); recomputing it")
            os.remove(path)
            return None

    def array(self, stage, fingerprint, title, compute, expected_bytes=0):
        """The stage's array from the cache, or `compute()`, saved there; warns first if fewer than `expected_bytes`
        (rows x columns x item size) are free."""
        path = self.path(stage, fingerprint, ".npy")
        array = self.read(path, lambda path: np.load(path, allow_pickle=False))
        if array is not None:
            print(f"{title}: done before, reusing {path}")
            return array
        self.refuse_to_compute(title)
        warn_if_short_of_space(self.folder, expected_bytes, title)
        self.recomputed = True
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
            print(f"{title}: done before, reusing {weights_path}")
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
    line = f"stage cache: {len(results)} results, {megabytes(total)} in {folder}"
    if prune:
        return line + f" (pruned {len(deleted)} results these settings do not use)"
    return line + " (--prune_cache=true keeps only this run's)"


class StageTimes:
    """The seconds spent in each stage, and what the backend compiled there (a CompilationLog)."""

    def __init__(self, compilation_log):
        self.compilation_log = compilation_log
        self.seconds = {}
        self.compilations = {}

    @contextmanager
    def stage(self, name):
        """Records the seconds spent in the `with` block and prints what was compiled in it."""
        started, mark = time.time(), self.compilation_log.mark()
        yield
        self.seconds[name] = round(time.time() - started, 2)
        compiled = self.compilation_log.since(mark)
        if compiled["programs"]:
            self.compilations[name] = compiled
            steps = "".join(f", {count} {step}" for step, count in compiled["steps"].items())
            print(
                f"{name}: {compiled['programs']} XLA programs{steps} ready in {compiled['seconds']:.1f} s: "
                f"{compiled['programs'] - compiled['from_cache']} compiled, {compiled['from_cache']} loaded from the "
                "compilation cache"
            )


"""
## Run the whole tutorial
"""


def stage_fingerprints(data_digest, settings, stage_settings):
    """Returns {stage: fingerprint}, each chained to the data and to every earlier stage."""
    fingerprints, previous = {}, data_digest
    for stage, names in stage_settings.items():
        previous = fingerprints[stage] = StageCache.fingerprint(
            previous, stage, {name: settings[name] for name in names}
        )
    return fingerprints


@dataclass
class Run:
    """What every stage shares: the settings, the devices, the stage timer and, once the data has passed every check,
    the stage cache with each stage's fingerprint."""

    settings: argparse.Namespace
    gpus: list  # find_gpus()
    num_devices: int  # the devices each step runs data-parallel over
    times: StageTimes
    cache: StageCache | None = None  # set by open_cache
    fingerprints: dict | None = None  # {stage: fingerprint}, set by open_cache

    def output_path(self, name):
        """Where the output `name` (a figure, metrics.json) is written."""
        return os.path.join(self.settings.output_dir, name)

    def open_cache(self, data_digest, stage_settings):
        """Fingerprints every stage (STAGE_SETTINGS: `stage_settings`) and creates the cache folder, with the
        compilation cache in it: the first thing the run writes."""
        self.fingerprints = stage_fingerprints(data_digest, vars(self.settings), stage_settings)
        self.cache = StageCache(os.path.join(self.settings.output_dir, "cache"), self.settings.resume)
        os.makedirs(self.cache.folder, exist_ok=True)
        compiled = os.path.join(self.cache.folder, "compiled")
        if self.settings.compilation_cache and enable_compilation_cache(compiled):
            print(f"compilation cache: {compiled}")


def main(argv=None):
    """Runs every stage in the tutorial's order; returns the metrics that metrics.json records."""
    with open(__file__) as file:
        comments = read_settings_block(file.read())
    defaults = {name: globals()[name] for name in comments}
    settings = parse_settings(argv, defaults, comments, RECIPES, tuple(CIFAR10_SPLITS), renamed_recipes=RENAMED_RECIPES)
    validate_settings(settings, CHOICES)
    process = (0, 1) if settings.distribution == "none" else join_machines(os.environ, keras.backend.backend())
    if process[1] > 1:  # Each process keeps its own results and stage cache, so that a rerun on each resumes.
        settings.output_dir = os.path.join(settings.output_dir, f"process-{process[0]}")
    check_output_dir(settings.output_dir)
    gpus = find_gpus()
    settings.mixed_precision = resolve_mixed_precision(settings.mixed_precision, gpus)
    keras.mixed_precision.set_global_policy(settings.mixed_precision)
    keras.utils.set_random_seed(settings.seed)
    print(
        f"Keras {keras.__version__}, backend {describe_devices(gpus)}, {settings.mixed_precision}, recipe {settings.recipe}"
    )
    if process[1] == 1 and not resolve_distribution(settings.distribution, len(gpus)):
        return train_and_evaluate(settings, gpus, 1, STAGE_SETTINGS)
    if keras.backend.backend() == "tensorflow" and settings.steps_per_execution > 1:
        raise UsageError(
            f"--steps_per_execution={settings.steps_per_execution}: TensorFlow's MirroredStrategy runs one step per "
            "call; set 1, or use KERAS_BACKEND=jax"
        )
    engine, num_devices = start_data_parallel(keras.backend.backend())
    check_divisible("batch_size", settings.batch_size, num_devices)
    processes = f" in {process[1]} processes" if process[1] > 1 else ""
    print(
        f"data-parallel over {num_devices} devices{processes} (global batch {settings.batch_size}, "
        f"{settings.batch_size // num_devices} per device)"
    )
    with engine.scope():
        return train_and_evaluate(settings, gpus, num_devices, STAGE_SETTINGS)


def train_and_evaluate(settings, gpus, num_devices, stage_settings):
    """The stages, in the tutorial's order, on `num_devices` devices; returns the metrics."""
    run = Run(settings, gpus, num_devices, StageTimes(CompilationLog()))
    with run.times.stage("data"):
        data = prepare_data(run)
        new_images = (
            load_assign_data(settings.assign_data, settings.input_size, settings.seed) if settings.assign_data else None
        )
    run.open_cache(data.digest, stage_settings)  # Every check has passed: only now is anything written.
    with run.times.stage("preprocessing"):
        preprocessing = prepare_preprocessing(run, data)
    if settings.assign_data:  # New images into the clusters learned before: every stage comes from the cache.
        return assign_images(run, data, preprocessing, new_images)

    print(f"\n## Self-supervised representation learning: {settings.representation_epochs} epochs")
    with run.times.stage("representation_learning"):
        representation = learn_representation(run, data, preprocessing)

    print("\n## Compute the nearest neighbours")
    with run.times.stage("neighbours"):
        neighbours = find_neighbours(run, data, preprocessing, representation)

    print(f"\n## Semantic clustering with nearest neighbours: {settings.clustering_epochs} epochs")
    with run.times.stage("clustering"):
        clustering = learn_clusters(run, data, preprocessing, representation, neighbours)

    self_labeling = SelfLabeling(history={}, before=None)  # The tutorial ends with clustering.
    if settings.self_label_epochs:
        print(f"\n## Self-labeling: {settings.self_label_epochs} epochs")
        with run.times.stage("self_labeling"):
            self_labeling = self_label(run, data, representation, neighbours, clustering)

    print("\n## Cluster analysis")
    with run.times.stage("cluster_analysis"):
        analysis = analyse_clusters(run, data, preprocessing, representation, neighbours, clustering)
    return write_metrics(run, data, representation, neighbours, clustering, self_labeling, analysis)


def write_metrics(run, data, representation, neighbours, clustering, self_labeling, analysis):
    """Saves metrics.json from every stage's result, prints the stage times and the RESULT line; returns the
    metrics."""
    metrics = {
        **analysis.report,
        "data": data.train.source,
        "images": len(data.train.images),
        "backend": describe_devices(run.gpus),
        "devices": run.num_devices,
        "neighbour_purity": neighbours.purity,
        "knn_accuracy": neighbours.knn_accuracy,
        "splits": analysis.splits,
        "before_self_labeling": self_labeling.before,
        "losses": {
            "representation": representation.history["loss"],
            "clustering": clustering.history,
            "self_labeling": self_labeling.history,
        },
        "timings_seconds": run.times.seconds,
        "compilations": run.times.compilations,
        "settings": vars(run.settings),
    }
    save_json(metrics, run.output_path("metrics.json"))
    times = run.times
    print("\nstage times: " + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in times.seconds.items()))
    if times.compilations:
        compile_seconds = sum(compiled["seconds"] for compiled in times.compilations.values())
        print(f"compilation: {compile_seconds:.1f}s of them in all")
    print(cache_report(run.cache.folder, run.fingerprints, run.settings.prune_cache))  # The cache's size; --prune_cache
    print(f"figures and metrics.json are in {run.settings.output_dir}")
    split, _ = data.evaluated()
    print(result_line(split, analysis.splits[split], run.settings.num_clusters))
    return metrics


def load_assign_data(path, input_size, seed):
    """The images of ASSIGN_DATA (any form DATA takes), with the loader's errors naming --assign_data."""
    try:
        return load_dataset(path, input_size, 0, seed)
    except UsageError as error:
        raise UsageError(str(error).replace(f"--data={path}", f"--assign_data={path}")) from None


def assign_images(run, data, preprocessing, new):
    """Puts the `new` images (ASSIGN_DATA) into the clusters that these settings learned on this data before, training
    nothing: every stage comes from the stage cache, so the model that assigns is the one that run evaluated. Prints
    the cluster sizes; writes assigned.csv and assigned/cluster-NN.jpg; returns the sizes."""
    settings = run.settings
    run.cache.reuse_only = True
    print(f"\n## Assign {settings.assign_data} to the clusters learned before (nothing is trained)")
    representation = learn_representation(run, data, preprocessing)
    # The kNN monitor measured the training run; assigning needs only what the clusters were learned from.
    neighbours = find_neighbours(run, data, preprocessing, representation, knn_monitor=False)
    clustering = learn_clusters(run, data, preprocessing, representation, neighbours)
    if settings.self_label_epochs:
        self_label(run, data, representation, neighbours, clustering)
    train_probabilities = head_predictions(run, data, clustering) if settings.prediction_neighbours else None
    embedder = mining_embedder(settings, preprocessing, representation)
    probabilities = predict_clusters(settings, clustering.model, embedder, neighbours, train_probabilities, new.images)
    sizes = np.bincount(assign_clusters(probabilities)[0], minlength=settings.num_clusters)
    for cluster, size in enumerate(sizes):
        print("cluster", cluster, ":", size)
    save_cluster_table([("assigned", new, probabilities)], run.output_path("assigned.csv"))
    if settings.sheet_images:
        save_contact_sheets(new.images, probabilities, settings.sheet_images, run.output_path("assigned"))
    print(f"assigned {len(new.images)} images of {new.source}: see assigned.csv and assigned/cluster-NN.jpg")
    print(f"RESULT split=assigned images={len(new.images)} clusters={settings.num_clusters}")
    return {"assigned": len(new.images), "cluster_sizes": sizes.tolist()}


def result_line(split, metrics, num_clusters):
    """The last line the script prints: one parseable summary."""
    scores = (
        "" if "acc" not in metrics else f" acc={metrics['acc']:.4f} nmi={metrics['nmi']:.4f} ari={metrics['ari']:.4f}"
    )
    return f"RESULT split={split} images={metrics['images']} clusters={num_clusters}{scores}"


if __name__ == "__main__":
    TERMINATION.install()  # SIGTERM: save the current epoch, then stop like Ctrl-C (exit 143)
    try:
        main()
    except DiskFullError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Skips the interpreter's exit, where HDF5 would crash flushing a weights file that ran out of space.
        os._exit(2)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last completed epoch", file=sys.stderr)
        sys.exit(130)
    except Terminated as error:
        print(f"\n{error}", file=sys.stderr)
        sys.exit(143)
