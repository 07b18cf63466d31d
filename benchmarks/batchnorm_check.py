"""Does re-estimating BatchNorm statistics rescue a model trained with the study's procedure?

    python benchmarks/batchnorm_check.py [--model mobilenetv2] [--weights none] [--size 64]
                                         [--seeds 3] [--epochs 50] [--out outputs/bn_check]

Trains the audit's "study" arm (the study's split, preparation and procedure: its model variant,
the last epoch, Keras' moving BatchNorm averages, no PreciseBN) and its "ours" arm on the full-size
synthetic hard set, then scores every study run's test cells twice: as trained, and after the
BatchNorm statistics are re-estimated on 1024 training images under the final weights
(``fitting.PreciseBatchNorm``). Prints per run the accuracy before and after, the epochs run,
and the pooled paired difference with its 95 % cluster-bootstrap interval, beside the "ours"
arm's accuracy. Reuses the audit's folders, so it resumes after an interruption.
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2")
    p.add_argument("--weights", default="none")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--out", default="outputs/bn_check")
    args = p.parse_args(argv)

    import numpy as np

    from cervical import audit, data, metrics

    t0 = time.time()
    cfg = audit.AuditConfig(model=args.model, weights=args.weights, size=args.size,
                            seeds=args.seeds, epochs=args.epochs, augment=0, out=args.out,
                            n_boot=2000)
    out = Path(cfg.out)
    say = lambda line: print(f"[{time.time() - t0:6.0f} s] {line}", file=sys.stderr, flush=True)
    raw, study_split = audit._raw_data(cfg, out, say)
    cells = []
    print("| run | epochs | accuracy as trained | after BatchNorm re-estimate |")
    print("|---|---|---|---|")
    for name in ("study", "ours"):
        arm = audit.ARMS[name]
        for k in range(cfg.seeds):
            prepared = audit._prepare(cfg, raw, arm, k, study_split, out, say)
            run = audit._train(cfg, prepared, arm, k, out, say)
            record, rows = audit._evaluate(cfg, run, prepared, arm, k)
            cells += rows
            epochs = len((run / "history.csv").read_text().strip().splitlines()) - 1
            after = record.get("accuracy_bn_reestimated")
            print(f"| {name}_{k} | {epochs} | {100 * record['accuracy']:.1f} % | "
                  f"{'-' if after is None else f'{100 * after:.1f} %'} |")
    study = [c for c in cells if c["arm"] == "study"]
    diff = metrics.cluster_mean_ci([c["correct_bn"] - c["correct"] for c in study],
                                   [c["group"] for c in study], n=cfg.n_boot, seed=0)
    ours = np.mean([c["correct"] for c in cells if c["arm"] == "ours"])
    print(f"study arm, re-estimated - as trained: {100 * diff['estimate']:+.1f} "
          f"[{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}] points over {diff['n']} test "
          f"cells ({diff['n_groups']} cluster images, {cfg.seeds} runs); ours arm accuracy "
          f"{100 * ours:.1f} %; {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
