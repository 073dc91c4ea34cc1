"""The report of an evaluate run: one HTML page from what the evaluate stage wrote (dvc.yaml's
``evaluate`` outs): ``metrics.json``, ``operating_point.json``, ``plots/pr.csv``, ``plots/confusion.csv``
and the overlay pictures under ``plots/overlays/``.

DeepPCB's own protocol first (the numbers the README quotes), then per-class recall and COCO AP, how the
operating threshold was chosen, precision-recall curves (inline SVG), the confusion matrix and the
overlay pictures. Only ``metrics.json`` is required; a missing optional file is named on the page.
Stdlib only (no torch, pandas or plotting library).
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

from .page import ReportError, cards, data_uri, esc, figure, flatten, fmt, page, table

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0aa6b8", "#f032e6", "#9a6324"]
# (key in metrics.json's deeppcb block, label, how to show it)
HEADLINE = [("ap", "DeepPCB AP", "ratio"), ("fscore", "F-score", "ratio"), ("precision", "precision", "ratio"),
            ("recall", "recall", "ratio"), ("escape_rate", "escape rate (missed defects)", "pct"),
            ("false_calls_per_image", "false calls per image", "num"),
            ("false_calls_per_board", "false calls per board", "num"), ("score_threshold", "operating threshold", "num")]
# The overlay colours, as pcb_aoi.evaluation.overlays draws them (not imported: it needs torch's stack).
LEGEND = [("#00be00", "true defect found"), ("#ff00ff", "true defect missed or wrong class (MISS)"),
          ("#e60000", "detection: class score"), ("#ff8c00", "false alarm (FA)")]


def read_json(path: Path, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise ReportError(f"{path}: not found; run the evaluate stage (dvc repro evaluate) or dvc pull, "
                              "or give --reports the folder that holds metrics.json")
        return None
    try:
        obj = json.loads(path.read_text())
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return obj


def read_csv(path: Path, columns: list[str]) -> list[dict] | None:
    """Rows of a CSV the evaluate stage wrote; None when absent; ReportError naming a missing column."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        lacking = [c for c in columns if c not in (reader.fieldnames or [])]
        if lacking:
            raise ReportError(f"{path}: no column {', '.join(lacking)} (header: {reader.fieldnames})")
        return list(reader)


def show(value, how: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f} %" if how == "pct" else fmt(value, 4)


def section_headline(metrics: dict) -> str:
    d = metrics.get("deeppcb")
    if not d:
        return ("<h2>DeepPCB protocol</h2><p class=note>metrics.json has no <code>deeppcb</code> block (written "
                "by an evaluate stage before the DeepPCB protocol was added); re-run the evaluate stage.</p>")
    out = ["<h2>DeepPCB protocol</h2>", cards([(k, label, show(d.get(k), how)) for k, label, how in HEADLINE]),
           "<p class=note>DeepPCB's matching: a detection is correct when its IoU with a true defect is above 0.33 "
           "and the classes agree; escapes are true defects no detection found, false calls detections that "
           "match none, both at the operating threshold, on the test split.</p>"]
    keys = ["detections", "correct", "ground_truths", "escapes", "false_calls", "boards"]
    out.append(table([esc(k.replace("_", " ")) for k in keys], [[fmt(d.get(k)) for k in keys]], set(range(len(keys))),
                     'id="deeppcb-counts"'))
    return "\n".join(out)


def section_classes(metrics: dict) -> str:
    dr = (metrics.get("deeppcb") or {}).get("per_class_recall", {})
    pc = metrics.get("per_class", {})
    names = list(dict.fromkeys([*dr, *pc]))
    rows, attrs = [], []
    for c in names:
        p = pc.get(c, {})
        rows.append([esc(c), show(dr.get(c), "ratio"), show(p.get("ap50"), "ratio"), show(p.get("recall"), "ratio"),
                     fmt(p.get("boxes"))])
        attrs.append(f'data-class="{esc(c)}" data-recall="{esc(dr.get(c, ""))}"')
    coco = [("map", "COCO mAP@[.5:.95]"), ("map50", "COCO mAP@0.5"), ("map33", "COCO mAP@0.33"),
            ("escape_rate", "escape rate (COCO matching, IoU 0.5)"), ("test_images", "test images")]
    return ("<h2>Per class</h2>" + table(["class", "DeepPCB recall", "COCO AP@0.5", "recall at threshold (IoU 0.5)",
                                          "true defects"], rows, {1, 2, 3, 4}, 'id="per-class"', attrs)
            + cards([(k, label, show(metrics.get(k), "pct" if k == "escape_rate" else "ratio")) for k, label in coco]))


def section_operating_point(op: dict | None, path: Path) -> str:
    if op is None:
        return f"<h2>Operating point</h2><p class=note>Not found: <code>{esc(path)}</code>.</p>"
    mode = op.get("operating_point")
    how = (f"chosen automatically on the <b>{esc(op.get('chosen_on', '?'))}</b> split: the threshold with the fewest "
           f"false calls whose escape rate is at most {esc(show(op.get('max_escape_rate'), 'pct'))}"
           if mode == "auto" else "fixed in params.yaml (evaluate.score_threshold)")
    rows = [[f"<code>{esc(k)}</code>", esc(fmt(v))] for k, v in flatten(op)]
    return (f"<h2>Operating point</h2><p>Threshold <b data-key=threshold>{esc(fmt(op.get('score_threshold')))}</b>, "
            f"{how}.</p>" + table(["key", "value"], rows, {1}, 'id="operating-point"'))


