"""DVC stage `evaluate`: choose the operating threshold on the validation split (`evaluate.operating_point`:
fixed or auto), then score the checkpoint on the test split: DeepPCB's protocol (AP, precision, recall,
F-score, escapes and false calls at the threshold), COCO mAP, mAP@0.5, AP@0.33, per-class AP50/recall;
PR curves, confusion matrix and overlay pictures of true and predicted defects (a fixed sample and the
worst misses / false alarms) as DVC plots."""
import argparse
import sys
from pathlib import Path

# Import the library beside this file, not an installed copy: `dvc exp run --temp/--queue` runs the stage
# in a copy of the repo, and must run the copy's code (the code its dvc.lock records).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcb_aoi.evaluation import evaluate
from pcb_aoi.pipeline import tracking
from pcb_aoi.pipeline.cli import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="checkpoint written by train")
    ap.add_argument("--clean", required=True, help="clean dataset folder")
    ap.add_argument("--split", required=True, help="folder holding split.parquet")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--plots", required=True, help="folder for PR-curve and confusion-matrix data and overlays/")
    ap.add_argument("--operating-point", required=True,
                    help="JSON to write: the operating threshold, how and on which split it was chosen")
    run_stage(ap, lambda p, a: tracking.tracked(  # MLflow, when MLFLOW_TRACKING_URI is set
        "evaluate", {"classes": p.classes, "evaluate": p.evaluate},
        lambda: evaluate.run(p.evaluate, a.model, a.clean, a.split, a.metrics, a.plots, a.operating_point,
                             classes=p.classes)))
