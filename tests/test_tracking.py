"""MLflow tracking of train and evaluate (pcb_aoi.pipeline.tracking) against a real local MLflow file
store: params, one point per epoch of the curves (a resumed run included), the report's numbers, one
run per stage or the one MLFLOW_RUN_ID names; without MLFLOW_TRACKING_URI nothing is logged and mlflow
is not even imported."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, merge, write_params

pytest.importorskip("mlflow", reason="mlflow not installed: pip install -e '.[dev]' (the tracking extra)")
from mlflow.tracking import MlflowClient  # noqa: E402

from pcb_aoi.evaluation import evaluate  # noqa: E402
from pcb_aoi.model import training  # noqa: E402
from pcb_aoi.pipeline import tracking  # noqa: E402
from pcb_aoi.pipeline.config import load_params  # noqa: E402

# The local test store is MLflow's file backend, opt-in since MLflow 3 (a sqlite store needs the full mlflow).
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
EPOCHS = 3
TRAIN = {"epochs": EPOCHS, "val_every": 2}  # validated after epochs 1 and 2 (the last): val/* has 2 points


def store_env(tmp_path) -> dict:
    """A local MLflow file store (the file backend is opt-in since MLflow 3)."""
    return {"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}


def curve(client, run_id, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def dvclive_curve(live, key) -> list[tuple[int, float]]:
    lines = (live / "plots/metrics" / f"{key}.tsv").read_text().splitlines()[1:]
    return [(int(s), float(v)) for s, v in (line.split("\t") for line in lines)]


def git_repo(path) -> str:
    path.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e"}
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, cwd=path, check=True, env=env)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()


def test_flatten_and_numbers_by_hand():
    report = {"map": 0.5, "n": 3, "ok": True, "name": "x", "none": None, "nan": float("nan"),
              "deeppcb": {"ap": 0.25, "per_class_recall": {"pin-hole": 1.0}}, "sizes": [1, 2]}
    assert tracking.numbers(report) == {"map": 0.5, "n": 3.0, "deeppcb.ap": 0.25,
                                        "deeppcb.per_class_recall.pin-hole": 1.0}
    p = load_params(ROOT / "params.yaml")
    flat = tracking.flatten({"seed": p.seed, "train": p.train})
    assert flat["seed"] == p.seed and flat["train.model.width"] == p.train.model.width
    assert flat["train.lr"] == p.train.lr and "train.model" not in flat


def test_each_stage_gets_its_own_run_with_params_curves_and_report_numbers(tiny_pipeline, tmp_path, monkeypatch):
    d, p = tiny_pipeline
    for k, v in store_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    commit = git_repo(tmp_path / "repo")
    monkeypatch.chdir(tmp_path / "repo")  # the run is tagged with the commit of the checkout it runs in
    cfg = p.train.model_copy(update=TRAIN)
    out = tmp_path / "out"
    train_report = tracking.tracked("train", {"seed": p.seed, "classes": p.classes, "train": cfg}, lambda: training.run(
        cfg, p.seed, p.classes, d / "augmented", d / "clean", d / "split", out / "model.pt", out / "live"))
    metrics = tracking.tracked("evaluate", {"classes": p.classes, "evaluate": p.evaluate}, lambda: evaluate.run(
        p.evaluate, out / "model.pt", d / "clean", d / "split", out / "metrics.json", out / "plots", out / "op.json",
        classes=p.classes))

    client = MlflowClient()
    exp = client.get_experiment_by_name("tiny")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["evaluate", "train"]
    train, ev = runs["train"], runs["evaluate"]
    for stage, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["pcb_aoi.stage"] == stage
        assert run.data.tags["mlflow.source.git.commit"] == commit
        assert run.data.tags[f"pcb_aoi.stage.{stage}"] == "FINISHED"
    # params: the sections the stage uses, flattened; values as params.yaml has them
    assert train.data.params["seed"] == str(p.seed) and train.data.params["train.epochs"] == str(EPOCHS)
    assert train.data.params["train.model.width"] == "8" and train.data.params["train.lr"] == str(cfg.lr)
    assert json.loads(train.data.params["classes"]) == list(p.classes)
    assert ev.data.params["evaluate.operating_point"] == "fixed" and not any(k.startswith("train.") for k in ev.data.params)
    # curves: one point per epoch, the values dvclive has
    live = out / "live"
    for key in ("train/loss", "train/heat", "train/box"):
        points = curve(client, train.info.run_id, key)
        assert [s for s, _ in points] == list(range(EPOCHS)) and points == dvclive_curve(live, key)
    for key in ("val/map", "val/map50"):
        assert curve(client, train.info.run_id, key) == dvclive_curve(live, key) and len(dvclive_curve(live, key)) == 2
    # final numbers: exactly the reports'
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert ev.data.metrics == tracking.numbers(on_disk)
    assert ev.data.metrics["score_threshold"] == p.evaluate.score_threshold and ev.data.metrics["test_images"] == 3
    assert ev.data.metrics["per_class.open.boxes"] == on_disk["per_class"]["open"]["boxes"]
    assert train.data.metrics["best_epoch"] == train_report["best_epoch"]
    assert train.data.metrics["train_seconds"] == train_report["train_seconds"]


def stage(name: str, params, d, out, **extra) -> list[str]:
    args = {"train": ["--train", d / "augmented", "--clean", d / "clean", "--split", d / "split",
                      "--model", out / "model.pt", "--live", out / "live", "--report", out / "train.json"],
            "evaluate": ["--model", out / "model.pt", "--clean", d / "clean", "--split", d / "split", "--metrics",
                         out / "metrics.json", "--plots", out / "plots", "--operating-point", out / "op.json"]}[name]
    return [sys.executable, str(ROOT / f"src/stages/{name}.py"), "--params", str(params), *map(str, args)]


@pytest.fixture(scope="module")
def shared_run(tiny_pipeline, tmp_path_factory):
    """The train stage killed after its first resume point and run again, then the evaluate stage, all
    logging into one run created beforehand and named by MLFLOW_RUN_ID (as in an AzureML job)."""
    d, _ = tiny_pipeline
    tmp = tmp_path_factory.mktemp("shared")
    env = {**os.environ, **store_env(tmp)}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    params = write_params(tmp / "params.yaml", merge(TINY, {"train": {**TRAIN, "epochs": 4}}))
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = client.create_run(client.create_experiment("job"), run_name="job").info.run_id
    env["MLFLOW_RUN_ID"] = run_id
    out = tmp / "out"
    last = out / "checkpoints/last.pt"
    proc = subprocess.Popen(stage("train", params, d, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not last.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "the run ended before it could be killed; the test needs slower epochs"
    killed_after = torch.load(last, weights_only=True)["epoch"]
    assert killed_after < 3
    for name in ("train", "evaluate"):
        r = subprocess.run(stage(name, params, d, out), env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return client, run_id, out, killed_after


def test_one_run_for_the_whole_job_no_epoch_logged_twice_after_a_resume(shared_run):
    client, run_id, out, killed_after = shared_run
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING", "the job owns the run: the stages must not end it"
    assert run.data.tags["pcb_aoi.stage.train"] == run.data.tags["pcb_aoi.stage.evaluate"] == "FINISHED"
    assert run.data.params["train.epochs"] == "4" and "evaluate.operating_point" in run.data.params
    assert json.loads((out / "train.json").read_text())["resumed_from_epoch"] == killed_after
    # the resumed run replays epochs 0..killed_after into dvclive; MLflow keeps one point per epoch
    for key in ("train/loss", "val/map"):
        points = curve(client, run_id, key)
        assert points == dvclive_curve(out / "live", key)
    assert [s for s, _ in curve(client, run_id, "train/loss")] == [0, 1, 2, 3]
    metrics = json.loads((out / "metrics.json").read_text())
    got = {k: v for k, v in run.data.metrics.items() if k in tracking.numbers(metrics)}
    assert got == tracking.numbers(metrics)
    assert run.data.metrics["val_map"] == json.loads((out / "train.json").read_text())["val_map"]


def test_without_a_tracking_uri_nothing_is_logged_and_mlflow_is_not_imported(tiny_pipeline, shared_run, tmp_path):
    d, _ = tiny_pipeline
    _, _, trained, _ = shared_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_bytes((trained / "model.pt").read_bytes())
    argv = stage("evaluate", write_params(tmp_path / "params.yaml", TINY), d, out)[1:]
    code = ("import runpy, sys; sys.argv = %r; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert 'mlflow' not in sys.modules, 'mlflow was imported'" % argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "metrics.json").read_text())["test_images"] == 3
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_run_id_that_does_not_exist_stops_the_stage_before_it_works(tmp_path):
    env = {**os.environ, **store_env(tmp_path), "MLFLOW_RUN_ID": "0123456789abcdef0123456789abcdef"}
    params = write_params(tmp_path / "params.yaml", TINY)
    out = tmp_path / "out"
    r = subprocess.run(stage("evaluate", params, tmp_path / "nowhere", out), env=env, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("error: evaluate: TrackingError: MLFLOW_RUN_ID=0123456789abcdef0123456789abcdef: "), r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
