"""The engine-specific code, kept in one place: which devices the Keras backend sees, mixed precision, whether the
training rows stay on the device, XLA for SimCLR on a TensorFlow CPU, JAX's compilation cache and its log, and data
parallelism.

With several GPUs (`DISTRIBUTION`), every stage splits each global batch (the stages' batch sizes and
`EMBEDDING_BATCH_SIZE`) evenly over them, so a run's math does not change with the device count. JAX compiles one
program for the global batch (`keras.distribution.DataParallel`), in which every operation sees the whole batch.
TensorFlow runs a copy of the step on each replica (`tf.distribute.MirroredStrategy`) and sums their gradients, so
there the parts of a step that look at the whole batch gather it from every replica (`gather_replicas`): the
contrastive, entropy and self-label losses, batch normalisation and the augmentations' random draws. Off
TensorFlow's replicas these functions change nothing. Several machines join on JAX alone
(`keras.distribution.initialize()`): each process feeds its own part of every batch and receives every prediction.
"""

import contextlib
import functools
import os
from typing import NamedTuple

import keras
from keras import layers, ops

from scan.settings import BATCH_SIZES, UsageError, check_divisible, check_output_dir


def find_gpus():
    """Returns (name, compute capability (major, minor)) for each GPU the Keras backend sees."""
    if keras.backend.backend() == "jax":
        import jax

        return [
            (
                device.device_kind,
                tuple(int(part) for part in str(getattr(device, "compute_capability", "0.0")).split(".")),
            )
            for device in jax.devices()
            if device.platform == "gpu"
        ]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        details = [tf.config.experimental.get_device_details(gpu) for gpu in gpus]
        return [
            (d.get("device_name", gpu.name), d.get("compute_capability", (0, 0)))
            for gpu, d in zip(gpus, details, strict=True)
        ]
    return []


def describe_devices(gpus):
    """Says which Keras backend runs and on which devices, e.g. 'tensorflow on GPU: NVIDIA H100'."""
    return f"{keras.backend.backend()} on " + (f"GPU: {', '.join(name for name, _ in gpus)}" if gpus else "CPU only")


def resolve_mixed_precision(setting, gpus):
    """ "auto" is mixed_bfloat16 on GPUs that compute in bfloat16 (compute capability 8.0 and up), else float32.

    On this project's 2-core CPU, bfloat16 made a SimCLR step only 6% faster, so the CPU stays in float32.
    """
    if setting != "auto":
        return setting
    return "mixed_bfloat16" if gpus and all(capability >= (8, 0) for _, capability in gpus) else "float32"


