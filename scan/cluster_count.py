"""How many clusters: with NUM_CLUSTERS = 0 the number is chosen from the data once the neighbours are mined, without
labels, from what the run already has: the L2-normalised features the neighbours were mined in, and the neighbour
graph.

Each candidate number splits the images by k-means on those features, and the split is scored by its modularity on
the neighbour graph (Newman 2006): the share of neighbour links that stay inside a cluster, less the share expected
if the links fell at random between images of the same degrees; SCAN's own criterion, neighbours in one cluster,
against chance. The best number is chosen; a near-tie, a difference that k-means seeds alone make, goes to the
larger number, since SCAN tolerates a few clusters too many better than too few. Measured on CIFAR-10 class subsets
(docs/cluster-count.md) against the cosine silhouette of k-means and of Ward and the eigengap of the graph's
normalised Laplacian: Ward's silhouette chose 2 on every subset, the eigengap 2 to 5 and k-means's silhouette 2 to
17, whatever the number of classes; the modularity chose 5 to 11, never more than one too few, but two to three
times the classes of 2- and 3-class subsets.
"""

from typing import NamedTuple

import numpy as np
import scipy.sparse
from sklearn.cluster import KMeans

from scan.cache import StageCache
from scan.reports import plt, save_figure

# The version of the sweep's method, part of its cache fingerprint: a changed method sweeps again.
METHOD = "k-means, modularity on the neighbour graph, v1"
LARGEST_COUNT = 50  # the most clusters a sweep tries
IMAGES_PER_CLUSTER = 50  # the candidates leave this many images a cluster on average ...
SMALL_DATA = (10, 10)  # ... except on small data: up to 10 clusters, as long as they leave 10 images each
FIT_ROWS = 5000  # k-means learns its centres on at most this many images, then each image goes to the nearest
NEAR_TIE = 0.005  # a score within this share of the best is a near-tie (k-means seeds alone move it so much)


class ClusterCount(NamedTuple):
    """The sweep and its choice, as metrics.json records it."""

    counts: list  # the candidate numbers of clusters, ascending
    scores: list  # the modularity of each candidate's split
    chosen: int  # the number the run clusters into
    runners_up: list  # the next best numbers, best first (at most two)


def planned_count_line(num_clusters):
    """The line that says, before training, how many clusters the run learns: NUM_CLUSTERS, or (0) chosen later."""
    if num_clusters:
        return f"clusters: {num_clusters} (--num_clusters=0 chooses the number from the data)"
    return "clusters: chosen from the data once the neighbours are mined (--num_clusters=N to set it)"


