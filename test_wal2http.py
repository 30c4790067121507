"""Tests of wal2http.py: pure parts with bytes, everything PostgreSQL does against a real server.

The PostgreSQL tests start a throwaway cluster (initdb, wal_level=logical, TLS with a test CA,
SCRAM and MD5 password users) on a free port of 127.0.0.1, run as the unprivileged `postgres`
user when the tests run as root.  Without PostgreSQL server binaries they fail with a message
saying how to install them; they never skip.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import hmac
import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse

import pytest
import trio

import wal2http as w

HERE = os.path.dirname(os.path.abspath(__file__))
SCRAM_PASSWORD = "sCr4m p@ss'word"
MD5_PASSWORD = "md5-secret-pw"


# =====================================================================================================
# PostgreSQL cluster harness
# =====================================================================================================


def find_pg_bin() -> str:
    """The directory of initdb/pg_ctl: PATH first, then Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if candidates:
        return os.path.dirname(candidates[-1])
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: install them, e.g. "
                "`apt-get install postgresql`, or run `bash .ci/run`", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """A throwaway PostgreSQL cluster run as an unprivileged user."""

    def __init__(self, root: str):
        self.bin = find_pg_bin()
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

    def start(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-m", "fast",
                  "-w", "-t", "60", "restart")

    def psql(self, dbname: str, sql: str) -> str:
        psql = os.path.join(self.bin, "psql")
        out = subprocess.run([psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.socket_dir,
                              "-p", str(self.port), "-U", "postgres", "-d", dbname, "-c", sql],
                             check=True, capture_output=True, text=True)
        return out.stdout

    def url(self, dbname: str, user: str = "postgres", password: str | None = None, **params) -> str:
        auth = user if password is None else f"{user}:{password}"
        query = "&".join(f"{k}={v}" for k, v in {"sslmode": "disable", **params}.items())
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}?{query}"


@pytest.fixture(scope="session")
def cluster():
    root = tempfile.mkdtemp(prefix="wal2http-test-pg-")
    pg = PgCluster(root)
    try:
        pg.init()
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout}", pytrace=False)
    yield pg
    pg.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


_db_counter = itertools.count()


@pytest.fixture
def db(cluster):
    """A fresh database for one test, with publication `pub` for all tables."""
    name = f"t{os.getpid()}_{next(_db_counter)}"
    cluster.psql("postgres", f"CREATE DATABASE {name}")
    cluster.psql(name, "CREATE PUBLICATION pub FOR ALL TABLES")
    return name


# =====================================================================================================
# Wire codec
# =====================================================================================================


def backend_message(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


SAMPLE_STREAM = [
    (ord("R"), struct.pack("!i", 0)),
    (ord("S"), cstr("server_version") + cstr("15.4")),
    (ord("K"), struct.pack("!ii", 1234, 5678)),
    (ord("Z"), b"I"),
    (ord("T"), struct.pack("!h", 1) + cstr("a") + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)),
    (ord("D"), struct.pack("!h", 2) + struct.pack("!i", 2) + b"hi" + struct.pack("!i", -1)),
    (ord("C"), cstr("SELECT 1")),
    (ord("d"), b"w" + bytes(24) + b"B" + bytes(20)),
]


