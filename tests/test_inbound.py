"""Inbound access control: htpasswd users, what needs credentials under
`auth_required`, the Basic challenge, the cache of bcrypt checks, and inbound
credentials never leaving proxyd."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from structlog.testing import capture_logs

from proxyd import inbound
from proxyd.cli import main
from proxyd.config import ConfigError, load_settings
from proxyd.errors import Unauthorized
from proxyd.inbound import InboundAuth, basic_credentials, need, parse_htpasswd
from proxyd.runtime import build_runtime
from tests.conftest import host, oci_code, origin
from tests.fakes import FakeRegistry, digest_of, make_image

USERS = {"alice": "wonderland", "bob": "builder"}


def write_htpasswd(path: Path, users: dict[str, str] = USERS, prefix: str = "$2y$") -> Path:
    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        lines.append(f"{user}:{prefix}{hashed[4:]}")
    path.write_text("# users of proxyd\n\n" + "\n".join(lines) + "\n")
    return path


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def config(server: Any, htpasswd: Path, *extra: str) -> str:
    return "\n".join(
        [
            f'htpasswd = "{htpasswd}"',
            *extra,
            f'default_namespace = "{host(server)}"',
            f'[namespaces."{host(server)}"]',
            f'server = "{origin(server)}"',
            "allow_push = true",
        ]
    )


def challenge_of(response: Any) -> tuple[int, str, str]:
    return (
        response.status,
        response.headers.get("WWW-Authenticate", ""),
        response.headers.get("Docker-Distribution-API-Version", ""),
    )


REFUSED = (401, 'Basic realm="proxyd"', "registry/2.0")


# -- the htpasswd file and the policy (pure) ----------------------------------------------


def test_htpasswd_takes_bcrypt_only(tmp_path):
    users = parse_htpasswd(write_htpasswd(tmp_path / "h").read_text(), "h")
    assert sorted(users) == ["alice", "bob"]
    assert parse_htpasswd(write_htpasswd(tmp_path / "b", prefix="$2b$").read_text(), "b")
    for line, said in [
        ("carol:$apr1$salt$hash", "line 1: the hash of 'carol' is not bcrypt"),
        ("carol:{SHA}abc=", "not bcrypt"),
        ("carol", "line 1: expected user:hash"),
        ("", "names no user"),
    ]:
        with pytest.raises(ValueError, match=said.replace("$", r"\$")):
            parse_htpasswd(line, "h")


GOOD_HASH = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(rounds=4)).decode()


@pytest.mark.parametrize(
    "hashed",
    [
        pytest.param("$2y$04$" + "a" * 53, id="a salt bcrypt refuses"),
        pytest.param("$2y$03$" + GOOD_HASH[7:], id="cost 3"),
        pytest.param("$2y$32$" + GOOD_HASH[7:], id="cost 32"),
        pytest.param("$2y$4$" + GOOD_HASH[7:], id="a one-digit cost"),
        pytest.param(GOOD_HASH[:-1], id="a character short"),
        pytest.param(GOOD_HASH + "x", id="a character long"),
        pytest.param(GOOD_HASH[:10] + "!" + GOOD_HASH[11:], id="not bcrypt's base64"),
        pytest.param("$2y$", id="the prefix alone"),
    ],
)
def test_a_malformed_bcrypt_hash_is_an_error_naming_its_line(tmp_path, capsys, hashed):
    with pytest.raises(ValueError, match="line 2: the bcrypt hash of 'carol' is malformed"):
        parse_htpasswd(f"alice:{GOOD_HASH}\ncarol:{hashed}\n", "h")
    path = tmp_path / "htpasswd"
    path.write_text(f"carol:{hashed}\n")
    with pytest.raises(ConfigError, match="malformed"):
        build_runtime(load_settings(None, htpasswd=path))  # as `proxyd serve` starts
    config = tmp_path / "proxyd.toml"
    config.write_text("")
    assert main(["check-config", "--config", str(config), "--htpasswd", str(path)]) == 2
    assert "malformed" in capsys.readouterr().err


@pytest.mark.parametrize("prefix", ["$2y$", "$2b$", "$2a$"])
def test_every_bcrypt_hash_htpasswd_and_bcrypt_make_is_well_formed(prefix):
    for rounds in (4, 5, 10):
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=rounds)).decode()
        assert inbound.well_formed_bcrypt(prefix + hashed[4:])


async def test_only_the_first_72_bytes_of_a_password_count_as_bcrypt_reads_them(tmp_path):
    """As distribution checks it, and as `htpasswd -B` hashed it: a longer password is
    checked, never a failed request (bcrypt 5 refuses to read past 72 bytes)."""
    long_password = "p" * 80
    hashed = bcrypt.hashpw(long_password[:72].encode(), bcrypt.gensalt(rounds=4)).decode()
    auth = InboundAuth(parse_htpasswd(f"alice:{hashed}", "h"), "all")
    header = basic("alice", long_password)["Authorization"]
    assert await auth.authenticate("GET", "/v2/", header) == "alice"
    for wrong in ("q" * 80, "p" * 71, "x" * 5000):
        with pytest.raises(Unauthorized):
            await auth.authenticate("GET", "/v2/", basic("alice", wrong)["Authorization"])


@pytest.mark.parametrize(
    ("required", "method", "path", "expected"),
    [
        ("push", "GET", "/v2/", "if-given"),
        ("push", "GET", "/v2/team/app/manifests/v1", "none"),
        ("push", "HEAD", "/v2/team/app/blobs/sha256:x", "none"),
        ("push", "POST", "/v2/team/app/blobs/uploads/", "required"),
        ("push", "PATCH", "/v2/team/app/blobs/uploads/x", "required"),
        ("push", "PUT", "/v2/team/app/manifests/v1", "required"),
        ("push", "DELETE", "/v2/team/app/manifests/v1", "required"),
        ("all", "GET", "/v2/", "required"),
        ("all", "GET", "/v2/team/app/manifests/v1", "required"),
        ("all", "GET", "/healthz", "none"),
        ("all", "GET", "/metrics", "none"),
    ],
)
def test_what_needs_credentials(required, method, path, expected):
    assert need(required, method, path) == expected


def test_basic_credentials_parsing():
    assert basic_credentials(basic("alice", "a:b")["Authorization"]) == ("alice", "a:b")
    assert basic_credentials("Basic Og==") is None  # what clients without credentials send
    assert basic_credentials("Bearer abc") is None
    assert basic_credentials("Basic !!!") is None


async def test_a_good_check_is_remembered_by_a_hash_of_the_header(tmp_path, monkeypatch):
    users = parse_htpasswd(write_htpasswd(tmp_path / "h").read_text(), "h")
    checks: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    clock = [0.0]
    auth = InboundAuth(users, "push", clock=lambda: clock[0])
    header = basic("alice", "wonderland")["Authorization"]
    for _ in range(3):
        assert await auth.authenticate("PUT", "/v2/a/manifests/v1", header) == "alice"
    assert len(checks) == 1
    assert all("wonderland" not in key and header not in key for key in auth._remembered)
    clock[0] += inbound.CACHE_SECONDS + 1
    assert await auth.authenticate("PUT", "/v2/a/manifests/v1", header) == "alice"
    assert len(checks) == 2
    for wrong in (basic("alice", "nope"), basic("mallory", "wonderland")):
        with pytest.raises(Exception, match="invalid username or password"):
            await auth.authenticate("PUT", "/v2/a/manifests/v1", wrong["Authorization"])
    assert len(checks) == 4  # an unknown user costs a bcrypt check too


# -- settings -------------------------------------------------------------------------------


def test_htpasswd_from_the_flag_and_the_environment(tmp_path, monkeypatch, capsys):
    path = write_htpasswd(tmp_path / "htpasswd")
    empty = tmp_path / "proxyd.toml"
    empty.write_text("")
    assert main(["check-config", "--config", str(empty), "--htpasswd", str(path)]) == 0
    assert f"inbound users:     2 from {path}, required for push" in capsys.readouterr().out
    monkeypatch.setenv("PROXYD_HTPASSWD", str(path))
    monkeypatch.setenv("PROXYD_AUTH_REQUIRED", "all")
    registry = build_runtime(load_settings(None))
    assert registry.inbound_users is not None and registry.auth_required == "all"


def test_bad_inbound_settings_are_configuration_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="auth_required needs htpasswd"):
        build_runtime(load_settings(None, auth_required="all"))
    md5 = tmp_path / "md5"
    md5.write_text("alice:$apr1$x$y\n")
    for path in (md5, tmp_path / "missing"):
        empty = tmp_path / "proxyd.toml"
        empty.write_text("")
        assert main(["check-config", "--config", str(empty), "--htpasswd", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "Traceback" not in err


# -- through proxyd -----------------------------------------------------------------------


@pytest.fixture
async def upstream(start_fake):
    fake = FakeRegistry()
    image = fake.add(make_image())
    server = await start_fake(fake)
    return fake, image, server


async def test_push_mode_lets_anyone_pull_and_only_users_push(make_proxyd, upstream, tmp_path):
    fake, image, server = upstream
    proxyd = await make_proxyd(config(server, write_htpasswd(tmp_path / "h")))

    probe = await proxyd.get("/v2/")
    assert probe.status == 200
    assert probe.headers["WWW-Authenticate"] == 'Basic realm="proxyd"'
    pulled = await proxyd.get("/v2/team/app/manifests/v1")
    assert pulled.status == 200
    anonymous_pull = await proxyd.get(
        f"/v2/team/app/blobs/{image.layer}", headers={"Authorization": "Basic Og=="}
    )
    assert anonymous_pull.status == 200

    for headers in ({}, basic("alice", "nope"), basic("nobody", "x"), {"Authorization": "Og=="}):
        refused = await proxyd.post("/v2/team/app/blobs/uploads/", headers=headers)
        assert challenge_of(refused) == REFUSED, headers
        assert await oci_code(refused) == "UNAUTHORIZED"
    assert fake.requests("/blobs/uploads") == []
    wrong_login = await proxyd.get("/v2/", headers=basic("alice", "nope"))
    assert challenge_of(wrong_login) == REFUSED  # `podman login` with a wrong password fails

    accepted = await proxyd.post(
        "/v2/team/app/blobs/uploads/", headers=basic("alice", "wonderland")
    )
    assert accepted.status != 401  # past proxyd's door (the fake takes no uploads)
    assert fake.requests("/blobs/uploads")


async def test_all_mode_asks_for_credentials_everywhere(make_proxyd, upstream, tmp_path):
    fake, image, server = upstream
    proxyd = await make_proxyd(
        config(server, write_htpasswd(tmp_path / "h"), 'auth_required = "all"')
    )
    for path in ("/v2/", "/v2/team/app/manifests/v1", f"/v2/team/app/blobs/{image.layer}"):
        assert challenge_of(await proxyd.get(path)) == REFUSED, path
        assert challenge_of(await proxyd.get(path, headers=basic("bob", "nope"))) == REFUSED
        assert (await proxyd.get(path, headers=basic("bob", "builder"))).status == 200, path
        long_password = basic("bob", "builder" + "x" * 100)  # more than bcrypt reads
        assert challenge_of(await proxyd.get(path, headers=long_password)) == REFUSED, path
    assert (await proxyd.get("/healthz")).status == 200
    assert fake.requests("/manifests/")  # only the authenticated pull went upstream
    assert len(fake.requests("/manifests/")) == 1


async def test_inbound_credentials_never_leave_proxyd(make_proxyd, upstream, tmp_path):
    fake, image, server = upstream
    proxyd = await make_proxyd(
        config(server, write_htpasswd(tmp_path / "h"), 'auth_required = "all"')
    )
    alice = basic("alice", "wonderland")
    with capture_logs() as logs:
        await proxyd.get("/v2/team/app/manifests/v1", headers=alice)
        await proxyd.get(f"/v2/team/app/blobs/{image.layer}", headers=alice)
        await proxyd.post("/v2/team/app/blobs/uploads/", headers=alice)
        await proxyd.get("/v2/", headers=basic("alice", "a-wrong-secret"))
    assert fake.seen
    assert all("Authorization" not in seen.headers for seen in fake.seen)
    text = repr(logs)
    assert "wonderland" not in text and "a-wrong-secret" not in text
    assert alice["Authorization"].split()[1] not in text


async def test_without_htpasswd_client_credentials_are_ignored_and_not_forwarded(
    make_proxyd, upstream
):
    fake, _, server = upstream
    proxyd = await make_proxyd(
        f'default_namespace = "{host(server)}"\n[namespaces."{host(server)}"]\n'
        f'server = "{origin(server)}"\n'
    )
    probe = await proxyd.get("/v2/")
    assert probe.status == 200 and "WWW-Authenticate" not in probe.headers
    pulled = await proxyd.get("/v2/team/app/manifests/v1", headers=basic("x", "y"))
    assert pulled.status == 200
    assert all("Authorization" not in seen.headers for seen in fake.seen)


async def test_an_upload_can_be_continued_only_by_its_user(make_proxyd, start_fake, tmp_path):
    from tests.test_push import UploadRegistry, serve

    registry = UploadRegistry()
    server = await serve(start_fake, registry)
    proxyd = await make_proxyd(config(server, write_htpasswd(tmp_path / "h")))
    alice, bob = basic("alice", "wonderland"), basic("bob", "builder")
    location = (await proxyd.post("/v2/team/app/blobs/uploads/", headers=alice)).headers["Location"]
    stolen = await proxyd.patch(location, data=b"evil", headers=bob)
    assert stolen.status == 404
    assert await oci_code(stolen) == "BLOB_UPLOAD_UNKNOWN"
    assert (await proxyd.patch(location, data=b"good", headers=alice)).status == 202
    done = await proxyd.put(location, params={"digest": digest_of(b"good")}, headers=alice)
    assert done.status == 201
