"""The streaming loader on resize-shaped outputs built through the output contract."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from imgpipe import contract, storage
from imgpipe.steps.resize import output_schema
from imgpipe.train.augment_config import AugmentConfig
from imgpipe.train.augment_cpu import build_train_transform
from imgpipe.train.loader import ImageLoader, ParquetImageDataset
from imgpipe.train.loader_config import LoaderConfig
from imgpipe.train.partition import describe_split
from imgpipe.train.rows import decode_jpeg_batch, read_samples
from imgpipe.writer import OutputWriter

CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 220, 40), (200, 60, 220), (40, 220, 220)]


def class_image(label: int, seed: int, size: int, channels: int = 3) -> np.ndarray:
    """An ``size x size x channels`` uint8 image whose colour and stripe direction tell its class."""
    rng = np.random.default_rng(seed)
    colour = np.array(CLASS_COLOURS[label % len(CLASS_COLOURS)], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx if label % 2 else yy) * (0.6 + 0.2 * (label // 2)))[..., None]
    img = colour * (0.75 + 0.25 * stripes) + rng.normal(0, 12, (size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    if channels == 1:
        img = np.asarray(Image.fromarray(img).convert("L"))[..., None]
    return img


def write_resize_output(
    dest: str,
    *,
    counts: dict[str, int] | None = None,
    classes: int = 4,
    size: int = 16,
    channels: int = 3,
    fmt: str = "raw",
    row_group_rows: int = 4,
    rows_per_shard: int = 12,
    seed: int = 0,
    whole: tuple[str, ...] = (),
    mislabel: Callable[[str, int], bool] | None = None,
    forge: Callable[[str, int, dict], None] | None = None,
) -> str:
    """Commits a resize-shaped output: ``SPLIT/part-NNNNN.parquet`` sorted by ``order``, labels.json, manifest.

    Splits in ``whole`` hold whole pictures, as resize mode ``whole`` stores them: sizes
    vary per row (short side ``size / 0.875``, aspect up to 2:1), and the manifest says so.
    ``mislabel(split, i)`` true gives row ``i`` of ``split`` the next class's label (its pixels
    stay its own class's): planted label errors. ``forge(split, i, row)`` may rewrite row ``i``'s
    columns in place before it is written: a forged row.
    """
    counts = counts if counts is not None else {"train": 24, "val": 8, "test": 8}
    names = [f"class_{k}" for k in range(classes)]
    out = OutputWriter(dest, "resize")
    out.begin()
    schema = output_schema(fmt)
    order = 0
    total = 0
    for split, n in counts.items():
        rows = []
        for i in range(n):
            label = i % classes
            pixels = class_image(label, seed * 100_000 + order, size, channels)
            if split in whole:
                short = round(size / 0.875)
                long = short + (order * 7) % short  # aspects from 1:1 to 2:1, both orientations
                h, w = (short, long) if i % 2 else (long, short)
                pixels = np.asarray(Image.fromarray(pixels[..., 0] if channels == 1 else pixels).resize((w, h)))
                pixels = pixels.reshape(h, w, channels)
            given = (label + 1) % classes if mislabel is not None and mislabel(split, i) else label
            row = {
                "path": f"images/{split}_{i:04d}.jpg",
                "label": given,
                "label_name": names[given],
                "split": split,
                "order": order,
                "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
                "height": pixels.shape[0],
                "width": pixels.shape[1],
                "channels": channels,
            }
            if fmt == "raw":
                row["pixels"] = pixels.tobytes()
            else:
                buf = io.BytesIO()
                Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buf, "JPEG", quality=95)
                row["image"] = {"bytes": buf.getvalue(), "path": row["path"]}
            if forge is not None:
                forge(split, i, row)
            rows.append(row)
            order += 1
        total += n
        for shard, start in enumerate(range(0, n, rows_per_shard)):
            table = pa.Table.from_pylist(rows[start : start + rows_per_shard], schema=schema)
            out.write_table(f"{split}/part-{shard:05d}.parquet", table, row_group_size=row_group_rows)
    storage.write_bytes(out.uri(contract.LABELS), json.dumps({str(i): n for i, n in enumerate(names)}).encode())
    out.commit(
        inputs=total,
        rejects=[],
        # The resize settings these rows stand for (what a model card records as its preprocessing).
        config={"generated_by": "tests", "size": size, "format": fmt, "mode": "short-side-crop", "train_mode": "whole" if "train" in whole else None},
        extra={
            "size": size,
            "format": fmt,
            "splits": counts,
            "classes": names,
            "num_classes": classes,
            "mode": "short-side-crop",
            "split_modes": {s: "whole" if s in whole else "short-side-crop" for s in counts},
        },
    )
    return out.dest


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 train rows in 4 files of 3+ row groups (row groups of 4 rows), 16 px RGB."""
    root = tmp_path_factory.mktemp("loader")
    return write_resize_output("file://" + str(root / "raw"), counts={"train": 40, "val": 10})


