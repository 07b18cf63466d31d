#!/usr/bin/env python
"""cervical command line: one subcommand per step of the study.

    python cli.py prepare  raw dataset -> prepared dataset folder (size analysis, resize, split, augment)
    python cli.py train    prepared dataset -> run folder (fine-tune, cost-sensitive, contrastive)
    python cli.py eval     run folder -> metrics, tables and figures on a split
    python cli.py explain  run folder -> CAM and LIME explanations (+ quantitative XAI evaluation)
    python cli.py predict  run folder + new images -> predicted class and probabilities
    python cli.py report   several runs -> the study's tables and figures, with published results
    python cli.py audit    the study's protocol against ours on the same cells (the protocol gap)
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


class _Deprecated(argparse.Action):
    """An old flag name kept for one release: it sets the new flag's value and warns in one line."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stderr.write(f"{parser.prog}: warning: {option_string} is deprecated and will be "
                         f"removed after 0.1; use {self.new}\n")
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def _deprecated(p, old: str, new: str, dest: str, **kwargs) -> None:
    """Add ``old`` as a hidden alias of ``new`` (same dest) that warns when used."""
    p.add_argument(old, dest=dest, action=_Deprecated, new=new, help=argparse.SUPPRESS,
                   default=argparse.SUPPRESS, **kwargs)


def _int_in(low: int, limit: str = ""):
    """argparse type: an integer >= low (and <= cervical.LIMITS[limit]) (cervical.options)."""
    from cervical.options import int_in

    return int_in(low, limit)


def _float_in(low: float, limit: str = "", low_open: bool = False, high: float = None):
    """argparse type: a finite number above low (strictly with low_open) and below its limit."""
    from cervical.options import float_in

    return float_in(low, limit, low_open, high)


_STARTED: dict = {}
_QUIET = False                       # --quiet: no progress lines


def _progress(step: str, done: int, total: int) -> None:
    """The library's progress calls, as one refreshed stderr line
    'step: done/total, elapsed 12 s, about 40 s left' (the estimate assumes an even pace)."""
    import time

    if _QUIET:
        return
    now = time.monotonic()
    start = _STARTED.setdefault(step, now)
    elapsed = now - start
    text = f"\r{step}: {done}/{total}, elapsed {_duration(elapsed)}"
    if 0 < done < total and elapsed > 0:
        text += f", about {_duration(elapsed / done * (total - done))} left"
    end = "\n" if done >= total else ""
    if done >= total:
        _STARTED.pop(step, None)
    sys.stderr.write(text + " " * 8 + end)
    sys.stderr.flush()


