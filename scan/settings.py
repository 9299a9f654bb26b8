"""Settings: the `--name=value` overrides of the script's constants, the recipes' defaults, and every check of them
that can run before any data is read (`validate_settings`) or once the number of images is known
(`validate_against_data`). A problem the user can fix is a `UsageError`: the script prints it as one line.
"""

import argparse
import math
import os
import re
import sys

from scan.models import ENCODER_MINIMUM_SIZES


class UsageError(ValueError):
    """A problem the user can fix (a setting or the data); `main` prints it as one line and exits with 2."""


# The allowed values of the settings that name a component.
CHOICES = {
    "encoder": ["resnet50v2", "resnet18", "small"],
    "augmentation": ["tutorial", "tutorial-layers", "simclr"],
    "strong_augmentation": ["augmentation", "scan"],
    "projection_head": ["tutorial", "mlp", "vicreg"],
    "mining_features": ["tutorial", "encoder", "projection"],
    "encoder_during_clustering": ["frozen", "tuned", "cached"],
    "head_features": ["encoder", "projection"],
    "pretext_loss": ["tutorial", "ntxent", "vicreg"],
    "representation_optimizer": ["adamw", "sgd"],
    "clustering_optimizer": ["adamw", "adam"],
    "clustering_loss": ["tutorial", "scan"],
    "mixed_precision": ["auto", "float32", "mixed_bfloat16", "mixed_float16"],
    "data_on_device": ["auto", "true", "false"],
    "distribution": ["auto", "none", "data_parallel"],
    "image_fit": ["crop", "squash"],
}
# Upper bounds of the settings whose larger values would exhaust memory rather than do more work.
SETTING_LIMITS = {
    "input_size": 1024, "target_size": 1024, "view_size": 1024, "num_augmentations": 64, "num_heads": 1000,
    "representation_dim": 65536, "projection_units": 65536, "k_neighbours": 1000, "prediction_neighbours": 1000,
    "feature_views": 64, "small_views": 64, "small_view_size": 1024, "prototypes_per_cluster": 100,
    "sheet_images": 10000, "representation_batch_size": 65536, "clustering_batch_size": 65536,
    "self_label_batch_size": 65536, "embedding_batch_size": 10000,
}  # fmt: skip
BATCH_SIZES = ["representation_batch_size", "clustering_batch_size", "self_label_batch_size"]
# Settings that act only with another setting's values: anything but their default without them would do nothing (and,
# fingerprinted, retrain a stage for nothing), so it is refused. {setting: (the other setting, its values)}.
ACTS_ONLY_WITH = {
    "torch_conventions": ("encoder", ["resnet18", "small"]),
    "dropout_rate": ("projection_head", ["tutorial"]),
    "l2_normalize": ("pretext_loss", ["tutorial"]),
    "temperature": ("pretext_loss", ["tutorial", "ntxent"]),
    "small_views": ("pretext_loss", ["ntxent", "vicreg"]),
    "entropy_loss_weight": ("clustering_loss", ["scan"]),
    "feature_views": ("encoder_during_clustering", ["cached"]),
}

# The settings of earlier versions, as a command gave them ("=N": with any value), and what this version takes
# instead: {earlier argument: (what became of it, what to do now)}. Each is one error line that names its
# replacement; docs/settings.md, "Renamed and removed settings", is this table (a test checks that they agree).
REPLACED_SETTINGS = {
    "--batch_size=N": (
        "was split", "use --representation_batch_size=N --clustering_batch_size=N --self_label_batch_size=N"
    ),
    "--embed_raw_pixels=true": ("became a value of --mining_features", "use --mining_features=tutorial"),
    "--embed_raw_pixels=false": (
        "became a value of --mining_features", "use --mining_features=encoder (or keep --mining_features=projection)"
    ),
    "--tune_encoder_during_clustering=true": (
        "became a value of --encoder_during_clustering", "use --encoder_during_clustering=tuned"
    ),
    "--tune_encoder_during_clustering=false": (
        "became a value of --encoder_during_clustering",
        "use --encoder_during_clustering=frozen (or --encoder_during_clustering=cached)",
    ),
    "--cluster_on_features=true": (
        "became a value of --encoder_during_clustering", "use --encoder_during_clustering=cached"
    ),
    "--cluster_on_features=false": (
        "became a value of --encoder_during_clustering",
        "use --encoder_during_clustering=frozen (or --encoder_during_clustering=tuned)",
    ),
    "--momentum=N": ("was removed", "leave it out; SGD's momentum is SCAN's 0.9"),
    "--self_label_weak_view=N": (
        "was removed", "leave it out; pseudo-labels come from the image itself, as in SCAN (its old default, none)"
    ),
    "--self_label_ema=N": ("was removed", "leave it out (what it measured: docs/experiments.md, Self-labeling)"),
    "--steps_per_execution=N": ("was removed", "leave it out (what it measured: docs/experiments.md, Speed)"),
    "--recipe=quick": ("was renamed", "use --recipe=cpu"),
    # VICReg, a loss that contrasts nothing, joined its choices.
    "--contrastive_loss=N": ("was renamed", "use --pretext_loss=N (the same values, and vicreg)"),
}  # fmt: skip
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def read_settings_block(source_text):
    """Returns `{NAME: comment}` for each `NAME = value  # comment` line between the settings markers."""
    block = re.search(r"^# -+ settings\n(.*)^# -+ end of settings$", source_text, flags=re.MULTILINE | re.DOTALL)
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*) = .+?  # (.+)$", block.group(1), flags=re.MULTILINE))


