"""Fine-tuning from an earlier checkpoint (train.init_from) on tiny data: the weights of step 0 are the
source's, head rows matched by class name; incompatible sources refused before any step; the resume
fingerprint holds the source's content."""
import hashlib
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from pcb_aoi.model import checkpoint, finetune, network, resume, training

# The source model's classes: the tiny data's six in another order (open and short swapped) plus one
# the fine-tuned model drops; the fine-tuned model adds one the source never had.
SOURCE_CLASSES = ("short", "open", "mousebite", "spur", "copper", "pin-hole", "scratch")
NEW = "missing-hole"


@pytest.fixture(scope="module")
def source(tiny_pipeline, tmp_path_factory):
    d, p = tiny_pipeline
    out = tmp_path_factory.mktemp("source")
    training.run(p.train.model_copy(update={"epochs": 1}), p.seed, SOURCE_CLASSES, d / "augmented", d / "clean",
                 d / "split", out / "model.pt", out / "live")
    return out / "model.pt"


def classes_of(p):
    return tuple(p.classes) + (NEW,)


def fine_cfg(p, path, **model):
    return p.train.model_copy(update={"epochs": 1, "init_from": str(path),
                                      "model": p.train.model.model_copy(update=model)})


def test_step_zero_weights_are_the_sources_head_rows_matched_by_class_name(tiny_pipeline, source):
    _, p = tiny_pipeline
    classes = classes_of(p)
    init = finetune.load_init(fine_cfg(p, source), classes, register_max_px=0)
    assert init.kept == {"open": 1, "short": 0, "mousebite": 2, "spur": 3, "copper": 4, "pin-hole": 5}
    assert init.new == (NEW,) and init.dropped == ("scratch",)
    ctx = SimpleNamespace(cfg=fine_cfg(p, source), classes=classes, use_template=True, init=init)
    torch.manual_seed(p.seed)
    net = training.initial_network(ctx)
    torch.manual_seed(p.seed)
    fresh = training.initial_network(SimpleNamespace(**{**vars(ctx), "init": None}))
    src, got = torch.load(source, weights_only=True)["model_state"], net.state_dict()
    for k, v in got.items():
        if not k.startswith("cls_head.1."):
            assert torch.equal(v, src[k]), k  # the whole body, BatchNorm statistics included
    w, b = got["cls_head.1.weight"], got["cls_head.1.bias"]  # (7, f, 1, 1), (7,)
    assert w.shape[0] == 7 and src["cls_head.1.weight"].shape[0] == 7
    assert torch.equal(w[0], src["cls_head.1.weight"][1]) and torch.equal(b[0], src["cls_head.1.bias"][1])  # open
    assert torch.equal(w[1], src["cls_head.1.weight"][0]) and torch.equal(b[1], src["cls_head.1.bias"][0])  # short
    assert torch.equal(w[5], src["cls_head.1.weight"][5])  # pin-hole: same row in both
    # the new class keeps the fresh network's own row: its seeded init, the prior bias, none of the source's rows
    assert torch.equal(w[6], fresh.state_dict()["cls_head.1.weight"][6])
    assert b[6].item() == pytest.approx(-4.59512, abs=1e-4)  # -log((1 - 0.01) / 0.01)
    assert not any(torch.equal(w[6], r) for r in src["cls_head.1.weight"])


def test_fine_tune_reports_source_hash_and_mapping_and_ignores_a_scratch_resume_point(tiny_pipeline, source,
                                                                                       tmp_path, capsys):
    d, p = tiny_pipeline
    classes = classes_of(p)
    cfg = fine_cfg(p, source)
    # a resume point of a run from scratch, same params otherwise: must not be continued from other weights
    last = tmp_path / "models/checkpoints/last.pt"
    fp = resume.fingerprint(cfg.model_copy(update={"init_from": ""}), p.seed, classes, d / "augmented", [], 1)
    net = network.Detector(network.DetectorConfig(num_classes=7, width=p.train.model.width))
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=10)
    resume.save_resume(last, fp, net, None, opt, sched, 0, {"map": 0.1, "map50": 0.2}, 0, [], [1.0])
    # fetched from the registry: its sidecar names the version (pcb-aoi-registry fetch writes it)
    sidecar = source.with_name(source.name + ".registry.json")
    sidecar.write_text(json.dumps({"artifact": "pcb-detector-checkpoint", "version": "v1.4.0"}))
    try:
        summary = training.run(cfg, p.seed, classes, d / "augmented", d / "clean", d / "split",
                               tmp_path / "models/model.pt", tmp_path / "live")
    finally:
        sidecar.unlink()
    out = capsys.readouterr().out
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert summary["init_from"] == str(source) and summary["init_sha256"] == digest
    assert summary["init_version"] == "v1.4.0" and finetune.registered_version(source) == "unregistered"
    assert summary["init_classes"] == {"kept": {"open": 1, "short": 0, "mousebite": 2, "spur": 3, "copper": 4,
                                                "pin-hole": 5}, "new": [NEW], "dropped": ["scratch"]}
    assert summary["resumed_from_epoch"] is None
    assert "not resuming" in out and f'init_sha256 (null -> "{digest}")' in out
    assert f"class 'open' kept (source head row 1)" in out and f"class '{NEW}' new" in out
    assert "class 'scratch' of the source dropped" in out
    assert sum("train: init_from" in line for line in out.splitlines()) == 8  # one line per class
    model, ckpt = checkpoint.load(tmp_path / "models/model.pt")
    assert ckpt["classes"] == list(classes) and ckpt["provenance"]["init_sha256"] == digest