def device_memory_bytes():
    """The memory of the first device in bytes where the backend reports it (JAX on a GPU), else None."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return stats.get("bytes_limit") if stats else None


def resolve_data_on_device(setting, num_bytes, backend, memory_bytes):
    """Whether the training rows (`num_bytes`) are held on the device, so that no step copies its batch from the host.

    "auto": on JAX, when the rows take at most a quarter of the device's memory (`memory_bytes`; None for the
    host's memory, on a CPU). TensorFlow feeds its batches from host memory through its input pipeline.
    """
    if setting != "auto":
        return setting == "true"
    return backend == "jax" and (memory_bytes is None or num_bytes <= memory_bytes / 4)


XLA_MIN_STEPS = 500  # a TensorFlow CPU compiles a SimCLR step in 4-10 s; a stage this long wins that back


def xla_on_cpu(model, num_steps, min_steps=XLA_MIN_STEPS):
    """`jit_compile` for a stage that trains `model` for `num_steps` steps: True on a TensorFlow CPU once the stage
    runs `min_steps` steps and every layer of `model` compiles, else Keras's "auto" (XLA on JAX and on a TensorFlow
    GPU, never on a TensorFlow CPU, and never for layers that cannot compile).

    Keras leaves a TensorFlow CPU op by op, which there made the cpu recipe's SimCLR step about twice as slow: 480-590
    ms against 250-380 ms compiled (2 cores, 2026-12-07). The clustering head's step took 8 ms either way, so only
    SimCLR asks for it. Tiny runs (the tests') stay op by op: for a few dozen steps compiling costs more than it saves.
    """
    on_tensorflow_cpu = keras.backend.backend() == "tensorflow" and not find_gpus()
    compiles = all(layer.supports_jit for layer in layers_within(model))
    return True if on_tensorflow_cpu and compiles and num_steps >= min_steps else "auto"


def enable_compilation_cache(folder):
    """JAX keeps every program it compiles in `folder` and loads it from there in later runs; returns whether it does.

    Even small programs are kept: a run compiles hundreds of them (Keras builds the models with eager operations).
    """
    if keras.backend.backend() != "jax":
        return False
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return True


def resolve_distribution(setting, num_gpus):
    """Whether every stage runs data-parallel: "auto" does when more than one GPU is visible."""
    if setting == "auto":
        return num_gpus > 1
    return setting == "data_parallel"


@functools.cache  # Once per process: a second TensorFlow strategy's collectives would clash with the first's.
def start_data_parallel(backend):
    """Spreads training over every device of this machine: returns (the engine, whose `scope()` the models are
    built, trained and used in; the number of devices)."""
    if backend == "jax":
        # Every device of every process; each process feeds its own part of each batch (RowBatches), not a shard of
        # a dataset that Keras would split.
        devices = keras.distribution.list_devices()
        return keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False), len(devices)
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    return strategy, strategy.num_replicas_in_sync


def join_machines(environment, backend):
    """Joins the processes of several machines into one JAX job when KERAS_DISTRIBUTION_JOB_ADDRESSES (with
    KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID) asks, through `keras.distribution.initialize()`;
    returns this process's (index, count). Runs before any JAX computation, as JAX requires. Refuses TF_CONFIG: Keras
    3's `fit` does not run under TensorFlow's MultiWorkerMirroredStrategy (README, "Several machines")."""
    if environment.get("TF_CONFIG"):
        raise UsageError(
            "TF_CONFIG is set, but Keras 3 cannot train under TensorFlow's MultiWorkerMirroredStrategy; unset it, and "
            "for several machines use KERAS_BACKEND=jax with KERAS_DISTRIBUTION_JOB_ADDRESSES"
        )
    job_addresses = environment.get("KERAS_DISTRIBUTION_JOB_ADDRESSES")
    if not job_addresses:
        return 0, 1
    if backend != "jax":
        raise UsageError(
            "KERAS_DISTRIBUTION_JOB_ADDRESSES is set, but several machines train together on JAX only; set "
            "KERAS_BACKEND=jax (or unset it to train on this machine)"
        )
    count, index = (environment.get(f"KERAS_DISTRIBUTION_{name}", "") for name in ("NUM_PROCESSES", "PROCESS_ID"))
    if not (count.isdigit() and index.isdigit() and int(index) < int(count)):
        raise UsageError(
            f"KERAS_DISTRIBUTION_NUM_PROCESSES={count!r} and KERAS_DISTRIBUTION_PROCESS_ID={index!r}: with "
            "KERAS_DISTRIBUTION_JOB_ADDRESSES set, give every machine the number of processes and its own number "
            "from 0 below it"
        )
    keras.distribution.initialize(job_addresses, int(count), int(index))
    return this_process()


def this_process():
    """(index, count) of this process among those that train together: several with JAX on several machines."""
    if keras.backend.backend() != "jax":
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def process_share(rows, process):
    """The rows of a global batch that `process` (index, count) feeds: each process feeds its own equal part."""
    index, count = process
    share = len(rows) // count
    return rows[index * share : (index + 1) * share]


class ReplicatedOutputs(layers.Layer):
    """Copies a data-parallel output to every device, so that each process of several can read all of it."""

    def call(self, outputs):
        layout = keras.distribution.TensorLayout(
            [None] * len(outputs.shape), keras.distribution.distribution().device_mesh
        )
        return keras.distribution.distribute_tensor(outputs, layout)


def tensorflow_replicas():
    """TensorFlow's replica context while a step runs on several replicas, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def gather_replicas(tensor, axis=0):
    """The global batch of `tensor`: every replica's part, concatenated along `axis` in the global batch's order."""
    context = tensorflow_replicas()
    if context is None:
        return tensor
    import tensorflow as tf

    shape = list(tensor.shape)
    shape[axis] = None
    return tf.ensure_shape(context.all_gather(tensor, axis=axis), shape)


def replica_rows(tensor, num_rows):
    """This replica's `num_rows` rows of a global-batch `tensor`."""
    context = tensorflow_replicas()
    if context is None:
        return tensor
    return ops.take(tensor, context.replica_id_in_sync_group * num_rows + ops.arange(num_rows), axis=0)


def replica_share(loss):
    """What each replica returns of a global-batch loss: its replica count's share, since the gradients are summed."""
    context = tensorflow_replicas()
    return loss if context is None else loss / context.num_replicas_in_sync


def synchronize_batch_normalization(model):
    """On several TensorFlow replicas, batch normalisation takes its statistics over the global batch."""
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        for layer in layers_within(model):
            if isinstance(layer, layers.BatchNormalization):
                layer.synchronized = True


def layers_within(layer):
    """`layer` and every layer inside it, however deeply nested."""
    yield layer
    for inner in getattr(layer, "layers", []):
        yield from layers_within(inner)


class CompilationLog:
    """The compilations that JAX reports through its monitoring events: each program's name and seconds (a load from
    the persistent cache counts as one, with its loading time), and how many came from that cache. Other backends
    report none."""

    def __init__(self):
        self.compilations = []  # (function name, seconds)
        self.cache_hits = 0
        if keras.backend.backend() == "jax":
            from jax import monitoring

            monitoring.register_event_duration_secs_listener(self.on_duration)
            monitoring.register_event_listener(self.on_event)

    def on_duration(self, event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.compilations.append((kwargs.get("fun_name", "").removeprefix("jit(").removesuffix(")"), seconds))

    def on_event(self, event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def mark(self):
        return len(self.compilations), self.cache_hits

    def since(self, mark):
        """What was compiled after `mark`: programs, seconds, loads from the cache and the count of each training or
        prediction step (Keras's `train_step` and `predict_step`)."""
        compilations = self.compilations[mark[0] :]
        names = [name for name, _ in compilations]
        return {
            "programs": len(compilations),
            "seconds": round(sum(seconds for _, seconds in compilations), 2),
            "from_cache": self.cache_hits - mark[1],
            "steps": {name: names.count(name) for name in ("train_step", "predict_step") if name in names},
        }


class Devices(NamedTuple):
    """Where a run computes: the GPUs the backend sees, the devices each step runs data-parallel over, and the scope
    that the models are built, trained and used in (data parallelism's, or a scope that changes nothing)."""

    gpus: list  # find_gpus()
    num_devices: int
    scope: object  # a context manager


def set_up_devices(settings, environment=os.environ):
    """Joins the machines of a JAX job (KERAS_DISTRIBUTION_*), checks OUTPUT_DIR (each process of several writes its
    own `process-N` folder), sets mixed precision (resolving "auto") and the seeds, prints what runs where, and
    starts data parallelism when DISTRIBUTION asks for it; returns the Devices."""
    process = (0, 1) if settings.distribution == "none" else join_machines(environment, keras.backend.backend())
    if process[1] > 1:  # Each process keeps its own results and stage cache, so that a rerun on each resumes.
        settings.output_dir = os.path.join(settings.output_dir, f"process-{process[0]}")
    check_output_dir(settings.output_dir)
    gpus = find_gpus()
    settings.mixed_precision = resolve_mixed_precision(settings.mixed_precision, gpus)
    keras.mixed_precision.set_global_policy(settings.mixed_precision)
    keras.utils.set_random_seed(settings.seed)
    print(
        f"Keras {keras.__version__}, backend {describe_devices(gpus)}, {settings.mixed_precision}, recipe {settings.recipe}"
    )
    if process[1] == 1 and not resolve_distribution(settings.distribution, len(gpus)):
        return Devices(gpus, 1, contextlib.nullcontext)
    engine, num_devices = start_data_parallel(keras.backend.backend())
    for name in BATCH_SIZES:
        check_divisible(name, getattr(settings, name), num_devices)
    processes = f" in {process[1]} processes" if process[1] > 1 else ""
    sizes = [getattr(settings, name) for name in BATCH_SIZES]
    print(
        f"data-parallel over {num_devices} devices{processes} (global batches: SimCLR {sizes[0]}, clustering "
        f"{sizes[1]}, self-labeling {sizes[2]} images, split evenly over the devices)"
    )
    return Devices(gpus, num_devices, engine.scope)
