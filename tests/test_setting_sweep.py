"""Every setting, swept with the values a user might type: each run either starts normally or stops with one
UsageError line (exit status 2 in the script), never a traceback."""

import keras

import scan_cifar10 as script
from conftest import make_image_folder
from scan.settings import UsageError, read_settings_block

TYPED_VALUES = ["-1", "0", "1000000000000", "nan", "inf", "-inf", "", "abc", "2.5", "true"]


class Started(Exception):
    """Raised where the script, every check passed, starts preprocessing: a normal start."""


def test_every_setting_with_every_typed_value_starts_normally_or_fails_with_one_line(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "images", per_class=4)

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(script, "create_data_preprocessing", started)
    monkeypatch.chdir(tmp_path)
    names = list(read_settings_block(open(script.__file__).read()))
    outcomes = {}
    for name in names:
        for value in TYPED_VALUES:
            base = [f"--data={folder}", f"--output_dir={tmp_path / 'out'}", "--num_clusters=3", "--k_neighbours=2"]
            argv = [*base, f"--{name.lower()}={value}"]
            try:
                script.main(argv)
            except Started:
                outcomes[name, value] = "start"
            except UsageError as error:
                message = str(error)
                assert message and "\n" not in message, (name, value, message)
                outcomes[name, value] = "error"
            finally:
                keras.mixed_precision.set_global_policy("float32")
    # Each setting refuses a word where it takes a number, and every number setting refuses nan.
    for name in names:
        default = getattr(script, name)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert outcomes[name, "abc"] == outcomes[name, "nan"] == "error", name
    assert outcomes["SEED", "-1"] == outcomes["SEED", "1000000000000"] == "error"
    assert outcomes["REPRESENTATION_EPOCHS", "1000000000000"] == "start"  # long, but it can run
    assert outcomes["OUTPUT_DIR", ""] == outcomes["INPUT_SIZE", "1000000000000"] == "error"
    assert len(outcomes) == len(names) * len(TYPED_VALUES)
