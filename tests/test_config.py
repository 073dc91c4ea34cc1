import json
import subprocess
import sys

import pytest

from pcb_aoi.pipeline.config import ConfigError, SynthConfig, load_params, to_dict
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
    ({"etl": {"voc_size_mismatch": "scale"}}, "etl.voc_size_mismatch"),
    ({"ingest": {"synthetic": {"class_mix": {"scratch": 1.0}}}}, "ingest.synthetic.class_mix"),
    ({"ingest": {"synthetic": {"defects_per_image": [1]}}}, "ingest.synthetic.defects_per_image"),
    ({"split": {"test_fraction": 0.9}}, "split.val_fraction + split.test_fraction"),
    ({"split": {"test_fraction": 0}}, "split.test_fraction: 0 holds out no test boards"),  # was a ZeroDivisionError
])
def test_bad_params_name_the_key(tiny_params, over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("+", r"\+")):
        load_params(tiny_params(over))


def test_int_accepted_where_float_expected(tiny_params):
    p = load_params(tiny_params({"train": {"lr": 1}}))
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)
    assert json.dumps(to_dict(p.train)["lr"]) == "1.0"  # the resume fingerprint sees what it saw before


@pytest.mark.parametrize("over, message", [
    ({"train": {"model": {"blocks": [1, -1, 2]}}}, "train.model.blocks[1]: must be greater than or equal to 0, got -1"),
    ({"ingest": {"synthetic": {"class_mix": {"open": "lots"}}}},
     "ingest.synthetic.class_mix.open: expected a number, got 'lots' (str)"),
    ({"ingest": {"synthetic": {"jpeg_quality": [75, 100]}}},
     "ingest.synthetic.jpeg_quality[1]: must be less than or equal to 95, got 100"),
    ({"train": {"epochs": True}}, "train.epochs: expected an integer, got True (bool)"),
    ({"train": {"precision": "fp16"}}, "train.precision: 'fp16' is not allowed; expected one of 'auto', 'fp32' or 'bf16'"),
    ({"train": {"model": {"blocks": [1, 2]}}}, "train.model.blocks: expected a list of 3 values, got [1, 2]"),
    ({"benchmark": {"stream_pairs": 0}}, "benchmark.stream_pairs: must be greater than or equal to 1, got 0"),
    ({"benchmark": {"batch_size": 8}}, "benchmark.batch_size: unknown key; allowed under benchmark: warmup, runs, "
                                       "stream_pairs, threads"),
    ({"train": {"model": {"stryde": 4}}}, "train.model.stryde: unknown key; allowed under train.model: use_template, "
                                          "width, stride, blocks"),
])
def test_error_names_the_nested_key_the_value_and_what_is_allowed(tiny_params, over, message):
    with pytest.raises(ConfigError) as e:
        load_params(tiny_params(over))
    assert str(e.value).startswith(message)


def test_every_problem_is_listed_not_only_the_first(tiny_params):
    over = {"train": {"lr": "fast", "epochz": 3, "model": {"blocks": [1, 9, 2]}}, "split": {"test_fraction": 0.9},
            "ingest": {"source": "sinthetic"}}
    with pytest.raises(ConfigError) as e:
        load_params(tiny_params(over))
    head, *lines = str(e.value).splitlines()
    assert head == "5 problems:"
    for key in ("ingest.source: 'sinthetic'", "split.val_fraction + split.test_fraction", "train.lr: expected a number",
                "train.epochz: unknown key", "train.model.blocks[1]: must be less than or equal to 8, got 9"):
        assert sum(line.strip().startswith(key) for line in lines) == 1, (key, lines)


def test_sections_are_frozen_typed_and_validated_on_construction():
    cfg = SynthConfig(defects_per_image=(4, 6))
    assert cfg.defects_per_image == (4, 6) and cfg.model_copy(update={"boards": 3}).boards == 3
    with pytest.raises(ValueError):
        cfg.boards = 3
    with pytest.raises(ValueError, match="multiple of 32"):
        SynthConfig(image_size=100)


def test_default_params_types_and_plain_view():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p.train.model.blocks, tuple) and isinstance(p.ingest.synthetic.class_mix, dict)
    plain = to_dict(p)
    assert plain["train"]["model"]["blocks"] == list(p.train.model.blocks) and plain["classes"] == list(p.classes)


def test_stage_refuses_bad_params_before_any_work(tiny_params, tmp_path):
    params = tiny_params({"ingest": {"synthetic": {"boards": "many"}}})
    out = tmp_path / "raw"
    r = subprocess.run([sys.executable, str(ROOT / "src/stages/ingest.py"), "--params", str(params),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ingest: params.yaml: ingest.synthetic.boards: expected an integer, got 'many'")
    assert "ingest.synthetic.boards" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_stage_help_explains():
    r = subprocess.run([sys.executable, str(ROOT / "src/stages/train.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "dvclive" in r.stdout and "--params" in r.stdout


@pytest.mark.parametrize("split, message", [
    ({"val_groups": ["20085"], "test_groups": [20085]},
     "split.val_groups and split.test_groups both name board '20085': validation and test boards must be different"),
    ({"val_groups": ["00041"], "test_groups": [41]},  # YAML's 41 is the zero-padded DeepPCB group 00041
     "split.val_groups and split.test_groups both name board '00041'"),
    ({"strategy": "random", "val_groups": ["b1"]},
     "split.val_groups / split.test_groups name boards, but split.strategy: random splits images"),
    ({"strategy": "official", "test_groups": ["b1"]},
     "split.test_groups: not allowed with split.strategy: official (the test split is the source's test list)"),
    ({"val_fraction": 0}, "split.val_fraction: 0 (and no split.val_groups) leaves no validation split, so the "
                          "training epoch kept and the INT8 accuracy gate would be chosen on the test boards"),
    ({"val_groups": [True]}, "split.val_groups[0]: expected a string, got True (bool)"),
])
def test_split_rules_name_the_keys(tiny_params, split, message):
    with pytest.raises(ConfigError) as e:
        load_params(tiny_params({"split": split}))
    assert str(e.value).startswith(message), str(e.value)


def test_no_val_split_is_refused_for_a_real_source_too_and_allowed_only_when_asked(tiny_params):
    real = {"ingest": {"source": "deeppcb", "uri": "/data/DeepPCB"}}
    with pytest.raises(ConfigError, match=r"split\.allow_no_val: true"):
        load_params(tiny_params(real | {"split": {"val_fraction": 0}}))
    p = load_params(tiny_params(real | {"split": {"val_fraction": 0, "allow_no_val": True}}))
    assert p.split.val_fraction == 0 and p.split.allow_no_val
    # named boards replace the fractions they stand for: val_fraction 0 with val_groups, test_fraction 0 with test_groups
    p = load_params(tiny_params({"split": {"val_fraction": 0, "test_fraction": 0, "val_groups": [20085],
                                           "test_groups": ["00041"]}}))
    assert p.split.val_groups == ("20085",) and p.split.test_groups == ("00041",)  # ints become the strings they name
    assert load_params(ROOT / "params.yaml").split.model_dump() == {
        "strategy": "grouped", "val_fraction": 0.15, "test_fraction": 0.15, "val_groups": (), "test_groups": (),
        "allow_no_val": False}
