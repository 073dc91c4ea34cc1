"""pcb-aoi-review: the review of a model change (a pull request), as markdown, plus its pictures.

For a base revision and the workspace (or a head revision) it writes ``<out>/review.md`` (and prints
it): the headline metrics (DeepPCB's own protocol first, then COCO's) and per-class recall of the test
split with every change for the worse in bold, then ``dvc params diff --md`` and ``dvc metrics diff
--md``. ``dvc plots diff`` is rendered to ``<out>/plots/index.html`` (learning curves, PR curves,
confusion matrices and the overlay pictures of both revisions side by side), and each fixed-sample
overlay of the two revisions is put side by side in one PNG under ``<out>/side_by_side/``. A data
section compares the two revisions' clean datasets (``pcb_aoi.data.diff``, as ``pcb-aoi-data-diff``).

    pcb-aoi-review --base main                 # workspace vs main
    pcb-aoi-review --base origin/main --head HEAD --out reports/review
    pcb-aoi-review --base main --fail-on-drop 0.005   # exit 1 if DeepPCB AP/F drop or escapes rise > 0.005

Exit codes: 0 the review was written (and the gate, if asked, passed); 1 the ``--fail-on-drop`` gate
failed (review written); 2 a user error (bad revision, no metrics: nothing written), or the gate cannot
compare because a revision has no DeepPCB metrics (review written).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..data.dataset import atomic_dir
from ..data.diff import data_section

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

WORKSPACE = "workspace"
# (dotted key in metrics.json, row name, +1: higher is better / -1: lower is better). DeepPCB's protocol
# (evaluation/deeppcb.py: IoU > 0.33, classes must agree) first; map33 is COCO's AP at IoU 0.33, not it.
HEADLINE = [("deeppcb.ap", "DeepPCB AP", +1), ("deeppcb.fscore", "DeepPCB F-score", +1),
            ("deeppcb.escape_rate", "DeepPCB escape rate", -1),
            ("deeppcb.false_calls_per_image", "DeepPCB false calls / image", -1),
            ("deeppcb.board_verdicts.escape_rate", "boards escaped (defective, passed)", -1),
            ("deeppcb.board_verdicts.false_call_rate", "boards falsely failed (defect-free, failed)", -1),
            ("map50", "COCO AP@0.5", +1), ("map33", "COCO AP@0.33", +1), ("map", "COCO AP@[.5:.95]", +1),
            ("escape_rate", "escape rate (IoU 0.5)", -1)]
GATED = HEADLINE[:3]  # what --fail-on-drop compares: DeepPCB AP, F-score, escape rate
MISSING = object()  # a key the revision's metrics.json does not have (older commits); None = null there


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


def value(m: dict, key: str):
    """``m``'s value at a dotted ``key`` ("deeppcb.ap"); MISSING when part of the path is absent."""
    for part in key.split("."):
        if not isinstance(m, dict) or part not in m:
            return MISSING
        m = m[part]
    return m


def fmt(v) -> str:
    if v is MISSING:
        return "—"
    return "n/a" if v is None else f"{v:.4f}".rstrip("0").rstrip(".") if v else "0"


