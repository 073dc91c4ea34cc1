"""pcb-aoi-check-deps: find the files a `dvc exp run --temp` / `--queue` copy of the repo would lack.

Temporary and queued experiments run in a copy of the repository that holds only what git tracks
(plus DVC outputs from the cache). A stage dependency or params file that is neither tracked by git
nor written by a stage makes such a run fail half-way, after the earlier stages have run, with a bare
"No such file or directory" under .dvc/tmp/exps. Run this before queueing experiments:

    pcb-aoi-check-deps && dvc exp run --queue -S 'train.lr=0.001,0.003'
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml


def _paths(entries) -> list[str]:
    """Paths of a dvc.yaml deps/outs/metrics/plots list (plain strings or {path: options})."""
    out = []
    for e in entries or []:
        out += list(e) if isinstance(e, dict) else [e]
    return [str(p) for p in out]


def missing(root: str | Path = ".", dvc_yaml: str = "dvc.yaml") -> list[tuple[str, str]]:
    """(path, stage) for each dependency or params file of ``dvc_yaml`` that git does not track and no
    stage writes."""
    root = Path(root)
    stages = (yaml.safe_load((root / dvc_yaml).read_text()) or {}).get("stages", {})
    r = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{root}: not a git repository ({r.stderr.strip()})")
    tracked = set(r.stdout.split("\0")) - {""}
    produced = {p.rstrip("/") for s in stages.values()
                for key in ("outs", "metrics", "plots") for p in _paths(s.get(key))}

    def ok(path: str) -> bool:
        path = path.rstrip("/")
        inside = any(path == o or path.startswith(o + "/") for o in produced)
        return inside or path in tracked or any(t.startswith(path + "/") for t in tracked)

    found = []
    for name, stage in stages.items():
        params = stage.get("params") or []  # keys of params.yaml, or {other_file: [keys]}
        params_files = ({"params.yaml"} if params else set()) | {f for e in params if isinstance(e, dict) for f in e}
        for path in _paths(stage.get("deps")) + sorted(params_files):
            if not ok(path):
                found.append((path, name))
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pcb-aoi-check-deps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="repository root (default: the current folder)")
    args = ap.parse_args(argv)
    try:
        bad = missing(args.root)
    except (OSError, RuntimeError, yaml.YAMLError) as e:
        print(f"error: check-deps: {e}", file=sys.stderr)
        sys.exit(2)
    by_path: dict[str, list[str]] = {}
    for path, stage in bad:
        by_path.setdefault(path, []).append(stage)
    for path, names in by_path.items():
        print(f"error: {path} (needed by {', '.join(names)}) is not tracked by git, so `dvc exp run --temp/--queue` "
              f"would not have it: `git add {path}`, or pass `-C {path}` to dvc exp run", file=sys.stderr)
    if bad:
        sys.exit(1)
    print("check-deps: every stage dependency is tracked by git or written by a stage")


if __name__ == "__main__":
    main()
