import subprocess
import sys

import pytest

from pcb_aoi.pipeline.config import ConfigError, load_params
from conftest import ROOT


def test_default_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.ingest.source == "synthetic"
    assert p.classes == ("open", "short", "mousebite", "spur", "copper", "pin-hole")


@pytest.mark.parametrize("over, key", [
    ({"train": {"epochz": 3}}, "train.epochz"),
    ({"train": {"epochs": "ten"}}, "train.epochs"),
    ({"train": {"epochs": True}}, "train.epochs"),
    ({"train": {"lr": -1.0}}, "train.lr"),
    ({"train": {"model": {"stride": 5}}}, "train.model.stride"),
    ({"train": {"model": {"blocks": [1, 2]}}}, "train.model.blocks"),
    ({"train": {"model": {"blocks": [1, -1, 2]}}}, "train.model.blocks"),
    ({"ingest": {"source": "sinthetic"}}, "ingest.source"),
    ({"ingest": {"synthetic": {"class_mix": {"scratch": 1.0}}}}, "ingest.synthetic.class_mix"),
    ({"ingest": {"synthetic": {"defects_per_image": [1]}}}, "ingest.synthetic.defects_per_image"),
    ({"split": {"test_fraction": 0.9}}, "split.val_fraction + split.test_fraction"),
])
def test_bad_params_name_the_key(tiny_params, over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("+", r"\+")):
        load_params(tiny_params(over))


def test_int_accepted_where_float_expected(tiny_params):
    assert load_params(tiny_params({"train": {"lr": 1}})).train.lr == 1.0


def test_stage_refuses_bad_params_before_any_work(tiny_params, tmp_path):
    params = tiny_params({"ingest": {"synthetic": {"boards": "many"}}})
    out = tmp_path / "raw"
    r = subprocess.run([sys.executable, str(ROOT / "src/stages/ingest.py"), "--params", str(params),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "ingest.synthetic.boards" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_stage_help_explains():
    r = subprocess.run([sys.executable, str(ROOT / "src/stages/train.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "dvclive" in r.stdout and "--params" in r.stdout