class TestWireCodec:
    def test_startup_message_layout(self):
        data = w.encode_startup({"user": "u", "database": "d"})
        assert struct.unpack_from("!ii", data) == (len(data), 196608)
        assert data[8:] == b"user\0u\0database\0d\0\0"

    def test_ssl_request(self):
        assert w.encode_ssl_request() == struct.pack("!ii", 8, 80877103)

    @pytest.mark.parametrize("encoded, expected", [
        (lambda: w.encode_query("SELECT 1"), b"Q\0\0\0\x0dSELECT 1\0"),
        (lambda: w.encode_password(b"pw"), b"p\0\0\0\x07pw\0"),
        (lambda: w.encode_copy_done(), b"c\0\0\0\x04"),
        (lambda: w.encode_terminate(), b"X\0\0\0\x04"),
        (lambda: w.encode_copy_data(b"xy"), b"d\0\0\0\x06xy"),
        (lambda: w.encode_sasl_initial_response("M", b"ab"), b"p\0\0\0\x0cM\0\0\0\0\x02ab"),
    ])
    def test_frontend_messages(self, encoded, expected):
        assert encoded() == expected

    def test_nul_in_query_is_refused(self):
        with pytest.raises(ValueError):
            w.encode_query("SELECT '\0'")

    def test_stream_split_at_every_offset(self):
        data = b"".join(backend_message(bytes([tag]), body) for tag, body in SAMPLE_STREAM)
        for cut in range(len(data) + 1):
            buffer, out = w.MessageBuffer(), []
            for part in (data[:cut], data[cut:]):
                buffer.feed(part)
                while (message := buffer.next_message()) is not None:
                    out.append(message)
            assert out == SAMPLE_STREAM, cut

    def test_byte_by_byte_nothing_early(self):
        data = backend_message(b"Z", b"I")
        buffer = w.MessageBuffer()
        for byte in data[:-1]:
            buffer.feed(bytes([byte]))
            assert buffer.next_message() is None
        buffer.feed(data[-1:])
        assert buffer.next_message() == (ord("Z"), b"I")
        assert buffer.pending() == 0

    @pytest.mark.parametrize("length", [0, 3, 2**31 - 1])
    def test_bad_length_is_protocol_error(self, length):
        buffer = w.MessageBuffer()
        buffer.feed(b"Z" + struct.pack("!I", length))
        with pytest.raises(w.ProtocolError, match="'Z'"):
            buffer.next_message()

    def test_error_fields(self):
        body = b"SERROR\0C28P01\0Mpassword authentication failed\0\0"
        fields = w.decode_error_fields(body)
        assert fields == {"S": "ERROR", "C": "28P01", "M": "password authentication failed"}
        error = w.ServerError(fields)
        assert error.sqlstate == "28P01" and "password authentication failed" in str(error)

    @pytest.mark.parametrize("body", [b"", b"SERROR\0", b"SERROR\0\0\0", b"S\xff\0\0"])
    def test_malformed_error_fields(self, body):
        with pytest.raises(w.ProtocolError, match="ErrorResponse"):
            w.decode_error_fields(body)

    def test_row_description_and_data_row(self):
        _, description = SAMPLE_STREAM[4]
        assert w.decode_row_description(description) == [("a", 25)]
        _, row = SAMPLE_STREAM[5]
        assert w.decode_data_row(row) == ("hi", None)

    def test_data_row_truncated_at_every_offset(self):
        _, row = SAMPLE_STREAM[5]
        for cut in range(len(row)):
            with pytest.raises(w.ProtocolError, match="DataRow"):
                w.decode_data_row(row[:cut])
        with pytest.raises(w.ProtocolError, match="DataRow"):
            w.decode_data_row(row + b"x")

    def test_row_description_truncated_at_every_offset(self):
        _, description = SAMPLE_STREAM[4]
        for cut in range(len(description)):
            with pytest.raises(w.ProtocolError, match="RowDescription"):
                w.decode_row_description(description[:cut])

    def test_parameter_status_and_auth(self):
        assert w.decode_parameter_status(cstr("TimeZone") + cstr("UTC")) == ("TimeZone", "UTC")
        with pytest.raises(w.ProtocolError):
            w.decode_parameter_status(b"TimeZone\0")
        assert w.decode_authentication(struct.pack("!i", 5) + b"salt") == (5, b"salt")
        with pytest.raises(w.ProtocolError):
            w.decode_authentication(b"\0\0")
        assert w.decode_sasl_mechanisms(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0") == [
            "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]

    @pytest.mark.parametrize("lsn, text", [(0, "0/0"), (0x16B37A0, "0/16B37A0"), ((5 << 32) | 0xAB, "5/AB")])
    def test_lsn_format(self, lsn, text):
        assert w.format_lsn(lsn) == text
        assert w.parse_lsn(text) == lsn

    def test_quoting(self):
        assert w.quote_literal("it's") == "'it''s'"
        assert w.quote_ident('a"b') == '"a""b"'


# =====================================================================================================
# Authentication
# =====================================================================================================


class TestScram:
    # RFC 7677 section 3 test vector (user "user", password "pencil").
    CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
    SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

    def client(self):
        return w.ScramClient("pencil", nonce=self.CLIENT_NONCE, username="user")

    def test_rfc7677_vector(self):
        client = self.client()
        assert client.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
        assert client.client_final(self.SERVER_FIRST) == self.CLIENT_FINAL
        client.verify_server_final(self.SERVER_FINAL)

    def test_wrong_server_signature(self):
        client = self.client()
        client.client_final(self.SERVER_FIRST)
        with pytest.raises(w.AuthenticationError, match="signature"):
            client.verify_server_final(b"v=" + base64.b64encode(bytes(32)))

    def test_server_error_attribute(self):
        client = self.client()
        client.client_final(self.SERVER_FIRST)
        with pytest.raises(w.AuthenticationError, match="invalid-proof"):
            client.verify_server_final(b"e=invalid-proof")

    @pytest.mark.parametrize("server_first", [
        b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nonce not extending ours
        b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nonce not extended
        b"r=rOprNGfwEbeRWgbNEkqOxx,i=4096",  # no salt
        b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=zero",
        b"\xff\xfe",
    ])
    def test_malformed_server_first(self, server_first):
        with pytest.raises(w.AuthenticationError):
            self.client().client_final(server_first)

    def test_default_username_is_empty(self):
        assert w.ScramClient("pw", nonce="abc").client_first() == b"n,,n=,r=abc"

    def test_saslprep(self):
        assert w.saslprep("I\u00adX") == "IX"  # soft hyphen mapped to nothing
        assert w.saslprep("a\u00a0b") == "a b"  # non-ASCII space to space
        assert w.saslprep("\u2168") == "IX"  # NFKC
        assert w.saslprep("a\u0007b") == "a\u0007b"  # prohibited: raw password, like libpq

    def test_md5(self):
        expected = "md5" + hashlib.md5(
            hashlib.md5(b"secretuser").hexdigest().encode() + b"salt").hexdigest()
        assert w.build_md5_password("user", "secret", b"salt") == expected.encode()


# =====================================================================================================
# Replication framing
# =====================================================================================================


class TestReplicationFraming:
    def test_xlog_header(self):
        data = struct.pack("!BQQQ", ord("w"), 100, 200, 300) + b"B..."
        assert w.decode_xlog_header(data) == (100, 200)
        for cut in range(25):
            with pytest.raises(w.ProtocolError, match="XLogData"):
                w.decode_xlog_header(data[:cut])

    def test_keepalive(self):
        data = struct.pack("!BQQB", ord("k"), 0x1234, 99, 1)
        assert w.decode_keepalive(data) == (0x1234, True)
        for cut in range(len(data)):
            with pytest.raises(w.ProtocolError, match="keepalive"):
                w.decode_keepalive(data[:cut])

    def test_standby_status_update(self):
        data = w.encode_standby_status(10, 9, 8, w.PG_EPOCH_OFFSET_US + 5, True)
        assert data[:1] == b"d" and struct.unpack("!i", data[1:5])[0] == len(data) - 1
        assert struct.unpack("!cQQQqB", data[5:]) == (b"r", 10, 9, 8, 5, 1)

    def test_proto_version_by_server(self):
        assert [w.pgoutput_proto_version(v) for v in (130000, 140005, 150004, 160000, 170002)] == [1, 2, 3, 4, 4]

    def test_start_replication_command(self):
        config = type("C", (), dict(publications=("pub", "o'ther"), slot_name="sub", streaming=True))
        sql = w.build_start_replication(config, 3, 0x16B37A0)
        assert sql == ("START_REPLICATION SLOT \"sub\" LOGICAL 0/16B37A0 (proto_version '3', "
                       "publication_names '\"pub\",\"o''ther\"', messages 'true', streaming 'on')")


class TestAckTracker:
    def test_flushed_moves_only_on_delivered_transaction_end(self):
        ack = w.AckTracker()
        ack.queued(), ack.queued()
        ack.keepalive(500, assembler_idle=True)
        assert ack.flushed_lsn == 0  # chunks in flight: keepalive position not acknowledged
        ack.delivered(None)
        assert ack.flushed_lsn == 0
        ack.delivered(300)
        assert ack.flushed_lsn == 300
        ack.keepalive(500, assembler_idle=False)
        assert ack.flushed_lsn == 300  # a transaction is open
        ack.keepalive(500, assembler_idle=True)
        assert ack.flushed_lsn == 500
        ack.queued()
        ack.delivered(400)
        assert ack.flushed_lsn == 500  # never backwards

    def test_status_update_reports_flushed(self):
        ack = w.AckTracker(77)
        ack.received(90)
        data = ack.status_update()
        assert struct.unpack_from("!QQQ", data, 6) == (90, 77, 77)


class _RecordingSink:
    name = "test"

    def __init__(self, batch_size=1, fail_at=None):
        self.batch_size = batch_size
        self.batches = []

    async def deliver(self, events):
        self.batches.append(list(events))


class TestDeliveryLoop:
    async def test_batches_span_chunks_and_ack_follows(self):
        Chunk = type("Chunk", (), {})

        def chunk(events, end_lsn):
            c = Chunk()
            c.events, c.end_lsn = events, end_lsn
            return c

        ack = w.AckTracker()
        sink = _RecordingSink(batch_size=3)
        loop = w.DeliveryLoop(sink, ack, batch_size=3, linger_s=0.01)
        send, receive = trio.open_memory_channel(10)
        for c in (chunk([1, 2], 10), chunk([3, 4], None), chunk([5], 20), chunk([], 30)):
            ack.queued()
            send.send_nowait(c)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, receive)
            while ack.in_flight:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        assert sink.batches == [[1, 2, 3], [4, 5]]
        assert ack.flushed_lsn == 30


