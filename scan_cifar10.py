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
OUTPUT_DIR, where finished stages are cached and interrupted training resumes: run the same command again. It runs
on TensorFlow (default) or JAX (`KERAS_BACKEND=jax`); with several GPUs, every stage runs data-parallel over all of
them (DISTRIBUTION), each stage's batch size being the global batch.

This file reads as the tutorial: its settings, then its sections in order, each a few lines. The machinery they
stand on lives beside it in the package `scan/`, one module per concern (`scan/__init__.py` lists them).

Measured offline on CIFAR-10's 50,000 training images as JPEG files (full reports: docs/speed.md, docs/cpu-recipe.md
and docs/gpu-recipe.md):
- the tutorial's defaults (60,000 images: mirrored copies of 10,000 in place of its 10,000 test images; 50 + 50 epochs),
  JAX 0.11.2, one NVIDIA H100: 4.9 minutes, 25.05 % overall majority-label accuracy (the tutorial's log: 25.3 %), while
  Keras decayed weights by 1e-7 a step, not the tutorial's 1e-4 (docs/settings.md, "Weight decay"; unmeasured since);
- `--recipe=cpu --data=path/to/cifar10-train-jpeg --num_clusters=10`, TensorFlow 2.21, a 2-core CPU, 2026-11-30:
  17.4 minutes, 48.94 % Hungarian accuracy (NMI 0.352, ARI 0.259) on 10,000 held-out images (self-labeling, since
  dropped from the recipe, was undone by its guard); three SimCLR seeds, nine clustering draws each: 46.6 % on average;
- `--recipe=gpu --data=path/to/cifar10-train-jpeg --num_clusters=10`, JAX 0.11.2, one NVIDIA H200: about 5.1
  minutes summed from the stages of two runs, 56.79 % Hungarian accuracy (NMI 0.445, ARI 0.358) on 10,000 held-out
  images (SCAN reaches 81.8-88.3 % after hours).
"""

import math
import os
import sys
from typing import NamedTuple

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TensorFlow's C++ start-up chatter out of the report.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # The package scan/ beside this file, however run.

try:
    import keras  # the backend must be chosen before Keras is imported
except (ImportError, ValueError) as error:  # an unknown or uninstalled KERAS_BACKEND
    if __name__ != "__main__":
        raise
    print(
        f"error: KERAS_BACKEND={os.environ['KERAS_BACKEND']} cannot be used ({error}); set KERAS_BACKEND=tensorflow or jax",
        file=sys.stderr,
    )
    sys.exit(2)
import numpy as np
from keras import layers, ops

from scan.augmentations import create_data_augmentation, simclr_view_layers
from scan.backend import CompilationLog, gather_replicas, replica_share, set_up_devices, xla_on_cpu
from scan.batches import DeviceRows, RowBatches, hold_on_device
from scan.cache import STAGE_SETTINGS, data_fingerprint
from scan.cluster_count import choose_num_clusters, planned_count_line
from scan.clustering import (
    choose_head_inputs,
    cluster_predictor,
    create_clustering_models,
    head_alone_accuracy,
    head_backbone,
    head_predictions,
    keep_best_head,
)
from scan.data import CIFAR10_SPLITS, describe_data, load_assign_data, load_splits
from scan.losses import (
    ClustersConsistencyLoss,
    ClustersEntropyLoss,
    nt_xent_loss,
    tutorial_contrastive_loss,
    vicreg_loss,
)
from scan.models import create_encoder, create_projection_head
from scan.names import display_name
from scan.neighbours import compute_embeddings, mine_neighbours, mining_embedder, monitor_knn_accuracy, neighbour_purity
from scan.reports import (
    evaluate_split,
    plot_augmentations,
    plot_loss_history,
    plot_neighbours,
    report_clusters,
    save_cluster_outputs,
    save_new_assignments,
    write_metrics,
)
from scan.run import Run, StageTimes
from scan.self_labeling import run_self_labeling, scores_before, self_labeling_views
from scan.settings import parse_settings, read_settings_block, validate_against_data, validate_settings
from scan.sorting import check_sortable_datasets, check_target_outside
from scan.training import KeepBestEpoch, create_optimizer, learning_rate_schedule, run_as_command, train

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
IMAGE_FIT = "crop"  # how a non-square image becomes square: "crop" (its centred square) or "squash" (all of it)
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
TORCH_CONVENTIONS = False  # resnet18/small as SCAN's PyTorch code: stride-2 padding on every side, its init, batch norm
PROJECTION_HEAD = "tutorial"  # "tutorial" (dropout, dense, batch norm, ReLU), "mlp" (dense, ReLU, dense) or "vicreg"
PROJECTION_UNITS = 128  # units of the projection head; "vicreg": of each of its 3 dense layers (with batch norm, ReLU)
PRETEXT_LOSS = "tutorial"  # "tutorial" (its contrastive loss, quirks kept), "ntxent" (SimCLR's) or "vicreg" (VICReg)
NUM_AUGMENTATIONS = 2  # augmented views per image in the pretext loss (>= 2)
SMALL_VIEWS = 0  # extra views per image, SMALL_VIEW_SIZE-sided, each compared with each full view (0 = none)
SMALL_VIEW_SIZE = 16  # side of the small views, below the full views' (with "simclr": crops of 0.2-0.6 of its area)
TEMPERATURE = 0.1  # softmax temperature of the "tutorial" and "ntxent" losses (> 0)
DROPOUT_RATE = 0.1  # dropout before the "tutorial" projection head, in [0, 1)
L2_NORMALIZE = False  # L2-normalise projections in the "tutorial" contrastive loss (NT-Xent always does)
REPRESENTATION_BATCH_SIZE = 512  # images per SimCLR step (the tutorial's batch_size)
REPRESENTATION_EPOCHS = 50  # SimCLR training epochs (the tutorial suggests 500 for better results)
REPRESENTATION_OPTIMIZER = "adamw"  # "adamw" (the tutorial's) or "sgd" (SCAN's SimCLR: momentum 0.9, L2 weight decay)
REPRESENTATION_LEARNING_RATE = 0.001  # initial learning rate of the cosine decay
LEARNING_RATE_DECAY_STEPS = 500  # steps of the cosine decay, then the rate stays at its floor (0 = all steps)
LEARNING_RATE_DECAY_ALPHA = 0.1  # floor of the cosine decay as a fraction of the initial rate
WARMUP_EPOCHS = 0  # epochs over which the SimCLR learning rate first rises linearly from 0 (SimCLR: 10)
WEIGHT_DECAY = 0.0001  # AdamW: shrinks weights this much a step at the initial rate (tutorial); SGD and Adam: L2 (SCAN)

# Neighbours
EMBEDDING_BATCH_SIZE = 500  # images per batch when embedding, mining neighbours and predicting clusters
K_NEIGHBOURS = 5  # neighbours of each image used during cluster learning (>= 1)
MINING_FEATURES = "tutorial"  # neighbours among "tutorial" (the encoder's, of raw pixels: its quirk), "encoder" or "projection" (SCAN) features

# Clustering
NUM_CLUSTERS = 20  # number of clusters (>= 2), or 0: chosen from the data (what your own DATA gets unless it is given)
NUM_HEADS = 1  # clustering heads trained side by side; the one with the lowest SCAN loss is kept
CLUSTERING_LOSS = "tutorial"  # "tutorial" (its quirks kept) or "scan" (-log <p_anchor, p_neighbour>, weighted entropy)
SAMPLE_ONE_NEIGHBOUR = False  # False: each step uses all K neighbours; True: one random neighbour per anchor (SCAN)
ENCODER_DURING_CLUSTERING = "frozen"  # "frozen" (the tutorial), "tuned" (SCAN: the whole network learns) or "cached" (frozen, the head learns on cached features)
FEATURE_VIEWS = 0  # with "cached": strongly augmented views per image whose features the head also learns on (0 = none)
HEAD_FEATURES = "encoder"  # what the clustering head sits on: the "encoder" (tutorial, SCAN) or SimCLR's "projection"
ENTROPY_LOSS_WEIGHT = 5.0  # weight of the entropy term; the "tutorial" loss stores it but never uses it
CLUSTERING_BATCH_SIZE = 512  # anchors per clustering step (the tutorial's batch_size)
CLUSTERING_EPOCHS = 50  # clustering training epochs
CLUSTERING_OPTIMIZER = "adamw"  # clustering and self-labeling: "adamw" (tutorial) or "adam" (SCAN: WEIGHT_DECAY as L2)
CLUSTERING_LEARNING_RATE = 0.0005  # learning rate of cluster learning
KEEP_BEST_CLUSTERING_EPOCH = False  # keep the epoch whose SCAN loss over all images is the lowest (SCAN), not the last

# Self-labeling
SELF_LABEL_EPOCHS = 0  # epochs of training on confident pseudo-labels after clustering (0 = none, as in the tutorial)
SELF_LABEL_THRESHOLD = 0.99  # confidence above which an image's cluster becomes its pseudo-label, in (0, 1)
SELF_LABEL_BATCH_SIZE = 512  # images per self-labeling step
SELF_LABEL_LEARNING_RATE = 0.0001  # learning rate of self-labeling
SELF_LABEL_GUARD = True  # keep the model from before self-labeling if it raised the SCAN loss or emptied a cluster

# Cluster analysis
PREDICTION_NEIGHBOURS = 0  # 0: an image's clusters are the head's; N: the vote of its N most similar training images
PROTOTYPES_PER_CLUSTER = 8  # most confident images shown per cluster in prototypes.png
SHEET_IMAGES = 64  # most confident images on each cluster's contact sheet, clusters/cluster-NN.jpg (0 = no sheets)
SORT_INTO = ""  # a folder to lay the images out in, one sub-folder of links to them per cluster ("" = none)
SORT_COPIES = False  # with SORT_INTO: copies of the images instead of links to them

# Speed
MIXED_PRECISION = "auto"  # "auto" (mixed_bfloat16 on a GPU that has it, else float32), "float32", "mixed_bfloat16"
DATA_ON_DEVICE = "auto"  # keep training images on the accelerator: "auto" (JAX, if they fit), "true", "false"
COMPILATION_CACHE = True  # keep compiled steps in OUTPUT_DIR/cache/compiled (JAX): later runs load them
CHECKPOINT_SECONDS = 60  # save training state at most this often (0 = every epoch); a killed run resumes there
DISTRIBUTION = "auto"  # "auto" (data-parallel when several GPUs are visible), "none", "data_parallel" (all devices)
# --------------------------------------------------------------------------------------- end of settings

# Each recipe is a coherent set of defaults; a setting given on the command line always wins over it.
RECIPES = {
    "tutorial": {},
    # The official SCAN code for CIFAR-10 (its configs/pretext/simclr_cifar10.yml, scan/scan_cifar10.yml and
    # selflabel/selflabel_cifar10.yml): SimCLR with SGD at 0.4 (batch 512), cosine decay to 0.4 x 0.1^3 over 500
    # epochs, L2 weight decay 1e-4, the ResNet-18 built as in PyTorch with no dense layer after it; then one
    # clustering head and the whole network trained by Adam at 1e-4 with L2 1e-4 at batch 128 on 20 neighbours;
    # then self-labeling at batch 1000.
    "scan": {
        "data": "cifar10-train", "eval_data": "cifar10-test", "encoder": "resnet18", "augmentation": "simclr",
        "representation_dim": 0, "torch_conventions": True, "projection_head": "mlp", "pretext_loss": "ntxent",
        "representation_epochs": 500, "representation_optimizer": "sgd", "representation_learning_rate": 0.4,
        "weight_decay": 0.0001, "learning_rate_decay_steps": 0, "learning_rate_decay_alpha": 0.001,
        "mining_features": "projection", "k_neighbours": 20, "num_clusters": 10, "clustering_loss": "scan",
        "sample_one_neighbour": True, "encoder_during_clustering": "tuned", "clustering_batch_size": 128,
        "clustering_epochs": 50, "clustering_optimizer": "adam", "clustering_learning_rate": 0.0001,
        "strong_augmentation": "scan", "keep_best_clustering_epoch": True, "self_label_epochs": 200,
        "self_label_threshold": 0.99, "self_label_batch_size": 1000, "self_label_learning_rate": 0.0001,
    },
    # Meaningful clusters on a 2-core CPU within 20 minutes, evaluated on 10,000 held-out images: nearly all the
    # time goes to SimCLR on 24x24 views, at batch 128 (twice the steps of 256 for the same arithmetic: it learned
    # more); clustering trains the head on cached features, those of the images and of one SCAN-augmented view of
    # each (2.4 points more, on average); each image's clusters are then voted by its 50 most similar training
    # images (1.1 points more on held-out images than the head's own, on average). No self-labeling: its guard
    # undid it in every measured run.
    "cpu": {
        "holdout_images": 10000, "encoder": "small", "augmentation": "simclr", "view_size": 24,
        "projection_head": "mlp", "pretext_loss": "ntxent", "representation_dim": 256,
        "representation_batch_size": 128, "representation_epochs": 40, "learning_rate_decay_steps": 0,
        "learning_rate_decay_alpha": 0.0, "mining_features": "projection", "k_neighbours": 20, "num_clusters": 10,
        "num_heads": 10, "clustering_loss": "scan", "sample_one_neighbour": True,
        "encoder_during_clustering": "cached", "clustering_batch_size": 128, "clustering_epochs": 20,
        "head_features": "projection", "clustering_learning_rate": 0.001, "strong_augmentation": "scan",
        "keep_best_clustering_epoch": True, "prediction_neighbours": 50, "feature_views": 1,
    },
    # SCAN cut to 10 minutes on one GPU, as measured on an H200 (docs/gpu-recipe.md): 200 SimCLR epochs after a
    # 10-epoch warm-up; the clustering head then learns on the frozen encoder's cached features, and self-labeling
    # is off: both scored better than SCAN's tuned encoder and self-labeling at this budget.
    "gpu": {
        "data": "cifar10-train", "eval_data": "cifar10-test", "encoder": "resnet18", "augmentation": "simclr",
        "projection_head": "mlp", "pretext_loss": "ntxent", "representation_epochs": 200, "warmup_epochs": 10,
        "learning_rate_decay_steps": 0, "learning_rate_decay_alpha": 0.0, "mining_features": "projection",
        "k_neighbours": 20, "num_clusters": 10, "num_heads": 10, "clustering_loss": "scan",
        "sample_one_neighbour": True, "encoder_during_clustering": "cached", "clustering_epochs": 20,
        "clustering_learning_rate": 0.001, "self_label_epochs": 0,
        # The measured run's weight decay: Keras's AdamW took 1e-4 times the learning rate 0.001 per step.
        "weight_decay": 1e-7,
    },
}  # fmt: skip


"""
## Prepare the data

The tutorial trains on all 60,000 CIFAR-10 images (train and test concatenated): labels are only used to
evaluate the clusters. `DATA` also accepts a local `cifar-10-batches-py` folder, or any folder of images or archive
of one (`scan/data.py`). The images evaluated are never trained on: `EVAL_DATA`, or `HOLDOUT_IMAGES` held out of
`DATA`; without either, as in the tutorial, the training images themselves.
"""


class Data(NamedTuple):
    """What the data stage gives every later one."""

    train: object  # the Dataset every stage learns on
    eval: object | None  # the Dataset evaluated on and never trained on, or None: the training images are evaluated
    digest: str  # data_fingerprint of `train`, the start of every stage's fingerprint
    new: object | None = None  # the Dataset of ASSIGN_DATA, to put into the clusters learned before, or None

    def evaluated(self):
        """The split that the last line reports: ("eval", held-out images) when there are some, else ("train", ...)."""
        return ("train", self.train) if self.eval is None else ("eval", self.eval)


def prepare_data(run):
    """Loads DATA (and EVAL_DATA, or holds HOLDOUT_IMAGES out of it; and ASSIGN_DATA) and checks the settings against
    it, and what SORT_INTO will sort: a mistake shows here, before anything is written."""
    settings = run.settings
    if settings.sort_into:  # A target inside the data would be read as new photos by the next run.
        inputs = {name: getattr(settings, name) for name in ("data", "eval_data", "assign_data")}
        check_target_outside(settings.sort_into, inputs)
    dataset, eval_set = load_splits(settings)
    new = None
    if settings.assign_data:
        new = load_assign_data(settings.assign_data, settings.input_size, settings.seed, settings.image_fit)
    if settings.sort_into:
        check_sortable_datasets(settings.sort_into, [new] if new is not None else [dataset, eval_set])
    validate_against_data(settings, len(dataset.images), run.num_devices)
    # A batch of predictions larger than the data (rounded up to whole batches per device) would only be padding.
    whole_batches = math.ceil(len(dataset.images) / run.num_devices) * run.num_devices
    settings.embedding_batch_size = min(settings.embedding_batch_size, whole_batches)
    describe_data(dataset, eval_set)  # Its source, the tutorial's x_data and y_data shapes, its classes, the eval data.
    print(planned_count_line(settings.num_clusters))
    return Data(dataset, eval_set, data_fingerprint(dataset), new)


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

Unlike SimCLR, which randomly picks a single augmentation function, the tutorial applies a set of augmentation
functions to every input image: a random translation, horizontal flip, rotation and zoom, filled with the nearest
pixel. They are drawn as the tutorial's layers draw them and applied as one batched affine resampling, which
compiles (`scan/augmentations.py`); `"tutorial-layers"` runs the tutorial's own Keras layers, `"simclr"` SimCLR's
augmentations, and `STRONG_AUGMENTATION = "scan"` SCAN's RandAugment and Cutout in the later stages.
"""


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
    plot_augmentations(x_data[image_idx], title, data_augmentation, run.figure_path("augmentations.png"))
    # The images every training stage learns on; None when each batch is copied from host memory.
    image_rows = hold_on_device(x_data, settings.data_on_device)
    where = "held on the device, where each step gathers its batch" if image_rows else "copied batch by batch"
    print(f"training images: {x_data.nbytes / 2**20:.0f} MiB, {where}")
    return Preprocessing(data_preprocessing, data_augmentation, image_rows)


"""
## Self-supervised representation learning

### Implement the vision encoder

The tutorial's encoder is a ResNet50V2 trained from scratch, followed by a dense layer that outputs the
representation vector. The SCAN paper's CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool, four stages of two basic
blocks, 64-128-256-512 channels) and a small 4-layer CNN, fast enough for a CPU, can replace it
(`scan/models.py: create_encoder`).

### Implement the unsupervised contrastive loss

The learner produces `num_augmentations` views of each image; the contrastive loss pulls the views of one image
together and pushes other images away: the tutorial's own loss, quirks kept, or SimCLR's NT-Xent. Not in the
tutorial, PRETEXT_LOSS = "vicreg" is VICReg (Bardes et al. 2022), which contrasts nothing: it pulls the views of one
image together while it keeps every dimension of the embeddings spread over the batch and the dimensions
uncorrelated; in short schedules it learned more than SimCLR in published runs (EMP-SSL's table, a ResNet-18 on
CIFAR-10: 69.7 % against 56.5 % linear accuracy after 10 epochs). SMALL_VIEWS adds smaller views of each image
(multi-crop, as SwAV and DINO), each compared with every full view at a fraction of its cost (`scan/losses.py`).

### Implement the representation learner
"""


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
        pretext_loss="tutorial",
        rows=None,
        small_views=0,
        small_view_preprocessing=None,
        small_view_augmentation=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # With the images on the device (a DeviceRows layer), the inputs are their indices.
        self.rows = rows
        self.encoder = encoder
        # Create projection head: the tutorial's, SimCLR's two-layer MLP or VICReg's expander.
        self.projector = create_projection_head(
            projection_head, projection_units, encoder.output_shape[-1], dropout_rate
        )
        self.num_augmentations = num_augmentations
        self.data_preprocessing = data_preprocessing
        self.data_augmentation = data_augmentation
        self.temperature = temperature
        self.l2_normalize = l2_normalize
        self.pretext_loss = pretext_loss
        # SMALL_VIEWS: that many more views of each image, smaller, augmented and preprocessed by their own layers.
        self.small_views = small_views
        self.small_view_preprocessing = small_view_preprocessing
        self.small_view_augmentation = small_view_augmentation

    def call(self, inputs, training=False):
        images = inputs if self.rows is None else self.rows(inputs)
        features = self.encode_views(
            images, self.num_augmentations, self.data_augmentation, self.data_preprocessing, training
        )
        if self.small_views:  # A second batch, of another side: the encoder ends in global pooling.
            small_features = self.encode_views(
                images, self.small_views, self.small_view_augmentation, self.small_view_preprocessing, training
            )
            features = ops.concatenate([features, small_features], axis=0)
        # Apply projection head: [(num_augmentations + small_views) * batch_size, projection_units].
        return self.projector(features, training=training)

    def encode_views(self, images, num_views, augmentation, preprocessing, training):
        """The encoder's features of `num_views` augmented views of each image: [num_views * batch_size, dims]."""
        # Create augmented versions of the images: [num_views * batch_size, height, width, 3].
        augmented = ops.concatenate([augmentation(images, training=training) for _ in range(num_views)], axis=0)
        # Preprocess the augmented images.
        preprocessed = preprocessing(augmented)
        # Generate embedding representations of the images.
        return self.encoder(preprocessed, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # The views of the global batch, view by view: [num_augmentations + small_views, batch_size, projection_units].
        units = y_pred.shape[-1]
        views = gather_replicas(ops.reshape(y_pred, (self.num_augmentations + self.small_views, -1, units)), axis=1)
        full, small = views[: self.num_augmentations], views[self.num_augmentations :] if self.small_views else None
        if self.pretext_loss == "vicreg":
            return replica_share(vicreg_loss(full, small))
        # The contrastive losses take the views' rows one after another: [num_views * batch_size, units].
        batch_size, full = ops.shape(views)[1], ops.reshape(full, (-1, units))
        if self.pretext_loss == "ntxent":
            small = None if small is None else ops.reshape(small, (-1, units))
            return replica_share(nt_xent_loss(full, batch_size, self.temperature, small))
        return replica_share(tutorial_contrastive_loss(full, batch_size, self.temperature, self.l2_normalize))


"""
### Train the model

The contrastive learner trains the encoder with the tutorial's AdamW (or SCAN's SGD) on a cosine decay of the
learning rate (`scan/training.py` says what `WEIGHT_DECAY` means for each); the encoder's weights, with the
projection head's, are cached, so a rerun with the same data and settings reuses them.
"""


class Representation(NamedTuple):
    """What representation learning gives the later stages."""

    encoder: keras.Model  # preprocessed images -> [batch_size, REPRESENTATION_DIM] features
    projected_encoder: keras.Sequential  # the encoder, then SimCLR's projection head (MINING_FEATURES="projection")
    history: dict  # {"loss": [pretext loss per epoch]}


def learn_representation(run, data, preprocessing):
    """Trains the encoder with SimCLR's learner on the PRETEXT_LOSS (or reuses the cached one); saves
    representation_loss.png.
    The stage keeps the encoder and the projection head: SCAN's code mines neighbours among the latter's outputs."""
    settings, x_data, image_rows = run.settings, data.train.images, preprocessing.image_rows
    encoder = create_encoder(settings.encoder, settings.representation_dim, settings.torch_conventions)
    # SimCLR's views, VIEW_SIZE-sided when it is set, and the SMALL_VIEWS, normalised by the same (adapted) layer.
    (view_preprocessing, view_augmentation), (small_preprocessing, small_augmentation) = simclr_view_layers(
        settings, preprocessing.data_preprocessing, preprocessing.data_augmentation
    )
    representation_learner = RepresentationLearner(
        encoder, settings.projection_units, settings.num_augmentations, view_preprocessing, view_augmentation,
        temperature=settings.temperature, dropout_rate=settings.dropout_rate, l2_normalize=settings.l2_normalize,
        projection_head=settings.projection_head, pretext_loss=settings.pretext_loss, rows=image_rows,
        small_views=settings.small_views, small_view_preprocessing=small_preprocessing,
        small_view_augmentation=small_augmentation,
    )  # fmt: skip
    # Builds the projection head, so it can be restored.
    representation_learner(np.arange(2) if image_rows else x_data[:2].astype("float32"))
    projected_encoder = keras.Sequential([encoder, representation_learner.projector], name="projected_encoder")

    def train_representation(backup_dir):
        batches = RowBatches(
            len(x_data), settings.representation_batch_size, settings.seed, rows=None if image_rows else x_data
        )
        rate, epochs = settings.representation_learning_rate, settings.representation_epochs
        lr_scheduler = learning_rate_schedule(
            rate, epochs * len(batches), settings.learning_rate_decay_steps, settings.learning_rate_decay_alpha,
            settings.warmup_epochs * len(batches),
        )  # fmt: skip
        optimizer = create_optimizer(settings.representation_optimizer, lr_scheduler, settings.weight_decay, rate)
        temperature = "" if settings.pretext_loss == "vicreg" else " or raise --temperature"
        remedy = f"lower --representation_learning_rate{temperature}"
        return train(
            representation_learner, batches, epochs, optimizer, backup_dir, "representation learning", remedy,
            settings.checkpoint_seconds, jit_compile=xla_on_cpu(representation_learner, epochs * len(batches)),
        )  # fmt: skip

    history = run.cache.trained_model(
        "representation", run.fingerprints["representation"], "representation learning", projected_encoder,
        train_representation,
    )  # fmt: skip
    loss_name = "VICReg loss" if settings.pretext_loss == "vicreg" else "contrastive loss"
    plot_loss_history({loss_name: history["loss"]}, run.figure_path("representation_loss.png"))
    return Representation(encoder, projected_encoder, history)


"""
## Compute the nearest neighbours

### Generate the embeddings for the images

Every image's features are L2-normalised, so a dot product is a cosine similarity. With MINING_FEATURES =
"projection" they are the outputs of SimCLR's projection head, the space the contrastive loss shaped, as in SCAN's
code; the tutorial embeds the raw pixels with the encoder, without the normalisation it learned with (its quirk,
MINING_FEATURES = "tutorial").

### Find the k nearest neighbours for each embedding

Similarities are computed one batch of anchors at a time, on the device (`scan/neighbours.py: mine_neighbours`).
Unlike the tutorial, whose loop drops the last `num_images % batch_size` anchors and assumes each image is its own
first match, every image is covered and the image itself is masked out explicitly.
"""


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
    projection = settings.mining_features == "projection"
    mining_units = settings.projection_units if projection else representation.encoder.output_shape[-1]
    feature_vectors = run.cache.array(
        "embeddings", run.fingerprints["embeddings"], "embeddings",
        lambda: compute_embeddings(
            mining_embedder(settings, preprocessing, representation), x_data, settings.embedding_batch_size
        ),
        expected_bytes=len(x_data) * mining_units * 4,  # For the free-space check: rows x features x float32.
    )  # fmt: skip
    neighbours = run.cache.array(
        "neighbours", run.fingerprints["neighbours"], "neighbour mining",
        lambda: mine_neighbours(feature_vectors, settings.k_neighbours, settings.embedding_batch_size),
        expected_bytes=len(x_data) * settings.k_neighbours * 8,  # For the free-space check: int64 indices.
    )  # fmt: skip
    purity = None if y_data is None else neighbour_purity(neighbours, y_data)
    if purity is not None:
        print(f"neighbour purity: {purity:.2%} of the {settings.k_neighbours} neighbours share their anchor's label")
    anchors = np.random.default_rng(settings.seed + 1).choice(len(x_data), 4, replace=False)
    plot_neighbours(x_data, y_data, data.train.class_names, neighbours, anchors, run.figure_path("neighbours.png"))
    # The embeddings are the features of a space, the encoder's or the projection head's, unless they were of raw
    # pixels: the kNN monitor and a head on cached features (HEAD_FEATURES) reuse them.
    encoder_features = feature_vectors if settings.mining_features == "encoder" else None
    projection_features = feature_vectors if settings.mining_features == "projection" else None
    knn_accuracy = None
    if knn_monitor:
        knn_accuracy, encoder_features = monitor_knn_accuracy(
            settings, data, preprocessing, representation, encoder_features
        )
    return Neighbours(feature_vectors, neighbours, purity, encoder_features, projection_features, knn_accuracy)


"""
## Choose the number of clusters

Not in the tutorial, which is told its 20: with NUM_CLUSTERS = 0 (what your own images get unless --num_clusters is
given), the number is chosen from the neighbours, without labels (`scan/cluster_count.py: choose_num_clusters`).
Each candidate, from 2 up to a number that grows with the data, splits the images by k-means on the features the
neighbours were mined in, scored by how many neighbour links it keeps inside clusters, against chance (its modularity
on the neighbour graph). The best number is chosen, a near-tie going to the larger one. The sweep takes seconds to a
minute and is cached; the stages after it are those of a run given the chosen number.

## Semantic clustering with nearest neighbours

### Implement clustering consistency loss

This loss tries to make sure that neighbours have the same clustering assignments: the binary cross-entropy of
the dot product of their cluster probabilities against 1 (`scan/losses.py: ClustersConsistencyLoss`; the tutorial
treats that product as a logit, its quirk; with CLUSTERING_LOSS = "scan" it is SCAN's -log <p_anchor, p_neighbour>).

### Implement the clusters entropy loss

This loss tries to make sure that the cluster distribution is roughly uniform, to avoid assigning most of the
instances to one cluster: log(num_clusters) minus the entropy of the batch's mean cluster probabilities
(`ClustersEntropyLoss`; the tutorial stores ENTROPY_LOSS_WEIGHT but never applies it, SCAN's loss does).

### Implement clustering model

This model takes a raw image as input, generates its feature vector with the trained encoder, and produces a probability
distribution over the clusters given the feature vector (`scan/models.py: create_clustering_model`). The learner below
applies the data augmentation to its inputs during training (the tutorial applies it inside; the result is the same).

### Implement clustering learner

This model receives the anchor images and their neighbours, assigns clusters to all of them with the clustering
model, and produces two outputs:
1. `similarity`: the similarity between the cluster assignments of the anchor and of its neighbours, fed to
   `ClustersConsistencyLoss`;
2. `anchor_clustering`: the cluster assignment of the anchors, fed to `ClustersEntropyLoss`.
The outputs are named after their losses, so the progress lines, `metrics.json` and `clustering_loss.png` read
`consistency_loss`, `entropy_loss` and `loss` (their sum).
"""


def create_clustering_learner(clustering_model, data_augmentation, k_neighbours, row_shape, device_rows=None):
    """`k_neighbours` is the number of neighbours given per anchor: K, or 1 when one is sampled per step. The rows are
    images of `row_shape`, augmented here; or, on cached features, the clustering model is the head alone, the rows are
    feature vectors and `data_augmentation` is None or FeatureViews. With `device_rows` (a DeviceRows layer), the inputs
    are the rows' indices and the rows are gathered on the device."""
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


"""
### Train the model

What the head learns on is one choice (ENCODER_DURING_CLUSTERING, `scan/clustering.py: choose_head_inputs`): the
images through the frozen encoder (the tutorial) or through the encoder trained too (SCAN), or the frozen encoder's
cached features, on which each step trains the head alone. SCAN trains NUM_HEADS heads side by side and keeps the
one whose label-free SCAN loss is the lowest, and with KEEP_BEST_CLUSTERING_EPOCH the epoch where it was lowest.
"""


class Clustering(NamedTuple):
    """What clustering gives self-labeling and the cluster analysis."""

    model: keras.Model  # images -> [batch_size, num_clusters] cluster probabilities
    head_inputs: object  # the HeadInputs the head learned on; self-labeling learns on the same
    self_labeling_model: keras.Model  # what self-labeling trains: the head alone on features, else `model`
    history: dict  # {loss name: [value per epoch]}


def learn_clusters(run, data, preprocessing, representation, neighbours):
    """Trains the clustering model so that neighbours share clusters (or reuses the cached one); saves
    clustering_loss.png."""
    settings = run.settings
    # Unless ENCODER_DURING_CLUSTERING is "tuned", freeze the encoder weights.
    for layer in head_backbone(representation, settings.head_features).layers:
        layer.trainable = settings.encoder_during_clustering == "tuned"
    head_inputs = choose_head_inputs(run, data, preprocessing, representation, neighbours)
    models = create_clustering_models(run, preprocessing, representation, head_inputs)
    neighbours_per_anchor = 1 if settings.sample_one_neighbour else settings.k_neighbours
    inputs, training_rows, rows = head_inputs.inputs, head_inputs.training_rows, head_inputs.rows
    clustering_learner = create_clustering_learner(
        models.training_model, head_inputs.augmentation, neighbours_per_anchor, training_rows.shape[1:], rows
    )
    # Instantiate the model losses: the tutorial's, or SCAN's.
    scan_loss = settings.clustering_loss == "scan"
    losses = [
        ClustersConsistencyLoss(from_logits=not scan_loss),
        ClustersEntropyLoss(entropy_loss_weight=settings.entropy_loss_weight, apply_weight=scan_loss),
    ]

    def train_clustering(backup_dir):
        batches = RowBatches(
            len(inputs), settings.clustering_batch_size, settings.seed, rows=None if rows else training_rows,
            neighbour_indices=neighbours.indices, sample_one_neighbour=settings.sample_one_neighbour,
        )  # fmt: skip
        # With KEEP_BEST_CLUSTERING_EPOCH, the epoch of the lowest SCAN loss is kept, as in SCAN's code.
        keep_best = [KeepBestEpoch(
            models.training_model, inputs, neighbours.indices, settings.embedding_batch_size, backup_dir, "clustering"
        )] if settings.keep_best_clustering_epoch else []  # fmt: skip
        rate = settings.clustering_learning_rate
        optimizer = create_optimizer(settings.clustering_optimizer, rate, settings.weight_decay, rate)
        history = train(
            clustering_learner, batches, settings.clustering_epochs, optimizer, backup_dir, "clustering",
            "lower --clustering_learning_rate", settings.checkpoint_seconds, loss=losses, callbacks=keep_best,
        )  # fmt: skip
        if models.heads is not models.head:
            keep_best_head(models, head_inputs, neighbours.indices, settings.embedding_batch_size)
        return history

    history = run.cache.trained_model(
        "clustering", run.fingerprints["clustering"], "clustering", models.model, train_clustering
    )
    plot_loss_history(history, run.figure_path("clustering_loss.png"))
    return Clustering(models.model, head_inputs, models.self_labeling_model, history)


"""
## Self-labeling

SCAN's last step, not in the tutorial (`scan/self_labeling.py`): the clustering model is fine-tuned on its own
confident predictions, each learned on a strongly augmented view; on images the whole network learns, on cached
features the head alone. SELF_LABEL_GUARD undoes it when it raised the label-free SCAN loss or emptied a cluster.
"""


class SelfLabeling(NamedTuple):
    """What self-labeling gives the report."""

    history: dict  # {"loss": [value per epoch]}; {} when it was skipped
    before: dict | None  # accuracy, NMI and ARI of the evaluated split before self-labeling; None without labels


def self_label(run, data, representation, neighbours, clustering):
    """Prints the scores it starts from, as SCAN does, so that the stage's own gain (or loss) shows; fine-tunes the
    clustering model on its own confident predictions (or reuses the cached result); saves self_label_loss.png."""
    settings, head_inputs = run.settings, clustering.head_inputs
    before = scores_before(clustering.model, *data.evaluated(), settings.embedding_batch_size)
    if not head_inputs.on_features:  # Self-labeling fine-tunes the whole network on images, as in SCAN.
        for layer in head_backbone(representation, settings.head_features).layers:
            layer.trainable = True
    augmentations = self_labeling_views(head_inputs, settings)
    history = run.cache.trained_model(
        "self_labeling", run.fingerprints["self_labeling"], "self-labeling", clustering.model,
        lambda backup_dir: run_self_labeling(
            clustering.self_labeling_model, head_inputs, augmentations, settings, backup_dir, neighbours.indices
        ),
    )  # fmt: skip
    if history:
        plot_loss_history({"self-label loss": history["loss"]}, run.figure_path("self_label_loss.png"))
    return SelfLabeling(history, before)


"""
## Cluster analysis

### Assign images to clusters

Each image goes to its most probable cluster; that probability is its clustering confidence, and the most
confident images of a cluster are its prototypes. Not in the tutorial or in SCAN: with `PREDICTION_NEIGHBOURS = N`
an image's cluster probabilities are the vote of its N most similar training images (their clustering model's
probabilities, weighted by exp(cosine similarity / 0.1), in the embeddings the neighbours were mined in; queries and
votes always from the same weights: when the encoder learned after mining, the training images are embedded again).

### Compute clustering accuracy

Each cluster gets the majority label of its images; its accuracy is the share of its images with that label. The
overall accuracy is the size-weighted mean. Beyond the tutorial, the SCAN paper's metrics: the accuracy of the best
one-to-one matching of clusters to classes (Hungarian), NMI and ARI, for each split (`scan/metrics.py`).

### Save what says where each image went

Not in the tutorial (`scan/reports.py`): `clusters.csv`, a contact sheet per cluster, `report.html` and, with
SORT_INTO, the images sorted into one folder per cluster, written after `metrics.json`: they can fail for reasons
outside the model (a full disk, a name the disk refuses), and such a failure is one error line that says what was kept.
"""


class Analysis(NamedTuple):
    """What the cluster analysis gives the metrics and the outputs."""

    report: dict  # report_clusters's: cluster sizes and, with labels, each cluster's majority label and accuracy
    splits: dict  # {"train": its metrics, and "eval": the held-out images' when there are some}
    assigned: list  # [(split, Dataset, cluster probabilities)] of every split, for clusters.csv and the page


def analyse_clusters(run, data, preprocessing, representation, neighbours, clustering, cluster_count=None):
    """Assigns every image to a cluster, prints the tutorial's report and each split's accuracy, NMI and ARI, and
    saves prototypes.png and the confusion matrices; the report keeps the sweep `cluster_count` that chose the
    number of clusters, if one did, for metrics.json and report.html."""
    settings, train, evaluated = run.settings, data.train, data.eval
    head_probs = head_predictions(run, data, clustering)
    predict = cluster_predictor(settings, preprocessing, representation, neighbours, clustering, train, head_probs)
    clustering_probs = predict()
    if settings.prediction_neighbours:
        print(
            f"cluster assignment: each image takes the clusters that its {settings.prediction_neighbours} most "
            "similar training images vote for (PREDICTION_NEIGHBOURS), not the clustering model's own"
        )
    labels, class_names = train.labels, train.class_names
    report = report_clusters(
        clustering_probs, labels, class_names, settings.prototypes_per_cluster, train.images, run.figure_path
    )
    if cluster_count is not None:  # metrics.json and report.html show the sweep.
        report["cluster_count"] = cluster_count._asdict()
    train_scores = evaluate_split(
        "train", "the images trained on", clustering_probs, labels, class_names, run.figure_path
    )
    splits = {"train": train_scores}
    assigned = [("train", train, clustering_probs)]
    if evaluated is not None:
        eval_probs = predict(evaluated.images)
        splits["eval"] = evaluate_split(
            "eval", "held-out images", eval_probs, evaluated.labels, evaluated.class_names, run.figure_path
        )
        assigned.append(("eval", evaluated, eval_probs))
        if settings.prediction_neighbours and evaluated.labels is not None:  # what the vote added
            splits["eval"]["head_acc"] = head_alone_accuracy(clustering.model, evaluated, settings.embedding_batch_size)
    return Analysis(report, splits, assigned)


"""
## Assign new images

Not in the tutorial: new images (ASSIGN_DATA) go into the clusters learned before, training nothing. Every stage
comes from the stage cache, so the model that assigns is the one the training run evaluated.
"""


def assign_images(run, data, preprocessing):
    """Puts the new images (`data.new`) into the clusters that these settings learned on this data before; prints the
    cluster sizes; writes assigned.csv, assigned/cluster-NN.jpg and assigned.html; returns the sizes."""
    settings, new = run.settings, data.new
    run.cache.reuse_only = True
    print(f"\n## Assign {display_name(settings.assign_data)} to the clusters learned before (nothing is trained)")
    representation = learn_representation(run, data, preprocessing)
    # The kNN monitor measured the training run; assigning needs only what the clusters were learned from.
    neighbours = find_neighbours(run, data, preprocessing, representation, knn_monitor=False)
    if not settings.num_clusters:
        choose_num_clusters(run, neighbours)
    clustering = learn_clusters(run, data, preprocessing, representation, neighbours)
    if settings.self_label_epochs:
        self_label(run, data, representation, neighbours, clustering)
    train_probabilities = head_predictions(run, data, clustering) if settings.prediction_neighbours else None
    predict = cluster_predictor(
        settings, preprocessing, representation, neighbours, clustering, data.train, train_probabilities
    )
    return save_new_assignments(settings, new, predict(new.images))


"""
## Run the whole tutorial

`main` reads the settings, sets the devices up, and `train_and_evaluate` runs the stages in the tutorial's order:
its table of contents.
"""


def main(argv=None):
    """Runs every stage in the tutorial's order; returns the metrics that metrics.json records."""
    with open(__file__) as file:
        comments = read_settings_block(file.read())
    defaults = {name: globals()[name] for name in comments}
    settings = parse_settings(argv, defaults, comments, RECIPES, tuple(CIFAR10_SPLITS))
    validate_settings(settings, defaults)
    devices = set_up_devices(settings)
    with devices.scope():
        return train_and_evaluate(settings, devices)


def train_and_evaluate(settings, devices):
    """The stages, in the tutorial's order, on the `devices` (set_up_devices); returns the metrics."""
    run = Run(settings, devices.gpus, devices.num_devices, StageTimes(CompilationLog()))
    with run.times.stage("data"):
        data = prepare_data(run)
    run.open_cache(data.digest, STAGE_SETTINGS)  # Every check has passed: only now is anything written.
    with run.times.stage("preprocessing"):
        preprocessing = prepare_preprocessing(run, data)
    if settings.assign_data:  # New images into the clusters learned before: every stage comes from the cache.
        return assign_images(run, data, preprocessing)

    print(f"\n## Self-supervised representation learning: {settings.representation_epochs} epochs")
    with run.times.stage("representation_learning"):
        representation = learn_representation(run, data, preprocessing)

    print("\n## Compute the nearest neighbours")
    with run.times.stage("neighbours"):
        neighbours = find_neighbours(run, data, preprocessing, representation)

    cluster_count = None  # NUM_CLUSTERS was given.
    if not settings.num_clusters:
        print("\n## Choose the number of clusters")
        with run.times.stage("cluster_count"):
            cluster_count = choose_num_clusters(run, neighbours)

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
        analysis = analyse_clusters(run, data, preprocessing, representation, neighbours, clustering, cluster_count)
    metrics = write_metrics(run, data, representation, neighbours, clustering, self_labeling, analysis)
    save_cluster_outputs(run, data, analysis)  # After metrics.json: what can fail for reasons outside the model.
    return metrics


if __name__ == "__main__":
    run_as_command(main)
