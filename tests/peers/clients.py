"""The real registry clients, isolated from the host's configuration and bounded in time.

- ``Skopeo``: ``skopeo copy``/``inspect`` with its own policy, registries.conf and
  auth file; ``pull_to_dir`` returns the digests of what it fetched.
- ``Containerd``: a private ``containerd`` daemon (own root, state, socket; CRI and
  unusable snapshotters disabled) and ``ctr`` commands against it, with
  ``--hosts-dir`` for mirror configuration.
- ``Podman``: ``podman pull`` as root with vfs storage, ``registries.conf`` and
  ``storage.conf`` of its own in a temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from tests.peers import (
    Completed,
    PeerError,
    require_binary,
    run,
    stop_process,
)
from tests.peers.children import popen

# Images are under 1 MiB and every peer is on loopback: anything slower is a hang.
COMMAND_TIMEOUT = 30.0
ACCEPT_ANYTHING_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


def _base_env(home: Path) -> dict[str, str]:
    """A minimal environment: the host's PATH and locale, nothing else of the host's."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    for sub in ("home", "config", "runtime", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    env |= {
        "HOME": str(home / "home"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_RUNTIME_DIR": str(home / "runtime"),
        "TMPDIR": str(home / "tmp"),
    }
    return env


@dataclass(frozen=True)
class PulledImage:
    """What a client stored: the manifest it got and the blobs beside it."""

    directory: Path
    manifest: bytes
    blob_digests: frozenset[str]

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def manifest_json(self) -> dict[str, Any]:
        return dict(json.loads(self.manifest))


def read_dir_image(directory: Path) -> PulledImage:
    """Read skopeo's ``dir:`` output, checking every blob against its name."""
    manifest = (directory / "manifest.json").read_bytes()
    digests = set()
    for path in directory.iterdir():
        if path.name in ("manifest.json", "version") or path.name.startswith("signature"):
            continue
        name = path.name.removesuffix(".tar")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != name:
            raise PeerError(f"{path}: content hashes to sha256:{actual}, not its name")
        digests.add(f"sha256:{name}")
    return PulledImage(directory, manifest, frozenset(digests))


# -- skopeo ------------------------------------------------------------------------


class Skopeo:
    """skopeo with a private policy, registries.conf and auth file under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("skopeo")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.policy = workdir / "policy.json"
        self.policy.write_text(json.dumps(ACCEPT_ANYTHING_POLICY))
        self.auth_file = workdir / "auth.json"
        self.auth_file.write_text(json.dumps({"auths": {}}))
        self.registries_conf = workdir / "registries.conf"
        self.registries_conf.write_text("unqualified-search-registries = []\n")
        self.env = _base_env(workdir)
        self.env |= {
            "REGISTRY_AUTH_FILE": str(self.auth_file),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
        }
        self._pulls = 0

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> Completed:
        argv = [
            self.binary,
            "--policy",
            str(self.policy),
            "--tmpdir",
            self.env["TMPDIR"],
            "--command-timeout",
            f"{int(timeout)}s",
            *args,
        ]
        return run(argv, timeout=timeout + 5, env=self.env, check=check)

    def copy(
        self,
        src: str,
        dest: str,
        *,
        src_creds: str | None = None,
        dest_creds: str | None = None,
        extra: Sequence[str] = (),
        timeout: float = COMMAND_TIMEOUT,
        check: bool = True,
    ) -> Completed:
        args = ["copy", "--retry-times", "0"]
        if src.startswith("docker://"):
            args += ["--src-tls-verify=false"]
            args += ["--src-creds", src_creds] if src_creds else ["--src-no-creds"]
        if dest.startswith("docker://"):
            args += ["--dest-tls-verify=false"]
            args += ["--dest-creds", dest_creds] if dest_creds else ["--dest-no-creds"]
        return self.run(*args, *extra, src, dest, timeout=timeout, check=check)

    def pull_to_dir(
        self,
        ref: str,
        dest: Path | None = None,
        *,
        creds: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> PulledImage:
        """``skopeo copy docker://REF dir:DEST`` and read what landed in DEST."""
        if dest is None:
            self._pulls += 1
            dest = self.workdir / f"pull-{self._pulls}"
        dest.mkdir(parents=True, exist_ok=True)
        self.copy(f"docker://{ref}", f"dir:{dest}", src_creds=creds, timeout=timeout)
        return read_dir_image(dest)

    def push(
        self,
        source: str,
        ref: str,
        *,
        creds: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> Completed:
        """Push ``source`` (``oci:DIR:TAG``, ``dir:DIR``) to ``ref`` byte for byte."""
        return self.copy(
            source,
            f"docker://{ref}",
            dest_creds=creds,
            extra=["--preserve-digests"],
            timeout=timeout,
        )

    def inspect(
        self, ref: str, *, creds: str | None = None, raw: bool = False, timeout: float = 60.0
    ) -> Any:
        args = ["inspect", "--tls-verify=false", "--no-tags"]
        args += ["--creds", creds] if creds else ["--no-creds"]
        if raw:
            args.append("--raw")
        done = self.run(*args, f"docker://{ref}", timeout=timeout)
        return done.stdout.encode() if raw else json.loads(done.stdout)


# -- containerd / ctr ----------------------------------------------------------------

# Snapshotters that cannot work in a container or on this kind of filesystem; the
# CRI plugin wants a CNI setup.  Disabling them keeps containerd's log clean and its
# start fast.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def write_hosts_toml(
    hosts_dir: Path,
    namespace: str,
    *,
    server: str | None,
    mirrors: Iterable[tuple[str, Sequence[str]]] = (),
) -> Path:
    """``hosts_dir/<namespace>/hosts.toml`` in containerd's format.

    ``mirrors`` is (URL, capabilities) in the order to try them.
    """
    lines = []
    if server is not None:
        lines.append(f'server = "{server}"\n')
    for url, capabilities in mirrors:
        caps = ", ".join(f'"{c}"' for c in capabilities)
        lines.append(f'\n[host."{url}"]\n  capabilities = [{caps}]\n')
    path = hosts_dir / namespace / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


