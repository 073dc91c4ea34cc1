"""DVC stage `split`: train/val/test by board (no board in two splits), stratified by defect class."""
import argparse
import sys
from pathlib import Path

# Import the library beside this file, not an installed copy: `dvc exp run --temp/--queue` runs the stage
# in a copy of the repo, and must run the copy's code (the code its dvc.lock records).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcb_aoi.data import split
from pcb_aoi.pipeline.cli import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", required=True, help="clean dataset folder")
    ap.add_argument("--out", required=True, help="folder for split.parquet (image_id, board_id, split)")
    run_stage(ap, lambda p, a: split.run(p.split, p.seed, p.classes, a.src, a.out))
