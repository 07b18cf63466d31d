"""The command line as an installed command: ``cervical``, ``python -m cervical``, --version."""

import subprocess
import sys

import cervical


def test_python_m_cervical_prints_the_version_from_any_folder(tmp_path):
    """Run outside the checkout: the installed package (not the working directory) answers."""
    out = subprocess.run([sys.executable, "-m", "cervical", "--version"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert out.stdout.strip() == f"cervical {cervical.__version__}"


def test_docs_cli_md_is_the_parsers_help():
    """docs/cli.md is generated from the parsers; a flag added or changed without regenerating it
    fails here (regenerate: python -c "import cli; print(cli.reference(), end='')" > docs/cli.md)."""
    from pathlib import Path

    import cli

    root = Path(__file__).resolve().parents[1]
    assert (root / "docs" / "cli.md").read_text() == cli.reference()


def test_progress_lines_carry_elapsed_time_and_an_estimate(monkeypatch, capsys):
    """Half done after 10 s: about 10 s left; done: the line ends and the clock resets."""
    import cli

    clock = iter([100.0, 110.0, 120.0])
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    cli._progress("step", 0, 4)
    cli._progress("step", 2, 4)
    cli._progress("step", 4, 4)
    err = capsys.readouterr().err
    assert "step: 2/4, elapsed 10 s, about 10 s left" in err
    assert "step: 4/4, elapsed 20 s" in err and err.endswith("\n")
    assert "step" not in cli._STARTED
    assert (cli._duration(185), cli._duration(3720)) == ("3 min 5 s", "1 h 02 min")