class Containerd:
    """A private containerd daemon and the ``ctr`` client bound to its socket.

    The socket lives in a short /tmp directory (Unix socket paths are limited to
    108 bytes); everything else lives under ``workdir``.
    """

    def __init__(self, workdir: Path) -> None:
        self.daemon = require_binary("containerd")
        self.ctr_binary = require_binary("ctr")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._sockdir = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
        self.address = str(self._sockdir / "containerd.sock")
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "containerd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.env = _base_env(workdir)

    def _config(self) -> str:
        disabled = ", ".join(f'"{p}"' for p in DISABLED_PLUGINS)
        root, state = self.workdir / "root", self.workdir / "state"
        return (
            "version = 2\n"
            f'root = "{root}"\n'
            f'state = "{state}"\n'
            f"disabled_plugins = [{disabled}]\n"
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[ttrpc]\n"
            f'  address = "{self.address}.ttrpc"\n'
            "[debug]\n"
            '  address = ""\n'
            '  level = "info"\n'
            "[metrics]\n"
            '  address = ""\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.workdir / "opt"}"\n'
            # "shared" (the default) lets a namespace use blobs another namespace
            # fetched without downloading them: tests would see no requests.
            '[plugins."io.containerd.metadata.v1.bolt"]\n'
            '  content_sharing_policy = "isolated"\n'
        )

    def start(self, timeout: float = 20.0) -> Self:
        """Start the daemon and wait until ``ctr version`` answers; stop it on failure."""
        self.config_path.write_text(self._config())
        with self.log_path.open("wb") as log:
            self._proc = popen(
                [self.daemon, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
            )
        try:
            self._wait_until_serving(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_serving(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise PeerError(
                    f"containerd exited with {self._proc.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-4000:]
                )
            if Path(self.address).exists():
                done = self.ctr("version", timeout=5, check=False)
                if done.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise PeerError(
                    f"containerd did not answer on {self.address} within {timeout}s:\n"
                    + self.log_path.read_text(errors="replace")[-4000:]
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, grace=10)
            self._proc = None
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def ctr(
        self,
        *args: str,
        namespace: str = "proxyd-test",
        timeout: float = COMMAND_TIMEOUT,
        check: bool = True,
    ) -> Completed:
        argv = [self.ctr_binary, "--address", self.address, "--namespace", namespace, *args]
        return run(argv, timeout=timeout, env=self.env, check=check)

    def content_fetch(self, ref: str, **options: Any) -> Completed:
        """`ctr content fetch`; options as `_resolve`."""
        return self._resolve(["content", "fetch"], ref, **options)

    def images_pull(self, ref: str, **options: Any) -> Completed:
        """`ctr images pull` into the native snapshotter; options as `_resolve`."""
        return self._resolve(["images", "pull", "--snapshotter", "native"], ref, **options)

    def _resolve(
        self,
        command: Sequence[str],
        ref: str,
        *,
        hosts_dir: Path | None = None,
        user: str | None = None,
        plain_http: bool = False,
        namespace: str = "proxyd-test",
        timeout: float = COMMAND_TIMEOUT,
    ) -> Completed:
        return self.ctr(
            *command,
            *_resolver_flags(hosts_dir, user, plain_http),
            ref,
            namespace=namespace,
            timeout=timeout,
        )

    def image_target(self, ref: str, *, namespace: str = "proxyd-test") -> str:
        """The digest containerd recorded for image ``ref``."""
        done = self.ctr("images", "ls", namespace=namespace, timeout=30)
        for line in done.stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return fields[2]
        raise PeerError(f"containerd has no image {ref!r}:\n{done.stdout}")

    def content_digests(self, *, namespace: str = "proxyd-test") -> set[str]:
        """Digests of every blob in containerd's content store for ``namespace``."""
        done = self.ctr("content", "ls", "--quiet", namespace=namespace, timeout=30)
        return {line.strip() for line in done.stdout.splitlines() if line.strip()}

    def forget(self, *, namespace: str) -> None:
        """Remove every image and blob of ``namespace`` so the next pull fetches again."""
        images = self.ctr("images", "ls", "--quiet", namespace=namespace, timeout=30)
        refs = images.stdout.split()
        if refs:
            self.ctr("images", "rm", "--sync", *refs, namespace=namespace, timeout=30)
        digests = sorted(self.content_digests(namespace=namespace))
        if digests:
            self.ctr("content", "rm", *digests, namespace=namespace, timeout=30, check=False)


def _resolver_flags(hosts_dir: Path | None, user: str | None, plain_http: bool) -> list[str]:
    flags = []
    if hosts_dir is not None:
        flags += ["--hosts-dir", str(hosts_dir)]
    if user is not None:
        flags += ["--user", user]
    if plain_http:
        flags.append("--plain-http")
    return flags


# -- podman --------------------------------------------------------------------------


def registries_conf_with_mirror(registry: str, mirror: str) -> str:
    """A registries.conf in which ``registry`` (host:port) is pulled through ``mirror``.

    Both are plain HTTP (``insecure = true``); nothing else is configured.
    """
    return (
        "unqualified-search-registries = []\n\n"
        "[[registry]]\n"
        f'location = "{registry}"\n'
        "insecure = true\n\n"
        "[[registry.mirror]]\n"
        f'location = "{mirror}"\n'
        "insecure = true\n"
    )


class Podman:
    """podman as root with vfs storage and its own configuration under ``workdir``.

    The runroot is a short /tmp directory of its own: podman refuses a runroot path
    longer than 50 characters.  ``close()`` removes it.
    """

    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("podman")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.root = workdir / "storage"
        self.runroot = Path(tempfile.mkdtemp(prefix="podrun-", dir="/tmp"))
        self.registries_conf = workdir / "registries.conf"
        self.registries_conf.write_text("unqualified-search-registries = []\n")
        self.storage_conf = workdir / "storage.conf"
        self.storage_conf.write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{self.root}"\nrunroot = "{self.runroot}"\n'
        )
        self.containers_conf = workdir / "containers.conf"
        self.containers_conf.write_text(
            "[engine]\n"
            'events_logger = "none"\n'
            'cgroup_manager = "cgroupfs"\n'
            f'tmp_dir = "{workdir / "libpod-tmp"}"\n'
            f'static_dir = "{workdir / "libpod"}"\n'
            f'volume_path = "{workdir / "volumes"}"\n'
            "[containers]\n"
            'log_driver = "k8s-file"\n'
        )
        self.policy = workdir / "policy.json"
        self.policy.write_text(json.dumps(ACCEPT_ANYTHING_POLICY))
        self.auth_file = workdir / "auth.json"
        self.auth_file.write_text(json.dumps({"auths": {}}))
        self.env = _base_env(workdir)
        self.env |= {
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "CONTAINERS_CONF": str(self.containers_conf),
            "REGISTRY_AUTH_FILE": str(self.auth_file),
        }

    def set_registries_conf(self, text: str) -> None:
        self.registries_conf.write_text(text)

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> Completed:
        argv = [
            self.binary,
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "vfs",
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
            "--tmpdir",
            str(self.workdir / "libpod-tmp"),
            *args,
        ]
        return run(argv, timeout=timeout, env=self.env, check=check)

    def pull(
        self,
        ref: str,
        *,
        creds: str | None = None,
        tls_verify: bool | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> Completed:
        args = ["pull", "--signature-policy", str(self.policy)]
        if creds is not None:
            args += ["--creds", creds]
        if tls_verify is not None:
            args.append(f"--tls-verify={str(tls_verify).lower()}")
        return self.run(*args, ref, timeout=timeout)

    def image_digest(self, ref: str) -> str:
        """The manifest digest podman recorded for ``ref``."""
        done = self.run("image", "inspect", "--format", "{{.Digest}}", ref, timeout=30)
        return done.stdout.strip()

    def image_inspect(self, ref: str) -> dict[str, Any]:
        done = self.run("image", "inspect", ref, timeout=30)
        return dict(json.loads(done.stdout)[0])

    def remove_all(self) -> None:
        self.run("rmi", "--all", "--force", timeout=60, check=False)

    def close(self) -> None:
        """Remove every image and the runroot."""
        self.remove_all()
        shutil.rmtree(self.runroot, ignore_errors=True)
