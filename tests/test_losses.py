"""Each loss against an independent numpy formula of the tutorial's definition, on random inputs."""

import keras
import numpy as np
import pytest
from keras import ops

import scan_cifar10 as script
from scan.losses import (
    ClustersConsistencyLoss,
    ClustersEntropyLoss,
    nt_xent_loss,
    scan_head_losses,
    self_label_loss,
    self_label_targets,
    tutorial_contrastive_loss,
)
from scan.models import (
    clustering_logits_model,
    copy_head,
    create_clustering_head,
    create_clustering_model,
    create_encoder,
)
from scan.self_labeling import SelfLabelLearner
from scan.training import create_optimizer, learning_rate_schedule


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
    actual = tutorial_contrastive_loss(ops.convert_to_tensor(features), batch_size, 0.5, l2_normalize)
    np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-4)


def test_tutorial_contrastive_max_shift_really_lacks_keepdims():
    # With keepdims the loss would equal plain softmax cross-entropy; the tutorial's shift changes it.
    features = np.random.default_rng(1).normal(size=(8, 5))
    logits = features @ features.T
    proper = np.mean(-(np.tile(np.eye(4), (2, 2)) * log_softmax(logits)).sum(axis=1))
    actual = tutorial_contrastive_loss(ops.convert_to_tensor(features.astype("float32")), 4, 1.0, False)
    assert abs(float(ops.convert_to_numpy(actual)) - proper) > 1e-3


def test_consistency_loss_is_binary_cross_entropy_of_probabilities_as_logits():
    similarity = np.random.default_rng(2).uniform(0, 1, size=(6, 5)).astype("float32")
    expected = np.mean(np.log1p(np.exp(-similarity.astype("float64"))))  # -log(sigmoid(s)) with target 1
    actual = ClustersConsistencyLoss()(np.ones(6), similarity)
    np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-5)


@pytest.mark.parametrize("weight", [1.0, 5.0])
def test_entropy_loss_is_log_k_minus_entropy_and_ignores_its_weight(weight):
    probabilities = np.random.default_rng(3).dirichlet(np.ones(4) * 0.3, size=9).astype("float32")
    mean = np.clip(probabilities.astype("float64").mean(axis=0), 1e-8, 1.0)
    expected = np.log(4) + np.sum(mean * np.log(mean))
    actual = ClustersEntropyLoss(entropy_loss_weight=weight)(np.ones(9), probabilities)
    np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-5, atol=1e-7)


def test_entropy_loss_is_zero_for_uniform_clusters():
    probabilities = np.full((3, 5), 0.2, dtype="float32")
    actual = ClustersEntropyLoss()(np.ones(3), probabilities)
    assert abs(float(ops.convert_to_numpy(actual))) < 1e-6


