"""Wall time of a fresh `dvc repro` (per stage) and of a no-op `dvc repro`, with the resulting quality,
training time and peak memory, measured in one run.

Copies the project (dvc.yaml, params.yaml, src/) into a temporary git + DVC repo so the timing is
that of a fresh clone, not of a workspace with warm outputs. Params overrides use the `dvc exp run -S`
syntax; `--preset deeppcb` applies the DeepPCB recipe (the same `-S` list the README shows). Usage:

    python benchmarks/repro_timing.py [--out timing.json] [--keep]
    python benchmarks/repro_timing.py --preset deeppcb --set ingest.uri=$PWD/../shared/datasets/deeppcb-trainval
    python benchmarks/repro_timing.py --preset deeppcb-s8 --set ingest.uri=...   # stride 8: faster model
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

ROOT = Path(__file__).resolve().parents[1]

# The DeepPCB recipe: reference-based with registered templates (etl.register_max_px=8), 192 px crops
# holding defects, online flips/turns, scale and copper-width jitter, 160 epochs in bf16 mixed precision
# where the CPU or GPU computes bf16 natively, fp32 elsewhere (train.precision=auto), width 16 with blocks
# [1, 2, 3] (4.8 GFLOPs at 640 px, for the edge); one board group held out for test and one for validation
# by the default fractions (seed 0: test 20085, val 00041): the kept epoch and the INT8 gate are chosen on
# the validation board, so the test board's scores stay unseen.
PRESETS = {
    "deeppcb": ["ingest.source=deeppcb", "split.test_fraction=0.15", "train.epochs=160",
                "train.crop_size=192", "train.flip_rotate=true", "train.scale_jitter=0.15",
                "train.width_jitter=0.5", "train.model.width=16", "train.model.blocks=[1, 2, 3]",
                "train.precision=auto", "etl.register_max_px=8", "train.template_shift=3",
                # undilated blocks at /16: a receptive field small enough for the difference gate's tiles,
                # and percentile calibration, which its INT8 file needed (docs/gate.md)
                "train.model.dilated=false", "quantize.calibration=percentile"],
}
# The same at output stride 8 (fewer GFLOPs per 640 px pair, faster on the edge box), 80 epochs.
PRESETS["deeppcb-s8"] = ["train.epochs=80" if k.startswith("train.epochs=") else k for k in PRESETS["deeppcb"]] + [
    "train.model.stride=8"]


def apply_overrides(params: Path, overrides: list[str]) -> None:
    """`key.sub=value` (YAML value) into params.yaml, as `dvc exp run -S` does."""
    import yaml

    doc = yaml.safe_load(params.read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        node, *path = doc, *key.split(".")
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = yaml.safe_load(value)
    params.write_text(yaml.safe_dump(doc, sort_keys=False))


def sh(cwd: Path, *cmd: str) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


def timed_repro(repo: Path) -> tuple[float, dict[str, float]]:
    """Run `dvc repro`, streaming its output; returns (total s, seconds per stage)."""
    stages, current, t_stage = {}, None, None
    t0 = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if current:
                stages[current] = round(now - t_stage, 2)
            current, t_stage = line.split("'")[1], now
        sys.stderr.write(line)
    if proc.wait():
        raise SystemExit(f"dvc repro failed in {repo}")
    total = time.perf_counter() - t0
    if current:
        stages[current] = round(time.perf_counter() - t_stage, 2)
    return round(total, 2), stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the result as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary repo")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a params recipe, applied before --set")
    ap.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE",
                    help="params override, as `dvc exp run -S` (repeatable)")
    args = ap.parse_args()
    repo = Path(tempfile.mkdtemp(prefix="pcb-aoi-timing-"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    overrides = PRESETS.get(args.preset, []) + args.set
    apply_overrides(repo / "params.yaml", overrides)
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")  # dvclive needs a commit to exist
    sh(repo, "git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "timing")
    fresh, stages = timed_repro(repo)
    noop, _ = timed_repro(repo)
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    bench = json.loads((repo / "reports/benchmark.json").read_text())
    train = json.loads((repo / "reports/train.json").read_text())
    result = {"overrides": overrides, "fresh_repro_s": fresh, "noop_repro_s": noop, "stages_s": stages,
              "map50": metrics["map50"], "map33": metrics["map33"], "map": metrics["map"],
              "escape_rate": metrics["escape_rate"], "per_class": metrics["per_class"],
              "train": {k: train.get(k) for k in ("epochs", "best_epoch", "val_map", "val_map50", "seconds_per_epoch",
                                                  "train_seconds", "peak_rss_mb", "threads", "device", "precision",
                                                  "machine")},
              "ort_vs_torch_speedup": bench.get("ort_vs_torch_speedup")}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(repo)


if __name__ == "__main__":
    main()
