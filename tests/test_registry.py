"""The model registry on a real git + DVC repo whose remote is Azure Blob (Azurite): two versions
registered from two commits, one promoted to prod, the edge box fetching prod from a bare git remote
into an empty folder, and the edge app reporting that version; bad versions and empty stages refused
with the list of what exists, writing nothing. Also: the project's own dvc.yaml declaration."""
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT
from test_edge import overlapping_model
from test_remote import ENV, create_container, sh

from pcb_aoi.deploy import export
from pcb_aoi.edge.contract import CONTRACT_KEY
from pcb_aoi.lifecycle import cli as registry_cli, registry as registry_lib
from pcb_aoi.model import checkpoint
from pcb_aoi.model.inference import prepare_input
from pcb_aoi.pipeline.config import CLASSES

REGISTRY = [sys.executable, "-m", "pcb_aoi.lifecycle"]
DETECT = [sys.executable, "-m", "pcb_aoi.edge.app"]
MODEL = "models/model.e2e.onnx"
V1, V2 = "v1.0.0", "v1.0.1"  # v2 is registered without --version: the patch number of v1, bumped


def pair(h: int = 64, w: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic board (copper lines) and the same board with one blob of copper added."""
    template = np.full((h, w), 30, np.uint8)
    template[:, 10:14] = template[20:24, :] = 220
    test = template.copy()
    test[40:46, 50:56] = 220
    return test, template


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[bytes, bytes]:
    """Two end-to-end ONNX files of pcb-aoi's contract, different bytes (other default thresholds)."""
    out = tmp_path_factory.mktemp("onnx")
    model = overlapping_model()
    ckpt = {"classes": list(CLASSES), "input_spec": checkpoint.input_spec(True), "model_config": model.cfg.to_dict()}
    x = torch.from_numpy(prepare_input(*pair(), True)[None])
    export.export(model, ckpt, x, out / "v1.onnx", opset=17, end_to_end=True, score_threshold=0.3)
    m = onnx.load(out / "v1.onnx")  # v2: another default threshold in the contract (one export is enough)
    entry = next(p for p in m.metadata_props if p.key == CONTRACT_KEY)
    entry.value = json.dumps(json.loads(entry.value) | {"score_threshold": 0.45})
    onnx.save(m, out / "v2.onnx")
    files = (out / "v1.onnx").read_bytes(), (out / "v2.onnx").read_bytes()
    assert files[0] != files[1]
    return files


def registry(*args, cwd, env=None):
    return sh(cwd, *REGISTRY, *map(str, args), env=env, check=False, timeout=300)


def commit_model(repo: Path, data: bytes, message: str) -> str:
    """Put ``data`` in models/model.e2e.onnx (a new inode: DVC re-hashes it), dvc add, push, git commit."""
    tmp = repo / "models" / ".new"
    tmp.write_bytes(data)
    os.replace(tmp, repo / MODEL)
    sh(repo, "dvc", "add", "-q", MODEL)
    sh(repo, "dvc", "push", "-q", "-r", "storage")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)
    return sh(repo, "git", "rev-parse", "HEAD").stdout.strip()


@pytest.fixture(scope="module")
def published(azurite, model_files, tmp_path_factory):
    """The team's repo: the project's pcb-detector declaration, v1 and v2 committed, pushed to Azurite and
    registered, v1 promoted to prod, tags pushed to a bare git remote. Returns (repo, bare, conn, commits)."""
    create_container(azurite, "registry")
    base = tmp_path_factory.mktemp("registry")
    bare, repo = base / "origin.git", base / "team"
    sh(base, "git", "init", "-q", "--bare", "-b", "main", str(bare))
    repo.mkdir()
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "dvc", "init", "-q")
    # as the project's .dvc/config: the remote committed without secrets and without a default
    sh(repo, "dvc", "remote", "add", "storage", "azure://registry/store")
    sh(repo, "dvc", "remote", "modify", "--local", "storage", "connection_string", azurite)
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]["pcb-detector"]
    assert declared["path"] == MODEL
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"artifacts": {"pcb-detector": declared}}))
    (repo / "models").mkdir()
    sh(repo, "git", "remote", "add", "origin", str(bare))
    commits = [commit_model(repo, model_files[0], "model v1")]
    r = registry("register", "--version", V1, "--push", cwd=repo)
    assert r.returncode == 0 and json.loads(r.stdout)["tag"] == f"pcb-detector@{V1}", r.stderr
    commits.append(commit_model(repo, model_files[1], "model v2"))
    r = registry("register", "--push", cwd=repo)
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == V2, r.stderr
    r = registry("promote", V1, "prod", "--push", cwd=repo)
    assert r.returncode == 0 and json.loads(r.stdout)["commit"] == commits[0], r.stderr
    sh(repo, "git", "push", "-q", "origin", "main")
    return repo, bare, azurite, commits


def box_env(conn: str) -> dict:
    """The edge box: the remote's credentials from the environment, no .dvc/config.local."""
    return {**ENV, "AZURE_STORAGE_CONNECTION_STRING": conn}


