"""The folder watcher never stops: any error is one image's record, a kill is recovered without a loop.

Real ONNX Runtime sessions on the tiny exported model; the watcher runs as a subprocess where torch
cannot be imported, killed with real signals.
"""
import heapq
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from pcb_aoi.edge import app, folder, runtime
from pcb_aoi.edge.contract import INPUT
from pcb_aoi.edge.record import error_record
from test_edge import CHECK_IMPORTS, detect, drop_pair, models, no_torch_env, wait_for  # noqa: F401 (fixtures)

NARROW = 80  # px: padded to 96, the width the guarded model cannot run on


def model_failing_on_width(src: Path, dst: Path, padded_width: int) -> Path:
    """A copy of the exported model that ONNX Runtime cannot run on an input ``padded_width`` px wide.

    An extra output reshapes 6 zeros to [4] at that width (ONNX Runtime raises "cannot be reshaped"),
    to [6] at any other; the detections are the model's own."""
    m = onnx.load(str(src))
    g = m.graph
    g.initializer.extend([numpy_helper.from_array(np.zeros(6, np.float32), "guard_values"),
                          numpy_helper.from_array(np.array(3, np.int64), "guard_axis"),
                          numpy_helper.from_array(np.array(padded_width, np.int64), "guard_width"),
                          numpy_helper.from_array(np.array([4], np.int64), "guard_bad_shape"),
                          numpy_helper.from_array(np.array([6], np.int64), "guard_good_shape")])
    g.node.extend([helper.make_node("Shape", [INPUT], ["guard_shape"]),
                   helper.make_node("Gather", ["guard_shape", "guard_axis"], ["guard_w"]),  # (B, C, H, W)[3]
                   helper.make_node("Equal", ["guard_w", "guard_width"], ["guard_hit"]),
                   helper.make_node("Where", ["guard_hit", "guard_bad_shape", "guard_good_shape"], ["guard_to"]),
                   helper.make_node("Reshape", ["guard_values", "guard_to"], ["guard"])])
    g.output.append(helper.make_tensor_value_info("guard", TensorProto.FLOAT, [None]))
    onnx.save(m, str(dst))
    return dst


@pytest.fixture(scope="module")
def guarded(models, tmp_path_factory):
    """(guarded model path, clean dataset, (narrow test PNG bytes, its template's))."""
    _, _, e2e_path, ds = models
    path = model_failing_on_width(e2e_path, tmp_path_factory.mktemp("guarded") / "model.e2e.onnx", 96)
    row = ds.rows(ds.images.image_id[:1])[0]
    narrow = []
    for src in (row.path, row.template_path):
        buf = io.BytesIO()
        Image.fromarray(runtime.read_grey(ds.root / src)[:, :NARROW]).save(buf, format="PNG")
        narrow.append(buf.getvalue())
    return path, ds, tuple(narrow)


def journal_lines(out: Path) -> list[dict]:
    """results.jsonl as a reader on the line would parse it, skipping a line torn by a kill."""
    if not (out / "results.jsonl").exists():
        return []
    recs = []
    for line in (out / "results.jsonl").read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass
    return recs


def journal_count(out: Path) -> int:
    """Lines in results.jsonl, cheaply (the test's writer thread shares the GIL with this one)."""
    return (out / "results.jsonl").read_bytes().count(b"\n") if (out / "results.jsonl").exists() else 0


def names(recs: list[dict]) -> list[str]:
    return [Path(r["file"]).name for r in recs]


def start_watcher(env, model: Path, inbox: Path, out: Path, log: Path, *extra) -> subprocess.Popen:
    args = ["--model", model, "--watch", inbox, "--out-dir", out, "--poll", "0.05", *extra]
    return subprocess.Popen([sys.executable, "-c", CHECK_IMPORTS, *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "a"))


