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
