"""The shared shell of every stage entry point: params, arguments, errors, summary report."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from ..data.dataset import write_json
from .config import ConfigError, Params, load_params

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def run_stage(parser: argparse.ArgumentParser, work: Callable[[Params, argparse.Namespace], dict]) -> None:
    """Parse arguments, validate params.yaml (before any work), run ``work``, write ``--report``.

    Any failure exits non-zero with a one-line ``error:`` message instead of a traceback (set
    PCB_AOI_DEBUG=1 for the traceback); outputs are written atomically by the library, so the
    previous results stay in place.
    """
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--report", help="write the stage summary as JSON here (a DVC metrics file)")
    args = parser.parse_args()
    name = parser.prog.removesuffix(".py")
    try:
        params = load_params(args.params)
        summary = work(params, args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        if os.environ.get("PCB_AOI_DEBUG"):
            raise
        kind = "params.yaml" if isinstance(e, ConfigError) else type(e).__name__
        print(f"error: {name}: {kind}: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    if args.report and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        write_json(args.report, summary)
    short = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    print(f"{name}: {json.dumps(short)}")
