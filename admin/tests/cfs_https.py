"""HTTPS to the admin gateway of a TLS cluster, for the test scripts.

The gateway serves the certificate of its node, which names
node.cfs.internal under the cluster's CA (DIR/tls/ca.crt): the scripts make
that name resolve to the gateway's address (like curl --resolve) and check
the certificate against the CA.
"""
import base64
import hashlib
import socket
import ssl
import urllib.parse


def resolve(host, ip):
    """Make `host` resolve to `ip` in this process."""
    real = socket.getaddrinfo

    def getaddrinfo(h, *a, **k):
        return real(ip if h == host else h, *a, **k)

    socket.getaddrinfo = getaddrinfo


def context(ca):
    """A client context that trusts only the cluster's CA."""
    return ssl.create_default_context(cafile=ca)


def _tlv(b, i):
    """(tag, content start, content length) of the DER item at b[i]."""
    tag, n = b[i], b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(b[i:i + k], "big")
        i += k
    return tag, i, n


def _spki(der):
    """The SubjectPublicKeyInfo of a DER certificate."""
    _, i, _ = _tlv(der, 0)  # Certificate
    _, i, n = _tlv(der, i)  # tbsCertificate
    end, fields = i + n, []
    while i < end and len(fields) < 7:
        tag, c, n = _tlv(der, i)
        fields.append((tag, i, c + n))
        i = c + n
    first = 1 if fields[0][0] == 0xA0 else 0  # [0] version, when present
    tag, s, e = fields[first + 5]  # serial, signature, issuer, validity, subject, spki
    assert tag == 0x30, "SubjectPublicKeyInfo is a SEQUENCE"
    return der[s:e]


def spki_pin(url, ca):
    """The base64 SHA-256 of the public key the server at `url` presents,
    after its certificate is checked against `ca` (for Chromium's
    --ignore-certificate-errors-spki-list: the browser then trusts that key
    and nothing else)."""
    u = urllib.parse.urlsplit(url)
    with socket.create_connection((u.hostname, u.port or 443), timeout=10) as sock:
        with context(ca).wrap_socket(sock, server_hostname=u.hostname) as s:
            der = s.getpeercert(binary_form=True)
    return base64.b64encode(hashlib.sha256(_spki(der)).digest()).decode()
