"""The torch-free edge app: same detections as the PyTorch pipeline, CLI and folder mode on real files."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pcb_aoi
from pcb_aoi.data.dataset import Dataset
from pcb_aoi.deploy import export
from pcb_aoi.edge import app, runtime
from pcb_aoi.edge.inspector import Inspector
from pcb_aoi.edge.preprocess import register_template
from pcb_aoi.model import checkpoint
from pcb_aoi.model.inference import load_pair, predict, prepare_input, torch_runner
from pcb_aoi.model.network import Detector, DetectorConfig
from pcb_aoi.pipeline.config import CLASSES

SRC = Path(__file__).resolve().parents[1] / "src"


def overlapping_model(use_template: bool = True) -> Detector:
    """Untrained weights that give many peaks with overlapping boxes, so NMS has work to do."""
    torch.manual_seed(0)
    model = Detector(DetectorConfig(num_classes=6, in_channels=3 if use_template else 1, width=8))
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(3):
            model(torch.rand(4, model.cfg.in_channels, 64, 64))
        model.cls_head[-1].bias += 4.0  # scores around 0.4..0.9
        model.box_head[-1].weight.normal_(0, 0.05)
        model.box_head[-1].bias.copy_(torch.tensor([0.0, 0.0, 1.2, 1.2]))  # boxes ~13 px at stride 4: overlap
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_pipeline):
    """(model, raw onnx path, end-to-end onnx path, clean dataset) for a template model."""
    d, _ = tiny_pipeline
    ds = Dataset.load(d / "clean")
    out = tmp_path_factory.mktemp("edge")
    model = overlapping_model()
    ckpt = {"classes": list(CLASSES), "input_spec": checkpoint.input_spec(True), "model_config": model.cfg.to_dict()}
    x = torch.from_numpy(prepare_input(*load_pair(ds, ds.rows(ds.images.image_id[:1])[0]), True)[None])
    export.export(model, ckpt, x, out / "model.onnx", opset=17, score_threshold=0.3)
    export.export(model, ckpt, x, out / "model.e2e.onnx", opset=17, end_to_end=True, score_threshold=0.3)
    return model, out / "model.onnx", out / "model.e2e.onnx", ds


@pytest.mark.parametrize("threshold, top_k", [(0.2, 100), (0.0, 100), (0.5, 7)])
def test_numpy_decode_matches_torch_decode(threshold, top_k):
    from pcb_aoi.model.inference import decode
    rng = np.random.default_rng(0)
    heat = rng.normal(0, 2, (2, 6, 16, 20)).astype(np.float32)
    centres = rng.uniform(0, 64, (2, 2, 16, 20)).astype(np.float32)
    boxes = np.concatenate([centres - 6, centres + 6], 1)  # overlapping 12 px boxes
    ref = decode(torch.from_numpy(heat), torch.from_numpy(boxes), threshold, top_k)
    got = runtime.decode(heat, boxes, threshold, top_k)
    for r, g in zip(ref, got):
        assert len(r["labels"]) >= min(top_k, 10) // 2 and r["labels"].tolist() == g["labels"].tolist()
        assert np.abs(r["boxes"].numpy() - g["boxes"]).max() <= 1e-5
        assert np.abs(r["scores"].numpy() - g["scores"]).max() <= 1e-6


@pytest.mark.parametrize("variant, spin", [("raw", True), ("e2e", False)])
def test_edge_detections_match_the_pytorch_pipeline(models, variant, spin):
    model, raw, e2e_path, ds = models
    ids = ds.images.image_id[:4].tolist()
    ref = predict(torch_runner(model), ds, ids, True, batch_size=1, score_threshold=0.3)
    em = runtime.EdgeModel(raw if variant == "raw" else e2e_path, spin=spin)
    assert em.end_to_end == (variant == "e2e") and em.contract["score_threshold"] == 0.3
    # a checkpoint without provenance (this one): every key present, unknown, never a guess
    prov = em.info()["provenance"]
    assert prov["version"] == "unregistered" and prov["commit"] == prov["params_hash"] == prov["data"] == "unknown"
    total = 0
    for row in ds.rows(ids):
        test, template = runtime.read_pair(ds.root / row.path, ds.root / row.template_path)
        dets = em.detect(test, template)  # default threshold from the metadata
        got = {"boxes": np.array([d.box for d in dets]).reshape(-1, 4), "scores": np.array([d.score for d in dets]),
               "labels": np.array([CLASSES.index(d.cls) for d in dets])}
        same, box, score = export.match_detections([ref[row.image_id]], [got])  # order of near ties may differ
        assert same and box <= 1e-3 and score <= 1e-5, (row.image_id, box, score)
        total += len(dets)
    assert total > 10  # overlapping boxes: NMS removed some, kept many


def test_end_to_end_parity_gate_passes_and_fails(models):
    model, _, e2e_path, ds = models
    x = np.stack([prepare_input(*load_pair(ds, r), True) for r in ds.rows(ds.images.image_id[:3])])
    sess = runtime.ort_session(e2e_path)
    report = export.parity_e2e(model, sess, x, atol=1e-4)  # batch 3, exported at batch 1
    assert report["same_detections"] and report["detections"] > 10 and report["max_box_diff_px"] <= 0.5
    shifted = overlapping_model()
    with torch.no_grad():
        shifted.box_head[-1].bias[0] += 0.5  # boxes move by 2 px on the PyTorch side
    with pytest.raises(export.ParityError, match=r"max box difference 2 px"):
        export.parity_e2e(shifted, sess, x, atol=1e-4)


# --- the app in a Python where torch cannot be imported --------------------------------------------

ALLOWED = {"numpy", "onnxruntime", "PIL", "pcb_aoi"}
CHECK_IMPORTS = """
import importlib, pkgutil, sys
import pcb_aoi, pcb_aoi.edge
for m in pkgutil.iter_modules(pcb_aoi.edge.__path__, 'pcb_aoi.edge.'):  # every module of the edge package
    importlib.import_module(m.name)
