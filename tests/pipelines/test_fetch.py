"""The checked opener against real hostile HTTP servers on 127.0.0.2 (allowed) and 127.0.0.3 (refused, a stand-in
for 169.254.169.254): every hop is checked and pinned, and every hostile answer gets its reason. No Ray."""

from __future__ import annotations

import datetime
import socket
import ssl
import time
import urllib.request

import pytest

from pipelines.ingest import fetch
from pipelines.ingest.fetch import FetchPolicy, FetchRefused, checked_downloads, checked_opener, parse_refusal
from pipelines.ingest.ssrf import UrlPolicy
from pipelines.ingest.urls import short_reason
from tests.pipelines.hostile_http import (
    Site,
    body,
    endless,
    gzip_bomb,
    gzipped,
    photo,
    png_claiming,
    redirect,
)
from tests.pipelines.http_server import photos

ALLOWED = UrlPolicy(allow_networks=("127.0.0.2/32",))
POLICY = FetchPolicy(urls=ALLOWED, max_redirects=3, max_bytes=1 << 20, max_pixels=10**8, deadline_s=2.0)


@pytest.fixture(scope="module")
def sites():
    with Site("127.0.0.2") as public, Site("127.0.0.3") as internal:
        yield public, internal


def get(url: str, policy: FetchPolicy = POLICY, timeout: float = 1.0) -> bytes:
    with checked_opener(policy).open(url, timeout=timeout) as response:
        return response.read()


def refusal(url: str, policy: FetchPolicy = POLICY) -> FetchRefused:
    with pytest.raises(FetchRefused) as caught:
        get(url, policy)
    return caught.value


def test_an_allowed_photo_and_an_allowed_redirect_are_fetched(sites):
    public, _ = sites
    url = public.route("/a.jpg", photo(0))
    assert get(url) == photos()[0]
    assert get(public.route("/moved", redirect(url, 301))) == photos()[0]
    assert get(public.route("/gz.jpg", body(gzipped(photos()[1]), Content_Encoding="gzip"))) == photos()[1]


def test_a_redirect_to_a_refused_address_is_never_followed(sites):
    public, internal = sites
    secret = internal.route("/latest/meta-data/iam.jpg", photo(1))
    start = public.route("/hop1", redirect(public.url("/hop2")))
    public.route("/hop2", redirect(secret))
    err = refusal(start)
    assert err.reason == "redirect to a refused address"
    assert "loopback address 127.0.0.3" in err.detail
    assert err.detail.endswith(f"chain: {start} -> {public.url('/hop2')} -> {secret}")
    for target in (
        "http://169.254.169.254/latest/meta-data/",
        f"http://[::ffff:127.0.0.3]:{internal.port}/x",
    ):
        err = refusal(public.route(f"/to-{len(public.routes)}", redirect(target)))
        assert err.reason == "redirect to a refused address"
        assert "cloud metadata" in err.detail or "::ffff:127.0.0.3" in err.detail
    assert internal.requests == {}


@pytest.mark.parametrize(
    "target", ["file:///etc/passwd", "ftp://127.0.0.2/a.jpg", "gopher://127.0.0.2:70/_x"]
)
def test_a_redirect_to_another_scheme_is_refused(sites, target):
    public, _ = sites
    err = refusal(public.route(f"/scheme-{target.split(':')[0]}", redirect(target)))
    assert err.reason == "redirect to a refused address"
    assert err.detail.startswith("scheme not allowed") and target in err.detail


def test_redirect_loops_and_long_chains_are_cut(sites):
    public, _ = sites
    public.route("/loop/b", redirect(public.url("/loop/a")))
    assert refusal(public.route("/loop/a", redirect(public.url("/loop/b")))).reason == "redirect loop"
    for i in range(10):
        public.route(f"/chain/{i}", redirect(public.url(f"/chain/{i + 1}"), 307))
    err = refusal(public.url("/chain/0"))
    assert err.reason == "too many redirects" and err.detail.startswith("more than 3")
    assert public.requests["/chain/3"] == 1 and public.requests["/chain/4"] == 0


def test_bodies_stop_at_the_byte_cap(sites):
    public, _ = sites
    err = refusal(public.route("/endless.jpg", endless(public)))
    assert err.reason == "response larger than the byte cap"
    time.sleep(0.5)
    assert public.sent["/endless.jpg"] < 16 << 20  # the client left: the server stopped writing
    assert (
        refusal(public.route("/huge.jpg", _claims_length(2 << 20))).detail
        == f"Content-Length {2 << 20} > {1 << 20}"
    )
    bomb = refusal(public.route("/bomb.jpg", body(gzip_bomb(), Content_Encoding="gzip")))
    assert bomb.reason == "response larger than the byte cap" and "gzip" in bomb.detail
    assert (
        refusal(public.route("/br.jpg", body(b"x", Content_Encoding="br"))).reason
        == "unsupported content encoding"
    )


