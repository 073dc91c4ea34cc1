"""INT8: a real onnxruntime static quantization of a tiny model, its accuracy gate, and the edge app on it."""
import json

import numpy as np
import onnx
import pytest
import torch

from pcb_aoi import checkpoint, edge, export, quantize
from pcb_aoi.config import CLASSES, QuantizeConfig
from pcb_aoi.dataset import Dataset
from pcb_aoi.inference import load_pair, prepare_input
from test_edge import overlapping_model


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, tiny_pipeline):
    d, _ = tiny_pipeline
    ds = Dataset.load(d / "clean")
    model = overlapping_model()
    ckpt = {"classes": list(CLASSES), "input_spec": checkpoint.input_spec(True), "model_config": model.cfg.to_dict()}
    x = torch.from_numpy(prepare_input(*load_pair(ds, ds.rows(ds.images.image_id[:1])[0]), True)[None])
    path = tmp_path_factory.mktemp("q") / "model.onnx"
    export.export(model, ckpt, x, path, opset=17)
    return path


def test_int8_model_loads_passes_its_gate_and_stays_close_to_fp32(fp32, tiny_pipeline, tmp_path):
    d, _ = tiny_pipeline
    out = tmp_path / "model.int8.onnx"
    report = quantize.run(QuantizeConfig(calibration_images=6), fp32, d / "augmented", d / "clean", d / "split", out)
    assert report["calibration_images"] == 6 and report["map50_drop"] <= 0.005
    assert report["size_mb"] < 0.5 * report["fp32_size_mb"]  # int8 weights
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    assert report["nodes_kept_float"] > 0 and "Exp" in ops  # the box decoding stays float
    # Loads in onnxruntime, carries the contract, and its raw outputs stay near the FP32 model's.
    em = edge.EdgeModel(out)
    assert em.contract["classes"] == list(CLASSES) and not em.end_to_end
    ds = Dataset.load(d / "clean")
    x = prepare_input(*load_pair(ds, ds.rows(ds.images.image_id[:1])[0]), True)[None]
    f_heat, f_box = export.ort_session(fp32).run(export.OUTPUTS, {"input": x})
    q_heat, q_box = em.session.run(export.OUTPUTS, {"input": x})
    assert np.corrcoef(f_heat.ravel(), q_heat.ravel())[0, 1] > 0.95
    assert np.abs(f_box - q_box).max() < 4.0  # px: quantized features, float decoding
    assert json.loads(dict((p.key, p.value) for p in proto.metadata_props)["pcb_aoi_contract"])["outputs"] == "raw"


def test_gate_failure_keeps_the_previous_int8_model(fp32, tiny_pipeline, tmp_path):
    d, _ = tiny_pipeline
    out = tmp_path / "model.int8.onnx"
    out.write_bytes(b"previous int8 model")
    cfg = QuantizeConfig(calibration_images=2, max_map50_drop=-1.0)  # no model can pass: the gate must fire
    with pytest.raises(quantize.AccuracyGateError, match=r"a drop of .* > quantize.max_map50_drop -1.0"):
        quantize.run(cfg, fp32, d / "augmented", d / "clean", d / "split", out)
    assert out.read_bytes() == b"previous int8 model"
    assert not list(tmp_path.glob(".model.int8*"))  # no temp file left behind


def test_quantize_refuses_a_missing_model_or_one_without_contract(tiny_pipeline, tmp_path):
    from onnx import TensorProto, helper

    d, _ = tiny_pipeline
    args = (d / "augmented", d / "clean", d / "split", tmp_path / "o.onnx")
    with pytest.raises(FileNotFoundError, match="absent.onnx: ONNX model not found; run the export_onnx stage"):
        quantize.run(QuantizeConfig(), tmp_path / "absent.onnx", *args)
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["out"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="other.onnx: no pcb_aoi_contract metadata"):
        quantize.run(QuantizeConfig(), tmp_path / "other.onnx", *args)
    assert not (tmp_path / "o.onnx").exists()
