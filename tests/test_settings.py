"""The settings block and the `--name=value` overrides."""

import re

import keras
import pytest

import scan.data
import scan_cifar10 as script
from conftest import SCRIPT, make_image_folder
from scan.data import CIFAR10_SPLITS, holdout_count
from scan.run import Run
from scan.settings import (
    REPLACED_SETTINGS,
    UsageError,
    parse_settings,
    read_settings_block,
    validate_against_data,
    validate_settings,
)

DEFAULTS = {"NUM_CLUSTERS": 20, "TEMPERATURE": 0.1, "L2_NORMALIZE": False, "DATA": "cifar10"}
COMMENTS = {"NUM_CLUSTERS": "number of clusters", "TEMPERATURE": "softmax temperature"}
RECIPES = {"tutorial": {}, "small": {"num_clusters": 5, "temperature": 0.2}}


def test_settings_block_lists_every_constant_with_its_comment():
    with open(SCRIPT) as file:
        comments = read_settings_block(file.read())
    # The tutorial's hyperparameters, in upper snake case, each documented.
    for name in [
        "TARGET_SIZE",
        "REPRESENTATION_DIM",
        "PROJECTION_UNITS",
        "NUM_CLUSTERS",
        "K_NEIGHBOURS",
        "ENCODER_DURING_CLUSTERING",
        "DATA",
        "MAX_IMAGES",
        "REPRESENTATION_EPOCHS",
        "CLUSTERING_EPOCHS",
        "REPRESENTATION_BATCH_SIZE",
        "CLUSTERING_BATCH_SIZE",
        "OUTPUT_DIR",
        "SEED",
    ]:
        assert comments[name].strip(), name
    assert "CIFAR10_CLASSES" not in comments  # module constants outside the block are not settings
    with open(SCRIPT) as file:
        block = file.read().split("end of settings")[0].split(" settings\n", 1)[1]
    assigned = re.findall(r"^([A-Z][A-Z0-9_]*) =", block, flags=re.MULTILINE)
    assert assigned == list(comments)  # every setting has its one-line comment (a wrapped line would lose it)


def test_tutorial_values_are_the_defaults():
    assert (script.TARGET_SIZE, script.REPRESENTATION_DIM, script.PROJECTION_UNITS) == (32, 512, 128)
    assert (script.NUM_CLUSTERS, script.K_NEIGHBOURS, script.ENCODER_DURING_CLUSTERING) == (20, 5, "frozen")
    assert (script.TEMPERATURE, script.REPRESENTATION_EPOCHS, script.CLUSTERING_EPOCHS) == (0.1, 50, 50)
    assert (script.REPRESENTATION_BATCH_SIZE, script.CLUSTERING_BATCH_SIZE) == (
        512,
        512,
    )  # the tutorial's one batch_size
    assert (
        script.REPRESENTATION_LEARNING_RATE,
        script.LEARNING_RATE_DECAY_STEPS,
        script.LEARNING_RATE_DECAY_ALPHA,
    ) == (
        1e-3,
        500,
        0.1,
    )
    assert (script.CLUSTERING_LEARNING_RATE, script.WEIGHT_DECAY, script.EMBEDDING_BATCH_SIZE) == (5e-4, 1e-4, 500)


def test_overrides_are_parsed_to_the_constant_type():
    settings = parse_settings(
        ["--num_clusters=10", "--temperature=0.5", "--l2_normalize=true", "--data=some/folder"],
        DEFAULTS,
        COMMENTS,
        RECIPES,
    )
    assert settings.num_clusters == 10 and isinstance(settings.num_clusters, int)
    assert settings.temperature == 0.5
    assert settings.l2_normalize is True
    assert settings.data == "some/folder"
    assert parse_settings([], DEFAULTS, COMMENTS, RECIPES, ("cifar10",)).num_clusters == 20  # CIFAR-10 keeps its number
    assert parse_settings(["--temperature=1"], DEFAULTS, COMMENTS, RECIPES).temperature == 1.0
    assert parse_settings(["--l2_normalize=0"], DEFAULTS, COMMENTS, RECIPES).l2_normalize is False


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
    with pytest.raises(UsageError, match=message.replace(".", r"\.")):
        parse_settings([argument], DEFAULTS, COMMENTS, RECIPES)


