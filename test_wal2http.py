"""Tests of wal2http.py: pure parts with bytes, everything PostgreSQL does against a real server.

The PostgreSQL tests run against a throwaway cluster of each supported version (ids `[pg14]` ...
`[pg18]`): the harness, which versions and where their binaries come from, is in conftest.py.
Without a version's server binaries its tests fail with a message saying how to get them; they
never skip.  The fakes, builders and waits that the test classes share are in the section "Shared
fakes, builders and waits" below the constants.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import email
import email.policy
import functools
import hashlib
import hmac
import io
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import types
import urllib.parse
import uuid
from contextlib import asynccontextmanager
from functools import partial

import h11
import pytest
import trio
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

import wal2http as w
from conftest import MD5_PASSWORD, SCRAM_PASSWORD, PgCluster, find_psql, free_port
from wal2http import ProtocolError

HERE = os.path.dirname(os.path.abspath(__file__))

DB_URL = "postgresql://app:Db-Pa55word-1@db.example.org:5432/app"
DB_PASSWORD = "Db-Pa55word-1"
APP_ID = "3f1c2a9e-8b7d-4c6e-9f0a-1b2c3d4e5f60"
APPLICATION_ID = "4fd3ed86-2a5a-4d45-9c1c-0fdf6c7e6c6a"
TOKEN = "EoQBChoKBHRlc3QYAyIKCggIgAgSAxiBCB"   # shaped like a biscuit; never in any message
HOOK0 = {"HOOK0_API_URL": "https://hook0.example.org", "HOOK0_APPLICATION_ID": APP_ID,
         "HOOK0_API_TOKEN": "Hook0-T0ken-Secret"}


# =====================================================================================================
# Shared fakes, builders and waits
# =====================================================================================================
# Every test class takes its stand-ins from here: one recording alerter, one recording sleep, the
# fake sinks (kept, failing as scripted, or held per event), one builder of a Config without a
# database and one of the environment of a test database (with presets per sink), the runners of
# wal2http in this process, one test CA, and two ways to wait: `Observed.wait_for` for what notifies
# its changes (sinks, receivers, the Hook0 double, a child process), `wait_until` for the rest.


class RecordingAlerter:
    """Stands in for the Alerter: records alerts (with the Trio time of each, inside a Trio run)
    and recoveries; like the real one, `alert` never blocks and never raises."""

    def __init__(self):
        self.alerts: list[tuple[str, str, str]] = []
        self.recoveries: list[tuple[str, str, str]] = []
        self.alert_times: list[float | None] = []

    def alert(self, key: str, subject: str, body: str, since=None) -> None:
        self.alerts.append((key, subject, body))
        try:
            self.alert_times.append(trio.current_time())
        except RuntimeError:  # outside a Trio run
            self.alert_times.append(None)

    def recovered(self, key: str, subject: str, body: str) -> None:
        self.recoveries.append((key, subject, body))

    def keys(self) -> list[str]:
        return [key for key, _, _ in self.alerts]


class RecordingSleep:
    """Injected as ReliableSink's sleep: records the delays without waiting them."""

    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await trio.lowlevel.checkpoint()


class Observed:
    """Something a test waits on (a sink, a receiver, a process): each change calls `_notify()`,
    which wakes `wait_for`, so nothing polls."""

    def __init__(self):
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, condition, timeout: float = 15) -> None:
        """Waits until condition(self) holds, re-checked after every change; fails after `timeout` s."""
        with trio.fail_after(timeout):
            while not condition(self):
                await self._changed.wait()


async def wait_until(predicate, timeout: float = 30, interval: float = 0.05):
    """Polls a sync or async condition until it holds (for state nothing notifies: PostgreSQL, logs,
    an SMTP server's thread); returns its value."""
    with trio.fail_after(timeout):
        while True:
            result = predicate()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return result
            await trio.sleep(interval)


class MemorySink(Observed):
    """A sink that keeps what it is given (`events`, and `batches` as delivered); `gate` (a
    trio.Event) can hold deliveries back."""

    name = "memory"

    def __init__(self, batch_size: int = 1000):
        super().__init__()
        self.batch_size = batch_size
        self.events: list[dict] = []
        self.batches: list[list] = []
        self.gate: trio.Event | None = None

    async def deliver(self, events):
        if self.gate is not None:
            await self.gate.wait()
        self.batches.append(list(events))
        self.events.extend(events)
        self._notify()

    async def wait_for(self, count: int, timeout: float = 30) -> list[dict]:
        """Waits until `count` events have arrived; returns them all."""
        await super().wait_for(lambda sink: len(sink.events) >= count, timeout)
        return self.events

    async def check(self):
        return "ok"

    async def aclose(self):
        pass


class FlakySink:
    """A sink failing as scripted: each entry is None (deliver all) or a DeliveryError to raise."""

    name = "fake"
    batch_size = 10

    def __init__(self, script):
        self.script = list(script)
        self.calls: list[list[str]] = []
        self.delivered: list[str] = []

    async def deliver(self, events):
        self.calls.append([e["id"] for e in events])
        outcome = self.script.pop(0) if self.script else None
        if outcome is None:
            self.delivered += [e["id"] for e in events]
            return
        self.delivered += [e["id"] for e in events[:outcome.delivered]]
        raise outcome

    async def check(self):
        return "ok"

    async def aclose(self):
        pass


class GatedSink:
    """Each deliver() call waits until the test opens its gate (by the first event's id), or
    fails when told to; records the calls in flight at once."""

    name = "gated"

    def __init__(self, batch_size=1):
        self.batch_size = batch_size
        self.gates: dict[str, trio.Event] = {}
        self.failures: dict[str, BaseException] = {}
        self.started: list[str] = []
        self.finished: list[str] = []
        self.in_flight = self.most_in_flight = 0

    def gate(self, event_id):
        return self.gates.setdefault(event_id, trio.Event())

    async def deliver(self, events):
        first = events[0]["id"]
        self.started.append(first)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate(first).wait()
            if first in self.failures:
                raise self.failures[first]
            self.finished.append(first)
        finally:
            self.in_flight -= 1


# -- Config builders: `load` reads settings as a user gives them (the tests of the configuration);
# -- `offline_config` (no database) takes Config fields, `make_env`/`make_config` (a test database)
# -- take settings; these take presets (dicts) first, then single values.

def load(env=None, argv=(), with_db=True) -> w.Config:
    """The Config wal2http reads from `env` and `argv` (with DATABASE_URL=DB_URL unless `with_db`
    is False), as a user gives them."""
    environ = {"DATABASE_URL": DB_URL} if with_db else {}
    environ.update(env or {})
    return w.load_config(list(argv), environ)[0]


def config_error(env=None, argv=(), with_db=True) -> str:
    """The message of the ConfigError that `load` raises: one line, no surrounding space."""
    with pytest.raises(w.ConfigError) as info:
        load(env, argv, with_db)
    message = str(info.value)
    assert "\n" not in message
    assert message.strip() == message
    return message


HTTP_FIELDS = {"event_sink": "http"}  #: the HTTP sink (the test gives http_endpoint_url)
HOOK0_FIELDS = {"event_sink": "hook0", "hook0_api_url": "http://127.0.0.1:9",  #: the Hook0 sink, fast retries
                "hook0_application_id": APPLICATION_ID, "hook0_api_token": TOKEN, "retry_max_attempts": 3,
                "retry_base_delay_s": 0.01, "retry_max_delay_s": 30.0}


def mail_fields(port: int, tls: str = "none") -> dict:
    """The alert mail's fields for an SMTP server on 127.0.0.1:`port`."""
    return {"email_smtp_host": "127.0.0.1", "email_smtp_port": port, "email_smtp_tls": tls,
            "email_from": "wal2http@example.org", "email_to": ("ops@example.org",)}


def offline_config(*presets: dict, **fields) -> w.Config:
    """A Config without a database (for the tests of one part): the presets' fields, then `fields`."""
    settings = {"database_url": None, "conninfo": None}
    for preset in presets:
        settings.update(preset)
    return w.Config(**{**settings, **fields})


def http_settings(receiver) -> dict:
    """The settings of the HTTP sink posting to `receiver` (a ScriptedReceiver), fast retries."""
    return {"event_sink": "http", "http_endpoint_url": receiver.url("/hooks/pg?source=e2e"),
            "retry_base_delay_ms": 10, "retry_max_delay_ms": 50, "retry_max_attempts": 3,
            "http_timeout_secs": 5}


def hook0_settings(double) -> dict:
    """The settings of the Hook0 sink posting to `double` (a Hook0Double), fast retries."""
    return {"event_sink": "hook0", "hook0_api_url": double.url, "hook0_application_id": APPLICATION_ID,
            "hook0_api_token": TOKEN, "retry_base_delay_ms": 10, "retry_max_delay_ms": 50,
            "retry_max_attempts": 3}


def email_settings(port: int) -> dict:
    """The settings of the alert mail to an SMTP server on 127.0.0.1:`port`."""
    return {"email_smtp_host": "127.0.0.1", "email_smtp_port": port, "email_smtp_tls": "none",
            "email_from": "wal2http@example.org", "email_to": "ops@example.org"}


def make_env(cluster, dbname: str, *presets: dict, **overrides) -> dict[str, str]:
    """The environment of wal2http for `dbname` (its slot named after it): the presets' settings,
    then `overrides` (the variables' names in lower case)."""
    env = {"DATABASE_URL": cluster.url(dbname), "SLOT_NAME": dbname, "FEEDBACK_INTERVAL_SECS": "0.2",
           "LOG_LEVEL": "DEBUG"}
    for settings in (*presets, overrides):
        env.update({k.upper(): str(v) for k, v in settings.items()})
    return env


def make_config(cluster, dbname: str, *presets: dict, **overrides) -> w.Config:
    """make_env read as wal2http reads it: a Config to run (with the event sink asked for)."""
    env = make_env(cluster, dbname, *presets, **overrides)
    config, mode = w.load_config([], env)
    assert mode == "run"
    if "EVENT_SINK" in env:
        assert config.event_sink == env["EVENT_SINK"]
    return config


@contextlib.asynccontextmanager
async def running(config, sink=None):
    """wal2http.run in this process with a MemorySink (or `sink`) until the block ends; yields
    (sink, ack tracker)."""
    sink = sink or MemorySink()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        ack = await nursery.start(lambda task_status: w.run(config, sink=sink, stop=stop, task_status=task_status))
        yield sink, ack
        stop.set()


@asynccontextmanager
async def service(config):
    """wal2http.run with its configured sink (HTTP, Hook0) in this process until the block ends;
    yields the AckTracker.  The exit path is the normal one (stop, final status update, alert drain)."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        ack = await nursery.start(lambda task_status: w.run(config, stop=stop, task_status=task_status))
        yield ack
        stop.set()


# -- One test CA (trustme): a server context for localhost and 127.0.0.1, a client context and a
# -- CA file trusting it.

@pytest.fixture(scope="session")
def ca():
    return trustme.CA()


@pytest.fixture
def server_tls(ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def client_tls(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


# =====================================================================================================
# Errors, wire codec and authentication
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

    def test_a_large_message_in_many_pieces_comes_out_whole_and_nothing_early(self):
        body = bytes(range(256)) * 4096  # 1 MiB, read in 64 KiB pieces but its last byte
        data = backend_message(b"d", body) + backend_message(b"Z", b"I")
        cut = len(data) - 7  # the last byte of the CopyData, and the ReadyForQuery, come last
        buffer, pieces = w.MessageBuffer(), [data[i:min(i + 65536, cut)] for i in range(0, cut, 65536)]
        for received, piece in enumerate(pieces, 1):
            buffer.feed(piece)
            assert buffer.pending() == sum(map(len, pieces[:received]))
            assert buffer.next_message() is None
        buffer.feed(data[cut:])
        assert buffer.next_message() == (w.COPY_DATA, body)
        assert buffer.next_message() == (w.READY_FOR_QUERY, b"I")
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
        assert error.sqlstate == "28P01"
        assert "password authentication failed" in str(error)

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


def sasl_mechanisms(*names: str) -> bytes:
    return b"".join(cstr(name) for name in names) + b"\0"


class TestAuthenticator:
    """The answers to the server's Authentication requests, as bytes (the I/O loop only sends them)."""

    def test_ok_needs_no_answer(self):
        assert w.Authenticator("u", None).answer(w.AUTH_OK, b"") == b""

    def test_cleartext_password(self):
        assert w.Authenticator("u", "pw").answer(w.AUTH_CLEARTEXT_PASSWORD, b"") == backend_message(b"p", b"pw\0")

    def test_md5_password_uses_the_salt(self):
        answer = w.Authenticator("user", "secret").answer(w.AUTH_MD5_PASSWORD, b"salt")
        assert answer == backend_message(b"p", w.build_md5_password("user", "secret", b"salt") + b"\0")

    @pytest.mark.parametrize("code", [3, 5, 10])
    def test_a_password_request_without_a_password_says_where_to_put_it(self, code):
        with pytest.raises(w.AuthenticationError, match="DATABASE_URL or PGPASSWORD"):
            w.Authenticator("u", None).answer(code, sasl_mechanisms(w.SCRAM_MECHANISM))

    def test_scram_exchange(self):
        auth = w.Authenticator("user", "pencil")
        first = auth.answer(w.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256-PLUS", w.SCRAM_MECHANISM))
        assert first.startswith(b"p")
        assert cstr(w.SCRAM_MECHANISM) in first
        nonce = re.search(rb"r=([^,\x00]+)", first).group(1)
        server_first = b"r=" + nonce + b"srv,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        final = auth.answer(w.AUTH_SASL_CONTINUE, server_first)
        assert final.startswith(b"p")
        assert b"c=biws,r=" + nonce + b"srv,p=" in final
        with pytest.raises(w.AuthenticationError, match="signature"):
            auth.answer(w.AUTH_SASL_FINAL, b"v=" + base64.b64encode(bytes(32)))

    def test_no_supported_sasl_mechanism(self):
        with pytest.raises(w.AuthenticationError, match="no supported SASL mechanism"):
            w.Authenticator("u", "pw").answer(w.AUTH_SASL, sasl_mechanisms("SCRAM-SHA-256-PLUS"))

    @pytest.mark.parametrize("code", [w.AUTH_SASL_CONTINUE, w.AUTH_SASL_FINAL])
    def test_sasl_continuation_before_sasl_began(self, code):
        with pytest.raises(w.AuthenticationError, match="before SASL began"):
            w.Authenticator("u", "pw").answer(code, b"r=x")

    @pytest.mark.parametrize("password", [None, "pw"])
    def test_unsupported_request(self, password):
        with pytest.raises(w.AuthenticationError, match="unsupported authentication request 7"):
            w.Authenticator("u", password).answer(7, b"")  # GSS


# =====================================================================================================
# PostgreSQL connection (against each PostgreSQL version)
# =====================================================================================================


async def sql(cluster, dbname: str, *statements: str) -> list[tuple]:
    """Run statements as the superuser over our own (non-replication) connection."""
    info = w.parse_database_url(cluster.url(dbname), {})
    rows = []
    async with w.open_pg_connection(info, replication=False) as conn:
        for statement in statements:
            rows = await conn.simple_query(statement)
    return rows


def not_past(commit_lsn: str) -> int:
    """The highest confirmed position that has not passed the transaction committed at `commit_lsn`:
    that position itself.  PostgreSQL sends a transaction again when its commit record starts at or
    after the slot's confirmed_flush_lsn, and wal2http may acknowledge a keepalive up to there before
    the transaction itself arrives (nothing of it is open yet), so `confirmed <= not_past(...)`."""
    return w.parse_lsn(commit_lsn)


async def slot_confirmed(cluster, dbname: str, slot: str | None = None) -> int:
    """The slot's confirmed_flush_lsn (the tests name each database's slot after the database)."""
    rows = await sql(cluster, dbname, "SELECT confirmed_flush_lsn FROM pg_replication_slots "
                                      f"WHERE slot_name = {w.quote_literal(slot or dbname)}")
    return w.parse_lsn(rows[0][0]) if rows and rows[0][0] else 0


def data_events(events):
    return [e for e in events if e["op"] != "message"]




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
        port = free_port()
        info = w.parse_database_url(f"postgresql://u@127.0.0.1:{port}/d?sslmode=disable", {})
        with pytest.raises(w.ConnectionLost) as raised:
            async with w.open_pg_connection(info):
                pass
        # The OS's reason, said once: not Trio's "all attempts to connect ... failed" around it.
        assert str(raised.value) == f"cannot connect to PostgreSQL at 127.0.0.1:{port}: Connection refused"

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


@pytest.fixture(scope="session")
def readonly_cluster(cluster):
    """A second server of `cluster`'s version whose sessions are read-only by default
    (default_transaction_read_only): what target_session_attrs=read-write must skip."""
    root = tempfile.mkdtemp(prefix=f"wal2http-test-pg{cluster.major}-ro-")
    pg = PgCluster(root, cluster.major)
    try:
        pg.init()
        with open(os.path.join(pg.data, "postgresql.conf"), "a") as conf:
            conf.write("default_transaction_read_only = on\n")
        pg.restart()
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout}", pytrace=False)
    yield pg
    pg.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


def several_hosts_url(dbname, *ports, **params) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"sslmode": "disable", **params}.items())
    return f"postgresql://postgres@{','.join(f'127.0.0.1:{port}' for port in ports)}/{dbname}?{query}"


class TestSeveralHosts:
    async def _port_used(self, url):
        async with w.open_pg_connection(w.parse_database_url(url, {}), replication=False) as conn:
            (port,), = await conn.simple_query("SHOW port")
            return int(port), conn.conninfo.port

    async def test_a_dead_first_host_is_skipped_with_a_log_line(self, cluster, caplog):
        dead = free_port()
        used, named = await self._port_used(several_hosts_url("postgres", dead, cluster.port))
        assert used == named == cluster.port
        (skipped,) = logged(caplog, "skipping PostgreSQL at")
        assert skipped.getMessage() == f"skipping PostgreSQL at 127.0.0.1:{dead}: cannot connect to " \
                                       f"PostgreSQL at 127.0.0.1:{dead}: Connection refused"

    @pytest.mark.parametrize("attrs, pick", [
        ("any", "readonly"), ("read-write", "writable"), ("read-only", "readonly"),
        ("primary", "readonly"),  # read-only by default, but no standby
        ("prefer-standby", "readonly"),  # no standby among them: any, in order
    ])
    async def test_target_session_attrs_picks_the_host(self, cluster, readonly_cluster, caplog, attrs, pick):
        url = several_hosts_url("postgres", readonly_cluster.port, cluster.port, target_session_attrs=attrs)
        used, _ = await self._port_used(url)
        assert used == {"readonly": readonly_cluster.port, "writable": cluster.port}[pick]
        if attrs == "read-write":
            (skipped,) = logged(caplog, "skipping PostgreSQL at")
            assert skipped.getMessage() == (f"skipping PostgreSQL at 127.0.0.1:{readonly_cluster.port}: "
                                            "it is read-only (target_session_attrs=read-write)")

    async def test_no_host_fits_is_a_connection_lost_naming_each(self, cluster, readonly_cluster):
        url = several_hosts_url("postgres", readonly_cluster.port, cluster.port, target_session_attrs="standby")
        with pytest.raises(w.ConnectionLost) as raised:
            await self._port_used(url)
        assert str(raised.value) == (
            f"no PostgreSQL host fits target_session_attrs=standby: 127.0.0.1:{readonly_cluster.port}: "
            f"it is not a standby; 127.0.0.1:{cluster.port}: it is not a standby")

    async def test_a_wrong_password_is_not_retried_on_the_next_host(self, cluster, caplog):
        url = (f"postgresql://scram_user:wrong@127.0.0.1:{cluster.port},127.0.0.1:{cluster.port}/postgres"
               "?sslmode=disable")
        with pytest.raises(w.AuthenticationError):
            await self._port_used(url)
        assert not logged(caplog, "skipping PostgreSQL at")

    async def test_streaming_follows_the_host_a_restart_brings_back(self, cluster, readonly_cluster, db, caplog):
        """Hosts: a read-only one, then the writable one (read-write wanted).  The writable one
        stops: no host fits, wal2http keeps reconnecting; it comes back: streaming resumes."""
        await sql(cluster, db, "CREATE TABLE r (id int PRIMARY KEY)")
        subprocess.run([find_psql(), "-X", "-q", "-h", readonly_cluster.socket_dir,
                        "-p", str(readonly_cluster.port), "-U", "postgres", "-d", "postgres",
                        "-c", f"CREATE DATABASE {db}"], check=True, capture_output=True,
                       env={**os.environ, "PGOPTIONS": "-c default_transaction_read_only=off"})
        url = several_hosts_url(db, readonly_cluster.port, cluster.port, target_session_attrs="read-write")
        config = make_config(cluster, db, database_url=url)
        try:
            async with running(config) as (sink, ack):
                await sql(cluster, db, "INSERT INTO r VALUES (1)")
                await sink.wait_for(1)
                await trio.to_thread.run_sync(cluster.stop)
                await wait_until(lambda: logged(caplog, "no PostgreSQL host fits target_session_attrs=read-write"),
                                 timeout=30)
                await trio.to_thread.run_sync(cluster.start)
                await wait_until(lambda: _can_connect(cluster, db), timeout=60)
                await sql(cluster, db, "INSERT INTO r VALUES (2)")
                events = await sink.wait_for(2, timeout=60)
        finally:
            await trio.to_thread.run_sync(cluster.start, True)  # whatever happened, for the next tests
        assert [e["new"]["id"] for e in events][-1] == 2
        assert logged(caplog, f"skipping PostgreSQL at 127.0.0.1:{readonly_cluster.port}: it is read-only")

    async def test_slot_failover(self, cluster, db, caplog):
        """17+: the slot is created with failover, and an existing one without it is altered
        (logged).  Before 17: exit 2 naming SLOT_FAILOVER, the server's version and 17; no slot."""
        if cluster.major < 17:
            result = await trio.to_thread.run_sync(lambda: run_cli([], make_env(cluster, db, slot_failover="true")))
            assert result.returncode == 2, result.stderr
            (line,) = [l for l in result.stderr.splitlines() if "SLOT_FAILOVER" in l]
            assert "needs PostgreSQL 17 or later" in line
            assert f"this server is {cluster.major}" in line
            assert await sql(cluster, db, f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{db}'") == []
            return
        caplog.set_level(logging.INFO, logger="wal2http")
        async with running(make_config(cluster, db, slot_failover="true")):
            pass
        assert await sql(cluster, db, f"SELECT failover FROM pg_replication_slots WHERE slot_name = '{db}'") == [("t",)]
        existing = f"{db}_old"
        await sql(cluster, db, f"SELECT pg_create_logical_replication_slot('{existing}', 'pgoutput')")
        async with running(make_config(cluster, db, slot_name=existing, slot_failover="true")):
            pass
        assert await sql(cluster, db, f"SELECT failover FROM pg_replication_slots "
                                      f"WHERE slot_name = '{existing}'") == [("t",)]
        assert logged(caplog, f"replication slot '{existing}' now has failover on")

    async def test_check_names_the_host_it_used(self, cluster, db):
        url = several_hosts_url(db, free_port(), cluster.port)
        result = await trio.to_thread.run_sync(lambda: run_cli(["--check"], {"DATABASE_URL": url}))
        assert connect_line(result.stdout.splitlines(), cluster)


# =====================================================================================================
# Replication framing, pgoutput, types, envelope
# =====================================================================================================


class TestReplicationFraming:
    def test_xlog_data(self):
        data = struct.pack("!BQQQ", ord("w"), 100, 200, 300) + b"B..."
        assert w.decode_xlog_data(data) == (100, 200, b"B...")
        assert w.decode_xlog_data(data[:25]) == (100, 200, b"")
        for cut in range(25):
            with pytest.raises(w.ProtocolError, match="XLogData"):
                w.decode_xlog_data(data[:cut])

    def test_next_copy_data_takes_whole_xlog_data_only(self):
        body = struct.pack("!BQQQ", ord("w"), 100, 200, 300) + b"I-payload"
        keepalive = struct.pack("!BQQB", ord("k"), 0x1234, 99, 1)
        stream = w.encode_copy_data(body) + w.encode_copy_data(keepalive) + w.encode_copy_data(body)
        buffer = w.MessageBuffer()
        for byte in stream[:len(w.encode_copy_data(body)) - 1]:  # nothing before the last byte
            buffer.feed(bytes([byte]))
            assert buffer.next_copy_data(w.XLOG_DATA_FRAME, w.XLOG_DATA) is None
        buffer.feed(stream[len(w.encode_copy_data(body)) - 1:])
        assert buffer.next_copy_data(w.XLOG_DATA_FRAME, w.XLOG_DATA) == ((ord("d"), 4 + len(body), ord("w"), 100, 200), b"I-payload")
        assert buffer.next_copy_data(w.XLOG_DATA_FRAME, w.XLOG_DATA) is None  # a keepalive: left in place
        assert buffer.next_message() == (w.COPY_DATA, keepalive)
        assert buffer.next_copy_data(w.XLOG_DATA_FRAME, w.XLOG_DATA) == ((ord("d"), 4 + len(body), ord("w"), 100, 200), b"I-payload")
        assert buffer.pending() == 0

    def test_next_copy_data_leaves_a_truncated_xlog_data_header_to_next_message(self):
        short = w.encode_copy_data(struct.pack("!BQQ", ord("w"), 100, 200))  # no server clock
        buffer = w.MessageBuffer()
        buffer.feed(short + b"Z\0\0\0\x05I")
        assert buffer.next_copy_data(w.XLOG_DATA_FRAME, w.XLOG_DATA) is None
        tag, body = buffer.next_message()
        with pytest.raises(w.ProtocolError, match="XLogData"):
            w.decode_xlog_data(body)
        assert buffer.next_copy_data(w.XLOG_DATA_FRAME, w.XLOG_DATA) is None
        assert buffer.next_message() == (w.READY_FOR_QUERY, b"I")

    def test_keepalive(self):
        data = struct.pack("!BQQB", ord("k"), 0x1234, 99, 1)
        assert w.decode_keepalive(data) == (0x1234, True)
        for cut in range(len(data)):
            with pytest.raises(w.ProtocolError, match="keepalive"):
                w.decode_keepalive(data[:cut])

    def test_standby_status_update(self):
        data = w.encode_standby_status(10, 9, 8, w.PG_EPOCH_OFFSET_US + 5, True)
        assert data[:1] == b"d"
        assert struct.unpack("!i", data[1:5])[0] == len(data) - 1
        assert struct.unpack("!cQQQqB", data[5:]) == (b"r", 10, 9, 8, 5, 1)

    def test_proto_version_by_server(self):
        assert [w.pgoutput_proto_version(v) for v in (130000, 140005, 150004, 160000, 170002)] == [1, 2, 3, 4, 4]

    def test_start_replication_command(self):
        config = type("C", (), dict(publications=("pub", "o'ther"), slot_name="sub", streaming=True))
        sql = w.build_start_replication(config, 3, 0x16B37A0)
        assert sql == ("START_REPLICATION SLOT \"sub\" LOGICAL 0/16B37A0 (proto_version '3', "
                       "publication_names '\"pub\",\"o''ther\"', messages 'true', streaming 'on')")


EVENT_KEYS = ["id", "op", "schema", "table", "key", "new", "old", "unchanged_toast", "xid", "lsn",
              "commit_lsn", "commit_time", "seq"]



def _string(text: str) -> bytes:
    return text.encode() + b"\0"


def _xid(xid: int | None) -> bytes:
    return b"" if xid is None else struct.pack(">I", xid)


def encode_tuple(values) -> bytes:
    out = [struct.pack(">H", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is w.UNCHANGED_TOAST:
            out.append(b"u")
        elif isinstance(value, bytes):
            out.append(b"b" + struct.pack(">I", len(value)) + value)
        else:
            raw = value.encode()
            out.append(b"t" + struct.pack(">I", len(raw)) + raw)
    return b"".join(out)


def encode_pgoutput(m) -> bytes:
    """The bytes of a decoded message (a dataclass of the module), for round trips."""
    cls = type(m)
    if cls is w.Begin:
        return b"B" + struct.pack(">QqI", m.final_lsn, m.commit_time, m.xid)
    if cls is w.Message:
        return (b"M" + _xid(m.xid) + struct.pack(">BQ", int(m.transactional), m.lsn) + _string(m.prefix)
                + struct.pack(">I", len(m.content)) + m.content)
    if cls is w.Commit:
        return b"C" + struct.pack(">BQQq", m.flags, m.commit_lsn, m.end_lsn, m.commit_time)
    if cls is w.Origin:
        return b"O" + struct.pack(">Q", m.commit_lsn) + _string(m.name)
    if cls is w.Relation:
        columns = b"".join(struct.pack(">B", c.flags) + _string(c.name) + struct.pack(">Ii", c.type_oid, c.type_modifier)
                           for c in m.columns)
        return (b"R" + _xid(m.xid) + struct.pack(">I", m.oid) + _string(m.namespace) + _string(m.name)
                + m.replica_identity.encode() + struct.pack(">H", len(m.columns)) + columns)
    if cls is w.Type:
        return b"Y" + _xid(m.xid) + struct.pack(">I", m.oid) + _string(m.namespace) + _string(m.name)
    if cls is w.Insert:
        return b"I" + _xid(m.xid) + struct.pack(">I", m.relid) + b"N" + encode_tuple(m.new)
    if cls is w.Update:
        old = b"" if m.old_kind is None else m.old_kind.encode() + encode_tuple(m.old)
        return b"U" + _xid(m.xid) + struct.pack(">I", m.relid) + old + b"N" + encode_tuple(m.new)
    if cls is w.Delete:
        return b"D" + _xid(m.xid) + struct.pack(">I", m.relid) + m.old_kind.encode() + encode_tuple(m.old)
    if cls is w.Truncate:
        return (b"T" + _xid(m.xid) + struct.pack(">IB", len(m.relids), m.options)
                + struct.pack(f">{len(m.relids)}I", *m.relids))
    if cls is w.StreamStart:
        return b"S" + struct.pack(">IB", m.xid, int(m.first_segment))
    if cls is w.StreamStop:
        return b"E"
    if cls is w.StreamCommit:
        return b"c" + struct.pack(">IBQQq", m.xid, m.flags, m.commit_lsn, m.end_lsn, m.commit_time)
    if cls is w.StreamAbort:
        tail = b"" if m.abort_lsn is None else struct.pack(">Qq", m.abort_lsn, m.abort_time)
        return b"A" + struct.pack(">II", m.xid, m.subxid) + tail
    if cls is w.BeginPrepare:
        return b"b" + struct.pack(">QQqI", m.prepare_lsn, m.end_lsn, m.prepare_time, m.xid) + _string(m.gid)
    if cls in (w.Prepare, w.StreamPrepare):
        tag = b"P" if cls is w.Prepare else b"p"
        return tag + struct.pack(">BQQqI", m.flags, m.prepare_lsn, m.end_lsn, m.prepare_time, m.xid) + _string(m.gid)
    if cls is w.CommitPrepared:
        return b"K" + struct.pack(">BQQqI", m.flags, m.commit_lsn, m.end_lsn, m.commit_time, m.xid) + _string(m.gid)
    if cls is w.RollbackPrepared:
        return b"r" + struct.pack(">BQQqqI", m.flags, m.prepare_end_lsn, m.rollback_end_lsn, m.prepare_time,
                                  m.rollback_time, m.xid) + _string(m.gid)
    raise AssertionError(cls)


ORDERS_COLUMNS = (w.Column(1, "id", 20, -1), w.Column(0, "status", 25, -1), w.Column(0, "amount", 1700, 655366),
                  w.Column(0, "meta", 3802, -1), w.Column(0, "created", 1184, -1))


def orders(identity="d", oid=16400, xid=None, columns=ORDERS_COLUMNS, name="orders") -> w.Relation:
    return w.Relation(xid, oid, "public", name, identity, columns)


ROW = ("42", "paid", "19.90", '{"a": 1}', "2026-11-27 16:25:11.123456+00")
ROW_JSON = {"id": 42, "status": "paid", "amount": "19.90", "meta": {"a": 1}, "created": "2026-11-27T16:25:11.123456Z"}

# (message, in_stream): every message type of protocol versions 1-4, in both framings where it has two.
SAMPLES = [
    (w.Begin(0x16B37A0, 849_111_911_123_456, 771), False),
    (w.Message(None, True, 0x16B3748, "audit", b"hello \xc3\xa9"), False),
    (w.Message(None, False, 0x16B3748, "", b""), False),
    (w.Message(771, True, 0x16B3748, "p", b"\x00\xff"), True),
    (w.Commit(0, 0x16B37A0, 0x16B37D0, 849_111_911_123_456), False),
    (w.Origin(0x1000, "node_a"), False),
    (orders(), False),
    (orders("f", xid=772), True),
    (w.Relation(None, 1, "", "empty", "n", ()), False),
    (w.Type(None, 16500, "public", "mood"), False),
    (w.Type(773, 16501, "public", "_mood"), True),
    (w.Insert(None, 16400, ROW), False),
    (w.Insert(774, 16400, (None, w.UNCHANGED_TOAST, "", b"\x01\x02", "ü")), True),
    (w.Insert(None, 16400, ()), False),
    (w.Update(None, 16400, None, None, ROW), False),
    (w.Update(None, 16400, "K", ("41", None, None, None, None), ROW), False),
    (w.Update(775, 16400, "O", ROW, ROW), True),
    (w.Delete(None, 16400, "K", ("42", None, None, None, None)), False),
    (w.Delete(776, 16400, "O", ROW), True),
    (w.Truncate(None, 3, (16400, 16401, 16402)), False),
    (w.Truncate(777, 0, (16400,)), True),
    (w.StreamStart(778, True), False),
    (w.StreamStart(778, False), False),
    (w.StreamStop(), False),
    (w.StreamCommit(778, 0, 0x2000, 0x2030, 5), False),
    (w.StreamAbort(778, 779), False),
    (w.StreamAbort(778, 778, 0x3000, 6), False),
    (w.BeginPrepare(0x10, 0x20, 7, 780, "gid-1"), False),
    (w.Prepare(0, 0x10, 0x20, 7, 780, "gid-1"), False),
    (w.CommitPrepared(0, 0x30, 0x40, 8, 780, "gid-1"), False),
    (w.RollbackPrepared(0, 0x20, 0x50, 7, 9, 780, "gid-ü"), False),
    (w.StreamPrepare(0, 0x10, 0x20, 7, 781, "gid-2"), False),
]


def _sample_id(sample) -> str:
    message, in_stream = sample
    return f"{type(message).__name__}{'-stream' if in_stream else ''}"


def _valid_prefixes(message) -> set[int]:
    """Prefix lengths that are themselves a valid message (the v2 form of a v4 Stream Abort)."""
    if isinstance(message, w.StreamAbort) and message.abort_lsn is not None:
        return {9}
    return set()



class TestPgoutput:
    @pytest.mark.parametrize("sample", SAMPLES, ids=[_sample_id(s) for s in SAMPLES])
    def test_round_trip(self, sample):
        message, in_stream = sample
        assert w.decode_pgoutput(encode_pgoutput(message), in_stream) == message

    @pytest.mark.parametrize("sample", SAMPLES, ids=[_sample_id(s) for s in SAMPLES])
    def test_truncated_at_every_offset(self, sample):
        message, in_stream = sample
        data = encode_pgoutput(message)
        name = w.PgoutputMessage(data[0]).doc_name
        for size in range(len(data)):
            if size in _valid_prefixes(message):
                continue
            with pytest.raises(ProtocolError) as caught:
                w.decode_pgoutput(data[:size], in_stream)
            if size:
                assert f"malformed pgoutput {name} message" in str(caught.value)

    @pytest.mark.parametrize("sample", SAMPLES, ids=[_sample_id(s) for s in SAMPLES])
    def test_trailing_garbage(self, sample):
        message, in_stream = sample
        with pytest.raises(ProtocolError, match="trailing bytes"):
            w.decode_pgoutput(encode_pgoutput(message) + b"\0", in_stream)

    def test_fields_and_properties(self):
        relation = w.decode_pgoutput(encode_pgoutput(orders()))
        assert relation.replica_identity == "d"
        assert [c.is_key for c in relation.columns] == [True, False, False, False, False]
        assert relation.columns[2].type_modifier == 655366
        truncate = w.decode_pgoutput(encode_pgoutput(w.Truncate(None, 1, (1,))))
        assert (truncate.cascade, truncate.restart_identity) == (True, False)
        truncate = w.decode_pgoutput(encode_pgoutput(w.Truncate(None, 2, (1,))))
        assert (truncate.cascade, truncate.restart_identity) == (False, True)
        insert = w.decode_pgoutput(encode_pgoutput(w.Insert(None, 1, (None, w.UNCHANGED_TOAST, "x", b"\0"))))
        assert insert.new[1] is w.UNCHANGED_TOAST
        assert repr(insert.new[1]) == "UNCHANGED_TOAST"
        assert type(insert.new[3]) is bytes

    def test_xid_only_inside_a_stream(self):
        data = encode_pgoutput(w.Insert(900, 16400, ("1",)))
        assert w.decode_pgoutput(data, True) == w.Insert(900, 16400, ("1",))
        with pytest.raises(ProtocolError):
            w.decode_pgoutput(data, False)

    def test_decoder_table_covers_every_tag(self):
        assert set(w.PGOUTPUT_DECODERS) == set(w.PgoutputMessage) == set(b"BMCORYIUDTSEcAbPKrp")
        assert {chr(tag): tag.doc_name for tag in w.PgoutputMessage} == {
            "B": "Begin", "M": "Message", "C": "Commit", "O": "Origin", "R": "Relation", "Y": "Type",
            "I": "Insert", "U": "Update", "D": "Delete", "T": "Truncate", "S": "Stream Start",
            "E": "Stream Stop", "c": "Stream Commit", "A": "Stream Abort", "b": "Begin Prepare",
            "P": "Prepare", "K": "Commit Prepared", "r": "Rollback Prepared", "p": "Stream Prepare"}
        assert w.INSERT == ord("I")
        assert w.STREAM_COMMIT == ord("c")

    @pytest.mark.parametrize("data, reason", [
        (b"", "empty"),
        (b"Z\0\0\0\0", "unknown message type 0x5a"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 1) + b"x", "unknown tuple value kind 0x78"),
        (b"I" + struct.pack(">I", 1) + b"X" + struct.pack(">H", 0), "expected 'N'"),
        (b"U" + struct.pack(">I", 1) + b"K" + encode_tuple(("1",)) + b"K" + encode_tuple(("1",)), "expected 'N'"),
        (b"D" + struct.pack(">I", 1) + b"N" + encode_tuple(("1",)), "expected 'K' or 'O'"),
        (b"R" + struct.pack(">I", 1) + b"public\0t\0x" + struct.pack(">H", 0), "unknown replica identity"),
        (b"R" + struct.pack(">I", 1) + b"pub\xfflic\0t\0d" + struct.pack(">H", 0), "invalid UTF-8"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 1) + b"t" + struct.pack(">I", 1) + b"\xff",
         "invalid UTF-8"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 1) + b"t" + struct.pack(">I", 0xFFFFFFFF) + b"ab",
         "truncated tuple data"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 0xFFFF) + b"n", "truncated"),
        (b"T" + struct.pack(">IB", 0x7FFFFFFF, 0) + b"\0\0\0\1", "truncated"),
        (b"M" + struct.pack(">BQ", 1, 5) + b"p\0" + struct.pack(">I", 0xFFFFFFF0) + b"abc", "truncated"),
        (b"R" + struct.pack(">I", 1) + b"public\0t\0d" + struct.pack(">H", 500) + b"\0a\0", "truncated"),
        (b"M" + struct.pack(">BQ", 1, 5) + b"p\xff\0" + struct.pack(">I", 0), "invalid UTF-8"),
    ])
    def test_corrupted(self, data, reason):
        with pytest.raises(ProtocolError, match=reason):
            w.decode_pgoutput(data, False)

    def test_error_names_the_message(self):
        data = encode_pgoutput(w.Insert(None, 16400, ROW))
        with pytest.raises(ProtocolError, match="malformed pgoutput Insert message: truncated tuple data"):
            w.decode_pgoutput(data[:-3])

    @pytest.mark.parametrize("sample", SAMPLES, ids=[_sample_id(s) for s in SAMPLES])
    def test_random_corruption_raises_only_protocol_error(self, sample):
        message, in_stream = sample
        data = encode_pgoutput(message)
        rng = random.Random(len(data))
        for _ in range(300):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            try:
                w.decode_pgoutput(bytes(mutated), in_stream)
            except ProtocolError:
                continue
            except Exception as error:  # anything else would end the service with a traceback
                pytest.fail(f"{type(error).__name__} on corrupted {bytes(mutated).hex()}: {error}")


TYPE_CASES = [
    # (type oid, PostgreSQL text, JSON value): every row of the README's table of values
    (16, "t", True), (16, "f", False),
    (21, "-32768", -32768), (23, "2147483647", 2147483647), (20, "-9223372036854775808", -9223372036854775808),
    (26, "4294967295", 4294967295),
    (700, "1.1", 1.1), (700, "NaN", "NaN"), (700, "Infinity", "Infinity"), (700, "-Infinity", "-Infinity"),
    (701, "1e+300", 1e300), (701, "-1.7976931348623157e+308", -1.7976931348623157e308), (701, "0.1", 0.1),
    (701, "NaN", "NaN"), (701, "-Infinity", "-Infinity"),
    (1700, "19.90", "19.90"), (1700, "NaN", "NaN"), (1700, "-Infinity", "-Infinity"),
    (1700, "123456789012345678901234567890.000000000000000001", "123456789012345678901234567890.000000000000000001"),
    (114, '{"a": [1, 2.5, null]}', {"a": [1, 2.5, None]}), (3802, '{"a": 1}', {"a": 1}), (3802, '"x"', "x"),
    (3802, "null", None), (3802, "12345678901234567890", 12345678901234567890),
    (25, "hello", "hello"), (1043, "x y", "x y"), (1042, "ab  ", "ab  "), (18, "a", "a"), (19, "pg_class", "pg_class"),
    (2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    (1082, "2026-11-27", "2026-11-27"), (1082, "infinity", "infinity"), (1082, "0044-03-15 BC", "0044-03-15 BC"),
    (1114, "2026-11-27 16:25:11.123456", "2026-11-27T16:25:11.123456"),
    (1114, "2026-11-27 16:25:11", "2026-11-27T16:25:11"), (1114, "2026-11-27 16:25:11.5", "2026-11-27T16:25:11.5"),
    (1114, "infinity", "infinity"), (1114, "-infinity", "-infinity"),
    (1114, "0044-03-15 12:00:00 BC", "0044-03-15 12:00:00 BC"),
    (1114, "275760-09-13 00:00:00", "275760-09-13T00:00:00"),
    (1184, "2026-11-27 16:25:11.123456+00", "2026-11-27T16:25:11.123456Z"),
    (1184, "2026-11-27 16:25:11+00", "2026-11-27T16:25:11Z"),
    (1184, "2026-11-27 16:25:11.5+05:30", "2026-11-27T10:55:11.5Z"),
    (1184, "2026-11-27 16:25:11-08", "2026-11-28T00:25:11Z"),
    (1184, "infinity", "infinity"), (1184, "-infinity", "-infinity"),
    (1184, "0044-03-15 12:00:00+00 BC", "0044-03-15 12:00:00+00 BC"),
    (1083, "16:25:11.123456", "16:25:11.123456"), (1266, "16:25:11+00", "16:25:11+00"),
    (1186, "1 year 2 mons 3 days 04:05:06.5", "1 year 2 mons 3 days 04:05:06.5"),
    (17, "\\x0a0b", "Cgs="), (17, "\\x", ""), (17, "\\x00ff", "AP8="),
    (869, "192.168.0.1/24", "192.168.0.1/24"), (790, "$1.00", "$1.00"), (3904, "[1,5)", "[1,5)"),
    (600, "(1,2)", "(1,2)"), (142, "<a/>", "<a/>"), (16500, "happy", "happy"),
]


ARRAY_CASES = [
    (1007, "{1,2,3}", [1, 2, 3]),
    (1009, r'{"a,b","c\"d","e\\f"}', ["a,b", 'c"d', "e\\f"]),
    (1009, '{NULL,"NULL",null,"null"}', [None, "NULL", None, "null"]),
    (1007, "{{1,2},{3,4}}", [[1, 2], [3, 4]]),
    (1007, "{{{1},{2}},{{3},{4}}}", [[[1], [2]], [[3], [4]]]),
    (1007, "{{1,NULL},{NULL,4}}", [[1, None], [None, 4]]),
    (1007, "{}", []), (1009, "{}", []),
    (1007, "[0:1]={1,2}", [1, 2]),
    (1007, "[0:1][-1:0]={{1,2},{3,4}}", [[1, 2], [3, 4]]),
    (1009, '{""}', [""]), (1009, '{"a b"," "}', ["a b", " "]),
    (1009, '{"{x}","a}b","\\\\"}', ["{x}", "a}b", "\\"]),
    (1009, '{é,"ü x"}', ["é", "ü x"]),
    (1009, '{{"a,b",NULL},{c,"d"}}', [["a,b", None], ["c", "d"]]),
    (1000, "{t,f,NULL}", [True, False, None]),
    (1001, '{"\\\\x0a0b",NULL}', ["Cgs=", None]),
    (1002, '{a,"\\"",","}', ["a", '"', ","]),
    (1003, "{pg_class,pg_type}", ["pg_class", "pg_type"]),
    (1005, "{-1,2}", [-1, 2]), (1016, "{9223372036854775807}", [9223372036854775807]), (1028, "{26}", [26]),
    (1014, '{"ab  ",c}', ["ab  ", "c"]), (1015, "{x,y}", ["x", "y"]),
    (1021, "{1.5,NaN,Infinity,-Infinity}", [1.5, "NaN", "Infinity", "-Infinity"]),
    (1022, "{1e+300,-0.5}", [1e300, -0.5]),
    (1231, "{1.10,NaN}", ["1.10", "NaN"]),
    (1115, '{"2026-11-27 16:25:11.5",infinity}', ["2026-11-27T16:25:11.5", "infinity"]),
    (1185, '{"2026-11-27 16:25:11+00",-infinity}', ["2026-11-27T16:25:11Z", "-infinity"]),
    (1182, "{2026-11-27,infinity}", ["2026-11-27", "infinity"]),
    (1183, "{16:25:11}", ["16:25:11"]), (1270, "{16:25:11+00}", ["16:25:11+00"]),
    (1187, '{"1 day","-00:00:01"}', ["1 day", "-00:00:01"]),
    (2951, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    (199, '{"{\\"a\\": 1}","[1, 2]",NULL}', [{"a": 1}, [1, 2], None]),
    (3807, '{"{\\"a\\": {\\"b\\": \\"c\\\\\\"d\\"}}"}', [{"a": {"b": 'c"d'}}]),
    (1041, "{192.168.0.1,10.0.0.0/8}", ["192.168.0.1", "10.0.0.0/8"]),
    (1017, '{"(1,2)","(3,4)"}', ["(1,2)", "(3,4)"]),
    (3905, '{"[1,5)",empty}', ["[1,5)", "empty"]),
]

MALFORMED_ARRAYS = [
    (1007, "{1,2"), (1007, "{1,,2}"), (1007, "{,1}"), (1007, "{1,}"), (1009, '{"a}'), (1009, '{"a"b}'),
    (1007, "{x}"), (1007, "1,2"), (1007, "{{1,2}"), (1007, "{1,2}}"), (1007, "[0:1{1,2}"), (1007, "[a]={1}"),
    (1009, "{a b}"), (1009, "{a}x"), (1009, ""), (199, '{"{bad"}'), (1000, "{x}"),
    (1020, "{(1,1),(0,0);(2,2),(1,1)}"),  # box[]: ';' delimiter, kept as text
]


def _refuse_json_constant(name):
    raise ValueError(f"{name} is not JSON")


class TestTypes:
    @pytest.mark.parametrize("oid, text, expected", TYPE_CASES + ARRAY_CASES)
    def test_contract_value(self, oid, text, expected):
        value = w.convert_value(oid, text)
        assert value == expected
        assert type(value) is type(expected)
        json.dumps(value, allow_nan=False)  # always valid JSON

    def test_null(self):
        assert w.convert_value(23, None) is None

    def test_custom_types_by_type_name(self):
        assert w.convert_value(16501, "{happy,\"very sad\",NULL}", "_mood") == ["happy", "very sad", None]
        assert w.convert_value(16500, "happy", "mood") == "happy"
        assert w.converter_for(16500, "mood") is w.convert_text
        assert w.converter_for(23) is int

    @pytest.mark.parametrize("oid, text", MALFORMED_ARRAYS + [
        (23, "abc"), (16, "yes"), (3802, "{bad"), (701, "1e999"), (114, "1e400"), (17, "\\xZZ"), (114, "[" * 100_000)])
    def test_unreadable_text_stays_text(self, oid, text):
        """A malformed array, or a value the type cannot read, stays its text."""
        assert w.convert_value(oid, text) == text

    def test_bytea_escape_format(self):
        assert w.convert_value(17, "a\\\\b\\001") == base64.b64encode(b"a\\b\x01").decode()

    def test_commit_time(self):
        assert w.convert_commit_time(0) == "2000-01-01T00:00:00.000000Z"
        assert w.convert_commit_time(849_111_911_123_456) == "2026-11-27T16:25:11.123456Z"
        assert w.convert_commit_time(-1) == "1999-12-31T23:59:59.999999Z"

    def test_every_array_type_has_an_element_type(self):
        for array_oid in w.ARRAY_ELEMENT_TYPES:
            assert w.convert_value(array_oid, "{}") == []

    # -- JSON text: what the envelope writes ---------------------------------------------------------

    @pytest.mark.parametrize("oid, text, expected", TYPE_CASES + ARRAY_CASES)
    def test_json_text_reads_back_as_the_contract_value(self, oid, text, expected):
        json_text = w.json_text_for(oid)(text)
        value = json.loads(json_text, parse_constant=_refuse_json_constant)
        assert value == expected
        assert type(value) is type(expected)
        assert "\n" not in json_text
        assert "\r" not in json_text

    def test_jsonb_is_written_as_postgres_prints_it(self):
        text = '{"x": 1.000000000000000000001, "big": 123456789012345678901234567890.5, "s": "a\\nb\\u0001"}'
        assert w.json_text_for(3802)(text) == text  # every digit kept
        assert w.convert_value(3802, text)["x"] == 1.0  # as a Python value: a double

    @pytest.mark.parametrize("text, written", [
        ('[1,\n 2]', "[1,2]"), ('{"a":\r\n1}', '{"a":1}'), (' {"a": 1}', '{"a":1}'), ('{"a": 1} ', '{"a":1}')])
    def test_jsonb_text_jsonb_out_never_prints_is_parsed_and_rewritten(self, text, written):
        assert w.json_text_for(3802)(text) == written

    @pytest.mark.parametrize("oid, text", [(23, "abc"), (16, "yes"), (3802, "{bad"), (701, "1e999"),
                                           (114, "1e400"), (17, "\\xZZ"), (114, "[" * 100_000),
                                           (3802, "[" * 100_000), (3802, "NaN"), (3802, "[Infinity]"),
                                           (3802, '{"a": 1} x'), (3802, ""), (114, "")])
    def test_json_text_refuses_what_convert_value_keeps_as_text(self, oid, text):
        assert w.convert_value(oid, text) == text
        with pytest.raises((ValueError, RecursionError)):
            w.json_text_for(oid)(text)

    def test_json_text_of_custom_types(self):
        assert w.json_text_for(16501, "_mood")('{happy,"very sad",NULL}') == '["happy","very sad",null]'
        assert w.json_text_for(16500, "mood")('say "hi"\\') == '"say \\"hi\\"\\\\"'
        assert w.json_text_for(23) is w.json_text_int

    @pytest.mark.parametrize("oid", [16, 20, 23, 700, 701, 1700, 114, 1114, 1184, 17, 1007, 1009, 1185, 25])
    def test_json_text_agrees_with_convert_value_on_random_text(self, oid):
        rng = random.Random(oid)
        alphabet = '0123456789+-. :TZe{}[],"\\aftrunlxINFbc\n'
        for _ in range(2000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            try:
                json_text = w.json_text_for(oid)(text)
            except (ValueError, RecursionError):
                assert w.convert_value(oid, text) == text  # refused by both: the text is kept
                continue
            assert json.loads(json_text, parse_constant=_refuse_json_constant) == w.convert_value(oid, text)
            assert "\n" not in json_text

    def test_jsonb_text_agrees_with_json_loads_on_random_documents(self):
        rng = random.Random(7)

        def document(depth=0):
            kind = rng.randrange(7 if depth < 4 else 4)
            if kind == 0:
                return rng.randint(-10**20, 10**20)
            if kind == 1:
                return rng.uniform(-1e6, 1e6)
            if kind == 2:
                return "".join(rng.choice('aé"\\\n\x01 ') for _ in range(rng.randint(0, 5)))
            if kind == 3:
                return rng.choice([True, False, None])
            if kind in (4, 5):
                return [document(depth + 1) for _ in range(rng.randint(0, 3))]
            return {f"k{i}": document(depth + 1) for i in range(rng.randint(0, 3))}

        for _ in range(500):
            value = document()
            text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))  # jsonb_out's style
            assert w.json_text_for(3802)(text) == text
            assert json.loads(text) == w.convert_value(3802, text)


COMMIT_LSN = 0x16B37A0
END_LSN = 0x16B37D0
COMMIT_TIME = 849_111_911_123_456
COMMIT_TIME_TEXT = "2026-11-27T16:25:11.123456Z"


class Feeder:
    """Feeds messages with increasing wal_start; collects every chunk."""

    def __init__(self, assembler: w.ChangeAssembler, lsn: int = 0x16B3700):
        self.assembler = assembler
        self.lsn = lsn
        self.in_stream = False

    def __call__(self, *messages, lsn: int | None = None) -> list[w.Chunk]:
        chunks = []
        if lsn is not None:
            self.lsn = lsn
        for message in messages:
            chunks.extend(self.assembler.feed(self.lsn, encode_pgoutput(message)))
            self.lsn += 0x10
        return chunks


def events_of(chunks) -> list[dict]:
    return [event for chunk in chunks for event in chunk.events]


def transaction(feed: Feeder, *changes, xid=771, relations=(orders(),)) -> list[w.Chunk]:
    return feed(w.Begin(COMMIT_LSN, COMMIT_TIME, xid), *relations, *changes,
                w.Commit(0, COMMIT_LSN, END_LSN, COMMIT_TIME))


@pytest.fixture
def feed():
    assembler = w.ChangeAssembler()
    yield Feeder(assembler)
    assembler.close()


class TestEnvelope:
    def test_insert_event_exactly(self, feed):
        chunks = transaction(feed, w.Insert(None, 16400, ROW))
        assert len(chunks) == 1
        assert chunks[0].end_lsn == END_LSN
        (event,) = chunks[0].events
        assert list(event) == EVENT_KEYS
        assert event == {
            "id": "0/16B37A0:0", "op": "insert", "schema": "public", "table": "orders", "key": {"id": 42},
            "new": ROW_JSON, "old": None, "unchanged_toast": [], "xid": 771, "lsn": "0/16B3720",
            "commit_lsn": "0/16B37A0", "commit_time": COMMIT_TIME_TEXT, "seq": 0}
        assert list(event["new"]) == ["id", "status", "amount", "meta", "created"]
        assert json.loads(event.line) == event.data
        assert "\n" not in event.line

    def test_an_event_is_its_json_line(self, feed):
        (event,) = events_of(transaction(feed, w.Insert(None, 16400, ROW)))
        assert isinstance(event, w.Event)
        assert event.line == (
            '{"id":"0/16B37A0:0","op":"insert","schema":"public","table":"orders","key":{"id":42},'
            '"new":{"id":42,"status":"paid","amount":"19.90","meta":{"a": 1},'
            '"created":"2026-11-27T16:25:11.123456Z"},"old":null,"unchanged_toast":[],"xid":771,'
            '"lsn":"0/16B3720","commit_lsn":"0/16B37A0","commit_time":"2026-11-27T16:25:11.123456Z","seq":0}')
        assert w.encode_event_lines([event, event]) == (event.line + "\n" + event.line + "\n").encode()

    def test_event_as_a_mapping(self):
        line = '{"id":"0/1:0","op":"insert","new":{"n": 1.5}}'
        event = w.Event(line)
        assert event == {"id": "0/1:0", "op": "insert", "new": {"n": 1.5}} == event.data
        assert {"id": "0/1:0", "op": "insert", "new": {"n": 1.5}} == event
        assert event == w.Event(line)
        assert event != w.Event(line.replace("1.5", "1.50"))  # the same value, written otherwise
        assert event != {"id": "0/1:0"}
        assert event != "text"
        assert list(event) == ["id", "op", "new"]
        assert event.get("op") == "insert"
        assert len(event) == 3
        assert "new" in event
        assert event.get("missing") is None
        assert w.Event('{"id":"0/1:0",not json at all')["id"] == "0/1:0"  # the id, without decoding
        assert w.Event.from_dict({"id": "x", "a": [1, "é"]}).line == '{"id":"x","a":[1,"é"]}'
        assert w.event_line({"id": "x", "v": None}) == '{"id":"x","v":null}'
        assert w.event_line(event) is line
        assert repr(event) == f"Event({line})"
        with pytest.raises(TypeError):
            hash(event)

    def test_event_id_with_escapes_is_decoded(self):
        assert w.Event.from_dict({"id": 'a"b\\c'})["id"] == 'a"b\\c'
        assert w.Event('{"id":"a\\"b","x":1}')["id"] == 'a"b'

    def test_event_numbers_beyond_what_python_reads_stay_digits(self):
        digits, integer = "1" + "0" * 400 + ".5", "1" + "0" * 5000  # beyond doubles; beyond int()'s 4,300 digits
        event = w.Event('{"id":"0/1:0","new":{"doc": {"x": %s, "y": 0.25, "z": %s, "n": 7}}}' % (digits, integer))
        assert event["new"]["doc"] == {"x": digits, "y": 0.25, "z": integer, "n": 7}
        assert w.json_text_for(3802)('{"z": %s}' % integer) == '{"z": %s}' % integer  # jsonb: kept as printed

    @pytest.mark.parametrize("row", [
        ROW, ("1", None, "0.5", "[1, 2]", "infinity"), ("-7", 'q " b \\ nl \n é ✓', "NaN", '"s"', None),
        ("2147483647", "", "1", '{"a": {"b": [true, null]}}', "2026-11-27 16:25:11.5+05:30")])
    def test_fast_and_general_insert_paths_write_the_same_line(self, row):
        writer = w.RelationWriter(orders(), {})
        data = encode_pgoutput(w.Insert(None, 16400, row))
        fast = writer.write(w._TxnContext(771, "0/16B37A0", COMMIT_TIME_TEXT), data, 5, 0x20)
        insert = writer.write_insert(w._TxnContext(771, "0/16B37A0", COMMIT_TIME_TEXT), data, 0x20)
        general = writer.write_decoded(w._TxnContext(771, "0/16B37A0", COMMIT_TIME_TEXT), w.decode_pgoutput(data), 0x20)
        assert fast is not None
        assert fast.line == general.line
        assert insert.line == general.line  # feed's path for a plain Insert
        assert json.loads(fast.line) == fast.data
        assert "\n" not in fast.line

    @pytest.mark.parametrize("identity", ["d", "f"])
    @pytest.mark.parametrize("make", [
        lambda old, new: w.Update(None, 16400, None, None, new),
        lambda old, new: w.Update(None, 16400, "K", (old[0], None, None, None, None), new),
        lambda old, new: w.Update(None, 16400, "O", old, new),
        lambda old, new: w.Delete(None, 16400, "K", (old[0], None, None, None, None)),
        lambda old, new: w.Delete(None, 16400, "O", old),
    ], ids=["update", "update-key", "update-old", "delete-key", "delete-old"])
    def test_fast_and_general_paths_write_the_same_update_and_delete(self, make, identity):
        writer = w.RelationWriter(orders(identity), {})
        message = make(("7", None, "0.5", "[1, 2]", "infinity"), ROW)
        data = encode_pgoutput(message)
        fast = writer.write(w._TxnContext(771, "0/16B37A0", COMMIT_TIME_TEXT), data, 5, 0x20)
        general = writer.write_decoded(w._TxnContext(771, "0/16B37A0", COMMIT_TIME_TEXT), message, 0x20)
        assert fast is not None
        assert fast.line == general.line
        assert fast["op"] == type(message).__name__.lower()

    def test_fast_path_declines_what_needs_the_general_path(self):
        writer = w.RelationWriter(orders(), {})
        ctx = w._TxnContext(771, "0/16B37A0", COMMIT_TIME_TEXT)
        unreadable = encode_pgoutput(w.Insert(None, 16400, ("x", "a", "1", "{bad", None)))
        assert writer.write(ctx, unreadable, 5, 0x20) is None
        assert writer.write_insert(ctx, unreadable, 0x20) is None
        for declined in (unreadable[:-1], unreadable + b"\0", unreadable[:5] + b"K" + unreadable[6:]):
            assert writer.write_insert(ctx, declined, 0x20) is None
        event = writer.write_decoded(ctx, w.decode_pgoutput(unreadable), 0x20)
        assert event["new"] == {"id": "x", "status": "a", "amount": "1", "meta": "{bad", "created": None}
        toast = encode_pgoutput(w.Update(None, 16400, None, None, ("1", w.UNCHANGED_TOAST, "1", None, None)))
        assert writer.write(ctx, toast, 5, 0x20) is None
        for declined in (toast[:-1], toast + b"\0", encode_pgoutput(w.Delete(None, 16400, "K", ()))[:10]):
            assert writer.write(ctx, declined, 5, 0x20) is None
        assert ctx.seq == 1  # only write_decoded wrote an event

    def test_composite_key_on_the_fast_path(self, feed):
        columns = (w.Column(1, "a", 23, -1), w.Column(0, "v", 25, -1), w.Column(1, "b", 25, -1))
        (event,) = events_of(transaction(feed, w.Insert(None, 16401, ("1", "x", "k")),
                                         relations=(orders(oid=16401, columns=columns, name="two"),)))
        assert '"key":{"a":1,"b":"k"},"new":{"a":1,"v":"x","b":"k"}' in event.line

    def test_seq_id_and_lsn(self, feed):
        feed(w.Begin(0x1_0000_00AB, COMMIT_TIME, 9), orders())
        chunks = feed(w.Insert(None, 16400, ROW), w.Insert(None, 16400, ROW), lsn=0xA_0000_0010)
        chunks += feed(w.Commit(0, 0x1_0000_00AB, 0x1_0000_00FF, COMMIT_TIME))
        events = events_of(chunks)
        assert [e["id"] for e in events] == ["1/AB:0", "1/AB:1"]
        assert [e["seq"] for e in events] == [0, 1]
        assert [e["lsn"] for e in events] == ["A/10", "A/20"]
        assert chunks[-1].end_lsn == 0x1_0000_00FF

    def test_in_transaction(self, feed):
        assert not feed.assembler.in_transaction
        feed(w.Begin(COMMIT_LSN, COMMIT_TIME, 1))
        assert feed.assembler.in_transaction
        feed(w.Commit(0, COMMIT_LSN, END_LSN, COMMIT_TIME))
        assert not feed.assembler.in_transaction
        assert feed.assembler.open_streams == 0

    def test_empty_transaction_still_ends_with_end_lsn(self, feed):
        chunks = transaction(feed, relations=())
        assert [(c.events, c.end_lsn) for c in chunks] == [([], END_LSN)]

    def test_update_keeping_the_key(self, feed):
        (event,) = events_of(transaction(feed, w.Update(None, 16400, None, None, ROW)))
        assert event["op"] == "update"
        assert event["old"] is None
        assert event["key"] == {"id": 42}
        assert event["new"] == ROW_JSON

    def test_update_changing_the_key(self, feed):
        old = ("41", None, None, None, None)
        (event,) = events_of(transaction(feed, w.Update(None, 16400, "K", old, ROW)))
        assert event["key"] == {"id": 42}
        assert event["old"] == {"id": 41}

    def test_update_replica_identity_full(self, feed):
        old = ("42", "open", "19.90", '{"a": 0}', "2026-11-27 16:00:00+00")
        (event,) = events_of(transaction(feed, w.Update(None, 16400, "O", old, ROW), relations=(orders("f", columns=tuple(
            w.Column(1, c.name, c.type_oid, c.type_modifier) for c in ORDERS_COLUMNS)),)))
        assert event["old"] == {"id": 42, "status": "open", "amount": "19.90", "meta": {"a": 0},
                                "created": "2026-11-27T16:00:00Z"}
        assert event["key"] == ROW_JSON  # FULL: every column is flagged as key

    def test_delete_default_identity(self, feed):
        (event,) = events_of(transaction(feed, w.Delete(None, 16400, "K", ("42", None, None, None, None))))
        assert list(event) == EVENT_KEYS
        assert (event["op"], event["key"], event["new"], event["old"]) == ("delete", {"id": 42}, None, {"id": 42})
        assert event["unchanged_toast"] == []

    def test_delete_full_identity(self, feed):
        (event,) = events_of(transaction(feed, w.Delete(None, 16400, "O", ROW), relations=(orders("f"),)))
        assert event["old"] == ROW_JSON
        assert event["key"] == {"id": 42}

    def test_replica_identity_nothing_has_no_key(self, feed):
        (event,) = events_of(transaction(feed, w.Insert(None, 16400, ROW), relations=(orders("n"),)))
        assert event["key"] is None

    def test_no_flagged_column_has_no_key(self, feed):
        columns = tuple(w.Column(0, c.name, c.type_oid, c.type_modifier) for c in ORDERS_COLUMNS)
        (event,) = events_of(transaction(feed, w.Insert(None, 16400, ROW), relations=(orders(columns=columns),)))
        assert event["key"] is None

    def test_unchanged_toast_without_old(self, feed):
        new = ("42", "paid", "19.90", w.UNCHANGED_TOAST, "2026-11-27 16:25:11.123456+00")
        (event,) = events_of(transaction(feed, w.Update(None, 16400, None, None, new)))
        assert "meta" not in event["new"]
        assert event["unchanged_toast"] == ["meta"]

    def test_unchanged_toast_filled_from_full_old_row(self, feed):
        new = ("42", w.UNCHANGED_TOAST, "19.90", w.UNCHANGED_TOAST, "2026-11-27 16:25:11.123456+00")
        old = ("42", "paid", "1.00", '{"a": 1}', "2026-11-27 16:00:00+00")
        (event,) = events_of(transaction(feed, w.Update(None, 16400, "O", old, new), relations=(orders("f"),)))
        assert event["new"] == ROW_JSON
        assert list(event["new"]) == list(ROW_JSON)
        assert event["unchanged_toast"] == []

    def test_unchanged_toast_filled_from_key_only_where_it_has_it(self, feed):
        new = ("43", "paid", "19.90", w.UNCHANGED_TOAST, "2026-11-27 16:25:11.123456+00")
        (event,) = events_of(transaction(feed, w.Update(None, 16400, "K", ("42", None, None, None, None), new)))
        assert event["unchanged_toast"] == ["meta"]
        assert "meta" not in event["new"]
        assert event["old"] == {"id": 42}
        assert event["key"] == {"id": 43}

    def test_truncate_several_tables(self, feed):
        relations = (orders(), orders(oid=16401, name="lines"), orders(oid=16402, name="refunds"))
        chunks = transaction(feed, w.Insert(None, 16400, ROW), w.Truncate(None, 3, (16401, 16402)),
                             w.Truncate(None, 0, (16400,)), relations=relations)
        events = events_of(chunks)
        assert [(e["op"], e["table"], e["seq"]) for e in events] == [
            ("insert", "orders", 0), ("truncate", "lines", 1), ("truncate", "refunds", 2), ("truncate", "orders", 3)]
        first = events[1]
        assert list(first) == EVENT_KEYS[:8] + ["cascade", "restart_identity"] + EVENT_KEYS[8:]
        assert (first["key"], first["new"], first["old"], first["unchanged_toast"]) == (None, None, None, [])
        assert (first["cascade"], first["restart_identity"]) == (True, True)
        assert (events[3]["cascade"], events[3]["restart_identity"]) == (False, False)
        assert events[1]["lsn"] == events[2]["lsn"]
        assert events[1]["id"] != events[2]["id"]

    def test_transactional_message_counts_in_seq(self, feed):
        message = w.Message(None, True, 0x16B3790, "audit", "é".encode())
        events = events_of(transaction(feed, w.Insert(None, 16400, ROW), message))
        event = events[1]
        assert list(event) == EVENT_KEYS[:8] + ["prefix", "content", "transactional"] + EVENT_KEYS[8:]
        assert event == {"id": "0/16B37A0:1", "op": "message", "schema": None, "table": None, "key": None,
                         "new": None, "old": None, "unchanged_toast": [], "prefix": "audit", "content": "é",
                         "transactional": True, "xid": 771, "lsn": "0/16B3790", "commit_lsn": "0/16B37A0",
                         "commit_time": COMMIT_TIME_TEXT, "seq": 1}

    def test_non_transactional_binary_message_is_its_own_chunk(self, feed):
        chunks = feed(w.Message(None, False, 0x16B3790, "bin", b"\xff\x00"))
        assert len(chunks) == 1
        assert chunks[0].end_lsn is None
        (event,) = chunks[0].events
        assert list(event) == EVENT_KEYS[:8] + ["prefix", "content_base64", "transactional"] + EVENT_KEYS[8:]
        assert event["id"] == "0/16B3790:m"
        assert event["content_base64"] == "/wA="
        assert (event["xid"], event["commit_lsn"], event["commit_time"], event["seq"]) == (None, None, None, None)
        assert event["transactional"] is False

    def test_non_transactional_message_inside_a_transaction_does_not_count(self, feed):
        feed(w.Begin(COMMIT_LSN, COMMIT_TIME, 5), orders())
        (chunk,) = feed(w.Message(None, False, 0x10, "p", b"x"))
        assert chunk.events[0]["id"] == "0/10:m"
        chunks = feed(w.Insert(None, 16400, ROW), w.Commit(0, COMMIT_LSN, END_LSN, COMMIT_TIME))
        assert events_of(chunks)[0]["seq"] == 0

    def test_chunking_a_big_transaction(self):
        assembler = w.ChangeAssembler(chunk_events=1000)
        chunks = transaction(Feeder(assembler), *[w.Insert(None, 16400, ROW)] * 2500)
        assert [len(c.events) for c in chunks] == [1000, 1000, 500]
        assert [c.end_lsn for c in chunks] == [None, None, END_LSN]
        assert [e["seq"] for e in events_of(chunks)] == list(range(2500))

    def test_chunks_leave_as_the_transaction_arrives(self):
        feed = Feeder(w.ChangeAssembler(chunk_events=2))
        assert feed(w.Begin(COMMIT_LSN, COMMIT_TIME, 5), orders(), w.Insert(None, 16400, ROW)) == []
        (chunk,) = feed(w.Insert(None, 16400, ROW))
        assert len(chunk.events) == 2
        assert chunk.end_lsn is None
        (last,) = feed(w.Commit(0, COMMIT_LSN, END_LSN, COMMIT_TIME))
        assert last.events == []
        assert last.end_lsn == END_LSN

    def test_relation_change_mid_transaction(self, feed):
        wider = orders(columns=ORDERS_COLUMNS + (w.Column(0, "note", 25, -1),))
        events = events_of(transaction(feed, w.Insert(None, 16400, ROW), wider, w.Insert(None, 16400, ROW + ("hi",))))
        assert "note" not in events[0]["new"]
        assert events[1]["new"]["note"] == "hi"

    def test_relation_change_mid_transaction_replaces_the_key_and_columns_of_updates_and_deletes(self, feed):
        rekeyed = orders(columns=(w.Column(0, "id", 20, -1), w.Column(1, "status", 25, -1)))
        events = events_of(transaction(
            feed, w.Delete(None, 16400, "K", ("1", None, None, None, None)), rekeyed,
            w.Update(None, 16400, None, None, ("2", "paid")), w.Delete(None, 16400, "K", (None, "paid"))))
        assert [e["key"] for e in events] == [{"id": 1}, {"status": "paid"}, {"status": "paid"}]
        assert events[1]["new"] == {"id": 2, "status": "paid"}
        assert [e["old"] for e in events] == [{"id": 1}, None, {"status": "paid"}]
        with pytest.raises(ProtocolError, match="Update message: 5 columns, but Relation public.orders has 2"):
            feed(w.Begin(COMMIT_LSN, COMMIT_TIME, 9), w.Update(None, 16400, None, None, ROW))

    def test_custom_types_from_type_messages(self, feed):
        columns = (w.Column(1, "id", 23, -1), w.Column(0, "moods", 16501, -1), w.Column(0, "mood", 16500, -1))
        relations = (w.Type(None, 16500, "public", "mood"), w.Type(None, 16501, "public", "_mood"),
                     orders(columns=columns))
        (event,) = events_of(transaction(feed, w.Insert(None, 16400, ("1", "{happy,sad}", "ok")), relations=relations))
        assert event["new"] == {"id": 1, "moods": ["happy", "sad"], "mood": "ok"}

    def test_unreadable_value_stays_text(self, feed):
        (event,) = events_of(transaction(feed, w.Insert(None, 16400, ("x", "paid", "1", "{bad", "y"))))
        assert event["new"] == {"id": "x", "status": "paid", "amount": "1", "meta": "{bad", "created": "y"}

    def test_percent_signs_in_names_are_written_as_they_are(self, feed):
        # The writer's line templates hold the schema and table names: a '%' there is text.
        columns = (w.Column(1, "id%s", 23, -1), w.Column(0, "n", 25, -1))
        relation = w.Relation(None, 16400, "s%d", "t%s%%", "d", columns)
        events = events_of(transaction(
            feed, w.Insert(None, 16400, ("1", "a%sb")), w.Update(None, 16400, None, None, ("1", "%")),
            w.Delete(None, 16400, "K", ("1", None)), relations=(relation,)))
        assert [(e["schema"], e["table"], e["key"]) for e in events] == [("s%d", "t%s%%", {"id%s": 1})] * 3
        assert [e["new"] for e in events] == [{"id%s": 1, "n": "a%sb"}, {"id%s": 1, "n": "%"}, None]
        unkeyed = w.Relation(None, 16401, "s%", "u%", "n", columns)
        (event,) = events_of(transaction(feed, w.Insert(None, 16401, ("2", "%%")), relations=(unkeyed,)))
        assert (event["table"], event["key"], event["new"]) == ("u%", None, {"id%s": 2, "n": "%%"})

    def test_origin_is_ignored(self, feed):
        chunks = transaction(feed, w.Origin(0x99, "elsewhere"), w.Insert(None, 16400, ROW))
        assert len(events_of(chunks)) == 1

    @pytest.mark.parametrize("message", [w.BeginPrepare(1, 2, 3, 4, "g"), w.Prepare(0, 1, 2, 3, 4, "g"),
                                         w.CommitPrepared(0, 1, 2, 3, 4, "g"), w.RollbackPrepared(0, 1, 2, 3, 4, 5, "g"),
                                         w.StreamPrepare(0, 1, 2, 3, 4, "g")])
    def test_two_phase_is_refused(self, feed, message):
        with pytest.raises(ProtocolError, match="two_phase was not requested"):
            feed(message)

    @pytest.mark.parametrize("messages, reason", [
        ([w.Begin(COMMIT_LSN, 0, 1), w.Insert(None, 999, ("1",))], "unknown relation 999"),
        ([w.Begin(COMMIT_LSN, 0, 1), w.Truncate(None, 0, (999,))], "unknown relation 999"),
        ([w.Insert(None, 16400, ROW)], "Insert message outside a transaction"),
        ([w.Message(None, True, 1, "p", b"")], "outside a transaction"),
        ([w.Commit(0, COMMIT_LSN, END_LSN, 0)], "Commit message outside a transaction"),
        ([w.Begin(COMMIT_LSN, 0, 1), w.Begin(COMMIT_LSN, 0, 1)], "Begin message inside a transaction"),
        ([w.Begin(COMMIT_LSN, 0, 1), w.Commit(0, COMMIT_LSN + 1, END_LSN, 0)], "differs from the Begin"),
        ([w.Begin(COMMIT_LSN, 0, 1), w.Insert(None, 16400, ("1", "2"))], "2 columns, but Relation public.orders has 5"),
        ([w.Begin(COMMIT_LSN, 0, 1), w.Insert(None, 16400, (b"\0\0\0\1", None, None, None, None))], "binary"),
        ([w.Begin(COMMIT_LSN, 2**62, 1)], "commit time out of range"),
    ])
    def test_protocol_errors(self, feed, messages, reason):
        feed(orders())
        with pytest.raises(ProtocolError, match=reason):
            feed(*messages)


XID = 800


def stream_block(xid, *changes, first=False):
    return (w.StreamStart(xid, first), *changes, w.StreamStop())


def insert_in(xid, row=ROW, relid=16400):
    return w.Insert(xid, relid, row)


def ids_row(n: int) -> tuple:
    return (str(n), "paid", "19.90", '{"a": 1}', "2026-11-27 16:25:11.123456+00")


def stream_commit(xid=XID, commit_lsn=0x5000, end_lsn=0x5030):
    return w.StreamCommit(xid, 0, commit_lsn, end_lsn, COMMIT_TIME)


def spill_fds(directory: str) -> list[str]:
    """Open file descriptors of this process on (unlinked) files in `directory`."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(directory):
            found.append(target)
    return found


class TestStreaming:
    def test_commit_delivers_everything_in_order(self, feed):
        feed(*stream_block(XID, orders(xid=XID), insert_in(XID, ids_row(1)), first=True))
        assert feed.assembler.open_streams == 1
        assert not feed.assembler.in_transaction
        feed(*stream_block(XID, insert_in(801, ids_row(2)), w.Message(XID, True, 0x4000, "m", b"x"),
                           w.Truncate(XID, 1, (16400,)), w.Delete(801, 16400, "K", ids_row(1))))
        assert feed.assembler.open_streams == 1
        chunks = feed(stream_commit())
        assert feed.assembler.open_streams == 0
        events = events_of(chunks)
        assert [e["op"] for e in events] == ["insert", "insert", "message", "truncate", "delete"]
        assert [e["id"] for e in events] == [f"0/5000:{n}" for n in range(5)]
        assert {e["xid"] for e in events} == {XID}  # also the changes made in subtransaction 801
        assert {e["commit_time"] for e in events} == {COMMIT_TIME_TEXT}
        assert events[0]["new"]["id"] == 1
        assert events[1]["new"]["id"] == 2
        assert [c.end_lsn for c in chunks] == [0x5030]
        assert events[2]["lsn"] == "0/4000"

    def test_abort_delivers_nothing(self, feed):
        feed(*stream_block(XID, orders(xid=XID), insert_in(XID), first=True))
        assert feed(w.StreamAbort(XID, XID)) == []
        assert feed.assembler.open_streams == 0
        assert feed.assembler.buffered_bytes == 0
        with pytest.raises(ProtocolError, match="never streamed"):
            feed(stream_commit())

    def test_parallel_abort_form(self, feed):
        feed(*stream_block(XID, orders(xid=XID), insert_in(XID), first=True))
        assert feed(w.StreamAbort(XID, XID, 0x6000, 1)) == []
        assert feed.assembler.open_streams == 0

    def test_subtransaction_abort_drops_only_its_changes(self, feed):
        feed(*stream_block(XID, orders(xid=XID), insert_in(XID, ids_row(1)), insert_in(801, ids_row(2)),
                           insert_in(802, ids_row(3)), first=True))
        feed(w.StreamAbort(XID, 801))
        feed(*stream_block(XID, insert_in(XID, ids_row(4)), insert_in(803, ids_row(5))))
        feed(w.StreamAbort(XID, 803), w.StreamAbort(XID, 999))  # 999: a subtransaction that changed nothing
        events = events_of(feed(stream_commit()))
        assert [e["new"]["id"] for e in events] == [1, 3, 4]
        assert [e["seq"] for e in events] == [0, 1, 2]

    def test_interleaved_streams_and_plain_transactions(self, feed):
        feed(orders())
        feed(*stream_block(800, insert_in(800, ids_row(1)), first=True))
        feed(*stream_block(900, insert_in(900, ids_row(10)), first=True))
        plain = transaction(feed, w.Insert(None, 16400, ids_row(50)), relations=())
        assert [e["new"]["id"] for e in events_of(plain)] == [50]  # not held back by the streams
        feed(*stream_block(800, insert_in(800, ids_row(2))))
        feed(*stream_block(900, insert_in(900, ids_row(11))))
        assert feed.assembler.open_streams == 2
        second = events_of(feed(stream_commit(900, 0x7000, 0x7010)))
        first = events_of(feed(stream_commit(800, 0x8000, 0x8010)))
        assert [e["new"]["id"] for e in second] == [10, 11]
        assert {e["xid"] for e in second} == {900}
        assert [e["new"]["id"] for e in first] == [1, 2]
        assert first[0]["id"] == "0/8000:0"

    def test_chunking_a_big_streamed_transaction(self):
        feed = Feeder(w.ChangeAssembler(chunk_events=1000))
        feed(*stream_block(XID, orders(xid=XID), *[insert_in(XID, ids_row(n)) for n in range(2500)], first=True))
        chunks = list(feed(stream_commit()))
        assert [len(c.events) for c in chunks] == [1000, 1000, 500]
        assert [c.end_lsn for c in chunks] == [None, None, 0x5030]
        assert [e["new"]["id"] for e in events_of(chunks)] == list(range(2500))

    def test_spill_gives_identical_events_and_removes_its_file(self, tmp_path):
        def run(spill_bytes):
            assembler = w.ChangeAssembler(chunk_events=100, spill_bytes=spill_bytes, spill_dir=str(tmp_path))
            feed = Feeder(assembler)
            feed(*stream_block(XID, orders(xid=XID), *[insert_in(XID + n % 3, ids_row(n)) for n in range(500)],
                               first=True))
            feed(w.StreamAbort(XID, XID + 1))  # partly in the file already
            feed(*stream_block(XID, *[insert_in(XID, ids_row(n)) for n in range(500, 700)]))
            spilled = spill_fds(str(tmp_path))
            chunks = feed(stream_commit())
            events = []
            for chunk in chunks:
                events.extend(chunk.events)
            assert spill_fds(str(tmp_path)) == []
            assert os.listdir(tmp_path) == []
            return events, spilled

        in_memory, spilled_none = run(16 * 2**20)
        on_disk, spilled = run(2000)
        assert spilled_none == []
        assert len(spilled) == 1
        assert on_disk == in_memory
        assert len(in_memory) == 700 - 167

    def test_memory_stays_bounded(self, tmp_path):
        bound = 20_000
        assembler = w.ChangeAssembler(spill_bytes=bound, spill_dir=str(tmp_path))
        feed = Feeder(assembler)
        feed(orders(), w.StreamStart(800, True), w.StreamStop(), w.StreamStart(900, True))
        largest = 0
        for n in range(3000):
            feed(insert_in(900 if n % 2 else 901, ids_row(n)))
            largest = max(largest, assembler.buffered_bytes)
            if n % 500 == 0:  # switch streams: the bound is over all of them
                feed(w.StreamStop(), w.StreamStart(800, False), insert_in(800, ids_row(n)), w.StreamStop(),
                     w.StreamStart(900, False))
        feed(w.StreamStop())
        assert 0 < largest <= bound
        chunks = iter(assembler.feed(0x9000, encode_pgoutput(stream_commit(900))))
        first = next(chunks)  # lazily: the first chunk before the rest is read
        assert len(first.events) == 1000
        assert assembler.buffered_bytes <= bound
        assert len(first.events) + sum(len(c.events) for c in chunks) == 3000
        assert [e["new"]["id"] for e in events_of(feed(stream_commit(800)))] == list(range(0, 3000, 500))

    def test_relation_change_mid_stream(self, feed):
        narrow = orders(columns=ORDERS_COLUMNS[:2])
        feed(narrow)
        feed(*stream_block(XID, orders(xid=XID, columns=ORDERS_COLUMNS[:2]), insert_in(XID, ("1", "a")), first=True))
        # a plain transaction in between changes the table and the cache
        plain = transaction(feed, w.Insert(None, 16400, ids_row(2)), relations=(orders(),))
        assert events_of(plain)[0]["new"] == {**ROW_JSON, "id": 2}
        feed(*stream_block(XID, orders(xid=XID), insert_in(XID, ids_row(3)),
                           orders(xid=XID, columns=ORDERS_COLUMNS[:3]), insert_in(XID, ("4", "b", "1.5"))))
        events = events_of(feed(stream_commit()))
        assert [e["new"] for e in events] == [{"id": 1, "status": "a"}, {**ROW_JSON, "id": 3},
                                              {"id": 4, "status": "b", "amount": "1.5"}]
        after = transaction(feed, w.Insert(None, 16400, ("5", "c", "2")), relations=())
        assert events_of(after)[0]["new"] == {"id": 5, "status": "c", "amount": "2"}

    @pytest.mark.parametrize("spill_bytes", [16 * 2**20, 1], ids=["memory", "spilled"])
    def test_streamed_changes_write_the_same_lines_as_plain_ones(self, spill_bytes):
        def changes(xid):  # every op, each tuple form, unchanged TOAST, an unreadable value
            old = ("7", None, "0.5", "[1, 2]", "infinity")
            return (w.Insert(xid, 16400, ROW), w.Insert(xid, 16400, ("x", "a", "1", "{bad", None)),
                    w.Update(xid, 16400, None, None, ROW), w.Update(xid, 16400, "K", ("7", None, None, None, None), ROW),
                    w.Update(xid, 16400, "O", old, ("7", w.UNCHANGED_TOAST, "1", w.UNCHANGED_TOAST, None)),
                    w.Delete(xid, 16400, "K", ("7", None, None, None, None)), w.Delete(xid, 16400, "O", old),
                    w.Truncate(xid, 0, (16400,)), w.Message(xid, True, 0x4000, "m", b"x"))

        plain = Feeder(w.ChangeAssembler())
        plain(w.Begin(0x5000, COMMIT_TIME, XID), orders("f"))
        lines = [e.line for e in events_of(plain(*changes(None), lsn=0x7000) + plain(w.Commit(0, 0x5000, 0x5030, COMMIT_TIME)))]
        streamed = Feeder(w.ChangeAssembler(spill_bytes=spill_bytes))
        streamed(w.StreamStart(XID, True), orders("f", xid=XID))
        streamed(*changes(801), lsn=0x7000)
        streamed(w.StreamStop())
        assert [e.line for e in events_of(streamed(stream_commit(commit_lsn=0x5000)))] == lines
        assert len(lines) == 9

    def test_close_removes_spill_files_of_open_streams(self, tmp_path):
        assembler = w.ChangeAssembler(spill_bytes=500, spill_dir=str(tmp_path))
        Feeder(assembler)(*stream_block(XID, orders(xid=XID), *[insert_in(XID)] * 50, first=True))
        assert len(spill_fds(str(tmp_path))) == 1
        assembler.close()
        assert spill_fds(str(tmp_path)) == []
        assert assembler.open_streams == 0

    def test_stream_commit_must_be_consumed_before_feeding_on(self, feed):
        feed(*stream_block(XID, orders(xid=XID), insert_in(XID), first=True))
        chunks = feed.assembler.feed(0x10, encode_pgoutput(stream_commit()))
        with pytest.raises(RuntimeError):
            feed(orders())
        assert len(events_of(chunks)) == 1
        feed(orders())

    @pytest.mark.parametrize("messages, reason", [
        ([w.StreamStart(XID, False)], "never started"),
        ([w.StreamStart(XID, True), w.StreamStop(), w.StreamStart(XID, True)], "starts again"),
        ([w.StreamStart(XID, True), w.StreamStart(XID, False)], "Stream Start message inside"),
        ([w.StreamStop()], "Stream Stop message outside a stream"),
        ([w.StreamStart(XID, True), w.Begin(1, 0, 1)], "Begin message inside"),
        ([w.Begin(1, 0, 1), w.StreamStart(XID, True)], "Stream Start message inside"),
        ([w.StreamStart(XID, True), stream_commit()], "Stream Commit message inside a stream"),
        ([w.StreamStart(XID, True), w.StreamAbort(XID, XID)], "Stream Abort message inside a stream"),
        ([w.StreamStart(XID, True), w.Insert(XID, 999, ("1",))], "unknown relation 999"),
        ([stream_commit()], "never streamed"),
    ])
    def test_protocol_errors(self, feed, messages, reason):
        with pytest.raises(ProtocolError, match=reason):
            feed(*messages)


# =====================================================================================================
# Replication loop and the acknowledgement rule
# =====================================================================================================


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


def watermark_model(marks_by_batch, done) -> int:
    """The acknowledgement rule, simply: the last end LSN in the longest prefix of done batches."""
    flushed = 0
    for ticket, marks in enumerate(marks_by_batch):
        if ticket not in done:
            break
        flushed = max([flushed, *(m for m in marks if m is not None)])
    return flushed


def run_completion_order(marks_by_batch, order):
    """Feeds an AckTracker the batches, completes them in `order`; checks every step against
    the model (flushed position, chunks still in flight)."""
    ack = w.AckTracker()
    tickets = []
    for marks in marks_by_batch:
        for _ in marks:
            ack.queued()
        tickets.append(ack.pending(list(marks)))
    assert tickets == list(range(len(marks_by_batch)))
    done = set()
    for ticket in order:
        ack.done(ticket)
        done.add(ticket)
        assert ack.flushed_lsn == watermark_model(marks_by_batch, done), (order, ticket)
        confirmed = 0
        while confirmed in done:
            confirmed += 1
        assert ack.in_flight == sum(len(m) for m in marks_by_batch[confirmed:])
    return ack


class TestLowWatermark:
    """Batches finish in any order; the flushed position is the end of the latest transaction
    such that it and everything before it is delivered."""

    BATCHES = [[None], [100], [], [200, None], [300, 400]]  # chunk marks whose last event each batch holds

    def test_every_completion_order_of_five_batches(self):
        orders = list(itertools.permutations(range(len(self.BATCHES))))
        assert len(orders) == 120
        for order in orders:
            ack = run_completion_order(self.BATCHES, order)
            assert ack.flushed_lsn == 400
            assert ack.in_flight == 0

    def test_random_completion_orders_of_many_batches(self):
        rng = random.Random(20261206)
        for _ in range(200):
            lsn, batches = 0, []
            for _ in range(rng.randint(1, 40)):
                marks = []
                for _ in range(rng.randint(0, 3)):
                    lsn += rng.randint(1, 50)
                    marks.append(lsn if rng.random() < 0.6 else None)
                batches.append(marks)
            order = list(range(len(batches)))
            rng.shuffle(order)
            ack = run_completion_order(batches, order)
            assert ack.in_flight == 0
            assert ack.flushed_lsn == watermark_model(batches, set(order))

    def test_a_batch_never_done_holds_everything_after_it(self):
        ack = w.AckTracker()
        first = ack.pending([10])
        ack.pending([20])  # never done: its delivery failed
        later = ack.pending([30])
        ack.done(later)
        ack.done(first)
        assert ack.flushed_lsn == 10  # the failed batch is never done: nothing past it is acknowledged
        ack.keepalive(99, assembler_idle=True)
        assert ack.flushed_lsn == 10  # its chunk is still in flight

    def test_a_lost_connection_forgets_the_batches_in_flight(self):
        ack = w.AckTracker()
        ack.queued()
        ack.pending([10])
        ack.discard_in_flight()
        ticket = ack.pending([20])
        ack.done(ticket)
        assert ack.flushed_lsn == 20


def row_event(row, table="t", op="update", key_name="id", old=None, schema="public"):
    key = None if row is None else {key_name: row}
    return {"op": op, "schema": schema, "table": table, "key": key, "old": old}


def claims(*events):
    return w.batch_claims(events)


class TestDeliveryScheduler:
    def test_claims_of_each_kind(self):
        assert w.event_claims(row_event(1)) == [(("table", "public", "t"), False),
                                                (("row", "public", "t", '{"id":1}'), True)]
        assert w.event_claims(row_event(None)) == [(("table", "public", "t"), True)]  # no key: the table
        assert w.event_claims({"op": "truncate", "schema": "s", "table": "u"}) == [(("table", "s", "u"), True)]
        assert w.event_claims({"op": "message", "prefix": "p"}) == [(("message", "p"), True)]
        moved = w.event_claims(row_event(2, old={"id": 1}))
        assert (("row", "public", "t", '{"id":1}'), True) in moved  # the old key too
        assert (("row", "public", "t", '{"id":2}'), True) in moved
        full = w.event_claims(row_event(2, old={"id": 2, "v": "x"}))  # REPLICA IDENTITY FULL, same key
        assert len(full) == 2

    def test_without_claims_every_batch_may_go_in_order(self):
        scheduler = w.DeliveryScheduler()
        for ticket in range(3):
            scheduler.add(ticket, {})
        assert scheduler.ready() == [0, 1, 2]

    def test_a_row_waits_for_its_earlier_batch_until_done(self):
        scheduler = w.DeliveryScheduler()
        scheduler.add(0, claims(row_event(1)))
        scheduler.add(1, claims(row_event(2)))
        scheduler.add(2, claims(row_event(1)))
        assert scheduler.ready() == [0, 1]
        scheduler.start(0)
        scheduler.start(1)
        assert scheduler.ready() == []  # row 1 is in flight (or failing): not sent meanwhile
        scheduler.done(1)
        assert scheduler.ready() == []
        scheduler.done(0)
        assert scheduler.ready() == [2]

    def test_a_waiting_batch_is_not_overtaken(self):
        scheduler = w.DeliveryScheduler()
        scheduler.add(0, claims(row_event(1)))
        scheduler.add(1, claims(row_event(1), row_event(2)))  # waits for 0
        scheduler.add(2, claims(row_event(2)))  # must wait for 1, although 0 does not touch row 2
        scheduler.start(0)
        assert scheduler.ready() == []
        scheduler.done(0)
        assert scheduler.ready() == [1]

    def test_truncates_and_keyless_rows_order_against_their_table(self):
        scheduler = w.DeliveryScheduler()
        scheduler.add(0, claims(row_event(1)))
        scheduler.add(1, claims(row_event(2)))
        scheduler.add(2, claims({"op": "truncate", "schema": "public", "table": "t"}))
        scheduler.add(3, claims(row_event(3)))
        scheduler.add(4, claims(row_event(4, table="other")))
        assert scheduler.ready() == [0, 1, 4]  # rows of t share the table; the truncate waits for both
        for ticket in (0, 1, 4):
            scheduler.start(ticket)
        scheduler.done(0)
        assert scheduler.ready() == []
        scheduler.done(1)
        assert scheduler.ready() == [2]
        scheduler.start(2)
        assert scheduler.ready() == []  # the row after the truncate waits for it
        scheduler.done(2)
        assert scheduler.ready() == [3]

    def test_messages_order_by_prefix(self):
        scheduler = w.DeliveryScheduler()
        scheduler.add(0, claims({"op": "message", "prefix": "a"}))
        scheduler.add(1, claims({"op": "message", "prefix": "b"}))
        scheduler.add(2, claims({"op": "message", "prefix": "a"}))
        assert scheduler.ready() == [0, 1]

    def test_ready_up_to_a_limit_and_rows_around_a_truncate(self):
        """The checks that skip walking a queue: rows of a table go freely once the table has no
        truncate (exclusive claim) left ahead of them, and wait while it has one."""
        truncate = {"op": "truncate", "schema": "public", "table": "t"}
        scheduler = w.DeliveryScheduler()
        scheduler.add(0, claims(truncate))
        for ticket in range(1, 5):
            scheduler.add(ticket, claims(row_event(ticket)))
        assert scheduler.ready() == [0]
        scheduler.start(0)
        assert scheduler.ready() == []
        scheduler.done(0)
        assert scheduler.ready() == [1, 2, 3, 4]
        assert scheduler.ready(limit=2) == [1, 2] and scheduler.ready(limit=0) == []
        scheduler.add(5, claims(truncate))
        scheduler.add(6, claims(row_event(9)))
        assert scheduler.ready() == [1, 2, 3, 4]  # the truncate waits for them, row 9 for the truncate
        for ticket in (1, 2, 3, 4):
            scheduler.start(ticket)
            scheduler.done(ticket)
        assert scheduler.ready() == [5]
        scheduler.start(5)
        scheduler.done(5)
        assert scheduler.ready() == [6]

    def test_random_schedules_keep_every_row_in_order(self):
        """Random batches over a few rows and tables, started and finished in random order as far
        as the scheduler allows: no batch starts while an earlier conflicting one is unfinished,
        and everything finishes."""
        rng = random.Random(7)
        for _ in range(100):
            batches = [claims(*self._random_events(rng)) for _ in range(rng.randint(1, 25))]
            scheduler, started, finished = w.DeliveryScheduler(), set(), set()
            for ticket, batch in enumerate(batches):
                scheduler.add(ticket, batch)
            while len(finished) < len(batches):
                ready, running = scheduler.ready(), sorted(started - finished)
                assert ready or running, "deadlock"
                if ready and (not running or rng.random() < 0.5):
                    ticket = rng.choice(ready)
                    for earlier in range(ticket):
                        if earlier not in finished and self._conflict(batches[earlier], batches[ticket]):
                            pytest.fail(f"batch {ticket} overtook {earlier}")
                    scheduler.start(ticket)
                    started.add(ticket)
                else:
                    ticket = rng.choice(running)
                    scheduler.done(ticket)
                    finished.add(ticket)

    @staticmethod
    def _random_events(rng):
        events = []
        for _ in range(rng.randint(1, 3)):
            kind = rng.random()
            table = rng.choice(["a", "b"])
            if kind < 0.1:
                events.append({"op": "truncate", "schema": "public", "table": table})
            elif kind < 0.2:
                events.append({"op": "message", "prefix": rng.choice(["p", "q"])})
            else:
                events.append(row_event(rng.randint(1, 4), table=table))
        return events

    @staticmethod
    def _conflict(a, b):
        return any(resource in b and (exclusive or b[resource]) for resource, exclusive in a.items())


def chunk(events, end_lsn):
    """What the assembler hands the delivery loop: events, and the end LSN they complete (or None)."""
    return types.SimpleNamespace(events=events, end_lsn=end_lsn)


async def run_delivery_loop(loop, receive, ack, feed=None):
    """Runs `loop` until every queued chunk is confirmed; `feed` (a coroutine function) sends more
    chunks meanwhile."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.run, receive)
        if feed is not None:
            await feed()
        while ack.in_flight:
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()


class TestDeliveryLoop:
    async def test_batches_span_chunks_and_ack_follows(self):
        ack = w.AckTracker()
        sink = MemorySink(batch_size=3)
        loop = w.DeliveryLoop(sink, ack, batch_size=3, linger_s=0.01)
        send, receive = trio.open_memory_channel(10)
        for c in (chunk([1, 2], 10), chunk([3, 4], None), chunk([5], 20), chunk([], 30)):
            ack.queued()
            send.send_nowait(c)
        await run_delivery_loop(loop, receive, ack)
        assert sink.batches == [[1, 2, 3], [4, 5]]
        assert ack.flushed_lsn == 30


def keyed(n, row, end_lsn=None, table="t"):
    event = {**row_event(row, table=table), "id": f"e{n}"}
    return chunk([event], end_lsn)


async def feed_chunks(send, ack, chunks):
    for c in chunks:
        ack.queued()
        await send.send(c)


class TestConcurrentDeliveryLoop:
    async def test_requests_overlap_up_to_the_concurrency(self, autojump_clock):
        sink, ack = GatedSink(), w.AckTracker()
        loop = w.DeliveryLoop(sink, ack, batch_size=1, linger_s=0.0, concurrency=3)
        send, receive = trio.open_memory_channel(10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, receive)
            await feed_chunks(send, ack, [keyed(n, row=n, end_lsn=10 * (n + 1)) for n in range(5)])
            await wait_until(lambda: len(sink.started) == 3, timeout=10)
            await trio.sleep(1)
            assert sorted(sink.started) == ["e0", "e1", "e2"]  # three rows at once, no more
            sink.gate("e2").set()  # the third finishes first: nothing acknowledged yet
            await wait_until(lambda: len(sink.started) == 4, timeout=10)
            assert ack.flushed_lsn == 0
            sink.gate("e0").set()
            await wait_until(lambda: ack.flushed_lsn == 10, timeout=10)
            for n in range(5):
                sink.gate(f"e{n}").set()
            await wait_until(lambda: ack.flushed_lsn == 50, timeout=10)
            nursery.cancel_scope.cancel()
        assert sink.most_in_flight == 3

    @pytest.mark.parametrize("concurrency", [1, 4])
    async def test_one_row_goes_one_at_a_time_in_order(self, autojump_clock, concurrency):
        sink, ack = GatedSink(), w.AckTracker()
        loop = w.DeliveryLoop(sink, ack, batch_size=1, linger_s=0.0, concurrency=concurrency)
        send, receive = trio.open_memory_channel(10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, receive)
            await feed_chunks(send, ack, [keyed(n, row=7, end_lsn=n + 1) for n in range(4)])
            for n in range(4):
                await wait_until(lambda: len(sink.started) == n + 1, timeout=10)
                await trio.sleep(1)
                assert len(sink.started) == n + 1  # the next one waits for this one
                sink.gate(f"e{n}").set()
            await wait_until(lambda: ack.flushed_lsn == 4, timeout=10)
            nursery.cancel_scope.cancel()
        assert sink.finished == ["e0", "e1", "e2", "e3"]
        assert sink.most_in_flight == 1

    async def test_a_failed_batch_lets_the_others_finish_then_fails(self, autojump_clock):
        """ON_FAILURE=exit: nothing new is sent, the requests in flight finish, DeliveryFailed
        follows, and the acknowledged position stays before the failed batch."""
        sink, ack = GatedSink(), w.AckTracker()
        loop = w.DeliveryLoop(sink, ack, batch_size=1, linger_s=0.0, concurrency=2)
        send, receive = trio.open_memory_channel(10)
        sink.failures["e1"] = w.DeliveryFailed("e1 failed")
        with pytest.raises(BaseExceptionGroup) as raised:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(loop.run, receive)
                await feed_chunks(send, ack, [keyed(n, row=n, end_lsn=n + 1) for n in range(4)])
                await wait_until(lambda: len(sink.started) == 2, timeout=10)
                sink.gate("e0").set()
                await wait_until(lambda: len(sink.started) == 3, timeout=10)  # e2 takes e0's place
                sink.gate("e1").set()  # fails
                await trio.sleep(1)
                assert sorted(sink.started) == ["e0", "e1", "e2"]  # e3 is not sent
                sink.gate("e2").set()  # the failure waits for it
                await trio.sleep_forever()
        failure = w.first_error(raised.value)
        assert isinstance(failure, w.DeliveryFailed)
        assert str(failure) == "e1 failed"
        assert sink.finished == ["e0", "e2"]
        assert ack.flushed_lsn == 1

    async def test_shutdown_waits_for_every_request_in_flight(self, autojump_clock):
        sink, ack = GatedSink(), w.AckTracker()
        loop = w.DeliveryLoop(sink, ack, batch_size=1, linger_s=0.0, concurrency=2)
        send, receive = trio.open_memory_channel(10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, receive)
            await feed_chunks(send, ack, [keyed(n, row=n, end_lsn=n + 1) for n in range(2)])
            await wait_until(lambda: len(sink.started) == 2, timeout=10)

            async def release():
                await trio.sleep(2)
                sink.gate("e1").set()
                await trio.sleep(2)
                sink.gate("e0").set()
            nursery.start_soon(release)
            started = trio.current_time()
            await loop.finish(timeout_s=10)
            assert trio.current_time() - started == pytest.approx(4, abs=0.1)
            nursery.cancel_scope.cancel()
        assert ack.flushed_lsn == 2


class TestDeliveryLinger:
    async def test_a_trickle_does_not_hold_a_partial_batch_past_the_linger(self, autojump_clock):
        """One single-event transaction every 40 ms, linger 50 ms, batches of 100: each event goes
        out within 50 ms of its arrival, not when 100 have gathered (seconds later)."""
        arrived, delivered = {}, []

        class Sink:
            name, batch_size = "test", 100

            async def deliver(self, events):
                delivered.append((trio.current_time(), list(events)))

        ack = w.AckTracker()
        loop = w.DeliveryLoop(Sink(), ack, batch_size=100, linger_s=0.05)
        send, receive = trio.open_memory_channel(10)

        async def trickle():
            for n in range(50):
                arrived[n] = trio.current_time()
                ack.queued()
                await send.send(chunk([n], 100 + n))
                await trio.sleep(0.04)

        await run_delivery_loop(loop, receive, ack, trickle)
        assert [e for _, batch in delivered for e in batch] == list(range(50))
        waits = [at - arrived[e] for at, batch in delivered for e in batch]
        assert max(waits) <= 0.05 + 1e-9
        assert ack.flushed_lsn == 149

    async def test_queued_chunks_are_taken_even_past_the_deadline(self, autojump_clock):
        """Chunks already queued cost no wait: they fill the batch (no tiny batches under load)."""
        delivered = []

        class Sink:
            name, batch_size = "test", 4

            async def deliver(self, events):
                delivered.append(list(events))
                await trio.sleep(1)  # a slow endpoint: far past any linger

        ack = w.AckTracker()
        loop = w.DeliveryLoop(Sink(), ack, batch_size=4, linger_s=0.05)
        send, receive = trio.open_memory_channel(100)
        for n in range(10):
            ack.queued()
            send.send_nowait(chunk([3 * n, 3 * n + 1, 3 * n + 2], 100 + n))
        await run_delivery_loop(loop, receive, ack)
        assert [len(batch) for batch in delivered] == [4] * 7 + [2]


class TestReaderYields:
    """While a delivery waits for its answer, the reader lets it run every YIELD_EVERY_MESSAGES
    messages, not only when it hands over a chunk (that can be 2 ms of decoding away)."""

    @staticmethod
    def _stream(rows: int, in_flight: bool):
        def frame(lsn, message):
            body = struct.pack("!BQQQ", ord("w"), lsn, lsn, 0) + encode_pgoutput(message)
            return b"d" + struct.pack("!i", len(body) + 4) + body

        relation = w.Relation(None, 16400, "public", "t", "d", (w.Column(1, "id", 20, -1),))
        data = [frame(1, relation), frame(2, w.Begin(10_000, 0, 7))]
        data += [frame(100 + i, w.Insert(None, 16400, (str(i),))) for i in range(rows)]
        data.append(frame(10_000, w.Commit(0, 10_000, 10_001, 0)))
        buffer = w.MessageBuffer()
        buffer.feed(b"".join(data))
        assembler = w.ChangeAssembler(chunk_events=10 * rows)  # one chunk, at the commit
        consumed = [0]
        feed = assembler.feed

        def counting_feed(wal_start, payload):
            consumed[0] += 1
            return feed(wal_start, payload)

        assembler.feed = counting_feed
        delivery = types.SimpleNamespace(in_flight=trio.Event() if in_flight else None)
        send, receive = trio.open_memory_channel(10)
        stream = w.ReplicationStream(types.SimpleNamespace(buffer=buffer), assembler, w.AckTracker(), send, delivery)
        return stream, consumed, receive

    async def _progress_seen_by_another_task(self, rows, in_flight):
        stream, consumed, receive = self._stream(rows, in_flight)
        seen = []

        async def observe(task_status=trio.TASK_STATUS_IGNORED):
            seen.append(consumed[0])
            task_status.started()
            while True:
                await trio.lowlevel.checkpoint()
                seen.append(consumed[0])

        async with trio.open_nursery() as nursery:
            await nursery.start(observe)
            await stream.handle_buffered()
            nursery.cancel_scope.cancel()
        assert len(receive.receive_nowait().events) == rows
        return seen + [consumed[0]]

    async def test_yields_while_a_delivery_is_in_flight(self, monkeypatch):
        monkeypatch.setattr(w, "YIELD_EVERY_MESSAGES", 10)
        seen = await self._progress_seen_by_another_task(200, in_flight=True)
        gaps = [b - a for a, b in zip(seen, seen[1:])]
        assert seen[0] == 0
        assert seen[-1] == 203
        # Trio runs the tasks of each scheduling batch in random order, so the other task may see two
        # of the reader's steps at once; +1 for the Relation or Begin before the count starts.
        assert max(gaps) <= 21

    async def test_no_extra_schedule_points_otherwise(self, monkeypatch):
        monkeypatch.setattr(w, "YIELD_EVERY_MESSAGES", 10)
        seen = await self._progress_seen_by_another_task(200, in_flight=False)
        assert sorted(set(seen)) == [0, 203]  # the other task ran only at the chunk hand-over


class TestStreamingSafety:
    def test_resume_from_is_a_floor(self):
        ack = w.AckTracker()
        ack.resume_from(0x5000000)
        ack.keepalive(0x3000000, True)  # a catch-up keepalive below the slot's confirmed position
        assert ack.flushed_lsn == 0x5000000
        ack.keepalive(0x6000000, True)
        assert ack.flushed_lsn == 0x6000000
        ack.resume_from(0x5000000)  # a reconnect: what was confirmed since stays
        assert ack.flushed_lsn == 0x6000000

    @pytest.mark.parametrize("sqlstate, retried", [
        ("57014", True), ("53200", True), ("58030", True), ("XX000", True), ("57P01", True),
        ("42704", False), ("42601", False)])
    def test_server_errors_while_streaming(self, sqlstate, retried):
        error = w.ServerError({"S": "ERROR", "C": sqlstate, "M": "boom"})
        streaming = w.classify_server_error(error, "replication stream", streaming=True)
        assert isinstance(streaming, w.ConnectionLost) is retried
        if sqlstate in ("57014", "53200", "58030", "XX000"):  # retried only once streaming
            assert w.classify_server_error(error, "preparing replication") is error

    @pytest.mark.parametrize("setting, expected", [
        ("60000", 60.0), ("180000", 180.0), ("0", 60.0), ("5000", 60.0), (None, 60.0)])
    async def test_read_idle_timeout_follows_wal_sender_timeout(self, setting, expected):
        class Conn:
            async def simple_query(self, sql):
                assert "wal_sender_timeout" in sql
                return [] if setting is None else [(setting,)]

        assert await w.read_idle_timeout(Conn()) == expected

    async def test_tcp_keepalive_on_the_postgresql_socket(self):
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        conninfo = types.SimpleNamespace(host="127.0.0.1", port=listener.getsockname()[1])
        stream = await w._open_socket(conninfo)
        with stream.socket as sock, listener:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 6


async def run_replication_with(monkeypatch, session, until):
    """run_replication with `session` in place of a real one, until `until()`; returns the alerter."""
    monkeypatch.setattr(w, "_run_session_or_stop", session)
    alerter, stop = RecordingAlerter(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: w.run_replication(None, None, stop, trio.TASK_STATUS_IGNORED, alerter))
        while not until(alerter):
            await trio.sleep(1)
        stop.set()
    return alerter


class TestReconnectBackoff:
    async def test_a_recurring_error_backs_off_alerts_once_and_recovers(self, autojump_clock, monkeypatch):
        """An error that comes back at the same place every time (streaming starts, then fails):
        the delay grows to the maximum instead of staying at 1 s, one alert goes out after
        RECONNECT_ALERT_AFTER_S, and progress afterwards is one "recovered"."""
        starts = []

        async def session(config, sink, ack, stop, on_streaming, backfill=None):
            starts.append(trio.current_time())
            on_streaming()
            if len(starts) == 20:  # the server works again: the slot advances
                ack.queued()
                ack.delivered(ack.flushed_lsn + 100)
                await stop.wait()
                return
            raise w.ConnectionLost("decoding failed at the same place")

        alerter = await run_replication_with(monkeypatch, session, lambda a: len(starts) >= 20 and a.recoveries)
        gaps = [round(b - a) for a, b in zip(starts, starts[1:])]
        assert gaps[:6] == [1, 2, 4, 8, 16, 30]
        assert set(gaps[6:]) == {30}
        assert [key for key, _, _ in alerter.alerts] == ["postgresql"]
        assert "decoding failed at the same place" in alerter.alerts[0][2]
        assert alerter.alert_times[0] - starts[0] >= w.RECONNECT_ALERT_AFTER_S
        assert [key for key, _, _ in alerter.recoveries] == ["postgresql"]

    @pytest.mark.parametrize("streams", [False, True])
    async def test_slow_failures_still_alert(self, autojump_clock, monkeypatch, streams):
        """Each attempt fails only after 61 s (a slow connect or setup; or 61 s of streaming that
        never advances the slot): still one alert after RECONNECT_ALERT_AFTER_S."""
        starts = []

        async def session(config, sink, ack, stop, on_streaming, backfill=None):
            starts.append(trio.current_time())
            if streams:
                on_streaming()
            await trio.sleep(61)
            raise w.ConnectionLost("disk full while spilling (53100)")

        alerter = await run_replication_with(monkeypatch, session, lambda a: len(starts) >= 12)
        assert len(alerter.alerts) == 1
        assert alerter.alert_times[0] - starts[0] < 2 * w.RECONNECT_ALERT_AFTER_S
        gaps = [round(b - a) for a, b in zip(starts, starts[1:])]
        # Streaming a minute resets the backoff (it may have been a healthy session); a slow setup does not.
        assert gaps[:4] == ([62] * 4 if streams else [62, 63, 65, 69])

    async def test_progress_resets_the_backoff(self, autojump_clock, monkeypatch):
        starts = []

        async def session(config, sink, ack, stop, on_streaming, backfill=None):
            starts.append(trio.current_time())
            on_streaming()
            if len(starts) == 5:
                await stop.wait()
                return
            ack.queued()
            ack.delivered(ack.flushed_lsn + 100)  # each session delivers something, then drops
            raise w.ConnectionLost("network cut")

        alerter = await run_replication_with(monkeypatch, session, lambda a: len(starts) >= 5)
        assert [round(b - a) for a, b in zip(starts, starts[1:])] == [1, 1, 1, 1]
        assert alerter.alerts == []


# =====================================================================================================
# Delivery: retries, ON_FAILURE, dead letters
# =====================================================================================================


def retryable(message="boom", **kwargs):
    return w.DeliveryError(message, retryable=True, **kwargs)


def fatal(message="bad request", **kwargs):
    return w.DeliveryError(message, retryable=False, **kwargs)


# -- Backfill (section 10): the pure parts, the stream side, and POST /backfill

def backfill_table(identity="d", order=("id",), order_types=("bigint",), row_filter=None) -> w.BackfillTable:
    writer = w.RelationWriter(orders(identity), {})
    converters = tuple(w.json_text_for({"id": 20, "status": 25}[name]) for name in order)
    return w.BackfillTable("public", "orders", writer, order, order_types, converters, row_filter, 1000)


def copy_line(*values: str | None) -> bytes:
    """A row of COPY ... TO STDOUT in text format, as PostgreSQL escapes it."""
    def escaped(value):
        if value is None:
            return "\\N"
        return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
                .replace("\b", "\\b").replace("\f", "\\f").replace("\v", "\\v"))
    return ("\t".join(escaped(value) for value in values) + "\n").encode()


def backfill_rows(table: w.BackfillTable, *ids: int) -> list[tuple]:
    """Selected rows as the backfill task keeps them: (COPY line, key JSON, read line)."""
    return [table.read_row(copy_line(str(i), f"s{i}", "1.50", '{"a": 1}', "2026-11-27 16:25:11+00")) for i in ids]


def change(op: str, row_id: int | None, table: str = "orders", old_id: int | None = None, **extra) -> w.Event:
    new = None if op == "delete" or row_id is None else {"id": row_id, "status": "x"}
    key = {"id": row_id if op != "delete" else old_id} if op != "truncate" else None
    old = {"id": old_id} if old_id is not None else None
    return w.Event.from_dict({"id": "0/1:0", "op": op, "schema": "public", "table": table, "key": key,
                              "new": new, "old": old, "unchanged_toast": [], **extra})


def message_event(prefix: str, content: str, transactional: bool, lsn: str = "0/2000") -> w.Event:
    return w.Event.from_dict({
        "id": f"{lsn}:m" if not transactional else "0/3000:1", "op": "message", "schema": None,
        "table": None, "key": None, "new": None, "old": None, "unchanged_toast": [], "prefix": prefix,
        "content": content, "transactional": transactional, "xid": None, "lsn": lsn, "commit_lsn": None,
        "commit_time": None, "seq": None})


def watermark_chunk(window: w.ChunkWindow, mark: str, lsn: str) -> w.Chunk:
    return w.Chunk([message_event(w.WATERMARK_PREFIX, window.watermark(mark), False, lsn)], None, {"message": 1})


class TestBackfillPatterns:
    @pytest.mark.parametrize("text, expected", [
        ("public.orders", ("public.orders",)),
        (" public.orders , sales.* ", ("public.orders", "sales.*")),
        ("*", ("*",)),
        ('"Sales"."Big Orders",Public.T', ("Sales.Big Orders", "public.t")),
        ('"a""b".c', ('a"b.c',)),
        ("public.orders,public.orders", ("public.orders",)),
    ])
    def test_patterns(self, text, expected):
        assert w.parse_backfill_tables(text) == expected

    @pytest.mark.parametrize("text", ["orders", "public.", ".orders", "a.b.c", "public.orders,", ",", "",
                                      "public.or ders", '"open.t'])
    def test_bad_patterns_name_the_variable(self, text):
        with pytest.raises(w.ConfigError) as caught:
            w.parse_backfill_tables(text)
        assert str(caught.value).startswith("BACKFILL_TABLES: expected schema.table, schema.* or *")
        assert caught.value.exit_code == 2

    def test_setting(self):
        assert load({"BACKFILL_TABLES": "public.a,s.*"}).backfill_tables == ("public.a", "s.*")
        assert load().backfill_tables == ()
        assert "BACKFILL_TABLES" in config_error({"BACKFILL_TABLES": "nodot"})
        assert "BACKFILL_CHUNK_ROWS" in config_error({"BACKFILL_CHUNK_ROWS": "0"})
        assert (load().backfill_chunk_rows, load().state_file) == (10_000, "wal2http-state.json")

    def test_matching_published_tables(self):
        published = [("public", "a"), ("public", "b"), ("sales", "c")]
        assert w.match_tables(("public.b",), published) == ([("public", "b")], [])
        assert w.match_tables(("sales.*", "public.a"), published) == ([("public", "a"), ("sales", "c")], [])
        assert w.match_tables(("*",), published) == (published, [])
        assert w.match_tables(("public.zzz", "other.*"), published) == ([], ["public.zzz"])


class TestBackfillState:
    def test_round_trip(self, tmp_path):
        requests = [{"tables": ["public.*"], "source": "signal at 0/1", "again": True}]
        queue = [{"schema": "public", "table": "t", "after": ["42", None], "rows": 10, "source": "BACKFILL_TABLES"}]
        done = {"public.u": "2026-12-06T10:00:00+00:00"}
        path = str(tmp_path / "state.json")
        w.write_file_atomically(path, w.encode_state(requests, queue, done))
        assert w.decode_state(open(path, "rb").read(), path) == (requests, queue, done)
        assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left

    def test_replaces_the_file_whole(self, tmp_path):
        path = str(tmp_path / "state.json")
        w.write_file_atomically(path, b"first, longer content")
        w.write_file_atomically(path, b"second")
        assert open(path, "rb").read() == b"second"

    def test_a_file_that_cannot_be_written(self, tmp_path):
        (tmp_path / "afile").write_text("")
        with pytest.raises(OSError):
            w.write_file_atomically(str(tmp_path / "afile" / "state.json"), b"{}")

    @pytest.mark.parametrize("data", [
        b"", b"not json", b"[]", b'{"version": 2, "requests": [], "queue": [], "done": {}}',
        b'{"version": 1, "requests": [], "queue": []}',
        b'{"version": 1, "requests": [{"tables": "public.t"}], "queue": [], "done": {}}',
        b'{"version": 1, "requests": [], "queue": [{"schema": "public"}], "done": {}}',
        b'{"version": 1, "requests": [], "queue": [{"schema": "p", "table": "t", "after": [1], "rows": 0, '
        b'"source": "x"}], "done": {}}',
        b'{"version": 1, "requests": [], "queue": [], "done": {"public.t": 1}}',
    ])
    def test_a_corrupt_file_is_exit_2_naming_it(self, data):
        with pytest.raises(w.ConfigError) as caught:
            w.decode_state(data, "/srv/w/state.json")
        assert str(caught.value).startswith("STATE_FILE: /srv/w/state.json is not a wal2http state file")
        assert caught.value.exit_code == 2

    def test_loaded_at_start(self, tmp_path):
        path = tmp_path / "state.json"
        path.write_text("{")
        with pytest.raises(w.ConfigError, match="STATE_FILE: .*state.json is not a wal2http state file"):
            w.open_backfill(load({"STATE_FILE": str(path)}), None)
        path.unlink()
        backfill = w.open_backfill(load({"STATE_FILE": str(path), "BACKFILL_TABLES": "public.t"}), None)
        assert backfill.requests == [{"tables": ["public.t"], "source": "BACKFILL_TABLES", "again": False}]
        assert json.loads(path.read_text())["requests"] == backfill.requests  # saved at once
        assert w.open_backfill(load({"STATE_FILE": str(tmp_path / "none.json")}), None).status() is None


    def test_check_reads_it(self, tmp_path):
        path = tmp_path / "state.json"
        config = load({"STATE_FILE": str(path), "BACKFILL_TABLES": "public.t"})
        assert w.check_state_file(config) == (f"state file {path}: 0 table(s) queued, 0 done", None)
        w.write_file_atomically(str(path), w.encode_state([], [{"schema": "public", "table": "t", "after": None,
                                                                "rows": 0, "source": "x"}], {"public.u": "then"}))
        assert w.check_state_file(config) == (f"state file {path}: 1 table(s) queued, 1 done", None)
        path.write_text("garbage")
        name, failure = w.check_state_file(config)
        assert failure.startswith(f"STATE_FILE: {path} is not a wal2http state file")


class TestBackfillChunk:
    def test_chunk_query(self):
        table = backfill_table()
        columns = '"id", "status", "amount", "meta", "created"'
        assert w.build_chunk_query(table, None, 100) == (
            f'COPY (SELECT {columns} FROM "public"."orders" ORDER BY "id" LIMIT 100) TO STDOUT')
        assert w.build_chunk_query(table, ["4'2"], 5) == (
            f'COPY (SELECT {columns} FROM "public"."orders" WHERE "id" > \'4\'\'2\'::bigint ORDER BY "id" LIMIT 5) '
            'TO STDOUT')
        composite = backfill_table(order=("id", "status"), order_types=("bigint", "text"), row_filter="amount > 1")
        assert w.build_chunk_query(composite, ["1", "b"], 7) == (
            'COPY (SELECT "id", "status", "amount", "meta", "created" FROM "public"."orders" '
            'WHERE (amount > 1) AND ("id", "status") > (\'1\'::bigint, \'b\'::text) ORDER BY "id", "status" LIMIT 7) '
            'TO STDOUT')

    def test_a_read_row_is_written_like_an_inserted_one(self, feed):
        (insert,) = events_of(transaction(feed, w.Insert(None, 16400, ROW)))
        table = backfill_table()
        body, key, line = table.read_row(copy_line(*ROW))
        (read,) = self.read_events(table, body, key, line)
        assert (read["key"], read["new"]) == (insert["key"], insert["new"])
        assert insert.line.count(line.split('"old":')[0]) == 1  # the same text, from "schema" to "new"'s end
        assert key == '{"id":42}'
        # more columns than the relation's (the order columns the SELECT adds): read up to its own
        assert table.read_row(copy_line(*ROW, "extra"))[1:] == (key, line)
        odd = table.read_row(copy_line(None, "x", "not a number", "{", None))
        assert odd[1] == "{\"id\":null}"
        assert self.read_events(table, *odd)[0]["new"] == {
            "id": None, "status": "x", "amount": "not a number", "meta": "{", "created": None}

    def test_names_with_percent_signs(self):
        columns = (w.Column(1, "%s", 23, -1), w.Column(0, "100%", 25, -1))
        writer = w.RelationWriter(w.Relation(None, 1, "a%d", "t%%", "d", columns), {})
        table = w.BackfillTable("a%d", "t%%", writer, ("%s",), ("integer",), (w.json_text_for(23),), None, None)
        (read,) = self.read_events(table, *table.read_row(copy_line("7", "x%s")))
        assert (read["schema"], read["table"], read["key"], read["new"]) == (
            "a%d", "t%%", {"%s": 7}, {"%s": 7, "100%": "x%s"})

    @staticmethod
    def read_events(table, *row):
        window = w.ChunkWindow("r", 1, table)
        window.rows = [row]
        return window.read_chunk(0x10).events

    def test_a_malformed_copy_line(self):
        table = backfill_table()
        row = copy_line(*ROW)
        for cut in range(len(row)):
            with pytest.raises(w.ProtocolError, match="malformed CopyData message"):
                table.read_row(row[:cut])
        with pytest.raises(w.ProtocolError, match="malformed CopyData message: 4 columns, 5 expected"):
            table.read_row(copy_line(*ROW[:4]))  # a column short
        with pytest.raises(w.ProtocolError, match="malformed CopyData message: not UTF-8"):
            table.read_row(copy_line("42", "x", None, None, None).replace(b"x", b"\xff"))

    def test_copy_text_values(self):
        awkward = "tab\there\nnew line\\back\rcr\bbs\fff\vvt \\N é"
        assert w.decode_copy_text(copy_line("1", None, awkward, "\\N", "")) == ["1", None, awkward, "\\N", ""]
        assert w.decode_copy_text(b"a\\qb\n") == ["aqb"]  # any other escaped character stands for itself
        table = backfill_table()
        (read,) = self.read_events(table, *table.read_row(copy_line("5", awkward, None, '{"k": "\\\\"}', None)))
        assert read["new"] == {"id": 5, "status": awkward, "amount": None, "meta": {"k": "\\"}, "created": None}

    def test_rows_many_at_a_call_split_at_every_offset(self):
        stream = b"".join(b"d" + struct.pack("!I", 4 + len(line)) + line
                          for line in (copy_line("1", None), copy_line("2", "b"), copy_line("3", ""))) + b"c\0\0\0\x04"
        for cut in range(len(stream) + 1):
            buffer, rows = w.MessageBuffer(), []
            buffer.feed(stream[:cut])
            rows += buffer.next_bodies(ord("d"), 2)
            rows += buffer.next_bodies(ord("d"), 2)
            buffer.feed(stream[cut:])
            while bodies := buffer.next_bodies(ord("d"), 2):
                assert len(bodies) <= 2
                rows += bodies
            assert [w.decode_copy_text(row) for row in rows] == [["1", None], ["2", "b"], ["3", ""]]
            assert buffer.next_message() == (ord("c"), b"")

    def test_read_events_exactly(self):
        table = backfill_table()
        window = w.ChunkWindow("run1", 3, table)
        window.rows = backfill_rows(table, 1, 2)
        chunk = window.read_chunk(0x16B3748)
        assert (chunk.end_lsn, chunk.transaction, chunk.op_counts) == (0x16B3748, False, {"read": 2})
        first = chunk.events[0]
        assert list(first) == EVENT_KEYS
        assert first == {
            "id": "0/16B3748:r0", "op": "read", "schema": "public", "table": "orders", "key": {"id": 1},
            "new": {"id": 1, "status": "s1", "amount": "1.50", "meta": {"a": 1}, "created": "2026-11-27T16:25:11Z"},
            "old": None, "unchanged_toast": [], "xid": None, "lsn": "0/16B3748", "commit_lsn": None,
            "commit_time": None, "seq": None}
        assert chunk.events[1]["id"] == "0/16B3748:r1"

    def test_rows_changed_between_the_watermarks_are_dropped(self):
        table = backfill_table()
        window = w.ChunkWindow("run1", 1, table)
        window.rows = backfill_rows(table, 1, 2, 3, 4, 5, 6)
        window.observe([change("insert", 2), change("update", 4, old_id=9), change("delete", None, old_id=5),
                        change("insert", 3, table="other"), change("insert", 77)])
        events = window.read_chunk(0x100).events
        assert [e["id"] for e in events] == ["0/100:r0", "0/100:r2", "0/100:r5"]  # gaps where rows went
        assert [e["key"] for e in events] == [{"id": 1}, {"id": 3}, {"id": 6}]

    def test_rows_are_told_by_their_key_text(self):
        table = backfill_table()
        assert table.keyed_by_order
        window = w.ChunkWindow("run1", 1, table)
        window.rows = backfill_rows(table, 1, 2, 3, 4, 5)
        tricky = w.Event.from_dict({"id": "0/1:0", "op": "update", "schema": "public", "table": "orders",
                                    "key": {"id": 9}, "new": {"id": 9, "status": ',"new":{,"old":null,"schema":'},
                                    "old": None, "unchanged_toast": []})
        moved = change("update", 2, old_id=3)  # the key changed from 3 to 2: both rows go
        toasted = w.Event.from_dict({"id": "0/1:1", "op": "update", "schema": "public", "table": "orders",
                                     "key": {"id": 5}, "new": {"id": 5}, "old": None, "unchanged_toast": ["meta"]})
        elsewhere = w.Event.from_dict({"id": "0/1:2", "op": "insert", "schema": "public", "table": "other",
                                       "key": {"id": 1}, "new": {"j": {"schema": "public", "table": "orders"}}})
        window.observe([tricky, moved, toasted, elsewhere])
        assert window.changed == {'{"id":9}', '{"id":2}', '{"id":3}', '{"id":5}'}
        assert [e["key"] for e in window.read_chunk(0x100).events] == [{"id": 1}, {"id": 4}]

    def test_a_key_that_lacks_a_column_reads_the_chunk_again(self):
        table = backfill_table()
        window = w.ChunkWindow("run1", 1, table)
        window.rows = backfill_rows(table, 1)
        window.observe([w.Event.from_dict({"id": "0/1:0", "op": "update", "schema": "public", "table": "orders",
                                           "key": {}, "new": {"status": "x"}, "old": None,
                                           "unchanged_toast": ["id"]})])
        assert window.read_chunk(0x100) is None

    def test_a_truncate_drops_the_chunk(self):
        table = backfill_table()
        window = w.ChunkWindow("run1", 1, table)
        window.rows = backfill_rows(table, 1, 2)
        window.observe([change("truncate", None)])
        chunk = window.read_chunk(0x100)
        assert (chunk.events, chunk.end_lsn, chunk.op_counts) == ([], 0x100, None)

    def test_a_change_that_does_not_name_its_row_reads_the_chunk_again(self):
        table = backfill_table(order=("id", "status"), order_types=("bigint", "text"))
        window = w.ChunkWindow("run1", 1, table)
        window.rows = [table.read_row(copy_line("1", "s1", None, None, None))]
        window.observe([w.Event.from_dict({"id": "0/1:0", "op": "delete", "schema": "public", "table": "orders",
                                           "key": {"id": 1}, "new": None, "old": {"id": 1}})])
        assert window.unknown_row
        assert window.read_chunk(0x100) is None

    def test_composite_keys_compare_by_value(self):
        table = backfill_table(order=("id", "status"), order_types=("bigint", "text"))
        window = w.ChunkWindow("run1", 1, table)
        window.rows = [table.read_row(copy_line(str(i), f"s{i}", None, None, None)) for i in (1, 2)]
        window.observe([w.Event.from_dict({"id": "0/1:0", "op": "update", "schema": "public", "table": "orders",
                                           "key": {"id": 2}, "new": {"id": 2, "status": "s2"}, "old": None})])
        assert [e["key"] for e in window.read_chunk(0x100).events] == [{"id": 1}]


class TestBackfillStream:
    @pytest.fixture
    def backfill(self, tmp_path):
        return w.Backfill(load({"STATE_FILE": str(tmp_path / "state.json")}))

    def test_chunks_between_the_watermarks(self, backfill):
        table = backfill_table()
        window = backfill.window = w.ChunkWindow("run1", 7, table)
        window.rows = backfill_rows(table, 1, 2, 3)
        insert = w.Chunk([change("insert", 1)], 0x50)
        assert backfill.filter(insert) == (insert,)  # before the low watermark: not looked at
        assert backfill.filter(watermark_chunk(window, "low", "0/60")) == ()
        assert window.opened
        update = w.Chunk([change("update", 2)], 0x70, {"update": 1})
        assert backfill.filter(update) == (update,)
        stale = w.ChunkWindow("run0", 7, table)  # an earlier run's chunk: not in memory any more
        assert backfill.filter(watermark_chunk(stale, "high", "0/75")) == ()
        (read,) = backfill.filter(watermark_chunk(window, "high", "0/80"))
        assert [e["id"] for e in read.events] == ["0/80:r0", "0/80:r2"]
        assert (read.end_lsn, read.transaction) == (0x80, False)
        assert window.closed.is_set() and backfill.window is None
        later = w.Chunk([change("delete", None, old_id=3)], 0x90, {"delete": 1})
        assert backfill.filter(later) == (later,)

    def test_a_signal_is_a_request_and_not_an_event(self, backfill, caplog):
        signal = message_event(w.BACKFILL_SIGNAL_PREFIX, "public.orders, sales.*", True)
        other = message_event("audit", "kept", True)
        insert = change("insert", 1)
        chunk = w.Chunk([insert, signal, other], 0x99, {"message": 2}, 1234)
        (out,) = backfill.filter(chunk)
        assert out.events == [insert, other]
        assert (out.end_lsn, out.op_counts, out.commit_time_us, out.transaction) == (0x99, {"message": 1}, 1234, True)
        assert backfill.requests == [{"tables": ["public.orders", "sales.*"], "source": "signal at 0/2000",
                                      "again": True}]
        assert json.loads(open(backfill.path).read())["requests"] == backfill.requests  # durable at once
        bad = w.Chunk([message_event(w.BACKFILL_SIGNAL_PREFIX, "no dot", True)], 0x9A, {"message": 1})
        assert backfill.filter(bad)[0].events == []
        assert len(backfill.requests) == 1
        assert logged(caplog, "expected schema.table")

    def test_an_unwritable_state_file_stops_backfilling_not_replication(self, tmp_path, caplog):
        (tmp_path / "afile").write_text("")
        alerts = RecordingAlerter()
        backfill = w.Backfill(load({"STATE_FILE": str(tmp_path / "afile" / "state.json")}), alerts)
        backfill.request(("public.t",), "test")
        assert backfill.stopped.startswith(f"STATE_FILE {tmp_path / 'afile' / 'state.json'} cannot be written")
        assert backfill.status()["stopped"] == backfill.stopped
        assert logged(caplog, "backfill stopped")
        assert [a[0] for a in alerts.alerts] == ["backfill"]

    def test_status(self, backfill):
        assert backfill.status() is None
        backfill.request(("public.*",), "POST /backfill")
        backfill.queue.append({"schema": "public", "table": "t", "after": None, "rows": 0, "source": "x"})
        status = backfill.status()
        assert status["requested"] == ["public.*"]
        assert status["queued"] == ["public.t"]
        assert (status["table"], status["rows_total"], status["stopped"]) == (None, 0, None)


class TestBackfillAcknowledgement:
    async def test_wait_flushed(self):
        ack = w.AckTracker(0x10)
        reached = []

        async def waiter():
            await ack.wait_flushed(0x30)
            reached.append(ack.flushed_lsn)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await wait_until(lambda: ack._moved is not None)
            ack.queued()
            ack.delivered(0x20)
            await trio.testing.wait_all_tasks_blocked()
            assert reached == []
            ack.keepalive(0x40, True)
        assert reached == [0x40]

    def test_read_events_are_counted_but_are_no_transaction(self):
        stats = w.Stats()
        table = backfill_table()
        window = w.ChunkWindow("r", 1, table)
        window.rows = backfill_rows(table, 1, 2)
        stats._taken.append(window.read_chunk(0x100))
        stats.chunks_confirmed(1)
        assert stats.events_confirmed["read"] == 2
        assert stats.transactions == 0
        stats.backfill = w.Backfill(load())
        stats.backfill.rows_total = 2
        families = metric_families(w.build_metrics_text(stats))
        assert metric_value(families, "wal2http_backfill_rows", "wal2http_backfill_rows_total") == 2
        assert metric_value(families, "wal2http_backfill_tables_remaining") == 0


class TestBackfillPost:
    async def post(self, port, body: bytes, token="default", headers=()):
        token = OPS_TOKEN if token == "default" else token
        client = w.HttpClient(f"http://127.0.0.1:{port}/", timeout_s=10, headers=[
            *headers, *([("Authorization", f"Bearer {token}")] if token else [])])
        try:
            return await client.request("POST", "/backfill", body=body, headers=[("Content-Type", "application/json")])
        finally:
            await client.aclose()

    async def test_post_backfill(self, tmp_path):
        port = free_port()
        stats = w.Stats(ops_config(port, OPS_TOKEN))
        stats.backfill = w.Backfill(load({"STATE_FILE": str(tmp_path / "s.json")}))
        async with ops_server(ops_config(port, OPS_TOKEN), stats):
            answer = await self.post(port, b'{"tables": ["public.orders", "sales.*"]}')
            assert (answer.status, ops_json(answer)) == (202, {"status": "accepted", "tables": ["public.orders", "sales.*"]})
            assert stats.backfill.requests[-1]["source"] == "POST /backfill"
            assert (await self.post(port, b'{"tables": ["x"]}', token="wrong")).status == 401
            assert (await self.post(port, b'{"tables": ["x"]}', token=None)).status == 401
            for body in (b"", b"{", b'{"tables": "public.t"}', b'{"tables": []}', b'{"tables": [1]}', b'{"other": 1}'):
                assert (await self.post(port, body)).status == 400, body
            bad = await self.post(port, b'{"tables": ["nodot"]}')
            assert (bad.status, bad.body) == (400, b"tables: expected schema.table, schema.* or *, comma-separated "
                                                   b"(got 'nodot')\n")
            assert (await ops_get(port, "/backfill", token=OPS_TOKEN)).status == 405
            too_big = await self.post(port, b'{"tables": ["' + b"a" * w.OPS_MAX_BODY_BYTES + b'.t"]}')
            assert too_big.status == 413
            assert (await ops_get(port, "/health")).status == 200  # the port goes on
        assert len(stats.backfill.requests) == 1

    async def test_post_backfill_needs_a_token(self, tmp_path):
        port = free_port()
        stats = w.Stats(ops_config(port))
        stats.backfill = w.Backfill(load({"STATE_FILE": str(tmp_path / "s.json")}))
        async with ops_server(ops_config(port), stats):
            answer = await self.post(port, b'{"tables": ["public.t"]}', token=None)
            assert answer.status == 403
            assert b"OPS_TOKEN" in answer.body
        assert stats.backfill.requests == []


class TestReliableSink:
    @pytest.mark.parametrize("retry_index, random_value, retry_after, expected", [
        (0, 1.0, None, 1.0), (3, 1.0, None, 8.0), (10, 1.0, None, 30.0), (3, 0.5, None, 4.0),
        (0, 0.0, None, 0.0), (0, 0.1, 12.0, 12.0), (0, 0.1, 500.0, 30.0),
        (1025, 1.0, None, 30.0), (10 ** 6, 0.5, None, 15.0)])  # RETRY_MAX_ATTEMPTS has no upper bound
    def test_compute_retry_delay(self, retry_index, random_value, retry_after, expected):
        assert w.compute_retry_delay(retry_index, 1.0, 30.0, random_value, retry_after) == expected

    async def test_500_500_200_delivered_once_after_retries(self, caplog):
        events = make_events(1)
        sleep = RecordingSleep()
        alerter = RecordingAlerter()
        async with ScriptedReceiver.serve([Reply(500), Reply(500)]) as receiver:
            config = offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url(), retry_base_delay_s=1.0,
                                    retry_max_delay_s=30.0)
            sink = w.ReliableSink(w.HttpSink(config), config, alerter, sleep=sleep, random=lambda: 1.0)
            with caplog.at_level(logging.WARNING, logger="wal2http"):
                await sink.deliver(events)
            await sink.aclose()
        assert len(receiver.requests) == 3
        assert sleep.delays == [1.0, 2.0]
        assert alerter.alerts == []
        assert alerter.recoveries == []
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert "attempt 1 of 5" in warnings[0]
        assert "retrying in 1.0 s" in warnings[0]
        assert "attempt 2 of 5" in warnings[1]

    async def test_retry_after_is_honoured(self):
        sleep = RecordingSleep()
        async with ScriptedReceiver.serve([Reply(429, headers=(("Retry-After", "7"),))]) as receiver:
            config = offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url())
            sink = w.ReliableSink(w.HttpSink(config), config, RecordingAlerter(), sleep=sleep, random=lambda: 0.0)
            await sink.deliver(make_events(1))
            await sink.aclose()
        assert len(receiver.requests) == 2
        assert sleep.delays == [7.0]

    async def test_400_is_not_retried(self, tmp_path):
        sleep = RecordingSleep()
        alerter = RecordingAlerter()
        async with ScriptedReceiver.serve([Reply(400, body=b"invalid payload")]) as receiver:
            config = offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url(), on_failure="exit")
            sink = w.ReliableSink(w.HttpSink(config), config, alerter, sleep=sleep)
            with pytest.raises(w.DeliveryFailed) as info:
                await sink.deliver(make_events(1))
            await sink.aclose()
        assert len(receiver.requests) == 1
        assert sleep.delays == []
        assert info.value.delivered == 0
        assert "invalid payload" in str(info.value)
        assert len(alerter.alerts) == 1

    async def test_timeouts_retried_with_autojump_clock(self, autojump_clock):
        """Backoff in virtual time: the real trio.sleep, no waiting."""
        config = offline_config(HTTP_FIELDS, retry_max_attempts=4, retry_base_delay_s=1.0, retry_max_delay_s=30.0)
        sink = FlakySink([retryable(), retryable(), retryable()])
        started = trio.current_time()
        await w.ReliableSink(sink, config, RecordingAlerter(), random=lambda: 1.0).deliver(make_events(2))
        assert trio.current_time() - started == pytest.approx(1.0 + 2.0 + 4.0)
        assert sink.delivered == [e["id"] for e in make_events(2)]

    async def test_exit_reports_the_delivered_count(self):
        events = make_events(5)
        alerter = RecordingAlerter()
        config = offline_config(HTTP_FIELDS, on_failure="exit", retry_max_attempts=3)
        sink = FlakySink([retryable("HTTP 503", delivered=2, failed=1), retryable("HTTP 503"), retryable("HTTP 503")])
        with pytest.raises(w.DeliveryFailed) as info:
            await w.ReliableSink(sink, config, alerter, sleep=RecordingSleep()).deliver(events)
        assert info.value.delivered == 2
        assert events[2]["id"] in str(info.value)
        assert sink.delivered == [e["id"] for e in events[:2]]
        # after the partial success the rest is retried, never the delivered events again
        assert sink.calls[1] == [e["id"] for e in events[2:]]
        (key, subject, body), = alerter.alerts
        assert "fake" in subject
        assert events[2]["id"] in body
        assert "HTTP 503" in body
        assert "Failing since" in body

    async def test_exit_counts_attempts_per_delivery(self):
        """Progress resets the attempt count: failure, partial success (its failure is attempt 1
        for the rest), failure, success: never 3 failures in a row for the same events."""
        config = offline_config(HTTP_FIELDS, on_failure="exit", retry_max_attempts=3)
        sink = FlakySink([retryable(), retryable(delivered=1, failed=1), retryable()])
        await w.ReliableSink(sink, config, RecordingAlerter(), sleep=RecordingSleep()).deliver(make_events(3))
        assert sink.delivered == [e["id"] for e in make_events(3)]

    async def test_skip_dead_letters_and_goes_on(self, tmp_path, monkeypatch):
        events = make_events(4)
        path = tmp_path / "dead.jsonl"
        path.write_text('{"id":"earlier"}\n')
        alerter = RecordingAlerter()
        config = offline_config(HTTP_FIELDS, on_failure="skip", dead_letter_file=str(path), retry_max_attempts=2)
        sink = FlakySink([fatal("HTTP 400", delivered=1, failed=1), retryable(), retryable()])
        fsynced = []
        real_fsync = os.fsync

        def recording_fsync(fd):
            fsynced.append(os.fstat(fd).st_size)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", recording_fsync)
        await w.ReliableSink(sink, config, alerter, sleep=RecordingSleep()).deliver(events)
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines[0] == '{"id":"earlier"}'   # appended, never truncated
        assert [json.loads(line) for line in lines[1:]] == [events[1], events[2], events[3]]
        assert lines[1] == compact(events[1]).decode()
        assert fsynced
        assert fsynced[-1] == path.stat().st_size   # the whole file was on disk
        assert sink.delivered == [events[0]["id"]]
        assert len(alerter.alerts) == 2
        assert str(path) in alerter.alerts[0][2]

    async def test_skip_with_unwritable_dead_letter_file_exits(self, tmp_path):
        config = offline_config(HTTP_FIELDS, on_failure="skip",
                                dead_letter_file=str(tmp_path / "missing-dir" / "d.jsonl"))
        events = make_events(3)
        sink = FlakySink([fatal(delivered=1, failed=1)])
        alerter = RecordingAlerter()
        with pytest.raises(w.DeliveryFailed, match="DEAD_LETTER_FILE") as info:
            await w.ReliableSink(sink, config, alerter, sleep=RecordingSleep()).deliver(events)
        assert info.value.delivered == 1
        assert "missing-dir" in alerter.alerts[0][2]

    async def test_stop_is_mailed_even_right_after_a_skip_alert(self, tmp_path):
        """A skip alert, then the dead-letter file fails within 5 minutes: wal2http stops, and that
        mail is not held back by the limit on identical alerts.  One failure start in each mail."""
        path = tmp_path / "d.jsonl"
        with smtp_server() as (handler, port):
            config = offline_config(mail_fields(port), on_failure="skip", dead_letter_file=str(path))
            sink = FlakySink([fatal(delivered=0, failed=1), fatal("still bad", delivered=0, failed=1)])
            async with running_alerter(config) as alerter:
                reliable = w.ReliableSink(sink, config, alerter, sleep=RecordingSleep())
                await reliable.deliver(make_events(1))  # dead-lettered: first mail
                path.unlink()
                path.mkdir()  # appending to it now fails
                with pytest.raises(w.DeliveryFailed, match="DEAD_LETTER_FILE"):
                    await reliable.deliver(make_events(1))
                await wait_until(lambda: len(handler.messages) == 2, timeout=10)
        first, second = (m.mail for m in handler.messages)
        assert first["Subject"] == "[wal2http] ALERT: delivery to the fake sink is failing"
        assert second["Subject"] == "[wal2http] ALERT: wal2http stopped: delivery to the fake sink failed"
        assert "still bad" in second.get_content()
        assert "wal2http stops" in second.get_content()
        for mail in (first, second):
            assert len(set(re.findall(r"Failing since: *(\S+)", mail.get_content()))) == 1

    async def test_skip_then_success_sends_recovered(self, tmp_path):
        config = offline_config(HTTP_FIELDS, on_failure="skip", dead_letter_file=str(tmp_path / "d.jsonl"))
        alerter = RecordingAlerter()
        reliable = w.ReliableSink(FlakySink([fatal()]), config, alerter, sleep=RecordingSleep())
        await reliable.deliver(make_events(1))
        await reliable.deliver(make_events(1, start=1))
        assert len(alerter.alerts) == 1
        assert len(alerter.recoveries) == 1

    async def test_retry_keeps_going_at_max_delay_then_recovers(self):
        events = make_events(3)
        alerter = RecordingAlerter()
        sleep = RecordingSleep()
        config = offline_config(HTTP_FIELDS, on_failure="retry", retry_max_attempts=2, retry_base_delay_s=1.0,
                                retry_max_delay_s=30.0)
        sink = FlakySink([retryable(delivered=1, failed=1)] + [retryable()] * 6)
        await w.ReliableSink(sink, config, alerter, sleep=sleep, random=lambda: 1.0).deliver(events)
        assert sink.delivered == [e["id"] for e in events]
        assert sleep.delays == [1.0] + [30.0] * 6
        (key, _, body), = alerter.alerts
        assert events[1]["id"] in body
        (recovered_key, subject, _), = alerter.recoveries
        assert recovered_key == key
        assert "recovered" in subject

    async def test_retry_is_cancellable(self, autojump_clock):
        config = offline_config(HTTP_FIELDS, on_failure="retry", retry_max_attempts=1, retry_max_delay_s=30.0)
        sink = FlakySink([fatal()] * 1000)
        with trio.move_on_after(3600) as scope:
            await w.ReliableSink(sink, config, RecordingAlerter()).deliver(make_events(1))
        assert scope.cancelled_caught
        assert 100 <= len(sink.calls) <= 125

    async def test_sink_auth_error_propagates_at_once(self):
        class Rejecting(FlakySink):
            async def deliver(self, events):
                self.calls.append(events)
                raise w.SinkAuthError("token rejected")

        sink = Rejecting([])
        sleep = RecordingSleep()
        with pytest.raises(w.SinkAuthError):
            reliable = w.ReliableSink(sink, offline_config(HTTP_FIELDS, on_failure="retry"), RecordingAlerter(),
                                      sleep=sleep)
            await reliable.deliver(make_events(1))
        assert len(sink.calls) == 1
        assert sleep.delays == []

    async def test_no_new_retrying_alert_once_shutdown_began(self, autojump_clock):
        """ON_FAILURE=retry: attempts that run out after SIGTERM (within the shutdown timeout)
        do not mail that wal2http keeps retrying: it is stopping."""
        config = offline_config(HTTP_FIELDS, on_failure="retry", retry_max_attempts=2, retry_max_delay_s=1.0)
        stop, alerter = trio.Event(), RecordingAlerter()
        stop.set()
        sink = FlakySink([retryable()] * 10)
        with trio.move_on_after(5) as scope:
            await w.ReliableSink(sink, config, alerter, stop=stop).deliver(make_events(1))
        assert scope.cancelled_caught
        assert len(sink.calls) >= 3  # past RETRY_MAX_ATTEMPTS: retrying for ever
        assert alerter.alerts == []

    async def test_the_retrying_alert_goes_out_while_running(self, autojump_clock):
        config = offline_config(HTTP_FIELDS, on_failure="retry", retry_max_attempts=2, retry_max_delay_s=1.0)
        alerter = RecordingAlerter()
        sink = FlakySink([retryable()] * 10)
        with trio.move_on_after(5):
            await w.ReliableSink(sink, config, alerter, stop=trio.Event()).deliver(make_events(1))
        assert len(alerter.alerts) == 1
        assert "keeps retrying" in alerter.alerts[0][2]

    async def test_passes_the_sink_interface_through(self):
        reliable = w.ReliableSink(FlakySink([]), offline_config(HTTP_FIELDS), RecordingAlerter())
        assert (reliable.name, reliable.batch_size, await reliable.check()) == ("fake", 10, "ok")
        await reliable.aclose()


# =====================================================================================================
# HTTP client and HTTP sink
# =====================================================================================================


SECRET_HEADER_VALUE = "Bearer s3cr3t-t0ken"   # must never appear in any message



@dataclasses.dataclass
class Reply:
    """One scripted answer.  `hang`: never answer; `drop`: close the connection without answering;
    `close_after`: answer with Connection: close; `silent_close_after`: answer, then close the
    connection without saying so (a keep-alive timeout on the server side); `chunked`: send the
    body in chunks without Content-Length."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    delay_s: float = 0.0
    hang: bool = False
    drop: bool = False
    close_after: bool = False
    silent_close_after: bool = False
    chunked: bool = False


@dataclasses.dataclass
class Recorded:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int  # index of the accepted connection it came on


async def receive_h11_request(stream, conn: h11.Connection):
    """The next whole request on a server connection: (method, target, headers with lower-case
    names, body), or None when the client closed the connection."""
    request, body = None, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            headers = {name.decode().lower(): value.decode() for name, value in request.headers}
            return request.method.decode(), request.target.decode(), headers, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


def events_in(request) -> list[dict]:
    """The events a request carried: one event, or the `events` of a batch."""
    body = json.loads(request.body)
    if isinstance(body, dict) and list(body) == ["events"]:
        return body["events"]
    return [body]


class ScriptedReceiver(Observed):
    """Answers requests with the scripted replies in order, then with `default`.  Records which
    reply each request got (`answers`, in request order), which requests were answered (`answered`:
    (request, reply) once the answer is sent), and can hold every answer from request number
    `gate_from` (0-based) on until `gate` is set."""

    def __init__(self, replies=(), default: Reply | None = None):
        super().__init__()
        self.replies = list(replies)
        self.default = default or Reply(200)
        self.requests: list[Recorded] = []
        self.connections = 0
        self.closed = 0  # connections this side has closed or seen closed
        self.port = 0
        self.host = "127.0.0.1"
        self.scheme = "http"
        self.answers: list[Reply] = []
        self.answered: list[tuple] = []
        self.gate_from: int | None = None
        self.gate = trio.Event()

    @classmethod
    @asynccontextmanager
    async def serve(cls, replies=(), default: Reply | None = None, *, host: str = "127.0.0.1",
                    ssl_context: ssl.SSLContext | None = None):
        receiver = cls(replies, default)
        async with trio.open_nursery() as nursery:
            if ssl_context is None:
                serve = functools.partial(trio.serve_tcp, receiver._handle, 0, host=host)
            else:
                serve = functools.partial(trio.serve_ssl_over_tcp, receiver._handle, 0, ssl_context,
                                          host=host, https_compatible=True)
            listeners = await nursery.start(serve)
            listener = listeners[0] if ssl_context is None else listeners[0].transport_listener
            receiver.host, receiver.port = host, listener.socket.getsockname()[1]
            receiver.scheme = "http" if ssl_context is None else "https"
            yield receiver
            nursery.cancel_scope.cancel()

    def url(self, path: str = "/hook", host: str | None = None) -> str:
        host = host or self.host
        bracketed = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{bracketed}:{self.port}{path}"

    def posts(self):
        return [r for r in self.requests if r.method == "POST"]

    def delivered(self) -> list[dict]:
        """The events of every request answered 2xx, in the order they were answered."""
        return [e for request, reply in self.answered if 200 <= reply.status < 300 for e in events_in(request)]

    def delivered_ids(self) -> list[str]:
        return [e["id"] for e in self.delivered()]

    async def _handle(self, stream: trio.abc.Stream) -> None:
        index = self.connections
        self.connections += 1
        self._notify()
        try:
            await self._serve_connection(stream, index)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
            pass  # the client went away or refused our certificate: nothing to answer
        finally:
            await trio.aclose_forcefully(stream)
            self.closed += 1
            self._notify()

    async def _serve_connection(self, stream: trio.abc.Stream, index: int) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request = await self._read_request(stream, conn, index)
            if request is None:
                return
            reply = self.reply_for(request)
            number = len(self.requests)
            self.requests.append(request)
            self.answers.append(reply)
            self._notify()
            if self.gate_from is not None and number >= self.gate_from:
                await self.gate.wait()
            if reply.hang:
                await trio.sleep_forever()
            if reply.delay_s:
                await trio.sleep(reply.delay_s)
            if reply.drop:
                return
            await stream.send_all(self._encode_reply(conn, reply))
            self.answered.append((request, reply))
            self._notify()
            if conn.our_state is h11.MUST_CLOSE or reply.silent_close_after:
                return
            conn.start_next_cycle()

    def reply_for(self, request) -> Reply:
        """The answer to this request: the next scripted reply, then `default`."""
        return self.replies.pop(0) if self.replies else self.default

    @staticmethod
    async def _read_request(stream, conn: h11.Connection, index: int) -> Recorded | None:
        request = await receive_h11_request(stream, conn)
        return None if request is None else Recorded(*request, index)

    @staticmethod
    def _encode_reply(conn: h11.Connection, reply: Reply) -> bytes:
        headers = list(reply.headers)
        if reply.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            headers.append(("Content-Length", str(len(reply.body))))
        if reply.close_after:
            headers.append(("Connection", "close"))
        data = conn.send(h11.Response(status_code=reply.status, headers=headers))
        pieces = [reply.body[i:i + 7] for i in range(0, len(reply.body), 7)] if reply.chunked else [reply.body]
        for piece in pieces:
            if piece:
                data += conn.send(h11.Data(data=piece))
        return data + conn.send(h11.EndOfMessage())


def make_events(count: int, start: int = 0) -> list[dict]:
    return [{"id": f"0/16B37A0:{i}", "op": "insert", "schema": "public", "table": "orders",
             "key": {"id": i}, "new": {"id": i, "note": "héllo ✓"}, "old": None, "unchanged_toast": [],
             "xid": 771, "lsn": "0/16B3748", "commit_lsn": "0/16B37A0",
             "commit_time": "2026-11-27T16:25:11.123456Z", "seq": i} for i in range(start, start + count)]


def compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def standard_webhooks_signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """Independent reimplementation of the receiver side of the Standard Webhooks scheme."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False



async def read_raw_request(conn, body: bool = True) -> bytes:
    """One request read from a bare socket: its head, and its body (by Content-Length) unless
    `body` is False."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await conn.recv(65536)
    if body:
        length = int(re.search(rb"content-length: *(\d+)", data, re.I).group(1))
        while len(data.partition(b"\r\n\r\n")[2]) < length:
            data += await conn.recv(1 << 20)
    return data


@contextlib.asynccontextmanager
async def raw_server(handle):
    """A bare TCP server on 127.0.0.1 running `handle(listener)` (for answers h11 would not
    write); yields its port."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle, listener)
            yield listener.getsockname()[1]
            nursery.cancel_scope.cancel()


class TestHttpClient:
    def test_parse_http_url(self):
        endpoint = w.parse_http_url("https://user:pw@Example.COM:8443/a/b?x=1")
        assert (endpoint.scheme, endpoint.host, endpoint.port, endpoint.target) == \
            ("https", "example.com", 8443, "/a/b?x=1")
        assert endpoint.host_header == "example.com:8443"
        assert endpoint.authorization == "Basic " + base64.b64encode(b"user:pw").decode()
        assert endpoint.where == "https://example.com:8443/..."   # no user info, path or query
        assert w.parse_http_url("http://[::1]/").host_header == "[::1]"
        assert w.parse_http_url("http://[::1]/").where == "http://[::1]"
        assert w.parse_http_url("http://[::1]:81").target == "/"

    def test_parse_http_url_decodes_user_info(self):
        # A password with @ : / # ? % must be percent-encoded in a URL; the header carries it decoded.
        endpoint = w.parse_http_url("http://us%40er:p%3As%2Fs%25@h/")
        assert base64.b64decode(endpoint.authorization.removeprefix("Basic ")) == b"us@er:p:s/s%"
        assert set(w.url_secrets("http://us%40er:p%3As%2Fs%25@h/")) == {
            "p%3As%2Fs%25", "p:s/s%", endpoint.authorization.removeprefix("Basic ")}  # the user is no secret
        token_only = w.url_secrets("https://t0k%2Ben@h/")  # a user name with no password is the secret
        assert {"t0k%2Ben", "t0k+en"} <= set(token_only)
        api_key = "a1b2c3d4e5f6g7h8i9j0"  # a long user name beside a dummy password: the credential
        assert api_key in w.url_secrets(f"https://{api_key}:X@h/")
        assert "wal2http" not in w.url_secrets("https://wal2http:S3cretPw@h/")
        assert w.url_secrets("http://h/") == []

    def test_parse_http_url_percent_encodes_a_non_ascii_target(self):
        endpoint = w.parse_http_url("http://h/caf\u00e9/a%20b?q=\u00fc&r=<1>")
        assert endpoint.target == "/caf%C3%A9/a%20b?q=%C3%BC&r=%3C1%3E"  # escapes already there are kept

    @pytest.mark.parametrize("host", ["hooks..example.com", "a" * 64 + ".example.com", "-x.example.com"])
    def test_host_the_resolver_would_refuse_is_a_config_error(self, host):
        with pytest.raises(w.ConfigError, match="host"):
            w.parse_http_url(f"http://{host}/")
        with pytest.raises(w.ConfigError, match="HTTP_ENDPOINT_URL"):
            load({"HTTP_ENDPOINT_URL": f"http://{host}/"})
        with pytest.raises(w.ConfigError, match="EMAIL_SMTP_HOST"):
            load({"EMAIL_SMTP_HOST": host, "EMAIL_FROM": "w@example.org", "EMAIL_TO": "ops@example.org"})

    @pytest.mark.parametrize("url", ["ftp://host/", "host:80", "http://", "http://host:99999/"])
    def test_parse_http_url_rejects(self, url):
        with pytest.raises(w.ConfigError):
            w.parse_http_url(url)

    def test_invalid_header_is_a_config_error_without_the_value(self):
        with pytest.raises(w.ConfigError) as info:
            w.HttpClient("http://127.0.0.1:1/", timeout_s=1, headers=[("X-Token", "abc\r\nevil")])
        assert "X-Token" in str(info.value)
        assert "evil" not in str(info.value)

    @pytest.mark.parametrize("host", ["smtp.example.com:587", "smtp://x", "a b", "@@@"])
    def test_smtp_host_with_a_port_or_scheme_is_a_config_error(self, host):
        with pytest.raises(w.ConfigError, match="EMAIL_SMTP_HOST"):
            load({"EMAIL_SMTP_HOST": host, "EMAIL_FROM": "w@example.org", "EMAIL_TO": "ops@example.org"})
        assert w.is_valid_host("smtp.example.com")
        assert w.is_valid_host("my_host")
        assert w.is_valid_host("::1")

    def test_non_ascii_header_value_is_a_config_error(self):
        with pytest.raises(w.ConfigError, match="non-ASCII") as info:
            w.HttpClient("http://127.0.0.1:1/", timeout_s=1, headers=[("Authorization", "Bearer caf\u00e9-token")])
        assert "Authorization" in str(info.value)
        assert "caf" not in str(info.value)

    async def test_concurrent_requests_take_turns_on_one_connection(self):
        replies = [Reply(200, body=b"first", delay_s=1.0), Reply(200, body=b"second")]
        async with ScriptedReceiver.serve(replies) as receiver:
            client = w.HttpClient(receiver.url(), timeout_s=10)
            answers = {}

            async def ask(name):
                answers[name] = await client.request("POST", "/hook", body=name.encode())

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask, "a")
                    await receiver.wait_for(lambda r: len(r.requests) == 1)  # a is waiting for its answer
                    nursery.start_soon(ask, "b")
            await client.aclose()
        assert [r.body for r in receiver.requests] == [b"a", b"b"]
        assert (answers["a"].body, answers["b"].body) == (b"first", b"second")
        assert receiver.connections == 1

    async def test_request_response_and_headers(self):
        reply = Reply(201, headers=(("X-Multi", "a"), ("X-Multi", "b")), body=b"created")
        async with ScriptedReceiver.serve([reply]) as receiver:
            client = w.HttpClient(receiver.url("/base"), timeout_s=5, headers=[("Authorization", SECRET_HEADER_VALUE)])
            response = await client.request("POST", "/base/x?y=1", headers=[("X-One", "1")], body=b"{}")
            await client.aclose()
        assert response == w.HttpResponse(201, {"x-multi": "a, b", "content-length": "7"}, b"created")
        request = receiver.requests[0]
        assert (request.method, request.target, request.body) == ("POST", "/base/x?y=1", b"{}")
        assert request.headers["host"] == f"127.0.0.1:{receiver.port}"
        assert request.headers["user-agent"] == f"wal2http/{w.__version__}"
        assert request.headers["authorization"] == SECRET_HEADER_VALUE
        assert request.headers["x-one"] == "1"
        assert request.headers["content-length"] == "2"

    async def test_chunked_response(self):
        async with ScriptedReceiver.serve([Reply(200, body=b"0123456789" * 5, chunked=True)]) as receiver:
            client = w.HttpClient(receiver.url(), timeout_s=5)
            first = await client.request("GET", "/")
            second = await client.request("GET", "/")
            await client.aclose()
        assert first.body == b"0123456789" * 5
        assert second.status == 200
        assert receiver.connections == 1

    async def test_keep_alive_reuses_one_connection(self):
        async with ScriptedReceiver.serve() as receiver:
            client = w.HttpClient(receiver.url(), timeout_s=5)
            for _ in range(5):
                assert (await client.request("POST", "/hook", body=b"x")).status == 200
            await client.aclose()
        assert receiver.connections == 1
        assert len(receiver.requests) == 5

    async def test_reopens_after_connection_close(self):
        async with ScriptedReceiver.serve([Reply(200, close_after=True)]) as receiver:
            client = w.HttpClient(receiver.url(), timeout_s=5)
            await client.request("POST", "/hook", body=b"1")
            await client.request("POST", "/hook", body=b"2")
            await client.aclose()
        assert receiver.connections == 2
        assert [(r.body, r.connection) for r in receiver.requests] == [(b"1", 0), (b"2", 1)]

    async def test_early_answer_to_a_body_too_large_is_the_answer(self):
        """A server that answers 413 after the head and closes without reading the 8 MiB body:
        the send fails, yet the client reports the 413 (not retried), not a connection reset
        (retried 5 times, cause hidden).  The next request goes on a new connection."""
        heads = []

        async def serve(listener):
            for answer in (b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large",
                           b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"):
                conn, _ = await listener.accept()
                with conn:
                    # the 413 is sent after the head alone; the 200 after the whole (small) body
                    data = await read_raw_request(conn, body=answer.startswith(b"HTTP/1.1 200"))
                    heads.append(data.split(b"\r\n", 1)[0])
                    await conn.send(answer)

        async with raw_server(serve) as port:
            client = w.HttpClient(f"http://127.0.0.1:{port}/", timeout_s=10)
            response = await client.request("POST", "/hook", body=b"x" * (8 << 20))
            assert (response.status, response.body) == (413, b"too large")
            error = w.classify_http_response(response, client.endpoint.where)
            assert not error.retryable
            assert "413" in str(error)
            assert (await client.request("POST", "/hook", body=b"small")).status == 200
            await client.aclose()
        assert heads == [b"POST /hook HTTP/1.1"] * 2

    @pytest.mark.parametrize("size", [10, 8 << 20])  # the send goes through; the send fails
    async def test_a_408_left_on_a_kept_alive_connection_is_not_the_answer(self, size):
        """The server's idle timeout: a 408 sent on the kept-alive connection before our next
        request, then a close.  That request goes again at once on a new connection."""
        async def serve(listener):
            for last in (False, True):
                conn, _ = await listener.accept()
                with conn:
                    await read_raw_request(conn)
                    await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    if not last:
                        await conn.send(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")

        async with raw_server(serve) as port:
            client = w.HttpClient(f"http://127.0.0.1:{port}/", timeout_s=10)
            assert (await client.request("POST", "/hook", body=b"small")).status == 200
            response = await client.request("POST", "/hook", body=b"x" * size)
            assert (response.status, response.body) == (200, b"ok")
            await client.aclose()

    async def test_resends_once_when_idle_connection_was_closed(self):
        """The server closed the kept-alive connection without saying so: the next request fails
        before any answer and is sent again, once, on a new connection."""
        async with ScriptedReceiver.serve([Reply(200, silent_close_after=True)]) as receiver:
            client = w.HttpClient(receiver.url(), timeout_s=5)
            await client.request("POST", "/hook", body=b"1")
            await receiver.wait_for(lambda r: r.closed == 1)
            response = await client.request("POST", "/hook", body=b"2")
            await client.aclose()
        assert response.status == 200
        assert [(r.body, r.connection) for r in receiver.requests] == [(b"1", 0), (b"2", 1)]

    async def test_resend_on_reused_connection_may_duplicate(self):
        """A reused connection dropped after the request was read, before any answer: sent again
        once (documented: receivers deduplicate on ids)."""
        async with ScriptedReceiver.serve([Reply(200), Reply(drop=True)]) as receiver:
            client = w.HttpClient(receiver.url(), timeout_s=5)
            await client.request("POST", "/hook", body=b"1")
            assert (await client.request("POST", "/hook", body=b"2")).status == 200
            await client.aclose()
        assert [r.body for r in receiver.requests] == [b"1", b"2", b"2"]
        assert receiver.connections == 2

    async def test_no_resend_on_a_fresh_connection(self):
        async with ScriptedReceiver.serve([Reply(drop=True)]) as receiver:
            client = w.HttpClient(receiver.url(), timeout_s=5)
            with pytest.raises(w.DeliveryError) as info:
                await client.request("POST", "/hook", body=b"1")
            await client.aclose()
        assert info.value.retryable
        assert f"127.0.0.1:{receiver.port}" in str(info.value)
        assert len(receiver.requests) == 1
        assert receiver.connections == 1

    async def test_connection_refused_is_retryable(self):
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]   # bound but not listening: refused
            client = w.HttpClient(f"http://127.0.0.1:{port}/", timeout_s=5,
                                  headers=[("Authorization", SECRET_HEADER_VALUE)])
            with pytest.raises(w.DeliveryError) as info:
                await client.request("POST", "/", body=b"x")
        assert info.value.retryable
        assert f"127.0.0.1:{port}" in str(info.value)
        assert SECRET_HEADER_VALUE not in str(info.value)

    async def test_timeout_is_retryable_and_on_time(self):
        async with ScriptedReceiver.serve([Reply(hang=True)]) as receiver:
            client = w.HttpClient(receiver.url(), timeout_s=0.5, headers=[("Authorization", SECRET_HEADER_VALUE)])
            started = trio.current_time()
            with pytest.raises(w.DeliveryError) as info:
                await client.request("POST", "/hook", body=b"x")
            elapsed = trio.current_time() - started
            # the next request opens a new connection (the hung one is closed)
            assert (await client.request("POST", "/hook", body=b"y")).status == 200
            await client.aclose()
        assert info.value.retryable
        assert "HTTP_TIMEOUT_SECS" in str(info.value)
        assert SECRET_HEADER_VALUE not in str(info.value)
        assert 0.5 <= elapsed < 2.0
        assert receiver.connections == 2

    async def test_body_read_only_up_to_the_bound(self):
        huge = b"x" * (w.HTTP_MAX_BODY_BYTES * 4)
        async with ScriptedReceiver.serve([Reply(500, body=huge), Reply(200, body=b"ok")]) as receiver:
            client = w.HttpClient(receiver.url(), timeout_s=5)
            response = await client.request("POST", "/hook", body=b"x")
            assert response.status == 500
            assert response.body == huge[:w.HTTP_MAX_BODY_BYTES]
            assert (await client.request("POST", "/hook", body=b"y")).body == b"ok"
            await client.aclose()
        assert receiver.connections == 2   # the unread rest made the first connection unusable

    async def test_https_trusted_through_ca_file(self, server_tls, ca_file):
        async with ScriptedReceiver.serve(ssl_context=server_tls) as receiver:
            client = w.HttpClient(receiver.url(host="localhost"), timeout_s=5, ca_file=ca_file)
            assert (await client.request("POST", "/hook", body=b"1")).status == 200
            assert (await client.request("POST", "/hook", body=b"2")).status == 200
            await client.aclose()
        assert receiver.connections == 1
        assert [r.body for r in receiver.requests] == [b"1", b"2"]
        assert receiver.requests[0].headers["host"] == f"localhost:{receiver.port}"

    async def test_https_untrusted_certificate_is_refused(self, server_tls):
        async with ScriptedReceiver.serve(ssl_context=server_tls) as receiver:
            client = w.HttpClient(receiver.url(host="localhost"), timeout_s=5)   # system store only
            with pytest.raises(w.DeliveryError) as info:
                await client.request("POST", "/hook", body=b"1")
        assert not info.value.retryable
        assert "TLS verification" in str(info.value)
        assert receiver.requests == []

    async def test_https_wrong_hostname_is_refused(self, ca, ca_file):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("other.example").configure_cert(context)
        async with ScriptedReceiver.serve(ssl_context=context) as receiver:
            client = w.HttpClient(receiver.url(host="localhost"), timeout_s=5, ca_file=ca_file)
            with pytest.raises(w.DeliveryError) as info:
                await client.request("POST", "/hook", body=b"1")
        assert not info.value.retryable
        assert "TLS verification" in str(info.value)

    def test_missing_ca_file_is_a_config_error(self, tmp_path):
        with pytest.raises(w.ConfigError, match="HTTP_CA_FILE"):
            w.HttpClient("https://localhost/", timeout_s=1, ca_file=str(tmp_path / "missing.pem"))

    @pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback on this machine")
    async def test_ipv6_literal(self):
        async with ScriptedReceiver.serve(host="::1") as receiver:
            client = w.HttpClient(receiver.url(), timeout_s=5)
            assert (await client.request("POST", "/hook", body=b"x")).status == 200
            await client.aclose()
        assert receiver.requests[0].headers["host"] == f"[::1]:{receiver.port}"


class TestHttpSink:
    def test_sign_webhook_standard_vector(self):
        # The example of the Standard Webhooks reference libraries' tests.
        body = b'{"test": 2432232314}'
        assert w.sign_webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
                              1614265330, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

    def test_sign_webhook_plain_secret_uses_utf8_bytes(self):
        assert w.sign_webhook("pässword", "id", 5, b"{}") == \
            standard_webhooks_signature("pässword".encode(), "id", "5", b"{}")

    def test_bad_whsec_secret_is_a_config_error(self):
        with pytest.raises(w.ConfigError, match="HTTP_SIGNING_SECRET"):
            w.HttpSink(offline_config(HTTP_FIELDS, http_endpoint_url="http://127.0.0.1:1/",
                                      http_signing_secret="whsec_!!"))

    @pytest.mark.parametrize("status, retryable", [
        (200, None), (204, None), (408, True), (425, True), (429, True), (500, True), (503, True),
        (400, False), (401, False), (404, False), (409, False), (422, False), (301, False), (599, True),
        (600, False), (999, False)])  # h11 accepts any 3-digit status; only 5xx means "server error"
    def test_classify_http_response(self, status, retryable):
        error = w.classify_http_response(w.HttpResponse(status, {}, b"nope"), "http://h/x")
        if retryable is None:
            assert error is None
        else:
            assert error.retryable is retryable
            assert f"HTTP {status}" in str(error)
            assert "nope" in str(error)

    def test_classify_shortens_the_body(self):
        error = w.classify_http_response(w.HttpResponse(400, {}, b"e" * 5000), "http://h/x")
        assert len(str(error)) < 300

    @pytest.mark.parametrize("value, expected", [
        ("7", 7.0), (" 120 ", 120.0), (None, None), ("soon", None), ("-3", None),
        ("\u00b2", None), ("1\u00b3", None), ("\u0663", None),  # digits to str.isdigit, not to float()
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0), ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0)])
    def test_decode_retry_after(self, value, expected):
        now = 1445412480.0   # Wed, 21 Oct 2015 07:28:00 GMT
        assert w.decode_retry_after(value, now=now) == expected

    def test_classify_reads_retry_after(self):
        error = w.classify_http_response(w.HttpResponse(429, {"retry-after": "12"}, b""), "http://h/x")
        assert error.retryable
        assert error.retry_after == 12.0

    async def test_single_events_one_request_each(self):
        events = make_events(3)
        async with ScriptedReceiver.serve() as receiver:
            sink = w.HttpSink(offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url("/in?src=pg")))
            await sink.deliver(events)
            await sink.aclose()
        assert [json.loads(r.body) for r in receiver.requests] == events
        assert [r.body for r in receiver.requests] == [compact(e) for e in events]
        for request, event in zip(receiver.requests, events):
            assert (request.method, request.target) == ("POST", "/in?src=pg")
            assert request.headers["idempotency-key"] == event["id"]
            assert request.headers["content-type"] == "application/json"
            assert request.headers["user-agent"] == f"wal2http/{w.__version__}"
        assert receiver.connections == 1

    async def test_batches_keep_the_order(self):
        events = make_events(7)
        async with ScriptedReceiver.serve() as receiver:
            sink = w.HttpSink(offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url(), http_batch_size=3))
            assert sink.batch_size == 3
            await sink.deliver(events[:3])
            await sink.deliver(events[3:6])
            await sink.deliver(events[6:])
            await sink.aclose()
        bodies = [json.loads(r.body) for r in receiver.requests]
        assert [len(b["events"]) for b in bodies] == [3, 3, 1]
        assert [e for b in bodies for e in b["events"]] == events
        assert receiver.requests[0].body == compact({"events": events[:3]})
        # A batch is named by its first and last event: the same batch sent again keeps the key,
        # a batch cut differently after a restart gets another.
        assert [r.headers["idempotency-key"] for r in receiver.requests] == [
            f"{events[0]['id']}..{events[2]['id']}", f"{events[3]['id']}..{events[5]['id']}",
            f"{events[6]['id']}..{events[6]['id']}"]

    async def test_custom_headers(self):
        headers = (("Authorization", SECRET_HEADER_VALUE), ("X-Tenant", "acme"))
        async with ScriptedReceiver.serve() as receiver:
            sink = w.HttpSink(offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url(), http_headers=headers))
            await sink.deliver(make_events(1))
            await sink.aclose()
        assert receiver.requests[0].headers["authorization"] == SECRET_HEADER_VALUE
        assert receiver.requests[0].headers["x-tenant"] == "acme"

    @pytest.mark.parametrize("secret, key", [
        ("plain-secret", b"plain-secret"),
        ("whsec_" + base64.b64encode(b"\x00\x01binary key\xff").decode(), b"\x00\x01binary key\xff")])
    @pytest.mark.parametrize("batch_size", [1, 2])
    async def test_signature_verifies(self, secret, key, batch_size):
        events = make_events(2)
        async with ScriptedReceiver.serve() as receiver:
            sink = w.HttpSink(offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url(), http_batch_size=batch_size,
                                          http_signing_secret=secret))
            sink._clock = lambda: 1764260711.9
            await sink.deliver(events)
            await sink.aclose()
        for request in receiver.requests:
            headers = request.headers
            assert headers["webhook-timestamp"] == "1764260711"
            expected = standard_webhooks_signature(key, headers["webhook-id"], headers["webhook-timestamp"],
                                                   request.body)
            assert headers["webhook-signature"] == expected
            assert headers["webhook-id"] == headers["idempotency-key"]
        wanted = [e["id"] for e in events] if batch_size == 1 else [f"{events[0]['id']}..{events[1]['id']}"]
        assert [r.headers["webhook-id"] for r in receiver.requests] == wanted

    @pytest.mark.parametrize("batch_size, count", [(1, 2), (2, 1), (3, 5)])
    async def test_a_standard_webhooks_library_verifies_events_and_batches(self, batch_size, count):
        """The reference verifier (standardwebhooks, test-only) accepts every request, single
        events and batches alike, with the batch id `<first>..<last>`; a wrong key is refused."""
        from standardwebhooks.webhooks import Webhook, WebhookVerificationError
        secret = "whsec_" + base64.b64encode(b"a real 24-byte key here!").decode()
        events = make_events(count)
        async with ScriptedReceiver.serve() as receiver:
            sink = w.HttpSink(offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url(), http_batch_size=batch_size,
                                          http_signing_secret=secret))
            await sink.deliver(events)
            await sink.aclose()
        verified = []
        for request in receiver.requests:
            payload = Webhook(secret).verify(request.body, request.headers)
            verified += payload["events"] if batch_size > 1 else [payload]
            with pytest.raises(WebhookVerificationError):
                Webhook("whsec_" + base64.b64encode(b"another key").decode()).verify(request.body, request.headers)
        assert verified == events
        ids = [r.headers["webhook-id"] for r in receiver.requests]
        if batch_size > 1:
            batches = [events[i:i + batch_size] for i in range(0, count, batch_size)]
            assert ids == [f"{b[0]['id']}..{b[-1]['id']}" for b in batches]

    async def test_failed_event_reports_the_delivered_count(self):
        async with ScriptedReceiver.serve([Reply(200), Reply(200), Reply(503, headers=(("Retry-After", "4"),))]) \
                as receiver:
            sink = w.HttpSink(offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url()))
            with pytest.raises(w.DeliveryError) as info:
                await sink.deliver(make_events(5))
            await sink.aclose()
        error = info.value
        assert (error.delivered, error.failed, error.retryable, error.retry_after) == (2, 1, True, 4.0)
        assert len(receiver.requests) == 3

    async def test_batch_failure_covers_the_batch(self):
        async with ScriptedReceiver.serve([Reply(400, body=b'{"error":"bad"}')]) as receiver:
            sink = w.HttpSink(offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url(), http_batch_size=10))
            with pytest.raises(w.DeliveryError) as info:
                await sink.deliver(make_events(4))
            await sink.aclose()
        assert (info.value.delivered, info.value.failed, info.value.retryable) == (0, 4, False)
        assert "400" in str(info.value)
        assert '{"error":"bad"}' in str(info.value)

    async def test_secrets_never_in_errors_or_alerts(self):
        secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
        echo = f"bad token {SECRET_HEADER_VALUE}, secret {secret}".encode()
        alerter = RecordingAlerter()
        async with ScriptedReceiver.serve([Reply(400, body=echo)]) as receiver:
            config = offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url(), http_signing_secret=secret,
                                 http_headers=(("Authorization", SECRET_HEADER_VALUE),))
            sink = w.ReliableSink(w.HttpSink(config), config, alerter, sleep=RecordingSleep())
            with pytest.raises(w.DeliveryFailed) as info:
                await sink.deliver(make_events(1))
            await sink.aclose()
        texts = [str(info.value)] + [body for _, _, body in alerter.alerts]
        assert all("400" in t and "***" in t for t in texts)
        assert not any(SECRET_HEADER_VALUE in t or secret in t for t in texts)

    async def test_a_secret_cut_by_the_shortened_body_is_still_hidden(self):
        token = "Bearer " + "s3cr3t" * 20
        echo = f"{'x' * 170} header was {token}".encode()  # the error shows 200 characters: a cut token
        async with ScriptedReceiver.serve([Reply(400, body=echo)]) as receiver:
            sink = w.HttpSink(offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url(),
                                             http_headers=(("Authorization", token),)))
            with pytest.raises(w.DeliveryError) as info:
                await sink.deliver(make_events(1))
            await sink.aclose()
        assert "400" in str(info.value)
        assert "s3cr3t" not in str(info.value)

    async def test_url_credentials_never_in_errors_or_alerts(self):
        basic = base64.b64encode(b"hook-user:Url-Pw-77").decode()
        echo = f"you sent Authorization: Basic {basic} (password Url-Pw-77)".encode()
        alerter = RecordingAlerter()
        async with ScriptedReceiver.serve([Reply(400, body=echo)]) as receiver:
            url = receiver.url().replace("http://", "http://hook-user:Url-Pw-77@")
            config = offline_config(HTTP_FIELDS, http_endpoint_url=url)
            sink = w.ReliableSink(w.HttpSink(config), config, alerter, sleep=RecordingSleep())
            with pytest.raises(w.DeliveryFailed) as info:
                await sink.deliver(make_events(1))
            await sink.aclose()
            assert receiver.requests[0].headers["authorization"] == f"Basic {basic}"
        texts = [str(info.value)] + [body for _, _, body in alerter.alerts]
        assert all("400" in t and "***" in t for t in texts)
        assert not any(basic in t or "Url-Pw-77" in t for t in texts)

    @pytest.mark.parametrize("status", [401, 403])
    async def test_rejected_credentials_exit_4_with_an_alert_never_retried(self, status):
        echo = f"bad token {SECRET_HEADER_VALUE}".encode()
        alerter = RecordingAlerter()
        async with ScriptedReceiver.serve([Reply(status, body=echo)]) as receiver:
            config = offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url(), on_failure="skip",
                                 http_headers=(("Authorization", SECRET_HEADER_VALUE),))
            sink = w.ReliableSink(w.HttpSink(config, alerter=alerter), config, alerter, sleep=RecordingSleep())
            with pytest.raises(w.SinkAuthError) as info:
                await sink.deliver(make_events(2))
            await sink.aclose()
        assert info.value.exit_code == 4
        assert f"HTTP {status}" in str(info.value)
        assert len(receiver.requests) == 1  # never retried, nothing dead-lettered
        assert [key for key, _, _ in alerter.alerts] == ["http-auth"]
        assert not any(SECRET_HEADER_VALUE in t for t in [str(info.value)] + [b for _, _, b in alerter.alerts])

    async def test_check_sends_no_event(self):
        async with ScriptedReceiver.serve([Reply(405)]) as receiver:
            sink = w.HttpSink(offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url("/hook")))
            detail = await sink.check()
            await sink.aclose()
        assert "405" in detail
        assert [(r.method, r.body) for r in receiver.requests] == [("OPTIONS", b"")]

    async def test_check_raises_when_unreachable(self, server_tls):
        async with ScriptedReceiver.serve(ssl_context=server_tls) as receiver:
            sink = w.HttpSink(offline_config(HTTP_FIELDS, http_endpoint_url=receiver.url(host="localhost")))
            with pytest.raises(w.DeliveryError, match="TLS"):
                await sink.check()


# =====================================================================================================
# Hook0 sink
# =====================================================================================================


def outbox_event(**row_overrides):
    """An insert into public.outbox as the decode part emits it."""
    row = {"id": 7, "event_id": "0b7a5a5e-5f6b-4a53-9c1e-3a4f2b1c0d9e", "event_type": "billing.invoice.paid",
           "created_at": "2026-11-27T16:25:11.123456Z", "payload": {"id": 1, "amount": "19.90", "note": "é"},
           "metadata": {"source": "api"}, "labels": {"tenant": "acme"}}
    row.update(row_overrides)
    row = {key: value for key, value in row.items() if value is not _MISSING}
    return {"id": "0/16B37A0:3", "op": "insert", "schema": "public", "table": "outbox", "key": {"id": 7},
            "new": row, "old": None, "unchanged_toast": [], "xid": 771, "lsn": "0/16B3748",
            "commit_lsn": "0/16B37A0", "commit_time": "2026-11-27T16:25:12.5Z", "seq": 3}


_MISSING = object()


def table_event(op="insert", event_id="0/16B37A0:0", table="items"):
    new = None if op == "delete" else {"id": 1, "name": "widget"}
    return {"id": event_id, "op": op, "schema": "public", "table": table, "key": {"id": 1}, "new": new,
            "old": {"id": 1} if op == "delete" else None, "unchanged_toast": [], "xid": 771,
            "lsn": "0/16B3748", "commit_lsn": "0/16B37A0", "commit_time": "2026-11-27T16:25:12Z", "seq": 0}


def expected_body(**overrides):
    body = {"application_id": APPLICATION_ID, "event_id": "0b7a5a5e-5f6b-4a53-9c1e-3a4f2b1c0d9e",
            "event_type": "billing.invoice.paid", "payload": '{"id":1,"amount":"19.90","note":"é"}',
            "payload_content_type": "application/json", "metadata": {"source": "api"},
            "occurred_at": "2026-11-27T16:25:11.123456Z", "labels": {"tenant": "acme"}}
    body.update(overrides)
    return body


# Follows Hook0's server: rate limiter, then bearer authentication (middleware), then the JSON body
# extractor (Content-Type, types), then authorisation for the application, then validation (422),
# then payload content type and payload, then the insert (duplicate event id: 409; unknown event
# type: 400).  Scripted failures answer before everything, as the rate limiter does.

@dataclasses.dataclass
class RecordedRequest:
    method: str
    target: str
    headers: dict[str, str]    # lower-case names
    body: bytes
    status: int = 0            # what the double answered

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def json(self):
        return json.loads(self.body)


_PROBLEM_TITLES = {
    "AuthNoAuthorizationHeader": (401, "No `Authorization` header was found in the HTTP request"),
    "AuthInvalidAuthorizationHeader": (400, "`Authorization` header is invalid"),
    "AuthInvalidBiscuit": (403, "Invalid Biscuit"),
    "Forbidden": (403, "Insufficient rights"),
    "JsonPayload": (400, "Provided body could not be decoded as JSON"),
    "Validation": (422, "Provided input is malformed"),
    "EventAlreadyIngested": (409, "Event already Ingested"),
    "EventTypeDoesNotExist": (400, "Invalid event type"),
    "EventInvalidPayloadContentType": (400, "Invalid event payload content type"),
    "EventInvalidJsonPayload": (400, "Invalid event JSON payload"),
    "EventInvalidBase64Payload": (400, "Invalid event base64 payload"),
    "TooManyEventsToday": (429, "Exceeded number of events that can be ingested in this organization today"),
    "RateLimited": (429, "Too many requests"),
    "ServiceUnavailable": (503, "Service unavailable"),
    "InternalServerError": (500, "Something wrong happened"),
    "NotFound": (404, "Item not found"),
}
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_PAYLOAD_CONTENT_TYPES = ("text/plain", "application/json", "application/octet-stream+base64")


def problem(problem_id, detail="", validation=None, headers=()):
    """A Hook0 RFC 7807 answer: (status, headers, body)."""
    status, title = _PROBLEM_TITLES[problem_id]
    body = {"type": f"https://hook0.com/documentation/errors/{problem_id}", "title": title, "status": status,
            "detail": detail, "id": problem_id, "validation": validation}
    return status, [("content-type", "application/problem+json"), *headers], json.dumps(body).encode()


class _Rejected(Exception):
    def __init__(self, answer):
        self.answer = answer


class Hook0Double(Observed):
    """A Hook0 API on 127.0.0.1 (port 0): `url` (no path: clients append /api/v1), `events`
    (accepted event bodies), `event_types`, `requests` (every request with the status answered)."""

    def __init__(self, *, token=TOKEN, application_id=APPLICATION_ID, event_types=("billing.invoice.paid",)):
        super().__init__()
        self.token = token
        self.application_id = application_id
        self.event_types: set[str] = set(event_types)
        self.events: list[dict] = []
        self.requests: list[RecordedRequest] = []
        self.url = ""
        self._scripted: list[tuple[str, tuple]] = []

    @classmethod
    @asynccontextmanager
    async def serve(cls, **kwargs):
        """`async with Hook0Double.serve() as double:` listens until the block ends.  An exception
        of the block comes out as itself, not wrapped in an ExceptionGroup by the nursery (trio
        0.25+), so `pytest.raises` around the block works."""
        double = cls(**kwargs)
        body_error = None
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, double._serve_connection, 0, host="127.0.0.1"))
            double.url = "http://127.0.0.1:%d" % listeners[0].socket.getsockname()[1]
            try:
                yield double
            except Exception as error:
                body_error = error
            nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error

    # -- scripting and waiting ------------------------------------------------------------------

    def fail_next(self, kind, *, times=1, retry_after="7", path="/api/v1/event"):
        """Answers the next `times` requests to `path` with a failure: "rate_limited_text" (the
        rate limiter's text/plain 429), "rate_limited" (problem 429), "too_many_events_today",
        "service_unavailable" (503), "internal" (500), or any problem id of _PROBLEM_TITLES."""
        retry = [("retry-after", retry_after)] if retry_after else []
        if kind == "rate_limited_text":
            answer = (429, [("content-type", "text/plain; charset=utf-8"), *retry],
                      f"Too many requests, retry in {retry_after or 1}s".encode())
        else:
            problem_id = {"rate_limited": "RateLimited", "too_many_events_today": "TooManyEventsToday",
                          "service_unavailable": "ServiceUnavailable", "internal": "InternalServerError",
                          }.get(kind, kind)
            headers = retry if problem_id in ("RateLimited", "ServiceUnavailable") else []
            answer = problem(problem_id, detail=f"scripted {problem_id}", headers=headers)
        self._scripted.extend([(path, answer)] * times)

    # -- HTTP/1.1 with h11 ------------------------------------------------------------------------

    async def _serve_connection(self, stream):
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._receive_request(connection, stream)
                if request is None:
                    return
                status, headers, body = self._answer(request)
                request.status = status
                self.requests.append(request)
                self._notify()
                headers = [*headers, ("content-length", str(len(body)))]
                await stream.send_all(connection.send(h11.Response(status_code=status, headers=headers)))
                await stream.send_all(connection.send(h11.Data(data=body)))
                await stream.send_all(connection.send(h11.EndOfMessage()))
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    @staticmethod
    async def _receive_request(connection, stream):
        request = await receive_h11_request(stream, connection)
        return None if request is None else RecordedRequest(*request)

    # -- the API --------------------------------------------------------------------------------

    def _answer(self, request):
        path = request.path.rstrip("/")
        for index, (scripted_path, answer) in enumerate(self._scripted):
            if scripted_path == path:
                del self._scripted[index]
                return answer
        routes = {("POST", "/api/v1/event"): self._ingest, ("GET", "/api/v1/event_types"): self._list_types,
                  ("POST", "/api/v1/event_types"): self._create_type}
        handler = routes.get((request.method, path))
        if handler is None:
            return problem("NotFound")
        try:
            self._authenticate(request)
            return handler(request)
        except _Rejected as rejected:
            return rejected.answer

    def _authenticate(self, request):
        header = request.headers.get("authorization")
        if header is None:
            raise _Rejected(problem("AuthNoAuthorizationHeader"))
        if not header.startswith("Bearer "):
            raise _Rejected(problem("AuthInvalidAuthorizationHeader"))
        if header[len("Bearer "):] != self.token:
            raise _Rejected(problem("AuthInvalidBiscuit"))

    def _json_body(self, request, fields):
        """actix's Json extractor: Content-Type, syntax, and serde's field types (400 JsonPayload)."""
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise _Rejected(problem("JsonPayload", "Content-Type header should be set to 'application/json'"))
        try:
            body = json.loads(request.body)
        except ValueError as error:
            raise _Rejected(problem("JsonPayload", f"JSON deserialization error: {error}")) from None
        if not isinstance(body, dict):
            raise _Rejected(problem("JsonPayload", "JSON deserialization error: expected an object"))
        for name, check in fields.items():
            if not check(body.get(name)):      # a missing field is None: refused unless optional
                raise _Rejected(problem("JsonPayload", f"JSON deserialization error: invalid or missing `{name}`"))
        if body["application_id"] != self.application_id:
            raise _Rejected(problem("Forbidden", "You don't have the right to access or edit this resource."))
        return body

    def _ingest(self, request):
        body = self._json_body(request, {
            "application_id": _is_uuid, "event_id": _is_uuid, "event_type": _is_str, "payload": _is_str,
            "payload_content_type": _is_str, "occurred_at": _is_rfc3339, "labels": _is_string_map,
            "metadata": lambda value: value is None or _is_string_map(value)})
        errors = _validate_event(body)
        if errors:
            raise _Rejected(problem("Validation", "; ".join(errors.keys()), validation=errors))
        _check_payload(body["payload_content_type"], body["payload"])
        event_id = str(uuid.UUID(body["event_id"]))
        if any(str(uuid.UUID(event["event_id"])) == event_id for event in self.events):
            return problem("EventAlreadyIngested")
        if body["event_type"] not in self.event_types:
            return problem("EventTypeDoesNotExist", "Event type does not exist or was deactivated. "
                                                    "You should (re)create it.")
        self.events.append(body)
        received_at = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        return 201, [("content-type", "application/json")], json.dumps(
            {"application_id": body["application_id"], "event_id": body["event_id"], "received_at": received_at}
        ).encode()

    def _list_types(self, request):
        query = dict(part.split("=", 1) for part in request.target.partition("?")[2].split("&") if "=" in part)
        if not _is_uuid(query.get("application_id")):
            return 400, [("content-type", "text/plain")], b"Query deserialize error: missing field `application_id`"
        if query["application_id"] != self.application_id:
            return problem("Forbidden")
        return 200, [("content-type", "application/json")], json.dumps(
            [_event_type_json(name) for name in sorted(self.event_types)]).encode()

    def _create_type(self, request):
        body = self._json_body(request, {"application_id": _is_uuid, "service": _is_str,
                                         "resource_type": _is_str, "verb": _is_str})
        errors = {name: [_validation_error("length", f"{name} must be 1 to 50 characters")]
                  for name in ("service", "resource_type", "verb") if not 1 <= len(body[name]) <= 50}
        if errors:
            raise _Rejected(problem("Validation", "; ".join(errors), validation=errors))
        name = f"{body['service']}.{body['resource_type']}.{body['verb']}"
        self.event_types.add(name)    # an existing type is reactivated: 201 too
        return 201, [("content-type", "application/json")], json.dumps(_event_type_json(name)).encode()


def _is_uuid(value):
    try:
        uuid.UUID(value)
        return True
    except (TypeError, ValueError, AttributeError):
        return False


def _is_str(value):
    return isinstance(value, str)


def _is_rfc3339(value):
    return isinstance(value, str) and _RFC3339.fullmatch(value) is not None


def _is_string_map(value):
    return isinstance(value, dict) and all(isinstance(item, str) for item in value.values())


def _validation_error(code, message):
    return {"code": code, "message": message, "params": {}}


def _validate_event(body):
    """validator rules of EventPost: lengths in characters for event_type and payload, in bytes for
    labels and metadata properties."""
    errors = {}
    if not 1 <= len(body["event_type"]) <= 200 or re.search(r"[\x00-\x1f\x7f-\x9f]", body["event_type"]):
        errors["event_type"] = [_validation_error("length", "event_type must be 1 to 200 characters")]
    if len(body["payload"]) > 699_050:
        errors["payload"] = [_validation_error("length", "payload is at most 699050 characters")]
    if not 1 <= len(body["payload_content_type"]) <= 100:
        errors["payload_content_type"] = [_validation_error("length", "1 to 100 characters")]
    for name, low, high in (("metadata", 0, 50), ("labels", 1, 10)):
        values = body.get(name) or {}
        if not low <= len(values) <= high:
            errors[name] = [_validation_error(f"{name}-size", f"{name} must have {low} to {high} properties")]
        elif any(not 1 <= len(text.encode()) <= 50 for item in values.items() for text in item):
            errors[name] = [_validation_error(f"{name}-property-length",
                                              f"{name} properties and values must be 1 to 50 bytes")]
    return errors


def _check_payload(content_type, payload):
    if content_type not in _PAYLOAD_CONTENT_TYPES:
        raise _Rejected(problem("EventInvalidPayloadContentType", "Valid content types are: "
                                + ", ".join(_PAYLOAD_CONTENT_TYPES)))
    if content_type == "application/json":
        try:
            json.loads(payload)
        except ValueError as error:
            raise _Rejected(problem("EventInvalidJsonPayload", f"not valid JSON: {error}.")) from None
    elif content_type == "application/octet-stream+base64":
        try:
            base64.b64decode(payload, validate=True)
        except ValueError as error:
            raise _Rejected(problem("EventInvalidBase64Payload", f"not valid base64: {error}")) from None


def _event_type_json(name):
    service, resource_type, verb = name.split(".", 2)
    return {"service_name": service, "resource_type_name": resource_type, "verb_name": verb,
            "event_type_name": name}



class TestHook0Mapping:
    def build(self, event, **config):
        return w.build_hook0_event(event, offline_config(HOOK0_FIELDS, **config), APPLICATION_ID)

    def test_outbox_insert_exact_body(self):
        assert self.build(outbox_event()) == expected_body()

    def test_outbox_update_is_sent_like_an_insert(self):
        event = {**outbox_event(), "op": "update"}
        assert self.build(event) == expected_body()

    @pytest.mark.parametrize("created_at, occurred_at", [
        ("2026-11-27T16:25:11.123456Z", "2026-11-27T16:25:11.123456Z"),
        ("2026-11-27T16:25:11Z", "2026-11-27T16:25:11Z"),
        ("2026-11-27 16:25:11.5+00", "2026-11-27T16:25:11.5Z"),
        ("2026-11-27T18:25:11.12+02:00", "2026-11-27T16:25:11.12Z"),
        ("2026-11-27T00:30:00-05:30", "2026-11-27T06:00:00Z"),
        ("2026-11-27T16:25:11.000100", "2026-11-27T16:25:11.0001Z"),   # no zone: UTC
        ("0099-01-02T03:04:05+00", "0099-01-02T03:04:05Z"),
    ])
    def test_occurred_at_is_created_at_in_utc(self, created_at, occurred_at):
        assert self.build(outbox_event(created_at=created_at))["occurred_at"] == occurred_at

    def test_null_created_at_is_the_commit_time(self):
        assert self.build(outbox_event(created_at=None))["occurred_at"] == "2026-11-27T16:25:12.5Z"

    def test_labels_and_metadata_become_string_maps(self):
        values = {"n": 3, "f": 1.5, "t": True, "no": False, "s": "é", "gone": None, "o": {"a": [1, "x"]},
                  "l": [1, None]}
        body = self.build(outbox_event(labels={"tenant": "acme", "n": 3, "gone": None}, metadata=values))
        assert body["labels"] == {"tenant": "acme", "n": "3"}
        assert body["metadata"] == {"n": "3", "f": "1.5", "t": "true", "no": "false", "s": "é",
                                    "o": '{"a":[1,"x"]}', "l": "[1,null]"}

    @pytest.mark.parametrize("metadata", [None, {}, {"gone": None}])
    def test_null_or_empty_metadata_is_an_empty_object(self, metadata):
        assert self.build(outbox_event(metadata=metadata))["metadata"] == {}

    def test_payload_is_compact_json_text_of_any_json_value(self):
        assert self.build(outbox_event(payload=[1, {"a": "ü"}]))["payload"] == '[1,{"a":"ü"}]'
        assert self.build(outbox_event(payload="text"))["payload"] == '"text"'
        assert self.build(outbox_event(payload=0))["payload"] == "0"

    @pytest.mark.parametrize("labels", [None, {}, {"gone": None}])
    def test_empty_labels_take_hook0_labels(self, labels):
        body = self.build(outbox_event(labels=labels), hook0_labels=(("env", "prod"), ("team", "core")))
        assert body["labels"] == {"env": "prod", "team": "core"}

    def test_row_labels_win_over_hook0_labels(self):
        body = self.build(outbox_event(), hook0_labels=(("env", "prod"),))
        assert body["labels"] == {"tenant": "acme"}

    @pytest.mark.parametrize("column, value, fragment", [
        ("payload", None, "column payload is NULL or missing"),
        ("payload", "x" * 699_049, "column payload is 699051 characters"),
        ("event_id", None, "column event_id is NULL or missing"),
        ("event_id", "not-a-uuid", "column event_id is 'not-a-uuid', not a UUID"),
        ("event_id", 42, "column event_id is '42', not a UUID"),
        ("event_type", None, "column event_type is NULL or missing"),
        ("event_type", "", "column event_type is 0 characters long"),
        ("event_type", "a" * 201, "column event_type is 201 characters long"),
        ("event_type", "a.b\n", "column event_type contains control characters"),
        ("event_type", 5, "column event_type is not text"),
        ("labels", None, "column labels is empty and HOOK0_LABELS is not set"),
        ("labels", {}, "column labels is empty and HOOK0_LABELS is not set"),
        ("labels", ["acme"], "column labels is a JSON list, not an object"),
        ("labels", "acme", "column labels is a JSON str, not an object"),
        ("labels", {f"k{i}": "v" for i in range(11)}, "column labels has 11 entries; Hook0 accepts 1 to 10"),
        ("labels", {"tenant": "é" * 26}, "column labels has a value of 52 bytes"),
        ("labels", {"k" * 51: "v"}, "column labels has a key of 51 bytes"),
        ("labels", {"tenant": ""}, "column labels has a value of 0 bytes"),
        ("metadata", [1], "column metadata is a JSON list, not an object"),
        ("metadata", {f"k{i}": i for i in range(51)}, "column metadata has 51 entries; Hook0 accepts 0 to 50"),
        ("metadata", {"k": "v" * 51}, "column metadata has a value of 51 bytes"),
        ("created_at", "infinity", "column created_at is 'infinity', not a date and time"),
    ])
    def test_undeliverable_row_names_table_and_column(self, column, value, fragment):
        with pytest.raises(w.DeliveryError) as caught:
            self.build(outbox_event(**{column: value}))
        assert caught.value.retryable is False
        assert "table public.outbox" in str(caught.value)
        assert "event 0/16B37A0:3" in str(caught.value)
        assert fragment in str(caught.value)

    def test_largest_payload_is_accepted(self):
        body = self.build(outbox_event(payload="x" * 699_048))
        assert len(body["payload"]) == 699_050

    def test_event_id_is_sent_in_canonical_form(self):
        body = self.build(outbox_event(event_id="{0B7A5A5E5F6B4A539C1E3A4F2B1C0D9E}"))
        assert body["event_id"] == "0b7a5a5e-5f6b-4a53-9c1e-3a4f2b1c0d9e"

    @pytest.mark.parametrize("column", ["payload", "metadata", "labels"])
    def test_large_unchanged_value_is_undeliverable_not_a_guess(self, column):
        """An update leaving a TOASTed column alone does not carry it: never {} or HOOK0_LABELS in
        its place, never a crash."""
        event = outbox_event(**{column: _MISSING})
        event.update(op="update", unchanged_toast=[column])
        with pytest.raises(w.DeliveryError, match=f"column {column} was not sent by PostgreSQL") as info:
            self.build(event)
        assert not info.value.retryable

    def test_outbox_is_decided_by_the_columns_at_decoding_not_the_current_ones(self):
        """An ALTER TABLE decoded while an outbox row waits for delivery (or a retry) must not turn
        that row into an ignored "not an outbox" row, acknowledged and lost."""
        event = outbox_event()
        now_plain = ("id", "event_id", "event_type", "created_at", "payload", "labels")  # metadata dropped
        assert w.is_hook0_outbox_event(event, (), now_plain)
        body = w.build_hook0_event(event, offline_config(HOOK0_FIELDS), APP_ID, table_columns=now_plain)
        assert body is not None
        assert body["event_type"] == "billing.invoice.paid"
        plain = {**event, "new": {"id": 7, "name": "x"}}
        assert not w.is_hook0_outbox_event(plain, (), w.HOOK0_OUTBOX_COLUMNS + ("id",))

    @pytest.mark.parametrize("table_events", [False, True])
    def test_outbox_deletes_truncates_and_messages_are_ignored(self, table_events):
        full_delete = {**outbox_event(), "op": "delete", "old": outbox_event()["new"], "new": None}
        truncate = {**outbox_event(), "op": "truncate", "new": None, "key": None, "cascade": False,
                    "restart_identity": False}
        message = {"id": "0/1:m", "op": "message", "schema": None, "table": None, "prefix": "p",
                   "content": "c", "transactional": False}
        for event in (full_delete, truncate, message):
            assert self.build(event, hook0_table_events=table_events) is None
        key_only_delete = {**outbox_event(), "op": "delete", "old": {"id": 7}, "new": None}
        config = offline_config(HOOK0_FIELDS, hook0_table_events=table_events)
        assert w.build_hook0_event(key_only_delete, config, APPLICATION_ID,
                                   known_outbox_tables={("public", "outbox")}) is None

    def test_other_tables_are_ignored_without_table_events(self):
        for op in ("insert", "update", "delete"):
            assert self.build(table_event(op)) is None
        # A table lacking one of the outbox columns is not an outbox table.
        assert self.build(outbox_event(payload=_MISSING)) is None

    @pytest.mark.parametrize("schema, table, event_type, labels", [
        ("my.schema", "t", "my_schema.t.insert", {"schema": "my.schema", "table": "t"}),
        ("public", "x" * 63, f"public.{'x' * 41}~{hashlib.sha256(b'x' * 63).hexdigest()[:8]}.insert",
         {"schema": "public", "table": f"{'x' * 41}~{hashlib.sha256(b'x' * 63).hexdigest()[:8]}"}),
        ("public", "\u00e9" * 30, None, None),  # 60 bytes: shortened on a character boundary
    ])
    def test_table_event_for_names_hook0_would_refuse(self, schema, table, event_type, labels):
        body = self.build({**table_event("insert"), "schema": schema, "table": table}, hook0_table_events=True)
        if event_type is not None:
            assert (body["event_type"], body["labels"]) == (event_type, labels)
        assert w.split_hook0_event_type(body["event_type"]) is not None
        assert all(1 <= len(v.encode()) <= 50 for v in body["labels"].values())
        assert body["labels"]["table"] == w.hook0_name(table)  # the same every time

    def test_table_event_exact_body(self):
        event = table_event("insert")
        # HOOK0_LABELS is for outbox rows: a table event's labels are exactly schema and table.
        body = self.build(event, hook0_table_events=True, hook0_labels=(("env", "prod"), ("table", "x")))
        assert body == {
            "application_id": APPLICATION_ID,
            "event_id": w.build_hook0_table_event_id(event, "sub"),
            "event_type": "public.items.insert",
            "payload": json.dumps(event, separators=(",", ":"), ensure_ascii=False),
            "payload_content_type": "application/json",
            "metadata": {},
            "occurred_at": "2026-11-27T16:25:12Z",
            "labels": {"table": "items", "schema": "public"},
        }

    @pytest.mark.parametrize("op", ["insert", "update", "delete"])
    def test_table_event_types_follow_the_operation(self, op):
        assert self.build(table_event(op), hook0_table_events=True)["event_type"] == f"public.items.{op}"

    def test_backfilled_reads(self):
        read = {**table_event("insert", event_id="0/16B3748:r0"), "op": "read", "xid": None, "commit_lsn": None,
                "commit_time": None, "seq": None}
        body = self.build(read, hook0_table_events=True)
        assert body["event_type"] == "public.items.read"
        assert body["payload"] == w.encode_json(read)
        assert self.build(read) is None  # without HOOK0_TABLE_EVENTS, as any table's row
        outbox_read = {**outbox_event(), "op": "read", "xid": None, "commit_lsn": None, "commit_time": None,
                       "seq": None}
        assert self.build(outbox_read) is None  # its event went out when the row was inserted
        assert self.build(outbox_read, hook0_table_events=True) is None

    def test_table_event_ids_are_deterministic(self):
        first = self.build(table_event(event_id="0/16B37A0:0"), hook0_table_events=True)["event_id"]
        again = self.build(table_event(event_id="0/16B37A0:0"), hook0_table_events=True)["event_id"]
        other = self.build(table_event(event_id="0/16B37A0:1"), hook0_table_events=True)["event_id"]
        assert first == again != other
        assert uuid.UUID(first).version == 5
        # Fixed forever: a changed namespace would re-send every table event after an upgrade.
        assert w.HOOK0_TABLE_EVENT_NAMESPACE == uuid.UUID("86ce6e04-7559-46d8-9ac2-f6c5bdb0c64b")
        assert first == str(uuid.uuid5(w.HOOK0_TABLE_EVENT_NAMESPACE, "sub:public.items:0/16B37A0:0"))

    @pytest.mark.parametrize("url, base", [
        ("https://hook0.example", "https://hook0.example/api/v1"),
        ("https://hook0.example/", "https://hook0.example/api/v1"),
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081/api/v1"),
        ("https://hook0.example/api/v1", "https://hook0.example/api/v1"),
        ("https://hook0.example/api/v1/", "https://hook0.example/api/v1"),
        ("https://example.com/hook0/api/v1//", "https://example.com/hook0/api/v1"),
        ("https://example.com/custom", "https://example.com/custom"),
    ])
    def test_api_base(self, url, base):
        assert w.hook0_api_base(url) == base

    @pytest.mark.parametrize("event_type, parts", [
        ("billing.invoice.paid", ("billing", "invoice", "paid")),
        ("public.items.insert", ("public", "items", "insert")),
        ("refund", None), ("a.b", None), ("a.b.c.d", None), ("a..c", None), ("a.b." + "v" * 51, None),
    ])
    def test_split_event_type(self, event_type, parts):
        assert w.split_hook0_event_type(event_type) == parts

    @pytest.mark.parametrize("header, body, seconds", [
        ("7", b"", 7.0), (" 12 ", b"", 12.0), (None, b"Too many requests, retry in 3s", 3.0),
        ("2", b"Too many requests, retry in 3s", 2.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", b"", 0.0), (None, b"", None), ("soon", b"", None),
    ])
    def test_retry_after(self, header, body, seconds):
        assert w.decode_hook0_retry_after(header, body) == seconds

    def test_decode_answer_both_429_forms(self):
        text = w.HttpResponse(429, {"content-type": "text/plain; charset=utf-8", "retry-after": "4"},
                              b"Too many requests, retry in 4s")
        answer = w.decode_hook0_answer(text)
        assert (answer.status, answer.problem_id, answer.retry_after_s) == (429, "", 4.0)
        assert "Too many requests, retry in 4s" in answer.describe()
        status, headers, body = problem("RateLimited", "slow down", headers=[("retry-after", "9")])
        answer = w.decode_hook0_answer(w.HttpResponse(status, dict(headers), body))
        assert (answer.status, answer.problem_id, answer.retry_after_s) == (429, "RateLimited", 9.0)

    def test_token_from_a_secret_file_is_stripped_and_a_bad_one_is_exit_2(self):
        assert load({**HOOK0, "HOOK0_API_TOKEN": "Hook0-T0ken-Secret\n"}).hook0_api_token == "Hook0-T0ken-Secret"
        for bad in ("tok en", "caf\u00e9-token", "tok\x00en"):
            with pytest.raises(w.ConfigError, match="HOOK0_API_TOKEN") as info:
                load({**HOOK0, "HOOK0_API_TOKEN": bad})
            assert bad not in str(info.value)

    def test_api_url_path_is_percent_encoded_shown_without_it_and_a_query_refused(self):
        config = offline_config(HOOK0_FIELDS, hook0_api_url="https://user:pw@hook0.example.org:8443/ho\u00f6k/")
        sink = w.Hook0Sink(config, RecordingAlerter())
        assert sink._api_path == "/ho%C3%B6k"
        assert sink._shown_base == "https://hook0.example.org:8443/..."
        with pytest.raises(w.ConfigError, match="HOOK0_API_URL"):
            load({**HOOK0, "HOOK0_API_URL": "https://hook0.example.org/api/v1?x=1"})

    def test_decode_answer_never_raises_on_garbage(self):
        answer = w.decode_hook0_answer(w.HttpResponse(500, {"content-type": "application/json"}, b"\xff{"))
        assert answer.status == 500
        assert answer.problem_id == ""

    @pytest.mark.parametrize("status", [201, 400])
    def test_decode_answer_never_raises_on_deep_or_huge_json(self, status):
        json_type = {"content-type": "application/problem+json"}
        deep = w.decode_hook0_answer(w.HttpResponse(status, json_type, b"[" * 5000 + b"]" * 5000))
        assert deep.status == status
        assert deep.problem_id == ""
        huge = w.decode_hook0_answer(w.HttpResponse(
            422, json_type, b'{"id": "Invalid", "validation": {"n": 1e999, "deep": ' + b"[" * 900 + b"]" * 900 + b"}}"))
        assert huge.problem_id == "Invalid"
        assert huge.describe().startswith("422 Invalid")

    def test_status_classes(self):
        assert [w.is_retryable_status(status) for status in (500, 503, 599, 600, 999, 429, 400)] == [
            True, True, True, False, False, True, False]

    def test_api_url_credentials_not_in_the_config_repr(self):
        config = load({**HOOK0, "HOOK0_API_URL": "https://u:Url-Pw-9@hook0.example.org/"})
        assert "Url-Pw-9" not in repr(config)
        assert "Url-Pw-9" in w.config_secrets(config)

    def test_a_secret_escaped_inside_validation_json_is_scrubbed(self):
        secret = 'Tok"en\\Secret-9'
        body = json.dumps({"id": "Invalid", "validation": {"field": [secret]}}).encode()
        answer = w.decode_hook0_answer(w.HttpResponse(422, {"content-type": "application/problem+json"}, body),
                                       [secret])
        assert "Secret-9" not in answer.describe()
        assert "***" in answer.describe()

    def test_secrets_never_change_what_a_problem_id_means(self):
        """Scrubbing is for what is shown: a secret that happens to occur in a problem id must not
        turn a 409 EventAlreadyIngested (a redelivery) into an undeliverable event."""
        body = b'{"id": "EventAlreadyIngested", "title": "Ingested already", "detail": "Ingested"}'
        answer = w.decode_hook0_answer(w.HttpResponse(409, {"content-type": "application/problem+json"}, body),
                                       ["Ingested"])
        assert answer.problem_id == "EventAlreadyIngested"
        assert "Ingested" not in answer.describe()
        assert "***" in answer.describe()

    def test_a_long_secret_echoed_is_scrubbed_before_the_body_is_shortened(self):
        token = "biscuit-" + "t" * 300  # Hook0 tokens are long: cut at 300 bytes, its start would show
        body = f"{'x' * 280} you sent {token}".encode()
        answer = w.decode_hook0_answer(w.HttpResponse(400, {"content-type": "text/plain"}, body), [token])
        assert token[:12] not in answer.describe()
        assert "***" in answer.describe()
        body = f"{'x' * 180} you sent {token}".encode()  # the HTTP sink shows 200 characters
        http = w.classify_http_response(w.HttpResponse(400, {}, body).scrubbed([token]), "http://h")
        assert token[:12] not in str(http)
        assert "***" in str(http)


@asynccontextmanager
async def open_hook0(double_options=None, **config):
    """A Hook0Double and a Hook0Sink configured for it."""
    async with Hook0Double.serve(**(double_options or {})) as double:
        alerter = RecordingAlerter()
        sink = w.Hook0Sink(offline_config(HOOK0_FIELDS, hook0_api_url=double.url, **config), alerter)
        try:
            yield double, sink, alerter
        finally:
            await sink.aclose()


def assert_no_token(*texts):
    for text in texts:
        assert TOKEN not in str(text)


class TestHook0Sink:
    async def test_outbox_row_arrives_as_exact_body(self):
        async with open_hook0() as (double, sink, alerter):
            await sink.deliver([outbox_event()])
        assert double.events == [expected_body()]
        request = double.requests[0]
        assert (request.method, request.path, request.status) == ("POST", "/api/v1/event", 201)
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert request.headers["content-type"] == "application/json"
        assert json.loads(request.body) == expected_body()
        assert alerter.alerts == []

    async def test_api_url_with_path_is_used_as_is(self):
        async with Hook0Double.serve() as double:
            sink = w.Hook0Sink(offline_config(HOOK0_FIELDS, hook0_api_url=double.url + "/api/v1/"), RecordingAlerter())
            await sink.deliver([outbox_event()])
            await sink.aclose()
        assert [request.path for request in double.requests] == ["/api/v1/event"]

    async def test_redelivery_answered_409_counts_as_delivered(self):
        async with open_hook0() as (double, sink, alerter):
            await sink.deliver([outbox_event()])
            await sink.deliver([outbox_event()])     # e.g. after a restart before the ack
        assert [request.status for request in double.requests] == [201, 409]
        assert len(double.events) == 1

    async def test_events_of_a_batch_are_sent_in_order(self):
        ids = [str(uuid.UUID(int=n)) for n in range(1, 4)]
        async with open_hook0() as (double, sink, alerter):
            await sink.deliver([outbox_event(event_id=event_id) for event_id in ids])
        assert [event["event_id"] for event in double.events] == ids

    async def test_failure_in_a_batch_tells_how_many_were_delivered(self):
        events = [outbox_event(event_id=str(uuid.UUID(int=1))),
                  outbox_event(event_id=str(uuid.UUID(int=2)), event_type="billing.invoice.voided"),
                  outbox_event(event_id=str(uuid.UUID(int=3)))]
        async with open_hook0() as (double, sink, alerter):
            with pytest.raises(w.DeliveryError) as caught:
                await sink.deliver(events)
            assert (caught.value.delivered, caught.value.failed, caught.value.retryable) == (1, 1, False)
            assert [event["event_id"] for event in double.events] == [str(uuid.UUID(int=1))]
            double.fail_next("service_unavailable", retry_after="7")
            with pytest.raises(w.DeliveryError) as caught:
                await sink.deliver(events[2:])
        error = caught.value
        assert (error.delivered, error.failed, error.retryable, error.retry_after) == (0, 1, True, 7.0)
        assert "503 ServiceUnavailable" in str(error)

    async def test_unknown_event_type_without_create_alerts_and_is_undeliverable(self):
        async with open_hook0() as (double, sink, alerter):
            with pytest.raises(w.DeliveryError) as caught:
                await sink.deliver([outbox_event(event_type="billing.invoice.refunded")])
        assert caught.value.retryable is False
        assert "billing.invoice.refunded" in str(caught.value)
        assert "HOOK0_CREATE_EVENT_TYPES" in str(caught.value)
        assert alerter.keys() == ["hook0-event-type:billing.invoice.refunded"]
        assert [(request.path, request.status) for request in double.requests] == [("/api/v1/event", 400)]
        assert double.events == []

    async def test_unknown_event_type_is_created_then_delivered(self):
        async with open_hook0(hook0_create_event_types=True) as (double, sink, alerter):
            await sink.deliver([outbox_event(event_type="billing.invoice.refunded")])
        assert [(r.method, r.path, r.status) for r in double.requests] == [
            ("POST", "/api/v1/event", 400), ("POST", "/api/v1/event_types", 201), ("POST", "/api/v1/event", 201)]
        assert double.requests[1].json() == {"application_id": APPLICATION_ID, "service": "billing",
                                             "resource_type": "invoice", "verb": "refunded"}
        assert double.requests[1].headers["authorization"] == f"Bearer {TOKEN}"
        assert "billing.invoice.refunded" in double.event_types
        assert double.events == [expected_body(event_type="billing.invoice.refunded")]
        assert alerter.alerts == []

    async def test_event_type_that_cannot_be_created_is_undeliverable(self):
        async with open_hook0(hook0_create_event_types=True) as (double, sink, alerter):
            with pytest.raises(w.DeliveryError) as caught:
                await sink.deliver([outbox_event(event_type="refund")])
        assert caught.value.retryable is False
        assert "'refund'" in str(caught.value)
        assert "service.resource_type.verb" in str(caught.value)
        assert [request.path for request in double.requests] == ["/api/v1/event"]

    async def test_table_events_create_their_types_and_use_stable_ids(self):
        events = [table_event("insert", "0/A:0"), table_event("update", "0/B:0"), table_event("delete", "0/C:0")]
        async with open_hook0(hook0_table_events=True, hook0_create_event_types=True) as (double, sink, alerter):
            for event in events:
                await sink.deliver([event])
            await sink.deliver([events[0]])   # redelivered after a restart: same id, 409
        assert [event["event_type"] for event in double.events] == [
            "public.items.insert", "public.items.update", "public.items.delete"]
        assert [event["event_id"] for event in double.events] == [
            w.build_hook0_table_event_id(event, "sub") for event in events]
        assert double.requests[-1].status == 409
        assert [json.loads(event["payload"]) for event in double.events] == events

    async def test_rejected_token_is_an_auth_error_with_an_alert_never_retried(self, tmp_path):
        async with open_hook0(double_options={"token": "another-token"}, on_failure="retry",
                              dead_letter_file=str(tmp_path / "dead.jsonl")) as (double, sink, alerter):
            reliable = w.ReliableSink(sink, sink.config, alerter, sleep=RecordingSleep())
            with pytest.raises(w.SinkAuthError) as caught:
                await reliable.deliver([outbox_event()])
        assert caught.value.exit_code == 4
        assert "HOOK0_API_TOKEN" in str(caught.value)
        assert "403 AuthInvalidBiscuit" in str(caught.value)
        assert [request.status for request in double.requests] == [403]
        assert "hook0-auth" in alerter.keys()
        assert_no_token(caught.value, *[text for alert in alerter.alerts for text in alert])
        assert not (tmp_path / "dead.jsonl").exists()

    async def test_empty_labels_with_hook0_labels_are_delivered(self):
        async with open_hook0(hook0_labels=(("env", "prod"),)) as (double, sink, alerter):
            await sink.deliver([outbox_event(labels={})])
        assert double.events[0]["labels"] == {"env": "prod"}

    async def test_empty_labels_without_hook0_labels_are_dead_lettered(self, tmp_path):
        dead_letter = tmp_path / "dead.jsonl"
        async with open_hook0(on_failure="skip", dead_letter_file=str(dead_letter)) as (double, sink, alerter):
            reliable = w.ReliableSink(sink, sink.config, alerter, sleep=RecordingSleep())
            await reliable.deliver([outbox_event(labels=None)])
        assert double.requests == []
        assert dead_letter.read_text().splitlines() == [
            json.dumps(outbox_event(labels=None), separators=(",", ":"), ensure_ascii=False)]

    async def test_null_payload_goes_to_the_dead_letter_file_in_stdout_format(self, tmp_path):
        dead_letter = tmp_path / "dead.jsonl"
        good = outbox_event(event_id=str(uuid.UUID(int=2)))
        async with open_hook0(on_failure="skip", dead_letter_file=str(dead_letter)) as (double, sink, alerter):
            reliable = w.ReliableSink(sink, sink.config, alerter, sleep=RecordingSleep())
            await reliable.deliver([outbox_event(payload=None)])
            await reliable.deliver([good])
            with pytest.raises(w.DeliveryError, match="table public.outbox .*column payload is NULL"):
                await sink.deliver([outbox_event(payload=None)])
        assert dead_letter.read_text() == json.dumps(
            outbox_event(payload=None), separators=(",", ":"), ensure_ascii=False) + "\n"
        assert [event["event_id"] for event in double.events] == [good["new"]["event_id"]]
        assert [request.status for request in double.requests] == [201]   # the NULL row was never sent

    async def test_event_too_deep_to_decode_is_dead_lettered_not_a_crash(self, tmp_path):
        dead_letter = tmp_path / "dead.jsonl"
        deep = w.Event('{"id":"0/16B37A0:0","op":"insert","schema":"public","table":"items","key":{"id":1},'
                       '"new":{"id":1,"doc":' + "[" * 5000 + "]" * 5000 + '}}')
        good = outbox_event(event_id=str(uuid.UUID(int=3)))
        async with open_hook0(on_failure="skip", dead_letter_file=str(dead_letter)) as (double, sink, alerter):
            with pytest.raises(w.DeliveryError, match="event 0/16B37A0:0 .*nested too deeply") as caught:
                await sink.deliver([deep])
            assert not caught.value.retryable
            await w.ReliableSink(sink, sink.config, alerter, sleep=RecordingSleep()).deliver([deep, good])
        assert dead_letter.read_text() == deep.line + "\n"
        assert [event["event_id"] for event in double.events] == [good["new"]["event_id"]]

    @pytest.mark.parametrize("kind", ["rate_limited_text", "rate_limited", "service_unavailable"])
    async def test_retry_after_is_honoured(self, kind):
        sleep = RecordingSleep()
        async with open_hook0() as (double, sink, alerter):
            double.fail_next(kind, times=2, retry_after="7")
            reliable = w.ReliableSink(sink, sink.config, alerter, sleep=sleep)
            await reliable.deliver([outbox_event()])
        assert [request.status for request in double.requests][-1] == 201
        assert [request.status for request in double.requests].count(201) == 1
        assert 7 in sleep.delays
        assert len(double.requests) == 3
        assert double.events == [expected_body()]

    async def test_retry_after_is_capped_at_the_maximum_delay(self):
        sleep = RecordingSleep()
        async with open_hook0(retry_max_delay_s=2.0) as (double, sink, alerter):
            double.fail_next("rate_limited_text", retry_after="3600")
            await w.ReliableSink(sink, sink.config, alerter, sleep=sleep).deliver([outbox_event()])
        assert sleep.delays
        assert max(sleep.delays) <= 2.0
        assert len(double.events) == 1

    @pytest.mark.parametrize("kind, status", [("rate_limited_text", 429), ("rate_limited", 429),
                                              ("too_many_events_today", 429), ("service_unavailable", 503),
                                              ("internal", 500)])
    async def test_transient_answers_are_retryable(self, kind, status):
        async with open_hook0() as (double, sink, alerter):
            double.fail_next(kind)
            with pytest.raises(w.DeliveryError) as caught:
                await sink.deliver([outbox_event()])
        assert caught.value.retryable is True
        assert str(status) in str(caught.value)

    async def test_daily_quota_alerts(self):
        async with open_hook0() as (double, sink, alerter):
            double.fail_next("too_many_events_today", times=2)
            for _ in range(2):
                with pytest.raises(w.DeliveryError):
                    await sink.deliver([outbox_event()])
        # The Alerter sends one mail per key per 5 minutes; the sink always uses the same key.
        assert alerter.keys() == ["hook0-quota", "hook0-quota"]

    @pytest.mark.parametrize("problem_id", ["Validation", "EventInvalidJsonPayload", "JsonPayload", "NotFound"])
    async def test_other_client_errors_are_undeliverable_with_the_problem(self, problem_id):
        async with open_hook0() as (double, sink, alerter):
            double.fail_next(problem_id)
            with pytest.raises(w.DeliveryError) as caught:
                await sink.deliver([outbox_event()])
        assert caught.value.retryable is False
        assert problem_id in str(caught.value)
        assert _PROBLEM_TITLES[problem_id][1] in str(caught.value)
        assert "table public.outbox" in str(caught.value)

    async def test_double_validation_is_reported(self):
        """A 422 from Hook0 carries its validation object into the error."""
        async with open_hook0() as (double, sink, alerter):
            status, headers, body = problem("Validation", "labels: too many",
                                            validation={"labels": [_validation_error("labels-size", "max 10")]})
            double._scripted.append(("/api/v1/event", (status, headers, body)))
            with pytest.raises(w.DeliveryError, match="422 Validation: .*labels-size"):
                await sink.deliver([outbox_event()])

    async def test_connection_refused_is_retryable(self):
        port = free_port()  # nothing listens there: connections are refused
        sink = w.Hook0Sink(offline_config(HOOK0_FIELDS, hook0_api_url=f"http://127.0.0.1:{port}"), RecordingAlerter())
        with pytest.raises(w.DeliveryError) as caught:
            await sink.deliver([outbox_event()])
        await sink.aclose()
        assert caught.value.retryable is True
        assert caught.value.delivered == 0
        assert_no_token(caught.value)

    async def test_non_outbox_rows_warn_once_per_table(self, caplog):
        caplog.set_level(logging.WARNING, logger="wal2http")
        async with open_hook0() as (double, sink, alerter):
            await sink.deliver([table_event("insert", "0/A:0"), table_event("update", "0/A:1"),
                                table_event("insert", "0/A:2", table="other"), table_event("delete", "0/A:3")])
        warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert "public.items" in warnings[0]
        assert "HOOK0_TABLE_EVENTS" in warnings[0]
        assert "public.other" in warnings[1]
        assert double.requests == []

    async def test_outbox_delete_after_insert_is_ignored_with_table_events(self):
        delete = {**outbox_event(), "op": "delete", "new": None, "old": {"id": 7}}
        async with open_hook0(hook0_table_events=True) as (double, sink, alerter):
            await sink.deliver([outbox_event(), delete])
        assert [request.status for request in double.requests] == [201]

    async def test_check_lists_event_types(self):
        async with open_hook0() as (double, sink, alerter):
            detail = await sink.check()
        assert "accepts the token" in detail
        request = double.requests[0]
        assert (request.method, request.target, request.status) == (
            "GET", f"/api/v1/event_types?application_id={APPLICATION_ID}", 200)
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert_no_token(detail)

    async def test_check_with_a_rejected_token(self):
        async with open_hook0(double_options={"token": "another-token"}) as (double, sink, alerter):
            with pytest.raises(w.SinkAuthError) as caught:
                await sink.check()
        assert_no_token(caught.value)

    async def test_check_with_a_failing_server(self):
        async with open_hook0() as (double, sink, alerter):
            double.fail_next("internal", path="/api/v1/event_types")
            with pytest.raises(w.DeliveryError, match="500"):
                await sink.check()

    async def test_token_is_never_logged_or_alerted(self, caplog, tmp_path):
        caplog.set_level(logging.DEBUG)
        messages = []
        async with open_hook0(on_failure="skip", dead_letter_file=str(tmp_path / "dead.jsonl"),
                              retry_max_attempts=2) as (double, sink, alerter):
            reliable = w.ReliableSink(sink, sink.config, alerter, sleep=RecordingSleep())
            for kind, times in (("internal", 2), ("too_many_events_today", 2), ("Validation", 1)):
                double.fail_next(kind, times=times)
                await reliable.deliver([outbox_event(event_id=str(uuid.uuid4()))])
            await reliable.deliver([outbox_event(event_type="billing.invoice.voided")])
            double.token = "rotated"
            for attempt in (sink.check(), sink.deliver([outbox_event()])):
                with pytest.raises(w.SinkAuthError) as caught:
                    await attempt
                messages.append(caught.value)
        assert {"hook0-quota", "hook0-event-type:billing.invoice.voided", "hook0-auth"} <= set(alerter.keys())
        assert len(double.events) == 0
        assert len((tmp_path / "dead.jsonl").read_text().splitlines()) == 4
        assert_no_token(*messages, *[record.getMessage() for record in caplog.records],
                        *[text for alert in alerter.alerts for text in alert])

    async def test_check_of_a_url_that_is_not_the_api(self):
        async with open_hook0() as (double, sink, alerter):
            double._scripted.append(("/api/v1/event_types", (200, [("content-type", "text/html")], b"<html>")))
            with pytest.raises(w.DeliveryError, match="is HOOK0_API_URL the Hook0 API"):
                await sink.check()

    async def test_errors_of_the_block_come_out_unwrapped(self):
        with pytest.raises(w.SinkAuthError):
            async with open_hook0(double_options={"token": "another-token"}) as (double, sink, alerter):
                await sink.deliver([outbox_event()])

    def test_application_id_must_be_a_uuid(self):
        with pytest.raises(w.ConfigError, match="HOOK0_APPLICATION_ID"):
            w.Hook0Sink(offline_config(HOOK0_FIELDS, hook0_application_id="acme"), RecordingAlerter())


class TestHook0Double:
    async def send(self, double, method, target, body=None, *, token=TOKEN, content_type="application/json"):
        headers = [("Content-Type", content_type)] if content_type else []
        if token is not None:
            headers.append(("Authorization", f"Bearer {token}"))
        client = w.HttpClient(double.url, timeout_s=5.0, headers=headers)
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
        try:
            response = await client.request(method, target, body=data)
        finally:
            await client.aclose()
        answer = json.loads(response.body) if "json" in response.headers.get("content-type", "") else None
        return response.status, (answer or {}).get("id") if isinstance(answer, dict) else answer

    async def test_authentication(self):
        async with Hook0Double.serve() as double:
            assert await self.send(double, "POST", "/api/v1/event", expected_body(), token=None) == (
                401, "AuthNoAuthorizationHeader")
            assert await self.send(double, "POST", "/api/v1/event", expected_body(), token="x") == (
                403, "AuthInvalidBiscuit")
            assert await self.send(double, "POST", "/api/v1/event/", expected_body()) == (201, None)

    @pytest.mark.parametrize("change, status, problem_id", [
        ({"content_type": "text/plain"}, 400, "JsonPayload"),
        ({"body": b"{"}, 400, "JsonPayload"),
        ({"event_id": "nope"}, 400, "JsonPayload"),
        ({"labels": {"n": 3}}, 400, "JsonPayload"),
        ({"occurred_at": "27/11/2026"}, 400, "JsonPayload"),
        ({"application_id": str(uuid.UUID(int=9))}, 403, "Forbidden"),
        ({"event_type": ""}, 422, "Validation"),
        ({"event_type": "x" * 201}, 422, "Validation"),
        ({"labels": {}}, 422, "Validation"),
        ({"labels": {str(i): "v" for i in range(11)}}, 422, "Validation"),
        ({"labels": {"k": "v" * 51}}, 422, "Validation"),
        ({"metadata": {str(i): "v" for i in range(51)}}, 422, "Validation"),
        ({"payload": "[" * 699_051}, 422, "Validation"),
        ({"payload_content_type": "text/html"}, 400, "EventInvalidPayloadContentType"),
        ({"payload": "{"}, 400, "EventInvalidJsonPayload"),
        ({"payload_content_type": "application/octet-stream+base64", "payload": "!!"}, 400,
         "EventInvalidBase64Payload"),
        ({"event_type": "billing.invoice.voided"}, 400, "EventTypeDoesNotExist"),
        ({}, 201, None),
        ({"metadata": None, "payload": "hi", "payload_content_type": "text/plain"}, 201, None),
    ])
    async def test_ingest_validation(self, change, status, problem_id):
        change = dict(change)
        content_type = change.pop("content_type", "application/json")
        raw = change.pop("body", None)
        async with Hook0Double.serve() as double:
            body = raw if raw is not None else expected_body(**change)
            assert await self.send(double, "POST", "/api/v1/event", body, content_type=content_type) == (
                status, problem_id)
            assert len(double.events) == (status == 201)

    async def test_duplicate_event_id_and_event_types(self):
        async with Hook0Double.serve(event_types=()) as double:
            assert await self.send(double, "POST", "/api/v1/event", expected_body()) == (400, "EventTypeDoesNotExist")
            created = {"application_id": APPLICATION_ID, "service": "billing", "resource_type": "invoice",
                       "verb": "paid"}
            assert await self.send(double, "POST", "/api/v1/event_types", created) == (201, None)
            assert await self.send(double, "POST", "/api/v1/event_types", created) == (201, None)
            assert await self.send(double, "POST", "/api/v1/event_types", {**created, "verb": ""}) == (
                422, "Validation")
            status, listed = await self.send(double, "GET", f"/api/v1/event_types?application_id={APPLICATION_ID}")
            assert (status, [t["event_type_name"] for t in listed]) == (200, ["billing.invoice.paid"])
            assert await self.send(double, "POST", "/api/v1/event", expected_body()) == (201, None)
            assert await self.send(double, "POST", "/api/v1/event", expected_body()) == (409, "EventAlreadyIngested")
            assert await self.send(double, "GET", "/api/v1/nothing") == (404, "NotFound")

    async def test_wait_for_and_scripted_text_429(self):
        async with Hook0Double.serve() as double:
            double.fail_next("rate_limited_text", retry_after="3")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.send, double, "POST", "/api/v1/event", expected_body())
                await double.wait_for(lambda double: len(double.requests) == 1)
            assert double.requests[0].status == 429
            assert double.events == []


# =====================================================================================================
# Alerts
# =====================================================================================================


class RecordingHandler:
    """aiosmtpd handler keeping every message it receives."""

    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        auth = session.auth_data
        self.messages.append(types.SimpleNamespace(
            mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos), tls=session.ssl is not None,
            login=auth.login.decode() if auth else None,
            mail=email.message_from_bytes(envelope.original_content, policy=email.policy.default)))
        return "250 OK"


class LoopbackController(Controller):
    """aiosmtpd's Controller on an OS-chosen port (it checks readiness by connecting to .port)."""

    def _trigger_server(self):
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@contextlib.contextmanager
def smtp_server(**kwargs):
    handler = RecordingHandler()
    controller = LoopbackController(handler, hostname="127.0.0.1", port=0, **kwargs)
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


@contextlib.asynccontextmanager
async def running_alerter(config, **kwargs):
    alerter = w.Alerter(config, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(alerter.run)
        yield alerter
        nursery.cancel_scope.cancel()


def logged(caplog, fragment):
    return [r for r in caplog.records if fragment in r.getMessage()]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class TestAlerts:
    async def test_alert_mail_arrives(self, caplog):
        caplog.set_level(logging.DEBUG, logger="wal2http")
        with smtp_server() as (handler, port):
            async with running_alerter(offline_config(mail_fields(port), slot_name="orders")) as alerter:
                alerter.alert("sink", "HTTP sink failing", "503 Service Unavailable from hooks.example.org")
                await wait_until(lambda: handler.messages, timeout=10)
        received = handler.messages[0]
        assert received.mail_from == "wal2http@example.org"
        assert received.rcpt_tos == ["ops@example.org"]
        assert received.mail["Subject"] == "[wal2http] ALERT: HTTP sink failing"
        assert received.mail["To"] == "ops@example.org"
        body = received.mail.get_content()
        assert "503 Service Unavailable from hooks.example.org" in body
        assert "sink: HTTP sink failing" in body
        assert "slot orders" in body
        assert "Failing since:" in body
        assert "Z (UTC)" in body
        assert logged(caplog, "alert [sink]: HTTP sink failing")[0].levelno == logging.WARNING

    async def test_several_recipients(self):
        with smtp_server() as (handler, port):
            config = offline_config(mail_fields(port), email_to=("a@example.org", "b@example.org", "c@example.net"))
            async with running_alerter(config) as alerter:
                alerter.alert("k", "subject", "body")
                await wait_until(lambda: handler.messages, timeout=10)
        assert handler.messages[0].rcpt_tos == ["a@example.org", "b@example.org", "c@example.net"]
        assert handler.messages[0].mail["To"] == "a@example.org, b@example.org, c@example.net"

    async def test_login_and_no_password_anywhere(self, caplog):
        caplog.set_level(logging.DEBUG)
        password = "Smtp-Pa55word-42"
        logins = []

        def authenticator(server, session, envelope, mechanism, auth_data):
            logins.append((auth_data.login, auth_data.password))
            return AuthResult(success=auth_data.password == password.encode(), auth_data=auth_data)

        with smtp_server(authenticator=authenticator, auth_require_tls=False) as (handler, port):
            config = offline_config(mail_fields(port), email_smtp_username="alerts", email_smtp_password=password)
            async with running_alerter(config) as alerter:
                # A careless caller that puts the secret in the text: it is scrubbed.
                alerter.alert("auth", f"failed with {password}", f"password was {password}")
                await wait_until(lambda: handler.messages, timeout=10)
        assert logins == [(b"alerts", password.encode())]
        assert handler.messages[0].login == "alerts"
        raw = handler.messages[0].mail.as_string()
        assert password not in raw
        assert "***" in raw
        assert all(password not in record.getMessage() for record in caplog.records)

    async def test_rejected_login_is_logged_without_password(self, caplog):
        caplog.set_level(logging.DEBUG)
        password = "Wrong-Pa55word-42"
        with smtp_server(authenticator=lambda *args: AuthResult(success=False, handled=False),
                         auth_require_tls=False) as (handler, port):
            config = offline_config(mail_fields(port), email_smtp_username="alerts", email_smtp_password=password)
            async with running_alerter(config) as alerter:
                alerter.alert("k", "s", "b")
                await wait_until(lambda: logged(caplog, "could not send alert mail"), timeout=10)
        assert handler.messages == []
        assert "SMTPAuthenticationError" in logged(caplog, "could not send alert mail")[0].getMessage()
        assert all(password not in record.getMessage() for record in caplog.records)

    async def test_same_alert_mailed_once_per_five_minutes(self):
        clock = FakeClock()
        with smtp_server() as (handler, port):
            async with running_alerter(offline_config(mail_fields(port)), now=clock) as alerter:
                alerter.alert("sink", "failing", "first")
                clock.now += w.ALERT_REPEAT_S - 1
                alerter.alert("sink", "failing", "second, within 5 minutes")
                alerter.alert("other", "marker", "a different key is not limited")
                await wait_until(lambda: len(handler.messages) == 2, timeout=10)
                clock.now += 1
                alerter.alert("sink", "failing", "third, 5 minutes after the first")
                await wait_until(lambda: len(handler.messages) == 3, timeout=10)
        bodies = [m.mail.get_content() for m in handler.messages]
        assert "first" in bodies[0]
        assert "a different key" in bodies[1]
        assert "third" in bodies[2]

    async def test_recovered_mail_only_after_an_alert(self, caplog):
        caplog.set_level(logging.DEBUG, logger="wal2http")
        clock = FakeClock()
        with smtp_server() as (handler, port):
            async with running_alerter(offline_config(mail_fields(port)), now=clock) as alerter:
                alerter.recovered("never-failed", "HTTP sink", "nothing to recover from")
                alerter.alert("sink", "HTTP sink failing", "503")
                alerter.recovered("sink", "HTTP sink delivers again", "after 3 attempts")
                alerter.recovered("sink", "HTTP sink delivers again", "a second recovery is not mailed")
                alerter.alert("sink", "HTTP sink failing", "flapping: within 5 minutes, not mailed")
                alerter.recovered("sink", "HTTP sink delivers again", "that failure was not mailed: neither is this")
                clock.now += w.ALERT_REPEAT_S
                alerter.alert("sink", "HTTP sink failing", "5 minutes later: mailed")
                await wait_until(lambda: len(handler.messages) == 3, timeout=10)
        subjects = [m.mail["Subject"] for m in handler.messages]
        assert subjects == ["[wal2http] ALERT: HTTP sink failing",
                            "[wal2http] RECOVERED: HTTP sink delivers again",
                            "[wal2http] ALERT: HTTP sink failing"]
        assert "5 minutes later" in handler.messages[2].mail.get_content()
        recovered = handler.messages[1].mail.get_content()
        assert "after 3 attempts" in recovered
        assert "Recovered at:" in recovered
        assert "Failing since:" in recovered
        assert logged(caplog, "recovered [sink]")[0].levelno == logging.INFO

    async def test_starttls_verified_with_trustme(self, server_tls, client_tls):
        server_context, client_context = server_tls, client_tls
        with smtp_server(tls_context=server_context, require_starttls=True) as (handler, port):
            async with running_alerter(offline_config(mail_fields(port, "starttls")),
                                       ssl_context=client_context) as alerter:
                alerter.alert("k", "over starttls", "body")
                await wait_until(lambda: handler.messages, timeout=10)
        assert handler.messages[0].tls

    async def test_starttls_with_untrusted_certificate_fails_cleanly(self, server_tls, caplog):
        server_context = server_tls
        with smtp_server(tls_context=server_context, require_starttls=True) as (handler, port):
            async with running_alerter(offline_config(mail_fields(port, "starttls"))) as alerter:
                alerter.alert("k", "s", "b")
                await wait_until(lambda: logged(caplog, "could not send alert mail"), timeout=10)
        assert handler.messages == []
        assert "CERTIFICATE_VERIFY_FAILED" in logged(caplog, "could not send alert mail")[0].getMessage()

    async def test_implicit_tls(self, server_tls, client_tls):
        server_context, client_context = server_tls, client_tls
        with smtp_server(ssl_context=server_context) as (handler, port):
            async with running_alerter(offline_config(mail_fields(port, "ssl")), ssl_context=client_context) as alerter:
                alerter.alert("k", "over smtps", "body")
                await wait_until(lambda: handler.messages, timeout=10)
        assert handler.messages[0].mail["Subject"] == "[wal2http] ALERT: over smtps"

    async def test_dead_smtp_server_never_blocks_or_raises(self, caplog):
        port = free_port()  # nothing listens there: connections are refused
        async with running_alerter(offline_config(mail_fields(port))) as alerter:
            alerter.alert("first", "s1", "b")
            await wait_until(lambda: len(logged(caplog, "could not send alert mail")) == 1, timeout=10)
            alerter.alert("second", "s2", "b")  # the run task keeps going
            await wait_until(lambda: len(logged(caplog, "could not send alert mail")) == 2, timeout=10)
        assert "[wal2http] ALERT: s2" in logged(caplog, "could not send alert mail")[1].getMessage()

    async def test_slow_smtp_server_never_blocks_or_raises(self, caplog):
        with socket.socket() as silent:  # accepts TCP connections (backlog), never answers
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            config = offline_config(mail_fields(silent.getsockname()[1]))
            async with running_alerter(config, smtp_timeout_s=0.5) as alerter:
                start = trio.current_time()
                alerter.alert("first", "s1", "b")
                alerter.alert("second", "s2", "b")
                assert trio.current_time() - start < 0.1
                assert not logged(caplog, "could not send alert mail")  # still waiting on the server
                await wait_until(lambda: len(logged(caplog, "could not send alert mail")) == 2, timeout=10)
        assert all("timed out" in r.getMessage() for r in logged(caplog, "could not send alert mail"))

    async def test_run_cancels_promptly_while_a_send_hangs(self):
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            with trio.fail_after(5):
                async with running_alerter(offline_config(mail_fields(silent.getsockname()[1])),
                                           smtp_timeout_s=30) as alerter:
                    alerter.alert("k", "s", "b")
                    await trio.sleep(0.2)  # let the worker thread start its connection
                    cancelled_at = trio.current_time()
            assert trio.current_time() - cancelled_at < 5  # not after the 30 s SMTP timeout

    async def test_full_queue_drops_and_never_raises(self, caplog):
        sent = []
        alerter = w.Alerter(offline_config(mail_fields(25)), send_mail=sent.append, queue_size=1)
        alerter.alert("a", "s", "b")  # queued (run is not started yet)
        alerter.alert("b", "s", "b")  # dropped
        assert logged(caplog, "alert mail for [b] dropped")
        alerter.alert("b", "s", "b")  # not marked as mailed: tried again
        assert len(logged(caplog, "alert mail for [b] dropped")) == 2

    async def test_failing_send_mail_is_logged_and_the_task_goes_on(self, caplog):
        sent = []

        def send_mail(message):
            if "boom" in message["Subject"]:
                raise OSError("connection reset")
            sent.append(message)

        async with running_alerter(offline_config(mail_fields(25)), send_mail=send_mail) as alerter:
            alerter.alert("a", "boom", "b")
            alerter.alert("b", "fine", "b")
            await wait_until(lambda: sent, timeout=10)
        assert "OSError: connection reset" in logged(caplog, "could not send alert mail")[0].getMessage()
        assert sent[0]["Subject"] == "[wal2http] ALERT: fine"

    async def test_without_email_alerts_are_logged_only(self, caplog):
        caplog.set_level(logging.DEBUG, logger="wal2http")
        sent = []
        async with running_alerter(w.Config(), send_mail=sent.append) as alerter:
            alerter.alert("k", "subject", "body")
            alerter.recovered("k", "back", "body")
            await trio.sleep(0)
        assert sent == []
        assert logged(caplog, "alert [k]: subject")[0].levelno == logging.WARNING
        assert logged(caplog, "recovered [k]: back")[0].levelno == logging.INFO

    def test_build_alert_message_keeps_the_subject_on_one_line(self):
        from datetime import datetime, timezone
        moment = datetime(2026, 11, 27, 16, 25, 11, tzinfo=timezone.utc)
        message = w.build_alert_message(offline_config(mail_fields(25)), kind="ALERT", key="k",
                                        subject="line one\r\nBcc: evil@example.org", body="details",
                                        since=moment, now=moment)
        assert message["Subject"] == "[wal2http] ALERT: line one Bcc: evil@example.org"
        assert message["Bcc"] is None
        assert "Failing since: 2026-11-27T16:25:11Z (UTC)" in message.get_content()


# =====================================================================================================
# Operations port, slot guard and live tap
# =====================================================================================================


from prometheus_client.parser import text_string_to_metric_families  # noqa: E402 - test-only dependency

OPS_TOKEN = "0ps-T0ken-Secret"


def ops_config(port: int, token: str | None = None, host: str = "127.0.0.1", **fields):
    return w.Config(ops_addr=(host, port), ops_token=token, **fields)


async def ops_get(port: int, target: str, *, token: str | None = None, method: str = "GET",
                  headers=()) -> w.HttpResponse:
    """One request to the operations port on a fresh connection."""
    extra = list(headers) + ([("Authorization", f"Bearer {token}")] if token else [])
    client = w.HttpClient(f"http://127.0.0.1:{port}/", timeout_s=10, headers=extra)
    try:
        return await client.request(method, target)
    finally:
        await client.aclose()


def ops_json(response: w.HttpResponse) -> dict:
    assert response.headers["content-type"] == "application/json"
    return json.loads(response.body)


def metric_families(text: str) -> dict:
    """The exposition parsed by prometheus_client: {family name: family}."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def metric_value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    found = [s.value for s in families[family].samples
             if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, labels, found)
    return found[0]


async def scrape(port: int, token: str | None = None) -> dict:
    response = await ops_get(port, "/metrics", token=token)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return metric_families(response.body.decode())


@asynccontextmanager
async def ops_server(config, stats=None):
    """run_ops_server alone (no replication), on config.ops_addr; yields the Stats it reads."""
    stats = stats or w.Stats(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(w.run_ops_server, config, stats))
        yield stats
        nursery.cancel_scope.cancel()


async def raw_exchange(port: int, data: bytes, *, close_write: bool = False, timeout: float = 10) -> bytes:
    """Sends bytes on a new connection and returns everything the server sends until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    try:
        with trio.fail_after(timeout):
            await stream.send_all(data)
            if close_write:
                await stream.send_eof()
            while chunk := await stream.receive_some(65536):
                received += chunk
    finally:
        await stream.aclose()
    return received


async def closed_by_peer(stream) -> bool:
    """Waits for the server to close the connection: end of stream, or a reset."""
    try:
        return await stream.receive_some(65536) == b""
    except trio.BrokenResourceError:
        return True


def fake_request(target: str, *headers: tuple[str, str], method: str = "GET") -> h11.Request:
    return h11.Request(method=method, target=target, headers=[("Host", "x"), *headers])


class TestOpsConfig:
    @pytest.mark.parametrize("text, expected", [
        ("127.0.0.1:9187", ("127.0.0.1", 9187)), (":9187", ("", 9187)), ("[::1]:1", ("::1", 1)),
        ("localhost:65535", ("localhost", 65535)), (" 0.0.0.0:80 ", ("0.0.0.0", 80)),
    ])
    def test_addresses(self, text, expected):
        assert w.parse_ops_addr(text) == expected
        assert load({"OPS_ADDR": text}).ops_addr == expected

    @pytest.mark.parametrize("text", ["9187", "host:0", "host:65536", "host:", "a b:80", "host:8o",
                                      "http://host:80", "[::1]", "host:-1"])
    def test_bad_addresses_name_ops_addr(self, text):
        assert config_error({"OPS_ADDR": text}).startswith("OPS_ADDR must be host:port")

    def test_defaults(self):
        config = load()
        assert (config.ops_addr, config.ops_token) == (None, None)
        assert (config.slot_check_interval_s, config.slot_max_retained_mb) == (30.0, 4096)

    def test_guard_settings(self):
        config = load({"SLOT_CHECK_INTERVAL_SECS": "0.5", "SLOT_MAX_RETAINED_MB": "10"})
        assert (config.slot_check_interval_s, config.slot_max_retained_mb) == (0.5, 10)
        assert "SLOT_CHECK_INTERVAL_SECS" in config_error({"SLOT_CHECK_INTERVAL_SECS": "0"})
        assert "SLOT_MAX_RETAINED_MB" in config_error({"SLOT_MAX_RETAINED_MB": "0"})
        assert load(argv=["--slot-max-retained-mb", "7"]).slot_max_retained_mb == 7

    def test_token_is_a_secret(self):
        config = load({"OPS_TOKEN": OPS_TOKEN + "\n"})
        assert config.ops_token == OPS_TOKEN
        assert OPS_TOKEN not in repr(config)
        assert OPS_TOKEN in w.config_secrets(config)
        message = config_error({"OPS_TOKEN": OPS_TOKEN, "ON_FAILURE": OPS_TOKEN})
        assert OPS_TOKEN not in message
        assert "OPS_TOKEN" in config_error({"OPS_TOKEN": "two words"})

    @pytest.mark.parametrize("addr, token, warned", [
        (":9187", None, True), ("0.0.0.0:9187", None, True), ("10.1.2.3:9187", None, True),
        ("127.0.0.1:9187", None, False), ("localhost:9187", None, False), ("[::1]:9187", None, False),
        (":9187", OPS_TOKEN, False),
    ])
    def test_warning_beyond_loopback_without_token(self, addr, token, warned):
        env = {"OPS_ADDR": addr, **({"OPS_TOKEN": token} if token else {})}
        warnings = [text for text in w.config_warnings(load(env)) if "OPS_ADDR" in text]
        assert bool(warnings) == warned
        if warned:
            assert "/health, /ready and /metrics" in warnings[0] and "row data" in warnings[0]


class TestMetrics:
    def test_histogram_buckets_are_upper_bounds(self):
        histogram = w.Histogram()
        for value in (0.001, 0.0011, 60.0, 61.0, -1.0):
            histogram.observe(value)
        assert histogram.bounds[0] == 0.001 and histogram.bounds[-1] == 60.0
        assert histogram.counts[0] == 2  # 0.001 itself, and a negative clock step as 0
        assert histogram.counts[1] == 1
        assert histogram.counts[-2] == 1 and histogram.counts[-1] == 1  # 60 s, then +Inf
        assert histogram.count == 5

    def test_exposition_parses_with_every_family(self):
        stats = w.Stats(w.Config())
        stats.events_confirmed.update(insert=7, update=2, delete=1)
        stats.events_dead_lettered.update(insert=1)
        stats.transactions = 3
        stats.requests.update(ok=4, retried=2, failed=1)
        for seconds in (0.0005, 0.02, 3.0, 100.0):
            stats.request_seconds.observe(seconds)
        stats.commit_to_delivery_seconds.observe(0.2)
        stats.server_version = '15.4 (Debian "x"\\y\nz)'  # escaped, and read back as it was
        stats.slot = w.SlotHealth(exists=True, wal_status="extended", retained_wal_bytes=123,
                                  safe_wal_size_bytes=None, current_wal_lsn=500)
        families = metric_families(w.build_metrics_text(stats))
        assert metric_value(families, "wal2http_events_delivered", "wal2http_events_delivered_total", op="insert") == 6
        assert metric_value(families, "wal2http_events_delivered", "wal2http_events_delivered_total", op="update") == 2
        assert families["wal2http_events_delivered"].type == "counter"
        assert metric_value(families, "wal2http_events_dead_lettered", "wal2http_events_dead_lettered_total") == 1
        assert metric_value(families, "wal2http_transactions", "wal2http_transactions_total") == 3
        for outcome, count in (("ok", 4), ("retried", 2), ("failed", 1)):
            assert metric_value(families, "wal2http_delivery_requests", "wal2http_delivery_requests_total",
                                outcome=outcome) == count
        duration = families["wal2http_delivery_duration_seconds"]
        assert duration.type == "histogram"
        buckets = {s.labels["le"]: s.value for s in duration.samples if s.name.endswith("_bucket")}
        assert buckets["0.001"] == 1 and buckets["0.025"] == 2 and buckets["60.0"] == 3 and buckets["+Inf"] == 4
        assert metric_value(families, "wal2http_delivery_duration_seconds",
                            "wal2http_delivery_duration_seconds_count") == 4
        assert metric_value(families, "wal2http_delivery_duration_seconds",
                            "wal2http_delivery_duration_seconds_sum") == pytest.approx(103.0205)
        assert metric_value(families, "wal2http_slot_retained_wal_bytes") == 123
        assert "wal2http_slot_safe_wal_size_bytes" not in families  # unlimited
        statuses = {s.labels["status"]: s.value for s in families["wal2http_slot_wal_status"].samples}
        assert statuses == {"reserved": 0, "extended": 1, "unreserved": 0, "lost": 0}
        info = families["wal2http_build_info"].samples[0]
        assert info.labels == {"version": w.__version__, "server_version": stats.server_version}
        assert metric_value(families, "wal2http_up", component="postgres") == 0  # connecting
        assert metric_value(families, "wal2http_up", component="sink") == 1
        assert metric_value(families, "wal2http_tap_clients") == 0
        assert metric_value(families, "wal2http_tap_clients_closed", "wal2http_tap_clients_closed_total",
                            reason="too_slow") == 0
        for name in ("wal2http_confirmed_lsn", "wal2http_server_wal_end_lsn", "wal2http_replication_lag_bytes",
                     "wal2http_delivery_requests_in_flight", "wal2http_reconnects", "wal2http_alerts",
                     "wal2http_commit_to_delivery_seconds", "process_resident_memory_bytes",
                     "process_cpu_seconds", "process_start_time_seconds"):
            assert name in families, name
        assert metric_value(families, "process_resident_memory_bytes") > 1_000_000
        assert time.time() - 86400 < metric_value(families, "process_start_time_seconds") <= time.time()

    def test_commit_time_is_read_from_the_envelope_not_from_row_data(self):
        line = ('{"id":"0/1:0","op":"insert","schema":"public","table":"t","key":{"id":1},'
                '"new":{"j":{"commit_time":"1999-01-01T00:00:00Z"}},"old":null,"unchanged_toast":[],'
                '"xid":1,"lsn":"0/1","commit_lsn":"0/1","commit_time":"2026-11-27T16:25:11.5Z","seq":0}')
        expected = datetime.datetime(2026, 11, 27, 16, 25, 11, 500000, datetime.timezone.utc).timestamp()
        assert w.commit_time_of(w.Event(line)) == expected
        assert w.event_op(w.Event(line)) == "insert"
        assert w.commit_time_of({"commit_time": None}) is None

    def test_confirmed_chunks_are_counted_by_op_and_transaction(self):
        stats = w.Stats(w.Config())

        class Loop:
            ack = w.AckTracker()
            events, in_flight = [], None
        stats.attach(Loop())
        inserts = [w.Event.from_dict({"id": f"0/10:{i}", "op": "insert", "commit_time": COMMIT_TIME_TEXT})
                   for i in range(3)]
        update = w.Event.from_dict({"id": "0/10:3", "op": "update", "commit_time": COMMIT_TIME_TEXT})
        commit_us = (time.time_ns() // 1000 - w.PG_EPOCH_OFFSET_US) - 2_000_000  # committed 2 s ago
        chunks = [w.Chunk(inserts[:2]), w.Chunk([inserts[2], update], 0x20, {"update": 1}, commit_us),
                  w.Chunk([], 0x30),  # a transaction with no event (a table outside the publication)
                  w.Chunk([w.Event.from_dict({"id": "0/40:m", "op": "message", "commit_time": None})],
                          None, {"message": 1})]
        for chunk in chunks:
            stats.chunk_taken(chunk)
        stats.chunks_confirmed(1)
        assert stats.events_delivered()["insert"] == 2 and stats.transactions == 0
        stats.chunks_confirmed(3)
        assert {op: n for op, n in stats.events_delivered().items() if n} == {"insert": 3, "update": 1, "message": 1}
        assert stats.transactions == 1
        assert stats.commit_to_delivery_seconds.count == 1
        assert 2.0 <= stats.commit_to_delivery_seconds.sum < 60

    def test_dead_letters_are_not_delivered_and_counters_never_go_down(self):
        stats = w.Stats(w.Config())
        stats.events_confirmed["update"] = 5
        assert stats.events_delivered()["update"] == 5
        stats.dead_lettered([w.Event.from_dict({"id": "0/1:0", "op": "update"})])
        assert stats.events_delivered()["update"] == 5  # its chunk is not confirmed yet
        stats.events_confirmed["update"] = 7
        assert stats.events_delivered()["update"] == 6
        assert stats.events_dead_lettered["update"] == 1

    def test_assembler_counts_every_op_but_plain_inserts(self):
        assembler = w.ChangeAssembler(chunk_events=2)
        feed = Feeder(assembler)
        try:
            chunks = transaction(
                feed, w.Insert(None, 16400, ROW), w.Update(None, 16400, None, None, ROW),
                w.Delete(None, 16400, "K", ("42", None, None, None, None)), w.Insert(None, 16400, ROW),
                w.Message(771, True, 0x16B3748, "p", b"x"), w.Truncate(None, 0, (16400, 16400, 16400)))
            chunks += feed(w.Message(None, False, 0x16B3900, "p", b"y"))
        finally:
            assembler.close()
        assert sum(len(chunk.events) for chunk in chunks) == 9
        assert [chunk.commit_time_us for chunk in chunks if chunk.end_lsn] == [COMMIT_TIME]
        for chunk in chunks:
            assert chunk.op_counts == w.count_event_ops(chunk.events), chunk


    def test_a_streamed_transaction_carries_its_ops_and_commit_time(self):
        assembler = w.ChangeAssembler(chunk_events=2)
        feed = Feeder(assembler)
        try:
            feed(*stream_block(XID, orders(xid=XID), insert_in(XID, ids_row(1)), first=True))
            feed(*stream_block(XID, insert_in(801, ids_row(2)), w.Message(XID, True, 0x4000, "m", b"x"),
                               w.Truncate(XID, 1, (16400,)), w.Delete(801, 16400, "K", ids_row(1))))
            chunks = feed(stream_commit())
        finally:
            assembler.close()
        assert [len(chunk.events) for chunk in chunks] == [2, 2, 1]
        for chunk in chunks:
            assert chunk.op_counts == w.count_event_ops(chunk.events)
        assert [(chunk.end_lsn, chunk.commit_time_us) for chunk in chunks] == [
            (None, None), (None, None), (0x5030, COMMIT_TIME)]


class TestOpsServer:
    async def test_endpoints_without_a_token(self):
        port = free_port()
        async with ops_server(ops_config(port, slot_name="s1", publications=("p1", "p2"))):
            health = await ops_get(port, "/health")
            assert (health.status, ops_json(health)) == (200, {"status": "ok"})
            ready = await ops_get(port, "/ready")
            assert (ready.status, ops_json(ready)) == (503, {"status": "unready", "postgres": "connecting",
                                                             "sink": "ok"})
            status = await ops_get(port, "/status")
            document = ops_json(status)
            assert status.status == 200
            assert set(document) == {"version", "sink", "slot", "publications", "state", "confirmed_lsn",
                                     "received_lsn", "server_wal_end_lsn", "lag_bytes", "lag_seconds",
                                     "events_delivered", "events_per_second", "failing_since", "last_error",
                                     "slot_health", "backfill"}
            assert (document["slot"], document["publications"], document["state"]) == ("s1", ["p1", "p2"], "connecting")
            assert document["backfill"] is None
            assert set(document["slot_health"]) == {"wal_status", "retained_wal_bytes", "safe_wal_size_bytes"}
            assert "wal2http_up" in await scrape(port)
            assert (await ops_get(port, "/nothing")).status == 404
            assert (await ops_get(port, "/metrics", method="POST")).status == 405
            head = await ops_get(port, "/health", method="HEAD")
            assert head.status == 200 and head.body == b""

    async def test_a_token_guards_everything_but_health_and_ready(self, caplog):
        caplog.set_level(logging.DEBUG)
        port = free_port()
        async with ops_server(ops_config(port, OPS_TOKEN)):
            for path in ("/health", "/ready"):
                assert (await ops_get(port, path)).status in (200, 503)
            for path in ("/status", "/metrics"):
                missing = await ops_get(port, path)
                assert missing.status == 401 and missing.headers["www-authenticate"].startswith("Bearer")
                assert (await ops_get(port, path, token="wrong")).status == 401
                assert (await ops_get(port, path, token=OPS_TOKEN + "x")).status == 401
                assert (await ops_get(port, f"{path}?token=nope")).status == 401
                assert (await ops_get(port, f"{path}?token=%E2%82%AC%FF")).status == 401
                assert (await ops_get(port, f"{path}?a=1&token={urllib.parse.quote(OPS_TOKEN)}")).status == 200
                assert (await ops_get(port, path, token=OPS_TOKEN)).status == 200
                assert (await ops_get(port, f"{path}?token={OPS_TOKEN}")).status == 200
                basic = ("Authorization", "Basic " + base64.b64encode(f"x:{OPS_TOKEN}".encode()).decode())
                assert (await ops_get(port, path, headers=[basic])).status == 401
            assert (await ops_get(port, "/nothing", token=OPS_TOKEN)).status == 404
        assert OPS_TOKEN not in caplog.text and "nope" not in caplog.text

    @pytest.mark.parametrize("host, token, open_paths", [
        ("0.0.0.0", None, {"/health", "/ready", "/metrics"}),
        ("10.0.0.1", None, {"/health", "/ready", "/metrics"}),
        ("::", None, {"/health", "/ready", "/metrics"}),
        ("0.0.0.0", OPS_TOKEN, {"/health", "/ready", "/metrics", "/status"}),
        ("127.0.0.1", None, {"/health", "/ready", "/metrics", "/status"}),
    ])
    def test_row_data_is_off_beyond_loopback_without_a_token(self, host, token, open_paths):
        config = ops_config(9187, token, host)
        server = w.OpsServer(config, w.Stats(config))
        auth = [("Authorization", f"Bearer {token}")] if token else []
        for path in ("/health", "/ready", "/metrics", "/status"):
            status = server.route(fake_request(path, *auth)).status
            assert (status != 404) == (path in open_paths), (path, status)

    async def test_keep_alive_serves_several_requests_on_one_connection(self):
        port = free_port()
        request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        async with ops_server(ops_config(port)):
            answer = await raw_exchange(port, request * 3 + b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                        b"Connection: close\r\n\r\n")
        assert answer.count(b"HTTP/1.1 200 ") == 4
        assert answer.count(b'{"status": "ok"}') == 4

    @pytest.mark.parametrize("data, status", [
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"400"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (17 * 1024) + b"\r\n\r\n", b"431"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"413"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"413"),
        (b"GET /health HTTP/1.1\r\n\r\n", b"400"),  # no Host
    ])
    async def test_bad_requests_get_4xx_and_a_closed_socket(self, data, status):
        port = free_port()
        async with ops_server(ops_config(port)):
            answer = await raw_exchange(port, data)
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
            assert (await ops_get(port, "/health")).status == 200

    async def test_a_16_mib_head_costs_a_closed_socket(self):
        port = free_port()
        async with ops_server(ops_config(port)):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            sent = 0
            with trio.fail_after(20):
                try:
                    await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                    while sent < 16 * 2**20:
                        await stream.send_all(b"a" * 65536)
                        sent += 65536
                except trio.BrokenResourceError:
                    pass  # the server closed it long before
            await stream.aclose()
            assert sent < 16 * 2**20
            assert (await ops_get(port, "/health")).status == 200

    async def test_slowloris_is_closed_after_the_head_deadline(self, monkeypatch):
        monkeypatch.setattr(w, "OPS_HEAD_TIMEOUT_S", 0.5)
        port = free_port()
        async with ops_server(ops_config(port)):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            started = trio.current_time()
            with trio.fail_after(5):
                await stream.send_all(b"GET /health HTTP/1.1\r\n")
                with contextlib.suppress(trio.BrokenResourceError):
                    for _ in range(20):
                        await trio.sleep(0.1)
                        await stream.send_all(b"X-A: b\r\n")
                assert await closed_by_peer(stream)
            assert 0.4 < trio.current_time() - started < 3
            await stream.aclose()
            # an idle kept-alive connection is closed too
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(5):
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
                started = trio.current_time()
                assert await closed_by_peer(stream)
            assert 0.4 < trio.current_time() - started < 3
            await stream.aclose()

    async def test_at_most_64_connections_the_rest_closed_at_once(self, monkeypatch):
        monkeypatch.setattr(w, "OPS_HEAD_TIMEOUT_S", 2.0)
        port = free_port()
        async with ops_server(ops_config(port)):
            idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(w.OPS_MAX_CONNECTIONS)]

            async def refused():  # closed without a word: the cap (once the server accepted them all)
                return await raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") == b""
            await wait_until(refused, timeout=5)
            for stream in idle:
                await stream.aclose()
            await wait_until(lambda: _health_ok(port), timeout=10)

    async def test_a_port_in_use_is_a_config_error_naming_ops_addr(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(BaseExceptionGroup) as info:
                async with ops_server(ops_config(port)):
                    pass
        error = w.first_error(info.value)
        assert isinstance(error, w.ConfigError) and error.exit_code == 2
        assert str(error).startswith(f"OPS_ADDR: cannot listen on 127.0.0.1:{port}: ")


async def _delivered_is(port: int, expected: dict) -> bool:
    delivered = await delivered_metric(port, OPS_TOKEN)
    return {op: n for op, n in delivered.items() if n} == expected


async def _slot_read(port: int) -> bool:
    _, status = await ops_document(port, "/status", OPS_TOKEN)
    return status["slot_health"]["wal_status"] is not None


async def _lag(port: int, predicate) -> bool:
    """The lag of /status, and the same of /metrics (read a moment later)."""
    _, status = await ops_document(port, "/status")
    families = await scrape(port)
    return (predicate(status["lag_bytes"], status["lag_seconds"])
            and predicate(metric_value(families, "wal2http_replication_lag_bytes"), status["lag_seconds"]))


async def _status_grew(port: int, before: dict) -> bool:
    _, now = await ops_document(port, "/status")
    return now["lag_bytes"] > before["lag_bytes"] and now["lag_seconds"] > before["lag_seconds"]


async def _hold_connections(port: int, count: int, attempts: list) -> None:
    """Opens `count` connections that say nothing, and keeps those it got open.  Each attempt is
    recorded in `attempts` (the stream, or None when the connect failed or took over 10 s: on a
    loaded machine the kernel's accept queue may be full while the server closes the ones past its
    cap, which is the server protecting itself, not a failure of the test)."""
    try:
        for _ in range(count):
            stream = None
            with contextlib.suppress(OSError), trio.move_on_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            attempts.append(stream)
        await trio.sleep_forever()
    finally:
        for stream in attempts:
            if stream is not None:
                await trio.aclose_forcefully(stream)


async def _send_garbage(port: int, count: int) -> None:
    for number in range(count):
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.TooSlowError):
            await raw_exchange(port, random.Random(number).randbytes(3000), timeout=5)


async def _big_head(port: int) -> None:
    """A 16 MiB request head, sent until the server closes the connection."""
    with contextlib.suppress(OSError, trio.BrokenResourceError):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nX: ")
            for _ in range(256):
                await stream.send_all(b"a" * 65536)


async def _slowloris(port: int, count: int) -> None:
    async def one():
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /health HTTP/1.1\r\n")
                while True:
                    await trio.sleep(0.2)
                    await stream.send_all(b"X: y\r\n")

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


def mails_about(handler, *fragments) -> list:
    return [m for m in handler.messages if all(f in m.mail["Subject"] for f in fragments)]


async def invalidate_slot(cluster, db, slot: str) -> None:
    """Makes PostgreSQL invalidate the slot: max_slot_wal_keep_size tiny, WAL written past it and
    segments switched, then CHECKPOINT (which removes the WAL and marks the slot lost)."""
    await sql(cluster, db, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'", "SELECT pg_reload_conf()")
    query = f"SELECT wal_status FROM pg_replication_slots WHERE slot_name = {w.quote_literal(slot)}"
    with trio.fail_after(60):
        while (await sql(cluster, db, query))[0][0] != "lost":
            await sql(cluster, db, "CREATE TABLE IF NOT EXISTS filler (v text)",
                      "INSERT INTO filler SELECT repeat('w', 1000) FROM generate_series(1, 3000)",
                      "SELECT pg_switch_wal()", "CHECKPOINT")


async def restore_wal_keep(cluster, db) -> None:
    await sql(cluster, db, "ALTER SYSTEM RESET max_slot_wal_keep_size", "SELECT pg_reload_conf()")


class TestSlotGuard:
    @pytest.mark.parametrize("row, expected", [
        (None, w.SlotHealth(exists=False, current_wal_lsn=0x3000000)),
        ('{"slot_name": "s", "wal_status": "reserved", "safe_wal_size": null, "restart_lsn": "0/1000000",'
         ' "confirmed_flush_lsn": "0/2000000"}',
         w.SlotHealth(exists=True, wal_status="reserved", retained_wal_bytes=0x2000000, safe_wal_size_bytes=None,
                      confirmed_flush_lsn=0x2000000, current_wal_lsn=0x3000000)),
        ('{"slot_name": "s", "wal_status": "lost", "safe_wal_size": null, "restart_lsn": null,'
         ' "confirmed_flush_lsn": "0/2000000", "conflicting": false, "invalidation_reason": "wal_removed"}',
         w.SlotHealth(exists=True, wal_status="lost", confirmed_flush_lsn=0x2000000, current_wal_lsn=0x3000000,
                      invalidation_reason="wal_removed")),
        ('{"slot_name": "s", "wal_status": "unreserved", "safe_wal_size": -5, "restart_lsn": "0/1000000",'
         ' "confirmed_flush_lsn": "0/1000000", "conflicting": true}',
         w.SlotHealth(exists=True, wal_status="unreserved", retained_wal_bytes=0x2000000, safe_wal_size_bytes=-5,
                      confirmed_flush_lsn=0x1000000, current_wal_lsn=0x3000000, conflicting=True)),
    ])
    def test_decoding_every_server_version(self, row, expected):
        assert w.decode_slot_health("0/3000000", row) == expected

    def test_lost_means_lost_invalidated_or_conflicting(self):
        assert not w.SlotHealth(exists=True, wal_status="unreserved").lost
        assert w.SlotHealth(exists=True, wal_status="lost").lost
        assert w.SlotHealth(exists=True, wal_status="reserved", invalidation_reason="rows_removed").lost
        assert w.SlotHealth(exists=True, conflicting=True).lost
        assert not w.SlotHealth(exists=False).lost

    def test_the_lost_slot_message_says_what_happened_and_what_to_do(self):
        message = w.build_slot_lost_message("my_slot", "wal_status lost", 0x16B3748)
        assert "invalidated by PostgreSQL (wal_status lost)" in message
        assert "after its last confirmed position 0/16B3748 are lost" in message
        assert ("SELECT pg_drop_replication_slot('my_slot'); "
                "SELECT pg_create_logical_replication_slot('my_slot', 'pgoutput');") in message
        assert "backfill" in message and "\n" not in message

    @pytest.mark.parametrize("message, detail", [
        ('cannot read from logical replication slot "s"',  # START_REPLICATION, PostgreSQL 13-15
         "This slot has been invalidated because it exceeded the maximum reserved size."),
        ('can no longer get changes from replication slot "s"',
         "This slot has been invalidated because it exceeded the maximum reserved size."),
        ('can no longer get changes from replication slot "s"',  # 17+
         'This replication slot has been invalidated due to "wal_removed".'),
    ])
    def test_the_servers_own_words_are_recognised(self, message, detail):
        error = w.classify_server_error(w.ServerError({"S": "ERROR", "C": "55000", "M": message, "D": detail}),
                                        "START_REPLICATION failed")
        assert w.is_slot_invalidated_error(error)
        assert w.describe_invalidation(error) == detail.rstrip(".")
        assert not w.is_slot_invalidated_error(w.PreconditionError("publication 'x' does not exist"))

    def test_alerts_once_per_period_repeated_after_5_minutes_then_recovered(self):
        clock, alerter = FakeClock(), RecordingAlerter()
        guard = w.SlotGuard(w.Config(slot_name="s", slot_max_retained_mb=1), alerter, now=clock)
        over = w.SlotHealth(exists=True, wal_status="unreserved", retained_wal_bytes=3 * 2**20)
        guard.check(over)
        clock.now += 60
        guard.check(over)
        assert alerter.keys() == ["slot-retained", "slot-unreserved"]
        assert alerter.alerts[0][1] == "slot s retains 3.0 MB of WAL"
        assert alerter.alerts[1][1] == "slot s is unreserved: PostgreSQL may soon remove WAL it needs"
        clock.now += w.ALERT_REPEAT_S
        guard.check(over)
        assert alerter.keys() == ["slot-retained", "slot-unreserved"] * 2
        guard.check(w.SlotHealth(exists=True, wal_status="reserved", retained_wal_bytes=1000))
        guard.check(w.SlotHealth(exists=True, wal_status="reserved", retained_wal_bytes=1000))
        assert [(key, subject) for key, subject, _ in alerter.recoveries] == [
            ("slot-retained", "slot s recovered: retains 0.0 MB of WAL"),
            ("slot-unreserved", "slot s recovered: wal_status reserved")]
        with pytest.raises(w.SlotInvalidated, match="was invalidated by PostgreSQL"):
            guard.check(w.SlotHealth(exists=True, wal_status="lost"))
        assert alerter.keys()[-1] == "slot-lost"

    async def test_reads_the_slot_on_this_server(self, cluster, db):
        await create_slot(cluster, db)
        async with w.open_pg_connection(w.parse_database_url(cluster.url(db), {}), replication=False) as conn:
            health = await w.read_slot_health(conn, db)
            missing = await w.read_slot_health(conn, "no_such_slot")
        assert health.exists and health.wal_status == "reserved" and not health.lost
        assert health.retained_wal_bytes >= 0 and health.current_wal_lsn > 0
        assert health.confirmed_flush_lsn > 0
        assert not missing.exists and missing.current_wal_lsn > 0

    async def test_a_failing_check_is_logged_once_and_retried(self, caplog):
        config = w.load_config([], {"DATABASE_URL": f"postgresql://u@127.0.0.1:{free_port()}/d?connect_timeout=2",
                                    "SLOT_CHECK_INTERVAL_SECS": "0.05"})[0]
        stats = w.Stats(config)
        attempts = 0
        real_open = w.open_pg_connection

        def counting_open(*args, **kwargs):
            nonlocal attempts
            attempts += 1
            return real_open(*args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(w, "open_pg_connection", counting_open)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.run_slot_guard, config, stats, w.Alerter(config))
                await wait_until(lambda: attempts >= 5)
                nursery.cancel_scope.cancel()
        assert len(logged(caplog, "slot guard: cannot read replication slot")) == 1
        assert stats.slot is None

    async def test_retained_wal_alert_then_recovered(self, cluster, db):
        await table(cluster, db, "CREATE TABLE t (id int PRIMARY KEY, v text)")
        sink = MemorySink()
        sink.gate = trio.Event()
        with smtp_server() as (handler, smtp_port):
            env = ops_env(cluster, db, slot_max_retained_mb="1", **email_settings(smtp_port))
            config = w.load_config([], env)[0]
            async with running(config, sink):
                await sql(cluster, db, "INSERT INTO t SELECT g, repeat('r', 1000) FROM generate_series(1, 3000) g")
                await wait_until(lambda: mails_about(handler, "ALERT", f"slot {db} retains"), timeout=60)
                families = await scrape(ops_port(config))
                assert metric_value(families, "wal2http_slot_retained_wal_bytes") > 2**20
                assert metric_value(families, "wal2http_alerts", "wal2http_alerts_total") >= 1
                sink.gate.set()
                await sink.wait_for(3000)
                with trio.fail_after(90):  # restart_lsn moves at the next running-xacts record
                    while not mails_about(handler, "RECOVERED", f"slot {db}"):
                        await sql(cluster, db, "CHECKPOINT")
                        await trio.sleep(0.5)
        (alert,) = mails_about(handler, "ALERT", f"slot {db} retains")
        assert re.search(rf"\[wal2http\] ALERT: slot {db} retains [\d.,]+ MB of WAL", alert.mail["Subject"])
        assert "SLOT_MAX_RETAINED_MB=1" in alert.mail.get_content()
        (recovered,) = mails_about(handler, "RECOVERED", f"slot {db}")
        assert "recovered" in recovered.mail["Subject"] and "has recovered" in recovered.mail.get_content()

    async def test_check_reports_wal_status_and_retained_wal(self, cluster, db):
        env = make_env(cluster, db)
        result = await trio.to_thread.run_sync(run_cli, ["--check"], env)
        assert f"ok slot {db}: does not exist yet; wal2http creates it (CREATE_SLOT=true)" in result.stdout
        await create_slot(cluster, db)
        result = await trio.to_thread.run_sync(run_cli, ["--check"], env)
        assert re.search(rf"^ok slot {db}: wal_status reserved, retains [\d.,]+ MB of WAL$", result.stdout, re.M)
        assert result.returncode == 0

    async def test_bad_ops_addr_and_a_port_in_use_are_exit_2(self, cluster, db):
        result = await trio.to_thread.run_sync(run_cli, [], make_env(cluster, db, ops_addr="9187"))
        assert result.returncode == 2 and "OPS_ADDR must be host:port" in result.stderr
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = await trio.to_thread.run_sync(run_cli, [], make_env(cluster, db, ops_addr=f"127.0.0.1:{port}"))
        assert result.returncode == 2
        assert f"OPS_ADDR: cannot listen on 127.0.0.1:{port}" in result.stderr
        assert "Traceback" not in result.stderr

    async def test_an_invalidated_slot_is_an_alert_and_exit_4_never_recreated(self, own_cluster):
        db = "lossy"
        own_cluster.psql("postgres", f"CREATE DATABASE {db}")
        own_cluster.psql(db, "CREATE PUBLICATION pub FOR ALL TABLES")
        await table(own_cluster, db)
        sink = MemorySink()
        sink.gate = trio.Event()  # nothing is confirmed: the slot stays behind
        try:
            with smtp_server() as (handler, smtp_port):
                mail = email_settings(smtp_port)
                config = w.load_config([], ops_env(own_cluster, db, **mail))[0]
                with pytest.raises(BaseExceptionGroup) as info:
                    async with running(config, sink):
                        await sql(own_cluster, db, "INSERT INTO t VALUES (1, 'x')")
                        await invalidate_slot(own_cluster, db, db)
                        await trio.sleep_forever()  # run() ends by itself
                error = w.first_error(info.value)
                assert isinstance(error, w.SlotInvalidated) and error.exit_code == 4
                assert f"replication slot '{db}' (SLOT_NAME) was invalidated by PostgreSQL" in str(error)
                assert f"SELECT pg_drop_replication_slot('{db}');" in str(error)
                (alert,) = mails_about(handler, "ALERT", f"slot {db} was invalidated by PostgreSQL (lost)")
                assert f"pg_create_logical_replication_slot('{db}', 'pgoutput')" in alert.mail.get_content()
                # What the replication connection itself gets from this server is recognised
                with pytest.raises(w.PreconditionError) as streaming:
                    await w.run_replication(config, MemorySink(), trio.Event())
                assert w.is_slot_invalidated_error(streaming.value), streaming.value
                assert "invalidated" in w.describe_invalidation(streaming.value)
                # The command line on the lost slot: --check fails, running is exit 4 with the mail sent
                env = make_env(own_cluster, db, **mail)
                check = await trio.to_thread.run_sync(run_cli, ["--check"], env)
                assert check.returncode == 4
                assert re.search(rf"^FAIL slot {db}: replication slot '{db}' \(SLOT_NAME\) was invalidated",
                                 check.stdout, re.M)
                handler.messages.clear()
                result = await trio.to_thread.run_sync(run_cli, [], env)
                assert result.returncode == 4, result.stderr
                assert "was invalidated by PostgreSQL" in result.stderr and "are lost" in result.stderr
                assert "pg_drop_replication_slot" in result.stderr and "Traceback" not in result.stderr
                assert mails_about(handler, "ALERT", "invalidated")
                rows = await sql(own_cluster, db, f"SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{db}'")
                assert rows == [("lost",)]  # still there, never re-created behind the operator's back
        finally:
            await restore_wal_keep(own_cluster, db)


import trio_websocket  # noqa: E402 - the live tap's tests only

WEBSOCKET_HEADERS = (("Upgrade", "websocket"), ("Connection", "Upgrade"),
                     ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13"))


@asynccontextmanager
async def tap_client(port: int, query: str = "", headers=(), receive_buffer: int | None = None):
    """A WebSocket client of /events (trio-websocket), on a socket of our own so that its receive
    buffer can be made small (a client that stops reading then stops the server's writes soon)."""
    sock = trio.socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                websocket = await trio_websocket.wrap_client_stream(
                    nursery, stream, f"127.0.0.1:{port}", "/events" + (f"?{query}" if query else ""),
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers])
            yield websocket
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def tap_refusal(port: int, query: str = "", headers=()) -> tuple[int, bytes] | None:
    """The status and body of a refused /events handshake; None when it is accepted."""
    try:
        with trio.fail_after(10):
            async with trio_websocket.open_websocket_url(
                    f"ws://127.0.0.1:{port}/events" + (f"?{query}" if query else ""),
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers]):
                return None
    except trio_websocket.ConnectionRejected as rejected:
        return rejected.status_code, rejected.body


async def read_tap(websocket, count: int | None = None, timeout: float = 30):
    """Messages until `count` (or until the connection closes): (messages, close reason or None)."""
    messages: list[str] = []
    with trio.fail_after(timeout):
        try:
            while count is None or len(messages) < count:
                messages.append(await websocket.get_message())
        except trio_websocket.ConnectionClosed as closed:
            return messages, closed.reason
    return messages, None


async def collect_tap(websocket, messages: list[str], done: trio.Event) -> None:
    """Appends the client's messages until its connection closes."""
    with contextlib.suppress(trio_websocket.ConnectionClosed):
        while True:
            messages.append(await websocket.get_message())
    done.set()


async def start_service(nursery: trio.Nursery, config, sink) -> tuple[w.Stats, trio.Event]:
    """wal2http.run in `nursery` with a Stats of ours (to see the tap's clients), until the
    returned event is set."""
    stats, stop = w.Stats(config), trio.Event()
    await nursery.start(lambda task_status: w.run(config, sink=sink, stop=stop, stats=stats,
                                                  task_status=task_status))
    return stats, stop


def tap_selects(query: str, event: dict) -> bool:
    """The filter rule, written again plainly: the expectation of the tests."""
    params = urllib.parse.parse_qs(query)
    names = [n for value in params.get("table", []) for n in value.split(",") if n]
    ops = [o for value in params.get("op", []) for o in value.split(",") if o]
    if ops and event["op"] not in ops:
        return False
    if not names:
        return True
    return event["table"] is not None and any(
        name == f"{event['schema']}.{event['table']}" or (name.endswith(".*") and name[:-2] == event["schema"])
        for name in names)


class TestTapFilter:
    @pytest.mark.parametrize("query,expected", [
        ("", w.TapFilter()),
        ("token=x", w.TapFilter()),
        ("table=public.orders", w.TapFilter(tables=frozenset({"public.orders"}))),
        ("table=public.orders,public.items&table=%20app.*%20",
         w.TapFilter(tables=frozenset({"public.orders", "public.items"}), schemas=frozenset({"app"}))),
        ("table=public.orders%2Capp.*", w.TapFilter(tables=frozenset({"public.orders"}), schemas=frozenset({"app"}))),
        ("op=insert,update&op=delete", w.TapFilter(ops=frozenset({"insert", "update", "delete"}))),
        ("table=&op=", w.TapFilter()),
        ("table=my.dotted.name", w.TapFilter(tables=frozenset({"my.dotted.name"}))),
        ("table=%C3%A9t%C3%A9.*", w.TapFilter(schemas=frozenset({"été"}))),
    ])
    def test_query_strings(self, query, expected):
        assert w.parse_tap_filter(query) == expected

    @pytest.mark.parametrize("query,message", [
        ("op=insrt", "op=insrt: one of insert, update, delete, truncate, message, read expected"),
        ("table=orders", "table=orders: schema.table or schema.* expected"),
        ("table=.*", "table=.*: schema.table or schema.* expected"),
        ("table=public.o*", "table=public.o*: schema.table or schema.* expected"),
    ])
    def test_bad_query_strings(self, query, message):
        with pytest.raises(w.TapRequestError) as info:
            w.parse_tap_filter(query)
        assert str(info.value) == message

    @pytest.mark.parametrize("event", [
        {"id": "0/1:0", "op": "insert", "schema": "public", "table": "orders", "key": {"id": 1}},
        {"id": "0/1:0", "op": "update", "schema": "sch\u00e9ma \"q\"", "table": "t,\\x", "key": None},
        {"id": "0/1:0", "op": "message", "schema": None, "table": None, "key": None},
        {"op": "delete", "id": "0/1:0", "table": "late", "schema": "keys"},  # not the envelope's order
    ])
    def test_event_table_from_the_text_or_the_value(self, event):
        expected = (event["schema"], event["table"])
        assert w.event_table(w.Event.from_dict(event)) == expected
        assert w.event_table(event) == expected

    def test_matches(self):
        orders = w.Event.from_dict({"id": "0/1:0", "op": "insert", "schema": "public", "table": "orders"})
        message = w.Event.from_dict({"id": "0/1:1", "op": "message", "schema": None, "table": None})
        assert w.parse_tap_filter("table=public.*").matches(orders)
        assert w.parse_tap_filter("table=public.orders&op=insert").matches(orders)
        assert not w.parse_tap_filter("table=public.orders&op=delete").matches(orders)
        assert not w.parse_tap_filter("table=public.items").matches(orders)
        assert not w.parse_tap_filter("table=public.*").matches(message)
        assert w.parse_tap_filter("op=message").matches(message)


class TestTapClientQueue:
    @staticmethod
    def events(first: int, count: int) -> tuple[list, list[bytes]]:
        events = [w.Event.from_dict({"id": f"0/1:{n}", "op": "insert" if n % 2 else "delete",
                                     "schema": "public", "table": "t"}) for n in range(first, first + count)]
        return events, [w.encode_text_frame(line) for line in w.event_lines(events)]

    @pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
    def test_frames_are_wsprotos(self, size):
        import wsproto.frame_protocol
        text = ("é" + "x" * size)[:size] if size else ""
        protocol = wsproto.frame_protocol.FrameProtocol(client=False, extensions=[])
        assert w.encode_text_frame(text) == protocol.send_data(text, fin=True)

    @pytest.mark.parametrize("sent,expected", [(0, (0, b"")), (2, (1, b"c")), (3, (1, b"")), (4, (2, b"ef")),
                                               (6, (2, b"")), (7, (3, b""))])
    def test_split_written(self, sent, expected):
        assert w.split_written([b"abc", b"def", b"g"], sent) == expected

    async def test_more_than_a_thousand_unwritten_is_too_slow(self):
        client = w.TapClient(w.TapFilter())
        assert client.offer(*self.events(0, 999)) is False
        assert await client.next_frames() == self.events(0, 250)[1]  # being written: still unwritten
        assert client.offer(*self.events(999, 1)) is False  # 1,000 unwritten
        assert client.offer(*self.events(1000, 5)) is True  # the 1,001st: behind
        assert (client.too_slow, client.unwritten, len(client.frames)) == (True, 1000, 750)
        assert client.offer(*self.events(1005, 1)) is False  # counted once, nothing more queued
        assert list(client.frames) == self.events(250, 750)[1]
        client.written(250)
        frames = [frame for _ in range(3) for frame in await client.next_frames()]
        assert frames == self.events(250, 750)[1]
        assert await client.next_frames() == []  # then the close

    async def test_only_what_it_asked_for_counts(self):
        client = w.TapClient(w.parse_tap_filter("op=insert"))
        events, frames = self.events(0, 2000)
        assert client.offer(events, frames) is False
        assert list(client.frames) == frames[1::2]

    async def test_the_page_is_the_one_client_of_many_that_lags(self):
        stats = w.Stats(w.Config())
        fast, slow = w.TapClient(w.TapFilter()), w.TapClient(w.TapFilter())
        stats.tap.clients += [fast, slow]
        for first in range(0, 1500, 250):
            stats.tap.publish(self.events(first, 250)[0])
            while fast.frames:
                fast.written(len(await fast.next_frames()))
        assert (fast.too_slow, slow.too_slow, stats.tap_clients_closed["too_slow"]) == (False, True, 1)
        assert stats.tap_clients == 2

    async def test_written_at_once_when_the_socket_takes_it(self):
        client = w.TapClient(w.TapFilter())
        taken: list[bytes] = []

        def write_now(frames):  # takes 3 frames, the third in part
            taken.extend(frames[:3])
            return 3, b"rest of the third"

        client.write_now = write_now
        events, frames = self.events(0, 5)
        assert client.offer(events, frames) is False
        assert taken == frames[:3] and list(client.frames) == [b"rest of the third", *frames[3:]]
        assert client.unwritten == 3
        assert client.offer(*self.events(5, 1)) is False  # something queued: queued after it
        assert taken == frames[:3] and client.unwritten == 4

    async def test_a_fault_closes_the_client_not_delivery(self, caplog):
        stats = w.Stats(w.Config())
        client = w.TapClient(w.TapFilter())
        client.write_now = lambda frames: 1 / 0
        stats.tap.clients.append(client)
        stats.chunk_taken(w.Chunk(self.events(0, 3)[0]))
        assert client.too_slow and client.write_now is None and not client.frames
        assert logged(caplog, "live tap: a client is closed after an error")
        assert await client.next_frames() == []  # then the close


class TestTapConfig:
    def test_tap_max_clients(self):
        assert load().tap_max_clients == 16
        assert load({"TAP_MAX_CLIENTS": "3"}).tap_max_clients == 3
        assert load(argv=["--tap-max-clients", "32"]).tap_max_clients == 32
        for bad in ("0", "33", "x"):
            assert config_error({"TAP_MAX_CLIENTS": bad}) == (
                f"TAP_MAX_CLIENTS must be a whole number from 1 to 32, got {bad!r}")


def tap_request(target: str, host: str = "127.0.0.1:9187") -> h11.Request:
    """A WebSocket handshake (answered as a plain GET where the path is not /events)."""
    return h11.Request(method="GET", target=target, headers=[("Host", host), *WEBSOCKET_HEADERS])


class TestTapServer:
    """The handshake's rules on the port alone (no replication)."""

    async def test_origin(self):
        port = free_port()
        async with ops_server(ops_config(port)):
            assert await tap_refusal(port) is None  # no Origin: not a browser
            assert await tap_refusal(port, headers=[("Origin", f"http://127.0.0.1:{port}")]) is None
            for origin in ("http://evil.example", f"https://127.0.0.1:{port}", "http://127.0.0.1",
                           f"http://127.0.0.1:{port}.evil.example", "null"):
                assert await tap_refusal(port, headers=[("Origin", origin)]) == (
                    403, b"a WebSocket from another origin is refused\n"), origin

    async def test_client_cap(self):
        port = free_port()
        async with ops_server(ops_config(port, tap_max_clients=2)) as stats:
            async with tap_client(port), tap_client(port, "op=insert"):
                await wait_until(lambda: stats.tap_clients == 2, timeout=10)
                assert metric_value(await scrape(port), "wal2http_tap_clients") == 2
                assert await tap_refusal(port) == (503, b"the live tap has TAP_MAX_CLIENTS clients already\n")
                assert stats.tap_clients == 2
            await wait_until(lambda: stats.tap_clients == 0, timeout=10)
            assert metric_value(await scrape(port), "wal2http_tap_clients") == 0
            assert await tap_refusal(port) is None

    async def test_token(self):
        port = free_port()
        async with ops_server(ops_config(port, OPS_TOKEN)):
            assert (await tap_refusal(port))[0] == 401
            assert (await tap_refusal(port, "token=wrong"))[0] == 401
            assert (await tap_refusal(port, headers=[("Authorization", "Bearer wrong")]))[0] == 401
            assert await tap_refusal(port, f"token={OPS_TOKEN}") is None
            assert await tap_refusal(port, f"op=insert&token={urllib.parse.quote(OPS_TOKEN)}") is None
            assert await tap_refusal(port, headers=[("Authorization", f"Bearer {OPS_TOKEN}")]) is None
            assert (await ops_get(port, "/")).status == 401
            assert (await ops_get(port, "/", token=OPS_TOKEN)).status == 200
            assert (await ops_get(port, f"/?token={OPS_TOKEN}")).status == 200

    async def test_bad_filters_and_plain_requests(self):
        port = free_port()
        async with ops_server(ops_config(port)):
            assert await tap_refusal(port, "op=insrt") == (
                400, b"op=insrt: one of insert, update, delete, truncate, message, read expected\n")
            plain = await ops_get(port, "/events")
            assert (plain.status, plain.headers["upgrade"]) == (426, "websocket")
            half = await ops_get(port, "/events", headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")])
            assert half.status == 400  # no Sec-WebSocket-Key
            assert (await ops_get(port, "/health")).status == 200  # the port goes on

    @pytest.mark.parametrize("target", ["/", "/events"])
    def test_off_beyond_loopback_without_token(self, target):
        stats = w.Stats(w.Config())
        request = tap_request(target)
        served = 101 if target == "/events" else 200  # a TapFilter: the handshake goes on

        def status(answer) -> int:
            return 101 if isinstance(answer, w.TapFilter) else answer.status

        assert status(w.OpsServer(ops_config(9187, host="0.0.0.0"), stats).route(request)) == 404
        assert status(w.OpsServer(ops_config(9187, host="127.0.0.1"), stats).route(request)) == served
        with_token = w.OpsServer(ops_config(9187, OPS_TOKEN, host="0.0.0.0"), stats)
        assert status(with_token.route(request)) == 401
        assert status(with_token.route(tap_request(f"{target}?token={OPS_TOKEN}"))) == served

    @pytest.mark.parametrize("target", ["/", "/events", "/status"])
    def test_dns_rebinding_gets_nothing_without_token(self, target):
        stats = w.Stats(w.Config())
        loopback, with_token = w.OpsServer(ops_config(9187), stats), w.OpsServer(ops_config(9187, OPS_TOKEN), stats)
        served = (w.TapFilter,) if target == "/events" else (w.OpsAnswer,)
        for host in ("127.0.0.1:9187", "localhost:9187", "[::1]:9187", "127.0.0.1", "LOCALHOST"):
            answer = loopback.route(tap_request(target, host))
            assert isinstance(answer, served) and getattr(answer, "status", 200) == 200, host
        for host in ("evil.example:9187", "evil.example", "127.0.0.1.evil.example:9187", "[::1", ""):
            answer = loopback.route(tap_request(target, host))
            assert (answer.status, answer.body) == (403, b"without OPS_TOKEN, row data is served to this machine's "
                                                         b"own names only (Host: 127.0.0.1, [::1] or localhost)\n")
        assert loopback.route(tap_request("/health", "evil.example")).status == 200  # no row data
        answer = with_token.route(tap_request(f"{target}?token={OPS_TOKEN}", "wal2http.internal:9187"))
        assert isinstance(answer, w.TapFilter) or answer.status == 200  # the token protects

    def test_handshake_goes_to_trio_websocket_byte_for_byte(self):
        conn = h11.Connection(h11.SERVER)
        head = (b"GET /events?op=insert HTTP/1.1\r\nHost: 127.0.0.1:9\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n")
        conn.receive_data(head + b"\x81")
        request = conn.next_event()
        assert w.encode_request_head(request) == head
        assert (conn.next_event(), conn.next_event(), conn.trailing_data) == (
            h11.EndOfMessage(), h11.PAUSED, (b"\x81", False))


class TestPage:
    async def test_page_and_its_policy(self):
        port = free_port()
        async with ops_server(ops_config(port)):
            page = await ops_get(port, "/")
            head = await ops_get(port, "/", method="HEAD")
        assert (page.status, page.headers["content-type"]) == (200, "text/html; charset=utf-8")
        assert head.status == 200 and head.body == b""
        text = page.body.decode()
        assert text == w.TAP_PAGE
        policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
        script = re.search(r"<script>(.*)</script>", text, re.S).group(1)
        style = re.search(r"<style>(.*)</style>", text, re.S).group(1)
        digest = lambda body: "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        assert policy == {"default-src": "'none'", "script-src": digest(script), "style-src": digest(style),
                          "connect-src": "'self'", "img-src": "data:", "base-uri": "'none'",
                          "form-action": "'none'", "frame-ancestors": "'none'"}
        assert page.headers["referrer-policy"] == "no-referrer"
        assert text.count("<script") == text.count("<style") == 1
        assert not re.search(r"(src|href)=\"(?!data:)", text)  # nothing loaded but the page itself
        assert not re.search(r"[a-z]+://[\w\[]", text)  # no absolute URL: nothing from another origin
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "eval(" not in text
        assert " on" not in re.sub(r"<script>.*</script>", "", text, flags=re.S).split("<body>")[1].replace(
            " only", "")  # no inline event handler in the markup


# =====================================================================================================
# Configuration
# =====================================================================================================


class TestConfig:
    def test_defaults_match_the_contract(self):
        config, mode = w.load_config([], {"DATABASE_URL": DB_URL})
        assert mode == "run"
        assert config.database_url == DB_URL
        assert config.conninfo.host == "db.example.org"
        assert dataclasses.replace(config, database_url=None, conninfo=None) == w.Config()
        assert (config.slot_name, config.publications, config.create_slot) == ("sub", ("pub",), True)
        assert (config.event_sink, config.feedback_interval_s, config.streaming) == ("stdout", 1.0, False)
        assert (config.on_failure, config.dead_letter_file) == ("exit", "wal2http-dead-letter.jsonl")
        assert (config.retry_max_attempts, config.retry_base_delay_s, config.retry_max_delay_s) == (5, 1.0, 30.0)
        assert (config.log_level, config.http_batch_size, config.http_timeout_s) == ("INFO", 1, 10.0)
        assert (config.http_headers, config.hook0_labels, config.email_to) == ((), (), ())
        assert (config.email_smtp_port, config.email_smtp_tls) == (587, "starttls")
        assert not config.hook0_table_events
        assert not config.hook0_create_event_types

    SETTINGS = [
        ("SLOT_NAME", "my_slot_2", "slot_name", "my_slot_2"),
        ("SLOT_NAME", "s" * 63, "slot_name", "s" * 63),
        ("PUB_NAME", " orders , users,orders ", "publications", ("orders", "users")),
        ("CREATE_SLOT", "No", "create_slot", False),
        ("EVENT_SINK", "STDOUT", "event_sink", "stdout"),
        ("FEEDBACK_INTERVAL_SECS", "0.25", "feedback_interval_s", 0.25),
        ("STREAMING", "on", "streaming", True),
        ("ON_FAILURE", "Retry", "on_failure", "retry"),
        ("ON_FAILURE", "skip", "on_failure", "skip"),
        ("DEAD_LETTER_FILE", "/var/lib/wal2http/dead.jsonl", "dead_letter_file", "/var/lib/wal2http/dead.jsonl"),
        ("RETRY_MAX_ATTEMPTS", "1", "retry_max_attempts", 1),
        ("RETRY_BASE_DELAY_MS", "0", "retry_base_delay_s", 0.0),
        ("RETRY_MAX_DELAY_MS", "60000", "retry_max_delay_s", 60.0),
        ("DELIVERY_CONCURRENCY", "256", "delivery_concurrency", 256),
        ("SLOT_FAILOVER", "on", "slot_failover", True),
        ("OPS_ADDR", "127.0.0.1:9187", "ops_addr", ("127.0.0.1", 9187)),
        ("OPS_ADDR", ":9187", "ops_addr", ("", 9187)),
        ("OPS_ADDR", "[::1]:9187", "ops_addr", ("::1", 9187)),
        ("OPS_TOKEN", " 0ps-T0ken \n", "ops_token", "0ps-T0ken"),
        ("SLOT_CHECK_INTERVAL_SECS", "0.5", "slot_check_interval_s", 0.5),
        ("SLOT_MAX_RETAINED_MB", "64", "slot_max_retained_mb", 64),
        ("TAP_MAX_CLIENTS", "32", "tap_max_clients", 32),
        ("BACKFILL_TABLES", ' public.orders, "Sales".*,* ', "backfill_tables", ("public.orders", "Sales.*", "*")),
        ("BACKFILL_ON_CREATE", "true", "backfill_on_create", True),
        ("BACKFILL_CHUNK_ROWS", "500", "backfill_chunk_rows", 500),
        ("STATE_FILE", " /var/lib/wal2http/state.json ", "state_file", "/var/lib/wal2http/state.json"),
        ("DELIVERY_CONCURRENCY", " 8 ", "delivery_concurrency", 8),
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("HTTP_BATCH_SIZE", "50", "http_batch_size", 50),
        ("HTTP_TIMEOUT_SECS", "2.5", "http_timeout_s", 2.5),
        ("HTTP_HEADERS", '{"Authorization": "Bearer abc", "X-Team": "data"}', "http_headers",
         (("Authorization", "Bearer abc"), ("X-Team", "data"))),
        ("HTTP_SIGNING_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "http_signing_secret",
         "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ("HTTP_SIGNING_SECRET", "plain secret", "http_signing_secret", "plain secret"),
        ("HOOK0_TABLE_EVENTS", "1", "hook0_table_events", True),
        ("HOOK0_CREATE_EVENT_TYPES", "YES", "hook0_create_event_types", True),
        ("HOOK0_APPLICATION_ID", APP_ID.upper(), "hook0_application_id", APP_ID),
        ("HOOK0_API_URL", "http://localhost:8081", "hook0_api_url", "http://localhost:8081"),
        ("HOOK0_LABELS", '{"tenant": "acme", "n": 3, "ok": true, "x": 1.5, "gone": null}', "hook0_labels",
         (("tenant", "acme"), ("n", "3"), ("ok", "true"), ("x", "1.5"))),
        ("EMAIL_SMTP_HOST", "smtp.example.org", "email_smtp_host", "smtp.example.org"),
        ("EMAIL_SMTP_USERNAME", "alerts", "email_smtp_username", "alerts"),
        ("EMAIL_SMTP_PASSWORD", "pw", "email_smtp_password", "pw"),
        ("EMAIL_FROM", "wal2http <w@example.org>", "email_from", "wal2http <w@example.org>"),
        ("EMAIL_TO", " a@example.org , b@example.org ,", "email_to", ("a@example.org", "b@example.org")),
        ("EMAIL_SMTP_PORT", "2525", "email_smtp_port", 2525),
        ("EMAIL_SMTP_TLS", "NONE", "email_smtp_tls", "none"),
    ]

    @pytest.mark.parametrize("source", ["env", "flag", "flag="])
    @pytest.mark.parametrize("variable,value,field,expected", SETTINGS)
    def test_each_variable_from_env_or_flag(self, source, variable, value, field, expected):
        flag = "--" + variable.lower().replace("_", "-")
        if source == "env":
            config = load({variable: value})
        elif source == "flag":
            config = load(argv=[flag, value])
        else:
            config = load(argv=[f"{flag}={value}"])
        assert getattr(config, field) == expected

    def test_every_option_mirrors_its_variable(self):
        assert [setting.flag for setting in w.SETTINGS] == [
            "--database-url", "--slot-name", "--pub-name", "--create-slot", "--event-sink",
            "--slot-failover", "--feedback-interval-secs", "--streaming", "--on-failure", "--dead-letter-file",
            "--retry-max-attempts", "--retry-base-delay-ms", "--retry-max-delay-ms", "--delivery-concurrency", "--log-level",
            "--http-endpoint-url", "--http-batch-size", "--http-timeout-secs", "--http-headers",
            "--http-signing-secret", "--http-ca-file", "--hook0-api-url", "--hook0-application-id",
            "--hook0-api-token", "--hook0-table-events", "--hook0-labels", "--hook0-create-event-types",
            "--email-smtp-host", "--email-smtp-port", "--email-smtp-username", "--email-smtp-password",
            "--email-from", "--email-to", "--email-smtp-tls", "--ops-addr", "--ops-token",
            "--slot-check-interval-secs", "--slot-max-retained-mb", "--tap-max-clients",
            "--backfill-tables", "--backfill-on-create", "--backfill-chunk-rows", "--state-file"]

    @pytest.mark.parametrize("env,argv,expected", [
        ({}, [], "sub"),
        ({"SLOT_NAME": "from_env"}, [], "from_env"),
        ({"SLOT_NAME": "from_env"}, ["--slot-name", "from_flag"], "from_flag"),
        ({}, ["--slot-name", "from_flag"], "from_flag"),
        ({"SLOT_NAME": ""}, [], "sub"),  # an empty variable counts as unset
        ({"SLOT_NAME": "from_env"}, ["--slot-name="], "sub"),  # an empty flag too, and wins
    ])
    def test_flag_over_environment_over_default(self, env, argv, expected):
        assert load(env, argv).slot_name == expected

    def test_database_url_flag_wins(self):
        config = load({"DATABASE_URL": "postgresql://u@envhost/d"},
                      ["--database-url", "postgresql://u@flaghost/d"], with_db=False)
        assert config.conninfo.host == "flaghost"

    @pytest.mark.parametrize("word,expected", [
        ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True), ("on", True),
        ("ON", True), ("false", False), ("False", False), ("0", False), ("no", False), ("NO", False),
        ("off", False), (" off ", False)])
    def test_booleans(self, word, expected):
        for variable, field in (("CREATE_SLOT", "create_slot"), ("STREAMING", "streaming"),
                                ("HOOK0_TABLE_EVENTS", "hook0_table_events"),
                                ("HOOK0_CREATE_EVENT_TYPES", "hook0_create_event_types")):
            assert getattr(load({variable: word}), field) is expected

    def test_bare_boolean_flag_means_true(self):
        config = load({"STREAMING": "false"}, ["--streaming", "--hook0-table-events"])
        assert config.streaming
        assert config.hook0_table_events
        assert not load(argv=["--create-slot", "off"]).create_slot

    @pytest.mark.parametrize("word", ["maybe", "2", "ja", "tru"])
    def test_bad_boolean(self, word):
        message = config_error({"CREATE_SLOT": word})
        assert message.startswith("CREATE_SLOT must be true or false")

    @pytest.mark.parametrize("env,expected", [
        ({}, "stdout"),
        ({"HTTP_ENDPOINT_URL": "https://hooks.example.org/in"}, "http"),
        (HOOK0, "hook0"),
        ({**HOOK0, "HTTP_ENDPOINT_URL": "https://hooks.example.org/in"}, "hook0"),
        ({"HOOK0_API_URL": "https://h0", "HOOK0_APPLICATION_ID": APP_ID,
          "HTTP_ENDPOINT_URL": "https://hooks.example.org/in"}, "http"),
        ({"HOOK0_API_URL": "https://h0", "HOOK0_API_TOKEN": "t"}, "stdout"),
        ({**HOOK0, "EVENT_SINK": "stdout"}, "stdout"),
        ({**HOOK0, "HTTP_ENDPOINT_URL": "https://x.example", "EVENT_SINK": "Http"}, "http"),
        ({"HTTP_ENDPOINT_URL": "https://x.example", "EVENT_SINK": ""}, "http"),
    ])
    def test_sink_priority_rule(self, env, expected):
        assert load(env).event_sink == expected

    @pytest.mark.parametrize("env,port,tls", [
        ({}, 587, "starttls"),
        ({"EMAIL_SMTP_PORT": "465"}, 465, "ssl"),
        ({"EMAIL_SMTP_PORT": "25"}, 25, "starttls"),
        ({"EMAIL_SMTP_TLS": "ssl"}, 465, "ssl"),
        ({"EMAIL_SMTP_TLS": "starttls"}, 587, "starttls"),
        ({"EMAIL_SMTP_TLS": "none"}, 587, "none"),
        ({"EMAIL_SMTP_TLS": "starttls", "EMAIL_SMTP_PORT": "465"}, 465, "starttls"),
        ({"EMAIL_SMTP_TLS": "ssl", "EMAIL_SMTP_PORT": "2465"}, 2465, "ssl"),
    ])
    def test_smtp_port_and_tls_defaults(self, env, port, tls):
        config = load(env)
        assert (config.email_smtp_port, config.email_smtp_tls) == (port, tls)

    EXACT_ERRORS = [
        ({"EVENT_SINK": "kafka"}, "EVENT_SINK: Event sink must be one of: 'http', 'hook0', or 'stdout' "
                                  "(got 'kafka')"),
        ({"EVENT_SINK": "stdout2"}, "EVENT_SINK: Event sink must be one of: 'http', 'hook0', or 'stdout' "
                                    "(got 'stdout2')"),
        ({"EVENT_SINK": "htpp"}, "EVENT_SINK: Event sink must be one of: 'http', 'hook0', or 'stdout' "
                                 "(got 'htpp')"),
        ({"EVENT_SINK": "http"}, "HTTP event sink specified but missing HTTP_ENDPOINT_URL"),
        ({"EVENT_SINK": "HTTP", **HOOK0}, "HTTP event sink specified but missing HTTP_ENDPOINT_URL"),
        ({"EVENT_SINK": "hook0"}, "Hook0 event sink specified but missing required configuration "
                                  "(HOOK0_API_URL, HOOK0_APPLICATION_ID, HOOK0_API_TOKEN)"),
        ({"EVENT_SINK": "hook0", "HOOK0_API_URL": "https://h0.example"},
         "Hook0 event sink specified but missing required configuration "
         "(HOOK0_APPLICATION_ID, HOOK0_API_TOKEN)"),
    ] + [
        ({"EVENT_SINK": "hook0", **{k: v for k, v in HOOK0.items() if k != missing}},
         f"Hook0 event sink specified but missing required configuration ({missing})")
        for missing in HOOK0
    ]

    @pytest.mark.parametrize("env,message", EXACT_ERRORS)
    def test_contract_error_messages(self, env, message):
        assert config_error(env) == message

    NAMED_ERRORS = [
        ("HTTP_ENDPOINT_URL", "ftp://files.example.org/in"),
        ("HTTP_ENDPOINT_URL", "hooks.example.org/in"),
        ("HTTP_ENDPOINT_URL", "https://"),
        ("HTTP_ENDPOINT_URL", "https://host:99999/"),
        ("HOOK0_API_URL", "hook0.example.org"),
        ("HOOK0_APPLICATION_ID", "not-a-uuid"),
        ("ON_FAILURE", "explode"),
        ("FEEDBACK_INTERVAL_SECS", "0"),
        ("FEEDBACK_INTERVAL_SECS", "-1"),
        ("FEEDBACK_INTERVAL_SECS", "soon"),
        ("FEEDBACK_INTERVAL_SECS", "inf"),
        ("FEEDBACK_INTERVAL_SECS", "nan"),
        ("RETRY_MAX_ATTEMPTS", "0"),
        ("RETRY_MAX_ATTEMPTS", "1.5"),
        ("RETRY_BASE_DELAY_MS", "-1"),
        ("RETRY_MAX_DELAY_MS", "x"),
        ("RETRY_BASE_DELAY_MS", "40000"),  # above the default maximum of 30000
        ("DELIVERY_CONCURRENCY", "0"),
        ("DELIVERY_CONCURRENCY", "257"),
        ("DELIVERY_CONCURRENCY", "2.5"),
        ("HTTP_BATCH_SIZE", "0"),
        ("HTTP_TIMEOUT_SECS", "0"),
        ("HTTP_HEADERS", "[1, 2]"),
        ("HTTP_HEADERS", "{bad json"),
        ("HTTP_HEADERS", '{"X-Count": 1}'),
        ("HTTP_HEADERS", '{"bad name": "x"}'),
        ("HTTP_HEADERS", '{"Content-Length": "10"}'),
        ("HTTP_HEADERS", '{"X-A": "a\\r\\nX-Injected: 1"}'),
        ("HTTP_SIGNING_SECRET", "whsec_***not base64***"),
        ("HTTP_SIGNING_SECRET", "whsec_"),
        ("HTTP_CA_FILE", "/nonexistent/ca.pem"),
        ("HOOK0_LABELS", '["a"]'),
        ("HOOK0_LABELS", '{"a": {"nested": 1}}'),
        ("HOOK0_LABELS", '{"a": ""}'),
        ("HOOK0_LABELS", '{"%s": "x"}' % ("k" * 51)),
        ("HOOK0_LABELS", '{"a": 1e999}'),
        ("HOOK0_LABELS", '{"a": NaN}'),
        ("HOOK0_LABELS", json.dumps({f"k{i}": "v" for i in range(11)})),
        ("LOG_LEVEL", "verbose"),
        ("EMAIL_SMTP_TLS", "tls"),
        ("EMAIL_SMTP_PORT", "0"),
        ("EMAIL_SMTP_PORT", "smtp"),
        ("EMAIL_TO", "ops@example.org, nobody"),
        ("EMAIL_FROM", "wal2http"),
        ("SLOT_NAME", "My-Slot"),
        ("SLOT_NAME", "s" * 64),
        ("PUB_NAME", "a,,b"),
        ("CREATE_SLOT", "maybe"),
        ("STREAMING", "2"),
        ("DATABASE_URL", "postgresql://u:pw@h/d?sslmode=sometimes"),
    ]

    @pytest.mark.parametrize("variable,value", NAMED_ERRORS)
    def test_errors_name_the_variable(self, variable, value):
        assert variable in config_error({variable: value})

    def test_base_delay_above_max_delay(self):
        message = config_error({"RETRY_BASE_DELAY_MS": "5000", "RETRY_MAX_DELAY_MS": "1000"})
        assert message == "RETRY_BASE_DELAY_MS (5000) must not be larger than RETRY_MAX_DELAY_MS (1000)"

    def test_database_url_required_except_in_demo(self):
        assert config_error(with_db=False).startswith("DATABASE_URL is required")
        assert config_error({"DATABASE_URL": "  "}, with_db=False).startswith("DATABASE_URL is required")
        assert config_error(argv=["--check"], with_db=False).startswith("DATABASE_URL is required")
        config, mode = w.load_config(["--demo"], {})
        assert mode == "demo"
        assert config.database_url is None
        assert config.conninfo is None

    def test_modes(self):
        assert w.load_config(["--check"], {"DATABASE_URL": DB_URL})[1] == "check"
        assert w.load_config([], {"DATABASE_URL": DB_URL})[1] == "run"
        assert "--check" in config_error(argv=["--check", "--demo"])

    @pytest.mark.parametrize("argv,shown", [
        (["--databse-url", "postgresql://u:Typo-Secret-9@h/d"], "--databse-url"),
        (["--databse-url=postgresql://u:Typo-Secret-9@h/d"], "--databse-url"),
        (["stray", "Typo-Secret-9"], "unexpected arguments"),
        (["--slot-name"], "--slot-name"),
        (["--slot"], "--slot"),  # no abbreviations: options stay unambiguous as new ones are added
    ])
    def test_command_line_errors_are_config_errors_without_values(self, argv, shown):
        message = config_error(argv=argv)
        assert shown in message
        assert "Typo-Secret-9" not in message

    def test_help_lists_every_option_variable_and_default(self, capsys, monkeypatch):
        monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a help text
        with pytest.raises(SystemExit) as info:
            w.load_config(["--help"], {})
        assert info.value.code == 0
        out = capsys.readouterr().out
        options = " ".join(out.split("options:", 1)[1].split())
        for setting in w.SETTINGS:
            assert f"{setting.flag} {setting.variable}" in options or f"{setting.flag} [" in options
            assert f"[env {setting.variable}; default: {setting.help_default}]" in options
        for flag in ("--check", "--demo", "--version", "--help"):
            assert flag in out
        assert "default: sub]" in out
        assert "default: wal2http-dead-letter.jsonl]" in out

    def test_help_lists_sink_and_alert_settings_under_their_heading(self, capsys, monkeypatch):
        monkeypatch.setenv("COLUMNS", "1000")
        with pytest.raises(SystemExit):
            w.load_config(["--help"], {})
        out = capsys.readouterr().out
        headings = {group: out.index(f"\n{title}:\n") for group, title in w.HELP_GROUPS.items()}
        for setting in w.SETTINGS:
            at = out.index(f"  {setting.flag} ")
            if setting.group in headings:
                assert at > headings[setting.group], setting.variable
                assert not any(headings[setting.group] < start < at for start in headings.values()), setting.variable
            else:
                assert at < min(headings.values()), setting.variable

    def test_config_has_a_field_per_setting_with_its_default(self):
        fields = [field.name for field in dataclasses.fields(w.Config)]
        assert fields == ["database_url", "conninfo"] + [setting.field for setting in w.SETTINGS[1:]]
        assert w.SETTINGS[0].field == "database_url"
        for setting in w.SETTINGS:
            assert getattr(w.Config(), setting.field) == setting.default, setting.variable

    #: A valid value for every setting SETTINGS above leaves out, and the field it gives.
    MORE_SETTINGS = [
        ("DATABASE_URL", "postgresql://u@flag.example.org/d", "database_url", "postgresql://u@flag.example.org/d"),
        ("HTTP_ENDPOINT_URL", " https://hooks.example.org/in ", "http_endpoint_url", "https://hooks.example.org/in"),
        ("HTTP_CA_FILE", __file__, "http_ca_file", __file__),
        ("HOOK0_API_TOKEN", "tok-1\n", "hook0_api_token", "tok-1"),
    ]

    def test_every_setting_has_a_flag_and_a_variable(self):
        covered = {variable for variable, *_ in self.SETTINGS + self.MORE_SETTINGS}
        assert covered == {setting.variable for setting in w.SETTINGS}
        for variable, value, field, expected in self.MORE_SETTINGS:
            flag = "--" + variable.lower().replace("_", "-")
            assert getattr(load({variable: value}), field) == expected
            assert getattr(load(argv=[flag, value]), field) == expected

    #: A value with a secret in it for every setting the table marks as holding secrets.
    SECRET_SAMPLES = {
        "DATABASE_URL": ("postgresql://app:Secret-Db-Pw-77@db.example.org/app", "Secret-Db-Pw-77"),
        "HTTP_ENDPOINT_URL": ("https://user:Secret-Url-Pw-77@hooks.example.org/in", "Secret-Url-Pw-77"),
        "HTTP_HEADERS": ('{"Authorization": "Bearer Secret-Header-77"}', "Bearer Secret-Header-77"),
        "HTTP_SIGNING_SECRET": ("Secret-Signing-77", "Secret-Signing-77"),
        "HOOK0_API_URL": ("https://Secret-Hook0-Url-Token-77@hook0.example.org", "Secret-Hook0-Url-Token-77"),
        "HOOK0_API_TOKEN": ("Secret-Hook0-Token-77", "Secret-Hook0-Token-77"),
        "EMAIL_SMTP_PASSWORD": ("Secret-Smtp-Pw-77", "Secret-Smtp-Pw-77"),
        "OPS_TOKEN": ("Secret-Ops-Token-77", "Secret-Ops-Token-77"),
    }

    @pytest.mark.parametrize("variable", list(SECRET_SAMPLES))
    def test_every_secret_setting_is_scrubbed(self, variable):
        assert set(self.SECRET_SAMPLES) == {setting.variable for setting in w.SETTINGS if setting.secrets}
        value, secret = self.SECRET_SAMPLES[variable]
        config = load({variable: value})
        assert secret in w.config_secrets(config)
        assert secret not in repr(config)
        assert secret not in w.describe_config(config)
        message = config_error({variable: value, "ON_FAILURE": secret})  # an error that echoes it
        assert message.startswith("ON_FAILURE must be one of")
        assert secret not in message
        assert w.scrub_secrets(f"x {secret} y", w.config_secrets(config)) == "x *** y"

    @pytest.mark.parametrize("run_as,prog", [("script", "wal2http.py"), ("command", "wal2http"),
                                             ("zipapp", "wal2http.pyz")])
    def test_help_names_the_program_as_it_was_run(self, tmp_path, run_as, prog):
        if run_as == "script":
            target = os.path.join(HERE, "wal2http.py")
        elif run_as == "command":  # what `pip install` writes for [project.scripts]
            target = tmp_path / "wal2http"
            target.write_text("import sys\nfrom wal2http import main\nsys.exit(main())\n")
        else:  # the README's recipe, with the dependencies taken from this environment
            (tmp_path / "app").mkdir()
            shutil.copy(os.path.join(HERE, "wal2http.py"), tmp_path / "app")
            (tmp_path / "app" / "__main__.py").write_text("import sys\nimport wal2http\nsys.exit(wal2http.main())\n")
            target = tmp_path / "wal2http.pyz"
            subprocess.run([sys.executable, "-m", "zipapp", tmp_path / "app", "-o", target], check=True, timeout=60)
        result = subprocess.run([sys.executable, str(target), "--help"], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "PYTHONPATH": HERE})
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: {prog} [-h]")

    def test_hook0_labels_follow_the_sinks_rules(self):
        labels = {f"k{i}": "v" for i in range(11)}
        assert config_error({"HOOK0_LABELS": json.dumps(labels)}) == \
            "HOOK0_LABELS " + w.hook0_string_map_problem(labels, 0, 10)
        assert w.hook0_string_map_problem(labels, 0, 10) == "has 11 entries; Hook0 accepts 0 to 10"
        assert config_error({"HOOK0_LABELS": '{"a": ""}'}) == \
            "HOOK0_LABELS has a value of 0 bytes (key 'a'); Hook0 accepts 1 to 50"

    def test_signing_secret_is_read_as_the_http_sink_reads_it(self):
        for secret in ("whsec_", "whsec_***", "whsec_ not base64"):  # "whsec_" alone: an empty key
            with pytest.raises(w.ConfigError) as info:
                w.decode_signing_secret(secret)
            assert str(info.value) == "HTTP_SIGNING_SECRET starts with 'whsec_' but what follows is not valid base64"
            if len(secret) > len("whsec_"):  # else the secret itself, "whsec_", is scrubbed from the message
                assert config_error({"HTTP_SIGNING_SECRET": secret}) == str(info.value)

    def test_version(self, capsys):
        with pytest.raises(SystemExit) as info:
            w.load_config(["--version"], {})
        assert info.value.code == 0
        assert w.__version__ in capsys.readouterr().out

    SECRETS = {
        "DATABASE_URL": ("postgresql://app:Secret-Db-Pw-77@db.example.org/app", "Secret-Db-Pw-77"),
        "HOOK0_API_TOKEN": ("Secret-Hook0-Token-77", "Secret-Hook0-Token-77"),
        "EMAIL_SMTP_PASSWORD": ("Secret-Smtp-Pw-77", "Secret-Smtp-Pw-77"),
        "HTTP_SIGNING_SECRET": ("Secret-Signing-77", "Secret-Signing-77"),
        "HTTP_HEADERS": ('{"Authorization": "Bearer Secret-Header-77"}', "Secret-Header-77"),
    }
    BAD_NEIGHBOURS = [  # (variable, bad value, the secret that value itself carries)
        ("EVENT_SINK", "hook0", None), ("EVENT_SINK", "http", None),
        ("EVENT_SINK", "Secret-Hook0-Token-77", None), ("ON_FAILURE", "Secret-Smtp-Pw-77", None),
        ("SLOT_NAME", "Secret-Signing-77", None), ("HTTP_ENDPOINT_URL", "Secret-Header-77", None),
        ("HOOK0_APPLICATION_ID", "Secret-Db-Pw-77", None), ("EMAIL_TO", "Secret-Smtp-Pw-77", None),
        ("RETRY_MAX_ATTEMPTS", "0", None),
        ("HTTP_ENDPOINT_URL", "ftp://user:Url-Secret-77@h/", "Url-Secret-77"),
        ("HTTP_HEADERS", '{"Authorization": "Hdr-Secret-77", "X": 1}', "Hdr-Secret-77"),
        ("HTTP_HEADERS", '{"Authorization": "Hdr-Secret-77", "bad name": "x"}', "Hdr-Secret-77"),
        ("HTTP_HEADERS", '{"Authorization": "Hdr-Secret-77", "Host": "x"}', "Hdr-Secret-77"),
        ("HTTP_HEADERS", '{"Authorization": "Hdr-Secret-77\\n"}', "Hdr-Secret-77"),
        ("HTTP_SIGNING_SECRET", "whsec_Sign-Secret-77!", "Sign-Secret-77"),
        ("DATABASE_URL", "postgresql://app:Db-Secret-77@db/app?sslmode=Db-Secret-77", "Db-Secret-77"),
        ("DATABASE_URL", "postgresql://app:Db-Secret-77@db:port/app", "Db-Secret-77"),
        ("DATABASE_URL", "postgresql://app:Db/Secret-77@db/app", "Secret-77"),
        ("DATABASE_URL", "postgresql://app:Db-Secret-77@db/app?application_name=x&foo=1", "Db-Secret-77"),
        ("DATABASE_URL", "host=db password=Db-Secret-77 bogus=1", "Db-Secret-77"),
        ("DATABASE_URL", "host=db password=Db-Secret 77 port=1", "77"),
        ("DATABASE_URL", "host=db password=Db-Secret-77 Xyz-77=1", "Xyz-77"),
        ("DATABASE_URL", "host=db password=Db-Secret-77 xyzsecret=1", "xyzsecret"),
        ("DATABASE_URL", "host=db password='Db-Secret-77", "Db-Secret-77"),
        ("DATABASE_URL", "host=db,db2 port=1,2,3 password=Db-Secret-77", "Db-Secret-77"),
    ]

    @pytest.mark.parametrize("secret_variable", list(SECRETS))
    @pytest.mark.parametrize("variable,bad,carried", BAD_NEIGHBOURS)
    def test_no_secret_in_any_error(self, secret_variable, variable, bad, carried):
        value, secret = self.SECRETS[secret_variable]
        env = {secret_variable: value, variable: bad}
        env.setdefault("DATABASE_URL", DB_URL)
        message = config_error(env, with_db=False)
        if secret_variable != variable:
            assert secret not in message
        if carried:
            assert carried not in message

    def test_no_secret_in_repr_or_description(self):
        config = load({**HOOK0, "EMAIL_SMTP_PASSWORD": "Secret-Smtp-Pw-77",
                       "HTTP_SIGNING_SECRET": "Secret-Signing-77",
                       "HTTP_HEADERS": '{"Authorization": "Bearer Secret-Header-77"}'})
        for text in (repr(config), w.describe_config(config)):
            for secret in (DB_PASSWORD, "Hook0-T0ken-Secret", "Secret-Smtp-Pw-77", "Secret-Signing-77",
                           "Secret-Header-77"):
                assert secret not in text
        assert set(w.config_secrets(config)) == {DB_PASSWORD, "Hook0-T0ken-Secret", "Secret-Smtp-Pw-77",
                                                "Secret-Signing-77", "Bearer Secret-Header-77"}

    def test_describe_config(self):
        config = load({"HTTP_ENDPOINT_URL": "https://user:Url-Pw-1@hooks.example.org:8443/in?token=Tok-1",
                       "SLOT_NAME": "orders_slot", "PUB_NAME": "a,b", "EMAIL_SMTP_HOST": "smtp",
                       "EMAIL_FROM": "w@example.org", "EMAIL_TO": "ops@example.org"})
        line = w.describe_config(config)
        assert "\n" not in line
        assert "sink=http https://hooks.example.org:8443/... " in line  # the path may hold a token
        assert "/in" not in line
        assert "slot=orders_slot publications=a,b" in line
        assert "database=postgresql://app:***@db.example.org:5432/app" in line
        assert "alerts=ops@example.org" in line
        assert "Url-Pw-1" not in line
        assert "Tok-1" not in line
        hook0 = w.describe_config(load(HOOK0))
        assert "sink=hook0 https://hook0.example.org" in hook0
        assert APP_ID in hook0
        assert "database=(demo)" in w.describe_config(w.load_config(["--demo"], {})[0])

    @pytest.mark.parametrize("env,enabled,warning", [
        ({}, False, None),
        ({"EMAIL_SMTP_HOST": "smtp", "EMAIL_FROM": "w@x.org", "EMAIL_TO": "o@x.org"}, True, None),
        ({"EMAIL_SMTP_HOST": "smtp"}, False, "missing: EMAIL_FROM, EMAIL_TO"),
        ({"EMAIL_TO": "o@x.org", "EMAIL_FROM": "w@x.org"}, False, "missing: EMAIL_SMTP_HOST"),
        ({"EMAIL_SMTP_HOST": "smtp", "EMAIL_FROM": "w@x.org", "EMAIL_TO": "o@x.org",
          "EMAIL_SMTP_USERNAME": "u"}, True, "set together"),
        ({"EMAIL_SMTP_HOST": "smtp", "EMAIL_FROM": "w@x.org", "EMAIL_TO": "o@x.org",
          "EMAIL_SMTP_USERNAME": "u", "EMAIL_SMTP_PASSWORD": "p", "EMAIL_SMTP_TLS": "none"},
         True, "unencrypted"),
        ({"HOOK0_API_URL": "https://h0.example"}, False, "HOOK0_* settings are ignored"),
        ({**HOOK0, "HTTP_ENDPOINT_URL": "https://x.example"}, False, "HTTP_ENDPOINT_URL is ignored"),
        ({"HTTP_ENDPOINT_URL": "https://x.example", "HTTP_SIGNING_SECRET": "plain-secret"}, False,
         "does not start with whsec_"),
        ({"HTTP_ENDPOINT_URL": "https://x.example", "HTTP_SIGNING_SECRET": "whsec_" + "QUJD" * 8}, False, None),
        ({"DELIVERY_CONCURRENCY": "4"}, False, "DELIVERY_CONCURRENCY is ignored"),
        ({"HTTP_ENDPOINT_URL": "https://x.example", "DELIVERY_CONCURRENCY": "4"}, False, None),
    ])
    def test_email_enabled_and_warnings(self, env, enabled, warning):
        config = load(env)
        assert w.email_enabled(config) is enabled
        warnings = w.config_warnings(config)
        if warning is None:
            assert warnings == []
        else:
            assert any(warning in text for text in warnings), warnings
        assert all("\n" not in text and "p" != text for text in warnings)

    def test_http_ca_file_must_exist(self, tmp_path):
        ca = tmp_path / "ca.pem"
        ca.write_text("-----BEGIN CERTIFICATE-----\n")
        assert load({"HTTP_CA_FILE": str(ca)}).http_ca_file == str(ca)


PG_ENV = {"PGHOST": "envhost", "PGPORT": "6000", "PGUSER": "envuser", "PGPASSWORD": "envpw",
          "PGDATABASE": "envdb", "PGSSLMODE": "verify-full", "PGSSLROOTCERT": "/env/root.crt",
          "PGSSLCERT": "/env/client.crt", "PGSSLKEY": "/env/client.key", "PGCONNECT_TIMEOUT": "7",
          "PGAPPNAME": "envapp"}


def conninfo(text, **env):
    env.setdefault("PGUSER", "osuser")
    return w.parse_database_url(text, env)


class TestConnInfo:
    PARSED = [
        ("postgresql://user:secret@db.example.com:5433/mydb",
         dict(host="db.example.com", port=5433, user="user", password="secret", dbname="mydb")),
        ("postgres://u@h/d", dict(host="h", port=5432, user="u", password=None, dbname="d")),
        ("postgresql://us%40er:p%40ss%3Aw%2Fd%20x@h/my%20db",
         dict(user="us@er", password="p@ss:w/d x", dbname="my db")),
        ("postgresql://u:p@ss@h/d", dict(user="u", password="p@ss", host="h")),
        ("postgresql://u:@h/d", dict(password=None)),
        ("postgresql://u@[::1]:5433/d", dict(host="::1", port=5433)),
        ("postgresql://[2001:db8::1]/d", dict(host="2001:db8::1", port=5432, user="osuser")),
        ("postgresql://[fe80::1%25eth0]:5433/d", dict(host="fe80::1%eth0", port=5433)),
        ("postgresql:///mydb?host=/var/run/postgresql", dict(host="/var/run/postgresql", dbname="mydb")),
        ("postgresql://%2Fvar%2Frun%2Fpostgresql/mydb", dict(host="/var/run/postgresql", dbname="mydb")),
        ("postgresql://%2Ftmp:5433", dict(host="/tmp", port=5433, dbname="osuser")),
        ("postgresql://h/d?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem"
         "&connect_timeout=5&application_name=my%20app",
         dict(sslmode="verify-full", sslrootcert="/ca.pem", sslcert="/c.pem", sslkey="/k.pem",
              connect_timeout_s=5.0, application_name="my app")),
        ("postgresql://h/d?ssl=true", dict(sslmode="require")),
        ("postgresql://h/d?sslmode=REQUIRE", dict(sslmode="require")),
        ("postgresql://u@h:1/d?port=2&user=v&dbname=e", dict(port=2, user="v", dbname="e")),
        ("postgresql://h/d?password=q%26p", dict(password="q&p")),
        ("postgresql://h/d?keepalives=1&target_session_attrs=read-write&gssencmode=disable", dict(host="h")),
        ("postgresql://", dict(host="localhost", port=5432, user="osuser", dbname="osuser")),
        ("host=h port=5433 user=u password=secret dbname=d",
         dict(host="h", port=5433, user="u", password="secret", dbname="d")),
        ("  host = h   port= 5433\tdbname =d  ", dict(host="h", port=5433, dbname="d")),
        (r"password='it\'s a \\ secret' user=u", dict(password="it's a \\ secret", user="u")),
        (r"password=a\ b", dict(password="a b")),
        ("password='' host=h", dict(password=None, host="h")),
        ("application_name='my app' dbname='x y'", dict(application_name="my app", dbname="x y")),
        ("host=/tmp dbname=x", dict(host="/tmp", dbname="x")),
        ("host=h sslmode=disable keepalives_idle=30 client_encoding=UTF8 channel_binding=prefer",
         dict(sslmode="disable")),
        ("fallback_application_name=tool", dict(application_name="tool")),
        ("application_name=mine fallback_application_name=tool", dict(application_name="mine")),
        ("", dict(host="localhost", port=5432, user="osuser", dbname="osuser", sslmode="prefer",
                  connect_timeout_s=10.0, application_name="wal2http", password=None)),
        ("host=h connect_timeout=0", dict(connect_timeout_s=10.0)),
        ("host=h connect_timeout=-5", dict(connect_timeout_s=10.0)),
        ("host=h connect_timeout=1", dict(connect_timeout_s=2.0)),
        ("host=h connect_timeout=30", dict(connect_timeout_s=30.0)),
    ]

    @pytest.mark.parametrize("text,expected", PARSED)
    def test_parse(self, text, expected):
        info = conninfo(text)
        assert {name: getattr(info, name) for name in expected} == expected

    def test_unix_socket_flag(self):
        assert w.is_unix_socket(conninfo("host=/var/run/postgresql").host)
        assert not w.is_unix_socket(conninfo("host=db").host)

    def test_environment_fills_what_the_string_leaves_out(self):
        info = w.parse_database_url("postgresql://", PG_ENV)
        assert info == w.ConnInfo(host="envhost", port=6000, user="envuser", password="envpw",
                                  dbname="envdb", sslmode="verify-full", sslrootcert="/env/root.crt",
                                  sslcert="/env/client.crt", sslkey="/env/client.key",
                                  connect_timeout_s=7.0, application_name="envapp")
        assert w.parse_database_url("dbname=only", PG_ENV).host == "envhost"

    @pytest.mark.parametrize("text", [
        "postgresql://u:pw@h:5433/d?sslmode=disable&sslrootcert=/r&sslcert=/c&sslkey=/k"
        "&connect_timeout=3&application_name=app",
        "host=h port=5433 user=u password=pw dbname=d sslmode=disable sslrootcert=/r sslcert=/c "
        "sslkey=/k connect_timeout=3 application_name=app",
    ])
    def test_string_wins_over_environment(self, text):
        info = w.parse_database_url(text, PG_ENV)
        assert info == w.ConnInfo(host="h", port=5433, user="u", password="pw", dbname="d",
                                  sslmode="disable", sslrootcert="/r", sslcert="/c", sslkey="/k",
                                  connect_timeout_s=3.0, application_name="app")

    def test_defaults_without_environment(self, monkeypatch):
        monkeypatch.setattr(w.getpass, "getuser", lambda: "alice")
        info = w.parse_database_url("postgresql://", {})
        assert info == w.ConnInfo(host="localhost", port=5432, user="alice", password=None,
                                  dbname="alice", sslmode="prefer", sslrootcert=None, sslcert=None,
                                  sslkey=None, connect_timeout_s=10.0, application_name="wal2http")
        assert w.parse_database_url("postgresql://h/x", {"PGUSER": "bob"}).dbname == "x"
        assert w.parse_database_url("user=carol", {}).dbname == "carol"

    def test_unknown_os_user_falls_back_to_postgres(self, monkeypatch):
        def no_user():
            raise OSError("no user")
        monkeypatch.setattr(w.getpass, "getuser", no_user)
        assert w.parse_database_url("host=h", {}).user == "postgres"

    def test_empty_environment_value_counts_as_unset(self):
        assert conninfo("dbname=d", PGHOST="", PGPORT="").host == "localhost"

    @pytest.mark.parametrize("text, hosts", [
        ("postgresql://u@h1:5432,h2:5433/d", (("h1", 5432), ("h2", 5433))),
        ("postgresql://u@h1,h2:6000/d", (("h1", 5432), ("h2", 6000))),
        ("postgresql://u@[::1]:5432,[::2]/d", (("::1", 5432), ("::2", 5432))),
        ("host=a,b port=5432,5433", (("a", 5432), ("b", 5433))),
        ("host=a,b,/tmp port=6000", (("a", 6000), ("b", 6000), ("/tmp", 6000))),
        ("host=a,,b", (("a", 5432), ("localhost", 5432), ("b", 5432))),  # an empty entry is the default
    ])
    def test_several_hosts(self, text, hosts):
        info = conninfo(text)
        assert info.hosts == hosts
        assert (info.host, info.port) == hosts[0]
        assert [(each.host, each.port) for each in info.each_host()] == list(hosts)
        assert all(each.hosts == () and each.dbname == info.dbname for each in info.each_host())

    def test_several_hosts_from_the_environment(self):
        info = conninfo("dbname=d", PGHOST="a,b", PGPORT="1,2", PGTARGETSESSIONATTRS="read-write")
        assert info.hosts == (("a", 1), ("b", 2))
        assert info.target_session_attrs == "read-write"

    @pytest.mark.parametrize("attrs", ["any", "read-write", "read-only", "primary", "standby", "prefer-standby"])
    def test_target_session_attrs(self, attrs):
        assert conninfo(f"host=a,b target_session_attrs={attrs.upper()}").target_session_attrs == attrs

    def test_load_balance_hosts_random_shuffles_each_time(self):
        info = conninfo("host=" + ",".join(f"h{n}" for n in range(8)) + " load_balance_hosts=random")
        orders = {tuple(each.host for each in info.each_host()) for _ in range(20)}
        assert len(orders) > 1
        assert all(sorted(order) == sorted(f"h{n}" for n in range(8)) for order in orders)
        assert conninfo("host=a,b").load_balance_hosts == "disable"

    ERRORS = [
        ("postgresql://u:s3cretPW@h/d?sslmode=bogus", "sslmode must be one of"),
        ("host=h password=s3cretPW sslmode=always", "sslmode must be one of"),
        ("postgresql://u:s3cretPW@h:abc/d", "port"),
        ("postgresql://u:s3cretPW@h:0/d", "port"),
        ("postgresql://u:s3cretPW@h:70000/d", "port"),
        ("host=h port=５４３２ password=s3cretPW", "port"),
        ("host=a,b,c port=1,2 password=s3cretPW", "3 hosts but 2 ports"),
        ("host=a port=1,2 password=s3cretPW", "1 hosts but 2 ports"),
        ("postgresql://u:s3cretPW@h1:5432,h2:0/d", "port"),
        ("postgresql://u:s3cretPW@h1,h2/d?target_session_attrs=master", "target_session_attrs must be one of"),
        ("host=a,b load_balance_hosts=yes password=s3cretPW", "load_balance_hosts must be one of"),
        ("host=h foo=bar password=s3cretPW", "unsupported keyword 'foo'"),
        ("postgresql://u:s3cretPW@h/d?foo=bar", "unsupported keyword 'foo'"),
        ("host=h service=prod password=s3cretPW", "unsupported keyword 'service'"),
        ("host=h gssencmode=require password=s3cretPW", "not supported"),
        ("host=h channel_binding=require password=s3cretPW", "not supported"),
        ("password='s3cretPW", "no closing quote"),
        ("password='s3cretPW\\", "lone backslash"),
        ("host password=s3cretPW", "missing its '='"),
        ("password=s3cretPW x", "missing its '='"),
        ("password=s3cret PW=1", "after the password"),
        ("mydb", "must start with postgresql://"),
        ("postgresql://u:%zzs3cretPW@h/d", "percent-encoding"),
        ("postgresql://u:s3cretPW%ff@h/d", "UTF-8"),
        ("postgresql://u:s3cretPW%00@h/d", "NUL"),
        ("postgresql://u:s3cretPW@[::1/d", "']'"),
        ("postgresql://u:s3cretPW@[::1]x/d", "']'"),
        ("postgresql://u:s3cretPW@h/d?sslmode", "query parameter"),
        ("http://u:s3cretPW@h/d", "must start with postgresql://"),
        ("host=h connect_timeout=abc password=s3cretPW", "connect_timeout"),
        ("host=h connect_timeout=2.5 password=s3cretPW", "connect_timeout"),
    ]

    @pytest.mark.parametrize("text,fragment", ERRORS)
    def test_errors(self, text, fragment):
        with pytest.raises(w.ConfigError) as info:
            conninfo(text)
        message = str(info.value)
        assert fragment in message
        assert "DATABASE_URL" in message
        assert "\n" not in message
        assert "s3cret" not in message
        assert "PW" not in message

    @pytest.mark.parametrize("variable,value,fragment", [
        ("PGPORT", "abc", "port"), ("PGPORT", "1,2,3", "1 hosts but 3 ports"),
        ("PGTARGETSESSIONATTRS", "master", "target_session_attrs"),
        ("PGSSLMODE", "strict", "sslmode"), ("PGCONNECT_TIMEOUT", "soon", "connect_timeout"),
    ])
    def test_environment_errors_name_both(self, variable, value, fragment):
        with pytest.raises(w.ConfigError) as info:
            w.parse_database_url("dbname=d", {variable: value, "PGPASSWORD": "s3cretPW"})
        message = str(info.value)
        assert fragment in message
        assert "DATABASE_URL" in message
        assert variable in message
        assert "s3cretPW" not in message

    @pytest.mark.parametrize("text,described", [
        ("postgresql://u:secret@h:5432/d?sslmode=require", "postgresql://u:***@h:5432/d?sslmode=require"),
        ("postgres://u:s%40cret@[::1]:5433/d", "postgresql://u:***@[::1]:5433/d?sslmode=prefer"),
        ("postgresql://u@h/d", "postgresql://u@h:5432/d?sslmode=prefer"),
        ("postgresql://h/d", "postgresql://osuser@h:5432/d?sslmode=prefer"),
        ("postgresql://u:p@ss@h/d", "postgresql://u:***@h:5432/d?sslmode=prefer"),
        ("postgresql://u@h/d?password=secret&sslmode=require", "postgresql://u:***@h:5432/d?sslmode=require"),
        ("host=h password=secret user=u", "postgresql://u:***@h:5432/u?sslmode=prefer"),
        (r"host=h password = 'se cret\'x' user=u", "postgresql://u:***@h:5432/u?sslmode=prefer"),
        ("host=h user=u", "postgresql://u@h:5432/u?sslmode=prefer"),
        ("postgresql://u:pw@h1,h2:6000/d?target_session_attrs=read-write",
         "postgresql://u:***@h1:5432,h2:6000/d?sslmode=prefer&target_session_attrs=read-write"),
        ("host=a,b load_balance_hosts=random user=u", "postgresql://u@a:5432,b:5432/u?sslmode=prefer&load_balance_hosts=random"),
        ("password=secret", "postgresql://osuser:***@localhost:5432/osuser?sslmode=prefer"),
        ("host=/var/run/postgresql port=5433 user='a b' password=secret dbname=x/y",
         "postgresql://a%20b:***@:5433/x%2Fy?host=/var/run/postgresql&sslmode=prefer"),
    ])
    def test_describe_shows_no_password(self, text, described):
        info = conninfo(text)
        assert info.describe() == described
        assert "secret" not in info.describe()
        assert "p@ss" not in info.describe()
        again = w.parse_database_url(info.describe(), {})  # the description is a connection string
        assert (again.host, again.port, again.user, again.dbname, again.sslmode) == \
            (info.host, info.port, info.user, info.dbname, info.sslmode)

    def test_describe_marks_a_password_from_pgpassword(self):
        assert conninfo("host=h user=u", PGPASSWORD="envpw").describe() == \
            "postgresql://u:***@h:5432/u?sslmode=prefer"

    @pytest.mark.parametrize("text,password", [("postgresql://u:p/ss@h/d", "p/ss"),
                                               ("host=h password='unterminated secret", "unterminated")])
    def test_a_string_that_cannot_be_described_is_an_error_without_its_password(self, text, password):
        with pytest.raises(w.ConfigError) as info:
            conninfo(text)
        assert "DATABASE_URL" in str(info.value)
        assert password not in str(info.value)


# =====================================================================================================
# Service, --check and the command line
# =====================================================================================================


class TestCheckOne:
    async def test_an_unexpected_error_is_a_failed_check_not_a_crash(self, autojump_clock):
        async def broken():
            raise UnicodeError("label empty or too long")

        async def fine():
            pass

        assert await w._check_one("sink", 1.0, broken()) == (
            "sink", "unexpected UnicodeError (LOG_LEVEL=DEBUG shows where)")
        assert await w._check_one("email", 1.0, fine()) == ("email", None)
        assert await w._check_one("x", 1.0, trio.sleep(5)) == ("x", "no answer within 1 s")


async def streamed_transactions(cluster, dbname: str) -> int:
    """How many transactions the server has streamed in progress on the database's slot."""
    rows = await sql(cluster, dbname, "SELECT stream_txns FROM pg_stat_replication_slots "
                                      f"WHERE slot_name = {w.quote_literal(dbname)}")
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


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



SCRIPT = os.path.join(HERE, "wal2http.py")


def connect_line(lines: list[str], cluster) -> str:
    """--check's line for the connection: it names the host used and the server's version."""
    (line,) = [line for line in lines if line.startswith("ok connect")]
    assert re.fullmatch(rf"ok connect to 127\.0\.0\.1:{cluster.port} \(PostgreSQL \d+(\.\d+)?\)", line), line
    return line


def cli_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "HOOK0_", "HTTP_", "EMAIL_"))}
    base.pop("DATABASE_URL", None)
    base.pop("EVENT_SINK", None)
    base["PYTHONUNBUFFERED"] = "1"
    return {**base, **env}


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], env=cli_env(env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class CliProcess(Observed):
    """wal2http.py as a child process; collects stdout events and stderr lines."""

    def __init__(self, env: dict[str, str], args=(), pause_after: int | None = None):
        super().__init__()
        self.env, self.args = env, list(args)
        self.pause_after = pause_after  # stop reading stdout after this many events (the pipe fills up)
        self.events: list[dict] = []
        self.lines: list[bytes] = []  # stdout as written, one per event
        self.stderr = b""
        self.process = None

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
            self.lines.extend(lines)
            self.events.extend(json.loads(line) for line in lines)
            self._notify()
            if self.pause_after is not None and len(self.events) >= self.pause_after:
                await trio.sleep_forever()
        self._changed.set()  # left set at the end: waiters keep re-checking (e.g. for the exit code)

    async def _read_stderr(self):
        async for data in self.process.stderr:
            self.stderr += data
            self._notify()

    async def wait_for(self, predicate, timeout: float = 60):
        await super().wait_for(predicate, timeout)

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
            "wal2http: EVENT_SINK: Event sink must be one of: 'http', 'hook0', or 'stdout' (got 'kafka')"]
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
        assert all(line.startswith("ok ") for line in lines)
        assert len(lines) >= 5
        assert any("wal_level" in line for line in lines)

    def test_check_reports_failures(self, cluster, db):
        result = run_cli(["--check"], make_env(cluster, db, pub_name="nope", create_slot="false"))
        assert result.returncode == 4
        assert "FAIL publication nope: " in result.stdout
        assert f"FAIL slot {db}: " in result.stdout
        assert "ok wal_level" in result.stdout

    def test_check_names_the_missing_replication_privilege(self, cluster, db):
        result = run_cli(["--check"], {"DATABASE_URL": cluster.url(db, "norepl_user")})
        assert result.returncode == 4
        assert connect_line(result.stdout.splitlines(), cluster)
        assert "FAIL replication privilege: user 'norepl_user' lacks the REPLICATION privilege" in result.stdout
        assert "FAIL replication connection: " in result.stdout

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
        assert events[0]["new"]["amount"] == "19.90"
        assert events[0]["new"]["tags"] == ["new", "web"]
        assert "throwaway PostgreSQL is stopped and removed" in result.stderr

    async def test_jsonb_is_written_exactly_as_postgres_prints_it(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE jx (id int PRIMARY KEY, doc jsonb, j json)")
        async with CliProcess(make_env(cluster, db)).running() as proc:
            await proc.wait_started()
            await sql(cluster, db, """INSERT INTO jx VALUES (1, '{"big": 123456789012345678901234567890.000000000000000001,
                                      "x": 0.1, "s": "é ✓ \\"q\\""}', '{"a" : [1,
                                      2.50]}')""", "UPDATE jx SET j = '[]'")
            (doc,), = await sql(cluster, db, "SELECT doc::text FROM jx")
            await proc.wait_for(lambda p: len(p.lines) == 2)
        insert, update = (line.decode() for line in proc.lines)
        assert "123456789012345678901234567890.000000000000000001" in doc
        assert f'"doc":{doc},"j":{{"a":[1,2.5]}}}}' in insert  # jsonb as printed; json parsed, on one line
        assert f'"doc":{doc},"j":[]}}' in update  # the general path (updates) writes it the same way
        assert proc.events[0]["new"]["doc"]["x"] == 0.1

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

    async def test_sigterm_with_a_stalled_stdout_reader_exits_0(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE st (id int PRIMARY KEY, v text)")
        async with CliProcess(make_env(cluster, db), pause_after=1000).running() as proc:
            await proc.wait_started()
            (lsn,), = await sql(cluster, db, "INSERT INTO st SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g",
                                "SELECT pg_current_wal_insert_lsn()")
            await proc.wait_for(lambda p: len(p.events) >= 1000)  # we stop reading: its pipe fills up
            proc.process.send_signal(signal.SIGTERM)
            assert await proc.wait_exit(timeout=30) == 0
        assert await slot_confirmed(cluster, db) < w.parse_lsn(lsn)  # the stalled transaction is not confirmed
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


# =====================================================================================================
# End to end (against each PostgreSQL version)
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
        assert events[1]["seq"] == 1
        assert events[1]["xid"] == first["xid"]
        assert first["id"] == f"{first['commit_lsn']}:0"
        assert first["commit_time"].endswith("Z")
        assert events[5]["cascade"] is False
        assert events[5]["restart_identity"] is False

    async def test_a_new_process_never_reports_below_the_slots_confirmed_position(self, cluster, db):
        """At connect the walsender re-reads WAL from restart_lsn, and its keepalives may carry
        positions below confirmed_flush_lsn: a fresh process must never report one of them."""
        await sql(cluster, db, "CREATE TABLE c (id int PRIMARY KEY)")
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, "INSERT INTO c VALUES (1)")
            await sink.wait_for(1)
        (confirmed,), = await sql(cluster, db, "SELECT confirmed_flush_lsn FROM pg_catalog.pg_replication_slots "
                                               f"WHERE slot_name = {w.quote_literal(db)}")
        assert lsn(confirmed) > 0
        async with running(make_config(cluster, db)) as (sink, ack):
            assert ack.flushed_lsn >= lsn(confirmed)
            ack.keepalive(lsn(confirmed) - 1, True)  # as during the walsender's catch-up
            write, flush = struct.unpack_from("!QQ", ack.status_update(), 6)
            assert flush >= lsn(confirmed)
            assert write >= lsn(confirmed)

    async def test_replica_identity_full_and_nothing(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE f (id int PRIMARY KEY, v text)", "ALTER TABLE f REPLICA IDENTITY FULL",
                  "CREATE TABLE n (id int, v text)", "ALTER TABLE n REPLICA IDENTITY NOTHING")
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, "INSERT INTO f VALUES (1, 'a')", "UPDATE f SET v = 'b'", "DELETE FROM f",
                      "INSERT INTO n VALUES (1, 'x')")
            events = await sink.wait_for(4)
        insert, update, delete, other = events
        assert update["key"] == {"id": 1, "v": "b"}  # FULL: every column is the identity
        assert update["old"] == {"id": 1, "v": "a"}
        assert update["new"] == {"id": 1, "v": "b"}
        assert delete["old"] == {"id": 1, "v": "b"}
        assert delete["new"] is None
        assert other["key"] is None
        assert other["new"] == {"id": 1, "v": "x"}

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
        assert plain["new"] == {"id": 1, "n": 2}
        assert plain["unchanged_toast"] == ["big"]
        assert full["new"] == {"id": 1, "big": big, "n": 2}
        assert full["unchanged_toast"] == []

    async def test_logical_messages(self, cluster, db):
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, "SELECT pg_logical_emit_message(true, 'p', 'héllo')",
                      "SELECT pg_logical_emit_message(false, 'q', '\\xff00'::bytea)")
            events = await sink.wait_for(2)
        tx, nontx = events
        assert (tx["op"], tx["prefix"], tx["content"], tx["transactional"]) == ("message", "p", "héllo", True)
        assert tx["schema"] is None
        assert tx["table"] is None
        assert tx["seq"] == 0
        assert nontx["content_base64"] == base64.b64encode(b"\xff\x00").decode()
        assert nontx["transactional"] is False
        assert nontx["xid"] is None
        assert nontx["commit_lsn"] is None
        assert nontx["commit_time"] is None
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
            seen = []  # (flushed, confirmed) while the transaction is held
            for _ in range(3):
                before = trio.current_time()
                await wait_until(lambda: trio.current_time() - before > 0.25)
                seen.append((ack.flushed_lsn, await slot_confirmed(cluster, db)))
            assert len(sink.events) == 1
            sink.gate.set()
            await sink.wait_for(2)
            held = not_past(sink.events[1]["commit_lsn"])
            assert all(flushed <= held for flushed, _ in seen), seen
            assert all(confirmed <= held for _, confirmed in seen), seen
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
        assert ids[-1] == 2
        assert set(ids) == {1, 2}


    async def test_every_contract_type_round_trips(self, cluster, db):
        await sql(cluster, db, "CREATE TYPE mood AS ENUM ('happy', 'sad')", """CREATE TABLE ty (
            id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, o oid, f4 float4, f8 float8,
            fnan float8, finf float8, fninf float8, n numeric, nnan numeric, j json, jb jsonb, t text,
            vc varchar(10), c char(3), nm name, u uuid, e mood, d date, dinf date, ts timestamp,
            tsz timestamptz, tsz0 timestamptz, tsinf timestamptz, tm time, tmz timetz, iv interval, by bytea,
            ai int[], at text[], a2 int[][], ae mood[], inet_ inet, money_ money, range_ int4range,
            pt point, nul text)""")
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, """INSERT INTO ty VALUES (1, true, -2, 4, 9007199254740993, 42, 1.5,
                0.1, 'NaN', 'Infinity', '-Infinity', 19.90, 'NaN', '{"a": [1, 2.5]}', '{"b": null}',
                'tëxt', 'vc', 'ab', 'nm', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'sad', '2026-11-27',
                'infinity', '2026-11-27 16:25:11.123456', '2026-11-27 17:25:11.5+01',
                '2026-11-27 16:25:11+00', '-infinity', '16:25:11', '16:25:11+02', '1 day 02:03:04',
                '\\x00ff', '{1,NULL,3}', '{"a,b","c\\"d",NULL,"NULL"}', '{{1,2},{3,4}}', '{happy,sad}',
                '10.0.0.1/8', 12.5, '[1,5)', '(1,2)', NULL)""")
            (event,) = await sink.wait_for(1)
        assert event["new"] == {
            "id": 1, "b": True, "i2": -2, "i4": 4, "i8": 9007199254740993, "o": 42, "f4": 1.5, "f8": 0.1,
            "fnan": "NaN", "finf": "Infinity", "fninf": "-Infinity", "n": "19.90", "nnan": "NaN",
            "j": {"a": [1, 2.5]}, "jb": {"b": None}, "t": "tëxt", "vc": "vc", "c": "ab ", "nm": "nm",
            "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "e": "sad", "d": "2026-11-27", "dinf": "infinity",
            "ts": "2026-11-27T16:25:11.123456", "tsz": "2026-11-27T16:25:11.5Z", "tsz0": "2026-11-27T16:25:11Z",
            "tsinf": "-infinity", "tm": "16:25:11", "tmz": "16:25:11+02", "iv": "1 day 02:03:04",
            "by": base64.b64encode(b"\x00\xff").decode(), "ai": [1, None, 3], "at": ["a,b", 'c"d', None, "NULL"],
            "a2": [[1, 2], [3, 4]], "ae": ["happy", "sad"], "inet_": "10.0.0.1/8", "money_": "$12.50",
            "range_": "[1,5)", "pt": "(1,2)", "nul": None}

    async def test_domains_over_known_types_are_typed(self, cluster, db):
        await sql(cluster, db, "CREATE DOMAIN posint AS int CHECK (VALUE > 0)", "CREATE DOMAIN small AS posint",
                  "CREATE DOMAIN tags AS text[]", "CREATE TYPE pair AS (a int, b int)", "CREATE DOMAIN p2 AS pair",
                  "CREATE TABLE dom (id posint PRIMARY KEY, s small, a posint[], t tags, p p2)")
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, "INSERT INTO dom VALUES (5, 6, '{1,2}', '{x,y}', '(1,2)')")
            (event,) = await sink.wait_for(1)
        assert event["key"] == {"id": 5}
        assert event["new"] == {"id": 5, "s": 6, "a": [1, 2], "t": ["x", "y"], "p": "(1,2)"}

    async def test_truncate_cascade_restart_identity(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE p (id serial PRIMARY KEY)",
                  "CREATE TABLE ch (id int PRIMARY KEY, p int REFERENCES p)")
        async with running(make_config(cluster, db)) as (sink, ack):
            await sql(cluster, db, "TRUNCATE p RESTART IDENTITY CASCADE")
            events = await sink.wait_for(2)
        assert sorted(e["table"] for e in events) == ["ch", "p"]
        assert all(e["cascade"] and e["restart_identity"] for e in events)
        assert [e["seq"] for e in events] == [0, 1]
        assert events[0]["xid"] == events[1]["xid"]

    async def test_streamed_large_transaction_once_in_order(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE big (id int PRIMARY KEY, v text)")
        sink = MemorySink()
        async with running(make_config(cluster, db, streaming="true"), sink) as (sink, ack):
            await sql(cluster, db, "BEGIN; INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 30000) g; "
                                   "INSERT INTO big SELECT g, 'x' FROM generate_series(30001, 100000) g; COMMIT")
            (lsn,), = await sql(cluster, db, "SELECT pg_current_wal_insert_lsn()")
            events = await sink.wait_for(100_000, timeout=90)
            await wait_until(lambda: ack.flushed_lsn >= w.parse_lsn(lsn))
        assert len(events) == 100_000
        assert [e["new"]["id"] for e in events] == list(range(1, 100_001))
        assert [e["seq"] for e in events[:3]] == [0, 1, 2]
        assert events[-1]["seq"] == 99_999
        assert len({e["xid"] for e in events}) == 1

    async def test_streamed_rollbacks_deliver_nothing(self, cluster, db):
        # The aborted transaction stays open until the server has streamed it: PostgreSQL 17+ does
        # not stream a transaction it already knows to be aborted.
        await sql(cluster, db, "CREATE TABLE rb (id int PRIMARY KEY)")
        info = w.parse_database_url(cluster.url(db), {})
        async with running(make_config(cluster, db, streaming="true")) as (sink, ack):
            async with w.open_pg_connection(info, replication=False) as conn:
                await conn.simple_query("BEGIN; INSERT INTO rb SELECT generate_series(1, 20000)")
                await wait_until(lambda: _ge(streamed_transactions(cluster, db), 1), timeout=60)
                await conn.simple_query("ROLLBACK")
            await sql(cluster, db,
                      "BEGIN; INSERT INTO rb SELECT generate_series(1, 5000); SAVEPOINT s; "
                      "INSERT INTO rb SELECT generate_series(5001, 15000); ROLLBACK TO SAVEPOINT s; "
                      "INSERT INTO rb SELECT generate_series(15001, 16000); COMMIT",
                      "INSERT INTO rb VALUES (0)")
            events = await sink.wait_for(6001, timeout=60)
        ids = [e["new"]["id"] for e in events]
        assert ids == list(range(1, 5001)) + list(range(15001, 16001)) + [0]


PROTOCOL_1_LINE = "logical messages and streaming need PostgreSQL 14"


async def _old_server(stream: trio.abc.Stream, server_version: str) -> None:
    """A server that answers any startup with `server_version`, then closes at the next message."""
    buffer = b""
    while len(buffer) < 4 or len(buffer) < struct.unpack_from("!i", buffer)[0]:
        buffer += await stream.receive_some(4096)
    await stream.send_all(backend_message(b"R", struct.pack("!i", 0))
                          + backend_message(b"S", cstr("server_version") + cstr(server_version))
                          + backend_message(b"K", struct.pack("!ii", 1, 2)) + backend_message(b"Z", b"I"))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.receive_some(4096)


class TestServerVersions:
    def test_server_version_number(self):
        conn = w.PgConnection(None, None)
        for text, number in (("9.6.24", 90000), ("10.23", 100023), ("13.23", 130023), ("18.4 (Debian)", 180004)):
            conn.parameters["server_version"] = text
            assert conn.server_version_num == number

    @pytest.mark.parametrize("server_version", ["9.6.24", "9.4.26"])
    def test_a_server_before_10_is_refused(self, server_version):
        conn = w.PgConnection(None, None)
        conn.parameters["server_version"] = server_version
        with pytest.raises(w.PreconditionError) as info:
            w.check_server_version(conn)
        assert info.value.exit_code == 4
        assert f"PostgreSQL {server_version} is too old" in str(info.value)
        assert "needs PostgreSQL 10 or later" in str(info.value)
        conn.parameters["server_version"] = "10.0"
        w.check_server_version(conn)

    async def test_the_command_line_refuses_a_server_before_10(self):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, partial(_old_server, server_version="9.6.24"), 0)
            port = listeners[0].socket.getsockname()[1]
            env = {"DATABASE_URL": f"postgresql://u@127.0.0.1:{port}/d?sslmode=disable"}
            for args in ([], ["--check"]):
                result = await trio.to_thread.run_sync(run_cli, args, env)
                assert result.returncode == 4, result.stderr
                assert "PostgreSQL 9.6.24 is too old: wal2http needs PostgreSQL 10 or later" in result.stdout + result.stderr
                assert "Traceback" not in result.stderr
            nursery.cancel_scope.cancel()

    async def test_protocol_1_rows_only_and_one_start_up_line(self, old_cluster, old_db):
        await sql(old_cluster, old_db, "CREATE TABLE o (id int PRIMARY KEY)")
        async with CliProcess(make_env(old_cluster, old_db, streaming="true")).running() as proc:
            await proc.wait_started()
            await sql(old_cluster, old_db, "INSERT INTO o VALUES (1)",
                      "SELECT pg_logical_emit_message(true, 'p', 'not on 13')", "INSERT INTO o VALUES (2)")
            await proc.wait_for(lambda p: len(p.events) == 2)
        assert [(e["op"], e["new"]["id"]) for e in proc.events] == [("insert", 1), ("insert", 2)]
        lines = [line for line in proc.stderr.decode().splitlines() if PROTOCOL_1_LINE in line]
        assert len(lines) == 1, proc.stderr.decode()
        assert f"PostgreSQL {old_cluster.major}." in lines[0]
        assert "STREAMING=true is ignored" in lines[0]
        assert "pgoutput protocol 1" in proc.stderr.decode()

    def test_demo_on_protocol_1_shows_the_rows(self, old_cluster):
        result = run_cli(["--demo"], {"PATH": f"{old_cluster.bin}{os.pathsep}{os.environ.get('PATH', '')}"},
                         timeout=120)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert [json.loads(line)["op"] for line in result.stdout.splitlines()] == [
            "insert", "insert", "update", "delete", "truncate"]
        assert sum(PROTOCOL_1_LINE in line for line in result.stderr.splitlines()) == 1
        assert f"PostgreSQL {old_cluster.major}." in result.stderr

    async def test_protocol_version_by_server(self, cluster, db):
        """14 speaks protocol 2, 15 3, 16+ 4 (wal2http asks for `streaming 'on'`, never 'parallel')."""
        async with CliProcess(make_env(cluster, db, streaming="true")).running() as proc:
            await proc.wait_started()
        expected = {14: 2, 15: 3}.get(cluster.major, 4)
        assert f"(pgoutput protocol {expected}," in proc.stderr.decode()
        assert PROTOCOL_1_LINE not in proc.stderr.decode()


OUTBOX_DDL = ("CREATE TABLE outbox (event_id uuid PRIMARY KEY, event_type text, created_at timestamptz, "
              "payload jsonb, metadata jsonb, labels jsonb)")


def sql_value(value) -> str:
    """A SQL literal: None -> NULL, dict/list -> JSON text, anything else its text."""
    if value is None:
        return "NULL"
    if isinstance(value, (dict, list)):
        return w.quote_literal(json.dumps(value))
    return w.quote_literal(str(value))


def outbox_insert(*rows) -> str:
    """INSERT of outbox rows given as dicts (missing columns are NULL); returns the WAL insert
    position inside the transaction (one row per inserted row)."""
    columns = ("event_id", "event_type", "created_at", "payload", "metadata", "labels")
    values = ", ".join("(" + ", ".join(sql_value(row.get(column)) for column in columns) + ")" for row in rows)
    return f"INSERT INTO outbox ({', '.join(columns)}) VALUES {values} RETURNING pg_current_wal_insert_lsn()"


def outbox_row(event_type="billing.invoice.paid", **columns) -> dict:
    row = {"event_id": str(uuid.uuid4()), "event_type": event_type, "created_at": "2026-11-27 16:25:11+00",
           "payload": {"n": 1}, "metadata": {"source": "e2e"}, "labels": {"tenant": "acme"}}
    row.update(columns)
    return row


def max_lsn(rows) -> int:
    return max(w.parse_lsn(lsn) for (lsn,) in rows)


async def create_slot(cluster, dbname, slot=None):
    await sql(cluster, dbname, f"SELECT pg_create_logical_replication_slot({w.quote_literal(slot or dbname)}, "
                               "'pgoutput')")


def event_posts(double, start=0):
    """The POST /api/v1/event requests from index `start` on."""
    return [r for r in double.requests[start:] if r.method == "POST" and r.path.rstrip("/") == "/api/v1/event"]


def read_dead_letters(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file.read().splitlines()]


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def mail_text(message) -> str:
    return message.mail.as_string()


class _HoldingStream:
    """The double's side of one connection: send_all waits while the double holds responses."""

    def __init__(self, stream, double):
        self._stream, self._double = stream, double

    async def receive_some(self, max_bytes=None):
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data):
        double = self._double
        if double.hold_after is not None and len(double.events) >= double.hold_after:
            double.holding.set()
            await double.release.wait()
        await self._stream.send_all(data)

    async def aclose(self):
        await self._stream.aclose()


class InstrumentedHook0Double(Hook0Double):
    """Hook0Double that stamps every request with trio.current_time() (`request.at`) and can hold
    back its answers: once `hold_after` events are ingested, no response is sent (the request is
    processed, so Hook0 has the event, but the client never hears so) until `release` is set."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hold_after: int | None = None
        self.holding = trio.Event()
        self.release = trio.Event()

    def _answer(self, request):
        request.at = trio.current_time()
        return super()._answer(request)

    async def _serve_connection(self, stream):
        await super()._serve_connection(_HoldingStream(stream, self))




class TestHook0EndToEnd:
    """Issue 4 against the real PostgreSQL: outbox rows and table changes into a Hook0 API double."""

    # -- 1. exact bodies ------------------------------------------------------------------------------

    async def test_outbox_inserts_arrive_as_exact_hook0_bodies(self, cluster, db):
        await sql(cluster, db, OUTBOX_DDL)
        first, second, third = (str(uuid.uuid4()) for _ in range(3))
        async with Hook0Double.serve() as double:
            async with service(make_config(cluster, db, hook0_settings(double))):
                (before,), = await sql(cluster, db, "SELECT clock_timestamp()")
                await sql(cluster, db, outbox_insert(
                    {"event_id": first, "event_type": "billing.invoice.paid",
                     "created_at": "2026-11-27 17:25:11.5+01",
                     "payload": {"id": 1, "amount": "19.90", "note": "é", "nested": {"b": [1, 2.5, None]}},
                     "metadata": {"source": "api", "attempt": 3, "flag": True, "gone": None,
                                  "obj": {"a": 1}},
                     "labels": {"tenant": "acme", "shard": 7, "beta": False, "x": None}},
                    {"event_id": second, "event_type": "billing.invoice.paid",
                     "created_at": "2026-01-01 00:30:00.123456-05:30", "payload": [1, "two", None],
                     "metadata": None, "labels": {"tenant": "globex"}}))
                await sql(cluster, db, outbox_insert(
                    {"event_id": third, "event_type": "billing.invoice.paid", "created_at": None,
                     "payload": {"k": "v"}, "metadata": None, "labels": {"tenant": "acme"}}))
                (after,), = await sql(cluster, db, "SELECT clock_timestamp()")
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) >= 3)
        assert double.events[:2] == [
            {"application_id": APPLICATION_ID, "event_id": first, "event_type": "billing.invoice.paid",
             # jsonb keeps keys shortest first; compact separators, UTF-8 as is
             "payload": '{"id":1,"note":"é","amount":"19.90","nested":{"b":[1,2.5,null]}}',
             "payload_content_type": "application/json",
             "metadata": {"source": "api", "attempt": "3", "flag": "true", "obj": '{"a":1}'},
             "occurred_at": "2026-11-27T16:25:11.5Z",
             "labels": {"tenant": "acme", "shard": "7", "beta": "false"}},
            {"application_id": APPLICATION_ID, "event_id": second, "event_type": "billing.invoice.paid",
             "payload": '[1,"two",null]', "payload_content_type": "application/json", "metadata": {},
             "occurred_at": "2026-01-01T06:00:00.123456Z", "labels": {"tenant": "globex"}},
        ]
        null_created = double.events[2]
        assert {k: v for k, v in null_created.items() if k != "occurred_at"} == {
            "application_id": APPLICATION_ID, "event_id": third, "event_type": "billing.invoice.paid",
            "payload": '{"k":"v"}', "payload_content_type": "application/json", "metadata": {},
            "labels": {"tenant": "acme"}}
        # NULL created_at: the commit time, which lies between the two clock readings
        occurred = parse_time(null_created["occurred_at"])
        assert null_created["occurred_at"].endswith("Z")
        assert parse_time(before) <= occurred <= parse_time(after)
        posts = event_posts(double)
        assert [r.status for r in posts] == [201, 201, 201]
        for request in posts:
            assert request.headers["authorization"] == f"Bearer {TOKEN}"
            assert request.headers["content-type"].split(";")[0] == "application/json"
            assert request.path == "/api/v1/event"

    async def test_null_created_at_is_exactly_the_commit_time(self, cluster, db):
        # A plain table's change in the same transaction (HOOK0_TABLE_EVENTS) carries the commit time
        # in its payload: the outbox row's occurred_at must be that instant.
        await sql(cluster, db, OUTBOX_DDL, "CREATE TABLE tick (id int PRIMARY KEY)")
        row = outbox_row(created_at=None)
        async with Hook0Double.serve(event_types=("billing.invoice.paid", "public.tick.insert")) as double:
            async with service(make_config(cluster, db, hook0_settings(double), hook0_table_events="true")):
                await sql(cluster, db, f"BEGIN; {outbox_insert(row)}; INSERT INTO tick VALUES (1); COMMIT")
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) >= 2)
        outbox, tick = double.events
        assert outbox["event_id"] == row["event_id"]
        assert tick["event_type"] == "public.tick.insert"
        commit_time = json.loads(tick["payload"])["commit_time"]
        assert parse_time(outbox["occurred_at"]) == parse_time(commit_time)
        assert parse_time(tick["occurred_at"]) == parse_time(commit_time)

    # -- 2. redelivery after kill -9 ------------------------------------------------------------------

    async def test_redelivery_after_kill_9_is_409_and_counted_as_delivered(self, cluster, db):
        await sql(cluster, db, OUTBOX_DDL)
        early = [outbox_row(payload={"n": n}) for n in range(2)]
        rows = [outbox_row(payload={"n": n}) for n in range(2, 8)]
        async with InstrumentedHook0Double.serve() as double:
            env = make_env(cluster, db, hook0_settings(double))
            first = CliProcess(env)
            async with first.running():
                with trio.fail_after(15):
                    await first.wait_started()
                    lsn_early = max_lsn(await sql(cluster, db, outbox_insert(*early)))
                    await double.wait_for(lambda double: len(double.events) >= 2)
                    await wait_until(lambda: _gt(slot_confirmed(cluster, db), lsn_early), timeout=10)
                    # Hook0 takes the first three rows of the next transaction, but the answer to the
                    # third never reaches wal2http: the transaction is not confirmed when it dies.
                    double.hold_after = 2 + 3
                    lsn = max_lsn(await sql(cluster, db, outbox_insert(*rows)))
                    await double.holding.wait()
                assert await slot_confirmed(cluster, db) < lsn
                first.process.kill()   # SIGKILL
                with trio.fail_after(10):
                    assert await first.process.wait() == -signal.SIGKILL
            assert await slot_confirmed(cluster, db) < lsn
            ingested_before = [event["event_id"] for event in double.events]
            assert ingested_before == [row["event_id"] for row in early + rows[:3]]
            double.hold_after = None
            double.release.set()
            restart_index = len(double.requests)

            second = CliProcess(env)
            async with second.running():
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) >= 8)
                    await wait_until(lambda: _gt(slot_confirmed(cluster, db), lsn), timeout=10)
                second.process.send_signal(signal.SIGTERM)
                assert await second.wait_exit(timeout=15) == 0
        redelivered = event_posts(double, restart_index)
        assert [(r.json()["event_id"], r.status) for r in redelivered] == (
            [(row["event_id"], 409) for row in rows[:3]] + [(row["event_id"], 201) for row in rows[3:]])
        assert [event["event_id"] for event in double.events] == [row["event_id"] for row in early + rows]
        assert sorted(json.loads(event["payload"])["n"] for event in double.events) == list(range(8))
        assert b"Traceback" not in first.stderr + second.stderr
        assert b"counted as delivered" in second.stderr   # LOG_LEVEL=DEBUG in make_env

    # -- 3. unknown event type ------------------------------------------------------------------------

    async def test_unknown_event_type_is_undeliverable_without_create(self, cluster, db, tmp_path):
        await sql(cluster, db, OUTBOX_DDL)
        dead = str(tmp_path / "dead.jsonl")
        unknown = [outbox_row(event_type="billing.invoice.voided", payload={"n": n}) for n in range(2)]
        good = outbox_row()
        with smtp_server() as (mail, port):
            async with Hook0Double.serve() as double:
                config = make_config(cluster, db, hook0_settings(double), email_settings(port), on_failure="skip",
                                     dead_letter_file=dead)
                async with service(config):
                    await sql(cluster, db, outbox_insert(unknown[0]), outbox_insert(unknown[1]),
                              outbox_insert(good))
                    with trio.fail_after(15):
                        await double.wait_for(lambda double: len(double.events) >= 1)
                # leaving the block drains the queued alert mails
        assert [event["event_id"] for event in double.events] == [good["event_id"]]
        posts = event_posts(double)
        # each unknown-type event is tried once (a 400 is not retried), then the stream goes on
        assert [(r.json()["event_id"], r.status) for r in posts] == [
            (unknown[0]["event_id"], 400), (unknown[1]["event_id"], 400), (good["event_id"], 201)]
        assert all(r.path.rstrip("/") != "/api/v1/event_types" for r in double.requests)
        letters = read_dead_letters(dead)
        assert [letter["new"]["event_id"] for letter in letters] == [row["event_id"] for row in unknown]
        assert all(list(letter) == EVENT_KEYS and letter["table"] == "outbox" for letter in letters)
        # alerted at most once per type (5 minutes), and the mail names the type
        type_mails = [m for m in mail.messages if "billing.invoice.voided" in m.mail["Subject"]]
        assert len(type_mails) == 1, [m.mail["Subject"] for m in mail.messages]
        assert "HOOK0_CREATE_EVENT_TYPES" in type_mails[0].mail.get_content()
        assert all(TOKEN not in mail_text(m) for m in mail.messages)

    async def test_unknown_event_type_is_created_with_hook0_create_event_types(self, cluster, db):
        await sql(cluster, db, OUTBOX_DDL)
        row = outbox_row(event_type="shop.order.created")
        async with Hook0Double.serve() as double:
            assert "shop.order.created" not in double.event_types
            async with service(make_config(cluster, db, hook0_settings(double), hook0_create_event_types="true")):
                await sql(cluster, db, outbox_insert(row))
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) >= 1)
        assert [(r.method, r.path, r.status) for r in double.requests] == [
            ("POST", "/api/v1/event", 400), ("POST", "/api/v1/event_types", 201), ("POST", "/api/v1/event", 201)]
        assert double.requests[1].json() == {"application_id": APPLICATION_ID, "service": "shop",
                                             "resource_type": "order", "verb": "created"}
        assert double.requests[1].headers["authorization"] == f"Bearer {TOKEN}"
        assert "shop.order.created" in double.event_types
        assert double.events[0]["event_id"] == row["event_id"]
        assert double.events[0]["event_type"] == "shop.order.created"

    # -- 4. bad token ---------------------------------------------------------------------------------

    @pytest.mark.parametrize("how", ["wrong token", "401 no authorization header"])
    async def test_rejected_token_exits_4_with_an_alert_and_no_token_anywhere(self, cluster, db, how):
        await sql(cluster, db, OUTBOX_DDL)
        await create_slot(cluster, db)
        wrong = "Wr0ng-T0ken-EoQBChoKBHRlc3Q-zz"
        lsn = max_lsn(await sql(cluster, db, outbox_insert(outbox_row())))
        with smtp_server() as (mail, port):
            async with Hook0Double.serve() as double:
                token = wrong if how == "wrong token" else TOKEN
                if how != "wrong token":
                    double.fail_next("AuthNoAuthorizationHeader")
                env = make_env(cluster, db, hook0_settings(double), email_settings(port), hook0_api_token=token)
                result = await trio.to_thread.run_sync(partial(run_cli, [], env, timeout=40))
            assert result.returncode == 4, result.stderr
            assert "Traceback" not in result.stderr
            assert "HOOK0_API_TOKEN" in result.stderr
            # the alert goes out before the process exits (the exit path drains the mail queue)
            assert mail.messages, result.stderr
            assert any("token" in m.mail["Subject"].lower() for m in mail.messages)
        texts = [result.stdout, result.stderr, *(mail_text(m) for m in mail.messages),
                 *(m.mail.get_content() for m in mail.messages)]
        assert all(token not in text for text in texts)
        assert [r.status for r in event_posts(double)] == [403 if how == "wrong token" else 401]
        assert await slot_confirmed(cluster, db) < lsn

    # -- 5. empty labels ------------------------------------------------------------------------------

    async def test_empty_labels_without_hook0_labels_is_undeliverable(self, cluster, db):
        await sql(cluster, db, OUTBOX_DDL)
        await create_slot(cluster, db)
        row = outbox_row(labels={})
        lsn = max_lsn(await sql(cluster, db, outbox_insert(row)))
        async with Hook0Double.serve() as double:
            config = make_config(cluster, db, hook0_settings(double))   # ON_FAILURE=exit
            with trio.fail_after(15), pytest.raises(w.DeliveryFailed) as failed:
                await w.run(config)
        message = str(failed.value)
        assert "public.outbox" in message, message
        assert "column labels" in message, message
        assert failed.value.exit_code == 3
        assert double.events == []
        assert await slot_confirmed(cluster, db) < lsn

    async def test_empty_labels_with_hook0_labels_are_delivered_with_them(self, cluster, db):
        await sql(cluster, db, OUTBOX_DDL)
        empty, null, only_nulls, own = (outbox_row(labels={}), outbox_row(labels=None),
                                        outbox_row(labels={"tenant": None}), outbox_row(labels={"region": "eu"}))
        async with Hook0Double.serve() as double:
            config = make_config(cluster, db, hook0_settings(double), hook0_labels='{"tenant":"acme"}')
            async with service(config):
                await sql(cluster, db, outbox_insert(empty, null, only_nulls, own))
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) >= 4)
        assert [(e["event_id"], e["labels"]) for e in double.events] == [
            (empty["event_id"], {"tenant": "acme"}), (null["event_id"], {"tenant": "acme"}),
            (only_nulls["event_id"], {"tenant": "acme"}), (own["event_id"], {"region": "eu"})]

    # -- 6. NULL payload, ON_FAILURE=skip -------------------------------------------------------------

    async def test_null_payload_goes_to_the_dead_letter_file_and_later_rows_are_delivered(
            self, cluster, db, tmp_path, caplog):
        await sql(cluster, db, OUTBOX_DDL)
        dead = str(tmp_path / "dead.jsonl")
        before, bad, after, later = (outbox_row(payload={"n": 1}), outbox_row(payload=None),
                                     outbox_row(payload={"n": 3}), outbox_row(payload={"n": 4}))
        async with Hook0Double.serve() as double:
            config = make_config(cluster, db, hook0_settings(double), on_failure="skip", dead_letter_file=dead)
            async with service(config):
                await sql(cluster, db, outbox_insert(before, bad, after))
                lsn = max_lsn(await sql(cluster, db, outbox_insert(later)))
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) >= 3)
                    await wait_until(lambda: _gt(slot_confirmed(cluster, db), lsn), timeout=10)
        assert [e["event_id"] for e in double.events] == [before["event_id"], after["event_id"], later["event_id"]]
        assert all(r.json()["event_id"] != bad["event_id"] for r in event_posts(double))
        (letter,) = read_dead_letters(dead)
        assert list(letter) == EVENT_KEYS
        assert (letter["op"], letter["schema"], letter["table"]) == ("insert", "public", "outbox")
        assert letter["new"] == {"event_id": bad["event_id"], "event_type": "billing.invoice.paid",
                                 "created_at": "2026-11-27T16:25:11Z", "payload": None,
                                 "metadata": {"source": "e2e"}, "labels": {"tenant": "acme"}}
        assert letter["seq"] == 1
        assert letter["id"] == f"{letter['commit_lsn']}:1"
        with open(dead, "rb") as file:   # the stdout format: one line per event, jsonb as PostgreSQL prints it
            data = file.read()
        assert data.count(b"\n") == 1
        assert data.endswith(b"}\n")
        assert b',"new":{"event_id":' in data
        assert b'"payload":null,"metadata":{"source": "e2e"},"labels":{"tenant": "acme"}},"old":null,' in data
        logged_errors = " ".join(r.getMessage() for r in caplog.records)
        assert "public.outbox" in logged_errors
        assert "column payload" in logged_errors

    # -- 7. HOOK0_TABLE_EVENTS ------------------------------------------------------------------------

    async def test_delete_from_a_plain_table_keyed_by_event_id_is_a_table_event(self, cluster, db):
        # Its delete carries only {"event_id": ...}, like an outbox delete: the table's own columns
        # (from its Relation message) decide, so it is not mistaken for one and dropped.
        await sql(cluster, db, "CREATE TABLE audit (event_id uuid PRIMARY KEY, note text)", OUTBOX_DDL)
        types = ("public.audit.insert", "public.audit.delete", "billing.invoice.paid")
        row = outbox_row()
        async with InstrumentedHook0Double.serve(event_types=types) as double:
            async with service(make_config(cluster, db, hook0_settings(double), hook0_table_events="true")):
                await sql(cluster, db, "INSERT INTO audit VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'n')",
                          "DELETE FROM audit", outbox_insert(row), "DELETE FROM outbox",
                          "INSERT INTO audit VALUES ('b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'm')")
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) >= 4)
        assert [e["event_type"] for e in double.events] == [
            "public.audit.insert", "public.audit.delete", "billing.invoice.paid", "public.audit.insert"]

    async def test_table_events_map_insert_update_delete_with_stable_event_ids(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE items (id int PRIMARY KEY, name text)")
        types = ("public.items.insert", "public.items.update", "public.items.delete")
        async with InstrumentedHook0Double.serve(event_types=types) as double:
            config = make_config(cluster, db, hook0_settings(double), hook0_table_events="true")
            # First run (a child process): Hook0 takes the insert and the update, but the update's
            # answer never comes back and wal2http is killed before it confirms the transaction.
            double.hold_after = 2
            first = CliProcess(make_env(cluster, db, hook0_settings(double), hook0_table_events="true"))
            async with first.running():
                with trio.fail_after(15):
                    await first.wait_started()
                    await sql(cluster, db, "BEGIN; INSERT INTO items VALUES (1, 'widget'); "
                                           "UPDATE items SET name = 'gadget' WHERE id = 1; "
                                           "DELETE FROM items WHERE id = 1; COMMIT")
                    await double.holding.wait()
                first.process.kill()
                with trio.fail_after(10):
                    await first.process.wait()
            lsn = w.parse_lsn((await sql(cluster, db, "SELECT pg_current_wal_insert_lsn()"))[0][0])
            assert await slot_confirmed(cluster, db) < lsn
            first_run = [(r.json()["event_type"], r.json()["event_id"]) for r in event_posts(double)]
            double.hold_after = None
            double.release.set()
            restart_index = len(double.requests)
            # Second run from the unconfirmed position: the same changes, the same uuids.
            async with service(config):
                await sql(cluster, db, "TRUNCATE items", "INSERT INTO items VALUES (2, 'after')")
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) >= 4)
        assert [event_type for event_type, _ in first_run] == ["public.items.insert", "public.items.update"]
        second_run = [(r.json()["event_type"], r.json()["event_id"], r.status)
                      for r in event_posts(double, restart_index)]
        assert second_run[:2] == [(t, i, 409) for t, i in first_run]
        assert [(t, s) for t, _, s in second_run[2:]] == [("public.items.delete", 201), ("public.items.insert", 201)]
        ids = [event["event_id"] for event in double.events]
        assert len(set(ids)) == 4
        assert all(str(uuid.UUID(i)) == i for i in ids)
        payloads = [json.loads(event["payload"]) for event in double.events]
        assert [(p["op"], p["table"], p["key"], p["new"], p["old"]) for p in payloads] == [
            ("insert", "items", {"id": 1}, {"id": 1, "name": "widget"}, None),
            ("update", "items", {"id": 1}, {"id": 1, "name": "gadget"}, None),
            ("delete", "items", {"id": 1}, None, {"id": 1}),
            ("insert", "items", {"id": 2}, {"id": 2, "name": "after"}, None)]
        for event, payload in zip(double.events, payloads):
            assert list(payload) == EVENT_KEYS                # the event object, as stdout has it
            assert event["payload"] == json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
            assert event["payload_content_type"] == "application/json"
            assert event["event_type"] == f"public.items.{payload['op']}"
            assert event["labels"] == {"schema": "public", "table": "items"}
            assert event.get("metadata") in (None, {})
            assert parse_time(event["occurred_at"]) == parse_time(payload["commit_time"])
        # the truncate is not a table event
        assert all("truncate" not in r.json()["event_type"] for r in event_posts(double))

    # -- 8. 429 and Retry-After -----------------------------------------------------------------------

    @pytest.mark.parametrize("kind, retry_after", [
        ("rate_limited_text", "1"),          # the rate limiter's text/plain 429 with Retry-After
        ("rate_limited_text", None),         # ... saying only "retry in 1s" in its body
        ("rate_limited", "1"),               # problem JSON 429 RateLimited
        ("service_unavailable", "1"),        # problem JSON 503 ServiceUnavailable
    ])
    async def test_retry_after_is_honoured(self, cluster, db, kind, retry_after):
        await sql(cluster, db, OUTBOX_DDL)
        row = outbox_row()
        async with InstrumentedHook0Double.serve() as double:
            double.fail_next(kind, retry_after=retry_after)
            # Retry-After is honoured up to RETRY_MAX_DELAY_MS: allow 5 s, far above the jitter
            config = make_config(cluster, db, hook0_settings(double), retry_max_delay_ms=5000)
            async with service(config):
                await sql(cluster, db, outbox_insert(row))
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) >= 1)
        refused, accepted = event_posts(double)
        assert refused.status == (503 if kind == "service_unavailable" else 429)
        assert accepted.status == 201
        assert accepted.json()["event_id"] == row["event_id"]
        gap = accepted.at - refused.at
        assert 1.0 <= gap < 4.0, gap

    # -- 9. --check -----------------------------------------------------------------------------------

    @pytest.mark.parametrize("suffix", ["", "/", "/api/v1/"])
    async def test_check_accepts_the_right_token(self, cluster, db, suffix):
        async with Hook0Double.serve() as double:
            env = make_env(cluster, db, hook0_settings(double), hook0_api_url=double.url + suffix)
            result = await trio.to_thread.run_sync(partial(run_cli, ["--check"], env, timeout=30))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ok sink hook0" in result.stdout.splitlines()
        assert TOKEN not in result.stdout + result.stderr
        (request,) = double.requests
        assert (request.method, request.path, request.status) == ("GET", "/api/v1/event_types", 200)
        assert request.target == f"/api/v1/event_types?application_id={APPLICATION_ID}"
        assert request.headers["authorization"] == f"Bearer {TOKEN}"

    async def test_check_with_a_wrong_token_fails_with_exit_4(self, cluster, db):
        wrong = "Wr0ng-T0ken-EoQBChoKBHRlc3Q-zz"
        async with Hook0Double.serve() as double:
            env = make_env(cluster, db, hook0_settings(double), hook0_api_token=wrong)
            result = await trio.to_thread.run_sync(partial(run_cli, ["--check"], env, timeout=30))
        assert result.returncode == 4, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert [line for line in lines if line.startswith("FAIL")] == [
            line for line in lines if line.startswith("FAIL sink hook0: ")], lines
        assert len([line for line in lines if line.startswith("FAIL sink hook0: ")]) == 1
        assert connect_line(lines, cluster)
        assert wrong not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert [r.status for r in double.requests] == [403]

    # -- found while writing these: failing tests of wal2http.py bugs ---------------------------------

    async def test_outbox_deletes_are_treated_alike_before_and_after_a_restart(self, cluster, db, tmp_path):
        # BUG: Hook0Sink recognises an outbox table from the columns an event carries, or from an
        # insert/update of it seen earlier *by this process*.  A delete under the default replica
        # identity carries only the key (event_id), so with HOOK0_TABLE_EVENTS=true a restarted
        # process sends an outbox delete as a `public.outbox.delete` table event, while the process
        # that had seen an insert ignored the same kind of change.
        await sql(cluster, db, OUTBOX_DDL)
        dead = str(tmp_path / "dead.jsonl")
        r1, r2, r3 = outbox_row(payload={"n": 1}), outbox_row(payload={"n": 2}), outbox_row(payload={"n": 3})
        async with Hook0Double.serve() as double:
            config = make_config(cluster, db, hook0_settings(double), hook0_table_events="true", on_failure="skip",
                                      dead_letter_file=dead)
            async with service(config):
                await sql(cluster, db, outbox_insert(r1, r2))
                lsn = max_lsn(await sql(cluster, db, "DELETE FROM outbox WHERE event_id = "
                                        f"{w.quote_literal(r1['event_id'])} RETURNING pg_current_wal_insert_lsn()"))
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) >= 2)
                    await wait_until(lambda: _gt(slot_confirmed(cluster, db), lsn), timeout=10)
            first_process = [r.json()["event_type"] for r in event_posts(double)]
            assert first_process == ["billing.invoice.paid", "billing.invoice.paid"]   # delete ignored
            # a restart: the first change the new process sees is a delete of an outbox row
            async with service(config):
                await sql(cluster, db, f"DELETE FROM outbox WHERE event_id = {w.quote_literal(r2['event_id'])}",
                          outbox_insert(r3))
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) >= 3)
        assert [e["event_id"] for e in double.events] == [r1["event_id"], r2["event_id"], r3["event_id"]]
        sent_types = [r.json()["event_type"] for r in event_posts(double)]
        assert "public.outbox.delete" not in sent_types, sent_types
        assert read_dead_letters(dead) == []

    async def test_cancelling_run_returns_promptly(self, cluster, db):
        # BUG: run() drains the alert queue in a shielded scope when it ends; when run() is cancelled
        # from outside (an embedding application, `import wal2http`), the alerter task is cancelled
        # too, so Alerter.drain waits the whole ALERT_DRAIN_TIMEOUT_S (15 s) for nothing.
        async with Hook0Double.serve() as double:
            config = make_config(cluster, db, hook0_settings(double))
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: w.run(config, task_status=task_status))
                cancelled_at = trio.current_time()
                nursery.cancel_scope.cancel()
            took = trio.current_time() - cancelled_at
        assert took < 5, f"cancelling run() took {took:.1f} s"


AUTH_HEADER_VALUE = "Bearer e2e-t0ken-never-logged"
SIGNING_KEY = b"e2e signing key \x00\x01\xfe\xff 32 bytes!"
SIGNING_SECRET = "whsec_" + base64.b64encode(SIGNING_KEY).decode()



@asynccontextmanager
async def reference(cluster, db):
    """A second slot of the same database streaming into a MemorySink: the expected event list."""
    async with running(make_config(cluster, db, slot_name=f"{db}_ref"), MemorySink()) as (sink, _ack):
        yield sink


def lsn(text: str) -> int:
    return w.parse_lsn(text)


def assert_ids_unique_and_in_commit_order(events: list[dict]) -> None:
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids), "duplicate ids"
    for event in events:
        assert event["id"] == f"{event['commit_lsn']}:{event['seq']}"
    positions = [(lsn(e["commit_lsn"]), e["seq"]) for e in events]
    assert positions == sorted(positions), "not in commit order"


async def confirmed_past(cluster, db, position: int, slot: str | None = None) -> bool:
    return await slot_confirmed(cluster, db, slot) > position


async def status_updates_seen(cluster, db, count: int, slot: str | None = None) -> None:
    """Waits until PostgreSQL has received `count` more standby status updates on the slot's
    walsender (pg_stat_replication.reply_time changes), instead of sleeping."""
    query = ("SELECT r.reply_time FROM pg_stat_replication r JOIN pg_replication_slots s "
             f"ON s.active_pid = r.pid WHERE s.slot_name = {w.quote_literal(slot or db)}")
    seen = []

    async def next_update():
        rows = await sql(cluster, db, query)
        value = rows[0][0] if rows else None
        if value is not None and (not seen or seen[-1] != value):
            seen.append(value)
        return len(seen) > count

    await wait_until(next_update, timeout=10, interval=0.02)


async def table(cluster, db, ddl="CREATE TABLE t (id int PRIMARY KEY, v text)"):
    await sql(cluster, db, ddl)


def drop_inactive_slots(cluster, db) -> None:
    """Drops the database's slots once they are inactive (waits up to 10 s for that)."""
    deadline = time.monotonic() + 10
    while True:
        left = cluster.psql(db, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                                "WHERE database = current_database() AND NOT active; "
                                "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()")
        if left.strip().splitlines()[-1] == "0" or time.monotonic() > deadline:
            break
        time.sleep(0.05)



WORKLOAD = [  # 139 events in 9 transactions of different sizes
    "INSERT INTO t VALUES (1, 'one')",
    "INSERT INTO t SELECT g, 'bulk ' || g FROM generate_series(2, 71) g",
    ("BEGIN; UPDATE t SET v = 'héllo ✓' WHERE id = 1; DELETE FROM t WHERE id = 2; "
     "SELECT pg_logical_emit_message(true, 'e2e', 'in a transaction'); COMMIT"),
    *[f"INSERT INTO t VALUES ({100 + i}, 'single {i}')" for i in range(5)],
    "INSERT INTO t SELECT g, 'tail' FROM generate_series(200, 259) g",
]
WORKLOAD_EVENTS = 1 + 70 + 3 + 5 + 60


class TestHttpEndToEnd:
    @pytest.fixture(autouse=True)
    def _drop_slots_afterwards(self, cluster, db):
        """Each test makes two slots (its own and the reference's): drop them at the end, so the
        suite stays far below max_replication_slots and no slot keeps WAL."""
        yield
        drop_inactive_slots(cluster, db)


    # -- 1. bodies, order, ids, keep-alive ------------------------------------------------------------

    @pytest.mark.parametrize("batch_size", [1, 50])
    async def test_bodies_are_exactly_the_ordered_events_over_one_connection(self, cluster, db, batch_size):
        await table(cluster, db)
        async with ScriptedReceiver.serve() as receiver, reference(cluster, db) as ref:
            config = make_config(cluster, db, http_settings(receiver), http_batch_size=batch_size)
            async with service(config):
                await sql(cluster, db, *WORKLOAD)
                await receiver.wait_for(lambda r: len(r.delivered()) >= WORKLOAD_EVENTS)
                expected = await ref.wait_for(WORKLOAD_EVENTS, timeout=15)
                end = max(lsn(e["commit_lsn"]) for e in expected)
                await wait_until(lambda: confirmed_past(cluster, db, end), timeout=10)
        delivered = receiver.delivered()
        assert delivered == expected  # exactly the same events, same ids, same order, nothing twice
        assert len(delivered) == WORKLOAD_EVENTS
        assert_ids_unique_and_in_commit_order(delivered)
        assert [e["op"] for e in delivered[71:74]] == ["update", "delete", "message"]
        assert all(status == 200 for status in (a.status for a in receiver.answers))
        for request in receiver.requests:
            assert (request.method, request.target) == ("POST", "/hooks/pg?source=e2e")
            assert request.headers["content-type"] == "application/json"
            assert request.headers["user-agent"] == f"wal2http/{w.__version__}"
        if batch_size == 1:
            assert len(receiver.requests) == WORKLOAD_EVENTS
            for request, event in zip(receiver.requests, expected):
                assert json.loads(request.body) == event
                assert request.headers["idempotency-key"] == event["id"]
        else:
            bodies = [json.loads(r.body) for r in receiver.requests]
            assert all(list(b) == ["events"] and 1 <= len(b["events"]) <= 50 for b in bodies)
            assert len(receiver.requests) < WORKLOAD_EVENTS // 2  # batching did happen
        assert receiver.connections == 1  # one keep-alive connection for the whole run

    # -- 2. Standard Webhooks signatures --------------------------------------------------------------

    @pytest.mark.parametrize("batch_size", [1, 4])
    async def test_signatures_verify_independently(self, cluster, db, batch_size):
        await table(cluster, db)
        headers = json.dumps({"Authorization": AUTH_HEADER_VALUE, "X-Tenant": "acme"})
        async with ScriptedReceiver.serve() as receiver, reference(cluster, db) as ref:
            config = make_config(cluster, db, http_settings(receiver), http_batch_size=batch_size,
                                     http_signing_secret=SIGNING_SECRET, http_headers=headers)
            before = int(time.time())
            async with service(config):
                await sql(cluster, db, "INSERT INTO t SELECT g, 'héllo ✓' FROM generate_series(1, 6) g",
                          "SELECT pg_logical_emit_message(false, 'e2e', 'not in a transaction')",
                          "INSERT INTO t VALUES (7, 'seven')", "UPDATE t SET v = 'x' WHERE id < 3")
                await receiver.wait_for(lambda r: len(r.delivered()) >= 10)
                expected = await ref.wait_for(10)
                assert [e["id"].endswith(":m") for e in expected].count(True) == 1
            after = int(time.time())
        assert receiver.delivered() == expected
        for request in receiver.requests:
            h = request.headers
            inside = events_in(request)
            assert h["webhook-id"] == (inside[0]["id"] if batch_size == 1 else f"{inside[0]['id']}..{inside[-1]['id']}")
            assert h["idempotency-key"] == h["webhook-id"]
            assert before - 1 <= int(h["webhook-timestamp"]) <= after + 1
            signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + request.body
            wanted = base64.b64encode(hmac.new(SIGNING_KEY, signed, hashlib.sha256).digest()).decode()
            signatures = [s.split(",", 1) for s in h["webhook-signature"].split(" ")]
            assert any(v == "v1" and hmac.compare_digest(sig, wanted) for v, sig in signatures), h
            wrong = base64.b64encode(hmac.new(b"other key", signed, hashlib.sha256).digest()).decode()
            assert all(sig != wrong for _, sig in signatures)
            assert h["authorization"] == AUTH_HEADER_VALUE
            assert h["x-tenant"] == "acme"
            assert SIGNING_SECRET not in json.dumps(h)
            assert SIGNING_SECRET.encode() not in request.body
        if batch_size == 1:
            assert [r.headers["webhook-id"] for r in receiver.requests] == [e["id"] for e in expected]

    # -- 3. retries, and the slot does not pass an undelivered transaction ---------------------------

    async def test_500_500_200_delivered_once_and_slot_held_until_the_200(self, cluster, db):
        await table(cluster, db)
        async with ScriptedReceiver.serve([Reply(500, body=b"oops"), Reply(500)]) as receiver:
            receiver.gate_from = 2  # the third attempt (the 200) waits until the test says so
            config = make_config(cluster, db, http_settings(receiver))
            async with service(config) as ack:
                (held,), = await sql(cluster, db,
                                     "INSERT INTO t VALUES (1, 'retried') RETURNING pg_current_wal_insert_lsn()")
                held_lsn = lsn(held)
                await receiver.wait_for(lambda r: len(r.requests) == 3)
                await wait_until(lambda: ack.received_lsn > held_lsn, timeout=10)
                await status_updates_seen(cluster, db, 3)  # several status updates went out meanwhile
                (retried,) = events_in(receiver.requests[0])
                assert ack.flushed_lsn <= not_past(retried["commit_lsn"])
                assert await slot_confirmed(cluster, db) <= not_past(retried["commit_lsn"])
                assert receiver.answered == [(receiver.requests[0], receiver.answers[0]),
                                             (receiver.requests[1], receiver.answers[1])]
                receiver.gate.set()
                await receiver.wait_for(lambda r: len(r.delivered()) == 1)
                (event,) = receiver.delivered()
                await wait_until(lambda: confirmed_past(cluster, db, lsn(event["commit_lsn"])), timeout=10)
                await sql(cluster, db, "INSERT INTO t VALUES (2, 'sentinel')")
                await receiver.wait_for(lambda r: len(r.delivered()) == 2)
        first = receiver.requests[:3]
        assert [a.status for a in receiver.answers] == [500, 500, 200, 200]
        assert len(receiver.requests) == 4  # delivered once: no resend after the 200
        assert len({r.body for r in first}) == 1
        assert {r.headers["idempotency-key"] for r in first} == {event["id"]}
        assert event["new"] == {"id": 1, "v": "retried"}
        assert receiver.delivered()[1]["new"] == {"id": 2, "v": "sentinel"}

    # -- 4. ON_FAILURE=exit ---------------------------------------------------------------------------

    async def test_exit_on_400_keeps_the_slot_before_it_and_a_restart_delivers_it(self, cluster, db):
        await table(cluster, db)
        async with reference(cluster, db) as ref:
            async with ScriptedReceiver.serve([Reply(200), Reply(400, body=b'{"error": "rejected"}')]) as bad:
                env = make_env(cluster, db, http_settings(bad), on_failure="exit")
                async with CliProcess(env).running() as proc:
                    await proc.wait_started()
                    await sql(cluster, db, "INSERT INTO t VALUES (1, 'a')", "INSERT INTO t VALUES (2, 'b')",
                              "INSERT INTO t VALUES (3, 'c')")
                    assert await proc.wait_exit(timeout=15) == 3
                stderr = proc.stderr.decode()
                assert proc.events == []  # events go to the endpoint; nothing on stdout
            expected = await ref.wait_for(3)
            a, b, c = expected
            assert "Traceback" not in stderr
            assert b["id"] in stderr
            assert "400" in stderr
            assert [r.status for r in bad.answers] == [200, 400]  # a 400 is not retried
            assert events_in(bad.requests[1]) == [b]
            assert bad.delivered() == [a]
            assert await slot_confirmed(cluster, db) <= not_past(b["commit_lsn"])  # nothing acknowledged past it
            async with ScriptedReceiver.serve() as good:
                restarted = CliProcess({**env, "HTTP_ENDPOINT_URL": good.url("/hooks/pg?source=e2e")})
                async with restarted.running() as proc:
                    await good.wait_for(lambda r: c["id"] in r.delivered_ids())
                    await sql(cluster, db, "INSERT INTO t VALUES (4, 'd')")
                    expected = await ref.wait_for(4)
                    await good.wait_for(lambda r: expected[3]["id"] in r.delivered_ids())
                    await wait_until(lambda: confirmed_past(cluster, db, lsn(expected[3]["commit_lsn"])))
                    proc.process.send_signal(signal.SIGTERM)
                    assert await proc.wait_exit(timeout=15) == 0
        again = good.delivered()
        assert again in (expected[1:], expected)  # the failed event and everything after, same ids
        assert [r.status for r in good.answers] == [200] * len(again)

    # -- 5. ON_FAILURE=skip ---------------------------------------------------------------------------

    async def test_skip_dead_letters_the_failing_event_and_goes_on(self, cluster, db, tmp_path):
        await table(cluster, db)
        dead = tmp_path / "dead-letters.jsonl"
        replies = [Reply(200), Reply(500), Reply(503), Reply(500)]  # the second event fails 3 times
        async with ScriptedReceiver.serve(replies) as receiver, reference(cluster, db) as ref:
            config = make_config(cluster, db, http_settings(receiver), on_failure="skip", dead_letter_file=str(dead))
            async with service(config):
                await sql(cluster, db, "INSERT INTO t VALUES (1, 'a')", "INSERT INTO t VALUES (2, 'héllo ✓')",
                          "INSERT INTO t VALUES (3, 'c')")
                a, b, c = await ref.wait_for(3)
                await receiver.wait_for(lambda r: c["id"] in r.delivered_ids())
                await wait_until(lambda: confirmed_past(cluster, db, lsn(c["commit_lsn"])), timeout=10)
        assert receiver.delivered() == [a, c]
        assert [json.loads(r.body)["id"] for r in receiver.requests] == [a["id"], b["id"], b["id"], b["id"], c["id"]]
        lines = dead.read_bytes().splitlines(keepends=True)
        assert lines == [b.line.encode() + b"\n"]  # the stdout line of that event, byte for byte
        assert json.loads(lines[0]) == b

    # -- 6. ON_FAILURE=retry --------------------------------------------------------------------------

    async def test_retry_delivers_everything_in_order_once_the_endpoint_recovers(self, cluster, db, caplog):
        caplog.set_level(logging.INFO, logger="wal2http")
        await table(cluster, db)
        failures = 8  # more than RETRY_MAX_ATTEMPTS=3: the policy takes over, then it recovers
        async with ScriptedReceiver.serve([Reply(503)] * failures) as receiver, reference(cluster, db) as ref:
            config = make_config(cluster, db, http_settings(receiver), on_failure="retry")
            async with service(config):
                await sql(cluster, db, *[f"INSERT INTO t VALUES ({i}, 'r{i}')" for i in range(1, 6)],
                          "INSERT INTO t SELECT g, 'many' FROM generate_series(10, 29) g",
                          "DELETE FROM t WHERE id = 3")
                expected = await ref.wait_for(26)
                await receiver.wait_for(lambda r: len(r.delivered()) >= 26)
                end = lsn(expected[-1]["commit_lsn"])
                await wait_until(lambda: confirmed_past(cluster, db, end), timeout=10)
        assert receiver.delivered() == expected  # in order, nothing lost, nothing twice
        assert len(receiver.requests) == failures + len(expected)
        assert {r.headers["idempotency-key"] for r in receiver.requests[:failures + 1]} == {expected[0]["id"]}
        assert any("recovered" in r.getMessage() for r in caplog.records)
        assert any("alert" in r.getMessage() and expected[0]["id"] in r.getMessage() for r in caplog.records)

    # -- 7. kill -9 while the endpoint hangs ----------------------------------------------------------

    async def test_kill_9_while_the_endpoint_hangs_loses_nothing(self, cluster, db):
        await table(cluster, db)
        async with reference(cluster, db) as ref:
            slow = [Reply(200)] * 3
            async with ScriptedReceiver.serve(slow, default=Reply(hang=True)) as hanging:
                env = make_env(cluster, db, http_settings(hanging), http_timeout_secs=60)
                async with CliProcess(env).running() as proc:
                    await proc.wait_started()
                    await sql(cluster, db, *[f"INSERT INTO t VALUES ({i}, 'k{i}')" for i in range(1, 6)],
                              "INSERT INTO t SELECT g, 'k' FROM generate_series(10, 19) g")
                    expected = await ref.wait_for(15)
                    await hanging.wait_for(lambda r: len(r.requests) == 4)  # the fourth hangs
                    proc.process.kill()  # SIGKILL
                    assert await proc.wait_exit(timeout=10) == -signal.SIGKILL
            first = hanging.delivered()
            assert first == expected[:3]
            assert await slot_confirmed(cluster, db) <= not_past(expected[3]["commit_lsn"])
            async with ScriptedReceiver.serve() as healthy:
                env = {**env, "HTTP_ENDPOINT_URL": healthy.url("/hooks/pg?source=e2e")}
                async with CliProcess(env).running():
                    await healthy.wait_for(lambda r: expected[-1]["id"] in r.delivered_ids())
        second = healthy.delivered()
        assert second in [expected[k:] for k in range(4)]  # resumes at or before the hanging event
        seen = {e["id"]: e for e in first}
        for event in second:
            assert seen.setdefault(event["id"], event) == event  # a duplicate is the same event, same id
        assert set(seen) == {e["id"] for e in expected}

    # -- 8. email alerts ------------------------------------------------------------------------------

    async def test_alert_mail_names_the_events_and_no_secret(self, cluster, db):
        await table(cluster, db)
        echo = f"denied: {AUTH_HEADER_VALUE} {SIGNING_SECRET}".encode()  # a receiver echoing secrets
        smtp_password = "Smtp-E2e-Pa55word"
        logins = []

        def authenticator(server, session, envelope, mechanism, auth_data):
            logins.append((auth_data.login, auth_data.password))
            return AuthResult(success=auth_data.password == smtp_password.encode(), auth_data=auth_data)

        with smtp_server(authenticator=authenticator, auth_require_tls=False) as (mails, smtp_port):
            async with ScriptedReceiver.serve(default=Reply(500, body=echo)) as receiver:
                env = make_env(cluster, db, http_settings(receiver), email_settings(smtp_port), on_failure="exit",
                               http_batch_size=5,
                               database_url=cluster.url(db, "scram_user", SCRAM_PASSWORD, sslmode="require"),
                               http_signing_secret=SIGNING_SECRET,
                               http_headers=json.dumps({"Authorization": AUTH_HEADER_VALUE}),
                               email_smtp_username="alerts", email_smtp_password=smtp_password,
                               email_to="ops@example.org,dba@example.org")
                async with CliProcess(env).running() as proc:
                    await proc.wait_started()
                    await sql(cluster, db, "INSERT INTO t VALUES (1, 'a'), (2, 'b')")
                    assert await proc.wait_exit(timeout=20) == 3
            await wait_until(lambda: mails.messages, timeout=5)
        (ids,) = {tuple(e["id"] for e in events_in(r)) for r in receiver.requests}
        assert len(ids) == 2
        assert len(receiver.requests) == 3  # RETRY_MAX_ATTEMPTS, then exit
        assert len(mails.messages) == 1
        assert logins == [(b"alerts", smtp_password.encode())]
        mail = mails.messages[0]
        assert mail.rcpt_tos == ["ops@example.org", "dba@example.org"]
        assert "ALERT" in mail.mail["Subject"]
        assert "http" in mail.mail["Subject"]
        body = mail.mail.get_content()
        assert all(event_id in body for event_id in ids)
        assert "500" in body
        stderr = proc.stderr.decode()
        raw_mail = mail.mail.as_string()
        key_b64 = SIGNING_SECRET.removeprefix("whsec_")
        for text in (raw_mail, body, stderr):
            for secret in (AUTH_HEADER_VALUE, "e2e-t0ken-never-logged", SIGNING_SECRET, key_b64,
                           SCRAM_PASSWORD, smtp_password):
                assert secret not in text
        assert "Traceback" not in stderr

    async def test_dead_smtp_server_changes_nothing(self, cluster, db):
        await table(cluster, db)
        dead_port = free_port()  # nothing listens there
        async with reference(cluster, db) as ref:
            async with ScriptedReceiver.serve([Reply(200)], default=Reply(500)) as receiver:
                env = make_env(cluster, db, http_settings(receiver), email_settings(dead_port), on_failure="exit")
                async with CliProcess(env).running() as proc:
                    await proc.wait_started()
                    started = trio.current_time()
                    await sql(cluster, db, "INSERT INTO t VALUES (1, 'a')", "INSERT INTO t VALUES (2, 'b')")
                    assert await proc.wait_exit(timeout=20) == 3
                    elapsed = trio.current_time() - started
            a, b = await ref.wait_for(2)
        assert receiver.delivered() == [a]
        assert [json.loads(r.body)["id"] for r in receiver.requests] == [a["id"], b["id"], b["id"], b["id"]]
        assert await slot_confirmed(cluster, db) <= not_past(b["commit_lsn"])
        stderr = proc.stderr.decode()
        assert "could not send alert mail" in stderr
        assert "Traceback" not in stderr
        assert elapsed < 10

    # -- 9. --check -----------------------------------------------------------------------------------

    async def test_check_reports_the_http_sink(self, cluster, db):
        async with ScriptedReceiver.serve() as receiver:
            env = make_env(cluster, db, http_settings(receiver))
            result = await trio.to_thread.run_sync(lambda: run_cli(["--check"], env, timeout=30))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ok sink http" in result.stdout.splitlines()
        assert all(line.startswith("ok ") for line in result.stdout.splitlines())
        assert [r.method for r in receiver.requests]
        assert "POST" not in [r.method for r in receiver.requests]
        env = {**env, "HTTP_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}/hooks"}
        started = time.monotonic()
        result = await trio.to_thread.run_sync(lambda: run_cli(["--check"], env, timeout=30))
        assert time.monotonic() - started < 15
        assert result.returncode != 0
        failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL sink http: ")]
        assert len(failed) == 1, result.stdout
        assert connect_line(result.stdout.splitlines(), cluster)
        assert "Traceback" not in result.stderr

    async def test_check_reports_the_email_server(self, cluster, db):
        async with ScriptedReceiver.serve() as receiver:
            with smtp_server() as (mails, smtp_port):
                env = make_env(cluster, db, http_settings(receiver), email_settings(smtp_port))
                result = await trio.to_thread.run_sync(lambda: run_cli(["--check"], env, timeout=30))
            assert result.returncode == 0, result.stdout + result.stderr
            lines = result.stdout.splitlines()
            assert "ok email" in lines
            assert "ok sink http" in lines
            assert mails.messages == []  # it greets, sends nothing
            env = {**env, "EMAIL_SMTP_PORT": str(free_port())}
            started = time.monotonic()
            result = await trio.to_thread.run_sync(lambda: run_cli(["--check"], env, timeout=30))
        assert time.monotonic() - started < 15
        assert result.returncode != 0
        lines = result.stdout.splitlines()
        assert "ok sink http" in lines
        assert len([line for line in lines if line.startswith("FAIL email: ")]) == 1, result.stdout
        assert "Traceback" not in result.stderr

    # -- extra: what an operator sees around a failure, and a server that closes connections ----------

    async def test_retry_alert_mail_then_one_recovered_mail(self, cluster, db):
        await table(cluster, db)
        with smtp_server() as (mails, smtp_port):
            async with ScriptedReceiver.serve([Reply(503)] * 6) as receiver, reference(cluster, db) as ref:
                config = make_config(cluster, db, http_settings(receiver), email_settings(smtp_port), on_failure="retry")
                async with service(config):
                    await sql(cluster, db, "INSERT INTO t VALUES (1, 'a')", "INSERT INTO t VALUES (2, 'b')")
                    expected = await ref.wait_for(2)
                    await receiver.wait_for(lambda r: len(r.delivered()) == 2)
                    await wait_until(lambda: len(mails.messages) >= 2, timeout=10)
        assert receiver.delivered() == expected
        subjects = [m.mail["Subject"] for m in mails.messages]
        assert len(subjects) == 2, subjects
        assert "ALERT" in subjects[0], subjects
        assert "RECOVERED" in subjects[1], subjects
        assert expected[0]["id"] in mails.messages[0].mail.get_content()

    async def test_hanging_smtp_server_never_delays_delivery(self, cluster, db):
        await table(cluster, db)
        held: list[trio.SocketStream] = []
        release = trio.Event()

        async def silent_smtp(stream):  # accepts, never greets, until released
            held.append(stream)
            await release.wait()
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, silent_smtp, 0, host="127.0.0.1"))
            smtp_port = listeners[0].socket.getsockname()[1]
            async with ScriptedReceiver.serve([Reply(503)] * 5) as receiver, reference(cluster, db) as ref:
                config = make_config(cluster, db, http_settings(receiver), email_settings(smtp_port), on_failure="retry")
                async with service(config):
                    await sql(cluster, db, *[f"INSERT INTO t VALUES ({i}, 'x')" for i in range(1, 21)])
                    expected = await ref.wait_for(20)
                    with trio.fail_after(5):
                        await receiver.wait_for(lambda r: len(r.delivered()) == 20)
                        await wait_until(lambda: confirmed_past(cluster, db, lsn(expected[-1]["commit_lsn"])))
                    assert held
                    assert not release.is_set()  # the alert mail is still stuck meanwhile
                    release.set()
            nursery.cancel_scope.cancel()
        assert receiver.delivered() == expected

    async def test_connections_closed_by_the_server_are_reopened(self, cluster, db):
        await table(cluster, db)
        replies = [Reply(200), Reply(200, close_after=True), Reply(200), Reply(200, silent_close_after=True),
                   Reply(200), Reply(200, drop=True)]
        async with ScriptedReceiver.serve(replies) as receiver, reference(cluster, db) as ref:
            config = make_config(cluster, db, http_settings(receiver))
            async with service(config):
                await sql(cluster, db, *[f"INSERT INTO t VALUES ({i}, 'x')" for i in range(1, 11)])
                expected = await ref.wait_for(10)
                await receiver.wait_for(lambda r: len(r.delivered()) >= 10)
        delivered = receiver.delivered()
        assert delivered == expected  # a dropped request is retried: same event, same id
        assert [json.loads(r.body)["id"] for r in receiver.requests] == \
            [e["id"] for e in expected[:6]] + [expected[5]["id"]] + [e["id"] for e in expected[6:]]
        assert receiver.connections == 4

    async def test_check_never_waits_on_silent_servers_longer_than_the_connect_timeout(self, cluster, db):
        release = trio.Event()

        async def silent(stream):  # accepts the connection, never says a word
            async with stream:
                await release.wait()

        async with trio.open_nursery() as nursery:
            http_listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
            smtp_listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
            http_port = http_listeners[0].socket.getsockname()[1]
            smtp_port = smtp_listeners[0].socket.getsockname()[1]
            env = make_env(cluster, db, email_settings(smtp_port), database_url=cluster.url(db, connect_timeout=2),
                           event_sink="http", http_endpoint_url=f"http://127.0.0.1:{http_port}/hooks",
                           http_timeout_secs=30)
            started = time.monotonic()
            result = await trio.to_thread.run_sync(lambda: run_cli(["--check"], env, timeout=30))
            elapsed = time.monotonic() - started
            release.set()
            nursery.cancel_scope.cancel()
        lines = result.stdout.splitlines()
        assert result.returncode == 4, result.stdout + result.stderr
        assert connect_line(lines, cluster)
        assert [line for line in lines if line.startswith("FAIL ")] == [
            "FAIL sink http: no answer within 2 s", "FAIL email: no answer within 2 s"], lines
        # Each silent server cost its check the connect timeout (2 s), never HTTP_TIMEOUT_SECS (30 s)
        # or the SMTP timeout: the total stays far below 30 s, start-up on a loaded machine included.
        assert elapsed < 2 + 2 + 12

    async def test_large_transaction_in_batches_of_500(self, cluster, db):
        await table(cluster, db)
        total = 2500 + 3  # more than one chunk of the assembler (CHUNK_EVENTS) in one transaction
        async with ScriptedReceiver.serve() as receiver, reference(cluster, db) as ref:
            config = make_config(cluster, db, http_settings(receiver), http_batch_size=500)
            async with service(config):
                await sql(cluster, db, "INSERT INTO t VALUES (0, 'before')",
                          "INSERT INTO t SELECT g, repeat('x', 50) FROM generate_series(1, 2500) g",
                          "INSERT INTO t VALUES (-1, 'after'), (-2, 'after')")
                expected = await ref.wait_for(total)
                await receiver.wait_for(lambda r: len(r.delivered()) >= total)
                await wait_until(lambda: confirmed_past(cluster, db, lsn(expected[-1]["commit_lsn"])), timeout=10)
        assert receiver.delivered() == expected
        assert all(len(events_in(r)) <= 500 for r in receiver.requests)
        assert receiver.connections == 1

    async def test_sigterm_while_retrying_exits_0_without_acknowledging(self, cluster, db):
        await table(cluster, db)
        async with ScriptedReceiver.serve(default=Reply(503)) as receiver, reference(cluster, db) as ref:
            env = make_env(cluster, db, http_settings(receiver), on_failure="retry")
            async with CliProcess(env).running() as proc:
                await proc.wait_started()
                await sql(cluster, db, "INSERT INTO t VALUES (1, 'never delivered')")
                (event,) = await ref.wait_for(1)
                await receiver.wait_for(lambda r: len(r.requests) >= 5)  # past RETRY_MAX_ATTEMPTS: retrying
                proc.process.send_signal(signal.SIGTERM)
                started = trio.current_time()
                assert await proc.wait_exit(timeout=20) == 0
                elapsed = trio.current_time() - started
        assert elapsed < w.SHUTDOWN_TIMEOUT_S + 5
        assert receiver.delivered() == []
        assert await slot_confirmed(cluster, db) <= not_past(event["commit_lsn"])
        stderr = proc.stderr.decode()
        assert "Traceback" not in stderr
        abandoned = [line for line in stderr.splitlines() if "is abandoned" in line]
        assert len(abandoned) == 1
        assert event["id"] in abandoned[0]
        assert "sent again at the next start" in abandoned[0]

    async def test_a_receiver_hanging_past_the_timeout_is_retried_on_a_new_connection(self, cluster, db):
        await table(cluster, db)
        async with ScriptedReceiver.serve([Reply(hang=True)]) as receiver, reference(cluster, db) as ref:
            config = make_config(cluster, db, http_settings(receiver), http_timeout_secs=1)
            async with service(config):
                started = trio.current_time()
                await sql(cluster, db, "INSERT INTO t VALUES (1, 'late')")
                (event,) = await ref.wait_for(1)
                await receiver.wait_for(lambda r: len(r.delivered()) == 1)
                elapsed = trio.current_time() - started
        assert receiver.delivered() == [event]
        assert [r.headers["idempotency-key"] for r in receiver.requests] == [event["id"]] * 2
        assert [r.connection for r in receiver.requests] == [0, 1]
        assert 1 <= elapsed < 5


class OverlapReceiver(ScriptedReceiver):
    """ScriptedReceiver for concurrent delivery: a request that `script(request)` does not answer (it
    returns a Reply or None) is answered 200 after a random delay of up to `max_delay_s`, on as
    many connections as the client opens.  `most_in_flight`: the most requests received and not
    yet answered at any one moment."""

    def __init__(self, replies=(), default: Reply | None = None):
        super().__init__(replies, default)
        self.max_delay_s = 0.02
        self.script = lambda request: None
        self.most_in_flight = 0
        self._random = random.Random(20261206)

    def reply_for(self, request) -> Reply:
        return self.script(request) or Reply(200, delay_s=self._random.uniform(0, self.max_delay_s))

    def _notify(self) -> None:
        self.most_in_flight = max(self.most_in_flight, len(self.requests) - len(self.answered))
        super()._notify()

    def received(self) -> list[dict]:
        """The events of every POST in the order the requests arrived, failed attempts included."""
        return [e for request in self.posts() for e in events_in(request)]

    def attempts(self, predicate) -> list[tuple[list[dict], int]]:
        """(events, status answered) of every POST carrying an event that satisfies `predicate`."""
        return [(events_in(request), reply.status) for request, reply in zip(self.requests, self.answers)
                if request.method == "POST" and any(predicate(e) for e in events_in(request))]


def row_is(row_id: int, **values):
    """A predicate: the event is a change of the row with this id (and these values in `new`)."""
    def matches(event) -> bool:
        row = event["new"] or event["key"] or {}
        return row.get("id") == row_id and all(row.get(k) == v for k, v in values.items())
    return matches


def in_own_transactions(statements) -> str:
    """One query string that commits each statement as its own transaction (one round trip)."""
    return " ".join(f"BEGIN; {statement}; COMMIT;" for statement in statements)


def concurrent_workload(rng: random.Random, counters: int = 30) -> tuple[list[str], int]:
    """Transactions over table c (each update adds 1 to the row's counter n), table tr (inserts
    and truncates) and transactional messages of prefixes p and q (their content counts up per
    prefix); returns the statements and the number of events they make."""
    statements, events = [f"INSERT INTO c SELECT g, 0 FROM generate_series(1, {counters}) g"], counters
    tr_rows, messages = 0, {"p": 0, "q": 0}
    for step in range(90):
        kind = 0.8 if step % 12 == 11 else rng.random()  # a truncate at least every 12 transactions
        if kind < 0.6:
            rows = rng.sample(range(1, counters + 1), rng.choice([1, 1, 2]))
            statements.append(f"UPDATE c SET n = n + 1 WHERE id IN ({', '.join(map(str, rows))})")
            events += len(rows)
        elif kind < 0.78:
            tr_rows += 1
            statements.append(f"INSERT INTO tr VALUES ({tr_rows})")
            events += 1
        elif kind < 0.85:
            statements.append("TRUNCATE tr")
            events += 1
        else:
            prefix = rng.choice("pq")
            messages[prefix] += 1
            statements.append(f"SELECT pg_logical_emit_message(true, '{prefix}', '{messages[prefix]}')")
            events += 1
    return statements, events


def assert_order_per_row_table_and_prefix(received: list[dict], expected: list[dict]) -> None:
    """Every expected event arrived; duplicates are allowed, reorders are not: for each row of c
    its counter never goes down, each truncate of tr comes after the table's earlier events and
    before its later ones, and the messages of each prefix count up."""
    assert {e["id"] for e in received} == {e["id"] for e in expected}
    counters: dict[int, list[int]] = {}
    for event in received:
        if event["table"] == "c":
            counters.setdefault(event["key"]["id"], []).append(event["new"]["n"])
    assert counters and all(seen == sorted(seen) for seen in counters.values()), counters
    rank, truncates = {}, 0  # tr events between truncates k and k+1: 2k; truncate k: 2k-1
    for event in expected:
        if event["table"] == "tr":
            truncates += event["op"] == "truncate"
            rank[event["id"]] = 2 * truncates - (event["op"] == "truncate")
    ranks = [rank[e["id"]] for e in received if e["id"] in rank]
    assert truncates and ranks == sorted(ranks)
    for prefix in "pq":
        seen = [int(e["content"]) for e in received if e["op"] == "message" and e["prefix"] == prefix]
        assert seen == sorted(seen), (prefix, seen)


class TestConcurrentDeliveryEndToEnd:
    """DELIVERY_CONCURRENCY against the real PostgreSQL: requests overlap, each row (and each
    table's truncates, each prefix's messages) stays in commit order, the slot is a low
    watermark, and ON_FAILURE applies to the failed batch alone."""

    @pytest.fixture(autouse=True)
    def _drop_slots_afterwards(self, cluster, db):
        yield
        drop_inactive_slots(cluster, db)

    # -- 1. overlap and order -------------------------------------------------------------------------

    @pytest.mark.parametrize("concurrency, batch_size", [(1, 1), (16, 1), (8, 4)])
    async def test_requests_overlap_and_rows_truncates_and_prefixes_stay_in_order(
            self, cluster, db, concurrency, batch_size):
        await sql(cluster, db, "CREATE TABLE c (id int PRIMARY KEY, n int)", "CREATE TABLE tr (id int PRIMARY KEY)")
        statements, count = concurrent_workload(random.Random(concurrency))
        async with OverlapReceiver.serve() as receiver, reference(cluster, db) as ref:
            config = make_config(cluster, db, http_settings(receiver), delivery_concurrency=concurrency,
                                     http_batch_size=batch_size)
            async with service(config):
                await sql(cluster, db, in_own_transactions(statements))
                expected = await ref.wait_for(count)
                await receiver.wait_for(lambda r: len(r.delivered()) >= count)
                end = max(lsn(e["commit_lsn"]) for e in expected)
                await wait_until(lambda: confirmed_past(cluster, db, end), timeout=10)
        assert len(expected) == count
        assert all(a.status == 200 for a in receiver.answers)  # nothing failed, so nothing twice
        assert_order_per_row_table_and_prefix(receiver.received(), expected)
        assert sorted(receiver.delivered_ids()) == sorted(e["id"] for e in expected)
        if concurrency == 1:
            assert receiver.most_in_flight == 1 and receiver.connections == 1
            assert receiver.delivered() == expected  # one at a time: the total commit order
        else:
            assert receiver.most_in_flight > 2, receiver.most_in_flight  # requests really overlap
            assert receiver.most_in_flight <= concurrency and receiver.connections <= concurrency
        position = {e["id"]: i for i, e in enumerate(expected)}
        for request in receiver.posts():
            inside = [position[e["id"]] for e in events_in(request)]
            assert inside == list(range(inside[0], inside[0] + len(inside)))  # a run of consecutive events
            if batch_size > 1:
                first, last = events_in(request)[0]["id"], events_in(request)[-1]["id"]
                assert request.headers["idempotency-key"] == f"{first}..{last}"

    # -- 2. kill -9 while one request hangs -----------------------------------------------------------

    async def test_kill_9_while_one_request_hangs_holds_the_slot_there_and_a_restart_delivers_it(
            self, cluster, db):
        await table(cluster, db)
        async with reference(cluster, db) as ref:
            async with OverlapReceiver.serve() as hanging:
                hanging.script = lambda r: Reply(hang=True) if any(map(row_is(3), events_in(r))) else None
                env = make_env(cluster, db, http_settings(hanging), http_timeout_secs=60, delivery_concurrency=4)
                async with CliProcess(env).running() as proc:
                    await proc.wait_started()
                    await sql(cluster, db, in_own_transactions(f"INSERT INTO t VALUES ({i}, 'k{i}')"
                                                               for i in range(1, 13)))
                    expected = await ref.wait_for(12)
                    hung = expected[2]
                    await hanging.wait_for(lambda r: len(r.delivered()) == 11)  # every other row went
                    await wait_until(lambda: confirmed_past(cluster, db, lsn(expected[1]["commit_lsn"])))
                    await status_updates_seen(cluster, db, 3)
                    assert await slot_confirmed(cluster, db) <= not_past(hung["commit_lsn"])
                    proc.process.kill()  # SIGKILL
                    assert await proc.wait_exit(timeout=10) == -signal.SIGKILL
            assert sorted(hanging.delivered_ids()) == sorted(e["id"] for e in expected if e is not hung)
            assert await slot_confirmed(cluster, db) <= not_past(hung["commit_lsn"])  # never passed it
            async with OverlapReceiver.serve() as healthy:
                env = {**env, "HTTP_ENDPOINT_URL": healthy.url("/hooks/pg?source=e2e")}
                async with CliProcess(env).running():
                    await healthy.wait_for(lambda r: hung["id"] in r.delivered_ids())
                    await wait_until(lambda: confirmed_past(cluster, db, lsn(expected[-1]["commit_lsn"])))
        # resumed at the hanging event's transaction: it and everything after it, same ids
        assert sorted(healthy.delivered_ids()) == sorted(e["id"] for e in expected[2:])
        by_id = {e["id"]: e for e in expected}
        assert all(by_id[e["id"]] == e for e in healthy.delivered() + hanging.delivered())

    # -- 3. ON_FAILURE with one failing batch among successful ones ------------------------------------

    async def test_exit_lets_the_requests_in_flight_finish_and_acknowledges_nothing_past_the_failure(
            self, cluster, db):
        await table(cluster, db)
        async with reference(cluster, db) as ref:
            async with OverlapReceiver.serve() as bad:
                bad.script = lambda r: Reply(400, body=b"rejected") if any(map(row_is(5), events_in(r))) else None
                env = make_env(cluster, db, http_settings(bad), on_failure="exit", delivery_concurrency=4)
                async with CliProcess(env).running() as proc:
                    await proc.wait_started()
                    await sql(cluster, db, in_own_transactions(f"INSERT INTO t VALUES ({i}, 'x')"
                                                               for i in range(1, 13)))
                    assert await proc.wait_exit(timeout=15) == 3
            expected = await ref.wait_for(12)
            failed = expected[4]
            stderr = proc.stderr.decode()
            assert failed["id"] in stderr and "400" in stderr and "Traceback" not in stderr
            assert bad.attempts(row_is(5)) == [([failed], 400)]  # a 400 is not retried
            delivered = set(bad.delivered_ids())
            assert {e["id"] for e in expected[:4]} <= delivered  # sent before it: finished, not abandoned
            assert failed["id"] not in delivered
            assert await slot_confirmed(cluster, db) <= not_past(failed["commit_lsn"])
            async with OverlapReceiver.serve() as good:
                async with CliProcess({**env, "HTTP_ENDPOINT_URL": good.url("/hooks")}).running() as proc:
                    await good.wait_for(lambda r: {e["id"] for e in expected[4:]} <= set(r.delivered_ids()))
                    await wait_until(lambda: confirmed_past(cluster, db, lsn(expected[-1]["commit_lsn"])))
                    proc.process.send_signal(signal.SIGTERM)
                    assert await proc.wait_exit(timeout=15) == 0
        assert set(good.delivered_ids()) <= {e["id"] for e in expected}

    async def test_skip_dead_letters_the_failed_batch_then_the_rows_later_batches_go(self, cluster, db, tmp_path):
        await sql(cluster, db, "CREATE TABLE c (id int PRIMARY KEY, n int)")
        dead = tmp_path / "dead-letters.jsonl"
        async with OverlapReceiver.serve() as receiver, reference(cluster, db) as ref:
            # each failed attempt takes 0.1 s: meanwhile every other row has long gone
            receiver.script = lambda r: (Reply(500, delay_s=0.1) if any(map(row_is(5, n=0), events_in(r)))
                                         else None)
            config = make_config(cluster, db, http_settings(receiver), on_failure="skip", dead_letter_file=str(dead),
                                     delivery_concurrency=4)
            async with service(config):
                await sql(cluster, db, in_own_transactions(
                    [f"INSERT INTO c VALUES ({i}, 0)" for i in range(1, 11)]
                    + ["UPDATE c SET n = n + 1 WHERE id = 5", "UPDATE c SET n = n + 1 WHERE id = 6",
                       "UPDATE c SET n = n + 1 WHERE id = 5"]))
                expected = await ref.wait_for(13)
                await receiver.wait_for(lambda r: len(r.delivered()) == 12)
                await wait_until(lambda: confirmed_past(cluster, db, lsn(expected[-1]["commit_lsn"])), timeout=10)
        failed = expected[4]
        assert dead.read_bytes().splitlines(keepends=True) == [failed.line.encode() + b"\n"]
        assert sorted(receiver.delivered_ids()) == sorted(e["id"] for e in expected if e is not failed)
        row_5 = [(events[0]["new"]["n"], status) for events, status in receiver.attempts(row_is(5))]
        assert row_5 == [(0, 500)] * 3 + [(1, 200), (2, 200)]  # dead-lettered after 3 attempts, then the rest

    async def test_retry_holds_back_only_what_is_ordered_after_the_failing_batch(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE c (id int PRIMARY KEY, n int)")
        failing = trio.Event()  # set: row 5 is accepted again
        async with OverlapReceiver.serve() as receiver, reference(cluster, db) as ref:
            receiver.script = lambda r: (Reply(503) if not failing.is_set() and any(map(row_is(5), events_in(r)))
                                         else None)
            config = make_config(cluster, db, http_settings(receiver), on_failure="retry", delivery_concurrency=4)
            async with service(config):
                await sql(cluster, db, in_own_transactions(
                    [f"INSERT INTO c VALUES ({i}, 0)" for i in range(1, 11)]
                    + ["UPDATE c SET n = n + 1 WHERE id = 5"]
                    + [f"INSERT INTO c VALUES ({i}, 0)" for i in range(11, 15)]))
                expected = await ref.wait_for(15)
                insert_5, update_5 = expected[4], expected[10]
                others = {e["id"] for e in expected} - {insert_5["id"], update_5["id"]}
                await receiver.wait_for(lambda r: others <= set(r.delivered_ids()))  # the rest flows
                await receiver.wait_for(lambda r: len(r.attempts(row_is(5))) >= 5)  # past RETRY_MAX_ATTEMPTS=3
                await wait_until(lambda: confirmed_past(cluster, db, lsn(expected[3]["commit_lsn"])))
                await status_updates_seen(cluster, db, 2)
                assert await slot_confirmed(cluster, db) <= not_past(insert_5["commit_lsn"])
                assert {e["id"] for events, _ in receiver.attempts(row_is(5)) for e in events} == {insert_5["id"]}
                failing.set()
                await receiver.wait_for(lambda r: update_5["id"] in r.delivered_ids())
                await wait_until(lambda: confirmed_past(cluster, db, lsn(expected[-1]["commit_lsn"])), timeout=10)
        row_5 = [(events[0]["id"], status) for events, status in receiver.attempts(row_is(5))]
        retried = len(row_5) - 2
        assert row_5 == [(insert_5["id"], 503)] * retried + [(insert_5["id"], 200), (update_5["id"], 200)]
        assert sorted(receiver.delivered_ids()) == sorted(e["id"] for e in expected)

    # -- 4. Hook0 -------------------------------------------------------------------------------------

    async def test_hook0_requests_overlap_and_a_429_holds_back_every_request(self, cluster, db):
        await sql(cluster, db, OUTBOX_DDL)
        rows = [outbox_row(payload={"n": n}) for n in range(12)]
        async with InstrumentedHook0Double.serve() as double:
            double.hold_after = 0  # every answer waits for `release`
            config = make_config(cluster, db, hook0_settings(double), delivery_concurrency=4, retry_max_delay_ms=5000)
            async with service(config):
                await sql(cluster, db, in_own_transactions(outbox_insert(row) for row in rows[:4]))
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) == 4)  # four in flight, none answered
                assert double.holding.is_set()
                double.release.set()
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(event_posts(double)) == 4)
                double.fail_next("rate_limited", retry_after="2")
                await sql(cluster, db, in_own_transactions(outbox_insert(row) for row in rows[4:]))
                with trio.fail_after(15):
                    await double.wait_for(lambda double: len(double.events) == 12)
        assert sorted(e["event_id"] for e in double.events) == sorted(r["event_id"] for r in rows)
        posts = event_posts(double)
        (refused,) = [r for r in posts if r.status == 429]
        after = [r.at - refused.at for r in posts if r.at > refused.at]
        sent_before_the_answer = [gap for gap in after if gap < 0.5]
        assert len(sent_before_the_answer) <= 3, after  # only those already on their way
        assert all(gap < 0.5 or gap >= 2.0 for gap in after), after  # then nothing for Retry-After
        assert len(after) - len(sent_before_the_answer) >= 5, after  # the rest went after the pause

    # -- 5. batch ids ---------------------------------------------------------------------------------

    async def test_a_retried_batch_keeps_its_webhook_id_and_every_signature_verifies(self, cluster, db):
        from standardwebhooks.webhooks import Webhook
        await table(cluster, db)
        failures = [Reply(500), Reply(503)]
        async with OverlapReceiver.serve() as receiver, reference(cluster, db) as ref:
            receiver.script = lambda r: failures.pop(0) if failures and any(map(row_is(8), events_in(r))) else None
            config = make_config(cluster, db, http_settings(receiver), http_batch_size=5, delivery_concurrency=4,
                                     http_signing_secret=SIGNING_SECRET)
            async with service(config):
                await sql(cluster, db, "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20) g")
                expected = await ref.wait_for(20)
                await receiver.wait_for(lambda r: len(r.delivered()) >= 20)
        assert sorted(receiver.delivered_ids()) == sorted(e["id"] for e in expected)
        for request in receiver.posts():
            inside = events_in(request)
            assert Webhook(SIGNING_SECRET).verify(request.body, request.headers) == {"events": inside}
            assert request.headers["webhook-id"] == f"{inside[0]['id']}..{inside[-1]['id']}"
            assert request.headers["idempotency-key"] == request.headers["webhook-id"]
        attempts = [r for r in receiver.posts() if any(map(row_is(8), events_in(r)))]
        assert [status for _, status in receiver.attempts(row_is(8))] == [500, 503, 200]
        assert len({r.body for r in attempts}) == 1  # the same batch, sent again
        assert {r.headers["webhook-id"] for r in attempts} == {f"{expected[5]['id']}..{expected[9]['id']}"}


async def _health_ok(port: int) -> bool:
    try:
        return (await ops_get(port, "/health")).status == 200
    except w.DeliveryError:
        return False


@pytest.fixture(scope="session")
def own_cluster(cluster):
    """A cluster of the operations tests' own, of `cluster`'s version: they stop it and make it
    invalidate slots, which must not touch the session's cluster."""
    root = tempfile.mkdtemp(prefix=f"wal2http-test-ops-pg{cluster.major}-")
    pg = PgCluster(root, cluster.major)
    try:
        pg.init()
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout}", pytrace=False)
    yield pg
    pg.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


def ops_env(cluster, db, receiver=None, **overrides) -> dict[str, str]:
    """Settings with the operations port on a free loopback port (`port` in the result's OPS_ADDR)."""
    settings = {"ops_addr": f"127.0.0.1:{free_port()}", "slot_check_interval_secs": "0.2", **overrides}
    return make_env(cluster, db, http_settings(receiver), **settings) if receiver else make_env(cluster, db, **settings)


async def _in_flight_is(port: int, expected: int) -> bool:
    return metric_value(await scrape(port), "wal2http_delivery_requests_in_flight") == expected


def ops_port(config) -> int:
    return config.ops_addr[1]


async def ops_document(port: int, path: str, token: str | None = None) -> tuple[int, dict]:
    response = await ops_get(port, path, token=token)
    return response.status, ops_json(response)


async def ready_is(port: int, expected: bool) -> bool:
    status, _ = await ops_document(port, "/ready")
    return (status == 200) == expected


async def delivered_metric(port: int, token: str | None = None) -> dict[str, float]:
    families = await scrape(port, token)
    return {s.labels["op"]: s.value for s in families["wal2http_events_delivered"].samples
            if s.name == "wal2http_events_delivered_total"}


class TestOpsEndToEnd:
    async def test_every_endpoint_while_streaming(self, cluster, db):
        await table(cluster, db)
        async with ScriptedReceiver.serve() as receiver:
            config = w.load_config([], ops_env(cluster, db, receiver, ops_token=OPS_TOKEN))[0]
            port = ops_port(config)
            async with service(config):
                await sql(cluster, db, "INSERT INTO t VALUES (1, 'a'), (2, 'b')",
                          "UPDATE t SET v = 'c' WHERE id = 1", "DELETE FROM t WHERE id = 2",
                          "SELECT pg_logical_emit_message(true, 'p', 'hello')",
                          "TRUNCATE t")
                await receiver.wait_for(lambda r: len(r.delivered()) == 6)
                expected = {"insert": 2, "update": 1, "delete": 1, "message": 1, "truncate": 1}
                assert {op: sum(e["op"] == op for e in receiver.delivered()) for op in expected} == expected
                await wait_until(lambda: _delivered_is(port, expected))
                assert await ops_document(port, "/ready") == (200, {"status": "ready", "postgres": "streaming",
                                                                    "sink": "ok"})
                assert await ops_document(port, "/health") == (200, {"status": "ok"})
                assert (await ops_get(port, "/status")).status == 401
                await wait_until(lambda: _slot_read(port))
                _, status = await ops_document(port, "/status", OPS_TOKEN)
                families = await scrape(port, OPS_TOKEN)
        assert (status["state"], status["sink"], status["slot"], status["publications"]) == (
            "streaming", "http", db, ["pub"])
        assert status["events_delivered"] == 6
        assert lsn(status["confirmed_lsn"]) >= max(lsn(e["commit_lsn"]) for e in receiver.delivered())
        assert lsn(status["received_lsn"]) >= lsn(status["confirmed_lsn"])
        assert (status["failing_since"], status["last_error"]) == (None, None)
        assert status["slot_health"]["wal_status"] in ("reserved", "extended")
        assert status["slot_health"]["retained_wal_bytes"] >= 0
        assert status["events_per_second"] >= 0 and status["lag_seconds"] == 0
        assert metric_value(families, "wal2http_transactions", "wal2http_transactions_total") == 5
        assert metric_value(families, "wal2http_delivery_requests", "wal2http_delivery_requests_total",
                            outcome="ok") == len(receiver.posts()) == 6
        assert metric_value(families, "wal2http_delivery_duration_seconds",
                            "wal2http_delivery_duration_seconds_count") == 6
        assert metric_value(families, "wal2http_commit_to_delivery_seconds",
                            "wal2http_commit_to_delivery_seconds_count") == 5
        assert metric_value(families, "wal2http_up", component="postgres") == 1
        assert metric_value(families, "wal2http_confirmed_lsn") == lsn(status["confirmed_lsn"])
        assert families["wal2http_build_info"].samples[0].labels["server_version"][:2].isdigit()
        assert metric_value(families, "wal2http_slot_retained_wal_bytes") >= 0

    async def test_readiness_follows_the_sink(self, cluster, db):
        await table(cluster, db)
        async with ScriptedReceiver.serve(default=Reply(500, body=b"receiver down")) as receiver:
            config = w.load_config([], ops_env(cluster, db, receiver, on_failure="retry"))[0]
            port = ops_port(config)
            async with service(config):
                assert await ready_is(port, True)
                await sql(cluster, db, "INSERT INTO t VALUES (1, 'a')")
                await wait_until(lambda: ready_is(port, False))
                status_code, ready = await ops_document(port, "/ready")
                assert (status_code, ready["postgres"]) == (503, "streaming")
                assert ready["sink"].startswith("failing since 20")
                _, status = await ops_document(port, "/status")
                assert "HTTP 500" in status["last_error"] and status["failing_since"] is not None
                assert metric_value(await scrape(port), "wal2http_up", component="sink") == 0
                receiver.default = Reply(200)
                await wait_until(lambda: ready_is(port, True))
                _, status = await ops_document(port, "/status")
                families = await scrape(port)
        assert (status["last_error"], status["failing_since"]) == (None, None)
        retried = metric_value(families, "wal2http_delivery_requests", "wal2http_delivery_requests_total",
                               outcome="retried")
        assert retried == len(receiver.posts()) - 1 >= 1
        assert metric_value(families, "wal2http_delivery_requests", "wal2http_delivery_requests_total",
                            outcome="failed") == 0

    async def test_readiness_follows_postgresql(self, own_cluster):
        db = "readiness"
        own_cluster.psql("postgres", f"CREATE DATABASE {db}")
        own_cluster.psql(db, "CREATE PUBLICATION pub FOR ALL TABLES")
        config = w.load_config([], ops_env(own_cluster, db))[0]
        port = ops_port(config)
        async with running(config):
            assert await ready_is(port, True)
            await trio.to_thread.run_sync(own_cluster.stop)
            await wait_until(lambda: ready_is(port, False))
            assert (await ops_document(port, "/ready"))[1]["postgres"] in (
                "reconnecting after an error", "connecting")
            families = await scrape(port)
            assert metric_value(families, "wal2http_up", component="postgres") == 0
            await trio.to_thread.run_sync(own_cluster.start)
            await wait_until(lambda: ready_is(port, True), timeout=60)
            assert metric_value(await scrape(port), "wal2http_reconnects", "wal2http_reconnects_total") >= 1

    async def test_lag_grows_while_the_sink_stalls_and_returns_to_zero(self, cluster, db):
        await table(cluster, db)
        sink = MemorySink()
        sink.gate = trio.Event()
        config = w.load_config([], ops_env(cluster, db))[0]
        port = ops_port(config)
        async with running(config, sink):
            await sql(cluster, db, "INSERT INTO t SELECT g, 'x' FROM generate_series(1, 10) g")
            await wait_until(lambda: _lag(port, lambda bytes_, seconds: bytes_ > 0 and seconds > 0))
            first = await ops_document(port, "/status")
            await sql(cluster, db, "INSERT INTO t VALUES (11, 'more')")
            await wait_until(lambda: _status_grew(port, first[1]))
            families = await scrape(port)
            assert metric_value(families, "wal2http_delivery_requests_in_flight") == 1
            assert metric_value(families, "wal2http_replication_lag_bytes") > 0
            sink.gate.set()
            await sink.wait_for(11)
            await wait_until(lambda: _lag(port, lambda bytes_, seconds: bytes_ == 0 and seconds == 0), timeout=60)
            assert metric_value(await scrape(port), "wal2http_delivery_requests_in_flight") == 0

    async def test_requests_in_flight_with_concurrent_delivery(self, cluster, db):
        """DELIVERY_CONCURRENCY=4 and a sink that holds every request: four are in flight at
        once, which the gauge shows; none once they are let through."""
        await table(cluster, db)
        sink = MemorySink(batch_size=1)
        sink.gate = trio.Event()
        config = w.load_config([], ops_env(cluster, db, delivery_concurrency="4"))[0]
        port = ops_port(config)
        async with running(config, sink):
            await sql(cluster, db, "INSERT INTO t SELECT g, 'x' FROM generate_series(1, 10) g")
            await wait_until(lambda: _in_flight_is(port, 4))
            sink.gate.set()
            await sink.wait_for(10)
            await wait_until(lambda: _in_flight_is(port, 0))

    async def test_hostile_clients_cost_nothing_while_events_flow(self, cluster, db, monkeypatch):
        monkeypatch.setattr(w, "OPS_HEAD_TIMEOUT_S", 1.0)
        await table(cluster, db)
        async with ScriptedReceiver.serve() as receiver:
            config = w.load_config([], ops_env(cluster, db, receiver, http_batch_size=50))[0]
            port = ops_port(config)
            async with service(config), trio.open_nursery() as attackers:
                held: list = []
                attackers.start_soon(_hold_connections, port, 1000, held)
                attackers.start_soon(_send_garbage, port, 50)
                attackers.start_soon(_big_head, port)
                attackers.start_soon(_slowloris, port, 20)
                await wait_until(lambda: len(held) == 1000, timeout=120)  # all tried (the server closes the idle ones)
                for start in range(0, 500, 50):
                    await sql(cluster, db, f"INSERT INTO t SELECT g, 'x' FROM generate_series({start + 1}, {start + 50}) g")
                    await trio.sleep(0.05)
                await receiver.wait_for(lambda r: len(r.delivered()) == 500, timeout=60)
                await wait_until(lambda: _health_ok(port), timeout=20)  # served again as soon as slots free up
                attackers.cancel_scope.cancel()
            assert sorted(e["key"]["id"] for e in receiver.delivered()) == list(range(1, 501))


class TestTapEndToEnd:
    """Clients of a wal2http streaming from the test PostgreSQL."""

    QUERIES = ["", "table=public.a", "table=other.*&table=public.b", "table=public.a%2Cother.c&op=insert",
               "op=update,delete", "op=message", "op=truncate&op=insert"]

    async def test_messages_are_the_stdout_lines_filtered_on_the_server(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE a (id int PRIMARY KEY, v text)", "CREATE TABLE b (id int PRIMARY KEY)",
                  "CREATE SCHEMA other", "CREATE TABLE other.c (k text PRIMARY KEY, n int)")
        out = io.BytesIO()
        config = w.load_config([], ops_env(cluster, db))[0]
        port = ops_port(config)
        received: dict[str, list[str]] = {}
        async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as clients:
            stats, stop = await start_service(nursery, config, w.StdoutSink(out))
            done = {q: trio.Event() for q in self.QUERIES}
            for query in self.QUERIES:
                websocket = await clients.enter_async_context(tap_client(port, query))
                nursery.start_soon(collect_tap, websocket, received.setdefault(query, []), done[query])
            await wait_until(lambda: stats.tap_clients == len(self.QUERIES), timeout=10)
            await sql(cluster, db, "INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 600) g",
                      "INSERT INTO b VALUES (1), (2)", "INSERT INTO other.c VALUES ('x', 1), ('<y>', 2)",
                      "BEGIN; UPDATE a SET v = 'héllo ✓' WHERE id < 3; DELETE FROM b WHERE id = 1; "
                      "SELECT pg_logical_emit_message(true, 'p', 'in a transaction'); "
                      "UPDATE other.c SET n = 3; COMMIT",
                      "SELECT pg_logical_emit_message(false, 'p', 'not transactional')",
                      "TRUNCATE b", "DELETE FROM a WHERE id > 590", "INSERT INTO b VALUES (3)")
            total = 600 + 2 + 2 + 2 + 1 + 1 + 2 + 1 + 1 + 10 + 1
            await wait_until(lambda: out.getvalue().count(b"\n") == total)
            await wait_until(lambda: all(c.unwritten == 0 for c in stats.tap.clients), timeout=10)
            stop.set()  # then each client has all it will get, and its connection closes
            with trio.fail_after(30):
                for event in done.values():
                    await event.wait()
        lines = out.getvalue().decode().splitlines()
        assert len(lines) == total
        events = [json.loads(line) for line in lines]
        assert {e["op"] for e in events} == {"insert", "update", "delete", "truncate", "message"}
        for query in self.QUERIES:
            expected = [line for line, event in zip(lines, events) if tap_selects(query, event)]
            assert expected, query
            assert received[query] == expected, query
        assert len(received["table=public.a"]) == 600 + 2 + 10

    async def test_a_client_that_stops_reading_is_closed_too_slow_and_costs_nothing(self, cluster, db):
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY, pad text)")
        sink = MemorySink()
        config = w.load_config([], ops_env(cluster, db))[0]
        port = ops_port(config)
        rows = 6000  # 12 MB of events: more than the sockets' buffers and 1,000 events
        async with running(config, sink):
            async with tap_client(port, receive_buffer=4096) as slow:
                await wait_until(lambda: _tap_gauge(port, 1))
                await sql(cluster, db, f"INSERT INTO t SELECT g, repeat('x', 2000) FROM generate_series(1, {rows}) g")
                await sink.wait_for(rows, timeout=60)  # delivery never waited for the slow client
                families = await scrape(port)
                assert metric_value(families, "wal2http_tap_clients_closed",
                                    "wal2http_tap_clients_closed_total", reason="too_slow") == 1
                messages, reason = await read_tap(slow, timeout=60)  # reads again: what was queued, then 1013
                await wait_until(lambda: _tap_gauge(port, 0))
        lines = [event.line for event in sink.events]
        assert len(lines) == rows
        assert (reason.code, reason.reason) == (1013, "too slow")
        assert 1000 <= len(messages) < rows  # the 1,000 unwritten when it fell behind, and those before
        assert messages == lines[:len(messages)]  # in stream order, none missing, then the close


async def _tap_gauge(port: int, expected: int) -> bool:
    return metric_value(await scrape(port), "wal2http_tap_clients") == expected


# --- The page in a real browser: headless Chromium driven over the DevTools protocol ---------------

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0")
XSS = "<img src=x onerror=\"document.title='pwned'\">"
VISIBLE_ROWS_JS = ("[...document.querySelectorAll('#rows tr')].filter((row) => !row.hidden)"
                   ".map((row) => [...row.cells].map((cell) => cell.textContent))")
#: Pixels of the chart's fill colour (#90caf9): there only where events/s is above zero.
CHART_FILL_JS = """(() => {
  const canvas = document.getElementById("chart");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let count = 0;
  for (let i = 0; i < data.length; i += 4)
    if (data[i] === 144 && data[i + 1] === 202 && data[i + 2] === 249 && data[i + 3] === 255) count++;
  return count;
})()"""


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium, headless, for the module's tests: (DevTools port, browser path), read from
    DevToolsActivePort in its profile directory."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("Chromium not found: install it (`apt-get install chromium`) or run `bash .ci/run`",
                    pytrace=False)
    profile = tempfile.mkdtemp(prefix="wal2http-test-chromium-")
    with open(os.path.join(profile, "stderr.log"), "wb") as log:
        process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        active = os.path.join(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not (os.path.exists(active) and len(open(active).read().splitlines()) >= 2):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium did not start: {open(os.path.join(profile, 'stderr.log')).read()[-2000:]}",
                            pytrace=False)
            time.sleep(0.05)
        port, path = open(active).read().splitlines()[:2]
        yield int(port), path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


class DevTools:
    """One DevTools protocol connection (a trio-websocket client): commands and their replies, and
    every event kept, by session."""

    def __init__(self, websocket):
        self.websocket = websocket
        self.numbers = itertools.count(1)
        self.replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._changed = trio.Event()

    async def run_reader(self) -> None:
        while True:
            message = json.loads(await self.websocket.get_message())
            if "id" in message:
                self.replies[message["id"]] = message
            else:
                self.events.append(message)
            self._changed.set()
            self._changed = trio.Event()

    async def send(self, method: str, session: str | None = None, **params) -> dict:
        number = next(self.numbers)
        command = {"id": number, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        await self.websocket.send_message(json.dumps(command))
        with trio.fail_after(30):
            while number not in self.replies:
                await self._changed.wait()
        reply = self.replies.pop(number)
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]


@dataclasses.dataclass
class BrowserPage:
    tools: DevTools
    session: str

    async def send(self, method: str, **params) -> dict:
        return await self.tools.send(method, self.session, **params)

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30):
        """Polls `expression` in the page until it is truthy; returns its value."""
        with trio.fail_after(timeout):
            while not (value := await self.evaluate(expression)):
                await trio.sleep(0.05)
        return value

    def events(self, method: str) -> list[dict]:
        return [e["params"] for e in self.tools.events if e.get("sessionId") == self.session and e["method"] == method]

    def errors(self) -> list:
        """What the page reported as errors: console.error, uncaught exceptions, browser log errors
        (CSP violations, failed loads)."""
        return ([e for e in self.events("Runtime.consoleAPICalled") if e["type"] in ("error", "assert")]
                + self.events("Runtime.exceptionThrown")
                + [e for e in self.events("Log.entryAdded") if e["entry"]["level"] == "error"])


@asynccontextmanager
async def browser_page(chromium):
    """A new tab of the test's Chromium, 1200x800, with the Page, Runtime, Log and Network events on."""
    port, path = chromium
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}{path}", max_message_size=2**26) as websocket:
        async with trio.open_nursery() as nursery:
            tools = DevTools(websocket)
            nursery.start_soon(tools.run_reader)
            target = (await tools.send("Target.createTarget", url="about:blank"))["targetId"]
            session = (await tools.send("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
            page = BrowserPage(tools, session)
            for domain in ("Page", "Runtime", "Log", "Network"):
                await page.send(f"{domain}.enable")
            await page.send("Emulation.setDeviceMetricsOverride", width=1200, height=800, deviceScaleFactor=1,
                            mobile=False)
            yield page
            await tools.send("Target.closeTarget", targetId=target)
            nursery.cancel_scope.cancel()


async def set_filter(page: BrowserPage, table: str, op: str) -> list[list[str]]:
    """Types into Table and picks Op as a user would (input and change events); the rows shown."""
    await page.evaluate(f"""(() => {{
      const table = document.getElementById("table"), op = document.getElementById("op");
      table.value = {json.dumps(table)}; table.dispatchEvent(new Event("input"));
      op.value = {json.dumps(op)}; op.dispatchEvent(new Event("change"));
    }})()""")
    return await page.evaluate(VISIBLE_ROWS_JS)


class TestPageInBrowser:
    async def test_the_page_shows_the_stream(self, cluster, db, chromium):
        await sql(cluster, db, "CREATE TABLE orders (id int PRIMARY KEY, note text)",
                  "CREATE TABLE items (id int PRIMARY KEY)", "CREATE TABLE notes (k text PRIMARY KEY)")
        config = w.load_config([], ops_env(cluster, db, ops_token=OPS_TOKEN))[0]
        port = ops_port(config)
        origin = f"http://127.0.0.1:{port}"
        async with running(config) as (sink, _ack), browser_page(chromium) as page:
            url = f"{origin}/?token={OPS_TOKEN}"
            await page.send("Page.navigate", url=url)
            await page.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")
            await page.wait_for("document.getElementById('tap').textContent === 'connected'")
            await page.wait_for("document.getElementById('state').textContent === 'streaming'")
            assert await page.evaluate("document.querySelectorAll('#rows tr').length") == 0
            # Changes made in PostgreSQL after the page loaded appear in it, newest first
            await sql(cluster, db, "INSERT INTO orders VALUES (1, 'first'), (2, 'second')",
                      "UPDATE orders SET note = 'changed' WHERE id = 1", "INSERT INTO items VALUES (7)",
                      "DELETE FROM orders WHERE id = 2", f"INSERT INTO notes VALUES ({w.quote_literal(XSS)})")
            await sink.wait_for(6)
            await page.wait_for("document.querySelectorAll('#rows tr').length === 6")
            rows = await page.evaluate(VISIBLE_ROWS_JS)
            assert [row[1:] for row in rows] == [
                [e["op"], f"{e['schema']}.{e['table']}", json.dumps(e["key"], separators=(",", ":")), e["id"]]
                for e in reversed(sink.events)]
            assert [row[2] for row in rows] == ["public.notes", "public.orders", "public.items", "public.orders",
                                                "public.orders", "public.orders"]
            assert all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d\d", row[0]) for row in rows)
            # The hostile value is text: shown as it is, never markup, never run
            assert rows[0][3] == json.dumps({"k": XSS}, separators=(",", ":"))
            assert await page.evaluate("document.querySelectorAll('#rows img, #detail img').length") == 0
            await page.evaluate("document.querySelector('#rows tr').click()")
            assert await page.evaluate("document.getElementById('detail').textContent") == sink.events[-1].line
            assert await page.evaluate("document.title") == "wal2http live tap"
            # Table and Op narrow the rows already shown
            assert [r[2] for r in await set_filter(page, "public.orders", "")] == ["public.orders"] * 4
            assert [r[1:3] for r in await set_filter(page, "public.orders", "insert")] == [["insert", "public.orders"]] * 2
            assert [r[2] for r in await set_filter(page, " public.* ", "insert")] == [
                "public.notes", "public.items", "public.orders", "public.orders"]
            assert [r[1] for r in await set_filter(page, "public.items, public.orders", "delete")] == ["delete"]
            assert len(await set_filter(page, "", "")) == 6
            # Pause holds new rows; resume shows them
            await page.evaluate("document.getElementById('pause').click()")
            await sql(cluster, db, "INSERT INTO items SELECT g FROM generate_series(10, 12) g")
            await page.wait_for("document.getElementById('waiting').textContent === '3 waiting'")
            assert await page.evaluate("document.querySelectorAll('#rows tr').length") == 6
            assert await page.evaluate("document.getElementById('pause').textContent") == "Resume"
            await page.evaluate("document.getElementById('pause').click()")
            await page.wait_for("document.querySelectorAll('#rows tr').length === 9")
            assert [r[3] for r in (await page.evaluate(VISIBLE_ROWS_JS))[:3]] == ['{"id":12}', '{"id":11}', '{"id":10}']
            # The chart draws events/s; the status bar shows the sink and the slot
            assert await page.wait_for(CHART_FILL_JS) > 0
            await page.wait_for("document.getElementById('slot').textContent.startsWith('reserved')")
            assert await page.evaluate("document.getElementById('sink').textContent") == "ok"
            if os.environ.get("LIVE_TAP_SCREENSHOT"):  # the README's picture: LIVE_TAP_SCREENSHOT=live-tap.png
                height = await page.evaluate("Math.ceil(document.querySelector('main').getBoundingClientRect().bottom)")
                shot = await page.send("Page.captureScreenshot", format="png",
                                       clip={"x": 0, "y": 0, "width": 1200, "height": height, "scale": 1})
                with open(os.environ["LIVE_TAP_SCREENSHOT"], "wb") as out:
                    out.write(base64.b64decode(shot["data"]))
            errors = page.errors()
            requests = [e["request"]["url"] for e in page.events("Network.requestWillBeSent")]
            sockets = [e["url"] for e in page.events("Network.webSocketCreated")]
            # Defence in depth: markup put in on purpose still loads and runs nothing (the policy)
            violated = await page.evaluate(f"""new Promise((resolve) => {{
              const seen = [];
              document.addEventListener("securitypolicyviolation", (event) => {{
                seen.push(event.effectiveDirective);
                if (seen.includes("script-src-attr")) resolve(seen);
              }});
              document.getElementById("detail").innerHTML = {json.dumps(XSS.replace("src=x", "src=data:,x"))};
            }})""")
            assert await page.evaluate("document.title") == "wal2http live tap"
        assert violated == ["script-src-attr"]
        assert errors == []
        assert f"{origin}/?token={OPS_TOKEN}" in requests and f"{origin}/status?token={OPS_TOKEN}" in requests
        assert all(url.startswith(f"{origin}/") or url.startswith("data:") for url in requests), requests
        assert sockets == [f"ws://127.0.0.1:{port}/events?token={OPS_TOKEN}"]


# ----- Backfill end to end
# Rows that exist before wal2http starts, sent as `read` events while streaming goes on: every
# trigger (BACKFILL_TABLES, BACKFILL_ON_CREATE, the in-database signal, POST /backfill), the fields
# and types of read events (against the insert events of the same rows), the consistency property
# under a concurrent writer (fold every event per key; the result is the table), resume from
# STATE_FILE after kill -9, the refusals, publication row filters and column lists, keys that are
# not a one-column primary key, TOAST, and the memory bound.

BF_SIGNAL = "wal2http.backfill"  #: the prefix of the in-database signal (never delivered)
BF_WATERMARK = "wal2http.watermark"  #: the prefix of the chunks' watermarks (never delivered)
BF_READ_ID = re.compile(r"([0-9A-F]+/[0-9A-F]+):r(\d+)")


def bf_reads(events, table: str | None = None) -> list[dict]:
    """The read events (of `table` when given), in stream order."""
    return [e for e in events if e["op"] == "read" and table in (None, e["table"])]


def bf_key(values: dict) -> tuple:
    return tuple(sorted(values.items()))


def bf_fold(events, table: str) -> dict[tuple, dict]:
    """What a receiver applying the events of `table` in order holds, by key: read, insert and
    update set the row (an update that changed the key removes the old one), delete removes it,
    truncate empties the table."""
    rows: dict[tuple, dict] = {}
    for event in events:
        if event.get("table") != table:
            continue
        if event["op"] == "truncate":
            rows.clear()
        elif event["op"] == "delete":
            rows.pop(bf_key(event["key"]), None)
        elif event["op"] in ("read", "insert", "update"):
            if event["op"] == "update" and event["old"] is not None:
                rows.pop(bf_key({name: event["old"][name] for name in event["key"]}), None)
            rows[bf_key(event["key"])] = event["new"]
    return rows


def bf_differences(folded: dict, rows: dict, events, table: str) -> str:
    """Where a fold and the table differ (up to 5 keys): each side, and the key's events."""
    keys = sorted(set(folded) ^ set(rows) | {k for k in set(folded) & set(rows) if folded[k] != rows[k]})
    lines = []
    for key in keys[:5]:
        history = [(e["op"], e["id"], e.get("new"), e.get("old")) for e in events if e.get("table") == table
                   and key in {bf_key(e["key"] or {}), bf_key({k: (e["old"] or {}).get(k) for k, _ in key})}]
        lines.append(f"{key}: table {rows.get(key)}, fold {folded.get(key)}, events {history}")
    return f"{len(keys)} keys differ\n" + "\n".join(lines)


async def bf_table_rows(cluster, db, name: str, key=("id",)) -> dict[tuple, dict]:
    """The table's rows as JSON (row_to_json: ints and text as the events carry them), by key."""
    rows = [json.loads(text) for (text,) in await sql(cluster, db, f"SELECT row_to_json(r)::text FROM {name} r")]
    return {bf_key({column: row[column] for column in key}): row for row in rows}


async def bf_caught_up(cluster, db, observed, tag: str, events_of=lambda o: o.events) -> None:
    """Emits a message after everything committed so far and waits until `observed` (a sink, a
    CliProcess, a receiver with `events_of`) has it: the stream has caught up with what came before."""
    await sql(cluster, db, f"SELECT pg_logical_emit_message(true, 'bf.sentinel', {w.quote_literal(tag)})")
    await Observed.wait_for(observed, lambda o: any(
        e["op"] == "message" and e.get("prefix") == "bf.sentinel" and e.get("content") == tag
        for e in events_of(o)), timeout=30)


def bf_assert_no_internal_messages(events) -> None:
    """Neither the signal nor a watermark is ever delivered."""
    leaked = [e for e in events if e["op"] == "message" and e["prefix"] in (BF_SIGNAL, BF_WATERMARK)]
    assert leaked == []


def bf_assert_read_fields(event: dict) -> None:
    assert list(event) == EVENT_KEYS
    assert event["op"] == "read"
    assert (event["old"], event["unchanged_toast"]) == (None, [])
    assert (event["xid"], event["commit_lsn"], event["commit_time"], event["seq"]) == (None, None, None, None)
    found = BF_READ_ID.fullmatch(event["id"])
    assert found and found.group(1) == event["lsn"], event["id"]


def bf_chunks(events, reads) -> list[list[int]]:
    """The chunks of `reads` (grouped by their high watermark's position, in stream order) as the
    positions n of their ids; checks that each chunk's events are consecutive in `events`, of
    one table, and that the chunks' positions go up."""
    chunks: dict[str, list[dict]] = {}
    for read in reads:
        chunks.setdefault(read["lsn"], []).append(read)
    positions = [lsn(position) for position in chunks]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    index = {id(event): number for number, event in enumerate(events)}
    for chunk in chunks.values():
        places = [index[id(read)] for read in chunk]
        assert places == list(range(places[0], places[0] + len(places))), "a chunk's reads are not consecutive"
        assert len({read["table"] for read in chunk}) == 1
    return [[int(BF_READ_ID.fullmatch(read["id"]).group(2)) for read in chunk] for chunk in chunks.values()]


async def bf_progress(port: int, token: str | None = None) -> tuple[float, float]:
    """(wal2http_backfill_rows_total, wal2http_backfill_tables_remaining) from /metrics."""
    families = await scrape(port, token)
    return (metric_value(families, "wal2http_backfill_rows", "wal2http_backfill_rows_total"),
            metric_value(families, "wal2http_backfill_tables_remaining"))


async def bf_finished(port: int, token: str | None = None) -> bool:
    """Rows were sent and no table is left (False while the port does not answer yet)."""
    try:
        rows, remaining = await bf_progress(port, token)
    except w.DeliveryError:
        return False
    return rows > 0 and remaining == 0


async def bf_remaining_is(port: int, expected: int, token: str | None = None) -> bool:
    return (await bf_progress(port, token))[1] == expected


async def bf_post(port: int, body, token: str | None = OPS_TOKEN) -> w.HttpResponse:
    """POST /backfill with `body` (bytes as they are, anything else as JSON)."""
    headers = [("Content-Type", "application/json")]
    headers += [("Authorization", f"Bearer {token}")] if token else []
    client = w.HttpClient(f"http://127.0.0.1:{port}/", timeout_s=10, headers=headers)
    try:
        return await client.request("POST", "/backfill",
                                    body=body if isinstance(body, bytes) else json.dumps(body).encode())
    finally:
        await client.aclose()


def bf_numbers(path) -> set[int]:
    """Every whole number written in the JSON state file (values, keys, digits inside strings);
    empty while there is no file."""
    try:
        with open(path) as file:
            document = json.load(file)
    except FileNotFoundError:
        return set()
    found: set[int] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(name)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, bool) or value is None:
            return
        elif isinstance(value, int):
            found.add(value)
        else:
            found.update(int(digits) for digits in re.findall(r"\d+", str(value)))

    walk(document)
    return found


def bf_cursor(path, chunk_ends: set[int]) -> int | None:
    """The last key of the last chunk the state file records as done (keys are chosen so that no
    count or position can be mistaken for one), or None."""
    recorded = bf_numbers(path) & chunk_ends
    return max(recorded) if recorded else None


def bf_peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1))


def bf_last_read_key(events) -> int:
    """The key of the latest read event among the last 500 events (0 when none): where the
    backfill is."""
    for event in reversed(events[-500:]):
        if event["op"] == "read":
            return event["key"]["id"]
    return 0


async def bf_write_concurrently(cluster, db, rng: random.Random, stop: trio.Event, done: trio.Event,
                                touched: set[int], commits: list[int], events: list[dict]) -> None:
    """Small transactions on table t until `stop`: inserts (upserts) of odd and new keys, updates,
    deletes and key changes of rows, most just ahead of the backfill's latest read (`events`: the
    sink's), where they fall between a chunk's watermarks; `touched` gets every key named."""
    info = w.parse_database_url(cluster.url(db), {})
    fresh = itertools.count(100_000, 2)  # even: never an upsert's odd key
    async with w.open_pg_connection(info, replication=False) as conn:
        while not stop.is_set():
            statements = []
            for _ in range(rng.randint(1, 3)):
                ahead = bf_last_read_key(events)
                kind = rng.random()
                row = rng.randint(ahead + 1, ahead + 200) if rng.random() < 0.7 else rng.randint(1, 6100)
                touched.add(row)
                if kind < 0.25:
                    statements.append(f"INSERT INTO t VALUES ({row | 1}, 0, 'inserted') "
                                      "ON CONFLICT (id) DO UPDATE SET n = t.n + 1, v = 'upserted'")
                    touched.add(row | 1)
                elif kind < 0.6:
                    statements.append(f"UPDATE t SET n = n + 1, v = 'updated' WHERE id = {row}")
                elif kind < 0.85:
                    statements.append(f"DELETE FROM t WHERE id = {row}")
                else:
                    new_key = next(fresh)
                    touched.add(new_key)
                    statements.append(f"UPDATE t SET id = {new_key} WHERE id = {row}")
            await conn.simple_query(in_own_transactions([" ; ".join(statements)]))
            commits.append(len(statements))
            await trio.sleep(0.002)  # a steady writer, not a flood that starves the two shared cores
    done.set()


class TestBackfillEndToEnd:
    """Backfills against the real PostgreSQL of each version (and 13 for the refusal)."""

    @pytest.fixture(autouse=True)
    def _drop_slots_afterwards(self, request):
        pairs = [(request.getfixturevalue(name), request.getfixturevalue(database))
                 for name, database in (("cluster", "db"), ("old_cluster", "old_db"))
                 if database in request.fixturenames]
        yield
        for cluster, db in pairs:
            drop_inactive_slots(cluster, db)

    class Cli(CliProcess):
        """A CliProcess whose stdout reader stops after `pause_after` lines until `resume` is set
        (the pipe fills up and wal2http blocks writing), then reads on to the end (`eof`); with
        `count_only` it counts the lines and keeps the first and the last, so 200,000 events are
        not held by the test."""

        def __init__(self, env, pause_after: int | None = None, count_only: bool = False):
            super().__init__(env, pause_after=pause_after)
            self.resume = trio.Event()
            self.count_only = count_only
            self.count = 0
            self.first = self.last = b""
            self.eof = False

        async def _read_stdout(self):
            pending = b""
            async for data in self.process.stdout:
                pending += data
                *lines, pending = pending.split(b"\n")
                self.count += len(lines)
                if self.count_only:
                    if lines:
                        self.first, self.last = self.first or lines[0], lines[-1]
                else:
                    self.lines.extend(lines)
                    self.events.extend(json.loads(line) for line in lines)
                self._notify()
                if self.pause_after is not None and self.count >= self.pause_after:
                    await self.resume.wait()
            self.eof = True
            self._changed.set()

    # -- settings -----------------------------------------------------------------------------------

    def test_settings_defaults_and_errors(self):
        config = load()
        assert (config.backfill_on_create, config.backfill_chunk_rows, config.state_file) == (
            False, 10_000, "wal2http-state.json")
        assert not config.backfill_tables
        config = load({"BACKFILL_TABLES": "public.t,other.*", "BACKFILL_ON_CREATE": "true",
                       "BACKFILL_CHUNK_ROWS": "1", "STATE_FILE": "/var/lib/wal2http/state.json"})
        assert (config.backfill_on_create, config.backfill_chunk_rows, config.state_file) == (
            True, 1, "/var/lib/wal2http/state.json")
        assert config.backfill_tables == ("public.t", "other.*")
        config = load(argv=["--backfill-chunk-rows", "50", "--state-file", "s.json"], env={"BACKFILL_CHUNK_ROWS": "7"})
        assert (config.backfill_chunk_rows, config.state_file) == (50, "s.json")  # a flag wins
        for variable, value in (("BACKFILL_CHUNK_ROWS", "0"), ("BACKFILL_CHUNK_ROWS", "-5"),
                                ("BACKFILL_CHUNK_ROWS", "ten"), ("BACKFILL_ON_CREATE", "maybe")):
            assert variable in config_error({variable: value})

    # -- read events: fields, types, chunks ---------------------------------------------------------

    TYPES_DDL = (
        "CREATE TYPE bf_mood AS ENUM ('sad', 'ok', 'happy')",
        "CREATE DOMAIN bf_positive AS int CHECK (VALUE > 0)",
        "CREATE TYPE bf_pair AS (a int, b text)",
        "CREATE TABLE ty (id int PRIMARY KEY, i2 int2, i8 int8, o oid, num numeric(12,4), nnan numeric, f4 float4, "
        "f8 float8, b bool, tx text, vc varchar(20), ch char(4), nm name, u uuid, j json, jb jsonb, d date, "
        "ts timestamp, tstz timestamptz, tm time, tmtz timetz, iv interval, ba bytea, ia int[], ta text[], "
        "m2 int[], tsa timestamptz[], mood bf_mood, pos bf_positive, ip inet, mo money, r int4range, pt point, "
        "pair bf_pair, bits bit varying(8))",
    )
    TYPES_ROWS = (
        r"""INSERT INTO ty VALUES (1, 32767, 9007199254740993, 4294967295, 12345678.9012, 19.90, 1.5, 0.1, true,
            'hello', 'vc', 'ab', 'nm', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2.50, null]}',
            '{"b": {"c": true}}', '2026-11-27', '2026-11-27 16:25:11.123456', '2026-11-27 16:25:11.5+02',
            '16:25:11', '16:25:11+02', '1 day 02:03:04', '\x00ff10', '{1,2,3}', '{"a","b c",NULL}',
            '{{1,2},{3,4}}', '{"2026-01-01 00:00:00+00"}', 'happy', 7, '192.168.0.1/24', 12.34, '[1,10)',
            '(1.5,2)', '(1,"x y")', B'1010')""",
        r"""INSERT INTO ty VALUES (2, -32768, -9223372036854775808, 0, -0.0001, 'NaN', 'NaN', '-Infinity', false,
            '', '', '', '', '00000000-0000-0000-0000-000000000000', 'null', '[]', 'infinity', '-infinity',
            'infinity', '00:00:00', '00:00:00+00', '-1 mons', '\x', '{}', '{NULL}', '{{NULL,1},{2,NULL}}', '{}',
            'sad', 1, '::1', -1, 'empty', '(0,0)', '(,)', B'')""",
        "INSERT INTO ty (id) VALUES (3)",
        r"""INSERT INTO ty (id, tx, jb, ts, tstz, ta, ba, f4, f8) VALUES (-4, 'héllo ✓ "quoted" \ back',
            '{"ü": "日本", "n": 1e3, "deep": [{"x": null}]}', '2026-11-27 16:25:11', '1999-12-31 23:59:59.999999+00',
            '{"with,comma","with\"quote","{braces}"}', '\xdeadbeef', 'Infinity', 1e-300)""",
    )

    async def test_read_events_are_typed_like_the_inserts_of_the_same_rows(self, cluster, db, tmp_path):
        await sql(cluster, db, *self.TYPES_DDL)
        async with reference(cluster, db) as ref:
            await sql(cluster, db, *self.TYPES_ROWS)
            inserts = await ref.wait_for(4)
        await sql(cluster, db, f"SELECT pg_create_logical_replication_slot('{db}_td', 'test_decoding')")
        config = make_config(cluster, db, backfill_tables="public.ty", backfill_chunk_rows=3,
                             state_file=str(tmp_path / "state.json"))
        async with running(config) as (sink, _ack):
            await Observed.wait_for(sink, lambda s: len(bf_reads(s.events)) >= 4, timeout=30)
            await bf_caught_up(cluster, db, sink, "types")
        reads = bf_reads(sink.events)
        assert [read["key"] for read in reads] == [{"id": -4}, {"id": 1}, {"id": 2}, {"id": 3}]  # key order
        by_key = {bf_key(insert["key"]): insert for insert in inserts}
        for read in reads:
            bf_assert_read_fields(read)
            insert = by_key[bf_key(read["key"])]
            assert (read["schema"], read["table"]) == ("public", "ty")
            assert read["new"] == insert["new"], read["key"]
            assert list(read["new"]) == list(insert["new"])
            assert read["key"] == insert["key"]
        assert bf_chunks(sink.events, reads) == [[0, 1, 2], [0]]
        bf_assert_no_internal_messages(sink.events)
        # each chunk's lsn is the position of its high watermark, after a low one
        rows = await sql(cluster, db, f"SELECT lsn, data FROM pg_logical_slot_peek_changes('{db}_td', NULL, NULL)")
        marks = sorted(lsn(position) for position, data in rows
                       if data.startswith(f"message: transactional: 0 prefix: {BF_WATERMARK},"))
        for position in {lsn(read["lsn"]) for read in reads}:
            assert position in marks and marks[0] < position

    # -- triggers -----------------------------------------------------------------------------------

    async def test_backfill_tables_at_start_up_names_published_tables(self, cluster, db, tmp_path):
        """`schema.table`, `schema.*` and `*` (of the publication's tables only), one run each."""
        await sql(cluster, db, "CREATE SCHEMA other", "CREATE TABLE a (id int PRIMARY KEY)",
                  "CREATE TABLE b (id int PRIMARY KEY)", "CREATE TABLE other.c (id int PRIMARY KEY)",
                  "CREATE TABLE other.d (id int PRIMARY KEY)", "INSERT INTO a SELECT generate_series(1, 3)",
                  "INSERT INTO b SELECT generate_series(1, 2)", "INSERT INTO other.c SELECT generate_series(1, 4)",
                  "INSERT INTO other.d VALUES (1)", "CREATE PUBLICATION bf_some FOR TABLE a, other.c, other.d")
        cases = [("public.a", {"public.a": 3}), ("other.*", {"other.c": 4, "other.d": 1}),
                 ("*", {"public.a": 3, "other.c": 4, "other.d": 1}), ("public.*,other.c", {"public.a": 3, "other.c": 4})]
        for number, (tables, expected) in enumerate(cases):
            config = make_config(cluster, db, pub_name="bf_some", backfill_tables=tables,
                                 state_file=str(tmp_path / f"state{number}.json"))
            async with running(config) as (sink, _ack):
                await Observed.wait_for(sink, lambda s: len(bf_reads(s.events)) >= sum(expected.values()), timeout=30)
                await bf_caught_up(cluster, db, sink, tables)
            found: dict[str, list[int]] = {}
            for read in bf_reads(sink.events):
                found.setdefault(f"{read['schema']}.{read['table']}", []).append(read["key"]["id"])
            assert found == {name: list(range(1, count + 1)) for name, count in expected.items()}, tables
            bf_assert_no_internal_messages(sink.events)

    async def test_backfill_on_create_when_wal2http_creates_the_slot(self, cluster, db, tmp_path):
        await sql(cluster, db, "CREATE TABLE a (id int PRIMARY KEY, v text)", "CREATE TABLE b (id int PRIMARY KEY, v text)",
                  "INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 40) g",
                  "INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 25) g")
        config = w.load_config([], ops_env(cluster, db, backfill_on_create="true", backfill_chunk_rows=7,
                                           state_file=str(tmp_path / "state.json")))[0]
        port = ops_port(config)
        async with running(config) as (sink, _ack):
            await sql(cluster, db, "UPDATE a SET v = 'changed' WHERE id IN (3, 33)", "DELETE FROM b WHERE id = 20",
                      "INSERT INTO a VALUES (41, 'new')", "UPDATE b SET id = 100 WHERE id = 1")
            await wait_until(lambda: bf_finished(port), timeout=60)
            await bf_caught_up(cluster, db, sink, "created")
            _, status = await ops_document(port, "/status")
            progress = await bf_progress(port)
        assert progress == (len(bf_reads(sink.events)), 0)
        assert "public.a" in json.dumps(status["backfill"]) and "public.b" in json.dumps(status["backfill"])
        for name, count, touched in (("a", 40, {3, 33}), ("b", 25, {1, 20})):
            assert bf_fold(sink.events, name) == await bf_table_rows(cluster, db, name)
            read_ids = {read["key"]["id"] for read in bf_reads(sink.events, name)}
            assert set(range(1, count + 1)) - touched <= read_ids
        bf_assert_no_internal_messages(sink.events)
        # the slot exists now: a new start (even with a fresh state file) backfills nothing
        config = w.load_config([], ops_env(cluster, db, backfill_on_create="true",
                                           state_file=str(tmp_path / "second.json")))[0]
        port = ops_port(config)
        async with running(config) as (sink, _ack):
            await bf_caught_up(cluster, db, sink, "existing slot")
            _, status = await ops_document(port, "/status")
            progress = await bf_progress(port)
        assert (bf_reads(sink.events), status["backfill"], progress) == ([], None, (0, 0))

    async def test_signal_through_the_database(self, cluster, db, tmp_path):
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY, v text)", "CREATE TABLE u (id int PRIMARY KEY, v text)",
                  "INSERT INTO t SELECT g, 't' FROM generate_series(1, 10) g",
                  "INSERT INTO u SELECT g, 'u' FROM generate_series(1, 5) g")
        config = make_config(cluster, db, backfill_chunk_rows=3, state_file=str(tmp_path / "state.json"))
        async with running(config) as (sink, _ack):
            await sql(cluster, db, f"BEGIN; SELECT pg_logical_emit_message(true, '{BF_SIGNAL}', 'public.u'); ROLLBACK",
                      "SELECT pg_logical_emit_message(true, 'app', 'delivered')",
                      f"SELECT pg_logical_emit_message(true, '{BF_SIGNAL}', 'public.t')")
            await Observed.wait_for(sink, lambda s: len(bf_reads(s.events)) >= 10, timeout=30)
            await bf_caught_up(cluster, db, sink, "first")
            first = len(sink.events)
            # t is done now; a signal always starts a new backfill of what it names
            await sql(cluster, db, f"SELECT pg_logical_emit_message(true, '{BF_SIGNAL}', 'public.*')")
            await Observed.wait_for(sink, lambda s: len(bf_reads(s.events)) >= 25, timeout=30)
            await bf_caught_up(cluster, db, sink, "second")
        before, after = sink.events[:first], sink.events[first:]
        assert [read["key"]["id"] for read in bf_reads(before)] == list(range(1, 11))
        assert {read["table"] for read in bf_reads(before)} == {"t"}
        assert [(e["prefix"], e["content"]) for e in before if e["op"] == "message"] == [
            ("app", "delivered"), ("bf.sentinel", "first")]
        assert sorted(read["key"]["id"] for read in bf_reads(after, "t")) == list(range(1, 11))
        assert sorted(read["key"]["id"] for read in bf_reads(after, "u")) == list(range(1, 6))
        bf_assert_no_internal_messages(sink.events)

    async def test_post_backfill_starts_a_table_once_and_shows_progress(self, cluster, db, tmp_path):
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY, v text)",
                  "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 200) g")
        config = w.load_config([], ops_env(cluster, db, ops_token=OPS_TOKEN, backfill_chunk_rows=10,
                                           state_file=str(tmp_path / "state.json")))[0]
        port = ops_port(config)
        sink = MemorySink()
        sink.gate = trio.Event()
        async with running(config, sink):
            assert (await ops_document(port, "/status", OPS_TOKEN))[1]["backfill"] is None
            assert (await bf_post(port, {"tables": ["public.t"]}, token="wrong")).status == 401
            assert (await bf_post(port, {"tables": ["public.t"]}, token=None)).status == 401
            for body in (b"not json", b"[1, 2]", {"tables": [42]}):
                assert 400 <= (await bf_post(port, body)).status < 500, body
            assert await bf_progress(port, OPS_TOKEN) == (0, 0)  # none of those started anything
            answer = await bf_post(port, {"tables": ["public.t"]})
            assert answer.status == 202
            assert isinstance(ops_json(answer), dict)
            await wait_until(lambda: bf_remaining_is(port, 1, OPS_TOKEN))
            # running (its chunks wait on the held sink): asked again, it is not started twice
            again = await bf_post(port, {"tables": ["public.t"]})
            assert again.status == 202
            assert (await bf_progress(port, OPS_TOKEN))[1] == 1
            assert (await ops_document(port, "/status", OPS_TOKEN))[1]["backfill"] is not None
            sink.gate.set()
            await wait_until(lambda: bf_finished(port, OPS_TOKEN), timeout=60)
            await bf_caught_up(cluster, db, sink, "posted")
            _, status = await ops_document(port, "/status", OPS_TOKEN)
            progress = await bf_progress(port, OPS_TOKEN)
        assert [read["key"]["id"] for read in bf_reads(sink.events, "t")] == list(range(1, 201))
        assert progress == (200, 0)
        assert "public.t" in json.dumps(status["backfill"]) or '"t"' in json.dumps(status["backfill"])
        bf_assert_no_internal_messages(sink.events)

    async def test_post_backfill_is_refused_without_an_ops_token(self, cluster, db, tmp_path):
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1), (2)")
        config = w.load_config([], ops_env(cluster, db, state_file=str(tmp_path / "state.json")))[0]
        port = ops_port(config)
        async with running(config) as (sink, _ack):
            assert (await bf_post(port, {"tables": ["public.t"]}, token=None)).status == 403
            await bf_caught_up(cluster, db, sink, "refused")
            progress = await bf_progress(port)
        assert (bf_reads(sink.events), progress) == ([], (0, 0))

    # -- consistency ---------------------------------------------------------------------------------

    @pytest.mark.timeout(240)
    async def test_a_concurrent_writer_never_makes_the_receiver_wrong(self, cluster, db, tmp_path):
        """3,000 rows in chunks of 50 while a writer inserts, updates, deletes and changes keys:
        folding every event per key gives exactly the table, and every row nobody touched was read."""
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL, v text)",
                  "INSERT INTO t SELECT 2 * g, 0, 'original' FROM generate_series(1, 3000) g")
        await create_slot(cluster, db)
        config = w.load_config([], ops_env(cluster, db, backfill_tables="public.t", backfill_chunk_rows=50,
                                           state_file=str(tmp_path / "state.json")))[0]
        port = ops_port(config)
        stop, written, touched, commits = trio.Event(), trio.Event(), set(), []
        rng = random.Random(f"backfill {cluster.major}")
        async with running(config) as (sink, _ack), trio.open_nursery() as nursery:
            nursery.start_soon(bf_write_concurrently, cluster, db, rng, stop, written, touched, commits, sink.events)
            await wait_until(lambda: bf_finished(port), timeout=180)
            stop.set()
            await written.wait()
            await bf_caught_up(cluster, db, sink, "writer stopped")
        events = sink.events
        folded, rows = bf_fold(events, "t"), await bf_table_rows(cluster, db, "t")
        assert folded == rows, bf_differences(folded, rows, events, "t")
        reads = bf_reads(events, "t")
        read_ids = [read["key"]["id"] for read in reads]
        assert read_ids == sorted(set(read_ids))  # key order, each key read once
        assert {2 * g for g in range(1, 3001)} - touched <= set(read_ids)
        assert all(len(chunk) <= 50 for chunk in bf_chunks(events, reads))
        first, last = events.index(reads[0]), events.index(reads[-1])
        changes = [e for e in events[first:last] if e["op"] != "read" and e.get("table") == "t"]
        assert len(changes) >= 20, "the writer did not run during the backfill"
        bf_assert_no_internal_messages(events)

    @pytest.mark.timeout(240)
    async def test_the_receiver_is_right_with_concurrent_delivery_too(self, cluster, db, tmp_path):
        """DELIVERY_CONCURRENCY=4 to a receiver that answers after varied delays: events of
        different rows arrive out of order, a row's own events never do, so folding them in the
        order the receiver got them still gives the table."""
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL, v text)",
                  "INSERT INTO t SELECT 2 * g, 0, 'original' FROM generate_series(1, 1000) g")
        await create_slot(cluster, db)
        rng = random.Random(f"concurrent delivery {cluster.major}")
        replies = [Reply(200, delay_s=rng.choice([0, 0, 0.005, 0.02])) for _ in range(5000)]
        async with ScriptedReceiver.serve(replies) as receiver:
            config = w.load_config([], ops_env(cluster, db, receiver, delivery_concurrency=4, http_batch_size=10,
                                               backfill_tables="public.t", backfill_chunk_rows=25,
                                               state_file=str(tmp_path / "state.json")))[0]
            port = ops_port(config)
            stop, written, touched, commits = trio.Event(), trio.Event(), set(), []
            async with service(config), trio.open_nursery() as nursery:
                seen: list[dict] = []
                nursery.start_soon(bf_write_concurrently, cluster, db, rng, stop, written, touched, commits, seen)
                with trio.fail_after(180):
                    while not await bf_finished(port):
                        seen[:] = receiver.delivered()[-500:]  # where the backfill is, for the writer
                        await trio.sleep(0.02)
                stop.set()
                await written.wait()
                await bf_caught_up(cluster, db, receiver, "delivered", lambda r: r.delivered())
        events = receiver.delivered()
        folded, rows = bf_fold(events, "t"), await bf_table_rows(cluster, db, "t")
        assert folded == rows, bf_differences(folded, rows, events, "t")
        assert {2 * g for g in range(1, 1001)} - touched <= {read["key"]["id"] for read in bf_reads(events, "t")}
        assert len(commits) >= 20
        positions = [(lsn(e["commit_lsn"] or e["lsn"]), e["seq"] if e["seq"] is not None else int(e["id"].split(":r")[1]))
                     for e in events]
        assert positions != sorted(positions), "no requests overlapped"
        bf_assert_no_internal_messages(events)

    # -- resume ---------------------------------------------------------------------------------------

    @pytest.mark.timeout(240)
    async def test_kill_9_resumes_after_the_last_acknowledged_chunk(self, cluster, db, tmp_path):
        """Run 1 is killed mid-backfill; run 2 (same STATE_FILE) sends only the rows after the
        recorded chunk; run 3 finds the table done; run 4, without the file, starts over."""
        ids = [10 * g + 7 for g in range(1, 3001)]  # a chunk of 100 ends at 1007, 2007, ...: not a count
        chunk_ends = set(ids[99::100])
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY, v text)",
                  "INSERT INTO t SELECT 10 * g + 7, repeat('r', 100) FROM generate_series(1, 3000) g")
        state = tmp_path / "state.json"
        env = ops_env(cluster, db, backfill_tables="public.t", backfill_chunk_rows=100, state_file=str(state))
        port = int(env["OPS_ADDR"].rsplit(":", 1)[1])
        first = self.Cli(env, pause_after=600)
        async with first.running():
            await wait_until(lambda: bf_cursor(state, chunk_ends), timeout=60)
            first.process.kill()  # SIGKILL
            assert await first.wait_exit(timeout=10) == -signal.SIGKILL
            first.resume.set()
            await first.wait_for(lambda p: p.eof, timeout=10)
        cursor = bf_cursor(state, chunk_ends)  # what the file holds after the kill
        assert cursor < ids[-1]
        run1 = [read["key"]["id"] for read in bf_reads(first.events)]
        assert {key for key in ids if key <= cursor} <= set(run1)  # acknowledged chunks were delivered

        second = self.Cli(env)
        async with second.running():
            await wait_until(lambda: bf_finished(port), timeout=120)
            await bf_caught_up(cluster, db, second, "second")
        run2 = [read["key"]["id"] for read in bf_reads(second.events)]
        assert run2 == [key for key in ids if key > cursor]  # resumed after the chunk, nothing twice
        assert len(run2) < len(ids)
        assert set(run1) | set(run2) == set(ids)

        third = self.Cli(env)
        async with third.running():
            await third.wait_started()
            await bf_caught_up(cluster, db, third, "third")
            progress = await bf_progress(port)
        assert (bf_reads(third.events), progress) == ([], (0, 0))  # done: not again at start-up

        state.unlink()
        fourth = self.Cli(env)
        async with fourth.running():
            await wait_until(lambda: bf_finished(port), timeout=120)
            await bf_caught_up(cluster, db, fourth, "fourth")
        assert [read["key"]["id"] for read in bf_reads(fourth.events)] == ids
        for proc in (first, second, third, fourth):
            bf_assert_no_internal_messages(proc.events)
            assert b"Traceback" not in proc.stderr

    def test_a_state_file_that_cannot_be_parsed_is_exit_2_naming_it(self, cluster, db, tmp_path):
        state = tmp_path / "garbled-state.json"
        state.write_text('{"tables": {"public.t": ')
        for extra in ({}, {"backfill_tables": "public.t"}):
            result = run_cli([], make_env(cluster, db, state_file=str(state), **extra), timeout=60)
            assert result.returncode == 2, result.stderr
            assert str(state) in result.stderr
            assert "Traceback" not in result.stderr

    async def test_a_state_file_that_cannot_be_written_stops_the_backfill_not_replication(
            self, cluster, db, tmp_path, caplog):
        """The state file's directory becomes a regular file while wal2http runs (root writes
        anywhere, so a read-only mode would not do): a signal's backfill stops with an error, and
        changes are still delivered."""
        caplog.set_level(logging.INFO, logger="wal2http")
        (tmp_path / "dir").mkdir()
        state = tmp_path / "dir" / "state.json"
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY, v text)",
                  "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 200) g")
        config = make_config(cluster, db, backfill_chunk_rows=10, state_file=str(state))

        def complaints():
            return [r for r in caplog.records if str(state) in r.getMessage() and r.levelno >= logging.WARNING]

        async with running(config) as (sink, _ack):
            await sql(cluster, db, "INSERT INTO t VALUES (1000, 'before')")
            await Observed.wait_for(sink, lambda s: len(s.events) == 1, timeout=30)
            (tmp_path / "dir").rename(tmp_path / "moved")
            (tmp_path / "dir").write_text("a file, so nothing can be made under it (also as root)")
            await sql(cluster, db, f"SELECT pg_logical_emit_message(true, '{BF_SIGNAL}', 'public.t')")
            await wait_until(complaints, timeout=30)
            await sql(cluster, db, "INSERT INTO t VALUES (1001, 'after')")
            await bf_caught_up(cluster, db, sink, "still streaming")
        assert [e["new"] for e in sink.events if e["op"] == "insert"] == [
            {"id": 1000, "v": "before"}, {"id": 1001, "v": "after"}]
        assert len(bf_reads(sink.events)) < 200  # stopped
        bf_assert_no_internal_messages(sink.events)

    @pytest.mark.parametrize("parent", ["missing", "afile"])
    async def test_a_state_file_path_that_cannot_be_written_at_start_up_stops_only_the_backfill(
            self, cluster, db, tmp_path, caplog, parent):
        """STATE_FILE in a directory that does not exist, or under a regular file, from the start:
        replication runs, the backfill does not."""
        caplog.set_level(logging.INFO, logger="wal2http")
        if parent == "afile":
            (tmp_path / parent).write_text("a file, so nothing can be made under it (also as root)")
        state = tmp_path / parent / "state.json"
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY, v text)",
                  "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 200) g")
        config = make_config(cluster, db, backfill_tables="public.t", backfill_chunk_rows=10, state_file=str(state))

        def complaints():
            return [r for r in caplog.records if str(state) in r.getMessage() and r.levelno >= logging.WARNING]

        async with running(config) as (sink, _ack):
            await wait_until(complaints, timeout=30)
            await sql(cluster, db, "INSERT INTO t VALUES (1000, 'after')")
            await bf_caught_up(cluster, db, sink, "still streaming")
        assert [e["new"] for e in sink.events if e["op"] == "insert"] == [{"id": 1000, "v": "after"}]
        assert len(bf_reads(sink.events)) < 200  # stopped

    # -- refusals --------------------------------------------------------------------------------------

    async def test_refusals_name_the_table_and_the_rest_goes_on(self, cluster, db, tmp_path, caplog):
        """Not in the publication, no key to page by, no SELECT privilege: each refused with a
        message; the table that can be read is, and streaming goes on."""
        caplog.set_level(logging.INFO, logger="wal2http")
        role, password = f"bf_{db}", "Bf-pa55-word"
        await sql(cluster, db, "CREATE TABLE ok (id int PRIMARY KEY, v text)", "CREATE TABLE nokey (id int, v text)",
                  "ALTER TABLE nokey REPLICA IDENTITY FULL", "CREATE TABLE outside (id int PRIMARY KEY)",
                  "CREATE TABLE secret (id int PRIMARY KEY)",
                  "INSERT INTO ok SELECT g, 'ok' FROM generate_series(1, 30) g", "INSERT INTO nokey VALUES (1, 'x')",
                  "INSERT INTO outside VALUES (1)", "INSERT INTO secret VALUES (1)",
                  "CREATE PUBLICATION bf_some FOR TABLE ok, nokey, secret",
                  f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD {w.quote_literal(password)}",
                  f"GRANT SELECT ON ok, nokey, outside TO {role}")
        config = w.load_config([], ops_env(cluster, db, database_url=cluster.url(db, role, password), pub_name="bf_some",
                                           backfill_tables="public.ok,public.nokey,public.outside,public.secret",
                                           state_file=str(tmp_path / "state.json")))[0]
        port = ops_port(config)
        reasons = {"public.nokey": ("primary key", "replica identity"), "public.outside": ("publication",),
                   "public.secret": ("privilege", "permission")}

        def refusal(name: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                    and name in r.getMessage() and any(reason in r.getMessage().lower() for reason in reasons[name])]

        async with running(config) as (sink, _ack):
            await wait_until(lambda: bf_finished(port), timeout=60)
            await wait_until(lambda: all(refusal(name) for name in reasons), timeout=30)
            await sql(cluster, db, "INSERT INTO ok VALUES (100, 'streamed')", "INSERT INTO secret VALUES (2)")
            await bf_caught_up(cluster, db, sink, "refused")
        assert [read["key"]["id"] for read in bf_reads(sink.events)] == list(range(1, 31))
        assert {read["table"] for read in bf_reads(sink.events)} == {"ok"}
        assert [(e["table"], e["key"]) for e in sink.events if e["op"] == "insert"] == [
            ("ok", {"id": 100}), ("secret", {"id": 2})]

    async def test_refused_before_postgresql_14(self, old_cluster, old_db, tmp_path, caplog):
        caplog.set_level(logging.INFO, logger="wal2http")
        await sql(old_cluster, old_db, "CREATE TABLE o (id int PRIMARY KEY)", "INSERT INTO o VALUES (1), (2)")
        config = make_config(old_cluster, old_db, backfill_tables="public.o", state_file=str(tmp_path / "state.json"))

        def refusals():
            return [r for r in caplog.records if r.levelno >= logging.WARNING
                    and "backfill" in r.getMessage().lower() and "PostgreSQL 14" in r.getMessage()]

        async with running(config) as (sink, _ack):
            await wait_until(refusals, timeout=30)
            await sql(old_cluster, old_db, "INSERT INTO o VALUES (3)")
            await sink.wait_for(1)
        assert [(e["op"], e["new"]) for e in sink.events] == [("insert", {"id": 3})]

    # -- what a backfill reads ---------------------------------------------------------------------------

    FILTERED = {  # publications of table f (id, a, secret) -> the rows and columns published on 15+
        "column list and row filter": ({"bf_p1": "f (id, a) WHERE (id % 3 = 0)"},
                                       [{"id": g, "a": f"a{g}"} for g in range(3, 31, 3)]),
        "two row filters, OR-ed": ({"bf_p1": "f WHERE (id < 5)", "bf_p2": "f WHERE (id > 25)"},
                                   [{"id": g, "a": f"a{g}", "secret": "hidden"} for g in (1, 2, 3, 4, 26, 27, 28, 29, 30)]),
    }

    @pytest.mark.parametrize("case", FILTERED)
    async def test_row_filters_and_column_lists_apply(self, cluster, db, tmp_path, case):
        """Read events carry what the publications publish, exactly as the inserts of the same rows
        did (PostgreSQL 15+ filters rows and columns; 14 has no such syntax: every row, whole)."""
        publications, published = self.FILTERED[case]
        await sql(cluster, db, "CREATE TABLE f (id int PRIMARY KEY, a text, secret text)")
        for name, what in publications.items():
            create = f"CREATE PUBLICATION {name} FOR TABLE {what}"
            if cluster.major >= 15:
                await sql(cluster, db, create)
            else:
                with pytest.raises(w.ServerError) as info:
                    await sql(cluster, db, create)
                assert info.value.fields["C"] == "42601"  # syntax_error
                await sql(cluster, db, f"CREATE PUBLICATION {name} FOR TABLE f")
        pub_name = ",".join(publications)
        async with running(make_config(cluster, db, slot_name=f"{db}_ref", pub_name=pub_name)) as (ref, _ack):
            await sql(cluster, db, "INSERT INTO f SELECT g, 'a' || g, 'hidden' FROM generate_series(1, 30) g")
            await bf_caught_up(cluster, db, ref, "reference")
        inserts = [e for e in ref.events if e["op"] == "insert"]
        config = make_config(cluster, db, pub_name=pub_name, backfill_tables="public.f", backfill_chunk_rows=4,
                             state_file=str(tmp_path / "state.json"))
        async with running(config) as (sink, _ack):
            await Observed.wait_for(sink, lambda s: len(bf_reads(s.events)) >= len(inserts), timeout=30)
            await bf_caught_up(cluster, db, sink, "filtered")
        reads = bf_reads(sink.events)
        assert [(read["key"], read["new"]) for read in reads] == [(i["key"], i["new"]) for i in inserts]
        if cluster.major >= 15:
            assert [read["new"] for read in reads] == published
        else:
            assert [read["new"] for read in reads] == [{"id": g, "a": f"a{g}", "secret": "hidden"} for g in range(1, 31)]

    async def test_progress_is_logged_with_rows_done_and_the_estimate(self, cluster, db, tmp_path, caplog, monkeypatch):
        """A progress line per chunk here (every few seconds otherwise): the table, rows done, the
        estimate from pg_class.reltuples, the rate."""
        monkeypatch.setattr(w, "BACKFILL_PROGRESS_S", 0.0)
        caplog.set_level(logging.INFO, logger="wal2http")
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY, v text)",
                  "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 100) g", "ANALYZE t")
        config = make_config(cluster, db, backfill_tables="public.t", backfill_chunk_rows=10,
                             state_file=str(tmp_path / "state.json"))
        async with running(config) as (sink, _ack):
            await Observed.wait_for(sink, lambda s: len(bf_reads(s.events)) >= 100, timeout=30)
            await bf_caught_up(cluster, db, sink, "logged")
        lines = [r.getMessage() for r in caplog.records if "public.t" in r.getMessage()
                 and "about 100 rows" in r.getMessage() and "rows/s" in r.getMessage()]
        done = [int(found.group(1)) for found in (re.search(r"\b(\d+) of about 100 rows", line) for line in lines) if found]
        assert done and done == sorted(done) and set(done) <= set(range(10, 101, 10)), lines

    async def test_composite_key_replica_identity_index_and_toast(self, cluster, db, tmp_path):
        await sql(cluster, db,
                  "CREATE TABLE cp (a int, b text, v text, PRIMARY KEY (a, b))",
                  "INSERT INTO cp SELECT a, b, a || b FROM generate_series(1, 5) a, unnest(ARRAY['x', 'y', 'z']) b",
                  "CREATE TABLE ri (a int NOT NULL, b int NOT NULL, v text)", "CREATE UNIQUE INDEX ri_ba ON ri (b, a)",
                  "ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_ba",
                  "INSERT INTO ri SELECT g % 4, g, 'ri' || g FROM generate_series(1, 13) g",
                  "CREATE TABLE big (id int PRIMARY KEY, body text)", "ALTER TABLE big ALTER body SET STORAGE EXTERNAL",
                  "INSERT INTO big SELECT g, repeat(md5(g::text), 6250) FROM generate_series(1, 3) g")
        config = make_config(cluster, db, backfill_tables="public.cp,public.ri,public.big", backfill_chunk_rows=4,
                             state_file=str(tmp_path / "state.json"))
        async with running(config) as (sink, _ack):
            await Observed.wait_for(sink, lambda s: len(bf_reads(s.events)) >= 15 + 13 + 3, timeout=30)
            await sql(cluster, db, "UPDATE ri SET v = 'changed' WHERE b = 5", "DELETE FROM cp WHERE a = 1 AND b = 'y'")
            await bf_caught_up(cluster, db, sink, "keys")
        events = sink.events
        composite = bf_reads(events, "cp")
        assert [(r["key"], r["new"]) for r in composite] == [
            ({"a": a, "b": b}, {"a": a, "b": b, "v": f"{a}{b}"}) for a in range(1, 6) for b in "xyz"]
        assert bf_chunks(events, composite) == [[0, 1, 2, 3]] * 3 + [[0, 1, 2]]
        by_index = bf_reads(events, "ri")
        assert [r["key"] for r in by_index] == [{"a": g % 4, "b": g} for g in range(1, 14)]  # index (b, a) order
        assert [r["new"] for r in by_index] == [{"a": g % 4, "b": g, "v": f"ri{g}"} for g in range(1, 14)]
        (update,) = [e for e in events if e["op"] == "update"]
        (delete,) = [e for e in events if e["op"] == "delete"]
        assert update["key"] == by_index[4]["key"]  # a receiver finds the row it was sent
        assert delete["key"] == composite[1]["key"]
        toasted = bf_reads(events, "big")
        assert [r["new"]["body"] for r in toasted] == [hashlib.md5(str(g).encode()).hexdigest() * 6250 for g in (1, 2, 3)]
        assert all(r["unchanged_toast"] == [] for r in toasted)
        for read in bf_reads(events):
            bf_assert_read_fields(read)
        assert bf_fold(events, "ri") == await bf_table_rows(cluster, db, "ri", key=("a", "b"))
        assert bf_fold(events, "cp") == await bf_table_rows(cluster, db, "cp", key=("a", "b"))

    # -- memory -------------------------------------------------------------------------------------------

    @pytest.mark.timeout(240)
    async def test_memory_stays_bounded_at_200000_rows(self, cluster, db, tmp_path):
        """200,000 rows in chunks of the default size, to the stdout sink: peak RSS under 80 MB."""
        rows = 200_000
        await sql(cluster, db, "CREATE TABLE m (id int PRIMARY KEY, name text, amount numeric(12,2), "
                               "created timestamptz)",
                  f"INSERT INTO m SELECT g, 'customer ' || g, g / 7.0, now() FROM generate_series(1, {rows}) g")
        proc = self.Cli(make_env(cluster, db, backfill_tables="public.m", log_level="INFO",
                                 state_file=str(tmp_path / "state.json")), count_only=True)
        async with proc.running():
            await proc.wait_for(lambda p: p.count >= rows, timeout=180)
            peak_kb = bf_peak_rss_kb(proc.process.pid)
        first, last = json.loads(proc.first), json.loads(proc.last)
        assert (first["op"], first["key"], last["op"], last["key"]) == ("read", {"id": 1}, "read", {"id": rows})
        assert proc.count == rows
        assert peak_kb < 80 * 1024, f"peak RSS {peak_kb / 1024:.1f} MB"


class TestBackfillAdapting:
    """The chunk's size goes down when its SELECT is slow or hits the statement timeout."""

    async def test_slow_chunks_are_halved_and_the_table_is_still_complete(self, cluster, db, tmp_path, caplog,
                                                                           monkeypatch):
        monkeypatch.setattr(w, "BACKFILL_SLOW_CHUNK_S", 0.0)  # every chunk counts as slow
        caplog.set_level(logging.INFO, logger="wal2http")
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t SELECT generate_series(1, 300)")
        config = make_config(cluster, db, backfill_tables="public.t", backfill_chunk_rows=80,
                             state_file=str(tmp_path / "state.json"))
        async with running(config) as (sink, _ack):
            await Observed.wait_for(sink, lambda s: len(bf_reads(s.events)) >= 300, timeout=30)
            await bf_caught_up(cluster, db, sink, "halved")
        assert [read["key"]["id"] for read in bf_reads(sink.events)] == list(range(1, 301))
        sizes = [int(m.group(1)) for m in (re.search(r"chunks of (\d+) rows from now on", r.getMessage())
                                           for r in caplog.records) if m]
        assert sizes == [40, 20, 10]  # 80 + 40 + 20 + 10 * 16 = 300: halved down to the smallest
        assert [len(chunk) for chunk in bf_chunks(sink.events, bf_reads(sink.events))][:4] == [80, 40, 20, 10]

    async def test_a_select_the_statement_timeout_cancels_is_read_again_smaller(self, cluster, db, tmp_path, caplog,
                                                                                 monkeypatch):
        monkeypatch.setattr(w, "BACKFILL_STATEMENT_TIMEOUT_S", 0.2)
        caplog.set_level(logging.INFO, logger="wal2http")
        # From PostgreSQL 16 on, pg_publication_tables opens a table of a publication without a
        # column list (to list its columns), and so waits on the lock too: give them lists.
        lists = " (id)" if cluster.major >= 15 else ""
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t SELECT generate_series(1, 50)",
                  "CREATE TABLE u (id int PRIMARY KEY)", "INSERT INTO u VALUES (1)",
                  f"CREATE PUBLICATION bf_timeout FOR TABLE t{lists}, u{lists}")
        config = make_config(cluster, db, backfill_tables="public.t,public.u", backfill_chunk_rows=40,
                             state_file=str(tmp_path / "state.json"), pub_name="bf_timeout")
        await create_slot(cluster, db)  # before the lock: making a slot waits for transactions with an xid
        info = w.parse_database_url(cluster.url(db), {})
        async with w.open_pg_connection(info, replication=False) as locker:
            await locker.simple_query("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")  # every SELECT of t waits
            async with running(config) as (sink, _ack):
                await Observed.wait_for(sink, lambda s: bf_reads(s.events, "u"), timeout=30)
                await bf_caught_up(cluster, db, sink, "timeout")
            await locker.simple_query("ROLLBACK")
        messages = [r.getMessage() for r in caplog.records]
        assert [m for m in messages if "cancelled by the statement timeout" in m] == [
            f"backfill of public.t: a chunk's SELECT was cancelled by the statement timeout; chunks of {n} rows "
            "from now on" for n in (20, 10)]
        refused = [m for m in messages if m.startswith("backfill of public.t refused")]
        assert len(refused) == 1 and "statement timeout" in refused[0]
        assert bf_reads(sink.events, "t") == []  # and the next table went on
        assert [read["key"] for read in bf_reads(sink.events, "u")] == [{"id": 1}]

    async def test_a_locked_table_never_stops_replication(self, cluster, db, tmp_path, caplog, monkeypatch):
        """ACCESS EXCLUSIVE on a table being backfilled: streaming goes on.  PostgreSQL 16+ waits
        on the lock already to list the publication's tables (which wal2http tries again later,
        and so backfills the table once the lock is gone); before 16 only the SELECT waits, and the
        table is refused once halving cannot help."""
        monkeypatch.setattr(w, "BACKFILL_STATEMENT_TIMEOUT_S", 0.2)
        monkeypatch.setattr(w, "RECONNECT_BASE_S", 0.1)
        caplog.set_level(logging.INFO, logger="wal2http")
        await sql(cluster, db, "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t SELECT generate_series(1, 30)",
                  "CREATE TABLE u (id int PRIMARY KEY)")
        await create_slot(cluster, db)
        config = make_config(cluster, db, backfill_tables="public.t", backfill_chunk_rows=20,
                             state_file=str(tmp_path / "state.json"))
        info = w.parse_database_url(cluster.url(db), {})
        async with running(config) as (sink, _ack):
            async with w.open_pg_connection(info, replication=False) as locker:
                await locker.simple_query("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
                await sql(cluster, db, "INSERT INTO u VALUES (1)")
                await Observed.wait_for(sink, lambda s: any(e.get("table") == "u" for e in s.events), timeout=30)
                waited = "trying again" if cluster.major >= 16 else "backfill of public.t refused"
                await wait_until(lambda: any(waited in r.getMessage() for r in caplog.records), timeout=30)
                await locker.simple_query("ROLLBACK")
            if cluster.major >= 16:
                await Observed.wait_for(sink, lambda s: len(bf_reads(s.events, "t")) == 30, timeout=30)
            await bf_caught_up(cluster, db, sink, "unlocked")
        expected = list(range(1, 31)) if cluster.major >= 16 else []
        assert [read["key"]["id"] for read in bf_reads(sink.events, "t")] == expected
