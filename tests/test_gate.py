"""Difference-gated inference (pcb_aoi.edge.gate): tiles cover the defects, a pair that differs everywhere runs
dense, tiled detections match dense ones around defects, the decision on validation reaches the contract,
and a gate on a single-image model is refused. Real onnxruntime sessions on tiny exported models."""
import json

import numpy as np
import pytest
import torch

from pcb_aoi.data.dataset import Dataset
from pcb_aoi.data.synth import board_samples
from pcb_aoi.deploy import export, gating
from pcb_aoi.edge import app, gate, runtime
from pcb_aoi.evaluation.deeppcb import iou
from pcb_aoi.model import checkpoint
from pcb_aoi.model.inference import load_pair, prepare_input
from pcb_aoi.pipeline.config import CLASSES, GateConfig, SynthConfig

from test_edge import overlapping_model

# The synthetic generator's smallest defects (a 4x4 px open cut into a 4 px trace) lie within a pixel of the
# template's own copper edges: the default tolerance comparison (tolerance_px 1, for DeepPCB's misregistered
# edges) does not see them (test_the_tolerance_ignores_an_edge_a_pixel_off), a plain difference does.
SYNTH = gate.DEFAULTS | {"mode": "tiles", "tolerance_px": 0, "min_size_px": 2, "max_fraction": 1.0, "tile_multiple": 16}


def samples(boards=3, size=256):
    cfg = SynthConfig(image_size=size, images_per_board=4)
    return [s for b in range(boards) for s in board_samples(cfg, 0, b)]


def settings(**kw):
    return gate.DEFAULTS | {"tile_multiple": 16, "margin_px": 32, "min_size_px": 3} | kw


def test_tiles_are_snapped_to_the_tile_multiple_and_merged_only_when_cheaper():
    test = np.full((256, 256), 255, np.uint8)
    template = test.copy()
    test[40:50, 100:110] = 0  # one blob: eroded by 3 px, cells 96..112 x 40..48 (8 px), margin 32, snapped to 16
    p = gate.plan(test, template, settings())
    assert p.tiles == [gate.Tile(64, 0, 144, 80)] and p.run_fraction == pytest.approx(80 * 80 / 256**2)
    assert p.tiles[0].owns == ((96, 40, 112, 48),)
    test[50:60, 120:130] = 0  # a second blob whose tile (80..160 x 16..96) overlaps the first much: one union
    p = gate.plan(test, template, settings())
    assert p.tiles == [gate.Tile(64, 0, 160, 96)] and len(p.regions) == 2 and len(p.tiles[0].owns) == 2
    test[240:250, 10:20] = 0  # a third far away, clipped to the image
    p = gate.plan(test, template, settings())
    assert p.tiles == [gate.Tile(64, 0, 160, 96), gate.Tile(0, 208, 64, 256)]
    # two tiles that overlap in a corner stay apart (their union would add two empty corners) and each
    # keeps only the detections centred on its own region
    diag = np.full((256, 256), 255, np.uint8)
    diag[40:50, 40:50] = 0
    diag[110:120, 110:120] = 0
    p = gate.plan(diag, template, settings())
    assert p.tiles == [gate.Tile(0, 0, 80, 80), gate.Tile(64, 64, 160, 160)]
    assert p.run_fraction == pytest.approx((80 * 80 + 96 * 96) / 256**2)
    boxes = np.float32([[38, 38, 52, 52], [106, 106, 120, 120], [64, 64, 80, 80]])  # A, B, the shared corner
    assert p.tiles[0].owned(boxes, gate.OWN_SLACK_PX).tolist() == [True, False, False]
    assert p.tiles[1].owned(boxes, gate.OWN_SLACK_PX).tolist() == [False, True, False]
    line = np.full((256, 256), 255, np.uint8)
    line[:, 128:129] = 0  # a 1 px line along a copper edge (sub-pixel misalignment) is noise at min_size_px 2
    assert gate.plan(line, template, gate.DEFAULTS | {"tile_multiple": 16}).tiles == []
    line[:, 129:130] = 0  # 2 px wide: a change at 2 (a thin mousebite is that thin), noise at 3
    assert len(gate.plan(line, template, gate.DEFAULTS | {"tile_multiple": 16}).tiles) == 1
    assert gate.plan(line, template, settings(min_size_px=3)).tiles == []
    dots = np.full((256, 256), 255, np.uint8)
    dots[4::24, 4::24] = 0  # 121 isolated changes: scattered, not a few defects
    dots[5::24, 4::24] = dots[4::24, 5::24] = dots[5::24, 5::24] = 0
    p = gate.plan(dots, template, settings(min_size_px=2, max_fraction=1.0))
    assert p.tiles is None and f"more than {gate.MAX_REGIONS} separate regions differ" in p.why


