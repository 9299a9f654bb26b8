"""Each loss against an independent numpy formula of the tutorial's definition, on random inputs."""

import numpy as np
import pytest
from keras import ops

import scan_cifar10 as scan


def log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def tutorial_contrastive_reference(features, batch_size, temperature, l2_normalize):
    """The tutorial's loss written out in numpy: quirky max-shift and identity-tiled targets included."""
    num_views = len(features) // batch_size
    if l2_normalize:
        features = features / np.linalg.norm(features, axis=1, keepdims=True)
    logits = features @ features.T / temperature
    logits = logits - logits.max(axis=1)[np.newaxis, :]  # a [n] vector broadcast over the last axis
    targets = np.tile(np.eye(batch_size), (num_views, num_views))
    return np.mean(-(targets * log_softmax(logits)).sum(axis=1))


@pytest.mark.parametrize("batch_size, num_views, l2_normalize", [(4, 2, False), (5, 3, True), (7, 2, True)])
def test_tutorial_contrastive_loss_matches_numpy(batch_size, num_views, l2_normalize):
    features = np.random.default_rng(batch_size).normal(size=(batch_size * num_views, 6)).astype("float32")
    expected = tutorial_contrastive_reference(features.astype("float64"), batch_size, 0.5, l2_normalize)
    actual = scan.tutorial_contrastive_loss(ops.convert_to_tensor(features), batch_size, 0.5, l2_normalize)
    np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-4)


def test_tutorial_contrastive_max_shift_really_lacks_keepdims():
    # With keepdims the loss would equal plain softmax cross-entropy; the tutorial's shift changes it.
    features = np.random.default_rng(1).normal(size=(8, 5))
    logits = features @ features.T
    proper = np.mean(-(np.tile(np.eye(4), (2, 2)) * log_softmax(logits)).sum(axis=1))
    actual = scan.tutorial_contrastive_loss(ops.convert_to_tensor(features.astype("float32")), 4, 1.0, False)
    assert abs(float(ops.convert_to_numpy(actual)) - proper) > 1e-3


def test_consistency_loss_is_binary_cross_entropy_of_probabilities_as_logits():
    similarity = np.random.default_rng(2).uniform(0, 1, size=(6, 5)).astype("float32")
    expected = np.mean(np.log1p(np.exp(-similarity.astype("float64"))))  # -log(sigmoid(s)) with target 1
    actual = scan.ClustersConsistencyLoss()(np.ones(6), similarity)
    np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-5)


@pytest.mark.parametrize("weight", [1.0, 5.0])
def test_entropy_loss_is_log_k_minus_entropy_and_ignores_its_weight(weight):
    probabilities = np.random.default_rng(3).dirichlet(np.ones(4) * 0.3, size=9).astype("float32")
    mean = np.clip(probabilities.astype("float64").mean(axis=0), 1e-8, 1.0)
    expected = np.log(4) + np.sum(mean * np.log(mean))
    actual = scan.ClustersEntropyLoss(entropy_loss_weight=weight)(np.ones(9), probabilities)
    np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-5, atol=1e-7)


def test_entropy_loss_is_zero_for_uniform_clusters():
    probabilities = np.full((3, 5), 0.2, dtype="float32")
    actual = scan.ClustersEntropyLoss()(np.ones(3), probabilities)
    assert abs(float(ops.convert_to_numpy(actual))) < 1e-6
