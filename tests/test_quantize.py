"""INT8: a real onnxruntime static quantization of a tiny model, its accuracy gate, and the edge app on it."""
import json
import platform
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pcb_aoi.data.dataset import Dataset
from pcb_aoi.deploy import export, quantize
from pcb_aoi.edge import app, int8, machine, runtime
from pcb_aoi.edge.contract import CONTRACT_KEY, OUTPUTS
from pcb_aoi.model import checkpoint
from pcb_aoi.model.inference import load_pair, prepare_input
from pcb_aoi.pipeline.config import CLASSES, QuantizeConfig
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
    em = runtime.EdgeModel(out)
    assert em.contract["classes"] == list(CLASSES) and not em.end_to_end and em.precision == "int8"
    ds = Dataset.load(d / "clean")
    x = prepare_input(*load_pair(ds, ds.rows(ds.images.image_id[:1])[0]), True)[None]
    f_heat, f_box = runtime.ort_session(fp32).run(OUTPUTS, {"input": x})
    q_heat, q_box = em.session.run(OUTPUTS, {"input": x})
    assert np.corrcoef(f_heat.ravel(), q_heat.ravel())[0, 1] > 0.95
    assert np.abs(f_box - q_box).max() < 4.0  # px: quantized features, float decoding
    assert json.loads(dict((p.key, p.value) for p in proto.metadata_props)["pcb_aoi_contract"])["outputs"] == "raw"


def test_the_gate_reads_the_val_split_and_the_test_split_only_without_one(fp32, tiny_pipeline, tmp_path):
    from pcb_aoi.data import split
    from pcb_aoi.data.dataset import split_ids

    d, p = tiny_pipeline
    cfg = QuantizeConfig(calibration_images=2, max_map50_drop=1.0)
    report = quantize.run(cfg, fp32, d / "augmented", d / "clean", d / "split", tmp_path / "a.onnx")
    assert report["gate_split"] == "val" and report["gate_images"] == len(split_ids(d / "split", "val")) > 0
    no_val = p.split.model_copy(update={"val_fraction": 0.0, "allow_no_val": True})
    split.run(no_val, p.seed, p.classes, d / "clean", tmp_path / "split")
    report = quantize.run(cfg, fp32, d / "augmented", d / "clean", tmp_path / "split", tmp_path / "b.onnx")
    assert report["gate_split"] == "test" and report["gate_images"] == len(split_ids(d / "split", "test"))


def test_gate_failure_keeps_the_previous_int8_model(fp32, tiny_pipeline, tmp_path):
    d, _ = tiny_pipeline
    out = tmp_path / "model.int8.onnx"
    out.write_bytes(b"previous int8 model")
    # below the range params.yaml allows (model_copy does not validate): no model can pass, the gate must fire
    cfg = QuantizeConfig(calibration_images=2).model_copy(update={"max_map50_drop": -1.0})
    with pytest.raises(quantize.AccuracyGateError, match=r"val mAP@0.5 .* a drop of .* > quantize.max_map50_drop -1.0"):
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


# --- INT8 formats: which CPUs compute what the gate measured ------------------------------------------

AVX2 = machine.Cpu("AMD EPYC 7B12", "x86_64", frozenset({"avx2"}))
AVX512_NO_VNNI = machine.Cpu("Intel Xeon Platinum 8168", "x86_64", frozenset({"avx2", "avx512f"}))
VNNI = machine.Cpu("AMD EPYC 9B14", "x86_64", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}))
ALDER_LAKE = machine.Cpu("12th Gen Intel Core i5-1235U", "x86_64", frozenset({"avx2", "avx_vnni"}))
GRAVITON = machine.Cpu("Neoverse-N1", "aarch64", frozenset({"asimd", "asimddp"}))


def conv_weights(path) -> dict:
    """Conv name -> its stored quantized weights, traced by hand: Conv <- DequantizeLinear <- initializer."""
    proto = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    dq = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name: inits[dq[n.input[1]]] for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in dq}


@pytest.fixture(scope="module")
def int8_models(fp32, tiny_pipeline, tmp_path_factory):
    d, _ = tiny_pipeline
    out = {}
    for fmt in ("u8s7", "u8s8", "u8u8"):
        path = tmp_path_factory.mktemp(fmt) / "model.int8.onnx"
        report = quantize.run(QuantizeConfig(calibration_images=4, format=fmt, max_map50_drop=1.0), fp32,
                              d / "augmented", d / "clean", d / "split", path)
        out[fmt] = path, report
    return out


