"""Cross-board estimate: a recipe trained and scored over folds, each fold tested on a board that no
choice has seen.

Boards are the dataset's board ids, sorted (DeepPCB: its seven groups). Fold k tests on board k and
validates on the next one (k+1, wrapping round): that board chooses the kept epoch, the operating
threshold and nothing else; every other board trains. Each fold is one `dvc exp run --queue`
experiment, `<name>-<test board>`, running the pipeline up to `evaluate` with the recipe's params
(`--preset`, from benchmarks/repro_timing.py) plus `split.test_groups` / `split.val_groups`.

When a fold's experiment finishes, its reports (metrics, operating point, train summary, split) go
to `<out>/<test board>.json`. Commit them as they come: a later run skips the folds already there, so
folds can span working sessions; a failed fold is reported and retried on the next run. After every
fold, `<out>/README.md` is rewritten: a table of per-fold and mean / worst DeepPCB AP, F-score and
escape rate at the automatic operating point, with the commit, the overrides and the machine.

    python benchmarks/cross_board.py --uri $PWD/../shared/datasets/deeppcb-trainval --folds 3 \\
        --set train.epochs=60 --name deeppcb-60ep       # queue, run one at a time, collect
    python benchmarks/cross_board.py --name deeppcb-60ep --table   # only rewrite the table

The experiments run the code of the commit at HEAD (a queued run sees what git tracks): commit first.
`dvc queue status` / `dvc queue logs <name>-<board>` follow a running fold.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from repro_timing import PRESETS  # noqa: E402

REPORTS = {"metrics": "reports/metrics.json", "operating_point": "reports/operating_point.json",
           "train": "reports/train.json", "split": "reports/split.json"}


def sh(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if check and r.returncode:
        raise SystemExit(f"error: cross_board: {' '.join(cmd[:4])} ... failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout


def boards_of(source: str, uri: str, board_regex: str = "") -> list[str]:
    """The dataset's board ids, sorted, read the way ingest reads them."""
    from pcb_aoi.data.readers import READERS

    if source not in READERS:
        raise SystemExit(f"error: cross_board: ingest.source={source} has no boards to fold over "
                         f"(readers: {', '.join(READERS)})")
    images, _ = READERS[source](Path(uri), board_regex)
    return sorted({row["board_id"] for row in images})


def plan(boards: list[str], folds: int) -> list[tuple[str, str]]:
    """(test board, validation board) per fold; the rest train."""
    if len(boards) < 3:
        raise SystemExit(f"error: cross_board: the dataset has {len(boards)} board(s) ({', '.join(boards)}); a fold "
                         "needs a test board, a validation board and at least one training board")
    if folds > len(boards):
        raise SystemExit(f"error: cross_board: --folds {folds} but the dataset has only {len(boards)} boards "
                         f"({', '.join(boards)}); each fold tests on a board of its own")
    return [(boards[k], boards[(k + 1) % len(boards)]) for k in range(folds)]


def overrides(preset: str, extra: list[str], uri: str, test: str, val: str) -> list[str]:
    return [*PRESETS[preset], *extra, f"ingest.uri={uri}", f"split.test_groups=['{test}']",
            f"split.val_groups=['{val}']"]


def exp_ref(name: str) -> str | None:
    """The git ref of a finished experiment called ``name``, if any."""
    refs = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps/").split()
    return next((r for r in refs if r.rsplit("/", 1)[-1] == name), None)


def queue_status() -> dict[str, str]:
    """Experiment name -> status (Queued, Running, Success, Failed) from `dvc queue status`."""
    out = {}
    for line in sh("dvc", "queue", "status", check=False).splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[-1] in ("Queued", "Running", "Success", "Failed"):
            out[parts[1]] = parts[-1]
    return out


