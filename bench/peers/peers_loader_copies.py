"""The training-loader peers' own copies of the train images, each written once, outside the timing.

:func:`bench.peers_loader.prepare` writes imgpipe's resize outputs and then runs this script
once per copy, in the venv of the peer that reads it (FFCV and MosaicML Streaming in
``.venv/peers``): an ImageFolder and WebDataset shards of the JPEG output's very files, the
Hugging Face Arrow cache of its Parquet, FFCV's raw and JPEG ``.beton`` files and an MDS copy.

    python bench/peers/peers_loader_copies.py ffcv-jpeg --root ROOT --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

__all__ = ["COPIES", "hf_dataset", "photos", "train_files", "write_copy"]

JPEG_QUALITY = 95  # imgpipe's jpeg output (ResizeSpec.jpeg_quality); FFCV's JPEG .beton holds the same files
WDS_SHARDS = 8
COPIES = ("imagefolder", "wds", "hf", "ffcv-raw", "ffcv-jpeg", "mds")


def train_files(root: Path, fmt: str) -> list[Path]:
    return sorted((root / f"resize-{fmt}" / "train").glob("*.parquet"))


def photos(root: Path, count: int) -> list:
    """``count`` photo-like JPEGs of varying size (bench/scale/scale.py's set: sides 250-640, 37 classes)."""
    import io

    from photos import Photo
    from PIL import Image
    from scale import generate_archive

    archive = root / f"images-{count}.tar"
    generate_archive(archive, count)
    photos = []
    with tarfile.open(archive) as tar:
        for member in tar:
            data = tar.extractfile(member).read()
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
            name = Path(member.name).name
            photos.append(Photo(name, name.rsplit("_", 1)[0], width, height, data))
    return photos


def write_copy(key: str, root: Path, workers: int) -> None:
    """One peer's copy of the train images (this script's ``KEY``, run in that peer's venv)."""
    import pyarrow.parquet as pq

    # A copy under a --root written before, maybe at another size, is written anew.
    stale = root / "hf-cache" if key == "hf" else root / (f"{key}.beton" if key.startswith("ffcv") else key)
    if stale.is_dir():
        shutil.rmtree(stale)
    else:
        stale.unlink(missing_ok=True)
    if key == "imagefolder":  # the jpeg output's own bytes, as files in class folders
        for f in train_files(root, "jpeg"):
            for row in pq.read_table(f, columns=["image", "path", "label_name"]).to_pylist():
                path = root / "imagefolder" / row["label_name"] / Path(row["path"]).name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(row["image"]["bytes"])
    elif key == "wds":
        import webdataset as wds

        rows = [r for f in train_files(root, "jpeg") for r in pq.read_table(f, columns=["image", "label"]).to_pylist()]
        (root / "wds").mkdir(exist_ok=True)
        for shard in range(WDS_SHARDS):
            with wds.TarWriter(str(root / "wds" / f"shard-{shard:06d}.tar")) as sink:
                for i, r in enumerate(rows[shard::WDS_SHARDS]):
                    sink.write({"__key__": f"{shard:02d}{i:06d}", "jpg": r["image"]["bytes"], "cls": r["label"]})
    elif key == "hf":  # the Parquet to the Arrow cache, as the first load_dataset of a user does
        hf_dataset(root)
    elif key.startswith("ffcv"):
        _write_beton(root, key.split("-")[1], workers)
    elif key == "mds":
        from PIL import Image
        from streaming import MDSWriter

        classes = sorted(p.name for p in (root / "imagefolder").iterdir())
        with MDSWriter(out=str(root / "mds"), columns={"image": "jpeg", "label": "int"}) as out:
            for label, name in enumerate(classes):
                for path in sorted((root / "imagefolder" / name).iterdir()):
                    with Image.open(path) as img:  # a JpegImageFile with a filename: MDS stores the file's bytes
                        out.write({"image": img, "label": label})
    else:
        raise ValueError(f"unknown copy {key!r}")


def _write_beton(root: Path, mode: str, workers: int) -> None:
    """FFCV's .beton of the raw output's pixels (``write_mode`` raw), or of the jpeg output's very JPEG files.

    FFCV's writer encodes JPEGs itself (OpenCV at 4:2:0); the JPEG .beton holds imgpipe's
    files instead (4:4:4 at quality 95), so that both loaders decode the same bytes: each
    row's pixels carry its file, which the writer's encoder hands back unchanged.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields import rgb_image as ffcv_rgb
    from ffcv.writer import DatasetWriter

    table = pa.concat_tables(pq.read_table(f, columns=["path", "pixels", "height", "width", "label"]) for f in train_files(root, "raw"))
    paths, pixels, heights, widths, labels = (table.column(c).to_pylist() for c in ("path", "pixels", "height", "width", "label"))
    files: dict[str, bytes] = {}
    if mode == "jpeg":
        jpegs = pa.concat_tables(pq.read_table(f, columns=["path", "image"]) for f in train_files(root, "jpeg"))
        files = {p: img["bytes"] for p, img in zip(jpegs.column("path").to_pylist(), jpegs.column("image").to_pylist())}
        if set(files) != set(paths):
            raise ValueError("the raw and jpeg resize outputs hold different images")

    class WithFile(np.ndarray):
        jpeg: bytes

    encode = ffcv_rgb.encode_jpeg

    def same_file(image: np.ndarray, quality: int) -> np.ndarray:
        return np.frombuffer(image.jpeg, np.uint8) if isinstance(image, WithFile) else encode(image, quality)

    ffcv_rgb.encode_jpeg = same_file  # the writer's workers are forked after this

    class Rows:
        def __len__(self) -> int:
            return len(pixels)

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            image = np.frombuffer(pixels[i], np.uint8).reshape(heights[i], widths[i], 3)
            if mode == "jpeg":
                image = image.view(WithFile)
                image.jpeg = files[paths[i]]
            return image, labels[i]

    fields = {"image": RGBImageField(write_mode="jpg" if mode == "jpeg" else mode, jpeg_quality=JPEG_QUALITY), "label": IntField()}
    DatasetWriter(str(root / f"ffcv-{mode}.beton"), fields, num_workers=workers).from_indexed_dataset(Rows())


def hf_dataset(root: Path) -> Any:
    import datasets

    files = [str(f) for f in train_files(root, "jpeg")]
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(root / "hf-cache"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("copy", choices=COPIES)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    write_copy(args.copy, args.root, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
