"""Neighbour mining against brute force; the majority-label report, prototypes, clusters.csv and the contact sheets
on hand-made cases."""

import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder
from scan.data import Dataset, load_dataset, split_holdout
from scan.metrics import majority_label_report
from scan.neighbours import mine_neighbours
from scan.reports import cluster_prototypes, report_clusters, save_cluster_table, save_contact_sheets


def brute_force_neighbours(features, k):
    similarities = features @ features.T
    np.fill_diagonal(similarities, -np.inf)  # self excluded
    return np.argsort(-similarities, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("num_images, k, batch_size", [(37, 5, 8), (10, 9, 3), (64, 1, 64), (5, 2, 500)])
def test_mining_matches_brute_force_for_every_image(num_images, k, batch_size):
    features = np.random.default_rng(num_images).normal(size=(num_images, 16)).astype("float32")
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    actual = mine_neighbours(features, k, batch_size)
    assert actual.shape == (num_images, k)
    np.testing.assert_array_equal(actual, brute_force_neighbours(features.astype("float64"), k))


def test_mining_excludes_the_image_itself_even_with_duplicates():
    # Rows 0 and 1 are identical: each must find the other, never itself.
    features = np.array([[1, 0], [1, 0], [0.6, 0.8], [0, 1]], dtype="float32")
    actual = mine_neighbours(features, 2, 3)
    assert actual[0, 0] == 1 and actual[1, 0] == 0
    assert all(i not in row for i, row in enumerate(actual))


def test_majority_label_report_on_a_hand_made_case():
    # cluster 0: labels 1,1,2 -> label 1, 66.67 %; cluster 1: empty; cluster 2: labels 0,0,0,2 -> label 0, 75 %.
    assignments = np.array([0, 0, 0, 2, 2, 2, 2])
    labels = np.array([1, 1, 2, 0, 0, 0, 2])
    report = majority_label_report(assignments, labels, num_clusters=3, num_classes=3)
    assert report["sizes"] == [3, 0, 4]
    assert report["majority_labels"][0] == 1 and report["majority_labels"][2] == 0
    assert report["accuracies"] == [66.67, 0.0, 75.0]
    assert report["overall_accuracy"] == round(5 / 7 * 100, 2)


def test_cluster_prototypes_are_the_most_confident_members():
    assignments = np.array([1, 0, 1, 1, 0])
    confidence = np.array([0.5, 0.9, 0.8, 0.7, 0.95])
    assert cluster_prototypes(assignments, confidence, num_clusters=3, num_images=2) == [[4, 1], [2, 3], []]


def test_the_report_names_empty_clusters_and_the_remedy(tmp_path, capsys):
    labels = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.eye(4)[[0, 0, 1, 1, 3, 3]] * 0.9 + 0.025  # cluster 2 receives no image
    output_path = lambda name: str(tmp_path / name)  # noqa: E731
    metrics = report_clusters(probabilities, labels, ["a", "b", "c"], 2, np.zeros((6, 8, 8, 3), np.uint8), output_path)
    out = capsys.readouterr().out
    assert metrics["cluster_sizes"] == [2, 2, 0, 2]
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: 1 of 4 clusters ended empty (2); to keep every cluster in use, raise --entropy_loss_weight "
        "(with --clustering_loss=scan) or lower --num_clusters"
    ]
    report_clusters(
        np.eye(3)[[0, 1, 2, 0, 1, 2]], labels, ["a", "b", "c"], 2, np.zeros((6, 8, 8, 3), np.uint8), output_path
    )
    assert "ended empty" not in capsys.readouterr().out


def test_cluster_table_has_a_row_per_image_with_its_source_cluster_confidence_and_label(tmp_path):
    probabilities = np.array([[0.7, 0.3], [0.2, 0.8], [0.55, 0.45]])
    train = Dataset(
        np.zeros((3, 2, 2, 3), np.uint8), np.array([1, 0, 1]), ["cat", "dog"], "x", ["a.png", "b/c.png", "d.jpg"]
    )
    unlabelled = Dataset(np.zeros((1, 2, 2, 3), np.uint8), None, None, "y", ["e.png"])
    path = str(tmp_path / "clusters.csv")
    save_cluster_table([("train", train, probabilities), ("eval", unlabelled, np.array([[0.1, 0.9]]))], path)
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    assert rows == [
        ["split", "source", "cluster", "confidence", "label"],
        ["train", "a.png", "0", "0.7000", "dog"],
        ["train", "b/c.png", "1", "0.8000", "cat"],
        ["train", "d.jpg", "0", "0.5500", "dog"],
        ["eval", "e.png", "1", "0.9000", ""],
    ]


def test_folder_and_archive_images_keep_the_names_that_find_them_through_the_hold_out(tmp_path):
    folder = make_image_folder(tmp_path / "images", num_classes=2, per_class=5)
    archive = shutil.make_archive(str(tmp_path / "images"), "zip", tmp_path, "images")
    for data in (folder, archive):
        train, held_out = split_holdout(load_dataset(data, 32, 0, 0), 3, 0)
        assert len(train.names) == 7 and len(held_out.names) == 3
        for dataset in (train, held_out):
            for name, image, label in zip(dataset.names, dataset.images, dataset.labels, strict=True):
                path = os.path.join(folder, name.removeprefix("images/"))
                np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), image)
                assert name.removeprefix("images/").split("/")[0] == dataset.class_names[label]
        assert all(name.startswith("images/") for name in train.names) == (data == archive)


def test_contact_sheets_show_each_clusters_most_confident_images_first(tmp_path):
    images = np.stack([np.full((4, 4, 3), value, np.uint8) for value in (0, 80, 160, 240)])
    probabilities = np.array([[0.6, 0.4], [0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    (tmp_path / "clusters").mkdir()
    (tmp_path / "clusters" / "cluster-07.jpg").write_bytes(b"from a run with 8 clusters")
    save_contact_sheets(images, probabilities, 1, str(tmp_path / "clusters"))
    assert sorted(os.listdir(tmp_path / "clusters")) == ["cluster-00.jpg", "cluster-01.jpg"]
    # Each sheet holds one tile (the most confident image): cluster 0's is image 1 (80), cluster 1's image 2 (160).
    for cluster, value in [(0, 80), (1, 160)]:
        with Image.open(tmp_path / "clusters" / f"cluster-0{cluster}.jpg") as sheet:
            tile = np.asarray(sheet.convert("RGB"))[16 + 2 : 16 + 6, 2:6]
        assert np.abs(tile.astype(int) - value).max() <= 8
