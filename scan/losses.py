"""The losses: the pretext losses (the tutorial's contrastive loss, SimCLR's NT-Xent, VICReg); the tutorial's two
clustering losses, which with `CLUSTERING_LOSS = "scan"` are SCAN's; SCAN's label-free loss that ranks heads and
epochs; self-labeling's class-balanced cross-entropy. Each loss of a training step gathers the global batch on
TensorFlow's replicas.
"""

import keras
import numpy as np
from keras import ops

from scan.backend import gather_replicas, replica_share


def normalize_rows(vectors, epsilon=1e-7):
    """The rows of `vectors` [N, dims] at unit length, as `keras.ops.normalize` scales them (1 / max(norm, epsilon)),
    with a finite gradient at a zero row on every engine. keras.ops.normalize caps rsqrt(0) = inf after the fact, which
    XLA's gradient turns into NaN: a projection row of zeros (a dead ReLU layer before a zero bias) then made a whole
    compiled SimCLR step NaN, where op by op it had trained on."""
    return vectors * ops.rsqrt(ops.maximum(ops.sum(ops.square(vectors), axis=-1, keepdims=True), epsilon**2))


def tutorial_contrastive_loss(feature_vectors, batch_size, temperature, l2_normalize):
    """The tutorial's contrastive loss, quirks kept, averaged over the rows of the logits matrix."""
    num_augmentations = ops.shape(feature_vectors)[0] // batch_size
    feature_vectors = ops.cast(feature_vectors, "float32")  # Losses stay float32 under mixed precision.
    if l2_normalize:
        feature_vectors = normalize_rows(feature_vectors)
    # The logits shape is [num_augmentations * batch_size, num_augmentations * batch_size].
    logits = ops.matmul(feature_vectors, ops.transpose(feature_vectors)) / temperature
    # Tutorial quirk: the max is taken without keepdims, so column j is shifted by the max of row j.
    logits = logits - ops.max(logits, axis=1)
    # Tutorial quirk: the targets tile the identity, so a view's similarity to itself counts as a positive.
    targets = ops.tile(ops.eye(batch_size), [num_augmentations, num_augmentations])
    # The tutorial differentiates the sum over rows; Adam is invariant to that scale, so the mean is used.
    return ops.mean(keras.losses.categorical_crossentropy(targets, logits, from_logits=True))


def nt_xent_loss(feature_vectors, batch_size, temperature, small_views=None):
    """SimCLR's NT-Xent: each view's positives are the other views of its image; its own similarity is masked out.

    With `small_views` [num_small_views * batch_size, dims] (multi-crop), each small view is one more anchor: its
    positives are the full views of its image, its negatives the other images' full views. Small views are never
    candidates, so the full views' rows are those of NT-Xent without them.
    """
    full = normalize_rows(ops.cast(feature_vectors, "float32"))
    anchors = full
    if small_views is not None:
        anchors = ops.concatenate([full, normalize_rows(ops.cast(small_views, "float32"))], axis=0)
    num_views, num_anchor_views = ops.shape(full)[0] // batch_size, ops.shape(anchors)[0] // batch_size
    # The logits shape is [num_anchor_views * batch_size, num_views * batch_size].
    logits = ops.matmul(anchors, ops.transpose(full)) / temperature
    is_self = ops.eye(ops.shape(anchors)[0], ops.shape(full)[0], dtype=logits.dtype)
    logits = logits - 1e9 * is_self
    positives = ops.tile(ops.eye(batch_size, dtype=logits.dtype), [num_anchor_views, num_views]) - is_self
    targets = positives / ops.sum(positives, axis=1, keepdims=True)
    return ops.mean(keras.losses.categorical_crossentropy(targets, logits, from_logits=True))


def vicreg_invariance(embeddings, other_embeddings):
    """VICReg's invariance term: the mean squared difference of two views' embeddings [batch_size, dims]."""
    return ops.mean(ops.square(embeddings - other_embeddings))


def vicreg_variance(embeddings, gamma=1.0, epsilon=1e-4):
    """VICReg's variance term of one view's embeddings [batch_size, dims]: the mean over dimensions of
    relu(gamma - std), the standard deviation over the batch sqrt(unbiased variance + epsilon)."""
    centred = embeddings - ops.mean(embeddings, axis=0)
    variance = ops.sum(ops.square(centred), axis=0) / ops.cast(ops.shape(embeddings)[0] - 1, embeddings.dtype)
    return ops.mean(ops.relu(gamma - ops.sqrt(variance + epsilon)))


def vicreg_covariance(embeddings):
    """VICReg's covariance term of one view's embeddings [batch_size, dims]: the sum of the squared off-diagonal
    entries of their covariance matrix over the batch (unbiased), divided by the dimensions."""
    num_rows, dims = ops.shape(embeddings)[0], embeddings.shape[-1]
    centred = embeddings - ops.mean(embeddings, axis=0)
    # covariance shape: [dims, dims].
    covariance = ops.matmul(ops.transpose(centred), centred) / ops.cast(num_rows - 1, embeddings.dtype)
    off_diagonal = covariance * (1.0 - ops.eye(dims, dtype=covariance.dtype))
    return ops.sum(ops.square(off_diagonal)) / dims


def vicreg_loss(views, small_views=None, invariance_weight=25.0, variance_weight=25.0, covariance_weight=1.0):
    """VICReg (Bardes et al. 2022) of `views` [num_views, batch_size, dims], the embeddings of each view of the same
    images, in the same order: the two-view loss averaged over the compared pairs, every two full views and, with
    `small_views` [num_small_views, batch_size, dims] (multi-crop), each small view with each full view.

    The two-view loss of embeddings a and b is solo-learn's: invariance_weight * invariance(a, b) + variance_weight *
    (variance(a) + variance(b)) + covariance_weight * (covariance(a) + covariance(b)); its CIFAR weights 25, 25 and 1.
    Each view's variance and covariance are computed once, over the whole (global) batch.
    """
    views = ops.cast(views, "float32")
    embeddings = [views[index] for index in range(views.shape[0])]
    num_full = len(embeddings)
    if small_views is not None:
        small_views = ops.cast(small_views, "float32")
        embeddings += [small_views[index] for index in range(small_views.shape[0])]
    pairs = [(a, b) for a in range(num_full) for b in range(a + 1, num_full)]
    pairs += [(small, full) for small in range(num_full, len(embeddings)) for full in range(num_full)]
    # Each view's own terms: variance_weight * variance + covariance_weight * covariance.
    spread = [
        variance_weight * vicreg_variance(view) + covariance_weight * vicreg_covariance(view) for view in embeddings
    ]
    total = 0.0
    for a, b in pairs:
        total = total + invariance_weight * vicreg_invariance(embeddings[a], embeddings[b]) + spread[a] + spread[b]
    return total / len(pairs)


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