def candidate_counts(num_images):
    """The numbers of clusters a sweep tries: 2 up to LARGEST_COUNT, as many as leave IMAGES_PER_CLUSTER images a
    cluster, or on small data up to SMALL_DATA[0] that leave SMALL_DATA[1] images each; at least [2]."""
    most_small, images_small = SMALL_DATA
    largest = min(LARGEST_COUNT, max(num_images // IMAGES_PER_CLUSTER, min(most_small, num_images // images_small)))
    return list(range(2, max(2, largest) + 1))


def neighbour_graph(neighbour_indices):
    """The symmetric 0/1 adjacency [num_images, num_images] (scipy.sparse CSR) that links each image to each of its
    mined neighbours [num_images, K], and each neighbour back to it."""
    num_images, k = neighbour_indices.shape
    anchors = np.repeat(np.arange(num_images), k)
    links = scipy.sparse.coo_matrix(
        (np.ones(num_images * k), (anchors, neighbour_indices.ravel())), shape=(num_images, num_images)
    ).tocsr()
    return ((links + links.T) > 0).astype(np.float64).tocsr()


def modularity(adjacency, assignments, num_clusters):
    """Newman's modularity of the clusters `assignments` [num_images] on the graph `adjacency` (symmetric, 0/1):
    sum over clusters of (the share of link ends inside the cluster) - (the share of degrees in it) squared."""
    rows, columns = adjacency.nonzero()  # each link twice, once from each end
    degrees = np.bincount(rows, minlength=len(assignments))
    inside = assignments[rows] == assignments[columns]
    inside_share = np.bincount(assignments[rows[inside]], minlength=num_clusters) / len(rows)
    degree_share = np.bincount(assignments, weights=degrees, minlength=num_clusters) / len(rows)
    return float(np.sum(inside_share - degree_share**2))


def kmeans_assignments(features, num_clusters, seed, fit_rows=FIT_ROWS):
    """Each row's k-means cluster [num_images]: the centres learned on a seeded sample of at most `fit_rows` rows (two
    initialisations, the better kept), every row then assigned to its nearest centre."""
    rows = np.random.default_rng(seed).permutation(len(features))[:fit_rows]
    kmeans = KMeans(num_clusters, n_init=2, random_state=seed).fit(features[np.sort(rows)])
    return kmeans.predict(features)


def score_counts(features, neighbour_indices, counts, seed):
    """The modularity on the neighbour graph of the k-means split into each of `counts` clusters [len(counts)]."""
    features = np.asarray(features, dtype=np.float32)
    adjacency = neighbour_graph(neighbour_indices)
    return np.array([modularity(adjacency, kmeans_assignments(features, count, seed), count) for count in counts])


def choose_count(counts, scores, near_tie=NEAR_TIE):
    """The ClusterCount of a sweep: the largest number whose score is within `near_tie` of the best score (as a
    share of it), and the two best-scoring others."""
    scores = [float(score) for score in scores]
    best = max(scores)
    chosen = max(count for count, score in zip(counts, scores, strict=True) if score >= best - near_tie * abs(best))
    others = sorted((count for count in counts if count != chosen), key=lambda count: -scores[counts.index(count)])
    return ClusterCount(list(counts), scores, chosen, others[:2])


def sweep_lines(count):
    """The lines a run prints: one per candidate scored, then the number chosen."""
    lines = [
        f"  {number:3d} clusters: modularity {score:.4f}" + ("  <- chosen" if number == count.chosen else "")
        for number, score in zip(count.counts, count.scores, strict=True)
    ]
    runners_up = " and ".join(str(number) for number in count.runners_up)
    return [
        *lines,
        f"number of clusters: {count.chosen}, chosen from the data"
        + (f" (runners-up: {runners_up}; --num_clusters=N sets it)" if runners_up else ""),
    ]


def plot_cluster_count(count, path):
    """Saves the score of each candidate number of clusters, the chosen one marked and the runners-up named."""
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(count.counts, count.scores, marker="o", markersize=3, label="k-means split")
    chosen_score = count.scores[count.counts.index(count.chosen)]
    axis.plot([count.chosen], [chosen_score], marker="*", markersize=16, color="tab:red", linestyle="none",
              label=f"chosen: {count.chosen}")  # fmt: skip
    for number in count.runners_up:
        axis.annotate(str(number), (number, count.scores[count.counts.index(number)]), textcoords="offset points",
                      xytext=(0, 6), ha="center", fontsize=8)  # fmt: skip
    axis.set_xlabel("number of clusters")
    axis.set_ylabel("modularity on the neighbour graph")
    axis.set_title("How many clusters (higher is better)")
    axis.legend()
    save_figure(figure, path)


def choose_num_clusters(run, neighbours):
    """Scores each candidate number of clusters on the neighbours' features and graph (or reuses the cached sweep),
    prints a line per candidate and the number chosen, sets the run's NUM_CLUSTERS to it; saves cluster_count.png.
    Returns the ClusterCount."""
    settings = run.settings
    counts = candidate_counts(len(neighbours.indices))
    print(
        f"k-means into {counts[0]} to {counts[-1]} clusters, each split scored by its modularity on the neighbour "
        "graph (the share of neighbour links inside clusters, against chance)"
    )
    fingerprint = StageCache.fingerprint(
        run.fingerprints["neighbours"], "cluster_count", {"seed": settings.seed, "counts": counts, "method": METHOD}
    )
    scores = run.cache.array(
        "cluster_count", fingerprint, "cluster count",
        lambda: score_counts(neighbours.feature_vectors, neighbours.indices, counts, settings.seed),
        later_stages_follow=False,  # The chosen number is in the later stages' fingerprints.
    )  # fmt: skip
    count = choose_count(counts, scores)
    print("\n".join(sweep_lines(count)))
    run.set_num_clusters(count.chosen)
    run.fingerprints["cluster_count"] = fingerprint  # --prune_cache keeps the sweep
    plot_cluster_count(count, run.figure_path("cluster_count.png"))
    return count
