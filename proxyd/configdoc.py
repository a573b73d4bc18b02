"""The configuration reference, generated from the settings models so it cannot
drift: `python -m proxyd.configdoc` prints the Markdown that README.md holds between
its `<!-- settings -->` markers (a test keeps the two equal)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
from typing import Any

from pydantic import BaseModel, ByteSize
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from proxyd.clustersettings import ClusterSettings
from proxyd.config import CacheSettings, Settings
from proxyd.hostsfile import NamespaceSettings

BEGIN, END = "<!-- settings -->", "<!-- /settings -->"
_SKIP_TOP = {"namespaces", "credentials", "cache", "cluster"}


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None or value == {} or value == []:
        return "none"
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, ByteSize):
        return f"`{value.human_readable(separator='')}`"
    if hasattr(value, "as_posix"):
        return "`~/.cache/proxyd`" if "cache" in str(value) else f"`{value}`"
    return f"`{json.dumps(value) if isinstance(value, bool | dict | list) else value}`"


def _flag(name: str) -> str:
    wanted = "--" + name.replace("_", "-")
    return f"`{wanted}`" if re.search(rf"{re.escape(wanted)}\b", _serve_help()) else ""


@functools.cache
def _serve_help() -> str:
    from proxyd.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    return out.getvalue()


def _rows(model: type[BaseModel], prefix: str, env: str | None) -> list[str]:
    """A row per setting; `env` None: a per-namespace key (no flag, no variable)."""
    rows = []
    for name, field in model.model_fields.items():
        if env is not None and prefix == "" and name in _SKIP_TOP:
            continue
        key, meaning = f"`{prefix}{name}`", field.description or ""
        if env is None:
            rows.append(f"| {key} | {_default(field)} | {meaning} |")
            continue
        flag = _flag(name) if prefix == "" else ""
        rows.append(f"| {key} | {flag} | `{env}{name.upper()}` | {_default(field)} | {meaning} |")
    return rows


def render() -> str:
    header = ["| setting | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    top = [
        *header,
        *_rows(Settings, "", "PROXYD_"),
        *_rows(CacheSettings, "cache.", "PROXYD_CACHE__"),
        *_rows(ClusterSettings, "cluster.", "PROXYD_CLUSTER__"),
    ]
    per_namespace = [
        "| key | default | meaning |",
        "|---|---|---|",
        *_rows(NamespaceSettings, "", None),
    ]
    return "\n".join(
        [
            BEGIN,
            *top,
            "",
            'Per namespace (`[namespaces."NS"]`, or a hosts.toml; the host keys also',
            'apply to each `[namespaces."NS".host."URL"]` mirror):',
            "",
            *per_namespace,
            END,
        ]
    )


def main() -> None:
    print(render())


if __name__ == "__main__":
    main()