# =====================================================================================================
# Running wal2http against the test cluster
# =====================================================================================================


def make_env(cluster, dbname: str, **overrides) -> dict[str, str]:
    env = {"DATABASE_URL": cluster.url(dbname), "SLOT_NAME": dbname, "FEEDBACK_INTERVAL_SECS": "0.2",
           "LOG_LEVEL": "DEBUG"}
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return env


def make_config(cluster, dbname: str, **overrides):
    config, mode = w.load_config([], make_env(cluster, dbname, **overrides))
    assert mode == "run"
    return config


class MemorySink:
    """A sink that keeps what it is given; `gate` (a trio.Event) can hold deliveries back."""

    name = "memory"

    def __init__(self, batch_size: int = 1000):
        self.batch_size = batch_size
        self.events: list[dict] = []
        self.gate: trio.Event | None = None
        self._changed = trio.Event()

    async def deliver(self, events):
        if self.gate is not None:
            await self.gate.wait()
        self.events.extend(events)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int, timeout: float = 30) -> list[dict]:
        with trio.fail_after(timeout):
            while len(self.events) < count:
                await self._changed.wait()
        return self.events

    async def check(self):
        return "ok"

    async def aclose(self):
        pass


@contextlib.asynccontextmanager
async def running(config, sink=None):
    """wal2http.run in this process until the block ends; yields (sink, ack tracker)."""
    sink = sink or MemorySink()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        ack = await nursery.start(lambda task_status: w.run(config, sink=sink, stop=stop, task_status=task_status))
        yield sink, ack
        stop.set()


