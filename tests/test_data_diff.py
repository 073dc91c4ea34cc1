"""pcb-aoi-data-diff on a real git + DVC repository: one dataset revision, then a second one with an
image added, one removed, one with other pixels, a box relabelled and a box moved; the diff must report
exactly those (counts computed by hand below)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pcb_aoi.data.dataset import Dataset, content_hash, make_boxes_frame, make_images_frame
from pcb_aoi.data.diff import match_boxes
from pcb_aoi.data.dataset import make_boxes_frame as boxes_frame

# image -> (board, boxes); boxes (class, x1, y1, x2, y2)
BASE = {
    "a": ("b1", [("open", 5, 5, 15, 15), ("spur", 30, 20, 50, 40)]),
    "b": ("b1", [("short", 10, 10, 30, 30)]),
    "c": ("b2", [("copper", 2, 2, 12, 12)]),
    "d": ("b2", [("spur", 40, 8, 60, 28)]),
}
HEAD = {
    "a": ("b1", [("short", 5, 5, 15, 15), ("spur", 30, 20, 50, 40)]),  # open -> short, same place: relabelled
    "b": ("b1", [("short", 22, 10, 42, 30)]),  # moved 12 px: IoU 160 / 640 = 0.25
    "c": ("b2", [("copper", 2, 2, 12, 12)]),  # same boxes, other pixels: changed
    "e": ("b3", [("open", 1, 1, 9, 9), ("pin-hole", 20, 20, 26, 26)]),  # added ("d" removed)
}


def pixels(name: str, variant: int = 0) -> np.ndarray:
    return np.random.default_rng([ord(name), variant]).integers(0, 256, (48, 64), dtype=np.uint8)


def write_dataset(root, spec: dict, variants: dict | None = None, pictures: dict | None = None) -> None:
    """A clean dataset folder as etl writes it: PNGs, content_hash, manifests (``pictures``: id -> pixels)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for f in (root / "images").glob("*.png"):
        f.unlink()
    images, boxes = [], []
    for name, (board, bxs) in spec.items():
        a = (pictures or {}).get(name)
        a = pixels(name, (variants or {}).get(name, 0)) if a is None else a
        file = f"images/{name.replace(':', '_')}_test.png"
        Image.fromarray(a).save(root / file)
        images.append(dict(image_id=name, path=file, template_path="", width=64, height=48,
                           board_id=board, source_split="", source="test", content_hash=content_hash(a)))
        boxes += [dict(image_id=name, class_name=c, x1=x1, y1=y1, x2=x2, y2=y2) for c, x1, y1, x2, y2 in bxs]
    Dataset(root, make_images_frame(images), make_boxes_frame(boxes)).save(root)


def sh(repo, *cmd, check=True):
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def data_diff(repo, *args, check=True):
    return sh(repo, sys.executable, "-m", "pcb_aoi.data.diff", *args, check=check)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("datadiff")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "test"], [sys.executable, "-m", "dvc", "init", "-q"]):
        sh(repo, *cmd)
    for spec, variants, msg in ((BASE, {}, "dataset v1"), (HEAD, {"c": 1}, "dataset v2")):
        write_dataset(repo / "data/clean", spec, variants)
        sh(repo, sys.executable, "-m", "dvc", "add", "-q", "data/clean")
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", msg)
    return repo


def test_diff_reports_exactly_the_changes(repo):
    d = json.loads(data_diff(repo, "--base", "HEAD~1", "--head", "HEAD", "--json").stdout)
    assert d["images"] == {"added": ["e"], "removed": ["d"], "changed": ["c"], "renamed": []}
    assert d["box_counts"] == {"added": 0, "removed": 0, "relabelled": 1, "moved": 1, "adjusted": 0}
    assert d["totals"] == {"base_images": 4, "head_images": 4, "base_boxes": 5, "head_boxes": 6}
    assert d["compared_by"] == "content_hash"
    relabel, move = sorted(d["boxes"], key=lambda e: e["kind"])[::-1]
    assert (relabel["image_id"], relabel["from"], relabel["class"], relabel["iou"]) == ("a", "open", "short", 1.0)
    assert (move["image_id"], move["class"], move["base_box"], move["head_box"], move["iou"]) == (
        "b", "short", [10, 10, 30, 30], [22, 10, 42, 30], 0.25)
    pc = d["per_class"]
    # base: open 1, spur 2, short 1, copper 1; head: short 2, spur 1, copper 1, open 1, pin-hole 1
    assert {c: (v["base"], v["head"]) for c, v in pc.items()} == {
        "copper": (1, 1), "open": (1, 1), "pin-hole": (0, 1), "short": (1, 2), "spur": (2, 1)}
    assert pc["short"]["relabelled"] == 1 and pc["open"]["relabelled_away"] == 1 and pc["short"]["moved"] == 1
    assert d["per_board"] == {
        "b1": {"images_added": 0, "images_removed": 0, "images_changed": 0, "images_renamed": 0,
               "added": 0, "removed": 0, "relabelled": 1, "moved": 1, "adjusted": 0},
        "b2": {"images_added": 0, "images_removed": 1, "images_changed": 1, "images_renamed": 0,
               "added": 0, "removed": 0, "relabelled": 0, "moved": 0, "adjusted": 0},
        "b3": {"images_added": 1, "images_removed": 0, "images_changed": 0, "images_renamed": 0,
               "added": 0, "removed": 0, "relabelled": 0, "moved": 0, "adjusted": 0}}