def nt_xent_reference(features, batch_size, temperature):
    """NT-Xent written out in numpy, row by row: the other view is the one positive, self is excluded; a zero row,
    which has no direction, stays zero."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    features = np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)
    similarities = features @ features.T / temperature
    losses = []
    for row in range(len(features)):
        positive = (row + batch_size) % len(features)
        others = [col for col in range(len(features)) if col != row]
        losses.append(-similarities[row, positive] + np.log(np.sum(np.exp(similarities[row, others]))))
    return np.mean(losses)


def test_nt_xent_matches_a_row_by_row_numpy_reference():
    features = np.random.default_rng(4).normal(size=(10, 7))
    actual = nt_xent_loss(ops.convert_to_tensor(features.astype("float32")), 5, 0.2)
    np.testing.assert_allclose(ops.convert_to_numpy(actual), nt_xent_reference(features, 5, 0.2), rtol=1e-4)


def test_a_compiled_nt_xent_step_trains_on_through_a_row_of_zeros():
    # A projection row of zeros (every ReLU before a zero bias dead) has no direction: NT-Xent sees it at similarity 0
    # to every view. keras.ops.normalize's gradient there is NaN under XLA, which made a whole compiled step NaN.
    inputs = np.random.default_rng(9).normal(size=(6, 5)).astype("float32")
    inputs[2] = 0.0
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, use_bias=False)])
    before = ops.convert_to_numpy(model.weights[0])
    model.compile(optimizer="sgd", loss=lambda _, projections: nt_xent_loss(projections, 3, 0.5), jit_compile=True)
    loss = model.train_on_batch(inputs, np.zeros((6, 4), "float32"))
    np.testing.assert_allclose(loss, nt_xent_reference(inputs.astype("float64") @ before, 3, 0.5), rtol=1e-4)
    assert np.all(np.isfinite(ops.convert_to_numpy(model.weights[0])))
    assert not np.allclose(ops.convert_to_numpy(model.weights[0]), before)


def test_nt_xent_on_a_case_with_a_known_answer():
    # Both views of each image are the same unit vector and the images are orthogonal: every row sees its
    # positive at similarity 1/t and 2b-2 negatives at 0, so the loss is log(1 + (2b-2) exp(-1/t)).
    batch_size, temperature = 4, 0.5
    views = np.eye(batch_size, 6, dtype="float32")
    actual = nt_xent_loss(ops.convert_to_tensor(np.concatenate([views, views])), batch_size, temperature)
    expected = np.log(1 + (2 * batch_size - 2) * np.exp(-1 / temperature))
    np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-5)


def test_scan_consistency_loss_is_minus_log_of_the_dot_product():
    similarity = np.random.default_rng(5).uniform(0.01, 1, size=(8, 1)).astype("float32")
    actual = ClustersConsistencyLoss(from_logits=False)(np.ones(8), similarity)
    np.testing.assert_allclose(ops.convert_to_numpy(actual), np.mean(-np.log(similarity.astype("float64"))), rtol=1e-5)


def test_scan_entropy_loss_applies_its_weight():
    probabilities = np.random.default_rng(6).dirichlet(np.ones(5), size=7).astype("float32")
    mean = probabilities.astype("float64").mean(axis=0)
    expected = 5.0 * (np.log(5) + np.sum(mean * np.log(mean)))
    actual = ClustersEntropyLoss(entropy_loss_weight=5.0, apply_weight=True)(np.ones(7), probabilities)
    np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-5)


def test_entropy_loss_of_several_heads_is_the_mean_of_each_heads_loss():
    probabilities = np.random.default_rng(8).dirichlet(np.ones(4), size=(6, 3)).astype("float32")  # [6, 3 heads, 4]
    loss = ClustersEntropyLoss(entropy_loss_weight=5.0, apply_weight=True)
    each_head = [float(ops.convert_to_numpy(loss(np.ones(6), probabilities[:, head]))) for head in range(3)]
    np.testing.assert_allclose(ops.convert_to_numpy(loss(np.ones(6), probabilities)), np.mean(each_head), rtol=1e-5)


def test_clustering_learner_gives_each_head_its_own_anchor_neighbour_similarities():
    rng = np.random.default_rng(9)
    features = rng.normal(size=(10, 6)).astype("float32")
    neighbour_indices = rng.integers(0, 10, size=(10, 3))
    for num_heads in (1, 4):
        heads = create_clustering_head(5, features, num_heads)
        learner = script.create_clustering_learner(heads, None, 3, (6,))
        similarity, anchors = learner({"anchors": features, "neighbours": features[neighbour_indices]})
        probabilities = ops.convert_to_numpy(heads(features)).reshape(10, num_heads, 5)
        expected = np.array(
            [
                [[probabilities[n, h] @ probabilities[m, h] for m in neighbour_indices[n]] for h in range(num_heads)]
                for n in range(10)
            ]
        )  # [anchor, head, neighbour]
        np.testing.assert_allclose(ops.convert_to_numpy(similarity), expected.reshape(similarity.shape), atol=1e-6)
        np.testing.assert_allclose(ops.convert_to_numpy(anchors).reshape(10, num_heads, 5), probabilities, atol=1e-6)


def scan_loss_reference(probabilities, neighbour_indices):
    """One head's SCAN loss with explicit loops: mean -log of each anchor-neighbour dot product, plus log K minus
    the entropy."""
    pairs = [
        np.log(probabilities[n] @ probabilities[m]) for n in range(len(probabilities)) for m in neighbour_indices[n]
    ]
    mean = probabilities.mean(axis=0)
    return -np.mean(pairs) + np.log(probabilities.shape[1]) + np.sum(mean * np.log(mean))


def test_scan_head_losses_match_loops_and_rank_a_consistent_head_first():
    rng = np.random.default_rng(10)
    probabilities = rng.dirichlet(np.ones(4), size=(12, 3)).astype("float64")  # [12 images, 3 heads, 4 clusters]
    neighbour_indices = rng.integers(0, 12, size=(12, 5))
    expected = [scan_loss_reference(probabilities[:, head], neighbour_indices) for head in range(3)]
    np.testing.assert_allclose(scan_head_losses(probabilities, neighbour_indices), expected, rtol=1e-6)
    # Two groups of images whose neighbours are in their own group: a head that gives each group its own
    # cluster beats one that puts everything in one cluster and one that assigns at random.
    groups = np.repeat([0, 1], 6)
    neighbour_indices = np.array([[m for m in range(12) if groups[m] == groups[n] and m != n][:3] for n in range(12)])
    consistent = np.eye(2)[groups] * 0.98 + 0.01
    collapsed = np.tile([0.99, 0.01], (12, 1))
    random = rng.dirichlet(np.ones(2), size=12)
    losses = scan_head_losses(np.stack([collapsed, random, consistent], axis=1), neighbour_indices)
    assert int(np.argmin(losses)) == 2


def test_copy_head_keeps_exactly_the_chosen_heads_outputs():
    features = np.random.default_rng(11).normal(2.0, 3.0, size=(9, 6)).astype("float32")
    heads = create_clustering_head(4, features, num_heads=3)
    heads(features)  # builds the weights, random per head
    head = create_clustering_head(4, features)
    head(features)
    copy_head(heads, head, 2)
    np.testing.assert_allclose(
        ops.convert_to_numpy(head(features)), ops.convert_to_numpy(heads(features))[:, 2], atol=1e-6
    )


def test_self_label_threshold_selects_exactly_the_confident_images_with_class_balance():
    weak = np.array([[0.95, 0.04, 0.01], [0.5, 0.3, 0.2], [0.02, 0.97, 0.01], [0.91, 0.05, 0.04], [0.1, 0.1, 0.8]])
    labels, weights = self_label_targets(ops.convert_to_tensor(weak.astype("float32")), 0.9)
    assert ops.convert_to_numpy(labels).tolist() == [0, 0, 1, 0, 2]
    # Confident: rows 0, 2, 3 (3 images); label 0 has 2 of them, label 1 has 1: weights 3/2, 0, 3/1, 3/2, 0.
    np.testing.assert_allclose(ops.convert_to_numpy(weights), [1.5, 0, 3, 1.5, 0])


def self_label_loss_reference(weak_logits, strong_logits, threshold):
    """SCAN's ConfidenceBasedCE with class balancing, written out in numpy: F.cross_entropy of the confident rows,
    each weighted by n / (its pseudo-label's count), averaged with those weights."""
    weak = np.exp(log_softmax(weak_logits))
    confident = weak.max(axis=1) > threshold
    targets = weak.argmax(axis=1)[confident]
    if not confident.any():
        return 0.0
    labels, counts = np.unique(targets, return_counts=True)
    class_weight = np.ones(weak.shape[1])
    class_weight[labels] = len(targets) / counts
    cross_entropy = -log_softmax(strong_logits)[confident][np.arange(len(targets)), targets]
    weights = class_weight[targets]
    return np.sum(weights * cross_entropy) / np.sum(weights)


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.9999])
def test_self_label_loss_on_logits_matches_scans_confidence_based_cross_entropy(threshold):
    rng = np.random.default_rng(12)
    weak = rng.normal(0, 4, size=(40, 5)).astype("float32")
    strong = rng.normal(0, 4, size=(40, 5)).astype("float32")
    actual = self_label_loss(ops.convert_to_tensor(weak), ops.convert_to_tensor(strong), threshold)
    expected = self_label_loss_reference(weak.astype("float64"), strong.astype("float64"), threshold)
    np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-5, atol=1e-7)