def parse_setting_value(name, text, default):
    """Parses `text` to the type of `default`, or raises a UsageError naming the setting."""
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        if text.lower() in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[text.lower()]
        raise UsageError(f"--{name}={text}: expected true or false")
    try:
        return type(default)(text)
    except ValueError:
        raise UsageError(f"--{name}={text}: expected {type(default).__name__}, e.g. --{name}={default}") from None


def replaced_setting_line(name, value, current_names):
    """What to say of `--name=value` when it is a setting of an earlier version (REPLACED_SETTINGS), else None;
    `current_names` are this version's settings, whose other values stay valid (--recipe=cpu)."""
    word = str(BOOLEAN_WORDS[value.lower()]).lower() if value.lower() in BOOLEAN_WORDS else value
    for key in (f"--{name}={word}", f"--{name}=N"):
        if key in REPLACED_SETTINGS:
            what, todo = REPLACED_SETTINGS[key]
            return f"--{name}={value} {what} in this version: {todo.replace('=N', f'={value}')}"
    earlier = [key for key in REPLACED_SETTINGS if key.partition("=")[0] == f"--{name}"]
    if earlier and name not in current_names:
        choices = "; ".join(f"for {key}, {REPLACED_SETTINGS[key][1]}" for key in earlier)
        return f"--{name}={value} is a setting of an earlier version: {choices}"
    return None


def check_replaced_settings(arguments, current_names):
    """Raises one UsageError that names what replaced each setting of an earlier version among `arguments` (given
    as "--name=value", or as "--name value", which argparse takes too)."""
    lines = []
    for index, argument in enumerate(arguments):
        name, given, value = argument.removeprefix("--").partition("=")
        if not given and index + 1 < len(arguments) and not arguments[index + 1].startswith("--"):
            value = arguments[index + 1]
        line = argument.startswith("--") and replaced_setting_line(name, value or "N", current_names)
        if line:
            lines.append(line)
    if lines:
        raise UsageError("; ".join(lines))


class _RaisingArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message + " (see --help for every setting)")


