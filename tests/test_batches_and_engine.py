"""Full training batches, rows held on the device, padded predictions and the compilation log, on tiny arrays."""

import h5py
import keras
import numpy as np
import pytest

import scan.backend
from scan.backend import CompilationLog, resolve_data_on_device, xla_on_cpu
from scan.batches import DeviceRows, RowBatches, predict_in_full_batches


def test_every_batch_is_full_and_an_epoch_leaves_out_only_the_remainder():
    batches = RowBatches(num_rows=23, batch_size=5, seed=0)
    assert len(batches) == 4  # 23 // 5: the 3 rows left over wait for a later epoch
    seen_per_epoch = []
    for _ in range(3):
        epoch = [batches[index] for index in range(len(batches))]
        assert all(batch.shape == (5,) and batch.dtype == np.int32 for batch in epoch)
        rows = np.concatenate(epoch)
        assert len(set(rows.tolist())) == 20  # no row twice within an epoch
        seen_per_epoch.append(set(rows.tolist()))
        batches.on_epoch_end()
    assert seen_per_epoch[0] != seen_per_epoch[1]  # each shuffle leaves out other rows
    assert set().union(*seen_per_epoch) <= set(range(23))


def test_fewer_rows_than_a_batch_make_one_batch_of_all_of_them():
    batches = RowBatches(num_rows=6, batch_size=512, seed=1)
    assert len(batches) == 1 and sorted(batches[0].tolist()) == list(range(6))


def test_batches_fed_from_the_host_are_the_rows_of_the_indices():
    rows = np.arange(10 * 3).reshape(10, 3)
    on_host = RowBatches(10, 4, seed=2, rows=rows)
    indices = RowBatches(10, 4, seed=2)  # the same seed shuffles the same way
    for index in range(len(indices)):
        np.testing.assert_array_equal(on_host[index], rows[indices[index]])


@pytest.mark.parametrize("sample_one_neighbour", [False, True])
def test_clustering_batches_give_each_anchor_its_own_neighbours(sample_one_neighbour):
    neighbour_indices = np.random.default_rng(3).integers(0, 12, size=(12, 4))
    batches = RowBatches(12, 5, seed=4, neighbour_indices=neighbour_indices, sample_one_neighbour=sample_one_neighbour)
    inputs, targets = batches[1]
    anchors, neighbours = inputs["anchors"], inputs["neighbours"]
    assert anchors.shape == (5,) and neighbours.shape == (5, 1 if sample_one_neighbour else 4)
    for anchor, given in zip(anchors, neighbours, strict=True):
        if sample_one_neighbour:
            assert given[0] in neighbour_indices[anchor]
        else:
            np.testing.assert_array_equal(given, neighbour_indices[anchor])
    assert len(targets) == 2 and all(target.shape == (5,) for target in targets)


def test_a_batch_read_twice_is_the_same_batch_and_each_epoch_draws_anew():
    # Keras reads the first batch once more to learn its shapes; the draws must not depend on how often it reads.
    neighbour_indices = np.random.default_rng(5).integers(0, 40, size=(40, 6))
    batches = RowBatches(40, 8, seed=6, neighbour_indices=neighbour_indices, sample_one_neighbour=True)
    first, again = batches[0][0], batches[0][0]
    np.testing.assert_array_equal(first["neighbours"], again["neighbours"])
    epoch_0 = [batches[index][0]["neighbours"] for index in range(len(batches))]
    batches.on_epoch_end()
    epoch_1 = [batches[index][0]["neighbours"] for index in range(len(batches))]
    assert not np.array_equal(batches.order, RowBatches(40, 8, seed=6).order)  # a new order each epoch
    assert not all(np.array_equal(a, b) for a, b in zip(epoch_0, epoch_1, strict=True))


def test_device_rows_gather_like_numpy_and_stay_out_of_checkpoints(tmp_path):
    rows = np.random.default_rng(5).integers(0, 256, size=(50, 4, 4, 3), dtype=np.uint8)
    device_rows = DeviceRows(rows)
    indices = np.array([[3, 0], [49, 3], [7, 7]])
    gathered = keras.ops.convert_to_numpy(device_rows(indices))
    assert gathered.dtype == np.uint8
    np.testing.assert_array_equal(gathered, rows[indices])  # [3, 2] indices -> [3, 2, 4, 4, 3] rows

    inputs = keras.Input(shape=(), dtype="int32")
    pixels = keras.layers.Flatten()(keras.ops.cast(device_rows(inputs), "float32"))
    model = keras.Model(inputs, keras.layers.Dense(2)(pixels))
    model.save_weights(tmp_path / "with_rows.weights.h5")
    shapes = []
    with h5py.File(tmp_path / "with_rows.weights.h5") as file:
        file.visititems(lambda name, item: shapes.append(item.shape) if isinstance(item, h5py.Dataset) else None)
    assert sorted(shapes) == [(2,), (48, 2)]  # the Dense layer's bias and kernel, not the rows
    model.load_weights(tmp_path / "with_rows.weights.h5")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(device_rows.rows), rows)


