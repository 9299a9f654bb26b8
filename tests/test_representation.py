"""The optimizers, the kNN monitor and the PyTorch-built CNNs, each against an independent reference."""

import keras
import numpy as np
import pytest
from keras import ops

from scan.models import conv_block, create_backbone, create_encoder
from scan.neighbours import weighted_knn_accuracy, weighted_knn_votes
from scan.training import create_optimizer


def one_optimizer_step(optimizer, weights, gradients):
    """Applies the gradients [steps, *shape] to a variable holding `weights`, one step each; returns its values."""
    variable = keras.Variable(weights)
    optimizer.build([variable])
    for gradient in gradients:
        optimizer.apply_gradients([(ops.convert_to_tensor(gradient), variable)])
    return ops.convert_to_numpy(variable)


def test_sgd_adds_the_weight_decay_to_the_gradient_before_the_momentum_as_pytorch_does():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(4, 3)).astype("float32")
    gradients = rng.normal(size=(3, 4, 3)).astype("float32")
    learning_rate, momentum, l2 = 0.4, 0.9, 0.01  # SCAN's momentum
    optimizer = create_optimizer("sgd", learning_rate, l2, learning_rate)
    actual = one_optimizer_step(optimizer, weights, gradients)
    # torch.optim.SGD(lr, momentum, weight_decay=l2): g += l2 * w; buffer = momentum * buffer + g; w -= lr * buffer.
    expected, buffer = weights.astype("float64"), np.zeros_like(weights, dtype="float64")
    for gradient in gradients:
        buffer = momentum * buffer + (gradient + l2 * expected)
        expected = expected - learning_rate * buffer
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_adam_adds_the_weight_decay_to_the_gradient_as_pytorch_does():
    rng = np.random.default_rng(2)
    weights = rng.normal(size=(4, 3)).astype("float32")
    gradients = rng.normal(size=(3, 4, 3)).astype("float32")
    learning_rate, l2 = 0.01, 0.05
    actual = one_optimizer_step(create_optimizer("adam", learning_rate, l2, learning_rate), weights, gradients)
    # torch.optim.Adam(lr, weight_decay=l2), SCAN's clustering and self-labeling: g += l2 * w, then Adam's step.
    expected = weights.astype("float64")
    first, second = np.zeros_like(expected), np.zeros_like(expected)
    for step, gradient in enumerate(gradients, start=1):
        gradient = gradient + l2 * expected
        first, second = 0.9 * first + 0.1 * gradient, 0.999 * second + 0.001 * gradient**2
        first_hat, second_hat = first / (1 - 0.9**step), second / (1 - 0.999**step)
        expected = expected - learning_rate * first_hat / (np.sqrt(second_hat) + 1e-8)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    # Without the L2 term the same steps end elsewhere: the decay is in the gradient, not after the step.
    plain = one_optimizer_step(create_optimizer("adam", learning_rate, 0.0, learning_rate), weights, gradients)
    assert np.abs(plain - expected).max() > 1e-4


def test_adamw_decays_the_weights_by_the_weight_decay_per_step_at_the_initial_rate():
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(5,)).astype("float32")
    gradient = rng.normal(size=(5,)).astype("float32")
    learning_rate, weight_decay = 0.001, 0.01
    actual = one_optimizer_step(
        create_optimizer("adamw", learning_rate, weight_decay, learning_rate), weights, [gradient]
    )
    # tensorflow-addons' AdamW: w *= 1 - weight_decay, then Adam's first step, lr * m_hat / (sqrt(v_hat) + eps).
    first, second = 0.1 * gradient, 0.001 * gradient**2
    adam_step = learning_rate * (first / 0.1) / (np.sqrt(second / 0.001) + 1e-7)
    np.testing.assert_allclose(actual, weights * (1 - weight_decay) - adam_step, rtol=1e-5)
    # Half the rate later in the schedule (here: a smaller rate from the start) halves the decay, as it halves the step.
    halved = one_optimizer_step(
        create_optimizer("adamw", learning_rate / 2, weight_decay, learning_rate), weights, [gradient]
    )
    np.testing.assert_allclose(halved, weights * (1 - weight_decay / 2) - adam_step / 2, rtol=1e-5)


def brute_force_knn_accuracy(queries, query_labels, references, reference_labels, k, temperature):
    correct = 0
    for query, label in zip(queries, query_labels, strict=True):
        similarities = [float(query @ reference) for reference in references]
        order = sorted(range(len(references)), key=lambda index: -similarities[index])[:k]
        votes = {}
        for index in order:
            votes[reference_labels[index]] = votes.get(reference_labels[index], 0.0) + np.exp(
                similarities[index] / temperature
            )
        correct += max(votes, key=votes.get) == label
    return correct / len(queries)


@pytest.mark.parametrize("k, temperature", [(1, 0.1), (7, 0.1), (30, 0.5), (500, 0.1)])
def test_weighted_knn_accuracy_matches_a_brute_force_vote(k, temperature):
    rng = np.random.default_rng(k)
    centres = rng.normal(size=(4, 8))
    reference_labels, query_labels = rng.integers(4, size=120), rng.integers(4, size=1300)
    normalise = lambda rows: rows / np.linalg.norm(rows, axis=1, keepdims=True)  # noqa: E731
    references = normalise(centres[reference_labels] + rng.normal(scale=1.5, size=(120, 8)))
    queries = normalise(centres[query_labels] + rng.normal(scale=1.5, size=(1300, 8)))
    actual = weighted_knn_accuracy(queries, query_labels, references, reference_labels, 4, k, temperature)
    expected = brute_force_knn_accuracy(queries, query_labels, references, reference_labels, k, temperature)
    assert actual == pytest.approx(expected)
    assert 0.3 < actual < 1.0  # the clusters overlap: neither chance nor certain


