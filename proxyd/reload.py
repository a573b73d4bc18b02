"""Credentials and users read again while serving: a rotated secret needs no restart.

docker asks a credential helper at every pull. proxyd asks its helpers at start and
then every `credential_refresh` seconds (ECR's passwords last 12 hours, some clouds'
tokens one), reading the docker config again with them (a `docker login` since), and
when an upstream refuses the credentials it sent (at most once a minute): a refused
request whose host's credentials changed is sent once more with them. On SIGHUP
(`systemctl reload proxyd`) it reads the docker config, asks its helpers and reads the
htpasswd file at once. A reading that fails changes nothing: it is logged, and what
proxyd had stays. Upstream tokens already fetched stay until they expire.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from proxyd.background import stop_loop
from proxyd.clock import SYSTEM_CLOCK, Clock
from proxyd.config import ConfigError
from proxyd.runtime import RuntimeConfig, load_credentials, load_users
from proxyd.singleflight import SingleFlight

log = structlog.get_logger("proxyd.reload")

REFUSED_PAUSE = 60.0  # seconds: refusals ask for a new read at most this often


class Reloader:
    def __init__(
        self, runtime: RuntimeConfig, *, interval: float, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.runtime = runtime
        self.clock = clock
        # Periodic reads only where there is something that can change on its own.
        self.interval = interval if runtime.settings.docker_config is not None else 0.0
        self.on_users: Callable[[dict[str, bytes]], None] | None = None
        self._wake = asyncio.Event()
        self._users_asked = False
        self._refused_at = -REFUSED_PAUSE
        self._refusal: SingleFlight[bool] = SingleFlight()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await stop_loop(self._task)

    def reload_now(self) -> None:
        """SIGHUP: credentials and users, as soon as the loop turns."""
        self._users_asked = True
        self._wake.set()

    async def refused(self, host: str) -> bool:
        """An upstream refused (or asked for) credentials for `host`, perhaps rotated
        since the last read: read them again now, one read shared by the requests
        refused meanwhile, at most one a minute. True when `host`'s credentials changed:
        the request is worth sending once more."""
        if self.runtime.settings.docker_config is None:
            return False  # the TOML file's credentials are read at start only
        before = self.runtime.credential_for(host)
        if "read" not in self._refusal:
            now = self.clock.monotonic()
            if now - self._refused_at < REFUSED_PAUSE:
                return False
            self._refused_at = now
            log.info("credentials.refused", host=host)
        try:
            await self._refusal.run("read", lambda: self.reload(users=False))
        except Exception as exc:  # the request goes on with its 401, not with this
            log.error("config.reload_failed", error=repr(exc))
            return False
        return self.runtime.credential_for(host) != before

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval or None)
            self._wake.clear()
            users, self._users_asked = self._users_asked, False
            try:
                await self.reload(users=users)
            except Exception as exc:  # a bug here must not end reloading for good
                log.error("config.reload_failed", error=repr(exc))

    async def reload(self, *, users: bool) -> bool:
        """Read the credentials (and, if asked, the users) again and use them; False
        when a reading failed and nothing changed."""
        settings = self.runtime.settings
        try:
            # Helpers may take seconds (HELPER_TIMEOUT each): off the event loop.
            credentials = await asyncio.to_thread(load_credentials, settings)
            fresh_users = await asyncio.to_thread(load_users, settings) if users else None
            if fresh_users is not None and self.on_users is not None:
                self.on_users(fresh_users)
        except (ConfigError, ValueError) as exc:
            log.warning("config.reload_failed", error=str(exc))
            return False
        if fresh_users is not None:
            self.runtime.inbound_users = fresh_users
        changed = self.runtime.replace_credentials(credentials)
        if changed or users:
            said = {} if fresh_users is None else {"users": len(fresh_users)}
            log.info("config.reloaded", credentials_changed=changed, **said)
        return True