def start_worker() -> None:
    """One queue worker (`dvc queue start -j 1`), detached: it runs the queued folds one after the other."""
    subprocess.Popen(["dvc", "queue", "start", "-j", "1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def collect(name: str, ref: str, test: str, val: str, args_over: list[str], out: Path) -> dict:
    reports = {k: json.loads(sh("git", "show", f"{ref}:{path}")) for k, path in REPORTS.items()}
    train = reports["train"]
    record = {"test_board": test, "val_board": val, "exp": name, "exp_commit": sh("git", "rev-parse", ref).strip(),
              "baseline": sh("git", "rev-parse", f"{ref}^").strip(), "overrides": args_over,
              "deeppcb": reports["metrics"]["deeppcb"],
              "coco": {k: reports["metrics"].get(k) for k in ("map50", "map33", "map")},
              "operating_point": reports["operating_point"],
              "train": {k: train.get(k) for k in ("epochs", "best_epoch", "val_map", "train_seconds",
                                                  "seconds_per_epoch", "precision", "machine")},
              "split": {k: {"boards": v.get("board_ids", v.get("boards")), "images": v.get("images")}
                        for k, v in reports["split"].items() if isinstance(v, dict) and "images" in v}}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{test}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out / f"{test}.json")
    return record


def fmt(v, digits=4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def effective(over: list[str]) -> list[str]:
    """``key=value`` overrides as DVC applies them (a later value of a key replaces the earlier one), without
    the per-fold keys."""
    kept = {}
    for o in over:
        key = o.split("=", 1)[0]
        if key not in ("split.test_groups", "split.val_groups", "ingest.uri"):
            kept.pop(key, None)
            kept[key] = o
    return list(kept.values())


def table(out: Path) -> str:
    """Markdown of every finished fold in ``out``, mean and worst; written to ``out/README.md``."""
    folds = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not folds:
        return ""
    rows = ["| test board | val board | DeepPCB AP | F-score | escape rate | false calls / image | threshold "
            "| COCO mAP@0.5 | kept epoch | training |", "|" + "---|" * 10]
    for f in folds:
        d, t = f["deeppcb"], f["train"]
        minutes = (t.get("train_seconds") or 0) / 60
        rows.append(f"| {f['test_board']} | {f['val_board']} | {fmt(d['ap'])} | {fmt(d['fscore'])} | "
                    f"{fmt(d['escape_rate'])} | {fmt(d['false_calls_per_image'], 2)} | {d['score_threshold']} | "
                    f"{fmt(f['coco']['map50'])} | {t['best_epoch']} of {t['epochs']} | {minutes:.0f} min |")
    for label, agg in (("mean", statistics.fmean), ("worst", None)):
        cells = []
        for key, worse in (("ap", min), ("fscore", min), ("escape_rate", max), ("false_calls_per_image", max)):
            vals = [f["deeppcb"][key] for f in folds if f["deeppcb"][key] is not None]
            cells.append(fmt(agg(vals) if agg else worse(vals), 2 if key == "false_calls_per_image" else 4))
        rows.append(f"| **{label}** | | **{cells[0]}** | **{cells[1]}** | **{cells[2]}** | {cells[3]} | | | | |")
    first = folds[0]
    machine = (first["train"].get("machine") or {})
    cpu = machine.get("cpu", machine) if isinstance(machine, dict) else machine
    text = "\n".join([
        f"# Cross-board estimate: {out.name}", "",
        f"{len(folds)} fold(s); each tests on a board no choice saw and validates (kept epoch, operating "
        "threshold) on another; DeepPCB's protocol at the automatic operating point "
        "(`evaluate.operating_point: auto`). Written by `benchmarks/cross_board.py`; one JSON per fold beside "
        "this file (reports, overrides, experiment commit).", "",
        *rows, "",
        f"Params (`-S`, the last value of a key wins; besides the fold's `split.test_groups` / `split.val_groups` "
        f"and `ingest.uri`): `{' '.join(effective(first['overrides']))}`",
        f"Baseline commit: `{first['baseline']}`. Machine: `{json.dumps(cpu)}`.", ""])
    (out / "README.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", help="the dataset (ingest.uri); required unless --table")
    ap.add_argument("--preset", default="deeppcb", choices=sorted(PRESETS), help="the recipe (benchmarks/repro_timing.py)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more params, as dvc exp run -S")
    ap.add_argument("--folds", type=int, help="number of folds (default: one per board)")
    ap.add_argument("--name", default="cv", help="experiment name prefix and folder name under --out-root")
    ap.add_argument("--out-root", type=Path, default=ROOT / "docs" / "cross-board", help="where fold JSONs go")
    ap.add_argument("--poll", type=float, default=30, help="seconds between queue checks")
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown table from the folds done")
    args = ap.parse_args(argv)
    out = args.out_root / args.name
    if args.table:
        print(table(out) or f"no folds in {out}")
        return
    if not args.uri:
        ap.error("--uri is required (the dataset to fold over)")
    uri = str(Path(args.uri).resolve())
    preset = dict(o.split("=", 1) for o in PRESETS[args.preset] + args.set)
    boards = boards_of(preset.get("ingest.source", "synthetic"), uri, preset.get("ingest.board_regex", ""))
    folds = plan(boards, args.folds or len(boards))
    print(f"cross_board: {len(boards)} boards ({', '.join(boards)}); folds (test, val): {folds}")
    if sh("git", "status", "--porcelain", "--untracked-files=no").strip():
        print("cross_board: warning: uncommitted changes; queued experiments run the commit at HEAD")
    todo = {}
    for test, val in folds:
        name = f"{args.name}-{test}"
        if (out / f"{test}.json").is_file():
            print(f"cross_board: {name}: done ({out / f'{test}.json'})")
            continue
        over = overrides(args.preset, args.set, uri, test, val)
        ref = exp_ref(name)
        if ref is None:
            sh("dvc", "exp", "run", "--queue", "-n", name, *[a for o in over for a in ("-S", o)], "evaluate")
            print(f"cross_board: {name}: queued")
        todo[name] = (test, val, over)
    if not todo:
        print(table(out))
        return
    start_worker()
    idle_polls = 0
    while todo:
        status = queue_status()
        idle = "Running" not in status.values() and any(status.get(n) == "Queued" for n in todo)
        idle_polls = idle_polls + 1 if idle else 0
        if idle_polls == 2:  # DVC's worker can exit after a task with more still queued: start another
            start_worker()
            idle_polls = 0
        for name, (test, val, over) in list(todo.items()):
            ref = exp_ref(name)
            if ref is not None:
                record = collect(name, ref, test, val, over, out)
                table(out)
                print(f"cross_board: {name}: AP {record['deeppcb']['ap']} F {record['deeppcb']['fscore']} "
                      f"escape {record['deeppcb']['escape_rate']} -> {out / f'{test}.json'}", flush=True)
                del todo[name]
            elif status.get(name) == "Failed":
                print(f"cross_board: {name}: failed; see `dvc queue logs {name}`; it is queued again next run",
                      flush=True)
                del todo[name]
        if todo:
            time.sleep(args.poll)
    print(table(out))


if __name__ == "__main__":
    main()
