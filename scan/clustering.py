"""The clustering stage's decisions, each made in one place: what the head learns on (`choose_head_inputs`), how many
heads train (`create_clustering_models`) and which is kept (`keep_best_head`); and how a trained model assigns
images to clusters (`predict_clusters`), its own or by the vote of the most similar training images.

What the head learns on: the images, through the encoder and the augmentation, as in the tutorial (the encoder
frozen, or with ENCODER_DURING_CLUSTERING = "tuned" trained too, as in SCAN); or with "cached", the frozen
encoder's features of the un-augmented images, computed once, so each step trains the head alone. SCAN augments
every anchor and neighbour strongly; on cached features, FEATURE_VIEWS computes (and caches) the features of that
many strongly augmented views of each image, and each anchor and neighbour of a step is drawn among the image's
own and its views'. Either way the head sits on the encoder, or with HEAD_FEATURES = "projection" on SimCLR's
projection head after it, the space where the neighbours were mined.
"""

import functools
import time
from typing import NamedTuple

import keras
import numpy as np
from keras import layers, ops

from scan.augmentations import FeatureViews, create_data_augmentation, strong_augmentation_kind
from scan.batches import DeviceRows, fit_verbosity, hold_on_device, predict_in_full_batches
from scan.losses import scan_head_losses
from scan.metrics import split_metrics
from scan.models import copy_head, create_clustering_head, create_clustering_model
from scan.neighbours import compute_embeddings, mining_embedder, weighted_knn_votes


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


# FEATURE_VIEWS augments this many images at a time, whatever EMBEDDING_BATCH_SIZE: an augmentation draws for its
# whole batch, and SCAN's cut-out takes the batch's mean colour, so the views would otherwise depend on a setting that
# their fingerprint leaves out. 500 is EMBEDDING_BATCH_SIZE's default: the views that runs at the default cached.
VIEW_AUGMENTATION_BATCH = 500


def augmented_features(embedder, images, augmentation, num_views, batch_size):
    """[num_images, num_views, dims]: the L2-normalised `embedder` features (`batch_size` images a prediction) of
    `num_views` views of each image, each drawn by `augmentation` (in training mode), VIEW_AUGMENTATION_BATCH images
    at a time."""
    views = []
    for _ in range(num_views):
        augmented = np.concatenate(
            [
                ops.convert_to_numpy(
                    augmentation(images[start : start + VIEW_AUGMENTATION_BATCH].astype("float32"), training=True)
                )
                for start in range(0, len(images), VIEW_AUGMENTATION_BATCH)
            ]
        )
        views.append(compute_embeddings(embedder, augmented, batch_size))
    return np.stack(views, axis=1)


def choose_head_inputs(run, data, preprocessing, representation, neighbours):
    """The images (the tutorial), or with ENCODER_DURING_CLUSTERING = "cached" the frozen encoder's (or projection
    head's: HEAD_FEATURES) features of the un-augmented images, as the neighbours stage computed them or computed here; with FEATURE_VIEWS,
    training draws among them and the features of as many strongly augmented views of each image (cached)."""
    settings = run.settings
    if settings.encoder_during_clustering != "cached":
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


def encoder_learned_after_mining(settings):
    """Whether the encoder's weights may have changed since the neighbours stage embedded the training images: when the
    head learns on images and the encoder is tuned in clustering (ENCODER_DURING_CLUSTERING = "tuned") or in
    self-labeling, which fine-tunes the whole network on images."""
    on_images = settings.encoder_during_clustering != "cached"
    return on_images and (settings.encoder_during_clustering == "tuned" or settings.self_label_epochs > 0)


def vote_references(settings, embedder, neighbours, images):
    """The training images' embeddings that the vote (PREDICTION_NEIGHBOURS) compares with: those the neighbours were
    mined among, or, when the encoder has learned since, `images` embedded again by `embedder`, so that every query
    and every reference is an embedding of the same weights."""
    if not encoder_learned_after_mining(settings):
        return neighbours.feature_vectors
    return compute_embeddings(embedder, images, settings.embedding_batch_size)


def predict_clusters(settings, clustering_model, embedder, references, train_probabilities, images=None):
    """The cluster probabilities of `images` (None: the training images, whose clustering model's probabilities are
    `train_probabilities`): the clustering model's, or with PREDICTION_NEIGHBOURS the weighted vote of their most
    similar training images' (`weighted_knn_votes` among the training images' embeddings `references`, from
    `vote_references`; a training image is among its own voters). `embedder` is a new `mining_embedder`: the model
    the neighbours stage embedded with has had its encoder frozen by the clustering stage since, and a data-parallel
    JAX prediction cannot reuse it."""
    if not settings.prediction_neighbours:
        if images is None:
            return train_probabilities
        return predict_in_full_batches(clustering_model, images, settings.embedding_batch_size)
    queries = references if images is None else compute_embeddings(embedder, images, settings.embedding_batch_size)
    return weighted_knn_votes(queries, references, train_probabilities, settings.prediction_neighbours)


def cluster_predictor(settings, preprocessing, representation, neighbours, clustering, train, train_probabilities):
    """`predict(images=None)`: the cluster probabilities of `images` (None: the training images), the clustering
    model's or with PREDICTION_NEIGHBOURS the training images' vote, in one embedding space (`vote_references`)."""
    embedder = mining_embedder(settings, preprocessing, representation)
    references = None
    if settings.prediction_neighbours:
        references = vote_references(settings, embedder, neighbours, train.images)
    return functools.partial(predict_clusters, settings, clustering.model, embedder, references, train_probabilities)


def head_alone_accuracy(clustering_model, dataset, batch_size):
    """The clustering model's own accuracy on a labelled Dataset, printed (what PREDICTION_NEIGHBOURS's vote added)."""
    metrics, _ = split_metrics(predict_in_full_batches(clustering_model, dataset.images, batch_size), dataset.labels,
                               dataset.class_names)  # fmt: skip
    print(f"  the clustering model alone: accuracy {metrics['acc']:.2%}, NMI {metrics['nmi']:.4f}")
    return metrics["acc"]
