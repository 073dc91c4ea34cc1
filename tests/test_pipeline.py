"""End to end: the real dvc.yaml in a temporary git + DVC repo, on tiny params."""
import json
import subprocess

import pytest
import yaml

from conftest import TINY, copy_plot_templates, copy_project, merge, write_params

TINY_CLASSES = ["open", "short", "mousebite", "spur", "copper", "pin-hole"]
# Ten epochs at a higher rate: the tiny model then learns enough for a floor on its test AP (below).
# Its validation split holds 3 images and 13 defects: one box moves mAP@0.5 by several points, so the
# INT8 gate gets a tolerance to match (test_quantize.py tests the gate itself).
PIPELINE = merge(TINY, {"train": {"epochs": 10, "lr": 0.01}, "quantize": {"max_map50_drop": 0.1}})
# DeepPCB AP of detections scattered at random is about 0.001 here; the tiny pipeline reaches about 0.1.
MIN_TINY_AP = 0.03
STAGES = ["ingest", "etl", "split", "augment", "train", "evaluate", "export_onnx", "quantize", "benchmark"]


def sh(repo, *cmd, check=True):
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def changed(repo) -> set[str]:
    return set(json.loads(sh(repo, "dvc", "status", "--json").stdout))


def set_params(repo, over):
    write_params(repo / "params.yaml", merge(PIPELINE, over))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    copy_project(repo)
    write_params(repo / "params.yaml", PIPELINE)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "t@example.com")
    sh(repo, "git", "config", "user.name", "test")
    sh(repo, "dvc", "init", "-q")
    copy_plot_templates(repo)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny pipeline")
    out = sh(repo, "dvc", "repro").stdout
    assert ran(out) == STAGES
    return repo


