"""The whole script as a user runs it, on a tiny generated image folder, under both backends."""

import csv
import html.parser
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from conftest import check_sorted_as_listed, make_image_folder, run_script, with_settings
from scan.neighbours import weighted_knn_votes

TINY = ["--representation_batch_size=8", "--clustering_batch_size=8", "--self_label_batch_size=8", "--representation_epochs=1", "--clustering_epochs=1", "--num_clusters=3",
        "--k_neighbours=2", "--embedding_batch_size=10", "--prototypes_per_cluster=4"]  # fmt: skip
FIGURES = ["augmentations.png", "representation_loss.png", "neighbours.png", "clustering_loss.png", "prototypes.png"]


def read_table(path):
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def scores_by_hand(rows, classes, num_clusters):
    """One split's scores from its rows of clusters.csv: the count of each class in each cluster, the accuracy of the
    best one-to-one matching of clusters to classes (scipy), that of each cluster's majority class, NMI and ARI
    (scikit-learn)."""
    clusters = np.array([int(row["cluster"]) for row in rows])
    labels = np.array([classes.index(row["label"]) for row in rows])
    counts = np.zeros((num_clusters, len(classes)), dtype=int)
    np.add.at(counts, (clusters, labels), 1)
    scores = {
        "images": len(rows),
        "cluster_sizes": counts.sum(axis=1).tolist(),
        "hungarian_acc": counts[linear_sum_assignment(counts, maximize=True)].sum() / len(rows),
        "majority_acc": counts.max(axis=1).sum() / len(rows),
        "nmi": normalized_mutual_info_score(labels, clusters),
        "ari": adjusted_rand_score(labels, clusters),
    }
    scores["acc"] = scores["majority_acc" if num_clusters > len(classes) else "hungarian_acc"]
    return counts, scores


def check_scores_against_clusters_csv(output_dir, printed, num_clusters):
    """Every score that metrics.json, the printed report and the RESULT line give, against the same scores recomputed
    from clusters.csv; the neighbour purity against the cached neighbours and clusters.csv's labels."""
    rows, metrics = read_table(output_dir / "clusters.csv"), json.loads((output_dir / "metrics.json").read_text())
    classes = sorted({row["label"] for row in rows})
    counts, expected = {}, {}
    for split in metrics["splits"]:
        split_rows = [row for row in rows if row["split"] == split]
        counts[split], expected[split] = scores_by_hand(split_rows, classes, num_clusters)
        for name, value in expected[split].items():
            assert metrics["splits"][split][name] == pytest.approx(value, abs=1e-12), (split, name)
        line = re.search(rf"^{split} split \(.*\): accuracy (\S+) \(.*\), NMI (\S+), ARI (\S+)$", printed, flags=re.M)
        scores = expected[split]
        assert line.groups() == (f"{scores['acc']:.2%}", f"{scores['nmi']:.4f}", f"{scores['ari']:.4f}"), split
    split = "eval" if "eval" in metrics["splits"] else "train"
    scores = expected[split]
    assert printed.strip().splitlines()[-1] == (
        f"RESULT split={split} images={scores['images']} clusters={num_clusters} acc={scores['acc']:.4f} "
        f"nmi={scores['nmi']:.4f} ari={scores['ari']:.4f}"
    )
    # The tutorial's report of the training images: each cluster's size, majority label and its share, then overall.
    train_counts = counts["train"]
    sizes = train_counts.sum(axis=1)
    assert [int(size) for size in re.findall(r"^cluster \d+ : (\d+)$", printed, flags=re.M)] == sizes.tolist()
    assert metrics["cluster_sizes"] == sizes.tolist() and len(metrics["clusters"]) == num_clusters
    for cluster, (size, reported) in enumerate(zip(sizes, metrics["clusters"], strict=True)):
        assert reported["cluster"] == cluster and reported["size"] == size
        if not size:
            assert f"\ncluster {cluster} is empty\n" in printed
            continue
        label = re.search(rf"^cluster {cluster} label is: (\S+) - accuracy: ([\d.]+) %$", printed, flags=re.M)
        assert label.group(1) == reported["label"]
        assert train_counts[cluster, classes.index(reported["label"])] == train_counts[cluster].max()  # ties either way
        share = 100 * train_counts[cluster].max() / size
        assert float(label.group(2)) == reported["accuracy"] == pytest.approx(share, abs=0.005)
    overall = re.search(r"^overall majority-label accuracy: ([\d.]+) % of (\d+) images$", printed, flags=re.M)
    share = 100 * train_counts.max(axis=1).sum() / sizes.sum()
    assert float(overall.group(1)) == metrics["overall_accuracy"] == pytest.approx(share, abs=0.005)
    assert int(overall.group(2)) == sizes.sum()
    # clusters.csv lists the training images in the order the cached neighbours index them.
    (neighbours,) = [np.load(path) for path in (output_dir / "cache").glob("neighbours-*.npy")]
    labels = np.array([classes.index(row["label"]) for row in rows if row["split"] == "train"])
    purity = np.mean(labels[neighbours] == labels[:, None])
    assert metrics["neighbour_purity"] == pytest.approx(purity, abs=1e-12)
    assert f"neighbour purity: {purity:.2%} of the {neighbours.shape[1]} neighbours share" in printed


