"""eval and report on tiny runs: a hand-built Keras model whose every prediction is known in advance.

The model averages each colour channel and multiplies by 0.1: an image whose channel c is 255 and the
others 0 gets logits 25.5·e_c, so it is predicted class c with probability 1 − 2e−25.5/(1+…) ≈ 1.
Labelling a few images against their colour gives a confusion matrix known by hand.
"""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from cervical import data as cdata
from cervical import files
from cervical import metrics as M
from cervical import report as R

NAMES = ["Dyskeratotic", "Metaplastic", "Parabasal"]        # abnormal = Dyskeratotic
# test split: true labels and the colour (= predicted class) of each image
TEST_Y = [0, 0, 0, 1, 1, 2, 2, 2]
TEST_C = [0, 0, 1, 1, 1, 2, 2, 0]
TEST_CM = [[2, 1, 0], [0, 2, 0], [1, 0, 2]]                # rows true, columns predicted


def _images(colours, size=16):
    x = np.zeros((len(colours), size, size, 3), np.uint8)
    for i, c in enumerate(colours):
        x[i, :, :, c] = 255
    return x


def _write_dataset(path, names=NAMES, split="grouped", extra=None):
    splits = {"train": dict(x=_images([0, 1, 2, 0]), y=[0, 1, 2, 0]),
              "val": dict(x=_images([0, 1, 2]), y=[0, 1, 2]),
              "test": dict(x=_images(TEST_C), y=TEST_Y)}
    info = {"dataset": "toy", "task": "toy3", "split": split, "seed": 0, "fingerprint": "toy"}
    info.update(extra or {})
    cdata.write_prepared(path, splits, names, info=info, save_images=False)
    return path


def _colour_model(k=3, size=16):
    import keras

    inp = keras.Input((size, size, 3))
    h = keras.layers.GlobalAveragePooling2D()(inp)
    out = keras.layers.Dense(k, activation="softmax")(h)
    model = keras.Model(inp, out)
    model.layers[-1].set_weights([0.1 * np.eye(3, k, dtype=np.float32), np.zeros(k, np.float32)])
    return model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data_dir = _write_dataset(root / "data")
    run = root / "run_ft"
    run.mkdir()
    _colour_model().save(run / "model.keras")
    (run / "config.json").write_text(json.dumps({
        "model": "densenet169", "regime": "finetune", "loss": None, "variant": "standard",
        "data_dir": str(data_dir), "class_names": NAMES, "split_protocol": "grouped", "seed": 0}))
    return run


def test_evaluate_run_known_answer_and_every_file(tiny_run):
    s = R.evaluate_run(tiny_run, n_boot=200)
    out = tiny_run / "eval" / "test"
    for f in R.EVAL_FILES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not list(out.glob(".*tmp*"))                       # atomic writes leave no temp files
    m = json.loads((out / "metrics.json").read_text())
    assert m["confusion_matrix"] == TEST_CM
    assert m["accuracy"] == pytest.approx(6 / 8)
    # Dyskeratotic: P 2/3, R 2/3; Metaplastic: P 2/3, R 1; Parabasal: P 1, R 2/3
    assert m["per_class"]["Metaplastic"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["Metaplastic"]["recall"] == pytest.approx(1.0)
    assert m["per_class"]["Parabasal"]["f1"] == pytest.approx(0.8)
    # abnormal = Dyskeratotic: 2 of 3 found; 1 of 5 others called abnormal
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(4 / 5)
    # every confidence is 1 - O(e^-25): all in the top bin, accuracy 6/8 -> ECE = 1/4
    assert m["ece"] == pytest.approx(0.25, abs=1e-6)
    # log loss: the two wrong cells give the true class p = 1/(e^25.5 + 2), i.e. -log p ≈ 25.5 each
    assert m["log_loss"] == pytest.approx(2 * 25.5 / 8, abs=1e-4)
    assert m["reliability"]["count"][-1] == 8
    assert m["ci"]["accuracy"]["low"] <= 0.75 <= m["ci"]["accuracy"]["high"]
    assert m["meta"]["protocol"] == "grouped" and m["meta"]["external"] is False
    assert m["meta"]["model"] == "densenet169"
    assert s["files"]["metrics.json"].endswith("metrics.json")

    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "true", "predicted"] + [f"prob_{c}" for c in NAMES]
    assert [r["true"] for r in rows] == [NAMES[i] for i in TEST_Y]
    assert [r["predicted"] for r in rows] == [NAMES[i] for i in TEST_C]
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in NAMES) - 1) < 1e-5 for r in rows)

    md = (out / "classification.md").read_text()
    assert "| Dyskeratotic | 0.6667 | 0.6667 | 0.6667 | 3 | 75.00 % |" in md
    assert "weighted avg" in md and "macro avg" in md
    tex = (out / "classification.tex").read_text()
    assert r"\begin{tabular}" in tex and r"75.00 \%" in tex
    text = R.format_eval(s)
    assert "Dyskeratotic" in text and "accuracy 0.7500" in text