def test_repro_writes_every_report(repo):
    m = json.loads((repo / "reports/metrics.json").read_text())
    assert {"map", "map50", "map33", "per_class", "escape_rate"} <= set(m)
    assert set(m["per_class"]) == set(TINY_CLASSES) and 0 <= m["map"] <= m["map50"] <= m["map33"] <= 1
    assert m["deeppcb"]["ap"] >= MIN_TINY_AP, "the tiny pipeline did not learn"
    op = json.loads((repo / "reports/operating_point.json").read_text())
    assert op["score_threshold"] == m["score_threshold"] == m["deeppcb"]["score_threshold"] == 0.3
    ingest = json.loads((repo / "reports/ingest.json").read_text())
    assert ingest["images"] == 15 and ingest["boxes"] == sum(ingest["per_class"].values())
    bench = json.loads((repo / "reports/benchmark.json").read_text())
    dense = [v for v in bench["variants"] if v.get("gate") in (None, "none")]
    files = [v["file"] for v in dense]
    assert files[0] == "model.pt" and files[1:] == ["model.onnx", "model.e2e.onnx", "model.int8.onnx"] * len(bench["providers"])
    assert [v["format"] for v in dense[:4]] == ["fp32", "fp32", "fp32", "int8"]
    # the difference gate: the FP32 and INT8 files also run gated, with their accuracy (the contracts say
    # whether it ships: decided on validation by export_onnx and quantize)
    gated = [v for v in bench["variants"] if v.get("gate") == "tiles"]
    assert sorted(v["file"] for v in gated) == sorted(["model.onnx", "model.int8.onnx"] * len(bench["providers"]))
    assert all(0 <= v["deeppcb_ap"] <= 1 for v in gated)
    cpu = {v["file"]: v for v in dense if v["provider"] in ("CPUExecutionProvider", "torch-cpu")}  # ratios: dense rows
    assert bench["int8_vs_fp32_speedup"] == round(cpu["model.onnx"]["ms_p50"] / cpu["model.int8.onnx"]["ms_p50"], 3)
    assert bench["ort_vs_torch_speedup"] == round(cpu["model.pt"]["ms_p50"] / cpu["model.onnx"]["ms_p50"], 3)
    assert set(bench["gate_shipped"]) == {"model.onnx", "model.e2e.onnx", "model.int8.onnx"}
    assert {v["provider"] for v in bench["variants"][1:]} == set(bench["providers"]) >= {"CPUExecutionProvider"}
    for v in bench["variants"]:
        assert {"file", "format", "provider", "size_mb", "ms_p50", "ms_p95", "ms_p99", "fps", "stream_pairs", "wall_s",
                "deeppcb_ap", "deeppcb_fscore", "map50", "map", "threads"} <= set(v)
        assert v["ms_p99"] >= v["ms_p95"] >= v["ms_p50"] > 0
        # fps is measured: the stream's pairs (the tiny test split cycled up to stream_pairs) over its wall time
        assert v["stream_pairs"] == TINY["benchmark"]["stream_pairs"] > bench["test_images"]
        assert v["fps"] * v["wall_s"] == pytest.approx(v["stream_pairs"], rel=0.01)
    raw, e2e = bench["variants"][1], bench["variants"][2]  # the same detections: the same scores
    assert e2e["deeppcb_ap"] == pytest.approx(raw["deeppcb_ap"], abs=1e-6) and e2e["map50"] == pytest.approx(raw["map50"], abs=1e-6)
    assert bench["int8_format"] == "u8s7" and bench["int8_on_this_cpu"] in {"exact", "saturates", "unknown"}
    compute = bench["compute"]
    assert compute["parameters"] > 0 and compute["gflops"] > 0 and compute["train_step_memory"]["total_mb"] > compute["train_step_memory"]["weights_mb"]
    assert compute["seconds_per_epoch"] > 0 and compute["dataset_mb"]["clean"] > 0
    assert bench["cpu"] and bench["cpu"] != "unknown" and bench["cpu"] in compute["measured_on"]
    rows = (repo / "reports/benchmark/latency_map.csv").read_text().splitlines()
    assert rows[0] == "variant,ms_p50,fps,map50,deeppcb_ap" and len(rows) == 1 + len(bench["variants"])
    export = json.loads((repo / "reports/export.json").read_text())
    assert export["same_detections"] is True and export["end_to_end"]["same_detections"] is True
    quant = json.loads((repo / "reports/quantize.json").read_text())
    assert quant["map50_drop"] <= quant["max_map50_drop"]
    # the shipped files carry the operating point and the INT8 file its format (read back, not just present)
    from pcb_aoi.edge.runtime import EdgeModel
    for name, precision in (("model.onnx", "fp32"), ("model.e2e.onnx", "fp32"), ("model.int8.onnx", "int8")):
        info = EdgeModel(repo / "models" / name).info()
        assert info["precision"] == precision and info["score_threshold"] == op["score_threshold"], name
    assert EdgeModel(repo / "models/model.int8.onnx").info()["int8"]["format"] == quant["format"]
    # ... and where they came from: this commit, the data DVC locked, the metrics evaluate wrote
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    locked = {stage: next(o["md5"] for o in lock[stage]["outs"] if o["path"] == f"data/{name}")
              for stage, name in (("etl", "clean"), ("split", "split"), ("augment", "augmented"))}
    head = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()
    for name in ("model.onnx", "model.e2e.onnx", "model.int8.onnx"):
        prov = EdgeModel(repo / "models" / name).provenance()
        assert prov["commit"] == head and prov["dirty"] is False and prov["version"] == "unregistered", name
        assert prov["data"] == {"clean": locked["etl"], "split": locked["split"], "augmented": locked["augment"]}, name
        assert prov["metrics"]["deeppcb_ap"] == m["deeppcb"]["ap"] and prov["score_threshold"] == op["score_threshold"], name
    assert (repo / "reports/plots/confusion.csv").is_file()
    pr = (repo / "reports/plots/pr.csv").read_text().splitlines()
    assert pr[0] == "class,recall,precision" and {row.split(",")[0] for row in pr[1:]} <= set(TINY_CLASSES)
    assert (repo / "reports/live/plots/metrics/val/map50.tsv").is_file()