def _duration(seconds: float) -> str:
    """12 s, 3 min 5 s, 1 h 02 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


# ------------------------------------------------------------------------------------------------
# prepare
# ------------------------------------------------------------------------------------------------

from cervical.options import SYNTHETIC_CHOICES   # noqa: E402  (TensorFlow-free)


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
    p.add_argument("--size", type=_int_in(8, "size"), default=110, help="target side in pixels (default: %(default)s)")
    p.add_argument("--variant", choices=["standard", "thesis"], default="standard",
                   help="defaults of the options below: ours, or what the study's code did "
                        "(stretch, nearest, its exact split, augment raw crops in BGR order with "
                        "black gaps, JPEG 95) (default: %(default)s)")
    _add_prepare_protocol_args(p.add_argument_group(
        "preparation (--variant decides the defaults; cervical.protocol)"))
    _add_prepare_split_args(p.add_argument_group("split and augmentation"))
    _add_prepare_run_args(p)


def _add_prepare_protocol_args(p) -> None:
    p.add_argument("--resize", choices=["pad", "stretch"], default=None,
                   help="pad: keep aspect, pad to square with the border colour; stretch: the "
                        "study's (default: pad)")
    p.add_argument("--interpolation", choices=["area", "bilinear", "nearest"], default=None,
                   help="resampling filter; 'nearest' matches the study (default: area)")
    p.add_argument("--split", default=None,
                   help="grouped (no cluster image in two splits) | thesis (the study's per-class "
                        "80/20 then 80/20, cell level) | manifest:FILE.csv | manifest:thesis "
                        "(the study's exact membership) (default: grouped)")
    p.add_argument("--augment-at", choices=["target", "raw"], default=None,
                   help="augment the resized cell, or the raw crop before resizing as the study "
                        "did (default: target)")
    p.add_argument("--fill", choices=["border", "black"], default=None,
                   help="gaps left by rotations and shifts: the crop's border colour, or black as "
                        "the study's imgaug (default: border)")
    p.add_argument("--jpeg-quality", type=_int_in(0, "jpeg_quality"), default=None, metavar="Q",
                   help="JPEG-recompress every image at quality Q as the study did (95); 0 = off "
                        "(default: 0)")
    p.add_argument("--augment-order", choices=["rgb", "bgr"], default=None,
                   help="channel order the augmenters see; bgr reproduces the study's OpenCV "
                        "arrays (changes CLAHE/gamma, Canny and colour copies) (default: rgb)")


def _add_prepare_split_args(p) -> None:
    p.add_argument("--folds", type=_int_in(0, "folds"), default=0,
                   help="K > 1: grouped stratified K-fold, one prepared folder per fold "
                        "(default: %(default)s = single split)")
    p.add_argument("--augment", type=_int_in(0, "augment"), default=6,
                   help="augmented copies per train image (6 gives the study's x7, 2589 -> 18123; "
                        "0 disables) (default: %(default)s)")
    p.add_argument("--seed", type=_int_in(0, "seed"), default=42, help="split/augmentation seed (default: %(default)s)")
    p.add_argument("--synthetic", choices=SYNTHETIC_CHOICES, default="default",
                   help="synthetic only: the easy default set; hard (overlapping classes and "
                        "strongly clustered imaging conditions, where a cell-level split can "
                        "leak); or hard-uniform (the hard classes, one imaging condition for "
                        "every cluster image) (default: %(default)s)")
    p.add_argument("--hard", dest="synthetic", action="store_const", const="hard",
                   help="the same as --synthetic hard")
    p.add_argument("--groups", default=None, metavar="FILE.csv",
                   help="the group (slide, patient, cluster image) of every image: a CSV with "
                        "columns path,group, path relative to --data-dir; a grouped split keeps "
                        "each group in one split (default: the layout's groups; a folders "
                        "dataset has none: one group per image, and prepare warns)")
    p.add_argument("--group-pattern", default=None, metavar="REGEX",
                   help="the group from each file name: the first capture group of REGEX "
                        "searched in the file stem, e.g. '^(\\d+)_' for NNN_MM names")
    p.add_argument("--leak-cells", type=_int_in(0, "augment"), default=0,
                   help="the randomised-leak design on a grouped split: in half the test cluster "
                        "images of each class (chosen by coin), move N cells to train; in the "
                        "other half set N aside (default: %(default)s = off)")
    p.add_argument("--leak-val", choices=["grouped", "cells"], default="grouped",
                   help="with --leak-cells: a grouped validation split, or one at cell level "
                        "from the training cells as the study's was (default: %(default)s)")
    p.add_argument("--leak-swap", action="store_true",
                   help="with --leak-cells: the crossover, the same design with the leaked and "
                        "held-out cluster images exchanged")


def _add_prepare_run_args(p) -> None:
    p.add_argument("--per-class", type=_int_in(0, "per_class"), default=None,
                   help="synthetic only: cells per class (default: 120; 'full' sizes via "
                        "--per-class 0 = the real SIPaKMeD counts)")
    p.add_argument("--workers", type=_int_in(0, "workers"), default=0,
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
        save_images=not args.no_images, overwrite=args.overwrite, progress=_progress,
        variant=args.variant, augment_at=args.augment_at, fill=args.fill,
        jpeg_quality=args.jpeg_quality, augment_order=args.augment_order,
        synthetic=args.synthetic, leak_cells=args.leak_cells, leak_val=args.leak_val,
        leak_swap=args.leak_swap, groups=args.groups, group_pattern=args.group_pattern)
    print(data.format_summary(summary))
    return 0


# ------------------------------------------------------------------------------------------------
# train (cervical/train.py)
# ------------------------------------------------------------------------------------------------

# Literal choices keep `--help` free of TensorFlow; tests check them against the library
# (models.MODEL_NAMES, train.REGIMES). train and audit share them.
from cervical.options import MODEL_CHOICES, REGIME_CHOICES   # noqa: E402  (TensorFlow-free)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per field of cervical.options.TrainConfig (declared there once), and --quiet."""
    from cervical import options

    options.add_arguments(p, options.TrainConfig)
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress output")


