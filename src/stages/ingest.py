"""DVC stage `ingest`: bring the configured source (params `ingest.*`) into a canonical dataset folder:
image files plus images.parquet / boxes.parquet manifests."""
import argparse
import sys
from pathlib import Path

# Import the library beside this file, not an installed copy: `dvc exp run --temp/--queue` runs the stage
# in a copy of the repo, and must run the copy's code (the code its dvc.lock records).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcb_aoi.data import ingest
from pcb_aoi.pipeline.cli import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="dataset folder to write, e.g. data/raw")
    run_stage(ap, lambda p, a: ingest.run(p.ingest, p.seed, p.classes, a.out))