@pytest.mark.parametrize("num_images, batch_size", [(23, 10), (20, 10), (3, 8)])
def test_padded_prediction_equals_plain_prediction(num_images, batch_size):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    inputs = np.random.default_rng(num_images).normal(size=(num_images, 6)).astype("float32")
    predicted = predict_in_full_batches(model, inputs, batch_size)
    assert predicted.shape == (num_images, 3)
    np.testing.assert_allclose(predicted, keras.ops.convert_to_numpy(model(inputs)), atol=1e-6)


@pytest.mark.parametrize(
    "setting, num_bytes, backend, memory_bytes, expected",
    [
        ("auto", 184_000_000, "jax", 80_000_000_000, True),  # CIFAR-10 on an H100
        ("auto", 30_000_000_000, "jax", 80_000_000_000, False),  # more than a quarter of the GPU
        ("auto", 20_000_000_000, "jax", 80_000_000_000, True),  # exactly a quarter
        ("auto", 184_000_000, "jax", None, True),  # a CPU: the rows are in host memory already
        ("auto", 184_000_000, "tensorflow", None, False),  # TensorFlow's input pipeline feeds the batches
        ("true", 30_000_000_000, "tensorflow", None, True),
        ("false", 1, "jax", None, False),
    ],
)
def test_data_on_device_setting(setting, num_bytes, backend, memory_bytes, expected):
    assert resolve_data_on_device(setting, num_bytes, backend, memory_bytes) is expected


def test_compilation_log_counts_each_step_and_the_loads_from_the_cache():
    log = CompilationLog()
    log.on_duration("/jax/core/compile/backend_compile_duration", 2.0, fun_name="jit(add)")
    mark = log.mark()
    for name, seconds in [("jit(train_step)", 40.0), ("jit(multiply)", 0.25), ("jit(predict_step)", 5.0)]:
        log.on_duration("/jax/core/compile/backend_compile_duration", seconds, fun_name=name)
    log.on_duration("/jax/compilation_cache/cache_retrieval_time_sec", 1.0)  # another event: not a compilation
    log.on_event("/jax/compilation_cache/cache_hits")
    assert log.since(mark) == {
        "programs": 3,
        "seconds": 45.25,
        "from_cache": 1,
        "steps": {"train_step": 1, "predict_step": 1},
    }


def tiny_simclr_learner(augmentation_kind):
    """The script's SimCLR learner on 16x16 images: the small encoder, two views of `augmentation_kind`."""
    import scan_cifar10 as script
    from scan.augmentations import create_data_augmentation
    from scan.models import create_encoder

    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    learner = script.RepresentationLearner(
        create_encoder("small", 8), 8, 2, script.create_data_preprocessing(16, images),
        create_data_augmentation(augmentation_kind, seed=1), temperature=0.5, projection_head="mlp",
        pretext_loss="ntxent",
    )  # fmt: skip
    learner(images[:2].astype("float32"))
    return learner, images


def test_xla_is_asked_for_on_a_tensorflow_cpu_only_for_a_long_stage_of_layers_that_compile(monkeypatch):
    learner, _ = tiny_simclr_learner("simclr")
    # The tutorial's Keras layers: RandomZoom and RandomTranslation do not compile.
    tutorial_layers, _ = tiny_simclr_learner("tutorial-layers")
    monkeypatch.setattr(scan.backend.keras.backend, "backend", lambda: "tensorflow")
    monkeypatch.setattr(scan.backend, "find_gpus", lambda: [])
    assert xla_on_cpu(learner, 500) is True
    assert xla_on_cpu(learner, 499) == "auto"  # too short to win back the compiling
    assert xla_on_cpu(learner, 50, min_steps=50) is True
    assert xla_on_cpu(tutorial_layers, 10**6) == "auto"
    monkeypatch.setattr(scan.backend, "find_gpus", lambda: [("NVIDIA H100", (9, 0))])
    assert xla_on_cpu(learner, 10**6) == "auto"  # Keras's "auto" already compiles on a TensorFlow GPU
    monkeypatch.setattr(scan.backend, "find_gpus", lambda: [])
    monkeypatch.setattr(scan.backend.keras.backend, "backend", lambda: "jax")
    assert xla_on_cpu(learner, 10**6) == "auto"  # JAX compiles every step anyway


def test_a_simclr_step_compiled_by_xla_trains_on_this_backend():
    learner, images = tiny_simclr_learner("simclr")
    learner.compile(optimizer=keras.optimizers.AdamW(1e-2), jit_compile=xla_on_cpu(learner, 2, min_steps=2))
    if keras.backend.backend() == "tensorflow" and not scan.backend.find_gpus():
        assert learner.jit_compile is True
    before = [keras.ops.convert_to_numpy(weight) for weight in learner.encoder.trainable_weights]
    history = learner.fit(images.astype("float32"), epochs=2, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])) and len(history.history["loss"]) == 2
    after = learner.encoder.trainable_weights
    assert all(not np.allclose(old, keras.ops.convert_to_numpy(new)) for old, new in zip(before, after, strict=True))