def run_train(args) -> int:
    import dataclasses

    from cervical import train   # imports TensorFlow

    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields}
    options["verbose"] = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
    summary = train.train(train.TrainConfig(**options))
    print(train.format_summary(summary))
    return 0


# ------------------------------------------------------------------------------------------------
# eval and report (cervical/report.py, cervical/metrics.py)
# ------------------------------------------------------------------------------------------------

def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (with model.keras)")
    p.add_argument("--data", default=None,
                   help="another prepared dataset with the same class names (external validation) "
                        "(default: the run's own dataset)")
    p.add_argument("--split", choices=["test", "val", "train", "all"], default="test",
                   help="split to evaluate; augmented copies are left out (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="output folder (default: RUN/eval/SPLIT, or RUN/eval/external-NAME-SPLIT with --data)")
    p.add_argument("--batch-size", type=_int_in(1, "batch_size"), default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument("--n-boot", type=_int_in(0, "n_boot"), default=1000,
                   help="bootstrap resamples for the 95%% intervals; 0 disables (default: %(default)s)")
    p.add_argument("--seed", type=_int_in(0, "seed"), default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation in the output folder (default: refuse)")


def run_eval(args) -> int:
    from cervical import report

    summary = report.evaluate_run(args.run, data_dir=args.data, split=args.split, out_dir=args.out,
                                  progress=_progress, batch_size=args.batch_size,
                                  n_boot=args.n_boot, seed=args.seed, overwrite=args.overwrite)
    print(report.format_eval(summary))
    return 0


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", required=True, help="run folders")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--split", choices=["test", "val", "train", "all"], default="test",
                   help="which evaluation to report (default: %(default)s)")
    p.add_argument("--require-eval", dest="require_eval", action="store_true",
                   help="fail on runs without RUN/eval/SPLIT/metrics.json instead of evaluating them")
    _deprecated(p, "--no-eval", "--require-eval", "require_eval", nargs=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier report in --out (default: refuse)")


def run_report(args) -> int:
    from cervical import report

    path = report.build_report(args.runs, args.out, split=args.split,
                               evaluate_missing=not args.require_eval, progress=_progress,
                               overwrite=args.overwrite)
    print(f"report written to {path}")
    return 0


# ------------------------------------------------------------------------------------------------
# explain and demo
# ------------------------------------------------------------------------------------------------

def add_explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (with model.keras and config.json)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="split whose cells are explained (default: %(default)s)")
    p.add_argument("--class", dest="explain_class", default=None, metavar="NAME|INDEX",
                   help="the class every map explains (default: each cell's predicted class)")
    p.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD",
                   help="gradcam gradcam++ layercam scorecam faster-scorecam lime, or all; space- or "
                        "comma-separated (default: all)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier explanation in the output folder (default: refuse)")
    p.add_argument("--shown-per-class", dest="per_class", type=_int_in(1, "per_class_shown"),
                   default=1,
                   help="most confident correct and wrong cells shown per class (default: %(default)s)")
    _deprecated(p, "--per-class", "--shown-per-class", "per_class",
                type=_int_in(1, "per_class_shown"))
    p.add_argument("--out", default=None,
                   help="output folder (default: RUN/explain/SPLIT, RUN/explain/images with --images)")
    p.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="explain these image files with the run's model instead of a split")
    p.add_argument("--layer", default=None,
                   help="CAM target layer (default: config.json's feature_layer, else the last 4-D "
                        "feature map)")
    p.add_argument("--data", default=None,
                   help="prepared dataset folder (default: config.json's data_dir)")
    p.add_argument("--evaluate", action="store_true",
                   help="also measure deletion/insertion AUC, nucleus/cell energy share and pointing "
                        "game, time per cell and the randomisation sanity check")
    p.add_argument("--n-eval", type=_int_in(1, "n_eval"), default=50,
                   help="cells in the --evaluate metrics (default: %(default)s)")
    p.add_argument("--n-sanity", type=_int_in(0, "n_sanity"), default=5,
                   help="cells in the randomisation sanity check; 0 skips it (default: %(default)s)")
    p.add_argument("--sanity-blocks", type=_int_in(1, "sanity_blocks"), default=5,
                   help="cascading randomisation steps, output to input (default: %(default)s)")
    p.add_argument("--lime-samples", type=_int_in(2, "lime_samples"), default=1000,
                   help="LIME perturbed images per cell (default: %(default)s)")
    p.add_argument("--lime-segments", type=_int_in(1, "lime_segments"), default=50,
                   help="LIME SLIC superpixels (default: %(default)s)")
    p.add_argument("--max-n", type=_int_in(1, "max_n"), default=10,
                   help="Faster-Score-CAM channels (default: %(default)s)")
    p.add_argument("--tolerance", type=_float_in(0.0, "tolerance"), default=0.0,
                   help="pointing-game tolerance in pixels (default: %(default)s)")
    p.add_argument("--seed", type=_int_in(0, "seed"), default=0,
                   help="seed of LIME, of the evaluated cells and of the randomisation (default: %(default)s)")


