"""benchmarks/cross_board.py: the fold plan, and a dataset too small for the folds asked, refused before
anything is queued."""
import subprocess
import sys

import pytest

from conftest import ROOT
from test_readers import make_deeppcb

sys.path.insert(0, str(ROOT / "benchmarks"))
import cross_board  # noqa: E402


def test_each_fold_tests_one_board_and_validates_on_another():
    folds = cross_board.plan(["a", "b", "c", "d"], 4)
    assert folds == [("a", "b"), ("b", "c"), ("c", "d"), ("d", "a")]
    assert len({t for t, _ in folds}) == 4 and all(t != v for t, v in folds)
    over = cross_board.overrides("deeppcb", ["train.epochs=60"], "/data", "00041", "13000")
    assert over[-2:] == ["split.test_groups=['00041']", "split.val_groups=['13000']"]  # quoted: leading zeros kept
    assert "train.epochs=60" in over and "ingest.uri=/data" in over


@pytest.mark.parametrize("boards, folds, says", [
    (["a", "b"], 2, "the dataset has 2 board(s) (a, b); a fold needs a test board, a validation board"),
    (["a", "b", "c"], 4, "--folds 4 but the dataset has only 3 boards (a, b, c)"),
])
def test_too_few_boards(boards, folds, says):
    with pytest.raises(SystemExit) as e:
        cross_board.plan(boards, folds)
    assert says in str(e.value)


def test_the_script_stops_before_queueing_anything(tmp_path):
    root = make_deeppcb(tmp_path / "dp", {"000": "1 2 20 22 1\n"}, groups=("00001", "00002", "00003"))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/cross_board.py"), "--uri", str(root), "--folds", "4",
                        "--out-root", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert "error: cross_board: --folds 4 but the dataset has only 3 boards (00001, 00002, 00003)" in r.stderr
    assert "queued" not in r.stdout and not (tmp_path / "out").exists()


def test_table_has_every_fold_its_mean_and_worst(tmp_path):
    import json
    for board, ap, f, esc in (("a", 0.98, 0.97, 0.01), ("b", 0.96, 0.95, 0.03)):
        (tmp_path / f"{board}.json").write_text(json.dumps({
            "test_board": board, "val_board": "z", "overrides": ["train.epochs=160", "train.lr=0.01", "train.epochs=60", "split.test_groups=['a']"],
            "baseline": "abc", "deeppcb": {"ap": ap, "fscore": f, "escape_rate": esc, "false_calls_per_image": 0.5,
                                           "score_threshold": 0.4},
            "coco": {"map50": 0.9}, "train": {"epochs": 60, "best_epoch": 55, "train_seconds": 600, "machine": None}}))
    text = cross_board.table(tmp_path)
    assert "| a | z | 0.9800 | 0.9700 | 0.0100 |" in text and "| b | z | 0.9600 | 0.9500 | 0.0300 |" in text
    assert "| **mean** | | **0.9700** | **0.9600** | **0.0200** |" in text
    assert "| **worst** | | **0.9600** | **0.9500** | **0.0300** |" in text
    assert "`train.lr=0.01 train.epochs=60`" in text and (tmp_path / "README.md").read_text() == text
