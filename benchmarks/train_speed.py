"""Where a CPU training epoch of the DeepPCB recipe goes, and which step variants make it faster.

Three commands; run them as an AVX2-only CPU with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``
(oneDNN and ATen capped to AVX2: what a CPU without AVX-512 runs), or without them for this CPU:

    python benchmarks/train_speed.py prepare --uri ../shared/datasets/deeppcb-trainval --data /tmp/deeppcb
    python benchmarks/train_speed.py profile --data /tmp/deeppcb --out profile.json
    python benchmarks/train_speed.py variants --out variants.json

- ``prepare``: the data stages (ingest, etl, split, augment) through the library with the DeepPCB recipe's
  params (``benchmarks/repro_timing.py`` ``PRESETS["deeppcb"]``) into ``--data``; no DVC, no training.
- ``profile``: the training loop of ``pcb_aoi.model.training`` on those crops, its parts timed apart per step
  (waiting for the loader, forward, targets + losses, backward, gradient norm + AdamW + schedule), the crops'
  own CPU cost per batch, and torch.profiler's top operators by self CPU time.
- ``variants``: ms per training step of variants side by side in ONE process, taking turns round by round
  (eager, ``torch.compile``, contiguous instead of channels-last, 1 thread, a larger batch), on random
  crops; the compile time is reported apart, and the loss of the first steps of each variant against
  eager's from the same weights and batches.

Every output names the machine (``pcb_aoi.edge.machine``), the ISA caps in the environment and
``os.getloadavg()`` before and after: on a shared machine, compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pcb_aoi.edge import machine  # noqa: E402
from pcb_aoi.model.loss import box_loss, build_targets, focal_loss  # noqa: E402
from pcb_aoi.model.network import Detector, DetectorConfig  # noqa: E402


def environment() -> dict:
    """What a timing depends on besides the code: the machine, ISA caps, threads, load."""
    return {"machine": machine.describe(None), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_caps": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ},
            "loadavg_before": [round(v, 2) for v in os.getloadavg()]}


def recipe_params(workdir: Path, uri: str | None = None):
    """The DeepPCB recipe's params (params.yaml with ``PRESETS["deeppcb"]``), as the stages would read them."""
    from repro_timing import PRESETS, apply_overrides

    from pcb_aoi.pipeline.config import load_params

    params = workdir / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_overrides(params, PRESETS["deeppcb"] + ([f"ingest.uri={uri}"] if uri else []))
    return load_params(params)


def prepare(uri: str, data: Path) -> dict:
    """ingest -> etl -> split -> augment into ``data`` (raw, clean, split, augmented), as the pipeline would."""
    from pcb_aoi.data import augment, etl, ingest, split

    data.mkdir(parents=True, exist_ok=True)
    p = recipe_params(data, uri)
    t, times = time.perf_counter(), {}
    ingest.run(p.ingest, p.seed, p.classes, data / "raw")
    times["ingest"], t = time.perf_counter() - t, time.perf_counter()
    etl.run(p.etl, p.classes, data / "raw", data / "clean")
    times["etl"], t = time.perf_counter() - t, time.perf_counter()
    split.run(p.split, p.seed, p.classes, data / "clean", data / "split")
    times["split"], t = time.perf_counter() - t, time.perf_counter()
    augment.run(p.augment, p.seed, data / "clean", data / "split", data / "augmented")
    times["augment"] = time.perf_counter() - t
    return {k: round(v, 1) for k, v in times.items()}


# --- the training step, as pcb_aoi.model.training.train_one_epoch runs it (fp32), its parts timed apart ---

PHASES = ("data_wait", "forward", "targets_loss", "backward", "optimizer")


def timed_step(model, opt, sched, x, boxes, labels, classes: int, stride: int, memory_format, t: dict | None = None):
    """One step of ``train_one_epoch``: forward, float32 targets and losses, backward, gradient norm with the
    finiteness check, fused AdamW, one-cycle schedule. Adds the seconds of each part to ``t``; returns the loss."""
    t0 = time.perf_counter()
    heat_logits, pred_boxes = model(x.contiguous(memory_format=memory_format))
    t1 = time.perf_counter()
    h, w = heat_logits.shape[-2:]
    heat, target, weight = build_targets(boxes, labels, classes, h, w, stride)
    loss = focal_loss(heat_logits, heat) + 2.0 * box_loss(pred_boxes, target, weight)
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t3 = time.perf_counter()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        raise RuntimeError(f"loss {loss.item()}, gradient norm {grad_norm.item()}")
    opt.step()
    if sched is not None:
        sched.step()
    value = loss.item()
    t4 = time.perf_counter()
    if t is not None:
        for k, a, b in (("forward", t0, t1), ("targets_loss", t1, t2), ("backward", t2, t3), ("optimizer", t3, t4)):
            t[k] += b - a
    return value


