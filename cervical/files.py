"""Everything the tool writes to disk, written one way: atomically, with the versions that made it.

Every output file (dataset.json, config.json, history.csv, metrics.json, figures, maps) is first
written to a hidden temporary file in the same folder and then renamed over its final name, so a
killed process leaves either the previous complete file or none, never half a file.

Also here, because every run folder records them: the library versions of the process
(``library_versions``), the versions the project was tested with (``tested_versions``, read from
``constraints.txt`` beside this module) and the git commit of the code (``git_commit``); and the
one progress convention of the library: long loops call ``progress(step, done, total)``, and only
the command line turns those calls into text.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["Progress", "report_progress", "OutputError", "atomic_dir", "swap_in", "check_output_dir",
           "output_lock",
           "read_run_config", "RUN_CONFIG_TYPES",
           "write_bytes", "write_text", "write_json", "to_json",
           "write_csv", "save_figure", "save_png", "save_npz", "RESULT_LIBRARIES",
           "CONSTRAINTS_FILE", "library_versions", "tested_versions", "untested_versions",
           "git_commit"]

#: ``progress(step, done, total)``: called by long loops; ``step`` names what is being counted.
Progress = Callable[[str, int, int], None]


def report_progress(progress: Optional[Progress], step: str, done: int, total: int) -> None:
    """Call ``progress`` when there is one (the library's loops never print themselves)."""
    if progress is not None:
        progress(step, int(done), int(total))


class OutputError(ValueError):
    """An output folder that cannot be used (held by another process, or not ours); one line."""


# ------------------------------------------------------------------------------------------------
# Whole output folders: built aside and swapped in, one writer at a time
# ------------------------------------------------------------------------------------------------

def check_output_dir(final: Union[str, os.PathLike], marker: str, flag: str = "--out",
                     replace: bool = True) -> None:
    """Refuse, before any work, an output folder that holds something other than this step's
    output (a folder without ``marker``), or a file in its place (see ``atomic_dir``); with
    ``replace`` False, also an earlier output of this step (the command line's default: nothing
    is replaced without --overwrite)."""
    final = Path(final)
    if final.exists() and (not final.is_dir() or (any(final.iterdir())
                                                   and not (final / marker).is_file())):
        raise OutputError(f"{flag} {final}: exists and holds something other than this step's "
                          f"output (no {marker}); choose another folder or empty it")
    if not replace and (final / marker).is_file():
        raise OutputError(f"{flag} {final}: holds an earlier output of this step; pass "
                          f"--overwrite to replace it, or choose another folder")


def swap_in(stage: Path, final: Path) -> None:
    """Put the complete folder ``stage`` at ``final`` by renames only, replacing an older ``final``:
    a kill leaves at ``final`` the old folder, the new one, or (between the two renames) none,
    never a mixture; the old one then waits in a hidden ``.<name>.old-<pid>`` folder."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(stage, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(stage, final)


@contextlib.contextmanager
def atomic_dir(final: Union[str, os.PathLike], marker: str, flag: str = "--out"):
    """Build an output folder beside ``final`` and swap it in when the block succeeds.

    A killed or failed step leaves the previous complete folder (or none), never half of one: the
    new folder is written to a hidden ``.<name>.partial-*`` sibling and renamed into place at the
    end. An existing ``final`` is replaced only when it holds ``marker``, the file this step
    writes (so a folder of the user's is never deleted).

    Args:
        final: the output folder.
        marker: a file every complete output of this step holds (e.g. "metrics.json").
        flag: the command-line flag that named the folder, for the error message.
    Yields:
        the staging folder to write into.
    Raises:
        OutputError: ``final`` exists, is not empty and is not this step's output.
    """
    final = Path(final)
    check_output_dir(final, marker, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (".partial-*", ".old-*"):                     # left by a killed run
        for stale in final.parent.glob(f".{final.name}{pattern}"):
            shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield stage
        swap_in(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextlib.contextmanager
def output_lock(folder: Union[str, os.PathLike], flag: str = "--out"):
    """Hold ``.<name>.lock`` beside ``folder`` while a step writes it: a second process aiming at
    the same folder is refused with one line. A lock left by a killed process (its PID no longer
    runs on this host) is taken over, so a crash never blocks the folder for good.

    Raises:
        OutputError: another live process holds the folder.
    """
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{flag} {folder}: cannot create its parent folder "
                          f"({exc.strerror or type(exc).__name__}); choose a writable folder") from None
    lock = folder.with_name(f".{folder.name}.lock")
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid, host = lock.read_text().split()[:2]
                stale = host == socket.gethostname() and not _alive(int(pid))
            except (OSError, ValueError):
                stale = True                      # unreadable: a lock killed while being written
            if not stale:
                raise OutputError(f"{flag} {folder}: another process ({pid} on {host}) is writing "
                                  f"it; wait for it to finish or choose another folder") from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        break
    else:
        raise OutputError(f"{flag} {folder}: its lock {lock} could not be taken; remove it if no "
                          f"other process is writing the folder")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike], keep_suffix: bool = False):
    """The one atomic write: yield a hidden temporary name beside ``path`` (unique to this
    process, so two processes never share one), rename it onto ``path`` when the block succeeds,
    delete it when the block fails. ``keep_suffix`` keeps ``path``'s suffix at the end of the
    temporary name (Keras insists on ".keras")."""
    path = Path(path)
    tmp = (path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}") if keep_suffix
           else path.with_name(f".{path.name}.tmp{os.getpid()}"))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Union[str, os.PathLike], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Union[str, os.PathLike], text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes(path, text.encode("utf-8"))


def to_json(obj) -> str:
    """Strict JSON text (indent 2, trailing newline): NumPy scalars and arrays become numbers and
    lists, paths strings, and NaN/inf become null (JSON has no NaN)."""
    return json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n"


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) and k is not None else k:
                _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Union[str, os.PathLike], obj) -> Path:
    """Write ``obj`` as strict JSON (see ``to_json``), atomically."""
    return write_text(path, to_json(obj))


def write_csv(path: Union[str, os.PathLike], header: Sequence[str],
              rows: Iterable[Union[Sequence, Mapping]]) -> Path:
    """Write a CSV file atomically: a header row, then one row per sequence or mapping.

    Mappings are written by header name (missing keys give empty cells, extra keys are ignored);
    None becomes an empty cell; floats are written exactly (``repr``), so values read back equal.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        values = [r.get(h) for h in header] if isinstance(r, Mapping) else list(r)
        w.writerow(["" if v is None else repr(float(v)) if isinstance(v, (float, np.floating))
                    else v for v in values])
    return write_text(path, buf.getvalue())


def save_figure(fig, path: Union[str, os.PathLike], dpi: int = 120, tight: bool = True) -> Path:
    """Render a Matplotlib Figure (Agg, no display needed) to PNG atomically and free it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    fig.clf()
    return write_bytes(path, buf.getvalue())


def save_png(path: Union[str, os.PathLike], image: np.ndarray, compress_level: int = 6) -> Path:
    """Write a uint8 image (H, W) or (H, W, 3) as PNG atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG",
                                                            compress_level=compress_level)
    return write_bytes(path, buf.getvalue())


def save_npz(path: Union[str, os.PathLike], arrays: Mapping[str, np.ndarray],
             compressed: bool = True) -> Path:
    """Write named arrays to one .npz file atomically."""
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------
# Reading a run folder's config.json (written by train, read by every later step)
# ------------------------------------------------------------------------------------------------

#: The config.json keys later steps rely on, with the type each must have.
RUN_CONFIG_TYPES = {"class_names": list, "data_dir": str, "model": str, "regime": str,
                    "variant": str, "image_size": int, "feature_layer": str, "versions": dict,
                    "seed": int, "loss": str, "split_protocol": str, "heldout_signature": str}


class RowFile:
    """Equal-shaped rows appended to a plain binary file and read back one at a time.

    The rows live on disk (and in the operating system's file cache), not in the process: a
    step that passes over a dataset larger than memory holds one row, not the dataset.
    ``prepare`` keeps its decoded cells and their augmented copies in two of these.
    """

    def __init__(self, path: Union[str, os.PathLike], row_shape: Sequence[int], dtype=np.uint8):
        self.path = Path(path)
        self.row_shape = tuple(int(d) for d in row_shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple:
        return (self._n,) + self.row_shape

    def append(self, row: np.ndarray) -> int:
        """Write ``row`` after the last one; returns its index."""
        row = np.ascontiguousarray(row, dtype=self.dtype)
        if row.shape != self.row_shape:
            raise ValueError(f"{self.path.name}: a row of shape {row.shape}, expected "
                             f"{self.row_shape}")
        os.pwrite(self._fd, row.tobytes(), self._n * self.row_bytes)
        self._n += 1
        return self._n - 1

    def __getitem__(self, i) -> np.ndarray:
        i = int(i)
        if not -self._n <= i < self._n:
            raise IndexError(f"row {i} of {self._n}")
        data = os.pread(self._fd, self.row_bytes, (i % self._n) * self.row_bytes)
        return np.frombuffer(bytearray(data), dtype=self.dtype).reshape(self.row_shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


def save_npy_rows(path: Union[str, os.PathLike], rows, chunk: int = 256) -> Path:
    """Write ``rows`` (anything with ``shape``, ``dtype``, ``len`` and integer indexing: an array,
    a RowFile, a lazy view) as one ``.npy`` file atomically, ``chunk`` rows at a time; the bytes
    are those ``np.save`` writes for the same array, without the whole array in memory."""
    shape = tuple(int(d) for d in rows.shape)
    dtype = np.dtype(rows.dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": shape}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, shape[0], chunk):
            block = np.stack([np.asarray(rows[i], dtype=dtype)
                              for i in range(start, min(start + chunk, shape[0]))])
            f.write(np.ascontiguousarray(block).tobytes())
    return Path(path)


def read_run_config(run: Union[str, os.PathLike], required: bool = False) -> dict:
    """A run folder's config.json, checked: {} when absent (unless ``required``).

    Raises:
        OutputError: unreadable, not a JSON object, or a known key of the wrong type (one line
            naming the file and the key).
    """
    f = Path(run) / "config.json"
    if not f.is_file():
        if required:
            raise OutputError(f"{f}: missing; pass a run folder written by 'python cli.py train'")
        return {}
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"{f}: unreadable ({type(exc).__name__}); restore it from the run or "
                          f"retrain") from None
    if not isinstance(config, dict):
        raise OutputError(f"{f}: not a JSON object (a run's config.json); restore it or retrain")
    for key, kind in RUN_CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)
                                  or (key == "class_names"
                                      and not all(isinstance(c, str) for c in value))):
            raise OutputError(f"{f}: '{key}' should be {'a list of names' if kind is list else 'a ' + kind.__name__}, "
                              f"not {type(value).__name__}; restore the file or retrain")
    return config


# ------------------------------------------------------------------------------------------------
# Provenance: versions and code
# ------------------------------------------------------------------------------------------------

#: Libraries whose versions can change a result (recorded in every dataset.json and config.json).
RESULT_LIBRARIES = ("numpy", "scipy", "scikit-learn", "scikit-image", "pillow", "tensorflow",
                    "keras", "matplotlib")

#: The versions the test suite and the README's figures were measured with (pip constraints file).
CONSTRAINTS_FILE = Path(__file__).with_name("constraints.txt")


def library_versions() -> Dict[str, str]:
    """Versions of Python and the libraries that shape results (without importing TensorFlow)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version(), "cervical": __import__("cervical").__version__}
    for pkg in RESULT_LIBRARIES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _canonical(name: str) -> str:
    """PEP 503 project-name normalisation: 'Scikit_Learn' -> 'scikit-learn'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def tested_versions(path: Union[str, os.PathLike] = CONSTRAINTS_FILE) -> Dict[str, str]:
    """{library: version} of the tested release set, read from the pip constraints file.

    Lines ``name==version`` give the libraries; the header line ``# tested-python: 3.11`` gives
    "python" (major.minor). Returns {} when the file is missing (e.g. a stripped install).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    out: Dict[str, str] = {}
    for line in lines:
        line = line.strip()
        if line.startswith("# tested-python:"):
            out["python"] = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            out[_canonical(name)] = version.split(";")[0].strip()
    return out


def untested_versions(versions: Optional[Mapping[str, str]],
                      tested: Optional[Mapping[str, str]] = None) -> List[str]:
    """Which of a run's library versions differ from the tested ones, as readable strings.

    Python is compared on major.minor, every other library of ``RESULT_LIBRARIES`` exactly.

    Args:
        versions: {library: version} as recorded by :func:`library_versions` (None: nothing known).
        tested: the tested set (default: :func:`tested_versions`).
    Returns:
        e.g. ["keras 3.14.0 (tested 3.15.1)"]; [] when everything matches or nothing is known.
    """
    tested = tested_versions() if tested is None else tested
    if not versions or not tested:
        return []
    out = []
    for name in ("python",) + RESULT_LIBRARIES:
        have, want = versions.get(name), tested.get(name)
        if have is None or want is None:
            continue
        same = (have.split(".")[:2] == want.split(".")[:2]) if name == "python" else have == want
        if not same:
            out.append(f"{name} {have} (tested {want})")
    return out


def git_commit() -> Optional[str]:
    """HEAD commit of the repository holding this package, or None (not a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None
