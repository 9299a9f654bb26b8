"""How many clusters (scan/cluster_count.py): the sweep against brute-force references and data whose number is known,
the recipes' defaults on CIFAR-10 and on your own images, and --num_clusters=0 run end to end."""

import html.parser
import json
import os
import re

import numpy as np
import pytest
from sklearn.datasets import make_blobs

import scan_cifar10 as script
from conftest import make_image_folder
from scan.cluster_count import (
    candidate_counts,
    choose_count,
    modularity,
    neighbour_graph,
    score_counts,
    sweep_lines,
)
from scan.html_report import with_setting, write_report
from scan.settings import parse_settings, read_settings_block

TINY = ["--encoder=small", "--representation_batch_size=16", "--clustering_batch_size=16", "--representation_epochs=1",
        "--clustering_epochs=1", "--k_neighbours=3", "--embedding_batch_size=40", "--sheet_images=4"]  # fmt: skip


def brute_force_neighbours(features, k):
    """Each row's k most similar other rows (cosine), by sorting every similarity."""
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def on_the_sphere(points):
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_modularity_is_newmans_formula_on_the_symmetrised_neighbour_graph():
    rng = np.random.default_rng(0)
    neighbours = np.array([rng.choice(np.delete(np.arange(30), i), 4, replace=False) for i in range(30)])
    assignments = rng.integers(0, 5, 30)
    dense = np.zeros((30, 30))
    for anchor, row in enumerate(neighbours):
        dense[anchor, row] = dense[row, anchor] = 1  # a link either way is one undirected link
    assert np.array_equal(neighbour_graph(neighbours).toarray(), dense)
    # Q = 1/(2m) sum_ij (A_ij - k_i k_j / 2m) [c_i == c_j]
    degrees, twice_links = dense.sum(axis=1), dense.sum()
    same = assignments[:, None] == assignments[None, :]
    expected = np.sum((dense - np.outer(degrees, degrees) / twice_links) * same) / twice_links
    assert modularity(neighbour_graph(neighbours), assignments, 5) == pytest.approx(expected)
    assert modularity(neighbour_graph(neighbours), np.zeros(30, int), 1) == pytest.approx(0.0)  # one cluster: 0


@pytest.mark.parametrize("centers, dims", [(2, 16), (3, 8), (5, 32), (8, 64), (12, 128)])
def test_the_sweep_finds_the_number_of_well_separated_blobs(centers, dims):
    points, _ = make_blobs(60 * centers, dims, centers=centers, center_box=(-10, 10), random_state=centers * dims)
    features = on_the_sphere(points)
    counts = list(range(2, 16))
    scores = score_counts(features, brute_force_neighbours(features, 10), counts, seed=1)
    choice = choose_count(counts, scores)
    assert choice.chosen == centers, dict(zip(counts, scores.round(3), strict=True))
    assert len(choice.runners_up) == 2 and centers not in choice.runners_up


def test_on_noise_the_sweep_chooses_a_number_within_its_bounds():
    features = on_the_sphere(np.random.default_rng(3).normal(size=(600, 32)))
    counts = candidate_counts(len(features))
    choice = choose_count(counts, score_counts(features, brute_force_neighbours(features, 10), counts, seed=0))
    assert counts == list(range(2, 13)) and 2 <= choice.chosen <= 12
    assert len(sweep_lines(choice)) == len(counts) + 1


def test_candidates_grow_with_the_data_within_their_bounds():
    assert candidate_counts(3) == candidate_counts(24) == [2]  # too few images for more than 2 clusters
    assert candidate_counts(120) == list(range(2, 11))  # small data: up to 10 clusters of at least 10 images
    assert candidate_counts(1000) == list(range(2, 21))  # 50 images a cluster
    assert candidate_counts(40000) == list(range(2, 51))  # at most 50
    for num_images in [2, 19, 99, 499, 777, 2600]:
        counts = candidate_counts(num_images)
        assert counts[0] == 2 and counts == list(range(2, counts[-1] + 1))
        assert counts[-1] == 2 or counts[-1] * 10 <= num_images


def test_a_near_tie_goes_to_the_larger_number_and_runners_up_are_the_next_best():
    counts, scores = [2, 3, 4, 5, 6], [0.30, 0.500, 0.4980, 0.40, 0.4976]
    choice = choose_count(counts, scores)  # 0.4980 and 0.4976 are within 0.5 % of 0.5
    assert choice.chosen == 6 and choice.runners_up == [3, 4]
    assert choose_count(counts, scores, near_tie=0.0).chosen == 3
    assert choose_count(counts, [0.30, 0.500, 0.4970, 0.40, 0.4960]).chosen == 3  # more than 0.5 % below: no tie
    assert choose_count([2], [0.1]).runners_up == []
    lines = sweep_lines(choice)
    assert lines[4] == "    6 clusters: modularity 0.4976  <- chosen"
    assert lines[-1] == "number of clusters: 6, chosen from the data (runners-up: 3 and 4; --num_clusters=N sets it)"


def test_the_rerun_command_replaces_or_adds_the_number():
    assert with_setting("python scan_cifar10.py --data=a --num_clusters=0 --seed=1", "num_clusters", 7) == (
        "python scan_cifar10.py --data=a --seed=1 --num_clusters=7"
    )
    assert with_setting("python scan_cifar10.py --data=a", "num_clusters", 9) == (
        "python scan_cifar10.py --data=a --num_clusters=9"
    )


