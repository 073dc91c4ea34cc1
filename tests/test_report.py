"""pcb-aoi-report: the pages are checked as a browser renders them (headless Chromium from Debian's
packages, `make chromium`): counts equal the journal's, failed boards and errors are listed, every
picture decodes, no request leaves the page; file names are escaped; no torch is imported."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pcb_aoi.edge.record import error_record, ok_record
from pcb_aoi.edge.runtime import Detection
from pcb_aoi.report import borderline, read_journal
from pcb_aoi.report.cli import main

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless_shell")
CLASSES = ["open", "short", "mousebite", "spur", "copper", "pin-hole"]
THR = 0.3677
MODEL = {"version": "7", "git_commit": "c0ffee1234", "params_version": "p1", "score_threshold": THR}
BOARD_RGB = (0, 128, 255)  # a colour nothing else on the page has: seen in the screenshot = pictures painted
WEIRD = 'h<b>&"x.png'  # a file name that is HTML: must show as text


@pytest.fixture(scope="module")
def chromium():
    exe = os.environ.get("CHROMIUM") or next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if not exe:
        pytest.skip("no chromium binary found (`make chromium` installs Debian's package where it runs as root "
                    "with apt-get; or set CHROMIUM=/path/to/chrome)")
    return exe


def browse(exe: str, page: Path, shot: Path) -> str:
    """The DOM after load (its scripts run), and a screenshot of a tall window into ``shot``: one launch."""
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--virtual-time-budget=10000", f"--user-data-dir={shot.parent / 'chromium-profile'}",
           "--window-size=1280,4000", f"--screenshot={shot}", "--dump-dom", page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "<body" in r.stdout and shot.is_file(), r.stderr[-2000:]
    return r.stdout


class Dom(HTMLParser):
    """Elements as [tag, attrs, text content, end] in document order, from Chromium's --dump-dom output
    (``end``: the index after the element's last descendant)."""
    VOID = {"img", "meta", "br", "input", "link", "hr", "source", "col", "wbr", "area", "base", "embed"}

    def __init__(self, text: str):
        super().__init__()
        self.elements, self.stack = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        el = [tag, dict(attrs), "", len(self.elements) + 1]
        self.elements.append(el)
        if tag not in self.VOID:
            self.stack.append(el)

    def handle_endtag(self, tag):
        while self.stack:
            el = self.stack.pop()
            el[3] = len(self.elements)
            if el[0] == tag:
                break

    def handle_data(self, data):
        for el in self.stack:
            el[2] += data

    def find(self, tag=None, **attrs):
        return [e for e in self.elements if (tag is None or e[0] == tag)
                and all(e[1].get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def cards(self) -> dict[str, str]:
        """The headline boxes: data-key -> the value shown (the text of the box's first child)."""
        return {e[1]["data-key"]: self.elements[i + 1][2] for i, e in enumerate(self.elements)
                if e[1].get("class") == "card"}

    def inside(self, container_id: str, tag: str):
        """The ``tag`` elements inside the element whose id is ``container_id``."""
        i, el = next((i, e) for i, e in enumerate(self.elements) if e[1].get("id") == container_id)
        return [e for e in self.elements[i + 1:el[3]] if e[0] == tag]


def assert_self_contained(html: str, dom: Dom) -> None:
    """No URL a browser would fetch: no http(s) anywhere, every picture a data: URI, nothing linked in."""
    assert "http://" not in html and "https://" not in html
    assert not dom.find("link") and all("src" not in e[1] for e in dom.find("script"))
    assert all(e[1]["src"].startswith("data:image/") for e in dom.find("img"))
    assert all(v.startswith("#") for e in dom.elements for k, v in e[1].items() if k in ("href", "action", "srcset"))
    assert "url(" not in html and "@import" not in html
    body = dom.find("body")[0][1]
    assert body["data-requests"] == "0"
    n = len(dom.find("img"))
    assert body["data-images-loaded"] == f"{n}/{n}" and n > 0


def colour_seen(png: Path, rgb: tuple[int, int, int], tol: int = 14, at_least: int = 500) -> int:
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    n = int((np.abs(a - np.array(rgb)).max(axis=2) <= tol).sum())
    assert n >= at_least, f"{png}: only {n} pixels of {rgb}: pictures not painted"
    return n


# --- edge: a folder run's journal ----------------------------------------------------------------------

def board(path: Path, size=(200, 160)) -> None:
    img = Image.new("RGB", size, BOARD_RGB)
    img.paste((20, 20, 20), (30, 30, 90, 60))
    img.save(path)


def det(cls, score, box=(40.0, 40.0, 43.0, 43.0)) -> Detection:
    return Detection(cls, score, list(box))


@pytest.fixture
def edge_run(tmp_path):
    """A journal as pcb-aoi-detect --watch writes it (record.py's records), for real image files; the
    records name the images as 'incoming/<name>' (not resolvable from here: the report gets --images)."""
    images, out = tmp_path / "incoming", tmp_path / "out"
    images.mkdir(), out.mkdir()
    plan = {  # name -> detections in decreasing score, or an error
        "a_test.png": [det("open", 0.95, (10, 10, 30, 30)), det("short", 0.40)],  # fails on a confident call
        "b_test.png": [det("spur", 0.42)],  # fails on one borderline call: candidate
        "c_test.png": [],
        "d_test.png": [det("open", 0.41), det("open", 0.39)],  # candidate
        "e_test.png": "e_test.png: not a readable image (cannot identify image file)",
        "f_test.png": [],
        WEIRD: [det("copper", 0.80)],
    }
    ms = {"a_test.png": 12.0, "b_test.png": 11.0, "c_test.png": 10.0, "d_test.png": 13.0, "f_test.png": 250.0,
          WEIRD: 9.5}
    lines = []
    for name, dets in plan.items():
        if isinstance(dets, str):
            (images / name).write_bytes(b"not a png")
            lines.append(json.dumps(error_record(f"incoming/{name}", dets, MODEL)))
        else:
            board(images / name)
            lines.append(json.dumps(ok_record(f"incoming/{name}", dets, THR, CLASSES, ms[name], MODEL)))
    lines.insert(3, '{"schema": "pcb-aoi.result/1", "file": "incoming/g_te')  # torn by a kill
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    return images, out


def test_borderline_is_the_score_band_above_the_threshold(edge_run):
    run = read_journal(edge_run[1])
    assert len(run.records) == 7 and run.torn == [4]
    dets, boards = borderline(run, 0.1)
    assert [Path(r["file"]).name for r in boards] == ["b_test.png", "d_test.png"]
    # lowest margin first: d#1 0.39, d#0 0.41, b#0 0.42, a#1 0.40 is borderline too (a fails anyway)
    assert [(Path(r["file"]).name, d["id"]) for r, d in dets] == [
        ("d_test.png", 1), ("a_test.png", 1), ("d_test.png", 0), ("b_test.png", 0)]
    assert [Path(r["file"]).name for r in borderline(run, 0.02)[1]] == []  # 0.39 - 0.3677 > 0.02: none


def test_edge_page_in_chromium_matches_the_journal(chromium, edge_run, tmp_path):
    images, out = edge_run
    page = tmp_path / "report" / "edge.html"
    assert main(["edge", str(out), "--images", str(images), "--out", str(page)]) == 0
    html = page.read_text()
    dom = Dom(browse(chromium, page, tmp_path / "edge.png"))
    print("screenshot:", tmp_path / "edge.png")
    assert_self_contained(html, dom)
    assert dom.find("body")[0][1]["data-images-loaded"] == "4/4"  # the four failed boards, pictured

    card = dom.cards()
    assert (card["images"], card["passed"], card["failed"], card["errors"]) == ("7", "2", "4", "1")
    assert card["fail-rate"] == "66.7 %" and card["ms-median"] == "11"  # of 9.5 10 11 12 13 250
    per_class = {e[1]["data-class"]: (int(e[1]["data-detections"]), int(e[1]["data-boards"]))
                 for e in dom.inside("classes", "tr") if "data-class" in e[1]}
    assert per_class == {"open": (3, 2), "short": (1, 1), "mousebite": (0, 0), "spur": (1, 1), "copper": (1, 1),
                         "pin-hole": (0, 0)}
    rows = lambda table_id: [Path(e[1]["data-file"]).name for e in dom.inside(table_id, "tr") if "data-file" in e[1]]
    assert sorted(rows("failed")) == sorted(["a_test.png", "b_test.png", "d_test.png", WEIRD])
    assert rows("candidates") == ["b_test.png", "d_test.png"]
    assert rows("errors") == ["e_test.png"]
    assert rows("slowest")[0] == "f_test.png"
    assert "cannot identify image file" in dom.inside("errors", "tr")[1][2]
    assert dom.find(data_key="torn") and "line 4" in dom.find(data_key="torn")[0][2]
    assert "c0ffee1234" in "".join(e[2] for e in dom.find("table", **{"class": "model"}))
    # the name that is HTML reads as written (unescaped, its <b> would be a tag and vanish from the text)
    row = next(e for e in dom.inside("failed", "tr") if e[1].get("data-file") == f"incoming/{WEIRD}")
    assert f"incoming/{WEIRD}" in row[2]
    assert f"incoming/{WEIRD}" in [e[1].get("data-file") for e in dom.find("figure")]

    # the picture of a_test: downscaled? no (200 px < 360): box #0 (10..30) drawn in open's colour
    fig = next(e for e in dom.elements if e[0] == "img" and e[1].get("alt") == "incoming/a_test.png")
    pic = Image.open(io.BytesIO(base64.b64decode(fig[1]["src"].split(",", 1)[1]))).convert("RGB")
    assert pic.size == (200, 160)
    px = np.asarray(pic).astype(int)
    assert np.abs(px[20, 10] - (0xE6, 0x19, 0x4B)).max() < 60 and np.abs(px[20, 100] - BOARD_RGB).max() < 20
    colour_seen(tmp_path / "edge.png", BOARD_RGB)


def test_edge_pictures_are_downscaled_and_tiny_boxes_widened(tmp_path):
    from pcb_aoi.report.edge import MIN_BOX, THUMB_SIDE, thumbnail
    p = tmp_path / "big.png"
    Image.new("L", (1440, 720), 255).save(p)
    data, width = thumbnail(p, [{"id": 0, "class": "open", "score": 0.9, "box": [720.0, 360.0, 723.0, 363.0]}],
                     {"open": "#0000ff"})
    pic = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert pic.shape == (THUMB_SIDE // 2, THUMB_SIDE, 3) and width == THUMB_SIDE  # 1440x720 -> 360x180, scale 1/4
    cx, cy = 721.5 / 4, 361.5 / 4  # the 3-px box is 0.75 px here: drawn MIN_BOX wide around its centre
    edge_x = int(round(cx - MIN_BOX / 2))
    assert pic[int(cy), edge_x, 2] > 180 and pic[int(cy), edge_x, 0] < 90  # blue outline
    assert pic[int(cy), int(cx)].min() > 200  # the inside stays white


def test_errors_name_the_file_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["edge", str(tmp_path), "--out", str(out)]) == 2
    assert "results.jsonl: no journal" in capsys.readouterr().err and not out.exists()
    (tmp_path / "results.jsonl").write_text(json.dumps({"schema": "other/2", "file": "x", "status": "ok"}) + "\n")
    assert main(["edge", str(tmp_path), "--out", str(out)]) == 2
    assert "results.jsonl:1: schema 'other/2'" in capsys.readouterr().err and not out.exists()
    assert main(["evaluate", "--reports", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "metrics.json: not found" in capsys.readouterr().err and not out.exists()


# --- evaluate: the evaluate stage's outputs -------------------------------------------------------------

DEEPPCB = {"ap": 0.9, "precision": 0.8, "recall": 0.75, "fscore": 0.774194, "score_threshold": 0.35,
           "detections": 5, "correct": 4, "ground_truths": 4, "escapes": 1, "false_calls": 1,
           "escape_rate": 0.25, "false_calls_per_image": 0.5, "boards": 1, "false_calls_per_board": 1.0,
           "per_class_recall": {"open": 0.666667, "short": 1.0}}


@pytest.fixture
def reports(tmp_path):
    r = tmp_path / "reports"
    (r / "plots" / "overlays" / "sample").mkdir(parents=True)
    (r / "plots" / "overlays" / "worst").mkdir()
    metrics = {"deeppcb": DEEPPCB, "map": 0.5, "map50": 0.8, "map33": 0.85, "escape_rate": 0.25,
               "score_threshold": 0.35, "test_images": 2,
               "per_class": {"open": {"ap50": 0.7, "recall": 0.666667, "boxes": 3},
                             "short": {"ap50": 1.0, "recall": 1.0, "boxes": 1}}, "operating_point": "auto"}
    (r / "metrics.json").write_text(json.dumps(metrics))
    (r / "operating_point.json").write_text(json.dumps({"operating_point": "auto", "max_escape_rate": 0.01,
                                                        "score_threshold": 0.35, "chosen_on": "val"}))
    pr = ["class,recall,precision"] + [f"{c},{i / 10},{p}" for c, p in (("open", 0.9), ("short", 1.0)) for i in range(11)]
    (r / "plots" / "pr.csv").write_text("\n".join(pr) + "\n")
    pairs = [("open", "open")] * 2 + [("open", "background"), ("short", "short"), ("background", "short")]
    (r / "plots" / "confusion.csv").write_text("actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in pairs))
    for name in ("sample/b1_000.png", "worst/01_b1_001.png"):
        Image.new("RGB", (300, 200), BOARD_RGB).save(r / "plots" / "overlays" / name)
    return r


def test_evaluate_page_in_chromium_shows_the_metrics(chromium, reports, tmp_path):
    page = tmp_path / "eval.html"
    assert main(["evaluate", "--reports", str(reports), "--out", str(page)]) == 0
    dom = Dom(browse(chromium, page, tmp_path / "eval.png"))
    print("screenshot:", tmp_path / "eval.png")
    assert_self_contained(page.read_text(), dom)
    assert dom.find("body")[0][1]["data-images-loaded"] == "2/2"
    card = dom.cards()
    assert (card["ap"], card["fscore"], card["escape_rate"], card["false_calls_per_image"]) == (
        "0.9", "0.7742", "25.00 %", "0.5")
    assert {e[1]["data-class"]: e[1]["data-recall"] for e in dom.inside("per-class", "tr") if "data-class" in e[1]} \
        == {"open": "0.666667", "short": "1.0"}
    cell = {(e[1]["data-actual"], e[1]["data-predicted"]): e[2] for e in dom.find("td") if "data-actual" in e[1]}
    assert (cell[("open", "open")], cell[("open", "background")], cell[("background", "short")],
            cell[("short", "open")]) == ("2", "1", "1", "")
    assert [e[1]["data-class"] for e in dom.find("polyline")] == ["open", "short"]
    assert dom.find("b", data_key="threshold")[0][2] == "0.35"
    assert {e[1]["data-file"] for e in dom.find("figure")} == {"sample/b1_000.png", "worst/01_b1_001.png"}
    colour_seen(tmp_path / "eval.png", BOARD_RGB)


def test_evaluate_page_of_the_repository_reports(chromium, tmp_path):
    reports = ROOT / "reports"
    if not (reports / "metrics.json").is_file():
        pytest.skip("no reports/metrics.json in this checkout (dvc pull or dvc repro evaluate)")
    page = tmp_path / "repo.html"
    assert main(["evaluate", "--reports", str(reports), "--out", str(page)]) == 0
    dom = Dom(browse(chromium, page, tmp_path / "repo.png"))
    assert_self_contained(page.read_text(), dom)
    pngs = len(list((reports / "plots" / "overlays").rglob("*.png")))
    assert dom.find("body")[0][1]["data-images-loaded"] == f"{pngs}/{pngs}"
    metrics = json.loads((reports / "metrics.json").read_text())
    pairs = (reports / "plots" / "confusion.csv").read_text().splitlines()[1:]
    for e in dom.find("td"):  # every cell is the count of its (actual, predicted) rows in the CSV
        if "data-actual" in e[1]:
            n = pairs.count(f"{e[1]['data-actual']},{e[1]['data-predicted']}")
            assert e[2] == (str(n) if n else "")
    assert dom.find("b", data_key="threshold")[0][2] == str(metrics["score_threshold"])


# --- torch-free ------------------------------------------------------------------------------------------

NO_TORCH = """
import sys
from pcb_aoi.report.cli import main
rc = main(sys.argv[1:4] + ["--out", sys.argv[4]]) or main(["evaluate", "--reports", sys.argv[5], "--out", sys.argv[6]])
extra = sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)
               - {'numpy', 'onnxruntime', 'PIL', 'pcb_aoi', '__main__', '__mp_main__', '_distutils_hack'})
print(extra)
sys.exit(rc or (99 if extra else 0))
"""


def test_the_report_imports_no_torch(edge_run, reports, tmp_path):
    """Both pages are written in a Python where torch, torchvision and pandas cannot be imported."""
    block = tmp_path / "block"
    block.mkdir()
    for name in ("torch", "torchvision", "pandas", "cv2"):
        (block / f"{name}.py").write_text(f"raise ImportError('{name} is not installed on the edge box')\n")
    env = {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{SRC}"}
    images, out = edge_run
    r = subprocess.run([sys.executable, "-c", NO_TORCH, "edge", str(out), f"--images={images}", str(tmp_path / "e.html"),
                        str(reports), str(tmp_path / "v.html")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "e.html").stat().st_size > 1000 and (tmp_path / "v.html").stat().st_size > 1000


def test_sparse_inputs_still_make_a_page(tmp_path):
    """An empty journal, a journal from before the result schema (no verdict, counts or ids), and a
    reports folder with only an old metrics.json: pages that say what is missing, no crash."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text("")
    assert main(["edge", str(out), "--out", str(tmp_path / "empty.html")]) == 0
    assert "Failed boards (0)" in (tmp_path / "empty.html").read_text()
    old = {"file": "x_test.png", "status": "ok", "ms": 5.0,
           "detections": [{"class": "spur", "score": 0.5, "box": [1, 2, 3, 4]}]}
    (out / "results.jsonl").write_text(json.dumps(old) + "\n")
    run = read_journal(out)
    assert (run.records[0]["verdict"], run.records[0]["counts"], run.records[0]["detections"][0]["id"]) == (
        "fail", {"spur": 1}, 0)
    assert main(["edge", str(out), "--out", str(tmp_path / "old.html")]) == 0
    assert "1 failed board picture(s) not drawn" in (tmp_path / "old.html").read_text()
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "metrics.json").write_text(json.dumps({"map": 0.5, "map50": 0.8}))
    assert main(["evaluate", "--reports", str(reports), "--out", str(tmp_path / "v.html")]) == 0
    page = (tmp_path / "v.html").read_text()
    assert "no <code>deeppcb</code> block" in page and page.count("Not found:") == 4
