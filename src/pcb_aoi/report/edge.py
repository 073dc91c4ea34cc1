"""The report of a folder run of ``pcb-aoi-detect --watch IN --out-dir OUT``: one HTML page from the
journal ``OUT/results.jsonl`` (the result records, ``docs/result-record.md``).

It shows what a line engineer asks after a shift: how many boards failed and on which defect classes,
which failed boards rest only on calls just above the threshold (the first to re-check: see
``borderline``), which images could not be inspected and why, which were slow, pictures of the failed
boards with their detections drawn, and which model (provenance block) judged them. Torch-free: stdlib,
PIL and the edge package's record schema only, so it runs on the edge box itself.
"""
from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..edge.folder import JOURNAL
from ..edge.record import SCHEMA
from .page import ReportError, cards, data_uri, esc, figure, flatten, fmt, page, table

SCHEMA_PREFIX = SCHEMA.rsplit("/", 1)[0] + "/"  # "pcb-aoi.result/": later versions only add keys
THUMB_SIDE = 360  # px, longest side of a board picture on the page
MIN_BOX = 8  # px: a 3-px defect still gets a box one can see on the downscaled picture
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0aa6b8", "#f032e6", "#9a6324"]


@dataclass
class Run:
    """The journal of one output folder: records in journal order, normalized to the current schema."""
    path: Path
    records: list[dict]
    torn: list[int] = field(default_factory=list)  # line numbers skipped: torn by a kill while written

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "ok"]

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.ok if r["verdict"] == "fail"]

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "error"]

    def classes(self) -> list[str]:
        """The model's classes in its order (``counts`` lists them all), then any others seen."""
        names: dict[str, None] = {}
        for r in self.ok:
            names.update(dict.fromkeys(r["counts"]))
        return list(names)


def normalize(rec: dict, where: str) -> dict:
    """A journal record in the current schema's shape. Records from before the schema (no ``schema``
    key) get ``verdict``, ``counts`` and detection ids derived as ``record.ok_record`` makes them."""
    schema = rec.get("schema")
    if schema is not None and not str(schema).startswith(SCHEMA_PREFIX):
        raise ReportError(f"{where}: schema {schema!r} is not a pcb-aoi result record ({SCHEMA_PREFIX}*)")
    if rec.get("status") not in ("ok", "error") or "file" not in rec:
        raise ReportError(f"{where}: not a result record (needs 'file' and 'status' ok/error); "
                          "is this the journal pcb-aoi-detect --watch wrote?")
    rec = {"model": {}, **rec}
    if rec["status"] == "ok":
        dets = [{"id": i, **d} for i, d in enumerate(rec.get("detections", []))]
        counts = dict(rec.get("counts") or {})
        if "counts" not in rec:
            for d in dets:
                counts[d["class"]] = counts.get(d["class"], 0) + 1
        rec.update(detections=dets, counts=counts, verdict=rec.get("verdict", "fail" if dets else "pass"),
                   threshold=rec.get("threshold"), ms=rec.get("ms"))
    return rec


def read_journal(out_dir: str | Path) -> Run:
    """The journal in ``out_dir``; a line torn by a kill is skipped (listed on the page), as the app does."""
    path = Path(out_dir) / JOURNAL
    if not path.is_file():
        raise ReportError(f"{path}: no journal; give the --out-dir of a `pcb-aoi-detect --watch IN --out-dir OUT` run")
    records, torn = [], []
    for i, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            torn.append(i)
            continue
        if not isinstance(rec, dict):
            raise ReportError(f"{path}:{i}: not a JSON object")
        records.append(normalize(rec, f"{path}:{i}"))
    return Run(path, records, torn)


def threshold_of(r: dict) -> float | None:
    """The threshold a record was judged at; records from before the schema: the model's, if it says."""
    t = r.get("threshold")
    return t if t is not None else (r.get("model") or {}).get("score_threshold")


