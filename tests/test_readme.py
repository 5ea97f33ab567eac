"""The README's command table and the command line itself must agree, so the documentation cannot drift:
every option a command has is in its README row, every option in a row exists, and a number the README
shows for an optional flag is the flag's default."""

from __future__ import annotations

import re

import pytest
import typer.core
import typer.main
from helpers import REPO, crossdiff

from crossdiff.cli import SAMPLER_NAMES, app

README = (REPO / "README.md").read_text(encoding="utf-8")
ROW = re.compile(r"^\| `crossdiff (?P<usage>[^`]+)`(?P<rest>[^|]*)\|", re.MULTILINE)


def commands() -> dict[str, typer.core.TyperCommand]:
    """Every leaf command by its full name ('translate', 'study create')."""
    root = typer.main.get_command(app)
    found = {}
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        if isinstance(command, typer.core.TyperGroup):
            found |= {f"{name} {sub}": leaf for sub, leaf in command.commands.items()}
        else:
            found[name] = command
    return found


def readme_rows() -> dict[str, str]:
    rows = {}
    for match in ROW.finditer(README):
        usage = match["usage"] + match["rest"]
        words = match["usage"].split()
        name = " ".join(words[:2]) if words[0] == "study" else words[0]
        rows[name] = rows.get(name, "") + " " + usage  # a command may have several rows (translate: DICOM output)
    return rows


def options_of(command: typer.core.TyperCommand) -> dict[str, typer.core.TyperOption]:
    return {name: param for param in command.params if isinstance(param, typer.core.TyperOption) for name in param.opts
            if name.startswith("--") and name != "--help"}


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_and_option_is_in_the_readme_table(name: str) -> None:
    rows = readme_rows()
    assert name in rows, f"the README's command table has no row for `crossdiff {name}`"
    shown = set(re.findall(r"(--[a-z][a-z0-9-]*)", rows[name]))
    actual = options_of(commands()[name])
    assert shown - set(actual) == set(), f"README row of {name} names options the command does not have"
    assert set(actual) - shown == set(), f"README row of {name} lacks options"
    for option, value in re.findall(r"\[(--[a-z][a-z0-9-]*) (-?\d+(?:\.\d+)?)\]", rows[name]):
        default = actual[option].default
        assert float(value) == float(default), f"README shows {option} {value}, the default is {default}"


def test_flags_have_no_value_placeholder_and_required_options_are_marked() -> None:
    text = " ".join(crossdiff("train", "--help").stdout.split())
    assert "--resume <bool>" not in text and "--resume Continue" in text
    assert re.search(r"\* --out <path> Run folder", text)  # typer marks required options with '*'
    sampler_help = " ".join(crossdiff("translate", "--help").stdout.split())
    assert all(name in sampler_help for name in SAMPLER_NAMES)


def test_the_cli_sampler_names_are_the_registered_samplers() -> None:
    from crossdiff.diffusion.samplers import SAMPLERS

    assert SAMPLER_NAMES == tuple(SAMPLERS)
