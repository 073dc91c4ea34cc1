"""DVC stage `augment`: bbox-safe albumentations on the training split (template transformed with the
test image); writes originals plus `augment.copies` augmented versions of each."""
import argparse
import sys
from pathlib import Path

# Import the library beside this file, not an installed copy: `dvc exp run --temp/--queue` runs the stage
# in a copy of the repo, and must run the copy's code (the code its dvc.lock records).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcb_aoi.data import augment
from pcb_aoi.pipeline.cli import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", required=True, help="clean dataset folder")
    ap.add_argument("--split", required=True, help="folder holding split.parquet")
    ap.add_argument("--out", required=True, help="augmented training dataset folder to write")
    run_stage(ap, lambda p, a: augment.run(p.augment, p.seed, a.src, a.split, a.out))
