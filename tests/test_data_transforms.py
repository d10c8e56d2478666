"""Image transforms on hostile shapes: a tiny file that would expand to a huge resize, and the
centre-square resize checked against images whose answer is known; MLM masking's rates."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.pipeline.data.errors import BadData, UserError
from vlp.pipeline.data.transforms import (
    MAX_ASPECT_RATIO,
    MaskingSpec,
    decode_image,
    image_to_array,
    mask_tokens,
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
