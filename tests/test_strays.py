"""A fake upstream records the requests of its test only (tests/strays.py): one from a
process the test did not start, as another suite's probe of a reused port, is answered
404 and not seen; the test's own (this process, a process it started) are seen."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from tests.conftest import origin, until
from tests.fakes import FakeRegistry
from tests.test_push import UploadRegistry

# GET the URL, once no longer a child of argv[3], and write the status it got.
GETTER = """
import os, sys, time, urllib.error, urllib.request
deadline = time.monotonic() + 10
while os.getppid() == int(sys.argv[3]) and time.monotonic() < deadline:
    time.sleep(0.01)
try:
    status = urllib.request.urlopen(sys.argv[1], timeout=10).status
except urllib.error.HTTPError as err:
    status = err.code
open(sys.argv[2] + ".tmp", "w").write(str(status))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
"""


async def get_as(url: str, out: Path, *, orphan: bool) -> int:
    """The status of ``GET url`` from another process: a child of this one, or an
    orphan (started in the background by a shell that exits at once: reparented, it
    descends from this process no more)."""
    if orphan:
        argv = ["sh", "-c", '"$0" -c "$1" "$2" "$3" $$ &', sys.executable, GETTER, url, str(out)]
    else:
        argv = [sys.executable, "-c", GETTER, url, str(out), "-1"]
    await asyncio.to_thread(subprocess.run, argv, check=True, timeout=30)
    await until(out.exists, within=30)
    return int(out.read_text())


async def test_a_request_from_a_process_the_test_did_not_start_is_not_seen(start_fake, tmp_path):
    for fake in (FakeRegistry(), UploadRegistry()):
        server = await start_fake(fake)
        url = f"{origin(server)}/v2/"
        assert await get_as(url, tmp_path / f"{id(fake)}-orphan", orphan=True) == 404
        assert fake.seen == []
        assert await get_as(url, tmp_path / f"{id(fake)}-child", orphan=False) == 200
        assert [s.path for s in fake.seen] == ["/v2/"]
