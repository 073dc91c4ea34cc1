"""MLflow mirror of the train and evaluate stages, so a run is watched live in AzureML studio (or any
MLflow server) while DVC stays the record: the files in reports/ and dvc.lock are what counts.

Off unless ``MLFLOW_TRACKING_URI`` is set (AzureML jobs set it); off, nothing is logged and mlflow is
not imported. On, a stage wrapped in ``tracked`` logs
- params: the params.yaml sections it uses, flattened (``seed``, ``train.lr``, ``train.model.width``);
- per-epoch curves: train's dvclive values at step = epoch (``train/loss``, ``val/map``...), one point
  per epoch: the epochs a resumed run replays into dvclive are logged only where missing;
- final metrics: the numbers of its report, flattened, at step 0 (evaluate: ``map``, ``deeppcb.ap``,
  ``per_class.open.ap50``... of reports/metrics.json; train: ``val_map``, ``best_epoch``... of
  reports/train.json); strings, booleans and nulls are left out.

Which run: with ``MLFLOW_RUN_ID`` set (an AzureML job sets it to the job's own run) every stage of the
``dvc exp run`` logs into that one run and leaves its status to its owner. Without it each stage creates
its own run, named after the stage, in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``pcb-aoi``),
tagged with the git commit (``mlflow.source.git.commit``), and ends it FINISHED or FAILED: the stages of
a ``dvc repro`` are separate processes DVC passes nothing between, so to group them locally export
``MLFLOW_RUN_ID`` of a run you created. Either way the tag ``pcb_aoi.stage.<stage>`` says how the stage
ended (RUNNING while it runs). Under torchrun only rank 0 logs.

A tracking store that cannot be reached or a run id that does not exist stops the stage before it
works (``TrackingError``); a logging call that fails later warns once and the stage goes on: the
curves are in dvclive, the metrics in reports/.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Mapping

EXPERIMENT = "pcb-aoi"  # default experiment name, as azureml/pipeline-job.yml's experiment_name
_KEY = re.compile(r"[^\w\-. /]")  # MLflow keys allow letters, digits, _ - . space /


class TrackingError(RuntimeError):
    """The MLflow run could not be started: the message names the variable to fix."""


def enabled() -> bool:
    """Whether this process logs to MLflow: a tracking URI is set and it is rank 0 (or not under torchrun)."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI", "").strip()) and os.environ.get("RANK", "0") == "0"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": leaf}``; pydantic sections are dumped first, lists stay leaves."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def numbers(report: Mapping) -> dict[str, float]:
    """The finite numbers of a report, flattened; strings, booleans, nulls and NaN are left out."""
    return {k: float(v) for k, v in flatten(report).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _key(key: str) -> str:
    return _KEY.sub("_", key)


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def git_commit() -> str | None:
    """HEAD of the git checkout the stage runs in, or None outside one."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


class Run:
    """One stage's view of its MLflow run: its own (``owned``) or the one ``MLFLOW_RUN_ID`` names."""

    def __init__(self, stage: str, params: Mapping[str, Any]):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.stage, self.warned = stage, False
        self.steps: dict[str, set[int]] = {}  # key -> steps already in the run (an attached run has history)
        uri = os.environ["MLFLOW_TRACKING_URI"]
        run_id = os.environ.get("MLFLOW_RUN_ID", "").strip()
        try:
            self.client = MlflowClient()
            if run_id:
                self.run_id, self.owned = self.client.get_run(run_id).info.run_id, False
            else:
                self.run_id, self.owned = self._create(stage), True
            flat = {_key(k): _param(v) for k, v in flatten(dict(params)).items()}
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()],
                                  tags=[RunTag(f"pcb_aoi.stage.{stage}", "RUNNING")])
        except Exception as e:
            what = f"MLFLOW_RUN_ID={run_id}" if run_id else f"MLFLOW_TRACKING_URI={uri}"
            raise TrackingError(f"{what}: cannot start the MLflow run: {type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]}; fix or unset it") from None

    def _create(self, stage: str) -> str:
        experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip()
        if not experiment_id:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or EXPERIMENT
            found = self.client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found else self.client.create_experiment(name)
        tags = {"pcb_aoi.stage": stage}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        return self.client.create_run(experiment_id, run_name=stage, tags=tags).info.run_id

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Log ``values`` at ``step``, except those an attached run already has at that step."""
        from mlflow.entities import Metric

        try:
            now, fresh = int(time.time() * 1000), []
            for k, v in values.items():
                k = _key(k)
                if not self.owned and k not in self.steps:
                    self.steps[k] = {m.step for m in self.client.get_metric_history(self.run_id, k)}
                if step not in self.steps.setdefault(k, set()):
                    fresh.append(Metric(k, float(v), now, step))
                    self.steps[k].add(step)
            if fresh:
                self.client.log_batch(self.run_id, metrics=fresh)
        except Exception as e:
            self._warn(e)

    def end(self, ok: bool) -> None:
        status = "FINISHED" if ok else "FAILED"
        try:
            self.client.set_tag(self.run_id, f"pcb_aoi.stage.{self.stage}", status)
            if self.owned:
                self.client.set_terminated(self.run_id, status)
        except Exception as e:
            self._warn(e)

    def _warn(self, e: Exception) -> None:
        if not self.warned:
            print(f"{self.stage}: warning: MLflow logging failed, the stage goes on (dvclive and reports/ keep "
                  f"everything): {type(e).__name__}: {' '.join(str(e).split())[:300]}", file=sys.stderr, flush=True)
            self.warned = True


_active: Run | None = None  # the run of the stage this process runs


def tracked(stage: str, params: Mapping[str, Any], work: Callable[[], dict]) -> dict:
    """Run ``work`` (a stage's library call, returning its report) inside an MLflow run when tracking is
    ``enabled``: params logged first, the report's numbers last. Off, just ``work()``."""
    global _active
    if not enabled():
        return work()
    _active = Run(stage, params)
    ok = False
    try:
        report = work()
        _active.log(numbers(report), step=0)
        ok = True
        return report
    finally:
        _active.end(ok)
        _active = None


def log_epoch(step: int, values: Mapping[str, float]) -> None:
    """One epoch's curve values (the keys dvclive gets) at ``step``; nothing outside a tracked stage."""
    if _active is not None:
        _active.log(values, step)
