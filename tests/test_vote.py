"""The neighbour vote (PREDICTION_NEIGHBOURS) compares embeddings of one encoder's weights: when the encoder learned
after the neighbours were mined, the training images are embedded again by it, never the earlier embeddings."""

import argparse

import keras
import numpy as np
import pytest

import scan.clustering
import scan_cifar10 as script
from conftest import make_image_folder
from scan.clustering import cluster_predictor, encoder_learned_after_mining
from scan.data import Dataset
from scan.models import create_encoder
from scan.neighbours import compute_embeddings, weighted_knn_votes


def settings_with(encoder_during_clustering, self_label_epochs=0):
    return argparse.Namespace(
        encoder_during_clustering=encoder_during_clustering, self_label_epochs=self_label_epochs,
        prediction_neighbours=3, mining_features="encoder", embedding_batch_size=4,
    )  # fmt: skip


def test_the_encoder_learns_after_mining_only_when_the_head_learns_on_images_and_the_encoder_trains():
    assert encoder_learned_after_mining(settings_with("tuned"))
    assert encoder_learned_after_mining(settings_with("frozen", self_label_epochs=2))  # self-labeling tunes it
    assert not encoder_learned_after_mining(settings_with("frozen"))
    assert not encoder_learned_after_mining(settings_with("cached", self_label_epochs=2))  # the head alone learns


@pytest.mark.parametrize("mode", ["tuned", "frozen"])
def test_held_out_images_are_voted_for_in_the_embedding_space_of_the_final_weights(mode):
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    train, held_out = (rng.uniform(0, 255, size=(n, 16, 16, 3)).astype("float32") for n in (10, 5))
    normalization = script.create_data_preprocessing(16, train)
    encoder = create_encoder("small", 6)
    preprocessing = script.Preprocessing(normalization, None, None)
    representation = script.Representation(encoder, encoder, {})

    def embed(images):  # the embeddings of the encoder's present weights, by hand, L2-normalised in numpy
        features = encoder.predict(normalization(images), verbose=0)
        return features / np.linalg.norm(features, axis=1, keepdims=True)

    mined = embed(train)  # what the neighbours stage saw
    if mode == "tuned":  # the clustering stage trains the encoder after mining: here, a change of its weights
        encoder.set_weights([weight + rng.normal(0, 0.3, weight.shape) for weight in encoder.get_weights()])
    neighbours = script.Neighbours(mined, None, None, None, None, None)
    probabilities = rng.dirichlet(np.ones(4), size=10).astype("float32")
    clustering = script.Clustering(None, None, None, {})
    predict = cluster_predictor(
        settings_with(mode), preprocessing, representation, neighbours, clustering, Dataset(train, None, None, ""),
        probabilities,
    )  # fmt: skip
    expected = weighted_knn_votes(embed(held_out), embed(train), probabilities, 3)
    np.testing.assert_allclose(predict(held_out), expected, atol=1e-4)
    np.testing.assert_allclose(predict(), weighted_knn_votes(embed(train), embed(train), probabilities, 3), atol=1e-4)
    stale = weighted_knn_votes(embed(held_out), mined, probabilities, 3)  # queries and votes of two encoders
    assert np.allclose(stale, expected, atol=1e-4) == (mode == "frozen")


def test_a_tiny_tuned_run_votes_with_queries_and_references_of_the_same_weights(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "images", num_classes=3, per_class=8)
    embedded = []  # (the images' count, the embedder's weights) of every embedding of the vote

    def recording(embedder, images, batch_size, data_preprocessing=None):
        embedded.append((len(images), [np.array(weight) for weight in embedder.get_weights()]))
        return compute_embeddings(embedder, images, batch_size, data_preprocessing)

    monkeypatch.setattr(scan.clustering, "compute_embeddings", recording)  # where cluster_predictor finds it
    mined = []
    monkeypatch.setattr(script, "compute_embeddings", lambda *args: mined.append(args[0].get_weights()) or
                        compute_embeddings(*args))  # fmt: skip
    script.main([
        f"--data={folder}", f"--output_dir={tmp_path / 'out'}", "--encoder=small", "--holdout_images=6",
        "--encoder_during_clustering=tuned", "--prediction_neighbours=5", "--mining_features=encoder",
        "--representation_batch_size=6", "--clustering_batch_size=6", "--representation_epochs=1",
        "--clustering_epochs=2", "--clustering_learning_rate=0.01", "--num_clusters=3", "--k_neighbours=2",
        "--embedding_batch_size=6", "--sheet_images=0",
    ])  # fmt: skip
    keras.mixed_precision.set_global_policy("float32")
    # The vote embedded the 18 training images again and the 6 held-out ones, with the same, tuned weights.
    assert [count for count, _ in embedded] == [18, 6]
    (_, references), (_, queries) = embedded
    assert all(np.array_equal(a, b) for a, b in zip(references, queries, strict=True))
    assert len(mined) == 1 and not all(np.array_equal(a, b) for a, b in zip(mined[0], queries, strict=True))
