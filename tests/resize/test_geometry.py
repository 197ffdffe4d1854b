"""resize_image's geometry and decoding: every mode's output, and the fast decode paths against the full decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from imgpipe.data.images import validate_and_normalize
from imgpipe.resize import ops, spec
from imgpipe.resize.ops import resize_batch, resize_image, resize_image_reference
from imgpipe.resize.spec import DRAFT_MARGIN, PRESETS, ResizeError, ResizeSpec, plan_geometry
from tests import imagefactory as f
from tests.resize.conftest import clean_batch, png_of, textured_photo, two_tone


@pytest.fixture
def draft_calls(monkeypatch) -> list[tuple]:
    """Records every JPEG draft request and the reduced extent libjpeg agreed to (the window decode asks Pillow's draft too)."""
    calls: list[tuple] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        original = self.size
        result = real(self, mode, size)
        calls.append((original, size, result))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


# ---------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("mode", ["short-side-crop", "fixed", "pad"])
@pytest.mark.parametrize(
    "width,height",
    [(96, 64), (64, 96), (16, 12), (2000, 50), (50, 2000), (224, 224), (1, 1)],
)
def test_every_mode_gives_exactly_size_by_size(mode, width, height):
    data = f.encode(f.photo(width, height, seed=width + height), "PNG")
    out = resize_image(data, ResizeSpec(size=40, mode=mode))
    assert out.shape == (40, 40, 3)
    assert out.dtype == np.uint8


@pytest.mark.parametrize("preset", ["resnet", "inception", "clip", "vit-384", "efficientnet-b7"])
def test_presets_set_the_output_side(preset):
    out = resize_image(f.jpeg(640, 480, seed=3), ResizeSpec(size=PRESETS[preset]))
    assert out.shape == (PRESETS[preset], PRESETS[preset], 3)


def test_presets_cover_the_documented_families():
    assert PRESETS["224"] == PRESETS["resnet"] == 224
    assert (PRESETS["inception"], PRESETS["clip"], PRESETS["vit-384"], PRESETS["efficientnet-b7"]) == (299, 336, 384, 600)
    assert PRESETS["convnext-384"] == 384 and PRESETS["448"] == 448 and PRESETS["512"] == 512


def test_short_side_crop_box_is_the_imagenet_convention():
    # 1024x768 at 224: short side 768 -> 256 (224 / 0.875), so the kept centre square is
    # 224 / (256 / 768) = 672 source pixels wide.
    g = plan_geometry(1024, 768, ResizeSpec(size=224))
    assert g.box == pytest.approx((176.0, 48.0, 848.0, 720.0))
    assert g.out_size == (224, 224)


def test_short_side_crop_matches_torchvision_resize_then_center_crop():
    tv = pytest.importorskip("torchvision.transforms.v2.functional")
    img = textured_photo(400, 300, seed=5)
    data = f.encode(img, "PNG")
    ours = resize_image_reference(data, ResizeSpec(size=112))
    theirs = np.asarray(tv.center_crop(tv.resize(img, 128, antialias=True), [112, 112]))
    # torchvision rounds the resized long side and the crop offset to whole pixels; we
    # resize the exact (float) box, so the two differ by a sub-pixel shift only.
    assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 3.0


def test_pad_letterboxes_with_the_pad_value():
    spec = ResizeSpec(size=224, mode="pad", pad_value=114)
    g = plan_geometry(2000, 50, spec)
    assert g.out_size == (224, 6) and g.offset == (0, 109)
    arr = np.full((50, 2000, 3), 30, np.uint8)
    out = resize_image(png_of(arr), spec)
    assert (out[:109] == 114).all() and (out[115:] == 114).all()
    assert (out[109:115] == 30).all()


def test_fixed_ignores_aspect():
    out = resize_image(png_of(two_tone(200, 20)), ResizeSpec(size=32, mode="fixed"))
    assert out.shape == (32, 32, 3)
    assert (out[:, :14, 0] > 200).all() and (out[:, 18:, 2] > 200).all()


def test_grayscale_stays_one_channel():
    data = f.grayscale_jpeg()
    for mode in spec.MODES:
        out = resize_image(data, ResizeSpec(size=48, mode=mode, pad_value=7))
        # whole: 96x64 keeps its aspect, short side round(48 / 0.875) = 55.
        assert out.shape == ((55, 82, 1) if mode == "whole" else (48, 48, 1))
    padded = resize_image(data, ResizeSpec(size=48, mode="pad", pad_value=7))
    assert (padded[:8] == 7).all()  # 96x64 -> 48x32 content, 8 rows of border on top


def test_exif_rotated_input_is_upright_after_clean():
    # clean applies EXIF orientation and re-encodes; resize sees a 64x96 portrait image.
    upright = validate_and_normalize(f.exif_rotated_jpeg(6, seed=6))
    assert (upright.width, upright.height) == (64, 96)
    out = resize_image(upright.data, ResizeSpec(size=96, mode="pad", pad_value=0))
    assert out.shape == (96, 96, 3)
    assert (out[:, :14] == 0).all() and (out[:, 82:] == 0).all()  # side bars: portrait content
    assert out[:, 20:76].mean() > 10


# ---------------------------------------------------------------------------- whole


@pytest.mark.parametrize(
    "width,height,max_aspect,out_size",
    [
        (1000, 400, 2.0, (512, 205)),  # 2.5:1 > 2: long side capped at 2 * 256, aspect kept
        (400, 1000, 2.0, (205, 512)),
        (1000, 400, 3.0, (640, 256)),  # within 3:1: short side 256
        (1024, 768, 2.0, (341, 256)),
        (500, 375, 2.0, (341, 256)),
        (512, 256, 2.0, (512, 256)),  # exactly 2:1: not capped
        (224, 224, 2.0, (256, 256)),
        (16, 12, 2.0, (341, 256)),  # small images grow, as short-side-crop grows them
        (2000, 50, 2.0, (512, 13)),
        (1, 1, 2.0, (256, 256)),
        (8000, 1, 2.0, (512, 1)),  # at least one pixel
    ],
)
def test_whole_geometry_keeps_the_picture_and_its_aspect(width, height, max_aspect, out_size):
    g = plan_geometry(width, height, ResizeSpec(size=224, mode="whole", max_aspect=max_aspect))
    assert g.out_size == out_size
    assert g.box == (0.0, 0.0, width, height), "nothing is cropped"
    assert g.offset == (0, 0) and g.region is None


def test_whole_geometry_rule_over_many_shapes():
    rng = np.random.default_rng(0)
    for width, height in rng.integers(32, 4000, size=(500, 2)).tolist():
        for size, max_aspect in ((224, 2.0), (299, 1.5), (64, 4.0)):
            ow, oh = plan_geometry(width, height, ResizeSpec(size=size, mode="whole", max_aspect=max_aspect)).out_size
            short_target = round(size / spec.CROP_FRACTION)
            short, long = min(ow, oh), max(ow, oh)
            assert ow == oh or (ow > oh) == (width > height), "orientation kept"
            assert long <= round(max_aspect * short_target)
            if max(width, height) / min(width, height) <= max_aspect:
                assert short == short_target
            else:
                assert long == round(max_aspect * short_target) and 1 <= short <= short_target
            # Aspect kept: the side that was rounded is within half a pixel of the exact one.
            assert min(abs(ow - oh * width / height), abs(oh - ow * height / width)) <= 0.5


def test_whole_keeps_both_ends_that_a_centre_crop_drops():
    arr = np.full((300, 600, 3), 128, np.uint8)
    arr[:, :60] = (0, 255, 0)  # a green band at each end, outside the centre square
    arr[:, -60:] = (0, 255, 0)
    data = png_of(arr)
    whole = resize_image(data, ResizeSpec(size=56, mode="whole"))
    assert whole.shape == (64, 128, 3)
    assert (whole[:, :5, 1] > 250).all() and (whole[:, -5:, 1] > 250).all()
    assert (whole[:, 20:108, 1] < 140).all()
    cropped = resize_image(data, ResizeSpec(size=56))
    assert (cropped[:, :, 1] < 140).all(), "short-side-crop keeps only the centre"


@pytest.mark.parametrize("reference", [False, True])
def test_whole_centre_crop_is_what_short_side_crop_stores(reference):
    # whole stores "resize 256"; a centre 224 crop of it is the ImageNet eval input that
    # short-side-crop stores. 480 x 320 at 112: whole is 192 x 128 and the centre crop
    # starts at a whole pixel (40, 8), so the two are the same pixels.
    data = f.encode(textured_photo(480, 320, seed=5), "PNG")
    resize = resize_image_reference if reference else resize_image
    whole = resize(data, ResizeSpec(size=112, mode="whole"))
    assert whole.shape == (128, 192, 3)
    assert np.array_equal(whole[8:120, 40:152], resize(data, ResizeSpec(size=112)))
    # Elsewhere the offset is fractional in short-side-crop (400 x 300: 29.33 px into a
    # 170.67 px long side that whole stores as 171), so an integer centre crop of whole is
    # the same view shifted by under a pixel.


def test_whole_with_roi_crop_keeps_the_region_whole():
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:50] = two_tone(200, 50)  # red | blue on top, green below
    arr[50:] = (0, 255, 0)
    spec = ResizeSpec(size=32, mode="whole", ops=("roi_crop",))
    # The top half (200 x 50, 4:1) at size 32: short side 37, long side capped at 74.
    out = resize_image(png_of(arr), spec, bbox=(0.0, 0.0, 1.0, 0.5))
    assert out.shape == (18, 74, 3)
    assert out[:, :, 1].max() < 5, "nothing from outside the region"
    assert (out[:, :30, 0] > 250).all() and (out[:, 44:, 2] > 250).all(), "both halves kept"
    square = resize_image(png_of(arr), spec, bbox=(0.0, 0.0, 0.25, 0.5))
    assert square.shape == (37, 37, 3) and (square[:, :, 0] > 250).all()
    assert resize_image(png_of(arr), spec).shape == (37, 74, 3), "no bbox: the whole image"


