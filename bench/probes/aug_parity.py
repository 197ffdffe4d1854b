"""Both augmentation paths against torchvision, op by op: the parity table of docs/benchmarks.md.

For every policy operation at a few magnitudes of each policy's table (both signs), on a
photo-like 64 x 64 image: the mean and largest absolute difference (0-255 levels) of the CPU
path (``train/policy_cpu.py``) and of the GPU path (``train/policy_gpu.py``, on CPU tensors
here) against torchvision's own ``_apply_image_or_video_transform``; and the share of plain red
images no longer red after RandAugment N=2 at M=5 and M=9 (the issue's check), for
torchvision, both paths, and kornia's default RandAugment (what the GPU path used before).

    python bench/probes/aug_parity.py [--json bench/results/aug_parity.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from imgpipe.train import policies  # noqa: E402
from imgpipe.train.augment import IMAGENET, BatchAugment  # noqa: E402
from imgpipe.train.augment_config import AugmentConfig  # noqa: E402
from imgpipe.train.augment_cpu import build_train_transform  # noqa: E402
from imgpipe.train.policy_cpu import apply_op as cpu_op  # noqa: E402
from imgpipe.train.policy_gpu import apply_op as gpu_op  # noqa: E402

SIZE = 64


def photo(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, SIZE)
    base = np.stack([np.outer(x, x), np.outer(1 - x, x), np.outer(x, 1 - x)], -1) * 200 + rng.integers(0, 55, (SIZE, SIZE, 3))
    return base.astype(np.uint8)


def oracle(policy: str, image: np.ndarray, op: str, magnitude: float) -> np.ndarray:
    t = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide, "autoaugment": v2.AutoAugment}[policy]()
    out = t._apply_image_or_video_transform(torch.from_numpy(image).permute(2, 0, 1), op, magnitude, interpolation=t.interpolation, fill=t._fill)
    return out.permute(1, 2, 0).numpy()


def op_rows() -> list[dict]:
    image = photo()
    rows = []
    for policy in policies.POLICY_NAMES:
        for op in policies.ALL_OPS if policy == "autoaugment" else policies.RANDAUGMENT_OPS:
            table = policies.magnitude_table(policy, op, SIZE)
            values = (
                [0.0]
                if table is None
                else sorted(
                    {float(s * table[b]) for b in (1, len(table) // 2, len(table) - 1) for s in ((1, -1) if op in policies.SIGNED_OPS else (1,))}
                )
            )
            for m in values:
                want = oracle(policy, image, op, m).astype(int)
                cpu = np.abs(cpu_op(image, op, m).astype(int) - want)
                gpu = np.abs(gpu_op(torch.from_numpy(image).permute(2, 0, 1)[None], op, m)[0].permute(1, 2, 0).numpy().astype(int) - want)
                rows.append(
                    {
                        "policy": policy,
                        "op": op,
                        "magnitude": round(m, 4),
                        "cpu_mean": float(cpu.mean()),
                        "cpu_max": int(cpu.max()),
                        "gpu_mean": float(gpu.mean()),
                        "gpu_max": int(gpu.max()),
                    }
                )
    return rows


def not_red(images: np.ndarray) -> float:
    mean = images.reshape(len(images), -1, 3).astype(int).mean(1)
    return float(np.mean(~((mean[:, 0] > 150) & (mean[:, 1] < 60) & (mean[:, 2] < 60))))


def red_rows(n: int = 400) -> list[dict]:
    from kornia.augmentation import auto

    red = np.zeros((SIZE, SIZE, 3), np.uint8)
    red[..., 0], red[..., 1:] = 200, 30
    batch = torch.from_numpy(np.repeat(red[None], n, 0)).permute(0, 3, 1, 2).contiguous()
    mean, std = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1), torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
    rows = []
    for m in (5, 9):
        torch.manual_seed(0)
        ra = v2.RandAugment(num_ops=2, magnitude=m)
        theirs = not_red(np.stack([ra(torch.from_numpy(red).permute(2, 0, 1)).permute(1, 2, 0).numpy() for _ in range(n)]))
        cfg = AugmentConfig(
            policy="randaugment",
            randaugment_n=2,
            randaugment_m=m,
            hflip=False,
            rotation=0,
            color_jitter=0,
            grayscale_p=0,
            blur_p=0,
            random_erasing=0,
            crop_scale=(1.0, 1.0),
        )
        cpu = build_train_transform(cfg, SIZE, 3)
        on_cpu = not_red(np.stack([cpu(red, i) for i in range(n)]))
        with torch.no_grad():
            out = BatchAugment(cfg, SIZE, 3)(batch, seed=1)
        on_gpu = not_red(((out * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        torch.manual_seed(0)
        policy = auto.RandAugment(n=2, m=m)  # it draws its operations once per call: one call per image
        kornia = torch.cat([(policy(batch[i : i + 1].float() / 255) * 255).round().clamp(0, 255).to(torch.uint8) for i in range(n)])
        rows.append({"m": m, "torchvision": theirs, "cpu": on_cpu, "gpu": on_gpu, "kornia_default": not_red(kornia.permute(0, 2, 3, 1).numpy())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/results/aug_parity.json")
    args = parser.parse_args()
    ops, red = op_rows(), red_rows()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"ops": ops, "red": red}, indent=2))
    by_op: dict[str, list[dict]] = {}
    for r in ops:
        by_op.setdefault(r["op"], []).append(r)
    print("| operation | cases | CPU path mean / max diff | GPU path mean / max diff |")
    print("| --- | ---: | ---: | ---: |")
    for op, rs in by_op.items():
        print(
            f"| {op} | {len(rs)} | {max(r['cpu_mean'] for r in rs):.4f} / {max(r['cpu_max'] for r in rs)} | "
            f"{max(r['gpu_mean'] for r in rs):.4f} / {max(r['gpu_max'] for r in rs)} |"
        )
    print("\n| M | torchvision | CPU path | GPU path | kornia's default (before) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in red:
        print(f"| {r['m']} | {r['torchvision']:.1%} | {r['cpu']:.1%} | {r['gpu']:.1%} | {r['kornia_default']:.1%} |")


if __name__ == "__main__":
    main()