def recipe_network(classes: int, seed: int = 0, memory_format=torch.channels_last) -> Detector:
    """The DeepPCB recipe's network (width 16, blocks [1, 2, 3], stride 4, test + template + difference)."""
    torch.manual_seed(seed)
    cfg = DetectorConfig(num_classes=classes, in_channels=3, width=16, stride=4, blocks=(1, 2, 3))
    return Detector(cfg).to(memory_format=memory_format).train()


def recipe_parts(data: Path, workers: int, batch: int | None = None):
    """The recipe's training crops and loader, built as ``training.build`` builds them (seed, epoch 0)."""
    from pcb_aoi.data.dataset import Dataset
    from pcb_aoi.model.crops import PairDataset, collate

    from pcb_aoi.pipeline.config import load_params

    p = load_params(data / "params.yaml")  # prepare's: the recipe's params
    c = p.train
    ds = PairDataset(Dataset.load(data / "augmented"), tuple(p.classes), c.model.use_template, c.crop_size, p.seed,
                     c.flip_rotate, c.scale_jitter, c.width_jitter, c.cache_mb, c.template_shift, c.background_crops)
    ds.set_epoch(0)
    bs = batch or c.batch_size
    gen = torch.Generator().manual_seed(p.seed)
    loader = torch.utils.data.DataLoader(ds, bs, shuffle=True, generator=gen, collate_fn=collate, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    return p, ds, loader


def top_ops(prof, n: int = 25) -> list[dict]:
    """torch.profiler's operators by self CPU time, with their share of the total self time."""
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in rows)
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "share": round(e.self_cpu_time_total / total, 4),
             "calls": e.count} for e in rows[:n]]


def profile(data: Path, steps: int, profiled: int, workers: int) -> dict:
    """Wall-clock split of ``steps`` training steps (0: one whole epoch) on the recipe's crops, the crops' own
    cost, then torch.profiler over ``profiled`` more steps."""
    from pcb_aoi.model.crops import collate

    result = environment()
    p, ds, loader = recipe_parts(data, workers)
    classes = len(p.classes)
    model = recipe_network(classes, p.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.train.lr, weight_decay=p.train.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, p.train.lr, total_steps=p.train.epochs * len(loader),
                                                pct_start=0.15)
    n = steps or len(loader)
    t = defaultdict(float)
    it = iter(loader)
    next(it)  # the loader's start (worker fork, first batch) is not a step
    t_epoch = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        x, boxes, labels = next(it)
        t["data_wait"] += time.perf_counter() - t0
        timed_step(model, opt, sched, x, boxes, labels, classes, 4, torch.channels_last, t)
    wall = time.perf_counter() - t_epoch
    # The crops alone, in this process, one batch at a time: the CPU work the loader process does per step.
    t0 = time.perf_counter()
    k = min(n, 20)
    for b in range(k):
        collate([ds[(b * p.train.batch_size + j) % len(ds)] for j in range(p.train.batch_size)])
    crops_ms = (time.perf_counter() - t0) / k * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profiled):
            x, boxes, labels = next(it)
            timed_step(model, opt, sched, x, boxes, labels, classes, 4, torch.channels_last)
    step_ms = {k: round(v / n * 1e3, 1) for k, v in t.items()}
    result.update({
        "recipe": {"batch": p.train.batch_size, "crop": p.train.crop_size, "width": 16, "blocks": [1, 2, 3],
                   "precision": "fp32", "workers": workers, "train_images": len(ds), "steps_per_epoch": len(loader)},
        "steps_timed": n, "wall_s": round(wall, 1), "ms_per_step": round(wall / n * 1e3, 1),
        "epoch_s_estimate": round(wall / n * len(loader), 1),
        "split_ms_per_step": step_ms,
        "split_share": {k: round(v / wall, 3) for k, v in t.items()},
        "crops_ms_per_batch_one_process": round(crops_ms, 1),
        "profiled_steps": profiled, "top_ops_self_cpu": top_ops(prof),
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    })
    return result


# --- step variants side by side ---

VARIANTS = {  # name -> how it differs from the training loop as it is (eager, channels-last, all threads)
    "eager": {},
    "compile": {"compile": True},
    "contiguous": {"memory_format": "contiguous"},
    "threads1": {"threads": 1},
    "batch16": {"batch": 16},
}


def random_batches(n: int, batch: int, crop: int, classes: int, seed: int = 0) -> list:
    """Random crops with 1-7 random boxes each (no dataset needed), as ``benchmarks/train_step.py`` makes."""
    from train_step import random_batch

    gen = torch.Generator().manual_seed(seed)
    return [random_batch(batch, crop, classes, gen) for _ in range(n)]


