"""The maths modules as lesson material: each one works copied alone into an empty folder.

``cams.py``, ``lime_lite.py``, ``losses.py`` and ``metrics.py`` are meant to be lifted into a course
next to a notebook. For each, the test copies the file alone into a temporary folder and runs its
docstring examples (known answers derived by hand in the docstrings) with ``doctest`` in a fresh
Python in which ``import cervical`` fails, so a hidden dependency on the package would show.
"""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cervical"
RUNNER = textwrap.dedent("""
    import doctest, importlib, sys
    sys.modules["cervical"] = None          # any import of the package raises ImportError
    module = importlib.import_module(sys.argv[1])
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    print(f"attempted={result.attempted} failed={result.failed}")
    sys.exit(1 if result.failed or not result.attempted else 0)
""")


@pytest.mark.parametrize("name", ["cams", "lime_lite", "losses", "metrics"])
def test_module_runs_alone_with_its_docstring_examples(name, tmp_path):
    shutil.copy(PACKAGE / f"{name}.py", tmp_path / f"{name}.py")
    (tmp_path / "run_doctest.py").write_text(RUNNER)
    out = subprocess.run([sys.executable, "run_doctest.py", name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3",
                              "MPLBACKEND": "Agg", "HOME": str(tmp_path)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "failed=0" in out.stdout and "attempted=0" not in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == [
        f"{name}.py", "run_doctest.py"]
