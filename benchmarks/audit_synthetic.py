"""The audit on the full-size synthetic SIPaKMeD (4049 cells, 966 cluster images, the study's
file names), hard setting: how much accuracy the study's protocol adds on data where it can.

    python benchmarks/audit_synthetic.py [--model tiny] [--size 110] [--seeds 3] [--epochs 20]
                                         [--out outputs/audit_synthetic]

Runs ``cli.py audit`` in-process (resumable: rerun the same command after an interruption) and
prints the Markdown table for the README. No augmentation (``--augment 0``) keeps it to about half
an hour per model on two CPU cores; the study used x7. The synthetic audit shows the mechanism, not
the size of the effect on real SIPaKMeD.
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--weights", default=None, help="e.g. none for a backbone trained from scratch")
    p.add_argument("--size", type=int, default=110)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--augment", type=int, default=0)
    p.add_argument("--out", default="outputs/audit_synthetic")
    args = p.parse_args(argv)

    from cervical import audit

    t0 = time.time()
    result = audit.run_audit(audit.AuditConfig(
        model=args.model, weights=args.weights, size=args.size, seeds=args.seeds,
        epochs=args.epochs, augment=args.augment, out=args.out, synthetic="hard"),
        say=lambda line: print(line, file=sys.stderr, flush=True))
    pct = lambda s: ("n/a" if s["mean"] is None else f"{100 * s['mean']:.1f}"
                     + ("" if s["low"] is None else f" [{100 * s['low']:.1f}, {100 * s['high']:.1f}]"))
    pr, d, sv = result["protocols"], result["difference_study_minus_corrected"], \
        result["study_shared_vs_unshared"]
    print(f"| {args.model} {args.size} px, {args.seeds} seeds | {pct(pr['study']['accuracy'])} | "
          f"{pct(pr['corrected']['accuracy'])} | {pct(d['accuracy'])} | {pct(sv['shared'])} | "
          f"{pct(sv['unshared'])} | {pct(sv['difference'])} |")
    print(f"({time.time() - t0:.0f} s; details in {args.out}/audit.md)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
