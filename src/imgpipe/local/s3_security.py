"""The locks of the local object store: what keeps every port but S3's and IAM's to the user who started it.

keys = write_security(private_dir, "127.0.0.1")   # a 0700 directory of this start's own
weed -config_dir={keys.config_dir} server ...      # and the same for `weed shell`

Each start gets a CA of its own (its key is never written), one certificate that every
server presents and every client shows back (mutual TLS on each gRPC port and on the
master's, volume server's and filer's HTTP), and JWT signing keys for the volume server
and the filer. docs/internals/kubeflow.md, "Ports and files", lists the ports and what guards each.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SECURITY_TOML", "StoreKeys", "make_private", "write_private", "write_security"]

SECURITY_TOML = "security.toml"
# The gRPC servers and clients `weed scaffold -config=security` (4.48) names: one
# certificate for all, so a component started in a later version is covered too.
GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "msg_broker", "msg_agent", "admin", "worker", "mq", "client")
# The HTTP servers that answer without S3 signatures; the S3 and IAM ports check SigV4.
HTTPS_COMPONENTS = ("master", "volume", "filer")
# The volume server's (master-issued) and the filer's (S3-gateway-issued) tokens, for writes and reads.
JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
# A start's certificates are thrown away when it stops; they outlive any run.
CERT_DAYS = 3650


@dataclass(frozen=True)
class StoreKeys:
    """One start's keys: the directory ``weed -config_dir`` reads, and the files in it."""

    config_dir: Path
    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A TLS context that trusts this start's CA and shows its certificate (for the master's HTTPS)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(self.cert, self.key)
        return context


def write_private(path: Path, data: bytes) -> None:
    """Writes ``path`` anew, a file only its owner may read (0600 from its creation: never readable by others, not even briefly)."""
    path.unlink(missing_ok=True)  # a new inode: an old file keeps its mode through O_TRUNC
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # at rest: the store's keys: a secret file, 0600 in a 0700 directory
    with os.fdopen(fd, "wb") as f:  # at rest: the store's keys: a secret file, 0600 in a 0700 directory
        f.write(data)


def make_private(data_dir: Path) -> None:
    """``data_dir`` to 0700 and everything below it to its owner alone (a store made before this rule had 0644 files).

    The directory is closed first, so no one else can put a link below it while its files are changed.
    """
    os.chmod(data_dir, 0o700)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and mode & 0o077:
                os.chmod(path, stat.S_IMODE(mode) & ~0o077)


def write_security(directory: Path, host: str) -> StoreKeys:
    """A CA, a certificate and key signed by it, and the ``security.toml`` that makes ``weed`` ask for them, in ``directory``.

    Args:
        directory: An empty directory only the user can enter.
        host: The address the servers listen on (in the certificate, which HTTPS clients check).
    """
    if stat.S_IMODE(directory.stat().st_mode) & 0o077:
        raise ValueError(f"{directory} is open to other users; the store's keys go to a directory of mode 0700")
    keys = StoreKeys(directory, directory / "ca.pem", directory / "weed.pem", directory / "weed.key")
    ca, cert, key = _certificates(host)
    write_private(keys.ca, ca)
    write_private(keys.cert, cert)
    write_private(keys.key, key)
    write_private(directory / SECURITY_TOML, _security_toml(keys).encode())
    return keys


def _security_toml(keys: StoreKeys) -> str:
    """``security.toml`` (``weed scaffold -config=security``): mutual TLS everywhere but S3 and IAM, and JWT keys."""
    ca, cert, key = (json.dumps(str(p)) for p in (keys.ca, keys.cert, keys.key))  # a TOML basic string
    sections = [f"[{name}]\nkey = {json.dumps(secrets.token_urlsafe(32))}\n" for name in JWT_SECTIONS]
    sections.append(f"[grpc]\nca = {ca}\n")
    sections += [f"[grpc.{name}]\ncert = {cert}\nkey = {key}\n" for name in GRPC_COMPONENTS]
    # With a CA, each HTTPS server requires a client certificate signed by it (RequireAndVerifyClientCert).
    sections += [f"[https.{name}]\ncert = {cert}\nkey = {key}\nca = {ca}\n" for name in HTTPS_COMPONENTS]
    sections.append(f"[https.client]\nenabled = true\ncert = {cert}\nkey = {key}\nca = {ca}\n")
    return "\n".join(sections)


def _certificates(host: str) -> tuple[bytes, bytes, bytes]:
    """PEM: a CA certificate, a certificate it signed (server and client use, for ``host``, 127.0.0.1 and localhost), its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=CERT_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imgpipe local store CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if host not in ("localhost", "127.0.0.1"):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:  # a host name
            names.append(x509.DNSName(host))
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imgpipe local store")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    private = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), leaf.public_bytes(pem), private
