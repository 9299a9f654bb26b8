"""
# Benchmark: what each stage of scan_cifar10.py costs on this device, row by row

For every training stage, the seconds it spends compiling its step and the seconds of one epoch over `--images`
random images (60,000 by default, the tutorial's CIFAR-10), built and fed exactly as scan_cifar10.py does it
(fused augmentation, full batches, images held on the device where the script holds them, MIXED_PRECISION="auto"):
- SimCLR, tutorial recipe (ResNet50V2, the tutorial's augmentation and loss) and scan recipe (ResNet-18, SimCLR
  augmentation, NT-Xent);
- clustering, tutorial recipe (frozen ResNet50V2, all 5 neighbours of each anchor);
- self-labeling, scan recipe (ResNet-18 fine-tuned on the image and a strong view);
- embedding every image (ResNet50V2) and mining its 5 nearest neighbours;
- last, the tutorial's own formulation of its SimCLR step (four Keras augmentation layers, float32, no XLA: on
  JAX every operation runs on its own), sized down to a few steps.

Beside each epoch stands its floor: the encoder's forward FLOPs per image (XLA's cost analysis, JAX only) times
the passes the stage makes (3 per trained image: forward and backward; 1 per image only run forward), over the
device's peak bf16 rate. Each row is printed as soon as it is measured. Rows that would start after `--seconds`
are skipped and named; compilation uses no persistent cache, so the compile column is what a first run pays.

Run from the repository root:

    KERAS_BACKEND=jax python benchmarks/bench.py     # a GPU: rows start until 170 s have passed
    python benchmarks/bench.py --images=2048 --representation_batch_size=64 --clustering_batch_size=64 \
        --self_label_batch_size=64 --steps=3         # a CPU: 3 steps of each, scaled

The batch sizes are the script's settings, under the script's names and with its defaults.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras  # noqa: E402
import numpy as np  # noqa: E402

import scan_cifar10 as script  # noqa: E402  (chooses the Keras backend, as the script does)
from scan.augmentations import create_data_augmentation  # noqa: E402
from scan.backend import CompilationLog, describe_devices, find_gpus, resolve_mixed_precision, xla_on_cpu  # noqa: E402
from scan.batches import RowBatches, hold_on_device  # noqa: E402
from scan.losses import ClustersConsistencyLoss, ClustersEntropyLoss  # noqa: E402
from scan.models import create_clustering_head, create_clustering_model, create_encoder  # noqa: E402
from scan.neighbours import compute_embeddings, mine_neighbours  # noqa: E402
from scan.self_labeling import SelfLabelLearner  # noqa: E402
from scan.settings import UsageError, check_replaced_settings  # noqa: E402
from scan.training import create_optimizer  # noqa: E402

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (FLOP/s), by the device name JAX reports.
PEAK_FLOPS = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


BATCH_SIZES = ["representation_batch_size", "clustering_batch_size", "self_label_batch_size", "embedding_batch_size"]


def parse_arguments(argv=None):
    """The benchmark's arguments; the batch sizes take the script's names and defaults, and a setting of an earlier
    version (--batch_size) is one error line naming what replaced it, as in the script."""
    arguments = sys.argv[1:] if argv is None else argv
    try:
        check_replaced_settings(arguments, BATCH_SIZES)
    except UsageError as error:
        sys.exit(f"error: {error}")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=60000, help="images per epoch (default 60000)")
    for name in BATCH_SIZES:
        default = getattr(script, name.upper())
        parser.add_argument(f"--{name}", type=int, default=default, help=f"as in the script (default {default})")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per row (default 0: one whole epoch)")
    parser.add_argument("--seconds", type=float, default=170, help="no row starts after this many seconds")
    parser.add_argument("--rows", default="all", help="comma-separated row keys (default all): " + ", ".join(ROWS))
    return parser.parse_args(arguments)


def forward_flops(encoder, size=32):
    """The encoder's forward FLOPs for one image of `size`, by XLA's cost analysis of the program lowered for the CPU
    (JAX), else None. (On a GPU, JAX 0.11.2 returned no cost analysis for the lowered program; the operations, and
    so their count, are the same on every device.)"""
    if keras.backend.backend() != "jax":
        return None
    import jax

    def forward(trainable, non_trainable, images):
        return encoder.stateless_call(trainable, non_trainable, images)[0]

    on_cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    shape = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on_cpu)  # noqa: E731
    shapes = lambda variables: [shape(variable.shape, variable.dtype) for variable in variables]  # noqa: E731
    images = shape((1, size, size, 3), "float32")
    lowered = jax.jit(forward).lower(
        shapes(encoder.trainable_variables), shapes(encoder.non_trainable_variables), images
    )
    analysis = lowered.cost_analysis() or lowered.compile().cost_analysis()
    return analysis["flops"] if analysis else None


def peak_flops(gpus):
    names = [name for name, _ in gpus]
    return next((peak for key, peak in PEAK_FLOPS.items() if names and key in names[0]), None)


class Bench:
    """Shared state of one benchmark run: the images, the settings and the compilation log."""

    def __init__(self, arguments):
        self.arguments = arguments
        self.images = np.random.default_rng(0).integers(0, 256, (arguments.images, 32, 32, 3), dtype=np.uint8)
        self.gpus = find_gpus()
        self.precision = resolve_mixed_precision("auto", self.gpus)
        self.peak = peak_flops(self.gpus) if self.precision != "float32" else None
        self.log = CompilationLog()
        self.rows = hold_on_device(self.images, "auto")

    def batches(self, batch_size, **kwargs):
        return RowBatches(len(self.images), batch_size, 0, rows=None if self.rows else self.images, **kwargs)

    def time_fit(self, model, batches, steps=None):
        """(compile seconds, epoch seconds, "timed of all steps"): one step compiles, then `steps` timed steps (default
        `--steps`, 0 for the whole epoch), scaled to the epoch. Compile seconds are JAX's own count; on TensorFlow,
        the first step's seconds less a timed step's (its tracing, and its compiling where XLA is on)."""
        mark, started = self.log.mark(), time.perf_counter()
        model.fit(batches, epochs=1, steps_per_epoch=1, verbose=0)
        first_step = time.perf_counter() - started
        steps = min(steps or self.arguments.steps or len(batches), len(batches))
        started = time.perf_counter()
        model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0)
        step = (time.perf_counter() - started) / steps
        compiled = self.log.since(mark)["seconds"] if keras.backend.backend() == "jax" else first_step - step
        return compiled, step * len(batches), f"{steps} of {len(batches)}"

    def floor(self, flops_per_image, passes):
        """Seconds of one epoch at the device's peak: `passes` encoder passes per image (3 = forward and backward)."""
        if self.peak is None or flops_per_image is None:
            return None
        return flops_per_image * passes * len(self.images) / self.peak


