"""No credential a run was given ends up in anything the run leaves behind.

The run gets static S3 keys and an image archive URL carrying a password and a
presigned-style signature; afterwards the compiled pipeline, every object the run
wrote (manifests, config.yaml, report.html, data), the kfp artifacts and metadata
under the local pipeline root, and everything the steps logged are searched for
each secret value.

One exception, which is Kubeflow's and not imgpipe's: a pipeline parameter is part of
the run. KFP stores it with the run, puts it in each task's executor input (a pod
argument on a cluster), and ``kfp.local`` prints that input. The parameter's exact
value is therefore blanked out of the logs before the search; everything imgpipe itself
writes or logs must hold no part of it. docs/reliability.md says what that means for
users: a credential never belongs in a parameter.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
from pathlib import Path

import pytest

from imgpipe import storage
from imgpipe.cli import main
from imgpipe.data.synth import SynthConfig, generate
from imgpipe.local.run import LocalRunConfig, run_local
from imgpipe.local.s3 import ADMIN_USER, S3Identity, seaweedfs_server
from tests import serving

ACCESS_KEY = "AKIAIMGPIPESECRET4711"
SECRET_KEY = "imgpipe-secret-key-0f3c9a7e55d1"
URL_PASSWORD = "imgpipe-url-password-77ab"
URL_SIGNATURE = "imgpipe-presigned-signature-5e21"
URL_TOKEN = "imgpipe-url-token-3c9e81"  # a token in a query string (Hugging Face's, a CDN's)
OVERRIDES_SIGNATURE = "imgpipe-overrides-signature-a4d0"  # clean.label_overrides, presigned
ENV_TOKEN = "imgpipe-env-token-19b7c2e5"  # a token the environment holds (a registry's, Label Studio's)
SECRETS = (ACCESS_KEY, SECRET_KEY, URL_PASSWORD, URL_SIGNATURE, URL_TOKEN, OVERRIDES_SIGNATURE, ENV_TOKEN)
pytestmark = pytest.mark.quick  # make test runs it too (issue 83: no secret at rest)


@pytest.fixture
def archive_server(tmp_path):
    """Serves a sample archive over HTTP on loopback; yields (base URL, its sha256)."""
    synth = tmp_path / "synth"
    generate(str(synth), SynthConfig(classes=3, per_class=6, seed=1), progress=False)
    handler = functools.partial(_QuietHandler, directory=str(synth))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = serving.start(server)
    digest = hashlib.sha256((synth / "images.tar.gz").read_bytes()).hexdigest()
    yield f"127.0.0.1:{server.server_address[1]}", digest
    serving.stop(server, thread)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _hits(blob: bytes, where: str) -> list[str]:
    hits = []
    for secret in SECRETS:
        at = blob.find(secret.encode())
        if at >= 0:
            context = blob[max(0, at - 150) : at + 60].decode("utf-8", "replace")
            hits.append(f"{secret} in {where}: ...{context}...")
    return hits


@pytest.mark.ray
def test_no_secret_in_outputs_artifacts_or_logs(tmp_path, monkeypatch, capfd, archive_server, figures):
    host, digest = archive_server
    monkeypatch.setenv("IMGPIPE_SOURCE_NETWORKS", "127.0.0.1/32")  # the archive server is on loopback
    monkeypatch.setenv("IMGPIPE_MODEL_REGISTRY_TOKEN", ENV_TOKEN)
    # A store of its own whose one identity has the secret keys (the server sets the environment).
    store = seaweedfs_server(tmp_path / "seaweedfs", S3Identity(ADMIN_USER, ACCESS_KEY, SECRET_KEY))
    with store:
        storage.s3_client().create_bucket(Bucket="secrets")
        storage.write_bytes("s3://secrets/imgpipe/review/label_overrides.csv", b"path,label\n")
        storage.write_bytes("s3://secrets/imgpipe/src/annotations.tar.gz", (tmp_path / "synth" / "annotations.tar.gz").read_bytes())
        _run_and_search(tmp_path, capfd, host, digest, figures)


def _run_and_search(tmp_path, capfd, host, digest, figures):
    s3_bucket = "s3://secrets"
    source = f"http://reader:{URL_PASSWORD}@{host}/images.tar.gz?X-Amz-Signature={URL_SIGNATURE}&X-Amz-Expires=600"
    annotations = f"{s3_bucket}/imgpipe/src/annotations.tar.gz?token={URL_TOKEN}"
    overrides = f"{s3_bucket}/imgpipe/review/label_overrides.csv?X-Amz-Signature={OVERRIDES_SIGNATURE}"
    result = run_local(
        LocalRunConfig(
            data_root=f"{s3_bucket}/imgpipe",
            workdir=str(tmp_path / "work"),
            source=source,
            annotations=annotations,
            params={"image_size": 32, "model": "tiny_cnn", "epochs": 1, "batch_size": 4, "source_sha256": digest},
            step_config={"clean": {"workers": 1, "label_overrides": overrides}, "train": {"max_steps_per_epoch": 2, "device": "cpu"}},
        )
    )
    assert result.reconciled
    compiled = tmp_path / "pipeline.yaml"
    assert main(["compile", str(compiled)]) == 0
    logs = capfd.readouterr()

    hits: list[str] = []
    scanned = {"objects": 0, "local_files": 0, "log_bytes": len(logs.out) + len(logs.err)}
    for obj in storage.list_objects(f"{s3_bucket}/imgpipe"):
        hits += _hits(storage.read_bytes(obj.uri), obj.uri)
        scanned["objects"] += 1
    for path in [compiled, *Path(tmp_path / "work").rglob("*")]:
        if path.is_file():
            hits += _hits(path.read_bytes(), str(path))
            scanned["local_files"] += 1
    logged = (logs.out + logs.err).replace(source, "<the source_uri parameter, as KFP echoes it>")
    logged = logged.replace(annotations, "<the annotations_uri parameter, as KFP echoes it>")
    hits += _hits(logged.encode(), "the captured logs")
    hits += _hits(repr(result.metadata).encode(), "the kfp artifact metadata")
    assert not hits, hits
    figures.update(secrets=len(SECRETS), hits=0, parameter_echoes_by_kfp=(logs.out + logs.err).count(source), **scanned)
