"""What a run shows: the figures (augmentations, losses, neighbours, confusion matrices, prototypes), the printed
cluster report, `clusters.csv` and each cluster's contact sheet, and the last line, RESULT.
"""

import csv
import io
import math
import os
import re
from contextlib import contextmanager

import matplotlib
import numpy as np
from keras import ops
from PIL import Image, ImageDraw

from scan.backend import describe_devices
from scan.cache import cache_report
from scan.files import save_json, write_bytes_atomically
from scan.html_report import write_run_page
from scan.metrics import assign_clusters, contingency_table, majority_label_report, split_metrics
from scan.names import display_name
from scan.settings import UsageError
from scan.sorting import sort_images

matplotlib.use("Agg")  # Figures are saved as PNG files, so no display is needed.
import matplotlib.pyplot as plt  # noqa: E402

# Each figure is drawn with its texts as plain text: a class named "$5 and $10" is not mathtext.
plain_text = matplotlib.rc_context({"text.parse_math": False})
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")  # what a spreadsheet may run as a formula, and the escape


@plain_text
def plot_augmentations(image, title, data_augmentation, path):
    """Saves the image and 9 augmented versions of it."""
    figure = plt.figure(figsize=(10, 11))
    figure.add_subplot(4, 3, 2).imshow(image)
    figure.axes[0].set_title(f"original: {display_name(title)}" if title else "original")
    for i in range(9):
        augmented_images = data_augmentation(image[None].astype("float32"), training=True)
        axis = figure.add_subplot(4, 3, i + 4)
        axis.imshow(np.clip(ops.convert_to_numpy(augmented_images[0]), 0, 255).astype("uint8"))
    for axis in figure.axes:
        axis.axis("off")
    save_figure(figure, path)


