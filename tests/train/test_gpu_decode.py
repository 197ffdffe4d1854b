"""nvJPEG on CUDA never writes into memory that queued kernels still read (imgpipe.train.rows.decode_jpeg_batch).

nvJPEG's hardware engine writes its output before the work queued on the stream has run,
and PyTorch's caching allocator hands it blocks that queued kernels still read: training on
JPEG rows turned NaN within three steps on an H200 (docs/benchmarks.md, "GPU"). The
CUDA test below reproduces the hazard as upstream's report does (pytorch/vision#9606):
reads queued behind a long kernel, their tensors freed, then a decode.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from imgpipe.train.rows import decode_jpeg_batch

SIDE = 1024  # a decoded image is 3 x SIDE x SIDE bytes: the size of each freed block below


def _jpeg(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).resize((SIDE, SIDE), Image.BICUBIC)
    buf = io.BytesIO()
    coarse.save(buf, "JPEG", quality=90)  # baseline: the hardware engine's path
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def corrupted_reads(decode: Callable[[Sequence[torch.Tensor]], object], iterations: int = 40, batch: int = 8) -> int:
    """Iterations in which a reduction queued before ``decode`` read something other than its tensor's values."""
    jpegs = [_jpeg(i) for i in range(batch)]
    decode(jpegs)  # warm-up: the decoder's handles and buffers
    elements = 3 * SIDE * SIDE // 4  # float32: the bytes of one decoded image
    bad = 0
    for _ in range(iterations):
        tensors = [torch.full((elements,), float(i + 1), device="cuda") for i in range(batch)]
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # tens of ms of queued work ahead of the reductions
        sums = [t.sum() for t in tensors]
        del tensors  # freed on the stream while the reductions are still queued
        decode(jpegs)
        torch.cuda.synchronize()
        bad += any(s.item() != (i + 1) * elements for i, s in enumerate(sums))
    return bad


def test_on_cuda_the_queued_work_is_drained_before_nvjpeg_is_called(monkeypatch):
    """The order of the calls, on any machine (the CUDA calls recorded, not made)."""
    import torchvision.io

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", str(device))))

    def decode(data, mode, device):
        calls.append(("decode", str(device)))
        return [torch.zeros(3, 4, 4, dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode)
    out = decode_jpeg_batch([torch.zeros(1, dtype=torch.uint8)] * 2, 3, "cuda:0")
    assert calls == [("synchronize", "cuda:0"), ("decode", "cuda:0")]
    assert out.shape == (2, 3, 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_nvjpeg_decode_never_overwrites_memory_queued_kernels_still_read():
    assert corrupted_reads(lambda jpegs: decode_jpeg_batch(jpegs, 3, "cuda")) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_the_harness_sees_the_hazard_where_the_gpu_has_it():
    """The negative control: on GPUs with nvJPEG's hardware engine (A100, H100, H200, B200: compute
    capability 8.0, 9.0, 10.0) torchvision's decode alone corrupts the queued reads (39 of 40 on an
    H200), so the test above is not passing for want of a hazard. Should torchvision order its
    writes one day, this fails there: decode_jpeg_batch's drain can then go."""
    from torchvision.io import decode_jpeg

    if torch.cuda.get_device_capability() not in {(8, 0), (9, 0), (10, 0)}:
        pytest.skip("no hardware JPEG engine on this GPU: nvJPEG's software path orders its writes")
    assert corrupted_reads(lambda jpegs: decode_jpeg(list(jpegs), device="cuda")) > 0
