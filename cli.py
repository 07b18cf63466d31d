#!/usr/bin/env python
"""cervical command line: one subcommand per step of the study.

    python cli.py prepare  raw dataset -> prepared dataset folder (size analysis, resize, split, augment)
    python cli.py train    prepared dataset -> run folder (fine-tune, cost-sensitive, contrastive)
    python cli.py eval     run folder -> metrics, tables and figures on a split
    python cli.py explain  run folder -> CAM and LIME explanations (+ quantitative XAI evaluation)
    python cli.py report   several runs -> the study's tables and figures, with published results
    python cli.py demo     the whole study offline on the embedded synthetic dataset

This file only parses arguments and calls library functions. Bad input ends with one line on stderr
and exit code 2 (set CERVICAL_DEBUG=1 to see the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _progress(prefix: str):
    """A progress callback printing 'prefix: done/total' on one refreshed stderr line."""
    def report(done: int, total: int, note: str = "") -> None:
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{prefix}: {done}/{total} {note}".rstrip() + " " * 8 + end)
        sys.stderr.flush()
    return report


# ------------------------------------------------------------------------------------------------
# prepare
# ------------------------------------------------------------------------------------------------

def add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=["sipakmed", "herlev", "folders", "synthetic", "auto"],
                   default="synthetic",
                   help="raw dataset layout; 'auto' detects it from --data-dir (default: %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="raw dataset folder; for 'synthetic', where the generated raw files go "
                        "(default: inside --out/raw)")
    p.add_argument("--out", required=True, help="prepared dataset folder to write")
    p.add_argument("--task", default=None,
                   help="label task: sipakmed/synthetic 5class|3class|2class, herlev 7class|2class "
                        "(default: 5class, herlev 7class)")
    p.add_argument("--class-map", default=None, metavar="FILE.json",
                   help="JSON {folder class: task class}; overrides --task (default: none)")
    p.add_argument("--size", type=int, default=110, help="target side in pixels (default: %(default)s)")
    p.add_argument("--resize", choices=["pad", "stretch"], default="pad",
                   help="pad: keep aspect, pad to square with the border colour; stretch: the "
                        "study's (default: %(default)s)")
    p.add_argument("--interpolation", choices=["area", "bilinear", "nearest"], default="area",
                   help="resampling filter; 'nearest' matches the study (default: %(default)s)")
    p.add_argument("--split", default="grouped",
                   help="grouped (no cluster image in two splits) | thesis (the study's per-class "
                        "80/20 then 80/20, cell level) | manifest:FILE.csv | manifest:thesis "
                        "(the study's exact membership) (default: %(default)s)")
    p.add_argument("--folds", type=int, default=0,
                   help="K > 1: grouped stratified K-fold, one prepared folder per fold "
                        "(default: %(default)s = single split)")
    p.add_argument("--augment", type=int, default=6,
                   help="augmented copies per train image (6 gives the study's x7, 2589 -> 18123; "
                        "0 disables) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="split/augmentation seed (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=None,
                   help="synthetic only: cells per class (default: 120; 'full' sizes via "
                        "--per-class 0 = the real SIPaKMeD counts)")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes for decoding and augmentation (default: 0 = all cores)")
    p.add_argument("--no-images", action="store_true",
                   help="write only the array cache and manifest, not one PNG per image")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists and is not empty (default: refuse)")


def run_prepare(args) -> int:
    from cervical import data

    summary = data.prepare(
        dataset=args.dataset, data_dir=args.data_dir, out=args.out, task=args.task,
        class_map=args.class_map, size=args.size, resize=args.resize,
        interpolation=args.interpolation, split=args.split, folds=args.folds,
        augment=args.augment, seed=args.seed, per_class=args.per_class, workers=args.workers,
        save_images=not args.no_images, overwrite=args.overwrite, progress=_progress)
    print(data.format_summary(summary))
    return 0


# ------------------------------------------------------------------------------------------------
# train (cervical/train.py)
# ------------------------------------------------------------------------------------------------

def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared dataset folder")
    p.add_argument("--out", required=True, help="run folder to write")


def run_train(args) -> int:
    raise NotImplementedError("train: not implemented yet")


# ------------------------------------------------------------------------------------------------
# eval and report (cervical/report.py, cervical/metrics.py)
# ------------------------------------------------------------------------------------------------

def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (with model.keras)")


def run_eval(args) -> int:
    raise NotImplementedError("eval: not implemented yet")


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", required=True, help="run folders")
    p.add_argument("--out", required=True, help="report folder")


def run_report(args) -> int:
    raise NotImplementedError("report: not implemented yet")


# ------------------------------------------------------------------------------------------------
# explain and demo
# ------------------------------------------------------------------------------------------------

def add_explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (with model.keras)")


def run_explain(args) -> int:
    raise NotImplementedError("explain: not implemented yet")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs/demo", help="demo folder (default: %(default)s)")


def run_demo(args) -> int:
    raise NotImplementedError("demo: not implemented yet")


# ------------------------------------------------------------------------------------------------

COMMANDS = {
    "prepare": (add_prepare_args, run_prepare, "raw dataset -> prepared dataset folder"),
    "train": (add_train_args, run_train, "prepared dataset -> trained run folder"),
    "eval": (add_eval_args, run_eval, "evaluate a run on a split: metrics, tables, figures"),
    "explain": (add_explain_args, run_explain, "CAM and LIME explanations of a run's predictions"),
    "report": (add_report_args, run_report, "the study's tables and figures from several runs"),
    "demo": (add_demo_args, run_demo, "the whole study offline on the synthetic dataset"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cli.py", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Run 'python cli.py COMMAND --help' for the flags of each step.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (add_args, _, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        add_args(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    run = COMMANDS[args.command][1]
    if os.environ.get("CERVICAL_DEBUG"):
        return run(args) or 0
    try:
        return run(args) or 0
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except NotImplementedError as exc:
        sys.stderr.write(f"cli.py {args.command}: {exc}\n")
        return 2
    except (ValueError, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.stderr.write(f"cli.py {args.command}: error: {msg}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