def test_whole_jpeg_output_and_fast_path(draft_calls):
    data = f.encode(f.photo(2400, 1000, seed=9), "JPEG", quality=90)
    spec = ResizeSpec(size=224, mode="whole")
    fast = resize_image(data, spec)
    assert draft_calls and draft_calls[-1][2] is not None, "the draft applies to any out_size"
    ref = resize_image_reference(data, spec)
    assert fast.shape == ref.shape == (213, 512, 3)
    assert np.abs(fast.astype(np.int16) - ref.astype(np.int16)).mean() < 2.0
    out = resize_batch(clean_batch({"a.jpg": data}), ResizeSpec(size=224, mode="whole", format="jpeg"))
    img = Image.open(io.BytesIO(out["image"][0]["bytes"]))
    assert img.size == (512, 213) and (out["height"][0], out["width"][0]) == (213, 512)


# ---------------------------------------------------------------------------- fast decode


# Measured here (Pillow 13, libjpeg-turbo, 2400x1800 q90 JPEGs, bilinear, DRAFT_MARGIN 1.25):
# mean absolute difference fast vs reference, on 0..255,
#   smooth:   short-side-crop 224: 1.55  384: 1.12 | fixed 224: 0.91  384: 0.92 | pad 224: 1.19  384: 1.09
#   textured: short-side-crop 224: 1.94  384: 1.55 | fixed 224: 1.15  384: 1.08 | pad 224: 1.60  384: 1.55
# Max 1.94 (with a margin of 2: 1.55). With a margin of 1 (decode just >= the output size)
# the worst case was 4.3 on the textured image: libjpeg's DCT scaling then does the whole
# downscale with its box-like filter instead of the antialiased resize.
@pytest.mark.parametrize("kind", ["smooth", "textured"])
@pytest.mark.parametrize("mode", ["short-side-crop", "fixed", "pad", "whole"])
@pytest.mark.parametrize("size", [224, 384])
def test_fast_path_close_to_reference(kind, mode, size, draft_calls):
    img = f.photo(2400, 1800, seed=11) if kind == "smooth" else textured_photo(2400, 1800, seed=11)
    data = f.encode(img, "JPEG", quality=90)
    spec = ResizeSpec(size=size, mode=mode)
    fast = resize_image(data, spec)
    assert draft_calls and draft_calls[-1][2] is not None, "the fast path must have drafted"
    reduced = draft_calls[-1][2][1][2]
    assert reduced <= 1200, "libjpeg must have decoded at a reduced scale"
    draft_calls.clear()
    ref = resize_image_reference(data, spec)
    assert not draft_calls, "the reference decodes fully"
    mad = np.abs(fast.astype(np.int16) - ref.astype(np.int16)).mean()
    expected = plan_geometry(2400, 1800, spec).out_size[::-1] if mode == "whole" else (size, size)
    assert fast.shape == ref.shape == (*expected, 3)
    assert mad < 2.0, f"fast path drifts from the full decode: MAD {mad:.2f}"


