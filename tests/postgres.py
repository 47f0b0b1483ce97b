"""A throwaway PostgreSQL cluster for the tests: initdb in a temp folder, loopback only, trust auth.

The registry claims "any SQLAlchemy URL works, so PostgreSQL serves several replicas"; the registry
tests run against this cluster as well as SQLite to hold it to that. The server binaries come from
Debian's `postgresql` package (`make setup` installs it). Missing binaries are a failure, not a
skip: a skipped PostgreSQL run would quietly stop testing the claim.

PostgreSQL refuses to run as root, so under root (CI, this machine) every server command runs as
the `postgres` OS user (`runuser -u postgres`) on a data folder owned by it.

    with PostgresCluster.start(tmp) as pg:
        url = pg.create_database("alter_test")   # postgresql+psycopg://postgres@127.0.0.1:<port>/alter_test
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.server.live import free_port

INSTALL_HINT = ("install Debian's `postgresql` package (`make setup` does: apt-get install postgresql) so that "
                "/usr/lib/postgresql/<version>/bin/{initdb,pg_ctl} exist")
OS_USER = "postgres"


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl (or $PG_BINDIR)."""
    candidates = [os.environ["PG_BINDIR"]] if os.environ.get("PG_BINDIR") else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True)
    for candidate in candidates:
        if all((Path(candidate) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    raise RuntimeError(f"PostgreSQL server binaries not found (looked in {candidates or '/usr/lib/postgresql/*/bin'}); "
                       f"{INSTALL_HINT}")


@dataclass
class PostgresCluster:
    bindir: Path
    root: Path  # temp folder holding the data dir, socket dir and log
    port: int
    as_user: str | None  # OS user the server runs as (None: the current user)

    @classmethod
    def start(cls, root: Path | None = None, *, timeout_s: float = 30.0) -> PostgresCluster:
        bindir = find_bindir()
        root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="alter-pg-"))
        as_user = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(OS_USER)
            except KeyError:
                raise RuntimeError(f"running as root, but there is no `{OS_USER}` OS user to run PostgreSQL as "
                                   f"(PostgreSQL refuses root); {INSTALL_HINT}") from None
            as_user = OS_USER
        cluster = cls(bindir, root, free_port(), as_user)
        cluster._init_and_start(timeout_s)
        return cluster

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{OS_USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_user is not None:
            command = ["runuser", "-u", self.as_user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=self.root)
        if result.returncode != 0:
            log = self.log_file.read_text()[-4000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
                               f"server log:\n{log}")
        return result

    def _init_and_start(self, timeout_s: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self.as_user is not None:
            entry = pwd.getpwnam(self.as_user)
            self.root.chmod(0o755)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data_dir), "-U", OS_USER, "--auth=trust", "--encoding=UTF8",
                  "--locale=C", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.socket_dir} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                  "-t", str(int(timeout_s)), "-o", options, timeout_s=timeout_s + 10)

    def create_database(self, name: str) -> str:
        """Create database `name` (dropping a leftover one); return its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=OS_USER, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=OS_USER, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