def pr_svg(rows: list[dict]) -> str:
    """Precision (y) against recall (x), one polyline per class, 0..1 on both axes."""
    W, H, L, B, T, R = 520, 360, 46, 36, 10, 150  # px: size, left/bottom/top/right margins
    pw, ph = W - L - R, H - T - B
    by: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        by.setdefault(r["class"], []).append((float(r["recall"]), float(r["precision"])))
    parts = [f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="#fff" stroke="#8a949e"/>']
    for i in range(6):
        v = i / 5
        x, y = L + v * pw, T + (1 - v) * ph
        parts += [f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{T + ph}" stroke="#eef1f4"/>',
                  f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="#eef1f4"/>',
                  f'<text x="{x:.1f}" y="{T + ph + 14}" font-size="11" text-anchor="middle">{v:.1f}</text>',
                  f'<text x="{L - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v:.1f}</text>']
    parts += [f'<text x="{L + pw / 2}" y="{H - 4}" font-size="12" text-anchor="middle">recall</text>',
              f'<text x="12" y="{T + ph / 2}" font-size="12" text-anchor="middle" '
              f'transform="rotate(-90 12 {T + ph / 2})">precision</text>']
    for i, (c, pts) in enumerate(by.items()):
        color = PALETTE[i % len(PALETTE)]
        line = " ".join(f"{L + x * pw:.1f},{T + (1 - y) * ph:.1f}" for x, y in sorted(pts))
        parts += [f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.6" data-class="{esc(c)}"/>',
                  f'<rect x="{L + pw + 14}" y="{T + 6 + 18 * i}" width="12" height="12" fill="{color}"/>',
                  f'<text x="{L + pw + 32}" y="{T + 16 + 18 * i}" font-size="12">{esc(c)}</text>']
    return (f'<svg id="pr" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'role="img" aria-label="precision-recall curves">{"".join(parts)}</svg>')


def section_pr(rows: list[dict] | None, path: Path) -> str:
    if rows is None:
        return f"<h2>Precision-recall</h2><p class=note>Not found: <code>{esc(path)}</code>.</p>"
    return ("<h2>Precision-recall</h2><p class=note>COCO's interpolated precision at each recall, IoU 0.5, per class, "
            "over all scores (the operating threshold is one point on each curve).</p>" + pr_svg(rows))


def section_confusion(rows: list[dict] | None, path: Path, order: list[str]) -> str:
    """Counts of (actual, predicted) pairs; classes in ``order`` (the model's), then others, then background."""
    if rows is None:
        return f"<h2>Confusion matrix</h2><p class=note>Not found: <code>{esc(path)}</code>.</p>"
    counts = Counter((r["actual"], r["predicted"]) for r in rows)
    seen = {n for r in rows for n in (r["actual"], r["predicted"])} - {"background"}
    names = [c for c in order if c in seen] + sorted(seen - set(order))
    names.append("background")
    body = []
    for a in names:
        cells = [f"<th>{esc(a)}</th>"]
        for p in names:
            n, cls = counts[(a, p)], "diag" if a == p else ("off" if counts[(a, p)] else "")
            cells.append(f'<td class="num {cls}" data-actual="{esc(a)}" data-predicted="{esc(p)}">{n or ""}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(f"<th class=num>{esc(p)}</th>" for p in names)
    return ("<h2>Confusion matrix</h2><p class=note>Rows: the true class; columns: the predicted one, at the operating "
            "threshold (IoU 0.5). Row <i>background</i>: false alarms; column <i>background</i>: missed defects.</p>"
            f'<table id="confusion"><thead><tr><th>actual \\ predicted</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def section_overlays(folder: Path, max_pictures: int) -> str:
    if not folder.is_dir():
        return f"<h2>Overlays</h2><p class=note>Not found: <code>{esc(folder)}</code>.</p>"
    legend = " ".join(f'<span class=sw style="background:{c}"></span>{esc(t)}' for c, t in LEGEND)
    out = [f"<h2>Overlays</h2><p class=note>Test images at the operating threshold: {legend}. <i>sample</i>: the "
           "same images in every run; <i>worst</i>: the most misses, then the most false alarms.</p>"]
    groups = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    for g in groups:
        pngs = sorted(g.glob("*.png"))
        if not pngs:
            continue
        figs = [figure(data_uri(p.read_bytes(), "image/png"), f"<span class=mono>{esc(p.name)}</span>", p.name,
                       f'data-file="{esc(p.relative_to(folder))}"') for p in pngs[:max_pictures]]
        more = f" (the first {len(figs)} of {len(pngs)})" if len(pngs) > len(figs) else ""
        out.append(f"<h3>{esc(g.name)}{more}</h3><div class=grid data-group=\"{esc(g.name)}\">{''.join(figs)}</div>")
    return "\n".join(out)


def render(reports: str | Path, max_pictures: int = 24) -> str:
    """The page for the evaluate outputs under ``reports`` (laid out as dvc.yaml's ``evaluate`` stage writes them)."""
    reports = Path(reports)
    metrics = read_json(reports / "metrics.json", required=True)
    op_path, plots = reports / "operating_point.json", reports / "plots"
    op = read_json(op_path, required=False)
    pr = read_csv(plots / "pr.csv", ["class", "recall", "precision"])
    conf = read_csv(plots / "confusion.csv", ["actual", "predicted"])
    raw = table(["key", "value"], [[f"<code>{esc(k)}</code>", esc(fmt(v))] for k, v in flatten(metrics)], {1})
    sections = [section_headline(metrics), section_classes(metrics), section_operating_point(op, op_path),
                section_pr(pr, plots / "pr.csv"), section_confusion(conf, plots / "confusion.csv", list(metrics.get("per_class", {}))),
                section_overlays(plots / "overlays", max_pictures),
                f"<details><summary>Every number in metrics.json</summary>{raw}</details>"]
    return page("evaluate", "Evaluation report", f"The evaluate stage's outputs in {reports.resolve()}", sections)
