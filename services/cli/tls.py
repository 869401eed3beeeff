"""Certificates for a test deployment over TLS (`sagmq provision --tls`), made with `cryptography`.

One private CA signs a broker certificate (subjectAltName: the broker's host name and any other names
it is reached by) and one client certificate per broker user, whose common name is the user name
(RabbitMQ's EXTERNAL mechanism can then map a certificate to its user). Keys are ECDSA P-256: small,
quick to make, and accepted by OpenSSL, Python's ssl and Erlang/OTP 25 (RabbitMQ 3.10+).

Files (under OUT/tls/): ca.pem, ca.key, broker.pem, broker.key, <user>.pem and <user>.key for every
site and service user, and rabbitmq.conf, the broker's TLS listener (the certificates as mounted at
BROKER_TLS_DIR in the broker's container). Keys are mode 0600. This is a CA for tests and small
deployments: whoever holds ca.key can mint a certificate the broker trusts, so keep it off the hosts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 825
BROKER_TLS_DIR = "/etc/rabbitmq/tls"  # where the rabbitmq.conf snippet expects the broker's files
DEFAULT_TLS_DIR = "/etc/sagmq/tls"  # where the env files expect a participant's files (--tls-dir)

Key = ec.EllipticCurvePrivateKey


def new_key() -> Key:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sagmq"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, key: Key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (Python 3.10 has no datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days)))


def make_ca(cn: str = "sagmq test CA") -> tuple[x509.Certificate, Key]:
    """A self-signed CA certificate and its key."""
    key = new_key()
    cert = (_builder(_name(cn), _name(cn), key, CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_leaf(ca: x509.Certificate, ca_key: Key, cn: str, server_names: Sequence[str] = ()) -> tuple[
        x509.Certificate, Key]:
    """A certificate signed by the CA: a server's (server_names: its subjectAltNames) or a client's."""
    key = new_key()
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server_names \
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    b = (_builder(_name(cn), ca.subject, key, LEAF_DAYS)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                      content_commitment=False, key_encipherment=False, data_encipherment=False,
                                      key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server_names:
        b = b.add_extension(x509.SubjectAlternativeName([_alt_name(n) for n in dict.fromkeys(server_names)]),
                            critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_pair(directory: Path, stem: str, cert: x509.Certificate, key: Key) -> None:
    """stem.pem (the certificate, 0644) and stem.key (PKCS#8, unencrypted, 0600)."""
    _write(directory / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(directory / f"{stem}.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()), 0o600)


def rabbitmq_conf(port: int = 5671, cert_dir: str = BROKER_TLS_DIR) -> str:
    """The broker's TLS listener, peers verified against the CA."""
    return "\n".join([
        "# The TLS listener of the broker, written by `sagmq provision --tls`; the files of OUT/tls mounted",
        f"# at {cert_dir} (broker.key readable by the rabbitmq user). Append to rabbitmq.conf.",
        f"listeners.ssl.default = {port}",
        f"ssl_options.cacertfile = {cert_dir}/ca.pem",
        f"ssl_options.certfile = {cert_dir}/broker.pem",
        f"ssl_options.keyfile = {cert_dir}/broker.key",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
        "ssl_options.versions.1 = tlsv1.3",
        "ssl_options.versions.2 = tlsv1.2",
        "# Users still log in with their passwords. To log in by certificate instead (CN = user name), enable",
        "# the rabbitmq_auth_mechanism_ssl plugin and add:",
        "#   auth_mechanisms.1 = EXTERNAL",
        "#   ssl_cert_login_from = common_name",
        "",
    ])


def write_tls(out: Path, users: Sequence[str], broker_names: Sequence[str], port: int) -> None:
    """OUT/tls: the CA, the broker's certificate for broker_names, one client certificate per user, and
    the broker's rabbitmq.conf snippet."""
    d = out / "tls"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca, ca_key = make_ca()
    write_pair(d, "ca", ca, ca_key)
    write_pair(d, "broker", *make_leaf(ca, ca_key, broker_names[0], broker_names))
    for user in users:
        write_pair(d, user, *make_leaf(ca, ca_key, user))
    _write(d / "rabbitmq.conf", rabbitmq_conf(port).encode(), 0o644)
