"""One static HTML page that shows every cluster of a run: its size, majority label, accuracy and contact sheet.

The page is self-contained (inline CSS, no JavaScript, no fonts or styles from elsewhere) and names its images by
paths relative to its own folder, so the output folder can be moved, zipped or opened from a phone.
"""

import html
import os
import urllib.parse

from scan.files import write_bytes_atomically
from scan.names import display_name

SCORE_NAMES = {"acc": "accuracy", "nmi": "NMI", "ari": "ARI"}

STYLE = """
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1400px; padding: 12px; font: 16px/1.45 system-ui, -apple-system, "Segoe UI",
  Roboto, sans-serif; color: #1d1d1f; background: #f5f5f7; }
h1 { font-size: 1.5rem; margin: 0.3em 0; overflow-wrap: anywhere; }
h2 { font-size: 1.15rem; margin: 0 0 0.3em; }
.settings { font: 0.85rem/1.4 ui-monospace, Menlo, Consolas, monospace; color: #444; margin: 0 0 0.8em; }
.settings span, .facts span { display: inline-block; max-width: 100%; overflow-wrap: anywhere; }
.scores { display: flex; flex-wrap: wrap; gap: 6px 20px; margin: 0 0 1em; padding: 0; list-style: none; }
.scores strong { font-size: 1.2rem; }
.clusters { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 340px), 1fr)); gap: 12px; }
.card { background: #fff; border-radius: 10px; padding: 10px; box-shadow: 0 1px 3px rgba(0, 0, 0, 0.12);
  min-width: 0; display: flex; flex-direction: column; }
.card > a, .card > .missing { margin-top: auto; }
.card p { margin: 0 0 0.5em; color: #444; overflow-wrap: anywhere; }
img { display: block; max-width: 100%; height: auto; }
.figures { margin-top: 1.5em; }
.figures figure { margin: 1em 0; }
.figures img { background: #fff; }
figcaption { font-size: 0.85rem; color: #666; overflow-wrap: anywhere; }
.missing { color: #999; font-style: italic; }
.choice { background: #fff; border-radius: 10px; padding: 10px; margin: 0 0 1em; }
.choice p, .choice ul { margin: 0.3em 0; }
code { font: 0.85rem/1.4 ui-monospace, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
"""


def spans(texts):
    """Each text escaped in a <span> that wraps only when it is wider than the line by itself."""
    return [f"<span>{html.escape(text)}</span>" for text in texts]


def image_link(path, folder):
    """The URL of image `path` for a page in `folder`: relative to the folder, '/'-separated, %-quoted."""
    if os.path.isabs(path):
        path = os.path.relpath(path, folder)
    return urllib.parse.quote(path.replace(os.sep, "/"))


def score_items(scores):
    """The <li> items of the measured scores: accuracy as a percentage, NMI and ARI, the images and split."""
    items = []
    for key, value in scores.items():
        if key in ("images", "split"):
            continue
        shown = f"{100 * value:.1f}%" if key == "acc" else f"{value:.3f}" if isinstance(value, float) else value
        items.append(f"<li>{html.escape(SCORE_NAMES.get(key, key))} <strong>{html.escape(str(shown))}</strong></li>")
    if "images" in scores:
        split = f" {scores['split']}" if scores.get("split") else ""
        items.append(f"<li>on {html.escape(str(scores['images']))}{html.escape(split)} images</li>")
    return items


def cluster_card(cluster, folder):
    """The <article> of one cluster: its number, size, majority label and accuracy (when known), its sheet."""
    number = int(cluster["cluster"])
    facts = [f"{cluster['size']} image{'s' if cluster['size'] != 1 else ''}"]
    if cluster.get("label") is not None:
        facts.append(f"majority: {display_name(cluster['label'])}")
    if cluster.get("accuracy") is not None:
        facts.append(f"accuracy {cluster['accuracy']:.1f}%")
    if cluster.get("sheet"):
        link = html.escape(image_link(cluster["sheet"], folder))
        alt = html.escape(f"the most confident images of cluster {number}")
        picture = f'<a href="{link}"><img src="{link}" alt="{alt}" loading="lazy"></a>'
    else:
        picture = '<p class="missing">no contact sheet</p>'
    return (
        f'<article class="card" id="cluster-{number:02d}">\n<h2>Cluster {number}</h2>\n'
        f'<p class="facts">{" · ".join(spans(facts))}</p>\n{picture}\n</article>'
    )


def figure_block(path, folder):
    """The <figure> of one training figure, captioned with its file name."""
    link = html.escape(image_link(path, folder))
    name = html.escape(os.path.basename(path))
    return f'<figure><img src="{link}" alt="{name}" loading="lazy"><figcaption>{name}</figcaption></figure>'


def with_setting(command, name, value):
    """`command` with --`name`=`value` in place of its own --`name`=..., or added at its end."""
    words = [word for word in command.split() if not word.startswith(f"--{name}=")]
    return " ".join([*words, f"--{name}={value}"])


