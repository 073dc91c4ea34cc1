"""Several sources in one ingest (``ingest.sources``): namespaced ids, the same picture kept once,
conflicting labels named, counts per source, and the split by namespaced boards."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import write_params
from pcb_aoi.data import etl, ingest, split
from pcb_aoi.data.dataset import Dataset
from pcb_aoi.data.readers import DataError
from pcb_aoi.pipeline.config import CLASSES, ConfigError, EtlConfig, IngestConfig, SplitConfig, load_params
from test_readers import make_deeppcb

OBJECT = "<object><name>{}</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"


def voc_image(root, stem: str, pixels: np.ndarray, boxes: list[tuple]) -> None:
    """A PNG plus its VOC XML with ``boxes`` (class, x1, y1, x2, y2)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "ann").mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(root / f"img/{stem}.png")
    h, w = pixels.shape
    objects = "".join(OBJECT.format(*b) for b in boxes)
    (root / f"ann/{stem}.xml").write_text(f"<annotation><filename>{stem}.png</filename><size><width>{w}</width>"
                                          f"<height>{h}</height></size>{objects}</annotation>")


def two_sources(tmp_path, copy_class="open"):
    """DeepPCB: boards 00001 and 00002, two pairs each ("1 2 20 22 1" = open, "5 5 15 15 3" = mousebite);
    VOC: a PNG re-encoding of DeepPCB's 00001000 test image (other bytes, same pixels) whose box is
    ``copy_class`` at DeepPCB's place, and a picture of its own with a spur."""
    dp = make_deeppcb(tmp_path / "dp", {"000": "1 2 20 22 1", "001": "5 5 15 15 3"}, groups=("00001", "00002"))
    voc = tmp_path / "voc"
    same = np.asarray(Image.open(dp / "PCBData/group00001/00001/00001000_test.jpg").convert("L"))
    voc_image(voc, "copy", same, [(copy_class, 1, 2, 20, 22)])
    own = np.full((48, 64), 90, np.uint8)
    voc_image(voc, "own", own, [("spur", 10, 10, 30, 30)])
    return [{"source": "deeppcb", "uri": str(dp)}, {"source": "voc", "uri": str(voc)}]


def run(tmp_path, sources, **kw):
    cfg = IngestConfig.model_validate({"sources": sources, **kw})
    return ingest.run(cfg, 0, CLASSES, tmp_path / "raw")


def test_two_sources_one_dataset_namespaced_the_duplicate_kept_once(tmp_path):
    report = run(tmp_path, two_sources(tmp_path))
    raw = Dataset.load(tmp_path / "raw")
    assert sorted(raw.images.image_id) == ["deeppcb:00001000", "deeppcb:00001001", "deeppcb:00002000",
                                           "deeppcb:00002001", "voc:own"]
    assert sorted(set(raw.images.board_id)) == ["deeppcb:00001", "deeppcb:00002", "voc:own"]
    assert raw.images.set_index("image_id").source.to_dict()["voc:own"] == "voc"
    assert report["duplicates"] == [{"kept": "deeppcb:00001000", "dropped": "voc:copy"}]
    assert report["duplicates_merged"] == 1 and report["label_conflicts_count"] == 0
    assert report["images"] == 5 and report["boxes"] == 5 and report["boards"] == 3
    assert report["source"] == "deeppcb+voc"
    dp, voc = report["sources"]["deeppcb"], report["sources"]["voc"]
    assert (dp["images"], dp["boxes"], dp["boards"], dp["duplicates_dropped"]) == (4, 4, 2, 0)
    assert (voc["images"], voc["boxes"], voc["boards"], voc["duplicates_dropped"]) == (1, 1, 1, 1)
    assert dp["per_class"]["open"] == 2 and dp["per_class"]["mousebite"] == 2 and voc["per_class"]["spur"] == 1
    # files lie in a folder per source; the dropped copy's file is gone
    assert (tmp_path / "raw/images/deeppcb/00001000_test.jpg").is_file()
    assert (tmp_path / "raw/images/voc/own_test.png").is_file()
    assert not (tmp_path / "raw/images/voc/copy_test.png").exists()
    # etl keeps the namespaced ids and the source, and hashes each picture; VOC's own picture has no
    # template, which a dataset of pairs cannot use: rejected, naming why
    report = etl.run(EtlConfig(), CLASSES, tmp_path / "raw", tmp_path / "clean")
    assert [(r["image_id"], r["reason"]) for r in report["rejected"]] == [
        ("voc:own", "template missing: no template_path in images.parquet")]
    clean = Dataset.load(tmp_path / "clean")
    assert sorted(clean.images.image_id) == sorted(raw.images.image_id)[:4]
    assert clean.images.content_hash.nunique() == 4 and (clean.images.content_hash.str.len() == 64).all()
    assert set(clean.images.source) == {"deeppcb"} and (tmp_path / "clean/images/deeppcb/00002001_temp.png").is_file()


