"""Every `hhdata` command's --help ends with an `Example:` line, and the example parses."""

from __future__ import annotations

import argparse
import shlex

import pytest

from hhdata.cli import build_parser, main


def verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-commands of a parser, by name."""
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


VERBS = sorted(verbs(build_parser()))


def test_the_walk_finds_every_command():
    assert set(VERBS) >= {"validate", "build", "dedup", "publish", "train"}


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    return capsys.readouterr().out


def example_of(text: str) -> str:
    """The command of the help's last paragraph, which must be `Example: hhdata ...`."""
    last = text.strip().split("\n\n")[-1]
    assert last.startswith("Example: hhdata "), text[-400:]
    return " ".join(last.removeprefix("Example: ").split())


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_help_ends_with_an_example_that_parses(verb, capsys):
    argv = [verb] if verb else []
    example = example_of(help_text([*argv, "--help"], capsys))
    words = shlex.split(example)[1:]
    if verb:
        assert words[0] == verb, example
    parsed = build_parser().parse_args(words)  # a flag the command lacks exits 2 here
    assert parsed.command == words[0]


def test_train_lists_each_trainer_on_one_line(capsys):
    text = help_text(["train", "--help"], capsys)
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("    ")}
    assert set(lines) == {"reward-model", "sft", "ppo", "dpo", "best-of-n", "evaluate", "online"}
    assert all(len(line.split()) > 3 for line in lines.values()), lines  # name, then its help
    assert "pip install 'hhdata[train]'" in " ".join(text.split())
