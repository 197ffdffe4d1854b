"""Pictures and batches the resize tests share: textured photos, two-tone arrays, a batch shaped as clean's output."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests import imagefactory as f


def textured_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image with mid-frequency texture: harder on downscaling than f.photo."""
    rng = np.random.default_rng(seed)
    base = np.asarray(f.photo(width, height, seed), dtype=np.float32)
    noise = rng.normal(128, 40, size=(height // 2, width // 2, 3)).clip(0, 255).astype(np.uint8)
    noise = np.asarray(Image.fromarray(noise).resize((width, height), Image.BILINEAR), np.float32) - 128
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def two_tone(width: int = 64, height: int = 64, left=(255, 0, 0), right=(0, 0, 255)) -> np.ndarray:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = left
    arr[:, width // 2 :] = right
    return arr


def png_of(arr: np.ndarray) -> bytes:
    return f.encode(Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr), "PNG")


def clean_batch(items: dict[str, bytes | None]) -> dict[str, np.ndarray]:
    """A batch shaped as Ray Data hands clean's columns to a numpy batch function."""
    n = len(items)
    paths = list(items)
    image = np.empty(n, dtype=object)
    for i, (p, data) in enumerate(items.items()):
        image[i] = None if data is None else {"bytes": data, "path": p}
    return {
        "path": np.array(paths, dtype=object),
        "image": image,
        "label": np.arange(n, dtype=np.int32),
        "label_name": np.array([f"class{i}" for i in range(n)], dtype=object),
        "split": np.array(["train", "val"] * (n // 2) + ["train"] * (n % 2), dtype=object),
        "order": np.arange(n, dtype=np.int64)[::-1].copy(),
        "sha256": np.array([f"{i:064x}" for i in range(n)], dtype=object),
    }