class ReportPage(html.parser.HTMLParser):
    """report.html's score items, and each cluster card's heading and facts, as texts."""

    def __init__(self, path):
        super().__init__(convert_charrefs=True)
        self.scores, self.cards, self.card, self.tag = [], {}, None, None
        with open(path, encoding="utf-8") as file:
            self.feed(file.read())

    def handle_starttag(self, tag, attributes):
        self.tag = tag
        if tag == "li":
            self.scores.append("")
        if tag == "article":
            self.card = self.cards[dict(attributes)["id"]] = []

    def handle_endtag(self, tag):
        self.tag = None
        if tag == "article":
            self.card = None

    def handle_data(self, data):
        if self.card is not None and self.tag in ("h2", "span"):
            self.card.append(data)
        elif self.scores and self.tag in ("li", "strong"):
            self.scores[-1] += data


def check_report_page(output_dir):
    """report.html of a labelled run against metrics.json: the evaluated split's scores, then a card per cluster with
    its size, majority label and accuracy, an empty cluster with its size alone."""
    page, metrics = ReportPage(output_dir / "report.html"), json.loads((output_dir / "metrics.json").read_text())
    split = "eval" if "eval" in metrics["splits"] else "train"
    scores = metrics["splits"][split]
    assert page.scores == [
        f"accuracy {100 * scores['acc']:.1f}%", f"NMI {scores['nmi']:.3f}", f"ARI {scores['ari']:.3f}",
        f"on {scores['images']} {split} images",
    ]  # fmt: skip
    cards = {}
    for cluster in metrics["clusters"]:
        facts = [f"{cluster['size']} image{'s' if cluster['size'] != 1 else ''}"]
        if cluster["size"]:
            facts += [f"majority: {cluster['label']}", f"accuracy {cluster['accuracy']:.1f}%"]
        cards[f"cluster-{cluster['cluster']:02d}"] = [f"Cluster {cluster['cluster']}", *facts]
    assert page.cards == cards


