"""AzureML specs under azureml/: every job and environment loads offline with azure-ai-ml, a malformed
spec is refused naming the file and key, the environment pins every project dependency, and the submit
script works offline (--help, --check, --dry-run)."""
import importlib.util
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

pytest.importorskip("azure.ai.ml", reason="azure-ai-ml not installed: pip install -e '.[dev]'")
AZUREML = ROOT / "azureml"
SUBMIT = [sys.executable, str(AZUREML / "submit.py")]


def submit_module():
    spec = importlib.util.spec_from_file_location("submit", AZUREML / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_spec_loads_offline():
    from azure.ai.ml import load_environment, load_job

    single = load_job(AZUREML / "pipeline-job.yml")
    assert single.type == "command" and single.identity.type == "managed_identity"
    assert {"commit", "name", "overrides", "register_model"} <= set(single.inputs) and "results" in single.outputs
    assert "--register-model ${{inputs.register_model}}" in single.command
    assert "azureml/run.sh" in single.command and single.distribution is None
    ddp = load_job(AZUREML / "train-distributed.yml")
    assert ddp.distribution.type == "pytorch" and ddp.distribution.process_count_per_instance == 1
    assert ddp.resources.instance_count >= 2 and "--distributed" in ddp.command
    env = load_environment(AZUREML / "environment.yml")
    assert env.image and env.conda_file["dependencies"]
    r = subprocess.run([*SUBMIT, "--check"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count(": ok") == 3, r.stderr


def test_environment_pins_every_project_dependency():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    from packaging.requirements import Requirement

    conda = yaml.safe_load((AZUREML / "conda.yml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    pins = dict(line.split("==") for line in pip)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for dep in project["dependencies"] + extras["tracking"] + extras["azureml"]:
        req = Requirement(dep)
        assert req.name in pins, f"azureml/conda.yml does not pin {req.name}"
        assert req.specifier.contains(pins[req.name]), f"{req.name}=={pins[req.name]} is outside pyproject's {req.specifier}"


@pytest.mark.parametrize("spec, old, new, expect", [
    ("train-distributed.yml", "type: pytorch", "type: pytorchh", "distribution.type: Value 'pytorchh'"),
    ("pipeline-job.yml", "\ncommand:", "\ncommandd:", "commandd: Unknown field"),
    ("train-distributed.yml", "instance_count: 2", "instance_count: two", "resources.instance_count: Not a valid integer"),
    ("pipeline-job.yml", "  type: managed", "  type: user_identity", "identity.type: must be `managed`"),
    ("train-distributed.yml", "\n  process_count_per_instance: 1", "\n  process_count_per_instance: 4", "process_count_per_instance: 1"),
    ("pipeline-job.yml", "type: command\n", "type: command\n  x: [\n", "line {bad_line}"),
])
def test_malformed_spec_is_refused_naming_file_and_key(tmp_path, spec, old, new, expect):
    text = (AZUREML / spec).read_text()
    assert old in text
    bad = tmp_path / spec
    bad.write_text(text.replace(old, new, 1))
    expect = expect.format(bad_line=text.splitlines().index("type: command") + 2)  # the inserted line
    r = subprocess.run([*SUBMIT, "--job", str(bad), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"error: {bad}: ") and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
    submit = submit_module()
    with pytest.raises(submit.SpecError, match=re.escape(str(bad))):
        submit.load(bad)


def test_submit_help_and_dry_run_offline(tmp_path):
    r = subprocess.run([*SUBMIT, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--dry-run" in r.stdout and "DefaultAzureCredential" in r.stdout
    # a clean git checkout holding azureml/: the job is pinned to its HEAD, overrides become an input
    repo = tmp_path / "repo"
    shutil.copytree(AZUREML, repo / "azureml", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=repo, check=True, env={**__import__("os").environ, **env})
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    script = [sys.executable, str(repo / "azureml/submit.py")]
    r = subprocess.run([*script, "--dry-run", "-S", "train.epochs=3", "-S", "train.lr=0.001", "--name", "lr-low"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    job = yaml.safe_load(r.stdout)
    assert job["inputs"]["commit"] == head and job["inputs"]["name"] == "lr-low"
    assert job["inputs"]["overrides"] == "train.epochs=3 train.lr=0.001" and job["inputs"]["register_model"] == "false"
    r = subprocess.run([*script, "--dry-run", "--register-model"], capture_output=True, text=True)
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["inputs"]["register_model"] == "true", r.stderr
    r = subprocess.run([*script, "--dry-run", "-S", "train.epochs 3"], capture_output=True, text=True)
    assert r.returncode == 2 and "expected key=value" in r.stderr
    r = subprocess.run([*script, "--dry-run", "--instances", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "train-distributed.yml" in r.stderr
    (repo / "azureml/run.sh").write_text("changed\n")  # uncommitted change: the job would not run it
    r = subprocess.run([*script, "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and "uncommitted changes" in r.stderr and "azureml/run.sh" in r.stderr


def test_run_sh_refuses_a_register_model_that_is_not_true_or_false(tmp_path):
    r = subprocess.run(["bash", str(AZUREML / "run.sh"), "--commit", "x", "--name", "y", "--out", str(tmp_path),
                        "--register-model", "maybe"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "--register-model: true or false, got maybe" in r.stderr


def register_module():
    spec = importlib.util.spec_from_file_location("register", AZUREML / "register.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def result(tmp_path):
    """A pipeline result as a job has it: the project's dvc.lock with the model's md5 set to a file written
    here, and an evaluate report."""
    import hashlib

    (tmp_path / "models").mkdir()
    (tmp_path / "reports").mkdir()
    model = tmp_path / "models/model.e2e.onnx"
    model.write_bytes(b"onnx bytes of the shipped model")
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    for out in lock["stages"]["export_onnx"]["outs"]:
        if out["path"] == "models/model.e2e.onnx":
            out["md5"] = hashlib.md5(model.read_bytes()).hexdigest()
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    metrics = {"deeppcb": {"ap": 0.967044, "fscore": 0.949002, "escape_rate": 0.031111,
                           "false_calls_per_image": 0.133333}, "map": 0.581422, "map50": 0.951968,
               "score_threshold": 0.3677, "test_images": 60, "operating_point": "auto"}
    (tmp_path / "reports/metrics.json").write_text(__import__("json").dumps(metrics))
    return tmp_path, lock


def test_model_registration_entity_is_tagged_and_validates_offline(result, monkeypatch):
    root, lock = result
    monkeypatch.chdir(root)
    register = register_module()
    commit = "0123456789abcdef0123456789abcdef01234567"
    model = register.validate(register.model_entity("models/model.e2e.onnx", commit))
    outs = {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}
    assert model.name == "pcb-aoi" and model.type == "custom_model"
    assert model.tags["git_commit"] == commit
    assert {k: model.tags[k] for k in ("data/clean", "data/split", "data/augmented")} == {
        k: outs[k] for k in ("data/clean", "data/split", "data/augmented")}
    assert model.tags["model_md5"] == outs["models/model.e2e.onnx"]
    assert {k: model.tags[k] for k in ("map", "map50", "deeppcb.ap", "deeppcb.escape_rate", "score_threshold")} == {
        "map": "0.581422", "map50": "0.951968", "deeppcb.ap": "0.967044", "deeppcb.escape_rate": "0.031111",
        "score_threshold": "0.3677"}
    assert "test_images" not in model.tags and "operating_point" not in model.tags
    r = subprocess.run([sys.executable, str(AZUREML / "register.py"), "--commit", commit, "--dry-run"], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert __import__("json").loads(r.stdout)["tags"] == model.tags
    bad = register.model_entity("models/model.e2e.onnx", commit)
    bad.type = "onnx_model"
    with pytest.raises(register.RegisterError, match="onnx_model"):
        register.validate(bad)


def test_registration_refuses_a_model_that_is_not_the_pipelines(result, monkeypatch):
    root, _ = result
    monkeypatch.chdir(root)
    register = register_module()
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "models/model.e2e.onnx").write_bytes(b"edited by hand")
    with pytest.raises(register.RegisterError, match="differs from the md5 dvc.lock records"):
        register.model_entity("models/model.e2e.onnx", commit)
    (root / "models/other.onnx").write_bytes(b"x")
    with pytest.raises(register.RegisterError, match="records no output models/other.onnx"):
        register.model_entity("models/other.onnx", commit)
    with pytest.raises(register.RegisterError, match="full 40-hex"):
        register.model_entity("models/model.e2e.onnx", "HEAD")
    r = subprocess.run([sys.executable, str(AZUREML / "register.py"), "--commit", commit, "--dry-run"], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: models/model.e2e.onnx: differs") and "Traceback" not in r.stderr
