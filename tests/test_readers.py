"""Real-data readers and sources on small datasets the tests write, plus ../shared when present."""
import hashlib
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pcb_aoi.data import etl, ingest, sources
from pcb_aoi.data.dataset import IMAGE_COLUMNS, Dataset
from pcb_aoi.data.readers import DataError
from pcb_aoi.data.split import assign
from pcb_aoi.pipeline.config import CLASSES, EtlConfig, IngestConfig, SplitConfig

from conftest import ROOT, write_params

SHARED = ROOT.parent / "shared" / "datasets"


def _img(path: Path, w=64, h=48, value=255):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((h, w), value, np.uint8)
    a[5:9, 5:9] = (hash(path.name) % 200)  # distinct bytes per file: no accidental duplicates
    Image.fromarray(a).save(path)


def make_deeppcb(root: Path, labels: dict[str, str], groups=("00001",)) -> Path:
    for g in groups:
        for stem, text in labels.items():
            stem = g + stem
            _img(root / f"PCBData/group{g}/{g}/{stem}_test.jpg")
            _img(root / f"PCBData/group{g}/{g}/{stem}_temp.jpg")
            (root / f"PCBData/group{g}/{g}_not").mkdir(parents=True, exist_ok=True)
            (root / f"PCBData/group{g}/{g}_not/{stem}.txt").write_text(text)
    return root


def read(source, root, **kw):
    ds = ingest.ingest_folder(IngestConfig(source=source, uri=str(root), **kw), CLASSES, Path(root),
                              _fresh(Path(root).parent / "out"))
    ds.save(ds.root)
    return ds


def _fresh(p: Path) -> Path:
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir()
    return p


def test_deeppcb_reader(tmp_path):
    root = make_deeppcb(tmp_path / "dp", {"000": "1 2 20 22 1\n30 30 40 44 6\n", "001": "5,5,15,15,3"})
    (root / "PCBData/trainval.txt").write_text("group00001/00001/00001000.jpg group00001/00001_not/00001000.txt")
    ds = read("deeppcb", root)
    assert list(ds.boxes.class_name) == ["open", "pin-hole", "mousebite"]
    assert ds.images.set_index("image_id").loc["00001000", "source_split"] == "trainval"
    assert (ds.images.board_id == "00001").all() and (ds.images.width == 64).all()
    assert all((ds.root / p).is_file() for p in ds.images.template_path)
    # every pair complete: the manifest has the canonical columns only
    assert pd.read_parquet(ds.root / "images.parquet").columns.tolist() == IMAGE_COLUMNS


def test_deeppcb_pair_without_its_template_is_rejected_by_etl_naming_the_expected_file(tmp_path):
    root = make_deeppcb(tmp_path / "dp", {"000": "1 2 20 22 1", "001": "5 5 15 15 3"})
    missing = root / "PCBData/group00001/00001/00001001_temp.jpg"
    missing.unlink()
    ds = read("deeppcb", root)
    report = _etl(tmp_path, ds)
    assert report["rejected"] == [{"image_id": "00001001", "file": "images/00001001_test.jpg",
                                   "reason": f"template missing: {missing}"}]
    clean = Dataset.load(tmp_path / "clean")
    assert clean.images.image_id.tolist() == ["00001000"] and clean.boxes.image_id.tolist() == ["00001000"]
    assert pd.read_parquet(tmp_path / "clean/images.parquet").columns.tolist() == IMAGE_COLUMNS + ["content_hash"]


