"""glibc's heap thresholds, set once at start (proxyd.heap): what is set, and when an
operator's own malloc settings, or another C library, leave them alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxyd import cli, heap
from proxyd.server import daemon
from proxyd.upstream import BODY_BUFFER, SOCKET_READ


class Mallopt:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def __call__(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return self.answer


def test_the_mmap_threshold_then_the_trim_threshold_are_fixed() -> None:
    mallopt = Mallopt()
    assert heap.keep_heap({}, mallopt)
    assert mallopt.calls == [
        (heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD),
        (heap.M_TRIM_THRESHOLD, heap.TRIM_THRESHOLD),
    ]
    # Every body chunk (one socket read at most, within the body's buffer) comes from
    # the heap.
    assert heap.MMAP_THRESHOLD > BODY_BUFFER >= SOCKET_READ


def test_an_operators_malloc_settings_win() -> None:
    for environ in (
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
    ):
        mallopt = Mallopt()
        assert not heap.keep_heap(environ, mallopt)
        assert mallopt.calls == []
    assert heap.keep_heap({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, Mallopt())


def test_a_refused_setting_is_reported() -> None:
    assert not heap.keep_heap({}, Mallopt(answer=0))


def test_glibcs_mallopt_is_found_here() -> None:
    """This machine's Python runs on glibc (the image too: python:3.11-slim)."""
    assert heap.glibc_mallopt() is not None


@pytest.mark.parametrize("command", ["serve", "prefetch"])
def test_the_commands_that_stream_blobs_keep_the_heap_before_they_start(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    order: list[str] = []
    monkeypatch.setattr(heap, "keep_heap", lambda: order.append("heap") or True)
    monkeypatch.setattr(daemon, "serve", lambda runtime: order.append("serve") or 0)
    monkeypatch.setattr(cli, "prefetch_command", lambda *args: order.append("prefetch") or 0)
    argv = [command, "--cache-dir", str(tmp_path)] + (
        ["alpine:3.20"] if command == "prefetch" else []
    )
    assert cli.main(argv) == 0
    assert order == ["heap", command]


def test_the_other_commands_leave_malloc_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(heap, "keep_heap", lambda: pytest.fail("mallopt called"))
    assert cli.main(["check-config", "--cache-dir", str(tmp_path)]) == 0


def test_what_the_start_freed_goes_back_to_the_kernel_once_serving_begins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[int] = []
    assert heap.release_free(lambda pad: trims.append(pad) or 1)
    assert trims == [0]  # no padding kept: everything free at the top and between
    released: list[bool] = []
    monkeypatch.setattr(heap, "release_free", lambda: released.append(True) or True)
    monkeypatch.setattr(daemon.gc, "freeze", lambda: None)  # the suite's heap stays as it is
    daemon.freeze_startup_heap()
    assert released == [True]


def test_glibcs_malloc_trim_is_found_here() -> None:
    assert heap.glibc_malloc_trim() is not None