def stop_after_more_polls(proc: subprocess.Popen) -> None:
    """Let the watcher poll a while longer (nothing may be redone), then stop it as systemd would: exit 0."""
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def kill_mid_image(proc: subprocess.Popen, out: Path, timeout: float = 30.0) -> set[str]:
    """SIGKILL the watcher while ``inflight.json`` lists an image it has not journaled; those images' names.

    The watcher is frozen (SIGSTOP) while the two files are read, so what they say is what the kill leaves."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        proc.send_signal(signal.SIGSTOP)
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.001)  # the signal is delivered, the process not yet stopped
        try:
            started = {Path(f).name for f in json.loads((out / "inflight.json").read_text())["files"]}
        except (OSError, ValueError, KeyError):
            started = set()
        in_flight = started - set(names(journal_lines(out)))
        if in_flight:
            proc.kill()
            proc.wait(10)
            return in_flight
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    raise AssertionError("the watcher was never caught with an image in flight")


def test_files_mode_records_an_onnx_runtime_error_and_goes_on(guarded, models, no_torch_env, tmp_path):
    path, ds, (narrow_test, narrow_temp) = guarded
    rows = ds.rows(ds.images.image_id[:2])
    for i, row in enumerate(rows):
        drop_pair(ds, row, tmp_path, f"g{i}")
    (tmp_path / "narrow_test.png").write_bytes(narrow_test)
    (tmp_path / "narrow_temp.png").write_bytes(narrow_temp)
    images = [tmp_path / "g0_test.png", tmp_path / "narrow_test.png", tmp_path / "g1_test.png"]
    r = detect(no_torch_env, "--model", path, *images, "--out", tmp_path / "out.jsonl")
    assert r.returncode == 1, r.stderr
    assert "1 of 3 image(s) failed" in r.stderr and "Traceback" not in r.stderr
    recs = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert names(recs) == [p.name for p in images]
    assert recs[1]["status"] == "error" and recs[1]["error"].startswith("Fail: [ONNXRuntimeError]")
    assert "cannot be reshaped" in recs[1]["error"]
    plain = runtime.EdgeModel(models[2])  # the good images: the unguarded model's detections
    for rec, row in zip((recs[0], recs[2]), rows):
        expected = plain.detect(*runtime.read_pair(ds.root / row.path, ds.root / row.template_path))
        assert rec["status"] == "ok" and rec["detections"] == [{"id": i, **d.to_dict()} for i, d in enumerate(expected)] != []


def test_journal_skips_a_torn_line_and_journals_images_in_flight_once(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    a, b, c = ({"file": f"/in/{n}_test.png", "status": "ok", "detections": [], "ms": 1.0} for n in "abc")
    # a: journaled; b: its result file written, its journal line torn by the kill; c: killed while inspected
    (out / "results.jsonl").write_text(json.dumps(a) + "\n" + json.dumps(b)[:25])
    (out / "b_test.png.json").write_text(json.dumps(b))
    (out / "inflight.json").write_text(json.dumps({"files": [a["file"], b["file"], c["file"]]}))
    app.setup_logging()
    journal = app.Journal(out)
    err = capsys.readouterr().err
    assert "results.jsonl line 2 is torn" in err and "c_test.png: the process stopped" in err
    assert journal.done == {"a_test.png", "b_test.png", "c_test.png"}
    recs = journal_lines(out)
    assert recs[:2] == [a, b] and len(recs) == 3  # the torn line skipped, b's result taken from b_test.png.json
    assert recs[2] == error_record(c["file"], folder.STOPPED)
    assert json.loads((out / "c_test.png.json").read_text()) == recs[2]
    assert json.loads((out / "inflight.json").read_text()) == {"files": []}
    # Opening it again changes nothing; an image started and never finished is an error once.
    journal = app.Journal(out)
    journal.start(Path("/in/d_test.png"))
    app.Journal(out)
    app.Journal(out)
    recs = journal_lines(out)
    assert names(recs) == ["a_test.png", "b_test.png", "c_test.png", "d_test.png"]
    assert recs[3]["error"] == folder.STOPPED
    torn = re.findall(r"results.jsonl line (\d+) is torn", capsys.readouterr().err)
    assert torn == ["2", "2", "2"]  # the same line at each start: the lines after it are whole


def test_watcher_killed_mid_image_journals_it_once_and_goes_on(guarded, no_torch_env, tmp_path):
    path, ds, (narrow_test, narrow_temp) = guarded
    inbox, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "watch.log"
    inbox.mkdir()
    # 45 pairs (the tiny dataset's 15, each three times): a fast watcher still has images left to catch in flight
    rows = ds.rows(ds.images.image_id[:15]) * 3
    for i, row in enumerate(rows):
        drop_pair(ds, row, inbox, f"p{i:02d}")
    (inbox / "narrow_temp.png").write_bytes(narrow_temp)
    (inbox / "narrow_test.png").write_bytes(narrow_test)  # ONNX Runtime raises on it
    proc = start_watcher(no_torch_env, path, inbox, out, log, "--settle", "0.2")
    try:
        wait_for(lambda: len(journal_lines(out)) >= 3)
        in_flight = kill_mid_image(proc, out)
        killed_at = len(journal_lines(out))
        proc = start_watcher(no_torch_env, path, inbox, out, log, "--settle", "0.2")
        wait_for(lambda: len(journal_lines(out)) == len(rows) + 1)
        stop_after_more_polls(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    recs = journal_lines(out)
    by_name = {Path(r["file"]).name: r for r in recs}
    expected = [f"p{i:02d}_test.png" for i in range(len(rows))] + ["narrow_test.png"]
    assert sorted(names(recs)) == sorted(by_name) == sorted(expected)  # each once
    narrow = by_name["narrow_test.png"]
    assert narrow["status"] == "error" and "cannot be reshaped" in narrow["error"]
    stopped = {n for n, r in by_name.items() if r.get("error") == folder.STOPPED}
    assert stopped <= in_flight and len(in_flight) <= 2  # the image inspected and the one read ahead
    assert set(names(recs)[killed_at:killed_at + len(in_flight)]) == in_flight  # journaled first at the restart
    for n, r in by_name.items():
        assert r["status"] == "ok" or n == "narrow_test.png" or n in stopped, r
        assert json.loads((out / f"{n}.json").read_text()) == r
    text = log.read_text()
    assert "Traceback" not in text and "stopping after the current image" in text


class Writer(threading.Thread):
    """Drops files into a folder on a schedule, as the line would: ``at(t, fn)`` runs ``fn`` ``t`` s after start."""

    def __init__(self):
        super().__init__(daemon=True)
        self.todo, self.n = [], 0

    def at(self, t: float, fn) -> None:
        heapq.heappush(self.todo, (t, self.n, fn))
        self.n += 1

    def run(self) -> None:
        t0 = time.time()
        while self.todo:
            t, _, fn = heapq.heappop(self.todo)
            time.sleep(max(0.0, t0 + t - time.time()))
            fn()


def write(path: Path, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)


def drop(path: Path, data: bytes) -> None:
    """The safe way: written under a hidden .tmp name, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp, data)
    tmp.rename(path)