def test_default_int8_format_cannot_saturate_int16_on_any_cpu(int8_models):
    path, report = int8_models["u8s7"]
    assert QuantizeConfig().format == "u8s7" and report["format"] == "u8s7"
    weights = conv_weights(path)
    assert len(weights) > 5
    for name, w in weights.items():
        assert w.dtype == np.int8, name
        a = np.sort(np.abs(w.reshape(len(w), -1).astype(np.int64)), axis=1)
        worst = 255 * (a[:, -1] + a[:, -2]).max()  # the two largest products an output channel can pair
        assert worst <= 32767, f"{name}: two uint8 x int8 products can sum to {worst}"
    contract = runtime.EdgeModel(path).contract
    assert contract["precision"] == "int8" and contract["int8"]["format"] == "u8s7"
    assert contract["int8"]["needs_vnni_on_x86"] is False and contract["int8"]["weight_range"] == [-64, 64]


def test_full_range_int8_can_saturate_and_says_so_uint8_weights_cannot(int8_models):
    path, report = int8_models["u8s8"]
    worst = max(255 * int(np.sort(np.abs(w.reshape(len(w), -1).astype(np.int64)), 1)[:, -2:].sum(1).max())
                for w in conv_weights(path).values())
    assert worst > 32767  # what the default format exists to avoid
    bounds = quantize.int16_pair_bounds(quantize.quantized_conv_weights(onnx.load(str(path))))
    assert bounds and max(bounds.values()) == worst
    assert runtime.EdgeModel(path).contract["int8"]["needs_vnni_on_x86"] is True
    u8, _ = int8_models["u8u8"]
    assert all(w.dtype == np.uint8 for w in conv_weights(u8).values())
    assert set(quantize.int16_pair_bounds(quantize.quantized_conv_weights(onnx.load(str(u8)))).values()) == {None}
    # Where the gate ran and which CPUs the file is exact on travel in the report.
    assert report["gate_measured_on"]["cpu"]["model"] == machine.cpu().model
    assert report["exact_on_gate_machine"] == ("saturates" if machine.cpu().x86 and not machine.cpu().vnni else "exact")


def test_a_file_that_breaks_its_format_is_refused(int8_models, tmp_path):
    path, _ = int8_models["u8s7"]
    proto = onnx.load(str(path))
    name = next(iter(quantize.quantized_conv_weights(proto)))
    conv = next(n for n in proto.graph.node if n.name == name)
    dq = next(n for n in proto.graph.node if n.output[0] == conv.input[1])
    init = next(t for t in proto.graph.initializer if t.name == dq.input[0])
    w = onnx.numpy_helper.to_array(init).copy()
    w.flat[:2] = 127  # two full-range weights side by side in one output channel
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    with pytest.raises(quantize.FormatError, match=rf"Conv {name} has int8 weights in \[.*, 127\], outside format u8s7"):
        quantize.check_format(proto, int8.FORMATS["u8s7"], tmp_path / "x.onnx")
    relaxed = int8.Int8Format("test", "int8", (-127, 127), False, False, "")
    with pytest.raises(quantize.FormatError, match=r"must not overflow int16, but pairs of products reach .*64770"):
        quantize.check_format(proto, relaxed, tmp_path / "x.onnx")


@pytest.mark.parametrize("cpu, fmt, expected", [
    (AVX2, "u8s8", "saturates"), (AVX512_NO_VNNI, "u8s8", "saturates"), (VNNI, "u8s8", "exact"),
    (ALDER_LAKE, "u8s8", "exact"), (GRAVITON, "u8s8", "exact"),
    (AVX2, "u8s7", "exact"), (GRAVITON, "u8s7", "exact"), (AVX2, "u8u8", "exact"),
], ids=lambda v: v.model if isinstance(v, machine.Cpu) else v)
def test_verdict_per_format_and_injected_cpu(cpu, fmt, expected):
    status, why = int8.verdict(int8.FORMATS[fmt].contract(), cpu)
    assert status == expected and fmt in why and cpu.model in why
    if expected == "saturates":
        assert "avx2" in why and "VNNI" in why


def detect_main(argv, monkeypatch, capsys, cpu):
    monkeypatch.setattr(machine, "cpu", lambda: cpu)
    code = app.main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_detect_warns_naming_format_and_cpu_only_where_the_model_saturates(int8_models, tiny_pipeline, monkeypatch,
                                                                           capsys, tmp_path):
    d, _ = tiny_pipeline
    ds = Dataset.load(d / "clean")
    row = ds.rows(ds.images.image_id[:1])[0]
    (tmp_path / "a_test.png").write_bytes((ds.root / row.path).read_bytes())
    (tmp_path / "a_temp.png").write_bytes((ds.root / row.template_path).read_bytes())
    u8s8, u8s7 = int8_models["u8s8"][0], int8_models["u8s7"][0]
    code, out = detect_main(["--model", u8s8, tmp_path / "a_test.png"], monkeypatch, capsys, AVX2)
    assert code == 0 and json.loads(out.out)["status"] == "ok"
    assert "warning" in out.err and "u8s8" in out.err and "AMD EPYC 7B12" in out.err and "avx2" in out.err
    for model, cpu in [(u8s8, VNNI), (u8s7, AVX2)]:
        code, out = detect_main(["--model", model, tmp_path / "a_test.png"], monkeypatch, capsys, cpu)
        assert code == 0 and "warning" not in out.err
    code, out = detect_main(["--model", u8s8, "--info"], monkeypatch, capsys, AVX2)
    info = json.loads(out.out)
    assert code == 0 and info["on_this_cpu"] == "saturates" and info["int8"]["format"] == "u8s8"
    assert info["cpu"] == {"model": "AMD EPYC 7B12", "arch": "x86_64", "isa": ["avx2"]}


