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
