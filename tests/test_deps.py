"""dvc.yaml deps computed from the imports (pcb_aoi.pipeline.deps): the project's file is complete, and
the tool follows every kind of import and rewrites only what it owns. The re-runs these deps cause on a
real repository are in test_pipeline.py."""
import subprocess
import sys
import textwrap

import yaml

from conftest import ROOT
from pcb_aoi.pipeline import deps

DEPS = [sys.executable, "-m", "pcb_aoi.pipeline.deps"]


def test_the_project_dvc_yaml_lists_exactly_the_files_each_stage_imports():
    r = subprocess.run([*DEPS, "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert deps.check(ROOT) == {}


def write_tree(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


# A small project: every way a stage reaches library code, and files it must not depend on.
PROJECT = {
    "src/stages/s.py": """
        import sys
        from pcb_aoi.a import one
        """,
    "src/pcb_aoi/__init__.py": '"""The package; not empty, so every stage depends on it."""\n',
    "src/pcb_aoi/a/__init__.py": "",  # empty: no dep
    "src/pcb_aoi/a/one.py": """
        from ..b import helper  # relative, a module of a package with a docstring-only __init__

        def later():
            from . import two  # a lazy import is code the stage still runs
        """,
    "src/pcb_aoi/a/two.py": """
        import pcb_aoi.c as c

        def make():
            return c.Thing()  # a lazy export of pcb_aoi.c, defined in c/four.py
        """,
    "src/pcb_aoi/a/unused.py": "X = 1\n",
    "src/pcb_aoi/b/__init__.py": '"""Helpers."""\n',
    "src/pcb_aoi/b/helper.py": "from pcb_aoi.c import Other\n",  # a lazy export through `from ... import`
    "src/pcb_aoi/c/__init__.py": 'EXPORTS = {"Thing": "four", "Other": "five"}\n',
    "src/pcb_aoi/c/four.py": "class Thing: ...\n",
    "src/pcb_aoi/c/five.py": "class Other: ...\n",
    "src/pcb_aoi/c/six.py": "class Unused: ...\n",
}
EXPECTED = ["src/stages/s.py", "src/pcb_aoi/__init__.py", "src/pcb_aoi/a/one.py", "src/pcb_aoi/a/two.py",
            "src/pcb_aoi/b/__init__.py", "src/pcb_aoi/b/helper.py", "src/pcb_aoi/c/__init__.py",
            "src/pcb_aoi/c/five.py", "src/pcb_aoi/c/four.py"]
DVC_YAML = """\
# The header comment stays.
stages:
  s:
    cmd: python src/stages/s.py --out out
    deps:
      - data/in  # the input data
      - src/stages/s.py
      - src/pcb_aoi/a/unused.py
      - reports/other.json  # another stage's report
    params: [seed]
    outs:
      - out: {persist: true}

plots:
  # A comment on the plots.
  - Curves:
      x: step
      y:
        out/curve.csv: loss
artifacts:
  detector:
    path: models/model.pt
    type: model
"""


def test_imports_are_followed_through_relative_lazy_and_exported_names(tmp_path):
    write_tree(tmp_path, PROJECT)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    assert deps.stage_deps(tmp_path) == {"s": [EXPECTED[0], *sorted(EXPECTED[1:])]}


def test_check_names_missing_and_extra_deps_and_write_fixes_only_the_src_deps(tmp_path):
    write_tree(tmp_path, PROJECT)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    r = subprocess.run([*DEPS, "--check", "--root", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "stage s: src/pcb_aoi/c/four.py is imported but not in its deps" in r.stderr
    assert "stage s: src/pcb_aoi/a/unused.py is in its deps but not imported" in r.stderr
    assert "--write" in r.stderr

    assert deps.write(tmp_path) == ["s"]
    text = (tmp_path / "dvc.yaml").read_text()
    doc = yaml.safe_load(text)
    # data and report deps keep their place; the computed src/ deps stand where the first src/ dep stood
    assert doc["stages"]["s"]["deps"] == ["data/in", EXPECTED[0], *sorted(EXPECTED[1:]), "reports/other.json"]
    assert text.startswith("# The header comment stays.\n") and "  # A comment on the plots.\n" in text
    assert doc["plots"] == yaml.safe_load(DVC_YAML)["plots"] and doc["artifacts"] == yaml.safe_load(DVC_YAML)["artifacts"]
    assert "params: [seed]" in text and "- out: {persist: true}" in text  # flow style kept
    assert "- data/in  # the input data\n" in text and "- reports/other.json  # another stage's report\n" in text
    assert deps.check(tmp_path) == {} and deps.write(tmp_path) == []
