"""DVC stage `etl`: decode every image to 8-bit grey, check every box (known class, inside the image,
not degenerate); rejected images are listed with the reason in the report."""
import argparse
import sys
from pathlib import Path

# Import the library beside this file, not an installed copy: `dvc exp run --temp/--queue` runs the stage
# in a copy of the repo, and must run the copy's code (the code its dvc.lock records).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcb_aoi.data import etl
from pcb_aoi.pipeline.cli import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", required=True, help="dataset folder written by ingest")
    ap.add_argument("--out", required=True, help="clean dataset folder to write")
    run_stage(ap, lambda p, a: etl.run(p.etl, p.classes, a.src, a.out))