def parse_settings(argv, defaults, comments, recipes, cifar10_names=(), own_data_holdout=10000):
    """Returns a namespace of lower-case settings: `defaults`, then the chosen recipe's, then `--name=value`.

    Of the two ways to choose the images evaluated, the one given on the command line wins over the other's value
    from a recipe or a constant: --eval_data sets HOLDOUT_IMAGES to 0, --holdout_images EVAL_DATA to "" (both given:
    validate_settings refuses them). A recipe's CIFAR-10 evaluation images (an EVAL_DATA among `cifar10_names`)
    apply to CIFAR-10 only: with DATA the user's own images, and no --eval_data given, the recipe holds
    `own_data_holdout` of them out instead (unless --holdout_images is given).
    CIFAR-10's number of clusters does too: on the user's own images, without --num_clusters, the number is chosen
    from the data (NUM_CLUSTERS = 0).
    """
    parser = _RaisingArgumentParser(
        prog="scan_cifar10.py",
        description="SCAN image clustering. Each setting is a constant at the top of scan_cifar10.py; a recipe "
        f"({', '.join(recipes)}) supplies a coherent set of defaults, and --name=value always wins.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    for name, default in defaults.items():
        parser.add_argument(
            f"--{name.lower()}",
            help=f"{comments.get(name, '')} (default: {default})",
            metavar=type(default).__name__.upper(),
        )
    arguments = sys.argv[1:] if argv is None else argv
    check_replaced_settings(arguments, {name.lower() for name in defaults})
    texts = vars(parser.parse_args(arguments))
    given = {name: parse_setting_value(name, text, defaults[name.upper()]) for name, text in texts.items()}
    settings = {name.lower(): value for name, value in defaults.items()}
    recipe = given.get("recipe", settings.get("recipe", "tutorial"))
    if recipe not in recipes:
        raise UsageError(f"--recipe={recipe}: choose one of {', '.join(recipes)}")
    settings.update(recipes[recipe])
    settings.update(given)
    own_data = settings["data"] not in cifar10_names
    holdout_from_recipe = "holdout_images" not in given and "holdout_images" in recipes[recipe]
    if given.get("eval_data") and "holdout_images" not in given:
        settings["holdout_images"], holdout_from_recipe = 0, False
    if given.get("holdout_images") and "eval_data" not in given:
        settings["eval_data"] = ""
    if own_data and "eval_data" not in given and settings.get("eval_data") in cifar10_names:
        settings["eval_data"] = ""
        settings["holdout_images"] = given.get("holdout_images", own_data_holdout)
        holdout_from_recipe = "holdout_images" not in given
    # A recipe's hold-out fits the user's own images: a fifth of them, at most HOLDOUT_IMAGES (holdout_count).
    settings["holdout_share"] = 0.2 if own_data and holdout_from_recipe else 0.0
    if own_data and "num_clusters" not in given:
        settings["num_clusters"] = 0
    # The command that gives these settings, with the script's constants as they are: report.html shows it.
    settings["command"] = " ".join(["python scan_cifar10.py", *(f"--{name}={text}" for name, text in texts.items())])
    return argparse.Namespace(**settings)


def validate_settings(settings, defaults):
    """Rejects settings that cannot work, before any data is loaded or any output is written; `defaults` are the
    script's constants ({NAME: value})."""
    check_types_and_ranges(settings)
    check_fractions(settings)
    check_combinations(settings, defaults)


def check_types_and_ranges(settings):
    """Each setting among its CHOICES, finite, below its SETTING_LIMITS, and positive or at least 0 where it counts."""
    for name, allowed in CHOICES.items():
        if getattr(settings, name) not in allowed:
            raise UsageError(f"--{name}={getattr(settings, name)}: choose one of {', '.join(allowed)}")
    for name, value in vars(settings).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name}={value}: must be a finite number")
    for name, limit in SETTING_LIMITS.items():
        if getattr(settings, name) > limit:
            raise UsageError(f"--{name}={getattr(settings, name)}: must be at most {limit}")
    if not 0 <= settings.seed < 2**31:
        raise UsageError(f"--seed={settings.seed}: must be between 0 and {2**31 - 1}")
    if not settings.output_dir:
        raise UsageError("--output_dir is empty: name the folder for figures, metrics.json and the cache")
    positive = [
        *BATCH_SIZES, "embedding_batch_size", "representation_epochs", "clustering_epochs", "input_size",
        "projection_units", "k_neighbours", "num_heads", "prototypes_per_cluster", "small_view_size",
    ]  # fmt: skip
    for name in positive:
        if getattr(settings, name) <= 0:
            raise UsageError(f"--{name}={getattr(settings, name)}: must be at least 1")
    for name in [
        "max_images", "holdout_images", "self_label_epochs", "sheet_images", "learning_rate_decay_steps", "view_size",
        "warmup_epochs", "representation_dim", "prediction_neighbours", "feature_views", "small_views",
    ]:  # fmt: skip
        if getattr(settings, name) < 0:
            raise UsageError(f"--{name}={getattr(settings, name)}: must be 0 (none or all) or positive")
    if settings.checkpoint_seconds < 0:
        raise UsageError(f"--checkpoint_seconds={settings.checkpoint_seconds}: must be 0 (save every epoch) or more")
    for name in ["temperature", "representation_learning_rate", "clustering_learning_rate", "self_label_learning_rate"]:
        if not getattr(settings, name) > 0:
            raise UsageError(f"--{name}={getattr(settings, name)}: must be greater than 0")


def check_fractions(settings):
    """The settings that are shares, rates and counts with a floor of their own."""
    if settings.num_clusters < 2 and settings.num_clusters != 0:
        raise UsageError(
            f"--num_clusters={settings.num_clusters}: clustering needs at least 2 clusters (0 chooses the number)"
        )
    if settings.num_augmentations < 2:
        raise UsageError(f"--num_augmentations={settings.num_augmentations}: contrastive learning needs >= 2 views")
    if not 0 <= settings.dropout_rate < 1:
        raise UsageError(f"--dropout_rate={settings.dropout_rate}: must be in [0, 1)")
    if not 0 < settings.self_label_threshold < 1:
        raise UsageError(f"--self_label_threshold={settings.self_label_threshold}: must be between 0 and 1")
    if not 0 <= settings.learning_rate_decay_alpha <= 1 or settings.weight_decay < 0:
        raise UsageError("--learning_rate_decay_alpha must be in [0, 1] and --weight_decay at least 0")
    if settings.entropy_loss_weight < 0:
        raise UsageError(f"--entropy_loss_weight={settings.entropy_loss_weight}: must be 0 or more")


