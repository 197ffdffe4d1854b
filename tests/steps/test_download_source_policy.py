"""Which sources the download step reaches: credentials kept out of outputs, the source policy, link-local addresses."""

from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path

import pytest

from imgpipe import contract, storage
from imgpipe.cli import main
from imgpipe.data.sources import SOURCE_LOCAL_ENV, SOURCE_NETWORKS_ENV, SourcePolicy, SourceRefused
from imgpipe.steps.download import DownloadConfig, download
from tests.helpers import FAST, IMAGES, _sha, assert_rows_match, forbid_metadata_connections, make_dir, make_tar
from tests.steps.conftest import HttpServer, Route

# --------------------------------------------------------------------------- credentials in source URLs

# Presigned URLs carry a signature and an access key in the query, user:pass@ a password.
SECRETS = ("hunter2", "s3cr3tsignature", "AKIAEXAMPLEKEY")
PRESIGNED = "?X-Amz-Credential=AKIAEXAMPLEKEY%2F20260101&X-Amz-Signature=s3cr3tsignature"


def test_credentials_in_a_source_url_are_never_persisted_or_logged(
    tmp_path: Path, http_server: HttpServer, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/pets/images.tar.gz" + PRESIGNED] = Route(data)
    url = http_server.base.replace("http://", "http://alice:hunter2@") + "/pets/images.tar.gz" + PRESIGNED
    dest = str(tmp_path / "out")
    download(url, dest, FAST)
    with pytest.raises(FileNotFoundError) as missing:
        download(url.replace("images.tar.gz", "gone.tar.gz"), str(tmp_path / "out2"), FAST)
    written = b"".join(storage.read_bytes(o.uri) for o in storage.list_objects(dest))
    captured = capfd.readouterr()
    seen = written.decode("latin-1") + captured.out + captured.err + caplog.text + str(missing.value)
    assert not [s for s in SECRETS if s in seen], "a credential from the URL was persisted or logged"
    source = contract.read_manifest(dest)["extra"]["sources"][0]["uri"]
    assert source == http_server.base + "/pets/images.tar.gz (credentials and query removed)"
    assert_rows_match(dest, IMAGES)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://u:p@h.example:8443/a/b.tar?sig=x#frag", "https://h.example:8443/a/b.tar (credentials and query removed)"),
        ("https://h.example/a.tar", "https://h.example/a.tar"),
        ("s3://bucket/key.tar", "s3://bucket/key.tar"),
        ("/data/images.tar", "/data/images.tar"),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert storage.redact_uri(uri) == shown


# --------------------------------------------------------------------------- source policy


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every (host, port) urllib3 opens a socket to: proves a refusal came before connecting."""
    import urllib3.util.connection

    seen: list[tuple[str, int]] = []
    real = urllib3.util.connection.create_connection

    def spy(address, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(tuple(address[:2]))
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", spy)
    return seen


@pytest.fixture
def pipeline_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A pod's environment: no local sources, no extra networks (tests add what they need)."""
    monkeypatch.delenv(SOURCE_LOCAL_ENV, raising=False)
    monkeypatch.delenv(SOURCE_NETWORKS_ENV, raising=False)
    return monkeypatch


def _pinned(data: bytes) -> DownloadConfig:
    return dataclasses.replace(FAST, sha256=(_sha(data),))


def test_from_env_reaches_loopback_only_when_its_network_is_listed(
    tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch, connections: list
) -> None:
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/a.tar.gz"] = Route(data)
    url = http_server.base + "/a.tar.gz"

    with pytest.raises(SourceRefused, match=r"reaches 127\.0\.0\.1, which is not a globally routable.*IMGPIPE_SOURCE_NETWORKS"):
        download(url, str(tmp_path / "no"), _pinned(data), policy=SourcePolicy.from_env())
    assert connections == [] and http_server.log == []

    pipeline_env.setenv(SOURCE_NETWORKS_ENV, "10.0.0.0/8, 127.0.0.1/32")
    download(url, str(tmp_path / "out"), _pinned(data), policy=SourcePolicy.from_env())
    assert_rows_match(str(tmp_path / "out"), IMAGES)


def test_from_env_refuses_plain_http_without_a_pin(tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch) -> None:
    pipeline_env.setenv(SOURCE_NETWORKS_ENV, "127.0.0.1/32")
    http_server.routes["/a.tar.gz"] = Route(make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes())
    with pytest.raises(SourceRefused, match="plain http needs a sha256 pin"):
        download(http_server.base + "/a.tar.gz", str(tmp_path / "out"), FAST, policy=SourcePolicy.from_env())
    assert http_server.log == []


@pytest.mark.parametrize(
    "target",
    ["http://169.254.169.254/latest/meta-data", "http://[::1]:{port}/a.tar.gz", "file:///etc/passwd"],
    ids=["metadata", "ipv6-loopback", "file"],
)
def test_a_redirect_outside_the_policy_is_refused_before_connecting(
    tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch, connections: list, target: str
) -> None:
    pipeline_env.setenv(SOURCE_NETWORKS_ENV, "127.0.0.1/32")
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    port = int(http_server.base.rsplit(":", 1)[1])
    target = target.format(port=port)
    http_server.routes["/start"] = Route(b"", redirect=target)

    shown = re.escape(storage.redact_uri(target))
    with pytest.raises(SourceRefused, match=f"redirect 1 from .*/start to {shown} refused"):
        download(http_server.base + "/start", str(tmp_path / "out"), _pinned(data), policy=SourcePolicy.from_env())

    assert connections == [("127.0.0.1", port)], "only the server that redirected was contacted"
    assert http_server.log == ["/start"]
    assert not (tmp_path / "out").exists()


def test_a_redirect_to_a_file_is_refused_even_for_the_operator(tmp_path: Path, http_server: HttpServer) -> None:
    http_server.routes["/start"] = Route(b"", redirect="file:///etc/passwd")
    with pytest.raises(SourceRefused, match="may only lead to http"):
        download(http_server.base + "/start", str(tmp_path / "out"), FAST)


@pytest.mark.parametrize("policy", ["trusted", "from_env"])
def test_redirects_are_followed_and_the_final_url_recorded(
    tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch, policy: str
) -> None:
    pipeline_env.setenv(SOURCE_NETWORKS_ENV, "127.0.0.1/32")
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/old"] = Route(b"", redirect="/mid")
    http_server.routes["/mid"] = Route(b"", redirect=http_server.base + "/new" + PRESIGNED)
    http_server.routes["/new" + PRESIGNED] = Route(data)
    dest = str(tmp_path / "out")

    download(http_server.base + "/old", dest, _pinned(data), policy=getattr(SourcePolicy, policy)())

    (source,) = contract.read_manifest(dest)["extra"]["sources"]
    assert source["uri"] == http_server.base + "/old"
    assert source["final_uri"] == http_server.base + "/new (credentials and query removed)"
    assert_rows_match(dest, IMAGES)


def test_dns_rebinding_is_caught_at_the_connected_socket(tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch) -> None:
    # The name resolves to a public address for the policy check, then to loopback for
    # the connection: the socket's peer is checked before the request is sent.
    real = socket.getaddrinfo
    answers = iter(["8.8.8.8"])

    def rebinding(host, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return real(next(answers, "127.0.0.1") if host == "rebind.example" else host, port, *args, **kwargs)

    pipeline_env.setattr(socket, "getaddrinfo", rebinding)
    pipeline_env.setenv("NO_PROXY", "*")
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/a.tar.gz"] = Route(data)
    url = http_server.base.replace("127.0.0.1", "rebind.example") + "/a.tar.gz"

    with pytest.raises(SourceRefused, match=r"the connection to rebind\.example reaches 127\.0\.0\.1"):
        download(url, str(tmp_path / "out"), _pinned(data), policy=SourcePolicy.from_env())
    assert http_server.log == []


def test_local_sources_need_the_operators_consent(tmp_path: Path, pipeline_env: pytest.MonkeyPatch) -> None:
    archive_file = make_tar(tmp_path / "a.tar.gz", IMAGES)
    tree = make_dir(tmp_path / "tree", IMAGES)
    for src in ("file://" + str(archive_file), str(tree)):
        with pytest.raises(SourceRefused, match=f"local path.*{SOURCE_LOCAL_ENV}=1"):
            download(src, str(tmp_path / "out"), FAST, policy=SourcePolicy.from_env())
    assert not (tmp_path / "out").exists()

    pipeline_env.setenv(SOURCE_LOCAL_ENV, "1")
    download("file://" + str(archive_file), str(tmp_path / "out"), FAST, policy=SourcePolicy.from_env())
    assert_rows_match(str(tmp_path / "out"), IMAGES)


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "streamed"])
def test_max_download_bytes_over_http(tmp_path: Path, http_server: HttpServer, length: bool) -> None:
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    route = http_server.routes["/a.tar.gz"] = Route(data, length=length)
    cfg = dataclasses.replace(FAST, max_download_bytes=len(data) - 1)
    with pytest.raises(ValueError, match=f"max_download_bytes={len(data) - 1}"):
        download(http_server.base + "/a.tar.gz", str(tmp_path / "out"), cfg)
    assert len(route.seen_ranges) == 1, "a size refusal is not retried"
    download(http_server.base + "/a.tar.gz", str(tmp_path / "ok"), dataclasses.replace(cfg, max_download_bytes=len(data)))


