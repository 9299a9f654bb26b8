"""SCAN's metrics against hand-made cases; the encoders' shapes; the augmentation's resampling."""

import argparse

import keras
import numpy as np
import pytest
from keras import ops

import scan_cifar10 as script
from scan.augmentations import HUE_COS, HUE_FIXED, HUE_SIN, FeatureViews, ImageAugmentation, affine_resample
from scan.cache import StageCache
from scan.clustering import choose_head_inputs, create_clustering_models
from scan.data import Dataset
from scan.metrics import clustering_scores
from scan.models import create_backbone, create_clustering_head, create_clustering_model, create_encoder
from scan.neighbours import compute_embeddings, neighbour_purity
from scan.run import Run


def test_hungarian_accuracy_of_a_permuted_labelling_is_one():
    labels = np.random.default_rng(0).integers(0, 5, size=200)
    permutation = np.array([3, 0, 4, 1, 2])
    scores = clustering_scores(permutation[labels], labels, num_clusters=5, num_classes=5)
    assert scores["acc"] == scores["hungarian_acc"] == 1.0
    assert scores["nmi"] == pytest.approx(1.0) and scores["ari"] == pytest.approx(1.0)
    assert scores["matching"] == {int(permutation[k]): k for k in range(5)}


def test_hungarian_accuracy_uses_a_one_to_one_matching():
    # Both clusters are mostly class 0: majority maps both to 0 (7/8), one-to-one must give one to class 1.
    clusters = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    labels = np.array([0, 0, 0, 1, 0, 0, 0, 0])
    scores = clustering_scores(clusters, labels, num_clusters=2, num_classes=2)
    assert scores["majority_acc"] == 7 / 8
    # One-to-one: cluster 0 -> class 1 and cluster 1 -> class 0 gives 1 + 4 right, better than 3 + 0.
    assert scores["hungarian_acc"] == 5 / 8 and scores["acc"] == 5 / 8
    assert scores["accuracy_mapping"] == "one-to-one Hungarian"


def test_more_clusters_than_classes_use_the_majority_mapping():
    clusters = np.array([0, 0, 1, 1, 2, 2])
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = clustering_scores(clusters, labels, num_clusters=3, num_classes=2)
    assert scores["accuracy_mapping"] == "many-to-one majority"
    assert scores["acc"] == scores["majority_acc"] == 1.0 and scores["hungarian_acc"] == 4 / 6


def pair_counting_ari(a, b):
    """Adjusted Rand index from its definition: pair counts over all pairs of items."""
    n = len(a)
    same_a = np.equal.outer(a, a)[np.triu_indices(n, 1)]
    same_b = np.equal.outer(b, b)[np.triu_indices(n, 1)]
    both, pairs = np.sum(same_a & same_b), n * (n - 1) / 2
    expected = np.sum(same_a) * np.sum(same_b) / pairs
    return (both - expected) / ((np.sum(same_a) + np.sum(same_b)) / 2 - expected)


def entropy_nmi(a, b):
    """NMI with the arithmetic-mean normalisation, from entropies of the joint distribution."""
    joint = np.histogram2d(a, b, bins=(np.max(a) + 1, np.max(b) + 1))[0] / len(a)
    entropy = lambda p: -np.sum(p[p > 0] * np.log(p[p > 0]))  # noqa: E731
    mutual = entropy(joint.sum(1)) + entropy(joint.sum(0)) - entropy(joint.ravel())
    return mutual / ((entropy(joint.sum(1)) + entropy(joint.sum(0))) / 2)


def test_nmi_and_ari_match_their_definitions():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=60)
    clusters = np.where(rng.uniform(size=60) < 0.7, labels, rng.integers(0, 4, size=60))
    scores = clustering_scores(clusters, labels, num_clusters=4, num_classes=4)
    assert scores["ari"] == pytest.approx(pair_counting_ari(clusters, labels))
    assert scores["nmi"] == pytest.approx(entropy_nmi(clusters, labels))


