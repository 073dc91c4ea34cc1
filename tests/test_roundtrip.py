"""The line's round trip in a real git + DVC repository, on real DeepPCB pairs.

v1: a DeepPCB subset (the single source; then the same as a one-entry ``ingest.sources``). The edge
app (``python -m pcb_aoi.edge.app``, a tiny ONNX model: its calls are junk on DeepPCB, the operator's
verdicts make the labels) inspects two other pairs standing in for the line's boards; the operator
accepts, rejects, relabels and adds a missed box; ``pcb-aoi-collect`` writes a DeepPCB folder. v2:
``ingest.sources: [the subset, the line's folder]``. v3: the line sees a picture that is already in
the dataset and the operator relabels one of its boxes; ``ingest.label_conflict: last`` lets that
correction win. ``pcb-aoi-data-diff`` must show exactly what each step changed: the move to
``ingest.sources`` renames (same pixels), v2 adds the line's images with the boxes the verdicts give,
v3 relabels one box.
"""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, write_params
from test_edge import overlapping_model

from pcb_aoi.data import etl, ingest
from pcb_aoi.data.diff import KINDS, box_iou
from pcb_aoi.data.readers import DataError
from pcb_aoi.deploy import export
from pcb_aoi.edge import collect
from pcb_aoi.model import checkpoint
from pcb_aoi.model.inference import prepare_input
from pcb_aoi.pipeline.config import CLASSES, load_params

PCBDATA = ROOT.parent / "shared" / "datasets" / "deeppcb-trainval" / "PCBData"
pytestmark = pytest.mark.skipif(not PCBDATA.is_dir(), reason="../shared/datasets/deeppcb-trainval absent")
GROUP = "00041"
V1 = ["00041000", "00041001", "00041002", "00041003"]  # the dataset's pairs
LINE = ["00041005", "00041006"]  # the line's boards: pairs not in v1
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DVC_NO_ANALYTICS": "1"}
NO_BOX_CHANGES = {k: 0 for k in KINDS}


def sh(cwd: Path, *cmd: str) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def subset(dst: Path) -> Path:
    """V1's pairs of DeepPCB copied in its layout, with the lines of its trainval list that name them."""
    folder, labels = dst / f"PCBData/group{GROUP}/{GROUP}", dst / f"PCBData/group{GROUP}/{GROUP}_not"
    folder.mkdir(parents=True)
    labels.mkdir()
    for stem in V1:
        for tag in ("test", "temp"):
            (folder / f"{stem}_{tag}.jpg").write_bytes((PCBDATA / f"group{GROUP}/{GROUP}/{stem}_{tag}.jpg").read_bytes())
        (labels / f"{stem}.txt").write_bytes((PCBDATA / f"group{GROUP}/{GROUP}_not/{stem}.txt").read_bytes())
    lines = [line for line in (PCBDATA / "trainval.txt").read_text().splitlines() if any(s in line for s in V1)]
    assert len(lines) == len(V1)
    (dst / "PCBData/trainval.txt").write_text("\n".join(lines))
    return dst


def ground_truth(stem: str) -> list[tuple[str, list[float]]]:
    names = dict(enumerate(["", "open", "short", "mousebite", "spur", "copper", "pin-hole"]))
    text = (PCBDATA / f"group{GROUP}/{GROUP}_not/{stem}.txt").read_text()
    return [(names[int(v[4])], [float(x) for x in v[:4]]) for v in (line.split() for line in text.splitlines() if line)]


def make_model(path: Path) -> Path:
    """test_edge's untrained model with ~25 px boxes (DeepPCB's defects are 25..40 px), as an e2e ONNX."""
    model = overlapping_model()
    with torch.no_grad():
        model.box_head[-1].bias.copy_(torch.tensor([0.0, 0.0, 2.2, 2.2]))
    ckpt = {"classes": list(CLASSES), "input_spec": checkpoint.input_spec(True), "model_config": model.cfg.to_dict()}
    a = np.zeros((64, 64), np.uint8)
    export.export(model, ckpt, torch.from_numpy(prepare_input(a, a, True)[None]), path, opset=17,
                  end_to_end=True, score_threshold=0.3)
    return path


