"""Submit the pcb-aoi pipeline to AzureML: validate the job spec offline, pin it to your current (clean)
git commit, pass the `dvc exp run -S` overrides, create the environment if needed, and submit.

  python azureml/submit.py --check                                  # validate every spec offline, submit nothing
  python azureml/submit.py --dry-run -S train.epochs=30             # print the job that would be submitted
  python azureml/submit.py -S train.epochs=30 -S train.lr=0.001     # submit azureml/pipeline-job.yml
  python azureml/submit.py --register-model                          # ... and register the model it trains
  python azureml/submit.py --job azureml/train-distributed.yml --instances 2 --compute gpu-cluster

The workspace comes from --subscription/--resource-group/--workspace, or AZURE_SUBSCRIPTION_ID /
AZURE_RESOURCE_GROUP / AZUREML_WORKSPACE_NAME, or a config.json (`az ml workspace show` downloads one).
You log in with DefaultAzureCredential (`az login`, a service principal in AZURE_CLIENT_ID /
AZURE_CLIENT_SECRET / AZURE_TENANT_ID, or a managed identity); no browser window is opened.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
JOBS = [HERE / "pipeline-job.yml", HERE / "train-distributed.yml"]
ENVIRONMENT = HERE / "environment.yml"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,60}$")


class SpecError(Exception):
    """A job or environment spec that AzureML would refuse; the message names the file and the key."""


def _quiet():
    # azure-ai-ml warns about "experimental" fields and classes on every load; they are not ours to fix.
    for name in ("azure.ai.ml", "azure.ai.ml._utils._experimental", "azure.ai.ml._schema.core.fields"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _flatten(errors, path=""):
    """marshmallow's nested error dict -> ["key.sub: message", ...]; of alternative schemas (a list of
    dicts) the one with the fewest complaints is reported."""
    if isinstance(errors, dict):
        return [line for k, v in errors.items() for line in _flatten(v, f"{path}.{k}" if path else str(k))]
    if isinstance(errors, list) and errors and all(isinstance(e, dict) for e in errors):
        return min((_flatten(e, path) for e in errors), key=len)
    if isinstance(errors, list):
        return [f"{path}: {e}" for e in errors]
    return [f"{path}: {errors}"]


def _schema_errors(text: str) -> list[str]:
    """The field errors inside azure-ai-ml's validation text (JSON within JSON), or [] when absent."""
    found = []
    for m in re.finditer(r"failed:\s*\n\s*\n\s*(\{.*?\n\})", text, re.S):
        try:
            data = json.loads(m.group(1))
        except ValueError:
            continue
        if "errors" in data:
            for err in data["errors"]:
                found += _schema_errors(err.get("message", "") + "\n") or [err.get("message", "").strip()]
        else:
            found += _flatten(data)
    return found


def load(path: str | Path, kind: str = "job", overrides: list[dict] | None = None):
    """Load a job (or environment) spec with azure-ai-ml, offline; SpecError with file and key on failure."""
    from azure.ai.ml import load_environment, load_job

    _quiet()  # after the import: azure.ai.ml sets its loggers' levels when imported

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such file")
    try:
        spec = (load_job if kind == "job" else load_environment)(source=path, params_override=overrides or [])
    except Exception as e:
        text = str(e)
        lines = _schema_errors(text)
        if not lines:
            lines = [" ".join(text.split())[:400]]
        raise SpecError(f"{path}: " + "; ".join(dict.fromkeys(lines))) from None
    if kind == "job":
        identity = getattr(spec.identity, "type", None)
        if identity != "managed_identity":
            raise SpecError(f"{path}: identity.type: must be `managed` (the job reaches the DVC remote with the "
                            f"compute's managed identity), got {identity!r}")
        if "azureml/run.sh" not in spec.command:
            raise SpecError(f"{path}: command: must run azureml/run.sh (pull, dvc exp run, push), got {spec.command!r}")
        if spec.distribution is not None:
            if spec.distribution.type != "pytorch" or spec.distribution.process_count_per_instance != 1:
                raise SpecError(f"{path}: distribution: must be `type: pytorch` with `process_count_per_instance: 1` "
                                f"(run.sh starts one torchrun per node, torchrun one process per GPU)")
    return spec


