"""The `[cluster]` table: a fleet of proxyds sharing what they hold and their upload
sessions through one Redis (README, "Running a fleet"), and the fleet's shared
secret, read from its file when the configuration is loaded. `proxyd.config` holds
it as `Settings.cluster`; without the table proxyd works alone."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretBytes, field_validator

PEER_SECRET_MIN = 16  # bytes: a guessable secret would open every node's store


class ClusterSettings(BaseModel):
    """A fleet of proxyds sharing what they hold through one Redis (README, "Running a
    fleet"). Without a `[cluster]` table proxyd works alone."""

    model_config = ConfigDict(extra="forbid")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="the Redis the fleet coordinates through (may be the small cache's)",
    )
    advertise: str = Field(
        description="the URL this node's peers reach it at (http://NODE_IP:5000)"
    )
    listen: str | None = Field(
        None,
        description="HOST:PORT of a listener serving only the peer endpoint and /healthz "
        "(e.g. the node IP, while `listen` stays on the loopback); unset: peers use `listen`",
    )
    secret_file: Path = Field(
        description="a file holding the secret every node of the fleet shares, which "
        "peer requests carry (at least 16 bytes)"
    )
    fanout: int = Field(
        4, ge=1, le=1000, description="at most this many peers stream one blob from this node"
    )
    ttl: float = Field(
        5.0,
        ge=0.1,
        description="seconds this node's entries in Redis live unless refreshed (every "
        "third of it): a node gone stops counting within this",
    )
    timeout: float = Field(
        1.0, gt=0, description="seconds any one Redis call may take; then the node works alone"
    )

    @field_validator("advertise")
    @classmethod
    def _check_advertise(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"advertise must be an http(s) URL, got {value!r}")
        if parts.path.strip("/") or parts.query or parts.fragment:
            raise ValueError(f"advertise is an origin (scheme, host, port), got {value!r}")
        return f"{parts.scheme}://{parts.netloc}"


def load_peer_secret(cluster: ClusterSettings | None) -> SecretBytes | None:
    """The fleet's shared secret from `secret_file` (surrounding whitespace dropped, as
    a file written by `echo` or a Kubernetes Secret ends in a newline)."""
    if cluster is None:
        return None
    path = cluster.secret_file
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(
            f"cluster.secret_file: cannot read {path}: {exc.strerror or exc}"
        ) from None
    if not all(0x21 <= byte <= 0x7E for byte in secret):
        raise ValueError(
            f"cluster.secret_file: {path} holds characters a header cannot carry: the "
            "fleet's secret is printable ASCII without spaces (e.g. `openssl rand -hex 32`)"
        )
    if len(secret) < PEER_SECRET_MIN:
        raise ValueError(
            f"cluster.secret_file: {path} holds {len(secret)} bytes; the fleet's secret needs "
            f"at least {PEER_SECRET_MIN} (e.g. `openssl rand -hex 32 > {path}`)"
        )
    return SecretBytes(secret)
