"""The losses: the tutorial's contrastive loss and SimCLR's NT-Xent; the tutorial's two clustering losses, which with
`CLUSTERING_LOSS = "scan"` are SCAN's; SCAN's label-free loss that ranks heads and epochs; self-labeling's
class-balanced cross-entropy. Each loss of a training step gathers the global batch on TensorFlow's replicas.
"""

import keras
import numpy as np
from keras import ops

from scan.backend import gather_replicas, replica_share


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