def test_gated_detections_around_defects_match_dense(repo):
    """The pipeline's trained model, gated with a receptive field's context (64 px), finds the defects'
    detections of the dense run again (tests/test_gate.py has the check)."""
    from test_gate import detections_around_defects_match_dense
    checked, tiled = detections_around_defects_match_dense(repo / "models/model.onnx", 64, boards=8, score=0.1)
    assert checked >= 8 and tiled >= 8


def test_second_repro_runs_nothing(repo):
    assert changed(repo) == set()
    assert ran(sh(repo, "dvc", "repro").stdout) == []


def test_dvc_plots_render(repo):
    sh(repo, "dvc", "plots", "show", "-o", "plots_html")
    html = (repo / "plots_html/index.html").read_text()
    assert "Precision-recall" in html and "Confusion matrix" in html and "Validation mAP" in html
    assert "Latency vs accuracy" in html
    # The PR plot draws one curve per class found in pr.csv: no list of classes in dvc.yaml.
    assert '"color": {"field": "class"' in html and '"class": "open"' in html


def edited(repo, path: str) -> set[str]:
    """The stages `dvc status` reports changed while ``path`` holds an edit (restored after)."""
    lib = repo / path
    original = lib.read_text()
    lib.write_text(original + "\n# edited\n")
    try:
        return changed(repo)
    finally:
        lib.write_text(original)


def test_deps_are_complete(repo):
    set_params(repo, {"seed": 1})
    assert changed(repo) == {"ingest", "split", "augment", "train"}  # every stage using the seed
    set_params(repo, {})
    assert edited(repo, "src/pcb_aoi/model/loss.py") == {"train"}  # and, through models/model.pt, what follows
    assert changed(repo) == set()


def test_an_edit_to_the_preprocessing_reruns_the_data_stages_that_use_it(repo):
    """etl registers and decodes with edge/preprocess.py (as the edge app does), and ingest decodes with it
    to find the same picture in two sources: an edit to it must make data/raw and data/clean stale, not
    only the model stages."""
    assert edited(repo, "src/pcb_aoi/edge/preprocess.py") == {
        "ingest", "etl", "augment", "train", "evaluate", "export_onnx", "quantize", "benchmark"}


def test_an_edit_to_the_benchmark_reruns_only_the_benchmark(repo):
    assert edited(repo, "src/pcb_aoi/deploy/benchmark.py") == {"benchmark"}
    assert changed(repo) == set()


def test_the_operating_point_reaches_the_models_through_its_file(repo):
    set_params(repo, {"evaluate": {"score_threshold": 0.4}})
    assert changed(repo) == {"evaluate"}  # export_onnx reads reports/operating_point.json, not the param
    assert ran(sh(repo, "dvc", "repro").stdout) == ["evaluate", "export_onnx", "quantize", "benchmark"]
    from pcb_aoi.edge.runtime import EdgeModel
    assert EdgeModel(repo / "models/model.e2e.onnx").contract["score_threshold"] == 0.4


def test_train_param_reruns_train_and_what_follows(repo):
    set_params(repo, {"train": {"epochs": 3}})
    assert ran(sh(repo, "dvc", "repro").stdout) == ["train", "evaluate", "export_onnx", "quantize", "benchmark"]
    assert json.loads((repo / "reports/train.json").read_text())["epochs"] == 3


def test_bad_param_fails_cleanly_and_keeps_outputs(repo):
    model = (repo / "models/model.pt").read_bytes()
    metrics = (repo / "reports/metrics.json").read_text()
    set_params(repo, {"train": {"lr": "fast"}, "evaluate": {"score_threshold": 0.4}})
    r = sh(repo, "dvc", "repro", check=False)
    assert r.returncode != 0
    assert "train.lr" in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert (repo / "models/model.pt").read_bytes() == model
    assert (repo / "reports/metrics.json").read_text() == metrics
    set_params(repo, {"train": {"epochs": 3}})