@plain_text
def plot_loss_history(histories, path):
    """Saves the per-epoch curves of `histories` ({name: [value per epoch]})."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, values in histories.items():
        axis.plot(range(1, len(values) + 1), values, label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    axis.legend()
    save_figure(figure, path)


@plain_text
def plot_neighbours(images, labels, class_names, neighbour_indices, anchors, path):
    """Saves one row per anchor: the anchor image, then its neighbours."""
    ncols = neighbour_indices.shape[1] + 1
    figure = plt.figure(figsize=(2 * ncols, 2.2 * len(anchors)))
    for row, anchor_idx in enumerate(anchors):
        for col, image_idx in enumerate([anchor_idx] + neighbour_indices[anchor_idx].tolist()):
            axis = figure.add_subplot(len(anchors), ncols, row * ncols + col + 1)
            axis.imshow(images[image_idx])
            if labels is not None:
                axis.set_title(display_name(class_names[labels[image_idx]]))
            axis.axis("off")
    save_figure(figure, path)


@plain_text
def plot_confusion_matrix(counts, class_names, matching, title, path):
    """Saves the cluster x class counts, clusters ordered by their matched class."""
    order = sorted(range(len(counts)), key=lambda cluster: matching.get(cluster, len(class_names) + cluster))
    figure, axis = plt.subplots(figsize=(1 + 0.6 * len(class_names), 1 + 0.45 * len(counts)))
    axis.imshow(counts[order], cmap="Blues", aspect="auto")
    for row, cluster in enumerate(order):
        for col in range(len(class_names)):
            axis.text(col, row, counts[cluster, col], ha="center", va="center", fontsize=7)
    axis.set_xticks(range(len(class_names)), [display_name(name) for name in class_names], rotation=45, ha="right")
    axis.set_yticks(range(len(order)), [f"cluster {cluster}" for cluster in order])
    axis.set_title(title)
    save_figure(figure, path)


def evaluate_split(split, description, clustering_probs, labels, class_names, output_path):
    """Prints the SCAN metrics of one split and saves its confusion matrix; returns the metrics."""
    num_clusters = clustering_probs.shape[1]
    metrics, cluster_assignments = split_metrics(clustering_probs, labels, class_names)
    if labels is None:
        print(f"{split} split ({description}): no labels, so no accuracy")
        return metrics
    print(
        f"{split} split ({description}): accuracy {metrics['acc']:.2%} ({metrics['accuracy_mapping']} mapping), "
        f"NMI {metrics['nmi']:.4f}, ARI {metrics['ari']:.4f}"
    )
    if num_clusters > len(class_names):
        print(
            f"  {num_clusters} clusters for {len(class_names)} classes: accuracy maps each cluster to its majority class"
        )
    counts = contingency_table(cluster_assignments, labels, num_clusters, len(class_names))
    title = f"{split} split: {len(labels)} images, accuracy {metrics['acc']:.2%}"
    plot_confusion_matrix(
        counts, class_names, metrics.pop("matching"), title, output_path(f"confusion_matrix_{split}.png")
    )
    return metrics


def cluster_prototypes(cluster_assignments, cluster_confidence, num_clusters, num_images):
    """Returns, per cluster, the indices of its `num_images` most confident images (fewer if it is small)."""
    prototypes = []
    for cluster in range(num_clusters):
        members = np.flatnonzero(cluster_assignments == cluster)
        prototypes.append(members[np.argsort(-cluster_confidence[members], kind="stable")[:num_images]].tolist())
    return prototypes


@plain_text
def plot_prototypes(images, labels, class_names, prototypes, path):
    """Saves one row per cluster with its prototypes, titled with their labels when known."""
    ncols = max(1, max(len(row) for row in prototypes))
    figure = plt.figure(figsize=(2 * ncols, 2.1 * len(prototypes)))
    for cluster, indices in enumerate(prototypes):
        if not indices:
            axis = figure.add_subplot(len(prototypes), ncols, cluster * ncols + 1)
            axis.set_title(f"c{cluster}: empty")
            axis.axis("off")
        for col, image_idx in enumerate(indices):
            axis = figure.add_subplot(len(prototypes), ncols, cluster * ncols + col + 1)
            axis.imshow(images[image_idx])
            axis.set_title(
                f"c{cluster}: {display_name(class_names[labels[image_idx]])}"
                if labels is not None
                else f"cluster {cluster}"
            )
            axis.axis("off")
    save_figure(figure, path)


def report_clusters(clustering_probs, labels, class_names, prototypes_per_cluster, images, output_path):
    """Prints the cluster sizes, then each cluster's majority label and accuracy; saves prototypes.png."""
    num_clusters = clustering_probs.shape[1]
    cluster_assignments, cluster_confidence = assign_clusters(clustering_probs)
    sizes = np.bincount(cluster_assignments, minlength=num_clusters)
    for c in range(num_clusters):
        print("cluster", c, ":", sizes[c])
    empty = np.flatnonzero(sizes == 0).tolist()
    if empty:
        print(
            f"warning: {len(empty)} of {num_clusters} clusters ended empty ({', '.join(map(str, empty))}); to keep "
            "every cluster in use, raise --entropy_loss_weight (with --clustering_loss=scan) or lower --num_clusters"
        )
    prototypes = cluster_prototypes(cluster_assignments, cluster_confidence, num_clusters, prototypes_per_cluster)
    plot_prototypes(images, labels, class_names, prototypes, output_path("prototypes.png"))
    metrics = {"cluster_sizes": sizes.tolist()}
    if labels is None:
        print(
            "no labels (no class folders one folder deep): see report.html and prototypes.png for what each cluster holds"
        )
        return metrics
    report = majority_label_report(cluster_assignments, labels, num_clusters, len(class_names))
    for c in range(num_clusters):
        if report["sizes"][c]:
            label = display_name(class_names[report["majority_labels"][c]])
            print(f"cluster {c} label is: {label} - accuracy: {report['accuracies'][c]} %")
        else:
            print(f"cluster {c} is empty")
    print(f"overall majority-label accuracy: {report['overall_accuracy']} % of {len(labels)} images")
    metrics["clusters"] = [
        {"cluster": c, "size": size, "label": class_names[label], "accuracy": accuracy}
        for c, (size, label, accuracy) in enumerate(
            zip(report["sizes"], report["majority_labels"], report["accuracies"], strict=True)
        )
    ]
    metrics["overall_accuracy"] = report["overall_accuracy"]
    return metrics