def test_list_shows_versions_commits_and_stages(published):
    repo, _, _, commits = published
    r = registry("list", cwd=repo)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["version"], x["commit"], x["stages"]) for x in rows] == [(V2, commits[1], []),
                                                                       (V1, commits[0], ["prod"])]


def test_edge_box_fetches_prod_and_reports_its_version(published, model_files, tmp_path):
    _, bare, conn, commits = published
    box = tmp_path / "box" / "model"  # does not exist yet
    r = registry("fetch", "--stage", "prod", "--out", box, "--repo", bare, cwd=tmp_path, env=box_env(conn))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in box.iterdir()) == ["model.e2e.onnx", "model.e2e.onnx.registry.json"]
    assert (box / "model.e2e.onnx").read_bytes() == model_files[0]
    side = json.loads((box / "model.e2e.onnx.registry.json").read_text())
    assert {k: side[k] for k in ("artifact", "version", "stage", "commit", "repo", "path")} == {
        "artifact": "pcb-detector", "version": V1, "stage": "prod", "commit": commits[0], "repo": str(bare),
        "path": MODEL}
    assert abs((datetime.now().astimezone() - datetime.fromisoformat(side["fetched_at"])).total_seconds()) < 300
    assert not list(box.parent.glob(".*fetch*")), "the temporary download folder is left behind"

    info = sh(tmp_path, *DETECT, "--model", box / "model.e2e.onnx", "--info")
    assert json.loads(info.stdout)["version"] == V1
    test, template = pair()
    Image.fromarray(test).save(tmp_path / "b_test.png")
    Image.fromarray(template).save(tmp_path / "b_temp.png")
    sh(tmp_path, *DETECT, "--model", box / "model.e2e.onnx", tmp_path / "b_test.png", "--template",
       tmp_path / "b_temp.png", "--out", tmp_path / "r.jsonl")
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert record["status"] == "ok" and record["detections"] and record["model"]["version"] == V1

    # the same folder, now a version: v2's bytes and sidecar replace v1's; no stage recorded
    r = registry("fetch", V2, "--out", box, "--repo", bare, cwd=tmp_path, env=box_env(conn))
    assert r.returncode == 0, r.stderr
    assert (box / "model.e2e.onnx").read_bytes() == model_files[1]
    side = json.loads((box / "model.e2e.onnx.registry.json").read_text())
    assert side["version"] == V2 and side["commit"] == commits[1] and "stage" not in side
    info = sh(tmp_path, *DETECT, "--model", box / "model.e2e.onnx", "--info")
    assert json.loads(info.stdout)["version"] == V2


def test_dvc_artifacts_get_reads_the_same_tags(published, model_files, tmp_path):
    _, bare, conn, _ = published
    sh(tmp_path, "dvc", "artifacts", "get", str(bare), "pcb-detector", "--stage", "prod", "-o", "prod.onnx",
       "--remote", "storage", env=box_env(conn))
    sh(tmp_path, "dvc", "artifacts", "get", str(bare), "pcb-detector", "--rev", V2, "-o", "v2.onnx",
       "--remote", "storage", env=box_env(conn))
    assert (tmp_path / "prod.onnx").read_bytes() == model_files[0]
    assert (tmp_path / "v2.onnx").read_bytes() == model_files[1]


def run_main(capsys, *args) -> tuple[int, str]:
    """pcb-aoi-registry in this process (the refusals need no git identity): (exit code, stderr)."""
    capsys.readouterr()
    try:
        rc = registry_cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args, expect", [
    (["fetch", "v9.9.9"], ["no version 'v9.9.9'", f"registered versions: {V1}, {V2}"]),
    (["fetch", "--stage", "staging"], ["nothing is promoted to stage 'staging'", f"versions: {V1} (prod), {V2}"]),
])
def test_fetch_refuses_what_does_not_exist_and_writes_nothing(published, tmp_path, monkeypatch, capsys, args, expect):
    _, bare, conn, _ = published
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", conn)
    monkeypatch.chdir(tmp_path)
    rc, err = run_main(capsys, *args, "--out", tmp_path / "out", "--repo", bare)
    assert rc == 1 and err.startswith("error: "), err
    for text in expect:
        assert text in err, err
    assert list(tmp_path.iterdir()) == [], "a refused fetch wrote something"


def test_register_and_promote_refuse_without_writing_a_tag(published, capsys):
    repo = published[0]
    tags = sh(repo, "git", "tag").stdout
    for args, expect in [
        (["promote", "v9.9.9", "staging"], f"no version 'v9.9.9'; registered versions: {V1}, {V2}"),
        (["register"], f"commit {published[3][1][:8]} is already registered as {V2}"),
        (["register", "--rev", "HEAD~1", "--version", "v3.0.0"], f"already registered as {V1}"),
        (["register", "--version", V1, "--rev", "HEAD~1"], f"{V1} is already registered"),
        (["register", "--version", "3.0"], "use vMAJOR.MINOR.PATCH"),
        (["register", "--artifact", "nope"], "no model artifact 'nope'; declared: pcb-detector"),
        (["register", "--rev", "nope"], "unknown git revision 'nope'"),
    ]:
        rc, err = run_main(capsys, *args, "-C", repo)
        assert rc == 1 and expect in err, (args, err)
    assert sh(repo, "git", "tag").stdout == tags
    assert run_main(capsys, "promote", V1, "qa", "-C", repo)[0] == 2  # argparse: staging | prod


