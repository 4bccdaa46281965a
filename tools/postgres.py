"""A throwaway PostgreSQL server for tests and benchmarks: ``initdb`` in a temporary folder, started
with ``pg_ctl`` on a free loopback port, stopped and removed afterwards. As root it runs the server as
the ``postgres`` user (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

#: The role and database every throwaway server has.
USER = "tierstack"


def _bin_dir() -> Path:
    """Returns the folder of PostgreSQL's server programs (Debian keeps them out of the PATH)."""
    if found := shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if not versions:
        raise RuntimeError("PostgreSQL's server is not installed (apt-get install postgresql)")
    return Path(versions[-1]).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalPostgres:
    """A PostgreSQL server of its own, as a context manager.

    Args:
        durable: Whether commits wait for the disk (``fsync``); tests turn it off, benchmarks keep it.
    """

    def __init__(self, *, durable: bool = False) -> None:
        self._durable = durable
        self._bin = _bin_dir()
        self._folder = Path(tempfile.mkdtemp(prefix="tierstack-pg-"))
        self._data = self._folder / "data"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        self._databases = 0

    @property
    def url(self) -> str:
        """The URL of the server's database, for ``TIERSTACK_STORE_URL``."""
        return self.url_of(USER)

    def url_of(self, database: str) -> str:
        """Returns the URL of another database on this server."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Creates an empty database and returns its URL."""
        self._databases += 1
        name = f"db{self._databases}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name)
        return self.url_of(name)

    def _run(self, program: str, *arguments: str) -> None:
        command = [str(self._bin / program), *arguments]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self._folder)

    def start(self) -> LocalPostgres:
        """Creates the cluster and starts the server; returns when it accepts connections."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self._as_postgres:
            shutil.chown(self._folder, "postgres")
        self._run("initdb", "-D", str(self._data), "-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8")
        self._serve()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, USER)

    def _serve(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self._folder} -c max_connections=200"
        if not self._durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self._data), "-o", options, "-l", str(self._folder / "log"), "-w", "start")

    def crash(self) -> None:
        """Stops the server at once, as a crash would, keeping its files for :meth:`restart`."""
        self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "-w", "stop")

    def restart(self) -> None:
        """Starts the server again on its port after :meth:`crash`; returns when it accepts connections."""
        self._serve()

    def stop(self) -> None:
        """Stops the server at once and removes its files."""
        try:
            if (self._data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
