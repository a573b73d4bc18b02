"""Host chains read from containerd's hosts.toml: what each host may be trusted with,
in which order they are tried, and where their API root is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.config import ConfigError, load_settings
from proxyd.hosts import Capability
from proxyd.hostsfile import (
    HostSettings,
    NamespaceSettings,
    build_namespace,
    hosts_dir_namespace_name,
    load_hosts_dir,
    make_host,
    parse_hosts_toml,
    read_hosts_toml,
)

PULL_RESOLVE = Capability.PULL | Capability.RESOLVE

CONTAINERD_EXAMPLE = """\
server = "https://registry-1.docker.io"

[host."https://mirror-a.example"]
  capabilities = ["pull", "resolve"]
  ca = "/etc/certs/mirror-a.pem"

[host."https://mirror-b.example:8443/registry"]
  capabilities = ["pull"]
  skip_verify = true
  [host."https://mirror-b.example:8443/registry".header]
    x-custom-1 = "custom header"

[host."http://localhost:5000"]
  capabilities = ["pull", "resolve", "push"]
"""


def chain(text: str, name: str = "docker.io", base_dir: Path | None = None):
    return build_namespace(name, parse_hosts_toml(text), source="test", base_dir=base_dir)


# -- reading hosts.toml -----------------------------------------------------------------


def test_mirrors_keep_the_order_of_the_file_and_the_server_comes_last():
    namespace = chain(CONTAINERD_EXAMPLE)
    assert [h.origin for h in namespace.hosts] == [
        "https://mirror-a.example",
        "https://mirror-b.example:8443",
        "http://localhost:5000",
        "https://registry-1.docker.io",
    ]
    assert [h.is_mirror for h in namespace.hosts] == [True, True, True, False]


def test_each_mirror_has_exactly_the_capabilities_it_lists():
    a, b, local, server = chain(CONTAINERD_EXAMPLE).hosts
    assert a.capabilities == PULL_RESOLVE
    assert b.capabilities == Capability.PULL
    assert local.capabilities == PULL_RESOLVE | Capability.PUSH  # no referrers: not listed
    assert server.capabilities == Capability.all()


def test_mirror_without_capabilities_does_everything_but_push():
    namespace = chain('[host."https://mirror.example"]\n')
    mirror, server = namespace.hosts
    assert mirror.capabilities == PULL_RESOLVE | Capability.REFERRERS
    assert Capability.PUSH not in mirror.capabilities
    assert server.capabilities == Capability.all()


def test_server_capabilities_may_be_narrowed_at_the_top_level():
    namespace = chain('server = "https://reg.example"\ncapabilities = ["pull"]\n', "reg.example")
    assert namespace.hosts[-1].capabilities == Capability.PULL


def test_only_hosts_trusted_with_names_confirm_what_a_repository_holds():
    a, b, local, server = chain(CONTAINERD_EXAMPLE).hosts
    namespace = chain(CONTAINERD_EXAMPLE)
    assert namespace.confirmers() == [a, local, server]
    assert not namespace.vouches(b), "a pull-only mirror vouched for a repository"


def test_without_a_resolve_host_the_upstream_server_confirms_but_no_mirror_does():
    namespace = chain(
        'server = "https://reg.example"\ncapabilities = ["pull"]\n'
        '[host."https://mirror.example"]\ncapabilities = ["pull"]\n',
        "reg.example",
    )
    mirror, server = namespace.hosts
    assert namespace.confirmers() == [server]
    assert not namespace.vouches(mirror)


def test_ca_may_be_one_path_or_a_list():
    one = chain('[host."https://m.example"]\nca = "/etc/ca.pem"\n').hosts[0]
    many = chain('[host."https://m.example"]\nca = ["/etc/a.pem", "/etc/b.pem"]\n').hosts[0]
    assert one.ca == ("/etc/ca.pem",)
    assert many.ca == ("/etc/a.pem", "/etc/b.pem")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"/etc/client.pem"', (("/etc/client.pem", None),)),
        ('["/etc/a.pem", "/etc/b.pem"]', (("/etc/a.pem", None), ("/etc/b.pem", None))),
        ('[["/etc/c.cert", "/etc/c.key"]]', (("/etc/c.cert", "/etc/c.key"),)),
        (
            '[["/etc/c.cert", "/etc/c.key"], "/etc/both.pem"]',
            (("/etc/c.cert", "/etc/c.key"), ("/etc/both.pem", None)),
        ),
    ],
)
def test_client_is_a_path_a_list_of_paths_or_cert_key_pairs(value, expected):
    mirror = chain(f'[host."https://m.example"]\nclient = {value}\n').hosts[0]
    assert mirror.client == expected


def test_a_client_pair_of_three_paths_is_refused():
    with pytest.raises(ValueError, match="client"):
        parse_hosts_toml('[host."https://m.example"]\nclient = [["a", "b", "c"]]\n')


def test_header_values_may_be_strings_or_lists_and_all_are_sent():
    mirror = chain('[host."https://m.example".header]\nx-one = "1"\nx-many = ["a", "b"]\n').hosts[0]
    assert mirror.headers == (("x-one", "1"), ("x-many", "a"), ("x-many", "b"))


def test_skip_verify_is_per_host():
    a, b, _, server = chain(CONTAINERD_EXAMPLE).hosts
    assert (a.skip_verify, b.skip_verify, server.skip_verify) == (False, True, False)


def test_top_level_settings_apply_to_the_server_only():
    namespace = chain(
        'server = "https://reg.example"\nca = "/etc/reg.pem"\n'
        '[header]\nx-server = "yes"\n[host."https://m.example"]\n',
        "reg.example",
    )
    mirror, server = namespace.hosts
    assert server.ca == ("/etc/reg.pem",)
    assert server.headers == (("x-server", "yes"),)
    assert (mirror.ca, mirror.headers) == ((), ())


def test_invalid_toml_is_a_value_error_saying_so():
    with pytest.raises(ValueError, match="invalid TOML"):
        parse_hosts_toml('[host."https://m.example"\n')


# containerd's own hosts.toml test (core/remotes/docker/config/hosts_test.go,
# TestParseHostFile, containerd 2.x): every key containerd reads, referrers and
# dial_timeout included.
CONTAINERD_2_TEST_FILE = """\
server = "https://test-default.registry"
ca = "/etc/path/default"
[header]
  x-custom-1 = "custom header"