def test_split_names_namespaced_boards(tmp_path):
    run(tmp_path, two_sources(tmp_path))
    ds = Dataset.load(tmp_path / "raw")
    table = split.assign(ds, SplitConfig.model_validate({"test_groups": ["deeppcb:1"], "val_groups": ["voc:own"]}), 0)
    assert table.groupby("split").board_id.unique().map(sorted).to_dict() == {
        "test": ["deeppcb:00001"], "train": ["deeppcb:00002"], "val": ["voc:own"]}
    with pytest.raises(ValueError, match=r"split.test_groups: board '00001' does not exist; boards in .*: "
                                         r"deeppcb:00001, deeppcb:00002, voc:own"):
        split.assign(ds, SplitConfig(test_groups=("00001",)), 0)


def test_conflicting_labels_stop_ingest_naming_both_sources_or_keep_the_first_or_last(tmp_path):
    sources = two_sources(tmp_path, copy_class="short")
    with pytest.raises(DataError, match=r"deeppcb:00001000 \(deeppcb\) and voc:copy \(voc\) are the same picture "
                                        r"with different boxes: deeppcb has \['open \[1, 2, 20, 22\]'\], voc has "
                                        r"\['short \[1, 2, 20, 22\]'\].*ingest.label_conflict: first"):
        run(tmp_path, sources)
    assert not (tmp_path / "raw").exists()
    report = run(tmp_path, sources, label_conflict="first")
    assert report["label_conflicts_count"] == 1 and report["label_conflicts"][0]["sources"] == ["deeppcb", "voc"]
    boxes = Dataset.load(tmp_path / "raw").boxes
    assert boxes.loc[boxes.image_id == "deeppcb:00001000", "class_name"].tolist() == ["open"]
    assert "voc:copy" not in set(boxes.image_id)
    # last: the later source's boxes (an operator's correction) win; the picture keeps the first id
    report = run(tmp_path, sources, label_conflict="last")
    assert report["label_conflicts_count"] == 1 and report["label_conflicts"][0]["kept_boxes_of"] == "voc"
    raw = Dataset.load(tmp_path / "raw")
    assert raw.boxes.loc[raw.boxes.image_id == "deeppcb:00001000", "class_name"].tolist() == ["short"]
    assert "voc:copy" not in set(raw.images.image_id) | set(raw.boxes.image_id) and len(raw.boxes) == 5


def test_an_error_in_one_source_names_its_entry(tmp_path):
    sources = two_sources(tmp_path)
    voc_image(tmp_path / "voc", "odd", np.zeros((8, 8), np.uint8), [("mouse_bite", 1, 1, 5, 5)])
    with pytest.raises(DataError, match=r"ingest.sources\[1\] \(voc\): unknown class\(es\) \['mouse_bite'\].*"
                                        r"ingest.sources\[1\].class_map.mouse_bite="):
        run(tmp_path, sources)
    sources[1]["class_map"] = {"mouse_bite": "mousebite"}
    assert run(tmp_path, sources)["sources"]["voc"]["per_class"]["mousebite"] == 1


@pytest.mark.parametrize("over, message", [
    ({"uri": "/data/x"}, "ingest.sources and ingest.uri are both set"),
    ({"source": "voc", "uri": "/data/x"}, "ingest.sources and ingest.source, ingest.uri are both set"),
    ({"class_map": {"a": "open"}}, "ingest.sources and ingest.class_map are both set"),
])
def test_sources_and_the_single_source_keys_together_are_a_params_error(tmp_path, over, message):
    params = write_params(tmp_path / "params.yaml",
                          {"ingest": {"sources": [{"source": "deeppcb", "uri": "/data/dp"}], **over}})
    with pytest.raises(ConfigError, match=message):
        load_params(params)


def test_two_sources_of_one_reader_need_names(tmp_path):
    two = [{"source": "voc", "uri": "/a"}, {"source": "voc", "uri": "/b"}]
    with pytest.raises(ConfigError, match=r"ingest.sources\[0\] and ingest.sources\[1\] are both named 'voc'"):
        load_params(write_params(tmp_path / "params.yaml", {"ingest": {"sources": two}}))
    two[1]["name"] = "voc2"
    p = load_params(write_params(tmp_path / "params.yaml", {"ingest": {"sources": two}}))
    assert [s.namespace for s in p.ingest.sources] == ["voc", "voc2"]
    bad = [{"source": "voc", "uri": "/a", "class_map": {"x": "nope"}}]
    with pytest.raises(ConfigError, match=r"ingest.sources\[0\].class_map: maps to unknown class"):
        load_params(write_params(tmp_path / "params.yaml", {"ingest": {"sources": bad}}))


def test_the_default_single_source_keeps_its_ids(tiny_pipeline):
    d, _ = tiny_pipeline
    raw = pd.read_parquet(d / "raw/images.parquet")
    assert raw.image_id.iloc[0] == "b000_000" and raw.board_id.iloc[0] == "board000"
    assert set(raw.source) == {"synthetic"} and raw.path.iloc[0] == "images/b000_000_test.png"
