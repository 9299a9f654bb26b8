"""
# Benchmark: scan_cifar10.py against the tutorial's formulation, in one process

Measures, on the current Keras backend and device, the throughput of:
- a SimCLR training step, tutorial recipe (ResNet50V2, the tutorial's augmentation and loss) and scan recipe
  (ResNet-18, SimCLR augmentation, NT-Xent);
- a clustering training step (tutorial recipe: frozen encoder, all 5 neighbours of each anchor);
- embedding (encoder inference);
- neighbour mining of 60,000 x 512 features (top-5);
each against the tutorial's formulation measured in the same run: its four Keras augmentation layers inside
the step (which keeps the step out of XLA and, on JAX, out of `jax.jit`), float32, a batch of 500 for
embedding and mining. "ours" is what scan_cifar10.py runs by default on this device: the fused augmentation,
`jit_compile="auto"` (XLA on GPUs and on JAX), MIXED_PRECISION="auto" (bfloat16 on recent GPUs).

Run from the repository root:

    python benchmarks/bench.py                       # TensorFlow
    KERAS_BACKEND=jax python benchmarks/bench.py     # JAX
    python benchmarks/bench.py --batch_size=512 --steps=20   # GPU-sized

Numbers are images (or anchors) per second after warm-up steps; mining is seconds for all 60,000 rows.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import scan_cifar10 as scan  # noqa: E402


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=64, help="images per training step (default 64, CPU-sized)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after 2 warm-up steps")
    parser.add_argument("--mining_images", type=int, default=60000, help="rows of the mining benchmark")
    return parser.parse_args()


def build_simclr_learner(encoder_name, augmentation, contrastive_loss, projection_head, images, precision, jit_compile):
    """A compiled RepresentationLearner with the given components, under the given dtype policy."""
    keras.mixed_precision.set_global_policy(precision)
    encoder = scan.create_encoder(encoder_name, 512)
    learner = scan.RepresentationLearner(
        encoder,
        128,
        2,
        scan.create_data_preprocessing(32, images),
        scan.create_data_augmentation(augmentation, seed=0),
        temperature=0.1,
        projection_head=projection_head,
        contrastive_loss=contrastive_loss,
    )
    learner.compile(optimizer=scan.create_adamw(1e-3, 1e-4), jit_compile=jit_compile)
    return learner


def build_clustering_learner(augmentation, images, precision, jit_compile):
    """The tutorial's clustering learner: frozen ResNet50V2 encoder, all 5 neighbours per anchor."""
    keras.mixed_precision.set_global_policy(precision)
    encoder = scan.create_encoder("resnet50v2", 512)
    encoder.trainable = False
    model = scan.create_clustering_model(
        encoder, scan.create_clustering_head(20), 32, scan.create_data_preprocessing(32, images)
    )
    learner = scan.create_clustering_learner(model, scan.create_data_augmentation(augmentation, seed=0), 5, (32, 32, 3))
    losses = [scan.ClustersConsistencyLoss(), scan.ClustersEntropyLoss(5.0)]
    learner.compile(optimizer=scan.create_adamw(5e-4, 1e-4), loss=losses, jit_compile=jit_compile)
    return learner


def fit_throughput(model, data, items_per_step, steps, **fit_arguments):
    """Items per second of `steps` training steps, after two warm-up steps that include compilation."""
    model.fit(data, epochs=1, steps_per_epoch=2, verbose=0, **fit_arguments)
    started = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, **fit_arguments)
    return items_per_step * steps / (time.perf_counter() - started)


