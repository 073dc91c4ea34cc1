"""The pull-request review workflow: valid YAML that runs only commands this project has, the
credentials it relies on reaching a real Azure Blob endpoint, and what queued/temp experiments need."""
import importlib
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from pcb_aoi.evaluation import review
from pcb_aoi.pipeline import untracked

WORKFLOW = ROOT / ".github/workflows/review.yml"
EXTERNAL = {"pip", "gh", "echo", "exit"}  # on GitHub's runners; `dvc` and the project's scripts are checked below


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def commands() -> list[list[str]]:
    """Each shell command of every `run:` step, as words, ${{ expressions }} replaced by a placeholder."""
    out = []
    for step in workflow()["jobs"]["review"]["steps"]:
        for line in step.get("run", "").splitlines():
            line = re.sub(r"\$\{\{[^}]*\}\}", "X", line).split(" #")[0].strip()
            if line:
                out.append(shlex.split(line.split(">>")[0]))
    return out


def test_workflow_triggers_on_pull_requests_and_may_comment():
    wf = workflow()
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "pull_request" in on
    assert wf["permissions"]["pull-requests"] == "write"
    steps = wf["jobs"]["review"]["steps"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(python["with"]["python-version"]) == "3.11"
    env = wf["jobs"]["review"]["env"]
    assert env["AZURE_STORAGE_CONNECTION_STRING"] == "${{ secrets.AZURE_STORAGE_CONNECTION_STRING }}"
    words = [c[:2] for c in commands()]
    assert ["dvc", "pull"] in words and ["gh", "pr"] in words and ["pcb-aoi-review", "--base"] in words


def test_review_gate_fails_the_check_after_the_comment_is_posted():
    """--fail-on-drop makes the check a gate, but a failing review must still post its comment first."""
    steps = workflow()["jobs"]["review"]["steps"]
    index = {name: i for i, s in enumerate(steps) for name in (s.get("id"), s.get("name")) if name}
    review_step = steps[index["review"]]
    words = shlex.split(re.sub(r"\$\{\{[^}]*\}\}", "X", review_step["run"]))
    assert words[0] == "pcb-aoi-review" and review.parser().parse_args(words[1:]).fail_on_drop == 0.005
    assert review_step["continue-on-error"] is True  # the steps below still run when the gate fails
    comment = next(i for i, s in enumerate(steps) if "gh pr comment" in s.get("run", ""))
    assert comment > index["review"] and "steps.review" not in steps[comment].get("if", "")
    last = steps[-1]
    assert comment < len(steps) - 1 and last["if"] == "steps.review.outcome == 'failure'"
    assert last["run"].strip() == "exit 1"


def test_workflow_runs_only_commands_that_exist():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    dvc_commands = set()
    for words in commands():
        cmd = words[0]
        if cmd in scripts:
            module, func = scripts[cmd].split(":")
            assert callable(getattr(importlib.import_module(module), func)), scripts[cmd]
            if cmd == "pcb-aoi-review":
                review.parser().parse_args(words[1:])  # its options exist (argparse exits otherwise)
        elif cmd == "dvc":
            dvc_commands.add(words[1])
        elif cmd == "pip":
            assert words[1] == "install" and (words[2:] == ["-e", "."] or "torch==2.14.1" in words)
        elif cmd == "gh":
            assert words[1:3] == ["pr", "comment"] and "--body-file" in words
            body = words[words.index("--body-file") + 1]
            assert body.startswith("reports/review/")
        else:
            assert cmd in EXTERNAL, f"{WORKFLOW}: unknown command {cmd!r} in {' '.join(words)}"
    for sub in sorted(dvc_commands):
        r = subprocess.run([sys.executable, "-m", "dvc", sub, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, f"dvc {sub}: {r.stderr}"


def test_every_stage_dependency_is_in_git_or_made_by_a_stage():
    """Queued and temp experiments (`dvc exp run --queue/--temp`) copy only what git tracks."""
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip(f"{ROOT} is not a git checkout")
    assert untracked.missing(ROOT) == []


def test_remote_credentials_from_the_environment(azurite, tmp_path):
    """The workflow gives dvc-azure only AZURE_STORAGE_CONNECTION_STRING: push and pull with it."""
    import os

    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(azurite).create_container("review-remote")
    env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": azurite}
    for name in ("AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        env.pop(name, None)

    def sh(cwd, *cmd):
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}: {r.stdout}\n{r.stderr}"

    src = tmp_path / "src"
    src.mkdir()
    sh(src, "git", "init", "-q")
    sh(src, "dvc", "init", "-q")
    sh(src, "dvc", "remote", "add", "-d", "storage", "azure://review-remote/dvc")  # no credentials in git
    (src / "model.bin").write_bytes(b"weights" * 1000)
    sh(src, "dvc", "add", "-q", "model.bin")
    sh(src, "dvc", "push", "-q")
    dst = tmp_path / "dst"
    dst.mkdir()
    sh(dst, "git", "init", "-q")
    for name in (".dvc/config", "model.bin.dvc"):
        (dst / name).parent.mkdir(exist_ok=True)
        (dst / name).write_text((src / name).read_text())
    sh(dst, "dvc", "pull", "-q")
    assert (dst / "model.bin").read_bytes() == b"weights" * 1000


def test_test_workflow_runs_make_test_on_push_and_pull_request():
    """test.yml runs the README's test command, as .ci/run does, with the Python the project supports."""
    wf = yaml.safe_load((ROOT / ".github/workflows/test.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert {"push", "pull_request"} <= set(on)
    job = wf["jobs"]["test"]
    assert job["runs-on"] == "ubuntu-latest"
    python = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(python["with"]["python-version"]) == "3.11"
    runs = [line.strip() for s in job["steps"] for line in s.get("run", "").splitlines()]
    assert "make test" in runs and "make test" in (ROOT / ".ci/run").read_text()


def test_every_console_script_and_module_command_resolves():
    """pcb-aoi-* point at functions that exist, and the README's `python -m` commands start."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"pcb-aoi-review", "pcb-aoi-check-deps", "pcb-aoi-detect", "pcb-aoi-remote",
                            "pcb-aoi-registry", "pcb-aoi-collect", "pcb-aoi-report", "pcb-aoi-data-diff"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
    for module in ("pcb_aoi.review", "pcb_aoi.remote", "pcb_aoi.pipeline.untracked", "pcb_aoi.pipeline.deps",
                   "pcb_aoi.edge.app", "pcb_aoi.lifecycle", "pcb_aoi.report", "pcb_aoi.data.diff", "pcb_aoi.edge.collect"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("usage:"), f"python -m {module}: {r.stderr}"
