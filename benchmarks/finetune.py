"""Fine-tuning vs training from scratch on a board the base model never saw (DeepPCB).

1. A base model is pretrained on the DeepPCB board groups except ``--board`` (all their images, or a
   seeded draw of ``--pretrain-images``), with the `deeppcb` recipe of benchmarks/repro_timing.py for
   ``--pretrain-epochs`` (no validation split: the last epoch is kept).
2. ``--shots`` images of ``--board`` (a seeded draw) train two models for ``--epochs`` epochs each, with
   the same params: one from the base model's weights (``train.init_from``), one from scratch.
3. The base model and both are scored on the board's other images (no choice is made on them: every
   run keeps its last epoch) with DeepPCB's protocol (``pcb_aoi.evaluation.evaluate.score``): AP from
   every detection, and F-score / escape rate / false calls at the fixed threshold ``--threshold``.

Everything runs through the library in a temp folder (``--work`` keeps and reuses ingest/etl there);
the JSON table goes to stdout and to ``--out``, with the machine and the wall time of each step.

    python benchmarks/finetune.py --uri ../shared/datasets/deeppcb-trainval --board 77000 \\
        --out docs/finetune/deeppcb-77000.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from repro_timing import PRESETS, apply_overrides  # noqa: E402


def subset(ds, ids: list[str], out: Path) -> Path:
    """A dataset folder holding only ``ids`` of ``ds`` (manifests only: absolute paths to ds's image files)."""
    from pcb_aoi.data.dataset import Dataset

    images = ds.images[ds.images["image_id"].isin(ids)].copy()
    for col in ("path", "template_path"):
        images[col] = [str(ds.root / p) if p else "" for p in images[col]]
    out.mkdir(parents=True, exist_ok=True)
    Dataset(out, images, ds.boxes[ds.boxes["image_id"].isin(ids)]).save(out)
    return out


def split_table(ids_by_split: dict[str, list[str]], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"image_id": i, "split": s} for s, ids in ids_by_split.items() for i in ids]
    pd.DataFrame(rows, columns=["image_id", "split"]).to_parquet(out / "split.parquet", index=False)
    return out


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, round(time.perf_counter() - t0, 1)