def test_the_tolerance_ignores_an_edge_a_pixel_off():
    template = np.full((64, 64), 255, np.uint8)
    template[20:40, 20:30] = 0  # a pad
    test = np.full((64, 64), 255, np.uint8)
    test[20:40, 21:31] = 0  # the same pad a pixel to the right: two 1 px lines of difference
    assert gate.changed_mask(test, template, 64, 1, tolerance=0).sum() == 40
    assert gate.changed_mask(test, template, 64, 1, tolerance=1).sum() == 0
    test[28:32, 23:27] = 255  # a 4x4 hole inside the pad: beyond every template pixel around it
    assert gate.changed_mask(test, template, 64, 2, tolerance=1)[28:31, 23:26].all()
    trace = np.full((64, 64), 255, np.uint8)
    trace[:, 30:32] = 0  # a 2 px trace
    cut = trace.copy()
    cut[30:34, 30:32] = 255  # an open across it: every cut pixel has bare template within a pixel
    assert not gate.changed_mask(cut, trace, 64, 1, tolerance=1).any()
    assert gate.changed_mask(cut, trace, 64, 2, tolerance=0).any()


def test_a_contract_without_tile_multiple_tiles_at_its_pad_multiple():
    assert gate.settings({"pad_multiple": 32})["tile_multiple"] == 32
    assert gate.settings({"pad_multiple": 32, "tile_multiple": 16})["tile_multiple"] == 16


def test_tiles_cover_every_injected_defect():
    n = 0
    for s in samples():
        p = gate.plan(s.test, s.template, SYNTH)
        for d in s.defects:
            x1, y1, x2, y2 = d.box
            assert any(t.x0 <= x1 and t.y0 <= y1 and t.x1 >= x2 and t.y1 >= y2 for t in p.tiles), (d.cls, d.box)
            n += 1
        assert all(t.x0 % 16 == 0 and t.y0 % 16 == 0 and t.x1 % 16 == 0 and t.y1 % 16 == 0 for t in p.tiles)
    assert n >= 20


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_pipeline):
    d, _ = tiny_pipeline
    ds = Dataset.load(d / "clean")
    out = tmp_path_factory.mktemp("gate")
    x = torch.from_numpy(prepare_input(*load_pair(ds, ds.rows(ds.images.image_id[:1])[0]), True)[None])
    paths = {}
    for name, use_template in (("pair", True), ("single", False)):
        model = overlapping_model(use_template)
        with torch.no_grad():  # classes apart (untrained scores are flat; a 0.01 nudge would swap ties)
            model.cls_head[-1].bias += torch.tensor([0.0, -1.0, -2.0, -3.0, -4.0, -5.0])
        ckpt = {"classes": list(CLASSES), "input_spec": checkpoint.input_spec(use_template),
                "model_config": model.cfg.to_dict()}
        xi = x if use_template else x[:, :1]
        export.export(model, ckpt, xi, out / f"{name}.onnx", opset=17, score_threshold=0.5)
        if use_template:
            export.export(model, ckpt, xi, out / f"{name}.e2e.onnx", opset=17, end_to_end=True, score_threshold=0.5)
        paths[name] = out / f"{name}.onnx"
    paths["e2e"] = out / "pair.e2e.onnx"
    return paths, ds


@pytest.mark.parametrize("template_of", [lambda t: 255 - t, lambda t: np.random.default_rng(0).integers(0, 256, t.shape,
                                                                                                        np.uint8)])
