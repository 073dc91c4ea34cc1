"""Register the pipeline's ONNX model as a version in the AzureML model registry, tagged with where it
came from: the git commit holding its dvc.lock, the data version (the DVC md5s of data/clean,
data/split and data/augmented) and the headline test metrics of reports/metrics.json.

  python azureml/register.py --commit $(git rev-parse HEAD) --dry-run   # print the entity, validated offline
  python azureml/register.py --commit <sha>                             # register (run.sh, --register-model true)

An ONNX file is a `custom_model`: `mlflow_model` means an MLflow model folder (an MLmodel file and a
flavor), which the edge app does not read. The file must be the one dvc.lock records (its md5 is a tag,
so `dvc` can fetch the same bytes from the remote); a file that differs is refused. Inside an AzureML job
the workspace comes from the job's own variables (AZUREML_ARM_*), the login from the compute's managed
identity; elsewhere from --subscription/--resource-group/--workspace or their AZURE_* variables.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import yaml

DATA = ("data/clean", "data/split", "data/augmented")  # the data version: what train and evaluate read
HEADLINE = ("map", "map50", "deeppcb.ap", "deeppcb.fscore", "deeppcb.escape_rate", "deeppcb.false_calls_per_image",
            "score_threshold")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")  # AzureML asset names


class RegisterError(Exception):
    """Inputs that cannot make a registry entry; the message names the file and key."""


def lock_md5s(lock: str | Path) -> dict[str, str]:
    """``{out path: md5}`` of every stage output recorded in dvc.lock."""
    lock = Path(lock)
    try:
        stages = yaml.safe_load(lock.read_text())["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise RegisterError(f"{lock}: not a dvc.lock with stages ({type(e).__name__}: {e})") from None
    return {o["path"]: o["md5"] for s in stages.values() for o in s.get("outs", []) if "md5" in o}


def data_version(md5s: dict[str, str], lock: str | Path = "dvc.lock") -> dict[str, str]:
    missing = [p for p in DATA if p not in md5s]
    if missing:
        raise RegisterError(f"{lock}: no md5 for {', '.join(missing)}: run the pipeline (dvc repro) first")
    return {p: md5s[p] for p in DATA}


def headline(metrics: dict, path: str | Path = "reports/metrics.json") -> dict[str, float]:
    """The HEADLINE numbers of an evaluate report, flattened keys (``deeppcb.ap``)."""
    out = {}
    for key in HEADLINE:
        value = metrics
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    if "map" not in out:
        raise RegisterError(f"{path}: no `map`: not an evaluate report (reports/metrics.json)")
    return out


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_entity(model: str | Path, commit: str, lock: str | Path = "dvc.lock",
                 metrics: str | Path = "reports/metrics.json", name: str = "pcb-aoi", job: str | None = None):
    """The azure-ai-ml ``Model`` for ``model`` (a file dvc.lock records), its tags: ``git_commit``, the data
    md5s (``data/clean``...), ``model_md5``, the headline metrics, ``azureml_job`` inside a job."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    model, md5s = Path(model), lock_md5s(lock)
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise RegisterError(f"--commit {commit!r}: expected a full 40-hex git commit (git rev-parse HEAD)")
    if not NAME.match(name):
        raise RegisterError(f"--name {name!r}: letters, digits, _ - . only, starting with a letter or digit")
    if not model.is_file():
        raise RegisterError(f"{model}: no such file: run the pipeline (dvc repro) or pull it (pcb-aoi-remote pull)")
    key = model.as_posix() if model.as_posix() in md5s else next(
        (p for p in md5s if Path(p).name == model.name and model.resolve().as_posix().endswith(p)), None)
    if key is None:
        raise RegisterError(f"{lock}: records no output {model}: register a file the pipeline writes")
    if file_md5(model) != md5s[key]:
        raise RegisterError(f"{model}: differs from the md5 {lock} records ({md5s[key]}): run dvc repro "
                            "(or dvc checkout) so the file is the pipeline's")
    metrics_path = Path(metrics)
    try:
        numbers = headline(json.loads(metrics_path.read_text()), metrics_path)
    except (OSError, ValueError) as e:
        raise RegisterError(f"{metrics_path}: {type(e).__name__}: {e}") from None
    tags = {"git_commit": commit, **data_version(md5s, lock), "model_file": key, "model_md5": md5s[key],
            **{k: f"{v:.6g}" for k, v in numbers.items()}}
    if job:
        tags["azureml_job"] = job
    return Model(name=name, path=str(model), type=AssetTypes.CUSTOM_MODEL, tags=tags,
                 description=f"pcb-aoi {key} from commit {commit[:12]}: test mAP {numbers['map']:.4f}, "
                             f"mAP@0.5 {numbers.get('map50', float('nan')):.4f}")


def validate(model):
    """The entity written as a registry YAML and loaded back with azure-ai-ml's schema (what
    `az ml model create -f` checks), offline; RegisterError naming the field otherwise."""
    from azure.ai.ml import load_model

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "model.yml"
        try:
            model.dump(spec)
            return load_model(source=spec)
        except Exception as e:
            raise RegisterError(f"model entity: {' '.join(str(e).split())[:400]}") from None


def ml_client(args):
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    sub = args.subscription or os.environ.get("AZUREML_ARM_SUBSCRIPTION")
    group = args.resource_group or os.environ.get("AZUREML_ARM_RESOURCEGROUP")
    ws = args.workspace or os.environ.get("AZUREML_ARM_WORKSPACE_NAME")
    if sub and group and ws:
        return MLClient(DefaultAzureCredential(), sub, group, ws)
    return MLClient.from_config(DefaultAzureCredential())


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", required=True, help="the git commit whose dvc.lock describes the model")
    ap.add_argument("--model", default="models/model.e2e.onnx", help="ONNX file to register (default: %(default)s)")
    ap.add_argument("--lock", default="dvc.lock")
    ap.add_argument("--metrics", default="reports/metrics.json")
    ap.add_argument("--name", default="pcb-aoi", help="registry name; each registration adds a version")
    ap.add_argument("--dry-run", action="store_true", help="print the validated entity and exit")
    ap.add_argument("--subscription", default=os.environ.get("AZURE_SUBSCRIPTION_ID"))
    ap.add_argument("--resource-group", default=os.environ.get("AZURE_RESOURCE_GROUP"))
    ap.add_argument("--workspace", default=os.environ.get("AZUREML_WORKSPACE_NAME"))
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from submit import _quiet

        model = model_entity(args.model, args.commit, args.lock, args.metrics, args.name,
                             os.environ.get("AZUREML_RUN_ID"))
        _quiet()
        validate(model)
        if args.dry_run:
            print(json.dumps(model._to_dict(), indent=2))
            return 0
        created = ml_client(args).models.create_or_update(model)
        print(f"registered {created.name}:{created.version} ({args.model}, commit {args.commit[:12]})")
    except RegisterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Azure login / workspace errors: one line, not a traceback
        print(f"error: register: {type(e).__name__}: {' '.join(str(e).split())[:500]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