def epoch_indices(loader: ImageLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [i for batch in loader for i in batch["index"].tolist()]


# ------------------------------------------------------------------ iteration


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_seen_once_per_epoch_across_workers_and_two_ranks(raw_data, num_workers):
    info = describe_split(raw_data, "train")
    cfg = LoaderConfig(batch_size=3, shuffle_buffer=8, drop_last=False, num_workers=num_workers, seed=7)
    loaders = [ImageLoader(info, cfg, rank=r, world_size=2) for r in range(2)]
    orders = []
    for epoch in (0, 1):  # the same (persistent) workers serve both epochs
        per_rank = [epoch_indices(loader, epoch) for loader in loaders]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(40))
        assert [len(p) for p in per_rank] == [20, 20]
        orders.append(per_rank)
    assert orders[0] != orders[1]  # the workers saw the new epoch


def test_batches_hold_decoded_images_and_their_labels(raw_data):
    info = describe_split(raw_data, "train")
    loader = ImageLoader(info, LoaderConfig(batch_size=5, num_workers=0))
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["image"].dtype == torch.uint8
    # An N x C x H x W view of one N x H x W x C array: channels-last strides, as a CUDA model wants.
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["label"].dtype == torch.int64
    # The stored bytes come back unchanged: the rows are regenerated from their seed.
    for image, label, index in zip(batch["image"], batch["label"], batch["index"]):
        expected = class_image(int(label), int(index), 16)  # train rows use order == index
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(expected))
        assert int(label) == int(index) % 4


def test_order_changes_with_epoch_and_repeats_for_a_seed(raw_data):
    info = describe_split(raw_data, "train")
    cfg = LoaderConfig(batch_size=4, shuffle_buffer=16, num_workers=0, seed=3)
    a, b = ImageLoader(info, cfg), ImageLoader(info, cfg)
    first, second = epoch_indices(a, 0), epoch_indices(a, 1)
    assert first != second and sorted(first) == sorted(second) == list(range(40))
    assert epoch_indices(b, 0) == first and epoch_indices(b, 1) == second
    other_seed = ImageLoader(info, LoaderConfig(batch_size=4, shuffle_buffer=16, num_workers=0, seed=4))
    assert epoch_indices(other_seed, 0) != first
    unshuffled = ImageLoader(info, LoaderConfig(batch_size=4, shuffle=False, drop_last=False, num_workers=0))
    assert epoch_indices(unshuffled, 0) == epoch_indices(unshuffled, 1) == list(range(40))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_continues_in_the_same_order(raw_data, num_workers):
    info = describe_split(raw_data, "train")
    cfg = LoaderConfig(batch_size=3, shuffle_buffer=8, drop_last=False, num_workers=num_workers, seed=11)
    full = ImageLoader(info, cfg)
    full.set_epoch(2)
    reference = [b["index"].tolist() for b in full]
    interrupted = ImageLoader(info, cfg)
    interrupted.set_epoch(2)
    head = []
    for batch in interrupted:
        head.append(batch["index"].tolist())
        if len(head) == 5:
            break
    state = interrupted.state_dict()
    assert state["epoch"] == 2 and sum(state["consumed"]) == 15
    resumed = ImageLoader(info, cfg)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # a small, JSON-safe state
    assert len(resumed) == len(reference) - 5
    tail = [b["index"].tolist() for b in resumed]
    assert head + tail == reference