def borderline(run: Run, band: float) -> tuple[list[tuple[dict, dict]], list[dict]]:
    """False-call candidates. A detection is borderline when ``threshold <= score < threshold + band``;
    a failed board is a candidate when *all* its detections are borderline (its fail rests only on calls
    near the threshold). Returns ((record, detection) closest to the threshold first, candidate boards).
    A record without a known threshold is left out."""
    dets, boards = [], []
    for r in run.failed:
        thr = threshold_of(r)
        if thr is None:
            continue
        near = [d for d in r["detections"] if d["score"] < thr + band]
        dets += [(r, d) for d in near]
        if len(near) == len(r["detections"]):
            boards.append(r)
    dets.sort(key=lambda rd: rd[1]["score"] - threshold_of(rd[0]))
    return dets, boards


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v), max(1, math.ceil(len(v) * q / 100))) - 1]


def locate(file: str, images: Path | None) -> Path | None:
    """The image of a record: by name in ``images`` (``--images``) when given, else the path the app was
    given (absolute, or relative to the current folder, as the app was started)."""
    for p in ([images / Path(file).name] if images else []) + [Path(file)]:
        if p.is_file():
            return p
    return None


def thumbnail(path: Path, detections: list[dict], colors: dict[str, str], side: int = THUMB_SIDE) -> tuple[bytes, int]:
    """The image downscaled to ``side`` px (longest side) with each detection's box and id drawn: (JPEG, width).
    Boxes are x1 y1 x2 y2 in original image pixels; tiny ones are widened to ``MIN_BOX`` around their centre."""
    with Image.open(path) as im:
        w, h = im.size
        im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale (much faster on big boards)
        img = im.convert("RGB")
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    s = img.width / w
    pen, font = ImageDraw.Draw(img), ImageFont.load_default()
    for d in reversed(detections):  # the highest score drawn last, on top
        x1, y1, x2, y2 = (v * s for v in d["box"])
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        hw, hh = max(x2 - x1, MIN_BOX) / 2, max(y2 - y1, MIN_BOX) / 2
        color = colors.get(d["class"], "#ff0000")
        pen.rectangle([cx - hw, cy - hh, cx + hw, cy + hh], outline=color, width=2)
        pen.text((cx - hw, max(0, cy - hh - 11)), str(d["id"]), fill=color, font=font)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88, subsampling=0)  # 4:4:4: thin coloured boxes keep their colour
    return buf.getvalue(), img.width


def dets_text(dets: list[dict], most: int = 12) -> str:
    more = f", … {len(dets) - most} more" if len(dets) > most else ""
    return ", ".join(f"#{d['id']} {d['class']} {d['score']:.3f}" for d in dets[:most]) + more


def board_link(r: dict, anchors: dict[str, str]) -> str:
    a = anchors.get(r["file"])
    return f'<a href="#{a}">picture</a>' if a else "–"


def section_summary(run: Run, missing: int) -> str:
    ok, failed, errors = run.ok, run.failed, run.errors
    ms = [r["ms"] for r in ok if r["ms"] is not None]
    rate = f"{100 * len(failed) / len(ok):.1f} %" if ok else "–"
    thr = Counter(r["threshold"] for r in ok)
    out = ["<h2>Summary</h2>", cards([
        ("images", "images in the journal", len(run.records)), ("passed", "passed", len(ok) - len(failed)),
        ("failed", "failed (verdict fail)", len(failed)), ("errors", "not inspected (errors)", len(errors)),
        ("fail-rate", "failed / inspected", rate), ("ms-median", "median ms per image", fmt(percentile(ms, 50), 3)),
        ("ms-p95", "95th percentile ms", fmt(percentile(ms, 95), 3))])]
    out.append("<p class=note>Operating threshold used: " + esc(", ".join(
        f"{fmt(t)} ({n} image{'s' if n != 1 else ''})" for t, n in thr.most_common()) or "–")
               + f". Journal: <code>{esc(run.path)}</code>.</p>")
    if run.torn:
        out.append(f"<p class=warn data-key=torn>{len(run.torn)} journal line(s) torn by a kill and skipped "
                   f"(line {esc(', '.join(map(str, run.torn)))}); the app journals those images again at its next start.</p>")
    if missing:
        out.append(f"<p class=warn data-key=missing-images>{missing} failed board picture(s) not drawn: image file "
                   "not found. Give the folder the images are in with --images DIR.</p>")
    return "\n".join(out)