for name in pcb_aoi.edge.__all__:  # and every name it exports, and the top-level API's edge part
    getattr(pcb_aoi.edge, name)
pcb_aoi.load_model, pcb_aoi.detect
from pcb_aoi.edge.app import main
rc = main(sys.argv[1:])
extra = sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {ALLOWED} - {'__main__', '__mp_main__', '_distutils_hack'})
if extra:
    print(f'edge app imported modules outside numpy/onnxruntime/PIL: {extra}', file=sys.stderr)
    sys.exit(99)
sys.exit(rc)
""".replace("{ALLOWED}", repr(ALLOWED))


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    """Environment whose PYTHONPATH shadows torch/torchvision/pandas (and the optional OpenCV) with modules
    that fail to import."""
    block = tmp_path_factory.mktemp("block")
    for name in ("torch", "torchvision", "pandas", "cv2"):
        (block / f"{name}.py").write_text(f"raise ImportError('{name} is not installed on the edge box')\n")
    return {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{SRC}"}


def detect(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-c", CHECK_IMPORTS, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def drop_pair(ds: Dataset, row, folder: Path, stem: str) -> None:
    """Copy a dataset image and its template into ``folder`` as DeepPCB names STEM_test / STEM_temp."""
    for src, suffix in ((row.path, "_test"), (row.template_path, "_temp")):
        data = (ds.root / src).read_bytes()
        tmp = folder / f".{stem}{suffix}.png.tmp"
        tmp.write_bytes(data)
        tmp.rename(folder / f"{stem}{suffix}.png")  # the safe way to drop a file into a watched folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_read_pair_decodes_both_files_at_once_and_names_the_bad_one(tmp_path):
    a, b, bad = tmp_path / "a.png", tmp_path / "b_test.jpg", tmp_path / "bad.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64).astype(np.uint8)).save(a)
    Image.fromarray(np.full((48, 64, 3), (10, 200, 90), np.uint8)).save(b)  # RGB JPEG: Pillow, averaged
    bad.write_bytes(b"not an image")
    test, template = runtime.read_pair(a, b)
    assert np.array_equal(test, runtime.read_grey(a)) and np.array_equal(template, runtime.read_grey(b))
    assert runtime.read_pair(b, None)[1] is None
    for pair, name in [((a, bad), "bad.png"), ((bad, a), "bad.png"), ((a, tmp_path / "gone.png"), "gone.png")]:
        with pytest.raises(runtime.EdgeError, match=name):
            runtime.read_pair(*pair)
    with pytest.raises(runtime.EdgeError, match="bad.png"):  # both bad: the test image is named
        runtime.read_pair(bad, tmp_path / "gone.png")


def test_cli_on_good_corrupt_and_missing_files_without_torch(models, no_torch_env, tmp_path):
    model, _, e2e_path, ds = models
    rows = ds.rows(ds.images.image_id[:2])
    for i, row in enumerate(rows):
        drop_pair(ds, row, tmp_path, f"g{i}")
    (tmp_path / "bad_test.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "bad_temp.png").write_bytes((ds.root / rows[0].template_path).read_bytes())
    (tmp_path / "lonely.png").write_bytes((ds.root / rows[0].path).read_bytes())  # no template anywhere
    images = [tmp_path / "g0_test.png", tmp_path / "bad_test.png", tmp_path / "missing_test.png",
              tmp_path / "lonely.png", tmp_path / "g1_test.png"]
    r = detect(no_torch_env, "--model", e2e_path, *images, "--out", tmp_path / "out.jsonl",
               "--overlay-dir", tmp_path / "overlays")
    assert r.returncode == 1, r.stderr  # some images failed; the others have results
    assert "3 of 5 image(s) failed" in r.stderr and "Traceback" not in r.stderr
    recs = {Path(x["file"]).name: x for x in read_jsonl(tmp_path / "out.jsonl")}
    assert list(recs) == [p.name for p in images]
    assert "not a readable image" in recs["bad_test.png"]["error"]
    r = detect(no_torch_env, "--model", e2e_path, *images, "--out", tmp_path / "out2.jsonl", "--workers", "2")
    assert r.returncode == 1 and "3 of 5 image(s) failed" in r.stderr, r.stderr  # worker processes: the same records
    assert without_ms(read_jsonl(tmp_path / "out2.jsonl")) == without_ms(recs.values())
    assert "image not found" in recs["missing_test.png"]["error"]
    assert "lonely.png: no template" in recs["lonely.png"]["error"]
    ref = predict(torch_runner(model), ds, [r.image_id for r in rows], True, batch_size=1, score_threshold=0.3)
    for i, row in enumerate(rows):
        rec = recs[f"g{i}_test.png"]
        assert rec["status"] == "ok" and len(rec["detections"]) == len(ref[row.image_id]["labels"]) > 0
        assert (tmp_path / "overlays" / f"g{i}_test.overlay.png").is_file()
    # A higher --score keeps a subset; --template-dir finds the template under the same name.
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "g0_test.png").write_bytes((tmp_path / "g0_temp.png").read_bytes())
    median = float(np.median([d["score"] for d in recs["g0_test.png"]["detections"]]))
    r = detect(no_torch_env, "--model", e2e_path, tmp_path / "g0_test.png", "--template-dir", tmp_path / "tpl",
               "--score", str(median))
    assert r.returncode == 0, r.stderr
    dets = json.loads(r.stdout)["detections"]
    assert 0 < len(dets) < len(recs["g0_test.png"]["detections"]) and min(d["score"] for d in dets) > median


def without_ms(records) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "ms"} for r in records]


def test_worker_processes_give_the_records_of_one_process_in_order(models, tmp_path):
    _, raw, _, ds = models
    for i, row in enumerate(ds.rows(ds.images.image_id[:3])):
        drop_pair(ds, row, tmp_path, f"g{i}")
    (tmp_path / "bad_test.png").write_bytes(b"not an image")
    (tmp_path / "bad_temp.png").write_bytes((tmp_path / "g0_temp.png").read_bytes())
    images = [tmp_path / n for n in ("g0_test.png", "bad_test.png", "g1_test.png", "gone_test.png", "g2_test.png")] * 2
    args = argparse.Namespace(template=None, template_dir=None, score=None, overlay_dir=None)
    model = runtime.EdgeModel(raw, gate="tiles")
    model.gate.update(margin_px=48, max_fraction=1.0)  # the parent's settings reach the workers (records show the tiles)
    one = without_ms(Inspector(model, args).process_all(images))
    assert [r["status"] for r in one[:5]] == ["ok", "error", "ok", "error", "ok"]
    assert {r["gate"]["mode"] for r in one if r["status"] == "ok"} == {"tiles"}
    with Inspector(model, args, workers=2) as app:
        started = []
        assert without_ms(app.process_all(images, on_start=started.append)) == one
        assert started == images
        records = app.process_all(images)
        assert without_ms([next(records)]) == one[:1]
        records.close()  # stopped early: the answers still on their way are read and dropped
        assert without_ms(app.process_all(images[2:5])) == one[2:5]  # the pipes are still in step
        for proc in app._pool.procs:
            proc.kill()
            proc.join()
        with pytest.raises(runtime.EdgeError, match="g0_test.png: a worker process stopped"):
            list(app.process_all(images))
        assert app._pool is None
        assert without_ms(app.process_all(images[:2])) == one[:2]  # new workers on the next call


def test_cli_converts_rgb_pads_odd_sizes_and_refuses_mismatched_templates(models, no_torch_env, tmp_path):
    _, raw, _, ds = models
    row = ds.rows(ds.images.image_id[:1])[0]
    test, template = runtime.read_grey(ds.root / row.path), runtime.read_grey(ds.root / row.template_path)
    Image.fromarray(np.repeat(test[:100, :90, None], 3, 2)).save(tmp_path / "rgb_test.png")  # RGB, 90x100
    Image.fromarray(template[:100, :90]).save(tmp_path / "rgb_temp.png")
    Image.fromarray(template[:64, :64]).save(tmp_path / "small.png")
    r = detect(no_torch_env, "--model", raw, tmp_path / "rgb_test.png")
    assert r.returncode == 0, r.stderr
    em = runtime.EdgeModel(raw)
    expected = em.detect(test[:100, :90], template[:100, :90])
    assert len(json.loads(r.stdout)["detections"]) == len(expected)
    assert all(d.box[2] <= 90 and d.box[3] <= 100 for d in expected)  # clipped to the image
    r = detect(no_torch_env, "--model", raw, tmp_path / "rgb_test.png", "--template", tmp_path / "small.png")
    assert r.returncode == 1 and "template is 64x64 px, image 90x100 px" in r.stdout
    # The Python API: files or arrays, the same detections as the app's model.
    api = pcb_aoi.detect(pcb_aoi.load_model(raw), tmp_path / "rgb_test.png", tmp_path / "rgb_temp.png")
    assert [d.to_dict() for d in api] == [d.to_dict() for d in expected]


def test_packages_import_lazily_without_torch(no_torch_env):
    """Each sub-package exports its names lazily: importing one (and pcb_aoi) needs no torch or pandas."""
    code = ("import pcb_aoi, sys; [__import__(f'pcb_aoi.{p}') for p in "
            "('data', 'model', 'evaluation', 'deploy', 'remote', 'pipeline', 'edge')]; "
            "print(pcb_aoi.__version__, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pandas', "
            "'onnxruntime')))")
    r = subprocess.run([sys.executable, "-c", code], env=no_torch_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1:] == ["[]"] and r.stdout.split()[0] != ""


def test_cli_refuses_a_file_that_is_not_our_onnx(no_torch_env, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "notes.onnx").write_text("not a model")
    r = detect(no_torch_env, "--model", tmp_path / "notes.onnx", tmp_path / "x.png")
    assert r.returncode == 2 and "notes.onnx: not a loadable ONNX model" in r.stderr and "Traceback" not in r.stderr
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["out"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "other.onnx")
    r = detect(no_torch_env, "--model", tmp_path / "other.onnx", tmp_path / "x.png")
    assert r.returncode == 2 and "other.onnx: ONNX model without pcb-aoi metadata" in r.stderr
    r = detect(no_torch_env, "--model", tmp_path / "absent.onnx", tmp_path / "x.png")
    assert r.returncode == 2 and "absent.onnx: model file not found" in r.stderr
    import onnxruntime
    if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
        r = detect(no_torch_env, "--model", tmp_path / "other.onnx", tmp_path / "x.png", "--provider", "tensorrt")
        assert r.returncode == 2 and "execution provider 'tensorrt' is not available" in r.stderr


def wait_for(cond, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def test_watch_mode_processes_new_files_once_and_resumes_after_sigterm(models, no_torch_env, tmp_path):
    _, _, e2e_path, ds = models
    rows = ds.rows(ds.images.image_id[:4])
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    drop_pair(ds, rows[0], inbox, "a")  # there before the start
    (inbox / ".e_test.png.tmp").write_bytes(b"half a file")  # an unfinished copy: ignored
    args = ["--model", e2e_path, "--watch", inbox, "--out-dir", out, "--poll", "0.1", "--settle", "0.5"]

    def start():
        return subprocess.Popen([sys.executable, "-c", CHECK_IMPORTS, *map(str, args)], env=no_torch_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def lines():
        return read_jsonl(out / "results.jsonl") if (out / "results.jsonl").exists() else []

    proc = start()
    try:
        wait_for(lambda: len(lines()) == 1)
        # dropped while it runs: a corrupt image, and one written slowly in chunks (never read half-written)
        (inbox / "c_temp.png").write_bytes((ds.root / rows[1].template_path).read_bytes())
        (inbox / "c_test.png").write_bytes(b"garbage, not an image")
        (inbox / "b_temp.png").write_bytes((ds.root / rows[1].template_path).read_bytes())
        data = (ds.root / rows[1].path).read_bytes()
        with open(inbox / "b_test.png", "wb") as f:
            for i in range(0, len(data), len(data) // 5 + 1):
                f.write(data[i:i + len(data) // 5 + 1])
                f.flush()
                time.sleep(0.15)
        wait_for(lambda: len(lines()) == 3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "SIGTERM: stopping after the current image" in err
        drop_pair(ds, rows[2], inbox, "d")  # arrives while the app is down
        proc = start()
        wait_for(lambda: len(lines()) == 4)
        time.sleep(1.0)  # several more polls: nothing is redone
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "(3 image(s) already done)" in err
    finally:
        if proc.poll() is None:
            proc.kill()
    recs = lines()
    names = [Path(r["file"]).name for r in recs]
    assert sorted(names) == ["a_test.png", "b_test.png", "c_test.png", "d_test.png"]  # once each
    status = {Path(r["file"]).name: r["status"] for r in recs}
    assert status == {"a_test.png": "ok", "b_test.png": "ok", "c_test.png": "error", "d_test.png": "ok"}
    for n in ("a", "b", "d"):
        per_image = json.loads((out / f"{n}_test.png.json").read_text())
        assert per_image["status"] == "ok" and per_image["detections"]
    assert "not a readable image" in json.loads((out / "c_test.png.json").read_text())["error"]


def test_edge_latency_benchmark_runs_without_torch(models, no_torch_env, tmp_path):
    _, raw, e2e_path, ds = models
    out = tmp_path / "edge_latency.json"
    r = subprocess.run([sys.executable, str(SRC.parent / "benchmarks/edge_latency.py"), "--models", str(raw), str(e2e_path),
                        "--pairs", str(ds.root), "--images", "3", "--runs", "4", "--warmup", "1", "--spin", "on", "off",
                        "--out", str(out)], env=no_torch_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert [(x["model"], x["provider"], x["spin"], x["end_to_end"]) for x in report["results"]] == [
        ("model.onnx", "cpu", "on", False), ("model.onnx", "cpu", "off", False),
        ("model.e2e.onnx", "cpu", "on", True), ("model.e2e.onnx", "cpu", "off", True)]
    for x in report["results"]:
        assert 0 < x["without_file_decode_ms_p50"] <= x["ms_p50"] <= x["ms_p95"] <= x["ms_p99"]
        assert x["stream_fps"] > 0 and x["stream_ms_p50"] > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, str(SRC.parent / "benchmarks/edge_latency.py"), "--models", str(raw),
                        "--pairs", str(empty)], env=no_torch_env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no X_test.* / X_temp.* image pairs" in r.stderr


def test_operator_profile_names_where_the_time_goes(models, tmp_path):
    model, raw, _, _ = models
    checkpoint.save(tmp_path / "model.pt", model, CLASSES, use_template=True)
    out = tmp_path / "profile.json"
    r = subprocess.run([sys.executable, str(SRC.parent / "benchmarks/profile_ops.py"), "--model", str(tmp_path / "model.pt"),
                        "--onnx", str(raw), "--size", "64", "--runs", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    for name in ("pytorch-eager-fp32", "onnxruntime-fp32"):
        assert report[name]["ms_p50"] > 0 and 99 <= sum(report[name]["op_share_pct"].values()) <= 101, report[name]
    # which operator leads is a timing (at 64 px on a busy machine a shape op can): only that convolutions are timed
    assert report["onnxruntime-fp32"]["op_share_pct"].get("Conv", 0) > 0
    assert {"stride 2", "stride 4", "stride 8", "stride 16"} <= set(report["onnxruntime-fp32"]["conv_share_by_stride_pct"])


def test_a_model_trained_on_registered_pairs_makes_the_app_register_each_pair(models, tmp_path):
    model, plain_path, _, ds = models
    ckpt = {"classes": list(CLASSES), "input_spec": checkpoint.input_spec(True, register_max_px=8),
            "model_config": model.cfg.to_dict()}
    row = ds.rows(ds.images.image_id[:1])[0]
    test, template = runtime.read_grey(ds.root / row.path), runtime.read_grey(ds.root / row.template_path)
    x = torch.from_numpy(prepare_input(test, template, True)[None])
    export.export(model, ckpt, x, tmp_path / "registered.onnx", opset=17, score_threshold=0.3)
    registering, plain = runtime.EdgeModel(tmp_path / "registered.onnx"), runtime.EdgeModel(plain_path)
    assert registering.contract["register_max_px"] == 8 and plain.contract["register_max_px"] == 0
    moved = np.roll(template, (3, -5), axis=(0, 1))  # a badly registered pair
    fixed, shift = register_template(test, moved, 8)
    assert max(abs(shift[0] - 5), abs(shift[1] + 3)) <= 1  # the synthetic pairs come up to 1 px off already
    as_dicts = lambda dets: [d.to_dict() for d in dets]  # noqa: E731
    assert as_dicts(registering.detect(test, moved)) == as_dicts(plain.detect(test, fixed))
    assert as_dicts(plain.detect(test, moved)) != as_dicts(plain.detect(test, fixed)), "the shift changed nothing"
    # The app registers in its reader thread: the same detections.
    Image.fromarray(test).save(tmp_path / "board.png")
    Image.fromarray(moved).save(tmp_path / "golden.png")
    assert app.main(["--model", str(tmp_path / "registered.onnx"), str(tmp_path / "board.png"), "--template",
                 str(tmp_path / "golden.png"), "--out", str(tmp_path / "out.jsonl"), "--quiet"]) == 0
    got = read_jsonl(tmp_path / "out.jsonl")[0]["detections"]
    assert [d.pop("id") for d in got] == list(range(len(got)))
    assert got == as_dicts(plain.detect(test, fixed))
