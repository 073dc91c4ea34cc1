"""DVC stage `train`: train the detector from scratch (params `train.*`), validate every epoch on the
val split, log curves with dvclive and save the best epoch as a self-describing checkpoint."""
import argparse

from pcb_aoi import train
from pcb_aoi.cli import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", required=True, help="training dataset folder (augmented)")
    ap.add_argument("--clean", required=True, help="clean dataset folder (validation images)")
    ap.add_argument("--split", required=True, help="folder holding split.parquet")
    ap.add_argument("--model", required=True, help="checkpoint to write")
    ap.add_argument("--live", required=True, help="dvclive folder (learning curves)")
    run_stage(ap, lambda p, a: train.run(p.train, p.seed, p.classes, a.train, a.clean, a.split, a.model, a.live))