def test_max_download_bytes_for_s3_and_local_files(tmp_path: Path, s3_bucket: str) -> None:
    src = make_tar(tmp_path / "a.tar.gz", IMAGES)
    uri = f"{s3_bucket}/raw/a.tar.gz"
    storage.write_bytes(uri, src.read_bytes())
    cfg = DownloadConfig(max_download_bytes=src.stat().st_size - 1)
    for source in (uri, str(src)):
        with pytest.raises(ValueError, match=f"is {src.stat().st_size} bytes, more than max_download_bytes"):
            download(source, str(tmp_path / "out"), cfg)


# --------------------------------------------------------------------------- link-local (cloud metadata)

METADATA_TARGETS = ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/x", "http://[fd00:ec2::254]/latest/meta-data/"]


@pytest.fixture
def no_metadata(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Fails the test on any connection to a metadata address, so no bug sends traffic there."""
    return forbid_metadata_connections(monkeypatch)


def _policy(name: str, env: pytest.MonkeyPatch) -> SourcePolicy:
    """The operator's policy, or the pipeline's with the test server's loopback address listed."""
    if name == "operator":
        return SourcePolicy.trusted()
    env.setenv(SOURCE_NETWORKS_ENV, "127.0.0.1/32")
    return SourcePolicy.from_env()


def _written(dest: Path) -> list[Path]:
    return sorted(dest.rglob("*")) if dest.exists() else []


@pytest.mark.parametrize("target", METADATA_TARGETS, ids=["ipv4", "fe80", "aws-ipv6"])
@pytest.mark.parametrize("policy", ["operator", "pipeline"])
def test_a_redirect_to_the_metadata_service_is_refused_at_once_under_every_policy(
    tmp_path: Path,
    http_server: HttpServer,
    pipeline_env: pytest.MonkeyPatch,
    connections: list,
    no_metadata: list,
    policy: str,
    target: str,
) -> None:
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/start"] = Route(b"", redirect=target)
    port = int(http_server.base.rsplit(":", 1)[1])
    dest = tmp_path / "out"

    with pytest.raises(SourceRefused, match=rf"^redirect 1 from .*/start to {re.escape(target)} refused: .*a link-local address"):
        download(http_server.base + "/start", str(dest), _pinned(data), policy=_policy(policy, pipeline_env))

    assert http_server.log == ["/start"], "exactly one request: a refusal is not retried"
    assert connections == [("127.0.0.1", port)] and no_metadata == []
    assert _written(dest) == []


def test_the_command_line_refuses_a_redirect_to_the_metadata_service_in_one_line(
    tmp_path: Path, http_server: HttpServer, connections: list, no_metadata: list, capsys: pytest.CaptureFixture
) -> None:
    # `imgpipe download https://evil/x` whose server answers 302 to the metadata service.
    target = METADATA_TARGETS[0]
    http_server.routes["/x"] = Route(b"", redirect=target)
    dest = tmp_path / "out"

    assert main(["download", http_server.base + "/x", str(dest)]) == 2

    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("imgpipe download: error: redirect 1 from ")
    assert f"to {target} refused: source {target} reaches 169.254.169.254, a link-local address" in errors[0]
    assert http_server.log == ["/x"] and no_metadata == []
    assert _written(dest) == []


@pytest.mark.parametrize("source", [*METADATA_TARGETS, "http://[fe80::1%25eth0]:8080/a.tar.gz"])
@pytest.mark.parametrize("policy", ["operator", "pipeline"])
def test_a_link_local_source_is_refused_before_any_request(
    tmp_path: Path,
    http_server: HttpServer,
    pipeline_env: pytest.MonkeyPatch,
    connections: list,
    no_metadata: list,
    policy: str,
    source: str,
) -> None:
    # The first source is fine: the refusal of the second must come before the first is fetched.
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/a.tar.gz"] = Route(data)
    cfg = dataclasses.replace(FAST, sha256=(_sha(data), "0" * 64))  # pinned: the pipeline's http needs it
    dest = tmp_path / "out"
    with pytest.raises(SourceRefused, match=rf"^source {re.escape(source)} reaches .*, a link-local address"):
        download([http_server.base + "/a.tar.gz", source], str(dest), cfg, policy=_policy(policy, pipeline_env))
    assert connections == [] and http_server.log == [] and no_metadata == []
    assert _written(dest) == []


@pytest.mark.parametrize("policy", ["operator", "pipeline"])
def test_a_name_that_resolves_to_the_metadata_service_is_refused_before_connecting(
    tmp_path: Path, pipeline_env: pytest.MonkeyPatch, connections: list, no_metadata: list, policy: str
) -> None:
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return real("169.254.169.254" if host == "metadata.example" else host, port, *args, **kwargs)

    pipeline_env.setattr(socket, "getaddrinfo", resolver)
    pipeline_env.setenv("NO_PROXY", "*")
    dest = tmp_path / "out"
    with pytest.raises(SourceRefused, match=r"^http://metadata\.example/latest/meta-data/ reaches 169\.254\.169\.254, a link-local"):
        download("http://metadata.example/latest/meta-data/", str(dest), _pinned(b"x"), policy=_policy(policy, pipeline_env))
    assert connections == [] and no_metadata == []
    assert _written(dest) == []


@pytest.mark.parametrize("policy", ["operator", "pipeline"])
def test_a_connection_that_lands_on_a_link_local_peer_sends_no_request(
    tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch, policy: str
) -> None:
    # The name passed the lookup, the socket's peer is a metadata address (DNS rebinding, or a
    # route that sends 127.0.0.1 elsewhere): the peer check refuses before the request is written.
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/a.tar.gz"] = Route(data)
    port = int(http_server.base.rsplit(":", 1)[1])
    real = socket.socket.getpeername

    def landed_on_metadata(sock: socket.socket):  # noqa: ANN202
        peer = real(sock)
        return ("169.254.169.254", 80) if tuple(peer[:2]) == ("127.0.0.1", port) else peer

    pipeline_env.setattr(socket.socket, "getpeername", landed_on_metadata)
    dest = tmp_path / "out"
    with pytest.raises(SourceRefused, match=r"the connection to 127\.0\.0\.1 reaches 169\.254\.169\.254, a link-local"):
        download(http_server.base + "/a.tar.gz", str(dest), _pinned(data), policy=_policy(policy, pipeline_env))
    assert http_server.log == []
    assert _written(dest) == []