def test_promoting_an_older_version_is_the_rollback(tmp_path, monkeypatch, capsys):
    """prod: v1, then v2, then v1 again: fetch, list and `dvc artifacts get` all say v1 (the newest
    assignment wins, not the highest version). A repo on disk with its own cache: no remote needed."""
    for key in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{key}_NAME", "test")
        monkeypatch.setenv(f"GIT_{key}_EMAIL", "t@example.com")
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "dvc", "init", "-q")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"artifacts": {"pcb-detector": {"path": MODEL, "type": "model"}}}))
    (repo / "models").mkdir()
    for data in (b"first model", b"second model, longer"):
        tmp = repo / "models" / ".new"
        tmp.write_bytes(data)
        os.replace(tmp, repo / MODEL)
        sh(repo, "dvc", "add", "-q", MODEL)
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", data.decode())
        assert run_main(capsys, "register", "-C", repo)[0] == 0
    for version in ("v0.0.1", "v0.0.2", "v0.0.1"):
        rc, err = run_main(capsys, "promote", version, "prod", "-C", repo)
        assert rc == 0, err
    assert run_main(capsys, "promote", "v0.0.1", "prod", "-C", repo)[1].endswith("already the version in stage 'prod'\n")
    prod = [v["version"] for v in registry_lib.versions(repo, "pcb-detector") if "prod" in v["stages"]]
    assert prod == ["v0.0.1"]
    assert run_main(capsys, "fetch", "--stage", "prod", "--out", tmp_path / "box", "--repo", repo)[0] == 0
    assert (tmp_path / "box/model.e2e.onnx").read_bytes() == b"first model"
    sh(tmp_path, "dvc", "artifacts", "get", str(repo), "pcb-detector", "--stage", "prod", "-o", "dvc.onnx")
    assert (tmp_path / "dvc.onnx").read_bytes() == b"first model"


def test_project_declares_the_shipped_files_with_a_true_contract_and_metrics():
    """dvc.yaml's artifacts: DVC reads them, each path is a stage output, and the meta matches params.yaml
    and reports/benchmark.json (re-running the pipeline without updating them fails here)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        declared = repo.artifacts.read()["dvc.yaml"]
        outs = {str(o.def_path) for s in repo.index.stages for o in s.outs}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    bench = {}  # file -> its dense row (the gated rows come after)
    for v in json.loads((ROOT / "reports/benchmark.json").read_text())["variants"]:
        if v["provider"] in ("CPUExecutionProvider", "torch-cpu") and v.get("gate") in (None, "none"):
            bench.setdefault(v["file"], v)
    assert set(declared) == {"pcb-detector", "pcb-detector-int8", "pcb-detector-checkpoint"}
    for name, a in declared.items():
        assert a.type == "model" and a.path in outs, name
        meta, file = a.meta, Path(a.path).name
        assert meta["classes"] == params["classes"], f"{name}: meta.classes differ from params.yaml classes"
        assert meta["needs_template"] == params["train"]["model"]["use_template"], name
        assert meta["register_max_px"] == params["etl"]["register_max_px"], name
        assert meta["score_threshold"] == bench[file]["score_threshold"], name
        for key, value in meta["metrics"].items():
            assert value == bench[file][key], f"{name}: meta.metrics.{key} {value} != reports/benchmark.json {bench[file][key]}"


def test_meta_write_brings_stale_artifact_meta_back_in_line(tmp_path, capsys):
    """`pcb-aoi-registry meta` fails on a meta that no longer matches the reports; `--write` fixes exactly it."""
    from pcb_aoi.lifecycle import cli, meta

    for f in ("dvc.yaml", "params.yaml", "reports/benchmark.json"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text((ROOT / f).read_text())
    assert meta.stale(tmp_path) == [] and cli.main(["meta", "-C", str(tmp_path)]) == 0
    text = (tmp_path / "dvc.yaml").read_text()
    ap = meta.expected(tmp_path)["pcb-detector-int8"]["metrics"]["deeppcb_ap"]
    (tmp_path / "dvc.yaml").write_text(text.replace(f"deeppcb_ap: {ap}", "deeppcb_ap: 0.5", 1))
    assert meta.stale(tmp_path) == ["pcb-detector"] or meta.stale(tmp_path) == ["pcb-detector-int8"]
    assert cli.main(["meta", "-C", str(tmp_path)]) == 1 and "meta --write" in capsys.readouterr().err
    assert cli.main(["meta", "-C", str(tmp_path), "--write"]) == 0 and meta.stale(tmp_path) == []
    assert (tmp_path / "dvc.yaml").read_text() == text  # the same file back: layout and comments kept