async def sql(cluster, dbname: str, *statements: str) -> list[tuple]:
    """Run statements as the superuser over our own (non-replication) connection."""
    info = w.parse_database_url(cluster.url(dbname), {})
    rows = []
    async with w.open_pg_connection(info, replication=False) as conn:
        for statement in statements:
            rows = await conn.simple_query(statement)
    return rows


async def slot_confirmed(cluster, dbname: str, slot: str | None = None) -> int:
    """The slot's confirmed_flush_lsn (the tests name each database's slot after the database)."""
    rows = await sql(cluster, dbname, "SELECT confirmed_flush_lsn FROM pg_replication_slots "
                                      f"WHERE slot_name = {w.quote_literal(slot or dbname)}")
    return w.parse_lsn(rows[0][0]) if rows and rows[0][0] else 0


async def wait_until(predicate, timeout: float = 30, interval: float = 0.05):
    """Poll an async or sync condition until it holds (for state outside this process)."""
    with trio.fail_after(timeout):
        while True:
            result = predicate()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return result
            await trio.sleep(interval)


def data_events(events):
    return [e for e in events if e["op"] != "message"]


# =====================================================================================================
# PostgreSQL: connection and authentication
# =====================================================================================================


class TestConnection:
    @pytest.mark.parametrize("user, password, sslmode, tls", [
        ("postgres", None, "disable", False),
        ("postgres", None, "prefer", True),
        ("scram_user", SCRAM_PASSWORD, "require", True),
        ("scram_user", SCRAM_PASSWORD, "disable", False),
        ("md5_user", MD5_PASSWORD, "require", True),
    ])
    async def test_authentication_methods(self, cluster, user, password, sslmode, tls):
        info = w.parse_database_url(cluster.url("postgres", user, password, sslmode=sslmode), {})
        async with w.open_pg_connection(info) as conn:
            assert isinstance(conn.stream, trio.SSLStream) == tls
            rows = await conn.simple_query("SELECT current_user, current_setting('TimeZone'), "
                                           "current_setting('DateStyle')")
            assert rows == [(user, "UTC", "ISO, MDY")]
            assert conn.server_version_num >= 100000

    async def test_scram_over_verify_full(self, cluster):
        url = (f"postgresql://scram_user:{urllib.parse.quote(SCRAM_PASSWORD)}@localhost:{cluster.port}/postgres"
               f"?sslmode=verify-full&sslrootcert={cluster.ca_file}")
        async with w.open_pg_connection(w.parse_database_url(url, {})) as conn:
            assert isinstance(conn.stream, trio.SSLStream)
            assert await conn.simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == [("t",)]

    async def test_verify_full_refuses_unknown_ca(self, cluster, tmp_path):
        import trustme
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        url = cluster.url("postgres", "scram_user", "x", sslmode="verify-full", sslrootcert=str(other))
        with pytest.raises(w.AuthenticationError, match="TLS verification"):
            async with w.open_pg_connection(w.parse_database_url(url, {})):
                pass

    async def test_verify_ca_with_ip_host(self, cluster):
        url = cluster.url("postgres", "scram_user", urllib.parse.quote(SCRAM_PASSWORD),
                          sslmode="verify-ca", sslrootcert=cluster.ca_file)
        async with w.open_pg_connection(w.parse_database_url(url, {})) as conn:
            assert isinstance(conn.stream, trio.SSLStream)

    @pytest.mark.parametrize("user", ["scram_user", "md5_user"])
    async def test_wrong_password(self, cluster, user):
        url = cluster.url("postgres", user, "not-the-password", sslmode="require")
        with pytest.raises(w.AuthenticationError) as info:
            async with w.open_pg_connection(w.parse_database_url(url, {})):
                pass
        assert "password authentication failed" in str(info.value)
        assert "not-the-password" not in str(info.value)

    async def test_missing_password(self, cluster):
        url = cluster.url("postgres", "scram_user", None, sslmode="disable")
        with pytest.raises(w.AuthenticationError, match="PGPASSWORD"):
            async with w.open_pg_connection(w.parse_database_url(url, {})):
                pass

    async def test_unix_socket(self, cluster):
        url = f"postgresql://postgres@{urllib.parse.quote(cluster.socket_dir, safe='')}:{cluster.port}/postgres"
        async with w.open_pg_connection(w.parse_database_url(url, {})) as conn:
            assert await conn.simple_query("SELECT 1") == [("1",)]

    async def test_refused_port_is_connection_lost(self):
        info = w.parse_database_url(f"postgresql://u@127.0.0.1:{free_port()}/d?sslmode=disable", {})
        with pytest.raises(w.ConnectionLost, match="cannot connect"):
            async with w.open_pg_connection(info):
                pass

    async def test_silent_server_times_out(self):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            info = w.parse_database_url(f"postgresql://u@127.0.0.1:{port}/d?connect_timeout=1", {})
            with pytest.raises(w.ConnectionLost, match="connect_timeout"):
                async with w.open_pg_connection(info):
                    pass

    async def test_server_error_from_query(self, cluster):
        info = w.parse_database_url(cluster.url("postgres"), {})
        async with w.open_pg_connection(info, replication=False) as conn:
            with pytest.raises(w.ServerError) as error:
                await conn.simple_query("SELECT 1/0")
            assert error.value.sqlstate == "22012"
            assert await conn.simple_query("SELECT 2") == [("2",)]  # the connection is still usable


