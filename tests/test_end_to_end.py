"""The whole script as a user runs it, on a tiny generated image folder, under both backends."""

import json
import os
import re

import pytest
from PIL import Image

from conftest import run_script

TINY = ["--batch_size=8", "--representation_epochs=1", "--clustering_epochs=1", "--num_clusters=3",
        "--k_neighbours=2", "--embedding_batch_size=10", "--prototypes_per_cluster=4"]  # fmt: skip
FIGURES = ["augmentations.png", "representation_loss.png", "neighbours.png", "clustering_loss.png", "prototypes.png"]


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_tiny_run_prints_the_report_and_writes_every_output(tmp_path, image_folder, backend):
    output_dir = tmp_path / "out"
    result = run_script([f"--data={image_folder}", f"--output_dir={output_dir}", *TINY], cwd=tmp_path, backend=backend)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"backend {backend} on CPU only" in out
    assert "x_data shape: (24, 32, 32, 3) - y_data shape: (24,)" in out
    sizes = [
        int(size) for size in re.findall(r"^cluster (\d+) : (\d+)$", out, flags=re.MULTILINE) for size in [size[1]]
    ]
    assert len(sizes) == 3 and sum(sizes) == 24
    label_lines = re.findall(
        r"^cluster (\d) (?:label is: (class_\d) - accuracy: ([\d.]+) %|is empty)$", out, flags=re.MULTILINE
    )
    assert len(label_lines) == 3
    overall = float(
        re.search(r"^overall majority-label accuracy: ([\d.]+) % of 24 images$", out, flags=re.MULTILINE).group(1)
    )
    assert 100 / 3 - 0.01 <= overall <= 100

    for name in FIGURES:
        with Image.open(output_dir / name) as figure:
            assert figure.format == "PNG" and figure.size[0] > 100
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["cluster_sizes"] == sizes
    assert metrics["overall_accuracy"] == overall
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
    assert not [name for name in os.listdir(output_dir) if name.startswith(".tmp")]  # no temporary files left
