"""The model registry: versions and stages of the detector files as git tags (GTO), the files themselves
in the DVC remote, fetched by version or stage onto the edge box (the library behind
``pcb-aoi-registry``, ``pcb_aoi.lifecycle.cli``).

Why git tags: a version is a reviewed commit, so the tag points at exactly the code, params, dvc.lock
and data versions that made the model; promoting is one more tag (``pcb-detector#prod#N``), reviewable
and revertible in git, with no server to run. The artifacts (name, path, type ``model``, meta) are
declared in ``dvc.yaml``; ``dvc artifacts get`` (used here through DVC's Python API) resolves a tag to
its commit and downloads the file from the DVC remote.

Every model artifact of a commit is one release: ``register`` and ``promote`` tag all of them with the
same version (``--artifact`` restricts), so ``v1.2.0`` of the FP32 and the INT8 file come from one
training run. ``fetch`` writes ``<model file>.registry.json`` beside each file it downloads; the edge app
reads its ``version`` into every result record (``pcb_aoi.edge.runtime.EdgeModel.provenance``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ..edge.contract import SIDECAR  # suffix of the provenance file written beside a fetched model

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

STAGES = ("staging", "prod")  # what `promote` accepts: staging = on trial boxes, prod = every box
SEMVER = re.compile(r"^v\d+\.\d+\.\d+$")  # what GTO accepts as a version (without pre-release parts)


class RegistryError(Exception):
    """The registry cannot do what was asked; the message says what exists and how to fix it."""


def model_artifacts(root: str | Path, rev: str = "HEAD") -> dict[str, dict]:
    """The ``type: model`` artifacts declared in ``dvc.yaml`` at ``rev`` of the git repo at ``root``
    (name -> declaration). GTO 1.x reads only ``artifacts.yaml``, so the declaration is read here."""
    import yaml
    from scmrepo.git import Git

    with Git(str(root)) as scm:
        try:
            commit = scm.resolve_rev(rev)
        except Exception:
            raise RegistryError(f"{root}: unknown git revision {rev!r}") from None
        try:
            with scm.get_fs(commit).open("dvc.yaml") as f:
                doc = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise RegistryError(f"{root}: no dvc.yaml at {rev} ({commit[:8]})") from None
    found = {name: a for name, a in (doc.get("artifacts") or {}).items() if (a or {}).get("type") == "model"}
    if not found:
        raise RegistryError(f"dvc.yaml at {rev} ({commit[:8]}) declares no artifact of type model; add one "
                            "under `artifacts:` (name: {path: models/<file>.onnx, type: model})")
    return found


def _pick(declared: dict[str, dict], only: list[str] | None, where: str) -> list[str]:
    """The artifact names to act on: ``only`` (each must be declared), else every declared one."""
    if not only:
        return sorted(declared)
    unknown = [n for n in only if n not in declared]
    if unknown:
        raise RegistryError(f"{where}: no model artifact {', '.join(map(repr, unknown))}; declared: "
                            f"{', '.join(sorted(declared))}")
    return list(only)


def versions(root: str | Path, name: str) -> list[dict]:
    """The registered versions of artifact ``name``, newest first: version, commit, stages, created_at."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        rows = gto.api.show(str(root), name, registered_only=True)
    except ArtifactNotFound:  # no tag of it yet
        return []
    return [{"version": r["version"], "commit": r["commit_hexsha"],
             "stages": sorted({s["stage"] for s in r["stages"]}), "created_at": str(r["created_at"])}
            for r in rows]


def _unknown_version(name: str, version: str, have: list[dict]) -> RegistryError:
    listed = ", ".join(v["version"] for v in sorted(have, key=lambda v: _semver(v["version"]))) or "none yet"
    return RegistryError(f"{name}: no version {version!r}; registered versions: {listed} "
                         "(`pcb-aoi-registry list`)")


def _semver(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v[1:].split(".")) if SEMVER.match(v) else (-1,)


def _gto_call(fn, *args, **kwargs):
    """A GTO call whose errors become RegistryError (GTO's messages name the tag or version at fault)."""
    from gto.exceptions import GTOException

    try:
        return fn(*args, **kwargs)
    except GTOException as e:
        raise RegistryError(str(e)) from None