def test_deeppcb_list_lines_naming_no_pair_are_reported_and_a_list_naming_none_stops_ingest(tmp_path):
    root = make_deeppcb(tmp_path / "dp", {"000": "1 2 20 22 1", "001": "5 5 15 15 3"})
    (root / "PCBData/trainval.txt").write_text("group00001/00001/00001000.jpg group00001/00001_not/00001000.txt\n"
                                               "\n"
                                               "group00001/00001/00001077.jpg group00001/00001_not/00001077.txt\n")
    report = ingest.run(IngestConfig(source="deeppcb", uri=str(root)), 0, CLASSES, tmp_path / "raw")
    assert report["list_lines_missing"] == ["PCBData/trainval.txt:3: group00001/00001/00001077.jpg"]
    assert report["list_lines_missing_count"] == 1 and report["images"] == 2
    raw = Dataset.load(tmp_path / "raw").images.set_index("image_id").source_split
    assert raw.to_dict() == {"00001000": "trainval", "00001001": ""}
    # a list that names no pair of this copy: the stage stops naming the list, and writes nothing
    (root / "PCBData/test.txt").write_text("group00009/00009/00009000.jpg group00009/00009_not/00009000.txt\n")
    with pytest.raises(DataError, match=r"PCBData/test.txt: none of its 1 lines names a pair under .*00009000_test"):
        ingest.run(IngestConfig(source="deeppcb", uri=str(root)), 0, CLASSES, tmp_path / "raw2")
    assert not (tmp_path / "raw2").exists()
    params = write_params(tmp_path / "params.yaml", {"ingest": {"source": "deeppcb", "uri": str(root)}})
    stage = subprocess.run([sys.executable, str(ROOT / "src/stages/ingest.py"), "--params", str(params),
                            "--out", str(tmp_path / "raw3"), "--report", str(tmp_path / "ingest.json")],
                           capture_output=True, text=True)
    assert stage.returncode == 1 and "test.txt: none of its 1 lines" in stage.stderr, stage.stderr
    assert not (tmp_path / "raw3").exists() and not (tmp_path / "ingest.json").exists()


@pytest.mark.parametrize("label, message", [
    ("1 2 x 22 1", "00001000.txt:1: non-numeric"),
    ("1 2 3 4 1\n20 2 10 22 2", "00001000.txt:2: x2 <= x1"),
    ("1 2 20 22 9", "00001000.txt:1: unknown class id 9"),
    ("1 2 20 22", "00001000.txt:1: expected 5 values"),
])
def test_deeppcb_bad_label_lines_name_file_and_line(tmp_path, label, message):
    root = make_deeppcb(tmp_path / "dp", {"000": label})
    with pytest.raises(DataError, match=message):
        read("deeppcb", root)


def test_deeppcb_label_without_image_and_image_without_label(tmp_path):
    root = make_deeppcb(tmp_path / "dp", {"000": "1 2 20 22 1"})
    (root / "PCBData/group00001/00001_not/00001099.txt").write_text("1 2 20 22 1")
    with pytest.raises(DataError, match="00001099.txt: label without image"):
        read("deeppcb", root)
    (root / "PCBData/group00001/00001_not/00001099.txt").unlink()
    _img(root / "PCBData/group00001/00001/00001098_test.jpg")
    with pytest.raises(DataError, match="00001098_test.jpg: image without label"):
        read("deeppcb", root)


VOC = """<annotation><filename>{name}</filename><path>/home/someone/else/{name}</path>
<size><width>64</width><height>48</height><depth>3</depth></size>
<object><name>{cls}</name><bndbox><xmin>{x1}</xmin><ymin>4</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
</annotation>"""


def make_voc(root: Path, cls="mouse_bite", x1="2") -> Path:
    _img(root / "images/Mouse_bite/01_mouse_bite_01.jpg")
    (root / "Annotations/Mouse_bite").mkdir(parents=True)
    (root / "Annotations/Mouse_bite/01_mouse_bite_01.xml").write_text(
        VOC.format(name="01_mouse_bite_01.jpg", cls=cls, x1=x1))
    return root


def test_voc_reader_maps_classes_and_boards(tmp_path):
    root = make_voc(tmp_path / "voc")
    ds = read("voc", root, class_map={"mouse_bite": "mousebite"}, board_regex=r"^(\d+)_")
    assert ds.boxes.iloc[0][["class_name", "x1", "y1", "x2", "y2"]].tolist() == ["mousebite", 2, 4, 20, 30]
    assert ds.images.board_id.tolist() == ["01"] and ds.images.template_path.tolist() == [""]


def _declare_size(root: Path, w, h) -> None:
    xml = root / "Annotations/Mouse_bite/01_mouse_bite_01.xml"
    xml.write_text(re.sub(r"<width>.*</height>", f"<width>{w}</width><height>{h}</height>", xml.read_text()))


