"""The PostgreSQL harness of the tests: which versions, where their binaries are, one throwaway cluster each.

Every test that needs PostgreSQL (it asks for the `cluster` fixture, directly or through `db`) runs
once per major version in PG_MAJORS, with that version's own cluster; its id ends in `[pg14]`,
`[pg15]`, ... so a failure names the version.  WAL2HTTP_TEST_PG=15,17 restricts the run to those
versions.  The tests of what wal2http does on a pgoutput protocol 1 server use `old_cluster` (13).

A version's binaries are Debian's (/usr/lib/postgresql/<major>/bin), an `initdb` on PATH of that
major, or the npm-built ones `.ci/fetch-postgres` caches (see `pg_cache_dirs`).  A version that is
asked for but not found fails its tests with a message saying how to get it: never a skip.
The cluster (initdb, wal_level=logical, TLS with a test CA, SCRAM and MD5 password users) listens
on a free port of 127.0.0.1 and runs as the unprivileged `postgres` user when the tests run as root.
"""

from __future__ import annotations

import functools
import glob
import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile

import pytest

import wal2http as w

SCRAM_PASSWORD = "sCr4m p@ss'word"
MD5_PASSWORD = "md5-secret-pw"
PG_MAJORS = (14, 15, 16, 17, 18)  #: every test that needs PostgreSQL runs against each of these
OLD_PG_MAJOR = 13  #: pgoutput protocol 1 (no logical messages, no streaming): its own few tests


# =====================================================================================================
# Versions and binaries
# =====================================================================================================


def tested_majors() -> tuple[int, ...]:
    """PG_MAJORS and OLD_PG_MAJOR, or the versions WAL2HTTP_TEST_PG names (e.g. `15,17`)."""
    text = os.environ.get("WAL2HTTP_TEST_PG", "").strip()
    if not text:
        return (OLD_PG_MAJOR, *PG_MAJORS)
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise pytest.UsageError(f"WAL2HTTP_TEST_PG={text!r}: expected major versions, e.g. 14,15,18") from None


def pg_cache_dirs() -> list[str]:
    """Where `.ci/fetch-postgres` puts <major>/{bin,lib,share}: $WAL2HTTP_PG_CACHE, else
    /var/cache/wal2http-pg (as root: the `postgres` user must reach it) or ~/.cache/wal2http/pg."""
    if os.environ.get("WAL2HTTP_PG_CACHE"):
        return [os.environ["WAL2HTTP_PG_CACHE"]]
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return ["/var/cache/wal2http-pg", os.path.join(user_cache, "wal2http", "pg")]


def _initdb_major(bin_dir: str) -> int | None:
    result = subprocess.run([os.path.join(bin_dir, "initdb"), "--version"], capture_output=True, text=True)
    found = re.search(r"(\d+)(?:\.\d+)?", result.stdout)
    return int(found.group(1)) if found else None


@functools.cache
def find_pg_bin(major: int) -> str | None:
    """The directory of initdb/pg_ctl/postgres of this major version, or None."""
    candidates = [f"/usr/lib/postgresql/{major}/bin"]
    candidates += [os.path.join(cache, str(major), "bin") for cache in pg_cache_dirs()]
    for bin_dir in candidates:
        if os.access(os.path.join(bin_dir, "initdb"), os.X_OK):
            return bin_dir
    on_path = shutil.which("initdb")
    if on_path and _initdb_major(os.path.dirname(os.path.realpath(on_path))) == major:
        return os.path.dirname(os.path.realpath(on_path))
    return None


@functools.cache
def find_psql() -> str | None:
    """Any psql (the npm builds have none; psql of one version talks to the others)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"), key=lambda p: [int(x) for x in re.findall(r"\d+", p)])
    return found[-1] if found else shutil.which("psql")


def require_pg_bin(major: int) -> str:
    bin_dir = find_pg_bin(major)
    if bin_dir is None:
        places = ", ".join([f"/usr/lib/postgresql/{major}/bin"] + [f"{c}/{major}/bin" for c in pg_cache_dirs()])
        pytest.fail(f"PostgreSQL {major} server binaries not found (looked in {places} and PATH): run "
                    f"`bash .ci/fetch-postgres {major}` (npm), install them (Debian: `apt-get install "
                    f"postgresql-{major}`), or choose the versions to test with WAL2HTTP_TEST_PG=15,...",
                    pytrace=False)
    if find_psql() is None:
        pytest.fail("psql not found: install it (Debian: `apt-get install postgresql-client`)", pytrace=False)
    return bin_dir


free_port = w._free_tcp_port  #: a free TCP port of 127.0.0.1 (the tool's own, as --demo uses it)


# =====================================================================================================
# One throwaway cluster
# =====================================================================================================


class PgCluster:
    """A throwaway PostgreSQL cluster run as an unprivileged user."""

    def __init__(self, root: str, major: int):
        self.major = major
        self.bin = require_pg_bin(major)
        self.root = root
        self.data = os.path.join(root, "data")
        self.socket_dir = os.path.join(root, "sock")
        self.port = free_port()
        self.ca_file = os.path.join(root, "ca.pem")
        self.run_as = None
        if os.geteuid() == 0:
            self.run_as = pwd.getpwnam("postgres")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.run_as:
            kwargs = dict(user=self.run_as.pw_uid, group=self.run_as.pw_gid, extra_groups=[])
        return subprocess.run([os.path.join(self.bin, args[0]), *args[1:]], check=check,
                              capture_output=True, text=True, cwd=self.root, **kwargs)

    def _chown(self, path: str) -> None:
        if self.run_as:
            os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)

    def init(self) -> None:
        import trustme
        os.makedirs(self.socket_dir)
        os.chmod(self.root, 0o755)
        for path in (self.root, self.socket_dir):
            self._chown(path)
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(self.ca_file)
        cert.private_key_and_cert_chain_pem.write_to_path(os.path.join(self.data, "server.pem"))
        for name in ("server.pem",):
            path = os.path.join(self.data, name)
            os.chmod(path, 0o600)
            self._chown(path)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write(f"""
