"""The suite fails when a test file is skipped wholesale although TensorFlow is installed."""

import shutil
import subprocess
import sys
from pathlib import Path


def test_wholesale_skip_fails_the_run(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_fine.py").write_text("def test_ok():\n    assert True\n")
    (tmp_path / "test_hidden.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_xyz')\n\n"
        "def test_never_runs():\n    assert False\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 1, out.stdout[-2000:]
    assert "skipped wholesale" in out.stdout and "test_hidden.py" in out.stdout
    (tmp_path / "test_hidden.py").unlink()
    ok = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stdout[-2000:]
