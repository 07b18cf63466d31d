"""Fault injection: SIGKILL every step at random moments and check that nothing is lost.

    python benchmarks/faults.py [--kills 12] [--seed 0] [--out outputs/faults]

For each subcommand the campaign starts the real command line in a subprocess, kills it with
SIGKILL after a seeded random delay, checks what it left, and starts it again (``train`` with
``--resume``, the others with the same arguments) until it completes:

* train: the finished run's history.csv and weights equal an uninterrupted run's, byte for byte
  (same seed, CPU), and after every kill each model.keras, checkpoint (.npz) and JSON present in
  the run folder loads;
* prepare, eval, explain, report: after every kill the output folder is absent, the previous
  complete output untouched, or (a kill after the swap) the new complete output; never a half
  folder. The plain rerun succeeds without --overwrite.

It prints one line per kill as it goes, then kills survived / kills tried per subcommand. tests/test_faults.py runs a few of these
kills in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "MPLBACKEND": "Agg"}


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


def say(message: str) -> None:
    """One progress line (the campaign runs for minutes)."""
    print(f"faults: {message}", file=sys.stderr, flush=True)


def killed_after(delay: float, *args) -> int:
    """Start the command line, SIGKILL it after ``delay`` seconds; its exit code (-9 if killed)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        return proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        return proc.wait()


def loadable(folder: Path) -> list:
    """Every JSON, NPZ and .keras file under ``folder`` that fails to load (hidden temps aside)."""
    bad = []
    for f in folder.rglob("*"):
        if f.name.startswith(".") or not f.is_file():
            continue
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".npz":
                with np.load(f) as z:
                    [z[k] for k in z.files]
            elif f.suffix == ".keras":
                with zipfile.ZipFile(f) as z:
                    if z.testzip() is not None:
                        raise ValueError("corrupt member")
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            bad.append(f"{f}: {type(exc).__name__}")
    return bad


def train_campaign(prepared: Path, work: Path, kills: int, rng: random.Random,
                   regime: str = "finetune", epochs: int = 4) -> dict:
    """Kill ``train`` ``kills`` times across a few runs; each must finish as the reference did."""
    args = ["train", "--data", prepared, "--model", "tiny", "--epochs", epochs, "--batch-size", 16,
            "--seed", 3, "--quiet", "--regime", regime]
    if regime == "contrastive":
        args += ["--contrastive-epochs", 3]
    ref = work / f"train_ref_{regime}"
    t0 = time.time()
    out = cli(*args, "--out", ref)
    assert out.returncode == 0, out.stderr[-2000:]
    duration = time.time() - t0
    tried = survived = 0
    problems = []
    run_i = 0
    while tried < kills:
        run = work / f"train_{regime}_{run_i}"
        run_i += 1
        for _ in range(3):                          # up to three kills per run, then finish it
            if tried >= kills:
                break
            resume = ["--resume"] if (run / "config.json").is_file() else []
            delay = rng.uniform(2.0, duration)
            code = killed_after(delay, *args, "--out", run, *resume)
            if code == 0:
                break                               # it finished before the kill
            tried += 1
            bad = loadable(run) if run.exists() else []
            problems += bad
            survived += not bad
            say(f"train {regime} kill {tried}/{kills} after {delay:.1f} s: "
                f"{'every file loads' if not bad else 'UNLOADABLE: ' + bad[0]}")
        while True:                                 # finish it
            resume = ["--resume"] if (run / "config.json").is_file() else []
            out = cli(*args, "--out", run, *resume)
            if out.returncode == 0 or "already complete" in out.stderr:
                break
            problems.append(f"{run}: rerun failed: {out.stderr.strip()[-300:]}")
            break
        same = ((run / "history.csv").read_bytes() == (ref / "history.csv").read_bytes()
                and _weights(run) == _weights(ref))
        if not same:
            problems.append(f"{run}: history or weights differ from the uninterrupted run")
            survived -= 1
    return {"tried": tried, "survived": survived, "problems": problems}


def _weights(run: Path) -> list:
    import keras

    model = keras.models.load_model(run / "model.keras")
    return [w.tobytes() for w in model.get_weights()]