def run_explain(args) -> int:
    from cervical import explain

    result = explain.explain_run(
        args.run, split=args.split, methods=args.methods, per_class=args.per_class, out_dir=args.out,
        evaluate=args.evaluate, n_eval=args.n_eval, images=args.images, layer=args.layer,
        seed=args.seed, progress=_progress, data_dir=args.data,
        lime_samples=args.lime_samples, lime_segments=args.lime_segments, max_n=args.max_n,
        n_sanity=args.n_sanity, sanity_blocks=args.sanity_blocks, tolerance=args.tolerance,
        explain_class=args.explain_class, overwrite=args.overwrite)
    shown = sum(1 for c in result["cells"] if c["index"] >= 0)
    print(f"explained {shown} cells (class: {result['explained_class']}; CAM layer "
          f"{result['layer']}); files in {result['out_dir']}")
    for cell in result["cells"]:
        if cell.get("note"):
            print(f"  note: {cell['note']}")
    if result["metrics"] is not None:
        from pathlib import Path

        print()
        print((Path(result["out_dir"]) / "xai_metrics.md").read_text().rstrip())
    return 0


def add_audit_args(p: argparse.ArgumentParser) -> None:
    """One flag per field of cervical.options.AuditConfig, plus --easy and --quick."""
    from cervical import options

    options.add_arguments(p, options.AuditConfig)
    p.add_argument("--easy", dest="synthetic", action="store_const", const="default",
                   help="the same as --synthetic default")
    _deprecated(p, "--seeds", "--runs-per-arm", "seeds", type=_int_in(1, "seeds"))
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 24 cells per class, 32 px, 2 epochs, one seed, 2 folds")


