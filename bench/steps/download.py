"""Benchmark: a bucket prefix of small objects fetched by imgpipe's download, a plain boto3 loop and ``aws s3 sync``.

The tool a user would pick instead is the AWS CLI's ``s3 sync`` (concurrent, 10 requests at
once by default); the floor of effort is a sequential boto3 loop (list, then get each object).
All three read the same prefix of a local S3 server (SeaweedFS, the store Kubeflow ships, on 127.0.0.1;
the figures before issue 46 were taken on moto) and write to local
disk: imgpipe its Parquet shards, the others one file per object. Each run is a fresh process
(cold, as a pod runs the step), timed from outside, its peak RSS taken by GNU time; the
contenders are interleaved within each repeat.

    python bench/steps/download.py --objects 10000,100000 --repeats 2 --json bench/results/download.json

``make bench-download`` installs the AWS CLI in its own venv (``.venv/awscli``: its botocore pin
would fight imgpipe's) and runs this inside the loopback-only namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imgpipe import storage
from imgpipe.local.s3 import seaweedfs_server

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "bench-download"
AWS = ROOT / ".venv" / "awscli" / "bin" / "aws"
# The sequential loop a user writes first: list every page, get every object, write it.
BOTO3_LOOP = """
import os, sys, boto3
bucket, prefix, out = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
n = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    for obj in page.get("Contents", []):
        path = os.path.join(out, obj["Key"][len(prefix):])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
        n += 1
print(n)
"""


def populate(count: int, size: int) -> str:
    """``count`` objects of ``size`` bytes (a JPEG header, then noise) under a fresh prefix; returns it."""
    prefix = f"objs-{count}/"
    client = storage.s3_client()
    rng = np.random.default_rng(count)
    body = b"\xff\xd8\xff\xe0" + rng.integers(0, 256, size - 4, dtype=np.uint8).tobytes()

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}class-{i % 10}/{i:07d}.jpg", Body=body[: size - (i % 7)])

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(count)))
    return prefix


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one fresh process."""
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "maxrss=%M", *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: {done.stderr[-2000:]}")
    rss = int(re.findall(r"maxrss=(\d+)", done.stderr)[-1]) / 1024
    return seconds, rss


# Not a contender: one listing of the prefix and nothing fetched, what each extra pass over the
# listing costs (imgpipe lists a prefix twice: a census against the caps before the old output
# goes, then the fetch).
LISTING = """
import os, sys, boto3
bucket, prefix = sys.argv[1:3]
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
print(sum(len(page.get("Contents", [])) for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)))
"""
LISTING_NAME = "one listing and nothing fetched (boto3)"


def contenders(prefix: str, out: Path, workers: int) -> dict[str, list[str]]:
    source = f"s3://{BUCKET}/{prefix}"
    return {
        LISTING_NAME: [sys.executable, "-c", LISTING, BUCKET, prefix],
        "imgpipe download": [str(ROOT / ".venv" / "bin" / "imgpipe"), "download", source, f"file://{out}/imgpipe", "--fetch-workers", str(workers)],
        "boto3 loop (sequential)": [sys.executable, "-c", BOTO3_LOOP, BUCKET, prefix, str(out / "boto3")],
        "aws s3 sync": [str(AWS), "s3", "sync", source, str(out / "sync"), "--only-show-errors", "--endpoint-url", os.environ["AWS_ENDPOINT_URL"]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objects", default="10000,100000", help="object counts, comma-separated")
    p.add_argument("--size", type=int, default=4096, help="bytes per object")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=16, help="imgpipe's fetch_workers")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--only", help="run only these contenders (names as printed, comma-separated)")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if not AWS.exists():
        raise SystemExit(f"no AWS CLI at {AWS}: run make bench-download (it installs one)")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-seaweedfs-") as store, seaweedfs_server(Path(store)):
        # The server set the endpoint and its keys in this environment; the contenders inherit them.
        env = {**os.environ, "IMGPIPE_SOURCE_LOCAL": "1"}
        os.environ.update(env)
        storage.s3_client().create_bucket(Bucket=BUCKET)
        for count in map(int, args.objects.split(",")):
            t0 = time.perf_counter()
            prefix = populate(count, args.size)
            print(f"{count} objects of ~{args.size} B put in {time.perf_counter() - t0:.0f} s", flush=True)
            runs: dict[str, list[tuple[float, float]]] = {}
            for repeat in range(args.repeats):
                for name, cmd in contenders(prefix, Path("/nonexistent"), args.workers).items():
                    if only is not None and name not in only:
                        continue
                    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-dl-") as tmp:
                        seconds, rss = timed([a.replace("/nonexistent", tmp) for a in cmd], env)
                    runs.setdefault(name, []).append((seconds, rss))
                    print(f"  {count} #{repeat} {name}: {seconds:.1f} s, {count / seconds:.0f} obj/s, peak RSS {rss:.0f} MiB", flush=True)
            for name, values in runs.items():
                secs = [s for s, _ in values]
                results.append(
                    {
                        "objects": count,
                        "contender": name,
                        "seconds": secs,
                        "median_s": statistics.median(secs),
                        "objects_per_s": count / statistics.median(secs),
                        "peak_rss_mib": max(r for _, r in values),
                    }
                )
            storage.delete_prefix(f"s3://{BUCKET}/{prefix}")
    cli = {r["objects"]: r["median_s"] for r in results if r["contender"] == "aws s3 sync"}
    print("\n| objects | contender | median s (runs) | objects/s | vs aws s3 sync | peak RSS MiB |\n| ---: | --- | --- | ---: | ---: | ---: |")
    for r in results:
        runs_text = ", ".join(f"{s:.1f}" for s in r["seconds"])
        print(
            f"| {r['objects']:,} | {r['contender']} | {r['median_s']:.1f} ({runs_text}) | {r['objects_per_s']:.0f} | "
            f"{cli[r['objects']] / r['median_s']:.2f}x | {r['peak_rss_mib']:.0f} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"size": args.size, "workers": args.workers, "cpus": os.cpu_count(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
