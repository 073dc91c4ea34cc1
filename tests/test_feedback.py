"""Operator feedback: the edge app's journal + verdicts -> a labelled folder ingest reads (pcb-aoi-collect),
and images set aside for review (pcb-aoi-detect --review-dir / --review-band)."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_edge import CHECK_IMPORTS, drop_pair, models, no_torch_env, read_jsonl, wait_for  # noqa: F401 (fixtures)

from pcb_aoi.data import ingest, readers
from pcb_aoi.data.dataset import Dataset
from pcb_aoi.pipeline.config import CLASSES, IngestConfig
from pcb_aoi.edge import app, collect

STEMS = ("a", "b", "c")


@pytest.fixture(scope="module")
def line(models, tmp_path_factory):
    """Three DeepPCB-named pairs inspected by the real app (files mode): (inbox, journal, records by name)."""
    _, _, e2e, ds = models
    root = tmp_path_factory.mktemp("line")
    inbox = root / "inbox"
    inbox.mkdir()
    for stem, row in zip(STEMS, ds.rows(ds.images.image_id[:3])):
        drop_pair(ds, row, inbox, stem)
    journal = root / "results.jsonl"
    assert app.main(["--model", str(e2e), *[str(inbox / f"{s}_test.png") for s in STEMS], "--out", str(journal),
                     "--quiet"]) == 0
    recs = {Path(r["file"]).name: r for r in read_jsonl(journal)}
    assert all(len(recs[f"{s}_test.png"]["detections"]) >= 3 for s in STEMS)  # something to accept and reject
    return inbox, journal, recs


def write_csv(path: Path, rows: list[str], bom: str = "") -> Path:
    path.write_text(bom + "image,detection,action,class,x1,y1,x2,y2\n" + "".join(r + "\n" for r in rows))
    return path


def other_class(cls: str) -> str:
    return "short" if cls != "short" else "open"


def verdict_rows(recs: dict) -> tuple[list[str], dict]:
    """Verdicts on a and b (c has none), and the labels they must give: {image stem: sorted (class, box)}."""
    a, b = recs["a_test.png"]["detections"], recs["b_test.png"]["detections"]
    new = other_class(a[2]["class"])
    rows = ["a_test.png,0,accept", "a_test.png,1,reject", f"a_test.png,2,relabel,{new}",
            "a_test.png,,missed,pin-hole,3,4,20.5,30", "b_test.png,0,reject"]
    expected = {"a": [(a[0]["class"], a[0]["box"]), (new, a[2]["box"])] + [(d["class"], d["box"]) for d in a[3:]]
                + [("pin-hole", [3.0, 4.0, 20.5, 30.0])],
                "b": [(d["class"], d["box"]) for d in b[1:]]}
    return rows, {k: sorted(v) for k, v in expected.items()}


def labels_of(boxes: list[dict], key=lambda i: i) -> dict:
    out: dict = {}
    for b in boxes:
        out.setdefault(key(b["image_id"]), []).append((b["class_name"], [b["x1"], b["y1"], b["x2"], b["y2"]]))
    return {k: sorted(v) for k, v in out.items()}


def test_collect_round_trip_deeppcb_and_voc(line, tmp_path, capsys):
    inbox, journal, recs = line
    rows, expected = verdict_rows(recs)
    verdicts = write_csv(tmp_path / "verdicts.csv", rows)
    out = tmp_path / "collected"
    assert collect.main(["--journal", str(journal), "--verdicts", str(verdicts), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "collected 2 image(s)" in printed and "(deeppcb, 2 template(s) kept)" in printed
    assert "false calls rejected 2, missed boxes added 1" in printed
    assert "skipped 1 image(s) without a verdict line" in printed
    images, boxes = readers.read_deeppcb(out)
    assert sorted(r["image_id"] for r in images) == ["a", "b"] and all(r["board_id"] == "line" for r in images)
    assert labels_of(boxes) == expected
    for r in images:  # byte for byte, the template too
        assert Path(r["path"]).read_bytes() == (inbox / Path(r["path"]).name).read_bytes()
        assert Path(r["template_path"]).read_bytes() == (inbox / Path(r["template_path"]).name).read_bytes()
    # the ingest stage takes it as it is: pairs, sizes, classes
    raw = ingest.run(IngestConfig(source="deeppcb", uri=str(out)), 0, CLASSES, tmp_path / "raw")
    assert (raw["images"], raw["boxes"]) == (2, sum(map(len, expected.values())))
    assert all(Dataset.load(tmp_path / "raw").images.template_path != "")
    summary = json.loads((out / "collect.json").read_text())
    n_a, n_b = len(recs["a_test.png"]["detections"]), len(recs["b_test.png"]["detections"])
    assert (summary["accepted"], summary["relabelled"], summary["false_calls_rejected"],
            summary["missed_added"]) == (1, 1, 2, 1)
    assert summary["accepted_unnamed"] == (n_a - 3) + (n_b - 1)
    assert sum(summary["labels"].values()) == sum(map(len, expected.values()))
    assert summary["models"] == [recs["a_test.png"]["model"]]

    # The same verdicts as JSON lines, written as VOC (templates dropped); --unreviewed accept keeps c.
    jl = tmp_path / "verdicts.jsonl"
    jl.write_text("".join(json.dumps(o) + "\n" for o in [
        {"image": "a_test.png", "detection": 0, "action": "accept"},
        {"image": "a_test.png", "detection": 1, "action": "reject"},
        {"image": "a_test.png", "detection": 2, "action": "relabel", "class": rows[2].split(",")[3]},
        {"image": "a_test.png", "action": "missed", "class": "pin-hole", "box": [3, 4, 20.5, 30]},
        {"image": "incoming/b_test.png", "detection": 0, "action": "reject"}]))
    voc = tmp_path / "voc"
    assert collect.main(["--journal", str(journal), "--verdicts", str(jl), "--out", str(voc), "--format", "voc",
                         "--unreviewed", "accept"]) == 0
    images, boxes = readers.read_voc(voc)
    c = recs["c_test.png"]["detections"]
    c_labels = sorted((d["class"], d["box"]) for d in c)
    assert labels_of(boxes, lambda i: i.removesuffix("_test")) == expected | {"c": c_labels}
    assert not list(voc.glob("*_temp.png"))
    assert ingest.run(IngestConfig(source="voc", uri=str(voc)), 0, CLASSES, tmp_path / "raw-voc")["images"] == 3
    assert all(Path(r["path"]).read_bytes() == (inbox / Path(r["path"]).name).read_bytes() for r in images)
    # run again into the same folder: replaced, not merged
    assert collect.main(["--journal", str(journal), "--verdicts", str(jl), "--out", str(voc), "--format", "voc"]) == 0
    assert sorted(p.name for p in voc.glob("*.xml")) == ["a_test.xml", "b_test.xml"]


def test_an_accept_without_id_takes_a_clean_image_as_reviewed(line, tmp_path):
    inbox, journal, recs = line
    verdicts = write_csv(tmp_path / "v.csv", ["c_test.png,,accept"], bom="\ufeff")  # as a spreadsheet saves it
    out = tmp_path / "out"
    assert collect.main(["--journal", str(journal), "--verdicts", str(verdicts), "--out", str(out)]) == 0
    _, boxes = readers.read_deeppcb(out)
    assert labels_of(boxes) == {"c": sorted((d["class"], d["box"]) for d in recs["c_test.png"]["detections"])}


BAD = [
    ("zzz_test.png,0,accept", "image 'zzz_test.png' is not in the journal"),
    ("a_test.png,999,reject", "a_test.png has no detection 999 (its ids are 0.."),
    ("a_test.png,1,relabel,scratch", "unknown class 'scratch'; the classes are open, short"),
    ("a_test.png,,missed,open,100,100,400,130", "box [100.0, 100.0, 400.0, 130.0] is outside a_test.png (128x128 px)"),
    ("a_test.png,0,reject", "detection 0 of a_test.png already has a verdict at"),
    ("a_test.png,1,maybe", "action 'maybe': one of accept, reject, relabel, missed"),
    ("a_test.png,1,reject,open", "reject takes no class"),
    ("a_test.png,,missed,open,10,10,5,20", "needs x1 < x2 and y1 < y2"),
    ("a_test.png,one,reject", "detection 'one'"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_verdicts_are_refused_with_their_line_and_nothing_written(line, tmp_path, capsys, bad, message):
    _, journal, _ = line
    verdicts = write_csv(tmp_path / "v.csv", ["a_test.png,0,accept", bad])
    out = tmp_path / "new" / "data"
    assert collect.main(["--journal", str(journal), "--verdicts", str(verdicts), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{verdicts}:3: " in err and message in err, err
    assert not (tmp_path / "new").exists()


def test_bad_journal_and_folders_are_refused(line, tmp_path, capsys):
    inbox, journal, _ = line
    verdicts = write_csv(tmp_path / "v.csv", ["a_test.png,0,accept"])
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"file": "a_test.png", "status": "ok", "detections": []}) + "\n")
    twice = tmp_path / "twice.jsonl"
    twice.write_text(journal.read_text() + journal.read_text().splitlines()[0] + "\n")
    header_only = write_csv(tmp_path / "none.csv", [])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("someone's data")
    for args, message in [
        (["--journal", str(old)], f"{old}:1: not a result record"),
        (["--journal", str(twice)], f"{twice}:4: a_test.png is already in the journal at {twice}:1"),
        (["--journal", str(journal), "--verdicts", str(header_only)], "no image to collect (3 inspected image(s) "
         "without a verdict line"),
        (["--journal", str(journal), "--images", str(tmp_path)], f"image {tmp_path / 'a_test.png'} not found"),
        (["--journal", str(journal), "--out", str(tmp_path / "mine")], "was not written by pcb-aoi-collect"),
        (["--journal", str(journal), "--format", "deeppcb", "--classes", "open,scratch"], ""),
    ]:
        argv = ["--verdicts", str(verdicts), "--out", str(tmp_path / "x"), *args]
        if not message:  # a valid run, for contrast: classes from --classes, and the --out given last wins
            assert collect.main(argv) == 0
            continue
        assert collect.main(argv) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "mine" / "keep.txt").read_text() == "someone's data"
    # a relabel to a class only --classes knows is refused without it, taken with it, and has no DeepPCB id
    v2 = write_csv(tmp_path / "v2.csv", ["a_test.png,0,relabel,scratch"])
    base = ["--journal", str(journal), "--verdicts", str(v2), "--out", str(tmp_path / "y")]
    assert collect.main(base + ["--classes", "open,scratch"]) == 2
    assert "class 'scratch' has no DeepPCB id" in capsys.readouterr().err
    assert collect.main(base + ["--classes", "open,scratch", "--format", "voc"]) == 0


def test_deeppcb_ids_match_the_reader():
    assert collect.DEEPPCB_IDS == {v: k for k, v in readers.DEEPPCB_CLASSES.items()}


def scores(rec: dict) -> list[float]:
    return [d["score"] for d in rec["detections"]]


def test_review_band_sets_aside_doubtful_calls_and_near_misses(models, line, tmp_path):
    _, _, e2e, _ = models
    inbox, _, recs = line
    maxes = sorted((max(scores(recs[f"{s}_test.png"])), s) for s in STEMS)
    (m1, s1), (m2, s2), (m3, s3) = maxes
    lo, threshold = (m1 + m2) / 2, (m2 + m3) / 2  # s1 below the band; s2 a near miss only; s3 a call in it
    files = [str(inbox / f"{s}_test.png") for s in STEMS]
    review = tmp_path / "review"
    base = ["--model", str(e2e), *files, "--score", str(threshold), "--quiet"]
    assert app.main(base + ["--out", str(tmp_path / "plain.jsonl")]) == 0
    assert app.main(base + ["--out", str(tmp_path / "band.jsonl"), "--review-dir", str(review),
                            "--review-band", f"{lo},1"]) == 0
    plain, band = read_jsonl(tmp_path / "plain.jsonl"), read_jsonl(tmp_path / "band.jsonl")
    # detecting down to the band changes nothing the app reports
    assert [r["detections"] for r in plain] == [r["detections"] for r in band]
    assert sorted(p.name for p in review.iterdir()) == sorted(
        f"{s}{suffix}" for s in (s2, s3) for suffix in ("_test.png", "_temp.png", "_test.png.json"))
    for s in (s2, s3):
        for suffix in ("_test.png", "_temp.png"):
            assert (review / f"{s}{suffix}").read_bytes() == (inbox / f"{s}{suffix}").read_bytes()
        rec = json.loads((review / f"{s}_test.png.json").read_text())
        journal_rec = next(r for r in band if Path(r["file"]).name == f"{s}_test.png")
        assert {k: v for k, v in rec.items() if k != "review"} == journal_rec
        near = rec["review"]["below_threshold"]
        assert rec["review"]["band"] == [lo, 1.0] and all(lo <= d["score"] <= threshold for d in near)
    near2 = json.loads((review / f"{s2}_test.png.json").read_text())
    assert near2["verdict"] == "pass" and max(scores({"detections": near2["review"]["below_threshold"]})) == m2


@pytest.mark.parametrize("argv, message", [
    (["--review-dir", "r"], "--review-dir and --review-band go together"),
    (["--review-dir", "r", "--review-band", "0.6,0.2"], "needs 0 <= LO <= HI <= 1"),
    (["--review-dir", "r", "--review-band", "0.2,1.5"], "needs 0 <= LO <= HI <= 1"),
    (["--review-dir", "r", "--review-band", "half"], "two scores LO,HI"),
])
def test_review_band_is_validated(argv, message, capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["--model", "m.onnx", "x.png", *argv])
    assert message in capsys.readouterr().err


def test_review_band_in_folder_mode_without_torch(models, line, no_torch_env, tmp_path):
    _, _, e2e, ds = models
    _, _, recs = line
    inbox, out, review = tmp_path / "in", tmp_path / "out", tmp_path / "review"
    inbox.mkdir()
    for stem, row in zip(STEMS, ds.rows(ds.images.image_id[:3])):
        drop_pair(ds, row, inbox, stem)
    top = max(scores(recs["a_test.png"]))  # a band holding a's best call and nothing of b or c
    others = [x for s in ("b", "c") for x in scores(recs[f"{s}_test.png"])]
    if any(abs(x - top) < 2e-6 for x in others):
        pytest.skip("two images share a's best score")
    proc = subprocess.Popen([sys.executable, "-c", CHECK_IMPORTS, "--model", str(e2e), "--watch", str(inbox),
                             "--out-dir", str(out), "--poll", "0.1", "--settle", "0.2", "--review-dir", str(review),
                             "--review-band", f"{top - 1e-6},{top + 1e-6}"], env=no_torch_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "results.jsonl").exists() and len(read_jsonl(out / "results.jsonl")) == 3)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(p.name for p in review.iterdir()) == ["a_temp.png", "a_test.png", "a_test.png.json"]