def variants(names: list[str], data: Path | None, steps: int, rounds: int, check_steps: int, workers: int) -> dict:
    """ms per step of each variant, taking turns round by round; the first ``check_steps`` of each run from the
    same weights on the same batches, their losses compared with eager's; compile time apart."""
    result = environment()
    classes, crop, base_batch = 6, 192, 8
    threads = torch.get_num_threads()
    loaders, fixed = {}, {}
    for name in names:
        batch = VARIANTS[name].get("batch", base_batch)
        if data is not None:  # the recipe's crops through its own loader: the step includes waiting for data
            _, _, loaders[name] = recipe_parts(data, workers, batch)
            loaders[name] = iter(loaders[name])
        if batch not in fixed:
            fixed[batch] = random_batches(check_steps + 4, batch, crop, classes)
    init = recipe_network(classes).state_dict()
    runs = {}
    for name in names:
        v = VARIANTS[name]
        fmt = torch.contiguous_format if v.get("memory_format") == "contiguous" else torch.channels_last
        net = recipe_network(classes, memory_format=fmt)
        net.load_state_dict(init)
        model = torch.compile(net) if v.get("compile") else net
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4, fused=True)
        runs[name] = {"model": model, "opt": opt, "fmt": fmt, "batch": v.get("batch", base_batch),
                      "threads": v.get("threads", threads), "times": [], "first_steps_s": [], "losses": []}

    def one(r, name, i, src):
        if name in loaders and src is None:
            x, boxes, labels = next(loaders[name])
        else:
            x, boxes, labels = src[i % len(src)]
        return timed_step(r["model"], r["opt"], None, x, boxes, labels, classes, 4, r["fmt"])

    for name, r in runs.items():  # same weights, same batches: the losses of the first steps, compile included
        torch.set_num_threads(r["threads"])
        for i in range(check_steps):
            t0 = time.perf_counter()
            r["losses"].append(one(r, name, i, fixed[r["batch"]]))
            r["first_steps_s"].append(round(time.perf_counter() - t0, 2))
    for _ in range(rounds):
        for name, r in runs.items():
            torch.set_num_threads(r["threads"])
            src = None if data is not None else fixed[r["batch"]]
            t0 = time.perf_counter()
            for i in range(steps):
                one(r, name, i, src)
            r["times"].append((time.perf_counter() - t0) / steps)
    torch.set_num_threads(threads)
    base = runs["eager"] if "eager" in runs else next(iter(runs.values()))
    out = {}
    for name, r in runs.items():
        ms = 1e3 * min(r["times"])  # the best round: least disturbed by other work
        ms_rounds = [round(1e3 * t, 1) for t in r["times"]]
        same_batch = r["batch"] == base["batch"]
        out[name] = {**VARIANTS[name], "batch": r["batch"], "ms_per_step": round(ms, 1), "ms_rounds": ms_rounds,
                     "ms_per_image": round(ms / r["batch"], 2),
                     "time_vs_eager_per_image": round((ms / r["batch"]) / (1e3 * min(base["times"]) / base["batch"]), 3),
                     "first_steps_s": r["first_steps_s"], "losses": [round(v, 6) for v in r["losses"]],
                     "max_rel_loss_diff_vs_eager": (max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
                                                    if same_batch else None)}
    result.update({"data": "recipe crops via its loader" if data is not None else "random crops, no loader",
                   "workers": workers if data is not None else None, "crop": crop, "steps": steps, "rounds": rounds,
                   "check_steps": check_steps, "variants": out,
                   "loadavg_after": [round(v, 2) for v in os.getloadavg()]})
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="the data stages with the DeepPCB recipe's params")
    a.add_argument("--uri", required=True, help="the DeepPCB folder (ingest.uri)")
    a.add_argument("--data", type=Path, required=True, help="where raw/, clean/, split/, augmented/ go")
    a = sub.add_parser("profile", help="where a training epoch's time goes")
    a.add_argument("--data", type=Path, required=True, help="prepare's folder")
    a.add_argument("--steps", type=int, default=0, help="steps timed; 0 = one epoch (%(default)s)")
    a.add_argument("--profiled", type=int, default=10, help="steps under torch.profiler after them (%(default)s)")
    a.add_argument("--workers", type=int, default=1, help="loader processes, train.workers (%(default)s)")
    a.add_argument("--threads", type=int, default=0, help="torch threads, train.threads; 0 = all cores (%(default)s)")
    a = sub.add_parser("variants", help="step variants side by side")
    a.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    a.add_argument("--data", type=Path, help="prepare's folder: the recipe's crops via its loader (else random)")
    a.add_argument("--workers", type=int, default=1, help="loader processes with --data (%(default)s)")
    a.add_argument("--steps", type=int, default=10, help="timed steps per variant and round (%(default)s)")
    a.add_argument("--rounds", type=int, default=3, help="rounds, variants taking turns (%(default)s)")
    a.add_argument("--check-steps", type=int, default=3, help="first steps whose losses are compared (%(default)s)")
    for a in sub.choices.values():
        a.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        result = {"seconds": prepare(args.uri, args.data), "data": str(args.data)}
    elif args.cmd == "profile":
        if args.threads:
            torch.set_num_threads(args.threads)
        result = profile(args.data, args.steps, args.profiled, args.workers)
    else:
        names = [n for n in args.variants.split(",") if n]
        bad = [n for n in names if n not in VARIANTS]
        if bad:
            raise SystemExit(f"error: --variants: unknown {', '.join(bad)} (known: {', '.join(VARIANTS)})")
        result = variants(names, args.data, args.steps, args.rounds, args.check_steps, args.workers)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
