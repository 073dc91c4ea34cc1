"""DVC stage `benchmark`: every deployable ONNX file (FP32, end-to-end, INT8) through the edge app's code,
and PyTorch eager: stream fps, latency p50/p95/p99, size, DeepPCB AP and mAP@0.5 on this machine, written
as DVC metrics with a `variants` list."""
import argparse
import sys
from pathlib import Path

# Import the library beside this file, not an installed copy: `dvc exp run --temp/--queue` runs the stage
# in a copy of the repo, and must run the copy's code (the code its dvc.lock records).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcb_aoi.deploy import benchmark
from pcb_aoi.pipeline.cli import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="checkpoint written by train")
    ap.add_argument("--onnx", required=True, help="ONNX model written by export_onnx")
    ap.add_argument("--e2e", help="end-to-end ONNX model written by export_onnx (benchmarked too when given)")
    ap.add_argument("--int8", help="INT8 ONNX model written by quantize (benchmarked too when given)")
    ap.add_argument("--clean", required=True, help="clean dataset folder")
    ap.add_argument("--split", required=True, help="folder holding split.parquet")
    ap.add_argument("--out", required=True, help="benchmark JSON to write")
    ap.add_argument("--train-report", help="train stage summary (seconds per epoch, peak memory) for compute sizing")
    ap.add_argument("--data", nargs="*", default=[], help="dataset folders whose size on disk to report")
    ap.add_argument("--plots", help="folder for the latency-vs-accuracy plot data")
    run_stage(ap, lambda p, a: benchmark.run(
        p.benchmark, benchmark.Inputs(a.model, a.onnx, a.clean, a.split, a.int8, a.train_report, tuple(a.data), a.e2e),
        a.out, train_step=benchmark.TrainStep(p.train.batch_size, p.train.crop_size), plots_dir=a.plots))