COMMENTS_OF_SCRIPT = read_settings_block(open(SCRIPT).read())
DEFAULTS_OF_SCRIPT = {name: getattr(script, name) for name in COMMENTS_OF_SCRIPT}


def script_settings(argv):
    """The script's own settings, parsed and validated as main() does."""
    settings = parse_settings(argv, DEFAULTS_OF_SCRIPT, COMMENTS_OF_SCRIPT, script.RECIPES, tuple(CIFAR10_SPLITS))
    validate_settings(settings, DEFAULTS_OF_SCRIPT)
    return settings


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--representation_epochs=0", "--representation_epochs=0: must be at least 1"),
        ("--representation_batch_size=-4", "--representation_batch_size=-4: must be at least 1"),
        ("--clustering_batch_size=0", "--clustering_batch_size=0: must be at least 1"),
        ("--self_label_batch_size=70000", "--self_label_batch_size=70000: must be at most 65536"),
        ("--num_clusters=1", "at least 2 clusters"),
        ("--num_heads=0", "--num_heads=0: must be at least 1"),
        ("--mining_features=pixels", "--mining_features=pixels: choose one of tutorial, encoder, projection"),
        ("--encoder_during_clustering=on", "--encoder_during_clustering=on: choose one of frozen, tuned, cached"),
        ("--clustering_optimizer=sgd", "--clustering_optimizer=sgd: choose one of adamw, adam"),
        ("--target_size=16", "the resnet50v2 encoder needs images of at least 32x32"),
        ("--temperature=0", "--temperature=0.0: must be greater than 0"),
        ("--encoder=vgg16", "--encoder=vgg16: choose one of resnet50v2, resnet18, small"),
        ("--recipe=fast", "--recipe=fast: choose one of tutorial, scan, cpu, gpu"),
        (
            "--recipe=gpu --representation_epochs=5",
            "--warmup_epochs=10: must be fewer than --representation_epochs=5; lower",
        ),
        ("--self_label_threshold=1", "--self_label_threshold=1.0: must be between 0 and 1"),
        ("--self_label_epochs=-1", "--self_label_epochs=-1: must be 0 (none or all) or positive"),
        ("--prediction_neighbours=-5", "--prediction_neighbours=-5: must be 0 (none or all) or positive"),
        ("--prediction_neighbours=5000", "--prediction_neighbours=5000: must be at most 1000"),
        ("--recipe=cpu --feature_views=-1", "--feature_views=-1: must be 0 (none or all) or positive"),
        ("--recipe=cpu --feature_views=65", "--feature_views=65: must be at most 64"),
        ("--checkpoint_seconds=-5", "--checkpoint_seconds=-5: must be 0 (save every epoch) or more"),
        ("--data_on_device=gpu", "--data_on_device=gpu: choose one of auto, true, false"),
        ("--strong_augmentation=simclr", "--strong_augmentation=simclr: choose one of augmentation, scan"),
        ("--self_label_guard=maybe", "--self_label_guard=maybe: expected true or false"),
        ("--pretext_loss=byol", "--pretext_loss=byol: choose one of tutorial, ntxent, vicreg"),
        ("--recipe=cpu --small_views=-1", "--small_views=-1: must be 0 (none or all) or positive"),
        (
            "--recipe=cpu --small_views=2 --small_view_size=24",
            "--small_view_size=24: must be at least 8 (the small encoder's smallest input) and smaller than the full "
            "views' side, 24 (VIEW_SIZE or TARGET_SIZE)",
        ),
        ("--recipe=cpu --small_views=2 --small_view_size=4", "--small_view_size=4: must be at least 8"),
        (
            "--recipe=cpu --pretext_loss=vicreg --representation_batch_size=1",
            "--pretext_loss=vicreg takes its variances over the batch: use --representation_batch_size=2 or more",
        ),
    ],
)
def test_impossible_settings_are_rejected(argument, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        script_settings(argument.split())


def test_eval_data_and_holdout_given_together_are_one_error_line():
    with pytest.raises(UsageError) as error:
        script_settings(["--eval_data=cifar10-test", "--holdout_images=10"])
    assert str(error.value) == (
        "--eval_data=cifar10-test and --holdout_images=10 both choose the images evaluated: give one of them "
        "(--eval_data: other images; --holdout_images: images held out of --data)"
    )
    with pytest.raises(UsageError, match="both choose the images evaluated"):
        script_settings(["--recipe=cpu", "--eval_data=path/to/test", "--holdout_images=10"])


def test_the_evaluation_given_on_the_command_line_wins_over_the_recipes():
    # The cpu recipe holds 10,000 images out; a given --eval_data evaluates those images instead.
    given = script_settings(["--recipe=cpu", "--eval_data=path/to/test"])
    assert (given.eval_data, given.holdout_images, given.holdout_share) == ("path/to/test", 0, 0.0)
    # The scan recipe evaluates on CIFAR-10's test images; a given --holdout_images holds training images out instead.
    held_out = script_settings(["--recipe=scan", "--holdout_images=10"])
    assert (held_out.eval_data, held_out.holdout_images, held_out.holdout_share) == ("", 10, 0.0)
    assert script_settings(["--recipe=scan", "--eval_data=", "--holdout_images=10"]).holdout_images == 10


def test_a_recipe_with_a_given_eval_data_evaluates_those_images_and_says_so(tmp_path, capsys):
    train = make_image_folder(tmp_path / "train", num_classes=2, per_class=10)
    test = make_image_folder(tmp_path / "test", num_classes=2, per_class=3)
    settings = parse_settings(
        ["--recipe=cpu", f"--data={train}", f"--eval_data={test}", "--k_neighbours=3", "--num_clusters=2"],
        *(DEFAULTS_OF_SCRIPT, COMMENTS_OF_SCRIPT, script.RECIPES, tuple(CIFAR10_SPLITS)),
    )
    validate_settings(settings, DEFAULTS_OF_SCRIPT)
    data = script.prepare_data(Run(settings, gpus=[], num_devices=1, times=None))
    assert (len(data.train.images), len(data.eval.images)) == (20, 6)  # all of DATA trained on, EVAL_DATA evaluated
    assert data.eval.names == [f"class_{c}/c{c}_{i:03d}.png" for c in range(2) for i in range(3)]
    printed = capsys.readouterr().out
    assert f"evaluation data: image folder {test} (never trained on)" in printed and "holding out" not in printed


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--batch_size=64"], "--batch_size=64 was split in this version: use --representation_batch_size=64 "
         "--clustering_batch_size=64 --self_label_batch_size=64"),
        (["--cluster_on_features=true"], "--cluster_on_features=true became a value of --encoder_during_clustering "
         "in this version: use --encoder_during_clustering=cached"),
        (["--tune_encoder_during_clustering=1"], "--tune_encoder_during_clustering=1 became a value of "
         "--encoder_during_clustering in this version: use --encoder_during_clustering=tuned"),
        (["--embed_raw_pixels=True"], "--embed_raw_pixels=True became a value of --mining_features in this version: "
         "use --mining_features=tutorial"),
        (["--self_label_ema", "0.9"], "--self_label_ema=0.9 was removed in this version: leave it out (what it "
         "measured: docs/experiments.md, Self-labeling)"),
        (["--recipe=quick"], "--recipe=quick was renamed in this version: use --recipe=cpu"),
        (["--cluster_on_features=maybe"], "--cluster_on_features=maybe is a setting of an earlier version: for "
         "--cluster_on_features=true, use --encoder_during_clustering=cached; for --cluster_on_features=false, use "
         "--encoder_during_clustering=frozen (or --encoder_during_clustering=tuned)"),
        (["--momentum=0.8", "--num_clusters=5", "--steps_per_execution=4"], "--momentum=0.8 was removed in this "
         "version: leave it out; SGD's momentum is SCAN's 0.9; --steps_per_execution=4 was removed in this version: "
         "leave it out (what it measured: docs/experiments.md, Speed)"),
    ],
)  # fmt: skip
def test_a_removed_setting_is_one_line_that_names_what_replaced_it(arguments, message):
    with pytest.raises(UsageError) as error:
        script_settings(arguments)
    assert str(error.value) == message