def score(model_path: Path, clean, test: list[str], threshold: float) -> dict:
    from pcb_aoi.evaluation.evaluate import score as score_model
    from pcb_aoi.model import checkpoint
    from pcb_aoi.model.inference import torch_runner

    model, ckpt = checkpoint.load(model_path)
    metrics, _ = score_model(torch_runner(model), clean, test, tuple(ckpt["classes"]),
                             ckpt["input_spec"]["use_template"], threshold)
    d = metrics["deeppcb"]
    return {"deeppcb_ap": d["ap"], "fscore": d["fscore"], "escape_rate": d["escape_rate"],
            "false_calls_per_image": d["false_calls_per_image"], "coco_map50": metrics["map50"],
            "coco_map": metrics["map"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", required=True, help="the DeepPCB folder (ingest.uri)")
    ap.add_argument("--board", default="77000", help="the board group left out of pretraining (default %(default)s)")
    ap.add_argument("--shots", type=int, default=50, help="images of the board that fine-tune (default %(default)s)")
    ap.add_argument("--base", type=Path, help="a pcb-aoi checkpoint to fine-tune from instead of pretraining one (e.g. "
                    "a cross-board fold's models/model.pt that never saw --board); the recipe's train.model must match")
    ap.add_argument("--base-note", default="", help="what --base is, for the JSON (e.g. 'fold 20085, 60 epochs')")
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--pretrain-images", type=int, default=0,
                    help="pretrain on a seeded draw of this many images of the other boards; 0 = all of them")
    ap.add_argument("--epochs", type=int, default=10, help="fine-tune and from-scratch epochs (default %(default)s)")
    ap.add_argument("--threshold", type=float, default=0.3, help="fixed score threshold of F-score and escapes")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more params, as dvc exp run -S")
    ap.add_argument("--work", type=Path, help="keep intermediate files here (ingest/etl reused); default: a temp folder")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)

    from pcb_aoi.data import etl, ingest
    from pcb_aoi.data.dataset import Dataset, write_json
    from pcb_aoi.edge import machine
    from pcb_aoi.model import training
    from pcb_aoi.pipeline.config import load_params

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="finetune-")
    work = (args.work or Path(tmp.name)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides = [*PRESETS["deeppcb"], f"ingest.uri={Path(args.uri).resolve()}", *args.set]
    params = work / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    apply_overrides(params, overrides)
    p = load_params(params)
    seconds = {}
    if not (work / "clean" / "images.parquet").is_file():
        _, seconds["ingest"] = timed(ingest.run, p.ingest, p.seed, p.classes, work / "raw")
        _, seconds["etl"] = timed(etl.run, p.etl, p.classes, work / "raw", work / "clean")
    clean = Dataset.load(work / "clean")
    boards = clean.images["board_id"].astype(str)
    target = sorted(b for b in boards.unique() if b.endswith(args.board))
    if len(target) != 1:
        raise SystemExit(f"error: finetune: --board {args.board} matches {target or 'no board'}; "
                         f"boards: {sorted(boards.unique())}")
    on_board = sorted(clean.images.loc[boards == target[0], "image_id"])
    rest = sorted(clean.images.loc[boards != target[0], "image_id"])
    if args.pretrain_images:
        rest = sorted(np.random.default_rng(p.seed + 1).permutation(rest)[:args.pretrain_images].tolist())
    if len(on_board) <= args.shots:
        raise SystemExit(f"error: finetune: board {target[0]} has {len(on_board)} images, --shots {args.shots} "
                         "leaves none to score on")
    draw = np.random.default_rng(p.seed).permutation(len(on_board))
    shots, test = [on_board[i] for i in draw[:args.shots]], [on_board[i] for i in draw[args.shots:]]
    no_val = split_table({"train": shots}, work / "split-noval")
    scoring = split_table({"test": test}, work / "split-test")

    def train(name: str, ids: list[str], epochs: int, init: Path | None = None) -> tuple[Path, dict]:
        cfg = p.train.model_copy(update={"epochs": epochs, "init_from": str(init) if init else "", "resume": False})
        out = work / name
        summary, s = timed(training.run, cfg, p.seed, p.classes, subset(clean, ids, out / "train"), work / "clean",
                           no_val, out / "model.pt", out / "live")
        seconds[name] = s
        return out / "model.pt", summary

    if args.base:  # given: scored as it is, its training is not this run's
        import hashlib
        base = args.base.resolve()
        base_run = {"train_seconds": None}
        seconds["base"] = {"path": str(base), "sha256": hashlib.sha256(base.read_bytes()).hexdigest(),
                           "note": args.base_note}
    else:
        base, base_run = train("pretrain", rest, args.pretrain_epochs)
    tuned, tuned_run = train("finetune", shots, args.epochs, base)
    scratch, scratch_run = train("scratch", shots, args.epochs)
    rows = {}
    for name, path, run, epochs, imgs in (("pretrained, not fine-tuned", base, base_run,
                                           None if args.base else args.pretrain_epochs, [] if args.base else rest),
                                          ("fine-tuned", tuned, tuned_run, args.epochs, shots),
                                          ("from scratch", scratch, scratch_run, args.epochs, shots)):
        scores, s = timed(score, path, clean, test, args.threshold)
        rows[name] = {**scores, "train_images": len(imgs), "epochs": epochs,
                      "train_seconds": None if run["train_seconds"] is None else round(run["train_seconds"], 1), "score_seconds": s}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "board": target[0], "pretrain_boards": sorted(set(boards) - set(target)), "shots": len(shots),
        "pretrain_images": None if args.base else len(rest), "base": seconds.get("base"), "test_images": len(test), "threshold": args.threshold, "results": rows,
        "init": {k: tuned_run[k] for k in ("init_sha256", "init_classes")},
        "seconds": seconds, "precision": tuned_run["precision"], "threads": tuned_run["threads"],
        "overrides": [*PRESETS["deeppcb"], *args.set], "commit": commit,
        "command": "python benchmarks/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine.describe(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_json(args.out, result)
    if tmp:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
