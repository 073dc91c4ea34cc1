"""Where a model came from: git commit, params fingerprint, data version; torch-free.

``collect`` returns the block the train stage stores in the checkpoint (``provenance``), which the
export copies into every ONNX file's contract and the edge app into every result record:

    {"commit": "<sha of HEAD>" | "unknown", "dirty": bool | "unknown",
     "params_hash": "sha256:<hex>" | "unknown", "params_sections": ["seed", "classes", ...],
     "data": {"clean": "<md5>.dir" | "unknown", "split": ..., "augmented": ...},
     "notes": ["why a value is unknown", ...]}

Nothing here raises: a model trained outside git or DVC gets ``"unknown"`` values and a note saying
why, never a guess.

- ``dirty``: ``src/``, ``dvc.yaml`` or ``params.yaml`` differ from HEAD (staged, unstaged or untracked
  files), i.e. the commit alone does not rebuild this model.
- ``params_hash``: sha256 of the validated sections in ``SECTIONS`` (defaults filled in, so a comment or
  a default written out does not change it; a changed value does). Later stages' sections (evaluate,
  export, ...) cannot shape the weights and are left out.
- ``data``: see ``data_version``.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from .config import Params, to_dict

SECTIONS = ("seed", "classes", "ingest", "etl", "split", "augment", "train")  # what shapes the weights
DIRTY_PATHS = ("src", "dvc.yaml", "params.yaml")
GIT_TIMEOUT_S = 10
UNKNOWN = "unknown"


def params_hash(params: Params, sections: tuple[str, ...] = SECTIONS) -> str:
    """``sha256:<hex>`` of ``params``' ``sections`` as canonical JSON (sorted keys)."""
    data = {s: to_dict(getattr(params, s)) for s in sections}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _git(root: Path, *args: str) -> str:
    """stdout of ``git args`` in ``root``; RuntimeError saying why on any failure (no git, not a repo, timeout)."""
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except FileNotFoundError:
        raise RuntimeError("git is not installed") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"git {args[0]} took more than {GIT_TIMEOUT_S} s") from None
    if r.returncode:
        raise RuntimeError(f"git {args[0]}: {(r.stderr.strip().splitlines() or ['failed'])[-1]}")
    return r.stdout


def git_state(root: str | Path = ".") -> tuple[str, bool | str, list[str]]:
    """(commit of HEAD, dirty, notes) for the git repository holding ``root``; ``"unknown"`` with a note
    outside a repository, without git, or before the first commit."""
    root = Path(root)
    try:
        commit = _git(root, "rev-parse", "--verify", "HEAD").strip()
    except RuntimeError as e:
        return UNKNOWN, UNKNOWN, [f"commit unknown: {root.resolve()}: {e}"]
    try:
        changed = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *DIRTY_PATHS)
    except RuntimeError as e:
        return commit, UNKNOWN, [f"dirty unknown: {e}"]
    return commit, bool(changed.strip()), []


