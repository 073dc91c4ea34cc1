import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parents[1]

# Small enough for seconds per stage, big enough for three boards per split.
TINY = {
    "ingest": {"synthetic": {"boards": 5, "images_per_board": 3, "image_size": 128}},
    "augment": {"copies": 1},
    "train": {"epochs": 2, "batch_size": 4, "crop_size": 64, "model": {"width": 8}},
    # a tiny model finds too few defects for evaluate.operating_point: auto's escape limit
    "evaluate": {"operating_point": "fixed"},
    "export": {"parity_images": 3},
    "quantize": {"calibration_images": 4},
    "benchmark": {"warmup": 1, "runs": 3, "stream_pairs": 8},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def write_params(path: Path, over: dict) -> Path:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    path.write_text(yaml.safe_dump(merge(base, over), sort_keys=False))
    return path


@pytest.fixture
def tiny_params(tmp_path):
    """A params.yaml with the TINY overrides; returns a callable for more overrides."""
    def make(over: dict | None = None) -> Path:
        return write_params(tmp_path / "params.yaml", merge(TINY, over or {}))
    return make


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The tiny pipeline's data stages run once through the library: raw, clean, split, augmented."""
    from pcb_aoi.data import augment, etl, ingest, split
    from pcb_aoi.pipeline.config import load_params

    d = tmp_path_factory.mktemp("tiny")
    p = load_params(write_params(d / "params.yaml", TINY))
    ingest.run(p.ingest, p.seed, p.classes, d / "raw")
    etl.run(p.etl, p.classes, d / "raw", d / "clean")
    split.run(p.split, p.seed, p.classes, d / "clean", d / "split")
    augment.run(p.augment, p.seed, d / "clean", d / "split", d / "augmented")
    return d, p


def copy_project(dst: Path) -> None:
    """The files a pipeline run needs, as a user's checkout would have them."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "src", dst / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # train.init_from's folder: always a dep of train (tracked by git through its README)
    shutil.copytree(ROOT / "models/init", dst / "models/init", ignore=shutil.ignore_patterns("*.pt", "*.json"))


def copy_plot_templates(dst: Path) -> None:
    """The project's custom plot templates (.dvc/plots), into a repository after its `dvc init`."""
    shutil.copytree(ROOT / ".dvc/plots", dst / ".dvc/plots")


AZURITE = ROOT / "node_modules" / ".bin" / "azurite-blob"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_connection_string(port: int, key: str = DEV_KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};"
            f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_azurite(port: int, location: Path):
    """Azurite's blob service on 127.0.0.1:``port`` keeping its data in ``location``; returns the process
    once the port accepts connections (skips the test when Azurite is not installed)."""
    import socket
    import subprocess
    import time

    if not AZURITE.exists():
        pytest.skip("Azurite not installed: run `npm install --no-save azurite@3` in the project root")
    proc = subprocess.Popen([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
                             str(location), "--silent", "--skipApiVersionCheck", "--disableTelemetry"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("Azurite did not start within 30 s")


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """A real Azure Blob endpoint: Azurite from npm (`npm install azurite`), on 127.0.0.1, stopped after."""
    port = free_port()
    proc = start_azurite(port, tmp_path_factory.mktemp("azurite"))
    yield azurite_connection_string(port)
    proc.terminate()
    proc.wait(timeout=10)