def test_markdown_summary_and_thumbnails(repo, tmp_path):
    md = data_diff(repo, "--base", "HEAD~1", "--head", "HEAD", "--thumbnails", str(tmp_path / "th")).stdout
    assert "**Images:** 1 added, 1 removed, 1 changed (other pixels, by content_hash)." in md
    assert "**Boxes** (images in both revisions): 0 added, 0 removed, 1 relabelled, 1 moved, 0 adjusted." in md
    assert "| images | 4 | 4 | 0 |" in md and "| boxes | 5 | 6 | +1 |" in md
    assert "- box relabelled: `a` open → short at [5, 5, 15, 15] (IoU 1)" in md
    # a, b (box changes), then c (pixels): base | head side by side, old boxes red on the left
    assert sorted(p.name for p in (tmp_path / "th").iterdir()) == ["a.png", "b.png", "c.png"]
    pic = np.asarray(Image.open(tmp_path / "th/b.png"))
    assert pic.shape == (14 + 48, 64 + 6 + 64, 3)
    assert tuple(pic[14 + 10, 10]) == (220, 30, 30)  # the old box's top-left corner, base side
    assert tuple(pic[14 + 10, 64 + 6 + 22]) == (20, 170, 60)  # the new box's top-left corner, head side


def test_workspace_is_the_default_head_and_an_unchanged_dataset_says_so(repo):
    assert "_The dataset did not change._" in data_diff(repo, "--base", "HEAD").stdout
    bad = data_diff(repo, "--base", "nope", check=False)
    assert bad.returncode == 2 and "base revision 'nope' does not exist" in bad.stderr


def test_revisions_without_content_hash_are_compared_by_file(repo, tmp_path):
    """A dataset written before the content_hash column: the md5 of the image files tells changes."""
    import pandas as pd

    images = repo / "data/clean/images.parquet"
    before = images.read_bytes()
    try:
        pd.read_parquet(images).drop(columns="content_hash").to_parquet(images, index=False)
        d = json.loads(data_diff(repo, "--base", "HEAD~1", "--json").stdout)
        assert d["compared_by"] == "file md5" and d["images"]["changed"] == ["c"]
    finally:
        images.write_bytes(before)


def test_same_pixels_under_a_new_id_are_renamed_and_their_boxes_compared(tmp_path):
    """A single source becoming one of ingest.sources renames every image (a -> src:a): the diff pairs
    them by content_hash, not as removed + added, and compares their boxes as for the same id."""
    repo = tmp_path
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "test"], [sys.executable, "-m", "dvc", "init", "-q"]):
        sh(repo, *cmd)
    renamed = {f"src:{k}": v for k, v in BASE.items() if k != "d"}
    renamed["src:a"] = ("src:b1", [("short", 5, 5, 15, 15), ("spur", 30, 20, 50, 40)])  # open -> short
    pix = lambda spec: {k: pixels(k.removeprefix("src:")) for k in spec}  # noqa: E731 (same pixels per name)
    for spec, msg in ((BASE, "v1"), (renamed, "v2")):
        write_dataset(repo / "data/clean", spec, pictures=pix(spec))
        sh(repo, sys.executable, "-m", "dvc", "add", "-q", "data/clean")
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", msg)
    d = json.loads(data_diff(repo, "--base", "HEAD~1", "--head", "HEAD", "--json").stdout)
    assert d["images"] == {"added": [], "removed": ["d"], "changed": [],
                           "renamed": [{"from": k, "to": f"src:{k}"} for k in "abc"]}
    assert d["box_counts"] == {"added": 0, "removed": 0, "relabelled": 1, "moved": 0, "adjusted": 0}
    (e,) = d["boxes"]
    assert (e["image_id"], e["base_image_id"], e["from"], e["class"]) == ("src:a", "a", "open", "short")
    assert d["per_board"]["src:b1"]["images_renamed"] == 1 and d["per_board"]["b1"]["images_renamed"] == 1
    md = data_diff(repo, "--base", "HEAD~1", "--head", "HEAD", "--thumbnails", str(tmp_path / "th")).stdout
    assert "1 removed, 0 changed (other pixels, by content_hash), 3 renamed (same pixels, new id)." in md
    assert "- image renamed: `a` → `src:a`" in md and "(IoU 1) (was `a`)" in md
    assert [p.name for p in (tmp_path / "th").iterdir()] == ["src__a.png"]


@pytest.mark.parametrize("base, head, kinds", [
    ([("open", 0, 0, 10, 10)], [("open", 0, 0, 10, 10)], []),
    ([("open", 0, 0, 10, 10)], [("open", 0, 0, 10, 11)], ["adjusted"]),  # IoU 100/110
    ([("open", 0, 0, 10, 10)], [("short", 1, 0, 11, 10)], ["relabelled"]),  # IoU 90/110
    ([("open", 0, 0, 10, 10)], [("open", 6, 0, 16, 10)], ["moved"]),  # IoU 40/160 = 0.25
    ([("open", 0, 0, 10, 10)], [("open", 9, 0, 19, 10)], ["removed", "added"]),  # IoU 10/190 < 0.1
    ([("open", 0, 0, 10, 10)], [("short", 6, 0, 16, 10)], ["removed", "added"]),  # other class, IoU 0.25
])
def test_box_matching_rules(base, head, kinds):
    frame = lambda bxs: boxes_frame([dict(image_id="x", class_name=c, x1=a, y1=b, x2=cc, y2=dd)  # noqa: E731
                                     for c, a, b, cc, dd in bxs])
    assert [k for k, *_ in match_boxes(frame(base), frame(head)) if k != "same"] == kinds