port = {self.port}
listen_addresses = '127.0.0.1'
unix_socket_directories = '{self.socket_dir}'
wal_level = logical
max_replication_slots = 200
max_wal_senders = 50
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
ssl = on
ssl_cert_file = 'server.pem'
ssl_key_file = 'server.pem'
logical_decoding_work_mem = 64kB
wal_sender_timeout = 60s
""")
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as hba:
            hba.write("""
local all all trust
host all postgres 127.0.0.1/32 trust
host all scram_user 127.0.0.1/32 scram-sha-256
host all md5_user 127.0.0.1/32 md5
host all norepl_user 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
""")
        self.start()
        self.psql("postgres", f"""
            SET password_encryption = 'scram-sha-256';
            CREATE ROLE scram_user LOGIN REPLICATION SUPERUSER PASSWORD {w.quote_literal(SCRAM_PASSWORD)};
            SET password_encryption = 'md5';
            CREATE ROLE md5_user LOGIN REPLICATION SUPERUSER PASSWORD {w.quote_literal(MD5_PASSWORD)};
            CREATE ROLE norepl_user LOGIN;
        """)

    def start(self, if_stopped: bool = False) -> None:
        """pg_ctl start; with if_stopped, nothing when the server already runs."""
        if if_stopped and self._run("pg_ctl", "-D", self.data, "status", check=False).returncode == 0:
            return
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-m", "fast",
                  "-w", "-t", "60", "restart")

    def psql(self, dbname: str, sql: str) -> str:
        out = subprocess.run([find_psql(), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.socket_dir,
                              "-p", str(self.port), "-U", "postgres", "-d", dbname, "-c", sql],
                             check=True, capture_output=True, text=True)
        return out.stdout

    def url(self, dbname: str, user: str = "postgres", password: str | None = None, **params) -> str:
        auth = user if password is None else f"{user}:{password}"
        query = "&".join(f"{k}={v}" for k, v in {"sslmode": "disable", **params}.items())
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}?{query}"


def _started_cluster(major: int):
    require_pg_bin(major)  # before making a directory it would leave behind
    root = tempfile.mkdtemp(prefix=f"wal2http-test-pg{major}-")
    pg = PgCluster(root, major)
    try:
        pg.init()
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL {major}: {exc.stderr or exc.stdout}", pytrace=False)
    return pg


def _removed(pg: PgCluster) -> None:
    pg.stop("immediate")
    shutil.rmtree(pg.root, ignore_errors=True)


# =====================================================================================================
# Fixtures
# =====================================================================================================


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): tests pytest-xdist runs in one worker")


def pytest_collection_modifyitems(items):
    """With pytest-xdist (`-n N --dist loadgroup`), one worker runs all the tests of a version, so
    each version's cluster is started once and the versions run side by side."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for name in ("cluster", "old_cluster"):
            if name in params:
                item.add_marker(pytest.mark.xdist_group(f"pg{params[name]}"))


@pytest.fixture(scope="session", params=[m for m in tested_majors() if m >= 14], ids=lambda m: f"pg{m}")
def cluster(request):
    """The cluster of one supported version: every test using it runs once per version (pytest
    groups the tests by version, and ends one version's cluster before it starts the next)."""
    pg = _started_cluster(request.param)
    yield pg
    _removed(pg)


@pytest.fixture(scope="session", params=[m for m in tested_majors() if m < 14], ids=lambda m: f"pg{m}")
def old_cluster(request):
    """A cluster of a version whose pgoutput speaks protocol 1 only (no logical messages, no streaming)."""
    pg = _started_cluster(request.param)
    yield pg
    _removed(pg)


_db_counter = itertools.count()


def _new_db(pg: PgCluster) -> str:
    name = f"t{os.getpid()}_{next(_db_counter)}"
    pg.psql("postgres", f"CREATE DATABASE {name}")
    pg.psql(name, "CREATE PUBLICATION pub FOR ALL TABLES")
    return name


@pytest.fixture
def db(cluster):
    """A fresh database for one test, with publication `pub` for all tables."""
    return _new_db(cluster)


@pytest.fixture
def old_db(old_cluster):
    """`db` on `old_cluster`."""
    return _new_db(old_cluster)
