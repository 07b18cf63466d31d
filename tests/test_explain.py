"""Tests for cervical.explain and the `explain` command: cell choice, files, metrics, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cervical import explain as E
from cervical import xai_eval as X

ALL_FILES_PER_CELL = ("image", "gradcam", "gradcam_pp", "layercam", "scorecam", "faster_scorecam",
                      "lime_positive", "lime_pros_cons")


# --------------------------------------------------------------------------------------------
# Pure helpers (no TensorFlow)
# --------------------------------------------------------------------------------------------
def test_parse_methods_aliases_all_and_unknown():
    assert E.parse_methods(None) == list(E.METHODS)
    assert E.parse_methods(["Grad_CAM", "score-cam,lime", "gradcam"]) == ["gradcam", "scorecam", "lime"]
    assert E.parse_methods("gradcam-plus-plus,all")[:2] == ["gradcam++", "gradcam"]
    with pytest.raises(E.ExplainError) as err:
        E.parse_methods(["gradcam", "smoothgrad"])
    msg = str(err.value)
    assert "smoothgrad" in msg and "faster-scorecam" in msg and "\n" not in msg


def test_select_cells_most_confident_ties_by_index_and_placeholders():
    y = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([
        [0.6, 0.3, 0.1],   # 0 correct, conf 0.6
        [0.9, 0.05, 0.05], # 1 correct, conf 0.9  <- most confident correct of class 0
        [0.2, 0.7, 0.1],   # 2 wrong (-> 1), conf 0.7
        [0.1, 0.8, 0.1],   # 3 correct, conf 0.8
        [0.1, 0.8, 0.1],   # 4 correct, conf 0.8 (tie with 3: lower index wins)
        [0.1, 0.1, 0.8],   # 5 correct
    ])
    cells = E.select_cells(y, probs, per_class=1)
    got = [(c.kind, c.class_index, c.index) for c in cells]
    assert got == [("correct", 0, 1), ("correct", 1, 3), ("correct", 2, 5),
                   ("wrong", 0, 2), ("wrong", 1, -1), ("wrong", 2, -1)]
    assert cells[3].pred == 1 and cells[3].confidence == pytest.approx(0.7)
    assert cells[4].placeholder
    two = E.select_cells(y, probs, per_class=2)
    assert [c.index for c in two if c.kind == "correct" and c.class_index == 0] == [1, 0]
    assert [c.index for c in two if c.kind == "correct" and c.class_index == 1] == [3, 4]
    # ineligible rows (augmented copies) are never chosen
    el = np.ones(6, bool)
    el[1] = False
    assert E.select_cells(y, probs, eligible=el)[0].index == 0


def test_choose_eval_cells_balanced_and_seeded():
    y = np.array([0] * 10 + [1] * 2)
    idx = X.choose_eval_cells(y, 4, seed=3)
    assert set(idx) >= {10, 11} and len(idx) == 4 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, X.choose_eval_cells(y, 4, seed=3))
    assert len(X.choose_eval_cells(y, 100)) == 12
    picks = {tuple(X.choose_eval_cells(y, 4, seed=s)) for s in range(5)}
    assert len(picks) > 1


def test_reference_maps_centre_peak_and_random_seeded():
    r = X.reference_maps((2, 7, 9), seed=1)
    assert np.unravel_index(r["centre"][0].argmax(), (7, 9)) == (3, 4)
    np.testing.assert_array_equal(r["random"], X.reference_maps((2, 7, 9), seed=1)["random"])


# --------------------------------------------------------------------------------------------
# A tiny trained run on the toy prepared dataset
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tiny_prepared, tmp_path_factory):
    import keras

    from cervical import data

    keras.utils.set_random_seed(0)
    tr = data.load_split(tiny_prepared, "train")
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="feat")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(tr.x.astype("float32"), tr.y, epochs=3, batch_size=16, verbose=0)
    run = tmp_path_factory.mktemp("tiny_run")
    model.save(run / "model.keras")
    config = {"model": "toy", "regime": "finetune", "loss": None, "variant": "standard",
              "data_dir": str(tiny_prepared), "class_names": tr.class_names, "split_protocol": "grouped",
              "image_size": 32, "seed": 0, "feature_layer": "feat"}
    (run / "config.json").write_text(json.dumps(config))
    return run


@pytest.fixture(scope="module")
def explained(tiny_run):
    calls = []
    res = E.explain_run(tiny_run, split="test", evaluate=True, n_eval=6, lime_samples=40,
                        lime_segments=12, n_sanity=2, sanity_blocks=2, seed=0,
                        progress=lambda step, d, t: calls.append((step, d, t)))
    return res, calls


@pytest.mark.slow
def test_explain_run_writes_every_listed_file(tiny_run, explained):
    res, calls = explained
    out = Path(res["out_dir"])
    assert out == tiny_run / "explain" / "test"
    for name in ("cams_correct.png", "cams_wrong.png", "lime_correct.png", "lime_wrong.png", "maps.npz",
                 "cells.json", "xai_metrics.json", "xai_metrics.md", "xai_curves.png",
                 "index.html"):
        assert (out / name).is_file() and name in res["files"], name
    page = (out / "index.html").read_text()
    for c in res["cells"]:                                 # every explained cell is on the page
        for f in c.get("files", {}).values():
            assert f in page
    for f in res["files"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    real = [c for c in res["cells"] if c["index"] >= 0]
    assert real
    for c in real:
        assert sorted(c["files"]) == sorted(
            {"image", "gradcam", "gradcam++", "layercam", "scorecam", "faster-scorecam",
             "lime_positive", "lime_pros_cons"})
        for f in c["files"].values():
            assert (out / f).is_file()
    # 3 classes x (correct, wrong): every class has a row of each kind (a real cell or a note)
    kinds = sorted((c["kind"], c["class_index"]) for c in res["cells"])
    assert kinds == sorted([(k, i) for k in ("correct", "wrong") for i in range(3)])
    assert not list(out.glob(".*tmp*"))                    # atomic writes left no temp files
    assert calls and all(0 < d <= t for _, d, t in calls)
    last = {}
    for step, d, t in calls:                               # every step's counter reached its total
        last[step] = (d, t)
    assert all(d == t for d, t in last.values()), last
    assert {"explain: maps", "explain: evaluate: maps"} <= set(last)


@pytest.mark.slow
def test_maps_npz_holds_the_raw_maps_of_the_chosen_cells(tiny_run, explained, tiny_prepared):
    from cervical import cams, data

    res, _ = explained
    z = np.load(Path(res["out_dir"]) / "maps.npz")
    test = data.load_split(tiny_prepared, "test")
    idx = z["index"]
    np.testing.assert_array_equal(z["image"], test.x[idx])
    np.testing.assert_array_equal(z["true"], test.y[idx])
    np.testing.assert_array_equal(z["mask"], test.masks[idx])
    for key in ("map_gradcam", "map_gradcam_pp", "map_layercam", "map_scorecam", "map_faster_scorecam",
                "map_lime", "lime_segments", "lime_weights", "lime_score"):
        assert key in z.files, key
    import keras

    model = keras.models.load_model(tiny_run / "model.keras")
    # the stored Grad-CAM maps are the maps of the predicted class at the configured layer
    expected = cams.gradcam(model, z["image"].astype("float32"), class_index=z["pred"], layer="feat")
    np.testing.assert_allclose(z["map_gradcam"], expected, atol=1e-5)
    probs = model.predict_on_batch(z["image"].astype("float32"))
    np.testing.assert_array_equal(z["pred"], np.asarray(probs).argmax(1))
    # the LIME map is each pixel's superpixel weight
    for i in range(len(idx)):
        w = z["lime_weights"][i]
        np.testing.assert_allclose(z["map_lime"][i], w[z["lime_segments"][i]])


@pytest.mark.slow
def test_evaluation_numbers_match_direct_computation(tiny_run, explained, tiny_prepared):
    import keras

    from cervical import data

    res, _ = explained
    m = res["metrics"]
    on_disk = json.loads((Path(res["out_dir"]) / "xai_metrics.json").read_text())
    assert on_disk["cell_indices"] == m["cell_indices"] and len(m["cell_indices"]) == 6
    assert set(m["methods"]) == set(E.METHODS) and set(m["reference"]) == {"random", "centre", "darkness", "edges"}
    test = data.load_split(tiny_prepared, "test")
    idx = np.array(m["cell_indices"])
    # chance level = mean nucleus / cell area fraction of the evaluated cells
    assert m["chance"]["nucleus_area"]["mean"] == pytest.approx(np.mean((test.masks[idx] == 2).mean(axis=(1, 2))))
    assert m["chance"]["cell_area"]["mean"] == pytest.approx(np.mean((test.masks[idx] >= 1).mean(axis=(1, 2))))
    # the centred-Gaussian reference map: recompute its deletion AUC and nucleus energy directly
    model = keras.models.load_model(tiny_run / "model.keras")
    x = test.x[idx].astype("float32")
    pred = np.asarray(model.predict_on_batch(x)).argmax(1)
    centre = X.reference_maps(x.shape[:3])["centre"]
    auc0 = X.deletion_auc(model, x[0], centre[0], int(pred[0]))
    assert m["per_cell"]["centre"]["deletion_auc"][0] == pytest.approx(auc0, abs=1e-6)
    energy = [X.energy_share(centre[i], test.masks[idx][i] == 2) for i in range(len(idx))]
    assert m["reference"]["centre"]["nucleus_energy"]["mean"] == pytest.approx(np.mean(energy))
    for name, r in m["methods"].items():
        assert 0.0 <= r["deletion_auc"]["mean"] <= 1.0 and 0.0 <= r["insertion_auc"]["mean"] <= 1.0
        assert r["seconds_per_cell"] > 0
        s = m["sanity"][name]
        assert len(s["steps"]) == 2 and s["steps"][-1]["n_randomised"] == 3     # conv1, feat, probs
    md = (Path(res["out_dir"]) / "xai_metrics.md").read_text()
    assert "| Grad-CAM |" in md and "chance" in md and "Sanity check" in md


@pytest.mark.slow
def test_explain_arbitrary_image_files(tiny_run, tiny_prepared, tmp_path):
    from PIL import Image

    from cervical import data

    test = data.load_split(tiny_prepared, "test")
    a = tmp_path / "cell_a.png"
    Image.fromarray(test.x[0]).save(a)
    b = tmp_path / "cell b.bmp"                       # another size and format: padded and resized
    Image.fromarray(np.asarray(Image.fromarray(test.x[7]).resize((40, 52)))).save(b)
    res = E.explain_run(tiny_run, methods=["gradcam", "lime"], images=[a, b], lime_samples=30,
                        lime_segments=10, out_dir=tmp_path / "out")
    out = tmp_path / "out"
    for name in ("cams_images.png", "lime_images.png", "maps.npz", "cells.json"):
        assert (out / name).is_file()
    z = np.load(out / "maps.npz")
    assert list(z["name"]) == ["cell_a.png", "cell b.bmp"] and z["map_gradcam"].shape == (2, 32, 32)
    np.testing.assert_array_equal(z["image"][0], test.x[0])   # same size PNG: unchanged pixels
    assert list(z["true"]) == [-1, -1]


@pytest.mark.slow
def test_no_masks_reports_localisation_unavailable(tiny_run, tiny_prepared, tmp_path):
    from cervical import data

    splits = {s: dict(x=data.load_split(tiny_prepared, s).x, y=data.load_split(tiny_prepared, s).y)
              for s in ("train", "val", "test")}
    nomask = tmp_path / "nomask"
    data.write_prepared(nomask, splits, data.load_split(tiny_prepared, "test").class_names,
                        info={"dataset": "toy", "task": "toy3", "split": "grouped", "seed": 0,
                              "fingerprint": "toy"}, save_images=False)
    res = E.explain_run(tiny_run, methods=["gradcam"], evaluate=True, n_eval=3, n_sanity=0,
                        data_dir=nomask, out_dir=tmp_path / "out")
    m = res["metrics"]
    assert m["localisation_available"] is False and "nucleus_energy" not in m["methods"]["gradcam"]
    assert "unavailable (no masks)" in (tmp_path / "out" / "xai_metrics.md").read_text()


# --------------------------------------------------------------------------------------------
# Bad input: one-line errors, exit code 2 from the command line
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_input_one_line_errors(tiny_run, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(E.ExplainError, match="no model.keras"):
        E.explain_run(empty)
    with pytest.raises(E.ExplainError, match="no such folder"):
        E.explain_run(tmp_path / "missing")
    with pytest.raises(E.ExplainError, match="valid|choose from"):
        E.explain_run(tiny_run, methods=["gradcam", "occlusion"])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(E.ExplainError, match="broken.png"):
        E.explain_run(tiny_run, methods=["gradcam"], images=[bad], out_dir=tmp_path / "o")
    with pytest.raises(E.ExplainError) as err:
        E.explain_run(tiny_run, methods=["gradcam"], layer="block99_conv", out_dir=tmp_path / "o")
    assert "block99_conv" in str(err.value) and "conv1, feat" in str(err.value)
    with pytest.raises(E.ExplainError, match="--evaluate"):
        E.explain_run(tiny_run, images=[bad], evaluate=True)


@pytest.mark.slow
def test_cli_explain_exit_codes(tiny_run, tmp_path, capsys):
    import cli

    empty = tmp_path / "r"
    empty.mkdir()
    assert cli.main(["explain", "--run", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no model.keras" in err and len(err.splitlines()) == 1
    assert cli.main(["explain", "--run", str(tiny_run), "--methods", "gradcam", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bogus" in err and len(err.splitlines()) == 1
    out = tmp_path / "cli_out"
    assert cli.main(["explain", "--run", str(tiny_run), "--methods", "gradcam,layercam",
                     "--out", str(out)]) == 0
    assert (out / "cams_correct.png").is_file() and str(out) in capsys.readouterr().out


def test_predict_new_images_equals_the_models_own_probabilities(tiny_run, tiny_prepared, tmp_path,
                                                                 capsys):
    """predict on the prepared test PNGs (already at the run's size, so reading them again
    changes nothing) gives, image by image, the class and probabilities of the model on the
    cached test arrays; a folder stands for its images, sorted; the CSV holds the same numbers."""
    import csv

    from cervical import data, models, predict

    test = data.load_split(tiny_prepared, "test")
    folder = Path(tiny_prepared) / "images" / "test"
    result = predict.predict(tiny_run, [folder], out=tmp_path / "p.csv")
    by_path = {str(Path(tiny_prepared) / p): i for i, p in enumerate(test.paths)}
    model = models.load_model_file(tiny_run / "model.keras")
    probs = models.predict_proba(model, test.x)
    assert len(result["rows"]) == len(test.paths)
    assert [r["path"] for r in result["rows"]] == sorted(r["path"] for r in result["rows"])
    for r in result["rows"]:
        p = probs[by_path[r["path"]]]
        assert r["predicted"] == test.class_names[int(p.argmax())]
        assert [r["probabilities"][n] for n in test.class_names] == pytest.approx(p, abs=1e-6)
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(x["confidence"]) for x in rows] == pytest.approx(
        [r["confidence"] for r in result["rows"]])
    import cli

    assert cli.main(["predict", "--run", str(tiny_run), str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.png" in err[0]


def test_explain_class_fixes_the_explained_class(tiny_run, tiny_prepared, tmp_path):
    """--class NAME|INDEX: every map explains that class; Grad-CAM's maps then equal
    cams.gradcam with that class index, computed directly; an unknown class is one line."""
    from cervical import cams, data

    test = data.load_split(tiny_prepared, "test")
    files_ = [Path(tiny_prepared) / p for p in test.paths[:3]]
    name = test.class_names[2]
    res = E.explain_run(tiny_run, images=files_, methods=["gradcam"], out_dir=tmp_path / "e",
                        explain_class=name)
    assert res["explained_class"] == name
    maps = np.load(tmp_path / "e" / "maps.npz")
    key = next(k for k in maps.files if "gradcam" in k)
    model = __import__("cervical.models", fromlist=["x"]).load_model_file(tiny_run / "model.keras")
    direct = cams.gradcam(model, test.x[:3].astype("float32"), class_index=2, layer="feat")
    np.testing.assert_allclose(maps[key], direct, atol=1e-5)
    with pytest.raises(E.ExplainError, match="--class nope: not a class"):
        E.explain_run(tiny_run, images=files_, methods=["gradcam"], out_dir=tmp_path / "f",
                      explain_class="nope")