def test_soak_a_stream_with_bad_files_and_two_kills(guarded, no_torch_env, tmp_path):
    """Hundreds of pairs dropped over ~20 s, bad files among them, the watcher SIGKILLed twice mid-image:
    every image ends with exactly one journal line, ok for each good one (or the kill's error for an image
    in flight then), an error for each bad one."""
    path, ds, (narrow_test, narrow_temp) = guarded
    inbox, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "watch.log"
    inbox.mkdir()
    rows = ds.rows(ds.images.image_id)
    pairs = [((ds.root / r.path).read_bytes(), (ds.root / r.template_path).read_bytes()) for r in rows]
    settle, n, span = 1.0, 300, 20.0
    writer, good, bad, halves = Writer(), set(), {}, {}  # halves: name -> when each half was written
    for i in range(n):
        t, stem = span * i / n, f"s{i:03d}"
        test, temp = pairs[i % len(pairs)]
        kind = ["pair", "pair", "pair", "test_first", "in_two_parts", "pair", "corrupt", "pair", "zero_bytes",
                "pair"][i % 10] if i != n // 2 else "ort_error"
        if kind == "ort_error":
            test, temp = narrow_test, narrow_temp
        tst, tmp = inbox / f"{stem}_test.png", inbox / f"{stem}_temp.png"
        if kind == "test_first":  # the template comes after the test image has settled: --template-wait
            writer.at(t, lambda p=tst, d=test: write(p, d))
            writer.at(t + settle + 0.3, lambda p=tmp, d=temp: drop(p, d))
        elif kind == "in_two_parts":  # a pause shorter than --settle: never read half-written
            writer.at(t, lambda p=tmp, d=temp: drop(p, d))
            writer.at(t, lambda p=tst, d=test: (write(p, d[:len(d) // 2]),
                                                halves.setdefault(p.name, []).append(time.time())))
            writer.at(t + settle / 10, lambda p=tst, d=test: (write(p, d[len(d) // 2:], "ab"),
                                                             halves[p.name].append(time.time())))
        else:
            data = {"corrupt": test[:40] + b"garbage", "zero_bytes": b""}.get(kind, test)
            writer.at(t, lambda p=tmp, d=temp: drop(p, d))
            writer.at(t, lambda p=tst, d=data: drop(p, d))
        (good.add(tst.name) if kind in ("pair", "test_first", "in_two_parts") else bad.__setitem__(tst.name, kind))
    t0 = time.time()
    restarts, in_flight = 0, set()
    watch_args = ("--settle", str(settle), "--template-wait", "5", "--quiet", "--threads", "1")
    proc = start_watcher(no_torch_env, path, inbox, out, log, *watch_args)
    writer.start()
    try:
        for frac in (1 / 3, 2 / 3):  # two kills while the stream runs, each with an image in flight
            wait_for(lambda: journal_count(out) >= frac * n, timeout=90)
            in_flight |= kill_mid_image(proc, out)
            proc = start_watcher(no_torch_env, path, inbox, out, log, *watch_args)
            restarts += 1
        writer.join(60)
        wait_for(lambda: len(journal_lines(out)) >= n, timeout=90)
        stop_after_more_polls(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    wall = time.time() - t0
    # A half written, then the rest after a pause shorter than --settle: picked up whole. Unless the test's
    # writer thread was starved past --settle between the halves (a loaded machine): then either result.
    late = {k for k, (a, b) in halves.items() if b - a >= settle - 0.1}
    recs = journal_lines(out)
    by_name = {Path(r["file"]).name: r for r in recs}
    stopped = {k for k, r in by_name.items() if r.get("error") == folder.STOPPED}
    ok = sum(r["status"] == "ok" for r in recs)
    print(f"\nsoak: {n} images dropped ({len(good)} good, {len(bad)} bad), {ok} ok, {len(recs) - ok} errors "
          f"({len(stopped)} in flight at a kill), {restarts} restarts after SIGKILL, {wall:.1f} s; "
          f"{len(halves)} written in two parts, longest pause {max(b - a for a, b in halves.values()):.2f} s")
    assert len(recs) == len(by_name) == n and set(by_name) == good | set(bad)  # once each, nothing lost
    assert stopped <= in_flight and len(in_flight) <= 2 * restarts
    for name in good - stopped - late:
        assert by_name[name]["status"] == "ok", by_name[name]
    for name, kind in bad.items():
        rec = by_name[name]
        assert rec["status"] == "error", rec
        assert name in stopped or {"corrupt": "not a readable image", "zero_bytes": "not a readable image",
                                   "ort_error": "cannot be reshaped"}[kind] in rec["error"], rec
    for name, rec in by_name.items():
        assert json.loads((out / f"{name}.json").read_text()) == rec
    assert "Traceback" not in log.read_text()