def test_self_label_loss_keeps_its_gradient_when_the_pseudo_label_is_improbable():
    import tensorflow as tf

    # The strong view gives the pseudo-label a probability of about e^-40: clipping log(p) at 1e-7 had no gradient.
    weak = tf.constant([[20.0, 0.0]])
    strong = tf.Variable([[0.0, 40.0]])
    with tf.GradientTape() as tape:
        loss = self_label_loss(weak, strong, 0.99)
    np.testing.assert_allclose(float(loss), 40.0, rtol=1e-5)
    # d/dz of -log_softmax(z)[0] is softmax(z) - one_hot(0): about (-1, 1).
    np.testing.assert_allclose(tape.gradient(loss, strong).numpy(), [[-1.0, 1.0]], atol=1e-6)


def test_self_labeling_on_cached_features_uses_them_as_both_views_and_trains_the_head():
    features = np.random.default_rng(7).normal(size=(30, 6)).astype("float32")
    head = create_clustering_head(3, features)
    learner = SelfLabelLearner(head, None, None, threshold=0.34)  # every argmax of 3 clusters passes 1/3
    weak, strong = (ops.convert_to_numpy(view) for view in learner(features))
    np.testing.assert_array_equal(weak, strong)
    # The learner sees the head's logits: their softmax is the head's output.
    np.testing.assert_allclose(np.exp(log_softmax(weak)), ops.convert_to_numpy(head(features)), atol=1e-6)
    expected = self_label_loss_reference(weak, strong, 0.34)
    learner.compile(optimizer=create_optimizer("adamw", 0.05, 0.0, 0.05))
    losses = learner.fit(features, batch_size=30, epochs=5, shuffle=False, verbose=0).history["loss"]
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    assert losses[-1] < losses[0]  # the head becomes more confident in its own pseudo-labels


