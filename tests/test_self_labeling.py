"""Self-labeling as SCAN runs it: the best clustering epoch kept, and the guard against a collapse."""

import argparse

import numpy as np
from keras import ops

import scan.self_labeling
from scan.clustering import HeadInputs
from scan.models import create_clustering_head
from scan.self_labeling import run_self_labeling, self_labeling_verdict
from scan.training import KeepBestEpoch

# Two groups of 6 images whose 3 neighbours are in their own group; features that tell the groups apart.
GROUPS = np.repeat([0, 1], 6)
NEIGHBOURS = np.array([[m for m in range(12) if GROUPS[m] == GROUPS[n] and m != n][:3] for n in range(12)])
FEATURES = np.eye(2, dtype="float32")[GROUPS] + np.random.default_rng(0).normal(0, 0.05, (12, 2)).astype("float32")


def scan_loss_reference(probabilities, neighbour_indices):
    """Mean -log <p_anchor, p_neighbour> plus log K minus the entropy of the mean distribution, in numpy."""
    pairs = np.log(np.einsum("nc,nkc->nk", probabilities, probabilities[neighbour_indices]))
    mean = probabilities.mean(axis=0)
    return -np.mean(pairs) + np.log(probabilities.shape[1]) + np.sum(mean * np.log(mean))


def head_with(kernel, bias):
    head = create_clustering_head(2)
    head(FEATURES)
    head.layers[0].set_weights([np.array(kernel, "float32"), np.array(bias, "float32")])
    return head


CONSISTENT = ([[6.0, -6.0], [-6.0, 6.0]], [0.0, 0.0])  # group 0 -> cluster 0, group 1 -> cluster 1, confidently
COLLAPSED = ([[0.0, 0.0], [0.0, 0.0]], [3.0, -3.0])  # every image in cluster 0
MIXED = ([[1.0, -1.0], [-1.0, 1.0]], [0.0, 0.0])  # the same partition, unsure


def test_the_guard_undoes_a_collapse_that_empties_a_confident_cluster():
    before = np.eye(2)[GROUPS] * 0.998 + 0.001  # both clusters hold images more than 99 % confident
    collapsed = np.tile([0.95, 0.05], (12, 1))
    keep, reason = self_labeling_verdict(before, collapsed, NEIGHBOURS, 0.99)
    assert not keep and reason.startswith("it emptied 1 clusters that had confident images (1)")


def test_the_guard_undoes_a_raised_scan_loss_and_keeps_a_lowered_one():
    before = np.eye(2)[GROUPS] * 0.8 + 0.1
    worse = np.eye(2)[GROUPS] * 0.5 + 0.25  # each cluster keeps its images, less surely: a higher SCAN loss
    better = np.eye(2)[GROUPS] * 0.98 + 0.01
    expected = [scan_loss_reference(p, NEIGHBOURS) for p in (before, worse, better)]
    assert expected[1] > expected[0] > expected[2]
    keep, reason = self_labeling_verdict(before, worse, NEIGHBOURS, 0.99)
    assert not keep and reason == f"it raised the SCAN loss from {expected[0]:.4f} to {expected[1]:.4f}"
    keep, reason = self_labeling_verdict(before, better, NEIGHBOURS, 0.99)
    assert keep and f"from {expected[0]:.4f} to {expected[2]:.4f}" in reason


def test_run_self_labeling_puts_the_model_from_before_back_after_a_collapse(monkeypatch, tmp_path, capsys):
    head = head_with(*CONSISTENT)
    before = [weight.copy() for weight in head.get_weights()]

    def collapse(learner, *arguments, **keywords):  # stands in for training that empties cluster 1
        head.layers[0].set_weights([np.array(value, "float32") for value in COLLAPSED])
        return {"loss": [0.1]}

    monkeypatch.setattr(scan.self_labeling, "train", collapse)  # where run_self_labeling finds it
    settings = argparse.Namespace(
        embedding_batch_size=12, self_label_threshold=0.99, self_label_batch_size=12, seed=0, self_label_epochs=1,
        self_label_learning_rate=1e-4, clustering_optimizer="adamw", weight_decay=0.0, checkpoint_seconds=0,
        self_label_guard=True,
    )  # fmt: skip
    features = HeadInputs(True, FEATURES, FEATURES, None, None)
    history = run_self_labeling(head, features, (None, None), settings, str(tmp_path), NEIGHBOURS)
    assert history == {"loss": [0.1]}
    for restored, original in zip(head.get_weights(), before, strict=True):
        np.testing.assert_array_equal(restored, original)
    assert "self-labeling: undone, the clustering model is kept: it emptied 1 clusters" in capsys.readouterr().out
    settings.self_label_guard = False  # without the guard, the collapse stays
    run_self_labeling(head, features, (None, None), settings, str(tmp_path), NEIGHBOURS)
    np.testing.assert_array_equal(head.layers[0].get_weights()[1], COLLAPSED[1])


def test_keep_best_epoch_logs_each_epochs_scan_loss_restores_the_lowest_and_survives_a_resume(tmp_path, capsys):
    head = head_with(*MIXED)
    callback = KeepBestEpoch(head, FEATURES, NEIGHBOURS, 12, str(tmp_path), "clustering")
    callback.on_train_begin()
    losses = {}
    for epoch, weights in enumerate([MIXED, CONSISTENT, COLLAPSED]):  # the second epoch is the best
        head.layers[0].set_weights([np.array(value, "float32") for value in weights])
        logs = {"loss": 1.0}
        callback.on_epoch_end(epoch, logs)
        probabilities = ops.convert_to_numpy(head(FEATURES)).astype("float64")
        # The loss is -log of float32 dot products: near a loss of 0 (the consistent epoch's 1e-5) its error is float32's
        # resolution at 1 (about 1e-7), not a share of the loss; atol allows that, rtol the larger losses' rounding.
        reference = scan_loss_reference(probabilities, NEIGHBOURS)
        np.testing.assert_allclose(logs["scan_loss"], reference, rtol=1e-4, atol=1e-6)
        losses[epoch] = logs["scan_loss"]
    callback.on_train_end()
    np.testing.assert_allclose(head.layers[0].get_weights()[0], CONSISTENT[0])
    assert f"clustering: kept epoch 2, whose SCAN loss {losses[1]:.4f} is the lowest" in capsys.readouterr().out
    # A resumed stage (a new callback on the same backup folder) still knows the best epoch.
    head.layers[0].set_weights([np.array(value, "float32") for value in COLLAPSED])
    resumed = KeepBestEpoch(head, FEATURES, NEIGHBOURS, 12, str(tmp_path), "clustering")
    resumed.on_train_begin()
    resumed.on_train_end()
    np.testing.assert_allclose(head.layers[0].get_weights()[0], CONSISTENT[0])
