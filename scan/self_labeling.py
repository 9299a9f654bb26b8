"""Self-labeling, SCAN's last step (not in the tutorial): the clustering model is fine-tuned on its own confident
predictions. An image whose cluster probability exceeds `SELF_LABEL_THRESHOLD` takes that cluster as its
pseudo-label; the model learns it on a strongly augmented view (`STRONG_AUGMENTATION`) with cross-entropy on the
logits, weighted so that every cluster counts equally (SCAN's ConfidenceBasedCE). On cached features the head
alone learns, and the features serve as both views (with FEATURE_VIEWS the strong view is drawn among the
image's own and its views' features). `SELF_LABEL_GUARD` keeps the model from before when self-labeling raised
the label-free SCAN loss or emptied a cluster that had confident images.
"""

import keras
import numpy as np

from scan.augmentations import FeatureViews, create_data_augmentation, strong_augmentation_kind
from scan.backend import gather_replicas, replica_share
from scan.batches import RowBatches, predict_in_full_batches
from scan.losses import scan_head_losses, self_label_loss
from scan.metrics import split_metrics
from scan.models import clustering_logits_model
from scan.training import create_optimizer, train


class SelfLabelLearner(keras.Model):
    """The clustering model's logits on each image itself, whose confident clusters are the pseudo-labels, and on its
    strong view, which learns them. `own_view` takes the image itself from the rows (None: the rows are the images,
    or their features; with FEATURE_VIEWS a FeatureViews(draw=False)); `strong_augmentation` draws the strong view
    (None: on cached features without views, the features themselves)."""

    def __init__(self, clustering_model, own_view, strong_augmentation, threshold, rows=None, **kwargs):
        super().__init__(**kwargs)
        # With the rows on the device (a DeviceRows layer), the inputs are their indices.
        self.rows = rows
        self.clustering_logits = clustering_logits_model(clustering_model)
        self.own_view = own_view
        self.strong_augmentation = strong_augmentation
        self.threshold = threshold

    def call(self, inputs, training=False):
        # Pseudo-labels come from the image itself (in the same mode, as in SCAN's code); the model learns on the
        # strong view.
        inputs = inputs if self.rows is None else self.rows(inputs)
        weak, strong = inputs, inputs
        if self.own_view is not None:
            weak = self.own_view(inputs, training=training)
        if self.strong_augmentation is not None:
            strong = self.strong_augmentation(inputs, training=training)
        return self.clustering_logits(weak, training=training), self.clustering_logits(strong, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        weak_logits, strong_logits = gather_replicas(y_pred[0]), gather_replicas(y_pred[1])
        return replica_share(self_label_loss(weak_logits, strong_logits, self.threshold))


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


def scores_before(model, split, dataset, batch_size):
    """The accuracy, NMI and ARI of `model` on the evaluated `split`'s Dataset before self-labeling, printed (SCAN
    reports them, so that the stage's own gain or loss shows); None without labels."""
    if dataset.labels is None:
        return None
    probabilities = predict_in_full_batches(model, dataset.images, batch_size)
    before = split_metrics(probabilities, dataset.labels, dataset.class_names)[0]
    del before["matching"]
    print(
        f"self-labeling starts from: {split} split accuracy {before['acc']:.2%}, "
        f"NMI {before['nmi']:.4f}, ARI {before['ari']:.4f}"
    )
    return before


def self_labeling_views(head_inputs, settings):
    """The augmentations (own view, strong view) that self-labeling learns on: on images, STRONG_AUGMENTATION's strong
    view; on cached features with FEATURE_VIEWS, the strong view drawn among them; on cached features alone, none
    (no augmentation can vary them)."""
    if not head_inputs.on_features:
        kind = strong_augmentation_kind(settings.strong_augmentation, settings.augmentation)
        return None, create_data_augmentation(kind, settings.seed + 11)
    if isinstance(head_inputs.augmentation, FeatureViews):
        return FeatureViews(draw=False), FeatureViews(seed=settings.seed + 11)
    return None, None


def run_self_labeling(clustering_model, head_inputs, augmentations, settings, backup_dir, neighbour_indices=None):
    """Self-labels the clustering model (or its head, on cached features) unless no image is confident enough; it
    learns on `head_inputs` (HeadInputs); `augmentations` are SelfLabelLearner's `own_view` and
    `strong_augmentation`. With SELF_LABEL_GUARD, the model from before is kept when self_labeling_verdict on all the inputs and
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
    rate = settings.self_label_learning_rate
    history = train(
        learner,
        RowBatches(
            len(inputs), settings.self_label_batch_size, settings.seed, rows=None if device_rows else training_rows
        ),
        settings.self_label_epochs,
        create_optimizer(settings.clustering_optimizer, rate, settings.weight_decay, rate),
        backup_dir,
        "self-labeling",
        "lower --self_label_learning_rate",
        settings.checkpoint_seconds,
    )
    if settings.self_label_guard and neighbour_indices is not None:
        after = predict_in_full_batches(clustering_model, inputs, settings.embedding_batch_size)
        keep, reason = self_labeling_verdict(probabilities, after, neighbour_indices, settings.self_label_threshold)
        if not keep:
            clustering_model.set_weights(weights_before)
        print(f"self-labeling: {'kept' if keep else 'undone, the clustering model is kept'}: {reason}")
    return history
