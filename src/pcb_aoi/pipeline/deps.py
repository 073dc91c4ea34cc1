"""dvc.yaml deps complete by construction: each stage's library files, computed from its imports.

A stage whose command runs ``src/stages/<stage>.py`` depends on that entry point and on every file
under ``src/pcb_aoi/`` it imports, directly or not: absolute ``pcb_aoi.*`` and relative imports, at
module level or inside functions (a lazy import is code the stage still runs), the ``__init__.py`` of
each package on the way unless it is empty (Python runs it), and the names a package exports lazily
(its ``EXPORTS`` dict, ``pcb_aoi._lazy``) followed to the submodule that defines them. An edit to any
of those files re-runs the stage; an edit to any other file does not.

    python -m pcb_aoi.pipeline.deps --check   # exit 1 naming each stage's missing and extra src/ deps
    python -m pcb_aoi.pipeline.deps --write   # rewrite the src/ deps in dvc.yaml from the imports

``--write`` replaces only the ``src/`` entries of each stage's ``deps`` (where the first one stood);
data, model and report deps keep their place and order, and the file keeps its comments, ``plots:``
and anything else (ruamel.yaml round trip).
"""
from __future__ import annotations

import argparse
import ast
import io
import re
import sys
from functools import cache
from pathlib import Path

import yaml

PACKAGE = "pcb_aoi"
MANAGED = "src/"  # the deps this tool owns: entry points and library files
ENTRY = re.compile(r"\b(src/stages/\w+\.py)\b")


class Library:
    """The ``pcb_aoi`` package under ``src``: which dotted names are modules, and what each one imports."""

    def __init__(self, src: Path):
        self.src = src
        self.exports = cache(self.exports)  # each __init__.py parsed once

    def file(self, module: str) -> Path | None:
        """The file Python runs to import ``module`` (``a/b.py`` or ``a/b/__init__.py``), or None."""
        base = self.src.joinpath(*module.split("."))
        return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)

    def is_module(self, module: str) -> bool:
        return self.file(module) is not None or self.src.joinpath(*module.split(".")).is_dir()

    def exports(self, package: str) -> dict[str, str]:
        """A package's lazy exports: the ``EXPORTS = {name: submodule}`` literal of its ``__init__.py``."""
        init = self.src.joinpath(*package.split("."), "__init__.py")
        if not init.is_file():
            return {}
        for node in ast.parse(init.read_text(), str(init)).body:
            if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "EXPORTS" for t in node.targets)
                    and isinstance(node.value, ast.Dict)):
                return {k.value: v.value for k, v in zip(node.value.keys, node.value.values)
                        if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
        return {}

    def attribute(self, module: str, name: str) -> str | None:
        """The module that ``module.name`` imports: a submodule, or the one a lazy export lives in."""
        if self.is_module(f"{module}.{name}"):
            return f"{module}.{name}"
        sub = self.exports(module).get(name)
        return f"{module}.{sub}" if sub else None

    def imports(self, path: Path, package: str) -> set[str]:
        """The ``pcb_aoi`` modules that running the file ``path`` (in ``package``) imports itself."""
        tree = ast.parse(path.read_text(), str(path))
        found: set[str] = set()
        bound: dict[str, str] = {}  # local name -> the module it holds
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found |= parents(alias.name)
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                        alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = absolute(node, package)
                found |= parents(base)
                for alias in node.names:
                    target = self.attribute(base, alias.name)
                    if target:
                        found |= parents(target)
                        if target == f"{base}.{alias.name}":
                            bound[alias.asname or alias.name] = target
        found |= self._attribute_chains(tree, bound)
        return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}

    def _attribute_chains(self, tree: ast.AST, bound: dict[str, str]) -> set[str]:
        """``x.a.b`` where ``x`` holds a module: the modules ``a`` and ``b`` resolve to (lazy exports too)."""
        found = set()
        for node in ast.walk(tree):
            names = []
            while isinstance(node, ast.Attribute):
                names.append(node.attr)
                node = node.value
            if not isinstance(node, ast.Name) or node.id not in bound or not names:
                continue
            module = bound[node.id]
            for name in reversed(names):
                module = self.attribute(module, name) if module.split(".")[0] == PACKAGE else None
                if module is None:
                    break
                found |= parents(module)
        return found

    def closure(self, entry: Path) -> set[str]:
        """Every ``pcb_aoi`` module that running the script ``entry`` imports, directly or not."""
        todo, seen = list(self.imports(entry, "")), set()
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            path = self.file(module)
            if path is not None:
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                todo += self.imports(path, package) - seen
        return seen

    def files(self, entry: Path, root: Path) -> list[str]:
        """The library files of ``entry``'s closure, relative to ``root``; empty ``__init__.py`` files left out."""
        paths = {self.file(m) for m in self.closure(entry)} - {None}
        return sorted(p.relative_to(root).as_posix() for p in paths if p.name != "__init__.py" or p.read_text().strip())


