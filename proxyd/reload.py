"""Credentials and users read again while serving: a rotated secret needs no restart.

docker asks a credential helper at every pull. proxyd asks its helpers at start and
then every `credential_refresh` seconds (ECR's passwords last 12 hours, some clouds'
tokens one), reading the docker config again with them (a `docker login` since), and
soon after an upstream refuses the credentials it sent (at most once a minute): the
refused request fails, the next ones use what the helper says now. On SIGHUP
(`systemctl reload proxyd`) it reads the docker config, asks its helpers and reads the
htpasswd file at once. A reading that fails changes nothing: it is logged, and what
proxyd had stays. Upstream tokens already fetched stay until they expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from proxyd.background import stop_loop
from proxyd.config import ConfigError, Registry, load_credentials, load_users

log = structlog.get_logger("proxyd.reload")

REFUSED_PAUSE = 60.0  # seconds: refusals ask for a new read at most this often


class Reloader:
    def __init__(self, registry: Registry, *, interval: float) -> None:
        self.registry = registry
        # Periodic reads only where there is something that can change on its own.
        self.interval = interval if registry.settings.docker_config is not None else 0.0
        self.on_users: Callable[[dict[str, bytes]], None] | None = None
        self._wake = asyncio.Event()
        self._users_asked = False
        self._refused_at = -REFUSED_PAUSE
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await stop_loop(self._task)

    def reload_now(self) -> None:
        """SIGHUP: credentials and users, as soon as the loop turns."""
        self._users_asked = True
        self._wake.set()

    def refused(self, host: str) -> None:
        """An upstream refused (or asked for) credentials for `host`: a secret may have
        been rotated since the last read."""
        if self.registry.settings.docker_config is None:
            return  # the TOML file's credentials are read at start only
        now = time.monotonic()
        if now - self._refused_at < REFUSED_PAUSE:
            return
        self._refused_at = now
        log.info("credentials.refused", host=host)
        self._wake.set()

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
        settings = self.registry.settings
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
            self.registry.inbound_users = fresh_users
        changed = self.registry.replace_credentials(credentials)
        if changed or users:
            said = {} if fresh_users is None else {"users": len(fresh_users)}
            log.info("config.reloaded", credentials_changed=changed, **said)
        return True
