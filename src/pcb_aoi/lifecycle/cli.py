"""``pcb-aoi-registry`` (also ``python -m pcb_aoi.lifecycle``): the command line over
``pcb_aoi.lifecycle.registry``; every command prints JSON lines, errors one ``error:`` line and exit 1."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import meta, registry
from .registry import SIDECAR, STAGES, RegistryError, fetch, model_artifacts, promote, register, versions


def table(root: str | Path = ".") -> list[dict]:
    """One row per registered version of every model artifact at HEAD (what ``list`` prints)."""
    return [{"artifact": n, **v} for n in sorted(model_artifacts(root)) for v in versions(root, n)]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pcb-aoi-registry", description=registry.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  pcb-aoi-registry register --version v1.2.0 --push     # HEAD of the reviewed main\n"
               "  pcb-aoi-registry promote v1.2.0 staging --push\n  pcb-aoi-registry list\n"
               "  pcb-aoi-registry fetch --stage prod --out /opt/aoi/model --repo https://github.com/org/pcb-aoi.git")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in (("register", "tag a commit as a version of the model artifacts"),
                        ("promote", "assign a stage to a registered version"),
                        ("list", "registered versions, their commits and stages"),
                        ("fetch", "download a version (or a stage's version) with its sidecar"),
                        ("meta", "check (or --write) the artifacts' meta in dvc.yaml against params.yaml and reports")):
        p = sub.add_parser(name, help=help_)
        if name != "fetch":
            p.add_argument("-C", "--root", default=".", help="the git + DVC repository (default: %(default)s)")
        if name == "meta":
            p.add_argument("--write", action="store_true", help="rewrite the stale meta blocks")
        if name not in ("list", "meta"):
            p.add_argument("--artifact", action="append",
                           help="only this artifact (repeatable; default: every `type: model` artifact in dvc.yaml)")
        if name in ("register", "promote"):
            p.add_argument("--push", action="store_true", help="push the new git tags to origin")
        if name == "register":
            p.add_argument("--version", help="vMAJOR.MINOR.PATCH (default: the last version, patch + 1)")
            p.add_argument("--rev", default="HEAD", help="the reviewed commit to register (default: %(default)s)")
        elif name == "promote":
            p.add_argument("version", help="a registered version, e.g. v1.2.0")
            p.add_argument("stage", choices=STAGES)
        elif name == "fetch":
            p.add_argument("version", nargs="?", help="a registered version (or --stage)")
            p.add_argument("--stage", choices=STAGES, help="the version this stage points at now")
            p.add_argument("--out", required=True, help="folder for the model files and their sidecars")
            p.add_argument("--repo", default=".", help="git URL or path of the project (default: %(default)s)")
            p.add_argument("--remote", help="DVC remote (default: the default remote, else the only one)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    if a.command == "fetch" and (a.version is None) == (a.stage is None):
        ap.error("fetch: give a VERSION or --stage STAGE (not both)")
    try:
        if a.command == "register":
            rows = register(a.root, a.version, a.rev, a.artifact, a.push)
        elif a.command == "promote":
            rows = promote(a.root, a.version, a.stage, a.artifact, a.push)
        elif a.command == "list":
            rows = table(a.root)
        elif a.command == "meta":
            names = meta.write(a.root) if a.write else meta.stale(a.root)
            if names and not a.write:
                print(f"error: dvc.yaml: the meta of {', '.join(names)} differs from params.yaml and "
                      "reports/benchmark.json; run `pcb-aoi-registry meta --write`", file=sys.stderr)
                return 1
            rows = [{"artifact": n, "meta": "rewritten"} for n in names]
        else:
            paths = fetch(a.repo, a.out, a.version, a.stage, a.artifact, a.remote)
            rows = [json.loads(Path(str(p) + SIDECAR).read_text()) | {"file": str(p)} for p in paths]
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for row in rows:
        print(json.dumps(row))
    if a.command in ("register", "promote") and not a.push:
        print("tags are local: `git push origin --tags` (or --push) to publish them", file=sys.stderr)
    return 0