def parents(module: str) -> set[str]:
    """``a.b.c`` -> {a, a.b, a.b.c}: importing a module runs every package on the way."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} if module else set()


def absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` statement reads from, relative imports resolved against ``package``."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _stages(root: str | Path, dvc_yaml: str) -> dict:
    return (yaml.safe_load((Path(root) / dvc_yaml).read_text()) or {}).get("stages", {})


def _managed(deps) -> list[str]:
    """The deps of a stage that this tool owns (``src/``), in their order."""
    return [str(d) for d in deps or [] if str(d).startswith(MANAGED)]


def stage_deps(root: str | Path = ".", dvc_yaml: str = "dvc.yaml") -> dict[str, list[str]]:
    """Stage -> the ``src/`` deps it should list: its entry point, then its library files (sorted)."""
    root = Path(root)
    stages = _stages(root, dvc_yaml)
    lib = Library(root / "src")
    out = {}
    for name, stage in stages.items():
        match = ENTRY.search(str(stage.get("cmd", "")))
        if match and (root / match.group(1)).is_file():
            out[name] = [match.group(1), *lib.files(root / match.group(1), root)]
    return out


def check(root: str | Path = ".", dvc_yaml: str = "dvc.yaml") -> dict[str, tuple[list[str], list[str]]]:
    """Stage -> (missing, extra) ``src/`` deps of ``dvc_yaml``; only stages with a difference."""
    stages = _stages(root, dvc_yaml)
    out = {}
    for name, want in stage_deps(root, dvc_yaml).items():
        have = _managed(stages[name].get("deps"))
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            out[name] = (missing, extra)
    return out


def write(root: str | Path = ".", dvc_yaml: str = "dvc.yaml") -> list[str]:
    """Rewrite each stage's ``src/`` deps in ``dvc_yaml`` from its imports; returns the stages changed."""
    from ruamel.yaml import YAML  # installed with dvc; only --write needs it

    path = Path(root) / dvc_yaml
    rt = YAML()
    rt.preserve_quotes, rt.width = True, 4096
    rt.indent(mapping=2, sequence=4, offset=2)  # this project's dvc.yaml layout
    doc = rt.load(path.read_text())
    changed = []
    for name, want in stage_deps(root, dvc_yaml).items():
        deps = doc["stages"][name].setdefault("deps", [])
        if _managed(deps) == want:
            continue
        first = next((i for i, d in enumerate(deps) if str(d).startswith(MANAGED)), len(deps))
        for i in reversed(range(len(deps))):  # item by item: the comments of the other deps move with them
            if str(deps[i]).startswith(MANAGED):
                del deps[i]
        for i, dep in enumerate(want):  # where the first src/ dep stood; data, models, reports keep their order
            deps.insert(first + i, dep)
        changed.append(name)
    if changed:
        out = io.StringIO()
        rt.dump(doc, out)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(out.getvalue())
        tmp.replace(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pcb_aoi.pipeline.deps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when a stage's src/ deps differ from its imports")
    mode.add_argument("--write", action="store_true", help="rewrite the src/ deps in dvc.yaml from the imports")
    ap.add_argument("--root", default=".", help="the project (default: the current folder)")
    args = ap.parse_args(argv)
    try:
        if args.write:
            changed = write(args.root)
            print(f"deps: rewrote the src/ deps of {', '.join(changed)}" if changed else "deps: dvc.yaml is up to date")
            return 0
        bad = check(args.root)
    except (OSError, SyntaxError, KeyError) as e:
        print(f"error: deps: {e}", file=sys.stderr)
        return 2
    for stage, (missing, extra) in bad.items():
        for p in missing:
            print(f"error: stage {stage}: {p} is imported but not in its deps (an edit would not re-run it)",
                  file=sys.stderr)
        for p in extra:
            print(f"error: stage {stage}: {p} is in its deps but not imported (an edit re-runs it for nothing)",
                  file=sys.stderr)
    if bad:
        print("fix: python -m pcb_aoi.pipeline.deps --write", file=sys.stderr)
        return 1
    print("deps: every stage lists exactly the src/ files it imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