def register(root: str | Path = ".", version: str | None = None, rev: str = "HEAD",
             artifacts: list[str] | None = None, push: bool = False) -> list[dict]:
    """Tag commit ``rev`` as ``version`` (default: the highest version of any of these artifacts with its
    patch number bumped, v0.0.1 for the first) of every model artifact it declares. All are checked
    before the first tag is written, so a refusal leaves no tag. ``push``: push the tags to origin."""
    import gto.api

    declared = model_artifacts(root, rev)
    names = _pick(declared, artifacts, f"dvc.yaml at {rev}")
    existing = {n: versions(root, n) for n in names}
    if version is None:
        latest = max((_semver(v["version"]) for vs in existing.values() for v in vs), default=None)
        version = "v0.0.1" if latest is None else "v{}.{}.{}".format(*latest[:2], latest[2] + 1)
    if not SEMVER.match(version):
        raise RegistryError(f"--version {version!r}: use vMAJOR.MINOR.PATCH, e.g. v1.2.0")
    from scmrepo.git import Git

    with Git(str(root)) as scm:
        commit = scm.resolve_rev(rev)
    for n in names:
        for v in existing[n]:
            if v["version"] == version:
                raise RegistryError(f"{n} {version} is already registered (commit {v['commit'][:8]}); "
                                    "pick another --version (`pcb-aoi-registry list`)")
            if v["commit"] == commit:
                raise RegistryError(f"{n}: commit {commit[:8]} is already registered as {v['version']}")
    done = []
    for n in names:
        r = _gto_call(gto.api.register, str(root), n, commit, version=version, push=push)
        done.append({"artifact": n, "version": r.version, "commit": r.commit_hexsha, "tag": r.tag})
    return done


def promote(root: str | Path, version: str, stage: str, artifacts: list[str] | None = None,
            push: bool = False) -> list[dict]:
    """Assign ``stage`` to ``version`` of every model artifact that has it (``artifacts``: only those).
    The newest assignment of a stage wins, so promoting an older version is the rollback."""
    import gto.api

    if stage not in STAGES:
        raise RegistryError(f"stage {stage!r}: use one of {', '.join(STAGES)}")
    declared = model_artifacts(root)
    names = _pick(declared, artifacts, "dvc.yaml at HEAD")
    have = {n: versions(root, n) for n in names}
    if not artifacts:  # the release: every artifact registered at that version
        names = [n for n in names if any(v["version"] == version for v in have[n])] or names
    for n in names:
        match = [v for v in have[n] if v["version"] == version]
        if not match:
            raise _unknown_version(n, version, have[n])
        if stage in match[0]["stages"]:
            raise RegistryError(f"{n} {version} is already the version in stage {stage!r}")
    _next_second(root, names, stage)
    done = []
    for n in names:  # force: a version that was in the stage before (a rollback) gets a new, newer tag
        a = _gto_call(gto.api.assign, str(root), n, stage, version=version, push=push, force=True)
        done.append({"artifact": n, "version": a.version, "stage": stage, "commit": a.commit_hexsha, "tag": a.tag})
    return done


def _next_second(root: str | Path, names: list[str], stage: str) -> None:
    """Wait, if needed, until the clock is past the newest ``stage`` tag of these artifacts: git tag times
    have whole seconds, and two promotions within one second would leave "the newest" undefined."""
    from gto.tag import find
    from scmrepo.git import Git

    with Git(str(root)) as scm:
        last = max((t.tag_time for n in names for t in find(name=n, stage=stage, scm=scm)), default=0)
    while time.time() < last + 1:
        time.sleep(0.05)


def _stage_version(name: str, stage: str, have: list[dict]) -> str:
    """The version of ``name`` that ``stage`` points at now: the one with the newest assignment tag of
    that stage, as ``dvc artifacts get --stage`` and ``list`` read it (``gto which`` would pick the highest
    version holding the stage, so a rollback would not show there)."""
    holders = [v for v in have if stage in v["stages"]]
    if not holders:
        listed = ", ".join(f"{v['version']}" + (f" ({', '.join(v['stages'])})" if v["stages"] else "")
                           for v in sorted(have, key=lambda v: _semver(v["version"]))) or "none yet"
        raise RegistryError(f"{name}: nothing is promoted to stage {stage!r}; versions: {listed} "
                            f"(`pcb-aoi-registry promote VERSION {stage}`)")
    return holders[0]["version"]