[host."https://mirror.registry"]
  capabilities = ["pull"]
  ca = "/etc/certs/mirror.pem"
  skip_verify = false
  [host."https://mirror.registry".header]
    x-custom-2 = ["value1", "value2"]

[host."https://mirror-bak.registry/us"]
  capabilities = ["pull"]
  skip_verify = true

[host."http://mirror.registry"]
  capabilities = ["pull"]

[host."https://test-1.registry"]
  capabilities = ["pull", "resolve", "push", "referrers"]
  ca = ["/etc/certs/test-1-ca.pem", "/etc/certs/special.pem"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"],["/etc/certs/client.pem", ""]]

[host."https://test-2.registry"]
  client = "/etc/certs/client.pem"

[host."https://test-3.registry"]
  client = ["/etc/certs/client-1.pem", "/etc/certs/client-2.pem"]

[host."https://no-referrers.registry"]
  capabilities = ["pull", "resolve", "push"]
  client = ["/etc/certs/client-1.pem", "/etc/certs/client-2.pem"]

[host."https://noncompliantmirror.registry/v2/namespaceprefix"]
  capabilities = ["pull"]
  override_path = true

[host."https://noprefixnoncompliant.registry"]
  override_path = true

[host."https://onlyheader.registry".header]
  x-custom-1 = "justaheader"

[host."https://dial-timeout.registry"]
  dial_timeout = "3s"
"""


def test_containerds_own_hosts_toml_test_file_is_read_whole_without_a_warning():
    settings_, ignored = read_hosts_toml(CONTAINERD_2_TEST_FILE)
    assert ignored == ()
    namespace = build_namespace("x.example", settings_, source="t")
    hosts = {h.origin + h.path: h for h in namespace.hosts}
    assert hosts["https://test-1.registry/v2"].capabilities == Capability.all()
    assert Capability.REFERRERS not in hosts["https://no-referrers.registry/v2"].capabilities
    assert hosts["https://dial-timeout.registry/v2"].connect_timeout == 3.0
    assert hosts["https://test-1.registry/v2"].client == (
        ("/etc/certs/client.cert", "/etc/certs/client.key"),
        ("/etc/certs/client.pem", None),
    )
    assert hosts["https://noncompliantmirror.registry/v2/namespaceprefix"].path == (
        "/v2/namespaceprefix"
    )
    assert hosts["https://noprefixnoncompliant.registry/"].path == "/"
    assert hosts["https://onlyheader.registry/v2"].headers == (("x-custom-1", "justaheader"),)
    assert hosts["https://test-default.registry/v2"].headers == (("x-custom-1", "custom header"),)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("3s", 3.0), ("1m30s", 90.0), ("500ms", 0.5), ("1.5h", 5400.0), ("2h45m", 9900.0)],
)
def test_dial_timeout_is_a_go_duration_and_becomes_the_connect_timeout(value, seconds):
    mirror = chain(f'[host."https://m.example"]\ndial_timeout = "{value}"\n').hosts[0]
    assert mirror.connect_timeout == seconds


def test_a_zero_dial_timeout_means_no_limit_as_in_gos_dialer():
    assert chain('dial_timeout = "0s"\n').hosts[-1].connect_timeout is None


@pytest.mark.parametrize("value", ["3", "three seconds", "-1s", ""])
def test_a_dial_timeout_that_is_no_duration_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match="dial_timeout"):
        parse_hosts_toml(f'dial_timeout = "{value}"\n')


def test_dial_timeout_and_connect_timeout_together_are_refused():
    with pytest.raises(ValueError, match="dial_timeout and connect_timeout"):
        parse_hosts_toml('dial_timeout = "3s"\nconnect_timeout = 5\n')


def test_an_unknown_key_in_a_hosts_toml_is_named_and_ignored():
    settings_, ignored = read_hosts_toml(
        'future_key = 1\nserver = "https://r.example"\n'
        '[host."https://m.example"]\nskip_verfy = true\ncapabilities = ["pull"]\n'
    )
    assert ignored == ("future_key", "host.https://m.example.skip_verfy")
    mirror, server = build_namespace("r.example", settings_, source="t").hosts
    assert (mirror.capabilities, mirror.skip_verify) == (Capability.PULL, False)
    assert server.origin == "https://r.example"


def test_an_unknown_key_in_proxyds_own_namespace_table_is_still_an_error(tmp_path):
    path = tmp_path / "proxyd.toml"
    path.write_text('[namespaces."r.example"]\nskip_verfy = true\n')
    with pytest.raises(ConfigError, match="skip_verfy"):
        load_settings(path)


def test_an_unknown_capability_is_a_value_error_listing_the_known_ones():
    settings_ = parse_hosts_toml('[host."https://m.example"]\ncapabilities = ["pull", "fly"]\n')
    with pytest.raises(ValueError, match=r"'fly'.*pull, resolve, push or referrers"):
        build_namespace("docker.io", settings_, source="test")


def test_a_wrongly_typed_value_is_a_value_error_naming_where():
    with pytest.raises(ValueError, match=r"host\.https://m\.example\.skip_verify"):
        parse_hosts_toml('[host."https://m.example"]\nskip_verify = "maybe"\n')


# -- URLs and the API root ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("https://mirror.example", "/v2"),
        ("https://mirror.example/", "/v2"),
        ("https://mirror.example/v2", "/v2"),
        ("https://mirror.example/v2/", "/v2"),
        ("https://mirror.example/path", "/path/v2"),
        ("https://mirror.example/path/", "/path/v2"),
        ("https://mirror.example/a/b", "/a/b/v2"),
        ("https://mirror.example/path/v2", "/path/v2"),
    ],
)
def test_v2_is_appended_to_the_url_path_unless_it_is_there(url, path):
    assert make_host(url, HostSettings(), is_mirror=True).path == path


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("https://mirror.example/path", "/path"),
        ("https://mirror.example/artifactory/api/docker/v2", "/artifactory/api/docker/v2"),
        ("https://mirror.example", "/"),
    ],
)
def test_override_path_takes_the_url_path_as_the_api_root(url, path):
    host = make_host(url, HostSettings(override_path=True), is_mirror=True)
    assert host.path == path


@pytest.mark.parametrize(
    ("url", "override", "scopes"),
    [
        (  # a Harbor project: its name starts every repository the host serves
            "https://harbor.example/v2/dockerhub-proxy",
            True,
            "repository:library/alpine:pull repository:dockerhub-proxy/library/alpine:pull",
        ),
        (  # a mount's source is named so too
            "https://harbor.example/v2/team/",
            True,
            "repository:app:pull,push repository:base:pull "
            "repository:team/app:pull,push repository:team/base:pull",
        ),
        ("https://mirror.example/registry", False, "repository:app:pull,push repository:base:pull"),
        ("https://mirror.example/mirror/v2", True, "repository:app:pull,push repository:base:pull"),
        ("https://mirror.example", False, "repository:app:pull,push repository:base:pull"),
    ],
)
def test_a_host_under_a_path_below_v2_is_asked_tokens_for_the_names_it_serves(
    url, override, scopes
):
    host = make_host(url, HostSettings(override_path=override), is_mirror=True)
    asked = (
        "repository:library/alpine:pull"
        if "dockerhub" in url
        else "repository:app:pull,push repository:base:pull"
    )
    assert host.scopes(asked) == scopes
    assert host.scopes("registry:catalog:*") == "registry:catalog:*"


def test_override_path_from_hosts_toml_applies_to_its_mirror():
    mirror, server = chain('[host."https://m.example/registry/api"]\noverride_path = true\n').hosts
    assert mirror.url("team/app/manifests/v1") == (
        "https://m.example/registry/api/team/app/manifests/v1"
    )
    assert server.path == "/v2"


def test_host_url_joins_the_api_root_and_the_request():
    host = make_host("https://m.example/path", HostSettings(), is_mirror=True)
    assert (
        host.url("team/app/blobs/sha256:abc")
        == "https://m.example/path/v2/team/app/blobs/sha256:abc"
    )


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("localhost:5000", "http://localhost:5000"),
        ("localhost", "http://localhost"),
        ("127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("[::1]:5000", "http://[::1]:5000"),
        ("registry.example.com", "https://registry.example.com"),
        ("registry.example.com:5000", "https://registry.example.com:5000"),
        ("127.0.0.2:5000", "https://127.0.0.2:5000"),
        ("localhost.example.com", "https://localhost.example.com"),
    ],
)
def test_a_url_without_scheme_is_http_only_for_loopback(url, origin):
    assert make_host(url, HostSettings(), is_mirror=True).origin == origin


def test_an_explicit_scheme_is_kept_even_for_loopback():
    assert make_host("https://localhost:5000", HostSettings(), is_mirror=True).scheme == "https"
    assert make_host("http://reg.example", HostSettings(), is_mirror=True).scheme == "http"


@pytest.mark.parametrize(
    "url",
    ["ftp://m.example", "https://", "https://bad_host.example", "https://m.example:port"],
)
def test_a_url_that_is_no_registry_host_is_a_value_error(url):
    with pytest.raises(ValueError, match="invalid host"):
        make_host(url, HostSettings(), is_mirror=True)


def test_docker_hub_is_served_by_registry_1_by_default():
    namespace = build_namespace("docker.io", NamespaceSettings(), source="built-in")
    [server] = namespace.hosts
    assert server.origin == "https://registry-1.docker.io"
    assert server.path == "/v2"
    assert not server.is_mirror


@pytest.mark.parametrize(
    ("name", "origin"),
    [
        ("ghcr.io", "https://ghcr.io"),
        ("registry.example.com:5000", "https://registry.example.com:5000"),
        ("localhost:5000", "http://localhost:5000"),
        ("127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_other_namespaces_are_served_by_their_own_host_by_default(name, origin):
    assert build_namespace(name, NamespaceSettings(), source="test").hosts[-1].origin == origin


def test_relative_ca_and_client_paths_resolve_against_the_hosts_toml_directory(tmp_path):
    mirror, server = chain(
        'ca = "server-ca.pem"\n'
        '[host."https://m.example"]\n'
        'ca = ["ca.pem", "/abs/ca.pem"]\n'
        'client = [["certs/client.cert", "certs/client.key"]]\n',
        base_dir=tmp_path,
    ).hosts
    assert mirror.ca == (str(tmp_path / "ca.pem"), "/abs/ca.pem")
    certificate, key = str(tmp_path / "certs/client.cert"), str(tmp_path / "certs/client.key")
    assert mirror.client == ((certificate, key),)
    assert server.ca == (str(tmp_path / "server-ca.pem"),)


# -- choosing hosts by capability ---------------------------------------------------------


def test_hosts_for_resolve_skips_pull_only_mirrors_and_keeps_order():
    namespace = chain(CONTAINERD_EXAMPLE)
    assert [h.host for h in namespace.hosts_for(Capability.RESOLVE)] == [
        "mirror-a.example",
        "localhost:5000",
        "registry-1.docker.io",
    ]


def test_hosts_for_pull_includes_every_pulling_mirror_then_the_server():
    namespace = chain(CONTAINERD_EXAMPLE)
    assert [h.host for h in namespace.hosts_for(Capability.PULL)] == [
        "mirror-a.example",
        "mirror-b.example:8443",
        "localhost:5000",
        "registry-1.docker.io",
    ]


def test_push_never_goes_to_a_mirror_that_did_not_ask_for_it():
    namespace = chain('[host."https://m1.example"]\n[host."https://m2.example"]\n')
    assert [h.host for h in namespace.hosts_for(Capability.PUSH)] == ["registry-1.docker.io"]


capability_lists = st.lists(
    st.sampled_from(["pull", "resolve", "push", "referrers"]), min_size=1, unique=True
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.none(), capability_lists), max_size=5),
    st.sampled_from(list(Capability)),
)
def test_hosts_for_is_the_ordered_subsequence_of_hosts_with_the_capability(caps, wanted):
    tables = []
    for index, listed in enumerate(caps):
        tables.append(f'[host."https://m{index}.example"]')
        if listed is not None:
            tables.append(f"capabilities = {listed!r}".replace("'", '"'))
    namespace = chain("\n".join(tables))
    chosen = namespace.hosts_for(wanted)
    assert chosen == [h for h in namespace.hosts if wanted in h.capabilities]
    assert chosen[-1] == namespace.hosts[-1]  # the server does everything, and comes last
    for host, listed in zip(namespace.hosts, caps, strict=False):
        expected = Capability.parse(listed) if listed is not None else Capability.mirror_default()
        assert host.capabilities == expected


# -- hosts directories --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directory", "namespace"),
    [
        ("docker.io", "docker.io"),
        ("registry.example.com_5000", "registry.example.com:5000"),
        ("localhost_5000", "localhost:5000"),
        ("registry.example.com:5000", "registry.example.com:5000"),
        ("my_registry.example", "my_registry.example"),  # not a port: left alone
        ("host_", "host_"),
    ],
)
def test_hosts_dir_names_may_spell_the_port_with_an_underscore(directory, namespace):
    assert hosts_dir_namespace_name(directory) == namespace


def test_containerd_host_port_directory_spelling_with_trailing_underscore_is_understood():
    assert hosts_dir_namespace_name("registry.example.com_5000_") == "registry.example.com:5000"


def write_hosts(root: Path, directory: str, text: str) -> Path:
    (root / directory).mkdir(parents=True)
    path = root / directory / "hosts.toml"
    path.write_text(text)
    return path


def test_load_hosts_dir_reads_each_namespace_and_the_default(tmp_path):
    write_hosts(tmp_path, "docker.io", '[host."https://hub-mirror.example"]\n')
    write_hosts(tmp_path, "registry.example.com_5000", 'server = "https://r.example:5000"\n')
    write_hosts(tmp_path, "_default", '[host."https://any-mirror.example"]\n')
    (tmp_path / "no-hosts-file").mkdir()
    (tmp_path / "not a registry").mkdir()
    found = load_hosts_dir(tmp_path)
    assert sorted(found) == ["_default", "docker.io", "no-hosts-file", "registry.example.com:5000"]
    assert list(found["docker.io"].settings.host) == ["https://hub-mirror.example"]
    assert found["registry.example.com:5000"].settings.server == "https://r.example:5000"
    assert list(found["_default"].settings.host) == ["https://any-mirror.example"]
    # As containerd: a registry's directory without hosts.toml is its default host.
    assert found["no-hosts-file"].settings == NamespaceSettings()


def test_a_directory_of_docker_certificate_files_configures_its_registrys_tls(tmp_path):
    directory = tmp_path / "registry.example_5000_"
    directory.mkdir()
    for name in ("ca.crt", "extra.crt", "client.cert", "client.key", "both.cert", "notes.txt"):
        (directory / name).write_text("")
    found = load_hosts_dir(tmp_path)["registry.example:5000"]
    assert found.source == f"{directory}/ (certificate files)"
    (server,) = build_namespace(
        "registry.example:5000", found.settings, source=found.source, base_dir=directory
    ).hosts
    assert server.origin == "https://registry.example:5000"
    assert server.capabilities == Capability.all()
    assert server.ca == (str(directory / "ca.crt"), str(directory / "extra.crt"))
    assert server.client == (
        (str(directory / "both.cert"), None),  # no both.key: the key is in the .cert
        (str(directory / "client.cert"), str(directory / "client.key")),
    )


def test_an_empty_hosts_toml_falls_back_to_the_certificate_files(tmp_path):
    directory = tmp_path / "registry.example"
    directory.mkdir()
    (directory / "hosts.toml").write_text("")
    (directory / "ca.crt").write_text("")
    assert load_hosts_dir(tmp_path)["registry.example"].settings.ca == [str(directory / "ca.crt")]


def test_certificate_files_for_a_loopback_registry_mean_https(tmp_path):
    (tmp_path / "127.0.0.1_5000_").mkdir()
    (tmp_path / "127.0.0.1_5000_" / "ca.crt").write_text("")
    (tmp_path / "localhost_5001_").mkdir()
    found = load_hosts_dir(tmp_path)
    tls = build_namespace("127.0.0.1:5000", found["127.0.0.1:5000"].settings, source="t")
    plain = build_namespace("localhost:5001", found["localhost:5001"].settings, source="t")
    assert tls.hosts[-1].origin == "https://127.0.0.1:5000"
    assert plain.hosts[-1].origin == "http://localhost:5001"


def test_host_port_underscore_wins_over_host_colon_port_as_containerd_looks_there_first(tmp_path):
    write_hosts(tmp_path, "r.example:5000", 'server = "https://colon.example"\n')
    (tmp_path / "r.example_5000_").mkdir()
    (tmp_path / "r.example_5000_" / "ca.crt").write_text("")
    found = load_hosts_dir(tmp_path)["r.example:5000"]
    assert (found.from_toml, found.settings.server) == (False, None)


def test_unknown_keys_of_each_hosts_toml_are_kept_with_the_file(tmp_path):
    path = write_hosts(tmp_path, "r.example", 'server = "https://r.example"\nmirrors = []\n')
    found = load_hosts_dir(tmp_path)["r.example"]
    assert (found.source, found.ignored) == (str(path), ("mirrors",))


def test_load_hosts_dir_names_the_broken_file(tmp_path):
    path = write_hosts(tmp_path, "ghcr.io", "this is not toml\n")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_hosts_dir(tmp_path)


def test_load_hosts_dir_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_hosts_dir(tmp_path / "missing")


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(
            st.sampled_from(
                [
                    'server = "https://r.example"',
                    'server = "ftp://x"',
                    '[host."https://m.example"]',
                    '[host.""]',
                    'capabilities = ["pull"]',
                    'capabilities = ["fly"]',
                    "capabilities = 3",
                    'ca = ["a.crt", "b.crt"]',
                    'client = [["c", "k", "x"]]',
                    "skip_verify = true",
                    'header = {X = "y"}',
                    "override_path = true",
                    "read_timeout = -1",
                    "=",
                ]
            ),
            max_size=8,
        ).map("\n".join),
    )
)
def test_any_hosts_toml_text_is_read_or_refused_with_a_value_error(text):
    try:
        settings = parse_hosts_toml(text)
        build_namespace("registry.example", settings, source="test")
    except ValueError as exc:
        assert str(exc)
