"""fedft.certs: the CA chain verifies, names and usages are right, private keys are 0600."""

from __future__ import annotations

import datetime
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedft.certs import load_certificate, make_ca, make_server_cert, write_deployment_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs") / "pki"
    return write_deployment_certs(out, clients=3, server_names=["fl.example.org", "10.1.2.3"])


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def _cn(cert):
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_files_and_permissions(certs):
    names = sorted(p.name for p in certs.ca_cert.parent.iterdir())
    assert names == sorted(
        ["ca.crt", "ca.key", "server.crt", "server.key"]
        + [f"client-{i}{s}" for i in range(3) for s in (".crt", "-tls.key", ".key", ".pub")]
    )
    for key in (certs.ca_key, certs.server_key, *certs.client_tls_keys, *certs.node_keys):
        assert _mode(key) == 0o600, key
    for public in (certs.ca_cert, certs.server_cert, *certs.client_certs, *certs.node_pubs):
        assert _mode(public) == 0o644, public
    assert _mode(certs.ca_cert.parent) == 0o700


def test_server_chain_and_sans(certs):
    ca = load_certificate(certs.ca_cert)
    server = load_certificate(certs.server_cert)
    store = Store([ca])
    for name in ("localhost", "fl.example.org"):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name)).verify(server, [])
    for ip in ("127.0.0.1", "10.1.2.3", "::1"):
        verifier = (
            PolicyBuilder()
            .store(store)
            .build_server_verifier(x509.IPAddress(ipaddress.ip_address(ip)))
        )
        verifier.verify(server, [])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.org")).verify(
            server, []
        )
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert _cn(server) == "fl.example.org"
    # the key on disk is the one the certificate carries
    key = load_pem_private_key(certs.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_client_certs_cn_and_chain(certs):
    ca = load_certificate(certs.ca_cert)
    store = Store([ca])
    for i, path in enumerate(certs.client_certs):
        cert = load_certificate(path)
        assert _cn(cert) == f"client-{i}"
        verified = PolicyBuilder().store(store).build_client_verifier().verify(cert, [])
        assert verified.chain[-1] == ca
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
        assert ExtendedKeyUsageOID.SERVER_AUTH not in eku
        key = load_pem_private_key(certs.client_tls_keys[i].read_bytes(), password=None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_foreign_ca_does_not_verify(certs):
    _, rogue_ca = make_ca(common_name="rogue")
    server = load_certificate(certs.server_cert)
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([rogue_ca])).build_server_verifier(
            x509.DNSName("localhost")
        ).verify(server, [])


def test_node_keys_are_p384_openssh_pairs(certs):
    seen = set()
    for key_path, pub_path in zip(certs.node_keys, certs.node_pubs):
        private = load_ssh_private_key(key_path.read_bytes(), password=None)
        public = load_ssh_public_key(pub_path.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert pub_path.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
        assert private.public_key().public_numbers() == public.public_numbers()
        seen.add(public.public_numbers().x)
    assert len(seen) == 3  # every client has its own key


def test_refuses_to_overwrite_and_bad_inputs(certs, tmp_path):
    with pytest.raises(FileExistsError):
        write_deployment_certs(certs.ca_cert.parent, clients=1)
    before = certs.ca_cert.read_bytes()
    assert certs.ca_cert.read_bytes() == before
    with pytest.raises(ValueError, match="clients"):
        write_deployment_certs(tmp_path / "x", clients=0)
    ca_key, ca_cert = make_ca()
    with pytest.raises(ValueError, match="server name"):
        make_server_cert(ca_key, ca_cert, names=["not a name"])
    # a leaf never outlives its CA
    short_key, short_ca = make_ca(days=2)
    _, leaf = make_server_cert(short_key, short_ca, days=400)
    assert leaf.not_valid_after_utc <= short_ca.not_valid_after_utc
    assert leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < datetime.timedelta(
        days=3
    )
