"""Embeddings and nearest neighbours: L2-normalised features (a dot product is a cosine similarity), each image's k
most similar other images found one batch of anchors at a time on the device, their label purity, and the
weighted kNN vote of SimCLR codebases.
"""

import keras
import numpy as np
from keras import ops

from scan.batches import DeviceRows, fit_verbosity, predict_in_full_batches
from scan.settings import UsageError


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


def mining_embedder(settings, preprocessing, representation):
    """The model that embeds images in the space neighbours are mined in (MINING_FEATURES): the encoder's or the
    projection head's, of images normalised as the encoder learned them, or with "tutorial" the encoder's of the raw
    pixels (the tutorial's quirk); `compute_embeddings` L2-normalises its outputs."""
    encoder = representation.projected_encoder if settings.mining_features == "projection" else representation.encoder
    if settings.mining_features == "tutorial":
        return encoder
    return keras.Sequential([preprocessing.data_preprocessing, encoder])


def monitor_knn_accuracy(settings, data, preprocessing, representation, encoder_features):
    """With labelled evaluation images of the training images' classes, prints the yardstick SimCLR papers report:
    the share whose label wins the weighted vote of their 200 most similar training images, in the encoder's
    features. Returns (that accuracy or None, the training images' encoder features, computed here if need be)."""
    evaluated, y_data = data.eval, data.train.labels
    if y_data is None or evaluated is None or evaluated.labels is None:
        return None, encoder_features
    if evaluated.class_names != data.train.class_names:
        return None, encoder_features
    # One model embeds both splits, so that its prediction compiles once.
    encoder_embedder = keras.Sequential([preprocessing.data_preprocessing, representation.encoder])
    embed = lambda images: compute_embeddings(encoder_embedder, images, settings.embedding_batch_size)  # noqa: E731
    encoder_features = embed(data.train.images) if encoder_features is None else encoder_features
    knn_accuracy = weighted_knn_accuracy(
        embed(evaluated.images), evaluated.labels, encoder_features, y_data, len(data.train.class_names)
    )
    print(
        f"kNN accuracy: {knn_accuracy:.2%} of the {len(evaluated.labels)} evaluation images take the label "
        "that their 200 most similar training images vote for (encoder features, temperature 0.1)"
    )
    return knn_accuracy, encoder_features
