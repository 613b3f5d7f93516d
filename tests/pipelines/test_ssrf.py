"""SSRF guard: internal addresses are refused, public ones pass, allow-lists open exceptions. No network."""

from __future__ import annotations

import socket

import pytest

from pipelines.ingest.ssrf import UrlPolicy, check_url, check_urls

DEFAULT = UrlPolicy()


@pytest.fixture
def fake_dns(monkeypatch):
    """Replace DNS with a table {host: [addresses]}; unknown names do not resolve. Counts lookups."""
    table: dict[str, list[str]] = {}
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0))
            for a in table[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table, calls


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3"])
def test_loopback_literal_is_refused(host):
    assert check_url(f"http://{host}:8080/a.jpg", DEFAULT) == f"host resolves to loopback address {host}"


@pytest.mark.parametrize("address", ["10.1.2.3", "172.16.0.5", "172.31.255.1", "192.168.1.10"])
def test_private_ranges_are_refused(address):
    assert check_url(f"https://{address}/x.png", DEFAULT) == f"host resolves to private address {address}"


def test_cloud_metadata_address_is_refused_as_link_local():
    reason = check_url("http://169.254.169.254/latest/meta-data/iam/", DEFAULT)
    assert reason == "host resolves to link-local address 169.254.169.254 (cloud metadata)"


def test_multicast_is_refused():
    assert check_url("http://224.0.0.1/", DEFAULT) == "host resolves to multicast address 224.0.0.1"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://[::1]/a.jpg", "host resolves to loopback address ::1"),
        ("http://[fe80::1]/a.jpg", "host resolves to link-local address fe80::1"),
        ("http://[::ffff:127.0.0.1]/a.jpg", "host resolves to loopback address ::ffff:127.0.0.1"),
        (
            "http://[::ffff:169.254.169.254]/",
            "host resolves to link-local address ::ffff:169.254.169.254 (cloud metadata)",
        ),
        ("http://[fc00::1]/", "host resolves to private address fc00::1"),
        ("http://0.0.0.0:80/", "host resolves to unspecified address 0.0.0.0"),
        ("http://[::]/", "host resolves to unspecified address ::"),
        ("http://240.0.0.1/", "host resolves to reserved address 240.0.0.1"),
        ("http://100.64.0.1/", "host resolves to non-global address 100.64.0.1"),
    ],
)
def test_ipv6_mapped_and_special_addresses_are_refused(url, reason):
    assert check_url(url, DEFAULT) == reason


def test_decimal_ip_spelling_resolves_to_loopback():
    # getaddrinfo parses numeric spellings locally (no DNS query), as urllib's connection would.
    assert check_url("http://2130706433/", DEFAULT) == "host resolves to loopback address 127.0.0.1"


def test_public_host_is_allowed(fake_dns):
    table, calls = fake_dns
    table["images.example.com"] = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    assert check_url("https://images.example.com/cat.jpg?w=256", DEFAULT) is None
    assert calls == ["images.example.com"]


def test_every_resolved_address_is_checked(fake_dns):
    table, _ = fake_dns
    table["rebind.example.com"] = ["93.184.215.14", "10.0.0.7"]
    assert check_url("http://rebind.example.com/", DEFAULT) == "host resolves to private address 10.0.0.7"
    table["meta.example.com"] = ["93.184.215.14", "169.254.169.254"]
    assert "cloud metadata" in check_url("http://meta.example.com/", DEFAULT)


def test_name_resolving_to_loopback_is_refused(fake_dns):
    table, _ = fake_dns
    table["localhost"] = ["::1", "127.0.0.1"]
    assert check_url("http://LOCALHOST./x", DEFAULT) == "host resolves to loopback address ::1"


def test_unresolvable_host_is_refused(fake_dns):
    assert check_url("http://nowhere.invalid/a.jpg", DEFAULT) == "unresolvable host 'nowhere.invalid'"


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "gopher://h/", "data:,x", "a.jpg"]
)
def test_non_http_schemes_are_refused(url):
    assert check_url(url, DEFAULT).startswith("scheme not allowed")


@pytest.mark.parametrize(
    ("url", "reason"), [(None, "missing url"), ("", "missing url"), ("http:///a", "missing host")]
)
def test_missing_parts_are_refused(url, reason):
    assert check_url(url, DEFAULT) == reason


def test_allow_list_by_host_skips_resolution(fake_dns):
    _, calls = fake_dns
    policy = UrlPolicy(allow_hosts=("Intranet.Local", "127.0.0.1"))
    assert check_url("http://intranet.local/a.jpg", policy) is None
    assert check_url("http://127.0.0.1:9000/a.jpg", policy) is None
    assert check_url("http://127.0.0.2/a.jpg", policy) == "host resolves to loopback address 127.0.0.2"
    assert calls == []


def test_allow_list_by_cidr(fake_dns):
    table, _ = fake_dns
    table["wiki.corp"] = ["10.1.2.3"]
    table["other.corp"] = ["10.2.0.1"]
    policy = UrlPolicy(allow_networks=("127.0.0.0/8", "10.1.0.0/16", "::1/128"))
    assert check_url("http://127.0.0.1:8080/a.jpg", policy) is None
    assert check_url("http://[::1]/a.jpg", policy) is None
    assert check_url("http://[::ffff:127.0.0.1]/a.jpg", policy) is None
    assert check_url("http://wiki.corp/a.jpg", policy) is None
    assert check_url("http://other.corp/a.jpg", policy) == "host resolves to private address 10.2.0.1"
    assert check_url("http://169.254.169.254/", policy).startswith("host resolves to link-local")


def test_allowed_schemes_are_configurable():
    policy = UrlPolicy(allowed_schemes=("HTTPS",), allow_hosts=("127.0.0.1",))
    assert check_url("https://127.0.0.1/a", policy) is None
    assert check_url("http://127.0.0.1/a", policy) == "scheme not allowed: 'http'"


def test_check_urls_resolves_each_host_once(fake_dns):
    table, calls = fake_dns
    table["a.example.com"] = ["93.184.215.14"]
    table["b.example.com"] = ["192.168.0.2"]
    urls = [
        "http://a.example.com/1",
        "http://b.example.com/2",
        "http://a.example.com/3",
        "ftp://a.example.com/4",
    ]
    reasons = check_urls(urls, DEFAULT, threads=4)
    assert reasons == [
        None,
        "host resolves to private address 192.168.0.2",
        None,
        "scheme not allowed: 'ftp'",
    ]
    assert sorted(calls) == ["a.example.com", "b.example.com"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"allow_networks": ("10.0.0.0/33",)}, "allow_networks"),
        ({"allow_networks": "10.0.0.0/8"}, "allow_networks"),
        ({"allow_hosts": "localhost"}, "allow_hosts"),
    ],
)
def test_policy_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UrlPolicy(**kwargs)
