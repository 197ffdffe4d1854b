"""3,000 mutated JPEGs through the C region decoder (imgpipe.data._jpeg_region) and the resize's window decode.

The damage is the suite's shared kinds (tests/faults/mutate.py) and more in the tables and the scan.

The decoder is C: a bad read would kill the process, not raise. So the files are decoded in a
child process; it must exit 0, and every file must give a region of its box's shape or a
ValueError (the loader's ``undecodable``), and through the resize a ``ResizeError``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from imgpipe.data import jpeg_region
from tests.conftest import ROOT

pytestmark = [
    pytest.mark.faults,
    pytest.mark.quick,
    pytest.mark.skipif(not jpeg_region.AVAILABLE, reason="imgpipe.data._jpeg_region was not built (no libjpeg headers)"),
]

FILES = 3000

CHILD = textwrap.dedent(
    """
    import io, json, random, sys
    from collections import Counter
    import numpy as np
    import simplejpeg
    from PIL import Image
    from imgpipe.data.jpeg_region import decode_box
    from imgpipe.resize.ops import resize_image
    from imgpipe.resize.spec import ResizeError, ResizeSpec
    from tests.faults.mutate import mutate

    rng = random.Random(int(sys.argv[1]))
    files = int(sys.argv[2])
    outcomes = Counter()
    bases = []
    for i, (subsampling, progressive, mode) in enumerate(
        [(2, False, "RGB"), (1, False, "RGB"), (0, False, "RGB"), (2, True, "RGB"), (2, False, "L")]
    ):
        w, h = 96 + 37 * i, 72 + 23 * i
        pixels = np.random.default_rng(i).integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        picture = Image.fromarray(pixels).resize((w, h), Image.BICUBIC).convert(mode)
        buf = io.BytesIO()
        picture.save(buf, "JPEG", quality=90, subsampling=subsampling, progressive=progressive, restart_marker_rows=i % 2)
        bases.append((buf.getvalue(), (h, w, 1 if mode == "L" else 3)))
    spec = ResizeSpec(size=32, mode="short-side-crop")
    for n in range(files):
        data, shape = rng.choice(bases)
        kind = rng.choice(("shared", "shared", "tables", "scan_bytes"))
        if kind == "shared":  # the suite's common damage: bit flips, truncation, the first bytes, zero runs, splices
            data, _ = mutate(rng, data)
        else:
            buf = bytearray(data)
            if kind == "tables":  # quantization and Huffman tables, the frame header: the first 700 bytes
                for _ in range(rng.randint(1, 6)):
                    buf[rng.randrange(2, min(len(buf), 700))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x11, 0x22, rng.randrange(256)))
            else:  # a run of random bytes in the second half of the scan
                start = rng.randrange(len(buf) // 2, len(buf) - 2)
                for i in range(start, min(len(buf) - 2, start + rng.randint(1, 400))):
                    buf[i] = rng.randrange(256)
            data = bytes(buf)
        try:  # the size the header now says, as the loader's refuse_row would have read it
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            shape = (h, w, shape[2])
        except ValueError:
            pass
        height, width, channels = shape
        if not (0 < height <= 4096 and 0 < width <= 4096):
            outcomes["header refused"] += 1
            continue
        x1, x2 = sorted(rng.sample(range(width + 1), 2))
        y1, y2 = sorted(rng.sample(range(height + 1), 2))
        num = rng.choice((1, 2, 3, 4, 5, 8))
        try:
            region = decode_box(data, shape, (x1, y1, x2, y2), num)
        except ValueError:
            outcomes["ValueError"] += 1
        else:
            assert region.dtype == np.uint8 and region.ndim == 3 and region.shape[2] == channels, region.shape
            assert region.shape[0] >= 1 and region.shape[1] >= 1
            outcomes["decoded"] += 1
        try:
            out = resize_image(data, spec)
        except ResizeError as exc:
            outcomes["resize " + exc.reason] += 1
        else:
            assert out.shape[:2] == (32, 32), out.shape
            outcomes["resize kept"] += 1
    print(json.dumps(outcomes))
    """
)


def test_mutated_jpegs_give_a_region_or_a_value_error_never_a_crash():
    run = subprocess.run([sys.executable, "-c", CHILD, "2026", str(FILES)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, f"the decoding process died (exit {run.returncode}):\n{run.stderr[-3000:]}"
    outcomes = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcomes.get("decoded", 0) > 0 and outcomes.get("ValueError", 0) > 0, outcomes
    assert sum(v for k, v in outcomes.items() if not k.startswith("resize")) == FILES, outcomes
    resize_outcomes = {"resize kept", "resize undecodable", "resize resize_failed", "resize too_large"}
    assert {k for k in outcomes if k.startswith("resize")} <= resize_outcomes, outcomes
