"""SIGKILL at random moments (a few of benchmarks/faults.py's campaign, seeded): nothing is lost.

train: killed and resumed, the run ends with the uninterrupted run's history and weights, byte for
byte, and no kill leaves a file that fails to load. eval: killed, its folder is the previous
complete one or absent, and the plain rerun succeeds. The longer campaign (every subcommand,
12+ kills of train) is ``python benchmarks/faults.py``.
"""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faults  # noqa: E402


@pytest.mark.slow
def test_train_and_eval_survive_sigkill(tmp_path):
    rng = random.Random(7)
    prepared = tmp_path / "prepared"
    assert faults.cli("prepare", "--out", prepared, "--per-class", 24, "--size", 32,
                      "--augment", 0, "--no-images").returncode == 0
    t = faults.train_campaign(prepared, tmp_path, kills=3, rng=rng, epochs=3)
    assert t["tried"] == 3 and t["survived"] == 3, t["problems"]
    e = faults.folder_campaign("eval", ["eval", "--run", tmp_path / "train_ref_finetune",
                                        "--n-boot", 3000, "--overwrite"],
                               tmp_path / "train_ref_finetune" / "eval" / "test", "metrics.json",
                               kills=1, rng=rng)
    assert e["survived"] == e["tried"], e["problems"]