def check_combinations(settings, defaults):
    """Settings that contradict each other, or that would do nothing with the others given (ACTS_ONLY_WITH)."""
    minimum_size = ENCODER_MINIMUM_SIZES[settings.encoder]
    for name, size in [("target_size", settings.target_size), ("view_size", settings.view_size or minimum_size)]:
        if size < minimum_size:
            raise UsageError(
                f"--{name}={size}: the {settings.encoder} encoder needs images of at least {minimum_size}x{minimum_size}"
            )
    if settings.warmup_epochs >= settings.representation_epochs:
        raise UsageError(
            f"--warmup_epochs={settings.warmup_epochs}: must be fewer than --representation_epochs="
            f"{settings.representation_epochs}; lower --warmup_epochs"
        )
    if settings.pretext_loss == "vicreg" and settings.representation_batch_size < 2:
        raise UsageError(
            "--pretext_loss=vicreg takes its variances over the batch: use --representation_batch_size=2 or more"
        )
    if settings.eval_data and settings.holdout_images:
        raise UsageError(
            f"--eval_data={settings.eval_data} and --holdout_images={settings.holdout_images} both choose the images "
            "evaluated: give one of them (--eval_data: other images; --holdout_images: images held out of --data)"
        )
    if settings.sort_copies and not settings.sort_into:
        raise UsageError(
            "--sort_copies=true copies the images into --sort_into; name that folder, e.g. --sort_into=sorted"
        )
    for name, (other, values) in ACTS_ONLY_WITH.items():
        value, default = getattr(settings, name), defaults[name.upper()]
        if value != default and getattr(settings, other) not in values:
            raise UsageError(
                f"--{name}={value} does nothing with --{other}={getattr(settings, other)} (only with "
                f"{' or '.join(values)}); set --{name}={default} or --{other}={values[0]}"
            )
    check_small_views(settings, defaults, minimum_size)


def check_small_views(settings, defaults, minimum_size):
    """SMALL_VIEW_SIZE acts only with SMALL_VIEWS, and a small view is smaller than a full one, and large enough for
    the encoder."""
    if not settings.small_views:
        if settings.small_view_size != defaults["SMALL_VIEW_SIZE"]:
            raise UsageError(
                f"--small_view_size={settings.small_view_size} does nothing with --small_views=0; set "
                f"--small_view_size={defaults['SMALL_VIEW_SIZE']} or --small_views=2"
            )
        return
    full_size = settings.view_size or settings.target_size
    if not minimum_size <= settings.small_view_size < full_size:
        raise UsageError(
            f"--small_view_size={settings.small_view_size}: must be at least {minimum_size} (the {settings.encoder} "
            f"encoder's smallest input) and smaller than the full views' side, {full_size} (VIEW_SIZE or TARGET_SIZE)"
        )


def validate_against_data(settings, num_images, num_devices=1):
    """Rejects settings that the training images (and data parallelism over `num_devices`) cannot satisfy."""
    for name in BATCH_SIZES:
        if num_images < getattr(settings, name) and num_images % num_devices:  # every step would take all the images
            raise UsageError(
                f"--{name}={getattr(settings, name)} is more than the {num_images} images to train on, and those do "
                f"not split over {num_devices} devices; use --{name}={num_images // num_devices * num_devices}"
            )
    check_divisible("embedding_batch_size", settings.embedding_batch_size, num_devices)
    if settings.k_neighbours >= num_images:
        raise UsageError(
            f"--k_neighbours={settings.k_neighbours} needs more than {settings.k_neighbours} images, "
            f"but the data has {num_images} to train on; lower --k_neighbours or add images"
        )
    if settings.num_clusters > num_images:
        raise UsageError(
            f"--num_clusters={settings.num_clusters} is more than the {num_images} images to train on; "
            "lower --num_clusters"
        )


def check_output_dir(path):
    """Checks that `path` is, or can become, a writable folder, without creating anything."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output_dir={path}: {existing} is a file, not a folder; choose another --output_dir")
    try:
        with open(os.path.join(existing, f".write-test-{os.getpid()}"), "wb"):
            pass
        os.remove(os.path.join(existing, f".write-test-{os.getpid()}"))
    except OSError as error:
        raise UsageError(
            f"--output_dir={path}: cannot write in {existing} ({error.strerror}); choose another --output_dir"
        ) from None


def check_divisible(name, value, num_devices):
    """Rejects a global batch that does not split evenly over the devices, naming the nearest sizes that do."""
    if value % num_devices:
        lower, upper = value // num_devices * num_devices, (value // num_devices + 1) * num_devices
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise UsageError(
            f"--{name}={value}: data-parallel over {num_devices} devices needs a multiple of {num_devices}; use {nearest}"
        )
