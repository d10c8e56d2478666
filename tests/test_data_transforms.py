"""Image transforms on hostile shapes: a tiny file that would expand to a huge resize, and the
centre-square resize checked against images whose answer is known; MLM masking's rates."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.pipeline.data.errors import BadData, UserError
from vlp.pipeline.data.transforms import (
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MaskingSpec,
    decode_caption,
    decode_image,
    image_to_array,
    image_to_tensor,
    mask_tokens,
    preprocess_image,
)
from vlp.pipeline.eval.images import ImageRef, load_image


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


@pytest.mark.parametrize("width,height", [(2000, 1), (1, 3000), (10_000_000, 1)])
def test_extreme_aspect_ratios_are_skipped_before_any_resize(width, height):
    """An 88-byte 2000x1 PNG once cost 405 MB in the resize (the short side scaled up to the
    image size), and 10Mx1 raised OverflowError out of the loader's decode."""
    data = png(width, height)
    assert len(data) < 50_000
    with pytest.raises(BadData) as raised:
        decode_image(data, 224)
    assert raised.value.kind == "extreme_aspect_ratio"


def test_the_eval_image_loader_refuses_them_with_one_line(tmp_path):
    path = tmp_path / "banner.png"
    path.write_bytes(png(2000, 1))
    with pytest.raises(UserError, match=r"cannot read image .*banner.png: .*2000x1.*aspect ratio"):
        load_image(ImageRef(str(path)), 224)


def test_the_widest_accepted_image_resizes_only_its_centre_square():
    """A 20:1 image whose centre square is red and the rest blue. The result equals resizing the
    whole image and cropping its centre (the transform before this change), without building
    that 4480x224 intermediate, and away from the square's edges (where bicubic reads one source
    pixel beyond them) it is pure red."""
    side = 30
    width = side * MAX_ASPECT_RATIO
    pixels = np.zeros((side, width, 3), np.uint8)
    pixels[..., 2] = 255
    left = (width - side) // 2
    pixels[:, left:left + side] = (255, 0, 0)
    image = decode_image(png_of(pixels), 224)
    out = image_to_array(image, 224)
    whole = image.resize((224 * MAX_ASPECT_RATIO, 224), Image.BICUBIC)
    start = (whole.width - 224) // 2
    assert np.array_equal(out, np.asarray(whole.crop((start, 0, start + 224, 224))))
    assert (out[:, 16:-16] == (255, 0, 0)).all()
    square = Image.fromarray(pixels[:, left:left + side])
    assert np.array_equal(image_to_array(square, side), np.asarray(square))  # no resampling


def png_of(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_tall_image_keeps_its_centre_rows():
    """10 wide, 30 tall: rows 10..19 white, the rest black; the centre square is the white band."""
    pixels = np.zeros((30, 10, 3), np.uint8)
    pixels[10:20] = 255
    assert (image_to_array(Image.fromarray(pixels), 10) == 255).all()


def test_mlm_masking_rates_and_targets():
    """BERT's recipe, measured on 200,000 tokens with a fixed generator: 15% of the real,
    non-special tokens are targets (each row at least one), 80% of them become [MASK], 10% a
    random token, 10% stay; special tokens and padding are never targets or changed."""
    pad, cls, sep, mask_id, vocab = 0, 1, 2, 3, 1000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (4000, 50), generator=g)
    lengths = torch.randint(3, 51, (4000,), generator=g)
    real = torch.arange(50) < lengths[:, None]
    ids[:, 0] = cls
    ids[torch.arange(4000), lengths - 1] = sep
    ids[~real] = pad
    spec = MaskingSpec(mask_token_id=mask_id, vocab_size=vocab,
                       special_ids=(pad, cls, sep, mask_id))
    masked, labels = mask_tokens(ids, real, spec, torch.Generator().manual_seed(1))

    candidates = real & (ids > mask_id)
    targets = labels != -100
    assert not (targets & ~candidates).any() and torch.equal(labels[targets], ids[targets])
    assert torch.equal(masked[~targets], ids[~targets])  # nothing else changes
    assert targets.any(dim=1).all()
    rate = targets.sum() / candidates.sum()
    assert abs(rate.item() - spec.probability) < 0.005
    to_mask = (masked[targets] == mask_id).float().mean().item()
    kept = (masked[targets] == ids[targets]).float().mean().item()
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1 - 0.1 / vocab) < 0.01


def encoded(pixels: np.ndarray, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **params)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none (a decompression bomb's header)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
        for body in (ihdr, b"IDAT" + zlib.compress(b"\0" * 16), b"IEND"))


