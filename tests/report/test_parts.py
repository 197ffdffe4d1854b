"""imgpipe.report.parts: what a report keeps of an output's rejects table."""

from __future__ import annotations

import pyarrow as pa

from imgpipe.report import parts
from imgpipe.report.output import ReportLimits


def test_a_large_rejects_table_becomes_its_first_rows_per_reason_and_its_counts(monkeypatch):
    reasons = ["near_duplicate"] * 5000 + ["unreadable", "near_duplicate", "too_small"] * 10
    table = pa.table(
        {
            "path": [f"images/{i:05d}.jpg" for i in range(len(reasons))],
            "reason": reasons,
            "detail": [None] * len(reasons),
            "sha256": ["0" * 64] * len(reasons),
        }
    )
    monkeypatch.setattr(parts.contract, "read_rejects", lambda prefix: table)
    manifest = {"rejected": len(reasons), "rejects_by_reason": {"near_duplicate": 5010, "unreadable": 10, "too_small": 10}}
    tables, sample = parts.rejects_tables("file:///nowhere", manifest, ReportLimits(table_rows=7), per_reason=3)
    assert (sample.total, sample.reasons) == (5030, {"near_duplicate", "unreadable", "too_small"})
    assert [r["path"] for r in sample.rows] == [f"images/{i:05d}.jpg" for i in (0, 1, 2, 5000, 5002, 5003, 5005, 5006, 5008)]
    assert set(sample.rows[0]) == {"path", "reason", "detail"}
    listing = tables[1]
    assert len(listing.rows) == 7 and listing.note == "first 7 of 5030"
    assert parts.rejects_tables("file:///nowhere", {"rejected": 0}, ReportLimits())[1] == parts.RejectSample()