def test_neighbour_purity_on_a_hand_made_case():
    labels = np.array([0, 0, 1, 1])
    neighbours = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])
    assert neighbour_purity(neighbours, labels) == 4 / 8


def test_cifar_resnet18_has_512_features_and_the_papers_parameter_count():
    backbone = create_backbone("resnet18")
    assert backbone.output_shape == (None, 512)
    trainable = sum(int(np.prod(weight.shape)) for weight in backbone.trainable_weights)
    assert trainable == 11_168_832  # torchvision-style CIFAR ResNet-18 without its 10-class layer
    assert backbone.count_params() == pytest.approx(11.2e6, rel=0.01)
    encoder = create_encoder("resnet18", 512)
    assert encoder.output_shape == (None, 512)
    assert encoder(np.zeros((2, 32, 32, 3), "float32")).shape == (2, 512)


def test_small_cnn_normalises_every_convolution_but_the_first():
    backbone = create_backbone("small")
    # 3x3 convolutions 3->32 (with bias), 32->64, 64->128, 128->256 (without); four batch-norm weights per
    # channel after the last three.
    convolutions = 3 * 3 * 3 * 32 + 32 + 3 * 3 * (32 * 64 + 64 * 128 + 128 * 256)
    assert backbone(np.zeros((2, 24, 24, 3), "float32")).shape == (2, 256)
    assert backbone.count_params() == convolutions + 4 * (64 + 128 + 256)


def test_encoders_embed_images_of_any_side():
    # SimCLR trains on VIEW_SIZE views; the same encoder then embeds TARGET_SIZE images.
    for name in ("small", "resnet50v2"):
        encoder = create_encoder(name, 64)
        for side in (32, 40):
            assert encoder(np.zeros((2, side, side, 3), "float32")).shape == (2, 64)


def softmax(logits):
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def test_clustering_head_standardises_the_unit_vectors_of_cached_features():
    features = np.random.default_rng(5).normal(3.0, 2.0, size=(50, 6)).astype("float32")
    head = create_clustering_head(4, features)
    probabilities = ops.convert_to_numpy(head(features))
    kernel, bias = head.layers[-2].get_weights()
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    standardised = (unit - unit.mean(axis=0)) / unit.std(axis=0)
    np.testing.assert_allclose(probabilities, softmax(standardised @ kernel + bias), atol=1e-4)
    tutorial_head = create_clustering_head(4)  # without cached features: the tutorial's Dense and softmax
    probabilities = ops.convert_to_numpy(tutorial_head(features))
    kernel, bias = tutorial_head.layers[-2].get_weights()
    np.testing.assert_allclose(probabilities, softmax(features @ kernel + bias), atol=1e-5)


def test_clustering_model_on_images_matches_the_head_on_the_features_it_learned_from():
    images = np.random.default_rng(6).uniform(0, 255, size=(12, 16, 16, 3)).astype("float32")
    encoder = create_encoder("small", 8)
    preprocessing = script.create_data_preprocessing(16, images)
    features = compute_embeddings(encoder, images, 5, preprocessing)
    head = create_clustering_head(3, features)
    model = create_clustering_model(encoder, head, 16, preprocessing)
    np.testing.assert_allclose(model.predict(images, verbose=0), ops.convert_to_numpy(head(features)), atol=1e-4)