def repeat_dataset(images, batch_size, steps):
    """Enough copies of `images` for warm-up and timed steps with `fit(x=..., batch_size=...)`."""
    return np.concatenate([images] * (-(-batch_size * (steps + 2) // len(images))))


def embedding_throughput(encoder, images, batch_size):
    encoder.predict(images[:batch_size], batch_size=batch_size, verbose=0)
    started = time.perf_counter()
    encoder.predict(images, batch_size=batch_size, verbose=0)
    return len(images) / (time.perf_counter() - started)


def tutorial_mining(feature_vectors, k_neighbours, batch_size):
    """The tutorial's loop, in keras.ops: top k+1 per batch of 500, the first (assumed self) dropped."""
    neighbours = []
    for start in range(0, len(feature_vectors), batch_size):
        similarities = ops.matmul(feature_vectors[start : start + batch_size], ops.transpose(feature_vectors))
        _, indices = ops.top_k(similarities, k=k_neighbours + 1, sorted=True)
        neighbours.append(ops.convert_to_numpy(indices)[:, 1:])
    return np.concatenate(neighbours)


def seconds(function):
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main():
    arguments = parse_arguments()
    gpus = scan.find_gpus()
    precision = scan.resolve_mixed_precision("auto", gpus)
    print(f"Keras {keras.__version__}, backend {scan.describe_devices(gpus)}; ours uses {precision}")
    images = np.random.default_rng(0).integers(0, 256, size=(1024, 32, 32, 3), dtype=np.uint8)
    batch, steps = arguments.batch_size, arguments.steps
    simclr_data = repeat_dataset(images, batch, steps)
    rows = []

    for recipe, encoder_name, augmentation, loss, head in [
        ("tutorial", "resnet50v2", "tutorial", "tutorial", "tutorial"),
        ("scan", "resnet18", "simclr", "ntxent", "mlp"),
    ]:
        ours = build_simclr_learner(encoder_name, augmentation, loss, head, images, precision, "auto")
        theirs = build_simclr_learner(encoder_name, "tutorial-layers", loss, head, images, "float32", False)
        rows.append(
            (
                f"SimCLR step, {recipe} recipe (images/s)",
                fit_throughput(ours, simclr_data, batch, steps, batch_size=batch),
                fit_throughput(theirs, simclr_data, batch, steps, batch_size=batch),
                f"jit_compile={ours.jit_compile} vs {theirs.jit_compile}",
            )
        )

    neighbour_indices = np.random.default_rng(1).integers(0, len(images), size=(len(images), 5))
    batches = scan.NeighbourBatches(images, neighbour_indices, batch, seed=0)
    ours = build_clustering_learner("tutorial", images, precision, "auto")
    theirs = build_clustering_learner("tutorial-layers", images, "float32", False)
    rows.append(
        (
            "clustering step, tutorial recipe (anchors/s)",
            fit_throughput(ours, batches, batch, steps),
            fit_throughput(theirs, batches, batch, steps),
            f"jit_compile={ours.jit_compile} vs {theirs.jit_compile}",
        )
    )

    keras.mixed_precision.set_global_policy(precision)
    ours_encoder = scan.create_encoder("resnet50v2", 512)
    keras.mixed_precision.set_global_policy("float32")
    tutorial_encoder = scan.create_encoder("resnet50v2", 512)
    rows.append(
        (
            "embedding, ResNet50V2 (images/s)",
            embedding_throughput(ours_encoder, images, 1024),
            embedding_throughput(tutorial_encoder, images, 500),
            "batch 1024 vs 500",
        )
    )

    features = np.random.default_rng(2).normal(size=(arguments.mining_images, 512)).astype("float32")
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    ours_seconds = seconds(lambda: scan.mine_neighbours(features, 5, 500))
    tutorial_seconds = seconds(lambda: tutorial_mining(ops.convert_to_tensor(features), 5, 500))
    rows.append(
        (f"mining {arguments.mining_images} x 512, top-5 (s)", ours_seconds, tutorial_seconds, "lower is better")
    )

    print("\n| what | ours | tutorial formulation | ratio | note |\n| --- | ---: | ---: | ---: | --- |")
    for what, ours_value, tutorial_value, note in rows:
        ratio = tutorial_value / ours_value if what.endswith("(s)") else ours_value / tutorial_value
        print(f"| {what} | {ours_value:.1f} | {tutorial_value:.1f} | {ratio:.2f}x | {note} |")


if __name__ == "__main__":
    main()
