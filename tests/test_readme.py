"""README and docs against the script: the settings table is the constants block, and each command shown parses."""

import os
import re

import pytest

import scan_cifar10 as script
from conftest import REPO, SCRIPT
from scan.data import CIFAR10_SPLITS
from scan.settings import REPLACED_SETTINGS, parse_settings, read_settings_block, validate_settings

README = open(os.path.join(REPO, "README.md")).read()
COMMENTS = read_settings_block(open(SCRIPT).read())
DEFAULTS = {name: getattr(script, name) for name in COMMENTS}


def table_cell(value):
    return f'"{value}"' if isinstance(value, str) else repr(value)


def test_the_settings_table_is_the_constants_block():
    settings_page = open(os.path.join(REPO, "docs", "settings.md")).read()
    section = settings_page.split("\n## Settings\n", 1)[1]
    table = section[section.index("\n| `") + 1 :].split("\n\n", 1)[0].splitlines()
    rows = [re.fullmatch(r"\| `([A-Z_0-9]+)` \| `(.*?)` \| (.*) \|", line).groups() for line in table]
    assert rows == [(name, table_cell(default), COMMENTS[name]) for name, default in DEFAULTS.items()]


DOCS = [open(os.path.join(REPO, "docs", name)).read() for name in sorted(os.listdir(os.path.join(REPO, "docs")))
        if name.endswith(".md")]  # fmt: skip
COMMANDS = sorted(
    set(
        re.findall(
            r"(?:KERAS_BACKEND=\w+ )?python scan_cifar10\.py(?: --[a-z_0-9]+=[^\s`]*)*", "\n".join([README, *DOCS])
        )
    )
)


def test_the_renamed_settings_table_is_the_parsers():
    settings_page = open(os.path.join(REPO, "docs", "settings.md")).read()
    section = settings_page.split("\n## Renamed and removed settings\n", 1)[1]
    lines = section[section.index("\n| ") + 1 :].split("\n\n", 1)[0].splitlines()
    assert lines[:2] == ["| earlier versions | in this version | what to do |", "| --- | --- | --- |"]
    code = lambda text: re.sub(r"(--[a-z_]+(?:=[^\s)]+)?)", r"`\1`", text)  # noqa: E731  (each setting as code)
    expected = [f"| `{earlier}` | {code(what)} | {code(todo)} |" for earlier, (what, todo) in REPLACED_SETTINGS.items()]
    assert lines[2:] == expected, "\n".join(expected)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_in_readme_names_real_settings_and_valid_values(command):
    arguments = command.split("scan_cifar10.py")[1].split()
    settings = parse_settings(arguments, DEFAULTS, COMMENTS, script.RECIPES, tuple(CIFAR10_SPLITS))
    validate_settings(settings, DEFAULTS)


def test_readme_is_a_front_page():
    assert len(README.encode()) <= 24_000  # the rest lives in docs/, linked from it
    for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.(?:md|jpg|png))\)", README):
        assert os.path.exists(os.path.join(REPO, link)), link


def test_readme_shows_the_commands_ci_runs():
    assert len(COMMANDS) >= 4 and "python scan_cifar10.py" in COMMANDS
    ci = open(os.path.join(REPO, ".ci", "run")).read().strip().splitlines()
    assert ci[-1] == "python -m pytest -q"
    assert "pip install -r requirements.txt && python -m pytest -q\n" in README


def test_the_recipes_table_is_the_recipes():
    recipes_page = open(os.path.join(REPO, "docs", "recipes.md")).read()
    header, _, *lines = recipes_page[recipes_page.index("| setting |") :].split("\n\n", 1)[0].splitlines()
    assert header == "| setting | " + " | ".join(script.RECIPES) + " |"
    table = {}
    for line in lines:
        name, *cells = re.fullmatch(r"\| `([A-Z_0-9]+)`((?: \| `.*?`)+) \|", line).group(1, 2)
        table[name] = re.findall(r"\| `(.*?)`", cells[0])
    # Every setting a recipe sets has a row; each row shows what every recipe sets, or the default.
    assert set(table) == {name.upper() for values in script.RECIPES.values() for name in values}
    for name, cells in table.items():
        expected = [table_cell(values.get(name.lower(), DEFAULTS[name])) for values in script.RECIPES.values()]
        assert cells == expected, name