def test_resume_refuses_a_different_worker_layout_mid_epoch(raw_data):
    info = describe_split(raw_data, "train")
    loader = ImageLoader(info, LoaderConfig(batch_size=4, num_workers=0))
    loader.set_epoch(1)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        ImageLoader(info, LoaderConfig(batch_size=4, num_workers=2)).load_state_dict(state)
    # At an epoch boundary any layout is fine.
    fresh = ImageLoader(info, LoaderConfig(batch_size=4, num_workers=2))
    fresh.load_state_dict({"epoch": 3, "consumed": [0]})
    assert fresh.epoch == 3 and len(fresh) == fresh.epoch_batches()


def test_drop_last_gives_every_rank_the_same_number_of_full_batches(raw_data):
    info = describe_split(raw_data, "train")
    cfg = LoaderConfig(batch_size=3, shuffle_buffer=8, drop_last=True, num_workers=0, seed=5)
    loaders = [ImageLoader(info, cfg, rank=r, world_size=3) for r in range(3)]
    for epoch in range(3):
        counts = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            assert all(len(b["label"]) == 3 for b in batches)
            counts.append(len(batches))
        assert len(set(counts)) == 1 and counts[0] == loaders[0].epoch_batches() > 0
        assert counts[0] * 3 * 3 == 36  # 40 rows: 13 per rank, 4 full batches each; 4 rows left out


def test_direct_dataset_iteration_yields_the_ranks_share(raw_data):
    info = describe_split(raw_data, "train")
    cfg = LoaderConfig(batch_size=4, drop_last=False, seed=2)
    shares = [[i for b in ParquetImageDataset(info, cfg, rank=r, world_size=2) for i in b["index"].tolist()] for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(40)) and not set(shares[0]) & set(shares[1])


def test_s3_streaming_with_workers_matches_local(raw_data, s3_bucket):
    remote = write_resize_output(s3_bucket + "/data", counts={"train": 40, "val": 10})
    cfg = LoaderConfig(batch_size=4, shuffle_buffer=8, drop_last=False, num_workers=2, seed=9)
    local = ImageLoader(describe_split(raw_data, "train"), cfg)
    s3 = ImageLoader(describe_split(remote, "train"), cfg)
    for epoch in (0, 1):
        local.set_epoch(epoch)
        s3.set_epoch(epoch)
        for a, b in zip(local, s3, strict=True):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


def test_jpeg_shards_decode_in_workers_and_in_batches(tmp_path):
    data = write_resize_output("file://" + str(tmp_path / "jpeg"), counts={"train": 12}, fmt="jpeg", size=24)
    info = describe_split(data, "train")
    assert info.format == "jpeg" and (info.height, info.channels) == (24, 3)
    batch = next(iter(ImageLoader(info, LoaderConfig(batch_size=4, shuffle=False, num_workers=0))))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["image"].dtype == torch.uint8
    buf = io.BytesIO()
    Image.fromarray(class_image(0, 0, 24)).save(buf, "JPEG", quality=95)  # as write_resize_output stores it
    expected = torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1).float()
    assert (batch["image"][0].float() - expected).abs().mean() < 1  # libjpeg decoders agree to rounding
    # Left undecoded (the GPU path), the bytes decode to the same pixels in a batch.
    raw = next(iter(ImageLoader(info, LoaderConfig(batch_size=4, shuffle=False, num_workers=0), decode_device="cuda")))
    assert isinstance(raw["image"], list) and raw["image"][0].dtype == torch.uint8
    assert torch.equal(decode_jpeg_batch(raw["image"], 3, "cpu"), batch["image"])