def test_resume_fingerprint_holds_the_init_file_content(tiny_pipeline, source):
    d, p = tiny_pipeline
    scratch = resume.fingerprint(p.train, p.seed, p.classes, d / "augmented", [], 1)
    tuned = resume.fingerprint(fine_cfg(p, source).model_copy(update={"epochs": p.train.epochs}), p.seed, p.classes,
                               d / "augmented", [], 1, "ab" * 32)
    diff = resume.differing_keys(scratch, tuned)
    assert [k.split(" ")[0] for k in diff] == ["init_sha256", "train.init_from"]
    other = resume.fingerprint(fine_cfg(p, source).model_copy(update={"epochs": p.train.epochs}), p.seed, p.classes,
                               d / "augmented", [], 1, "cd" * 32)  # same path, another file there
    assert [k.split(" ")[0] for k in resume.differing_keys(tuned, other)] == ["init_sha256"]


def refused(tiny_pipeline, tmp_path, cfg, within=None):
    """Run training expecting a refusal; nothing may have been trained or written."""
    d, p = tiny_pipeline
    with pytest.raises((checkpoint.IncompatibleCheckpoint, ValueError, FileNotFoundError)) as e:
        training.run(cfg, p.seed, classes_of(p), d / "augmented", d / "clean", d / "split",
                     tmp_path / "models/model.pt", tmp_path / "live", within)
    assert not (tmp_path / "models").exists() and not (tmp_path / "live").exists()
    return str(e.value)


def test_sources_that_are_no_pcb_aoi_checkpoint_are_refused_before_training(tiny_pipeline, source, tmp_path):
    _, p = tiny_pipeline
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert "not a readable PyTorch checkpoint" in refused(tiny_pipeline, tmp_path, fine_cfg(p, junk))
    partial = {k: v for k, v in torch.load(source, weights_only=True).items() if k != "input_spec"}
    torch.save(partial, tmp_path / "partial.pt")
    msg = refused(tiny_pipeline, tmp_path, fine_cfg(p, tmp_path / "partial.pt"))
    assert "missing keys: input_spec" in msg
    msg = refused(tiny_pipeline, tmp_path, fine_cfg(p, tmp_path / "absent.pt"))
    assert "absent.pt: no such file" in msg


@pytest.mark.parametrize("model, expected", [
    ({"use_template": False}, "use_template is True in the checkpoint (template (reference-based)), False in "
                              "train.model.use_template (single-image); set train.model.use_template to the "
                              "checkpoint's value or leave train.init_from empty"),
    ({"width": 16}, "another architecture: train.model.width is 8 in the checkpoint, 16 in params; "
                    "set train.model.width to the checkpoint's value"),
    ({"blocks": (1, 1, 1)}, "train.model.blocks is [1, 1, 2] in the checkpoint, [1, 1, 1] in params"),
    ({"stride": 8}, "train.model.stride is 4 in the checkpoint, 8 in params"),
])
def test_another_input_contract_or_architecture_is_refused_naming_key_and_both_values(tiny_pipeline, source, tmp_path,
                                                                                       model, expected):
    _, p = tiny_pipeline
    assert expected in refused(tiny_pipeline, tmp_path, fine_cfg(p, source, **model))


def test_another_registration_range_is_refused(tiny_pipeline, source, tmp_path):
    _, p = tiny_pipeline
    ckpt = torch.load(source, weights_only=True)
    ckpt["input_spec"]["register_max_px"] = 4
    torch.save(ckpt, tmp_path / "registered.pt")
    msg = refused(tiny_pipeline, tmp_path, fine_cfg(p, tmp_path / "registered.pt"))
    assert "register_max_px is 4 in the checkpoint, 0 in the training data (etl.register_max_px)" in msg


def test_train_stage_refuses_a_source_outside_its_init_folder(tiny_pipeline, source, tmp_path):
    from conftest import TINY, merge, write_params
    d, _ = tiny_pipeline
    write_params(tmp_path / "params.yaml", merge(TINY, {"train": {"init_from": str(source)}}))
    r = subprocess.run([sys.executable, str(ROOT / "src/stages/train.py"), "--params", str(tmp_path / "params.yaml"),
                        "--train", str(d / "augmented"), "--clean", str(d / "clean"), "--split", str(d / "split"),
                        "--model", str(tmp_path / "models/model.pt"), "--live", str(tmp_path / "live"),
                        "--init-dir", str(tmp_path / "init")], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"train.init_from: {source} is outside {tmp_path / 'init'}, the folder the train stage depends on" in r.stderr
    assert not (tmp_path / "models").exists()
