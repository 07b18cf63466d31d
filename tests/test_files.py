"""cervical.files: atomic writes, whole-folder swaps, output locks, strict JSON, CSV round trips."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cervical import files


def test_to_json_is_strict_and_plain():
    text = files.to_json({"a": np.float32(0.5), "b": np.int64(3), "c": float("nan"),
                          "d": [np.inf, 1.0], "e": np.arange(2), "f": Path("x"), "g": np.bool_(1)})
    assert json.loads(text) == {"a": 0.5, "b": 3, "c": None, "d": [None, 1.0], "e": [0, 1],
                                "f": "x", "g": True}


def test_write_csv_round_trips_floats_exactly(tmp_path):
    x = 0.1 + 0.2
    files.write_csv(tmp_path / "t.csv", ["k", "v"], [{"k": "a", "v": x}, ["b", None]])
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines == ["k,v", f"a,{x!r}", "b,"] and float(lines[1].split(",")[1]) == x


def test_atomic_dir_keeps_the_previous_folder_on_failure(tmp_path):
    out = tmp_path / "eval"
    with files.atomic_dir(out, "metrics.json") as stage:
        (stage / "metrics.json").write_text("1")
    assert (out / "metrics.json").read_text() == "1"
    with pytest.raises(RuntimeError):
        with files.atomic_dir(out, "metrics.json") as stage:
            (stage / "metrics.json").write_text("2")
            raise RuntimeError("killed half-way")
    assert (out / "metrics.json").read_text() == "1"          # the previous complete output
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]   # no staging folder left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_text("precious")
    with pytest.raises(files.OutputError, match="metrics.json"):
        with files.atomic_dir(mine, "metrics.json"):
            pass
    assert (mine / "thesis.docx").read_text() == "precious"


def test_output_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path):
    out = tmp_path / "run"
    with files.output_lock(out):
        with pytest.raises(files.OutputError, match="another process"):
            with files.output_lock(out):
                pass
    assert not (tmp_path / ".run.lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / ".run.lock").write_text(f"{dead} {os.uname().nodename}")
    with files.output_lock(out):                              # a killed holder's lock is stale
        pass


KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cervical import files
    out = Path(sys.argv[1])
    with files.output_lock(out), files.atomic_dir(out, "metrics.json") as stage:
        (stage / "half.txt").write_text("x")
        print("writing", flush=True)
        time.sleep(60)
        (stage / "metrics.json").write_text("new")
""")


def test_sigkill_leaves_the_previous_output_and_no_stuck_lock(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / "metrics.json").read_text() == "old" and not (out / "half.txt").exists()
    with files.output_lock(out), files.atomic_dir(out, "metrics.json") as stage:  # rerun works
        (stage / "metrics.json").write_text("new")
    assert (out / "metrics.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "killed.py"]


def test_row_file_reads_back_what_was_appended(tmp_path):
    """Rows come back by index (negative too) exactly as written, writable copies, and a row of
    the wrong shape or an index past the end is refused."""
    rows = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3) * 7
    store = files.RowFile(tmp_path / "r.u8", (2, 3))
    assert [store.append(r) for r in rows] == [0, 1, 2, 3, 4]
    assert store.shape == (5, 2, 3) and len(store) == 5
    assert (tmp_path / "r.u8").stat().st_size == rows.nbytes
    for i in range(-5, 5):
        assert np.array_equal(store[i], rows[i])
    got = store[2]
    got[0, 0] = 255                                   # a copy: the file is unchanged
    assert np.array_equal(store[2], rows[2])
    with pytest.raises(ValueError, match=r"r\.u8: a row of shape \(3, 2\), expected \(2, 3\)"):
        store.append(rows[0].T)
    with pytest.raises(IndexError):
        store[5]
    store.close()


@pytest.mark.parametrize("n", [0, 1, 300, 513])
def test_save_npy_rows_writes_the_bytes_np_save_writes(tmp_path, n):
    """Chunked (256 rows) from a RowFile or an array, the file equals np.save's, header included."""
    rng = np.random.default_rng(n)
    x = rng.integers(0, 256, size=(n, 4, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "ref.npy", x)
    store = files.RowFile(tmp_path / "rows.u8", (4, 5, 3))
    for row in x:
        store.append(row)
    files.save_npy_rows(tmp_path / "a.npy", store)
    files.save_npy_rows(tmp_path / "b.npy", x)
    ref = (tmp_path / "ref.npy").read_bytes()
    assert (tmp_path / "a.npy").read_bytes() == ref and (tmp_path / "b.npy").read_bytes() == ref
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
