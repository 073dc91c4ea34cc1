"""Training mechanisms on tiny data: determinism, resume after a kill, NaN stop, incompatible
checkpoints, DDP under torchrun with 2 CPU processes (gloo)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from pcb_aoi.data.dataset import Dataset
from pcb_aoi.model import checkpoint, crops, devices, network, resume, training


def weights(path):
    return torch.load(path, weights_only=True)["model_state"]


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def run_train(tiny_pipeline, out, **over):
    d, p = tiny_pipeline
    cfg = p.train.model_copy(update=over)
    return training.run(cfg, p.seed, p.classes, d / "augmented", d / "clean", d / "split", out / "models" / "model.pt",
                     out / "live")


def stage_cmd(tiny_pipeline, out):
    d, _ = tiny_pipeline
    return [sys.executable, str(ROOT / "src/stages/train.py"), "--params", str(out / "params.yaml"),
            "--train", str(d / "augmented"), "--clean", str(d / "clean"), "--split", str(d / "split"),
            "--model", str(out / "models/model.pt"), "--live", str(out / "live"), "--report", str(out / "train.json")]


def write_stage_params(tiny_pipeline, out, **train_over):
    from conftest import TINY, merge, write_params
    out.mkdir(parents=True, exist_ok=True)
    write_params(out / "params.yaml", merge(TINY, {"train": train_over}))


def test_same_seed_same_weights_and_metrics(tiny_pipeline, tmp_path):
    # Every online augmentation on, data loaded in a worker process for one run and in-process for the other.
    aug = {"flip_rotate": True, "scale_jitter": 0.2, "width_jitter": 0.5}
    a = run_train(tiny_pipeline, tmp_path / "a", workers=1, **aug)
    b = run_train(tiny_pipeline, tmp_path / "b", workers=0, **aug)
    assert a["val_map"] == b["val_map"] and a["val_map50"] == b["val_map50"] and a["best_epoch"] == b["best_epoch"]
    assert same_weights(tmp_path / "a/models/model.pt", tmp_path / "b/models/model.pt")
    assert not (tmp_path / "a/models/checkpoints/last.pt").exists(), "a finished run leaves nothing to resume"


def test_bf16_mixed_precision_trains_deterministically_and_saves_float32_weights(tiny_pipeline, tmp_path):
    a = run_train(tiny_pipeline, tmp_path / "a", epochs=2, precision="bf16")
    b = run_train(tiny_pipeline, tmp_path / "b", epochs=2, precision="bf16")
    assert a["val_map50"] == b["val_map50"]
    assert same_weights(tmp_path / "a/models/model.pt", tmp_path / "b/models/model.pt")
    w = weights(tmp_path / "a/models/model.pt")
    assert all(v.dtype in (torch.float32, torch.int64) and (not v.is_floating_point() or v.isfinite().all())
               for v in w.values())
    run_train(tiny_pipeline, tmp_path / "c", epochs=2)
    assert not same_weights(tmp_path / "a/models/model.pt", tmp_path / "c/models/model.pt"), "bf16 had no effect"


@pytest.mark.parametrize("ema_decay", [0.0, 0.9], ids=["raw-weights", "ema-weights"])
def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tiny_pipeline, tmp_path, ema_decay):
    epochs = 5
    whole = run_train(tiny_pipeline, tmp_path / "whole", epochs=epochs, ema_decay=ema_decay)
    out = tmp_path / "killed"
    write_stage_params(tiny_pipeline, out, epochs=epochs, ema_decay=ema_decay)
    last = out / "models/checkpoints/last.pt"
    proc = subprocess.Popen(stage_cmd(tiny_pipeline, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while not last.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "the run ended before it could be killed; the test needs slower epochs"
    killed_after = torch.load(last, weights_only=True)["epoch"]
    assert killed_after < epochs - 1

    r = subprocess.run(stage_cmd(tiny_pipeline, out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {last} after epoch {killed_after}" in r.stdout
    report = json.loads((out / "train.json").read_text())
    assert report["resumed_from_epoch"] == killed_after
    assert report["best_epoch"] == whole["best_epoch"] and report["val_map"] == whole["val_map"]
    assert same_weights(out / "models/model.pt", tmp_path / "whole/models/model.pt")
    # The curves cover every epoch, the interrupted ones included.
    loss_tsv = out / "live/plots/metrics/train/loss.tsv"
    assert len(loss_tsv.read_text().splitlines()) == epochs + 1
    assert not last.exists()


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tiny_pipeline, tmp_path,
                                                                                  monkeypatch):
    calls = {"n": 0}
    real = training.focal_loss
    steps_per_epoch = None

    def poisoned(logits, heat):
        calls["n"] += 1
        loss = real(logits, heat)
        return loss * float("nan") if calls["n"] == steps_per_epoch + 2 else loss

    d, p = tiny_pipeline
    steps_per_epoch = len(Dataset.load(d / "augmented").images) // p.train.batch_size
    monkeypatch.setattr(training, "focal_loss", poisoned)
    with pytest.raises(training.TrainingDiverged, match=r"at epoch 1, step 1 .*kept the last good checkpoints: "
                                                         r".*last\.pt \(epoch 0\)"):
        run_train(tiny_pipeline, tmp_path, epochs=3)
    last = tmp_path / "models/checkpoints/last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    checkpoint.load(tmp_path / "models/model.pt")  # the best model so far is intact
    assert not (tmp_path / "live").exists(), "no half-written learning curves"

    # The kept resume point is used only by a run with the same params; a changed lr starts over.
    monkeypatch.setattr(training, "focal_loss", real)
    changed = run_train(tiny_pipeline, tmp_path, epochs=3, lr=p.train.lr / 2)
    assert changed["resumed_from_epoch"] is None


def test_ema_warms_up_then_averages_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    net = network.Detector(network.DetectorConfig(num_classes=6, width=4))
    ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=training.ema_update(0.5), use_buffers=True)
    first = {k: v.clone() for k, v in net.state_dict().items()}
    ema.update_parameters(net)  # the first update copies
    with torch.no_grad():
        for t in net.state_dict().values():
            t.add_(1)  # weights, BN running stats and the BN step counters all move by 1
    ema.update_parameters(net)  # second: warm-up decay (1 + 1) / (10 + 1) = 0.18 < 0.5
    ema.update_parameters(net)  # third: decay (1 + 2) / (10 + 2) = 0.25
    d1, d2 = 2 / 11, 3 / 12
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, first[k] + 1 - d1 * d2, atol=1e-5), k
        else:
            assert torch.equal(v, first[k] + 1), k  # counters are copied, not averaged
    # After the warm-up the decay is the configured one.
    ema.n_averaged.fill_(10**6)
    before = ema.module.c2[0].weight.clone()
    with torch.no_grad():
        net.c2[0].weight.add_(2.0)
    ema.update_parameters(net)
    assert torch.allclose(ema.module.c2[0].weight, before + 0.5 * (net.c2[0].weight - before), atol=1e-6)


def test_incompatible_resume_point_is_ignored_saying_which_keys_differ(tiny_pipeline, tmp_path, capsys):
    d, p = tiny_pipeline
    last = tmp_path / "models/checkpoints/last.pt"
    fp = resume.fingerprint(p.train.model_copy(update={"lr": 0.5}), p.seed, p.classes, d / "augmented", [], 1)
    net = network.Detector(network.DetectorConfig(num_classes=6, width=p.train.model.width))
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.5, total_steps=10)
    resume.save_resume(last, fp, net, None, opt, sched, 0, {"map": 0.1, "map50": 0.2}, 0, [{"train/loss": 1.0}], [1.0])
    summary = run_train(tiny_pipeline, tmp_path)
    out = capsys.readouterr().out
    assert "not resuming" in out and f"train.lr (0.5 -> {p.train.lr})" in out
    assert summary["resumed_from_epoch"] is None


def test_checkpoint_from_another_config_is_refused_naming_the_keys(tiny_pipeline, tmp_path):
    run_train(tiny_pipeline, tmp_path, epochs=1)
    model = tmp_path / "models/model.pt"
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"keys differ: classes"):
        checkpoint.load(model, expect={"classes": ["open", "short"]})
    ckpt = torch.load(model, weights_only=True)
    ckpt["model_config"]["depth"] = 3
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"unknown \['depth'\]"):
        checkpoint.load(tmp_path / "future.pt")
    del ckpt["model_config"]["depth"]
    ckpt["model_config"]["width"] += 8
    torch.save(ckpt, tmp_path / "wider.pt")
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"weights do not fit"):
        checkpoint.load(tmp_path / "wider.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match="not a readable"):
        checkpoint.load(tmp_path / "junk.pt")


def test_evaluate_stage_refuses_a_model_trained_for_other_classes(tiny_pipeline, tmp_path):
    from conftest import TINY, merge, write_params
    d, _ = tiny_pipeline
    run_train(tiny_pipeline, tmp_path, epochs=1)
    write_params(tmp_path / "params.yaml", merge(TINY, {"classes": list(tiny_pipeline[1].classes) + ["missing-hole"]}))
    r = subprocess.run([sys.executable, str(ROOT / "src/stages/evaluate.py"), "--params", str(tmp_path / "params.yaml"),
                        "--model", str(tmp_path / "models/model.pt"), "--clean", str(d / "clean"), "--split",
                        str(d / "split"), "--metrics", str(tmp_path / "metrics.json"), "--plots",
                        str(tmp_path / "plots"), "--operating-point", str(tmp_path / "op.json")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "keys differ: classes" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "op.json").exists()


def test_ddp_two_cpu_processes_under_torchrun(tiny_pipeline, tmp_path):
    out = tmp_path / "ddp"
    write_stage_params(tiny_pipeline, out, epochs=2, device="cpu")
    env = dict(os.environ, PCB_AOI_TORCHRUN="--standalone --nproc-per-node 2")
    r = subprocess.run(stage_cmd(tiny_pipeline, out), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "train.json").read_text())
    assert report["processes"] == 2 and report["device"] == "cpu"
    checkpoint.load(out / "models/model.pt")
    assert len((out / "live/plots/metrics/train/loss.tsv").read_text().splitlines()) == 3


def test_device_auto_falls_back_to_cpu_and_cuda_without_gpu_says_so():
    assert devices.resolve_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        assert devices.resolve_device("auto").type == "cuda"
    else:
        assert devices.resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="train.device: cuda requested"):
            devices.resolve_device("cuda")


def test_without_a_val_split_every_non_test_board_trains_and_the_last_epoch_is_kept(tiny_pipeline, tmp_path):
    from pcb_aoi.data import split
    from pcb_aoi.data.dataset import split_ids

    d, p = tiny_pipeline
    no_val = p.split.model_copy(update={"val_fraction": 0.0, "allow_no_val": True})
    split.run(no_val, p.seed, p.classes, d / "clean", tmp_path / "split")
    assert split_ids(tmp_path / "split", "val") == []
    assert split_ids(tmp_path / "split", "test") == split_ids(d / "split", "test"), "the test boards do not move"
    cfg = p.train.model_copy(update={"epochs": 2})
    report = training.run(cfg, p.seed, p.classes, d / "augmented", d / "clean", tmp_path / "split",
                       tmp_path / "models/model.pt", tmp_path / "live")
    assert report["val_map50"] is None and report["val_map"] is None and report["best_epoch"] == 1
    assert torch.load(tmp_path / "models/model.pt", weights_only=True)["provenance"]["epoch"] == 1


def test_width_jitter_grows_or_shrinks_copper_alike_in_test_and_template_and_is_seeded():
    import numpy as np

    rng = np.random.default_rng(0)
    template = np.where(rng.random((64, 64)) < 0.3, 0, 255).astype(np.uint8)  # dark copper specks
    test = template.copy()
    test[20:30, 20:30] = 0  # a defect: extra copper
    copper = lambda img: int((img < 128).sum())  # noqa: E731
    changes = set()
    for seed in range(20):
        a, b = crops.jitter_copper_width(test, template, 1.0, seed)
        assert np.array_equal(a, crops.jitter_copper_width(test, template, 1.0, seed)[0]), "same seed, same draw"
        grew = copper(a) > copper(test)
        assert grew == (copper(b) > copper(template)), "test and template get the same filter"
        assert copper(a) != copper(test)
        changes.add(grew)
    assert changes == {True, False}, "both thicker and thinner copper are drawn"
    a, b = crops.jitter_copper_width(test, template, 0.0, 0)
    assert a is test and b is template


def test_decoded_image_cache_gives_the_same_crops_and_cannot_be_edited(tiny_pipeline):
    import numpy as np

    d, p = tiny_pipeline
    ds = Dataset.load(d / "augmented")
    args = (ds, p.classes, True, 64, p.seed, True, 0.2, 0.5)
    cached, read = crops.PairDataset(*args, cache_mb=4096), crops.PairDataset(*args, cache_mb=0)
    assert cached.cache is not None and read.cache is None
    assert crops.PairDataset(*args, cache_mb=cached._decoded_mb() / 2).cache is None, "over budget: read every time"
    for epoch in (0, 3):
        cached.set_epoch(epoch)
        read.set_epoch(epoch)
        for i in range(len(read)):
            assert all(torch.equal(a, b) for a, b in zip(cached[i], read[i]))
    test, template = cached.cache[0]
    assert not test.flags.writeable and not template.flags.writeable
    with pytest.raises(ValueError):
        np.add(test, 1, out=test)


def test_template_shift_moves_half_the_templates_by_at_most_the_limit_and_is_seeded():
    template = np.full((100, 120), 255, np.uint8)
    template[50, 60] = 0  # one dark pixel to follow
    moved = 0
    for seed in range(200):
        out = crops.shift_template(template, 5, seed)
        assert out.shape == template.shape and np.array_equal(out, crops.shift_template(template, 5, seed))
        y, x = np.argwhere(out == 0)[0]
        assert abs(y - 50) <= 5 and abs(x - 60) <= 5 and (out == 0).sum() == 1
        moved += (y, x) != (50, 60)
    assert 70 < moved < 110  # half the seeds shift; (0, 0) is one of the 121 draws


def test_background_crops_cut_some_crops_away_from_every_defect_and_are_seeded(tiny_pipeline):
    d, p = tiny_pipeline
    ds = Dataset.load(d / "augmented")

    def cut(fraction):
        data = crops.PairDataset(ds, p.classes, True, 64, p.seed, background_crops=fraction)
        out = []
        for epoch in range(3):
            data.set_epoch(epoch)
            out += [data[i] for i in range(len(data))]
        return out

    around, anywhere = cut(0.0), cut(0.5)
    assert all(len(boxes) > 0 for _, boxes, _ in around), "by default every crop holds a defect"
    empty = sum(len(boxes) == 0 for _, boxes, _ in anywhere)
    assert 0 < empty < len(anywhere), "some crops (not all) hold no defect"
    assert all(torch.equal(a[0], b[0]) for a, b in zip(anywhere, cut(0.5))), "same seed, same crops"


def test_precision_auto_resolves_per_injected_cpu_and_emulated_bf16_warns():
    from pcb_aoi.edge.machine import Cpu

    cpu = torch.device("cpu")
    avx2 = Cpu("AMD EPYC 7B12", "x86_64", frozenset({"avx2"}))
    bf16 = Cpu("AMD EPYC 9B14", "x86_64", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}))
    amx = Cpu("Intel Xeon Platinum 8481C", "x86_64", frozenset({"avx2", "avx512f", "amx_bf16", "amx_int8"}))
    graviton3 = Cpu("Neoverse-V1", "aarch64", frozenset({"asimd", "bf16"}))
    assert devices.resolve_precision("auto", cpu, avx2) == ("fp32", None)
    for native in (bf16, amx, graviton3):
        assert devices.resolve_precision("auto", cpu, native) == ("bf16", None)
        assert devices.resolve_precision("bf16", cpu, native) == ("bf16", None)
    precision, warning = devices.resolve_precision("bf16", cpu, avx2)
    assert precision == "bf16", "an explicit choice is kept, never silently changed"
    assert "AMD EPYC 7B12" in warning and "emulated" in warning and "2.6x slower" in warning
    assert devices.resolve_precision("fp32", cpu, bf16) == ("fp32", None)


def test_train_report_records_precision_as_run_and_the_machine(tiny_pipeline, tmp_path):
    from pcb_aoi.edge import machine

    report = run_train(tiny_pipeline, tmp_path, epochs=1, precision="auto")
    assert report["precision_requested"] == "auto"
    assert report["precision"] == ("bf16" if machine.cpu().bf16_native else "fp32")
    assert report["machine"]["cpu"] == machine.cpu().describe() and report["machine"]["gpu"] is None


def _manifests(root, templates: list[str]):
    """A dataset's manifests only (the template check reads no pixels): one image per entry of ``templates``."""
    from pcb_aoi.data.dataset import make_boxes_frame, make_images_frame
    root.mkdir(parents=True)
    rows = [dict(image_id=f"im{i}", path=f"images/im{i}_test.png", template_path=t, width=64, height=64,
                 board_id="b", source_split="") for i, t in enumerate(templates)]
    Dataset(root, make_images_frame(rows), make_boxes_frame([])).save(root)
    return root


