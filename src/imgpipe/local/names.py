"""Where a local run (``imgpipe run``) keeps things: the names its store, its run and the command line share.

Light on purpose: every ``imgpipe`` command reads these before it knows whether it needs the store.
"""

from __future__ import annotations

__all__ = ["DEFAULT_WORKDIR", "LOCAL_BUCKET", "STORE_DIR", "in_local_store"]

# The bucket of the local object store (SeaweedFS, imgpipe.local.s3) a local run writes to.
LOCAL_BUCKET = "imgpipe-local"
# A local run's directory (``--workdir``): kfp's outputs, logs, copies of results and, in STORE_DIR, the store's data.
DEFAULT_WORKDIR = "./.data"
STORE_DIR = "seaweedfs"


def in_local_store(uri: object) -> bool:
    """Whether ``uri`` names something in the local run's bucket (``s3://imgpipe-local``)."""
    return isinstance(uri, str) and (uri == f"s3://{LOCAL_BUCKET}" or uri.startswith(f"s3://{LOCAL_BUCKET}/"))