def section_classes(run: Run, colors: dict[str, str]) -> str:
    dets, boards = Counter(), Counter()
    for r in run.ok:
        for c, n in r["counts"].items():
            dets[c] += n
            boards[c] += n > 0
    rows, attrs = [], []
    for c in run.classes():
        rows.append([f'<span class=sw style="background:{colors[c]}"></span>{esc(c)}', dets[c], boards[c]])
        attrs.append(f'data-class="{esc(c)}" data-detections="{dets[c]}" data-boards="{boards[c]}"')
    return ("<h2>Detections per class</h2><p class=note>Detections at or above the threshold over all inspected "
            "images, and the number of boards with at least one.</p>"
            + table(["class", "detections", "boards"], rows, {1, 2}, 'id="classes"', attrs))


def section_failed(run: Run, anchors: dict[str, str]) -> str:
    rows, attrs = [], []
    for r in run.failed:
        found = ", ".join(f"{c} {n}" for c, n in r["counts"].items() if n)
        rows.append([f"<span class=mono>{esc(r['file'])}</span>", len(r["detections"]), esc(found),
                     fmt(r["detections"][0]["score"], 3), fmt(r["ms"], 4), board_link(r, anchors)])
        attrs.append(f'data-file="{esc(r["file"])}"')
    body = table(["board", "detections", "classes", "top score", "ms", ""], rows, {1, 3, 4}, 'id="failed"', attrs)
    return f"<h2>Failed boards ({len(rows)})</h2>" + (body if rows else "<p>None.</p>")


def section_borderline(run: Run, band: float, anchors: dict[str, str], limit: int = 100) -> str:
    dets, boards = borderline(run, band)
    out = [f"<h2>False-call candidates ({len(boards)} boards)</h2>", "<p class=note>"
           f"A detection is <b>borderline</b> when its score is at most {fmt(band)} above the operating threshold "
           f"(<code>threshold ≤ score &lt; threshold + {fmt(band)}</code>, <code>--band</code>). The threshold is set "
           "where few defects escape, so the calls just above it are the least certain ones: false calls (a clean "
           "spot called a defect) gather there, real defects mostly score far higher. A failed board whose "
           "<i>every</i> detection is borderline failed on uncertain calls alone: re-check these boards first; a "
           "board with one confident call fails anyway.</p>"]
    rows = [[f"<span class=mono>{esc(r['file'])}</span>", esc(dets_text(r["detections"])),
             fmt(threshold_of(r)), board_link(r, anchors)] for r in boards]
    out.append(table(["board", "its detections (#id class score)", "threshold", ""], rows, {2},
                     'id="candidates"', [f'data-file="{esc(r["file"])}"' for r in boards]) if rows else "<p>None.</p>")
    rows = [[f"<span class=mono>{esc(r['file'])}</span>", d["id"], esc(d["class"]), fmt(d["score"]),
             f"+{fmt(d['score'] - threshold_of(r), 3)}", esc(json.dumps(d["box"]))] for r, d in dets[:limit]]
    out.append(f"<p class=note>The borderline detections on all failed boards, closest to the threshold first "
               f"({len(dets)}{f', the first {limit} shown' if len(dets) > limit else ''}).</p>")
    out.append(table(["board", "id", "class", "score", "above threshold", "box x1 y1 x2 y2"], rows, {1, 3, 4},
                     'id="borderline"') if rows else "<p>None.</p>")
    return "\n".join(out)