def simclr(bench, encoder_name, augmentation, loss, head, tutorial_formulation=False):
    """The SimCLR stage as the script runs it; or, `tutorial_formulation`, as the tutorial wrote it (Keras layers,
    float32, no XLA, batches from the host), for 3 steps at most."""
    precision = "float32" if tutorial_formulation else None
    keras.mixed_precision.set_global_policy(precision or bench.precision)
    encoder = create_encoder(encoder_name, 512)
    learner = script.RepresentationLearner(
        encoder,
        128,
        2,
        script.create_data_preprocessing(32, bench.images[:1000]),
        create_data_augmentation(augmentation, seed=0),
        temperature=0.1,
        projection_head=head,
        pretext_loss=loss,
        rows=None if tutorial_formulation else bench.rows,
    )
    if tutorial_formulation:
        learner.compile(optimizer=create_optimizer("adamw", 1e-3, 1e-4, 1e-3), jit_compile=False)
        batches = RowBatches(len(bench.images), bench.arguments.representation_batch_size, 0, rows=bench.images)
        timing = bench.time_fit(learner, batches, min(bench.arguments.steps or 3, 3))
    else:
        batches = bench.batches(bench.arguments.representation_batch_size)
        # As the script decides for its REPRESENTATION_EPOCHS: XLA on a TensorFlow CPU too.
        stage_steps = script.REPRESENTATION_EPOCHS * len(batches)
        learner.compile(
            optimizer=create_optimizer("adamw", 1e-3, 1e-4, 1e-3), jit_compile=xla_on_cpu(learner, stage_steps)
        )
        timing = bench.time_fit(learner, batches)
    # Two views of each image, each forward and backward.
    return timing, bench.floor(forward_flops(encoder), 2 * 3)


def clustering(bench):
    keras.mixed_precision.set_global_policy(bench.precision)
    encoder = create_encoder("resnet50v2", 512)
    encoder.trainable = False
    model = create_clustering_model(
        encoder, create_clustering_head(20), 32, script.create_data_preprocessing(32, bench.images[:1000])
    )
    augmentation = create_data_augmentation("tutorial", seed=0)
    learner = script.create_clustering_learner(model, augmentation, 5, (32, 32, 3), bench.rows)
    losses = [ClustersConsistencyLoss(), ClustersEntropyLoss(5.0)]
    learner.compile(optimizer=create_optimizer("adamw", 5e-4, 1e-4, 5e-4), loss=losses)
    neighbours = np.random.default_rng(1).integers(0, len(bench.images), size=(len(bench.images), 5))
    # Frozen encoder: one forward pass for each anchor and each of its 5 neighbours.
    batches = bench.batches(bench.arguments.clustering_batch_size, neighbour_indices=neighbours)
    return bench.time_fit(learner, batches), bench.floor(forward_flops(encoder), 6)


