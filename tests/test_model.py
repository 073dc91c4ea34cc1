import numpy as np
import pytest
import torch

from pcb_aoi.data.dataset import Dataset
from pcb_aoi.deploy import export
from pcb_aoi.edge import runtime
from pcb_aoi.model import checkpoint, crops
from pcb_aoi.model.inference import decode, load_pair, prepare_input
from pcb_aoi.model.loss import box_loss, build_targets, focal_loss
from pcb_aoi.model.network import Detector, DetectorConfig
from pcb_aoi.pipeline.config import CLASSES, ExportConfig


def _batch(tiny_pipeline, n=4):
    d, p = tiny_pipeline
    data = crops.PairDataset(Dataset.load(d / "augmented"), CLASSES, True, crop=64, seed=0)
    return crops.collate([data[i] for i in range(n)])


def test_targets_peak_at_box_centres():
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 16.0]])]
    heat, target, weight = build_targets(boxes, [torch.tensor([2])], 6, 8, 8, stride=4)
    assert heat[0, 2, 3, 4] == 1.0 and heat[0, 2].sum() > 1.0 and heat[0, [0, 1, 3, 4, 5]].sum() == 0
    assert weight[0, 3, 4] == 1.0 and (target[0, :, 3, 4] == boxes[0][0]).all()


def test_a_few_steps_lower_the_loss_on_a_tiny_batch(tiny_pipeline):
    torch.manual_seed(0)
    x, boxes, labels = _batch(tiny_pipeline)
    assert sum(len(b) for b in boxes) > 0
    model = Detector(DetectorConfig(num_classes=6, width=8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        heat_logits, pred = model(x)
        heat, target, weight = build_targets(boxes, labels, 6, *heat_logits.shape[-2:], model.cfg.stride)
        loss = focal_loss(heat_logits, heat) + 2 * box_loss(pred, target, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_decode_finds_a_planted_peak():
    heat = torch.full((1, 6, 16, 16), -10.0)
    heat[0, 4, 5, 7] = 3.0
    boxes = torch.zeros(1, 4, 16, 16)
    boxes[0, :, 5, 7] = torch.tensor([20.0, 12.0, 40.0, 30.0])
    det = decode(heat, boxes, score_threshold=0.5)[0]
    assert det["labels"].tolist() == [4] and det["boxes"].tolist() == [[20.0, 12.0, 40.0, 30.0]]


def test_checkpoint_round_trip_describes_itself(tmp_path):
    model = Detector(DetectorConfig(num_classes=6, in_channels=1, width=8, stride=8)).eval()
    checkpoint.save(tmp_path / "m.pt", model, CLASSES, use_template=False, epoch=3)
    loaded, ckpt = checkpoint.load(tmp_path / "m.pt")
    assert ckpt["classes"] == list(CLASSES) and ckpt["input_spec"]["channels"] == ["test"]
    assert ckpt["provenance"]["epoch"] == 3 and loaded.cfg == model.cfg
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_deeper_blocks_round_trip_and_the_default_layout_is_unchanged(tmp_path):
    # The default (1, 1, 2) must keep the weight names of checkpoints trained before `blocks` existed.
    names = set(Detector(DetectorConfig(num_classes=6, width=8)).state_dict())
    assert {"c4.1.body.0.0.weight", "c16.2.body.0.0.weight"} <= names and "c16.3.body.0.0.weight" not in names
    model = Detector(DetectorConfig(num_classes=6, width=8, blocks=(0, 2, 3))).eval()
    assert not any(k.startswith("c4.1.") for k in model.state_dict()) and model.c16[3].body[0][0].dilation == (4, 4)
    checkpoint.save(tmp_path / "m.pt", model, CLASSES, use_template=True)
    loaded, _ = checkpoint.load(tmp_path / "m.pt")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert loaded.cfg == model.cfg and torch.equal(loaded(x)[1], model(x)[1])


def _trained_like_model():
    torch.manual_seed(0)
    model = Detector(DetectorConfig(num_classes=6, width=8))
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for _ in range(3):
            model(torch.rand(4, 3, 64, 64))
        model.cls_head[-1].bias += 4.0  # scores around 0.4: many detections to compare
    return model.eval()


def test_onnx_parity_on_a_batch_size_other_than_export(tmp_path, tiny_pipeline):
    d, _ = tiny_pipeline
    ds = Dataset.load(d / "clean")
    x = np.stack([prepare_input(*load_pair(ds, r), True) for r in ds.images.head(3).itertuples(index=False)])
    model = _trained_like_model()
    ckpt = {"classes": list(CLASSES), "input_spec": checkpoint.input_spec(True), "model_config": model.cfg.to_dict()}
    path = tmp_path / "m.onnx"
    export.export(model, ckpt, torch.from_numpy(x[:1]), path, opset=17)
    sess = runtime.ort_session(path)
    assert sess.get_inputs()[0].shape[0] == "batch"
    assert sess.get_modelmeta().custom_metadata_map["classes"] == '["open", "short", "mousebite", "spur", "copper", "pin-hole"]'
    report = export.parity(model, sess, x, atol=1e-4)  # batch 3, exported at batch 1
    assert report["detections"] > 0 and report["same_detections"]
    assert max(report["max_abs_diff"].values()) <= 1e-4


def test_parity_gate_fails_when_outputs_differ(tmp_path):
    model = _trained_like_model()
    ckpt = {"classes": list(CLASSES), "input_spec": checkpoint.input_spec(True), "model_config": model.cfg.to_dict()}
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    export.export(model, ckpt, torch.from_numpy(x[:1]), tmp_path / "m.onnx", opset=17)
    with torch.no_grad():
        model.cls_head[-1].bias += 0.01  # the PyTorch side drifts from what was exported
    with pytest.raises(export.ParityError, match="heatmap"):
        export.parity(model, runtime.ort_session(tmp_path / "m.onnx"), x, atol=1e-3)


def test_export_stage_keeps_previous_onnx_when_gate_fails(tmp_path, tiny_pipeline):
    d, _ = tiny_pipeline
    model = _trained_like_model()
    checkpoint.save(tmp_path / "m.pt", model, CLASSES, use_template=True)
    ids = Dataset.load(d / "clean").images["image_id"].tolist()
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous model")
    unreachable = ExportConfig(parity_images=2).model_copy(update={"parity_atol": -1.0})  # params.yaml refuses it
    with pytest.raises(export.ParityError):
        export.run(unreachable, tmp_path / "m.pt", d / "clean", ids, out)
    assert out.read_bytes() == b"previous model"
    report = export.run(ExportConfig(parity_images=2), tmp_path / "m.pt", d / "clean", ids, out)
    assert report["same_detections"] and out.stat().st_size > 1000
