"""The ``meta`` of the model artifacts in ``dvc.yaml``, computed from ``params.yaml`` and the pipeline's
reports, so the registry describes the files it versions: classes, the input contract, the operating
threshold and the test-split accuracy the benchmark stage measured through each shipped file.

Latency is not in it: it belongs to a machine, not to a model (``reports/benchmark.json`` has it, with the
CPU). ``pcb-aoi-registry meta`` checks, ``--write`` rewrites (after a ``dvc repro`` that changed them).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import yaml

METRICS = ("deeppcb_ap", "deeppcb_fscore", "deeppcb_escape_rate", "map50")  # keys of reports/benchmark.json rows


def expected(root: str | Path = ".") -> dict[str, dict]:
    """Artifact name -> the ``meta`` it should carry, for every ``type: model`` artifact of ``dvc.yaml``."""
    root = Path(root)
    doc = yaml.safe_load((root / "dvc.yaml").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    bench = json.loads((root / "reports/benchmark.json").read_text())
    rows = {}  # file -> its row: ONNX Runtime's CPU provider for the ONNX files, PyTorch for the checkpoint
    for v in bench["variants"]:
        if v["provider"] in ("CPUExecutionProvider", "torch-cpu") and v.get("gate") in (None, "none"):  # dense rows
            rows.setdefault(v["file"], v)
    out = {}
    for name, a in (doc.get("artifacts") or {}).items():
        if a.get("type") != "model":
            continue
        row = rows.get(Path(a["path"]).name)
        if row is None:
            raise ValueError(f"dvc.yaml artifacts.{name}: {a['path']} has no row in reports/benchmark.json "
                             "(run `dvc repro benchmark`)")
        out[name] = {"classes": list(params["classes"]), "needs_template": params["train"]["model"]["use_template"],
                     "register_max_px": params["etl"]["register_max_px"], "score_threshold": row["score_threshold"],
                     "metrics": {k: row[k] for k in METRICS}}
    return out


def stale(root: str | Path = ".") -> list[str]:
    """The artifacts whose ``meta`` in ``dvc.yaml`` is not ``expected``."""
    doc = yaml.safe_load((Path(root) / "dvc.yaml").read_text())
    return [n for n, m in expected(root).items() if doc["artifacts"][n].get("meta") != m]


def write(root: str | Path = ".") -> list[str]:
    """Rewrite the stale ``meta`` blocks of ``dvc.yaml`` (comments and layout kept); returns their names."""
    from ruamel.yaml import YAML  # installed with dvc

    path = Path(root) / "dvc.yaml"
    names = stale(root)
    if not names:
        return []
    rt = YAML()
    rt.preserve_quotes, rt.width = True, 4096
    rt.indent(mapping=2, sequence=4, offset=2)  # this project's dvc.yaml layout (as pipeline.deps)
    doc = rt.load(path.read_text())
    want = expected(root)
    for name in names:
        doc["artifacts"][name]["meta"] = want[name]
    buf = io.StringIO()
    rt.dump(doc, buf)
    tmp = path.with_name(".dvc.yaml.tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)
    return names