def folder_campaign(name: str, args: list, out: Path, marker: str, kills: int,
                    rng: random.Random) -> dict:
    """Kill a folder-writing step ``kills`` times: each time the folder must be absent or the
    previous complete output, and the plain rerun must succeed."""
    t0 = time.time()
    first = cli(*args)
    assert first.returncode == 0, (name, first.stderr[-2000:])
    duration = time.time() - t0
    complete = _listing(out)                  # what a complete output holds
    tried = survived = 0
    problems = []
    for _ in range(kills):
        before = (out / marker).read_bytes() if (out / marker).is_file() else None
        delay = rng.uniform(1.0, duration)
        code = killed_after(delay, *args)
        if code == 0:
            say(f"{name}: finished before the kill at {delay:.1f} s (not counted)")
            continue
        tried += 1
        # Absent, the previous output untouched, or (a kill after the swap, e.g. during the
        # interpreter's exit) the new output whole: every file of a complete output, all loadable.
        ok = (not out.exists()) or (_listing(out) == complete and not loadable(out)
                                    and (before is None or (out / marker).read_bytes() == before
                                         or _is_newer(out / marker, before)))
        again = cli(*args)
        ok = ok and again.returncode == 0 and (out / marker).is_file()
        survived += ok
        say(f"{name} kill {tried} after {delay:.1f} s: {'survived' if ok else 'FAILED'}")
        if not ok:
            problems.append(f"{name}: after a kill: folder {'ok' if out.exists() else 'absent'}, "
                            f"rerun exit {again.returncode} {again.stderr.strip()[-200:]}")
    return {"tried": tried, "survived": survived, "problems": problems}


def _listing(folder: Path) -> set:
    """The relative paths of the files in ``folder`` (hidden ones aside)."""
    return {str(f.relative_to(folder)) for f in folder.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)}


def _is_newer(marker: Path, before: bytes) -> bool:
    """The marker is a complete JSON from the same run or a later one: its "created" stamp (top
    level, or in "meta" as eval writes it) is not older than the previous output's. Outputs whose
    content carries no time stamp (dataset.json, cells.json: a rerun writes the same bytes) pass
    on being complete JSON."""
    try:
        new, old = json.loads(marker.read_text()), json.loads(before)
    except ValueError:
        return False

    def stamp(doc):
        if not isinstance(doc, dict):
            return ""
        return str(doc.get("created") or (doc.get("meta") or {}).get("created") or "")

    return stamp(new) >= stamp(old)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=12, help="kills of train (others: a third)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.out or tempfile.mkdtemp(prefix="faults-"))
    work.mkdir(parents=True, exist_ok=True)
    prepared = work / "prepared"
    if not (prepared / "dataset.json").is_file():
        assert cli("prepare", "--out", prepared, "--per-class", 30, "--size", 32, "--augment", 1,
                   "--no-images").returncode == 0
    results = {"train finetune": train_campaign(prepared, work, (args.kills + 1) // 2, rng),
               "train contrastive": train_campaign(prepared, work, args.kills // 2, rng,
                                                   regime="contrastive")}
    other = max(1, args.kills // 3)
    results["prepare"] = folder_campaign(
        "prepare", ["prepare", "--out", work / "p2", "--per-class", 30, "--size", 32, "--augment", 2,
                    "--overwrite"], work / "p2", "dataset.json", other, rng)
    results["eval"] = folder_campaign(
        "eval", ["eval", "--run", work / "train_ref_finetune", "--n-boot", 2000, "--overwrite"],
        work / "train_ref_finetune" / "eval" / "test", "metrics.json", other, rng)
    results["explain"] = folder_campaign(
        "explain", ["explain", "--run", work / "train_ref_finetune", "--evaluate", "--n-eval", 8,
                    "--overwrite",
                    "--lime-samples", 200], work / "train_ref_finetune" / "explain" / "test", "cells.json",
        other, rng)
    results["report"] = folder_campaign(
        "report", ["report", "--runs", work / "train_ref_finetune", "--out", work / "report",
                   "--overwrite"],
        work / "report", "report.json", other, rng)
    for name, r in results.items():
        print(f"{name:8s} kills survived / tried: {r['survived']} / {r['tried']}")
        for problem in r["problems"]:
            print("   ", problem)
    (work / "faults.json").write_text(json.dumps(results, indent=1))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["survived"] == r["tried"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