# =====================================================================================================
# PostgreSQL: end to end, in process
# =====================================================================================================


class TestEndToEnd:
    async def test_insert_update_delete_default_identity(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY, name text, n int)")
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, "INSERT INTO t VALUES (1, 'a', 10), (2, 'b', 20)",
                      "UPDATE t SET name = 'c' WHERE id = 1",
                      "UPDATE t SET id = 3 WHERE id = 2",
                      "DELETE FROM t WHERE id = 3",
                      "TRUNCATE t")
            events = await sink.wait_for(6)
        ops = [(e["op"], e["key"], e["new"], e["old"]) for e in events]
        assert ops == [
            ("insert", {"id": 1}, {"id": 1, "name": "a", "n": 10}, None),
            ("insert", {"id": 2}, {"id": 2, "name": "b", "n": 20}, None),
            ("update", {"id": 1}, {"id": 1, "name": "c", "n": 10}, None),
            ("update", {"id": 3}, {"id": 3, "name": "b", "n": 20}, {"id": 2}),
            ("delete", {"id": 3}, None, {"id": 3}),
            ("truncate", None, None, None),
        ]
        first = events[0]
        assert list(first) == ["id", "op", "schema", "table", "key", "new", "old", "unchanged_toast",
                               "xid", "lsn", "commit_lsn", "commit_time", "seq"]
        assert (first["schema"], first["table"], first["seq"]) == ("public", "t", 0)
        assert events[1]["seq"] == 1 and events[1]["xid"] == first["xid"]
        assert first["id"] == f"{first['commit_lsn']}:0"
        assert first["commit_time"].endswith("Z")
        assert events[5]["cascade"] is False and events[5]["restart_identity"] is False

    async def test_replica_identity_full_and_nothing(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE f (id int PRIMARY KEY, v text)", "ALTER TABLE f REPLICA IDENTITY FULL",
                  "CREATE TABLE n (id int, v text)", "ALTER TABLE n REPLICA IDENTITY NOTHING")
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, "INSERT INTO f VALUES (1, 'a')", "UPDATE f SET v = 'b'", "DELETE FROM f",
                      "INSERT INTO n VALUES (1, 'x')")
            events = await sink.wait_for(4)
        insert, update, delete, other = events
        assert update["key"] == {"id": 1, "v": "b"}  # FULL: every column is the identity
        assert update["old"] == {"id": 1, "v": "a"} and update["new"] == {"id": 1, "v": "b"}
        assert delete["old"] == {"id": 1, "v": "b"} and delete["new"] is None
        assert other["key"] is None and other["new"] == {"id": 1, "v": "x"}

    async def test_unchanged_toast(self, cluster, db):
        big = "x" * 100_000
        await sql(cluster, db, "CREATE TABLE d (id int PRIMARY KEY, big text, n int)",
                  "ALTER TABLE d ALTER big SET STORAGE EXTERNAL",
                  "CREATE TABLE f (id int PRIMARY KEY, big text, n int)", "ALTER TABLE f REPLICA IDENTITY FULL",
                  "ALTER TABLE f ALTER big SET STORAGE EXTERNAL")
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, f"INSERT INTO d VALUES (1, '{big}', 1)", "UPDATE d SET n = 2",
                      f"INSERT INTO f VALUES (1, '{big}', 1)", "UPDATE f SET n = 2")
            events = await sink.wait_for(4)
        plain, full = events[1], events[3]
        assert plain["new"] == {"id": 1, "n": 2} and plain["unchanged_toast"] == ["big"]
        assert full["new"] == {"id": 1, "big": big, "n": 2} and full["unchanged_toast"] == []

    async def test_logical_messages(self, cluster, db):
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, "SELECT pg_logical_emit_message(true, 'p', 'héllo')",
                      "SELECT pg_logical_emit_message(false, 'q', '\\xff00'::bytea)")
            events = await sink.wait_for(2)
        tx, nontx = events
        assert (tx["op"], tx["prefix"], tx["content"], tx["transactional"]) == ("message", "p", "héllo", True)
        assert tx["schema"] is None and tx["table"] is None and tx["seq"] == 0
        assert nontx["content_base64"] == base64.b64encode(b"\xff\x00").decode()
        assert nontx["transactional"] is False
        assert nontx["xid"] is None and nontx["commit_lsn"] is None and nontx["commit_time"] is None
        assert nontx["id"] == f"{nontx['lsn']}:m"

    async def test_schema_change_mid_stream(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE s (id int PRIMARY KEY, a text)")
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, "INSERT INTO s VALUES (1, 'one')",
                      "ALTER TABLE s ADD COLUMN b int DEFAULT 7", "INSERT INTO s VALUES (2, 'two', 8)",
                      "ALTER TABLE s RENAME COLUMN a TO aa", "INSERT INTO s VALUES (3, 'three', 9)",
                      "ALTER TABLE s DROP COLUMN b", "INSERT INTO s VALUES (4, 'four')",
                      "ALTER TABLE s ALTER COLUMN aa TYPE int USING length(aa)", "INSERT INTO s VALUES (5, 55)")
            events = await sink.wait_for(5)
        assert [e["new"] for e in events] == [
            {"id": 1, "a": "one"}, {"id": 2, "a": "two", "b": 8}, {"id": 3, "aa": "three", "b": 9},
            {"id": 4, "aa": "four"}, {"id": 5, "aa": 55}]

    async def test_commit_order_across_concurrent_transactions(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE c (id int PRIMARY KEY, tx text)")
        info = w.parse_database_url(cluster.url(db), {})
        async with running(make_config(cluster, db)) as (sink, ack):
            async with w.open_pg_connection(info, replication=False) as a, \
                    w.open_pg_connection(info, replication=False) as b:
                await a.simple_query("BEGIN")
                await b.simple_query("BEGIN")
                await a.simple_query("INSERT INTO c VALUES (1, 'a')")
                await b.simple_query("INSERT INTO c VALUES (2, 'b')")
                await a.simple_query("INSERT INTO c VALUES (3, 'a')")
                await b.simple_query("COMMIT")
                await a.simple_query("COMMIT")
            events = await sink.wait_for(3)
        assert [(e["new"]["id"], e["seq"]) for e in events] == [(2, 0), (1, 0), (3, 1)]
        assert events[1]["xid"] == events[2]["xid"] != events[0]["xid"]

    async def test_savepoint_xid_is_top_level_and_rollback_to_savepoint(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE sp (id int PRIMARY KEY)")
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, "BEGIN; INSERT INTO sp VALUES (1); SAVEPOINT a; INSERT INTO sp VALUES (2); "
                                   "ROLLBACK TO SAVEPOINT a; SAVEPOINT b; INSERT INTO sp VALUES (3); "
                                   "RELEASE SAVEPOINT b; COMMIT",
                      "INSERT INTO sp VALUES (4)")
            events = await sink.wait_for(3)
        assert [e["new"]["id"] for e in events] == [1, 3, 4]
        assert events[0]["xid"] == events[1]["xid"]

    async def test_confirmed_flush_never_passes_undelivered_and_advances_when_idle(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE a (id int PRIMARY KEY)")
        sink = MemorySink()
        async with running(make_config(cluster, db), sink) as (sink, ack):
            await sql(cluster, db, "INSERT INTO a VALUES (1)")
            await sink.wait_for(1)
            delivered_end = await wait_until(lambda: ack.flushed_lsn)
            sink.gate = trio.Event()  # hold the next transaction back
            (lsn,), = await sql(cluster, db, "INSERT INTO a VALUES (2) RETURNING pg_current_wal_insert_lsn()")
            held_lsn = w.parse_lsn(lsn)
            await wait_until(lambda: ack.received_lsn > held_lsn)  # it has reached us...
            await wait_until(lambda: ack.in_flight == 1)
            # ...and several status updates later the slot still has not passed it.
            for _ in range(3):
                before = trio.current_time()
                await wait_until(lambda: trio.current_time() - before > 0.25)
                assert ack.flushed_lsn < held_lsn
                assert await slot_confirmed(cluster, db) < held_lsn
            assert len(sink.events) == 1
            sink.gate.set()
            await sink.wait_for(2)
            await wait_until(lambda: slot_confirmed(cluster, db), timeout=10)
            await wait_until(lambda: _gt(slot_confirmed(cluster, db), held_lsn))
            # Idle: unrelated WAL (no publication change) still moves the slot forward.
            (current,), = await sql(cluster, db, "CREATE TABLE unrelated_ddl (x int)",
                                    "SELECT pg_current_wal_insert_lsn()")
            await wait_until(lambda: _ge(slot_confirmed(cluster, db), w.parse_lsn(current)))
        assert delivered_end > 0

    async def test_postgres_restart_is_survived(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE r (id int PRIMARY KEY)")
        config = make_config(cluster, db)
        async with running(config) as (sink, ack):
            await sql(cluster, db, "INSERT INTO r VALUES (1)")
            await sink.wait_for(1)
            await trio.to_thread.run_sync(cluster.restart)
            await wait_until(lambda: _can_connect(cluster, db), timeout=60)
            await sql(cluster, db, "INSERT INTO r VALUES (2)")
            events = await sink.wait_for(2, timeout=60)
        ids = [e["new"]["id"] for e in events]
        assert ids[-1] == 2 and set(ids) == {1, 2}


async def _gt(awaitable, value):
    return (await awaitable) > value


async def _ge(awaitable, value):
    return (await awaitable) >= value


async def _can_connect(cluster, db):
    try:
        await sql(cluster, db, "SELECT 1")
        return True
    except w.Wal2HttpError:
        return False


# =====================================================================================================
# PostgreSQL: the command line, as a process
# =====================================================================================================

SCRIPT = os.path.join(HERE, "wal2http.py")


def cli_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "HOOK0_", "HTTP_", "EMAIL_"))}
    base.pop("DATABASE_URL", None)
    base.pop("EVENT_SINK", None)
    base["PYTHONUNBUFFERED"] = "1"
    return {**base, **env}


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], env=cli_env(env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class CliProcess:
    """wal2http.py as a child process; collects stdout events and stderr lines."""

    def __init__(self, env: dict[str, str], args=(), pause_after: int | None = None):
        self.env, self.args = env, list(args)
        self.pause_after = pause_after  # stop reading stdout after this many events (the pipe fills up)
        self.events: list[dict] = []
        self.stderr = b""
        self.process = None
        self._changed = trio.Event()

    @contextlib.asynccontextmanager
    async def running(self):
        self.process = await trio.lowlevel.open_process(
            [sys.executable, SCRIPT, *self.args], env=cli_env(self.env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stdout)
                nursery.start_soon(self._read_stderr)
                yield self
                nursery.cancel_scope.cancel()
        finally:
            if self.process.returncode is None:
                self.process.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()

    async def _read_stdout(self):
        pending = b""
        async for data in self.process.stdout:
            pending += data
            *lines, pending = pending.split(b"\n")
            self.events.extend(json.loads(line) for line in lines)
            self._changed.set()
            self._changed = trio.Event()
            if self.pause_after is not None and len(self.events) >= self.pause_after:
                await trio.sleep_forever()
        self._changed.set()

    async def _read_stderr(self):
        async for data in self.process.stderr:
            self.stderr += data
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, predicate, timeout: float = 60):
        with trio.fail_after(timeout):
            while not predicate(self):
                if self.process.returncode is not None and not predicate(self):
                    await trio.sleep(0)
                await self._changed.wait()

    async def wait_started(self):
        await self.wait_for(lambda p: b"streaming from slot" in p.stderr)

    async def wait_exit(self, timeout: float = 60) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


class TestCommandLine:
    def test_help_lists_options(self):
        result = run_cli(["--help"], {})
        assert result.returncode == 0
        for option in ("--database-url", "--slot-name", "--pub-name", "--event-sink", "--check", "--demo"):
            assert option in result.stdout

    def test_configuration_error_exits_2_with_one_line(self):
        result = run_cli([], {"DATABASE_URL": "postgresql://u@h/d", "EVENT_SINK": "kafka"})
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "wal2http: Event sink must be one of: 'http', 'hook0', or 'stdout'"]
        assert result.stdout == ""

    def test_wrong_password_exits_4_without_the_password(self, cluster, db):
        url = cluster.url(db, "scram_user", "hunter2-wrong", sslmode="require")
        result = run_cli([], {"DATABASE_URL": url})
        assert result.returncode == 4, result.stderr
        assert "password authentication failed" in result.stderr
        assert "hunter2-wrong" not in result.stderr + result.stdout
        assert "Traceback" not in result.stderr

    def test_missing_publication_exits_4(self, cluster, db):
        result = run_cli([], make_env(cluster, db, pub_name="nope"))
        assert result.returncode == 4
        assert "publication 'nope' does not exist" in result.stderr
        assert "Traceback" not in result.stderr

    def test_missing_slot_without_create_exits_4_with_sql(self, cluster, db):
        result = run_cli([], make_env(cluster, db, create_slot="false", slot_name="absent"))
        assert result.returncode == 4
        assert "pg_create_logical_replication_slot('absent', 'pgoutput')" in result.stderr

    def test_no_replication_privilege_exits_4(self, cluster, db):
        result = run_cli([], {"DATABASE_URL": cluster.url(db, "norepl_user")})
        assert result.returncode == 4, result.stderr
        assert "Traceback" not in result.stderr

    def test_check_passes(self, cluster, db):
        result = run_cli(["--check"], make_env(cluster, db))
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert all(line.startswith("ok ") for line in lines) and len(lines) >= 5
        assert any("wal_level" in line for line in lines)

    def test_check_reports_failures(self, cluster, db):
        result = run_cli(["--check"], make_env(cluster, db, pub_name="nope", create_slot="false"))
        assert result.returncode == 4
        assert "FAIL publication nope: " in result.stdout
        assert f"FAIL slot {db}: " in result.stdout
        assert "ok wal_level" in result.stdout

    def test_check_unreachable_server_is_bounded(self):
        started = time.monotonic()
        result = run_cli(["--check"], {"DATABASE_URL": f"postgresql://u:pw@127.0.0.1:{free_port()}/d?connect_timeout=2"})
        assert result.returncode == 4
        assert result.stdout.startswith("FAIL connect: ")
        assert time.monotonic() - started < 15

    def test_demo(self):
        result = run_cli(["--demo"], {}, timeout=120)
        assert result.returncode == 0, result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines()]
        assert [e["op"] for e in events] == ["insert", "insert", "update", "message", "delete", "truncate"]
        assert events[0]["new"]["amount"] == "19.90" and events[0]["new"]["tags"] == ["new", "web"]
        assert "throwaway PostgreSQL is stopped and removed" in result.stderr

    async def test_sigterm_exits_0_and_confirms(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE g (id int PRIMARY KEY)")
        async with CliProcess(make_env(cluster, db)).running() as proc:
            await proc.wait_started()
            (lsn,), = await sql(cluster, db, "INSERT INTO g VALUES (1) RETURNING pg_current_wal_insert_lsn()")
            await proc.wait_for(lambda p: len(p.events) == 1)
            proc.process.send_signal(signal.SIGTERM)
            assert await proc.wait_exit() == 0
        assert await slot_confirmed(cluster, db) > w.parse_lsn(lsn)
        assert b"Traceback" not in proc.stderr

    async def test_kill_9_mid_stream_then_restart_delivers_everything(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE k (id int PRIMARY KEY)")
        env = make_env(cluster, db)
        async with CliProcess(env, pause_after=3000).running() as proc:
            await proc.wait_started()
            await sql(cluster, db, *[f"INSERT INTO k SELECT g FROM generate_series({i * 1000 + 1}, {(i + 1) * 1000}) g"
                                     for i in range(20)])
            await proc.wait_for(lambda p: len(p.events) >= 3000)
            proc.process.kill()  # its stdout is full: it is stuck in the middle of the stream
            await proc.wait_exit()
        first = proc.events
        assert len(first) < 20000
        async with CliProcess(env).running() as proc:
            await proc.wait_for(lambda p: first and len({e["new"]["id"] for e in first + p.events}) == 20000)
            proc.process.send_signal(signal.SIGTERM)
            assert await proc.wait_exit() == 0
        seen = {}
        for event in first + proc.events:
            assert seen.setdefault(event["id"], event) == event  # a duplicate is the same event, same id
        assert sorted(e["new"]["id"] for e in seen.values()) == list(range(1, 20001))
