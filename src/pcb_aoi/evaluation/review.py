"""pcb-aoi-review: the review of a model change (a pull request), as markdown, plus its pictures.

For a base revision and the workspace (or a head revision) it writes ``<out>/review.md`` (and prints
it): the headline metrics and per-class recall of the test split with every drop in bold and marked
🔻, then ``dvc params diff --md`` and ``dvc metrics diff --md``. ``dvc plots diff`` is rendered to
``<out>/plots/index.html`` (learning curves, PR curves, confusion matrices and the overlay pictures of
both revisions side by side), and each fixed-sample overlay of the two revisions is put side by side in
one PNG under ``<out>/side_by_side/``.

    pcb-aoi-review --base main                 # workspace vs main
    pcb-aoi-review --base origin/main --head HEAD --out reports/review
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..data.dataset import atomic_dir

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

WORKSPACE = "workspace"
HEADLINE = [("map50", "mAP@0.5", +1), ("map33", "mAP@0.33", +1), ("map", "mAP@[.5:.95]", +1),
            ("escape_rate", "escape rate", -1)]  # +1: higher is better, -1: lower is better


class ReviewError(Exception):
    """A user error: bad revision, no metrics, not a DVC repository."""


def sh(*cmd: str, cwd: Path) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise ReviewError(f"`{' '.join(cmd[2:] if cmd[1:2] == ('-m',) else cmd)}` failed: "
                          f"{msg[-1] if msg else f'exit {r.returncode}'}")
    return r.stdout


def dvc(*args: str, cwd: Path) -> str:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd)


def repo_root() -> Path:
    r = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if r.returncode:
        raise ReviewError(f"{Path.cwd()} is not inside a git repository; run from the project checkout")
    root = Path(r.stdout.strip())
    if not (root / ".dvc").is_dir():
        raise ReviewError(f"{root} is not a DVC repository (no .dvc/); run from the project checkout")
    return root


def resolve(root: Path, rev: str, role: str) -> str:
    """The commit sha of ``rev``, or an error saying how to get it."""
    r = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=root,
                       capture_output=True, text=True)
    if r.returncode:
        raise ReviewError(f"{role} revision {rev!r} does not exist in this git repository (a typo? in CI, "
                          f"fetch the whole history: actions/checkout with fetch-depth: 0)")
    return r.stdout.strip()


def read(root: Path, rev: str | None, path: str) -> bytes | None:
    """Bytes of ``path`` at commit ``rev`` (git or DVC tracked), or in the workspace (``rev`` None)."""
    if rev is None:
        p = root / path
        return p.read_bytes() if p.is_file() else None
    from dvc.api import DVCFileSystem

    try:
        return DVCFileSystem(str(root), rev=rev).read_bytes(path)
    except Exception:  # no such file, no DVC at that revision, DVC data not in the cache: all "missing"
        return None


def list_files(root: Path, rev: str | None, folder: str) -> list[str]:
    if rev is None:
        base = root / folder
        return sorted(str(p.relative_to(root)) for p in base.rglob("*.png")) if base.is_dir() else []
    from dvc.api import DVCFileSystem

    try:
        return sorted(p.lstrip("/") for p in DVCFileSystem(str(root), rev=rev).find(folder) if p.endswith(".png"))
    except Exception:  # as in read(): nothing to list
        return []


def load_metrics(root: Path, rev: str | None, label: str, path: str) -> dict:
    raw = read(root, rev, path)
    if raw is None:
        raise ReviewError(f"{label} has no metrics ({path} is missing there); run `dvc repro` on that revision "
                          f"and commit dvc.lock and {path}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ReviewError(f"{label}: {path} is not valid JSON ({e})") from None


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}".rstrip("0").rstrip(".") if v else "0"


def delta(base, head, better: int) -> tuple[str, bool]:
    """(markdown cell, is it worse); ``better`` = +1 when higher is better, -1 when lower is."""
    if base is None or head is None:
        return "n/a", False
    d = head - base
    if d == 0:
        return "0", False
    worse = d * better < 0
    arrow = "🔺" if d > 0 else "🔻"
    cell = f"{arrow} {d:+.4f}" if abs(d) >= 1e-4 else f"{arrow} {d:+.1e}"
    return (f"**{cell}** ⚠️" if worse else cell), worse


def summary_md(base_m: dict, head_m: dict, base_label: str, head_label: str) -> tuple[str, list[str]]:
    """Headline metrics and per-class recall tables; returns (markdown, names of what got worse)."""
    worse = []
    lines = [f"| metric | {base_label} | {head_label} | change |", "|---|---:|---:|---:|"]
    for key, name, better in HEADLINE:
        cell, bad = delta(base_m.get(key), head_m.get(key), better)
        worse += [name] if bad else []
        lines.append(f"| {name} | {fmt(base_m.get(key))} | {fmt(head_m.get(key))} | {cell} |")
    thr, base_thr = head_m.get("score_threshold"), base_m.get("score_threshold")
    thr = f"{thr}" if thr == base_thr else f"{thr}, base: ≥ {base_thr}"
    lines += ["", f"**Recall per class** (test split, IoU 0.5, score ≥ {thr}; 🔻 in bold = a class the new model "
                  f"finds less often)", "",
              f"| class | boxes | {base_label} | {head_label} | change |", "|---|---:|---:|---:|---:|"]
    base_pc, head_pc = base_m.get("per_class", {}), head_m.get("per_class", {})
    for c in list(head_pc) + [c for c in base_pc if c not in head_pc]:
        b, h = base_pc.get(c, {}).get("recall"), head_pc.get(c, {}).get("recall")
        cell, bad = delta(b, h, +1)
        worse += [f"recall of {c}"] if bad else []
        lines.append(f"| {c} | {head_pc.get(c, base_pc.get(c, {})).get('boxes', 'n/a')} | {fmt(b)} | {fmt(h)} | {cell} |")
    return "\n".join(lines), worse


def side_by_side(left: bytes, right: bytes, left_label: str, right_label: str) -> Image.Image:
    a, b = Image.open(io.BytesIO(left)).convert("RGB"), Image.open(io.BytesIO(right)).convert("RGB")
    top, gap = 14, 6
    out = Image.new("RGB", (a.width + gap + b.width, top + max(a.height, b.height)), "white")
    out.paste(a, (0, top))
    out.paste(b, (a.width + gap, top))
    pen = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    pen.text((2, 1), left_label, fill="black", font=font)
    pen.text((a.width + gap + 2, 1), right_label, fill="black", font=font)
    return out


def review(base: str, head: str, out: Path, metrics_path: str, overlays: str) -> str:
    root = repo_root()
    base_sha = resolve(root, base, "base")
    head_sha = None if head == WORKSPACE else resolve(root, head, "head")
    base_label = f"base `{base}` ({base_sha[:7]})"
    head_label = WORKSPACE if head_sha is None else f"head `{head}` ({head_sha[:7]})"
    base_m = load_metrics(root, base_sha, base_label, metrics_path)
    head_m = load_metrics(root, head_sha, head_label, metrics_path)
    revs = [base] + ([head] if head_sha else [])  # names as given: readable dvc diff columns

    table, worse = summary_md(base_m, head_m, "base", "head")
    params = dvc("params", "diff", *revs, "--md", cwd=root).strip()
    metrics = dvc("metrics", "diff", *revs, "--md", cwd=root).strip()
    out = out if out.is_absolute() else Path.cwd() / out
    with atomic_dir(out) as tmp:
        dvc("plots", "diff", *revs, "-o", str(tmp / "plots"), cwd=root)
        pairs = 0
        for path in list_files(root, head_sha, f"{overlays}/sample"):
            left, right = read(root, base_sha, path), read(root, head_sha, path)
            if left is not None and right is not None:
                (tmp / "side_by_side").mkdir(exist_ok=True)
                side_by_side(left, right, f"base {base_sha[:7]}", head_label.replace("`", "")).save(
                    tmp / "side_by_side" / Path(path).name)
                pairs += 1
        verdict = ("⚠️ **Worse:** " + ", ".join(worse)) if worse else "✅ Nothing got worse."
        md = "\n".join([
            f"## Model review: {head_label} vs {base_label}", "", verdict, "", table, "",
            "### Params changed (`dvc params diff`)", "", params or "_No params changed._", "",
            "### All metrics (`dvc metrics diff`)", "", metrics or "_No metric changed._", "",
            "### Pictures", "",
            f"`dvc plots diff` of both revisions: `{out.name}/plots/index.html` (curves, confusion matrices, and "
            f"overlays: green = found, magenta = missed, red = detection, orange = false alarm). "
            f"{pairs} fixed-sample overlays side by side (base | head): `{out.name}/side_by_side/`.", ""])
        (tmp / "review.md").write_text(md)
    return md


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pcb-aoi-review", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare against (branch, tag, sha)")
    ap.add_argument("--head", default=WORKSPACE, help="revision under review (default: the workspace)")
    ap.add_argument("--out", default="reports/review", type=Path,
                    help="folder for review.md, plots/ and side_by_side/ (replaced; default: %(default)s)")
    ap.add_argument("--metrics", default="reports/metrics.json", help="evaluate's metrics file (default: %(default)s)")
    ap.add_argument("--overlays", default="reports/plots/overlays", help="evaluate's overlay folder (default: %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        print(review(args.base, args.head, args.out, args.metrics, args.overlays))
    except ReviewError as e:
        if os.environ.get("PCB_AOI_DEBUG"):
            raise
        print(f"error: review: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
