"""Which forward proxy a request goes through: Go's `http.ProxyFromEnvironment` rules
(containerd's transport), pinned with the cases of Go's own tests
(golang.org/x/net/http/httpproxy/proxy_test.go), and a host's own `proxy` setting.
Requests through a real proxy are tests/test_forward_proxy.py's."""

from __future__ import annotations

import pytest

from proxyd.cli import main
from proxyd.config import ConfigError, load_settings
from proxyd.hostsfile import HostSettings, make_host, parse_hosts_toml
from proxyd.proxies import Proxy, ProxyEnvironment, Via, parse_host_proxy, route, via
from proxyd.runtime import build_runtime

# Go's TestUseProxy: NO_PROXY, then (host, goes through the proxy).
GO_NO_PROXY = (
    "foobar.com, .barbaz.net, *.wildcard.io, 192.168.1.1, 192.168.1.2:81, 192.168.1.3:80, "
    "10.0.0.0/30, 2001:db8::52:0:1, [2001:db8::52:0:2]:443, [2001:db8::52:0:3]:80, "
    "2002:db8:a::45/64"
)
GO_USE_PROXY = [
    ("localhost", False),  # never proxy localhost
    ("127.0.0.1", False),
    ("127.0.0.2", False),
    ("[::1]", False),
    ("[::2]", True),  # not a loopback address
    ("192.168.1.1", False),  # matches exact IPv4
    ("192.168.1.2", True),  # ports do not match
    ("192.168.1.3", False),  # matches exact IPv4:port
    ("192.168.1.4", True),  # no match
    ("10.0.0.2", False),  # matches IPv4/CIDR
    ("[2001:db8::52:0:1]", False),  # matches exact IPv6
    ("[2001:db8::52:0:2]", True),  # no match
    ("[2001:db8::52:0:3]", False),  # matches exact [IPv6]:port
    ("[2002:db8:a::123]", False),  # matches IPv6/CIDR
    ("[fe80::424b:c8be:1643:a1b6]", True),  # no match
    ("barbaz.net", True),  # does not match as .barbaz.net
    ("www.barbaz.net", False),  # does match as .barbaz.net
    ("foobar.com", False),  # does match as foobar.com
    ("www.foobar.com", False),  # match because NO_PROXY includes "foobar.com"
    ("foofoobar.com", True),  # not match as a part of foobar.com
    ("baz.com", True),  # not match as a part of barbaz.com
    ("localhost.net", True),  # not match as suffix of address
    ("local.localhost", True),  # not match as prefix as address
    ("barbarbaz.net", True),  # not match, wrong domain
    ("wildcard.io", True),  # does not match as *.wildcard.io
    ("nested.wildcard.io", False),  # match as *.wildcard.io
    ("awildcard.io", True),  # not a match because of '*'
]
PROXY = Proxy.parse("http://proxy.corp:3128")


@pytest.mark.parametrize(("host", "proxied"), GO_USE_PROXY)
def test_no_proxy_matches_hosts_as_go_does(host, proxied):
    environment = ProxyEnvironment.make(PROXY, PROXY, GO_NO_PROXY)
    assert (environment.proxy_for(f"http://{host}:80/v2/") is not None) is proxied


@pytest.mark.parametrize(("host", "proxied"), GO_USE_PROXY)
def test_no_proxy_star_sends_everything_direct(host, proxied):
    environment = ProxyEnvironment.make(PROXY, PROXY, "*")
    assert environment.proxy_for(f"https://{host}:80/v2/") is None


def test_a_malformed_no_proxy_entry_is_ignored_as_go_ignores_it():
    environment = ProxyEnvironment.make(PROXY, None, ":1, , [, 1.2.3.4/99")
    assert environment.proxy_for("http://example.com/") == PROXY


def test_no_proxy_without_a_port_uses_the_schemes_default_port():
    environment = ProxyEnvironment.make(PROXY, PROXY, "registry.example:443")
    assert environment.proxy_for("https://registry.example/v2/") is None
    assert environment.proxy_for("https://registry.example:5000/v2/") == PROXY
    assert environment.proxy_for("http://registry.example/v2/") == PROXY  # port 80