def delta(base, head, better: int) -> tuple[str, bool]:
    """(markdown cell, is it worse); ``better`` = +1 when higher is better, -1 when lower is."""
    if base is MISSING or head is MISSING:
        return "—", False
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
        b, h = value(base_m, key), value(head_m, key)
        cell, bad = delta(b, h, better)
        worse += [name] if bad else []
        lines.append(f"| {name} | {fmt(b)} | {fmt(h)} | {cell} |")
    note = (f"DeepPCB rows: DeepPCB's protocol (IoU > 0.33, the class must agree); F-score, escape rate and "
            f"false calls at score ≥ {threshold(base_m, head_m, 'deeppcb.score_threshold')}.")
    if not all(isinstance(m.get("deeppcb"), dict) for m in (base_m, head_m)):
        note += " — = that revision has no DeepPCB metrics (run `dvc repro evaluate` there)."
    lines += ["", note]
    # per-class recall: DeepPCB's when both revisions have it, else the IoU 0.5 recall of per_class
    base_pc, head_pc = base_m.get("per_class", {}), head_m.get("per_class", {})
    base_dp, head_dp = value(base_m, "deeppcb.per_class_recall"), value(head_m, "deeppcb.per_class_recall")
    if isinstance(base_dp, dict) and isinstance(head_dp, dict):
        how = f"DeepPCB protocol, score ≥ {threshold(base_m, head_m, 'deeppcb.score_threshold')}"
        base_r, head_r = base_dp, head_dp
    else:
        how = f"IoU 0.5, score ≥ {threshold(base_m, head_m, 'score_threshold')}"
        base_r, head_r = ({c: v.get("recall") for c, v in pc.items()} for pc in (base_pc, head_pc))
    lines += ["", f"**Recall per class** (test split, {how}; 🔻 in bold = a class the new model finds less often)",
              "", f"| class | boxes | {base_label} | {head_label} | change |", "|---|---:|---:|---:|---:|"]
    for c in list(head_r) + [c for c in base_r if c not in head_r]:
        b, h = base_r.get(c), head_r.get(c)
        cell, bad = delta(b, h, +1)
        worse += [f"recall of {c}"] if bad else []
        lines.append(f"| {c} | {head_pc.get(c, base_pc.get(c, {})).get('boxes', 'n/a')} | {fmt(b)} | {fmt(h)} | {cell} |")
    return "\n".join(lines), worse


def threshold(base_m: dict, head_m: dict, key: str) -> str:
    """The head's score threshold at ``key``, and the base's when it differs."""
    h, b = fmt(value(head_m, key)), fmt(value(base_m, key))
    return h if h == b else f"{h}, base: ≥ {b}"


@dataclass
class Gate:
    """The outcome of ``--fail-on-drop tol``: what got worse by more than ``tol``, and what could not be
    compared (a revision without DeepPCB metrics); it passes only when both are empty."""

    tol: float
    failures: list[str] = field(default_factory=list)  # "DeepPCB AP dropped 0.9812 -> 0.9710 (-0.0102)"
    cannot: list[str] = field(default_factory=list)  # why a comparison is impossible

    @property
    def exit_code(self) -> int:
        return 2 if self.cannot else 1 if self.failures else 0

    def markdown(self) -> str:
        flag = f"--fail-on-drop {self.tol:g}"
        if self.cannot:
            return f"❌ **Gate: {flag} could not compare:** " + "; ".join(self.cannot)
        if self.failures:
            return f"❌ **Gate: {flag} failed:** " + "; ".join(self.failures)
        return (f"✅ **Gate: {flag} passed** (DeepPCB AP and F-score dropped, and its escape rate rose, "
                f"by at most {self.tol:g})")

    def errors(self) -> list[str]:
        """One line per problem, for stderr."""
        if self.cannot:
            return [f"--fail-on-drop {self.tol:g} cannot compare: {c}" for c in self.cannot]
        return [f"{f}, more than --fail-on-drop {self.tol:g}" for f in self.failures]


def gate(base_m: dict, head_m: dict, tol: float, labels: tuple[str, str], metrics_path: str) -> Gate:
    """Compare the GATED metrics of base and head: a change for the worse by more than ``tol`` fails."""
    out = Gate(tol)
    for m, label in zip((base_m, head_m), labels):
        if not isinstance(m.get("deeppcb"), dict):
            out.cannot.append(f"{label} has no DeepPCB metrics (no \"deeppcb\" block in {metrics_path}); "
                              f"run `dvc repro evaluate` there and commit {metrics_path}")
    if out.cannot:
        return out
    for key, name, better in GATED:
        b, h = value(base_m, key), value(head_m, key)
        if not all(isinstance(v, (int, float)) for v in (b, h)):  # null (undefined) or absent
            state = lambda v: "absent" if v is MISSING else "null" if v is None else fmt(v)  # noqa: E731
            out.cannot.append(f"{name} cannot be compared: {key} in {metrics_path} is {state(b)} at {labels[0]} "
                              f"and {state(h)} at {labels[1]}")
            continue
        if round((b - h) * better, 9) > tol:  # rounded: 0.9812 - 0.9762 is 0.005000000000000004
            out.failures.append(f"{name} {'dropped' if h < b else 'rose'} {b:.4f} -> {h:.4f} ({h - b:+.4f})")
    return out


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


