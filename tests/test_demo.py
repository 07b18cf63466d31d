"""`python cli.py demo --quick` end to end, and the demo folder's safety rules."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli():
    sys.path.insert(0, str(ROOT))
    import cli
    return cli


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _cli().main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "demo.json").read_text())
    assert result["finished"] is True and result["quick"] is True

    # every step left its files
    assert (out / "prepared" / "manifest.csv").is_file()
    for name in ("finetune", "cost-sensitive", "contrastive"):
        run = out / "runs" / name
        assert (run / "model.keras").is_file()
        metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
        # the summary reports what eval wrote, not a number of its own
        assert result["runs"][name]["test_accuracy"] == pytest.approx(metrics["accuracy"])
        assert f"{100 * metrics['accuracy']:.1f} %" in printed
    assert Path(result["report"]).is_file() and Path(result["report"]).name == "report.md"
    xai = json.loads((Path(result["explain_dir"]) / "xai_metrics.json").read_text())
    for method in ("gradcam", "gradcam++", "layercam", "scorecam", "faster-scorecam", "lime"):
        assert method in printed
        assert result["cam"][method]["nucleus_energy"] == pytest.approx(
            xai["methods"][method]["nucleus_energy"]["mean"])
        # each control comparison printed is the paired interval explain wrote, verdict included
        for ref in ("centre", "darkness", "random"):
            c = xai["paired"]["comparisons"][method][ref]["nucleus_energy"]
            assert result["cam"][method]["nucleus_energy_vs"][ref] == c
            assert (f"{c['verdict']} ({100 * c['estimate']:+.1f} [{100 * c['low']:+.1f}, "
                    f"{100 * c['high']:+.1f}] points)") in printed
    # the closing verdict is the one the paired intervals support, not a sentence of the demo's
    from cervical import explain, xai_eval

    sentences = xai_eval.verdict_sentences(xai, explain.TITLES)
    assert result["xai_verdict"] == sentences[:2] + sentences[-1:]
    assert "verdict: " + " ".join(result["xai_verdict"]) in printed
    assert result["chance_accuracy"] == pytest.approx(1 / 5)
    assert f"report: {result['report']}" in printed


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    assert _cli().main(["demo", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and str(out) in err
    assert (out / "thesis.docx").read_text() == "precious"


def test_demo_replaces_only_an_earlier_demo(tmp_path):
    from cervical import demo

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "demo.json").write_text('{"seed": 42, "sizes": {}}')
    (earlier / "stale.txt").write_text("old")
    demo._clear_out(earlier, overwrite=False)
    assert earlier.is_dir() and not any(earlier.iterdir())

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "demo.json").write_text("[]")          # not our marker: refused
    (fake / "keep.txt").write_text("x")
    with pytest.raises(demo.DemoError, match="--overwrite"):
        demo._clear_out(fake, overwrite=False)
    assert (fake / "keep.txt").is_file()

    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    with pytest.raises(demo.DemoError, match="git repository"):
        demo._clear_out(repo, overwrite=True)        # even --overwrite never removes a repository
    assert (repo / ".git").is_dir()

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(demo.DemoError, match="is a file"):
        demo._clear_out(a_file, overwrite=True)