# TensorFlow runs the tutorial's ResNet50V2; JAX the small encoder, as ResNet50V2's XLA compilation takes
# minutes on 2 cores.
@pytest.mark.parametrize("backend, encoder", [("tensorflow", "resnet50v2"), ("jax", "small")])
def test_tiny_run_prints_the_report_and_writes_every_output(tmp_path, image_folder, backend, encoder, run_here):
    output_dir = tmp_path / "out"
    args = [f"--data={image_folder}", f"--output_dir={output_dir}", f"--encoder={encoder}", *TINY]
    result = run_here(args, cwd=tmp_path, backend=backend)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"backend {backend} on CPU only, float32, recipe tutorial" in out
    if backend == "jax":  # every training step is jitted (Keras keeps XLA off on TensorFlow CPUs)
        assert "representation learning: training step XLA-compiled (jit_compile=True)" in out
        assert "clustering: training step XLA-compiled (jit_compile=True)" in out
        # Anchors and all their neighbours are gathered from the images on the device; each step compiles once.
        assert "training images: 0 MiB, held on the device, where each step gathers its batch" in out
        steps = {
            stage: compiled["steps"]
            for stage, compiled in json.loads((output_dir / "metrics.json").read_text())["compilations"].items()
        }
        assert steps["representation_learning"] == steps["clustering"] == {"train_step": 1}
        assert steps["cluster_analysis"] == {"predict_step": 1}
        assert steps["neighbours"] == {"predict_step": 2}  # the encoder's embeddings, then the mining of all anchors
    else:
        assert "training images: 0 MiB, copied batch by batch" in out
        # Op by op: a stage of a few steps would not win back XLA's compiling on a TensorFlow CPU (xla_on_cpu).
        assert "representation learning: training step not XLA-compiled (jit_compile=False)" in out
    assert "x_data shape: (24, 32, 32, 3) - y_data shape: (24,)" in out
    sizes = [
        int(size) for size in re.findall(r"^cluster (\d+) : (\d+)$", out, flags=re.MULTILINE) for size in [size[1]]
    ]
    assert len(sizes) == 3 and sum(sizes) == 24
    label_lines = re.findall(
        r"^cluster (\d) (?:label is: (class_\d) - accuracy: ([\d.]+) %|is empty)$", out, flags=re.MULTILINE
    )
    assert len(label_lines) == 3

    for name in FIGURES:
        with Image.open(output_dir / name) as figure:
            assert figure.format == "PNG" and figure.size[0] > 100
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["cluster_sizes"] == sizes
    check_scores_against_clusters_csv(output_dir, out, 3)
    check_report_page(output_dir)
    assert [cluster["size"] for cluster in metrics["clusters"]] == sizes
    assert set(metrics["timings_seconds"]) >= {
        "data",
        "representation_learning",
        "neighbours",
        "clustering",
        "cluster_analysis",
    }
    assert metrics["settings"]["num_clusters"] == 3 and metrics["images"] == 24
    assert len(metrics["losses"]["representation"]) == 1
    # The clustering stage's terms are named after their losses, in the progress line and in metrics.json.
    assert re.search(r"^\d+/\d+ - .* - consistency_loss: [\d.]+ - entropy_loss: -?[\d.e-]+ - loss: [\d.]+$", out, re.M)
    assert set(metrics["losses"]["clustering"]) == {"consistency_loss", "entropy_loss", "loss"}
    assert not [name for name in os.listdir(output_dir) if name.startswith(".tmp")]  # no temporary files left
    # clusters.csv: one row per image, the clusters of the printed sizes, sources a user can open.
    with open(output_dir / "clusters.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [sum(row["cluster"] == str(cluster) for row in rows) for cluster in range(3)] == sizes
    assert {row["split"] for row in rows} == {"train"} and len({row["source"] for row in rows}) == 24
    for row in rows:
        assert os.path.isfile(os.path.join(image_folder, row["source"])) and row["source"].startswith(
            row["label"] + "/"
        )
    assert sorted(os.listdir(output_dir / "clusters")) == ["cluster-00.jpg", "cluster-01.jpg", "cluster-02.jpg"]
    with Image.open(output_dir / "confusion_matrix_train.png") as figure:
        assert figure.format == "PNG"
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT split=train images=24 clusters=3 acc=[\d.]+ nmi=[\d.]+ ari=-?[\d.]+", last), last
    assert float(re.search(r"acc=([\d.]+)", last).group(1)) == pytest.approx(
        metrics["splits"]["train"]["acc"], abs=1e-4
    )


def test_a_mixed_bfloat16_run_reports_sorts_and_shows_its_empty_clusters_as_its_files_say(
    tmp_path, image_folder, run_here
):
    # Twelve clusters for three classes: some stay empty, and the accuracy maps each cluster to its majority class.
    # Mixed precision (bfloat16 on a CPU too) runs to the RESULT line.
    output_dir, target = tmp_path / "out", tmp_path / "sorted"
    args = [f"--data={image_folder}", f"--output_dir={output_dir}", "--encoder=small", f"--sort_into={target}",
            "--mixed_precision=mixed_bfloat16", *with_settings(TINY, "--num_clusters=12")]  # fmt: skip
    result = run_here(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend tensorflow on CPU only, mixed_bfloat16, recipe tutorial" in result.stdout
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert 0 in metrics["cluster_sizes"] and metrics["splits"]["train"]["accuracy_mapping"] == "many-to-one majority"
    check_scores_against_clusters_csv(output_dir, result.stdout, 12)
    check_report_page(output_dir)
    check_sorted_as_listed(target, output_dir / "clusters.csv", image_folder)


# On JAX the cpu recipe's run also shows that each training step and each model's prediction compiles once, and
# that a second run loads every program from the compilation cache.
# gpu and cpu cluster and self-label on cached features; scan tunes the encoder and self-labels images.
@pytest.mark.parametrize("recipe, backend", [("gpu", "jax"), ("scan", "jax"), ("cpu", "tensorflow"), ("cpu", "jax")])
def test_tiny_recipe_runs_evaluate_on_held_out_images(tmp_path, recipe, backend, run_here):
    folder = make_image_folder(tmp_path / "images", num_classes=3, per_class=10)
    output_dir = tmp_path / "out"
    tiny = ["--representation_batch_size=8", "--clustering_batch_size=8", "--self_label_batch_size=8", "--representation_epochs=1", "--clustering_epochs=1", "--self_label_epochs=1",
            "--self_label_threshold=0.34", "--num_clusters=3", "--k_neighbours=2", "--embedding_batch_size=16"]  # fmt: skip
    args = [
        f"--recipe={recipe}",
        f"--data={folder}",
        "--eval_data=",
        "--holdout_images=6",
        f"--output_dir={output_dir}",
        *tiny,
        *(["--representation_epochs=2", "--warmup_epochs=1"] if recipe == "gpu" else []),
    ]
    result = run_here(args, cwd=tmp_path, backend=backend)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"recipe {recipe}" in out
    assert re.search(
        r"^neighbour purity: [\d.]+% of the 2 neighbours share their anchor's label$", out, flags=re.MULTILINE
    )
    knn = re.search(r"^kNN accuracy: ([\d.]+)% of the 6 evaluation images take the label", out, flags=re.MULTILINE)
    # The gpu and cpu recipes train 10 heads side by side and keep the one with the lowest SCAN loss; the scan
    # recipe trains one, as SCAN's configs/scan/scan_cifar10.yml does.
    kept_head = re.search(r"^clustering: kept head \d+ of 10, whose SCAN loss -?[\d.]+ is the lowest", out, flags=re.M)
    assert bool(kept_head) == (recipe != "scan")
    assert "## Self-labeling: 1 epochs" in out
    assert re.search(
        r"^self-labeling: \d+ of 24 images are more than 34% confident, in [0-3] of 3 clusters$",
        out,
        flags=re.MULTILINE,
    )
    assert re.search(
        r"^eval split \(held-out images\): accuracy [\d.]+% \(one-to-one Hungarian mapping\)", out, flags=re.MULTILINE
    )
    assert re.fullmatch(
        r"RESULT split=eval images=6 clusters=3 acc=[\d.]+ nmi=[\d.]+ ari=-?[\d.]+", out.strip().splitlines()[-1]
    )
    metrics = json.loads((output_dir / "metrics.json").read_text())
    # The held-out accuracy of the clustering model before self-labeling, as printed.
    before = re.search(r"^self-labeling starts from: eval split accuracy ([\d.]+)%, NMI", out, flags=re.MULTILINE)
    assert before and float(before.group(1)) == round(100 * metrics["before_self_labeling"]["acc"], 2)
    assert metrics["settings"]["encoder"] == {"gpu": "resnet18", "scan": "resnet18", "cpu": "small"}[recipe]
    assert metrics["settings"]["pretext_loss"] == "ntxent" and metrics["settings"]["clustering_loss"] == "scan"
    assert set(metrics["splits"]) == {"train", "eval"} and metrics["splits"]["eval"]["images"] == 6
    check_scores_against_clusters_csv(output_dir, out, 3)
    check_report_page(output_dir)
    assert knn and float(knn.group(1)) == round(100 * metrics["knn_accuracy"], 2)
    # With KEEP_BEST_CLUSTERING_EPOCH (scan, cpu), each epoch's SCAN loss of the best head as well.
    keep_best = recipe in ("scan", "cpu")
    assert set(metrics["losses"]["clustering"]) == {"consistency_loss", "entropy_loss", "loss"} | (
        {"scan_loss"} if keep_best else set()
    )
    assert bool(re.search(r"^clustering: kept epoch 1, whose SCAN loss", out, flags=re.MULTILINE)) == keep_best
    assert re.search(r"^self-labeling: (kept|undone, the clustering model is kept): ", out, flags=re.MULTILINE) or (
        "no image passes --self_label_threshold" in out
    )
    for name in ["confusion_matrix_train.png", "confusion_matrix_eval.png", "prototypes.png"]:
        assert (output_dir / name).stat().st_size > 1000
    if (recipe, backend) != ("cpu", "jax"):
        return
    # The training rows (images, then cached features) stay on the device; every step has one shape.
    assert "training images: 0 MiB, held on the device, where each step gathers its batch" in out
    assert re.search(r"^representation learning: 3 steps of 8 per epoch$", out, flags=re.MULTILINE)
    self_labeled = "self-labeling: training step XLA-compiled" in out
    steps = {stage: compiled["steps"] for stage, compiled in metrics["compilations"].items()}
    assert steps["representation_learning"] == {"train_step": 1}
    # The encoder's features (for the kNN monitor and the head) come from one model that predicts both splits.
    assert steps["neighbours"] == {"predict_step": 3}  # the projections to mine, the mining, the encoder's features
    # The features of the recipe's augmented views (FEATURE_VIEWS), every view by one model; then the heads, to rank them.
    assert re.search(r"^feature views: 1 scan-augmented view of each of the 24 training images", out, flags=re.M)
    assert steps["clustering"] == {"train_step": 1, "predict_step": 2}
    # Two models predict once each: the clustering model, for the accuracy before self-labeling, and the head.
    assert steps["self_labeling"] == ({"train_step": 1, "predict_step": 2} if self_labeled else {"predict_step": 2})
    # Both splits then reuse the clustering model's one prediction step. The recipe's vote (PREDICTION_NEIGHBOURS)
    # also embeds the held-out images where the neighbours were mined, with a new embedder (the clustering stage
    # has frozen the encoder since the neighbours stage embedded with it): one more prediction step.
    assert steps["cluster_analysis"] == {"predict_step": 1} and "preprocessing" in steps
    assert all(compiled["from_cache"] == 0 for compiled in metrics["compilations"].values())

    again = run_script([*args, "--resume=false"], cwd=tmp_path, backend=backend)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done before" not in again.stdout  # every stage trained again, yet nothing compiled again
    compilations = json.loads((output_dir / "metrics.json").read_text())["compilations"]
    assert compilations.keys() == metrics["compilations"].keys()
    for stage, compiled in compilations.items():
        assert compiled["programs"] == compiled["from_cache"] == metrics["compilations"][stage]["programs"], stage
    line = r"^clustering: (\d+) XLA programs, 1 train_step, 2 predict_step ready in [\d.]+ s: 0 compiled, (\d+) loaded"
    match = re.search(line, again.stdout, flags=re.MULTILINE)
    assert match and match.group(1) == match.group(2)


def test_prediction_neighbours_vote_for_every_image_in_training_and_in_assigning(tmp_path, run_here):
    folder = make_image_folder(tmp_path / "images", num_classes=3, per_class=10)
    output_dir = tmp_path / "out"
    args = [f"--data={folder}", f"--output_dir={output_dir}", "--encoder=small", "--holdout_images=6",
            "--prediction_neighbours=5", *TINY]  # fmt: skip
    trained = run_here(args, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "each image takes the clusters that its 5 most similar training images vote for" in trained.stdout
    head_alone = re.search(r"^  the clustering model alone: accuracy ([\d.]+)%", trained.stdout, flags=re.MULTILINE)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["splits"]["eval"]["head_acc"] == pytest.approx(float(head_alone.group(1)) / 100, abs=1e-4)
    check_scores_against_clusters_csv(output_dir, trained.stdout, 3)
    with open(output_dir / "clusters.csv", newline="") as file:
        learned = list(csv.DictReader(file))
    # The training images' rows are the vote (tested against a brute-force one in test_representation.py) of the
    # cached head probabilities over the mined embeddings, not the head's own probabilities.
    (head_probabilities,) = [np.load(path) for path in (output_dir / "cache").glob("predictions-*.npy")]
    (embeddings,) = [np.load(path) for path in (output_dir / "cache").glob("embeddings-*.npy")]
    votes = weighted_knn_votes(embeddings, embeddings, head_probabilities, 5)
    assert not np.allclose(votes, head_probabilities, atol=1e-3)
    train_rows = [row for row in learned if row["split"] == "train"]
    assert len(train_rows) == len(votes) == 24
    for row, vote in zip(train_rows, votes, strict=True):
        assert int(row["cluster"]) == int(vote.argmax())
        assert float(row["confidence"]) == pytest.approx(vote.max(), abs=2e-4)

    # New images are voted for by the same training images: the folder's images land where training put them. The
    # assigning run embeds them again, in other batches, so their similarities may differ in the 7th digit; among
    # this tiny encoder's near-equal similarities (all above 0.99) that can swap a neighbour of equal weight and
    # move a confidence by a few 1e-4, hence the looser tolerance than in the assign test below.
    assigned = run_here([*args, f"--assign_data={folder}"], cwd=tmp_path)
    assert assigned.returncode == 0, assigned.stderr[-3000:]
    with open(output_dir / "assigned.csv", newline="") as file:
        rows = {row["source"]: row for row in csv.DictReader(file)}
    assert len(rows) == 30
    for row in learned:
        assert rows[row["source"]]["cluster"] == row["cluster"], row["source"]
        assert float(rows[row["source"]]["confidence"]) == pytest.approx(float(row["confidence"]), abs=2e-3)


def test_assign_data_puts_new_images_into_the_learned_clusters_without_training(tmp_path, run_here):
    folder = make_image_folder(tmp_path / "images", num_classes=3, per_class=10)
    output_dir = tmp_path / "out"
    args = [f"--data={folder}", f"--output_dir={output_dir}", "--encoder=small", "--holdout_images=6", *TINY]
    trained = run_here(args, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    with open(output_dir / "clusters.csv", newline="") as file:
        learned = {row["source"]: row for row in csv.DictReader(file)}
    assert sorted(row["split"] for row in learned.values()).count("eval") == 6 and len(learned) == 30

    # Sorting is no stage's setting: the assigning run reuses every stage, and lays each image out where it went.
    assigned = run_here([*args, f"--assign_data={folder}", f"--sort_into={tmp_path / 'sorted'}"], cwd=tmp_path)
    assert assigned.returncode == 0, assigned.stderr[-3000:]
    out = assigned.stdout
    assert not re.search(r"^Epoch \d", out, flags=re.MULTILINE)  # nothing trained
    assert "kNN accuracy: " in trained.stdout and "kNN accuracy" not in out  # the monitor is the training run's
    for stage in ["representation learning", "embeddings", "neighbour mining", "clustering"]:
        assert f"{stage}: done before, reusing" in out, stage
    with open(output_dir / "assigned.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    # Every image of the folder, each in the cluster the training run reported for it (held-out ones included).
    assert len(rows) == 30 and {row["split"] for row in rows} == {"assigned"}
    for row in rows:
        assert row["cluster"] == learned[row["source"]]["cluster"], row["source"]
        assert float(row["confidence"]) == pytest.approx(float(learned[row["source"]]["confidence"]), abs=2e-4)
    sizes = [int(size) for size in re.findall(r"^cluster \d+ : (\d+)$", out, flags=re.MULTILINE)]
    assert sizes == [sum(row["cluster"] == str(cluster) for row in rows) for cluster in range(3)]
    assert sorted(os.listdir(output_dir / "assigned")) == ["cluster-00.jpg", "cluster-01.jpg", "cluster-02.jpg"]
    assert out.strip().splitlines()[-1] == "RESULT split=assigned images=30 clusters=3"
    check_sorted_as_listed(tmp_path / "sorted", output_dir / "assigned.csv", folder)

    # Settings that were never trained: one line that says which command trains them; nothing assigned.
    (output_dir / "assigned.csv").unlink()
    untrained = run_here([*args, "--clustering_epochs=2", f"--assign_data={folder}"], cwd=tmp_path)
    assert untrained.returncode == 2
    assert re.search(r"error: --assign_data: no finished clustering in .* matches these settings and data; train it "
                     r"first with the same command without --assign_data", untrained.stderr)  # fmt: skip
    assert not (output_dir / "assigned.csv").exists()
    missing = run_here([*args, f"--assign_data={tmp_path / 'none'}"], cwd=tmp_path)
    assert missing.returncode == 2 and f"error: --assign_data={tmp_path / 'none'}: no such file" in missing.stderr