def review(base: str, head: str, out: Path, metrics_path: str, overlays: str,
           fail_on_drop: float | None = None, data: str = "data/clean") -> tuple[str, Gate | None]:
    """Write the review to ``out`` and return (its markdown, the ``--fail-on-drop`` outcome or None)."""
    root = repo_root()
    base_sha = resolve(root, base, "base")
    head_sha = None if head == WORKSPACE else resolve(root, head, "head")
    base_label = f"base `{base}` ({base_sha[:7]})"
    head_label = WORKSPACE if head_sha is None else f"head `{head}` ({head_sha[:7]})"
    base_m = load_metrics(root, base_sha, base_label, metrics_path)
    head_m = load_metrics(root, head_sha, head_label, metrics_path)
    revs = [base] + ([head] if head_sha else [])  # names as given: readable dvc diff columns

    table, worse = summary_md(base_m, head_m, "base", "head")
    verdict = gate(base_m, head_m, fail_on_drop, (base_label, head_label), metrics_path) \
        if fail_on_drop is not None else None
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
        summary = ("⚠️ **Worse:** " + ", ".join(worse)) if worse else "✅ Nothing got worse."
        md = "\n".join([
            f"## Model review: {head_label} vs {base_label}", "", summary, "",
            *([verdict.markdown(), ""] if verdict else []), table, "",
            "### Params changed (`dvc params diff`)", "", params or "_No params changed._", "",
            "### All metrics (`dvc metrics diff`)", "", metrics or "_No metric changed._", "",
            "### Data (`pcb-aoi-data-diff`)", "", data_section(root, base_sha, head_sha, data), "",
            "### Pictures", "",
            f"`dvc plots diff` of both revisions: `{out.name}/plots/index.html` (curves, confusion matrices, and "
            f"overlays: green = found, magenta = missed, red = detection, orange = false alarm). "
            f"{pairs} fixed-sample overlays side by side (base | head): `{out.name}/side_by_side/`.", ""])
        (tmp / "review.md").write_text(md)
    return md, verdict


def tolerance(text: str) -> float:
    """argparse type of --fail-on-drop: a finite float >= 0."""
    try:
        tol = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(tol) and tol >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0.005 = half a point), got {text}")
    return tol


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pcb-aoi-review", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare against (branch, tag, sha)")
    ap.add_argument("--head", default=WORKSPACE, help="revision under review (default: the workspace)")
    ap.add_argument("--out", default="reports/review", type=Path,
                    help="folder for review.md, plots/ and side_by_side/ (replaced; default: %(default)s)")
    ap.add_argument("--metrics", default="reports/metrics.json", help="evaluate's metrics file (default: %(default)s)")
    ap.add_argument("--overlays", default="reports/plots/overlays", help="evaluate's overlay folder (default: %(default)s)")
    ap.add_argument("--data", default="data/clean", help="etl's dataset folder, compared (default: %(default)s)")
    ap.add_argument("--fail-on-drop", type=tolerance, metavar="TOL",
                    help="after writing the review, exit 1 when DeepPCB AP or F-score is lower than the base's, or "
                         "DeepPCB escape rate higher, by more than TOL (e.g. 0.005); exit 2 when a revision has no "
                         "DeepPCB metrics to compare")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        md, verdict = review(args.base, args.head, args.out, args.metrics, args.overlays, args.fail_on_drop,
                             args.data)
    except ReviewError as e:
        if os.environ.get("PCB_AOI_DEBUG"):
            raise
        print(f"error: review: {e}", file=sys.stderr)
        sys.exit(2)
    print(md)
    if verdict and verdict.exit_code:
        sys.stdout.flush()
        for line in verdict.errors():
            print(f"error: review: {line}", file=sys.stderr)
        sys.exit(verdict.exit_code)


if __name__ == "__main__":
    main()