def test_grayscale_rows_keep_one_channel(tmp_path):
    data = write_resize_output("file://" + str(tmp_path / "gray"), counts={"train": 8}, channels=1)
    info = describe_split(data, "train")
    assert info.channels == 1
    images = read_samples(info, 3)
    assert len(images) == 3 and images[0].shape == (16, 16, 1) and images[0].dtype == np.uint8
    batch = next(iter(ImageLoader(info, LoaderConfig(batch_size=8, num_workers=0))))
    assert batch["image"].shape == (8, 1, 16, 16)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_transforms_run_per_sample_with_a_seed_per_sample_and_epoch(raw_data, num_workers):
    info = describe_split(raw_data, "train")

    def noisy(image: np.ndarray, seed: int) -> np.ndarray:
        noise = np.random.default_rng(seed).integers(0, 50, image.shape)
        return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)

    def by_index(loader: ImageLoader, epoch: int) -> dict[int, torch.Tensor]:
        loader.set_epoch(epoch)
        return {int(i): img for b in loader for i, img in zip(b["index"], b["image"])}

    cfg = LoaderConfig(batch_size=4, drop_last=False, num_workers=num_workers, seed=1)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    one = by_index(ImageLoader(info, cfg, transform=noisy), 0)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    # The caller's RNG is left alone.
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    two_ranks = {}
    for r in (0, 1):  # a different partition of the same epoch draws the same augmentations
        two_ranks.update(by_index(ImageLoader(info, cfg, transform=noisy, rank=r, world_size=2), 0))
    assert all(torch.equal(one[i], two_ranks[i]) for i in range(40))
    next_epoch = by_index(ImageLoader(info, cfg, transform=noisy), 1)
    assert not torch.equal(one[0], next_epoch[0])


def test_recipe_batches_resume_exactly_and_do_not_depend_on_the_worker(raw_data):
    """The albumentations recipe through the loader: uint8 NCHW batches, the same images after a resume."""
    info = describe_split(raw_data, "train")
    transform = build_train_transform(AugmentConfig(blur_p=0.5), 12, 3)
    cfg = LoaderConfig(batch_size=3, shuffle_buffer=8, drop_last=False, num_workers=2, seed=4)

    def images(loader: ImageLoader) -> list[tuple[list[int], torch.Tensor]]:
        return [(b["index"].tolist(), b["image"]) for b in loader]

    full = ImageLoader(info, cfg, transform=transform)
    full.set_epoch(1)
    reference = images(full)
    assert reference[0][1].shape == (3, 3, 12, 12) and reference[0][1].dtype == torch.uint8
    assert reference[0][1].is_contiguous(memory_format=torch.channels_last)
    interrupted = ImageLoader(info, cfg, transform=transform)
    interrupted.set_epoch(1)
    head = []
    for batch in interrupted:
        head.append((batch["index"].tolist(), batch["image"]))
        if len(head) == 4:
            break
    resumed = ImageLoader(info, cfg, transform=transform)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    got = head + images(resumed)
    assert [i for i, _ in got] == [i for i, _ in reference]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, reference))
    # Another worker layout reads the rows in another order but augments each image alike.
    one_worker = ImageLoader(info, dataclasses.replace(cfg, num_workers=0), transform=transform)
    one_worker.set_epoch(1)
    by_index = {i: img for idx, batch in images(one_worker) for i, img in zip(idx, batch)}
    assert all(torch.equal(img, by_index[i]) for idx, batch in reference for i, img in zip(idx, batch))


def test_loader_config_rejects_bad_values():
    for kwargs, message in [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"prefetch_factor": 0}, "prefetch_factor"),
        ({"shuffle_buffer": -1}, "shuffle_buffer"),
        ({"multiprocessing_context": "thread"}, "multiprocessing_context"),
    ]:
        with pytest.raises(ValueError, match=message):
            LoaderConfig(**kwargs)


def test_whole_picture_splits_are_described_as_such(tmp_path):
    data = write_resize_output("file://" + str(tmp_path / "w"), size=16, whole=("train",))
    train, val = describe_split(data, "train"), describe_split(data, "val")
    assert train.whole and train.size == 16 and not val.whole and (val.height, val.width, val.size) == (16, 16, 16)
    rows = read_samples(train, 8)
    assert len({r.shape for r in rows}) > 1 and all(min(r.shape[:2]) == 18 for r in rows)


def test_cpu_jpeg_decode_gives_torchvisions_pixels_rgb_and_grayscale(tmp_path):
    for channels in (3, 1):
        data = write_resize_output("file://" + str(tmp_path / f"jpeg{channels}"), counts={"train": 8}, fmt="jpeg", size=24, channels=channels)
        info = describe_split(data, "train")
        cfg = LoaderConfig(batch_size=8, shuffle=False, num_workers=0)
        decoded = next(iter(ImageLoader(info, cfg)))["image"]
        files = next(iter(ImageLoader(info, cfg, decode_device="cuda")))["image"]  # the bytes, left undecoded
        assert decoded.shape == (8, channels, 24, 24)
        assert torch.equal(decode_jpeg_batch(files, channels, "cpu"), decoded)  # torchvision's decoder, the oracle