def test_the_pixel_limit_is_checked_on_the_header_at_exactly_its_value():
    assert 8000 * 8000 == MAX_IMAGE_PIXELS
    with pytest.raises(BadData) as raised:  # at the limit: decoded, and found truncated
        decode_image(png_header(8000, 8000), 224)
    assert raised.value.kind == "bad_image" and "undecodable image" in str(raised.value)
    with pytest.raises(BadData, match="image claims 8000x8001 pixels") as raised:
        decode_image(png_header(8000, 8001), 224)
    assert raised.value.kind == "decompression_bomb"
    with pytest.raises(BadData) as raised:  # past PIL's own limit, which open() checks first
        decode_image(png_header(20_000, 20_000), 224)
    assert raised.value.kind == "decompression_bomb" and "400000000 pixels" in str(raised.value)


def test_aspect_ratio_limit_is_inclusive():
    assert decode_image(png(MAX_ASPECT_RATIO, 1), 8).size == (MAX_ASPECT_RATIO, 1)
    assert decode_image(png(1, MAX_ASPECT_RATIO), 8).size == (1, MAX_ASPECT_RATIO)
    with pytest.raises(BadData, match=r"image is 1x21: an aspect ratio beyond 20:1"):
        decode_image(png(1, MAX_ASPECT_RATIO + 1), 8)