def test_external_validation_same_classes_other_order_and_mismatch(tiny_run, tmp_path):
    # same classes listed in another order: labels are mapped to the run's order, same answer
    perm = ["Parabasal", "Dyskeratotic", "Metaplastic"]
    other = tmp_path / "other"
    splits = {"test": dict(x=_images(TEST_C), y=[perm.index(NAMES[i]) for i in TEST_Y])}
    cdata.write_prepared(other, splits, perm, info={"dataset": "toy2", "split": "thesis"}, save_images=False)
    s = R.evaluate_run(tiny_run, data_dir=other, n_boot=0)
    assert s["confusion_matrix"] == TEST_CM and s["class_names"] == NAMES
    assert s["meta"]["external"] is True and s["meta"]["protocol"] == "cell-level (thesis)"
    assert (tiny_run / "eval" / "external-other-test" / "metrics.json").is_file()

    bad = _write_dataset(tmp_path / "bad", names=["a", "b", "c"])
    with pytest.raises(R.ReportError, match="differ from the run") as e:
        R.evaluate_run(tiny_run, data_dir=bad, n_boot=0)
    assert "\n" not in str(e.value)


def test_evaluate_run_bad_inputs(tiny_run, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(R.ReportError, match="no model.keras"):
        R.evaluate_run(empty)
    with pytest.raises(R.ReportError, match="not a folder"):
        R.evaluate_run(tmp_path / "nowhere")
    with pytest.raises(R.ReportError, match="--split"):
        R.evaluate_run(tiny_run, split="holdout")
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    (no_cfg / "model.keras").write_bytes((tiny_run / "model.keras").read_bytes())
    with pytest.raises(R.ReportError, match="--data"):
        R.evaluate_run(no_cfg)
    with pytest.raises(cdata.DataError):
        R.evaluate_run(no_cfg, data_dir=tmp_path / "missing_data")
    # a prepared dataset without a test split: one-line data error
    only_train = tmp_path / "only_train"
    cdata.write_prepared(only_train, {"train": dict(x=_images([0, 1, 2]), y=[0, 1, 2])}, NAMES,
                         info={"split": "grouped"}, save_images=False)
    with pytest.raises(ValueError, match="test"):
        R.evaluate_run(tiny_run, data_dir=only_train)


def _fake_run(root, name, regime, model, y_true, y_pred, fold=None, loss=None, names=NAMES,
              protocol="grouped", history=None, dataset="toy"):
    """A run folder with a metrics.json computed from label vectors (no model needed for the report)."""
    run = root / name
    (run / "eval" / "test").mkdir(parents=True)
    s = M.summarize(y_true, y_pred, names, n_boot=100, seed=0)
    s["meta"] = {"dataset": dataset, "protocol": R.protocol_label(protocol, fold, 2 if fold is not None else None),
                 "fold": fold}
    (run / "eval" / "test" / "metrics.json").write_text(json.dumps(s))
    cfg = {"model": model, "regime": regime, "loss": loss, "variant": "standard", "class_names": names,
           "split_protocol": protocol}
    if fold is not None:
        cfg["fold"] = fold
    (run / "config.json").write_text(json.dumps(cfg))
    if history is not None:
        (run / "contrastive_history.csv").write_text(
            "epoch,loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(history)))
    return run


def test_build_report_writes_every_file_and_fold_mean_std(tiny_run, tmp_path):
    t = [0] * 4 + [1] * 3 + [2] * 3
    fold0 = _fake_run(tmp_path, "cs_f0", "cost-sensitive", "vgg16", t, [0, 0, 0, 0, 1, 1, 1, 2, 2, 1], fold=0)  # 9/10
    fold1 = _fake_run(tmp_path, "cs_f1", "cost-sensitive", "vgg16", t, [0, 0, 0, 1, 1, 1, 1, 2, 2, 1], fold=1)  # 8/10
    con = _fake_run(tmp_path, "con", "contrastive", "vgg16", t, t, loss="npairs", protocol="thesis",
                    history=[5.0, 4.2, 3.9, 3.7])
    out = tmp_path / "rep"
    md_path = R.build_report([tiny_run, fold0, fold1, con], out)
    assert md_path == out / "report.md"
    expected = ["report.md", "report.json", "runs.csv", "comparison.md", "comparison.csv", "aggregate.md",
                "aggregate.csv", "fig_contrastive_losses.png"]
    for regime in ("finetune", "cost_sensitive", "contrastive"):
        expected += [f"table_{regime}.md", f"table_{regime}.csv", f"fig_accuracy_{regime}.png"]
    for f in expected:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    md = md_path.read_text()
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):      # every embedded PNG exists
        assert (out / img).is_file(), img
    assert len(list(out.glob("cm_*.png"))) == 3                 # one per model group

    rep = json.loads((out / "report.json").read_text())
    assert f"generated {rep['created']} by cervical" in md        # one time stamp, md and json
    assert rep["versions"]["numpy"] == np.__version__
    cs = next(g for g in rep["groups"] if g["regime"] == "cost-sensitive")
    assert cs["n_runs"] == 2 and cs["kind"] == "folds"
    assert cs["metrics"]["accuracy"]["mean"] == pytest.approx(0.85)
    assert cs["metrics"]["accuracy"]["std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))   # 0.0707
    assert cs["confusion_matrix"] == [[7, 1, 0], [0, 6, 0], [0, 2, 4]]                    # summed over folds
    assert "0.8500 ± 0.0707" in (out / "aggregate.md").read_text()

    with open(out / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    authors = [r["Author/Year"] for r in rows]
    assert any(a.startswith("Rahaman et al./2021") for a in authors)
    assert any(r["Accuracy"] == "0.9914" for r in rows)
    ours = [r for r in rows if r["Author/Year"] == "This report"]
    assert len(ours) == 3
    protocols = {r["Method"]: r["Split protocol"] for r in ours}
    assert protocols["Supervised contrastive learning, VGG16 (npairs)"] == "cell-level (thesis)"
    assert protocols["Cost-sensitive learning, VGG16"] == "grouped 2-fold CV"
    assert protocols["Fine-tuning, DenseNet169"] == "grouped"

    # Table 6.3 layout: one block per model, one row per class, accuracy on the first row
    with open(out / "table_cost_sensitive.csv", newline="") as fh:
        trows = list(csv.DictReader(fh))
    assert [r["class"] for r in trows] == NAMES
    assert float(trows[0]["accuracy"]) == pytest.approx(0.85)
    assert trows[0]["thesis_accuracy"] == ""       # toy classes are not SIPaKMeD's: no thesis column


def test_build_report_thesis_columns_for_sipakmed_classes(tmp_path):
    names = ["Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"]
    t = list(range(5)) * 2
    run = _fake_run(tmp_path, "dn", "finetune", "densenet169", t, t, names=names, protocol="thesis",
                    dataset="sipakmed")
    out = tmp_path / "rep"
    R.build_report([run], out)
    with open(out / "table_finetune.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # thesis Table 6.2, DenseNet169: 97.17 %, Koilocytotic 0.98 / 0.93 / 0.96
    assert float(rows[0]["thesis_accuracy"]) == pytest.approx(0.9717)
    assert [float(rows[1][k]) for k in ("thesis_precision", "thesis_recall", "thesis_f1")] == [0.98, 0.93, 0.96]
    assert "0.98 / 0.93 / 0.96" in (out / "table_finetune.md").read_text()
    # the synthetic set shares SIPaKMeD's class names, not its numbers: no thesis columns beside it
    syn = _fake_run(tmp_path, "syn", "finetune", "densenet169", t, t, names=names, dataset="synthetic")
    R.build_report([syn], tmp_path / "rep_syn")
    with open(tmp_path / "rep_syn" / "table_finetune.csv", newline="") as fh:
        assert next(csv.DictReader(fh))["thesis_accuracy"] == ""


def test_build_report_rejects_mixed_class_sets_and_unevaluated_runs(tmp_path):
    a = _fake_run(tmp_path, "a", "finetune", "vgg16", [0, 1, 2], [0, 1, 2])
    b = _fake_run(tmp_path, "b", "finetune", "vgg19", [0, 1], [0, 1], names=["x", "y"])
    with pytest.raises(R.ReportError, match="one task together") as e:
        R.build_report([a, b], tmp_path / "rep")
    assert "\n" not in str(e.value)
    c = tmp_path / "c"
    c.mkdir()
    with pytest.raises(R.ReportError, match="no eval"):
        R.build_report([c], tmp_path / "rep", evaluate_missing=False)
    with pytest.raises(R.ReportError, match="no model.keras"):
        R.build_report([c], tmp_path / "rep")
    with pytest.raises(R.ReportError, match="no run folders"):
        R.build_report([], tmp_path / "rep")


def test_protocol_labels():
    assert R.protocol_label("thesis") == "cell-level (thesis)"
    assert R.protocol_label("manifest:thesis_split.csv") == "cell-level (thesis)"
    assert R.protocol_label("grouped") == "grouped"
    assert R.protocol_label("grouped", fold=2, folds=5) == "grouped 5-fold CV"
    assert R.protocol_label("manifest:mine.csv") == "manifest (mine.csv)"
    assert R.protocol_label(None) == "unknown"


def test_published_numbers_are_consistent():
    pub = R.load_published()
    assert {p["author"] for p in pub["table_7_1"]} >= {"Rahaman et al.", "Pramanik et al.", "Manna et al.",
                                                       "Tripathi et al."}
    assert all(p.get("citation") for p in pub["table_7_1"])
    # each thesis table accuracy is a count out of the 812 test cells printed in the notebooks
    nb = {(r["regime"], r["model"]): r for r in pub["study_notebooks"]["results"]
          if r["loss"] in (None, "npairs")}
    for regime, block in pub["study_tables"].items():
        for model, entry in block["models"].items():
            assert abs(entry["accuracy"] - nb[(regime, model)]["correct"] / 812) <= 1e-4 + 1e-9, (regime, model)
            assert list(entry["per_class"]) == pub["class_names"]
    best = [p for p in pub["table_7_1"] if p["split_protocol"] == "thesis"]
    assert sorted(p["accuracy"] for p in best) == [0.9717, 0.9729, 0.9729]


def test_confusion_matrix_figure_is_a_png(tmp_path):
    p = R.plot_confusion_matrix([[5, 1], [0, 4]], ["normal", "abnormal"], tmp_path / "cm.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cervical_cli", Path(R.__file__).resolve().parents[1] / "cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_eval_and_report(tiny_run, tmp_path, capsys):
    cli = _cli()
    out = tmp_path / "ev"
    assert cli.main(["eval", "--run", str(tiny_run), "--n-boot", "50", "--out", str(out)]) == 0
    assert all((out / f).is_file() for f in R.EVAL_FILES)
    assert "accuracy 0.7500" in capsys.readouterr().out
    assert cli.main(["report", "--runs", str(tiny_run), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "http" not in page
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(tmp_path)]) == 2                   # no model.keras
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model.keras" in err[0]


def test_malformed_run_files_give_one_line_errors(tmp_path, capsys):
    """Valid JSON of the wrong shape is bad input (exit 2, one line), not a traceback."""
    cli = _cli()
    run = _fake_run(tmp_path, "r", "finetune", "vgg16", [0, 1, 2], [0, 1, 2])
    (run / "eval" / "test" / "metrics.json").write_text("[]")
    assert cli.main(["report", "--runs", str(run), "--out", str(tmp_path / "o1"), "--require-eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.json" in err and "--split test" in err
    (run / "eval" / "test" / "metrics.json").write_text('{"n": 3}')
    assert cli.main(["report", "--runs", str(run), "--out", str(tmp_path / "o2"), "--require-eval"]) == 2
    assert "missing class_names" in capsys.readouterr().err
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        R._read_config(run)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--run", "r", "--batch-size", "0"], "--batch-size"),
    (["eval", "--run", "r", "--n-boot", "-5"], "--n-boot"),
    (["explain", "--run", "r", "--seed", "-1"], "--seed"),
    (["explain", "--run", "r", "--lime-samples", "1"], "--lime-samples"),
    (["train", "--data", "d", "--out", "o", "--epochs", "0"], "--epochs"),
    (["prepare", "--out", "o", "--augment", "x"], "--augment"),
])
def test_numeric_flags_are_checked_before_any_work(argv, flag, capsys):
    assert _cli().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_tested_versions_and_untested_notes(tmp_path):
    """The constraints file is the one home of the tested versions; eval and report name every
    library of a run that differs from it (Python on major.minor)."""
    f = tmp_path / "c.txt"
    f.write_text("# header\n# tested-python: 3.11\nKeras==3.15.1\nscikit_learn==1.9.1\n"
                 "numpy==2.4.6 ; python_version >= '3.11'\n")
    tested = files.tested_versions(f)
    assert tested == {"python": "3.11", "keras": "3.15.1", "scikit-learn": "1.9.1", "numpy": "2.4.6"}
    run = {"python": "3.11.9", "keras": "3.14.0", "scikit-learn": "1.9.1", "numpy": "2.4.6",
           "tensorflow": "2.21.0"}                          # tensorflow: not in this tested set
    assert files.untested_versions(run, tested) == ["keras 3.14.0 (tested 3.15.1)"]
    assert files.untested_versions({**run, "python": "3.12.1", "keras": "3.15.1"}, tested) == [
        "python 3.12.1 (tested 3.11)"]
    assert files.untested_versions(None, tested) == [] and files.tested_versions(tmp_path / "no") == {}
    # the shipped file pins every library that shapes a result
    shipped = files.tested_versions()
    assert set(files.RESULT_LIBRARIES) | {"python"} <= set(shipped)


def test_eval_and_report_name_untested_versions(tiny_run, tmp_path, capsys):
    config = json.loads((tiny_run / "config.json").read_text())
    tested = files.tested_versions()
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "model.keras").write_bytes((tiny_run / "model.keras").read_bytes())
    (old / "config.json").write_text(json.dumps({**config, "versions": {**tested, "keras": "3.0.0"}}))
    s = R.evaluate_run(old, n_boot=0)
    notes = s["meta"]["untested_versions"]
    assert f"trained with keras 3.0.0 (tested {tested['keras']})" in notes
    assert "note: versions other than the tested ones" in R.format_eval(s)
    report = R.build_report([old], tmp_path / "rep").read_text()
    assert f"old_run: trained with keras 3.0.0 (tested {tested['keras']})" in report


def test_table_6_1_from_the_runs_configs(tiny_run, tmp_path):
    """The hyper-parameter table reads each run's config.json (and summary.json), the thesis's
    Table 6.1 beside it."""
    run = tmp_path / "hp_run"
    run.mkdir()
    (run / "model.keras").write_bytes((tiny_run / "model.keras").read_bytes())
    config = json.loads((tiny_run / "config.json").read_text())
    config.update(model="vgg16", regime="finetune", epochs=50, lr=0.001, image_size=16,
                  global_batch_size=32, keep="last", monitor="val_loss", precise_bn=0)
    (run / "config.json").write_text(json.dumps(config))
    (run / "summary.json").write_text(json.dumps({"epochs_run": 7}))
    text = R.build_report([run], tmp_path / "rep").read_text()
    with open(tmp_path / "rep" / "hyperparameters.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert (row["Model"], row["Epochs (run / max)"], row["Learning rate"], row["Dropout"],
            row["Kept epoch"], row["BN statistics"]) == ("VGG16", "7 / 50", "0.001", "0.5",
                                                         "last", "moving averages")
    assert "Hyper-parameters (cf. thesis Table 6.1)" in text
    assert "Fine-tuning and cost-sensitive learning" in text          # the thesis's own row


def test_report_explanations_section_prints_paired_verdicts(tmp_path):
    """A run whose explain folder holds xai_metrics.json with paired comparisons gets a row per
    method (nucleus energy, then method - control per control with its verdict) and the verdict
    paragraph; a run without one adds nothing."""
    run = tmp_path / "runA"
    (run / "explain" / "test").mkdir(parents=True)
    ci = lambda e, lo, hi, v: {"estimate": e, "low": lo, "high": hi, "n": 10, "n_groups": 10,
                               "verdict": v}
    metrics = {
        "n_cells": 10, "localisation_available": True,
        "methods": {"gradcam": {"nucleus_energy": {"mean": 0.25}}},
        "reference": {"centre": {}, "darkness": {}, "random": {}},
        "paired": {"comparisons": {"gradcam": {
            "centre": {"nucleus_energy": ci(-0.1, -0.2, -0.05, "loses")},
            "darkness": {"nucleus_energy": ci(0.0, -0.1, 0.1, "ties")},
            "random": {"nucleus_energy": ci(0.05, 0.01, 0.09, "beats")}}}},
    }
    (run / "explain" / "test" / "xai_metrics.json").write_text(json.dumps(metrics))
    lines = R._explanations_section([{"run": run}, {"run": tmp_path / "runB"}], "test")
    text = "\n".join(lines)
    assert "| gradcam | 0.250 | -0.100 [-0.200, -0.050] loses | +0.000 [-0.100, +0.100] ties | " \
           "+0.050 [+0.010, +0.090] beats |" in text
    assert "no method beats the centred Gaussian" in text and "runB" not in text
    assert R._explanations_section([{"run": tmp_path / "runB"}], "test") == []


def test_cli_writers_refuse_to_replace_output_without_overwrite(tiny_run, tmp_path, capsys):
    """eval and report, run twice into one folder: the second refuses in one line naming
    --overwrite and leaves the first output alone; with --overwrite it replaces it. A deprecated
    flag still works and says so in one line."""
    cli = _cli()
    out, rep = tmp_path / "ev", tmp_path / "rep"
    for argv, folder, marker in ((["eval", "--run", str(tiny_run), "--n-boot", "20", "--out",
                                   str(out)], out, "metrics.json"),
                                 (["report", "--runs", str(tiny_run), "--out", str(rep)], rep,
                                  "report.md")):
        assert cli.main(argv) == 0
        first = (folder / marker).read_bytes()
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--overwrite" in err[0] and str(folder) in err[0]
        assert (folder / marker).read_bytes() == first
        assert cli.main(argv + ["--overwrite"]) == 0
    capsys.readouterr()
    assert cli.main(["report", "--runs", str(tiny_run), "--out", str(tmp_path / "r2"),
                     "--no-eval", "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-eval is deprecated" in err[0] and "--require-eval" in err[0]
