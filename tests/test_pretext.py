"""The pretext losses beside the tutorial's (VICReg) and the small extra views (multi-crop), each against a numpy
reference written from the papers' definitions; the learner's views and a tiny run of both."""

import itertools
import json
import math
import re

import keras
import numpy as np
import pytest
from keras import ops

import scan_cifar10 as script
from conftest import make_image_folder
from scan.augmentations import SMALL_VIEW_CROP_AREA, random_resized_crop_transforms, sized_view_layers
from scan.cache import STAGE_SETTINGS, stage_fingerprints
from scan.losses import nt_xent_loss, vicreg_covariance, vicreg_invariance, vicreg_loss, vicreg_variance
from scan.models import create_encoder, create_projection_head


def variance_reference(embeddings, gamma=1.0, epsilon=1e-4):
    """VICReg's variance term: hinge on the unbiased standard deviation of each dimension, averaged."""
    return np.mean(np.maximum(0.0, gamma - np.sqrt(embeddings.var(axis=0, ddof=1) + epsilon)))


def covariance_reference(embeddings):
    """VICReg's covariance term: the off-diagonal entries of numpy's (unbiased) covariance, squared, summed, / dims."""
    covariance = np.cov(embeddings, rowvar=False)
    return sum(covariance[i, j] ** 2 for i in range(len(covariance)) for j in range(len(covariance)) if i != j) / len(
        covariance
    )


def vicreg_reference(views, small_views=()):
    """solo-learn's two-view VICReg loss (25, 25, 1) of every compared pair, averaged: each two full views, and each
    small view with each full view."""
    pairs = list(itertools.combinations(views, 2)) + [(small, full) for small in small_views for full in views]
    return np.mean(
        [
            25 * np.mean((a - b) ** 2)
            + 25 * (variance_reference(a) + variance_reference(b))
            + covariance_reference(a)
            + covariance_reference(b)
            for a, b in pairs
        ]
    )


def nt_xent_multi_crop_reference(full, small, batch_size, temperature):
    """NT-Xent with small views, row by row: every view is an anchor, the full views are the candidates (the anchor
    itself excluded), the positives the candidates of the anchor's image; the loss of a row is the mean over its
    positives of -log softmax over its candidates."""
    normalize = lambda rows: rows / np.linalg.norm(rows, axis=1, keepdims=True)  # noqa: E731
    full, anchors = normalize(full), normalize(np.concatenate([full, small]))
    similarities = anchors @ full.T / temperature
    losses = []
    for row in range(len(anchors)):
        candidates = [column for column in range(len(full)) if column != row]
        positives = [column for column in candidates if column % batch_size == row % batch_size]
        log_denominator = np.log(np.sum(np.exp(similarities[row, candidates])))
        losses.append(np.mean([log_denominator - similarities[row, column] for column in positives]))
    return np.mean(losses)


def embeddings(seed, shape, scales=(0.3, 0.8, 1.5, 3.0)):
    """Random embeddings whose dimensions spread by different scales, some below VICReg's gamma of 1, some above."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * np.resize(scales, shape[-1]) + rng.normal(size=shape[-1])).astype("float32")


def as_numpy(tensor):
    return ops.convert_to_numpy(tensor).astype("float64")


def test_each_vicreg_term_matches_numpy():
    a, b = embeddings(0, (9, 6)), embeddings(1, (9, 6))
    np.testing.assert_allclose(as_numpy(vicreg_invariance(a, b)), np.mean((a - b) ** 2.0), rtol=1e-5)
    np.testing.assert_allclose(as_numpy(vicreg_variance(a)), variance_reference(a.astype("float64")), rtol=1e-5)
    np.testing.assert_allclose(as_numpy(vicreg_covariance(a)), covariance_reference(a.astype("float64")), rtol=1e-5)
    assert variance_reference(a.astype("float64")) > 0.1 and covariance_reference(a.astype("float64")) > 0.1


@pytest.mark.parametrize("num_views, num_small_views", [(2, 0), (2, 3), (3, 2)])
def test_vicreg_loss_is_the_two_view_loss_averaged_over_the_compared_pairs(num_views, num_small_views):
    views = embeddings(2, (num_views, 7, 5))
    small = embeddings(3, (num_small_views, 7, 5)) if num_small_views else None
    expected = vicreg_reference(list(views.astype("float64")), [] if small is None else list(small.astype("float64")))
    np.testing.assert_allclose(as_numpy(vicreg_loss(views, small)), expected, rtol=1e-5)


def test_the_variance_term_is_zero_once_every_dimension_spreads_by_gamma():
    rng = np.random.default_rng(4)
    centred = rng.normal(size=(16, 5))
    centred -= centred.mean(axis=0)
    spread = centred / centred.std(axis=0, ddof=1) * np.array([1.0, 1.2, 2.0, 5.0, 1.0])  # every std >= 1
    assert float(as_numpy(vicreg_variance(spread.astype("float32")))) == 0.0
    narrow = spread * np.array([1.0, 1.0, 1.0, 1.0, 0.5])  # one dimension's std 0.5: (1 - sqrt(0.25 + 1e-4)) / 5
    np.testing.assert_allclose(
        as_numpy(vicreg_variance(narrow.astype("float32"))), variance_reference(narrow), rtol=1e-5
    )
    assert variance_reference(narrow) == pytest.approx((1 - math.sqrt(0.25 + 1e-4)) / 5, rel=1e-4)


def gradient(function, value):
    """d function(value) / d value, by the Keras backend's own differentiation (TensorFlow or JAX)."""
    if keras.backend.backend() == "jax":
        import jax

        return np.asarray(jax.grad(lambda x: function(x))(value))
    import tensorflow as tf

    variable = tf.Variable(value)
    with tf.GradientTape() as tape:
        result = function(variable)
    return tape.gradient(result, variable).numpy()