def test_the_page_names_the_choice_and_a_safe_command_for_each_runner_up(tmp_path):
    choice = choose_count([2, 3, 4, 5], [0.2, 0.5, 0.45, 0.3])._asdict()
    command = "python scan_cifar10.py --data=caf\udce9/<b>x</b> --num_clusters=0"  # a name that is not UTF-8, and HTML
    write_report(str(tmp_path / "report.html"), "t", command, None, [], [], choice)
    shown = " ".join(" ".join(Choice(tmp_path / "report.html").text).split())
    assert "3 clusters, chosen from the data" in shown and "(modularity 0.5000;" in shown
    for number, score in [(4, "0.4500"), (5, "0.3000")]:  # the runners-up, best first
        assert f"{number} clusters (modularity {score}): python scan_cifar10.py --data=caf\\xe9/<b>x</b> " in shown
        assert f"--num_clusters={number}" in shown
    assert "<b>" not in (tmp_path / "report.html").read_text()


def settings_of(argv):
    comments = read_settings_block(open(script.__file__).read())
    defaults = {name: getattr(script, name) for name in comments}
    return parse_settings(argv, defaults, comments, script.RECIPES, tuple(script.CIFAR10_SPLITS))


def test_your_own_images_get_a_chosen_number_and_cifar10_keeps_its_own():
    assert settings_of(["--data=path/to/images"]).num_clusters == 0
    assert settings_of(["--recipe=cpu", "--data=path/to/images"]).num_clusters == 0
    assert settings_of(["--recipe=cpu", "--data=path/to/images", "--num_clusters=7"]).num_clusters == 7
    assert settings_of([]).num_clusters == 20  # the tutorial's
    assert settings_of(["--recipe=cpu"]).num_clusters == settings_of(["--recipe=gpu"]).num_clusters == 10
    assert settings_of(["--data=cifar10-train", "--num_clusters=0"]).num_clusters == 0


@pytest.mark.parametrize("value", ["1", "-3"])
def test_fewer_than_two_clusters_is_one_error_line(value, tmp_path, run_here):
    folder = make_image_folder(tmp_path / "images", per_class=4)
    result = run_here([f"--data={folder}", f"--num_clusters={value}", *TINY], cwd=tmp_path)
    assert result.returncode == 2 and not os.path.exists(tmp_path / "outputs")
    assert (
        result.stderr == f"error: --num_clusters={value}: clustering needs at least 2 clusters (0 chooses the number)\n"
    )


class Choice(html.parser.HTMLParser):
    """The text of report.html's section on the number of clusters, and the <img> sources of the page."""

    def __init__(self, path):
        super().__init__()
        self.inside, self.text, self.images = False, [], []
        with open(path, encoding="utf-8") as file:
            self.feed(file.read())

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        self.inside = self.inside or attributes.get("class") == "choice"
        if tag == "img":
            self.images.append(attributes["src"])

    def handle_endtag(self, tag):
        self.inside = self.inside and tag != "section"

    def handle_data(self, data):
        if self.inside:
            self.text.append(data)


def test_num_clusters_0_chooses_runs_to_the_end_and_reruns_from_the_cache(tmp_path, run_here):
    folder = make_image_folder(tmp_path / "images", num_classes=3, per_class=40)  # 120 images: 2 to 10 clusters
    output_dir = tmp_path / "out"
    args = [f"--data={folder}", f"--output_dir={output_dir}", *TINY]  # own images, no --num_clusters: chosen
    result = run_here(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "clusters: chosen from the data once the neighbours are mined (--num_clusters=N to set it)" in out
    swept = re.findall(r"^ +(\d+) clusters: modularity (-?[\d.]+)", out, flags=re.MULTILINE)
    assert [int(count) for count, _ in swept] == list(range(2, 11))
    chosen = int(re.search(r"^number of clusters: (\d+), chosen from the data", out, flags=re.MULTILINE).group(1))
    metrics = json.loads((output_dir / "metrics.json").read_text())
    sweep = metrics["cluster_count"]
    assert sweep["chosen"] == chosen == metrics["settings"]["num_clusters"] == len(metrics["cluster_sizes"])
    assert sweep["scores"] == pytest.approx([float(score) for _, score in swept], abs=5e-5)
    assert chosen == choose_count(sweep["counts"], sweep["scores"]).chosen
    assert re.search(rf"^RESULT split=train images=120 clusters={chosen} acc=", out, flags=re.MULTILINE)
    # report.html names the choice and a command for each runner-up, and shows the sweep's figure.
    page = Choice(output_dir / "report.html")
    shown = " ".join(page.text)
    assert f"{chosen} clusters, chosen from the data" in shown and "cluster_count.png" in page.images
    for number in sweep["runners_up"]:
        assert f"python scan_cifar10.py --data={folder} --output_dir={output_dir}" in shown
        assert shown.count(f"--num_clusters={number}") == 1

    again = run_here(args, cwd=tmp_path)  # the sweep and every stage after it come from the cache
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"^cluster count: done before, reusing .*cluster_count-\w+\.npy$", again.stdout, flags=re.M)
    assert re.search(r"^clustering: done before", again.stdout, flags=re.MULTILINE)
    assert f"number of clusters: {chosen}, chosen" in again.stdout

    given = run_here([*args, f"--num_clusters={chosen}"], cwd=tmp_path)  # the chosen number, given: the same stages
    assert given.returncode == 0, given.stderr[-3000:]
    assert "modularity" not in given.stdout and re.search(r"^clustering: done before", given.stdout, flags=re.M)
    assert "cluster_count" not in json.loads((output_dir / "metrics.json").read_text())
