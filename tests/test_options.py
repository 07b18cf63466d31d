"""cervical.options: one declaration per option gives the flag, its parsing and its validation."""

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

import pytest

from cervical import options as O


@dataclasses.dataclass
class Toy:
    path: str = O.option(help="a required path")
    size: int = O.option(8, "side in px", kind=int, low=8, high=64)
    rate: Optional[float] = O.option(None, "a rate", kind=float, low=0.0, low_open=True,
                                     show_default=False)
    mode: str = O.option("a", "a mode", choices=("a", "b"), accept=("legacy",), group="modes")
    fast: bool = O.option(False, "go fast", kind=bool)
    safe: bool = O.option(True, "skip the checks", kind=bool, flag="--unsafe")
    hidden: int = O.option(0, "not a flag", kind=int, cli=False)


class ToyError(ValueError):
    pass


def _parser():
    p = argparse.ArgumentParser(exit_on_error=False)
    O.add_arguments(p, Toy)
    return p


def test_flags_defaults_and_switches_come_from_the_fields():
    p = _parser()
    ns = p.parse_args(["--path", "x"])
    assert vars(ns) == {"path": "x", "size": 8, "rate": None, "mode": "a", "fast": False,
                        "safe": True}
    ns = p.parse_args(["--path", "x", "--size", "64", "--rate", "0.5", "--mode", "b", "--fast",
                       "--unsafe"])
    assert (ns.size, ns.rate, ns.mode, ns.fast, ns.safe) == (64, 0.5, "b", True, False)
    assert Toy(**vars(ns)).hidden == 0
    groups = [g.title for g in p._action_groups]
    assert "modes" in groups
    help_text = p.format_help()
    assert "side in px (default: 8)" in help_text and "a rate (default" not in help_text


@pytest.mark.parametrize("argv, message", [
    (["--size", "7"], "must be >= 8 and <= 64, got 7"),
    (["--size", "65"], "must be >= 8 and <= 64, got 65"),
    (["--size", "x"], "expected an integer, got 'x'"),
    (["--rate", "0"], "must be a finite number > 0, got 0"),
    (["--rate", "nan"], "must be a finite number > 0, got nan"),
])
def test_range_errors_name_the_bound(argv, message, capsys):
    with pytest.raises(SystemExit):
        argparse_exit(["--path", "x"] + argv)
    assert message in capsys.readouterr().err


def argparse_exit(argv):
    p = argparse.ArgumentParser()
    O.add_arguments(p, Toy)
    p.parse_args(argv)


def test_check_validates_library_calls_with_the_same_metadata():
    O.check(Toy(path="x"), ToyError)                       # defaults pass, None rate included
    O.check(Toy(path="x", mode="legacy"), ToyError)        # accepted, though not a flag choice
    for bad, message in ((dict(size=100), "--size 100: must be >= 8 and <= 64"),
                         (dict(size=8.5), "--size 8.5: must be an integer"),
                         (dict(rate=-1.0), "--rate -1.0: must be a finite number > 0"),
                         (dict(mode="c"), "--mode 'c': unknown; choose one of a, b")):
        with pytest.raises(ToyError, match=message):
            O.check(Toy(path="x", **bad), ToyError)


def test_cli_train_has_one_flag_per_train_config_field():
    """Adding a TrainConfig field adds its flag: the train parser is built from the class."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cli

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["train"]
    dests = {a.dest for a in sub._actions} - {"help", "quiet"}
    fields = {f.name for f in dataclasses.fields(O.TrainConfig) if f.metadata.get("cli")}
    assert dests == fields


def test_cli_audit_has_one_flag_per_audit_config_field_and_choices_match():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cli
    from cervical import synthetic

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["audit"]
    dests = {a.dest for a in sub._actions} - {"help", "quick", "quiet"}
    assert dests == {f.name for f in dataclasses.fields(O.AuditConfig)}
    assert O.SYNTHETIC_CHOICES == tuple(synthetic.DIFFICULTIES)
