"""Clustering metrics: each cluster's majority label and accuracy (the tutorial's report), and the SCAN paper's
Hungarian accuracy (scipy's `linear_sum_assignment`), NMI and ARI (scikit-learn). The counts of each class in each
cluster come from `np.bincount`, not scikit-learn's `contingency_matrix`, which drops the rows of empty clusters.
"""

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def assign_clusters(clustering_probs):
    """Returns each image's most probable cluster and that probability, its clustering confidence."""
    return np.argmax(clustering_probs, axis=-1), np.max(clustering_probs, axis=-1)


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
