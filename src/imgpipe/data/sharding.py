"""Which source shard an input belongs to, when download and clean run as several pods (``shards`` above 1).

    shard = Shard(2, 8)                    # the third of eight
    shard.owns("pets/cat/001.jpg")         # True for about one key in eight, the same in every run

Every input belongs to exactly one shard, decided from its own name alone, so the pods need no
coordination and a second run puts an unchanged object in the same shard again (incremental
runs carry per shard). What is split, and by which name (:func:`imgpipe.steps.download.download`):

* a bucket prefix or a local directory: each object, by its key below the prefix;
* a URI list: each entry, by its URI as written (a malformed row by its line number);
* WebDataset shards of a brace pattern, archives and Parquet files: each file whole, by its URI.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from imgpipe.config import check_range

__all__ = ["MAX_SHARDS", "Shard"]

# Pods a sharded download + clean runs at most (the merge holds one row group of each at once).
MAX_SHARDS = 256


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        check_range("shards", self.count, 1, MAX_SHARDS, integer=True)
        check_range("shard", self.index, 0, self.count - 1, integer=True)

    def owns(self, key: str) -> bool:
        """Whether the input named ``key`` belongs to this shard (a stable hash of the name, modulo the count)."""
        if self.count == 1:
            return True
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    @property
    def name(self) -> str:
        """The shard's folder name in a run: ``00002-of-00008``."""
        return f"{self.index:05d}-of-{self.count:05d}"

    def as_dict(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count}