def cluster_table_rows(split, dataset, probabilities):
    """One row per image of `dataset`: split, source (the image as the user knows it), cluster, confidence (that
    cluster's probability) and label (its class name; empty without labels)."""
    clusters, confidence = assign_clusters(probabilities)
    names = dataset.names or [f"{split}:{index}" for index in range(len(clusters))]
    labels = [""] * len(clusters) if dataset.labels is None else [dataset.class_names[i] for i in dataset.labels]
    return [
        (split, name, int(cluster), f"{score:.4f}", label)
        for name, cluster, score, label in zip(names, clusters, confidence, labels, strict=True)
    ]


def contact_sheet(images, title, columns=8, scale=2):
    """A JPEG's bytes: `images` [n, side, side, 3] uint8 in a grid `columns` wide, each `scale` times its size, under
    a line of `title`."""
    side = images.shape[1] * scale
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * side, rows * side + 16), "white")
    ImageDraw.Draw(sheet).text((4, 2), title, fill="black")
    for index, image in enumerate(images):
        tile = Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST)
        sheet.paste(tile, ((index % columns) * side, 16 + (index // columns) * side))
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def save_contact_sheets(images, probabilities, sheet_images, folder):
    """Writes folder/cluster-NN.jpg for each cluster: its `sheet_images` most confident images, most confident first,
    titled with its size; removes the sheets of clusters a previous run had beyond these."""
    num_clusters = probabilities.shape[1]
    clusters, confidence = assign_clusters(probabilities)
    os.makedirs(folder, exist_ok=True)
    for cluster, members in enumerate(cluster_prototypes(clusters, confidence, num_clusters, sheet_images)):
        size = int(np.sum(clusters == cluster))
        title = f"cluster {cluster}: {size} images" + (
            f", the {len(members)} most confident" if size > len(members) else ""
        )
        write_bytes_atomically(
            os.path.join(folder, f"cluster-{cluster:02d}.jpg"), contact_sheet(images[members], title)
        )
    for name in os.listdir(folder):
        if re.fullmatch(r"cluster-(\d+)\.jpg", name) and int(name[8:-4]) >= num_clusters:
            os.remove(os.path.join(folder, name))


def table_cell(value):
    """A value of clusters.csv as written: a text shown (display_name), with a "'" before it where it would start a
    formula in a spreadsheet (OWASP's CSV injection rule) or starts with "'" itself, so that reading a cell back is
    dropping one leading "'"; numbers as they are."""
    if not isinstance(value, str):
        return value
    shown = display_name(value)
    return f"'{shown}" if shown.startswith(FORMULA_STARTS) else shown


def save_cluster_table(assigned, path):
    """Writes clusters.csv: the header, then `cluster_table_rows` of each (split, dataset, probabilities)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["split", "source", "cluster", "confidence", "label"])
    for split, dataset, probabilities in assigned:
        writer.writerows(
            [table_cell(cell) for cell in row] for row in cluster_table_rows(split, dataset, probabilities)
        )
    write_bytes_atomically(path, text.getvalue().encode())


def save_figure(figure, path):
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=80)
    plt.close(figure)
    write_bytes_atomically(path, png.getvalue())


def result_line(split, metrics, num_clusters):
    """The last line the script prints: one parseable summary."""
    scores = (
        "" if "acc" not in metrics else f" acc={metrics['acc']:.4f} nmi={metrics['nmi']:.4f} ari={metrics['ari']:.4f}"
    )
    return f"RESULT split={split} images={metrics['images']} clusters={num_clusters}{scores}"


def write_metrics(run, data, representation, neighbours, clustering, self_labeling, analysis):
    """Saves metrics.json from every stage's result and prints the stage times; returns the metrics. The RESULT line
    follows the outputs written after it (`result_last`)."""
    metrics = {
        **analysis.report,
        "data": data.train.source,
        "images": len(data.train.images),
        "backend": describe_devices(run.gpus),
        "devices": run.num_devices,
        "neighbour_purity": neighbours.purity,
        "knn_accuracy": neighbours.knn_accuracy,
        "splits": analysis.splits,
        "before_self_labeling": self_labeling.before,
        "losses": {
            "representation": representation.history["loss"],
            "clustering": clustering.history,
            "self_labeling": self_labeling.history,
        },
        "timings_seconds": run.times.seconds,
        "compilations": run.times.compilations,
        "settings": vars(run.settings),
    }
    save_json(metrics, run.output_path("metrics.json"))
    times = run.times
    print("\nstage times: " + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in times.seconds.items()))
    if times.compilations:
        compile_seconds = sum(compiled["seconds"] for compiled in times.compilations.values())
        print(f"compilation: {compile_seconds:.1f}s of them in all")
    print(cache_report(run.cache.folder, run.fingerprints, run.settings.prune_cache))  # The cache's size; --prune_cache
    print(f"figures and metrics.json are in {display_name(run.settings.output_dir)}")
    return metrics


@contextmanager
def result_last(result):
    """Runs the block that writes what a finished run leaves besides metrics.json (the table, the contact sheets,
    the page, the sorting), then prints `result`, the RESULT line, as the last line, whether the block succeeded or
    not. A failure for reasons outside the model (an OSError, a UsageError such as a full disk) becomes one
    UsageError that says what failed and what is kept."""
    try:
        yield
    except (OSError, UsageError) as error:
        reason = error
        if isinstance(error, OSError) and error.strerror:
            reason = f"writing {error.filename} failed ({error.strerror})" if error.filename else error.strerror
        raise UsageError(
            f"{reason}; what the run computed is kept (the RESULT line, metrics.json and the stage cache): run the "
            "same command again to write the rest from the cache"
        ) from None
    finally:
        print(result)


def save_assignments(settings, assigned, names, title, report, scores=None, figures=()):
    """What says where each image went: the table `names[0]` of every (split, Dataset, probabilities) of `assigned`
    (clusters.csv), the contact sheets of the first one's images in the folder `names[1]`, the page `names[2]`
    (report.html: its cluster sizes and labels from `report`, the `scores`, the `figures` this run drew) and, with
    SORT_INTO, the images laid out in one folder per cluster."""
    table, sheets, page = names
    save_cluster_table(assigned, os.path.join(settings.output_dir, table))
    _, dataset, probabilities = assigned[0]
    if settings.sheet_images:
        save_contact_sheets(
            dataset.images, probabilities, settings.sheet_images, os.path.join(settings.output_dir, sheets)
        )
    sheets = sheets if settings.sheet_images else None
    write_run_page(settings.output_dir, page, title, settings.command, report, scores, sheets, figures)
    if settings.sort_into:
        sorted_line = sort_images(
            settings.sort_into, [(images, probs) for _, images, probs in assigned], settings.sort_copies
        )
        print(display_name(sorted_line))


def save_cluster_outputs(run, data, analysis):
    """Writes clusters.csv, the contact sheets and report.html (with the figures this run drew) and sorts the
    images (SORT_INTO); then prints the RESULT line, even when one of them failed."""
    split = data.evaluated()[0]
    scores, title = {**analysis.splits[split], "split": split}, f"The clusters of {data.train.source}"
    names = ("clusters.csv", "clusters", "report.html")
    with result_last(result_line(split, analysis.splits[split], run.settings.num_clusters)):
        save_assignments(run.settings, analysis.assigned, names, title, analysis.report, scores, run.figures)


def save_new_assignments(settings, new, probabilities):
    """ASSIGN_DATA's outputs: prints the cluster sizes of the new images (the Dataset `new`, their cluster
    `probabilities`); writes assigned.csv, assigned/cluster-NN.jpg and assigned.html; then prints the RESULT line.
    Returns what the run records."""
    sizes = np.bincount(assign_clusters(probabilities)[0], minlength=settings.num_clusters)
    for cluster, size in enumerate(sizes):
        print("cluster", cluster, ":", size)
    names, title = ("assigned.csv", "assigned", "assigned.html"), f"{new.source} in the clusters learned before"
    with result_last(f"RESULT split=assigned images={len(new.images)} clusters={settings.num_clusters}"):
        save_assignments(settings, [("assigned", new, probabilities)], names, title, {"cluster_sizes": sizes.tolist()})
        print(
            f"assigned {len(new.images)} images of {display_name(new.source)}: see assigned.html, assigned.csv and assigned/"
        )
    return {"assigned": len(new.images), "cluster_sizes": sizes.tolist()}