def _claims_length(n: int):
    def answer(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(n))
        handler.end_headers()

    return answer


def test_slow_drip_bodies_and_headers_meet_the_total_deadline(sites):
    public, _ = sites
    for path, answer in (
        ("/drip.jpg", endless(public, b"\xff" * 16, delay_s=0.05)),
        ("/drip-head", _drip_headers),
    ):
        url = public.route(path, answer)
        start = time.monotonic()
        err = refusal(url)
        elapsed = time.monotonic() - start
        assert err.reason == "download deadline exceeded", path
        assert POLICY.deadline_s <= elapsed < POLICY.deadline_s + 1.0, (path, elapsed)


def _drip_headers(handler) -> None:
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(1000):
        handler.wfile.write(f"X-Drip-{i}: 1\r\n".encode())
        handler.wfile.flush()
        time.sleep(0.05)


def test_wrong_content_type_and_pixel_bombs_are_refused(sites):
    public, _ = sites
    html = refusal(public.route("/page", body(b"<html></html>", "text/html; charset=utf-8")))
    assert html.reason == "wrong content type" and "text/html" in html.detail
    assert get(public.route("/octets", body(photos()[2], "application/octet-stream"))) == photos()[2]
    bomb = refusal(public.route("/bomb.png", body(png_claiming(100_000, 100_000), "image/png")))
    assert bomb.reason == "image larger than max_pixels" and "10000000000 pixels" in bomb.detail


def test_dns_rebinding_gets_the_checked_address(monkeypatch):
    """The resolver answers the allowed address first and the refused one after: the connection uses the
    address it checked, and a later lookup that turns internal is refused at connect time."""
    with Site("127.0.0.2") as public, Site("127.0.0.3", port=public.port) as internal:
        public.route("/cat.jpg", photo(3))
        internal.route("/cat.jpg", photo(0))
        answers = iter(["127.0.0.2", "127.0.0.3", "127.0.0.3"])
        real = socket.getaddrinfo

        def rebinding(host, port, *args, **kwargs):
            if host != "images.rebind.test":
                return real(host, port, *args, **kwargs)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port or 0))]

        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        url = f"http://images.rebind.test:{public.port}/cat.jpg"
        assert get(url) == photos()[3]
        assert public.hosts == [f"images.rebind.test:{public.port}"]  # the Host header kept its name
        err = refusal(url)
        assert err.reason == "refused address at connect time" and "127.0.0.3" in err.detail
        assert internal.requests == {}


def test_https_is_pinned_with_the_url_name_for_sni_and_certificate(monkeypatch, tmp_path):
    server_ctx, client_ctx = _tls_pair("images.tls.test", tmp_path)
    with Site("127.0.0.2", tls=server_ctx) as site:
        site.route("/a.jpg", photo(2))
        real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: (
            [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port or 0))] if host == "images.tls.test"
            else real(host, port, *a, **k)))  # fmt: skip
        url = f"https://images.tls.test:{site.port}/a.jpg"
        with checked_opener(POLICY, client_ctx).open(url, timeout=2) as response:
            assert response.read() == photos()[2]
        with pytest.raises(FetchRefused, match="refused address at connect time"):
            checked_opener(FetchPolicy(), client_ctx).open(url, timeout=2)  # default policy: loopback refused


def _tls_pair(name: str, tmp_path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))  # fmt: skip
    cert_pem = tmp_path / "cert.pem"
    key_pem = tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(cert_pem))
    return server, client


def test_checked_downloads_installs_the_opener_for_urlopen_and_restores_it(sites):
    public, internal = sites
    before = urllib.request._opener
    url = public.route("/to-internal", redirect(internal.url("/secret.jpg")))
    with checked_downloads(POLICY), pytest.raises(FetchRefused) as caught:
        urllib.request.urlopen(url, timeout=1)  # what img2dataset's threads call
    assert urllib.request._opener is before
    assert internal.requests == {}
    # img2dataset stores str(error); the reject reason comes back from it
    assert parse_refusal(str(caught.value)) == "redirect to a refused address"
    assert short_reason("failed_to_download", str(caught.value)) == "redirect to a refused address"
    assert short_reason("failed_to_download", "HTTP Error 404: Not Found") == "http 404"
    assert set(fetch.REASONS) >= {parse_refusal(str(FetchRefused(r, "d"))) for r in fetch.REASONS}
