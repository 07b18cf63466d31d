"""Several machines: ``--strategy multiworker`` with two worker processes on 127.0.0.1.

Each test starts real ``python cli.py train`` processes with their own TF_CONFIG, as a user would on
two hosts, and compares the chief's model with a single-process MirroredStrategy run that has the
same global batch (2 replicas x 8 images) and seed. Both engines all-reduce the same two gradients
per step, so the weights agree (measured: identical, max |difference| 0.0, on this CPU); the
asserted tolerance, 1e-5, leaves room for a machine that adds the two partial gradients in another
order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
FLAGS = ["--model", "tiny", "--batch-size", "8", "--seed", "3", "--patience", "0",
         "--lr-patience", "0"]
TOLERANCE = 1e-5

MIRRORED = textwrap.dedent("""
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.argv = ["cli.py"] + sys.argv[1:]
    import cli
    sys.exit(cli.main())
""")


def _free_ports(n: int) -> list:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start_workers(data: Path, out: Path, epochs: int, scratch: Path, extra=()) -> list:
    """Two `cli.py train --strategy multiworker` processes, worker 0 (the chief) and worker 1.
    Worker 1's temporary folder is ``scratch`` (to check it leaves nothing behind)."""
    hosts = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        env = {**ENV, "TF_CONFIG": json.dumps(tf_config), "TMPDIR": str(scratch / str(index))}
        (scratch / str(index)).mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "cli.py"), "train", "--data", str(data), "--out", str(out),
             "--epochs", str(epochs), "--strategy", "multiworker", *FLAGS, *extra],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs: list, timeout: float = 300) -> list:
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _weights(run: Path) -> list:
    return keras.models.load_model(run / "model.keras").get_weights()


def _max_difference(a: list, b: list) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def mirrored_run(tiny_prepared, tmp_path_factory):
    """The single-process reference: MirroredStrategy on two logical CPUs, 2 x 8 images, 4 epochs."""
    out = tmp_path_factory.mktemp("mirrored") / "run"
    script = out.parent / "mirrored.py"
    script.write_text(MIRRORED)
    res = subprocess.run([sys.executable, str(script), "train", "--data", str(tiny_prepared),
                          "--out", str(out), "--epochs", "4", "--strategy", "mirrored", *FLAGS],
                         env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["replicas"] == 2
    return out


@pytest.mark.slow
def test_two_workers_train_like_one_mirrored_process(tiny_prepared, mirrored_run, tmp_path):
    """Both workers finish; only the chief writes --out; its weights equal the mirrored run's."""
    out = tmp_path / "run"
    outs = _finish(_start_workers(tiny_prepared, out, 4, tmp_path / "tmp"))
    assert "run folder" in outs[0] and "the chief writes the run folder" in outs[1]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["workers"], cfg["replicas"], cfg["global_batch_size"]) == (2, 2, 16)
    assert cfg["strategy_class"] == "CollectiveAllReduceStrategy"   # MultiWorkerMirrored's class
    log = (out / "train.log").read_text()
    assert log.count("starting tiny finetune") == 1          # one writer
    assert not any((tmp_path / "tmp" / "1").iterdir())        # worker 1's scratch is gone
    assert _max_difference(_weights(out), _weights(mirrored_run)) <= TOLERANCE
    ours = [r.split(",")[1] for r in (out / "history.csv").read_text().splitlines()[1:]]
    theirs = [r.split(",")[1] for r in (mirrored_run / "history.csv").read_text().splitlines()[1:]]
    np.testing.assert_allclose(np.float64(ours), np.float64(theirs), rtol=1e-5)


@pytest.mark.slow
def test_a_dead_worker_then_resume_on_both(tiny_prepared, mirrored_run, tmp_path):
    """Worker 1 is killed after the chief checkpointed epoch 2; the chief, now waiting on a dead
    peer, is killed too; both restart with --resume and finish with the weights of the run that
    was never interrupted (the mirrored reference)."""
    out = tmp_path / "run"
    procs = _start_workers(tiny_prepared, out, 4, tmp_path / "tmp")
    state = out / "checkpoints" / "classifier" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if json.loads(state.read_text())["epochs_done"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert all(p.poll() is None for p in procs), "a worker ended before the kill"
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    time.sleep(1.0)
    procs[0].send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()
    done = json.loads(state.read_text())["epochs_done"]
    assert 2 <= done < 4, done                               # killed mid-run, not after it
    _finish(_start_workers(tiny_prepared, out, 4, tmp_path / "tmp", ["--resume"]))
    assert "resuming after epoch" in (out / "train.log").read_text()
    assert _max_difference(_weights(out), _weights(mirrored_run)) <= TOLERANCE


def test_worker_roles_from_tf_config(monkeypatch):
    """The chief is the "chief" task, else worker 0; a bad or missing TF_CONFIG is one TrainError."""
    from cervical import train

    def role(spec):
        monkeypatch.setenv("TF_CONFIG", json.dumps(spec) if not isinstance(spec, str) else spec)
        return train.worker_role("multiworker")

    hosts = ["a:1", "b:1", "c:1"]
    assert role({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": 0}}) == \
        train.WorkerRole(True, 0, 3)
    assert role({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": 2}}) == \
        train.WorkerRole(False, 2, 3)
    with_chief = {"chief": ["z:1"], "worker": hosts}
    assert role({"cluster": with_chief, "task": {"type": "chief", "index": 0}}) == \
        train.WorkerRole(True, 0, 4)
    assert role({"cluster": with_chief, "task": {"type": "worker", "index": 0}}) == \
        train.WorkerRole(False, 1, 4)
    assert train.worker_role("mirrored") == train.WorkerRole(True, 0, 1)
    for bad in ("", "not json", {"cluster": {"worker": hosts}},
                {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": 3}},
                {"cluster": {"worker": hosts}, "task": {"type": "ps", "index": 0}}):
        with pytest.raises(train.TrainError, match="TF_CONFIG"):
            role(bad)
