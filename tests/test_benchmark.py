"""The benchmark measures what ships: every ONNX file through the edge app's code, fps from a timed stream,
DeepPCB's AP from each runtime's own detections. Real onnxruntime sessions on a tiny exported model."""
import json

import numpy as np
import pytest
import torch

from pcb_aoi.data import dataset
from pcb_aoi.data.dataset import Dataset
from pcb_aoi.deploy import benchmark, export, measure
from pcb_aoi.edge.runtime import EdgeModel
from pcb_aoi.model import checkpoint
from pcb_aoi.model.inference import load_pair, prepare_input, torch_runner
from pcb_aoi.pipeline.config import CLASSES, BenchmarkConfig
from test_edge import overlapping_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_pipeline):
    """(checkpoint, raw onnx, end-to-end onnx, clean dataset folder, split folder) of one tiny template model."""
    d, _ = tiny_pipeline
    ds = Dataset.load(d / "clean")
    out = tmp_path_factory.mktemp("bench")
    model = overlapping_model()
    checkpoint.save(out / "model.pt", model, CLASSES, use_template=True)
    _, ckpt = checkpoint.load(out / "model.pt")
    x = torch.from_numpy(prepare_input(*load_pair(ds, ds.rows(ds.images.image_id[:1])[0]), True)[None])
    export.export(model, ckpt, x, out / "model.onnx", opset=17, score_threshold=0.3)
    export.export(model, ckpt, x, out / "model.e2e.onnx", opset=17, end_to_end=True, score_threshold=0.3)
    return out / "model.pt", out / "model.onnx", out / "model.e2e.onnx", d / "clean", d / "split"


