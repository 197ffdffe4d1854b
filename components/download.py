"""The download component: source archives into the run's ``download/`` (and ``annotations/``) prefix."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Metrics, Output

from imgpipe.containers.catalog import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def download(
    source_uri: str,
    data_root: str,
    run_id: str,
    dataset: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    source_sha256: str = "",
    annotations_uri: str = "",
    annotations_sha256: str = "",
    previous_run_prefix: str = "",
    step_config: Optional[dict] = None,  # kfp reads typing.Optional, not `dict | None`
) -> None:
    """Streams the images (an archive, a bucket prefix, a URI list, WebDataset shards, Parquet) into Parquet shards.

    ``metrics`` and ``report`` describe the images' output (the UI's view of the step). With
    ``previous_run_prefix`` (``latest``, or an earlier run's clean output) a bucket prefix or
    URI list fetches only the objects that are new or changed since that run's download.

    The URIs are run parameters, so they get the pod's source policy (``SourcePolicy.from_env``):
    no local files, loopback, metadata or private addresses unless the environment allows them.
    """
    from imgpipe import config
    from imgpipe.data.sources import SourcePolicy
    from imgpipe.stepio import artifacts as ka
    from imgpipe.stepio import lineage
    from imgpipe.stepio.publish import publish_step_report
    from imgpipe.steps.download import DownloadConfig, download

    def fetch(uri: str, sha256: str, step: str, previous: str | None = None) -> str:
        cfg = config.step_config(DownloadConfig, step_config, "download", sha256=[sha256] if sha256 else None)
        return download(
            [uri], ka.task_prefix(data_root, run_id, step, [uri, previous], cfg), cfg, policy=SourcePolicy.from_env(), previous=previous
        ).dest

    annotations = fetch(annotations_uri, annotations_sha256, "annotations") if annotations_uri else ""
    sources = lineage.dataset_sources([source_uri])  # "latest" is this dataset's, not another's in the data root
    previous = ka.resolve_previous(data_root, previous_run_prefix, ka.read_policy(data_root), step="download", sources=sources)
    images = fetch(source_uri, source_sha256, "download", previous)
    publish_step_report(images, metrics=metrics, report=report)
    ka.write_step_artifact(dataset, images, annotations=annotations)
