"""Evaluation images: byte ranges of files and tars, paths confined to their root, and the
pixels the model sees, which must be the ones training saw (orientation included)."""
from __future__ import annotations

import io
import tarfile
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.pipeline.data import stream
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.tar import SkipCounter
from vlp.pipeline.eval import images
from vlp.pipeline.eval.images import (
    ImageRef,
    check_images_exist,
    load_decodable_images,
    load_image,
    load_images,
    path_under,
    tar_samples,
)

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def jpeg(pixels: np.ndarray, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, **params)
    return buffer.getvalue()


def png(colour=RED, size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def quadrants(height: int = 64, width: int = 96) -> np.ndarray:
    """Blue top half; below it red on the left and green on the right."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2] = BLUE
    pixels[height // 2:, : width // 2] = RED
    pixels[height // 2:, width // 2:] = GREEN
    return pixels


def training_tensor(data: bytes, size: int) -> torch.Tensor:
    """The training loader's decode of a sample, laid out as its batches are (3, S, S)."""
    spec = SimpleNamespace(caption_key="txt", image_keys=("jpg",), image_size=size)
    pixels, caption = stream.decode_sample({"jpg": data, "txt": b"a red square"}, spec)
    assert caption == "a red square"
    return torch.from_numpy(pixels[None].copy()).permute(0, 3, 1, 2).contiguous()[0]


@pytest.mark.parametrize("size", [32, 64])
def test_evaluation_sees_the_pixels_training_saw_and_red_stays_on_the_left(tmp_path, size):
    path = tmp_path / "quadrants.jpg"
    path.write_bytes(jpeg(quadrants()))
    seen = load_image(ImageRef(str(path)), size)
    assert seen.shape == (3, size, size) and seen.dtype == torch.uint8
    assert torch.equal(seen, training_tensor(path.read_bytes(), size))
    r, g, b = seen.int()
    q = size // 4
    assert (b[:q] > 200).all() and (r[:q] < 50).all()  # top: blue
    assert (r[-q:, :q] > 200).all() and (g[-q:, :q] < 50).all()  # bottom left: red
    assert (g[-q:, -q:] > 200).all() and (r[-q:, -q:] < 50).all()  # bottom right: green


@pytest.mark.parametrize("orientation", [1, 2, 3, 6, 8])
def test_exif_orientation_is_treated_alike_by_evaluation_and_training(tmp_path, orientation):
    """A camera JPEG whose EXIF says how to turn it: both paths decode it the same way."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "camera.jpg"
    path.write_bytes(jpeg(quadrants(), exif=exif.tobytes()))
    assert Image.open(path).getexif()[0x0112] == orientation
    for size in (32, 64):
        assert torch.equal(load_image(ImageRef(str(path)), size),
                           training_tensor(path.read_bytes(), size))
    batch = load_images([ImageRef(str(path))], 32)
    pixels, mask = load_decodable_images([ImageRef(str(path))], 32, SkipCounter())
    assert torch.equal(batch[0], training_tensor(path.read_bytes(), 32))
    assert torch.equal(pixels, batch) and mask.tolist() == [True]


def test_an_image_ref_reads_its_file_or_its_byte_range(tmp_path, monkeypatch):
    path = tmp_path / "blob"
    path.write_bytes(b"0123456789")
    assert ImageRef(str(path)).read() == b"0123456789"
    assert ImageRef(str(path), offset=3, size=4).read() == b"3456"
    assert ImageRef(str(path), offset=7).read() == b"789"
    calls = []
    monkeypatch.setattr(images, "read_range", lambda *args: calls.append(args) or b"ranged")
    assert ImageRef("s3://bucket/a.tar", 512, 100, "k.jpg").read() == b"ranged"
    assert calls == [("s3://bucket/a.tar", 512, 100)]
    assert str(ImageRef("s3://bucket/a.tar", 512, 100, "k.jpg")) == "s3://bucket/a.tar:k.jpg"
    assert str(ImageRef(str(path), 3, 4)) == str(path)


def test_paths_from_annotations_stay_under_the_image_root(tmp_path):
    root = tmp_path / "images"
    assert path_under(root, "a/b.jpg", "split x") == root / "a" / "b.jpg"
    assert path_under(str(root), "a/../c.jpg", "split x") == root / "c.jpg"
    assert path_under(root, ".", "split x") == root
    for outside in ("../secret.jpg", "a/../../secret.jpg", "/etc/passwd", "../images2/x.jpg"):
        with pytest.raises(UserError, match=rf"^split x: image path '{outside}' leads outside "
                                            rf"the image root {root}; paths in annotation"):
            path_under(root, outside, "split x")


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_samples_yield_each_image_as_a_byte_range_of_the_tar(tmp_path):
    shard = tmp_path / "test-000.tar"
    a, b = png(RED), png(BLUE, (9, 9))
    write_tar(shard, [("a.cls", b"3"), ("a.jpg", a), ("a.json", b"{}"),
                      ("b.webp", b), ("b.png", a), ("b.cls", b"1"),
                      ("c.cls", b"2"), ("a.cls", b"9"), ("a.jpg", b)])
    for where in (str(shard), shard, f"file://{shard}"):
        samples = list(tar_samples(where, frozenset({"cls"})))
        assert [(key, members) for key, _, members in samples] == [
            ("a", {"cls": b"3"}), ("b", {"cls": b"1"}), ("c", {"cls": b"2"})]
        (_, first, _), (_, second, _), (_, third, _) = samples
        assert first.read() == a and first.name == "a.jpg" and first.path == str(shard)
        assert second.read() == a and second.name == "b.png"  # png before webp
        assert first.size == len(a) and first.offset % 512 == 0
        assert third is None
    assert torch.equal(load_image(first, 8), load_image(ImageRef(str(shard), first.offset,
                                                                 first.size), 8))


def test_tar_samples_take_jpg_before_png(tmp_path):
    shard = tmp_path / "s.tar"
    write_tar(shard, [("k.png", png(BLUE)), ("k.jpg", png(RED))])
    [(_, image, members)] = tar_samples(shard, frozenset())
    assert image.name == "k.jpg" and members == {}


@pytest.mark.parametrize("path, message", [
    ("http://host/a.tar", "must be local files or in object storage: http://host/a.tar"),
    ("{tmp}/a.tar.gz", "is not an uncompressed .tar: images are read in place"),
    ("{tmp}/missing.tar", "evaluation shard not found: {tmp}/missing.tar"),
])
def test_tar_samples_refuse_what_cannot_be_read_in_place(tmp_path, path, message):
    (tmp_path / "a.tar.gz").write_bytes(b"")
    path, message = path.format(tmp=tmp_path), message.format(tmp=tmp_path)
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        next(tar_samples(path, frozenset()))


def test_a_damaged_tar_is_a_user_error_naming_it(tmp_path):
    shard = tmp_path / "cut.tar"
    write_tar(shard, [("a.jpg", png()), ("b.jpg", png())])
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(UserError, match=rf"evaluation shard {shard} is unreadable \(corrupt_tar\)"):
        list(tar_samples(shard, frozenset()))


def test_object_store_shards_are_read_without_a_local_check(monkeypatch):
    calls = []

    def fake_read_samples(path, wanted, skipped, spans):
        calls.append((path, wanted, spans))
        yield {"__key__": "k", "cls": b"1"}

    monkeypatch.setattr(images, "read_samples", fake_read_samples)
    samples = list(tar_samples("s3://bucket/x.tar", frozenset({"cls"})))
    assert samples == [("k", None, {"cls": b"1"})]
    assert calls == [("s3://bucket/x.tar", frozenset({"cls"}),
                      frozenset({"jpg", "jpeg", "png", "webp"}))]


def test_missing_image_files_are_named_before_any_model_work(tmp_path):
    present = tmp_path / "here.jpg"
    present.write_bytes(b"x")
    check_images_exist([ImageRef(str(present))], "retrieval")
    refs = [ImageRef(str(tmp_path / name)) for name in ("d", "b", "a", "c", "b")] + [
        ImageRef(str(present))]
    expected = ", ".join(str(tmp_path / n) for n in "abc")
    with pytest.raises(UserError, match=rf"^4 image file\(s\) missing for retrieval, e\.g\. "
                                        rf"{expected}$"):
        check_images_exist(refs, "retrieval")


def test_load_image_names_the_file_it_cannot_read(tmp_path):
    with pytest.raises(UserError, match=r"cannot read image .*nothing\.jpg: "):
        load_image(ImageRef(str(tmp_path / "nothing.jpg")), 8)
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"cannot read image .*junk\.jpg: undecodable image"):
        load_image(ImageRef(str(tmp_path / "junk.jpg")), 8)


@pytest.fixture(params=[0, 2], ids=["no pool", "2 threads"])
def pool(request):
    if not request.param:
        yield None
        return
    with ThreadPoolExecutor(request.param) as pool:
        yield pool


def test_a_batch_keeps_its_order_and_leaves_out_what_does_not_decode(tmp_path, pool):
    refs = []
    for name, data in [("r.png", png(RED)), ("junk.png", b"junk"), ("b.png", png(BLUE)),
                       ("strip.png", png(RED, (40, 1))), ("g.png", png(GREEN))]:
        (tmp_path / name).write_bytes(data)
        refs.append(ImageRef(str(tmp_path / name)))
    skipped = SkipCounter()
    pixels, mask = load_decodable_images(refs, 4, skipped, pool)
    assert mask.tolist() == [True, False, True, False, True] and mask.dtype == torch.bool
    assert pixels.shape == (3, 3, 4, 4) and pixels.dtype == torch.uint8
    assert [tuple(p[:, 0, 0].tolist()) for p in pixels] == [RED, BLUE, GREEN]
    assert skipped.counts == {"bad_image": 1, "extreme_aspect_ratio": 1}
    good = [refs[0], refs[2], refs[4]]
    assert torch.equal(load_images(good, 4, pool), pixels)
    with pytest.raises(UserError, match="cannot read image .*junk.png"):
        load_images(refs, 4, pool)


def test_a_batch_of_undecodable_images_is_empty_and_a_missing_file_an_error(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"junk")
    pixels, mask = load_decodable_images([ImageRef(str(tmp_path / "junk.png"))] * 2, 6,
                                         SkipCounter())
    assert pixels.shape == (0, 3, 6, 6) and pixels.dtype == torch.uint8
    assert mask.tolist() == [False, False]
    with pytest.raises(UserError, match="cannot read image .*gone.png"):
        load_decodable_images([ImageRef(str(tmp_path / "gone.png"))], 6, SkipCounter())


class CountingPool(ThreadPoolExecutor):
    """A thread pool that counts the items handed to it."""

    def __init__(self):
        super().__init__(2)
        self.items = 0

    def map(self, fn, *iterables):
        items = list(iterables[0])
        self.items += len(items)
        return super().map(fn, items)


def test_a_given_pool_decodes_the_batch(tmp_path):
    path = tmp_path / "r.png"
    path.write_bytes(png(RED))
    refs = [ImageRef(str(path))] * 3
    with CountingPool() as counting:
        assert load_images(refs, 4, counting).shape == (3, 3, 4, 4)
        assert load_decodable_images(refs, 4, SkipCounter(), counting)[0].shape == (3, 3, 4, 4)
    assert counting.items == 6
