"""Provenance: git commit and dirty flag, params hash, DVC data version, in the checkpoint, every ONNX
file's contract, ``pcb-aoi-detect --info`` and each result record. Real git and DVC repositories in tmp
dirs, a real train stage under ``dvc repro``, real onnxruntime sessions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
import yaml

from conftest import ROOT, TINY, merge, write_params
from pcb_aoi.data import dataset
from pcb_aoi.data.dataset import Dataset
from pcb_aoi.deploy import export, quantize
from pcb_aoi.edge import app
from pcb_aoi.edge.contract import CONTRACT_KEY
from pcb_aoi.model import checkpoint
from pcb_aoi.model.inference import load_pair, prepare_input
from pcb_aoi.model.network import Detector, DetectorConfig
from pcb_aoi.pipeline import provenance
from pcb_aoi.pipeline.config import CLASSES, load_params

SRC = ROOT / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
       "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def sh(cwd: Path, *cmd: str) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout


def git_repo(path: Path, over: dict | None = None) -> Path:
    """A git repository holding params.yaml (the TINY ones), src/ and dvc.yaml, all committed."""
    path.mkdir(parents=True, exist_ok=True)
    sh(path, "git", "init", "-q")
    write_params(path / "params.yaml", merge(TINY, over or {}))
    (path / "src").mkdir()
    (path / "src" / "lib.py").write_text("x = 1\n")
    (path / "dvc.yaml").write_text("stages: {}\n")
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-qm", "init")
    return path


def edit_params(path: Path, over: dict) -> None:
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), over), sort_keys=False))


def test_git_commit_and_dirty_flag(tmp_path):
    repo = git_repo(tmp_path / "repo")
    head = sh(repo, "git", "rev-parse", "HEAD").strip()
    assert provenance.git_state(repo) == (head, False, [])
    (repo / "README.md").write_text("not a file that shapes the model\n")
    assert provenance.git_state(repo)[1] is False
    edit_params(repo / "params.yaml", {"train": {"lr": 0.123}})
    assert provenance.git_state(repo) == (head, True, [])
    sh(repo, "git", "checkout", "params.yaml")
    (repo / "src" / "new_module.py").write_text("y = 2\n")  # untracked code counts too
    assert provenance.git_state(repo)[1] is True
    sh(repo, "git", "add", "-A")  # staged, not committed: still not what HEAD holds
    assert provenance.git_state(repo)[1] is True
    sh(repo, "git", "commit", "-qm", "more")
    assert provenance.git_state(repo) == (sh(repo, "git", "rev-parse", "HEAD").strip(), False, [])


def test_outside_git_the_commit_is_unknown_and_said_so(tmp_path):
    (tmp_path / "params.yaml").write_text("")
    commit, dirty, notes = provenance.git_state(tmp_path)
    assert (commit, dirty) == ("unknown", "unknown") and len(notes) == 1 and "commit unknown" in notes[0]
    block = provenance.collect(None, {"clean": tmp_path}, tmp_path)
    assert block["commit"] == "unknown" and block["params_hash"] == "unknown" and block["data"] == {"clean": "unknown"}
    assert any("not a git repository" in n for n in block["notes"]), block["notes"]
    assert any("no dvc.lock" in n for n in block["notes"])


def test_params_hash_follows_the_sections_that_shape_the_model(tmp_path):
    base = write_params(tmp_path / "params.yaml", TINY)
    h = provenance.params_hash(load_params(base))
    assert h.startswith("sha256:") and len(h) == len("sha256:") + 64
    base.write_text("# a comment changes nothing\n" + base.read_text())
    assert provenance.params_hash(load_params(base)) == h
    for over, changes in [({"train": {"lr": 0.0123}}, True), ({"seed": 7}, True), ({"etl": {"min_box_px": 3.0}}, True),
                          ({"augment": {"copies": 3}}, True), ({"evaluate": {"score_threshold": 0.77}}, False),
                          ({"export": {"opset": 18}}, False), ({"quantize": {"calibration_images": 9}}, False)]:
        p = write_params(tmp_path / "other.yaml", merge(TINY, over))
        assert (provenance.params_hash(load_params(p)) != h) is changes, over
    assert provenance.collect(load_params(base), {}, tmp_path)["params_sections"] == [
        "seed", "classes", "ingest", "etl", "split", "augment", "train"]


def lock_outs(repo: Path) -> dict[str, str]:
    """path -> md5 of every stage output in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory, tiny_pipeline):
    """A git + DVC repository whose etl/split/augment stages produce the tiny data and whose train stage
    is the project's entry point, run by ``dvc repro``; (repo, params)."""
    d, _ = tiny_pipeline
    repo = git_repo(tmp_path_factory.mktemp("dvcproj") / "repo", {"train": {"epochs": 1}})
    py = sys.executable
    copy = "rm -rf data/{0} && mkdir -p data && cp -r {1}/{0} data/{0}"
    stages = {
        "etl": {"cmd": copy.format("clean", d), "outs": ["data/clean"]},
        "split": {"cmd": copy.format("split", d), "deps": ["data/clean"], "outs": ["data/split"]},
        "augment": {"cmd": copy.format("augmented", d), "deps": ["data/split"], "outs": ["data/augmented"]},
        "train": {"cmd": f"{py} {SRC}/stages/train.py --train data/augmented --clean data/clean --split data/split "
                         "--model models/model.pt --live reports/live --report reports/train.json",
                  "deps": ["data/augmented", "data/clean", "data/split"], "params": ["seed", "classes", "train"],
                  "outs": ["models/model.pt"]},
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    sh(repo, py, "-m", "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "pipeline")
    sh(repo, py, "-m", "dvc", "repro", "-q")
    return repo, load_params(repo / "params.yaml")


def test_data_version_is_dvcs_and_unknown_when_the_data_changed(dvc_project, tmp_path, monkeypatch):
    repo, params = dvc_project
    outs = lock_outs(repo)
    ckpt = torch.load(repo / "models/model.pt", weights_only=True)["provenance"]
    head = sh(repo, "git", "rev-parse", "HEAD").strip()
    # the train stage ran under dvc repro: DVC's hashes of its inputs, the commit, the params
    assert ckpt["data"] == {"clean": outs["data/clean"], "split": outs["data/split"],
                            "augmented": outs["data/augmented"]}
    assert all(v.endswith(".dir") for v in ckpt["data"].values())
    assert (ckpt["commit"], ckpt["dirty"], ckpt["notes"]) == (head, False, [])
    assert ckpt["params_hash"] == provenance.params_hash(params)
    assert ckpt["epoch"] >= 0 and "val_map" in ckpt and "train_images" in ckpt  # the keys it had before
    # the same folders given by another path, and a folder changed by hand since its stage ran
    monkeypatch.chdir(repo)
    data, notes = provenance.data_version({"split": repo / "data/split", "other": tmp_path}, repo)
    assert data == {"split": outs["data/split"], "other": "unknown"} and "not a DVC stage output" in notes[0]
    extra = repo / "data/clean/extra.txt"
    extra.write_text("edited by hand")
    try:
        data, notes = provenance.data_version({"clean": "data/clean"}, repo)
    finally:
        extra.unlink()
    assert data == {"clean": "unknown"} and "data/clean differs from dvc.lock" in notes[0]


@pytest.fixture(scope="module")
def exported(dvc_project, tmp_path_factory):
    """The repo's checkpoint exported by the library (raw, end-to-end, INT8) with evaluate metrics."""
    repo, params = dvc_project
    out = tmp_path_factory.mktemp("onnx")
    metrics = {"map50": 0.5, "escape_rate": 0.25, "deeppcb": {"ap": 0.75, "fscore": 0.625, "escape_rate": 0.125}}
    cwd = Path.cwd()
    os.chdir(repo)  # the export records the commit it runs at: the repo's
    try:
        export.run(params.export, "models/model.pt", "data/clean", dataset.test_ids("data/split"), out / "model.onnx",
                   out / "model.e2e.onnx", 0.3, metrics)
        quantize.run(params.quantize, out / "model.onnx", "data/augmented", "data/clean", "data/split",
                     out / "model.int8.onnx")
    finally:
        os.chdir(cwd)
    return repo, params, out


def contract_of(path: Path) -> dict:
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(meta[CONTRACT_KEY])


def test_every_onnx_file_carries_the_provenance(exported):
    repo, params, out = exported
    head, outs = sh(repo, "git", "rev-parse", "HEAD").strip(), lock_outs(repo)
    ckpt = torch.load(repo / "models/model.pt", weights_only=True)["provenance"]
    for name in ("model.onnx", "model.e2e.onnx", "model.int8.onnx"):
        prov = contract_of(out / name)["provenance"]
        assert prov["commit"] == prov["export_commit"] == head and prov["dirty"] is False, name
        assert prov["params_hash"] == provenance.params_hash(params) and prov["params_sections"][-1] == "train"
        assert prov["data"]["augmented"] == outs["data/augmented"] and prov["score_threshold"] == 0.3
        m = prov["metrics"]
        assert (m["deeppcb_ap"], m["deeppcb_fscore"], m["deeppcb_escape_rate"]) == (0.75, 0.625, 0.125)
        assert (m["test_map50"], m["test_escape_rate"], m["val_map"]) == (0.5, 0.25, ckpt["val_map"])
    int8 = contract_of(out / "model.int8.onnx")["provenance"]["metrics"]
    assert int8["int8_gate_split"] == "val" and 0 <= int8["int8_map50"] <= 1 and "fp32_map50" in int8


def test_info_and_result_records_carry_the_provenance(exported, capsys, tmp_path):
    repo, params, out = exported
    head, outs = sh(repo, "git", "rev-parse", "HEAD").strip(), lock_outs(repo)
    model = out / "model.e2e.onnx"
    assert app.main(["--model", str(model), "--info"]) == 0
    info = json.loads(capsys.readouterr().out)["provenance"]
    assert (info["version"], info["commit"], info["dirty"]) == ("unregistered", head, False)
    assert info["params_hash"] == provenance.params_hash(params) and info["data"]["clean"] == outs["data/clean"]
    assert info["metrics"]["deeppcb_ap"] == 0.75 and info["score_threshold"] == 0.3
    # the registered version (sidecar written when fetched from the registry) joins it
    sidecar = out / "model.e2e.onnx.registry.json"
    sidecar.write_text(json.dumps({"version": "7"}))
    try:
        assert app.main(["--model", str(model), "--info"]) == 0
        assert json.loads(capsys.readouterr().out)["provenance"]["version"] == "7"
        ds = Dataset.load(repo / "data/clean")
        row = ds.rows(dataset.test_ids(repo / "data/split")[:1])[0]
        rc = app.main(["--model", str(model), str(ds.root / row.path), "--template", str(ds.root / row.template_path),
                       "--out", str(tmp_path / "out.jsonl"), "--quiet"])
    finally:
        sidecar.unlink()
    assert rc == 0
    rec = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert rec["status"] == "ok" and rec["model"]["version"] == "7" and rec["model"]["commit"] == head
    assert rec["model"]["data"] == {"clean": outs["data/clean"], "split": outs["data/split"],
                                    "augmented": outs["data/augmented"]}


def test_a_model_without_provenance_says_unknown(tiny_pipeline, tmp_path, capsys):
    """A checkpoint from before provenance (no commit, no data) and a contract without the key at all."""
    d, _ = tiny_pipeline
    ds = Dataset.load(d / "clean")
    torch.manual_seed(0)
    model = Detector(DetectorConfig(num_classes=6, in_channels=3, width=8)).eval()
    ckpt = {"classes": list(CLASSES), "input_spec": checkpoint.input_spec(True), "model_config": model.cfg.to_dict()}
    x = torch.from_numpy(prepare_input(*load_pair(ds, ds.rows(ds.images.image_id[:1])[0]), True)[None])
    path = tmp_path / "old.onnx"
    export.export(model, ckpt, x, path, opset=17, end_to_end=True)
    prov = contract_of(path)["provenance"]
    assert prov["commit"] == prov["params_hash"] == prov["data"] == "unknown"
    assert any("before pcb-aoi recorded provenance" in n for n in prov["notes"])
    proto = onnx.load(str(path))  # an export from before the contract had the key
    for p in proto.metadata_props:
        if p.key == CONTRACT_KEY:
            p.value = json.dumps({k: v for k, v in json.loads(p.value).items() if k != "provenance"})
    onnx.save(proto, str(path))
    assert app.main(["--model", str(path), "--info"]) == 0
    info = json.loads(capsys.readouterr().out)["provenance"]
    assert info["version"] == "unregistered" and info["commit"] == info["params_hash"] == info["data"] == "unknown"
    assert info["score_threshold"] == 0.3


def test_training_refuses_params_that_are_not_the_ones_it_trains_with(tiny_pipeline, tmp_path):
    """Their hash goes into the checkpoint: params of another run would be a wrong hash."""
    from pcb_aoi.model import training

    d, p = tiny_pipeline
    with pytest.raises(ValueError, match="params differ"):
        training.run(p.train, p.seed + 1, p.classes, d / "augmented", d / "clean", d / "split",
                     tmp_path / "model.pt", tmp_path / "live", params=p)
    assert not (tmp_path / "model.pt").exists()
