"""report.html and assigned.html (scan/html_report.py): the page is parsed back and checked against the folder it was
written into."""

import collections
import html.parser
import os
import shutil
import urllib.parse

import numpy as np
import pytest
from PIL import Image

import scan.files
import scan.html_report as html_report
from scan.reports import save_contact_sheets

LABELS = ["airplane", "automobile", "bird", "cat <&> dog", "deer", "dog", "frog", "horse", "ship", "truck"]


class PageParser(html.parser.HTMLParser):
    """Collects a page's tags, their attributes, and its text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags = collections.Counter()
        self.attributes = collections.defaultdict(list)
        self.text = []

    def handle_starttag(self, tag, attributes):
        self.tags[tag] += 1
        self.attributes[tag].append(dict(attributes))

    def handle_data(self, data):
        self.text.append(data)


def parsed(path):
    """The PageParser of the page at `path`, and its raw text."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    parser = PageParser()
    parser.feed(text)
    parser.close()
    return parser, text


def build_demo(folder, labelled=True, num_clusters=4):
    """Writes real contact sheets (save_contact_sheets of random images, folder/clusters/cluster-NN.jpg) and two PNG
    figures into `folder`; returns the arguments of `write_report` after its path."""
    rng = np.random.default_rng(num_clusters)
    images = rng.integers(0, 256, size=(5 * num_clusters, 8, 8, 3), dtype=np.uint8)
    probabilities = np.eye(num_clusters)[np.arange(5 * num_clusters) % num_clusters] * 0.9 + 0.1 / num_clusters
    save_contact_sheets(images, probabilities, 6, os.path.join(folder, "clusters"))
    clusters = [
        {"cluster": cluster, "size": 5 + cluster, "label": LABELS[cluster % 10] if labelled else None,
         "accuracy": 40 + 5.5 * cluster if labelled else None, "sheet": f"clusters/cluster-{cluster:02d}.jpg"}
        for cluster in range(num_clusters)
    ]  # fmt: skip
    figures = ["prototypes.png", "clustering_loss.png"]
    for figure in figures:
        Image.new("RGB", (96, 64), "white").save(os.path.join(folder, figure))
    scores = {"acc": 0.4894, "nmi": 0.352, "ari": 0.259, "images": 10000, "split": "eval"} if labelled else None
    title = "The clusters of cifar10 <test> & co" if labelled else "New images in the clusters learned before"
    return title, "python scan_cifar10.py --recipe=cpu --data=path/to/images", scores, clusters, figures


def write_demo(folder, labelled=True, num_clusters=4):
    """Writes the demo and its page into `folder`; returns the page's path and the arguments it was written with."""
    arguments = build_demo(str(folder), labelled=labelled, num_clusters=num_clusters)
    path = os.path.join(folder, "report.html" if labelled else "assigned.html")
    html_report.write_report(path, *arguments)
    return path, arguments


@pytest.mark.parametrize("labelled", [True, False])
def test_every_image_of_the_page_exists_relative_to_it(labelled, tmp_path):
    path, (_, _, _, clusters, figures) = write_demo(tmp_path / "out", labelled)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "out", moved)  # the folder still works elsewhere
    parser, _ = parsed(moved / os.path.basename(path))
    sources = [attributes["src"] for attributes in parser.attributes["img"]]
    assert len(sources) == len(clusters) + len(figures)
    for source in sources:
        assert not os.path.isabs(source) and "://" not in source
        assert os.path.isfile(moved / urllib.parse.unquote(source)), source


@pytest.mark.parametrize("labelled", [True, False])
def test_every_cluster_appears_exactly_once(labelled, tmp_path):
    path, (_, _, _, clusters, _) = write_demo(tmp_path, labelled, num_clusters=12)
    parser, _ = parsed(path)
    ids = collections.Counter(attributes.get("id") for attributes in parser.attributes["article"])
    assert ids == collections.Counter(f"cluster-{cluster['cluster']:02d}" for cluster in clusters)
    texts = collections.Counter(parser.text)
    for cluster in clusters:
        assert texts[f"Cluster {cluster['cluster']}"] == 1 and texts[f"{cluster['size']} images"] == 1


def test_texts_are_escaped_and_there_is_no_script(tmp_path):
    title, settings_line = "run <b>bold</b> & <script>alert(1)</script>", "--data=a&b<c> --seed=1"
    clusters = [
        {"cluster": 0, "size": 3, "label": "cat <&> dog", "accuracy": 66.7, "sheet": None},
        {"cluster": 1, "size": 2, "label": "<img src=x>", "accuracy": 50.0, "sheet": None},
    ]
    scores = {"acc": 0.5, "nmi": 0.25, "ari": 0.125, "images": 5, "split": "<eval>"}
    path = tmp_path / "report.html"
    html_report.write_report(str(path), title, settings_line, scores, clusters, [])
    parser, text = parsed(path)
    assert parser.tags["script"] == 0 and parser.tags["b"] == 0 and parser.tags["img"] == 0
    assert "<script>" not in text and "cat &lt;&amp;&gt; dog" in text
    shown = " ".join(parser.text)
    for expected in ("run <b>bold</b> & <script>alert(1)</script>", "cat <&> dog", "<img src=x>", "--data=a&b<c>"):
        assert expected in shown
    assert "50.0%" in shown and "0.250" in shown and "5 <eval> images" in shown  # acc as a percentage


def test_page_is_self_contained_and_responsive(tmp_path):
    path, _ = write_demo(tmp_path)
    parser, text = parsed(path)
    assert parser.tags["script"] == 0 and parser.tags["link"] == 0 and parser.tags["style"] == 1
    assert "http" not in text and "@import" not in text and "url(" not in text
    viewports = [a for a in parser.attributes["meta"] if a.get("name") == "viewport"]
    assert viewports and "width=device-width" in viewports[0]["content"]
    assert "max-width: 100%" in text


def test_without_labels_there_are_no_scores_nor_accuracies(tmp_path):
    path, _ = write_demo(tmp_path, labelled=False)
    parser, _ = parsed(path)
    shown = " ".join(parser.text)
    assert "accuracy" not in shown and "majority" not in shown and "NMI" not in shown
    assert "New images in the clusters learned before" in shown


def test_image_paths_with_odd_characters_and_absolute_paths_resolve(tmp_path):
    folder = tmp_path / "out"
    (folder / "sheets #1").mkdir(parents=True)
    sheet = folder / "sheets #1" / "cluster 00 & more%.jpg"
    sheet.write_bytes(b"jpeg")  # any file: only its path is checked
    figure = folder / "loss.png"
    figure.write_bytes(b"png")
    clusters = [{"cluster": 0, "size": 1, "label": None, "accuracy": None, "sheet": "sheets #1/cluster 00 & more%.jpg"}]
    html_report.write_report(str(folder / "page.html"), "t", "s", None, clusters, [str(figure)])
    parser, _ = parsed(folder / "page.html")
    for attributes in parser.attributes["img"]:
        assert os.path.isfile(folder / urllib.parse.unquote(attributes["src"])) and not os.path.isabs(attributes["src"])


def test_report_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("the earlier page")

    def failing_replace(source, target):
        raise OSError("disk gone")

    monkeypatch.setattr(scan.files.os, "replace", failing_replace)  # how write_bytes_atomically renames
    with pytest.raises(OSError):
        html_report.write_report(str(path), "t", "s", None, [], [])
    assert path.read_text() == "the earlier page" and os.listdir(tmp_path) == ["report.html"]