def test_int8_model_from_before_formats_is_accepted_with_an_unknown_accuracy_warning(fp32, int8_models, monkeypatch,
                                                                                   capsys, tmp_path):
    proto = onnx.load(str(int8_models["u8s8"][0]))
    for p in proto.metadata_props:  # the contract as the quantize stage wrote it before this change
        if p.key == CONTRACT_KEY:
            c = json.loads(p.value)
            del c["precision"], c["int8"]
            p.value = json.dumps(c)
    old = tmp_path / "old.int8.onnx"
    onnx.save(proto, str(old))
    m = runtime.EdgeModel(old)
    assert m.precision == "int8"
    for cpu in (AVX2, VNNI):
        status, why = m.cpu_verdict(cpu)
        assert status == "unknown" and "records no INT8 format" in why and cpu.model in why
    code, out = detect_main(["--model", old, "--info"], monkeypatch, capsys, VNNI)
    assert code == 0 and json.loads(out.out)["on_this_cpu"] == "unknown"
    fp = runtime.EdgeModel(fp32)  # FP32 arithmetic is the same everywhere
    assert fp.precision == "fp32" and fp.cpu_verdict(AVX2)[0] == "exact"


EMULATED_AVX2 = "EPYC-Rome"  # qemu's AMD Zen 2: AVX2, no AVX-512, no VNNI
QEMU = shutil.which("qemu-x86_64")
RUN_MODELS = """
import json, sys
import numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
out = {}
for name, path in json.loads(sys.argv[2]).items():
    out[name] = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
np.savez(sys.argv[3], **out)
from pcb_aoi.edge import machine
print(json.dumps(machine.cpu().describe()))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86 CPU with qemu-x86_64: x86_64 hosts only")
@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not installed (Debian: apt-get install qemu-user; `make test` "
                                         "installs it where it runs as root)")
def test_default_int8_model_gives_the_same_outputs_on_an_emulated_avx2_cpu(int8_models, tiny_pipeline, tmp_path):
    """ONNX Runtime under qemu -cpu EPYC-Rome picks the kernels of an AVX2-only CPU (int16 pairs):
    the u8s7 model must compute there what it computes natively, whatever this machine's CPU."""
    d, _ = tiny_pipeline
    ds = Dataset.load(d / "clean")
    x = np.stack([prepare_input(*load_pair(ds, r), True) for r in ds.rows(ds.images.image_id[:2])])
    np.save(tmp_path / "x.npy", x)
    models = {"u8s7": str(int8_models["u8s7"][0]), "u8u8": str(int8_models["u8u8"][0])}
    r = subprocess.run([QEMU, "-cpu", EMULATED_AVX2, sys.executable, "-c", RUN_MODELS, str(tmp_path / "x.npy"),
                        json.dumps(models), str(tmp_path / "emulated.npz")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.splitlines()[-1])
    assert seen["isa"] == ["avx2"], f"the emulated CPU should have AVX2 only, pcb_aoi saw {seen}"
    emulated = np.load(tmp_path / "emulated.npz")
    for name, path in models.items():
        native = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        # Integer arithmetic is exact on both; only the float parts (box decoding) may round differently.
        assert np.abs(native - emulated[name]).max() <= 1e-4, name


def test_gate_failure_of_a_saturating_format_says_which_format_to_use(fp32, tiny_pipeline, tmp_path, monkeypatch):
    d, _ = tiny_pipeline
    monkeypatch.setattr(machine, "cpu", lambda: AVX2)  # the gate runs on an AVX2-only CPU
    cfg = QuantizeConfig(calibration_images=2, format="u8s8").model_copy(update={"max_map50_drop": -1.0})
    with pytest.raises(quantize.AccuracyGateError, match=r"u8s8 .* loses accuracy on AMD EPYC 7B12 \(x86_64; avx2\).*"
                                                         r"quantize.format: u8s7.*Measured on AMD EPYC 7B12"):
        quantize.run(cfg, fp32, d / "augmented", d / "clean", d / "split", tmp_path / "m.onnx")