def self_labeling(bench):
    keras.mixed_precision.set_global_policy(bench.precision)
    encoder = create_encoder("resnet18", 512)
    model = create_clustering_model(
        encoder, create_clustering_head(10), 32, script.create_data_preprocessing(32, bench.images[:1000])
    )
    learner = SelfLabelLearner(model, None, create_data_augmentation("simclr", seed=11), 0.99, rows=bench.rows)
    learner.compile(optimizer=create_optimizer("adamw", 1e-4, 1e-4, 1e-4))
    # A forward pass of the image itself, forward and backward of the strong view.
    batches = bench.batches(bench.arguments.self_label_batch_size)
    return bench.time_fit(learner, batches), bench.floor(forward_flops(encoder), 1 + 3)


def embedding_and_mining(bench):
    keras.mixed_precision.set_global_policy(bench.precision)
    encoder = create_encoder("resnet50v2", 512)
    mark, started = bench.log.mark(), time.perf_counter()
    features = compute_embeddings(encoder, bench.images, bench.arguments.embedding_batch_size)
    mine_neighbours(features, 5, bench.arguments.embedding_batch_size)
    seconds = time.perf_counter() - started
    compiled = bench.log.since(mark)["seconds"] if keras.backend.backend() == "jax" else None
    return (compiled, seconds - (compiled or 0.0), None), bench.floor(forward_flops(encoder), 1)


ROWS = {
    "simclr-tutorial": ("SimCLR, tutorial recipe (ResNet50V2)", lambda b: simclr(b, "resnet50v2", "tutorial", "tutorial", "tutorial")),
    "clustering": ("clustering, tutorial recipe (frozen ResNet50V2, 5 neighbours)", clustering),
    "embedding-mining": ("embedding (ResNet50V2) + mining top-5", embedding_and_mining),
    "simclr-scan": ("SimCLR, scan recipe (ResNet-18)", lambda b: simclr(b, "resnet18", "simclr", "ntxent", "mlp")),
    "self-labeling": ("self-labeling, scan recipe (ResNet-18)", self_labeling),
    "tutorial-formulation": (
        "SimCLR, the tutorial's formulation (Keras augmentation layers, float32, no XLA)",
        lambda b: simclr(b, "resnet50v2", "tutorial-layers", "tutorial", "tutorial", tutorial_formulation=True),
    ),
}  # fmt: skip


def main():
    arguments = parse_arguments()
    if arguments.rows != "all" and not set(arguments.rows.split(",")) <= set(ROWS):
        sys.exit(f"error: --rows={arguments.rows}: choose among {', '.join(ROWS)}")
    started = time.perf_counter()
    bench = Bench(arguments)
    print(
        f"Keras {keras.__version__}, backend {describe_devices(bench.gpus)}, {bench.precision}; "
        f"{arguments.images} images, batches: "
        + ", ".join(f"{name} {getattr(arguments, name)}" for name in BATCH_SIZES)
        + ", images held "
        + ("on the device" if bench.rows else "on the host")
        + (f"; peak {bench.peak / 1e12:.0f} TFLOP/s bf16" if bench.peak else "; no peak known, so no floor")
    )
    print(
        "\n| stage | compile s | epoch s | floor s | floor / epoch | timed steps |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    keys = list(ROWS) if arguments.rows == "all" else arguments.rows.split(",")
    for key in keys:
        title, measure = ROWS[key]
        if time.perf_counter() - started > arguments.seconds:
            print(f"| {title} | skipped: past --seconds={arguments.seconds:.0f} | | | | |", flush=True)
            continue
        (compiled, epoch, steps), floor = measure(bench)
        floor_cells = f"{floor:.2f} | {floor / epoch:.0%}" if floor else "n/a | n/a"
        steps_cell = "one pass" if steps is None else steps
        compiled_cell = "n/a" if compiled is None else f"{compiled:.1f}"
        print(f"| {title} | {compiled_cell} | {epoch:.2f} | {floor_cells} | {steps_cell} |", flush=True)
    print(f"\nbenchmark: {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
