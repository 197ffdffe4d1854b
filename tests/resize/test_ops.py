"""Unit tests for the standardization ops, roi_crop and the Ray batch function (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgpipe.resize import ops, spec
from imgpipe.resize.ops import resize_batch, resize_image
from imgpipe.resize.spec import ResizeError, ResizeSpec, parse_op
from tests import imagefactory as f
from tests.resize.conftest import clean_batch, png_of, textured_photo, two_tone

# ---------------------------------------------------------------------------- ops


def low_contrast(channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    arr = (100 + rng.integers(0, 30, size=(64, 64, 1))).astype(np.uint8)
    return np.repeat(arr, channels, axis=2)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "op,out_channels",
    [
        ("gaussian_blur", None),
        ("gaussian_blur:2.5", None),
        ("median_blur", None),
        ("median_blur:5", None),
        ("equalize", None),
        ("clahe", None),
        ("clahe:4:4", None),
        ("to_ycbcr", 3),
        ("to_lab", 3),
        ("binarize", 1),
        ("sobel", 1),
        ("canny", 1),
        ("canny:50:150", 1),
    ],
)
def test_every_op_keeps_size_and_dtype(op, out_channels, channels):
    img = low_contrast(channels)
    out = ops.apply_ops(img, [parse_op(op)])
    assert out.dtype == np.uint8
    assert out.shape == (64, 64, out_channels or channels)


@pytest.mark.parametrize("name", ["equalize", "clahe"])
@pytest.mark.parametrize("channels", [1, 3])
def test_equalization_spreads_a_narrow_histogram(name, channels):
    img = low_contrast(channels)
    out = ops.apply_ops(img, [parse_op(name)])
    assert out.std() > 2 * img.std()


def test_gaussian_blur_smooths_noise():
    rng = np.random.default_rng(1)
    noisy = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    out = ops.gaussian_blur(noisy, 1.5)
    assert np.abs(np.diff(out.astype(int), axis=1)).mean() < 0.3 * np.abs(np.diff(noisy.astype(int), axis=1)).mean()


def test_median_blur_removes_salt_and_pepper():
    img = np.full((32, 32, 1), 120, np.uint8)
    img[5, 5] = 255
    img[20, 9] = 0
    out = ops.median_blur(img, 3)
    assert (out == 120).all()


def test_to_ycbcr_matches_pil():
    arr = np.asarray(textured_photo(64, 48, seed=3))
    ours = ops.to_ycbcr(arr).astype(int)
    pil = np.asarray(Image.fromarray(arr).convert("YCbCr")).astype(int)
    assert np.abs(ours - pil).max() <= 1


def test_to_lab_of_white_and_black():
    arr = np.zeros((2, 2, 3), np.uint8)
    arr[0] = 255
    lab = ops.to_lab(arr)
    assert lab[0, 0].tolist() == [255, 128, 128]
    assert lab[1, 0].tolist() == [0, 128, 128]


def test_colour_space_of_grey_input_has_neutral_chroma():
    out = ops.to_ycbcr(low_contrast(1))
    assert out.shape[2] == 3 and (np.abs(out[:, :, 1:].astype(int) - 128) <= 1).all()


def test_binarize_splits_two_levels_with_otsu():
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = 40
    img[:, 4:] = 200
    out = ops.binarize(img)
    assert set(np.unique(out).tolist()) == {0, 255}
    assert (out[:, :4] == 0).all() and (out[:, 4:] == 255).all()


def test_sobel_and_canny_find_a_step_edge():
    img = np.zeros((32, 32, 1), np.uint8)
    img[:, 16:] = 255
    edges = ops.sobel(img)
    assert edges[:, 15:17].min() == 255  # a full step maps to 255 (kernel gain 4)
    assert edges[:, :13].max() == 0 and edges[:, 19:].max() == 0
    c = ops.canny(img)
    assert set(np.unique(c).tolist()) == {0, 255}
    assert c[:, 14:18].max() == 255 and c[:, :12].max() == 0


def test_ops_apply_after_resize_in_order():
    data = f.jpeg(300, 200, seed=9)
    gray_first = resize_image(data, ResizeSpec(size=64, ops=("binarize", "to_ycbcr")))
    assert gray_first.shape == (64, 64, 3)
    assert set(np.unique(gray_first[:, :, 0]).tolist()) <= {0, 255}
    ycc_first = resize_image(data, ResizeSpec(size=64, ops=("to_ycbcr", "binarize")))
    assert ycc_first.shape == (64, 64, 1)


@pytest.mark.parametrize(
    "text,message",
    [
        ("sharpen", "unknown op"),
        ("median_blur:4", "odd"),
        ("median_blur:3.5", "not a valid int"),
        ("gaussian_blur:0", "> 0"),
        ("gaussian_blur:x", "not a valid float"),
        ("equalize:1", "at most 0"),
        ("canny:200:100", "low <= high"),
        ("canny:50", "both thresholds"),
    ],
)
def test_bad_ops_are_refused_with_a_reason(text, message):
    with pytest.raises(ValueError, match=message):
        parse_op(text)


def test_parse_op_reads_parameters():
    assert parse_op("clahe:3:4") == ops.Op("clahe", (3.0, 4))
    assert parse_op("median_blur:5") == ops.Op("median_blur", (5,))
    assert parse_op("sobel") == ops.Op("sobel", ())


def test_spec_refuses_bad_settings():
    with pytest.raises(ValueError, match="first op"):
        ResizeSpec(ops=("equalize", "roi_crop"))
    with pytest.raises(ValueError, match="mode"):
        ResizeSpec(mode="stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pad_value"):
        ResizeSpec(pad_value=300)
    with pytest.raises(ValueError, match="size"):
        ResizeSpec(size=0)
    for bad in (0.5, 100.0, True, "2"):
        with pytest.raises(ValueError, match="max_aspect"):
            ResizeSpec(mode="whole", max_aspect=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- roi_crop


def test_roi_crop_uses_the_bbox_before_resizing():
    data = png_of(two_tone(200, 100))
    spec = ResizeSpec(size=32, mode="fixed", ops=("roi_crop",))
    left = resize_image(data, spec, bbox=(0.0, 0.0, 0.5, 1.0))
    assert left.shape == (32, 32, 3)
    assert (left[:, :, 0] > 250).all() and (left[:, :, 2] < 5).all()  # only the red half
    whole = resize_image(data, spec)  # no bbox: the op is skipped
    assert whole[:, :, 2].max() > 250 and whole[:, :, 0].max() > 250


def test_bbox_is_ignored_without_roi_crop():
    data = png_of(two_tone(200, 100))
    spec = ResizeSpec(size=32, mode="fixed")
    assert np.array_equal(resize_image(data, spec, bbox=(0.0, 0.0, 0.5, 1.0)), resize_image(data, spec))


@pytest.mark.parametrize("bbox", [(0.5, 0.0, 0.2, 1.0), (0.0, 0.0, 1.5, 1.0), (0.1, 0.2), ("a", 0, 1, 1)])
def test_bad_bbox_is_a_row_error(bbox):
    with pytest.raises(ResizeError) as info:
        resize_image(png_of(two_tone()), ResizeSpec(size=16, ops=("roi_crop",)), bbox=bbox)
    assert info.value.reason == "bad_bbox"


def test_tiny_bbox_still_resizes():
    out = resize_image(png_of(two_tone(64, 64)), ResizeSpec(size=16, ops=("roi_crop",)), bbox=(0.1, 0.1, 0.1001, 0.1001))
    assert out.shape == (16, 16, 3) and (out[:, :, 0] > 250).all()


# ---------------------------------------------------------------------------- resize_batch


BATCH = {
    "a.jpg": f.jpeg(96, 64, seed=1),
    "gray.jpg": f.grayscale_jpeg(2),
    "garbage.jpg": b"\xff\xd8\xff\xe0" + bytes(40),
    "html.jpg": f.html_as_jpg(),
    "empty.jpg": b"",
    "none.jpg": None,
    "truncated.jpg": f.truncated_jpeg(3),
    "wide.png": f.encode(f.photo(2000, 50, seed=4), "PNG"),
}


def test_resize_batch_turns_failures_into_error_rows():
    batch = clean_batch(BATCH)
    out = resize_batch(batch, ResizeSpec(size=32))
    n = len(BATCH)
    assert {k: len(v) for k, v in out.items()} == {k: n for k in out}
    reasons = dict(zip(out["path"].tolist(), out["error_reason"].tolist()))
    assert reasons == {
        "a.jpg": "",
        "gray.jpg": "",
        "garbage.jpg": "undecodable",
        "html.jpg": "undecodable",
        "empty.jpg": "missing_image",
        "none.jpg": "missing_image",
        "truncated.jpg": "undecodable",
        "wide.png": "",
    }
    for i, path in enumerate(out["path"]):
        if reasons[path]:
            assert out["error_detail"][i], "every error row says what went wrong"
            assert out["pixels"][i] == b"" and out["height"][i] == 0
        else:
            assert out["error_detail"][i] == ""
            arr = np.frombuffer(out["pixels"][i], np.uint8).reshape(out["height"][i], out["width"][i], out["channels"][i])
            assert arr.shape[:2] == (32, 32)
    assert out["channels"].tolist()[:2] == [3, 1]
    for name in ("label", "label_name", "split", "order", "sha256"):
        assert np.array_equal(out[name], batch[name]), f"{name} must pass through unchanged"
    assert out["height"].dtype == out["width"].dtype == out["channels"].dtype == np.int32


def test_decompression_bomb_is_too_large_not_a_crash():
    out = resize_batch(clean_batch({"bomb.png": f.png_bomb(14000)}), ResizeSpec(size=8))
    assert out["error_reason"].tolist() == ["too_large"]


def test_resize_batch_raw_pixels_equal_resize_image():
    batch = clean_batch({"a.jpg": BATCH["a.jpg"]})
    spec = ResizeSpec(size=40, mode="pad", ops=("clahe",))
    out = resize_batch(batch, spec)
    arr = np.frombuffer(out["pixels"][0], np.uint8).reshape(40, 40, 3)
    assert np.array_equal(arr, resize_image(BATCH["a.jpg"], spec))


def test_resize_batch_jpeg_output():
    batch = clean_batch({"a.jpg": BATCH["a.jpg"], "bad.jpg": b"nope"})
    out = resize_batch(batch, ResizeSpec(size=48, format="jpeg", jpeg_quality=90))
    assert "pixels" not in out
    good, bad = out["image"]
    assert good["path"] == "a.jpg" and bad == {"bytes": b"", "path": "bad.jpg"}
    img = Image.open(io.BytesIO(good["bytes"]))
    assert img.format == "JPEG" and img.size == (48, 48)


def test_resize_batch_bbox_column_feeds_roi_crop():
    data = png_of(two_tone(200, 100))
    batch = clean_batch({"a.png": data, "b.png": data, "c.png": data})
    batch["bbox"] = np.array([[0.0, 0.0, 0.5, 1.0], None, [0.9, 0.0, 0.1, 1.0]], dtype=object)
    out = resize_batch(batch, ResizeSpec(size=16, mode="fixed", ops=("roi_crop",)))
    assert out["error_reason"].tolist() == ["", "", "bad_bbox"]
    red = np.frombuffer(out["pixels"][0], np.uint8).reshape(16, 16, 3)
    assert (red[:, :, 2] < 5).all()


def test_resize_batch_picks_each_rows_spec_by_split():
    items = {f"{i}.jpg": f.jpeg(96 + 10 * i, 64, seed=i) for i in range(4)}
    batch = clean_batch(items)  # splits train, val, train, val
    spec = ResizeSpec(size=32)
    out = resize_batch(batch, spec, {"train": ResizeSpec(size=32, mode="whole")})
    assert out["error_reason"].tolist() == [""] * 4
    for i, (path, data) in enumerate(items.items()):
        split = batch["split"][i]
        want = resize_image(data, ResizeSpec(size=32, mode="whole") if split == "train" else spec)
        h, w, c = out["height"][i], out["width"][i], out["channels"][i]
        assert np.array_equal(np.frombuffer(out["pixels"][i], np.uint8).reshape(h, w, c), want), path
        assert (h == 37 and w > 37) if split == "train" else (h, w) == (32, 32)
    # No split column, or no split of the mapping: the spec.
    no_split = {k: v for k, v in batch.items() if k != "split"}
    assert set(resize_batch(no_split, spec, {"train": ResizeSpec(size=32, mode="whole")})["height"].tolist()) == {32}
    assert set(resize_batch(batch, spec, {"test": ResizeSpec(size=32, mode="whole")})["height"].tolist()) == {32}
    with pytest.raises(ValueError, match="output format"):
        resize_batch(batch, spec, {"train": ResizeSpec(size=32, mode="whole", format="jpeg")})


def test_resize_batch_op_failure_costs_one_row(monkeypatch):
    def broken(img):
        if img.mean() > 100:
            raise RuntimeError("boom")
        return img

    monkeypatch.setitem(ops.OP_FUNCTIONS, "equalize", broken)
    bright = png_of(np.full((40, 40, 3), 200, np.uint8))
    dark = png_of(np.full((40, 40, 3), 20, np.uint8))
    out = resize_batch(clean_batch({"bright.png": bright, "dark.png": dark}), ResizeSpec(size=8, ops=("equalize",)))
    assert out["error_reason"].tolist() == ["op_failed", ""]
    assert "boom" in out["error_detail"][0]


def test_resize_batch_unexpected_exception_is_contained(monkeypatch):
    def explode(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(ops, "resize_image", explode)
    out = resize_batch(clean_batch({"a.jpg": BATCH["a.jpg"]}), ResizeSpec(size=8))
    assert out["error_reason"].tolist() == ["resize_failed"]
    assert "MemoryError" in out["error_detail"][0]


def test_resize_batch_accepts_an_empty_batch():
    out = resize_batch(clean_batch({}), ResizeSpec(size=8))
    assert all(len(v) == 0 for v in out.values())
    assert "error_reason" in out and "pixels" in out


def test_every_declared_op_has_a_function():
    # The names live in resize_spec (no OpenCV), the work in resize_ops; roi_crop is the geometry's.
    assert set(ops.OP_FUNCTIONS) == set(spec.OPS) - {"roi_crop"}
