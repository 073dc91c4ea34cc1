"""DVC stage `train`: train the detector (params `train.*`) from scratch or from the checkpoint
`train.init_from` (fine-tuning; it must lie in --init-dir), validate on the val split, log curves
with dvclive, save the best epoch as a self-describing checkpoint and every epoch a resume point
(models/checkpoints/last.pt) that an interrupted `dvc repro` continues from.

Several processes (DistributedDataParallel): run this script under torchrun, or set
PCB_AOI_TORCHRUN to torchrun's options and this script launches itself through torchrun, e.g.
`PCB_AOI_TORCHRUN="--nproc-per-node 2" dvc repro` (2 CPU processes, gloo; one per GPU with NCCL)."""
import argparse
import os
import shlex
import sys
from pathlib import Path

# Import the library beside this file, not an installed copy: `dvc exp run --temp/--queue` runs the stage
# in a copy of the repo, and must run the copy's code (the code its dvc.lock records).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcb_aoi.model import training
from pcb_aoi.pipeline import tracking
from pcb_aoi.pipeline.cli import run_stage

if __name__ == "__main__":
    launcher = os.environ.get("PCB_AOI_TORCHRUN", "").strip()
    if launcher and "WORLD_SIZE" not in os.environ:
        from torch.distributed.run import main as torchrun

        try:
            torchrun([*shlex.split(launcher), __file__, *sys.argv[1:]])
        except Exception as e:  # the failing rank has printed its own `error:` line
            print(f"error: train: torchrun {launcher}: {type(e).__name__}", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="training dataset folder (augmented)")
    ap.add_argument("--clean", required=True, help="clean dataset folder (validation images)")
    ap.add_argument("--split", required=True, help="folder holding split.parquet")
    ap.add_argument("--model", required=True, help="checkpoint to write (best validated epoch)")
    ap.add_argument("--live", required=True, help="dvclive folder (learning curves)")
    ap.add_argument("--init-dir", help="folder train.init_from must lie in (a dep of this stage); default: anywhere")
    run_stage(ap, lambda p, a: tracking.tracked(  # MLflow, when MLFLOW_TRACKING_URI is set
        "train", {"seed": p.seed, "classes": p.classes, "train": p.train},
        lambda: training.run(p.train, p.seed, p.classes, a.train, a.clean, a.split, a.model, a.live, params=p,
                             init_within=a.init_dir)))