@pytest.mark.parametrize(
    ("no_proxy", "url", "proxied"),
    [
        ("example.com", "http://example.com/", False),
        (".example.com", "http://example.com/", True),
        ("ample.com", "http://example.com/", True),
        ("example.com", "http://foo.example.com/", False),
        (".foo.com", "http://example.com/", True),
        (".示例.com", "http://www.xn--fsq092h.com/", False),
        ("xn--fsq092h.com", "http://www.xn--fsq092h.com/", False),
        ("EXAMPLE.com", "http://Example.COM/", False),
        ("10.1.0.0/16", "https://[::ffff:10.1.2.3]/", False),  # an IPv4 in IPv6 is IPv4
    ],
)
def test_no_proxy_domains_as_in_gos_proxy_for_url_cases(no_proxy, url, proxied):
    environment = ProxyEnvironment.make(PROXY, PROXY, no_proxy)
    assert (environment.proxy_for(url) is not None) is proxied


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("cache.corp.example.com:1234", "http://cache.corp.example.com:1234"),
        ("cache.corp.example.com", "http://cache.corp.example.com"),
        ("localhost", "http://localhost"),
        ("https://cache.corp.example.com", "https://cache.corp.example.com"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ("HTTP://[::1]:3128", "http://[::1]:3128"),
    ],
)
def test_a_proxy_without_a_scheme_is_http_as_go_reads_it(value, url):
    assert Proxy.parse(value).url == url


@pytest.mark.parametrize("value", ["socks5://127.0.0.1", "foo://host", "http://h:99999"])
def test_a_proxy_proxyd_cannot_use_is_a_value_error_naming_the_setting(value):
    with pytest.raises(ValueError, match=r"^HTTPS_PROXY: "):
        Proxy.parse(value, "HTTPS_PROXY")


def test_https_urls_take_https_proxy_http_urls_http_proxy_and_neither_falls_back():
    secure, plain = Proxy.parse("secure.proxy.tld"), Proxy.parse("http.proxy.tld")
    both = ProxyEnvironment.make(plain, secure)
    assert both.proxy_for("http://insecure.tld/") == plain
    assert both.proxy_for("https://secure.tld/") == secure
    assert ProxyEnvironment.make(plain, None).proxy_for("https://secure.tld/") is None
    assert ProxyEnvironment.make(None, secure).proxy_for("http://insecure.tld/") is None
    assert both.proxy_for("ftp://insecure.tld/") is None


def test_the_upper_case_variable_wins_and_the_lower_case_one_stands_in():
    environment = ProxyEnvironment.from_environ(
        {
            "HTTPS_PROXY": "upper.proxy:1",
            "https_proxy": "lower.proxy:2",
            "HTTP_PROXY": "",
            "http_proxy": "lower.proxy:3",
            "no_proxy": "internal.example",
        }
    )
    assert environment.https == Proxy.parse("http://upper.proxy:1")
    assert environment.http == Proxy.parse("http://lower.proxy:3")
    assert environment.proxy_for("https://registry.internal.example/") is None
    assert ProxyEnvironment.from_environ({}) == ProxyEnvironment()


def test_credentials_in_a_proxy_url_are_kept_apart_and_never_shown():
    proxy = Proxy.parse("http://alice:s%40cret@proxy.corp:3128")
    assert (proxy.url, proxy.username) == ("http://proxy.corp:3128", "alice")
    assert proxy.password == "s@cret"
    assert "s@cret" not in repr(proxy) and "s@cret" not in str(proxy)
    assert "alice" not in repr(proxy)
    with pytest.raises(ValueError) as caught:
        Proxy.parse("http://alice:s3cret@proxy.corp:99999", "HTTPS_PROXY")
    assert "s3cret" not in str(caught.value)