def test_the_invariance_gradient_pulls_each_view_towards_the_other():
    a, b = embeddings(5, (6, 4)), embeddings(6, (6, 4))
    descent = -gradient(lambda x: vicreg_invariance(x, b), a)
    np.testing.assert_allclose(descent, 2 * (b - a) / a.size, rtol=1e-5)  # d/da of mean((a - b)^2)
    assert np.all(np.sign(descent) == np.sign(b - a))


def test_the_variance_gradient_spreads_a_collapsed_dimension():
    rng = np.random.default_rng(7)
    collapsed = rng.normal(size=(12, 3)).astype("float32") * np.array([0.05, 2.0, 2.0], dtype="float32")
    descent = -gradient(vicreg_variance, collapsed)
    # d/dz of (1 - sqrt(var + eps)) / dims, for the one dimension below gamma: -(z - mean) / ((n - 1) std dims).
    centred = collapsed[:, 0] - collapsed[:, 0].mean()
    expected = centred / (11 * np.sqrt(collapsed[:, 0].var(ddof=1) + 1e-4) * 3)
    np.testing.assert_allclose(descent[:, 0], expected, rtol=1e-4, atol=1e-8)
    assert (collapsed[:, 0] + descent[:, 0]).std() > collapsed[:, 0].std()
    assert np.all(descent[:, 1:] == 0)  # the dimensions already spread past gamma: no gradient


@pytest.mark.parametrize("num_views, num_small_views", [(2, 3), (3, 2)])
def test_nt_xent_with_small_views_matches_a_row_by_row_reference(num_views, num_small_views):
    batch_size, rng = 4, np.random.default_rng(8)
    full = rng.normal(size=(num_views * batch_size, 6)).astype("float32")
    small = rng.normal(size=(num_small_views * batch_size, 6)).astype("float32")
    expected = nt_xent_multi_crop_reference(full.astype("float64"), small.astype("float64"), batch_size, 0.3)
    np.testing.assert_allclose(as_numpy(nt_xent_loss(full, batch_size, 0.3, small)), expected, rtol=1e-5)


def test_nt_xent_with_small_views_on_a_case_with_a_known_answer():
    # Orthogonal images, each view of an image the same unit vector: a full view's row sees its positive at 1/t and
    # 6 negatives at 0, log(1 + 6 exp(-1/t)); a small view's row, 2 positives at 1/t and 6 negatives,
    # log(2 + 6 exp(-1/t)). The full views' rows are those of NT-Xent without small views.
    batch_size, temperature = 4, 0.5
    full = np.concatenate([np.eye(batch_size, 6, dtype="float32")] * 2)
    alone = as_numpy(nt_xent_loss(full, batch_size, temperature))
    np.testing.assert_allclose(alone, np.log(1 + 6 * np.exp(-1 / temperature)), rtol=1e-5)
    same = as_numpy(nt_xent_loss(full, batch_size, temperature, full[:batch_size]))
    np.testing.assert_allclose(same, (2 * alone + np.log(2 + 6 * np.exp(-1 / temperature))) / 3, rtol=1e-5)
    # Small views that look like another image's: their positives at 0, that image's 2 views at 1/t.
    shuffled = as_numpy(nt_xent_loss(full, batch_size, temperature, np.roll(full[:batch_size], 1, axis=0)))
    np.testing.assert_allclose(shuffled, (2 * alone + np.log(2 * np.exp(1 / temperature) + 6)) / 3, rtol=1e-5)


def learner(pretext_loss, small_views, projection_head="mlp"):
    images = np.random.default_rng(9).uniform(0, 255, (6, 16, 16, 3)).astype("float32")
    preprocessing = script.create_data_preprocessing(16, images)
    normalization = preprocessing.layers[-1]
    small = sized_view_layers("simclr", normalization, 8, 1, SMALL_VIEW_CROP_AREA) if small_views else (None, None)
    return images, script.RepresentationLearner(
        create_encoder("small", 8), 12, 2, *sized_view_layers("simclr", normalization, 12, 0),
        temperature=0.3, projection_head=projection_head, pretext_loss=pretext_loss, small_views=small_views,
        small_view_preprocessing=small[0], small_view_augmentation=small[1],
    )  # fmt: skip