@pytest.mark.parametrize("earlier", list(REPLACED_SETTINGS))
def test_every_setting_of_an_earlier_version_is_refused_with_what_to_do(earlier):
    argument = earlier.replace("=N", "=7")
    with pytest.raises(UsageError) as error:
        script_settings([argument])
    message = str(error.value)
    assert message.startswith(f"{argument} ") and " in this version: " in message and "\n" not in message
    for name in re.findall(r"--([a-z_]+)=", message.partition(" in this version: ")[2]):  # what it names exists
        assert name.upper() in DEFAULTS_OF_SCRIPT, name


def test_settings_that_the_data_cannot_satisfy_are_rejected():
    with pytest.raises(UsageError, match="--k_neighbours=10 needs more than 10 images, but the data has 10"):
        validate_against_data(script_settings(["--k_neighbours=10"]), 10)
    settings = script_settings(["--num_clusters=30", "--k_neighbours=2"])
    with pytest.raises(UsageError, match="--num_clusters=30 is more than the 25 images"):
        validate_against_data(settings, 25)
    validate_against_data(settings, 30)  # exactly as many clusters as images is possible


def test_recipe_supplies_defaults_and_the_command_line_wins():
    tutorial = script_settings([])
    assert (tutorial.recipe, tutorial.encoder, tutorial.num_clusters, tutorial.self_label_epochs) == (
        "tutorial",
        "resnet50v2",
        20,
        0,
    )
    scan_recipe = script_settings(["--recipe=scan"])
    assert scan_recipe.encoder == "resnet18" and scan_recipe.augmentation == "simclr"
    assert scan_recipe.pretext_loss == "ntxent" and scan_recipe.clustering_loss == "scan"
    assert (scan_recipe.k_neighbours, scan_recipe.num_clusters, scan_recipe.representation_epochs) == (20, 10, 500)
    assert scan_recipe.encoder_during_clustering == "tuned" and scan_recipe.self_label_threshold == 0.99
    assert scan_recipe.entropy_loss_weight == 5.0 and scan_recipe.temperature == 0.1
    assert scan_recipe.eval_data == "cifar10-test"
    # SCAN's code mines neighbours among the projection head's outputs; the tutorial among the encoder's features.
    assert (tutorial.mining_features, scan_recipe.mining_features) == ("tutorial", "projection")
    # SCAN's configs/scan/scan_cifar10.yml: one head, batch 128, Adam at 1e-4 with L2 1e-4; self-labeling at batch 1000.
    assert (tutorial.num_heads, scan_recipe.num_heads, scan_recipe.clustering_batch_size) == (1, 1, 128)
    assert (scan_recipe.clustering_optimizer, scan_recipe.clustering_learning_rate) == ("adam", 1e-4)
    assert (scan_recipe.weight_decay, scan_recipe.self_label_batch_size) == (1e-4, 1000)
    # A setting on the command line wins over the recipe, in either order of the arguments.
    for argv in (["--recipe=scan", "--num_clusters=20"], ["--num_clusters=20", "--recipe=scan"]):
        settings = script_settings(argv)
        assert settings.num_clusters == 20 and settings.encoder == "resnet18"
    # Each component stays switchable on its own.
    mixed = script_settings(["--recipe=scan", "--clustering_loss=tutorial", "--encoder=small"])
    assert (mixed.clustering_loss, mixed.encoder, mixed.pretext_loss) == ("tutorial", "small", "ntxent")
    cpu = script_settings(["--recipe=cpu"])
    # The cpu recipe leaves self-labeling out: its guard undid it in every measured run.
    assert cpu.holdout_images > 0 and cpu.encoder == "small" and cpu.self_label_epochs == 0