@pytest.mark.parametrize("mining_features", ["projection", "encoder"])
def test_head_features_put_the_head_on_the_projection_head_the_neighbours_were_mined_in(tmp_path, mining_features):
    keras.utils.set_random_seed(7)  # weights whose features are not all zero, whichever tests ran before
    images = np.random.default_rng(7).uniform(0, 255, size=(12, 16, 16, 3)).astype("float32")
    normalization = script.create_data_preprocessing(16, images)
    preprocessing = script.Preprocessing(normalization, None, None)
    encoder = create_encoder("small", 8)
    projector = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(5)])
    representation = script.Representation(encoder, keras.Sequential([encoder, projector]), {})
    # The reference: the projection head's outputs of the preprocessed images, by hand, L2-normalised in numpy.
    projections = projector.predict(encoder.predict(normalization(images), verbose=0), verbose=0)
    projections /= np.linalg.norm(projections, axis=1, keepdims=True)
    settings = argparse.Namespace(
        encoder_during_clustering="cached", head_features="projection", mining_features=mining_features,
        embedding_batch_size=5, data_on_device="false", strong_augmentation="augmentation", num_clusters=3,
        num_heads=2, input_size=16, k_neighbours=2, projection_units=5, seed=0, output_dir=str(tmp_path),
        feature_views=0,
    )  # fmt: skip
    run = Run(settings, gpus=[], num_devices=1, times=None)
    (tmp_path / "cache").mkdir()
    run.cache = StageCache(str(tmp_path / "cache"), resume=True)
    run.fingerprints = {"embeddings": "e", "neighbours": "n"}
    data = script.Data(Dataset(images, None, [], "images"), None, "digest")
    neighbours = script.find_neighbours(run, data, preprocessing, representation)
    head_inputs = choose_head_inputs(run, data, preprocessing, representation, neighbours)
    # Mined among the projections: those very features, not computed again; else the projections, computed here.
    assert (head_inputs.inputs is neighbours.feature_vectors) == (mining_features == "projection")
    np.testing.assert_allclose(head_inputs.inputs, projections, atol=1e-5)
    models = create_clustering_models(run, preprocessing, representation, head_inputs)
    # The kept model on images is the head on the projections, as a numpy softmax of the standardised unit vectors.
    mean, variance = (ops.convert_to_numpy(w) for w in models.head.layers[1].get_weights()[:2])
    kernel, bias = models.head.layers[-2].get_weights()
    reference = softmax((projections - mean) / np.sqrt(variance) @ kernel + bias)
    np.testing.assert_allclose(models.model.predict(images, verbose=0), reference, atol=1e-4)
    settings.head_features = "encoder"  # the tutorial's: the encoder's features, those mined in or computed here
    encoder_features = choose_head_inputs(run, data, preprocessing, representation, neighbours).inputs
    assert (encoder_features is neighbours.feature_vectors) == (mining_features == "encoder")
    reference = encoder.predict(normalization(images), verbose=0)
    np.testing.assert_allclose(
        encoder_features, reference / np.linalg.norm(reference, axis=1, keepdims=True), atol=1e-5
    )


def test_feature_views_cache_the_features_of_strongly_augmented_views_of_each_image(tmp_path, capsys):
    images = np.random.default_rng(8).uniform(0, 255, size=(12, 16, 16, 3)).astype("float32")
    normalization = script.create_data_preprocessing(16, images)
    encoder = create_encoder("small", 8)
    representation = script.Representation(encoder, encoder, {})
    settings = argparse.Namespace(
        encoder_during_clustering="cached", head_features="encoder", mining_features="encoder",
        embedding_batch_size=5, data_on_device="false", strong_augmentation="scan", augmentation="simclr",
        feature_views=3, k_neighbours=2, seed=4, output_dir=str(tmp_path),
    )  # fmt: skip
    run = Run(settings, gpus=[], num_devices=1, times=None)
    (tmp_path / "cache").mkdir()
    run.cache = StageCache(str(tmp_path / "cache"), resume=True)
    run.fingerprints = {"embeddings": "e", "neighbours": "n", "feature_views": "v"}
    data = script.Data(Dataset(images, None, [], "images"), None, "digest")
    preprocessing = script.Preprocessing(normalization, None, None)
    neighbours = script.find_neighbours(run, data, preprocessing, representation)
    head_inputs = choose_head_inputs(run, data, preprocessing, representation, neighbours)
    assert "feature views: 3 scan-augmented views of each of the 12 training images" in capsys.readouterr().out
    # The model predicts the images' own features; training draws among them (view 0) and the 3 views.
    assert head_inputs.inputs is neighbours.feature_vectors and head_inputs.training_rows.shape == (12, 4, 8)
    np.testing.assert_array_equal(head_inputs.training_rows[:, 0], head_inputs.inputs)
    assert isinstance(head_inputs.augmentation, FeatureViews)
    # The reference: SCAN's strong augmentation drawn from the same seed (SEED + 13), view after view, for all 12
    # images at once (not in EMBEDDING_BATCH_SIZE's batches of 5: the views must not depend on a setting that their
    # fingerprint leaves out), then the encoder's features of the normalised views by hand, L2-normalised in numpy.
    augmentation = ImageAugmentation("scan", seed=4 + 13)
    for view in range(1, 4):
        augmented = ops.convert_to_numpy(augmentation(images, training=True))
        reference = encoder.predict(normalization(augmented), verbose=0)
        reference /= np.linalg.norm(reference, axis=1, keepdims=True)
        np.testing.assert_allclose(head_inputs.training_rows[:, view], reference, atol=1e-5)
    assert np.abs(head_inputs.training_rows[:, 1] - head_inputs.training_rows[:, 2]).max() > 0.01
    # A second run reads the views from the cache.
    run.cache = StageCache(str(tmp_path / "cache"), resume=True)
    again = choose_head_inputs(run, data, preprocessing, representation, neighbours)
    assert "feature views: done before, reusing" in capsys.readouterr().out
    np.testing.assert_array_equal(again.training_rows, head_inputs.training_rows)


