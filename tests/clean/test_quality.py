"""Quality measures and outliers (imgpipe.clean.quality), and the config's range checks."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image

from imgpipe.clean.config import CleanConfig
from imgpipe.clean.decode import decode_row, measure_row
from imgpipe.clean.quality import MEASURE_SIDE, METRICS, OUTLIERS, assess, measure, phash_pair, robust_z
from imgpipe.data.images import validate_and_normalize
from imgpipe.data.synth_images import image_rng, render_image


def _photo(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    return render_image(seed % 12, image_rng(7, seed % 12, seed), size)[0]


def _measure(img: Image.Image):
    return measure(np.asarray(img))


def _pillows_thumbnails(img: Image.Image, box: tuple[float, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The thumbnail and the pHash picture as Pillow makes them: resize(BILINEAR) to 64 of ``box``, convert("L"), reduce(2)."""
    thumb = img.resize((64, 64), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0).convert("L")
    return np.asarray(thumb), np.asarray(thumb.reduce(2))


def _stats(thumb: np.ndarray, aspect: float) -> list[float]:
    g = thumb.astype(np.float64)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    p = np.bincount(thumb.ravel(), minlength=256) / thumb.size
    p = p[p > 0]
    return [g.mean(), g.std(), lap.var(), -(p * np.log2(p)).sum(), aspect]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_measures_are_numpys_statistics_of_pillows_thumbnail(mode):
    """measure() takes Pillow's antialiased thumbnail of the array; its statistics and hashes are checked with numpy and scipy."""
    rng = np.random.default_rng(4)
    for trial in range(60):
        w, h = (int(v) for v in rng.integers(1, 1800, 2))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(mode) if trial % 3 else _photo(trial, (w + 64, h + 64)).convert(mode)
        w, h = img.size
        thumb, picture = _pillows_thumbnails(img)
        got = measure(np.asarray(img))
        np.testing.assert_allclose(got.metrics, np.array(_stats(thumb, w / h), np.float32), rtol=1e-5, atol=1e-4)
        low = _dct_low(picture.astype(np.float64))
        assert got.phash == _imagehash_bits(low)
        assert got.phash_mirror == _imagehash_bits(_dct_low(picture[:, ::-1].astype(np.float64)))
        assert measure(np.asarray(img).reshape(h, w, -1)).phash == got.phash  # H x W x 1 as H x W


def test_the_extent_is_what_the_thumbnail_covers():
    """A reduced decode's last column and row are partly the decoder's padding: the thumbnail and aspect take the extent only."""
    img = _photo(2, (84, 63))
    got = measure(np.asarray(img), (83.25, 62.5))
    thumb, _ = _pillows_thumbnails(img, (0.0, 0.0, 83.25, 62.5))
    np.testing.assert_allclose(got.metrics, np.array(_stats(thumb, 83.25 / 62.5), np.float32), rtol=1e-5, atol=1e-4)


def _reduced_and_whole(data: bytes) -> tuple:
    """An image measured as clean's workers measure it (reduced decode) and from its whole decode."""
    reduced = decode_row(data, CleanConfig())
    whole = validate_and_normalize(data)
    assert reduced.scale < 1 and min(reduced.pixels.shape[:2]) >= MEASURE_SIDE and whole.scale == 1
    return measure_row(reduced), measure(whole.pixels)


@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_a_reduced_decode_measures_as_the_whole_image_does(subsampling):
    """clean measures JPEGs from their luma at a reduced DCT scale; the whole colour decode is the oracle, within stated bounds.

    Bounds from bench/scale/measures.py over 300 photo-like JPEGs (largest differences: brightness 0.32,
    contrast 0.39, entropy 0.05, blur x0.90-1.06), with room for other pictures.
    """
    k = {name: METRICS.index(name) for name in METRICS}
    for seed in range(12):
        size = (300 + 61 * seed, 260 + 37 * seed)
        buf = io.BytesIO()
        _photo(seed, size).save(buf, "JPEG", quality=85, subsampling=subsampling)
        got, want = _reduced_and_whole(buf.getvalue())
        assert abs(got.metrics[k["brightness"]] - want.metrics[k["brightness"]]) <= 1.0
        assert abs(got.metrics[k["contrast"]] - want.metrics[k["contrast"]]) <= 1.0
        assert abs(got.metrics[k["entropy"]] - want.metrics[k["entropy"]]) <= 0.1
        assert 0.8 <= got.metrics[k["blur"]] / want.metrics[k["blur"]] <= 1.25
        assert got.metrics[k["aspect_ratio"]] == np.float32(size[0] / size[1])
        assert bin(got.phash ^ want.phash).count("1") <= 6


