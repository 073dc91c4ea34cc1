"""INT8 formats side by side: accuracy and speed of each ``quantize.format`` against FP32, in one run.

Quantizes the pipeline's FP32 model (``models/model.onnx``) in every format with the quantize stage's
own code and settings (params.yaml ``quantize``, calibration on ``data/augmented``), then, on the test
split: mAP@0.5 and COCO mAP computed with ONNX Runtime, inference latency p50 / p99 at batch 1, and
stream FPS (images / wall time over the test images, the variants taking turns round by round so
that they share the machine's state). Every row names the CPU and its instruction sets.

``--emulate-cpu EPYC-Rome`` also scores the same files under ``qemu-x86_64 -cpu EPYC-Rome`` (Debian's
qemu-user): an x86 CPU with AVX2 and without AVX-512/VNNI, so ONNX Runtime picks the kernels such a CPU
gets and their int16 saturation shows. Emulated latency means nothing and is not reported.

    python benchmarks/int8_formats.py --out int8_formats.json
    python benchmarks/int8_formats.py --emulate-cpu EPYC-Rome --out int8_formats.json
    python benchmarks/int8_formats.py --onnx run/models/model.onnx --train run/data/augmented \\
        --clean run/data/clean --split run/data/split --params run/params.yaml
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pcb_aoi.edge import machine  # noqa: E402


def score_models(models: dict[str, str], clean: str, split: str, limit: int = 0) -> dict:
    """name -> {map50, map} on the test split (its first ``limit`` images when > 0) with ONNX Runtime,
    plus the CPU this process sees."""
    from pcb_aoi.data.dataset import Dataset, split_ids
    from pcb_aoi.edge.runtime import EdgeModel, ort_runner, ort_session
    from pcb_aoi.evaluation.evaluate import score

    ds, ids = Dataset.load(clean), split_ids(split, "test")
    ids = ids[:limit] if limit > 0 else ids
    out = {}
    for name, path in models.items():
        contract = EdgeModel(path).contract
        m, _ = score(ort_runner(ort_session(path)), ds, ids, tuple(contract["classes"]), contract["needs_template"], 0.5)
        out[name] = {"map50": m["map50"], "map": m["map"]}
    return {"machine": machine.describe(), "test_images": len(ids), "scores": out}


def time_models(models: dict[str, str], clean: str, split: str, rounds: int, warmup: int) -> dict:
    """name -> latency p50/p99 (ms, batch 1, inference only) and stream FPS over the test images."""
    from pcb_aoi.data.dataset import Dataset, split_ids
    from pcb_aoi.edge.contract import INPUT
    from pcb_aoi.edge.runtime import ort_session
    from pcb_aoi.model.inference import load_pair, prepare_input

    ds, ids = Dataset.load(clean), split_ids(split, "test")
    needs_template = json.loads(next(iter(_contracts(models).values())))["needs_template"]
    xs = [prepare_input(*load_pair(ds, r), needs_template)[None] for r in ds.rows(ids)]
    sessions = {k: ort_session(p, spin=False) for k, p in models.items()}
    for sess in sessions.values():
        for x in xs[:warmup]:
            sess.run(None, {INPUT: x})
    lat = {k: [] for k in sessions}
    wall = dict.fromkeys(sessions, 0.0)
    for _ in range(rounds):
        for k, sess in sessions.items():  # taking turns: drift in clock or load hits every variant alike
            t0 = time.perf_counter()
            for x in xs:
                t = time.perf_counter()
                sess.run(None, {INPUT: x})
                lat[k].append((time.perf_counter() - t) * 1e3)
            wall[k] += time.perf_counter() - t0
    return {k: {"ms_p50": round(float(np.percentile(v, 50)), 3), "ms_p99": round(float(np.percentile(v, 99)), 3),
                "stream_fps": round(len(v) / wall[k], 2), "images": len(v)} for k, v in lat.items()}


def _contracts(models: dict[str, str]) -> dict[str, str]:
    import onnx

    from pcb_aoi.edge.contract import CONTRACT_KEY

    return {k: next(p.value for p in onnx.load(p_, load_external_data=False).metadata_props if p.key == CONTRACT_KEY)
            for k, p_ in models.items()}


def emulated_scores(cpu: str, models: dict[str, str], clean: str, split: str, limit: int) -> dict:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("--emulate-cpu needs qemu-x86_64 (Debian: apt-get install qemu-user)")
    cmd = [qemu, "-cpu", cpu, sys.executable, __file__, "--score-only", json.dumps(models), "--clean", clean,
           "--split", split, "--limit", str(limit)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"emulated scoring failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", default="models/model.onnx", help="FP32 raw-output model (%(default)s)")
    ap.add_argument("--train", default="data/augmented", help="calibration images (%(default)s)")
    ap.add_argument("--clean", default="data/clean", help="clean dataset (%(default)s)")
    ap.add_argument("--split", default="data/split", help="folder with split.parquet (%(default)s)")
    ap.add_argument("--params", default="params.yaml", help="quantize settings come from here (%(default)s)")
    ap.add_argument("--formats", nargs="+", default=["u8s8", "u8s7", "u8u8"], help="%(default)s")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the test images (%(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed images per variant first (%(default)s)")
    ap.add_argument("--emulate-cpu", help="also score under qemu-x86_64 -cpu NAME (e.g. EPYC-Rome: AVX2, no VNNI)")
    ap.add_argument("--limit", type=int, default=0, help="score on the first N test images only, here and "
                    "emulated (0 = all; emulation runs about 100x slower)")
    ap.add_argument("--emulate-limit", type=int, default=0, help="a smaller N for the emulated scoring only")
    ap.add_argument("--keep", help="keep the INT8 files in this folder")
    ap.add_argument("--out", help="write the result as JSON here too")
    ap.add_argument("--score-only", help=argparse.SUPPRESS)  # JSON {name: path}: the emulated child's job
    args = ap.parse_args()
    if args.score_only:
        print(json.dumps(score_models(json.loads(args.score_only), args.clean, args.split, args.limit)))
        return

    from pcb_aoi.deploy.quantize import calibration_inputs, quantize
    from pcb_aoi.pipeline.config import load_params, to_dict

    base = load_params(args.params).quantize
    work = Path(args.keep or tempfile.mkdtemp(prefix="int8-formats-"))
    work.mkdir(parents=True, exist_ok=True)
    needs_template = json.loads(_contracts({"fp32": args.onnx})["fp32"])["needs_template"]
    inputs = calibration_inputs(args.train, base.calibration_images, needs_template)
    models = {"fp32": str(Path(args.onnx).resolve())}
    for fmt in args.formats:
        path = work / f"model.{fmt}.onnx"
        quantize(base.model_copy(update={"format": fmt}), Path(args.onnx), path, inputs)
        models[fmt] = str(path)
    here = score_models(models, args.clean, args.split, args.limit)
    timing = time_models(models, args.clean, args.split, args.rounds, args.warmup)
    result = {"machine": here["machine"], "test_images": here["test_images"], "quantize": to_dict(base),
              "rows": {k: {**here["scores"][k], **timing[k]} for k in models}}
    if args.emulate_cpu:
        emu = emulated_scores(args.emulate_cpu, models, args.clean, args.split, args.emulate_limit or args.limit)
        result["emulated"] = {"qemu_cpu": args.emulate_cpu, "machine": emu["machine"],
                              "test_images": emu["test_images"], "scores": emu["scores"]}
        if emu["test_images"] != here["test_images"]:  # compare like with like: the same images natively
            result["emulated"]["native_scores_same_images"] = score_models(
                models, args.clean, args.split, emu["test_images"])["scores"]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
