import filecmp

import numpy as np
import pytest

from pcb_aoi.data import ingest
from pcb_aoi.data.synth import board_samples
from pcb_aoi.pipeline.config import CLASSES, SynthConfig

CFG = SynthConfig(boards=2, images_per_board=2, image_size=128)


def _files(d):
    return sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file())


def test_same_seed_gives_byte_identical_dataset(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 7), (b, 7), (c, 8)):
        d.mkdir()
        ingest.ingest_synthetic(CFG, seed, d, workers=1).save(d)
    assert _files(a) == _files(b) and len(_files(a)) == 2 * 4 + 2
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in _files(a)], shallow=False)
    assert not mismatch and not errors
    _, mismatch, _ = filecmp.cmpfiles(a, c, [str(f) for f in _files(a) if f.suffix == ".png"], shallow=False)
    assert mismatch, "a different seed must give different images"


@pytest.mark.parametrize("board", [0, 1, 2])
def test_boxes_are_tight_around_injected_defects(board):
    cfg = SynthConfig(images_per_board=3, image_size=192, defects_per_image=(4, 6))
    for s in board_samples(cfg, seed=3, b=board):
        assert s.defects, "every image should get defects"
        changed_union = np.zeros_like(s.clean)
        for d in s.defects:
            ys, xs = np.nonzero(d.changed)
            x1, y1, x2, y2 = d.box
            # every changed pixel inside, and the box touches the changed pixels on all four sides
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
            changed_union |= d.changed
        # nothing changed between clean and defective boards outside the defects
        assert ((s.clean ^ s.copper) == changed_union).all()


def test_defects_are_visible_in_the_rendered_pair():
    s = board_samples(SynthConfig(images_per_board=1, defects_per_image=(5, 5)), seed=1, b=0)[0]
    diff = np.abs(s.test.astype(int) - s.template.astype(int))
    for d in s.defects:
        x1, y1, x2, y2 = d.box
        assert diff[y1:y2, x1:x2].max() > 128, d.cls
    assert s.test.dtype == np.uint8 and s.test.shape == s.template.shape == (256, 256)


def test_all_classes_and_class_mix_respected():
    only = SynthConfig(boards=1, images_per_board=4, image_size=128, class_mix={"spur": 1.0})
    assert {d.cls for s in board_samples(only, 0, 0) for d in s.defects} == {"spur"}
    mixed = SynthConfig(images_per_board=8)
    seen = {d.cls for b in range(2) for s in board_samples(mixed, 0, b) for d in s.defects}
    assert seen == set(CLASSES)