def test_a_jpeg_row_larger_than_its_row_says_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    import simplejpeg

    from imgpipe.train.rows import Row, decode_jpeg_cpu

    buf = io.BytesIO()
    Image.fromarray(class_image(0, 0, 64)).save(buf, "JPEG", quality=90)
    data = np.frombuffer(buf.getvalue(), np.uint8)

    def never(*args, **kwargs):
        raise AssertionError("decoded a JPEG its row does not describe")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", never)
    with pytest.raises(ValueError, match="64x64 image, its row says 16x16"):
        decode_jpeg_cpu([Row(0, data, (16, 16, 3))])
    with pytest.raises(ValueError):
        decode_jpeg_cpu([Row(0, np.frombuffer(b"not a jpeg at all", np.uint8), (16, 16, 3))])


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose header (its SOF0 segment) claims ``width x height``: a decompression bomb's header."""
    buf = io.BytesIO()
    Image.fromarray(class_image(0, 0, 32)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_forged_row_agreeing_with_its_huge_header_is_a_counted_reject_never_decoded(tmp_path, monkeypatch):
    import simplejpeg

    def forged(split: str, i: int, row: dict) -> None:
        if i == 5:  # its columns and its JPEG header both say 20000x20000; the split is 32x32
            row["image"]["bytes"] = jpeg_claiming(20000, 20000)
            row["height"] = row["width"] = 20000

    data = write_resize_output("file://" + str(tmp_path / "forged"), counts={"train": 12}, fmt="jpeg", size=32, forge=forged)
    info = describe_split(data, "train")
    assert (info.height, info.width) == (32, 32)  # the manifest's size, whatever a row says
    assert simplejpeg.decode_jpeg_header(jpeg_claiming(20000, 20000))[:2] == (20000, 20000)
    decoded: list[tuple[int, int]] = []
    real = simplejpeg.decode_jpeg

    def recording(data, *args, **kwargs):
        decoded.append(simplejpeg.decode_jpeg_header(data)[:2])
        return real(data, *args, **kwargs)

    monkeypatch.setattr(simplejpeg, "decode_jpeg", recording)
    loader = ImageLoader(info, LoaderConfig(batch_size=4, shuffle=False, drop_last=False, num_workers=0))
    loader.set_epoch(0)
    batches = list(loader)
    assert loader.rejected == {"not_as_declared": 1}
    assert sum(len(b["label"]) for b in batches) == 11 and all(b["image"].shape[1:] == (3, 32, 32) for b in batches)
    assert 5 not in torch.cat([b["index"] for b in batches]).tolist()
    assert [r for b in batches for r in b["rejected"]] == ["not_as_declared: 20000x20000, the train split holds 32x32 (row 5)"]
    assert len(decoded) == 11 and (20000, 20000) not in decoded


def test_every_row_is_bounded_by_the_absolute_pixel_cap_and_its_own_bytes(tmp_path):
    from imgpipe.train.partition import MAX_ROW_PIXELS
    from imgpipe.train.rows import Row, refuse_row

    data = write_resize_output("file://" + str(tmp_path / "w"), counts={"train": 4}, size=16, whole=("train",))
    info = describe_split(data, "train")
    assert refuse_row(info, Row(0, np.zeros(18 * 30 * 3, np.uint8), (18, 30, 3))) is None
    assert refuse_row(info, Row(0, np.zeros(3, np.uint8), (18, 30, 3))).startswith("unreadable:")
    assert refuse_row(info, Row(0, np.zeros(3, np.uint8), (18, 400, 3))).startswith("not_as_declared:")
    assert refuse_row(info, Row(0, np.zeros(3, np.uint8), (MAX_ROW_PIXELS, 2, 3))).startswith("not_as_declared:")
    huge = dataclasses.replace(info, size=8192, max_aspect=8.0)  # a manifest declaring more than any row may hold
    assert refuse_row(huge, Row(0, np.zeros(3, np.uint8), (9362, 20000, 3))).startswith("too_large:")