@pytest.mark.parametrize("k", [1, 4, 60])
def test_weighted_knn_votes_average_the_references_probabilities_as_a_brute_force_vote_does(k):
    # The PREDICTION_NEIGHBOURS vote: each query's k most similar references vote with their cluster probabilities.
    rng = np.random.default_rng(k)
    normalise = lambda rows: rows / np.linalg.norm(rows, axis=1, keepdims=True)  # noqa: E731
    references, queries = normalise(rng.normal(size=(50, 6))), normalise(rng.normal(size=(1100, 6)))
    probabilities = rng.dirichlet(np.ones(3), size=50)
    actual = weighted_knn_votes(queries, references, probabilities, k, temperature=0.2)
    for query, vote in zip(queries, actual, strict=True):
        similarities = [float(query @ reference) for reference in references]
        nearest = sorted(range(50), key=lambda index: -similarities[index])[:k]
        expected = sum(np.exp(similarities[index] / 0.2) * probabilities[index] for index in nearest)
        np.testing.assert_allclose(vote, expected / expected.sum(), rtol=1e-5)


def test_weighted_knn_vote_weighs_near_neighbours_more_on_a_hand_made_case():
    # The query's nearest reference (similarity 1) says class 1; two far ones (similarity 0) say class 0.
    references = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    labels = np.array([1, 0, 0])
    query = np.array([[1.0, 0.0]])
    assert weighted_knn_accuracy(query, np.array([1]), references, labels, 2, k=3, temperature=0.1) == 1.0
    # At a high temperature the votes weigh alike, and the two far ones win.
    assert weighted_knn_accuracy(query, np.array([1]), references, labels, 2, k=3, temperature=100.0) == 0.0


def centre_tap_convolution(strides, torch_conventions):
    """A one-channel conv_block whose 3x3 kernel only passes its centre pixel, with batch norm at rest."""
    block = keras.Sequential([keras.Input((6, 6, 1)), *conv_block(1, strides, torch_conventions)[:-2]])
    convolution = [layer for layer in block.layers if isinstance(layer, keras.layers.Conv2D)][0]
    kernel = np.zeros((3, 3, 1, 1), "float32")
    kernel[1, 1] = 1.0
    convolution.set_weights([kernel])
    return block


def test_pytorch_built_stride_two_convolution_samples_where_the_shortcut_does():
    image = np.arange(36, dtype="float32").reshape(1, 6, 6, 1)
    shortcut = image[:, ::2, ::2]  # a 1x1 convolution of stride 2 samples pixels 0, 2, 4
    torch_built = ops.convert_to_numpy(centre_tap_convolution(2, True)(image))
    np.testing.assert_array_equal(torch_built, shortcut)
    keras_built = ops.convert_to_numpy(centre_tap_convolution(2, False)(image))
    np.testing.assert_array_equal(keras_built, image[:, 1::2, 1::2])  # Keras's "same" pads after: half a stride off


def test_pytorch_built_stride_two_convolution_pads_one_pixel_on_every_side():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(1, 6, 6, 1)).astype("float32")
    kernel = rng.normal(size=(3, 3, 1, 1)).astype("float32")
    block = keras.Sequential([keras.Input((6, 6, 1)), *conv_block(1, 2, True)[:-2]])
    [layer for layer in block.layers if isinstance(layer, keras.layers.Conv2D)][0].set_weights([kernel])
    padded = np.pad(image[0, :, :, 0], 1)
    expected = np.array(
        [
            [np.sum(padded[2 * i : 2 * i + 3, 2 * j : 2 * j + 3] * kernel[:, :, 0, 0]) for j in range(3)]
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(ops.convert_to_numpy(block(image))[0, :, :, 0], expected, rtol=1e-5, atol=1e-6)


def test_pytorch_built_batch_norm_keeps_nine_tenths_of_its_statistics_with_epsilon_1e_5():
    normalization = conv_block(2, 1, True)[1]
    batch = np.random.default_rng(4).normal(3.0, 2.0, size=(64, 4, 4, 2)).astype("float32")
    outputs = ops.convert_to_numpy(normalization(batch, training=True))
    np.testing.assert_allclose(
        ops.convert_to_numpy(normalization.moving_mean), 0.1 * batch.mean(axis=(0, 1, 2)), rtol=1e-5
    )
    expected = (batch - batch.mean(axis=(0, 1, 2))) / np.sqrt(batch.var(axis=(0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)


def test_pytorch_built_resnet18_initialises_convolutions_he_normal_of_the_fan_out():
    keras.utils.set_random_seed(0)
    backbone = create_backbone("resnet18", torch_conventions=True)
    kernel = [weight for weight in backbone.weights if tuple(weight.shape) == (3, 3, 512, 512)][0]
    values = ops.convert_to_numpy(kernel)
    assert values.std() == pytest.approx(np.sqrt(2.0 / (3 * 3 * 512)), rel=0.01)
    assert np.abs(values).max() > 4 * values.std()  # an untruncated normal, as torch's kaiming_normal_
    # The same weights as the Keras-built one: symmetric padding adds layers, never weights.
    assert backbone.count_params() == create_backbone("resnet18").count_params()


@pytest.mark.parametrize("name, features", [("small", 256), ("resnet18", 512)])
def test_encoder_without_a_dense_layer_outputs_the_backbones_pooled_features(name, features):
    encoder = create_encoder(name, 0)
    assert not any(isinstance(layer, keras.layers.Dense) for layer in encoder.layers)
    assert encoder(np.zeros((2, 16, 16, 3), "float32")).shape == (2, features)