def inspect(model: Path, stems: list[str], journal: Path) -> dict[str, dict]:
    """The real app on the line's files (DeepPCB's own X_test.jpg, X_temp.jpg beside): records by stem."""
    files = [str(PCBDATA / f"group{GROUP}/{GROUP}/{s}_test.jpg") for s in stems]
    sh(journal.parent, sys.executable, "-m", "pcb_aoi.edge.app", "--model", str(model), *files,
       "--out", str(journal), "--quiet")
    recs = {Path(r["file"]).name.removesuffix("_test.jpg"): r for r in map(json.loads, journal.read_text().splitlines())}
    assert sorted(recs) == sorted(stems) and all(r["status"] == "ok" for r in recs.values())
    return recs


def write_verdicts(path: Path, rows: list[tuple]) -> Path:
    path.write_text("image,detection,action,class,x1,y1,x2,y2\n"
                    + "".join(",".join("" if v is None else str(v) for v in r) + "\n" for r in rows))
    return path


class Repo:
    """A user's project: params.yaml and data/clean.dvc committed per dataset revision, tagged."""

    def __init__(self, root: Path, work: Path):
        self.root, self.work = root, work
        for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                    ["git", "config", "user.name", "test"], [sys.executable, "-m", "dvc", "init", "-q"]):
            sh(root, *cmd)

    def ingest_params(self, ingest_over: dict):
        return load_params(write_params(self.root / "params.yaml", {"ingest": ingest_over}))

    def revision(self, tag: str, ingest_over: dict) -> dict:
        """ingest + etl with these params (the stages' library entry points), dvc add, commit, tag."""
        p = self.ingest_params(ingest_over)
        raw = self.work / f"raw-{tag}"
        report = ingest.run(p.ingest, p.seed, p.classes, raw)
        etl_report = etl.run(p.etl, p.classes, raw, self.root / "data/clean")
        assert etl_report["rejected"] == [], etl_report["rejected"]
        sh(self.root, sys.executable, "-m", "dvc", "add", "-q", "data/clean")
        sh(self.root, "git", "add", "-A")
        sh(self.root, "git", "commit", "-qm", f"dataset {tag}")
        sh(self.root, "git", "tag", tag)
        return report

    def diff(self, base: str, head: str) -> dict:
        return json.loads(sh(self.root, sys.executable, "-m", "pcb_aoi.data.diff", "--base", base, "--head", head,
                             "--json"))