def test_voc_size_other_than_the_image_rejects_it_or_rescales_its_boxes(tmp_path):
    root = make_voc(tmp_path / "voc")  # the image is 64x48
    _declare_size(root, 128, 96)  # boxes drawn on a copy twice as large
    ds = read("voc", root, class_map={"mouse_bite": "mousebite"})
    report = _etl(tmp_path, ds)
    assert report["images"] == 0 and report["rejected"][0]["reason"].startswith(
        "images/01_mouse_bite_01_test.jpg: the VOC <size> says 128x96, the image is 64x48")
    report = _etl(tmp_path, ds, voc_size_mismatch="rescale")
    assert report["rejected_images"] == 0 and report["voc_size_rescaled_images"] == 1
    assert report["voc_size_rescales"] == [{"image_id": "01_mouse_bite_01", "declared": [128, 96], "image": [64, 48],
                                            "scale": [0.5, 0.5]}]
    clean = Dataset.load(tmp_path / "clean")  # (2, 4, 20, 30) on the 128x96 copy
    assert clean.boxes[["x1", "y1", "x2", "y2"]].values.tolist() == [[1, 2, 10, 15]]
    assert pd.read_parquet(tmp_path / "clean/images.parquet").columns.tolist() == IMAGE_COLUMNS + ["content_hash"]
    _declare_size(root, 64, 48)  # the image's own size: kept as drawn
    assert _etl(tmp_path, read("voc", root, class_map={"mouse_bite": "mousebite"}))["images"] == 1
    _declare_size(root, "64.5", 48)
    with pytest.raises(DataError, match=r"01_mouse_bite_01.xml: <size>: width and height must be whole pixels"):
        read("voc", root, class_map={"mouse_bite": "mousebite"})


def test_unmapped_class_lists_known_ones(tmp_path):
    with pytest.raises(DataError, match=r"unknown class\(es\) \['mouse_bite'\].*known: \['open'.*ingest.class_map"):
        read("voc", make_voc(tmp_path / "voc"))


def test_voc_bad_inputs(tmp_path):
    with pytest.raises(DataError, match=r"01_mouse_bite_01.xml: <object> #1: non-numeric"):
        read("voc", make_voc(tmp_path / "a", x1="two"), class_map={"mouse_bite": "mousebite"})
    root = make_voc(tmp_path / "b")
    (root / "Annotations/other.xml").write_text("<html><body/></html>")
    with pytest.raises(DataError, match="other.xml: not a Pascal VOC annotation"):
        read("voc", root)
    (root / "Annotations/other.xml").write_text(VOC.format(name="missing.jpg", cls="spur", x1=1))
    with pytest.raises(DataError, match="other.xml: label without image: 'missing.jpg'"):
        read("voc", root, class_map={"mouse_bite": "mousebite"})


def make_yolo(root: Path) -> Path:
    (root / "data.yaml").parent.mkdir(parents=True)
    (root / "data.yaml").write_text("names: [open, short, spur]\n")
    _img(root / "images/train/a.png", w=100, h=50)
    _img(root / "images/val/b.png", w=100, h=50)  # no label file: no defects
    (root / "labels/train").mkdir(parents=True)
    (root / "labels/train/a.txt").write_text("2 0.5 0.5 0.2 0.4\n")
    return root


def test_yolo_reader(tmp_path):
    ds = read("yolo", make_yolo(tmp_path / "y"))
    assert ds.boxes[["class_name", "x1", "y1", "x2", "y2"]].values.tolist() == [["spur", 40, 15, 60, 35]]
    assert dict(zip(ds.images.image_id, ds.images.source_split)) == {"train__a": "train", "val__b": "val"}


