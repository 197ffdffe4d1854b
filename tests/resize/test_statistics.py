"""Dataset statistics of the resize output: fixed-size sums per task, merged, checked against NumPy.

The unit tests need no Ray. The round trips resize a small generated dataset on a real
local Ray (run them inside ``scripts/in-loopback-netns``) and recompute every number of the
manifest's ``extra.statistics`` from the written files with NumPy.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from imgpipe import contract
from imgpipe.resize.config import ResizeConfig
from imgpipe.resize.ops import resize_batch
from imgpipe.resize.spec import ResizeSpec, color_space
from imgpipe.resize.statistics import (
    ASPECT_EDGES,
    MIN_STD,
    SIZE_EDGES,
    DatasetStatistics,
    SplitStatistics,
    split_moments,
)
from imgpipe.steps.resize import read_pixels, resize
from tests import imagefactory as f
from tests.helpers import CLASSES, build_clean, clean_members, read_table

# ------------------------------------------------------------------ accumulate and merge (no Ray)


def _images(seed: int, n: int, channels: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(
            0,
            256,
            size=(int(rng.integers(4, 20)), int(rng.integers(4, 20)), channels),
            dtype=np.uint8,
        )
        for _ in range(n)
    ]


def _numpy_moments(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.concatenate([im.reshape(-1, im.shape[2]) for im in images]).astype(np.float64) / 255
    return pixels.mean(axis=0), pixels.std(axis=0)


def test_moments_are_exact_and_merge_in_any_order():
    images = _images(0, 30)
    whole = SplitStatistics()
    parts = [SplitStatistics() for _ in range(3)]
    for i, im in enumerate(images):
        whole.add(i % 4, im.shape[1], im.shape[0], im)
        parts[i % 3].add(i % 4, im.shape[1], im.shape[0], im)
    merged_forward, merged_backward = SplitStatistics(), SplitStatistics()
    for part in parts:
        merged_forward.merge(SplitStatistics.from_dict(part.to_dict()))  # as a task hands it back
    for part in reversed(parts):
        merged_backward.merge(part)
    assert merged_forward.to_dict() == merged_backward.to_dict() == whole.to_dict(), "integer sums: no rounding"
    mean, std = whole.mean_std()
    want_mean, want_std = _numpy_moments(images)
    np.testing.assert_allclose(mean, want_mean, atol=1e-12)
    np.testing.assert_allclose(std, want_std, atol=1e-12)
    assert whole.images == 30 and whole.classes == {0: 8, 1: 8, 2: 7, 3: 7}
    assert sum(whole.width) == sum(whole.height) == sum(whole.aspect) == 30


def test_histograms_use_the_fixed_edges_with_open_ends():
    stats = SplitStatistics()
    pixel = np.zeros((1, 1, 3), np.uint8)
    for width, height in [(63, 63), (64, 64), (5000, 100), (100, 5000), (100, 100), (300, 200)]:
        stats.add(0, width, height, pixel)
    stats.add(0, None, None, pixel)  # a hand-made input without clean's sizes
    assert stats.width[SIZE_EDGES.index(0)] == 1 and stats.width[SIZE_EDGES.index(64)] == 3
    assert stats.width[-1] == 1, "5000 px goes in the last, open bin"
    assert stats.aspect[0] == 1 and stats.aspect[-1] == 1, "1:50 and 50:1 in the open end bins"
    assert stats.aspect[ASPECT_EDGES.index(0.95)] == 3, "the square ones"
    assert stats.aspect[ASPECT_EDGES.index(1.5)] == 1, "300 x 200: 1.5 opens its bin"
    assert (sum(stats.width), stats.unsized, stats.images) == (6, 1, 7)


def test_rows_of_another_channel_count_are_left_out_of_the_moments():
    rgb, grey = _images(1, 4), _images(2, 2, channels=1)
    task_a, task_b = SplitStatistics(), SplitStatistics()
    for im in rgb:
        task_a.add(0, 8, 8, im)
    task_a.add(0, 8, 8, grey[0])
    task_b.add(0, 8, 8, grey[1])
    task_a.merge(task_b)
    assert (task_a.images, task_a.channels, task_a.other_channels) == (6, 3, 2)
    np.testing.assert_allclose(task_a.mean_std()[0], _numpy_moments(rgb)[0], atol=1e-12)


def test_the_manifest_block_names_classes_and_floors_a_constant_channels_std():
    stats = DatasetStatistics()
    stats.add("train", 1, 10, 20, np.full((4, 4, 3), 51, np.uint8))
    stats.add("val", 0, 10, 20, np.full((4, 4, 3), 0, np.uint8))
    block = stats.manifest_block(["cat", "dog"], "RGB")
    train = block["splits"]["train"]
    assert train["images_per_class"] == {"dog": 1} and train["mean"] == [0.2, 0.2, 0.2] and train["std"] == [0.0] * 3
    assert block["size_edges"] == list(SIZE_EDGES) and len(train["aspect"]) == len(ASPECT_EDGES)
    assert split_moments({"extra": {"statistics": block}}) == ([0.2] * 3, [MIN_STD] * 3)
    assert split_moments({"extra": {}}) is None, "a manifest from before the statistics"


def test_color_space_follows_the_last_op_that_sets_one():
    assert color_space([]) == "RGB" and color_space([], "grey") == "grey"
    assert color_space(["clahe", "to_ycbcr", "gaussian_blur:1.0"]) == "YCbCr"
    assert color_space(["to_lab"]) == "Lab"
    assert color_space(["to_lab", "sobel"]) == "grey"
    with pytest.raises(ValueError, match="unknown op"):
        color_space(["to_hsv"])


def test_resize_batch_shows_each_good_row_its_stored_pixels():
    batch = {
        "path": np.array(["a.jpg", "bad.jpg", "c.png"], dtype=object),
        "image": np.array(
            [{"bytes": f.jpeg(80, 60, 1)}, {"bytes": b"junk"}, {"bytes": f.png_in_jpg(2)}],
            dtype=object,
        ),
    }
    seen: dict[int, np.ndarray] = {}
    out = resize_batch(
        batch,
        ResizeSpec(size=16, ops=("to_ycbcr",)),
        observe=lambda i, px: seen.setdefault(i, px.copy()),
    )
    assert sorted(seen) == [0, 2], "rejected rows are not observed"
    for i in seen:
        stored = np.frombuffer(out["pixels"][i], np.uint8).reshape(out["height"][i], out["width"][i], out["channels"][i])
        assert np.array_equal(seen[i], stored)


# ------------------------------------------------------------------ round trip on a real local Ray

ray_test = pytest.mark.ray


def _written(dest: str) -> tuple[dict, pa.Table]:
    manifest = contract.read_manifest(dest, expect_step="resize")
    table = pa.concat_tables([read_table(uri) for uri in contract.data_files(dest, manifest)])
    return manifest, table


def _stored(row: dict, fmt: str) -> np.ndarray:
    if fmt == "raw":
        return read_pixels(row)
    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))


def _bins(edges, values) -> list[int]:
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, None)
    return np.bincount(index, minlength=len(edges)).tolist()


def _check_statistics(source: str, dest: str, fmt: str, atol: float) -> dict:
    """Recomputes the manifest's statistics from the written files and clean's sizes; returns the block."""
    manifest, table = _written(dest)
    block = manifest["extra"]["statistics"]
    clean = pa.concat_tables([read_table(u) for u in contract.data_files(source)]).select(["path", "width", "height"])
    sizes = {r["path"]: (r["width"], r["height"]) for r in clean.to_pylist()}
    rows = table.to_pylist()
    assert set(block["splits"]) == set(manifest["extra"]["splits"])
    for split, got in block["splits"].items():
        mine = [r for r in rows if r["split"] == split]
        assert got["images"] == len(mine) == manifest["extra"]["splits"][split]
        assert got["images_per_class"] == {c: n for c in CLASSES if (n := sum(r["label_name"] == c for r in mine))}
        mean, std = _numpy_moments([_stored(r, fmt) for r in mine])
        np.testing.assert_allclose(got["mean"], mean, atol=atol)
        np.testing.assert_allclose(got["std"], std, atol=atol)
        widths = np.array([sizes[r["path"]][0] for r in mine])
        heights = np.array([sizes[r["path"]][1] for r in mine])
        assert got["width"] == _bins(SIZE_EDGES, widths) and got["height"] == _bins(SIZE_EDGES, heights)
        assert got["aspect"] == _bins(ASPECT_EDGES, widths / heights)
        assert sum(got["width"]) == sum(got["height"]) == sum(got["aspect"]) == len(mine)
        assert (got["unsized"], got["other_channels"], got["channels"]) == (0, 0, 3)
    assert sum(s["images"] for s in block["splits"].values()) == manifest["outputs"]
    return block


@ray_test
def test_manifest_statistics_match_numpy_over_the_written_images(ray_session, tmp_path):
    source = build_clean("file://" + str(tmp_path))
    dest = "file://" + str(tmp_path / "resize")
    # Small files and several tasks' worth of rows: the driver merges many partial sums.
    resize(
        source,
        dest,
        ResizeConfig(size=24, batch_size=3, rows_per_shard=4, row_group_rows=2, train_mode="whole"),
    )
    block = _check_statistics(source, dest, "raw", atol=1e-9)  # every pixel, exact sums
    assert block["color_space"] == "RGB" and block["pixel_scale"] == 255
    assert sum(s["images"] for s in block["splits"].values()) == len(clean_members())
    assert split_moments(contract.read_manifest(dest)) == (
        block["splits"]["train"]["mean"],
        block["splits"]["train"]["std"],
    )


@ray_test
def test_jpeg_output_statistics_are_of_the_pixels_before_encoding(ray_session, tmp_path):
    source = build_clean("file://" + str(tmp_path))
    dest = "file://" + str(tmp_path / "resize")
    resize(source, dest, ResizeConfig(size=24, format="jpeg", batch_size=4))
    # q95 4:4:4 moves the decoded pixels' mean and std by a fraction of a grey level.
    _check_statistics(source, dest, "jpeg", atol=2e-3)


@ray_test
def test_a_colour_space_op_is_recorded_with_its_statistics(ray_session, tmp_path):
    source = build_clean("file://" + str(tmp_path))
    dest = "file://" + str(tmp_path / "resize")
    resize(source, dest, ResizeConfig(size=24, ops=("to_ycbcr",), batch_size=4))
    block = _check_statistics(source, dest, "raw", atol=1e-9)
    assert block["color_space"] == "YCbCr"
    # Chroma of these mildly coloured photos sits near the middle of its range.
    assert all(abs(m - 0.5) < 0.1 for m in block["splits"]["train"]["mean"][1:])