def _open_repo(repo: str, remote: str | None):
    """DVC's view of ``repo`` (a git URL or path; a URL is cloned to a temporary folder), downloading from
    ``remote`` (default: the default remote, else the only one: the project commits no default)."""
    from dvc.repo import Repo

    try:
        r = Repo.open(url=repo, subrepos=True, uninitialized=True, remote=remote)
    except Exception as e:
        raise RegistryError(f"{repo}: cannot open as a git + DVC repository ({type(e).__name__}: {e})") from None
    remotes = list(r.config["remote"])
    if remote and remote not in remotes:
        r.close()
        raise RegistryError(f"{repo}: no DVC remote {remote!r}; remotes: {', '.join(remotes) or 'none'}")
    if remote or r.config["core"].get("remote") or len(remotes) != 1:
        if not remote and len(remotes) > 1 and not r.config["core"].get("remote"):
            r.close()
            raise RegistryError(f"{repo}: several DVC remotes ({', '.join(remotes)}) and no default: "
                                "pass --remote NAME")
        return r
    r.close()
    return _open_repo(repo, remotes[0])


def fetch(repo: str, out: str | Path, version: str | None = None, stage: str | None = None,
          artifacts: list[str] | None = None, remote: str | None = None) -> list[Path]:
    """Download ``version`` (or the version in ``stage``) of every model artifact (``artifacts``: only
    those) from ``repo`` and its DVC remote into folder ``out``, each with its ``<file>.registry.json``.
    Everything is resolved, then downloaded into a temporary folder beside ``out``, and only then moved
    in: a bad version, stage or remote leaves ``out`` as it was. Returns the model paths."""
    if (version is None) == (stage is None):
        raise RegistryError("give a VERSION or --stage STAGE (not both)")
    if stage is not None and stage not in STAGES:
        raise RegistryError(f"stage {stage!r}: use one of {', '.join(STAGES)}")
    local = Path(repo).expanduser()
    repo = str(local.resolve()) if local.exists() else repo  # the sidecar names where it came from
    out = Path(out)
    with _open_repo(repo, remote) as r:
        root = r.scm.root_dir  # the repository, or its clone: GTO reads the tags there
        declared = model_artifacts(root)
        names = _pick(declared, artifacts, f"{repo} dvc.yaml")
        plan, refused = [], []
        for n in names:
            have = versions(root, n)
            try:
                v = _stage_version(n, stage, have) if stage else version
                if not any(h["version"] == v for h in have):
                    raise _unknown_version(n, v, have)
            except RegistryError as e:
                refused.append(e)
                continue
            plan.append((n, v, r.artifacts.get_rev(n, version=v)))
        if refused and (artifacts or not plan):  # by default, what has it (an artifact added later has not)
            raise refused[0]
        names = [n for n, _, _ in plan]
        files = [Path(declared[n]["path"]).name for n in names]
        if len(set(files)) != len(files):
            raise RegistryError(f"artifacts {', '.join(names)} share a file name ({files}): fetch them one "
                                "at a time (--artifact) into different folders")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.fetch-", dir=out.parent))
        try:
            fetched_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            for (n, v, commit), name in zip(plan, files):
                try:
                    r.artifacts.download(n, version=v, out=str(tmp / name))
                except Exception as e:
                    raise RegistryError(f"{n} {v} ({commit[:8]}): download from the DVC remote failed: "
                                        f"{type(e).__name__}: {e} (was it pushed? `pcb-aoi-remote push` in the "
                                        "repository; credentials: README 'Azure')") from None
                sidecar = {"artifact": n, "version": v, **({"stage": stage} if stage else {}), "commit": commit,
                           "repo": repo, "path": declared[n]["path"], "fetched_at": fetched_at}
                (tmp / (name + SIDECAR)).write_text(json.dumps(sidecar, indent=1) + "\n")
            out.mkdir(exist_ok=True)
            for name in files:  # old sidecar out first: in between, the file reads as "unregistered",
                (out / (name + SIDECAR)).unlink(missing_ok=True)  # never as the wrong version
                os.replace(tmp / name, out / name)
                os.replace(tmp / (name + SIDECAR), out / (name + SIDECAR))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in files]