def test_a_mirrored_copy_hashes_as_the_mirror_image():
    """The thumbnail of a mirrored picture is the mirrored thumbnail, so its pHash is the original's mirrored pHash."""
    for seed in range(20):
        arr = np.asarray(_photo(seed, (331 + 17 * seed, 250 + 9 * seed)))
        original, mirrored = measure(arr), measure(np.ascontiguousarray(arr[:, ::-1]))
        assert bin(mirrored.phash ^ original.phash_mirror).count("1") <= 2


def _dct_low(picture: np.ndarray) -> np.ndarray:
    """imagehash.phash's transform: scipy's unnormalized DCT-II along both axes, the 8 x 8 lowest."""
    from scipy.fftpack import dct

    return dct(dct(picture, axis=0), axis=1)[:8, :8]


def _imagehash_bits(low: np.ndarray) -> int:
    bits = (low > np.median(low)).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


@pytest.mark.parametrize("seed", range(6))
def test_phash_is_imagehash_phash(seed):
    img = _photo(seed, (200 + 40 * seed, 260))
    ours, mirrored = phash_pair(img)
    assert ours == int(str(imagehash.phash(img)), 16)
    assert mirrored == int(str(imagehash.phash(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))), 16)


def test_measures_are_comparable_across_sizes():
    img = _photo(1, (640, 480))
    big, small = _measure(img), _measure(img.resize((320, 240), Image.Resampling.LANCZOS))
    assert big.metrics.dtype == np.float32 and big.metrics.shape == (len(METRICS),)
    for name in ("brightness", "contrast", "entropy", "aspect_ratio"):
        k = METRICS.index(name)
        assert abs(big.metrics[k] - small.metrics[k]) <= 0.1 * max(1.0, abs(big.metrics[k]))
    blur = METRICS.index("blur")
    assert 0.5 < big.metrics[blur] / small.metrics[blur] < 2  # the same scene, not 4x the pixels
    # Blur finer than the 64-pixel thumbnail does not show: the measure is for heavy blur.
    blurred = _measure(img.resize((32, 24)).resize((640, 480), Image.Resampling.BILINEAR))
    assert blurred.metrics[blur] < big.metrics[blur] / 2


def test_blank_image_has_no_contrast():
    m = _measure(Image.new("RGB", (100, 80), (120, 30, 200))).metrics
    assert m[METRICS.index("contrast")] == 0 and m[METRICS.index("entropy")] == 0


def test_robust_z_survives_a_constant_majority():
    values = np.array([5.0] * 90 + [5.5] * 9 + [50.0])
    z = robust_z(values)
    assert z[-1] > 10 and abs(z[0]) < 1
    assert not robust_z(np.full(10, 3.0)).any()


def test_assess_flags_then_rejects_past_the_threshold():
    metrics = np.array([_measure(_photo(s)).metrics for s in range(30)])
    dark = metrics[0].copy()
    dark[METRICS.index("brightness")] = 3.0
    metrics = np.vstack([metrics, dark])
    kept = assess(metrics, blank_std=1.0, flag_z=3.5, reject_z={})
    k = [o.reason for o in OUTLIERS].index("dark")
    assert kept.flagged[-1, k] and (kept.reason == -1).all()
    rejected = assess(metrics, blank_std=1.0, flag_z=3.5, reject_z={"dark": 3.0})
    assert rejected.reasons[rejected.reason[-1]] == "dark"
    assert (rejected.reason[:-1] == -1).all()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("near_duplicate_distance", 33, "within 0..32"),
        ("near_duplicate_distance", -1, "near_duplicates=off"),
        ("near_duplicates", "drop", "reject, group or off"),
        ("outlier_z", 0, "positive robust z-score"),
        ("blank_std", -1, "within 0..128"),
        ("reject_dark", -2.0, "reject_dark must be a positive"),
        ("reject_odd_aspect", float("inf"), "reject_odd_aspect must be a finite number"),
    ],
)
def test_config_range_checks(field, value, message):
    with pytest.raises(ValueError, match=message):
        CleanConfig(**{field: value})


def test_jpeg_reencode_keeps_the_hash_close():
    img = _photo(3)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=40)
    a, _ = phash_pair(img)
    b, _ = phash_pair(Image.open(io.BytesIO(buf.getvalue())))
    assert bin(a ^ b).count("1") <= 4


def test_a_checkerboard_thumbnail_measures_without_overflow():
    """The thumbnail's Laplacian is +-1020 everywhere: its squares sum past 2 ** 31 (the blur must not wrap)."""
    board = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)  # 64 x 64: the thumbnail is the image itself
    got = measure(board).metrics[METRICS.index("blur")]
    g = board.astype(np.float64)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    assert lap.var() > 1e6
    np.testing.assert_allclose(got, lap.var(), rtol=1e-6)