def test_a_hosts_proxy_setting_is_its_proxy_direct_or_the_environment():
    assert parse_host_proxy(None) == "environment"
    assert parse_host_proxy("direct") == parse_host_proxy(" DIRECT ") == "direct"
    assert parse_host_proxy("proxy.corp:3128") == Proxy.parse("http://proxy.corp:3128")


def test_a_hosts_own_proxy_is_used_for_every_url_even_loopback_and_direct_for_none():
    environment = ProxyEnvironment.make(None, Proxy.parse("env.proxy:1"))
    own = Proxy.parse("own.proxy:2")
    assert route(own, environment, "http://127.0.0.1:5000/v2/") == own
    assert route(own, environment, "https://cdn.example/blob") == own
    assert route("direct", environment, "https://registry.example/v2/") is None
    assert route("environment", environment, "https://registry.example/v2/") == environment.https
    assert route("environment", environment, "https://127.0.0.1/v2/") is None


def test_hosts_toml_proxy_is_read_per_host_and_checked():
    settings = parse_hosts_toml(
        'server = "https://r.example"\nproxy = "http://proxy.corp:3128"\n'
        '[host."https://m.example"]\nproxy = "direct"\n'
    )
    assert settings.proxy == "http://proxy.corp:3128"
    assert settings.host["https://m.example"].proxy == "direct"
    host = make_host("https://r.example", HostSettings(proxy="proxy.corp:3128"), is_mirror=False)
    assert host.proxy == Proxy.parse("http://proxy.corp:3128")
    with pytest.raises(ValueError, match="proxy: proxyd speaks to http:// and https://"):
        parse_hosts_toml('proxy = "socks5://proxy.corp:1080"\n')


def test_an_unusable_proxy_variable_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"^https_proxy: proxyd speaks to http:// and https://"):
        build_runtime(load_settings(None), environ={"https_proxy": "socks5://proxy:1080"})


def test_check_config_says_how_each_host_is_reached_without_the_proxys_password(
    tmp_path, capsys, monkeypatch
):
    config = tmp_path / "proxyd.toml"
    config.write_text(
        '[namespaces."r.example"]\nserver = "https://r.example"\n'
        'proxy = "http://alice:s3cret@proxy.corp:3128"\n'
        '[namespaces."r.example".host."https://m.example"]\nproxy = "direct"\n'
        '[namespaces."q.example"]\nserver = "https://q.example"\n'
        '[namespaces."n.example"]\nserver = "https://n.example"\n'
    )
    monkeypatch.setenv("HTTPS_PROXY", "http://bob:hunter2@env.proxy:8080")
    monkeypatch.setenv("NO_PROXY", "n.example")
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "https://r.example/v2 (upstream: pull, resolve, push, referrers), anonymous, " in out
    assert "anonymous, through the proxy http://proxy.corp:3128\n" in out
    assert "1. https://m.example/v2 (mirror: pull, resolve, referrers), anonymous, direct " in out
    assert "https://q.example/v2 (upstream: pull, resolve, push, referrers), anonymous, " in out
    assert "through the proxy http://env.proxy:8080 (HTTPS_PROXY)" in out
    assert "https://n.example/v2 (upstream: pull, resolve, push, referrers), anonymous\n" in out
    assert "s3cret" not in out and "hunter2" not in out and "alice" not in out


def test_proxy_credentials_go_in_the_connect_of_a_tunnel_or_the_request_to_the_proxy():
    guarded = Proxy.parse("http://alice:s3cret@proxy.corp:3128")
    basic = "Basic YWxpY2U6czNjcmV0"
    assert via(guarded, "https://r.example/v2/") == Via(
        {"proxy": "http://proxy.corp:3128", "proxy_headers": {"Proxy-Authorization": basic}}
    )  # never inside the tunnel, where the registry would read it
    assert via(guarded, "http://r.example/v2/") == Via(
        {"proxy": "http://proxy.corp:3128"}, {"Proxy-Authorization": basic}
    )
    assert via(Proxy.parse("proxy.corp:3128"), "https://r.example/") == Via(
        {"proxy": "http://proxy.corp:3128"}
    )
    assert via(None, "https://r.example/") == Via()