class CountingModel(EdgeModel):
    """The edge model, each ``detect`` call recorded (image shape, template given): proves which pairs ran."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def detect(self, test, template=None, score_threshold=None, name="image", registered=False, plan=None):
        self.calls.append((test.shape, template is not None, score_threshold))
        return super().detect(test, template, score_threshold, name, registered, plan)


def test_stream_fps_is_pairs_over_the_measured_wall_time_and_cycles_a_small_split(exported):
    _, raw, _, clean, split = exported
    ds = Dataset.load(clean)
    pairs = measure.Pairs.of(ds, dataset.test_ids(split)[:2])
    m = CountingModel(raw)
    ticks = iter([100.0, 104.0])  # the clock read at the stream's start and end: 4 s
    r = measure.stream(m, pairs, 9, clock=lambda: next(ticks))
    assert r == {"fps": 2.25, "stream_pairs": 9, "wall_s": 4.0}  # 9 pairs / 4 s
    assert len(m.calls) == 9 and all(template for _, template, _ in m.calls)  # 2 test pairs cycled to 9
    m.calls.clear()
    r = measure.stream(m, pairs, 5)  # the real clock
    assert r["stream_pairs"] == len(m.calls) == 5 > len(pairs.tests)
    assert r["fps"] * r["wall_s"] == pytest.approx(5, rel=0.01) and r["wall_s"] > 0


def test_latency_times_each_pair_after_the_warm_up_at_the_models_threshold(exported):
    _, raw, _, clean, split = exported
    pairs = measure.Pairs.of(Dataset.load(clean), dataset.test_ids(split))
    m = CountingModel(raw)
    r = measure.latency(m, pairs, warmup=2, runs=7)
    assert len(m.calls) == 9 and {thr for _, _, thr in m.calls} == {None}  # None: the contract's threshold
    assert r["ms_p99"] >= r["ms_p95"] >= r["ms_p50"] > 0


def test_raw_end_to_end_and_pytorch_give_the_same_detections_and_deeppcb_ap(exported):
    path, raw, e2e, clean, split = exported
    ds, ids = Dataset.load(clean), dataset.test_ids(split)
    pairs = measure.Pairs.of(ds, ids)
    model, ckpt = checkpoint.load(path)
    runtimes = {"raw": EdgeModel(raw), "e2e": EdgeModel(e2e), "torch": measure.TorchModel(torch_runner(model), ckpt, 0.3)}
    assert runtimes["e2e"].end_to_end and not runtimes["raw"].end_to_end
    dets = {k: measure.detections(m, pairs, 0.01) for k, m in runtimes.items()}
    for k in ("e2e", "torch"):
        for i in ids:
            assert len(dets[k][i]["scores"]) == len(dets["raw"][i]["scores"]) > 0, (k, i)
            np.testing.assert_array_equal(dets[k][i]["labels"], dets["raw"][i]["labels"])
            np.testing.assert_allclose(dets[k][i]["boxes"], dets["raw"][i]["boxes"], atol=1e-3)
            np.testing.assert_allclose(dets[k][i]["scores"], dets["raw"][i]["scores"], atol=1e-5)
    # The untrained model finds none of the dataset's defects (every AP 0, equal for nothing); ground truth
    # made of every third reference detection (and one box none finds) gives an AP strictly between 0 and 1.
    ref = dets["torch"]
    gt = {i: {"boxes": np.concatenate([ref[i]["boxes"][::3], [[0, 0, 3, 3]]]).astype(np.float32),
              "labels": np.concatenate([ref[i]["labels"][::3], [0]])} for i in ids}
    scores = {k: benchmark.score(m, pairs, gt, tuple(CLASSES), 0.3) for k, m in runtimes.items()}
    assert 0 < scores["raw"]["deeppcb_ap"] < 1 and 0 < scores["raw"]["deeppcb_fscore"] < 1
    for k in ("e2e", "torch"):
        assert scores[k]["deeppcb_ap"] == scores["raw"]["deeppcb_ap"], k
        assert scores[k]["deeppcb_fscore"] == scores["raw"]["deeppcb_fscore"], k
        assert scores[k]["map50"] == pytest.approx(scores["raw"]["map50"], abs=1e-6), k


def test_run_reports_every_file_with_a_measured_stream(exported, tmp_path):
    path, raw, e2e, clean, split = exported
    cfg = BenchmarkConfig(warmup=1, runs=3, stream_pairs=7, threads=1)
    threads = torch.get_num_threads()
    report = benchmark.run(cfg, benchmark.Inputs(path, raw, clean, split, e2e=e2e), tmp_path / "benchmark.json",
                           plots_dir=tmp_path / "plots")
    assert report["threads"] == 1 and torch.get_num_threads() == threads  # the process's setting restored
    assert json.loads((tmp_path / "benchmark.json").read_text()) == report
    variants = report["variants"]
    assert [(v["file"], v["decode"]) for v in variants][:3] == [
        ("model.pt", "torch"), ("model.onnx", "numpy"), ("model.e2e.onnx", "in-graph")]
    assert report["test_images"] < cfg.stream_pairs  # the stream cycles the test pairs
    for v in variants:
        assert {"file", "format", "provider", "fps", "stream_pairs", "wall_s", "ms_p50", "ms_p95", "ms_p99",
                "deeppcb_ap", "deeppcb_fscore", "map50", "size_mb"} <= set(v)
        assert v["stream_pairs"] == 7 and v["fps"] * v["wall_s"] == pytest.approx(7, rel=0.01)
        assert v["format"] == "fp32"
        if v.get("gate", "none") == "none":  # dense: the same detections everywhere
            assert v["deeppcb_ap"] == variants[0]["deeppcb_ap"]
    # the FP32 raw file difference-gated beside the dense ones, last; the e2e file only dense
    assert {v["file"] for v in variants if v.get("gate") == "tiles"} == {"model.onnx"} and variants[-1]["gate"] == "tiles"
    assert report["gate_shipped"] == {"model.onnx": "none", "model.e2e.onnx": "none"}
    rows = (tmp_path / "plots/latency_map.csv").read_text().splitlines()
    assert rows[0] == "variant,ms_p50,fps,map50,deeppcb_ap" and rows[3].startswith("model.e2e.onnx@")
    assert rows[4].startswith("model.onnx+tiles@")