def test_line_round_trip(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    dp = subset(work / "deeppcb")
    (tmp_path / "repo").mkdir()
    repo = Repo(tmp_path / "repo", work)
    model = make_model(work / "model.e2e.onnx")

    # v1: the single source, ids as the reader gives them; then the same data as a one-entry sources list
    repo.revision("v1", {"source": "deeppcb", "uri": str(dp)})
    one = {"sources": [{"source": "deeppcb", "uri": str(dp)}]}
    repo.revision("v1-sources", one)
    d = repo.diff("v1", "v1-sources")
    assert d["images"] == {"added": [], "removed": [], "changed": [],
                           "renamed": [{"from": s, "to": f"deeppcb:{s}"} for s in V1]}
    assert d["box_counts"] == NO_BOX_CHANGES and d["totals"]["base_boxes"] == d["totals"]["head_boxes"]

    # the line: the app inspects two new boards; the operator's verdicts; collect
    recs = inspect(model, LINE, work / "results.jsonl")
    a, b = (recs[s]["detections"] for s in LINE)
    assert len(a) >= 3 and len(b) >= 1 and [x["id"] for x in a] == list(range(len(a)))
    new = "short" if a[1]["class"] != "short" else "open"
    rows = [(f"{LINE[0]}_test.jpg", 0, "accept"), (f"{LINE[0]}_test.jpg", 1, "relabel", new),
            *[(f"{LINE[0]}_test.jpg", x["id"], "reject") for x in a[2:]],
            (f"{LINE[0]}_test.jpg", None, "missed", "pin-hole", 100, 120, 130, 150),
            *[(f"{LINE[1]}_test.jpg", x["id"], "reject") for x in b],
            (f"{LINE[1]}_test.jpg", None, "missed", "spur", 300, 310, 340, 336)]
    line = work / "line-1"
    assert collect.main(["--journal", str(work / "results.jsonl"), "--verdicts",
                         str(write_verdicts(work / "verdicts-1.csv", rows)), "--out", str(line)]) == 0
    labels = Counter([a[0]["class"], new, "pin-hole", "spur"])  # accepted + relabelled (new class) + missed

    # v2: both sources; against the one-entry list exactly the line's images were added, with those boxes
    two = {"sources": [*one["sources"], {"source": "deeppcb", "uri": str(line), "name": "line"}]}
    report = repo.revision("v2", two)
    assert report["sources"]["line"]["images"] == 2 and report["duplicates_merged"] == 0
    for base in ("v1-sources", "v1"):
        d = repo.diff(base, "v2")
        assert d["images"]["added"] == [f"line:{s}" for s in LINE]
        assert d["images"]["removed"] == d["images"]["changed"] == []
        assert d["images"]["renamed"] == ([] if base == "v1-sources" else
                                          [{"from": s, "to": f"deeppcb:{s}"} for s in V1])
        assert d["box_counts"] == NO_BOX_CHANGES  # v1's images: every box as it was
        assert {c: v["head"] - v["base"] for c, v in d["per_class"].items() if v["head"] != v["base"]} == labels
        assert d["per_board"]["line:line"]["images_added"] == 2

    # v3: the line inspects a picture already in the dataset; the operator relabels one of its boxes.
    # The detection that covers a ground-truth box best is relabelled, the rest rejected, and the other
    # ground-truth boxes drawn as missed: the line's labels are v1's but for that one box's class.
    stem = V1[0]
    (work / "v3").mkdir()
    rec = inspect(model, [stem], work / "v3/results.jsonl")[stem]
    gt = ground_truth(stem)
    iou = box_iou(np.array([g[1] for g in gt]), np.array([x["box"] for x in rec["detections"]]))
    g, k = np.unravel_index(iou.argmax(), iou.shape)
    assert iou[g, k] >= 0.5  # the same box for the diff
    was, now = gt[g][0], "copper" if gt[g][0] != "copper" else "spur"
    rows = [(f"{stem}_test.jpg", int(k), "relabel", now),
            *[(f"{stem}_test.jpg", x["id"], "reject") for x in rec["detections"] if x["id"] != k],
            *[(f"{stem}_test.jpg", None, "missed", c, *map(int, box)) for i, (c, box) in enumerate(gt) if i != g]]
    line2 = work / "line-2"
    assert collect.main(["--journal", str(work / "v3/results.jsonl"), "--verdicts",
                         str(write_verdicts(work / "verdicts-2.csv", rows)), "--out", str(line2),
                         "--board", "line2"]) == 0
    three = {"sources": [*two["sources"], {"source": "deeppcb", "uri": str(line2), "name": "line2"}]}
    with pytest.raises(DataError, match=rf"deeppcb:{stem} \(deeppcb\) and line2:{stem} \(line2\) are the same picture"):
        ingest.run(repo.ingest_params(three).ingest, 0, CLASSES, work / "raw-refused")
    report = repo.revision("v3", {**three, "label_conflict": "last"})
    assert report["duplicates"] == [{"kept": f"deeppcb:{stem}", "dropped": f"line2:{stem}"}]
    assert report["label_conflicts"][0]["kept_boxes_of"] == "line2"
    d = repo.diff("v2", "v3")
    assert d["images"] == {"added": [], "removed": [], "changed": [], "renamed": []}
    assert d["box_counts"] == {**NO_BOX_CHANGES, "relabelled": 1}
    (e,) = d["boxes"]
    assert (e["image_id"], e["from"], e["class"], e["base_box"]) == (f"deeppcb:{stem}", was, now, gt[g][1])
    assert e["head_box"] == [round(v, 2) for v in rec["detections"][k]["box"]]
