"""The input contract in numpy: one implementation for training, export and the edge app."""
import numpy as np
import pytest

from pcb_aoi.edge.preprocess import (pad_to, prepare_input, read_grey_png, register_template, registration_shift,
                               stack_padded)


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


def test_the_pipeline_refuses_16_bit_images_that_grey_conversion_would_clip(tmp_path):
    from PIL import Image

    from pcb_aoi.edge.preprocess import read_grey
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match=r"deep\.png: I;16 image .*convert it first"):
        read_grey(tmp_path / "deep.png")


def _board_pair(dx, dy, seed=0, size=256):
    """A synthetic board (test, with defects) and its template moved by (dx, dy) px."""
    from pcb_aoi.data.synth import SynthConfig, board_samples
    sample = board_samples(SynthConfig(image_size=size, images_per_board=1, max_shift_px=0.0), seed, 0)[0]
    template = np.roll(sample.template, (dy, dx), axis=(0, 1))
    return sample.test, template, sample.template


@pytest.mark.parametrize("dx, dy", [(0, 0), (3, -5), (-7, 2), (1, 1), (-8, -8)])
def test_registration_finds_the_shift_of_the_template_and_moves_it_back(dx, dy):
    test, moved, original = _board_pair(dx, dy)
    assert registration_shift(test, moved, 8) == (-dx, -dy)
    registered, shift = register_template(test, moved, 8)
    assert shift == (-dx, -dy) and registered.shape == moved.shape and registered.dtype == np.uint8
    m = 8  # away from the repeated border the registered template is the original one
    assert np.array_equal(registered[m:-m, m:-m], original[m:-m, m:-m])


def test_registration_never_moves_further_than_allowed_and_leaves_tiny_images_alone():
    test, moved, _ = _board_pair(12, 0)
    dx, dy = registration_shift(test, moved, 4)
    assert max(abs(dx), abs(dy)) <= 4
    small = np.zeros((24, 24), np.uint8)
    assert register_template(small, small, 8) == (small, (0, 0))


def plain_search(test, template, max_px):
    """registration_shift's coarse-to-fine search written plainly: int64 sums over strided slices."""
    def half(x):
        h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
        return x[:h, :w].astype(np.int64).reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3))

    def best(a, b, m, step, shifts):
        h, w = a.shape
        return min((np.abs(a[m:h - m:step, m:w - m:step] - b[m - dy:h - m - dy:step, m - dx:w - m - dx:step]).sum(),
                    dx, dy) for dx, dy in shifts)[1:]

    t1, m1 = test.astype(np.int64), template.astype(np.int64)
    t2, m2 = half(t1), half(m1)
    t4, m4 = half(t2), half(m2)
    r = -(-max_px // 4)
    if max_px <= 0 or min(t4.shape) <= 4 * (r + 2):
        return 0, 0
    cx, cy = best(t4, m4, r + 1, 1, [(dx, dy) for dy in range(-r, r + 1) for dx in range(-r, r + 1)])
    for a, b, m, step in ((t2, m2, 2 * r + 2, 1), (t1, m1, 4 * r + 4, 2)):
        cx, cy = best(a, b, m, step, [(dx, dy) for dy in range(2 * cy - 1, 2 * cy + 2) for dx in range(2 * cx - 1, 2 * cx + 2)])
    return (cx, cy) if max(abs(cx), abs(cy)) <= max_px else (0, 0)


def test_registration_search_is_the_plain_search_on_random_and_odd_sized_pairs():
    """The fast search (2x2 sums on wide integers, the full-scale step on parity planes, int32 sums) picks
    exactly the shift of the plain one, ties included."""
    from pcb_aoi.edge.preprocess import _half
    rng = np.random.default_rng(1)
    for shape in [(64, 64), (65, 63), (3, 5), (1, 7)]:
        x = rng.integers(0, 256, shape).astype(np.uint8)
        h, w = shape[0] // 2 * 2, shape[1] // 2 * 2
        plain = x[:h, :w].astype(np.int64).reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3))
        assert _half(x).dtype == np.uint16 and np.array_equal(_half(x), plain)
        assert np.array_equal(_half(_half(x)), plain[:h // 4 * 2, :w // 4 * 2].reshape(h // 4, 2, w // 4, 2).sum(axis=(1, 3)))
    for dx, dy, h, w in [(3, -5, 256, 256), (-7, 2, 201, 187), (0, 0, 130, 256), (6, 6, 97, 99)]:
        test, moved, _ = _board_pair(dx, dy, seed=abs(dx * dy))
        test, moved = test[:h, :w], moved[:h, :w]
        for max_px in (3, 8, 13):
            assert registration_shift(test, moved, max_px) == plain_search(test, moved, max_px), (dx, dy, h, w, max_px)
    flat = np.full((120, 120), 200, np.uint8)  # every shift ties: the smallest (dx, dy) wins in both
    assert registration_shift(flat, flat, 8) == plain_search(flat, flat, 8)
    a, b = rng.integers(0, 256, (2, 150, 170)).astype(np.uint8)  # unrelated images: some shift, the same one
    assert registration_shift(a, b, 8) == plain_search(a, b, 8)
