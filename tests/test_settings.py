"""The settings block and the `--name=value` overrides."""

import pytest

import scan_cifar10 as scan
from conftest import SCRIPT, run_script

DEFAULTS = {"NUM_CLUSTERS": 20, "TEMPERATURE": 0.1, "L2_NORMALIZE": False, "DATA": "cifar10"}
COMMENTS = {"NUM_CLUSTERS": "number of clusters", "TEMPERATURE": "softmax temperature"}


def test_settings_block_lists_every_constant_with_its_comment():
    with open(SCRIPT) as file:
        comments = scan.read_settings_block(file.read())
    # The tutorial's hyperparameters, in upper snake case, each documented.
    for name in [
        "TARGET_SIZE",
        "REPRESENTATION_DIM",
        "PROJECTION_UNITS",
        "NUM_CLUSTERS",
        "K_NEIGHBOURS",
        "TUNE_ENCODER_DURING_CLUSTERING",
        "DATA",
        "MAX_IMAGES",
        "REPRESENTATION_EPOCHS",
        "CLUSTERING_EPOCHS",
        "BATCH_SIZE",
        "OUTPUT_DIR",
        "SEED",
    ]:
        assert comments[name].strip(), name
    assert "CIFAR10_CLASSES" not in comments  # module constants outside the block are not settings


def test_tutorial_values_are_the_defaults():
    assert (scan.TARGET_SIZE, scan.REPRESENTATION_DIM, scan.PROJECTION_UNITS) == (32, 512, 128)
    assert (scan.NUM_CLUSTERS, scan.K_NEIGHBOURS, scan.TUNE_ENCODER_DURING_CLUSTERING) == (20, 5, False)
    assert (scan.TEMPERATURE, scan.BATCH_SIZE, scan.REPRESENTATION_EPOCHS, scan.CLUSTERING_EPOCHS) == (0.1, 512, 50, 50)
    assert (scan.REPRESENTATION_LEARNING_RATE, scan.LEARNING_RATE_DECAY_STEPS, scan.LEARNING_RATE_DECAY_ALPHA) == (
        1e-3,
        500,
        0.1,
    )
    assert (scan.CLUSTERING_LEARNING_RATE, scan.WEIGHT_DECAY, scan.EMBEDDING_BATCH_SIZE) == (5e-4, 1e-4, 500)


def test_overrides_are_parsed_to_the_constant_type():
    settings = scan.parse_settings(
        ["--num_clusters=10", "--temperature=0.5", "--l2_normalize=true", "--data=some/folder"], DEFAULTS, COMMENTS
    )
    assert settings.num_clusters == 10 and isinstance(settings.num_clusters, int)
    assert settings.temperature == 0.5
    assert settings.l2_normalize is True
    assert settings.data == "some/folder"
    assert scan.parse_settings([], DEFAULTS, COMMENTS).num_clusters == 20
    assert scan.parse_settings(["--temperature=1"], DEFAULTS, COMMENTS).temperature == 1.0
    assert scan.parse_settings(["--l2_normalize=0"], DEFAULTS, COMMENTS).l2_normalize is False


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--num_clusterz=3", "unrecognized arguments: --num_clusterz=3"),
        ("--num_clusters=ten", "--num_clusters=ten: expected int"),
        ("--num_clusters=2.5", "--num_clusters=2.5: expected int"),
        ("--temperature=warm", "--temperature=warm: expected float"),
        ("--l2_normalize=maybe", "--l2_normalize=maybe: expected true or false"),
        ("--num", "unrecognized arguments: --num"),  # no abbreviations
    ],
)
def test_bad_overrides_raise_a_usage_error(argument, message):
    with pytest.raises(scan.UsageError, match=message.replace(".", r"\.")):
        scan.parse_settings([argument], DEFAULTS, COMMENTS)


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--representation_epochs=0", "--representation_epochs=0: must be at least 1"),
        ("--batch_size=-4", "--batch_size=-4: must be at least 1"),
        ("--num_clusters=1", "at least 2 clusters"),
        ("--target_size=16", "the resnet50v2 encoder needs images of at least 32x32"),
        ("--temperature=0", "--temperature=0.0: must be greater than 0"),
    ],
)
def test_impossible_settings_are_rejected(argument, message):
    settings = scan.parse_settings([argument], {name: getattr(scan, name) for name in _names()}, {})
    with pytest.raises(scan.UsageError, match=message.replace(".", r"\.")):
        scan.validate_settings(settings)


def test_settings_that_the_data_cannot_satisfy_are_rejected():
    settings = scan.parse_settings(["--k_neighbours=10"], {name: getattr(scan, name) for name in _names()}, {})
    with pytest.raises(scan.UsageError, match="--k_neighbours=10 needs more than 10 images, but the data has 10"):
        scan.validate_against_data(settings, 10)
    settings = scan.parse_settings(
        ["--num_clusters=30", "--k_neighbours=2"], {name: getattr(scan, name) for name in _names()}, {}
    )
    with pytest.raises(scan.UsageError, match="--num_clusters=30 is more than the 25 images"):
        scan.validate_against_data(settings, 25)
    scan.validate_against_data(settings, 30)  # exactly as many clusters as images is possible


def _names():
    with open(SCRIPT) as file:
        return list(scan.read_settings_block(file.read()))


def test_help_lists_every_setting_with_default_and_comment(tmp_path):
    result = run_script(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())  # argparse wraps long lines
    with open(SCRIPT) as file:
        comments = scan.read_settings_block(file.read())
    for name, comment in comments.items():
        assert f"--{name.lower()} " in help_text, name
        assert " ".join(comment.split())[:30] in help_text, name
    assert "(default: 20)" in help_text and "(default: cifar10)" in help_text
