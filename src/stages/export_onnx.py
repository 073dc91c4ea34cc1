"""DVC stage `export_onnx`: export the checkpoint to ONNX twice (raw maps, and end to end with decoding
and NMS in the graph), both with dynamic batch and the preprocessing contract as metadata; run
onnx.checker, and fail unless ONNX Runtime matches PyTorch on held-out test images (raw outputs within
`export.parity_atol`, same detections). The difference gate (`gate`) is decided on validation and
written into both contracts. The default score threshold stored in the metadata is
the operating point the evaluate stage chose (`--operating-point`, reports/operating_point.json); the
provenance in the metadata carries evaluate's headline test metrics (`--metrics`, reports/metrics.json)."""
import argparse
import sys
from pathlib import Path

# Import the library beside this file, not an installed copy: `dvc exp run --temp/--queue` runs the stage
# in a copy of the repo, and must run the copy's code (the code its dvc.lock records).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcb_aoi.data.dataset import read_json, split_ids, test_ids
from pcb_aoi.deploy import export
from pcb_aoi.pipeline.cli import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="checkpoint written by train")
    ap.add_argument("--clean", required=True, help="clean dataset folder")
    ap.add_argument("--split", required=True, help="folder holding split.parquet (parity uses test images)")
    ap.add_argument("--out", required=True, help="ONNX file to write (raw heatmap and box maps)")
    ap.add_argument("--out-e2e", help="ONNX file to write with decoding + NMS in the graph (final detections)")
    ap.add_argument("--operating-point", required=True,
                    help="operating_point.json written by evaluate: its score_threshold is the models' default")
    ap.add_argument("--metrics", help="metrics.json written by evaluate: headline test metrics for the provenance")
    # the difference gate is decided on validation (test only without a val split, as the INT8 gate)
    gate_ids = lambda a: ("val", split_ids(a.split, "val")) if split_ids(a.split, "val") else ("test", test_ids(a.split))  # noqa: E731
    run_stage(ap, lambda p, a: export.run(p.export, a.model, a.clean, test_ids(a.split), a.out, a.out_e2e,
                                          read_json(a.operating_point, "score_threshold"),
                                          evaluate=read_json(a.metrics, None) if a.metrics else None,
                                          gate=p.gate, gate_ids=gate_ids(a)))
