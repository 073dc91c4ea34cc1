"""DVC stage `quantize`: the FP32 ONNX model as INT8 (ONNX Runtime static quantization, QDQ format),
calibrated on `quantize.calibration_images` training images; fails, keeping the previous INT8 file,
when test mAP@0.5 drops more than `quantize.max_map50_drop` below the FP32 model's."""
import argparse
import sys
from pathlib import Path

# Import the library beside this file, not an installed copy: `dvc exp run --temp/--queue` runs the stage
# in a copy of the repo, and must run the copy's code (the code its dvc.lock records).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcb_aoi.deploy import quantize
from pcb_aoi.pipeline.cli import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--onnx", required=True, help="FP32 ONNX model (raw outputs) written by export_onnx")
    ap.add_argument("--train", required=True, help="training images to calibrate on (the augmented dataset folder)")
    ap.add_argument("--clean", required=True, help="clean dataset folder (test images for the accuracy gate)")
    ap.add_argument("--split", required=True, help="folder holding split.parquet")
    ap.add_argument("--out", required=True, help="INT8 ONNX file to write")
    run_stage(ap, lambda p, a: quantize.run(p.quantize, a.onnx, a.train, a.clean, a.split, a.out, p.gate))
