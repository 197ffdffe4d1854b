"""The serve venv: ``imgpipe[serve]``, with kserve 0.20, whose pandas < 3 this venv's pandas 3 excludes.

``make test`` builds it (``.venv/serve``) and names its python in ``$IMGPIPE_SERVE_PYTHON``; the
tests that run kserve's model server (``python -m imgpipe.serving.runtime``) start it with that
python, and import the kserve-free rest (:mod:`imgpipe.serving.model`) here. Where make test names
it, a missing one fails; a bare pytest skips in one line.
"""

from __future__ import annotations

import os

import pytest

from imgpipe.containers.catalog import serve_python

PYTHON = serve_python()
NAMED = PYTHON.exists() or "IMGPIPE_SERVE_PYTHON" in os.environ
MISSING = None if NAMED else f"no serve venv at {PYTHON} (make test builds it; kserve needs pandas<3)"
needs_serve_venv = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def python() -> str:
    """The serve venv's python; skips the test where there is none."""
    if MISSING:
        pytest.skip(MISSING)
    return str(PYTHON)
