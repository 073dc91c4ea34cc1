"""Folder mode of ``pcb-aoi-detect``: inspect every image that appears in a folder once, journaled so
that a restart (also after a kill) never redoes or loses an image. The rules are in ``app``'s module
docstring (what ``--help`` prints). Torch-free.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

from .inspector import IMAGE_SUFFIXES, Inspector, find_template, is_template_name, log, write_atomic
from .record import error_record
from .runtime import EdgeError

PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", "~")
JOURNAL = "results.jsonl"
INFLIGHT = "inflight.json"
STOPPED = "the process stopped while inspecting this image (killed or crashed); not retried"




class Journal:
    """Folder mode's record of work, in ``out_dir``: ``results.jsonl``, one complete line per finished image
    (what it lists is never redone), and ``inflight.json``, the images started and not yet journaled.

    Opening it finishes what a killed run left: each image in ``inflight.json`` without a journal line is
    journaled once (its ``<name>.json`` if written, else an error, ``STOPPED``); see the module docstring."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.path, self.done = out_dir, out_dir / JOURNAL, set()
        self.inflight: dict[str, str] = {}  # name -> path, in the order started
        if self.path.exists():
            raw = self.path.read_bytes()
            for i, line in enumerate(raw.splitlines(), 1):
                try:
                    self.done.add(Path(json.loads(line)["file"]).name)
                except (ValueError, KeyError, TypeError):
                    if line.strip():
                        log.warning("warning: %s line %d is torn (the process stopped while writing it); "
                                    "skipped", self.path, i)
            if raw and not raw.endswith(b"\n"):
                with open(self.path, "ab") as f:
                    f.write(b"\n")
        self._recover()

    def _recover(self) -> None:
        path = self.out_dir / INFLIGHT
        try:
            started = json.loads(path.read_text())["files"] if path.exists() else []
        except (ValueError, KeyError, TypeError, OSError) as e:  # written atomically: only if edited by hand
            log.warning("warning: %s unreadable (%s); images in flight before the restart are not known", path, e)
            started = []
        for file in started:
            name = Path(file).name
            if name in self.done:
                continue
            record = None
            try:  # the per-image result is written before the journal line: a stop in between left it
                record = json.loads((self.out_dir / f"{name}.json").read_text())
                if Path(record["file"]).name != name or record["status"] not in ("ok", "error"):
                    record = None
            except (OSError, ValueError, KeyError, TypeError):
                pass
            if record is None:
                log.error("error: %s: %s", file, STOPPED)
                record = error_record(file, STOPPED)
                write_atomic(self.out_dir / f"{name}.json", (json.dumps(record, indent=1) + "\n").encode())
            else:
                log.warning("warning: %s: finished before the process stopped; journaled from %s.json", file, name)
            self.add(record)
        self._write_inflight()

    def _write_inflight(self) -> None:
        write_atomic(self.out_dir / INFLIGHT, json.dumps({"files": list(self.inflight.values())}).encode())

    def start(self, image: Path) -> None:
        """``image`` is about to be read and inspected: listed in ``inflight.json`` (fsynced) first."""
        self.inflight = {n: f for n, f in self.inflight.items() if n not in self.done}  # finished: dropped here
        self.inflight[image.name] = str(image)
        self._write_inflight()

    def release(self) -> None:
        """Stopping cleanly: the image read ahead and not inspected is no longer in flight (the next run does it)."""
        self.inflight = {}
        self._write_inflight()

    def add(self, record: dict) -> None:
        with open(self.path, "ab") as f:
            f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.done.add(Path(record["file"]).name)


def candidates(in_dir: Path) -> list[Path]:
    out = []
    for p in sorted(in_dir.iterdir()):
        if (p.name.startswith(".") or p.name.endswith(PARTIAL_SUFFIXES) or p.suffix.lower() not in IMAGE_SUFFIXES
                or is_template_name(p) or not p.is_file()):
            continue
        out.append(p)
    return out


def watch(inspector: Inspector, in_dir: Path, out_dir: Path, args: argparse.Namespace) -> int:
    if not in_dir.is_dir():
        raise EdgeError(f"{in_dir}: watch folder not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(out_dir)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("%s: stopping after the current image", signal.Signals(signum).name)
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    log.info("watching %s -> %s (%d image(s) already done)", in_dir, out_dir, len(journal.done))
    seen: dict[str, tuple] = {}  # name -> (size, mtime_ns) at the last poll
    waiting: dict[str, float] = {}  # name -> when it started waiting for its template
    processed = 0
    while not stop.is_set():
        now, ready = time.time(), []
        for p in candidates(in_dir):
            if p.name in journal.done:
                continue
            try:
                st = p.stat()
            except OSError:  # renamed or deleted between listing and stat (or unreadable: try again later)
                continue
            sig, prev = (st.st_size, st.st_mtime_ns), seen.get(p.name)
            seen[p.name] = sig
            if sig != prev or now - st.st_mtime < args.settle:
                continue  # still being written (or just arrived): look again next poll
            if inspector.model.needs_template and not args.template and not args.template_dir:
                tpl = find_template(p, None, None)
                if tpl is not None and not tpl.is_file() and now - waiting.setdefault(p.name, now) < args.template_wait:
                    continue  # the pair's template may still be on its way
            ready.append(p)
        records = inspector.process_all(ready, on_start=journal.start)
        try:
            for p, record in zip(ready, records):
                write_atomic(out_dir / f"{p.name}.json", (json.dumps(record, indent=1) + "\n").encode())
                journal.add(record)  # after the result file: a restart after a kill in between journals that
                processed += 1
                if stop.is_set():
                    break
        finally:
            records.close()  # waits for the reader thread
        if stop.is_set():
            journal.release()  # the image read ahead is not journaled: the next run does it
        stop.wait(args.poll)
    log.info("stopped; %d image(s) processed in this run", processed)
    return 0