def data_version(dirs: dict[str, str | Path], root: str | Path = ".") -> tuple[dict[str, str], list[str]]:
    """The md5 DVC records for each of ``dirs`` (name -> folder), or ``"unknown"`` with a note.

    A folder's version is the md5 in dvc.lock of the stage that outputs it (``etl`` -> data/clean,
    ``split`` -> data/split, ``augment`` -> data/augmented), kept only when DVC's hash of the folder
    as it is now equals it. Why both:
    - the train stage's own dvc.lock entry (its deps) is written after the stage ends, so while it runs
      it holds the previous run's hashes; the upstream stages' outs were written when those stages
      finished, before ``dvc repro`` started this one;
    - a folder edited by hand since, or a direct library call on folders of another run, would make the
      lock's value a wrong hash: the check against the folder as it is turns it into ``"unknown"``.
    The current hash comes from DVC itself (``Output.get_hash``), which reuses the hashes ``dvc repro``
    just computed (DVC's state cache, by inode and mtime): no second read of the images.
    A folder outside ``root``'s DVC repository, or not a DVC output there, is ``"unknown"``.
    """
    out: dict[str, str] = dict.fromkeys(dirs, UNKNOWN)
    root = Path(root).resolve()
    if not (root / "dvc.lock").is_file():
        return out, [f"data version unknown: no dvc.lock in {root} (not run by dvc repro)"]
    notes: list[str] = []
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            outs = {Path(o.fs_path).resolve(): o for o in repo.index.outs if o.protocol == "local"}
            for name, d in dirs.items():
                path = Path(d).resolve()
                o = outs.get(path)
                if o is None:
                    notes.append(f"data.{name} unknown: {d} is not a DVC stage output in {root}")
                    continue
                locked = o.hash_info.value if o.hash_info else None
                if not locked:
                    notes.append(f"data.{name} unknown: {o.stage.addressing} has no dvc.lock entry for {o.def_path}")
                    continue
                now = o.get_hash().value if path.exists() else None
                if now != locked:
                    notes.append(f"data.{name} unknown: {o.def_path} differs from dvc.lock ({o.stage.addressing} "
                                 f"outs {locked}, now {now}); run dvc repro")
                    continue
                out[name] = locked
    except Exception as e:  # a broken dvc.yaml/lock must not stop training: the version is then unknown
        notes.append(f"data version unknown: DVC could not read {root} ({type(e).__name__}: {str(e)[:200]})")
    return out, notes


def collect(params: Params | None, dirs: dict[str, str | Path], root: str | Path = ".") -> dict:
    """The provenance block (module docstring) of a model trained now from ``params`` on ``dirs``
    (``{"clean": ..., "split": ..., "augmented": ...}``) in the project at ``root``. ``params`` None (a
    direct library call that has only its own section): ``params_hash`` is ``"unknown"``."""
    commit, dirty, notes = git_state(root)
    data, data_notes = data_version(dirs, root)
    if params is None:
        notes.append("params_hash unknown: the caller passed no params")
    return {"commit": commit, "dirty": dirty,
            "params_hash": params_hash(params) if params is not None else UNKNOWN,
            "params_sections": list(SECTIONS), "data": data, "notes": notes + data_notes}


TRAINED_KEYS = ("commit", "dirty", "params_hash", "params_sections", "data")


def headline_metrics(trained: dict, evaluate: dict | None) -> dict:
    """Validation scores of the kept epoch (checkpoint) and the evaluate stage's test scores
    (``reports/metrics.json``, measured with the PyTorch checkpoint), None where not measured."""
    ev = evaluate or {}
    dp = ev.get("deeppcb") or {}
    return {"val_map": trained.get("val_map"), "val_map50": trained.get("val_map50"),
            "test_map50": ev.get("map50"), "test_escape_rate": ev.get("escape_rate"),
            "deeppcb_ap": dp.get("ap"), "deeppcb_fscore": dp.get("fscore"), "deeppcb_escape_rate": dp.get("escape_rate")}


def exported(trained: dict, score_threshold: float, evaluate: dict | None, root: str | Path = ".") -> dict:
    """The block an exported model carries (contract key ``provenance``): the checkpoint's, as it was
    trained (commit, dirty, params hash, data version), its headline metrics, the operating threshold,
    and the commit the file was exported at (``export_commit``, ``export_dirty``): a checkpoint DVC kept
    from an earlier run is exported by later code. A checkpoint from before provenance: ``"unknown"``."""
    block = {k: trained.get(k, UNKNOWN) for k in TRAINED_KEYS}
    notes = list(trained.get("notes", []))
    if "commit" not in trained:
        notes.append("trained before pcb-aoi recorded provenance: commit, params and data unknown")
    if evaluate is None:
        notes.append("test metrics unknown: exported without the evaluate stage's metrics")
    commit, dirty, git_notes = git_state(root)
    return {**block, "metrics": headline_metrics(trained, evaluate), "score_threshold": score_threshold,
            "export_commit": commit, "export_dirty": dirty, "notes": notes + [f"export: {n}" for n in git_notes]}
