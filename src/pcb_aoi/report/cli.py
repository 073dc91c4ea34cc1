"""pcb-aoi-report: one self-contained HTML page (no network access needed or made) that people look at.

    pcb-aoi-report edge OUT_DIR --out report.html          # a folder run of pcb-aoi-detect --watch IN --out-dir OUT_DIR
    pcb-aoi-report edge OUT_DIR --images IN --out report.html   # images looked up by name in IN
    pcb-aoi-report evaluate --reports reports --out report.html  # the evaluate stage's outputs

The page inlines its CSS and pictures (``data:`` URIs) and forbids any fetch (Content-Security-Policy), so
it can be mailed, archived or opened on a line PC without network. Exit codes: 0 written; 2 a user error
(no journal, no metrics.json, a record that is not a result record): nothing written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .page import ReportError, write_page


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pcb-aoi-report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="kind", required=True)
    e = sub.add_parser("edge", help="a folder run of pcb-aoi-detect (its --out-dir, holding results.jsonl)")
    e.add_argument("out_dir", type=Path, help="the --out-dir of the pcb-aoi-detect --watch run")
    e.add_argument("--images", type=Path, help="folder holding the images, when the paths in the records do not "
                   "resolve from the current folder (default: the paths as recorded)")
    e.add_argument("--band", type=float, default=0.1, help="false-call candidates: detections scoring less than this "
                   "above the threshold are borderline (%(default)s)")
    e.add_argument("--max-pictures", type=int, default=48, help="failed boards pictured, in journal order (%(default)s)")
    e.add_argument("--slowest", type=int, default=10, help="slowest images listed (%(default)s)")
    v = sub.add_parser("evaluate", help="the evaluate stage's outputs (metrics.json, operating_point.json, plots/)")
    v.add_argument("--reports", type=Path, default=Path("reports"), help="folder holding metrics.json, "
                   "operating_point.json and plots/ as the evaluate stage writes them (%(default)s)")
    v.add_argument("--max-pictures", type=int, default=24, help="overlay pictures per group (%(default)s)")
    for p in (e, v):
        p.add_argument("--out", type=Path, required=True, help="the HTML file to write (atomically)")
    args = ap.parse_args(argv)
    if args.kind == "edge" and not 0 <= args.band <= 1:
        ap.error(f"--band {args.band}: must be between 0 and 1 (a score difference)")
    if args.max_pictures < 0:
        ap.error("--max-pictures must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.kind == "edge":
            from .edge import render as render_edge
            text = render_edge(args.out_dir, args.images, args.band, args.max_pictures, args.slowest)
        else:
            from .evaluate import render as render_evaluate
            text = render_evaluate(args.reports, args.max_pictures)
    except ReportError as err:
        print(f"pcb-aoi-report: error: {err}", file=sys.stderr)
        return 2
    write_page(args.out, text)
    print(f"wrote {args.out} ({len(text.encode()) / 1e6:.2f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