def test_every_recipe_names_only_real_settings_and_valid_choices():
    with open(SCRIPT) as file:
        names = {name.lower() for name in read_settings_block(file.read())}
    for recipe, values in script.RECIPES.items():
        assert set(values) <= names, recipe
        script_settings([f"--recipe={recipe}"])  # validates
    assert script.RECIPES["tutorial"] == {}


def test_help_lists_every_setting_with_default_and_comment(tmp_path, run_here):
    result = run_here(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())  # argparse wraps long lines
    with open(SCRIPT) as file:
        comments = read_settings_block(file.read())
    for name, comment in comments.items():
        assert f"--{name.lower()} " in help_text, name
        assert " ".join(comment.split())[:30] in help_text, name
    assert "(default: 20)" in help_text and "(default: cifar10)" in help_text


def test_a_recipes_cifar10_evaluation_applies_to_cifar10_only():
    with open(SCRIPT) as file:
        comments = read_settings_block(file.read())
    defaults = {name: getattr(script, name) for name in comments}
    own = lambda argv: parse_settings(argv, defaults, comments, script.RECIPES, tuple(CIFAR10_SPLITS))  # noqa: E731
    assert (own(["--recipe=scan"]).eval_data, own(["--recipe=scan"]).holdout_images) == ("cifar10-test", 0)
    folder = own(["--recipe=scan", "--data=path/to/images"])
    assert (folder.eval_data, folder.holdout_images) == ("", 10000)  # held-out images of the user's own data
    assert own(["--recipe=scan", "--data=path/to/images", "--holdout_images=50"]).holdout_images == 50
    given = own(["--recipe=scan", "--data=path/to/images", "--eval_data=path/to/other"])
    assert (given.eval_data, given.holdout_images) == ("path/to/other", 0)
    assert own(["--recipe=cpu", "--data=path/to/images"]).holdout_images == 10000
    assert own(["--data=path/to/images"]).eval_data == "" and own(["--data=path/to/images"]).holdout_images == 0
    # A recipe's hold-out of the user's own images is a fifth of them, at most that many; a given one wins.
    assert folder.holdout_share == own(["--recipe=cpu", "--data=path/to/images"]).holdout_share == 0.2
    assert own(["--recipe=cpu", "--data=path/to/images", "--holdout_images=50"]).holdout_share == 0.0
    assert own(["--recipe=cpu"]).holdout_share == own(["--data=path/to/images"]).holdout_share == 0.0