def test_the_clustering_models_logits_are_the_log_of_its_probabilities_up_to_a_constant():
    images = np.random.default_rng(8).uniform(0, 255, size=(6, 16, 16, 3)).astype("float32")
    model = create_clustering_model(
        create_encoder("small", 8), create_clustering_head(4), 16, script.create_data_preprocessing(16, images)
    )
    logits = clustering_logits_model(model).predict(images, verbose=0)
    np.testing.assert_allclose(np.exp(log_softmax(logits)), model.predict(images, verbose=0), atol=1e-6)


def reference_learning_rate(step, learning_rate, total_steps, decay_steps, alpha, warmup_steps):
    """Linear rise from 0 over the warm-up, then cosine decay to `alpha` of the rate, written out in numpy."""
    if step < warmup_steps:
        return learning_rate * step / warmup_steps
    decay_steps = decay_steps or total_steps - warmup_steps
    progress = min(step - warmup_steps, decay_steps) / decay_steps
    return learning_rate * ((1 - alpha) * 0.5 * (1 + np.cos(np.pi * progress)) + alpha)


@pytest.mark.parametrize("decay_steps, alpha, warmup_steps", [(0, 0.0, 0), (0, 0.0, 10), (30, 0.1, 0), (30, 0.1, 5)])
def test_learning_rate_schedule_rises_then_follows_the_cosine(decay_steps, alpha, warmup_steps):
    schedule = learning_rate_schedule(0.002, 100, decay_steps, alpha, warmup_steps)
    for step in [0, 1, 4, 5, 9, 10, 11, 34, 50, 99, 100, 150]:
        expected = reference_learning_rate(step, 0.002, 100, decay_steps, alpha, warmup_steps)
        assert float(ops.convert_to_numpy(schedule(step))) == pytest.approx(expected, rel=1e-5, abs=1e-9), step
