"""The OCI distribution-spec conformance suite (v1.1.1, tests/conformance/) run
against a real distribution 2.8 directly, then through proxyd in front of the same
distribution, with pushes and deletes allowed: once with a plain upstream and once
with a token-auth upstream whose credentials only proxyd holds. Compared test by
test: proxyd must pass every test distribution passes directly (and may pass more:
it answers some upload edge cases better).

Each run's junit.xml is kept in build/conformance/ (a CI artefact), and one line at
the end of the test output sums them up.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SUMMARY_LINES
from tests.e2e.helpers import ALICE, StartProxyd
from tests.peers.conformance import SuiteResult, build_suite, run_suite
from tests.peers.proxyd import PROJECT_ROOT, Namespace, proxyd_config
from tests.peers.registry import Registry
from tests.peers.tokenserver import TokenServer

pytestmark = pytest.mark.peers

ARTEFACTS = PROJECT_ROOT / "build" / "conformance"
VENV = PROJECT_ROOT / ".venv"
RESULTS: dict[str, SuiteResult] = {}  # by run, for the summary line


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's binary, cached in the virtualenv (made by `make test`) when there is one."""
    cache = VENV / "conformance" if VENV.is_dir() else tmp_path_factory.mktemp("conformance")
    return build_suite(cache)


@pytest.fixture(scope="module")
def upstreams(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer
) -> Iterator[dict[str, Registry]]:
    """A distribution of the suite's own per auth mode: it pushes, tags and deletes."""
    workdir = tmp_path_factory.mktemp("conformance-registries")
    with (
        Registry.plain(workdir / "plain") as plain,
        Registry.token(workdir / "token", token_server) as token,
    ):
        yield {"plain": plain, "token": token}


@pytest.fixture(scope="module")
def direct(
    suite: Path, upstreams: dict[str, Registry], tmp_path_factory: pytest.TempPathFactory
) -> SuiteResult:
    """The suite straight against distribution, without and with credentials: a test
    either run passes is one proxyd must pass."""
    workdir = tmp_path_factory.mktemp("conformance-direct")
    runs = {
        "direct": (upstreams["plain"], None),
        "direct-token": (upstreams["token"], ALICE),
    }
    for name, (registry, credentials) in runs.items():
        RESULTS[name] = run_suite(
            suite,
            registry.url,
            f"conformance/{name}",
            workdir / name,
            junit=ARTEFACTS / f"{name}.xml",
            credentials=credentials,
        )
    return RESULTS["direct"]


@pytest.fixture(scope="module", autouse=True)
def summary_line(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if RESULTS:
        runs = ", ".join(f"{name} {result.summary}" for name, result in RESULTS.items())
        request.config.stash[SUMMARY_LINES].append(
            f"OCI conformance v1.1.1 (passed/failed/skipped): {runs}; "
            f"junit.xml in {ARTEFACTS.relative_to(PROJECT_ROOT)}/"
        )


@pytest.mark.parametrize("auth", ["plain", "token"])
def test_proxyd_passes_every_conformance_test_distribution_passes_directly(
    auth: str,
    suite: Path,
    upstreams: dict[str, Registry],
    direct: SuiteResult,
    start_proxyd: StartProxyd,
    tmp_path: Path,
) -> None:
    registry = upstreams[auth]
    proxyd = start_proxyd(
        proxyd_config(
            default_namespace=registry.host,
            namespaces=[Namespace(registry.host, registry.url, allow_push=True, allow_delete=True)],
            credentials={registry.host: ALICE} if auth == "token" else None,
            settings={"log_level": "info"},
        )
    )
    name = f"proxyd-{auth}"
    through = RESULTS[name] = run_suite(
        suite,
        proxyd.url,
        f"conformance/{name}",
        tmp_path / "suite",
        junit=ARTEFACTS / f"{name}.xml",
    )
    wanted = RESULTS["direct"].passed() | RESULTS["direct-token"].passed()
    failing = sorted(f"{test} ({occurrence})" for test, occurrence in wanted - through.passed())
    assert not failing, f"only through proxyd ({through.junit}):\n" + "\n".join(failing)
    assert through.count("passed") >= direct.count("passed")