def choice_block(choice, command):
    """The <section> that says how the number of clusters was chosen (`choice`: a ClusterCount as a dict) and how to
    rerun `command` with each runner-up, which reuses every stage before clustering."""
    scores = dict(zip(choice["counts"], choice["scores"], strict=True))
    chosen = choice["chosen"]
    parts = [
        '<section class="choice">\n<h2>How many clusters</h2>',
        f"<p>{chosen} clusters, chosen from the data: of the k-means splits into {choice['counts'][0]} to "
        f"{choice['counts'][-1]} clusters, the one whose neighbour links stay inside clusters most, against chance "
        f"(modularity {scores[chosen]:.4f}; near-ties go to the larger number; cluster_count.png below).</p>",
    ]
    if choice["runners_up"]:
        parts.append("<p>The runners-up, each rerun by its command (only clustering runs again):</p>\n<ul>")
        parts += [
            f"<li>{number} clusters (modularity {scores[number]:.4f}): "
            f"<code>{html.escape(with_setting(command, 'num_clusters', number))}</code></li>"
            for number in choice["runners_up"]
        ]
        parts.append("</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def report_page(title, settings_line, scores, clusters, figures, folder, choice=None):
    """The HTML text of the page (see `write_report`) for a page written into `folder`."""
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(display_name(title))}</title>\n<style>{STYLE}</style>\n</head>\n<body>",
        f"<header>\n<h1>{html.escape(display_name(title))}</h1>",
        f'<p class="settings">{" ".join(spans(display_name(settings_line).split()))}</p>',
    ]
    if scores:
        parts.append('<ul class="scores">' + "".join(score_items(scores)) + "</ul>")
    if choice:
        parts.append(choice_block(choice, display_name(settings_line)))
    parts.append(f'</header>\n<h2>{len(clusters)} clusters</h2>\n<section class="clusters">')
    parts += [cluster_card(cluster, folder) for cluster in clusters]
    parts.append("</section>")
    if figures:
        parts.append('<section class="figures">\n<h2>Training</h2>')
        parts += [figure_block(path, folder) for path in figures]
        parts.append("</section>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def write_report(path, title, settings_line, scores, clusters, figures, choice=None):
    """Writes the page at `path`: `title`, the run's `settings_line`, the `scores` (a dict such as {"acc": 0.4894,
    "nmi": 0.352, "ari": 0.259, "images": 10000, "split": "eval"}, or None without labels), a card for each of
    `clusters` (dicts {"cluster", "size", "label", "accuracy" (a percentage), "sheet"}, label, accuracy and sheet
    may be None), then the training `figures`. Image paths are relative to the page's folder (absolute ones are
    made relative to it). Serves clusters.html after training and assigned.html for new images alike. `choice`: the
    sweep that chose the number of clusters (a ClusterCount as a dict), or None when it was given."""
    folder = os.path.dirname(os.path.abspath(path))
    page = report_page(title, settings_line, scores, clusters, figures, folder, choice)
    write_bytes_atomically(path, page.encode())


# The run's figures, in the order the page shows them below the clusters (those this run drew).
FIGURES = [
    "prototypes.png", "confusion_matrix_eval.png", "confusion_matrix_train.png", "augmentations.png",
    "representation_loss.png", "neighbours.png", "cluster_count.png", "clustering_loss.png", "self_label_loss.png",
]  # fmt: skip


def write_run_page(output_dir, name, title, command, report, scores=None, sheets=None, figures=()):
    """Writes OUTPUT_DIR/`name` (report.html, assigned.html): the run's `command`, the `scores` of the evaluated
    split (split_metrics's, with "split"; no accuracy without labels), a card per cluster of `report`
    (report_clusters's: cluster sizes and, with labels, each cluster's majority label and accuracy; and the sweep
    that chose their number, "cluster_count", if one did) with its contact sheet in the folder `sheets` (relative
    to OUTPUT_DIR; None: no sheets), then the `figures` this run drew (file names in OUTPUT_DIR), in FIGURES'
    order: never one that an earlier run left there."""
    labelled = {cluster["cluster"]: cluster for cluster in report.get("clusters", [])}
    clusters = []
    for number, size in enumerate(report["cluster_sizes"]):
        sheet = None if sheets is None else f"{sheets}/cluster-{number:02d}.jpg"
        found = labelled.get(number, {})
        clusters.append({
            "cluster": number, "size": size, "label": found.get("label") if size else None,
            "accuracy": found.get("accuracy") if size else None,
            "sheet": sheet if sheet and os.path.exists(os.path.join(output_dir, sheet)) else None,
        })  # fmt: skip
    if scores is not None and "acc" in scores:
        scores = {key: scores[key] for key in ("acc", "nmi", "ari", "images", "split")}
    else:
        scores = None
    drawn = sorted(figures, key=lambda figure: FIGURES.index(figure) if figure in FIGURES else len(FIGURES))
    write_report(os.path.join(output_dir, name), title, command, scores, clusters, drawn, report.get("cluster_count"))