def test_a_pair_that_differs_everywhere_runs_dense_and_says_so(models, template_of):
    paths, _ = models
    s = samples(1)[0]
    dense, gated = runtime.EdgeModel(paths["pair"], gate="none"), runtime.EdgeModel(paths["pair"], gate="tiles")
    template = template_of(s.test)
    got, ref = gated.detect(s.test, template, 0.2), dense.detect(s.test, template, 0.2)
    assert got.gate["mode"] == "dense" and "registration failed or another board" in got.gate["why"] and ref.gate is None
    assert [d.to_dict() for d in got] == [d.to_dict() for d in ref] and len(ref) > 0


def detections_around_defects_match_dense(model_path, margin_px: int, boards: int = 2,
                                          score: float = 0.2) -> tuple[int, int]:
    """Every dense detection that touches an injected defect is found again gated (same class, IoU >= 0.9,
    score within 0.05), on synthetic 448 px pairs (room for tiles smaller than the image); (checked, tiled).
    Called on a trained model by tests/test_pipeline.py: untrained weights score flat heat maps whose 3x3
    peaks move by a cell on 1e-5 differences, which says nothing about the gate."""
    dense = runtime.EdgeModel(model_path, gate="none")
    gated = runtime.EdgeModel(model_path, gate="tiles")
    gated.gate.update(SYNTH | {"margin_px": margin_px})
    checked = tiled = 0
    for s in samples(boards, 448):
        ref, got = dense.detect(s.test, s.template, score), gated.detect(s.test, s.template, score)
        tiled += got.gate["mode"] == "tiles" and got.gate["tiles"] > 0
        rb = np.array([d.box for d in ref]).reshape(-1, 4)
        gb = np.array([d.box for d in got]).reshape(-1, 4)
        defects = np.array([d.box for d in s.defects], float).reshape(-1, 4)
        for i in np.nonzero((iou(rb, defects) > 0).any(1))[0]:  # dense detections on a defect
            ok = [j for j in range(len(got)) if got[j].cls == ref[i].cls and iou(rb[i], gb[j])[0, 0] >= 0.9
                  and abs(got[j].score - ref[i].score) <= 0.05]
            assert ok, (ref[i], [d for d in got if iou(rb[i], np.array(d.box))[0, 0] > 0.3])
            checked += 1
    return checked, tiled


def test_a_tile_is_its_window_of_the_whole_input_and_a_whole_image_tile_is_dense(models):
    paths, _ = models
    s = samples(1)[0]
    test, template = s.test[:250, :240], s.template[:250, :240]  # not multiples of 16 or 32: padding inside tiles
    dense, gated = runtime.EdgeModel(paths["pair"], gate="none"), runtime.EdgeModel(paths["pair"], gate="tiles")
    whole = runtime.prepare_input(test, template, dense.contract)  # (3, 256, 256)
    for t in (gate.Tile(0, 0, 64, 64), gate.Tile(224, 208, 256, 256), gate.Tile(96, 0, 256, 128)):
        assert np.array_equal(runtime.tile_input(test, template, t, dense.contract), whole[:, t.y0:t.y1, t.x0:t.x1])
    one = gate.Plan([gate.Tile(0, 0, 256, 256, ((0, 0, 240, 250),))], run_fraction=1.0)
    ref = dense.detect(test, template, 0.2)
    got = gated.detect(test, template, 0.2, plan=one)
    assert [d.to_dict() for d in got] == [d.to_dict() for d in ref] and len(ref) > 0
    assert got.gate == {"mode": "tiles", "tiles": 1, "run_fraction": 1.0}


def test_gate_on_a_single_image_model_is_refused_naming_the_model(models, tmp_path, capsys):
    paths, ds = models
    with pytest.raises(runtime.EdgeError, match=rf"{paths['single']}: --gate tiles needs a model that compares"):
        runtime.EdgeModel(paths["single"], gate="tiles")
    row = ds.rows(ds.images.image_id[:1])[0]
    assert app.main(["--model", str(paths["single"]), "--gate", "tiles", str(ds.root / row.path)]) == 2
    assert f"{paths['single']}: --gate tiles needs" in capsys.readouterr().err
    assert runtime.EdgeModel(paths["single"]).gate["mode"] == "none"