@pytest.mark.parametrize(
    "maximum, share, num_images, expected", [(10000, 0.2, 2000, 400), (10000, 0.2, 50000, 10000),
                                             (10000, 0.2, 60000, 10000), (300, 0.0, 2000, 300), (10, 0.2, 49, 9)]
)  # fmt: skip
def test_holdout_count_is_a_fifth_of_the_images_at_most_the_maximum(maximum, share, num_images, expected):
    assert holdout_count(maximum, share, num_images) == expected


def test_a_recipe_holds_out_a_fifth_of_a_small_folder_and_says_so(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", num_classes=2, per_class=10)
    with open(SCRIPT) as file:
        comments = read_settings_block(file.read())
    defaults = {name: getattr(script, name) for name in comments}
    for extra, trained, held_out in [([], 16, 4), (["--max_images=8"], 8, 2), (["--holdout_images=5"], 15, 5)]:
        settings = parse_settings(
            [
                "--recipe=cpu",
                f"--data={folder}",
                "--k_neighbours=3",
                "--representation_batch_size=4",
                "--num_clusters=2",
                *extra,
            ],
            defaults,
            comments,
            script.RECIPES,
            tuple(CIFAR10_SPLITS),
        )
        data = script.prepare_data(Run(settings, gpus=[], num_devices=1, times=None))
        assert (len(data.train.images), len(data.eval.images)) == (trained, held_out), extra
        said = (
            "holding out 4 of the 20 images to evaluate on: the recipe's share of your own data (a fifth, at most 10000"
        )
        assert (said in capsys.readouterr().out) == (extra == [])


def test_a_recipe_on_a_folder_never_reaches_for_cifar10(tmp_path, monkeypatch, capsys):
    folder = make_image_folder(tmp_path / "images", per_class=10)

    class Started(Exception):
        pass

    def download(split):
        raise AssertionError(f"reached for CIFAR-10 ({split})")

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(scan.data, "load_cifar10_download", download)  # where load_dataset finds it
    monkeypatch.setattr(script, "create_data_preprocessing", started)
    with pytest.raises(Started):
        script.main(["--recipe=scan", f"--data={folder}", "--holdout_images=6", f"--output_dir={tmp_path / 'out'}",
                   "--k_neighbours=2", "--num_clusters=3"])  # fmt: skip
    keras.mixed_precision.set_global_policy("float32")
    assert f"evaluation data: image folder {folder}, 6 held-out images (never trained on)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--recipe=cpu", "--encoder_during_clustering=tuned"], "--feature_views=1 does nothing with --encoder_during_clustering=tuned (only with cached); set --feature_views=0 or --encoder_during_clustering=cached"),
        (["--feature_views=2"], "--feature_views=2 does nothing with --encoder_during_clustering=frozen"),
        (["--torch_conventions=true"], "--torch_conventions=True does nothing with --encoder=resnet50v2 (only with resnet18 or small); set --torch_conventions=False"),
        (["--recipe=cpu", "--dropout_rate=0.3"], "--dropout_rate=0.3 does nothing with --projection_head=mlp"),
        (["--recipe=cpu", "--l2_normalize=true"], "--l2_normalize=True does nothing with --pretext_loss=ntxent"),
        (["--entropy_loss_weight=2"], "--entropy_loss_weight=2.0 does nothing with --clustering_loss=tutorial"),
        (["--recipe=cpu", "--pretext_loss=vicreg", "--temperature=0.2"], "--temperature=0.2 does nothing with --pretext_loss=vicreg (only with tutorial or ntxent)"),
        (["--small_views=2"], "--small_views=2 does nothing with --pretext_loss=tutorial (only with ntxent or vicreg); set --small_views=0 or --pretext_loss=ntxent"),
        (["--recipe=cpu", "--small_view_size=12"], "--small_view_size=12 does nothing with --small_views=0; set --small_view_size=16 or --small_views=2"),
    ],
)  # fmt: skip
def test_a_setting_that_would_do_nothing_with_the_others_is_one_error_line(arguments, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        script_settings(arguments)


def test_settings_that_act_with_the_others_given_are_accepted():
    assert script_settings(["--recipe=cpu", "--feature_views=3"]).feature_views == 3
    assert (
        script_settings(["--recipe=cpu", "--encoder_during_clustering=tuned", "--feature_views=0"]).feature_views == 0
    )
    assert script_settings(["--encoder=small", "--torch_conventions=true"]).torch_conventions is True
    assert script_settings(["--dropout_rate=0.3"]).dropout_rate == 0.3  # the tutorial's projection head
    assert script_settings(["--clustering_loss=scan", "--entropy_loss_weight=2"]).entropy_loss_weight == 2.0
    multi_crop = script_settings(["--recipe=cpu", "--pretext_loss=vicreg", "--small_views=4", "--small_view_size=12"])
    assert (multi_crop.pretext_loss, multi_crop.small_views, multi_crop.small_view_size) == ("vicreg", 4, 12)


def test_the_old_name_of_the_pretext_loss_names_the_new_one():
    with pytest.raises(
        UsageError,
        match=r"^--contrastive_loss=ntxent was renamed in this version: use --pretext_loss=ntxent \(the same values",
    ):
        script.main(["--recipe=cpu", "--contrastive_loss=ntxent"])


def test_the_old_recipe_name_quick_names_its_successor():
    with pytest.raises(UsageError, match=r"^--recipe=quick was renamed in this version: use --recipe=cpu$"):
        script.main(["--recipe=quick"])
    with pytest.raises(UsageError, match=r"^--recipe=fast: choose one of tutorial, scan, cpu, gpu$"):
        script.main(["--recipe=fast"])