def test_draft_keeps_the_margin_over_the_needed_resolution(draft_calls):
    data = f.encode(f.photo(2000, 1500, seed=2), "JPEG", quality=90)
    resize_image(data, ResizeSpec(size=224, mode="short-side-crop"))
    ((original, request, (_, box)),) = draft_calls
    # short side 1500 -> 256: the resize needs 256/1500 = 0.17 of the source, with the
    # 1.25 margin 0.21; the largest power-of-two reduction that keeps >= 0.21 is 1/4.
    assert original == (2000, 1500)
    assert box[2] == pytest.approx(500) and box[3] == pytest.approx(375)
    assert request[1] >= DRAFT_MARGIN * 256


def test_no_draft_when_the_image_is_not_much_larger(draft_calls):
    resize_image(f.jpeg(300, 200), ResizeSpec(size=224))
    assert draft_calls == []


def test_png_decodes_fully(draft_calls):
    data = f.encode(f.photo(1600, 1200, seed=4), "PNG")
    fast = resize_image(data, ResizeSpec(size=224))
    ref = resize_image_reference(data, ResizeSpec(size=224))
    assert draft_calls == []
    assert np.abs(fast.astype(int) - ref.astype(int)).mean() < 1.0


def test_fast_decode_off_equals_reference():
    data = f.encode(f.photo(1600, 1200, seed=4), "JPEG", quality=90)
    spec = ResizeSpec(size=128, fast_decode=False)
    assert np.array_equal(resize_image(data, spec), resize_image_reference(data, spec))


