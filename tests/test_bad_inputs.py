"""A corpus of bad inputs for every subcommand (cases in tests/data/bad_inputs.json).

Each case builds a fixture (a broken raw file, a manifest that points outside the data, a run folder
with a truncated model, a flag at 0, negative, NaN or huge, ...), runs the command line in-process
and checks what the case expects: 'error' = exit 2, exactly one line on stderr naming the file or
flag, no traceback, and the output folder not created (nothing written); 'skip' = exit 0 with the
file listed in skipped.txt; 'ok' = exit 0 (odd but valid input).
"""

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = json.loads((Path(__file__).with_name("data") / "bad_inputs.json").read_text())["cases"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small raw SIPaKMeD-layout set, its prepared dataset and a one-epoch tiny run."""
    from cervical import data, synthetic, train

    root = tmp_path_factory.mktemp("bad_inputs_base")
    synthetic.generate(root / "raw", per_class=8, seed=0)
    data.prepare(dataset="sipakmed", data_dir=root / "raw", out=root / "prepared", size=16,
                 split="thesis", augment=0, save_images=False, workers=1)
    train.train(train.TrainConfig(data=str(root / "prepared"), out=str(root / "run"),
                                  model="tiny", epochs=1))
    return root


def _victim(raw: Path) -> Path:
    return sorted((raw / "im_Dyskeratotic" / "im_Dyskeratotic" / "CROPPED").glob("*.bmp"))[0]


def _copy_run(base: Path, tmp: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(base / "run", run, ignore=shutil.ignore_patterns("checkpoints"))
    return run


def _bmp_header(w: int, h: int) -> bytes:
    """A 24-bit BMP header declaring w x h pixels, with no pixel data (a would-be bomb)."""
    return (b"BM" + struct.pack("<IHHI", 54 + w * h * 3, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, w * h * 3, 2835, 2835, 0, 0))


def build(fixture, base: Path, tmp: Path) -> dict:
    """Make the case's inputs in ``tmp``; return the placeholders of its command line."""
    from PIL import Image

    from cervical import data

    subs = {"tmp": str(tmp), "prepared": str(base / "prepared"), "run": str(base / "run")}
    if fixture is None:
        return subs
    raw = tmp / "raw"
    if fixture in ("truncated_bmp", "zero_byte", "dir_named_bmp", "tiny_image", "huge_image",
                   "image_16bit", "image_palette", "non_utf8_name", "dat_nan", "dat_text",
                   "dat_one_vertex", "dat_outside", "manifest_missing_columns",
                   "manifest_duplicates", "manifest_unknown_class", "symlink_outside"):
        shutil.copytree(base / "raw", raw)
        victim = _victim(raw)
        subs.update(raw=str(raw), victim=victim.name, victim_dat=f"{victim.stem}_nuc.dat")
        nuc = victim.with_name(f"{victim.stem}_nuc.dat")
        img = np.asarray(Image.open(victim))
        if fixture == "truncated_bmp":
            victim.write_bytes(victim.read_bytes()[:200])
        elif fixture == "zero_byte":
            victim.write_bytes(b"")
        elif fixture == "dir_named_bmp":
            (victim.parent / "999_99.bmp").mkdir()
        elif fixture == "tiny_image":
            Image.fromarray(img[:1, :1]).save(victim)
        elif fixture == "huge_image":
            victim.write_bytes(_bmp_header(20000, 20000))
        elif fixture == "image_16bit":
            victim.unlink()
            Image.fromarray((img.mean(-1) * 257).astype(np.uint16)).save(victim.with_suffix(".png"))
        elif fixture == "image_palette":
            Image.fromarray(img).convert("P").save(victim)
        elif fixture == "non_utf8_name":
            name = os.fsdecode(b"777_77\xff.bmp")
            shutil.copy(victim, victim.parent / name)
            subs["victim"] = "777_77"
        elif fixture == "dat_nan":
            nuc.write_text("nan,nan\nnan,1\n1,nan\n")
        elif fixture == "dat_text":
            nuc.write_text("this is not a contour\n")
        elif fixture == "dat_one_vertex":
            nuc.write_text("3,4\n")
        elif fixture == "dat_outside":
            nuc.write_text("1000000,5\n1000001,6\n999999,7\n")
        elif fixture == "symlink_outside":
            outside = tmp / "elsewhere.bmp"
            shutil.copy(victim, outside)
            victim.unlink()
            victim.symlink_to(outside)
        elif fixture.startswith("manifest"):
            rows = [(r.source_class, r.stem) for r in data.read_sipakmed(raw)]
            lines = ["split,class,stem"] + [f"{['train', 'val', 'test'][i % 3]},{c},{s}"
                                            for i, (c, s) in enumerate(rows)]
            if fixture == "manifest_missing_columns":
                lines = ["a,b"] + [f"{c},{s}" for c, s in rows]
            elif fixture == "manifest_duplicates":
                lines.append(lines[1])
            elif fixture == "manifest_unknown_class":
                lines.append("test,Cancer,001_01")
            (tmp / "split.csv").write_text("\n".join(lines) + "\n")
        return subs
    if fixture in ("manifest_dotdot", "manifest_absolute"):
        stem = "../../../escaped" if fixture == "manifest_dotdot" else "/tmp/escaped"
        (tmp / "split.csv").write_text(f"split,class,stem\ntrain,Parabasal,{stem}\n"
                                       f"test,Parabasal,001_01\nval,Parabasal,001_02\n")
        return subs
    if fixture == "prepared":
        return subs
    if fixture == "prepared_and_file":
        (tmp / "a_file").write_text("a file where a folder is expected")
        return subs
    if fixture == "run":
        subs["run"] = str(_copy_run(base, tmp))
        return subs
    if fixture in ("truncated_model_run", "bad_config_run", "lambda_run", "corrupt_metrics_run",
                   "run_and_user_folder", "truncated_png"):
        run = _copy_run(base, tmp)
        subs["run"] = str(run)
        if fixture == "truncated_model_run":
            (run / "model.keras").write_bytes((run / "model.keras").read_bytes()[:500])
        elif fixture == "bad_config_run":
            (run / "config.json").write_text(json.dumps({"class_names": 5, "data_dir": 3,
                                                         "model": ["tiny"]}))
        elif fixture == "lambda_run":
            import keras

            inp = keras.Input((16, 16, 3))
            out = keras.layers.Dense(5, activation="softmax")(
                keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(lambda t: t * 2.0)(inp)))
            keras.Model(inp, out).save(run / "model.keras")
        elif fixture == "corrupt_metrics_run":
            (run / "eval" / "test").mkdir(parents=True)
            (run / "eval" / "test" / "metrics.json").write_text("{not json")
        elif fixture == "run_and_user_folder":
            (tmp / "mine").mkdir()
            (tmp / "mine" / "notes.txt").write_text("mine")
        elif fixture == "truncated_png":
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp / "cell.png")
            (tmp / "cell.png").write_bytes((tmp / "cell.png").read_bytes()[:40])
        return subs
    if fixture in ("other_classes", "other_size"):
        from cervical import data as d

        subs["run"] = str(_copy_run(base, tmp))
        kw = dict(task="2class") if fixture == "other_classes" else dict(size=24)
        d.prepare(dataset="sipakmed", data_dir=base / "raw", out=tmp / "prepared",
                  split="thesis", augment=0, save_images=False, workers=1,
                  **{"size": 16, **kw})
        subs["prepared"] = str(tmp / "prepared")
        return subs
    if fixture == "no_clusters":
        rng = np.random.default_rng(0)
        for c in ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal",
                  "Superficial-Intermediate"):
            (raw / f"im_{c}").mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    raw / f"im_{c}" / f"{100 + i:03d}_01.bmp")
        subs["raw"] = str(raw)
        return subs
    if fixture == "user_folder":
        (tmp / "mine").mkdir()
        (tmp / "mine" / "notes.txt").write_text("mine")
        return subs
    raise AssertionError(f"unknown fixture {fixture}")


def _fill(text: str, subs: dict) -> str:
    for k, v in subs.items():
        text = text.replace("{" + k + "}", v)
    return text


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case, base, tmp_path, capsys):
    import cli

    subs = build(case["fixture"], base, tmp_path)
    argv = [_fill(a, subs) for a in case["argv"]]
    needle = _fill(case.get("needle") or "", subs)
    watched = {p: _snapshot(Path(p)) for p in (subs.get("run"), subs.get("prepared"))
               if p and Path(p).is_dir()}
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert "Traceback" not in err, err[-2000:]
    if case["expect"] == "error":
        assert code == 2, (code, err[-1500:])
        errors = [ln for ln in lines if ln.startswith("cli.py")]
        assert len(errors) == 1 and needle in errors[0], lines
        assert not (tmp_path / "out").exists()                      # nothing written
        for p, snap in watched.items():                              # nothing changed
            assert _snapshot(Path(p)) == snap, p
        if (tmp_path / "mine").is_dir():
            assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]
    elif case["expect"] == "skip":
        assert code == 0, err[-1500:]
        skipped = (tmp_path / "out" / "skipped.txt").read_text(errors="replace")
        assert needle in skipped, skipped
    else:
        assert code == 0, err[-1500:]
