"""One seeded mutation of a file's bytes: the fuzzing suites' shared damage (test_fuzz, test_fuzz_jpeg_region)."""

from __future__ import annotations

import random

__all__ = ["mutate"]


def mutate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """``data`` with one seeded kind of damage; returns the bytes and the kind's name."""
    buf = bytearray(data)
    kind = rng.choice(("bitflip", "truncate", "header", "zero_run", "splice"))
    if kind == "bitflip":
        for _ in range(rng.randint(1, 32)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del buf[rng.randrange(1, len(buf)) :]
    elif kind == "header":  # width, height, chunk lengths and markers live in the first bytes
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(min(64, len(buf)))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    elif kind == "zero_run":
        start = rng.randrange(len(buf))
        buf[start : start + rng.randint(1, 512)] = bytes(min(len(buf) - start, rng.randint(1, 512)))
    else:  # a piece of the file repeated somewhere else
        a, b = sorted(rng.randrange(len(buf)) for _ in range(2))
        at = rng.randrange(len(buf))
        buf[at:at] = buf[a:b]
    return bytes(buf), kind