@pytest.mark.parametrize("kind", ["smooth", "textured"])
@pytest.mark.parametrize("mode", ["short-side-crop", "fixed", "pad", "whole"])
def test_warp_path_close_to_pil_where_no_draft_helps(kind, mode, monkeypatch):
    # 400 x 300 (0.12 MP) to 224: 1.2-1.8 source pixels per output pixel, no draft; the OpenCV
    # prefilter + warp stands in for PIL's bilinear filter.
    img = f.photo(400, 300, seed=5) if kind == "smooth" else textured_photo(400, 300, seed=5)
    data = f.encode(img, "JPEG", quality=90)
    spec = ResizeSpec(size=224, mode=mode)
    used = []
    real = ops.warp_resize
    monkeypatch.setattr(ops, "warp_resize", lambda *a: used.append(1) or real(*a))
    fast, ref = resize_image(data, spec), resize_image_reference(data, spec)
    assert used, "the warp path must have run"
    mad = np.abs(fast.astype(np.int16) - ref.astype(np.int16)).mean()
    assert fast.shape == ref.shape and mad < (1.0 if kind == "smooth" else 2.0), f"MAD {mad:.2f}"


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_opencv_decode_gives_pillows_pixels(mode):
    # The warp path decodes RGB and L JPEGs with OpenCV: the same libjpeg-turbo, the same pixels.
    data = f.encode(textured_photo(300, 200, seed=2).convert(mode), "JPEG", quality=90)
    with Image.open(io.BytesIO(data)) as img:
        pil = np.asarray(img.convert(mode))
        geometry = plan_geometry(img.width, img.height, ResizeSpec(size=224, mode="fixed"))
        arr = ops._decode_array(data, img, geometry)
    assert np.array_equal(arr, pil.reshape(arr.shape))


def test_opencv_decode_rejects_a_truncated_jpeg_as_pillow_does():
    data = f.encode(textured_photo(300, 200, seed=2), "JPEG", quality=90)
    spec = ResizeSpec(size=224, mode="fixed")  # 1.3x: the warp path, OpenCV's decode
    with pytest.raises(ResizeError) as err:
        resize_image(data[: len(data) // 2], spec)
    assert err.value.reason == "undecodable"
    with pytest.raises(ResizeError):
        resize_image_reference(data[: len(data) // 2], spec)


def test_whole_array_resize_maps_pixels_as_the_warp_does():
    # The whole-array shortcut (cv2.resize) and warpAffine sample the same source points.
    arr = np.asarray(textured_photo(300, 200, seed=3))
    whole = ops.warp_resize(arr, (0.0, 0.0, 300.0, 200.0), (171, 128))
    warped = ops.warp_resize(arr, (0.0, 0.0, 300.0, 200.0 - 1e-9), (171, 128))
    assert whole.shape == warped.shape == (128, 171, 3)
    assert np.abs(whole.astype(np.int16) - warped.astype(np.int16)).max() <= 2
