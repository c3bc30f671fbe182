"""Certificates and node keys for a test deployment, made with ``cryptography`` only.

One call, :func:`write_deployment_certs`, writes everything a server and ``n`` clients need:

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (ECDSA P-384, SHA-384);
- ``server.crt`` / ``server.key``: the SuperLink's (and split service's) TLS certificate,
  with subject alternative names for ``localhost``, ``127.0.0.1``, ``::1`` and any names
  given (DNS names or IP addresses);
- ``client-<i>.crt`` / ``client-<i>-tls.key``: client TLS certificates whose common name is
  the client's name (``client-<i>``), for mutual TLS on the split-learning service;
- ``client-<i>.key`` / ``client-<i>.pub``: the client's Flower SuperNode authentication key
  pair, ECDSA P-384 in OpenSSH format (what ``flower-supernode
  --auth-supernode-private-key`` loads with ``load_ssh_private_key`` and ``flwr supernode
  register`` loads with ``load_ssh_public_key``).

Private keys are written unencrypted with mode 0600 (the processes that use them read them
without a passphrase); certificates and public keys with 0644. These are for test and
small deployments; a production deployment would use its own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

#: subject alternative names every server certificate carries (local deployments).
DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
_CURVE = ec.SECP384R1
_HASH = hashes.SHA384


@dataclass(frozen=True, kw_only=True)
class CertPaths:
    """Where :func:`write_deployment_certs` put each file.

    Attributes:
        ca_cert: the CA certificate (PEM); every party trusts it.
        ca_key: the CA private key (PEM, 0600); keep it off the server in real use.
        server_cert: the server certificate (PEM) with the SANs asked for.
        server_key: the server private key (PEM, 0600).
        client_certs: per client, its TLS certificate (PEM, CN = client name).
        client_tls_keys: per client, its TLS private key (PEM, 0600).
        node_keys: per client, its SuperNode private key (OpenSSH, 0600).
        node_pubs: per client, its SuperNode public key (OpenSSH, one line).
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_certs: tuple[Path, ...]
    client_tls_keys: tuple[Path, ...]
    node_keys: tuple[Path, ...]
    node_pubs: tuple[Path, ...]


#: largest PEM file read as a certificate or key (bytes).
MAX_PEM_BYTES = 1 << 20


