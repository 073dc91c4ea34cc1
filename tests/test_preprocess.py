"""The input contract in numpy: one implementation for training, export and the edge app."""
import numpy as np
import pytest

from pcb_aoi.preprocess import pad_to, prepare_input, read_grey_png, stack_padded


def reference(test, template, use_template, multiple=32):
    """The contract written the obvious way: scale, stack, pad each channel with its background."""
    t = test.astype(np.float32) / 255.0
    x = np.stack([t, template.astype(np.float32) / 255.0, t - template.astype(np.float32) / 255.0]) \
        if use_template else t[None]
    h, w = t.shape
    return np.stack([np.pad(c, ((0, -h % multiple), (0, -w % multiple)), constant_values=v)
                     for c, v in zip(x, [1.0, 1.0, 0.0])])


@pytest.mark.parametrize("shape", [(64, 64), (50, 70), (640, 640)])
@pytest.mark.parametrize("use_template", [True, False])
def test_prepare_input_matches_the_contract_bit_for_bit(shape, use_template):
    rng = np.random.default_rng(1)
    test, template = (rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2))
    x = prepare_input(test, template if use_template else None, use_template)
    assert x.dtype == np.float32 and x.shape[1] % 32 == 0 and x.shape[2] % 32 == 0
    assert np.array_equal(x, reference(test, template, use_template))


def test_a_reference_model_without_template_is_refused():
    with pytest.raises(ValueError, match="needs a template"):
        prepare_input(np.zeros((32, 32), np.uint8), None, True)


def test_batches_of_different_sizes_are_padded_with_the_background():
    a = prepare_input(np.zeros((32, 64), np.uint8), np.zeros((32, 64), np.uint8), True)
    b = prepare_input(np.zeros((64, 32), np.uint8), np.zeros((64, 32), np.uint8), True)
    batch = stack_padded([a, b])
    assert batch.shape == (2, 3, 64, 64)
    assert (batch[0, :2, 32:] == 1.0).all() and (batch[0, 2, 32:] == 0.0).all()
    assert pad_to(a, 32, 64) is a


def test_fast_png_decoding_gives_pillows_pixels_and_leaves_every_other_file_to_pillow(tmp_path):
    from PIL import Image

    pytest.importorskip("cv2", reason="OpenCV not installed: every image is decoded by Pillow")
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (50, 70), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey > 127).save(tmp_path / "bilevel.png")  # 1-bit PNG, as binarised AOI images may be
    fast = read_grey_png(tmp_path / "grey.png")
    assert fast is not None and np.array_equal(fast, grey)
    assert np.array_equal(read_grey_png(tmp_path / "bilevel.png"),
                          np.asarray(Image.open(tmp_path / "bilevel.png").convert("L")))
    Image.fromarray(grey).save(tmp_path / "grey.jpg")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(grey.astype(np.uint16) * 256).save(tmp_path / "deep.png")
    (tmp_path / "broken.png").write_bytes((tmp_path / "grey.png").read_bytes()[:100])
    for name in ("grey.jpg", "rgb.png", "deep.png", "broken.png", "missing.png"):
        assert read_grey_png(tmp_path / name) is None, name