def check_all() -> list[str]:
    """Every spec under azureml/ loaded offline; returns one line per spec."""
    out = []
    for path in JOBS:
        job = load(path)
        dist = f", {job.resources.instance_count} nodes, pytorch" if job.distribution else ""
        out.append(f"{path.relative_to(HERE.parent)}: command job on {job.compute}{dist}: ok")
    env = load(ENVIRONMENT, "environment")
    conda = ENVIRONMENT.parent / "conda.yml"
    if not conda.is_file():
        raise SpecError(f"{ENVIRONMENT}: conda_file: {conda} does not exist")
    out.append(f"{ENVIRONMENT.relative_to(HERE.parent)}: {env.name} on {env.image}: ok")
    return out


def git_commit(root: Path) -> str:
    """The full hash of HEAD; refuses a checkout with uncommitted changes (the job would not run them)."""
    def git(*args):
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        if r.returncode:
            raise SpecError(f"git {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    if dirty:
        raise SpecError("uncommitted changes (the job runs a commit, not your working tree): commit or stash:\n"
                        + dirty)
    return git("rev-parse", "HEAD")


def prepare(args):
    """The job spec with commit, name, overrides, compute and node count filled in."""
    job = load(args.job)  # a malformed spec is reported before anything else
    for kv in args.set:
        if "=" not in kv or " " in kv:
            raise SpecError(f"-S {kv!r}: expected key=value without spaces, e.g. -S train.epochs=30")
    if not NAME.match(args.name):
        raise SpecError(f"--name {args.name!r}: letters, digits, - and _ only (it names a git branch)")
    overrides = [{"inputs.commit": git_commit(HERE.parent)}, {"inputs.name": args.name},
                 {"inputs.overrides": " ".join(args.set) or "none"},
                 {"inputs.register_model": "true" if args.register_model else "false"}]
    if args.compute:
        overrides.append({"compute": f"azureml:{args.compute}"})
    if args.instances:
        if job.distribution is None:
            raise SpecError(f"--instances: {args.job} trains on one node; use azureml/train-distributed.yml")
        overrides.append({"resources.instance_count": args.instances})
    return load(args.job, overrides=overrides)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default=str(JOBS[0]), help="job spec (default: azureml/pipeline-job.yml)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params.yaml override for dvc exp run, repeatable (e.g. -S train.epochs=30)")
    ap.add_argument("--name", default="azureml-run", help="experiment name and result branch azureml/<name>")
    ap.add_argument("--compute", help="compute cluster name (default: the spec's)")
    ap.add_argument("--instances", type=int, help="nodes for the distributed job")
    ap.add_argument("--register-model", action="store_true",
                    help="register the trained ONNX model in the workspace's registry (azureml/register.py)")
    ap.add_argument("--check", action="store_true", help="validate every spec offline and exit")
    ap.add_argument("--dry-run", action="store_true", help="print the job that would be submitted and exit")
    ap.add_argument("--subscription", default=os.environ.get("AZURE_SUBSCRIPTION_ID"))
    ap.add_argument("--resource-group", default=os.environ.get("AZURE_RESOURCE_GROUP"))
    ap.add_argument("--workspace", default=os.environ.get("AZUREML_WORKSPACE_NAME"))
    return ap


def submit(job, args) -> str:
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    credential = DefaultAzureCredential()  # excludes the interactive browser login by default: never waits on a human
    if args.subscription and args.resource_group and args.workspace:
        ml = MLClient(credential, args.subscription, args.resource_group, args.workspace)
    else:
        ml = MLClient.from_config(credential)
    env_name = str(job.environment).removeprefix("azureml:").split("@")[0].split(":")[0]
    try:
        ml.environments.get(env_name, label="latest")
    except Exception:  # not there yet: create it from azureml/environment.yml
        ml.environments.create_or_update(load(ENVIRONMENT, "environment"))
    created = ml.jobs.create_or_update(job)
    return f"submitted {created.name}: {created.studio_url}"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.instances is not None and args.instances < 1:
        parser().error(f"--instances must be >= 1, got {args.instances}")
    try:
        if args.check:
            print("\n".join(check_all()))
            return 0
        job = prepare(args)
        if args.dry_run:
            print(job._to_yaml() if hasattr(job, "_to_yaml") else job)
            return 0
        print(submit(job, args))
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Azure login / workspace errors: one line, not a traceback
        print(f"error: submit: {type(e).__name__}: {' '.join(str(e).split())[:500]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