def read_pem(path: str | Path, what: str) -> bytes:
    """Read a PEM certificate or key, checking size and format before trusting it.

    Args:
        path: the file.
        what: what it is, for the error message ("CA certificate", "client TLS key", ...).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {p} is not a file (make it with `fedft certs DIR`)")
    if p.stat().st_size > MAX_PEM_BYTES:
        raise ValueError(f"{what}: {p} is larger than {MAX_PEM_BYTES} bytes; not a PEM file")
    data = p.read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what}: {p} is not PEM")
    return data


def client_name(index: int) -> str:
    """The name (certificate CN and file stem) of client ``index``: ``client-<index>``."""
    return f"client-{index}"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVE())


def _san(name: str) -> x509.GeneralName:
    """An IP address SAN when ``name`` parses as one, else a DNS name SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or any(c.isspace() for c in name) or "/" in name:
        raise ValueError(f"server name {name!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name)


def make_ca(
    *, common_name: str = "fedft test CA", days: int = 365
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (basicConstraints CA:TRUE, pathlen 0; may sign certificates only).

    Args:
        common_name: the CA's subject CN.
        days: validity in days from now (must be >= 1).

    Returns:
        (private key, certificate).
    """
    if days < 1:
        raise ValueError(f"days = {days} is not allowed: a validity of at least 1 day")
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, _HASH())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if days < 1:
        raise ValueError(f"days = {days} is not allowed: a validity of at least 1 day")
    key = _new_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return key, builder.sign(ca_key, _HASH())


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    names: Sequence[str] = (),
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate signed by the CA.

    Args:
        ca_key: the CA private key.
        ca_cert: the CA certificate.
        names: extra host names or IP addresses clients will dial (added to
            :data:`DEFAULT_SERVER_NAMES`); the first given name is also the CN.
        days: validity in days (capped at the CA's own expiry).

    Returns:
        (private key, certificate) with serverAuth usage and the SANs.
    """
    all_names = list(dict.fromkeys([*names, *DEFAULT_SERVER_NAMES]))
    return _leaf(
        ca_key,
        ca_cert,
        common_name=all_names[0],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=[_san(n) for n in all_names],
        days=days,
    )


def make_client_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    name: str,
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS client certificate signed by the CA whose CN (and DNS SAN) is ``name``.

    Args:
        ca_key: the CA private key.
        ca_cert: the CA certificate.
        name: the client's identity, e.g. ``client-0`` (a DNS-label-like string).
        days: validity in days (capped at the CA's own expiry).

    Returns:
        (private key, certificate) with clientAuth usage only.
    """
    if not name:
        raise ValueError("a client certificate needs a non-empty name (its CN)")
    return _leaf(
        ca_key,
        ca_cert,
        common_name=name,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[_san(name)],
        days=days,
    )


def make_node_keypair() -> tuple[bytes, bytes]:
    """A Flower SuperNode authentication key pair: ECDSA P-384 in OpenSSH encoding.

    Returns:
        (private key, OpenSSH ``BEGIN OPENSSH PRIVATE KEY`` block; public key, one
        ``ecdsa-sha2-nistp384 ...`` line).
    """
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_file(path: Path, data: bytes, *, private: bool) -> Path:
    """Write ``data`` to ``path`` with mode 0600 (``private``) or 0644, replacing it.

    The bytes go to a new file created next to ``path`` (``O_CREAT | O_EXCL |
    O_NOFOLLOW``: never an existing file, never through a symlink) that is then renamed
    over ``path``. A symlink planted at ``path`` is replaced, never followed.
    """
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it further
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return path


def _check_private_dir(out: Path) -> None:
    """Create ``out`` with mode 0700, or refuse an existing one that others may enter."""
    if not out.exists():
        out.mkdir(parents=True, mode=0o700)
        return
    if out.is_symlink() or not out.is_dir():
        raise ValueError(f"{out} is not a plain folder; private keys go into a real folder")
    mode = out.stat().st_mode & 0o777
    if mode & 0o077:
        raise ValueError(
            f"{out} has mode {mode:o}: other users could read or swap the private keys "
            f"written there; `chmod 700 {out}` or choose a new folder"
        )


def write_deployment_certs(
    out_dir: str | Path,
    *,
    clients: int = 3,
    server_names: Sequence[str] = (),
    days: int = 365,
    overwrite: bool = False,
) -> CertPaths:
    """Write a CA, a server certificate, and per-client TLS certificates and node keys.

    Args:
        out_dir: folder to write into (created with mode 0700; an existing one must be
            0700 already).
        clients: number of clients (``client-0`` .. ``client-<clients-1>``), >= 1.
        server_names: extra DNS names / IPs for the server certificate's SANs.
        days: validity of every certificate in days.
        overwrite: replace an existing ``ca.key`` there; otherwise refuse (a new CA would
            silently invalidate every certificate already handed out).

    Returns:
        The paths written.

    Raises:
        ValueError: ``clients < 1``, a bad server name, ``days < 1``, or an existing
            ``out_dir`` that other users can enter.
        FileExistsError: ``out_dir/ca.key`` exists and ``overwrite`` is false.
    """
    if clients < 1:
        raise ValueError(f"clients = {clients} is not allowed: at least 1 client")
    out = Path(out_dir)
    if (out / "ca.key").exists() and not overwrite:
        raise FileExistsError(
            f"{out / 'ca.key'} exists; choose another folder or pass overwrite=True "
            "(--force) to replace the whole set"
        )
    _check_private_dir(out)
    ca_key, ca_cert = make_ca(days=days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, names=server_names, days=days)
    paths: dict[str, list[Path]] = {"crt": [], "tls": [], "key": [], "pub": []}
    for i in range(clients):
        name = client_name(i)
        key, cert = make_client_cert(ca_key, ca_cert, name=name, days=days)
        paths["crt"].append(write_file(out / f"{name}.crt", _pem_cert(cert), private=False))
        paths["tls"].append(write_file(out / f"{name}-tls.key", _pem_key(key), private=True))
        node_private, node_public = make_node_keypair()
        paths["key"].append(write_file(out / f"{name}.key", node_private, private=True))
        paths["pub"].append(write_file(out / f"{name}.pub", node_public, private=False))
    result = CertPaths(
        ca_cert=write_file(out / "ca.crt", _pem_cert(ca_cert), private=False),
        ca_key=write_file(out / "ca.key", _pem_key(ca_key), private=True),
        server_cert=write_file(out / "server.crt", _pem_cert(server_cert), private=False),
        server_key=write_file(out / "server.key", _pem_key(server_key), private=True),
        client_certs=tuple(paths["crt"]),
        client_tls_keys=tuple(paths["tls"]),
        node_keys=tuple(paths["key"]),
        node_pubs=tuple(paths["pub"]),
    )
    logger.info("wrote a CA, a server certificate and %d client identities to %s", clients, out)
    return result


def load_certificate(path: str | Path) -> x509.Certificate:
    """Read one PEM certificate (refuses files over 1 MiB)."""
    p = Path(path)
    if p.stat().st_size > 1 << 20:
        raise ValueError(f"{p} is larger than 1 MiB; not a certificate")
    return x509.load_pem_x509_certificate(p.read_bytes())