def section_errors(run: Run) -> str:
    rows = [[f"<span class=mono>{esc(r['file'])}</span>", esc(r.get("error", ""))] for r in run.errors]
    return (f"<h2>Errors ({len(rows)})</h2><p class=note>Images the app could not inspect; each is journaled once "
            "and never retried.</p>" + (table(["image", "error"], rows, set(), 'id="errors"',
                                              [f'data-file="{esc(r["file"])}"' for r in run.errors]) if rows else "<p>None.</p>"))


def section_slowest(run: Run, n: int) -> str:
    slow = sorted((r for r in run.ok if r["ms"] is not None), key=lambda r: -r["ms"])[:n]
    rows = [[f"<span class=mono>{esc(r['file'])}</span>", fmt(r["ms"]), esc(r["verdict"]), len(r["detections"])]
            for r in slow]
    return (f"<h2>Slowest images</h2><p class=note><code>ms</code>: the image's latency from the start of its read "
            "to its detections.</p>" + table(["image", "ms", "verdict", "detections"], rows, {1, 3}, 'id="slowest"',
                                              [f'data-file="{esc(r["file"])}" data-ms="{r["ms"]}"' for r in slow]))


def section_pictures(figures: list[str], total: int, colors: dict[str, str]) -> str:
    more = f" The first {len(figures)} of {total} drawn (--max-pictures)." if len(figures) < total else ""
    legend = " ".join(f'<span class=sw style="background:{c}"></span>{esc(n)}' for n, c in colors.items())
    return ("<h2>Failed boards, pictured</h2><p class=note>Each failed board downscaled, its detections boxed in "
            f"their class colour (tiny defects get a box of at least {MIN_BOX} px) and numbered by id.{more}<br>"
            f"{legend}</p>"
            f'<div class="grid" id="pictures">{"".join(figures)}</div>')


def section_models(run: Run) -> str:
    groups: dict[str, list[dict]] = {}
    for r in run.records:
        groups.setdefault(json.dumps(r["model"], sort_keys=True), []).append(r)
    out = ["<h2>Model</h2><p class=note>The <code>model</code> block of the records: the registered version and "
           "what the export stored (git commit, params and data versions, threshold). More than one block means "
           "the model changed during the run; an empty one is an image journaled at a restart after a crash.</p>"]
    for key, recs in groups.items():
        rows = [[f"<code>{esc(k)}</code>", f"<span class=mono>{esc(v)}</span>"] for k, v in flatten(json.loads(key))]
        out.append(f"<p>{len(recs)} image(s), <code>{esc(recs[0]['file'])}</code> … <code>{esc(recs[-1]['file'])}</code></p>")
        out.append(table(["key", "value"], rows, set(), 'class="model"') if rows else "<p>(empty)</p>")
    return "\n".join(out)


def render(out_dir: str | Path, images: str | Path | None = None, band: float = 0.1, max_pictures: int = 48,
           slowest: int = 10) -> str:
    """The page for the folder run whose ``--out-dir`` is ``out_dir``; ``images``: where the images are
    when the paths in the records do not resolve from here."""
    run = read_journal(out_dir)
    colors = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(run.classes())}
    images = Path(images) if images else None
    figures, anchors, missing = [], {}, 0
    for r in run.failed[:max_pictures]:
        path = locate(r["file"], images)
        if path is None:
            missing += 1
            continue
        anchors[r["file"]] = a = f"p{len(figures)}"
        cap = f"<b class=mono>{esc(r['file'])}</b><br>{esc(dets_text(r['detections']))}"
        jpeg, width = thumbnail(path, r["detections"], colors)
        figures.append(figure(data_uri(jpeg, "image/jpeg"), cap, r["file"],
                              f'id="{a}" data-file="{esc(r["file"])}" style="width:{width}px"'))
    sections = [section_summary(run, missing), section_classes(run, colors), section_failed(run, anchors),
                section_borderline(run, band, anchors), section_errors(run), section_slowest(run, slowest),
                section_pictures(figures, len(run.failed), colors), section_models(run)]
    return page("edge", f"Inspection run: {Path(out_dir).resolve().name}",
                f"pcb-aoi-detect folder run, {len(run.records)} images, from {run.path}", sections)