def test_missing_templates_stop_train_and_evaluate_naming_the_images_never_a_silent_single_image_model(tmp_path):
    from pcb_aoi.model.inference import predict
    from pcb_aoi.pipeline.config import CLASSES, TrainConfig

    def train(data, **model):
        cfg = TrainConfig.model_validate({"model": model})
        return training.run(cfg, 0, CLASSES, data, tmp_path / "clean", tmp_path / "split", tmp_path / "m/model.pt",
                            tmp_path / "live")

    some = _manifests(tmp_path / "some", ["images/im0_temp.png", "", "images/im2_temp.png", ""])
    with pytest.raises(ValueError, match=r"train.model.use_template: true, but 2 of the 4 training images in .*some "
                                         r"have no template \(im1, im3\); fix the data .* or set "
                                         r"train.model.use_template: false"):
        train(some)
    none = _manifests(tmp_path / "none", ["", ""])  # a VOC / YOLO / COCO source
    with pytest.raises(ValueError, match=r"train.model.use_template: true, but none of the 2 training images .*"
                                         r"set train.model.use_template: false"):
        train(none)
    assert not (tmp_path / "m").exists() and not (tmp_path / "live").exists()

    def runner(x):
        raise AssertionError("no image should reach the model")
    with pytest.raises(ValueError, match=r"some/images.parquet: 2 image\(s\) without a template \(im1, im3\)"):
        predict(runner, Dataset.load(some), ["im0", "im1", "im2", "im3"], use_template=True)

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    stage = subprocess.run([sys.executable, str(ROOT / "src/stages/train.py"), "--params", str(params),
                            "--train", str(some), "--clean", str(tmp_path / "clean"), "--split", str(tmp_path / "split"),
                            "--model", str(tmp_path / "m/model.pt"), "--live", str(tmp_path / "live"),
                            "--report", str(tmp_path / "train.json")], capture_output=True, text=True)
    assert stage.returncode == 1 and "2 of the 4 training images" in stage.stderr, stage.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "train.json").exists()