def test_yolo_bad_inputs(tmp_path):
    root = make_yolo(tmp_path / "y")
    (root / "labels/train/a.txt").write_text("7 0.5 0.5 0.2 0.4\n")
    with pytest.raises(DataError, match=r"a.txt:1: unknown class id 7"):
        read("yolo", root)
    (root / "labels/train/a.txt").write_text("2 0.5 0.5 0.2 0.4\n")
    (root / "labels/train/zzz.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError, match="zzz.txt: label without image"):
        read("yolo", root)


def test_coco_reader_and_not_coco(tmp_path):
    root = tmp_path / "c"
    _img(root / "imgs/p.png")
    coco = {"images": [{"id": 7, "file_name": "p.png", "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "short"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 5, 20, 10]}]}
    (root / "ann.json").write_text(json.dumps(coco))
    ds = read("coco", root)
    assert ds.boxes[["class_name", "x1", "y1", "x2", "y2"]].values.tolist() == [["short", 10, 5, 30, 15]]
    (root / "ann.json").write_text(json.dumps({"info": {}}))
    with pytest.raises(DataError, match="ann.json: not a COCO instances file"):
        read("coco", root)


def _etl(tmp_path, ds, **cfg):
    return etl.run(EtlConfig(**cfg), CLASSES, ds.root, tmp_path / "clean")


def test_etl_tiles_large_images_and_keeps_boxes_inside(tmp_path):
    root = make_voc(tmp_path / "voc")
    _img(root / "images/Mouse_bite/01_mouse_bite_01.jpg", w=300, h=200)
    xml = root / "Annotations/Mouse_bite/01_mouse_bite_01.xml"
    xml.write_text(xml.read_text().replace("<width>64</width><height>48</height>", "<width>300</width><height>200</height>")
                   .replace("<xmax>20</xmax>", "<xmax>150</xmax>"))
    ds = read("voc", root, class_map={"mouse_bite": "mousebite"})
    report = _etl(tmp_path, ds, tile_size=128, tile_overlap=32)
    clean = Dataset.load(tmp_path / "clean")
    assert report["images"] == len(clean.images) == 3 * 2  # x: 0, 96, 172; y: 0, 72
    b = clean.boxes.merge(clean.images, on="image_id")
    assert len(b) >= 1 and ((b.x1 >= 0) & (b.y1 >= 0) & (b.x2 <= b.width) & (b.y2 <= b.height)).all()
    assert (clean.images.width == 128).all() and (clean.images.height == 128).all()


def test_etl_duplicates_corrupt_empty_and_clipping(tmp_path):
    root = make_deeppcb(tmp_path / "dp", {"000": "1 2 20 22 1", "001": "40 30 70 44 2", "002": "1 1 9 9 1",
                                          "003": "1 1 9 9 1"})
    ds = read("deeppcb", root)
    shutil.copy(ds.root / "images/00001000_test.jpg", ds.root / "images/00001001_test.jpg")  # duplicate bytes
    (ds.root / "images/00001002_test.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (ds.root / "images/00001003_temp.jpg").write_bytes(b"")
    report = _etl(tmp_path, ds)
    reasons = {r["image_id"]: r["reason"] for r in report["rejected"]}
    assert "duplicate of image '00001000'" in reasons["00001001"]
    assert "00001002_test.jpg: cannot decode" in reasons["00001002"]
    assert "00001003_temp.jpg: cannot decode" in reasons["00001003"]
    # the 70 px box of image 001 crosses the 64 px border: rejected by default, clipped on request
    shutil.copy(root / "PCBData/group00001/00001/00001001_test.jpg", ds.root / "images/00001001_test.jpg")
    assert "outside the 64x48 image" in {r["image_id"]: r["reason"] for r in _etl(tmp_path, ds)["rejected"]}["00001001"]
    clipped = _etl(tmp_path, ds, out_of_image="clip")
    assert clipped["clipped"][0]["clipped_to"] == [40, 30, 64, 44]


def test_template_size_mismatch_is_rejected(tmp_path):
    ds = read("deeppcb", make_deeppcb(tmp_path / "dp", {"000": "1 2 20 22 1"}))
    _img(ds.root / "images/00001000_temp.jpg", w=60)
    assert "template is (60, 48), test image is (64, 48)" in _etl(tmp_path, ds)["rejected"][0]["reason"]


def test_split_strategies(tmp_path):
    root = make_deeppcb(tmp_path / "dp", {f"{i:03d}": "1 2 20 22 1" for i in range(4)},
                        groups=("00001", "00002", "00003", "00004"))
    ds = read("deeppcb", root)
    with pytest.raises(ValueError, match="no official test list.*split.strategy=grouped"):
        assign(ds, SplitConfig(strategy="official"), 0)
    ds.images.loc[ds.images.board_id == "00004", "source_split"] = "test"
    t = assign(ds, SplitConfig(strategy="official"), 0)
    assert set(t.loc[t.split == "test", "board_id"]) == {"00004"} and (t.split == "val").any()
    r = assign(ds, SplitConfig(strategy="random", test_fraction=0.25, val_fraction=0.25), 0)
    assert r.groupby("board_id").split.nunique().max() > 1  # random ignores boards


class _Server(http.server.SimpleHTTPRequestHandler):
    hits = 0

    def log_message(self, *a):
        pass

    def do_GET(self):
        type(self).hits += 1
        super().do_GET()


def test_https_archive_download_checksum_cache_and_404(tmp_path, monkeypatch):
    monkeypatch.setenv("PCB_AOI_CACHE", str(tmp_path / "cache"))
    make_deeppcb(tmp_path / "src", {"000": "1 2 20 22 1"})
    serve = tmp_path / "www"
    serve.mkdir()
    with zipfile.ZipFile(serve / "dp.zip", "w") as z:
        for f in (tmp_path / "src").rglob("*"):
            z.write(f, f.relative_to(tmp_path / "src"))
    digest = hashlib.sha256((serve / "dp.zip").read_bytes()).hexdigest()
    handler = lambda *a, **k: _Server(*a, directory=str(serve), **k)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(DataError, match="ingest.sha256: .* expected 00ff"):
            sources.resolve(f"{base}/dp.zip", "00ff")
        root = sources.resolve(f"{base}/dp.zip", digest)
        assert len(read("deeppcb", root).boxes) == 1
        hits = _Server.hits
        assert sources.resolve(f"{base}/dp.zip", digest) == root and _Server.hits == hits  # cached
        with pytest.raises(DataError, match="HTTP 404"):
            sources.resolve(f"{base}/nope.zip")
    finally:
        httpd.shutdown()


def test_missing_local_path():
    with pytest.raises(DataError, match="ingest.uri: /no/such/folder does not exist"):
        sources.resolve("/no/such/folder")


@pytest.mark.skipif(not (SHARED / "deeppcb-trainval").is_dir(), reason="../shared/datasets/deeppcb-trainval absent")
def test_shared_deeppcb_counts(tmp_path):
    report = ingest.run(IngestConfig(source="deeppcb", uri=str(SHARED / "deeppcb-trainval")), 0, CLASSES, tmp_path / "raw")
    assert report["images"] == 1000 and report["boxes"] == 6873 and report["boards"] == 7
    assert report["per_class"] == {"open": 1283, "short": 1028, "mousebite": 1379, "spur": 1142, "copper": 1010,
                                   "pin-hole": 1031}


PKU_MAP = {"mouse_bite": "mousebite", "open_circuit": "open", "short": "short", "spur": "spur",
           "spurious_copper": "copper", "missing_hole": "missing-hole"}
PKU_CLASSES = CLASSES + ("missing-hole",)  # PKU has a seventh class; DeepPCB's pin-hole is something else


@pytest.mark.skipif(not (SHARED / "pku-market-pcb-sample").is_dir(), reason="../shared/datasets/pku-market-pcb-sample absent")
def test_shared_pku_is_tiled_with_boxes_inside_tiles(tmp_path):
    cfg = IngestConfig(source="voc", uri=str(SHARED / "pku-market-pcb-sample"), class_map=PKU_MAP, board_regex=r"^(\d+)_")
    raw = ingest.run(cfg, 0, PKU_CLASSES, tmp_path / "raw")
    assert raw["images"] == 30 and raw["boxes"] == 134
    report = etl.run(EtlConfig(tile_size=640, tile_overlap=128), PKU_CLASSES, tmp_path / "raw", tmp_path / "clean")
    clean = Dataset.load(tmp_path / "clean")
    assert report["rejected_images"] == 0 and len(clean.images) > 30 * 10
    b = clean.boxes.merge(clean.images, on="image_id")
    assert ((b.x1 >= 0) & (b.y1 >= 0) & (b.x2 <= b.width) & (b.y2 <= b.height)).all()
    assert clean.boxes.image_id.nunique() >= 30


def test_azure_source_from_a_real_blob_endpoint(tmp_path, monkeypatch, azurite):
    from azure.storage.blob import BlobServiceClient

    from conftest import DEV_KEY

    monkeypatch.setenv("PCB_AOI_CACHE", str(tmp_path / "cache"))
    src = make_deeppcb(tmp_path / "src", {"000": "1 2 20 22 1\n3 3 9 9 5", "001": "5 5 15 15 3"})
    container = BlobServiceClient.from_connection_string(azurite).create_container("aoi-raw")
    for f in src.rglob("*"):
        if f.is_file():
            container.upload_blob(f"deeppcb/{f.relative_to(src)}", f.read_bytes())
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite)
    ds = read("deeppcb", sources.resolve("azure://aoi-raw/deeppcb"))
    assert len(ds.images) == 2 and len(ds.boxes) == 3
    with pytest.raises(DataError, match="azure://aoi-raw/nothing-here does not exist"):
        sources.resolve("azure://aoi-raw/nothing-here")
    with pytest.raises(DataError, match="azure://no-such-container/x does not exist"):
        sources.resolve("azure://no-such-container/x")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.replace(DEV_KEY, "d3Jvbmcga2V5" * 4))
    with pytest.raises(DataError, match="cannot read azure://aoi-raw/deeppcb.*AZURE_STORAGE"):
        sources.resolve("azure://aoi-raw/deeppcb")
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT", raising=False)
    with pytest.raises(DataError, match="needs AZURE_STORAGE_CONNECTION_STRING"):
        sources.resolve("azure://aoi-raw/deeppcb")
