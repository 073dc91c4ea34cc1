"""Peer detectors (deploy.peer): YOLOv8n built offline from its yaml, exported FP32 and INT8, timed by the same
loops as our models; a peer named without ultralytics stops the benchmark stage with the key and the fix.
Tests that need ultralytics (an optional AGPL extra, not in `dev`) skip without it."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_args

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from pcb_aoi.deploy import benchmark, measure, peer
from pcb_aoi.deploy.quantize import quantized_conv_weights
from pcb_aoi.pipeline.config import BenchmarkConfig
from test_benchmark import exported  # noqa: F401  (fixture: a tiny exported model and its dataset)

ROOT = Path(__file__).resolve().parents[1]
HAVE_ULTRALYTICS = importlib.util.find_spec("ultralytics") is not None
needs_ultralytics = pytest.mark.skipif(not HAVE_ULTRALYTICS, reason="ultralytics not installed (optional AGPL extra: "
                                       "pip install 'pcb-aoi[peer]')")

# Run in a child process: every network connection (and name lookup) is recorded and refused.
OFFLINE_BUILD = """
import json, socket, sys
tried = []
def refuse(*a, **k):
    tried.append(repr(a[1:] if a and isinstance(a[0], socket.socket) else a)[:120])
    raise OSError("network disabled by the test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.getaddrinfo = socket.create_connection = refuse
from pcb_aoi.deploy import peer
path = peer.build(sys.argv[1], sys.argv[2], (int(sys.argv[3]), int(sys.argv[4])), 6)
print(json.dumps({"path": str(path), "tried": tried}))
"""


def env(tmp: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "YOLO_CONFIG_DIR": str(tmp / "yolo-settings"),
            "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}


def test_the_config_knows_the_same_peers_as_the_module():
    names = get_args(get_args(BenchmarkConfig.model_fields["peers"].annotation)[0])
    assert set(names) == set(peer.PEERS) and BenchmarkConfig().peers == ()  # default: no ultralytics needed


def test_a_named_peer_without_ultralytics_stops_the_stage_naming_the_key_and_the_fix(tmp_path, exported):  # noqa: F811
    path, raw, _, clean, split = exported
    (tmp_path / "params.yaml").write_text("benchmark:\n  peers: [yolo11n]\n")
    out = tmp_path / "benchmark.json"
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["ultralytics"] = None  # as if it were not installed
        sys.argv = ["benchmark.py", "--model", {str(path)!r}, "--onnx", {str(raw)!r}, "--clean", {str(clean)!r},
                    "--split", {str(split)!r}, "--out", {str(out)!r}, "--params", {str(tmp_path / 'params.yaml')!r}]
        runpy.run_path({str(ROOT / 'src/stages/benchmark.py')!r}, run_name="__main__")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(tmp_path), timeout=300)
    assert r.returncode == 1, r.stderr
    assert "benchmark.peers names ['yolo11n'] but ultralytics is not installed" in r.stderr
    assert "pip install 'pcb-aoi[peer]'" in r.stderr and not out.exists()  # stopped before any work


def test_input_is_the_grey_image_on_three_channels_padded_with_letterbox_grey():
    grey = np.arange(60 * 90, dtype=np.uint8).reshape(60, 90)
    x = peer.to_input(grey, peer.export_size(60, 90))
    assert x.shape == (1, 3, 64, 96) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 1, :60, :90], grey / 255, rtol=1e-6)
    assert np.array_equal(x[0, 0], x[0, 1]) and np.array_equal(x[0, 1], x[0, 2])
    assert np.allclose(x[0, :, 60:], 114 / 255) and np.allclose(x[0, :, :, 90:], 114 / 255)


def constant_peer(path: Path, out: np.ndarray) -> Path:
    """An ONNX file with a peer's input (1, 3, 64, 96) whose output0 is always ``out`` (1, 4 + nc, anchors)."""
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(out.astype(np.float32)))
    zero = helper.make_node("ReduceSum", ["images"], ["s"], keepdims=0)  # uses the input: 0 * sum + c
    mul = helper.make_node("Mul", ["s", "z"], ["s0"])
    add = helper.make_node("Add", ["c", "s0"], ["output0"])
    graph = helper.make_graph([const, zero, mul, add], "peer", [
        helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 96])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(out.shape))],
        [numpy_helper.from_array(np.zeros((), np.float32), "z")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_decode_keeps_the_best_class_and_suppresses_overlaps_per_class(tmp_path):
    #              cx   cy  w  h  class a, class b
    anchors = [(10, 10, 4, 4, 0.9, 0.1),  # -> a 0.9 [8, 8, 12, 12]
               (11, 10, 4, 4, 0.8, 0.2),  # IoU with the first 12 / 20 = 0.6 > 0.5, same class: suppressed
               (11, 10, 4, 4, 0.1, 0.6),  # same box, class b: kept
               (88, 30, 6, 6, 0.3, 0.7),  # x2 = 91 clipped to the image's 90 px
               (40, 40, 4, 4, 0.4, 0.45)]  # below the threshold 0.5
    out = np.asarray(anchors, np.float32).T[None]  # (1, 6, 5)
    m = peer.PeerModel(constant_peer(tmp_path / "c.onnx", out), ["a", "b"], 0.5, threads=1)
    dets = m.detect(np.zeros((60, 90), np.uint8))
    assert [(d.cls, round(d.score, 3), d.box) for d in dets] == [
        ("a", 0.9, [8.0, 8.0, 12.0, 12.0]), ("b", 0.7, [85.0, 27.0, 90.0, 33.0]), ("b", 0.6, [9.0, 8.0, 13.0, 12.0])]
    assert m.candidates == [4] and "4.0 boxes per image passed the threshold" in m.note()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """yolov8n at 64x96 built in a child process with the network refused, then quantized u8s7; 3 grey images."""
    if not HAVE_ULTRALYTICS:
        pytest.skip("ultralytics not installed (optional AGPL extra: pip install 'pcb-aoi[peer]')")
    tmp = tmp_path_factory.mktemp("peer")
    r = subprocess.run([sys.executable, "-c", OFFLINE_BUILD, "yolov8n", str(tmp), "64", "96"], capture_output=True,
                       text=True, env=env(tmp), timeout=300, cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):  # DeepPCB-like: dark copper on a light board, 60x90 (padded to 64x96)
        grey = np.where(rng.random((60, 90)) < 0.3, 40, 200).astype(np.uint8)
        Image.fromarray(grey).save(tmp / f"{i}_test.png")
        images.append(tmp / f"{i}_test.png")
    fp32 = Path(result["path"])
    int8 = peer.quantize(fp32, tmp / "yolov8n.int8.onnx", [np.asarray(Image.open(p)) for p in images], "u8s7")
    return result["tried"], fp32, int8, images


@needs_ultralytics
def test_the_peer_builds_offline_with_our_classes(built):
    tried, fp32, _, _ = built
    assert tried == []  # not one connection or name lookup: no weights, fonts or update checks
    proto = onnx.load(str(fp32))
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    # (1, 3, H, W) in; (1, 4 boxes + 6 classes, anchors at strides 8, 16, 32) out
    assert dims(proto.graph.input[0]) == [1, 3, 64, 96]
    assert dims(proto.graph.output[0]) == [1, 10, 8 * 12 + 4 * 6 + 2 * 3]


@needs_ultralytics
def test_int8_keeps_the_u8s7_promise_and_the_box_decoding_float(built):
    _, fp32, int8, _ = built
    assert int8.stat().st_size < fp32.stat().st_size / 2
    q = onnx.load(str(int8))
    weights = quantized_conv_weights(q)
    assert weights and all(w.dtype == np.int8 and np.abs(w).max() <= 64 for w in weights.values())
    dfl = [n for n in q.graph.node if n.op_type == "Conv" and "/dfl/" in n.name]
    assert dfl and not any(n.name in weights for n in dfl)  # the DFL conv stays float


@needs_ultralytics
def test_both_files_are_timed_by_the_apps_loops(built):
    _, fp32, int8, images = built
    pairs = measure.Pairs([p.stem for p in images], images, {p: None for p in images})
    rows = peer.time_all({"yolov8n": (fp32, int8)}, pairs, ["a", "b", "c", "d", "e", "f"], 0.3, warmup=1, runs=3,
                        stream_pairs=3, threads=1, providers=["cpu"], int8_format="u8s7")
    assert [(r["peer"], r["format"], r["int8_format"]) for r in rows] == [("yolov8n", "fp32", None),
                                                                         ("yolov8n", "int8", "u8s7")]
    for r in rows:
        assert r["input_size"] == [96, 64] and r["provider"] == "CPUExecutionProvider" and r["threads"] == 1
        assert r["ms_p99"] >= r["ms_p50"] > 0 and r["fps"] > 0 and r["stream_pairs"] == 3
        assert r["fps"] * r["wall_s"] == pytest.approx(3, rel=0.01)
        assert "random weights" in r["note"] and "decode + NMS in numpy included" in r["note"]
    assert rows[1]["size_mb"] < rows[0]["size_mb"]


@needs_ultralytics
def test_the_benchmark_reports_peers_beside_our_variants(exported, tmp_path):  # noqa: F811
    path, raw, _, clean, split = exported
    cfg = BenchmarkConfig(warmup=1, runs=2, stream_pairs=3, threads=1, peers=("yolov8n",))
    report = benchmark.run(cfg, benchmark.Inputs(path, raw, clean, split), tmp_path / "benchmark.json",
                           plots_dir=tmp_path / "plots")
    ours = next(v for v in report["variants"] if v["file"] == "model.onnx")
    assert [(p["peer"], p["format"]) for p in report["peers"]] == [("yolov8n", "fp32"), ("yolov8n", "int8")]
    for p in report["peers"]:
        assert p["input_size"] == report["image_size"] and p["int8_format"] in (None, "u8s7")
        assert p["fps_vs_onnx_fp32"] == round(p["fps"] / ours["fps"], 3)
        assert p["ms_p50_vs_onnx_fp32"] == round(p["ms_p50"] / ours["ms_p50"], 3)
    assert all("peer" not in v for v in report["variants"])  # no accuracy columns for untrained peers
    assert json.loads((tmp_path / "benchmark.json").read_text()) == report
