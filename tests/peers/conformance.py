"""The OCI distribution-spec conformance suite (v1.1.1), vendored in tests/conformance/
with the two Go libraries Debian does not package (see its README.md).

- ``build_suite(cache)``: ``tests/conformance/build.sh`` builds ``conformance.test``
  with Go from Debian (about 20 s); the binary is kept under ``cache`` by the content
  hash of the sources, so a session builds it once and a changed tarball rebuilds it.
- ``run_suite(binary, url, namespace, workdir)``: one run against a registry at
  ``url``, bounded in time, pushing and deleting in ``namespace``; its ``junit.xml``
  read into a ``SuiteResult``: the status of every test, in the suite's order.

Test names repeat in the suite (two "Populate registry with test blob"), so a test is
known by its name and its occurrence.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from tests.peers import PeerError, loopback_url, require_binary

SUITE_DIR = Path(__file__).resolve().parents[1] / "conformance"
BUILD_TIMEOUT = 900.0  # build.sh's own bound for `go test -c`
RUN_TIMEOUT = 180.0  # a run takes about a second against a registry on 127.0.0.1
TestId = tuple[str, int]  # the test's name, and which occurrence of the name


def suite_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(SUITE_DIR.iterdir()):
        if path.name == "build.sh" or path.name.endswith(".tar.gz"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build_suite(cache: Path) -> Path:
    """``cache/<hash>/conformance.test``, built now unless it is there already."""
    binary = cache / suite_hash() / "conformance.test"
    if binary.exists():
        return binary
    require_binary("go")  # build.sh installs the rest of what it names (needs root)
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=binary.parent) as work:
        try:
            done = subprocess.run(
                ["bash", str(SUITE_DIR / "build.sh"), work],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PeerError(f"build.sh did not finish in {BUILD_TIMEOUT:.0f} s") from None
        built = Path(work) / "conformance.test"
        if done.returncode != 0 or not built.exists():
            raise PeerError(f"build.sh failed ({done.returncode}):\n{done.stderr[-3000:]}")
        os.replace(built, binary)  # whole or not at all
    return binary


@dataclass(frozen=True)
class SuiteResult:
    statuses: dict[TestId, str]  # "passed", "failed" or "skipped"
    junit: Path

    def count(self, status: str) -> int:
        return sum(1 for s in self.statuses.values() if s == status)

    def passed(self) -> set[TestId]:
        return {test for test, status in self.statuses.items() if status == "passed"}

    @property
    def summary(self) -> str:
        return f"{self.count('passed')}/{self.count('failed')}/{self.count('skipped')}"


def read_junit(path: Path) -> dict[TestId, str]:
    seen: collections.Counter[str] = collections.Counter()
    statuses = {}
    for case in ET.parse(path).iter("testcase"):  # noqa: S314  (our own build wrote it)
        name = case.get("name", "")
        seen[name] += 1
        status = case.get("status") or (
            "failed"
            if case.find("failure") is not None or case.find("error") is not None
            else "skipped"
            if case.find("skipped") is not None
            else "passed"
        )
        statuses[(name, seen[name])] = status
    return statuses


def run_suite(
    binary: Path,
    url: str,
    namespace: str,
    workdir: Path,
    *,
    junit: Path,
    credentials: tuple[str, str] | None = None,
) -> SuiteResult:
    """Every workflow of the suite (pull, push, content discovery and management)
    against ``url``; its junit.xml is copied to ``junit``."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "OCI_ROOT_URL": loopback_url(url),
        "OCI_NAMESPACE": namespace,
        "OCI_CROSSMOUNT_NAMESPACE": f"{namespace}-other",
        "OCI_TEST_PULL": "1",
        "OCI_TEST_PUSH": "1",
        "OCI_TEST_CONTENT_DISCOVERY": "1",
        "OCI_TEST_CONTENT_MANAGEMENT": "1",
        "OCI_HIDE_SKIPPED_WORKFLOWS": "0",
        "OCI_DEBUG": "0",
        "OCI_REPORT_DIR": str(workdir),
    }
    if credentials is not None:
        env |= {"OCI_USERNAME": credentials[0], "OCI_PASSWORD": credentials[1]}
    try:
        done = subprocess.run(
            [str(binary)],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PeerError(f"the conformance suite did not finish in {RUN_TIMEOUT:.0f} s") from None
    (workdir / "output.txt").write_text(done.stdout + done.stderr)
    written = workdir / "junit.xml"
    if not written.exists():  # exit 1 is failed tests; no junit.xml is a suite that broke
        raise PeerError(f"the suite wrote no junit.xml ({done.returncode}):\n{done.stderr[-3000:]}")
    junit.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(written, junit)
    return SuiteResult(read_junit(junit), junit)
