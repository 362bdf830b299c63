"""A sandbox's own certificate authority: it signs the certificates the policy proxy shows the
guest for the hosts its secrets are bound to, so the proxy can read those requests and fill in
the secrets. The guest trusts its certificate (the agent adds it to the guest's CA bundle); the
key never leaves the gateway's memory. One per sandbox, not per tenant: a guest that could read
a CA's key out of somewhere would still reach no other sandbox's traffic.

Its name constraints admit only the secrets' hosts, so even a certificate signed for anything
else would be refused by the guest's TLS clients.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.egress.policy import Rule

#: A leaf's life; the CA lives a day longer. The proxy makes a new leaf when one is this old.
LEAF_DAYS = 30
#: Contexts kept per CA (one per host the guest talks to through secrets).
MAX_CONTEXTS = 64


class SandboxCA:
    def __init__(self, label: str, hosts: Iterable[Rule]) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sandgate sandbox {label}"[:64]),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sandgate egress proxy")])
        permitted: list[x509.GeneralName] = []
        for rule in hosts:
            if rule.name is not None:
                permitted.append(x509.DNSName(rule.name))
            elif rule.suffix is not None:
                permitted.append(x509.DNSName(rule.suffix.lstrip(".")))  # a domain admits its subdomains
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS + 1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=True, crl_sign=True, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False))
        if permitted:
            builder = builder.add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None),
                                            critical=True)
        self._cert = builder.sign(self._key, hashes.SHA256())
        #: What the guest adds to its trust.
        self.cert_pem = self._cert.public_bytes(serialization.Encoding.PEM)
        self._contexts: dict[str, ssl.SSLContext] = {}

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for `host` (a normalised name)."""
        context = self._contexts.get(host)
        if context is None:
            if len(self._contexts) >= MAX_CONTEXTS:
                self._contexts.pop(next(iter(self._contexts)))
            context = self._contexts[host] = self._make_context(host)
        return context

    def _make_context(self, host: str) -> ssl.SSLContext:
        now = datetime.datetime.now(datetime.UTC)
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
                .issuer_name(self._cert.subject).public_key(self._leaf_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                               critical=False)
                .sign(self._key, hashes.SHA256()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.set_alpn_protocols(["http/1.1"])  # the proxy reads HTTP/1.1 only
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self.cert_pem
        key = self._leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
        # ssl loads a chain only from a file: one in a private folder, gone once loaded.
        with tempfile.TemporaryDirectory(prefix="sandgate-ca-") as folder:
            path = os.path.join(folder, "leaf.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(chain + key)
            context.load_cert_chain(path)
        return context