def test_feature_views_draw_one_view_per_row_in_training_and_the_image_itself_otherwise():
    rows = np.random.default_rng(9).normal(size=(3000, 3, 4)).astype("float32")
    drawn = ops.convert_to_numpy(FeatureViews(seed=1)(rows, training=True))
    # Each row is exactly one of its own three views, and each view is drawn about a third of the time.
    matches = np.all(drawn[:, None] == rows, axis=-1)
    assert (matches.sum(axis=1) == 1).all()
    assert all(900 < count < 1100 for count in matches.sum(axis=0))  # 1000 +- 4.7 standard deviations
    np.testing.assert_array_equal(FeatureViews(seed=1)(rows, training=False), rows[:, 0])
    np.testing.assert_array_equal(FeatureViews(draw=False)(rows, training=True), rows[:, 0])


def test_affine_resample_equals_keras_affine_transform():
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, size=(3, 9, 11, 3)).astype("float32")
    transforms = np.array(
        [[0.9, 0.1, 1.3, -0.2, 1.1, -0.7], [-1, 0, 10, 0, 1, 0], [1.2, 0.3, -2.5, 0.1, 0.8, 3.2]], dtype="float32"
    )
    ours = affine_resample(ops.convert_to_tensor(images), ops.convert_to_tensor(transforms))
    keras_transforms = np.concatenate([transforms, np.zeros((3, 2), "float32")], axis=1)  # no projective part
    reference = ops.image.affine_transform(images, keras_transforms, interpolation="bilinear", fill_mode="nearest")
    np.testing.assert_allclose(ops.convert_to_numpy(ours), ops.convert_to_numpy(reference), atol=1e-3)


def test_simclr_augmentation_keeps_shape_and_range_and_is_identity_at_inference():
    images = np.random.default_rng(3).uniform(0, 255, size=(16, 12, 12, 3)).astype("float32")
    augmentation = ImageAugmentation("simclr", seed=0)
    augmented = ops.convert_to_numpy(augmentation(images, training=True))
    assert augmented.shape == images.shape
    assert augmented.min() >= -1e-3 and augmented.max() <= 255 + 1e-3
    assert not np.allclose(augmented, images)
    np.testing.assert_array_equal(ops.convert_to_numpy(augmentation(images, training=False)), images)


def test_hue_rotation_matrices_keep_gray_and_compose():
    gray = np.full(3, 0.5)
    for angle in (0.3, -1.0):
        matrix = HUE_FIXED + np.cos(angle) * HUE_COS + np.sin(angle) * HUE_SIN
        np.testing.assert_allclose(matrix @ gray, gray, atol=1e-9)  # a hue shift leaves grays alone
    identity = HUE_FIXED + HUE_COS
    np.testing.assert_allclose(identity, np.eye(3), atol=1e-9)