def test_only_jpeg_png_and_webp_are_decoded():
    pixels = np.full((8, 8, 3), (200, 30, 30), np.uint8)
    for fmt in ("JPEG", "PNG", "WEBP"):
        assert decode_image(encoded(pixels, fmt, quality=100), 8).size == (8, 8)
    for fmt in ("GIF", "BMP", "TIFF"):
        with pytest.raises(BadData) as raised:
            decode_image(encoded(pixels, fmt), 8)
        assert raised.value.kind == "bad_image"


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_every_mode_becomes_rgb(mode):
    """Grey, palette, alpha and 16-bit images come out as 3-channel uint8."""
    image = Image.new("RGB", (6, 6), (90, 90, 90)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    decoded = decode_image(buffer.getvalue(), 6)
    assert decoded.mode == "RGB"
    tensor = preprocess_image(buffer.getvalue(), 6)
    assert tensor.shape == (3, 6, 6) and tensor.dtype == torch.uint8


def test_jpeg_draft_mode_decodes_at_a_fraction_never_below_the_size():
    """A 400x240 JPEG for 56 pixels decodes at 1/4 (100x60); for 224 at full size: draft
    mode never goes below the size asked for."""
    data = encoded(np.full((240, 400, 3), 128, np.uint8), "JPEG")
    assert decode_image(data, 56).size == (100, 60)
    assert decode_image(data, 30).size == (50, 30)  # 1/8
    assert decode_image(data, 224).size == (400, 240)
    assert preprocess_image(data, 56).shape == (3, 56, 56)


def columns(width: int, height: int) -> np.ndarray:
    """An image whose red channel is the column index and green the row index."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.arange(width)[None, :]
    pixels[..., 1] = np.arange(height)[:, None]
    return pixels


@pytest.mark.parametrize("width, height", [(31, 10), (30, 10), (10, 31), (10, 30), (10, 10)])
def test_the_centre_square_at_the_model_size_is_cropped_exactly(width, height):
    """No resampling when the short side is the size: the centre columns (rows), the odd one
    left over on the right (bottom)."""
    out = image_to_array(Image.fromarray(columns(width, height)), 10)
    left, top = (width - 10) // 2, (height - 10) // 2
    assert np.array_equal(out, columns(width, height)[top:top + 10, left:left + 10])
    assert out.shape == (10, 10, 3) and not out.flags.writeable


def test_a_larger_image_resizes_its_centre_square_only():
    """30x90, rows 30..59 white and the rest black, to 10: white, away from the edges (where
    bicubic reads a few pixels beyond the square)."""
    pixels = np.zeros((90, 30, 3), np.uint8)
    pixels[30:60] = 255
    assert (image_to_array(Image.fromarray(pixels), 10)[2:-2] == 255).all()
    wide = image_to_array(Image.fromarray(pixels.transpose(1, 0, 2).copy()), 10)
    assert (wide[:, 2:-2] == 255).all()


def test_tensor_channels_are_rgb_first_in_memory_of_their_own():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns of a tensor over a read-only array
        tensor = image_to_tensor(Image.new("RGB", (4, 4), (255, 128, 0)), 4)
    assert tensor.shape == (3, 4, 4) and tensor.dtype == torch.uint8
    assert tensor[:, 0, 0].tolist() == [255, 128, 0]


def test_a_caption_is_stripped_utf8():
    assert decode_caption(" caf\xc3\xa9 au lait\n".encode("latin-1")) == "café au lait"


def mlm_batch(rows: int = 64, length: int = 12):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 50, (rows, length), generator=g)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[:, -3:] = False
    ids[:, -3:] = 0  # [PAD]
    return ids, mask, MaskingSpec(mask_token_id=3, vocab_size=50, special_ids=(0, 1, 3))


def test_with_masking_off_each_row_still_gets_one_target_among_its_candidates():
    """probability 0: exactly the one fallback target per row, its highest-scoring candidate;
    a row of specials and padding only gets none."""
    ids, mask, spec = mlm_batch()
    ids[5, 1:] = 0
    mask[5, 1:] = False
    spec = MaskingSpec(spec.mask_token_id, spec.vocab_size, spec.special_ids, probability=0.0)
    masked, labels = mask_tokens(ids, mask, spec, torch.Generator().manual_seed(0))
    targets = labels != -100
    expected = torch.ones(len(ids), dtype=torch.long)
    expected[5] = 0
    assert torch.equal(targets.sum(dim=1), expected)
    assert not targets[:, 0].any() and not targets[:, -3:].any()
    scores = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    best = torch.where(mask & (ids >= 10), scores, -1.0).argmax(dim=1)
    assert torch.equal(targets.nonzero()[:, 1], torch.cat([best[:5], best[6:]]))


def test_masking_everything_marks_every_candidate_and_nothing_else():
    ids, mask, spec = mlm_batch(rows=2000)
    spec = MaskingSpec(spec.mask_token_id, spec.vocab_size, spec.special_ids, probability=1.0)
    masked, labels = mask_tokens(ids, mask, spec, torch.Generator().manual_seed(0))
    candidates = mask & (ids >= 10)
    assert torch.equal(labels, torch.where(candidates, ids, -100))
    assert torch.equal(masked[~candidates], ids[~candidates])
    assert masked.min() >= 0 and masked.max() < spec.vocab_size  # random ids from the vocabulary
    changed = masked[candidates]
    share = torch.stack([(changed == 3).float().mean(),
                         ((changed != 3) & (changed != ids[candidates])).float().mean()])
    assert torch.allclose(share, torch.tensor([0.8, 0.1 * 49 / 50]), atol=0.01)
    # the random ids cover the vocabulary (specials included, as in BERT)
    randomised = changed[(changed != 3) & (changed != ids[candidates])]
    assert set(randomised.tolist()) >= set(range(50)) - {3}


def test_masking_is_a_function_of_the_generator_and_leaves_its_inputs_alone():
    """The loader seeds each batch's generator by its position: a resumed run must mask the
    same tokens the same way, and the caller's ids and mask stay as they were."""
    ids, mask, spec = mlm_batch()
    ids_before, mask_before = ids.clone(), mask.clone()
    first = mask_tokens(ids, mask, spec, torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global generator must play no part
    second = mask_tokens(ids, mask, spec, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(ids, ids_before) and torch.equal(mask, mask_before)
    other = mask_tokens(ids, mask, spec, torch.Generator().manual_seed(6))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("width, height", [(91, 30), (30, 91)])
def test_the_centre_square_starts_on_a_whole_pixel(width, height):
    """30x91: the square is rows 30..59 (the odd row left over at the bottom), not 30.5..60.5."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 1] = (np.arange(height)[:, None] * 2 + np.arange(width)[None, :] * 2) % 256
    image = Image.fromarray(pixels)
    left, top = (width - 30) // 2, (height - 30) // 2
    square = image.resize((10, 10), Image.BICUBIC, box=(left, top, left + 30, top + 30))
    assert np.array_equal(image_to_array(image, 10), np.asarray(square))


@pytest.mark.parametrize("data, kind, message", [
    (None, "missing_caption", "sample has no caption"),
    (b"\xff\xfe", "non_utf8_caption", "caption is not UTF-8"),
    (b"a\xffb", "non_utf8_caption",
     "caption is not UTF-8: 'utf-8' codec can't decode byte 0xff in position 1"),
    (b"", "empty_caption", "caption is empty"), (b"  ", "empty_caption", "caption is empty"),
    (b" \n\t", "empty_caption", "caption is empty"),
])
def test_captions_that_train_nothing_are_refused_with_why(data, kind, message):
    with pytest.raises(BadData) as raised:
        decode_caption(data)
    assert raised.value.kind == kind
    assert str(raised.value).startswith(message)
