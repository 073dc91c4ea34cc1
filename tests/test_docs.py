"""docs/architecture.md names only what exists: every repository path and every ``pcb_aoi.*`` symbol it
puts in backticks (a rename that forgets the doc fails here)."""
import dataclasses
import importlib
import re

import pytest

from conftest import ROOT

DOC = ROOT / "docs/architecture.md"
SPANS = re.findall(r"`([^`\n]+)`", DOC.read_text())
PATHS = sorted({m for s in SPANS for m in re.findall(r"(?:src|tests|docs|benchmarks|azureml|\.dvc)/[\w./-]+", s)
                if "<" not in s})
SYMBOLS = sorted({m for s in SPANS for m in re.findall(r"\bpcb_aoi(?:\.\w+)+", s)})


def _fields(obj) -> set[str]:
    """Field names of a dataclass or a pydantic model class (the config sections), else none."""
    if dataclasses.is_dataclass(obj):
        return {f.name for f in dataclasses.fields(obj)}
    return set(getattr(obj, "model_fields", None) or ()) if isinstance(obj, type) else set()


def resolve(dotted: str):
    """The object ``dotted`` names: the longest importable module prefix, then attributes (dataclass
    and pydantic model fields count)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            if name in _fields(obj):
                obj = None
                continue
            obj = getattr(obj, name)  # AttributeError: the doc names something that does not exist
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_doc_names_paths_and_symbols():
    assert len(PATHS) >= 10 and len(SYMBOLS) >= 20, "the patterns below found less than the doc holds"


@pytest.mark.parametrize("path", PATHS)
def test_every_path_exists(path):
    assert (ROOT / path).exists(), f"{DOC.name} names {path}, which does not exist"


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_every_symbol_exists(symbol):
    resolve(symbol)


def test_a_name_that_does_not_exist_fails():
    with pytest.raises(AttributeError):
        resolve("pcb_aoi.edge.contract.NO_SUCH_NAME")
    with pytest.raises(AttributeError):
        resolve("pcb_aoi.no_such_package.x")


def test_a_config_field_resolves():
    assert resolve("pcb_aoi.pipeline.config.TrainConfig.epochs") is None  # a pydantic field, not an attribute
    with pytest.raises(AttributeError):
        resolve("pcb_aoi.pipeline.config.TrainConfig.epochz")
