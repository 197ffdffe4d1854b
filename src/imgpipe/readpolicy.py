"""What a pipeline run may read: one policy for every storage URI its parameters name.

A task reads what its run parameters name (clean's ``labels_csv``, ``label_overrides``,
``annotations`` and ``skip_hashes_from``; train's ``weights`` and ``weights_cache``;
``previous_run_prefix``; the prefixes upstream tasks hand over) and what the files it
reads back name in turn (``latest.json``'s prefixes, a model card's data URI). Whoever
can start a run chooses those strings, so none is trusted: under this policy each must
lie below the run's ``data_root`` or below a prefix the operator lists in
:data:`READ_PREFIXES_ENV`, and a local path counts only where the operator allows local
files (:data:`SOURCE_LOCAL_ENV`, or a ``file://`` prefix listed).

    policy = ReadPolicy.for_run("s3://bucket/imgpipe")            # the kfp components
    uri = policy.check("clean.label_overrides", "s3://bucket/imgpipe/review.csv")
    ReadPolicy.trusted().check(...)                               # the CLI: the operator's own words

A refusal (:class:`ReadRefused`, a ``ValueError``) names the field and the URI, never
anything read: the check comes before the first byte is. Containment is judged on the
resolved location: ``.``, ``..`` and empty segments are refused outright, and a local
path is resolved with ``realpath``, so a link below ``data_root`` that points at ``/etc``
leads outside.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from imgpipe import storage
from imgpipe.config_flags import env_flag

__all__ = ["READ_PREFIXES_ENV", "SOURCE_LOCAL_ENV", "ReadPolicy", "ReadRefused", "odd_segment"]

READ_PREFIXES_ENV = "IMGPIPE_READ_PREFIXES"
# The operator's word that run parameters may name files in the pod (download sources too:
# imgpipe.data.sources).
SOURCE_LOCAL_ENV = "IMGPIPE_SOURCE_LOCAL"
# A local root must be two folders deep: ``/`` or ``/proc`` as data_root would make the
# policy allow the pod's own files. A bucket is a root on its own (the pod's credentials
# bound it).
_MIN_LOCAL_SEGMENTS = 2


class ReadRefused(ValueError):
    """A URI a run parameter (or a file read back) names that the run may not read."""


@dataclass(frozen=True)
class ReadPolicy:
    """Where a run may read.

    Attributes:
        roots: Normalized prefixes everything read must lie below; ``None`` allows anything
            (:meth:`trusted`).
        local: Whether local paths may be read (below a root) at all.
        refused_roots: Roots named but not counted, with why (shown in refusals).
    """

    roots: tuple[str, ...] | None
    local: bool = False
    refused_roots: tuple[str, ...] = ()

    @classmethod
    def trusted(cls) -> ReadPolicy:
        """Anything: for URIs the operator typed (``imgpipe`` commands, library callers)."""
        return cls(None, local=True)

    @classmethod
    def for_run(cls, data_root: str, environ: Mapping[str, str] | None = None) -> ReadPolicy:
        """The policy of a pipeline task: below ``data_root`` and the operator's :data:`READ_PREFIXES_ENV`.

        ``data_root`` is a run parameter too: a local one counts only when
        :data:`SOURCE_LOCAL_ENV` is ``1``, and none counts that is a
        bucket root or a top-level folder. Prefixes in :data:`READ_PREFIXES_ENV`
        (comma-separated URIs) are the operator's, so a ``file://`` one is allowed as written.

        Raises:
            ValueError: If either variable holds something unreadable.
        """
        env = os.environ if environ is None else environ
        local = env_flag(env, SOURCE_LOCAL_ENV)
        roots: list[str] = []
        refused: list[str] = []
        root = storage.normalize_uri(data_root)
        if storage.is_local(root) and not local:
            refused.append(f"data_root {root} (a local path: needs {SOURCE_LOCAL_ENV}=1)")
        elif _too_wide(root):
            refused.append(f"data_root {root} (a top-level folder reaches the pod's own files)")
        else:
            roots.append(_resolved(root))
        for item in env.get(READ_PREFIXES_ENV, "").split(","):
            if not item.strip():
                continue
            try:
                prefix = storage.normalize_uri(item.strip())
            except ValueError as exc:
                raise ValueError(f"{READ_PREFIXES_ENV} must be comma-separated s3:// or file:// prefixes; {item.strip()!r}: {exc}") from None
            if _too_wide(prefix):
                raise ValueError(f"{READ_PREFIXES_ENV}: {prefix} is a top-level folder; list a folder below it")
            local = local or storage.is_local(prefix)
            roots.append(_resolved(prefix))
        return cls(tuple(roots), local=local, refused_roots=tuple(refused))

    def check(self, field: str, uri: str) -> str:
        """``uri`` normalized, once it is known to lie below one of the roots.

        Args:
            field: What named it, as a user would find it (``clean.label_overrides``,
                ``latest.json's train prefix``).
            uri: The URI as given.

        Raises:
            ReadRefused: Naming ``field`` and ``uri`` (redacted), and what is allowed.
        """
        shown = storage.redact_uri(uri)
        try:
            normalized = storage.normalize_uri(uri)
        except ValueError as exc:
            raise ReadRefused(f"{field}: {exc}") from None
        if self.roots is None:
            return normalized
        odd = odd_segment(uri)
        if odd:
            raise ReadRefused(f"{field}: {shown} has a {odd!r} segment; name the object by its plain path")
        if storage.is_local(normalized) and not self.local:
            raise ReadRefused(
                f"{field}: {shown} is a local path, which a run parameter may not name: the pod's own files are "
                f"not data. Put it under the data root, or have the operator allow local files ({SOURCE_LOCAL_ENV}=1)"
            )
        target = _resolved(normalized)
        if any(_below(target, root) for root in self.roots):
            return normalized
        allowed = ", ".join(self.roots) or "nothing"
        refused = f" (not counted: {'; '.join(self.refused_roots)})" if self.refused_roots else ""
        raise ReadRefused(
            f"{field}: {shown} is outside what this run may read: {allowed}{refused}. Copy it below the "
            f"data root, or have the operator add its prefix to {READ_PREFIXES_ENV}"
        )

    def allows(self, uri: str) -> bool:
        """Whether :meth:`check` would pass ``uri``."""
        try:
            self.check("uri", uri)
        except ReadRefused:
            return False
        return True


def odd_segment(uri: str) -> str | None:
    """The first ``.``, ``..`` or empty segment of ``uri``'s path (a trailing ``/`` aside), if any."""
    path = urlparse(os.fspath(uri)).path if urlparse(os.fspath(uri)).scheme else os.fspath(uri)
    parts = path.strip("/").split("/") if path.strip("/") else []
    for part in parts:
        if part in ("", ".", ".."):
            return part or "//"
    return None


def _too_wide(root: str) -> bool:
    """Whether ``root`` is ``/`` or a top-level local folder (see :data:`_MIN_LOCAL_SEGMENTS`)."""
    return storage.is_local(root) and len(storage.segments(_resolved(root))) < _MIN_LOCAL_SEGMENTS


def _resolved(uri: str) -> str:
    """A normalized URI with a local path's links resolved (``realpath``); S3 keys as they are."""
    if storage.is_local(uri):
        return storage.normalize_uri(os.path.realpath(storage.local_path(uri)))
    return uri


def _below(uri: str, root: str) -> bool:
    """Whether ``uri`` is ``root`` or lies below it, segment by segment, on the same store."""
    if urlparse(uri).scheme != urlparse(root).scheme:
        return False
    have, want = storage.segments(uri), storage.segments(root)
    return have[: len(want)] == want