def test_the_record_says_how_the_pair_ran(models, tmp_path):
    paths, _ = models
    s = samples(1, 320)[0]
    from PIL import Image
    Image.fromarray(s.test).save(tmp_path / "a_test.png")
    Image.fromarray(s.template).save(tmp_path / "a_temp.png")
    Image.fromarray(s.test).save(tmp_path / "b_test.png")
    Image.fromarray(255 - s.test).save(tmp_path / "b_temp.png")  # another board: dense
    for mode in ("tiles", "none"):
        out = tmp_path / f"{mode}.jsonl"
        assert app.main(["--model", str(paths["pair"]), "--gate", mode, "--quiet", "--out", str(out),
                         str(tmp_path / "a_test.png"), str(tmp_path / "b_test.png")]) == 0
        a, b = (json.loads(line) for line in out.read_text().splitlines())
        if mode == "none":
            assert "gate" not in a and "gate" not in b
        else:
            assert a["gate"]["mode"] == "tiles" and a["gate"]["tiles"] >= 1 and 0 < a["gate"]["run_fraction"] < 1
            assert b["gate"]["mode"] == "dense" and "registration failed or another board" in b["gate"]["why"]


def test_the_decision_on_validation_reaches_the_contract(models, tmp_path):
    paths, ds = models
    ids = ds.images.image_id[:4].tolist()
    path = tmp_path / "m.onnx"
    path.write_bytes(paths["pair"].read_bytes())
    on = gating.decide(GateConfig(max_ap_drop=1.0, margin_px=48), path, ds, ids, "val")
    assert on["mode"] == "tiles" and on["margin_px"] == 48 and on["decided_on"]["images"] == 4
    assert on["decided_on"]["ap_drop"] == pytest.approx(on["decided_on"]["deeppcb_ap_dense"]
                                                        - on["decided_on"]["deeppcb_ap_tiles"], abs=1e-6)
    gating.write_gate(path, on)
    m = runtime.EdgeModel(path)
    assert m.gate["mode"] == "tiles" and m.gate["margin_px"] == 48 and m.info()["gate"]["mode"] == "tiles"
    assert runtime.EdgeModel(path, gate="none").gate["mode"] == "none"  # --gate overrides the contract
    off = gating.decide(GateConfig(mode="none"), path, ds, ids, "val")
    assert off["mode"] == "none" and off["decided_on"]["why"] == "gate.mode: none"
    single = gating.decide(GateConfig(), paths["single"], ds, ids, "val")
    assert single["mode"] == "none" and "single images" in single["decided_on"]["why"]


def test_the_changed_mask_is_the_tolerance_comparison_written_plainly():
    """changed_mask (uint8 without overflow, the row pass on the flat image) against loops over the window."""
    def plain(test, template, thr, size, tol):
        h, w = test.shape
        t, m = test.astype(int), template.astype(int)
        changed = np.zeros((h, w), bool)
        for y in range(h):
            for x in range(w):
                win = m[max(y - tol, 0):y + tol + 1, max(x - tol, 0):x + tol + 1]
                changed[y, x] = t[y, x] > win.max() + thr or t[y, x] < win.min() - thr
        out = np.zeros((h, w), bool)
        for y in range(h - size + 1):
            for x in range(w - size + 1):
                out[y, x] = changed[y:y + size, x:x + size].all()
        return out

    rng = np.random.default_rng(0)
    for shape in [(1, 9), (9, 1), (2, 2), (13, 17), (24, 8)]:
        for thr, size, tol in [(0, 1, 0), (64, 2, 1), (200, 1, 1), (255, 2, 0), (30, 3, 2)]:
            test = rng.integers(0, 256, shape).astype(np.uint8)
            template = np.where(rng.random(shape) < 0.5, test, rng.integers(0, 256, shape)).astype(np.uint8)
            assert np.array_equal(gate.changed_mask(test, template, thr, size, tol), plain(test, template, thr, size, tol)), \
                (shape, thr, size, tol)
    with pytest.raises(ValueError, match="diff_threshold 300"):
        gate.changed_mask(test, template, 300)