def run_audit(args) -> int:
    from cervical import audit

    import dataclasses

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(audit.AuditConfig)}
    if args.quick:
        options.update(audit.QUICK)
    result = audit.run_audit(audit.AuditConfig(**options), progress=_progress,
                             say=lambda line: print(line, flush=True))
    print(audit.format_audit(result).rstrip())
    print(f"\naudit written to {args.out}/audit.md")
    if result["controls"]["passed"] is False:
        sys.stderr.write(f"cli.py audit: a control failed (see {args.out}/audit.md, Controls); "
                         f"the estimates are not to be trusted\n")
        return 1
    return 0


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs/demo",
                   help="demo folder; an earlier demo there is replaced (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="much smaller data and fewer epochs (a smoke test, under a minute)")
    p.add_argument("--seed", type=_int_in(0, "seed"), default=42, help="seed of every step (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds something other than an earlier demo")


def run_demo(args) -> int:
    from cervical import demo

    result = demo.run_demo(args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite,
                           progress=_progress)
    print(demo.format_demo(result))
    return 0


# ------------------------------------------------------------------------------------------------

def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (cli.py train)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, or folders (every image under them, sorted)")
    p.add_argument("--out", default=None, metavar="FILE.csv",
                   help="write path, predicted class, confidence and every class probability "
                        "(default: print only)")


def run_predict(args) -> int:
    from cervical import predict

    result = predict.predict(args.run, args.images, out=args.out)
    print(predict.format_predictions(result))
    return 0


COMMANDS = {
    "prepare": (add_prepare_args, run_prepare, "raw dataset -> prepared dataset folder"),
    "train": (add_train_args, run_train, "prepared dataset -> trained run folder"),
    "eval": (add_eval_args, run_eval, "evaluate a run on a split: metrics, tables, figures"),
    "explain": (add_explain_args, run_explain, "CAM and LIME explanations of a run's predictions"),
    "predict": (add_predict_args, run_predict, "a run's class and probabilities for new images"),
    "report": (add_report_args, run_report, "the study's tables and figures from several runs"),
    "audit": (add_audit_args, run_audit, "the study's protocol against ours on the same cells: "
                                          "how much of the accuracy is the protocol"),
    "demo": (add_demo_args, run_demo, "the whole study offline on the synthetic dataset"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cli.py", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Run 'python cli.py COMMAND --help' for the flags of each step.")
    from cervical import __version__

    parser.add_argument("--version", action="version", version=f"cervical {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (add_args, _, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        add_args(p)
        if "--quiet" not in p._option_string_actions:
            p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def reference() -> str:
    """docs/cli.md: every command's --help, as this parser prints it at 100 columns (a test checks
    the file is current; regenerate with
    ``python -c "import cli; print(cli.reference(), end='')" > docs/cli.md``)."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        parts = ["# Command-line reference", "",
                 "Generated from the parsers in `cli.py` (the same text as `python cli.py COMMAND "
                 "--help`; the command is also installed as `cervical`).", "",
                 "```text", parser.format_help().rstrip(), "```"]
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name, p in sub.choices.items():
            parts += ["", f"## {name}", "", "```text", p.format_help().rstrip(), "```"]
        return "\n".join(parts) + "\n"
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:            # a bad flag (one line already printed) or --help
        return int(exc.code or 0)
    if not args.command:
        parser.print_help()
        return 2
    global _QUIET
    _QUIET = bool(getattr(args, "quiet", False))
    run = COMMANDS[args.command][1]
    if args.command not in ("prepare", "demo"):   # demo imports it after its prepare step
        from cervical import import_tensorflow_quietly
        import_tensorflow_quietly(start_runtime=getattr(args, "strategy", None) != "multiworker")
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
    except Exception as exc:  # noqa: BLE001 - an unforeseen case: one line, traceback on request
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        sys.stderr.write(f"cli.py {args.command}: unexpected {type(exc).__name__}: {msg[:300]} (please "
                         f"report it; CERVICAL_DEBUG=1 shows the traceback)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