@pytest.mark.parametrize("pretext_loss", ["vicreg", "ntxent"])
def test_the_learner_takes_full_then_small_views_of_the_batch_view_by_view(pretext_loss):
    images, representation_learner = learner(pretext_loss, small_views=3)
    projections = ops.convert_to_numpy(representation_learner(images, training=True))
    assert projections.shape == ((2 + 3) * 6, 12)
    y_pred = embeddings(10, (5 * 6, 12))
    loss = as_numpy(representation_learner.compute_loss(y_pred=ops.convert_to_tensor(y_pred)))
    views = y_pred.astype("float64").reshape(5, 6, 12)  # rows view by view: the 2 full views, then the 3 small
    if pretext_loss == "vicreg":
        expected = vicreg_reference(list(views[:2]), list(views[2:]))
    else:
        expected = nt_xent_multi_crop_reference(y_pred[:12].astype("float64"), y_pred[12:].astype("float64"), 6, 0.3)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_small_views_have_their_side_and_crops_of_a_moderate_area():
    images = np.random.default_rng(11).uniform(0, 255, (6, 16, 16, 3)).astype("float32")
    preprocessing = script.create_data_preprocessing(16, images)
    view_preprocessing, augmentation = sized_view_layers("simclr", preprocessing.layers[-1], 8, 1, SMALL_VIEW_CROP_AREA)
    assert tuple(ops.shape(view_preprocessing(augmentation(images, training=True)))) == (6, 8, 8, 3)
    # Each crop's width and height as shares of the image: their product is the crop's area.
    transforms = ops.convert_to_numpy(
        random_resized_crop_transforms(2000, 32, 32, keras.random.SeedGenerator(0), SMALL_VIEW_CROP_AREA)
    )
    areas = np.abs(transforms[:, 0]) * transforms[:, 4]
    assert SMALL_VIEW_CROP_AREA[0] - 1e-6 <= areas.min() < 0.22 and 0.58 < areas.max() <= SMALL_VIEW_CROP_AREA[1] + 1e-6


def test_vicregs_projection_head_is_three_dense_layers_of_one_width_with_batch_norm():
    head = create_projection_head("vicreg", 24, 8, 0.1)
    head.build((None, 8))
    kinds = [type(layer).__name__ for layer in head.layers]
    assert kinds == ["Dense", "BatchNormalization", "ReLU"] * 2 + ["Dense"]
    assert [layer.units for layer in head.layers if isinstance(layer, keras.layers.Dense)] == [24, 24, 24]


def test_small_views_change_the_representation_fingerprint_and_their_absence_does_not():
    settings = {name: 1 for names in STAGE_SETTINGS.values() for name in names} | {
        "small_views": 0,
        "small_view_size": 16,
    }
    without = {name: value for name, value in settings.items() if not name.startswith("small_view")}
    stages_without = {
        stage: [n for n in names if not n.startswith("small_view")] for stage, names in STAGE_SETTINGS.items()
    }
    # Settings as they were before SMALL_VIEWS existed: the same fingerprints, so earlier caches are reused.
    assert stage_fingerprints("data", settings, STAGE_SETTINGS) == stage_fingerprints("data", without, stages_without)
    base = stage_fingerprints("data", settings, STAGE_SETTINGS)
    two = stage_fingerprints("data", {**settings, "small_views": 2}, STAGE_SETTINGS)
    smaller = stage_fingerprints("data", {**settings, "small_views": 2, "small_view_size": 12}, STAGE_SETTINGS)
    assert all(base[stage] != two[stage] != smaller[stage] for stage in STAGE_SETTINGS)


def test_a_tiny_vicreg_run_with_small_views_learns_and_clusters(tmp_path, run_here):
    folder = make_image_folder(tmp_path / "images", num_classes=3, per_class=10)
    output_dir = tmp_path / "out"
    args = [
        f"--data={folder}", "--holdout_images=6", f"--output_dir={output_dir}", "--encoder=small",
        "--augmentation=simclr", "--mining_features=projection", "--pretext_loss=vicreg", "--projection_head=vicreg",
        "--projection_units=32", "--small_views=2", "--small_view_size=12", "--representation_batch_size=8",
        "--clustering_batch_size=8", "--representation_epochs=1", "--clustering_epochs=1", "--num_clusters=3",
        "--k_neighbours=2", "--embedding_batch_size=16", "--sheet_images=0",
    ]  # fmt: skip
    result = run_here(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.fullmatch(
        r"RESULT split=eval images=6 clusters=3 acc=[\d.]+ nmi=[\d.]+ ari=-?[\d.]+",
        result.stdout.strip().splitlines()[-1],
    )
    metrics = json.loads((output_dir / "metrics.json").read_text())
    settings = metrics["settings"]
    assert (settings["pretext_loss"], settings["small_views"], settings["small_view_size"]) == ("vicreg", 2, 12)
    (loss,) = metrics["losses"]["representation"]
    assert math.isfinite(loss) and loss > 0
    # The neighbours were mined among the outputs of VICReg's expander, 32 wide (MINING_FEATURES = "projection").
    (embeddings_file,) = (output_dir / "cache").glob("embeddings-*.npy")
    assert np.load(embeddings_file).shape == (24, 32)
