"""wal2http: stream PostgreSQL row changes to stdout, a webhook endpoint or Hook0.

wal2http reads every committed row change of a PostgreSQL database through logical replication
(the `pgoutput` plugin) and delivers it, at least once and in commit order, as a JSON event to a
sink: JSON lines on stdout, an HTTP endpoint, or the Hook0 webhook server; email alerts tell an
operator when delivery fails.  It speaks the PostgreSQL wire and streaming replication protocols
itself over Trio sockets, decodes pgoutput by hand, and posts with a small h11 client.

    python wal2http.py --demo        # a throwaway PostgreSQL, its changes on stdout
    DATABASE_URL=postgresql://user:pass@host/db python wal2http.py --check
    DATABASE_URL=postgresql://user:pass@host/db python wal2http.py

Environment (each has a --flag of the same name; see --help and README.md): DATABASE_URL,
SLOT_NAME, PUB_NAME, CREATE_SLOT, SLOT_FAILOVER, EVENT_SINK, FEEDBACK_INTERVAL_SECS, STREAMING, ON_FAILURE,
DEAD_LETTER_FILE, RETRY_MAX_ATTEMPTS, RETRY_BASE_DELAY_MS, RETRY_MAX_DELAY_MS, DELIVERY_CONCURRENCY,
LOG_LEVEL,
HTTP_ENDPOINT_URL, HTTP_BATCH_SIZE, HTTP_TIMEOUT_SECS, HTTP_HEADERS, HTTP_SIGNING_SECRET,
HTTP_CA_FILE, HOOK0_API_URL, HOOK0_APPLICATION_ID, HOOK0_API_TOKEN, HOOK0_TABLE_EVENTS,
HOOK0_LABELS, HOOK0_CREATE_EVENT_TYPES, EMAIL_SMTP_HOST, EMAIL_SMTP_PORT, EMAIL_SMTP_USERNAME,
EMAIL_SMTP_PASSWORD, EMAIL_FROM, EMAIL_TO, EMAIL_SMTP_TLS, OPS_ADDR, OPS_TOKEN,
SLOT_CHECK_INTERVAL_SECS, SLOT_MAX_RETAINED_MB, TAP_MAX_CLIENTS, BACKFILL_TABLES,
BACKFILL_ON_CREATE, BACKFILL_CHUNK_ROWS, STATE_FILE.

Protocol references (PostgreSQL documentation): "Frontend/Backend Protocol" (message formats,
SASL authentication), "Streaming Replication Protocol", "Logical Streaming Replication Protocol"
and "Logical Replication Message Formats".

Contents (`grep -n '^# [0-9]' wal2http.py`), in the order an event travels: PostgreSQL's bytes,
decoded, become an event, which the delivery loop hands to a sink; alerts, the operations port,
configuration and the command line come last.  Sections 2, 3, 5-8, 15, 16 and 20 are pure:
nothing there touches a socket or a thread (the envelope's spill file for streamed transactions
aside), and each is tested with bytes and values alone; the other sections say what I/O they do.
  1. Errors and failing periods        13. HTTP client (h11 over Trio)
  2. Wire codec (sans-IO)              14. HTTP sink
  3. Authentication (pure)             15. Hook0 sink: mapping (pure)
  4. PostgreSQL connection (I/O)       16. Hook0 sink: answers (pure)
  5. Replication framing (sans-IO)     17. Hook0 sink: delivery (I/O)
  6. pgoutput decoder                  18. Alerts
  7. Type conversion                   19. Operations port: health, metrics, slot guard,
  8. Event envelope                        live tap
  9. Replication loop and the          20. Configuration
     acknowledgement rule              21. Service: run() and --check
 10. Backfill: existing rows,          22. --demo: a throwaway PostgreSQL
     between watermarks                23. Command line
 11. Delivery: the sink interface,
     retries, ON_FAILURE, dead letters
 12. stdout sink
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import collections
import contextlib
import dataclasses
import datetime
import email.message
import email.utils
import enum
import gc
import getpass
import glob
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import operator
import os
import pwd
import random
import re
import shutil
import signal
import smtplib
import socket
import ssl
import stat
import stringprep
import struct
import subprocess
import sys
import tempfile
import threading
import time
import typing
import unicodedata
import urllib.parse
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlencode, urlsplit, urlunsplit

import h11
import trio

__version__ = "0.1.0"

logger = logging.getLogger("wal2http")


# =====================================================================================================
# 1. Errors and failing periods
# =====================================================================================================
# One root class.  Only the I/O code turns OSError / trio.BrokenResourceError into these.  Then what
# every failing part shares: backoff between attempts, the failing period an alert opens and a
# "recovered" mail closes, and the scrubbing of secrets from any text that leaves the process.


class Wal2HttpError(Exception):
    """Root of every error wal2http raises on purpose."""

    exit_code = 1


class ConfigError(Wal2HttpError):
    """A configuration value is missing or invalid (exit 2).  The message names the variable."""

    exit_code = 2


class PreconditionError(Wal2HttpError):
    """Something outside wal2http is not as it must be (exit 4): never retried."""

    exit_code = 4


class AuthenticationError(PreconditionError):
    """PostgreSQL rejected the credentials, or TLS verification failed."""


class ProtocolError(Wal2HttpError):
    """Bytes from the server do not follow the protocol; the message names the protocol message."""


class ServerError(Wal2HttpError):
    """An ErrorResponse from PostgreSQL.  `fields` maps the one-letter field codes to their text."""

    def __init__(self, fields: dict[str, str]):
        self.fields = fields
        self.sqlstate = fields.get("C", "")
        super().__init__(f"{fields.get('S', 'ERROR')}: {fields.get('M', '')} (SQLSTATE {self.sqlstate})")


class ConnectionLost(Wal2HttpError):
    """The connection to PostgreSQL failed or timed out: retried with backoff."""


class DeliveryError(Wal2HttpError):
    """A sink could not deliver (part of) a batch.

    `delivered`: how many leading events of the batch were confirmed before the failure.
    `failed`: how many events from there on the failure covers (None: all the rest).
    `retryable`: whether trying again may help; `retry_after`: seconds the receiver asked to wait.
    """

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None,
                 delivered: int = 0, failed: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.delivered = delivered
        self.failed = failed


class DeliveryFailed(Wal2HttpError):
    """Retries are exhausted and ON_FAILURE=exit (exit 3).  `delivered`: how many leading events
    of the batch were confirmed (delivered or dead-lettered) before it; nothing after them is."""

    exit_code = 3

    def __init__(self, message: str, delivered: int = 0):
        super().__init__(message)
        self.delivered = delivered


class SinkAuthError(PreconditionError):
    """The sink rejected our credentials (HTTP 401/403 from Hook0): exit 4, never retried."""


# -- Backoff and failing periods: shared by PostgreSQL reconnects and sink retries -------------------


def compute_retry_delay(retry_index: int, base_s: float, max_s: float, random_value: float,
                        retry_after_s: float | None = None) -> float:
    """Exponential backoff with full jitter: random * min(max, base * 2**retry_index), raised to
    the receiver's Retry-After, never above max (retry_index 0 is the first retry; random 1.0
    gives the plain doubling)."""
    delay = random_value * min(max_s, base_s * 2.0 ** min(retry_index, 64))  # 2**1025 overflows
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return min(max_s, delay)


class Backoff:
    """The delays between attempts at one thing: base, doubling, capped at max; `jitter` (a
    random() in [0, 1)) spreads them as compute_retry_delay does, None keeps them exact."""

    def __init__(self, base_s: float, max_s: float, jitter: Callable[[], float] | None = None):
        self.base_s, self.max_s, self.jitter = base_s, max_s, jitter
        self.retries = 0  #: delays handed out since the last reset

    def next_delay(self, retry_after_s: float | None = None) -> float:
        random_value = 1.0 if self.jitter is None else self.jitter()
        delay = compute_retry_delay(self.retries, self.base_s, self.max_s, random_value, retry_after_s)
        self.retries += 1
        return delay

    def reset(self) -> None:
        self.retries = 0


class FailingPeriod:
    """One period during which something keeps failing (a sink, the replication connection):
    when it began, and whether an alert went out, so that its end sends one "recovered" mail.
    `alerter` is an Alerter (section 18) or anything with its alert/recovered methods."""

    def __init__(self, alerter, key: str):
        self.alerter, self.key = alerter, key
        self.since: datetime.datetime | None = None  #: wall clock of the first failure; None: healthy
        self.started_at = 0.0  #: Trio clock of the first failure
        self.alerted = False  #: an alert went out and no "recovered" yet

    def failed(self) -> None:
        if self.since is None:
            self.since = datetime.datetime.now(datetime.timezone.utc)
            self.started_at = trio.current_time()

    @property
    def duration_s(self) -> float:
        return 0.0 if self.since is None else trio.current_time() - self.started_at

    def alert(self, subject: str, body: str, key_suffix: str = "") -> None:
        self.failed()
        self.alerter.alert(self.key + key_suffix, subject, body, since=self.since)
        self.alerted = True

    def ended(self, subject: str, body: str) -> bool:
        """The failure is over: "recovered" when it was alerted.  True when it was failing."""
        was_failing, alerted = self.since is not None, self.alerted
        self.since, self.alerted = None, False
        if alerted:
            self.alerter.recovered(self.key, subject, body)
        return was_failing


# -- Secrets: no message, log line or mail shows one -----------------------------------------------


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret of 4 characters or more replaced by `***` (shorter ones would
    mangle ordinary words and tell an attacker little)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


# =====================================================================================================
# 2. Wire codec (sans-IO)
# =====================================================================================================
# Frontend/Backend protocol v3 ("Message Formats" in the PostgreSQL docs).  Pure functions from
# values to bytes and back; `MessageBuffer` splits a byte stream into backend messages.  Nothing
# here touches a socket.

PROTOCOL_VERSION_3 = 196608  #: 3.0, the StartupMessage version
SSL_REQUEST_CODE = 80877103  #: SSLRequest's magic "version"
MAX_BACKEND_MESSAGE_BYTES = 1 << 30  #: the server never sends a message larger than 1 GiB


class _Tag(enum.IntEnum):
    """A one-byte message tag, declared as the character the PostgreSQL docs give it.  The members
    are ints (a received tag compares equal to them) and, through `enum.global_enum`, also module
    constants (`COPY_DATA`), as the `re` module does with its flags."""

    def __new__(cls, char: str):
        member = int.__new__(cls, ord(char))
        member._value_ = ord(char)
        return member


@enum.global_enum
class BackendMessage(_Tag):
    """Backend message tags ("Message Formats")."""

    AUTHENTICATION = "R"
    PARAMETER_STATUS = "S"
    BACKEND_KEY_DATA = "K"
    READY_FOR_QUERY = "Z"
    ERROR_RESPONSE = "E"
    NOTICE_RESPONSE = "N"
    ROW_DESCRIPTION = "T"
    DATA_ROW = "D"
    COMMAND_COMPLETE = "C"
    EMPTY_QUERY_RESPONSE = "I"
    COPY_BOTH_RESPONSE = "W"
    COPY_OUT_RESPONSE = "H"
    COPY_DATA = "d"
    COPY_DONE = "c"
    NEGOTIATE_PROTOCOL_VERSION = "v"
    NOTIFICATION_RESPONSE = "A"


# Authentication request codes (the int32 after 'R').
AUTH_OK = 0
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_HEADER = struct.Struct("!BI")  # tag, length (length counts itself, not the tag)
_COPY_DATA = COPY_DATA.value  # a plain int: compared for every message


def _frame(tag: bytes, body: bytes) -> bytes:
    return tag + _INT32.pack(len(body) + 4) + body


def _cstring(text: str) -> bytes:
    data = text.encode()
    if b"\0" in data:
        raise ValueError("a protocol string cannot contain a NUL byte")
    return data + b"\0"


def encode_startup(parameters: dict[str, str]) -> bytes:
    """StartupMessage: protocol 3.0 and NUL-terminated name/value pairs."""
    body = _INT32.pack(PROTOCOL_VERSION_3)
    body += b"".join(_cstring(k) + _cstring(v) for k, v in parameters.items()) + b"\0"
    return _INT32.pack(len(body) + 4) + body


def encode_ssl_request() -> bytes:
    return _INT32.pack(8) + _INT32.pack(SSL_REQUEST_CODE)


def encode_password(password: bytes) -> bytes:
    """PasswordMessage (cleartext or MD5 hash); the password must not hold a NUL byte."""
    return _frame(b"p", password + b"\0")


def encode_sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _frame(b"p", _cstring(mechanism) + _INT32.pack(len(data)) + data)


def encode_sasl_response(data: bytes) -> bytes:
    return _frame(b"p", data)


def encode_query(sql: str) -> bytes:
    return _frame(b"Q", _cstring(sql))


def encode_copy_data(data: bytes) -> bytes:
    return _frame(b"d", data)


def encode_copy_done() -> bytes:
    return b"c\0\0\0\x04"


def encode_terminate() -> bytes:
    return b"X\0\0\0\x04"


class MessageBuffer:
    """Splits bytes received from the server into (tag, body) messages.

    `feed(data)` appends; `next_message()` returns a complete message or None when more bytes are
    needed.  Nothing is returned early: a message split at any offset comes out whole.

    The bytes are held as `bytes`, so a message's body is one slice of them (a bytearray would
    cost a second copy per message).  What arrives while the next message is still incomplete is
    kept aside and joined once it is whole, so a large message read in many pieces is copied
    once, not once per piece.
    """

    def __init__(self) -> None:
        self._data = b""
        self._pos = 0
        self._later: list[bytes] = []  # received after _data, not yet joined to it
        self._later_bytes = 0
        self._missing = 0  # bytes the next message lacked when next_message last looked

    def feed(self, data: bytes) -> None:
        self._later.append(data)
        self._later_bytes += len(data)
        if self._later_bytes >= self._missing:
            self._data = b"".join([self._data[self._pos:], *self._later])
            self._pos, self._later, self._later_bytes, self._missing = 0, [], 0, 0

    def next_message(self) -> tuple[int, bytes] | None:
        data, pos = self._data, self._pos
        if len(data) - pos < 5:
            self._missing = 5 - (len(data) - pos)
            return None
        tag, length = _HEADER.unpack_from(data, pos)
        if length < 4 or length > MAX_BACKEND_MESSAGE_BYTES:
            raise ProtocolError(f"malformed message from server: {chr(tag)!r} with length {length}")
        end = pos + 1 + length
        if len(data) < end:
            self._missing = end - len(data)
            return None
        self._pos = end
        return tag, data[pos + 5:end]

    def next_bodies(self, tag: int, most: int) -> list[bytes]:
        """The bodies of the whole messages with this tag at the front (at most `most`): a query's
        rows come by the thousand, taken here many at a call.  An empty list when the next
        message is another one or incomplete (next_message then says which)."""
        data, pos, bodies = self._data, self._pos, []
        size, length_at = len(data), _UINT32.unpack_from
        while size - pos >= 5 and data[pos] == tag and len(bodies) < most:
            end = pos + 1 + length_at(data, pos + 1)[0]
            if end > size or end - pos < 5:
                break
            bodies.append(data[pos + 5:end])
            pos = end
        self._pos = pos
        return bodies

    def next_copy_data(self, layout: struct.Struct, kind: int) -> tuple[tuple, bytes] | None:
        """The replication hot path (one call, one copy): when the next message is a whole CopyData
        whose content starts with the byte `kind` and holds the header `layout` describes (see
        copy_data_layout), take it and return (the fields of `layout`, the bytes after them);
        otherwise None (next_message then gives it)."""
        data, pos, size = self._data, self._pos, layout.size
        if len(data) - pos < size:
            return None
        fields = layout.unpack_from(data, pos)
        end = pos + 1 + fields[1]
        if fields[0] != _COPY_DATA or fields[2] != kind or len(data) < end or end - pos < size:
            return None
        self._pos = end
        return fields, data[pos + size:end]

    def pending(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._data) - self._pos + self._later_bytes


def copy_data_layout(header: struct.Struct) -> struct.Struct:
    """A CopyData message whose content starts with `header` (its first field the kind byte): the
    tag, the length, then the fields of `header`.  For MessageBuffer.next_copy_data."""
    return struct.Struct("!BI" + header.format.lstrip("!"))


def _split_cstrings(body: bytes, what: str) -> list[str]:
    if not body.endswith(b"\0"):
        raise ProtocolError(f"malformed {what} message: missing terminator")
    try:
        return body[:-1].decode().split("\0")
    except UnicodeDecodeError:
        raise ProtocolError(f"malformed {what} message: invalid UTF-8") from None


def decode_error_fields(body: bytes, what: str = "ErrorResponse") -> dict[str, str]:
    """ErrorResponse / NoticeResponse body: code byte + text, ..., terminated by a zero byte."""
    if not body.endswith(b"\0"):
        raise ProtocolError(f"malformed {what} message: missing terminator")
    fields = {}
    for part in _split_cstrings(body[:-1], what) if len(body) > 1 else []:
        if not part:
            raise ProtocolError(f"malformed {what} message: empty field")
        fields[part[0]] = part[1:]
    return fields


def decode_parameter_status(body: bytes) -> tuple[str, str]:
    parts = _split_cstrings(body, "ParameterStatus")
    if len(parts) != 2:
        raise ProtocolError("malformed ParameterStatus message: expected a name and a value")
    return parts[0], parts[1]


def decode_authentication(body: bytes) -> tuple[int, bytes]:
    """Authentication request: (code, the rest of the body)."""
    if len(body) < 4:
        raise ProtocolError("malformed Authentication message: truncated")
    return _INT32.unpack_from(body)[0], body[4:]


def decode_sasl_mechanisms(data: bytes) -> list[str]:
    if not data.endswith(b"\0\0") and data != b"\0":
        raise ProtocolError("malformed AuthenticationSASL message: missing terminator")
    return [m for m in _split_cstrings(data[:-1], "AuthenticationSASL") if m]


def decode_row_description(body: bytes) -> list[tuple[str, int]]:
    """RowDescription: [(column name, type oid)]."""
    try:
        (count,) = _INT16.unpack_from(body)
        pos, columns = 2, []
        for _ in range(count):
            end = body.index(b"\0", pos)
            name = body[pos:end].decode()
            type_oid = _UINT32.unpack_from(body, end + 7)[0]
            pos = end + 19
            columns.append((name, type_oid))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ProtocolError("malformed RowDescription message") from None
    if pos != len(body):
        raise ProtocolError("malformed RowDescription message: trailing bytes")
    return columns


def decode_data_row(body: bytes) -> tuple[str | None, ...]:
    """DataRow in text format: column values as str, NULL as None."""
    try:
        (count,) = _INT16.unpack_from(body)
        pos, values = 2, []
        for _ in range(count):
            (size,) = _INT32.unpack_from(body, pos)
            pos += 4
            if size < 0:
                values.append(None)
                continue
            if pos + size > len(body):
                raise ValueError
            values.append(body[pos:pos + size].decode())
            pos += size
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ProtocolError("malformed DataRow message") from None
    if pos != len(body):
        raise ProtocolError("malformed DataRow message: trailing bytes")
    return tuple(values)


_COPY_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_COPY_ESCAPE = re.compile(r"\\(.)", re.S)


def _copy_unescape(match: re.Match) -> str:
    return _COPY_ESCAPES.get(match.group(1), match.group(1))  # any other character stands for itself


def decode_copy_text(line: bytes) -> list[str | None]:
    """A row of `COPY ... TO STDOUT` in text format (a CopyData's content: the values separated
    by tabs, then a newline): its values, `\\N` (NULL) as None, backslash escapes undone."""
    try:
        text = line.decode()
    except UnicodeDecodeError:
        raise ProtocolError("malformed CopyData message: not UTF-8") from None
    if not text.endswith("\n"):
        raise ProtocolError("malformed CopyData message: a row must end with a newline")
    values = text[:-1].split("\t")
    if "\\" not in text:
        return values
    return [None if value == "\\N" else _COPY_ESCAPE.sub(_copy_unescape, value) for value in values]


def format_lsn(lsn: int) -> str:
    """An LSN the way PostgreSQL prints it: high and low 32 bits in upper-case hex."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


# =====================================================================================================
# 3. Authentication (pure)
# =====================================================================================================
# MD5 and SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL uses them ("SASL Authentication" in the
# docs): the server ignores the SCRAM user name (it has the startup user), so the client sends
# "n=,"; no channel binding ("n,," GS2 header), which the server accepts on plain and TLS
# connections alike.

SCRAM_MECHANISM = "SCRAM-SHA-256"
SCRAM_NONCE_BYTES = 18


def build_md5_password(user: str, password: str, salt: bytes) -> bytes:
    """'md5' + md5(md5(password + user) + salt), as AuthenticationMD5Password asks."""
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep; like libpq, fall back to the raw password when it is not allowed."""
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text
                     if not stringprep.in_table_b1(c))
    normal = unicodedata.normalize("NFKC", mapped)
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
                  stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
                  stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9)
    if any(check(c) for c in normal for check in prohibited):
        return text
    if any(stringprep.in_table_d1(c) for c in normal):
        if not (stringprep.in_table_d1(normal[0]) and stringprep.in_table_d1(normal[-1])) or any(
                stringprep.in_table_d2(c) for c in normal):
            return text
    return normal


def _scram_attributes(message: bytes, what: str) -> dict[str, str]:
    try:
        text = message.decode("ascii")
        return {part[0]: part[2:] for part in text.split(",") if len(part) >= 2 and part[1] == "="}
    except UnicodeDecodeError:
        raise AuthenticationError(f"malformed SCRAM {what} message from the server") from None


class ScramClient:
    """The client side of one SCRAM-SHA-256 exchange, as a small state machine over bytes."""

    def __init__(self, password: str, nonce: str | None = None, username: str = ""):
        self._password = saslprep(password).encode()
        self._nonce = nonce or base64.b64encode(os.urandom(SCRAM_NONCE_BYTES)).decode()
        self._first_bare = f"n={username},r={self._nonce}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        return f"n,,{self._first_bare}".encode()

    def client_final(self, server_first: bytes) -> bytes:
        attrs = _scram_attributes(server_first, "server-first")
        nonce, salt, iterations = attrs.get("r", ""), attrs.get("s"), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthenticationError("SCRAM server nonce does not extend the client nonce")
        if salt is None or not iterations.isdigit() or int(iterations) < 1:
            raise AuthenticationError("malformed SCRAM server-first message from the server")
        try:
            salt_bytes = base64.b64decode(salt, validate=True)
        except binascii.Error:
            raise AuthenticationError("malformed SCRAM server-first message from the server: bad salt") from None
        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt_bytes, int(iterations))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        final_bare = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{server_first.decode()},{final_bare}".encode()
        client_signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature))
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{final_bare},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        attrs = _scram_attributes(server_final, "server-final")
        if "e" in attrs:
            raise AuthenticationError(f"SCRAM authentication failed: {attrs['e']}")
        try:
            signature = base64.b64decode(attrs.get("v", ""), validate=True)
        except binascii.Error:
            signature = b""
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthenticationError("SCRAM server signature does not match: the server is not who it claims")


class Authenticator:
    """The answers to one connection's Authentication requests (pure: request in, bytes out):
    cleartext, MD5 or SCRAM-SHA-256, whichever the server asks for."""

    def __init__(self, user: str, password: str | None):
        self.user, self.password = user, password
        self._scram: ScramClient | None = None

    def answer(self, code: int, data: bytes) -> bytes:
        """The message to send for an Authentication request (b"" when none is due); raises
        AuthenticationError for a request it cannot answer."""
        if code == AUTH_OK:
            return b""
        if code in (AUTH_SASL_CONTINUE, AUTH_SASL_FINAL) and self._scram is not None:
            return self._answer_scram(code, data)
        if code in (AUTH_SASL_CONTINUE, AUTH_SASL_FINAL):
            raise AuthenticationError(f"unexpected SASL message {code} before SASL began")
        if self.password is None and code in (AUTH_CLEARTEXT_PASSWORD, AUTH_MD5_PASSWORD, AUTH_SASL):
            raise AuthenticationError(f"PostgreSQL asks a password for user {self.user!r}: put it in "
                                      "DATABASE_URL or PGPASSWORD")
        if code == AUTH_CLEARTEXT_PASSWORD:
            return encode_password(self.password.encode())
        if code == AUTH_MD5_PASSWORD:
            return encode_password(build_md5_password(self.user, self.password, data[:4]))
        if code == AUTH_SASL:
            mechanisms = decode_sasl_mechanisms(data)
            if SCRAM_MECHANISM not in mechanisms:
                raise AuthenticationError(f"no supported SASL mechanism among {mechanisms}")
            self._scram = ScramClient(self.password)
            return encode_sasl_initial_response(SCRAM_MECHANISM, self._scram.client_first())
        raise AuthenticationError(f"unsupported authentication request {code} from PostgreSQL")

    def _answer_scram(self, code: int, data: bytes) -> bytes:
        if code == AUTH_SASL_CONTINUE:
            return encode_sasl_response(self._scram.client_final(data))
        self._scram.verify_server_final(data)
        return b""


# =====================================================================================================
# 4. PostgreSQL connection (I/O)
# =====================================================================================================
# The thin I/O layer over the codec: TCP or Unix socket, SSLRequest and TLS with libpq's sslmode
# semantics, the authentication exchange, simple queries.  This is the only section that turns
# OSError, trio.BrokenResourceError and timeouts into ConnectionLost.  Its rules for host names
# (is_valid_host, is_ip_address, is_unix_socket, is_loopback_host) serve the HTTP client, the
# operations port and the configuration too.

_HOST_NAME = re.compile(rb"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")  #: no ':', '/', '@', spaces


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def is_valid_host(host: str) -> bool:
    """An IP address, or a name the resolver can be given (IDNA-encodable: no empty label, none
    longer than 63 characters)."""
    if is_ip_address(host):
        return True
    try:
        ascii_name = host.encode("idna")
    except UnicodeError:
        return False
    return _HOST_NAME.fullmatch(ascii_name) is not None


def is_unix_socket(host: str) -> bool:
    """libpq's rule: a host that starts with '/' is the directory of a Unix-domain socket."""
    return host.startswith("/")


def is_loopback_host(host: str) -> bool:
    """Whether listening on `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


RECEIVE_BYTES = 256 * 1024  #: one socket read
QUERY_YIELD_EVERY_ROWS = 128  #: a query's rows converted between two schedule points
DEFAULT_QUERY_TIMEOUT_S = 60.0  #: simple queries during setup (CREATE_REPLICATION_SLOT can wait on running transactions)
SESSION_SETTINGS = {  #: startup parameters that make the server's text output predictable
    "DateStyle": "ISO",
    "TimeZone": "UTC",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "client_encoding": "UTF8",
    "standard_conforming_strings": "on",
}
#: SQLSTATEs of a server error at connect time that mean "not now, try again later".
RETRYABLE_CONNECT_SQLSTATES = {"57P01", "57P02", "57P03", "53300", "53400", "55006", "08006", "08001"}
#: SQLSTATE classes / codes that mean a precondition the operator must fix (exit 4).
PRECONDITION_SQLSTATES = {"28000", "28P01", "3D000", "42501", "42704", "55000"}

_IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)


def quote_literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings is on for our sessions)."""
    if "\0" in text:
        raise ValueError("a SQL literal cannot contain a NUL byte")
    return "'" + text.replace("'", "''") + "'"


def quote_ident(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def classify_server_error(error: ServerError, context: str, streaming: bool = False) -> Wal2HttpError:
    """Turn an ErrorResponse into what the caller should do: retry, exit 4, or fail.  Once
    streaming, a cancelled walsender (57014), insufficient resources (53), a system error (58) or
    an internal error (XX) is retried too, as PostgreSQL's own subscriber does."""
    message = f"{context}: {error.fields.get('M', '')}"
    if error.fields.get("D"):
        message += f" ({error.fields['D']})"
    if error.fields.get("H"):
        message += f" Hint: {error.fields['H']}"
    if error.sqlstate in ("28000", "28P01"):
        return AuthenticationError(message)
    if error.sqlstate in PRECONDITION_SQLSTATES:
        return PreconditionError(message)
    if error.sqlstate in RETRYABLE_CONNECT_SQLSTATES or error.sqlstate.startswith("08"):
        return ConnectionLost(message)
    if streaming and (error.sqlstate == "57014" or error.sqlstate[:2] in ("53", "58", "XX")):
        return ConnectionLost(f"{message} [SQLSTATE {error.sqlstate}]")
    return error


def _ssl_context(conninfo, verify: str | None) -> ssl.SSLContext:
    """verify: None (encrypt only), "ca" (chain) or "full" (chain and host name), as libpq."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        root = conninfo.sslrootcert or os.path.expanduser("~/.postgresql/root.crt")
        if root == "system":
            ctx.load_default_certs()
        elif os.path.exists(root):
            ctx.load_verify_locations(root)
        else:
            raise AuthenticationError(
                f"sslmode=verify-{verify} needs a root certificate: {root} does not exist "
                "(set sslrootcert in DATABASE_URL, or sslrootcert=system for the system store)")
        ctx.check_hostname = verify == "full"
        ctx.verify_mode = ssl.CERT_REQUIRED
    if conninfo.sslcert:
        try:
            ctx.load_cert_chain(conninfo.sslcert, conninfo.sslkey)
        except (OSError, ssl.SSLError) as exc:
            raise PreconditionError(f"cannot load the client certificate sslcert={conninfo.sslcert}: {exc}") from None
    return ctx


def _tls_verification(conninfo) -> str | None:
    mode = conninfo.sslmode
    if mode == "verify-full":
        return "full"
    if mode == "verify-ca" or (mode == "require" and conninfo.sslrootcert
                               and os.path.exists(conninfo.sslrootcert)):
        return "ca"  # libpq: require with a root certificate file behaves as verify-ca
    return None


class PgConnection:
    """One authenticated connection: send bytes, receive whole messages, run simple queries."""

    def __init__(self, stream: trio.abc.Stream, conninfo):
        self.stream = stream
        self.conninfo = conninfo
        self.buffer = MessageBuffer()
        self.parameters: dict[str, str] = {}
        self.backend_pid = 0
        self._send_lock = trio.Lock()

    @property
    def server_version_num(self) -> int:
        """server_version as the integer PostgreSQL uses (150004 for 15.4)."""
        text = self.parameters.get("server_version", "0").split()[0]
        parts = [int(p) for p in re.findall(r"\d+", text)[:2]] + [0]
        return parts[0] * 10000 + (parts[1] if parts[0] >= 10 else 0)

    async def send(self, data: bytes) -> None:
        try:
            async with self._send_lock:
                await self.stream.send_all(data)
        except _IO_ERRORS as exc:
            raise ConnectionLost(f"connection to PostgreSQL lost while sending: {exc}") from None

    async def receive_some(self) -> bytes:
        try:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        except _IO_ERRORS as exc:
            raise ConnectionLost(f"connection to PostgreSQL lost: {exc}") from None
        if not data:
            raise ConnectionLost("PostgreSQL closed the connection")
        return data

    async def receive_message(self) -> tuple[int, bytes]:
        """The next message that is not an asynchronous one (see handle_asynchronous)."""
        while True:
            message = self.buffer.next_message()
            if message is None:
                self.buffer.feed(await self.receive_some())
            elif not self.handle_asynchronous(*message):
                return message

    def handle_asynchronous(self, tag: int, body: bytes) -> bool:
        """Messages the server may send at any time ("Asynchronous Operations" in the protocol
        docs): a notice is logged, a parameter status recorded, a notification ignored.  False
        for any other message."""
        if tag == NOTICE_RESPONSE:
            fields = decode_error_fields(body, "NoticeResponse")
            logger.info("PostgreSQL %s: %s", fields.get("S", "NOTICE"), fields.get("M", ""))
        elif tag == PARAMETER_STATUS:
            name, value = decode_parameter_status(body)
            self.parameters[name] = value
        elif tag != NOTIFICATION_RESPONSE:
            return False
        return True

    async def simple_query(self, sql: str, timeout_s: float = DEFAULT_QUERY_TIMEOUT_S) -> list[tuple]:
        """Run a statement (or several: the rows of all); returns its rows (tuples of str or None).
        ServerError on failure."""
        return await self._query(sql, timeout_s, DATA_ROW.value, decode_data_row)

    async def copy_out(self, sql: str, convert_line: Callable[[bytes], object],
                       timeout_s: float = DEFAULT_QUERY_TIMEOUT_S) -> list:
        """Run `COPY ... TO STDOUT` (text format); returns its rows, each line (its newline
        included, as CopyData brings it) through `convert_line`.  ServerError on failure."""
        return await self._query(sql, timeout_s, COPY_DATA.value, convert_line)

    async def _query(self, sql: str, timeout_s: float, row_tag: int, convert: Callable[[bytes], object]) -> list:
        await self.send(encode_query(sql))
        rows: list = []
        append, buffer, error = rows.append, self.buffer, None
        with trio.move_on_after(timeout_s) as scope:
            while True:
                bodies = buffer.next_bodies(row_tag, QUERY_YIELD_EVERY_ROWS)
                if bodies:
                    rows += map(convert, bodies)
                    await trio.lowlevel.checkpoint()  # many rows must not hold up other tasks
                    continue
                tag, body = await self.receive_message()
                if tag == row_tag:  # a row split across reads
                    append(convert(body))
                elif tag == ERROR_RESPONSE:
                    error = ServerError(decode_error_fields(body))
                elif tag == READY_FOR_QUERY:
                    break
                elif tag not in (ROW_DESCRIPTION, COMMAND_COMPLETE, EMPTY_QUERY_RESPONSE, COPY_OUT_RESPONSE,
                                 COPY_DONE):
                    raise ProtocolError(f"unexpected message {chr(tag)!r} in reply to a query")
        if scope.cancelled_caught:
            raise ConnectionLost(f"PostgreSQL did not answer within {timeout_s:g} s: {sql.split()[0]}")
        if error:
            raise error
        return rows

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.send_all(encode_terminate())
            except _IO_ERRORS:
                pass
            try:
                await self.stream.aclose()
            except _IO_ERRORS:
                pass


async def _open_socket(conninfo) -> trio.abc.Stream:
    try:
        if is_unix_socket(conninfo.host):
            return await trio.open_unix_socket(f"{conninfo.host}/.s.PGSQL.{conninfo.port}")
        stream = await trio.open_tcp_stream(conninfo.host, conninfo.port)
        set_tcp_keepalive(stream.socket)
        return stream
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to PostgreSQL at {_where(conninfo)}: {describe_os_error(exc)}") from None


def describe_os_error(exc: OSError) -> str:
    """The operating system's reason, once: "Connection refused" rather than Trio's "all attempts
    to connect to host:port failed" around it (the address is named by the caller)."""
    causes = getattr(exc.__cause__, "exceptions", None) or [exc]
    reasons = dict.fromkeys(os.strerror(cause.errno) if (cause.errno or 0) > 0 else cause.strerror or str(cause)
                            for cause in causes if isinstance(cause, OSError))
    return "; ".join(reasons) or str(exc)


TCP_KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 6}  #: a dead peer noticed in 2 min


def set_tcp_keepalive(sock) -> None:
    """TCP keepalives on the connection to PostgreSQL, as libpq's keepalives_* do: a peer gone
    without a word (a cut network, a crashed host) is noticed even where wal2http waits on the
    server without a deadline of its own (CREATE_REPLICATION_SLOT waits for running transactions)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in TCP_KEEPALIVE.items():
        if hasattr(socket, name):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _where(conninfo) -> str:
    if is_unix_socket(conninfo.host):
        return f"{conninfo.host}/.s.PGSQL.{conninfo.port}"
    return f"{conninfo.host}:{conninfo.port}"


async def _start_tls(stream: trio.abc.Stream, conninfo) -> trio.abc.Stream | None:
    """SSLRequest; returns the TLS stream, or None when the server declined."""
    await stream.send_all(encode_ssl_request())
    answer = await stream.receive_some(1)  # exactly one byte: nothing may be buffered before TLS
    if answer == b"N":
        return None
    if answer != b"S":
        raise ProtocolError(f"unexpected answer to SSLRequest: {answer!r}")
    verify = _tls_verification(conninfo)
    host = conninfo.host
    sni = host if (verify == "full" or not is_ip_address(host)) else None
    tls = trio.SSLStream(stream, _ssl_context(conninfo, verify), server_hostname=sni)
    try:
        await tls.do_handshake()
    except _IO_ERRORS as exc:
        cause = exc if isinstance(exc, ssl.SSLCertVerificationError) else exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise AuthenticationError(f"TLS verification of PostgreSQL at {_where(conninfo)} failed "
                                      f"(sslmode={conninfo.sslmode}): {cause.verify_message}") from None
        raise ConnectionLost(f"TLS handshake with PostgreSQL at {_where(conninfo)} failed: {exc}") from None
    return tls


async def _authenticate(conn: PgConnection) -> None:
    """From StartupMessage to ReadyForQuery: the server's requests answered by an Authenticator."""
    info = conn.conninfo
    authenticator = Authenticator(info.user, info.password)
    while True:
        tag, body = await conn.receive_message()
        if tag == READY_FOR_QUERY:
            return
        if tag == ERROR_RESPONSE:
            raise classify_server_error(ServerError(decode_error_fields(body)),
                                        f"PostgreSQL refused the connection as user {info.user!r}")
        if tag == AUTHENTICATION:
            reply = authenticator.answer(*decode_authentication(body))
            if reply:
                await conn.send(reply)
        elif tag == BACKEND_KEY_DATA:
            conn.backend_pid = _INT32.unpack_from(body)[0] if len(body) >= 4 else 0
        elif tag != NEGOTIATE_PROTOCOL_VERSION:
            raise ProtocolError(f"unexpected message {chr(tag)!r} during authentication")


def build_startup_parameters(conninfo, replication: bool) -> dict[str, str]:
    params = {"user": conninfo.user, "database": conninfo.dbname,
              "application_name": conninfo.application_name, **SESSION_SETTINGS}
    if replication:
        params["replication"] = "database"
    return params


@contextlib.asynccontextmanager
async def open_pg_connection(conninfo, *, replication: bool = True):
    """An authenticated connection to the first host that fits, closed on exit.  Honours
    sslmode and target_session_attrs like libpq."""
    conn = await connect_to_first_fitting_host(conninfo, replication)
    try:
        yield conn
    finally:
        await conn.aclose()


async def connect_to_first_fitting_host(conninfo, replication: bool) -> PgConnection:
    """Each host in turn, as libpq: one that cannot be reached (refused, timed out after
    connect_timeout, or "not now" from the server) or does not fit target_session_attrs is
    skipped with a log line; an authentication or TLS-verification failure is not (exit 4).
    prefer-standby tries every host for a standby first, then any of them."""
    wanted = conninfo.target_session_attrs
    hosts = conninfo.each_host()
    skipped = []
    for attrs in ("standby", "any") if wanted == "prefer-standby" else (wanted,):
        for target in hosts:
            try:
                conn = await _connect_in_time(target, replication)
            except ConnectionLost as exc:
                if len(hosts) == 1 and attrs == wanted:
                    raise
                skipped.append(f"{_where(target)}: {exc}")
                logger.warning("skipping PostgreSQL at %s: %s", _where(target), exc)
                continue
            misfit = await describe_session_misfit(conn, attrs)
            if misfit is None:
                if len(hosts) > 1:
                    logger.info("connected to PostgreSQL at %s", _where(target))
                return conn
            await conn.aclose()
            skipped.append(f"{_where(target)}: {misfit}")
            logger.warning("skipping PostgreSQL at %s: %s (target_session_attrs=%s)", _where(target), misfit, attrs)
    raise ConnectionLost(f"no PostgreSQL host fits target_session_attrs={wanted}: {'; '.join(skipped)}")


async def _connect_in_time(conninfo, replication: bool) -> PgConnection:
    try:
        with trio.fail_after(conninfo.connect_timeout_s):
            return await _connect(conninfo, replication)
    except trio.TooSlowError:
        raise ConnectionLost(f"cannot connect to PostgreSQL at {_where(conninfo)}: "
                             f"no answer within connect_timeout={conninfo.connect_timeout_s:g} s") from None


async def describe_session_misfit(conn: PgConnection, attrs: str) -> str | None:
    """None when the server fits target_session_attrs `attrs`, else why not.  As libpq: from
    PostgreSQL 14 the server reports in_hot_standby and default_transaction_read_only at start-up;
    older ones are asked."""
    if attrs == "any":
        return None
    standby = conn.parameters.get("in_hot_standby")
    if standby is None:
        (recovery,), = await conn.simple_query("SELECT pg_catalog.pg_is_in_recovery()")
        standby = "on" if recovery == "t" else "off"
    read_only = conn.parameters.get("default_transaction_read_only")
    if read_only is None:
        (read_only,), = await conn.simple_query("SHOW transaction_read_only")
    read_only = "on" if standby == "on" else read_only
    misfits = {"read-write": (read_only == "on", "it is read-only"),
               "read-only": (read_only != "on", "it accepts writes"),
               "primary": (standby == "on", "it is a standby"),
               "standby": (standby != "on", "it is not a standby")}
    misfit, reason = misfits[attrs]
    return reason if misfit else None


async def _connect(conninfo, replication: bool) -> PgConnection:
    mode = "disable" if is_unix_socket(conninfo.host) else conninfo.sslmode  # libpq: no TLS on Unix sockets
    try:
        return await _connect_once(conninfo, replication, tls=mode not in ("disable", "allow"))
    except AuthenticationError:
        if mode != "allow":
            raise
        return await _connect_once(conninfo, replication, tls=True)  # allow: plain first, then TLS


async def _connect_once(conninfo, replication: bool, tls: bool) -> PgConnection:
    stream = await _open_socket(conninfo)
    try:
        if tls:
            tls_stream = await _start_tls(stream, conninfo)
            if tls_stream is None and conninfo.sslmode in ("require", "verify-ca", "verify-full"):
                raise PreconditionError(f"PostgreSQL at {_where(conninfo)} does not accept TLS "
                                        f"but DATABASE_URL says sslmode={conninfo.sslmode}")
            stream = tls_stream or stream
        conn = PgConnection(stream, conninfo)
        await conn.send(encode_startup(build_startup_parameters(conninfo, replication)))
        await _authenticate(conn)
        return conn
    except _IO_ERRORS as exc:
        await _close_quietly(stream)
        raise ConnectionLost(f"connection to PostgreSQL at {_where(conninfo)} failed: {exc}") from None
    except BaseException:
        await _close_quietly(stream)
        raise


async def _close_quietly(stream) -> None:
    with trio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except _IO_ERRORS:
            pass


# =====================================================================================================
# 5. Replication framing (sans-IO)
# =====================================================================================================
# Inside CopyData during START_REPLICATION ("Streaming Replication Protocol"): XLogData 'w' and
# Primary keepalive 'k' from the server, Standby status update 'r' from us.  Times are
# microseconds since 2000-01-01 UTC.


@enum.global_enum
class ReplicationMessage(_Tag):
    """What the first byte of a CopyData says it carries."""

    XLOG_DATA = "w"
    PRIMARY_KEEPALIVE = "k"
    STANDBY_STATUS_UPDATE = "r"


PG_EPOCH_OFFSET_US = 946_684_800_000_000  #: 2000-01-01 minus 1970-01-01, in microseconds

#: XLogData's header: 'w', wal_start, wal_end, and the server's clock (skipped: nothing reads it);
#: the pgoutput message follows it.
XLOG_DATA_HEADER = struct.Struct("!BQQ8x")
#: A CopyData holding XLogData, up to the pgoutput message: (tag, length, *XLOG_DATA_HEADER).
XLOG_DATA_FRAME = copy_data_layout(XLOG_DATA_HEADER)
_KEEPALIVE = struct.Struct("!BQQB")
_STATUS_UPDATE = struct.Struct("!BQQQQB")


def decode_xlog_data(body: bytes) -> tuple[int, int, bytes]:
    """XLogData (a CopyData body starting with 'w'): (wal_start, wal_end, the pgoutput message)."""
    header = XLOG_DATA_HEADER
    if len(body) < header.size:
        raise ProtocolError("malformed XLogData message: truncated header")
    _, wal_start, wal_end = header.unpack_from(body)
    return wal_start, wal_end, body[header.size:]


def decode_keepalive(data: bytes) -> tuple[int, bool]:
    """Primary keepalive: (wal_end, reply_requested)."""
    if len(data) != _KEEPALIVE.size:
        raise ProtocolError("malformed Primary keepalive message: wrong length")
    _, wal_end, _, reply = _KEEPALIVE.unpack(data)
    return wal_end, bool(reply)


def encode_standby_status(write_lsn: int, flush_lsn: int, apply_lsn: int, now_us: int,
                          reply_requested: bool = False) -> bytes:
    """Standby status update, already wrapped in CopyData."""
    clock = now_us - PG_EPOCH_OFFSET_US
    return encode_copy_data(_STATUS_UPDATE.pack(STANDBY_STATUS_UPDATE, write_lsn, flush_lsn,
                                                apply_lsn, clock, int(reply_requested)))


# =====================================================================================================
# 6. pgoutput decoder
# =====================================================================================================
# Pure: bytes in, frozen dataclasses out.  Layouts from the PostgreSQL docs, "Logical Replication
# Message Formats" (protocol.sgml).  Integers are big-endian; xids and OIDs unsigned; LSNs are
# ints; timestamps stay raw ints (microseconds since 2000-01-01 UTC).  Inside a streamed block
# (between Stream Start and Stream Stop) Relation, Type, Insert, Update, Delete, Truncate and
# Message carry the (sub)transaction xid first (protocol 2+).  On the hot path the envelope's
# RelationWriter (section 8) reads the TupleData of Insert, Update and Delete itself, with the
# constants below; what it does not take is decoded here, with the exact errors.

@enum.global_enum
class PgoutputMessage(_Tag):
    """pgoutput message tags; `doc_name` is the message's name in the docs ("Stream Start")."""

    BEGIN = "B"
    MESSAGE = "M"
    COMMIT = "C"
    ORIGIN = "O"
    RELATION = "R"
    TYPE = "Y"
    INSERT = "I"
    UPDATE = "U"
    DELETE = "D"
    TRUNCATE = "T"
    STREAM_START = "S"
    STREAM_STOP = "E"
    STREAM_COMMIT = "c"
    STREAM_ABORT = "A"
    BEGIN_PREPARE = "b"
    PREPARE = "P"
    COMMIT_PREPARED = "K"
    ROLLBACK_PREPARED = "r"
    STREAM_PREPARE = "p"

    @property
    def doc_name(self) -> str:
        return self.name.replace("_", " ").title()


TUPLE_NEW = ord("N")  #: Insert/Update: a new tuple follows
TUPLE_KEY = ord("K")  #: Update/Delete: the old replica identity key follows
TUPLE_OLD = ord("O")  #: Update/Delete: the whole old row follows (REPLICA IDENTITY FULL)
VALUE_NULL = ord("n")
VALUE_UNCHANGED_TOAST = ord("u")
VALUE_TEXT = ord("t")
VALUE_BINARY = ord("b")

COLUMN_FLAG_KEY = 1  #: Relation column flag: part of the replica identity
MESSAGE_FLAG_TRANSACTIONAL = 1
TRUNCATE_CASCADE = 1
TRUNCATE_RESTART_IDENTITY = 2
REPLICA_IDENTITIES = frozenset("dnfi")  #: default, nothing, full, index (pg_class.relreplident)


class _UnchangedToast:
    """Type of UNCHANGED_TOAST: a column whose large value PostgreSQL did not send."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


#: Tuple value of kind 'u': the value is stored out of line (TOAST) and was not changed.
UNCHANGED_TOAST = _UnchangedToast()

#: A decoded tuple: per column None ('n'), UNCHANGED_TOAST ('u'), str ('t') or bytes ('b').
TupleData = tuple


@dataclasses.dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time: int
    xid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    xid: int | None
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclasses.dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Column:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & COLUMN_FLAG_KEY)


@dataclasses.dataclass(frozen=True, slots=True)
class Relation:
    xid: int | None
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Type:
    xid: int | None
    oid: int
    namespace: str
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Insert:
    xid: int | None
    relid: int
    new: TupleData


@dataclasses.dataclass(frozen=True, slots=True)
class Update:
    xid: int | None
    relid: int
    old_kind: str | None
    old: TupleData | None
    new: TupleData


@dataclasses.dataclass(frozen=True, slots=True)
class Delete:
    xid: int | None
    relid: int
    old_kind: str
    old: TupleData


@dataclasses.dataclass(frozen=True, slots=True)
class Truncate:
    xid: int | None
    options: int
    relids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & TRUNCATE_CASCADE)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & TRUNCATE_RESTART_IDENTITY)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclasses.dataclass(frozen=True, slots=True)
class StreamStop:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclasses.dataclass(frozen=True, slots=True)
class StreamAbort:
    xid: int
    subxid: int
    abort_lsn: int | None = None  # protocol 4 with streaming = parallel only
    abort_time: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class BeginPrepare:
    prepare_lsn: int
    end_lsn: int
    prepare_time: int
    xid: int
    gid: str


@dataclasses.dataclass(frozen=True, slots=True)
class Prepare:
    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: int
    xid: int
    gid: str


@dataclasses.dataclass(frozen=True, slots=True)
class CommitPrepared:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int
    xid: int
    gid: str


@dataclasses.dataclass(frozen=True, slots=True)
class RollbackPrepared:
    flags: int
    prepare_end_lsn: int
    rollback_end_lsn: int
    prepare_time: int
    rollback_time: int
    xid: int
    gid: str


@dataclasses.dataclass(frozen=True, slots=True)
class StreamPrepare:
    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: int
    xid: int
    gid: str


class _Malformed(Exception):
    """Raised inside a decoder; decode_pgoutput turns it into ProtocolError naming the message."""


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_BEGIN = struct.Struct(">QqI")            # final_lsn, commit_time, xid
_MESSAGE = struct.Struct(">BQ")           # flags, lsn
_COMMIT = struct.Struct(">BQQq")          # flags, commit_lsn, end_lsn, commit_time
_ORIGIN = struct.Struct(">Q")             # commit_lsn on the origin
_RELATION_TAIL = struct.Struct(">BH")     # replica identity, number of columns
_COLUMN_TAIL = struct.Struct(">Ii")       # type oid, type modifier (-1: none)
_TRUNCATE = struct.Struct(">IB")          # number of relations, options
_STREAM_START = struct.Struct(">IB")      # xid, first segment
_STREAM_COMMIT = struct.Struct(">IBQQq")  # xid, flags, commit_lsn, end_lsn, commit_time
_STREAM_ABORT = struct.Struct(">II")      # xid, subxid
_STREAM_ABORT_PARALLEL = struct.Struct(">IIQq")  # ... abort_lsn, abort_time
_BEGIN_PREPARE = struct.Struct(">QQqI")   # prepare_lsn, end_lsn, prepare_time, xid
_PREPARE = struct.Struct(">BQQqI")        # flags, lsn, end_lsn, time, xid (also Commit/Stream Prepared)
_ROLLBACK_PREPARED = struct.Struct(">BQQqqI")


def _decode_string(data: bytes, pos: int) -> tuple[str, int]:
    """A NUL-terminated UTF-8 String at pos: (text, position after the NUL)."""
    end = data.find(0, pos)
    if end < 0:
        raise _Malformed("truncated string")
    return data[pos:end].decode(), end + 1


def _decode_tuple(data: bytes, pos: int) -> tuple[TupleData, int]:
    """TupleData at pos: (values, position after it)."""
    (count,) = _U16.unpack_from(data, pos)
    pos += 2
    size_of = _U32.unpack_from
    length = len(data)
    values = []
    append = values.append
    for _ in range(count):
        kind = data[pos]
        if kind == VALUE_TEXT:
            start = pos + 5
            pos = start + size_of(data, pos + 1)[0]
            if pos > length:
                raise _Malformed("truncated tuple data")
            append(data[start:pos].decode())
        elif kind == VALUE_NULL:
            append(None)
            pos += 1
        elif kind == VALUE_UNCHANGED_TOAST:
            append(UNCHANGED_TOAST)
            pos += 1
        elif kind == VALUE_BINARY:
            start = pos + 5
            pos = start + size_of(data, pos + 1)[0]
            if pos > length:
                raise _Malformed("truncated tuple data")
            append(data[start:pos])
        else:
            raise _Malformed(f"unknown tuple value kind {kind:#04x}")
    return tuple(values), pos


def _decode_xid(data: bytes, in_stream: bool) -> tuple[int | None, int]:
    """The leading xid of a change inside a streamed block: (xid or None, offset after it)."""
    if in_stream:
        return _U32.unpack_from(data, 1)[0], 5
    return None, 1


def _expect_end(data: bytes, pos: int) -> None:
    if pos != len(data):
        raise _Malformed("trailing bytes" if pos < len(data) else "truncated")


def decode_begin(data: bytes, in_stream: bool) -> Begin:
    _expect_end(data, 1 + _BEGIN.size)
    return Begin(*_BEGIN.unpack_from(data, 1))


def decode_message(data: bytes, in_stream: bool) -> Message:
    xid, pos = _decode_xid(data, in_stream)
    flags, lsn = _MESSAGE.unpack_from(data, pos)
    prefix, pos = _decode_string(data, pos + _MESSAGE.size)
    (size,) = _U32.unpack_from(data, pos)
    pos += 4
    _expect_end(data, pos + size)
    return Message(xid, bool(flags & MESSAGE_FLAG_TRANSACTIONAL), lsn, prefix, data[pos:])


def decode_commit(data: bytes, in_stream: bool) -> Commit:
    _expect_end(data, 1 + _COMMIT.size)
    return Commit(*_COMMIT.unpack_from(data, 1))


def decode_origin(data: bytes, in_stream: bool) -> Origin:
    (commit_lsn,) = _ORIGIN.unpack_from(data, 1)
    name, pos = _decode_string(data, 1 + _ORIGIN.size)
    _expect_end(data, pos)
    return Origin(commit_lsn, name)


def decode_relation(data: bytes, in_stream: bool) -> Relation:
    xid, pos = _decode_xid(data, in_stream)
    (oid,) = _U32.unpack_from(data, pos)
    namespace, pos = _decode_string(data, pos + 4)
    name, pos = _decode_string(data, pos)
    identity, count = _RELATION_TAIL.unpack_from(data, pos)
    if chr(identity) not in REPLICA_IDENTITIES:
        raise _Malformed(f"unknown replica identity {identity:#04x}")
    pos += _RELATION_TAIL.size
    columns = []
    for _ in range(count):
        flags = data[pos]
        column_name, pos = _decode_string(data, pos + 1)
        type_oid, modifier = _COLUMN_TAIL.unpack_from(data, pos)
        pos += _COLUMN_TAIL.size
        columns.append(Column(flags, column_name, type_oid, modifier))
    _expect_end(data, pos)
    return Relation(xid, oid, namespace, name, chr(identity), tuple(columns))


def decode_type(data: bytes, in_stream: bool) -> Type:
    xid, pos = _decode_xid(data, in_stream)
    (oid,) = _U32.unpack_from(data, pos)
    namespace, pos = _decode_string(data, pos + 4)
    name, pos = _decode_string(data, pos)
    _expect_end(data, pos)
    return Type(xid, oid, namespace, name)


def decode_insert(data: bytes, in_stream: bool) -> Insert:
    xid, pos = _decode_xid(data, in_stream)
    (relid,) = _U32.unpack_from(data, pos)
    if data[pos + 4] != TUPLE_NEW:
        raise _Malformed(f"expected 'N', got {data[pos + 4]:#04x}")
    new, pos = _decode_tuple(data, pos + 5)
    _expect_end(data, pos)
    return Insert(xid, relid, new)


def decode_update(data: bytes, in_stream: bool) -> Update:
    xid, pos = _decode_xid(data, in_stream)
    (relid,) = _U32.unpack_from(data, pos)
    kind = data[pos + 4]
    old_kind = old = None
    pos += 5
    if kind == TUPLE_KEY or kind == TUPLE_OLD:
        old_kind = chr(kind)
        old, pos = _decode_tuple(data, pos)
        kind = data[pos]
        pos += 1
    if kind != TUPLE_NEW:
        raise _Malformed(f"expected 'N', got {kind:#04x}")
    new, pos = _decode_tuple(data, pos)
    _expect_end(data, pos)
    return Update(xid, relid, old_kind, old, new)


def decode_delete(data: bytes, in_stream: bool) -> Delete:
    xid, pos = _decode_xid(data, in_stream)
    (relid,) = _U32.unpack_from(data, pos)
    kind = data[pos + 4]
    if kind != TUPLE_KEY and kind != TUPLE_OLD:
        raise _Malformed(f"expected 'K' or 'O', got {kind:#04x}")
    old, pos = _decode_tuple(data, pos + 5)
    _expect_end(data, pos)
    return Delete(xid, relid, chr(kind), old)


def decode_truncate(data: bytes, in_stream: bool) -> Truncate:
    xid, pos = _decode_xid(data, in_stream)
    count, options = _TRUNCATE.unpack_from(data, pos)
    pos += _TRUNCATE.size
    _expect_end(data, pos + 4 * count)  # before unpacking: a huge count must not allocate
    return Truncate(xid, options, struct.unpack_from(f">{count}I", data, pos))


def decode_stream_start(data: bytes, in_stream: bool) -> StreamStart:
    _expect_end(data, 1 + _STREAM_START.size)
    xid, first = _STREAM_START.unpack_from(data, 1)
    return StreamStart(xid, first == 1)


def decode_stream_stop(data: bytes, in_stream: bool) -> StreamStop:
    _expect_end(data, 1)
    return StreamStop()


def decode_stream_commit(data: bytes, in_stream: bool) -> StreamCommit:
    _expect_end(data, 1 + _STREAM_COMMIT.size)
    return StreamCommit(*_STREAM_COMMIT.unpack_from(data, 1))


def decode_stream_abort(data: bytes, in_stream: bool) -> StreamAbort:
    # abort_lsn and abort_time follow only with protocol 4 and streaming = parallel: the length
    # tells which form this is.
    if len(data) == 1 + _STREAM_ABORT_PARALLEL.size:
        return StreamAbort(*_STREAM_ABORT_PARALLEL.unpack_from(data, 1))
    _expect_end(data, 1 + _STREAM_ABORT.size)
    return StreamAbort(*_STREAM_ABORT.unpack_from(data, 1))


def _decode_prepared(data: bytes, layout: struct.Struct, cls):
    fields = layout.unpack_from(data, 1)
    gid, pos = _decode_string(data, 1 + layout.size)
    _expect_end(data, pos)
    return cls(*fields, gid)


def decode_begin_prepare(data: bytes, in_stream: bool) -> BeginPrepare:
    return _decode_prepared(data, _BEGIN_PREPARE, BeginPrepare)


def decode_prepare(data: bytes, in_stream: bool) -> Prepare:
    return _decode_prepared(data, _PREPARE, Prepare)


def decode_commit_prepared(data: bytes, in_stream: bool) -> CommitPrepared:
    return _decode_prepared(data, _PREPARE, CommitPrepared)


def decode_rollback_prepared(data: bytes, in_stream: bool) -> RollbackPrepared:
    return _decode_prepared(data, _ROLLBACK_PREPARED, RollbackPrepared)


def decode_stream_prepare(data: bytes, in_stream: bool) -> StreamPrepare:
    return _decode_prepared(data, _PREPARE, StreamPrepare)


#: Message tag -> decoder(data, in_stream).  Keyed by plain ints: a received tag finds its entry
#: without an enum comparison.
PGOUTPUT_DECODERS: dict[int, Callable[[bytes, bool], object]] = {
    BEGIN.value: decode_begin, MESSAGE.value: decode_message, COMMIT.value: decode_commit,
    ORIGIN.value: decode_origin, RELATION.value: decode_relation, TYPE.value: decode_type,
    INSERT.value: decode_insert, UPDATE.value: decode_update, DELETE.value: decode_delete,
    TRUNCATE.value: decode_truncate, STREAM_START.value: decode_stream_start,
    STREAM_STOP.value: decode_stream_stop, STREAM_COMMIT.value: decode_stream_commit,
    STREAM_ABORT.value: decode_stream_abort, BEGIN_PREPARE.value: decode_begin_prepare,
    PREPARE.value: decode_prepare, COMMIT_PREPARED.value: decode_commit_prepared,
    ROLLBACK_PREPARED.value: decode_rollback_prepared, STREAM_PREPARE.value: decode_stream_prepare,
}


def decode_pgoutput(data: bytes, in_stream: bool = False):
    """One pgoutput message (an XLogData payload) as a dataclass.

    `in_stream`: whether we are between Stream Start and Stream Stop (the change messages then
    carry a leading xid).  Raises ProtocolError for anything malformed, naming the message.
    """
    try:
        decoder = PGOUTPUT_DECODERS[data[0]]
    except IndexError:
        raise ProtocolError("malformed pgoutput message: empty") from None
    except KeyError:
        raise ProtocolError(f"malformed pgoutput message: unknown message type {data[0]:#04x}") from None
    try:
        return decoder(data, in_stream)
    except _Malformed as exc:
        reason = str(exc)
    except (struct.error, IndexError):
        reason = "truncated"
    except UnicodeDecodeError:
        reason = "invalid UTF-8"
    raise ProtocolError(f"malformed pgoutput {PgoutputMessage(data[0]).doc_name} message: {reason}")


# =====================================================================================================
# 7. Type conversion
# =====================================================================================================
# Pure: PostgreSQL's text output of a value -> its JSON value (the README's "Events").  The
# session settings (DateStyle ISO, TimeZone UTC, extra_float_digits 3, bytea_output hex) fix the
# text forms.  A converter in TYPE_CONVERTERS may raise ValueError (or RecursionError, for very
# deep JSON) on text PostgreSQL never prints; `convert_value` and the assembler then keep the text:
# a data value never breaks the stream.

_FLOAT_WORDS = frozenset(("NaN", "Infinity", "-Infinity"))
_INFINITY = float("inf")
_OFFSET_TIMESTAMP = re.compile(
    r"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(\.\d+)?([+-])(\d\d)(?::(\d\d))?(?::(\d\d))?")
_BYTEA_ESCAPE = re.compile(rb"\\(\\|[0-3][0-7]{2})")
_ARRAY_DIMENSIONS = re.compile(r"(?:\[-?\d+:-?\d+\])+=")
# Array text as array_out prints it: a quoted element (backslash escapes inside), an unquoted
# element (never empty, never with whitespace, quotes, braces, commas or backslashes), or
# punctuation.
_ARRAY_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|([^{},"\\\s]+)|([{},])', re.S)
_ARRAY_ESCAPE = re.compile(r"\\(.)", re.S)


def convert_text(text: str) -> str:
    """text, varchar, char, name, uuid, numeric, date, time, timetz, interval and the fallback."""
    return text


def convert_bool(text: str) -> bool:
    if text == "t":
        return True
    if text == "f":
        return False
    raise ValueError(f"not a bool: {text!r}")


def convert_float(text: str) -> float | str:
    """float4/float8: a number, or the strings NaN, Infinity, -Infinity (JSON has no such numbers)."""
    if text in _FLOAT_WORDS:
        return text
    value = float(text)
    if value == _INFINITY or value == -_INFINITY:
        raise ValueError(f"float out of range: {text!r}")  # PostgreSQL prints no such finite text
    return value


def _convert_json_float(text: str) -> float:
    value = float(text)
    if value == _INFINITY or value == -_INFINITY:  # e.g. 1e400 in a json (not jsonb) column
        raise ValueError(f"JSON number out of float range: {text!r}")
    return value


def _not_a_json_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity, -Infinity: Python's json reads them


# Built once: json.loads with a keyword argument would build a decoder per call (3x slower).
_JSON_DECODER = json.JSONDecoder(parse_float=_convert_json_float, parse_constant=_not_a_json_constant)
_JSON_SCAN = _JSON_DECODER.scan_once


def convert_json(text: str):
    """json, jsonb: the JSON value itself.  The C scanner directly (json.loads minus its Python
    layers: a third of the cost on the hot path); anything unusual goes the full way."""
    try:
        value, end = _JSON_SCAN(text, 0)
    except StopIteration:
        end = -1
    return value if end == len(text) else _JSON_DECODER.decode(text)


def convert_bytea(text: str) -> str:
    """bytea: base64 of the bytes.  Hex output (\\x0a0b) normally; escape output understood too."""
    if text.startswith("\\x"):
        return base64.b64encode(bytes.fromhex(text[2:])).decode("ascii")
    raw = text.encode("ascii")
    if _BYTEA_ESCAPE.sub(b"", raw).count(b"\\"):
        raise ValueError("malformed bytea escape output")
    raw = _BYTEA_ESCAPE.sub(lambda m: b"\\" if m[1] == b"\\" else bytes((int(m[1], 8),)), raw)
    return base64.b64encode(raw).decode("ascii")


def convert_timestamp(text: str) -> str:
    """timestamp '2026-11-27 16:25:11.123456' -> '2026-11-27T16:25:11.123456'.

    'infinity' / '-infinity' stay.  Years before 1 AD ('0044-03-15 12:00:00 BC') keep
    PostgreSQL's text unchanged: ISO 8601 would need astronomical year numbering (BC 44 is year
    -0043), which readers rarely expect; the ' BC' suffix is unambiguous.
    """
    if text.endswith(" BC"):
        return text
    return text.replace(" ", "T", 1)


def convert_timestamptz(text: str) -> str:
    """timestamptz '2026-11-27 16:25:11.123456+00' -> '2026-11-27T16:25:11.123456Z' (UTC).

    With TimeZone UTC PostgreSQL always prints '+00'; another offset (a server that ignored our
    setting) is converted to UTC when the year is in 1..9999, else kept as text.  'infinity',
    '-infinity' and ' BC' years stay as PostgreSQL prints them (see convert_timestamp).
    """
    if text.endswith("+00"):
        return text[:-3].replace(" ", "T", 1) + "Z"
    match = _OFFSET_TIMESTAMP.fullmatch(text)
    if match is None:
        return text
    year, month, day, hour, minute, second, fraction, sign, oh, om, os_ = match.groups()
    offset = datetime.timedelta(hours=int(oh), minutes=int(om or 0), seconds=int(os_ or 0))
    try:
        local = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
        utc = local - offset if sign == "+" else local + offset
    except (ValueError, OverflowError):
        return text
    return f"{utc.isoformat()}{fraction or ''}Z"


def _unescape_array_element(text: str) -> str:
    return _ARRAY_ESCAPE.sub(r"\1", text) if "\\" in text else text


def _convert_element(text: str, convert) -> object:
    return text if convert is None else convert(text)


def decode_array_text(text: str, convert: Callable[[str], object] | None = None) -> list:
    """PostgreSQL's array text output -> nested lists, elements through `convert`.

    Handles `{a,b}`, quoted elements with backslash escapes, unquoted NULL (None) versus quoted
    "NULL" (a string), nested dimensions, `{}` and the `[lb:ub]=` decoration printed when a lower
    bound is not 1.  Raises ValueError on text array_out would not print.
    """
    if text.startswith("["):
        match = _ARRAY_DIMENSIONS.match(text)
        if match is None:
            raise ValueError("malformed array dimensions")
        text = text[match.end():]
    inner = text[1:-1]
    if (text[:1] == "{" and text[-1:] == "}" and '"' not in inner and "{" not in inner
            and "}" not in inner and "\\" not in inner and " " not in inner):
        return _decode_flat_array(inner, convert)  # the common case: one dimension, no quoting
    return _decode_nested_array(text, convert)


def _decode_flat_array(inner: str, convert) -> list:
    if not inner:
        return []
    values = []
    for item in inner.split(","):
        if not item or item.isspace():
            raise ValueError("empty array element")
        values.append(None if item.upper() == "NULL" else _convert_element(item, convert))
    return values


def _decode_nested_array(text: str, convert) -> list:
    if text[:1] != "{":
        raise ValueError("array text must start with '{'")
    root: list = []
    stack = [root]
    pos, expect_item, allow_close = 1, True, True  # just after '{'
    match = _ARRAY_TOKEN.match
    while stack:
        token = match(text, pos)
        if token is None:
            raise ValueError(f"malformed array at offset {pos}")
        pos = token.end()
        quoted, bare, punct = token.groups()
        if punct == ",":
            if expect_item:
                raise ValueError("misplaced ','")
            expect_item, allow_close = True, False
        elif punct == "}":
            if not allow_close:
                raise ValueError("misplaced '}'")
            stack.pop()
            expect_item, allow_close = False, True
        elif not expect_item:
            raise ValueError("missing ','")
        elif punct == "{":
            child: list = []
            stack[-1].append(child)
            stack.append(child)
            allow_close = True
        else:
            if quoted is not None:
                value = _convert_element(_unescape_array_element(quoted), convert)
            else:
                value = None if bare.upper() == "NULL" else _convert_element(bare, convert)
            stack[-1].append(value)
            expect_item, allow_close = False, True
    if pos != len(text):
        raise ValueError("trailing text after array")
    return root


def _make_array_converter(element: Callable[[str], object] | None) -> Callable[[str], object]:
    """A converter for arrays of a type: JSON arrays, or the raw text when it is malformed."""
    convert = None if element is convert_text else element

    def convert_array(text: str) -> list | str:
        try:
            return decode_array_text(text, convert)
        except (ValueError, RecursionError):
            return text

    return convert_array


#: Scalar type OID -> converter, for the types the README's "Events" lists (pg_type.oid).
_SCALAR_CONVERTERS: dict[int, Callable[[str], object]] = {
    16: convert_bool,                                             # bool
    17: convert_bytea,                                            # bytea
    18: convert_text, 19: convert_text, 25: convert_text,         # "char", name, text
    1042: convert_text, 1043: convert_text, 2950: convert_text,   # bpchar, varchar, uuid
    20: int, 21: int, 23: int, 26: int,                           # int8, int2, int4, oid
    700: convert_float, 701: convert_float,                       # float4, float8
    1700: convert_text,                                           # numeric: exact, as text
    114: convert_json, 3802: convert_json,                        # json, jsonb
    1082: convert_text, 1083: convert_text, 1266: convert_text,   # date, time, timetz
    1186: convert_text,                                           # interval
    1114: convert_timestamp, 1184: convert_timestamptz,           # timestamp, timestamptz
}

#: Array type OID -> element type OID (pg_type.typarray).  Element types outside the table above
#: (inet, money, ranges, ...) give arrays of strings.  box[] is absent: its delimiter is ';'.
ARRAY_ELEMENT_TYPES: dict[int, int] = {
    1000: 16, 1001: 17, 1002: 18, 1003: 19, 1005: 21, 1007: 23, 1009: 25, 1014: 1042, 1015: 1043,
    1016: 20, 1021: 700, 1022: 701, 1028: 26, 1115: 1114, 1182: 1082, 1183: 1083, 1185: 1184,
    1187: 1186, 1231: 1700, 1270: 1266, 2951: 2950, 199: 114, 3807: 3802,
    143: 142, 629: 628, 651: 650, 719: 718, 775: 774, 791: 790, 1006: 22, 1008: 24, 1010: 27,
    1011: 28, 1012: 29, 1013: 30, 1017: 600, 1018: 601, 1019: 602, 1027: 604, 1034: 1033,
    1040: 829, 1041: 869, 1561: 1560, 1563: 1562, 2201: 1790, 2207: 2202, 2208: 2203, 2209: 2204,
    2210: 2205, 2211: 2206, 2949: 2970, 3221: 3220, 3643: 3614, 3645: 3615, 3735: 3734,
    3770: 3769, 3905: 3904, 3907: 3906, 3909: 3908, 3911: 3910, 3913: 3912, 3927: 3926,
    4073: 4072, 4090: 4089, 4097: 4096, 4192: 4191, 5039: 5038, 271: 5069, 1263: 2275, 2287: 2249,
    6150: 4451, 6151: 4532, 6152: 4533, 6153: 4534, 6155: 4535, 6157: 4536,
}

#: Type OID -> converter(text) -> JSON value.  Anything absent stays text (convert_text).
TYPE_CONVERTERS: dict[int, Callable[[str], object]] = {
    **_SCALAR_CONVERTERS,
    **{array: _make_array_converter(_SCALAR_CONVERTERS.get(element, convert_text))
       for array, element in ARRAY_ELEMENT_TYPES.items()},
}

_TEXT_ARRAY = _make_array_converter(convert_text)


def _by_type(table: Mapping[int, Callable], array_of_strings: Callable, string: Callable,
             type_oid: int, type_name: str | None) -> Callable:
    """table[type_oid]; else a type whose name (from a Type message) starts with '_' is an array
    type (of enums, citext, domains...): an array of strings; anything else a string."""
    found = table.get(type_oid)
    if found is not None:
        return found
    return array_of_strings if type_name and type_name.startswith("_") else string


def converter_for(type_oid: int, type_name: str | None = None) -> Callable[[str], object]:
    """The converter for a column type (see _by_type for types outside TYPE_CONVERTERS)."""
    return _by_type(TYPE_CONVERTERS, _TEXT_ARRAY, convert_text, type_oid, type_name)


def convert_value(type_oid: int, text: str | None, type_name: str | None = None):
    """One value as JSON; never raises: text a converter cannot read stays text."""
    if text is None:
        return None
    try:
        return converter_for(type_oid, type_name)(text)
    except (ValueError, RecursionError):
        return text


# JSON text of a value: the envelope (section 8) writes each event's JSON directly, a column's
# value as the text below, which json.loads reads back as convert_value's value.  jsonb is where
# this pays twice: PostgreSQL prints it as valid JSON on one line, so it goes in as printed, every
# digit of its numbers kept (as a Python value its numbers would be doubles).


#: Compact JSON, UTF-8 as is, no NaN (the converters never produce one).  The C encoder made once:
#: JSONEncoder.encode would build a new one for every call.
def _not_json(value):
    raise TypeError(f"not a JSON value: {type(value).__name__}")


_ENCODE_JSON_CHUNKS = json.encoder.c_make_encoder(
    None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False)
encode_json_string = json.encoder.encode_basestring  #: a str as a JSON string, non-ASCII kept (C)


def encode_json(value) -> str:
    """Compact JSON text of a JSON value (dicts, lists, str, int, float, bool, None)."""
    return "".join(_ENCODE_JSON_CHUNKS(value, 0))


def json_text_int(text: str) -> str:
    """int2, int4, int8, oid.  Through int(): whatever the text, the result is a JSON number."""
    return str(int(text))


_BOOL_JSON = {"t": "true", "f": "false"}


def json_text_bool(text: str) -> str:
    try:
        return _BOOL_JSON[text]
    except KeyError:
        raise ValueError(f"not a bool: {text!r}") from None


def json_text_timestamptz(text: str) -> str:
    if text.endswith("+00"):  # convert_timestamptz's common case, inlined: a hot path
        return encode_json_string(text[:-3].replace(" ", "T", 1) + "Z")
    return encode_json_string(convert_timestamptz(text))


# Checks JSON without building numbers (their text is enough: no double rounding, no limit on
# integer digits) and refuses NaN/Infinity.
_JSON_CHECK = json.JSONDecoder(parse_float=str, parse_int=str, parse_constant=_not_a_json_constant).scan_once


def json_text_jsonb(text: str) -> str:
    """jsonb as PostgreSQL prints it (jsonb_out: one value, compact but for a space after ',' and
    ':', control characters escaped, so on one line), once checked to be exactly one JSON value.
    Anything else goes the way of json: parsed and written compact, or a ValueError."""
    try:
        _, end = _JSON_CHECK(text, 0)
    except StopIteration:
        end = -1
    if end != len(text) or "\n" in text or "\r" in text:
        return encode_json(convert_json(text))
    return text


def _json_text_via(convert: Callable[[str], object]) -> Callable[[str], str]:
    def json_text(text: str) -> str:
        return encode_json(convert(text))

    json_text.__name__ = f"json_text_via_{convert.__name__}"
    return json_text


#: Type OID -> json_text(PostgreSQL text) -> JSON text; may raise like TYPE_CONVERTERS.  Absent
#: types are strings (encode_json_string).
JSON_TEXT_CONVERTERS: dict[int, Callable[[str], str]] = {
    **{oid: encode_json_string if convert is convert_text else _json_text_via(convert)
       for oid, convert in TYPE_CONVERTERS.items()},
    16: json_text_bool, 20: json_text_int, 21: json_text_int, 23: json_text_int, 26: json_text_int,
    1184: json_text_timestamptz, 3802: json_text_jsonb,
}
_TEXT_ARRAY_JSON_TEXT = _json_text_via(_TEXT_ARRAY)


def json_text_for(type_oid: int, type_name: str | None = None) -> Callable[[str], str]:
    """Like converter_for, giving JSON text: json.loads(json_text_for(t)(s)) == converter_for(t)(s)
    (jsonb numbers aside: the text keeps all their digits)."""
    return _by_type(JSON_TEXT_CONVERTERS, _TEXT_ARRAY_JSON_TEXT, encode_json_string, type_oid, type_name)


_PG_EPOCH = datetime.datetime(2000, 1, 1)


def convert_commit_time(timestamp_us: int) -> str:
    """A pgoutput timestamp (microseconds since 2000-01-01 UTC) as ISO 8601 UTC with 6 digits."""
    moment = _PG_EPOCH + datetime.timedelta(microseconds=timestamp_us)
    return moment.isoformat(timespec="microseconds") + "Z"


# =====================================================================================================
# 8. Event envelope
# =====================================================================================================
# Pure: pgoutput messages -> events (the README's "Events"), keys in that order.  An event is its
# JSON text, written directly from the column values' JSON texts (section 7): that text is what
# every sink writes or sends, and its dict is read back from it only when needed (Hook0).
# ChangeAssembler holds the state between messages: a RelationWriter per relation (made once per
# Relation message), the type cache, the open plain transaction, and the buffered streamed
# transactions.  Its only I/O is the spill file.  The path of a row change, the same for Insert,
# Update and Delete, plain or streamed:
#   ChangeAssembler.feed (plain) or _replay_stream (streamed, at its Stream Commit)
#   -> the relation's RelationWriter.write: message bytes -> event JSON text
#      (what that one pass does not take: _write_decoded -> RelationWriter.write_decoded)

#: Bytes counted per buffered streamed record on top of its message bytes (tuple, ints, list slot).
STREAM_RECORD_OVERHEAD_BYTES = 120
_SPILL_HEADER = struct.Struct(">QIQI")  # cache generation, subxid, wal_start, message length
_VALUE_ERRORS = (ValueError, RecursionError)
_INFINITIES = (_INFINITY, -_INFINITY)


def _event_float(text: str) -> float | str:
    value = float(text)
    return text if value in _INFINITIES else value  # a jsonb number beyond doubles: its digits


def _event_int(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return text


_EVENT_DECODER = json.JSONDecoder(parse_float=_event_float, parse_int=_event_int)


def decode_event_line(line: str) -> dict:
    """An event's JSON text as a dict.  Numbers with a fraction are floats (as convert_json reads
    them); a jsonb number beyond what Python reads (a double's range, 4,300 integer digits) stays
    its digits, as a string.  Raises RecursionError for JSON nested too deep for Python."""
    return _EVENT_DECODER.decode(line)


class Event(Mapping):
    """One event.  `line` is its JSON text: compact, on one line, keys in the README's order;
    sinks write and send it as it is.  As a read-only mapping (or `data`), the event's value,
    decoded from `line` on first use.  Equal to an Event with the same text, and to a dict equal
    to its value."""

    __slots__ = ("line", "_data")

    def __init__(self, line: str, data: dict | None = None):
        self.line = line
        self._data = data

    @classmethod
    def from_dict(cls, data: dict) -> Event:
        return cls(encode_json(data), data)

    @property
    def data(self) -> dict:
        if self._data is None:
            self._data = decode_event_line(self.line)
        return self._data

    @property
    def id(self) -> str:
        """`id`, without decoding the rest: the envelope writes it first, without JSON escapes."""
        line = self.line
        if self._data is None and line.startswith('{"id":"'):
            end = line.find('"', 7)
            if end > 0 and "\\" not in line[7:end]:
                return line[7:end]
        return self.data["id"]

    def __getitem__(self, key: str):
        return self.id if key == "id" else self.data[key]

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __eq__(self, other) -> bool:
        if isinstance(other, Event):
            return self.line == other.line
        if isinstance(other, dict):
            return self.data == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Event({self.line})"


def event_line(event: Event | dict) -> str:
    """The JSON text of an event; sinks also take plain dicts (an embedding application's)."""
    return event.line if isinstance(event, Event) else encode_json(event)


@dataclasses.dataclass(slots=True)
class Chunk:
    """Events in delivery order.  With end_lsn set, the chunk ends a transaction: once every event
    up to and including this chunk is delivered, end_lsn may be acknowledged to PostgreSQL."""

    events: list[Event]
    end_lsn: int | None = None
    #: How many events of each op other than insert (the rest are inserts), for the metrics:
    #: counted where each non-insert event is built, so the insert hot path counts nothing.
    op_counts: dict[str, int] | None = None
    commit_time_us: int | None = None  #: with end_lsn: the commit time (pgoutput's, from 2000-01-01)
    #: False for a backfill's read events (section 10): their end_lsn marks their place in the
    #: stream (everything before it is delivered with them), but they end no transaction.
    transaction: bool = True


@dataclasses.dataclass(slots=True)
class _TxnContext:
    """What every event of one transaction shares, and its event counter."""

    xid: int | None
    commit_lsn: str | None
    commit_time: str | None
    seq: int = 0
    xid_member: str = ""     # '"xid":771,'
    commit_members: str = ""  # '"commit_lsn":"0/16B37A0","commit_time":"...",'

    def __post_init__(self) -> None:
        self.xid_member = f'"xid":{encode_json(self.xid)},'
        self.commit_members = (f'"commit_lsn":{encode_json(self.commit_lsn)},'
                               f'"commit_time":{encode_json(self.commit_time)},')


class RelationWriter:
    """A Relation message prepared for writing the events of its changes; the assembler makes one
    per Relation message (a later one for the same table replaces it).

    Every Insert, Update and Delete of the relation, plain or streamed, becomes its event's JSON
    text through `write`: one pass over the message bytes reads each TupleData value and writes
    it as its column's JSON member ('"name":value', through the converter of section 7), with no
    intermediate values, rows or message object.  What that pass does not take (unchanged TOAST
    or binary values, a value its converter refuses, malformed bytes) it leaves to
    `write_decoded`, which works from the decoded message (decode_pgoutput, with its exact errors)
    and writes the same text.
    """

    __slots__ = ("generation", "schema", "table", "names", "converters", "key_indexes", "key_names",
                 "head", "members", "columns", "lines", "insert_line")

    def __init__(self, relation: Relation, types: Mapping[int, Type], generation: int = 0,
                 base_types: Mapping[int, int] | None = None):
        """`base_types` maps a domain (and its array type) to its base type (and the base's array
        type): a domain over a known type converts like that type."""
        columns = relation.columns
        keys = () if relation.replica_identity == "n" else tuple(i for i, c in enumerate(columns) if c.is_key)
        self.generation = generation  # the assembler's count of Relation messages when this one came
        self.schema, self.table = relation.namespace or "pg_catalog", relation.name
        self.names = tuple(c.name for c in columns)
        self.converters = tuple(_column_json_text(c, types, base_types) for c in columns)
        self.key_indexes, self.key_names = keys, tuple(self.names[i] for i in keys)
        self.head = f'"schema":{encode_json_string(self.schema)},"table":{encode_json_string(self.table)},'
        self.members = {name: encode_json_string(name) + ":" for name in self.names}  # '"name":'
        self.columns = tuple((member, convert, member + "null")
                             for member, convert in zip(self.members.values(), self.converters))
        self.lines = _write_lines(self.head, bool(keys))
        self.insert_line = self.lines[_INSERT].replace('"old":%s', '"old":null')

    def write_insert(self, ctx: _TxnContext, data: bytes, wal_start: int) -> Event | None:
        """`write` for a plain Insert (the commonest change, so it takes no detour): the same
        text from the same tuple reader, without the branches an Update or a Delete needs."""
        new = []
        try:
            if data[5] != TUPLE_NEW:
                return None
            pos = self._tuple_members(data, 6, new)
        except (IndexError, struct.error, *_VALUE_ERRORS):  # UnicodeDecodeError is a ValueError
            return None
        if pos != len(data):
            return None
        keys = self.key_indexes
        key = new[keys[0]] if len(keys) == 1 else ",".join([new[i] for i in keys])
        seq = ctx.seq
        ctx.seq = seq + 1
        return Event(self.insert_line % (ctx.commit_lsn, seq, key, ",".join(new), ctx.xid_member,
                                         wal_start >> 32, wal_start & 0xFFFFFFFF, ctx.commit_members, seq))

    def write(self, ctx: _TxnContext, data: bytes, pos: int, wal_start: int) -> Event | None:
        """The event of an Insert, Update or Delete message (`data`; `pos`: just after its relid),
        straight from its bytes; None when `write_decoded` must write it."""
        tag, new = data[0], []
        try:
            kind = data[pos]
            if kind == TUPLE_NEW and tag != _DELETE:  # an Insert, or an Update without its old row
                old = None
                pos = self._tuple_members(data, pos + 1, new)
            elif (kind == TUPLE_KEY or kind == TUPLE_OLD) and tag != _INSERT:
                old = []
                pos = self._tuple_members(data, pos + 1, old)
                if tag == _DELETE:
                    new = None
                elif data[pos] == TUPLE_NEW:
                    pos = self._tuple_members(data, pos + 1, new)
                else:
                    return None
            else:
                return None
        except (IndexError, struct.error, *_VALUE_ERRORS):  # UnicodeDecodeError is a ValueError
            return None
        if pos != len(data):
            return None
        keys = self.key_indexes
        row = old if new is None else new
        key = row[keys[0]] if len(keys) == 1 else ",".join([row[i] for i in keys])
        if old is None:
            old = "null"
        elif kind == TUPLE_KEY:
            old = "{" + ",".join([old[i] for i in keys]) + "}"
        else:
            old = "{" + ",".join(old) + "}"
        seq = ctx.seq  # _change_event, inlined: the hot path
        ctx.seq = seq + 1
        return Event(self.lines[tag] % (
            ctx.commit_lsn, seq, key, "" if new is None else ",".join(new), old, ctx.xid_member,
            wal_start >> 32, wal_start & 0xFFFFFFFF, ctx.commit_members, seq))

    def _tuple_members(self, data: bytes, pos: int, members: list[str]) -> int:
        """Appends the TupleData at `pos` to `members` as its columns' members; returns the position
        after it.  Raises ValueError for anything but text and NULL values (IndexError or
        struct.error for truncated bytes)."""
        columns = self.columns
        if (data[pos] << 8 | data[pos + 1]) != len(columns):  # the column count, a uint16
            raise ValueError("column count")
        pos += 2
        append, size_of = members.append, _U32.unpack_from
        for member, convert, null in columns:
            kind = data[pos]
            if kind == VALUE_TEXT:
                start = pos + 5
                pos = start + size_of(data, pos + 1)[0]
                append(member + convert(data[start:pos].decode()))
            elif kind == VALUE_NULL:
                append(null)
                pos += 1
            else:
                raise ValueError("not a text or NULL value")
        return pos

    def write_decoded(self, ctx: _TxnContext, message: Insert | Update | Delete, wal_start: int) -> Event:
        """The event of a decoded change, whatever its values (see the class comment)."""
        cls = message.__class__
        what = cls.__name__
        new, missing = (None, []) if cls is Delete else _convert_tuple(self, message.new, what)
        old = None if cls is Insert else _build_old(self, message.old_kind, message.old, what)
        if cls is Update:
            missing = _fill_unchanged_toast(self, new, missing, old)
        key = _build_key(self, old if cls is Delete else new)
        return _change_event(ctx, what.lower(), self, _row_json(self, key), _row_json(self, new),
                             _row_json(self, old), encode_json(missing) if missing else "[]", wal_start)


def _column_json_text(column: Column, types: Mapping[int, Type],
                      base_types: Mapping[int, int] | None) -> Callable[[str], str]:
    custom = types.get(column.type_oid)
    type_oid = base_types.get(column.type_oid, column.type_oid) if base_types else column.type_oid
    return json_text_for(type_oid, custom.name if custom else None)


# The general path (RelationWriter.write_decoded): a row is a dict {column name: JSON text of its
# value}, in column order, without the columns whose values are unchanged TOAST (listed apart).

def _convert_tuple(writer: RelationWriter, values: TupleData, what: str) -> tuple[dict, list]:
    """(row without unchanged-TOAST columns, names of those columns).  A value its converter
    refuses stays a string."""
    if len(values) != len(writer.names):
        raise ProtocolError(f"malformed pgoutput {what} message: {len(values)} columns, but Relation "
                            f"{writer.schema}.{writer.table} has {len(writer.names)}")
    row: dict = {}
    missing: list = []
    for name, convert, value in zip(writer.names, writer.converters, values):
        if value is None:
            row[name] = "null"
        elif value is UNCHANGED_TOAST:
            missing.append(name)
        elif value.__class__ is bytes:
            raise ProtocolError(f"unexpected binary value in pgoutput {what} message "
                                "(binary mode was not requested)")
        else:
            try:
                row[name] = convert(value)
            except _VALUE_ERRORS:
                row[name] = encode_json_string(value)
    return row, missing


def _build_key(writer: RelationWriter, row: dict | None) -> dict | None:
    names = writer.key_names
    if not names or row is None:
        return None
    key = {name: row[name] for name in names if name in row}
    return key or None


def _build_old(writer: RelationWriter, kind: str | None, values: TupleData | None, what: str) -> dict | None:
    """'O': the whole old row; 'K': only the key columns (the others are null placeholders)."""
    if values is None:
        return None
    row, _ = _convert_tuple(writer, values, what)
    if kind == "K":
        return {name: row[name] for name in writer.key_names if name in row}
    return row


def _fill_unchanged_toast(writer: RelationWriter, new: dict, missing: list, old: dict | None) -> list:
    """Take unchanged TOAST values from the old row when it carries them; the rest stay listed.
    `new` is rebuilt in column order so filled columns keep their place."""
    if not missing or not old:
        return missing
    still_missing = [name for name in missing if name not in old]
    if len(still_missing) < len(missing):
        filled = {**new, **{name: old[name] for name in missing if name in old}}
        new.clear()
        new.update((name, filled[name]) for name in writer.names if name in filled)
    return still_missing


def _row_json(writer: RelationWriter, row: dict | None) -> str:
    if row is None:
        return "null"
    members = writer.members
    return "{" + ",".join([members[name] + text for name, text in row.items()]) + "}"


_CHANGE_LINE = ('{"id":"%s:%d","op":"%s",%s"key":%s,"new":%s,"old":%s,"unchanged_toast":%s,%s'
                '"lsn":"%X/%X",%s"seq":%d}')
_CHANGE_OPS = {INSERT.value: "insert", UPDATE.value: "update", DELETE.value: "delete"}


def _write_lines(head: str, keyed: bool) -> dict[int, str]:
    """Message tag -> _CHANGE_LINE made for one relation's RelationWriter.write: the op, the
    relation's schema and table (`head`), the key's braces (its null when the relation has no
    key) and an empty unchanged_toast in place, and the new row's members inside its braces, so
    nothing is copied before the line is.  Where a value is null (a Delete's new row, an unkeyed
    relation's key) the text given for it is "", after the null."""
    key = '"key":{%s}' if keyed else '"key":null%s'
    line = (_CHANGE_LINE.replace('%s"key":%s', head.replace("%", "%%") + key)
            .replace('"unchanged_toast":%s', '"unchanged_toast":[]'))
    return {tag: line.replace('"op":"%s"', f'"op":"{op}"').replace('"new":%s', new)
            for tag, op, new in ((INSERT.value, "insert", '"new":{%s}'), (UPDATE.value, "update", '"new":{%s}'),
                                 (DELETE.value, "delete", '"new":null%s'))}


_INSERT, _DELETE = INSERT.value, DELETE.value  # plain ints: compared for every change


def _change_event(ctx: _TxnContext, op: str, writer: RelationWriter, key: str, new: str, old: str,
                  toast: str, wal_start: int) -> Event:
    """The event of a row change, from the JSON texts of its key, new and old rows and unchanged
    TOAST column names."""
    seq = ctx.seq
    ctx.seq = seq + 1
    return Event(_CHANGE_LINE % (
        ctx.commit_lsn, seq, op, writer.head, key, new, old, toast, ctx.xid_member,
        wal_start >> 32, wal_start & 0xFFFFFFFF, ctx.commit_members, seq))


def event_op(event: Event | Mapping) -> str:
    """An event's op without decoding it: the envelope writes it right after the id, which holds
    no quote."""
    line = getattr(event, "line", None)
    if line is None or not line.startswith('{"id":"'):
        return event["op"]
    start = line.index('"', 7) + 8  # past '","op":"'
    return line[start:line.index('"', start)]


def count_event_ops(events: Iterable[Event]) -> dict[str, int] | None:
    """Chunk.op_counts of these events, one by one (for the paths that build events slowly anyway:
    streamed transactions, a split chunk, dead-lettered events)."""
    counts: dict[str, int] = {}
    for event in events:
        op = event_op(event)
        if op != "insert":
            counts[op] = counts.get(op, 0) + 1
    return counts or None


def build_truncate_event(ctx: _TxnContext, writer: RelationWriter, message: Truncate, wal_start: int) -> Event:
    seq = ctx.seq
    ctx.seq = seq + 1
    return Event.from_dict({
        "id": f"{ctx.commit_lsn}:{seq}", "op": "truncate", "schema": writer.schema,
        "table": writer.table, "key": None, "new": None, "old": None, "unchanged_toast": [],
        "cascade": message.cascade, "restart_identity": message.restart_identity,
        "xid": ctx.xid, "lsn": format_lsn(wal_start), "commit_lsn": ctx.commit_lsn,
        "commit_time": ctx.commit_time, "seq": seq})


def build_message_event(ctx: _TxnContext | None, message: Message) -> Event:
    """A logical decoding message.  Its `lsn` is the message's own LSN.  Without a transaction
    context (non-transactional) xid, commit_lsn, commit_time and seq are null, id `<lsn>:m`."""
    lsn = format_lsn(message.lsn)
    if ctx is None:
        event_id, seq, xid, commit_lsn, commit_time = f"{lsn}:m", None, None, None, None
    else:
        seq = ctx.seq
        ctx.seq = seq + 1
        event_id, xid, commit_lsn, commit_time = f"{ctx.commit_lsn}:{seq}", ctx.xid, ctx.commit_lsn, ctx.commit_time
    event = {"id": event_id, "op": "message", "schema": None, "table": None, "key": None,
             "new": None, "old": None, "unchanged_toast": [], "prefix": message.prefix}
    try:
        event["content"] = message.content.decode()
    except UnicodeDecodeError:
        event["content_base64"] = base64.b64encode(message.content).decode("ascii")
    event.update(transactional=message.transactional, xid=xid, lsn=lsn, commit_lsn=commit_lsn,
                 commit_time=commit_time, seq=seq)
    return Event.from_dict(event)


class _StreamBuffer:
    """The buffered changes of one streamed top-level transaction.

    Records are (cache generation, subxid, wal_start, message bytes): small and flat, so memory is
    accounted by bytes.  Past the bound they move to an anonymous temporary file (unlinked at
    creation: nothing is left behind even after kill -9), appended in order; the records still in
    memory always come after those in the file.
    """

    __slots__ = ("xid", "records", "memory_bytes", "file", "aborted_subxids")

    def __init__(self, xid: int):
        self.xid = xid
        self.records: list[tuple[int, int, int, bytes]] = []
        self.memory_bytes = 0
        self.file = None
        self.aborted_subxids: set[int] = set()

    def spill(self, spill_dir: str | None) -> int:
        """Move the in-memory records to the spill file; returns the bytes freed."""
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="wal2http-spill-", dir=spill_dir)
        write, pack = self.file.write, _SPILL_HEADER.pack
        for generation, subxid, wal_start, data in self.records:
            write(pack(generation, subxid, wal_start, len(data)))
            write(data)
        freed, self.memory_bytes = self.memory_bytes, 0
        self.records = []
        return freed

    def drop_subtransaction(self, subxid: int) -> int:
        """Forget the changes of an aborted subtransaction; returns the bytes freed."""
        self.aborted_subxids.add(subxid)  # records already in the file are skipped at replay
        kept = [record for record in self.records if record[1] != subxid]
        freed = sum(len(r[3]) + STREAM_RECORD_OVERHEAD_BYTES for r in self.records if r[1] == subxid)
        self.records = kept
        self.memory_bytes -= freed
        return freed

    def iter_records(self) -> Iterator[tuple[int, int, int, bytes]]:
        """Every record in order: the spill file piece by piece, then memory."""
        if self.file is not None:
            read, unpack, size = self.file.read, _SPILL_HEADER.unpack, _SPILL_HEADER.size
            self.file.seek(0)
            while header := read(size):
                generation, subxid, wal_start, length = unpack(header)
                yield generation, subxid, wal_start, read(length)
        records, self.records = self.records, []
        yield from records

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.records = []
        self.memory_bytes = 0


class ChangeAssembler:
    """pgoutput messages in, chunks of events out (see the section comment).

    Feed every XLogData payload in order; consume the chunks of one feed() before the next.
    Streamed transactions and subtransactions, following what PostgreSQL sends:
    - In-stream changes carry the xid of the (sub)transaction that made them; the Stream Start
      before them names the top-level xid, which is the event's `xid`.
    - Stream Abort(xid, subxid == xid) discards the transaction.  For ROLLBACK TO SAVEPOINT,
      PostgreSQL sends one Stream Abort per aborted subtransaction: the abort WAL record lists the
      rolled-back subxid and all its committed children (nested savepoints), and the decoder aborts
      each of them, so dropping exactly the named subxid's changes is complete.
    - Relation messages (in a stream or not) replace the cached relation at once.  Each buffered
      record keeps the cache generation it was made under and is decoded with the relation of
      that generation.  (pgoutput sends a Relation in every streamed transaction before its first
      change of that table, and again after any schema change, so this matches what it encoded.)
    """

    def __init__(self, chunk_events: int = 1000, spill_bytes: int = 16 * 2**20, spill_dir: str | None = None,
                 relation_columns: dict | None = None):
        if chunk_events < 1:
            raise ValueError("chunk_events must be at least 1")
        self.chunk_events = chunk_events
        self.spill_bytes = spill_bytes
        self.spill_dir = spill_dir
        self.relation_columns = relation_columns  # when given: (schema, table) -> column names
        self.base_types: dict[int, int] = {}  # domain type -> base type (see RelationWriter)
        self._writers: dict[int, RelationWriter] = {}  # relation oid -> its writer
        self._writer_history: dict[int, list[RelationWriter]] = {}  # kept while streams are open
        self._generation = 0
        self._types: dict[int, Type] = {}
        self._txn: _TxnContext | None = None
        self._txn_commit_lsn = 0
        self._pending: list[Event] = []
        self._pending_ops: dict[str, int] | None = None  # non-insert events in _pending (Chunk.op_counts)
        self._stream: _StreamBuffer | None = None  # the stream between Stream Start and Stream Stop
        self._streams: dict[int, _StreamBuffer] = {}
        self._memory_bytes = 0
        self._replay: Iterator[Chunk] | None = None
        self._handlers = {
            Begin: self._on_begin, Commit: self._on_commit, Origin: self._on_ignored,
            Relation: self._on_relation, Type: self._on_type, Insert: self._on_change,
            Update: self._on_change, Delete: self._on_change, Truncate: self._on_change,
            Message: self._on_message, StreamStart: self._on_stream_start,
            StreamStop: self._on_stream_stop, StreamCommit: self._on_stream_commit,
            StreamAbort: self._on_stream_abort, BeginPrepare: self._on_two_phase,
            Prepare: self._on_two_phase, CommitPrepared: self._on_two_phase,
            RollbackPrepared: self._on_two_phase, StreamPrepare: self._on_two_phase,
        }

    @property
    def in_transaction(self) -> bool:
        """A plain transaction is open (Begin seen, Commit not yet)."""
        return self._txn is not None

    @property
    def open_streams(self) -> int:
        """Streamed transactions buffered and not yet committed or aborted."""
        return len(self._streams)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of streamed changes held in memory (the spill files hold the rest)."""
        return self._memory_bytes

    def feed(self, wal_start: int, data: bytes) -> Iterable[Chunk]:
        """One XLogData payload (one pgoutput message) -> the chunks it completes (often none)."""
        if self._replay is not None:
            raise RuntimeError("consume the chunks of a Stream Commit before feeding more messages")
        if not data:
            raise ProtocolError("malformed XLogData message: no pgoutput message in it")
        tag, txn = data[0], self._txn
        if (tag == _INSERT or tag in _CHANGE_OPS) and txn is not None and self._stream is None:
            # The hot path: a plain Insert, Update or Delete, by its relation's writer.
            writer = self._writers.get(_U32.unpack_from(data, 1)[0]) if len(data) > 5 else None
            if writer is None:
                event = None
            elif tag == _INSERT:
                event = writer.write_insert(txn, data, wal_start)
            else:
                event = writer.write(txn, data, 5, wal_start)
                self._count_op(_CHANGE_OPS[tag])
            if event is None:
                event = self._write_decoded(txn, data, False, wal_start, writer)
            pending = self._pending
            pending.append(event)
            return () if len(pending) < self.chunk_events else self._flush_full()
        message = decode_pgoutput(data, self._stream is not None)
        return self._handlers[message.__class__](message, wal_start, data)

    def close(self) -> None:
        """Drop all buffered transactions and remove their spill files."""
        if self._replay is not None:
            self._replay.close()  # its stream's file closes with it
            self._replay = None
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
        self._stream = None
        self._memory_bytes = 0

    # ----- plain transactions

    def _on_begin(self, message: Begin, wal_start: int, data: bytes) -> tuple:
        if self._txn is not None or self._stream is not None:
            raise ProtocolError("unexpected pgoutput Begin message inside a transaction")
        self._txn = _TxnContext(message.xid, format_lsn(message.final_lsn),
                                _commit_time_text(message.commit_time, "Begin"))
        self._txn_commit_lsn = message.final_lsn
        return ()

    def _on_commit(self, message: Commit, wal_start: int, data: bytes) -> tuple:
        if self._txn is None:
            raise ProtocolError("unexpected pgoutput Commit message outside a transaction")
        if message.commit_lsn != self._txn_commit_lsn:
            raise ProtocolError(f"malformed pgoutput Commit message: commit LSN {format_lsn(message.commit_lsn)} "
                                f"differs from the Begin's final LSN {self._txn.commit_lsn}")
        chunk = Chunk(self._pending, message.end_lsn, self._pending_ops, message.commit_time)
        self._txn, self._pending, self._pending_ops = None, [], None
        return (chunk,)

    def _on_change(self, message, wal_start: int, data: bytes) -> tuple:
        """Insert, Update and Delete outside a transaction (feed writes them inside one), Truncate."""
        if self._stream is not None:
            return self._buffer(message, wal_start, data)
        if self._txn is None:
            raise ProtocolError(f"unexpected pgoutput {PgoutputMessage(data[0]).doc_name} message "
                                "outside a transaction")
        for relid in message.relids:
            self._pending.append(build_truncate_event(self._txn, self._writer(relid, data), message, wal_start))
            self._count_op("truncate")
        return self._flush_full()

    def _count_op(self, op: str) -> None:
        """Counts a non-insert event just added to _pending (see Chunk.op_counts)."""
        counts = self._pending_ops = self._pending_ops or {}
        counts[op] = counts.get(op, 0) + 1

    def _write_decoded(self, ctx: _TxnContext, data: bytes, in_stream: bool, wal_start: int,
                       writer: RelationWriter | None) -> Event:
        """An Insert, Update or Delete its relation's writer did not take from the bytes (or that
        names no known relation: then the error says so, after any error in the bytes)."""
        message = decode_pgoutput(data, in_stream)
        return (writer or self._writer(message.relid, data)).write_decoded(ctx, message, wal_start)

    def _flush_full(self) -> tuple:
        if len(self._pending) < self.chunk_events:
            return ()
        chunks = []
        while len(self._pending) >= self.chunk_events:  # a Truncate of many tables may add several
            events = self._pending[:self.chunk_events]
            self._pending = self._pending[self.chunk_events:]
            op_counts = self._pending_ops
            if op_counts and self._pending:  # split: count exactly what each part holds (rare)
                op_counts, self._pending_ops = count_event_ops(events), count_event_ops(self._pending)
            else:
                self._pending_ops = None
            chunks.append(Chunk(events, None, op_counts))
        return tuple(chunks)

    def _on_message(self, message: Message, wal_start: int, data: bytes) -> tuple:
        if not message.transactional:
            return (Chunk([build_message_event(None, message)], None, {"message": 1}),)
        if self._stream is not None:
            return self._buffer(message, wal_start, data)
        if self._txn is None:
            raise ProtocolError("unexpected transactional pgoutput Message message outside a transaction")
        self._pending.append(build_message_event(self._txn, message))
        self._count_op("message")
        return self._flush_full()

    def _writer(self, relid: int, data: bytes) -> RelationWriter:
        try:
            return self._writers[relid]
        except KeyError:
            raise ProtocolError(f"malformed pgoutput {PgoutputMessage(data[0]).doc_name} message: unknown "
                                f"relation {relid} (no Relation message before it)") from None

    def _on_relation(self, message: Relation, wal_start: int, data: bytes) -> tuple:
        self._generation += 1
        writer = RelationWriter(message, self._types, self._generation, self.base_types)
        self._writers[message.oid] = writer
        if self.relation_columns is not None:
            self.relation_columns[(writer.schema, writer.table)] = writer.names
        if self._streams:  # buffered records may still need the older versions
            self._writer_history.setdefault(message.oid, []).append(writer)
        else:
            self._writer_history[message.oid] = [writer]
        return ()

    def _on_type(self, message: Type, wal_start: int, data: bytes) -> tuple:
        self._types[message.oid] = message
        return ()

    def _on_ignored(self, message, wal_start: int, data: bytes) -> tuple:
        return ()

    def _on_two_phase(self, message, wal_start: int, data: bytes) -> tuple:
        name = PgoutputMessage(data[0]).doc_name
        raise ProtocolError(f"unexpected two-phase message {name} (two_phase was not requested)")

    # ----- streamed transactions

    def _on_stream_start(self, message: StreamStart, wal_start: int, data: bytes) -> tuple:
        if self._stream is not None or self._txn is not None:
            raise ProtocolError("unexpected pgoutput Stream Start message inside a transaction or stream")
        stream = self._streams.get(message.xid)
        if stream is None:
            if not message.first_segment:
                raise ProtocolError(f"malformed pgoutput Stream Start message: transaction {message.xid} "
                                    "continues a stream that was never started")
            stream = self._streams[message.xid] = _StreamBuffer(message.xid)
        elif message.first_segment:
            raise ProtocolError(f"malformed pgoutput Stream Start message: transaction {message.xid} "
                                "starts again while its stream is open")
        self._stream = stream
        return ()

    def _on_stream_stop(self, message: StreamStop, wal_start: int, data: bytes) -> tuple:
        if self._stream is None:
            raise ProtocolError("unexpected pgoutput Stream Stop message outside a stream")
        self._stream = None
        return ()

    def _buffer(self, message, wal_start: int, data: bytes) -> tuple:
        """Keep an in-stream change as a compact record (checked now, turned into events at commit)."""
        relids = message.relids if message.__class__ is Truncate else (
            () if message.__class__ is Message else (message.relid,))
        for relid in relids:
            self._writer(relid, data)
        stream = self._stream
        stream.records.append((self._generation, message.xid, wal_start, data))
        size = len(data) + STREAM_RECORD_OVERHEAD_BYTES
        stream.memory_bytes += size
        self._memory_bytes += size
        if self._memory_bytes > self.spill_bytes:
            # Spilling the stream just appended to keeps the total within the bound: before the
            # append the total was within it, and this stream holds at least the new record.
            self._memory_bytes -= stream.spill(self.spill_dir)
        return ()

    def _end_stream(self, xid: int, what: str) -> _StreamBuffer:
        if self._stream is not None:
            raise ProtocolError(f"unexpected pgoutput {what} message inside a stream")
        stream = self._streams.pop(xid, None)
        if stream is not None:
            self._memory_bytes -= stream.memory_bytes
        return stream

    def _on_stream_abort(self, message: StreamAbort, wal_start: int, data: bytes) -> tuple:
        if message.subxid != message.xid:
            if self._stream is not None:
                raise ProtocolError("unexpected pgoutput Stream Abort message inside a stream")
            stream = self._streams.get(message.xid)
            if stream is not None:
                self._memory_bytes -= stream.drop_subtransaction(message.subxid)
            return ()
        stream = self._end_stream(message.xid, "Stream Abort")
        if stream is None:
            logger.debug("Stream Abort for transaction %d, which streamed nothing here", message.xid)
            return ()
        stream.close()
        self._prune_writer_history()
        return ()

    def _on_stream_commit(self, message: StreamCommit, wal_start: int, data: bytes) -> Iterable[Chunk]:
        stream = self._end_stream(message.xid, "Stream Commit")
        if stream is None:
            raise ProtocolError(f"malformed pgoutput Stream Commit message: transaction {message.xid} "
                                "was never streamed")
        ctx = _TxnContext(message.xid, format_lsn(message.commit_lsn),
                          _commit_time_text(message.commit_time, "Stream Commit"))
        self._replay = self._replay_stream(stream, ctx, message.end_lsn, message.commit_time)
        return self._replay

    def _replay_stream(self, stream: _StreamBuffer, ctx: _TxnContext, end_lsn: int,
                       commit_time_us: int) -> Iterator[Chunk]:
        """The events of a committed stream, chunk by chunk, reading the spill file as it goes."""
        try:
            events: list[Event] = []
            aborted = stream.aborted_subxids
            for generation, subxid, wal_start, data in stream.iter_records():
                if subxid in aborted:
                    continue
                events.extend(self._replayed_events(ctx, generation, data, wal_start))
                while len(events) >= self.chunk_events:
                    yield Chunk(events[:self.chunk_events], None, count_event_ops(events[:self.chunk_events]))
                    events = events[self.chunk_events:]
            yield Chunk(events, end_lsn, count_event_ops(events), commit_time_us)
        finally:
            stream.close()
            self._replay = None
            self._prune_writer_history()

    def _replayed_events(self, ctx: _TxnContext, generation: int, data: bytes, wal_start: int) -> Iterable[Event]:
        """The events of one buffered record."""
        if data[0] in _CHANGE_OPS:  # as plain ones go (feed); checked when buffered
            writer = self._writer_at(_U32.unpack_from(data, 5)[0], generation)
            event = writer.write(ctx, data, 9, wal_start)
            return (self._write_decoded(ctx, data, True, wal_start, writer) if event is None else event,)
        message = decode_pgoutput(data, True)
        if message.__class__ is Message:
            return (build_message_event(ctx, message),)
        return [build_truncate_event(ctx, self._writer_at(relid, generation), message, wal_start)
                for relid in message.relids]

    def _writer_at(self, relid: int, generation: int) -> RelationWriter:
        """The relation's writer as it was at cache generation `generation`."""
        for writer in reversed(self._writer_history[relid]):
            if writer.generation <= generation:
                return writer
        raise AssertionError(f"relation {relid} at generation {generation} was pruned")

    def _prune_writer_history(self) -> None:
        if not self._streams:
            self._writer_history = {oid: [writer] for oid, writer in self._writers.items()}


def _commit_time_text(timestamp_us: int, what: str) -> str:
    try:
        return convert_commit_time(timestamp_us)
    except OverflowError:
        raise ProtocolError(f"malformed pgoutput {what} message: commit time out of range") from None


# =====================================================================================================
# 9. Replication loop and the acknowledgement rule
# =====================================================================================================
# One connection = one nursery with three tasks linked by a bounded channel:
#   reader    socket -> MessageBuffer -> XLogData -> ChangeAssembler -> Chunk -> channel
#   delivery  channel -> ReliableSink.deliver -> AckTracker.delivered
#   feedback  AckTracker -> Standby status update, every FEEDBACK_INTERVAL_SECS
# Keepalives are answered by the reader.  A lost connection ends the nursery; `run` reconnects with
# backoff and the stream resumes from the last acknowledged position, so everything not confirmed
# by the sink is delivered again (at-least-once, same ids).

CHANNEL_CHUNKS = 16  #: chunks buffered between reader and delivery (each at most CHUNK_EVENTS events)
#: Events per chunk of a large transaction: large enough that handing a chunk over costs nothing
#: per event.  The reader yields to the delivery task when it hands one over, and also every
#: YIELD_EVERY_MESSAGES messages while a delivery is in flight, so that an HTTP answer is acted on
#: within a fraction of a millisecond (a chunk takes 2 ms or more to decode) and the receiver does
#: not sit idle waiting for the next batch.
CHUNK_EVENTS = 250
YIELD_EVERY_MESSAGES = 32
SPILL_BYTES = 16 * 1024 * 1024  #: a streamed transaction spills to a temporary file past this size
LIVENESS_PING_S = 10.0  #: ask the server for a keepalive this often, to notice a dead peer
#: No byte from the server for this long: the connection is lost.  As PostgreSQL's own subscriber
#: (wal_receiver_timeout), and never less than the server's wal_sender_timeout: while it decodes a
#: long transaction whose changes are all filtered out, a walsender reads our keepalive requests
#: (and so answers them) only every wal_sender_timeout / 2.
READ_IDLE_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 10.0  #: at SIGINT/SIGTERM, wait this long for the delivery in flight
RECONNECT_BASE_S = 1.0  #: first delay before reconnecting to PostgreSQL
RECONNECT_MAX_S = 30.0  #: longest delay between reconnection attempts
BATCH_LINGER_S = 0.05  #: longest wait for a partial HTTP batch to fill
COALESCE_READ_BELOW_BYTES = 64 * 1024  #: after a read smaller than this, let the server batch...
COALESCE_READ_S = 0.005  #: ...for this long before reading again (fewer wake-ups on both sides)


def pgoutput_proto_version(server_version_num: int) -> int:
    """The highest pgoutput protocol version the server speaks (v2 PG14, v3 PG15, v4 PG16+)."""
    for version, minimum in ((4, 160000), (3, 150000), (2, 140000)):
        if server_version_num >= minimum:
            return version
    return 1


OLDEST_SERVER_VERSION_NUM = 100000  #: PostgreSQL 10, the first with pgoutput


def check_server_version(conn: PgConnection) -> None:
    """Refuse a server older than PostgreSQL 10: it has no pgoutput."""
    if conn.server_version_num < OLDEST_SERVER_VERSION_NUM:
        raise PreconditionError(
            f"PostgreSQL {conn.parameters.get('server_version', '(unknown version)')} is too old: wal2http "
            "needs PostgreSQL 10 or later (logical replication with pgoutput; 14+ for logical messages "
            "and streaming)")


def build_start_replication(config, proto_version: int, start_lsn: int) -> str:
    names = ",".join(quote_ident(name) for name in config.publications)
    options = [f"proto_version '{proto_version}'", f"publication_names {quote_literal(names)}"]
    if proto_version >= 2:  # PostgreSQL 14+: before that pgoutput rejects both options
        options.append("messages 'true'")
        options.append(f"streaming '{'on' if config.streaming else 'off'}'")
    return (f"START_REPLICATION SLOT {quote_ident(config.slot_name)} LOGICAL {format_lsn(start_lsn)} "
            f"({', '.join(options)})")


class AckTracker:
    """The acknowledgement rule, in one place.

    The LSN reported to PostgreSQL as flushed (and so the slot's confirmed_flush_lsn) moves only
    after the sink has confirmed every event up to it:
    - `delivered(end_lsn)`: the delivery task confirms chunks in order; a chunk that ends a
      transaction carries the Commit's end_lsn, which then becomes the flushed position.
    - `keepalive(wal_end, idle)`: a keepalive position is acknowledged only when nothing is in
      flight: every chunk handed to the delivery task is confirmed and no transaction is open in
      the assembler.  Then every change before wal_end has been delivered, and an idle wal2http
      does not make PostgreSQL retain WAL.
    The position never moves backwards.
    """

    def __init__(self, flushed_lsn: int = 0):
        self.flushed_lsn = flushed_lsn
        self.received_lsn = flushed_lsn
        self.in_flight = 0  # chunks handed to the delivery task and not yet confirmed
        self.on_progress = None  # called when the flushed position moves (then cleared by its owner)
        self._batches: dict[int, list] = {}  # ticket -> [done, chunk marks], not yet confirmed
        self._next_ticket = 0
        self._oldest = 0  # the oldest ticket not yet confirmed
        self.stats = None  # the operations port's Stats, told of each chunk confirmed
        self._moved: trio.Event | None = None  # set when the flushed position moves (wait_flushed)

    def queued(self) -> None:
        self.in_flight += 1

    def pending(self, marks: list[int | None]) -> int:
        """A batch is on its way to the sink.  `marks`: for each chunk whose last event it holds,
        in order, the chunk's end_lsn (None when it does not end a transaction).  Returns the
        batch's ticket for `done`."""
        ticket = self._next_ticket
        self._next_ticket += 1
        self._batches[ticket] = [False, marks]
        return ticket

    def done(self, ticket: int) -> None:
        """The batch is delivered (or dead-lettered).  Batches may finish in any order; a batch's
        marks are confirmed once it and every batch before it are done, so the flushed position
        is the end of the latest transaction that it and everything before it has been
        delivered: a low watermark."""
        batches = self._batches
        batches[ticket][0] = True
        while self._oldest in batches and batches[self._oldest][0]:
            marks = batches.pop(self._oldest)[1]
            for end_lsn in marks:
                self.delivered(end_lsn)
            self._oldest += 1
            if self.stats is not None:
                self.stats.chunks_confirmed(len(marks))

    def delivered(self, end_lsn: int | None) -> None:
        self.in_flight -= 1
        if end_lsn is not None and end_lsn > self.flushed_lsn:
            self.flushed_lsn = end_lsn
            self._advanced()

    def _advanced(self) -> None:
        if self.on_progress is not None:
            self.on_progress()
        if self._moved is not None:
            self._moved.set()
            self._moved = None

    async def wait_flushed(self, lsn: int) -> None:
        """Returns once the flushed position is at `lsn` or past it."""
        while self.flushed_lsn < lsn:
            if self._moved is None:
                self._moved = trio.Event()
            await self._moved.wait()

    def received(self, wal_end: int) -> None:
        if wal_end > self.received_lsn:
            self.received_lsn = wal_end

    def keepalive(self, wal_end: int, assembler_idle: bool) -> None:
        self.received(wal_end)
        if assembler_idle and self.in_flight == 0 and wal_end > self.flushed_lsn:
            self.flushed_lsn = wal_end
            self._advanced()

    def resume_from(self, confirmed_lsn: int) -> None:
        """The slot's confirmed_flush_lsn at connect: never report anything below it.  (While the
        walsender re-reads WAL from the slot's restart_lsn up to that point, its keepalives carry
        positions below it; older servers would take such a flush position as the new confirmed
        one and move the slot backwards.)"""
        if confirmed_lsn > self.flushed_lsn:
            self.flushed_lsn = confirmed_lsn
        self.received(confirmed_lsn)

    def discard_in_flight(self) -> None:
        """After a lost connection: what was queued will be streamed again."""
        self.in_flight = 0
        self._batches.clear()
        self._oldest = self._next_ticket

    def status_update(self, reply_requested: bool = False) -> bytes:
        write = max(self.received_lsn, self.flushed_lsn)
        return encode_standby_status(write, self.flushed_lsn, self.flushed_lsn,
                                     time.time_ns() // 1000, reply_requested)


def event_claims(event: Mapping) -> list[tuple[tuple, bool]]:
    """What an event is ordered against under concurrent delivery, as (resource, exclusive)
    pairs: its row, exclusively (both keys for an update that changed the key), and its table,
    shared; a truncate or a row without a key (REPLICA IDENTITY NOTHING) has its whole table
    exclusively; a message, its prefix."""
    op = event["op"]
    if op == "message":
        return [(("message", event["prefix"]), True)]
    table = (event["schema"], event["table"])
    key = None if op == "truncate" else event["key"]
    if key is None:
        return [(("table", *table), True)]
    claims = [(("table", *table), False), (("row", *table, encode_json(key)), True)]
    old = event["old"]
    if op == "update" and old is not None:
        old_key = {name: old.get(name) for name in key}
        if old_key != key:
            claims.append((("row", *table, encode_json(old_key)), True))
    return claims


def batch_claims(events: Iterable[Mapping]) -> dict[tuple, bool]:
    """The claims of a batch: each resource once, exclusive when any event needs it so."""
    claims: dict[tuple, bool] = {}
    for event in events:
        for resource, exclusive in event_claims(event):
            claims[resource] = claims.get(resource, False) or exclusive
    return claims


class DeliveryScheduler:
    """Which batches may be sent now (pure; the delivery loop does the sending).

    Theory of operation: every batch claims resources (rows, tables, message prefixes; see
    event_claims), and each resource has a queue of the batches that claim it, in stream order,
    like a lock manager's.  A batch may go when, in each of its queues, nothing ahead of it
    conflicts: for an exclusive claim, nothing is ahead; for a shared one, only shared claims
    are.  A batch leaves its queues when it is done (delivered or dead-lettered), not when it
    is sent, and a failed one stays: so a batch never overtakes an earlier batch of the same
    row, whether that one is waiting, in flight, or being retried.  With no claims at all (one
    request at a time), every batch may go at once.

    Each check costs O(claims), not O(queue): an exclusive claim may go only at the head of its
    queue, and a shared one looks along its queue only while the queue holds an exclusive claim
    (a table's queue holds every batch of the table, 2 x DELIVERY_CONCURRENCY of them)."""

    def __init__(self):
        self._queues: dict[tuple, collections.deque] = {}  # resource -> deque of (ticket, exclusive)
        self._exclusive: dict[tuple, int] = {}  # resource -> exclusive claims in its queue
        self._claims: dict[int, dict[tuple, bool]] = {}  # ticket -> its claims, until done
        self._waiting: dict[int, None] = {}  # tickets added and not started, in order

    def add(self, ticket: int, claims: dict[tuple, bool]) -> None:
        """A new batch; tickets come in stream order."""
        self._claims[ticket] = claims
        self._waiting[ticket] = None
        for resource, exclusive in claims.items():
            self._queues.setdefault(resource, collections.deque()).append((ticket, exclusive))
            self._exclusive[resource] = self._exclusive.get(resource, 0) + exclusive

    def ready(self, limit: int | None = None) -> list[int]:
        """The waiting batches that may go now (at most `limit`), in stream order."""
        found: list[int] = []
        for ticket in self._waiting:
            if limit is not None and len(found) >= limit:
                break
            if self._may_go(ticket):
                found.append(ticket)
        return found

    def start(self, ticket: int) -> None:
        del self._waiting[ticket]

    def done(self, ticket: int) -> None:
        for resource, exclusive in self._claims.pop(ticket).items():
            queue = self._queues[resource]
            queue.remove((ticket, exclusive))
            self._exclusive[resource] -= exclusive
            if not queue:
                del self._queues[resource], self._exclusive[resource]

    def _may_go(self, ticket: int) -> bool:
        for resource, exclusive in self._claims[ticket].items():
            queue = self._queues[resource]
            if exclusive:
                if queue[0][0] != ticket:
                    return False
            elif self._exclusive[resource]:
                for other, other_exclusive in queue:
                    if other == ticket:
                        break
                    if other_exclusive:
                        return False
        return True


async def check_wal_level(conn: PgConnection) -> None:
    (level,), = await conn.simple_query("SHOW wal_level")
    if level != "logical":
        raise PreconditionError(f"wal_level is {level!r} but logical replication needs "
                                "wal_level = logical in postgresql.conf (then restart PostgreSQL)")


async def check_publications(conn: PgConnection, publications: tuple[str, ...]) -> None:
    names = ", ".join(quote_literal(p) for p in publications)
    rows = await conn.simple_query(f"SELECT pubname FROM pg_catalog.pg_publication WHERE pubname IN ({names})")
    missing = [p for p in publications if (p,) not in rows]
    if missing:
        raise PreconditionError(
            f"publication {missing[0]!r} does not exist in database {conn.conninfo.dbname!r} (PUB_NAME): "
            f"create it, e.g. CREATE PUBLICATION {quote_ident(missing[0])} FOR ALL TABLES;")


def check_slot_failover(config, server_version_num: int) -> None:
    """SLOT_FAILOVER needs PostgreSQL 17 (the FAILOVER option of replication slots)."""
    if config.slot_failover and server_version_num < 170000:
        raise ConfigError(f"SLOT_FAILOVER=true needs PostgreSQL 17 or later (failover slots); this "
                          f"server is {server_version_num // 10000}: unset SLOT_FAILOVER")


async def _ensure_failover(conn: PgConnection, config, failover: str | None) -> None:
    """An existing slot without failover is given it when SLOT_FAILOVER asks (PostgreSQL 17+)."""
    if config.slot_failover and failover != "t":
        await conn.simple_query(f"ALTER_REPLICATION_SLOT {quote_ident(config.slot_name)} (FAILOVER true)")
        logger.info("replication slot %r now has failover on (SLOT_FAILOVER=true): standbys with "
                    "sync_replication_slots keep a copy", config.slot_name)


async def ensure_slot(conn: PgConnection, config) -> tuple[int, bool]:
    """Check the slot (pgoutput, this database); create it when CREATE_SLOT allows.  Returns its
    confirmed_flush_lsn (for a new slot, its consistent point; 0 when the server gives none) and
    whether it was created now."""
    check_slot_failover(config, conn.server_version_num)
    failover = ", failover" if conn.server_version_num >= 170000 else ", NULL"
    rows = await conn.simple_query(
        f"SELECT plugin, slot_type, database, confirmed_flush_lsn{failover} FROM pg_catalog.pg_replication_slots "
        f"WHERE slot_name = {quote_literal(config.slot_name)}")
    if rows:
        plugin, slot_type, database, confirmed, has_failover = rows[0]
        if slot_type != "logical" or plugin != "pgoutput":
            raise PreconditionError(f"replication slot {config.slot_name!r} (SLOT_NAME) uses "
                                    f"{plugin or slot_type!r}, not pgoutput: drop it or choose another SLOT_NAME")
        if database != conn.conninfo.dbname:
            raise PreconditionError(f"replication slot {config.slot_name!r} (SLOT_NAME) belongs to "
                                    f"database {database!r}, not {conn.conninfo.dbname!r}")
        await _ensure_failover(conn, config, has_failover)
        return (parse_lsn(confirmed) if confirmed else 0), False
    if not config.create_slot:
        raise PreconditionError(
            f"replication slot {config.slot_name!r} (SLOT_NAME) does not exist and CREATE_SLOT=false: "
            f"create it with SELECT pg_create_logical_replication_slot({quote_literal(config.slot_name)}, 'pgoutput');")
    logger.info("creating replication slot %r: PostgreSQL first waits for the transactions running now "
                "to end", config.slot_name)
    options = "(SNAPSHOT 'nothing', FAILOVER true)" if config.slot_failover else "NOEXPORT_SNAPSHOT"
    rows = await conn.simple_query(f"CREATE_REPLICATION_SLOT {quote_ident(config.slot_name)} LOGICAL pgoutput "
                                   f"{options}", timeout_s=math.inf)
    logger.info("created replication slot %r", config.slot_name)
    consistent_point = rows[0][1] if rows and len(rows[0]) > 1 else None  # slot_name, consistent_point, ...
    return (parse_lsn(consistent_point) if consistent_point else 0), True


async def prepare_replication(conn: PgConnection, config) -> tuple[int, bool]:
    """Every precondition of streaming, with errors that say what to fix.  Returns the slot's
    confirmed position, and whether the slot was created now."""
    try:
        check_server_version(conn)
        await check_wal_level(conn)
        await check_publications(conn, config.publications)
        return await ensure_slot(conn, config)
    except ServerError as exc:
        raise classify_server_error(exc, "preparing replication") from None


async def read_idle_timeout(conn: PgConnection) -> float:
    """READ_IDLE_TIMEOUT_S, or the server's wal_sender_timeout when that is longer."""
    rows = await conn.simple_query(
        "SELECT setting FROM pg_catalog.pg_settings WHERE name = 'wal_sender_timeout'")  # in ms
    try:
        return max(READ_IDLE_TIMEOUT_S, int(rows[0][0]) / 1000)
    except (IndexError, TypeError, ValueError):
        return READ_IDLE_TIMEOUT_S


DOMAIN_BASE_TYPES_SQL = """
WITH RECURSIVE d(oid, base) AS (
    SELECT oid, typbasetype FROM pg_catalog.pg_type WHERE typtype = 'd'
  UNION ALL
    SELECT d.oid, t.typbasetype FROM d JOIN pg_catalog.pg_type t ON t.oid = d.base WHERE t.typtype = 'd')
SELECT d.oid, d.base, dt.typarray, bt.typarray
FROM d JOIN pg_catalog.pg_type bt ON bt.oid = d.base AND bt.typtype <> 'd'
       JOIN pg_catalog.pg_type dt ON dt.oid = d.oid"""


async def load_domain_base_types(conn: PgConnection) -> dict[int, int]:
    """Domain -> its base type, and the domain's array type -> the base's array type, so that
    values of a domain over a known type are typed like it (README, "Events").  Domains
    created while streaming are read as text until the next connection."""
    mapping = {}
    for domain, base, domain_array, base_array in await conn.simple_query(DOMAIN_BASE_TYPES_SQL):
        mapping[int(domain)] = int(base)
        if int(domain_array) and int(base_array):
            mapping[int(domain_array)] = int(base_array)
    return mapping


async def start_streaming(conn: PgConnection, config, start_lsn: int) -> int:
    """START_REPLICATION; returns the pgoutput protocol version in use."""
    proto = pgoutput_proto_version(conn.server_version_num)
    if proto < 2:  # one line, at every start: what a protocol 1 server cannot send
        logger.log(logging.WARNING if config.streaming else logging.INFO,
                   "PostgreSQL %s speaks pgoutput protocol 1: row changes only; logical messages and "
                   "streaming need PostgreSQL 14%s", conn.parameters.get("server_version", "?"),
                   " (STREAMING=true is ignored)" if config.streaming else "")
    await conn.send(encode_query(build_start_replication(config, proto, start_lsn)))
    with trio.move_on_after(DEFAULT_QUERY_TIMEOUT_S) as scope:
        tag, body = await conn.receive_message()
    if scope.cancelled_caught:
        raise ConnectionLost("PostgreSQL did not answer START_REPLICATION")
    if tag == ERROR_RESPONSE:
        raise classify_server_error(ServerError(decode_error_fields(body)), "START_REPLICATION failed")
    if tag != COPY_BOTH_RESPONSE:
        raise ProtocolError(f"unexpected message {chr(tag)!r} in reply to START_REPLICATION")
    logger.info("streaming from slot %r at %s (pgoutput protocol %d, publications %s)", config.slot_name,
                format_lsn(start_lsn), proto, ",".join(config.publications))
    return proto


class ReplicationStream:
    """The reader side of one streaming connection."""

    def __init__(self, conn: PgConnection, assembler, ack: AckTracker, send_channel, delivery=None,
                 read_timeout_s: float = READ_IDLE_TIMEOUT_S, backfill=None):
        self.read_timeout_s = read_timeout_s
        self.conn = conn
        self.assembler = assembler
        self.ack = ack
        self.send_channel = send_channel
        self.delivery = delivery  # a DeliveryLoop: while it waits for an answer, yield often
        #: A Backfill (section 10): it sees each chunk holding messages, and every chunk while a
        #: backfill chunk's window is open, before delivery does.
        self.backfill = backfill

    async def run_reader(self) -> None:
        conn, buffer, timeout_s = self.conn, self.conn.buffer, self.read_timeout_s
        while True:
            with trio.move_on_after(timeout_s) as scope:
                data = await conn.receive_some()
            if scope.cancelled_caught:
                raise ConnectionLost(f"no data from PostgreSQL for {timeout_s:g} s")
            buffer.feed(data)
            await self.handle_buffered()
            if len(data) < COALESCE_READ_BELOW_BYTES:
                await trio.sleep(COALESCE_READ_S)

    async def handle_buffered(self) -> None:
        """Every complete message received; XLogData (nearly all of them) on the short path."""
        buffer, feed, ack, send = self.conn.buffer, self.assembler.feed, self.ack, self.send_channel.send
        delivery, backfill, unyielded = self.delivery, self.backfill, 0
        frame, kind = XLOG_DATA_FRAME, XLOG_DATA.value  # kind: a plain int, compared for every message
        while True:
            xlog = buffer.next_copy_data(frame, kind)
            if xlog is None:
                message = buffer.next_message()
                if message is None:
                    return
                await self.handle_message(*message)
                continue
            (_, _, _, wal_start, wal_end), payload = xlog
            if wal_end > ack.received_lsn:
                ack.received_lsn = wal_end
            chunks = feed(wal_start, payload)
            if chunks:
                unyielded = 0
                for chunk in chunks:
                    if backfill is not None and (chunk.op_counts is not None or backfill.window is not None):
                        for part in backfill.filter(chunk):
                            ack.queued()
                            await send(part)
                        continue
                    ack.queued()
                    await send(chunk)  # a schedule point
            else:
                unyielded += 1
                if unyielded >= YIELD_EVERY_MESSAGES and delivery is not None and delivery.in_flight is not None:
                    # The answer to the request in flight may be in: let the delivery task act on
                    # it now rather than after a whole chunk (the receiver idles until it does).
                    unyielded = 0
                    await trio.lowlevel.checkpoint()

    async def handle_message(self, tag: int, body: bytes) -> None:
        if tag == COPY_DATA and body and body[0] == XLOG_DATA:  # handle_buffered takes the well-formed ones
            wal_start, wal_end, payload = decode_xlog_data(body)
            self.ack.received(wal_end)
            for chunk in self.assembler.feed(wal_start, payload):
                for part in (chunk,) if self.backfill is None else self.backfill.filter(chunk):
                    self.ack.queued()
                    await self.send_channel.send(part)
        elif tag == COPY_DATA and body and body[0] == PRIMARY_KEEPALIVE:
            wal_end, reply = decode_keepalive(body)
            idle = not self.assembler.in_transaction and not self.assembler.open_streams
            self.ack.keepalive(wal_end, idle)
            if reply:
                await self.conn.send(self.ack.status_update())
        elif tag == ERROR_RESPONSE:
            raise classify_server_error(ServerError(decode_error_fields(body)), "replication stream", streaming=True)
        elif self.conn.handle_asynchronous(tag, body):
            pass  # a notice, a parameter status: as anywhere else
        elif tag in (COPY_DONE, COMMAND_COMPLETE, READY_FOR_QUERY):  # e.g. the server shuts down
            raise ConnectionLost("PostgreSQL ended the replication stream")
        else:
            kind = chr(body[0]) if tag == COPY_DATA and body else ""
            raise ProtocolError(f"unexpected message {chr(tag) + kind!r} in the replication stream")


async def run_feedback(conn: PgConnection, ack: AckTracker, interval_s: float) -> None:
    """Standby status updates: at least every interval_s, so any advance is reported within it."""
    last_ping = trio.current_time()
    while True:
        ping = trio.current_time() - last_ping >= LIVENESS_PING_S
        if ping:
            last_ping = trio.current_time()
        await conn.send(ack.status_update(reply_requested=ping))
        await trio.sleep(interval_s)


class DeliveryLoop:
    """Takes chunks in order, cuts them into batches of up to the sink's batch size (a batch may
    span chunks and transactions: it is a run of consecutive events), and delivers them, up to
    `concurrency` at a time in the order the DeliveryScheduler allows; the AckTracker hears of
    each batch delivered.  With concurrency 1 a batch is delivered in this task, one after the
    other, with no scheduling at all."""

    def __init__(self, sink, ack: AckTracker, batch_size: int, linger_s: float, concurrency: int = 1):
        self.sink = sink
        self.ack = ack
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.concurrency = concurrency
        self.events: list[Event] = []
        self.marks: list[tuple[int, int | None]] = []  # (events in self.events after the chunk, end_lsn)
        self.stopping = False
        self.in_flight: trio.Event | None = None  # set when no batch is being delivered any more
        self.batches: dict[int, list[Event]] = {}  # ticket -> batch, sent or waiting, not yet done
        self.requests_in_flight = 0
        self.deadline = 0.0  # when the pending partial batch goes out, whatever else arrives
        self._scheduler = DeliveryScheduler()
        self._max_batches = 1 if concurrency == 1 else 2 * concurrency  # waiting ones included
        self._room = trio.Event()  # set when a batch is done
        self._nursery: trio.Nursery | None = None
        self._failure: DeliveryFailed | None = None
        self.stats = ack.stats.attach(self) if ack.stats is not None else None  # counts chunks taken

    async def run(self, receive_channel) -> None:
        async with trio.open_nursery() as nursery, receive_channel:
            self._nursery = nursery
            while not self.stopping:
                chunk = await self._next_chunk(receive_channel)
                if chunk is None:
                    await self._flush(len(self.events))
                    continue
                taken_at = trio.current_time()
                if not self.marks:  # a new batch: it waits at most linger_s from now
                    self.deadline = taken_at + self.linger_s
                self.events.extend(chunk.events)
                self.marks.append((len(self.events), chunk.end_lsn))
                if self.stats is not None:
                    self.stats.chunk_taken(chunk)
                if len(self.events) >= self.batch_size:
                    while len(self.events) >= self.batch_size and not self.stopping:
                        await self._flush(self.batch_size)
                    self.deadline = taken_at + self.linger_s  # what is left came with this chunk

    async def finish(self, timeout_s: float) -> None:
        """At shutdown: take no new chunk, let the batches in flight finish (bounded); say what
        was abandoned when they do not."""
        self.stopping = True
        if self.in_flight is None:
            return
        with trio.move_on_after(timeout_s):
            await self.in_flight.wait()
        abandoned = [event for batch in self.batches.values() for event in batch]
        if self.in_flight is not None and abandoned:
            logger.warning("shutdown: the delivery of %s did not finish within %g s and is abandoned; "
                           "nothing from its first event on is acknowledged, so it is sent again at the "
                           "next start", describe_event_ids(abandoned), timeout_s)

    def oldest_event(self) -> Event | None:
        """The oldest event taken and not yet confirmed (for the lag the operations port shows)."""
        for batch in self.batches.values():
            return batch[0]
        return self.events[0] if self.events else None

    async def _next_chunk(self, receive_channel):
        """The next chunk; None when a partial batch should go out now.  A chunk already queued
        is taken without a schedule point, so the next batch goes out before the reader decodes
        another chunk (at HTTP speed that wait is a good part of each request).  A partial batch
        waits for more only until its deadline: linger_s after its first chunk, not after the
        latest (a trickle of small transactions must not hold it back until it is full)."""
        try:
            return receive_channel.receive_nowait()
        except trio.WouldBlock:
            if not self.marks:
                return await receive_channel.receive()
            if not self.linger_s:
                return None
        with trio.move_on_at(self.deadline):
            return await receive_channel.receive()
        return None

    async def _flush(self, count: int) -> None:
        """Cuts the next `count` events into a batch and sends it (concurrency 1), or queues it
        and waits only while too many batches are unfinished."""
        batch = self.events[:count]
        del self.events[:count]
        confirmed = 0
        while confirmed < len(self.marks) and self.marks[confirmed][0] <= count:
            confirmed += 1
        ticket = self.ack.pending([end_lsn for _, end_lsn in self.marks[:confirmed]])
        self.marks = [(after - count, lsn) for after, lsn in self.marks[confirmed:]]
        if not batch:
            self.ack.done(ticket)
            return
        self.batches[ticket] = batch
        if self.concurrency == 1:
            self._began()
            await self._deliver(ticket)
            return
        self._scheduler.add(ticket, batch_claims(batch))
        self._dispatch()
        while len(self.batches) >= self._max_batches and not self.stopping:
            self._room = trio.Event()
            await self._room.wait()

    def _dispatch(self) -> None:
        """Starts the batches the scheduler lets go, while fewer than `concurrency` are in flight."""
        if self._failure is not None or self.stopping:
            return
        free = self.concurrency - self.requests_in_flight
        for ticket in self._scheduler.ready(free) if free > 0 else ():
            self._scheduler.start(ticket)
            self._began()
            self._nursery.start_soon(self._deliver_concurrently, ticket)

    def _began(self) -> None:
        self.requests_in_flight += 1
        if self.in_flight is None:
            self.in_flight = trio.Event()

    async def _deliver(self, ticket: int) -> None:
        try:
            await self.sink.deliver(self.batches[ticket])
        finally:
            self.requests_in_flight -= 1
            if not self.requests_in_flight:
                self.in_flight.set()
                self.in_flight = None
        del self.batches[ticket]
        self.ack.done(ticket)

    async def _deliver_concurrently(self, ticket: int) -> None:
        try:
            await self._deliver(ticket)
        except DeliveryFailed as failure:
            # ON_FAILURE=exit: send nothing more, let the other requests in flight finish (bounded),
            # then fail; the failed batch is never done, so nothing from it on is acknowledged.
            if self._failure is None:
                self._failure = failure
                self._nursery.start_soon(self._fail_after_in_flight)
            return
        self._scheduler.done(ticket)
        self._room.set()
        self._dispatch()

    async def _fail_after_in_flight(self) -> None:
        with trio.move_on_after(SHUTDOWN_TIMEOUT_S):
            while self.in_flight is not None:
                await self.in_flight.wait()
        raise self._failure


def delivery_concurrency(config, sink) -> int:
    """DELIVERY_CONCURRENCY, for every sink but stdout, which writes one batch at a time."""
    return 1 if sink.name == "stdout" else config.delivery_concurrency


async def run_session(config, sink, ack: AckTracker, stop: trio.Event, on_streaming=None,
                      backfill=None) -> None:
    """One connection from connect to stop or failure.  Returns only after `stop` was set.
    `backfill`: a Backfill (section 10), whose reading task runs beside the stream."""
    async with open_pg_connection(config.conninfo) as conn:
        confirmed, created = await prepare_replication(conn, config)
        ack.resume_from(confirmed)
        read_timeout_s = await read_idle_timeout(conn)
        base_types = await load_domain_base_types(conn)
        proto = await start_streaming(conn, config, ack.flushed_lsn)
        if on_streaming:
            on_streaming()
        assembler = ChangeAssembler(chunk_events=CHUNK_EVENTS, spill_bytes=SPILL_BYTES,
                                    relation_columns=getattr(sink, "relation_columns", None))
        assembler.base_types = base_types
        send_channel, receive_channel = trio.open_memory_channel(CHANNEL_CHUNKS)
        linger = BATCH_LINGER_S if sink.batch_size > 1 and sink.name != "stdout" else 0.0
        delivery = DeliveryLoop(sink, ack, sink.batch_size, linger, delivery_concurrency(config, sink))
        stream = ReplicationStream(conn, assembler, ack, send_channel, delivery, read_timeout_s)
        if backfill is not None and created and config.backfill_on_create:
            backfill.request(("*",), "BACKFILL_ON_CREATE")
        if backfill is not None and proto < 2:
            backfill.refuse_all(f"PostgreSQL {conn.parameters.get('server_version', '?')} cannot backfill: "
                                "the watermarks are logical messages, which pgoutput carries from PostgreSQL 14")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_feedback, conn, ack, config.feedback_interval_s)
                nursery.start_soon(delivery.run, receive_channel)
                if backfill is not None and proto >= 2:
                    stream.backfill = backfill
                    nursery.start_soon(backfill.run, conn.conninfo, ack)
                reader_scope = trio.CancelScope()
                nursery.start_soon(_run_in_scope, reader_scope, stream.run_reader)
                await stop.wait()
                logger.info("stopping: finishing the delivery in flight")
                reader_scope.cancel()
                await delivery.finish(SHUTDOWN_TIMEOUT_S)
                nursery.cancel_scope.cancel()
            await _say_goodbye(conn, ack)
        finally:
            assembler.close()
            ack.discard_in_flight()


async def _run_in_scope(scope: trio.CancelScope, function) -> None:
    with scope:
        await function()


async def _say_goodbye(conn: PgConnection, ack: AckTracker) -> None:
    """Final status update with the confirmed position, then CopyDone."""
    with trio.move_on_after(2) as scope:
        scope.shield = True
        try:
            await conn.send(ack.status_update() + encode_copy_done())
        except ConnectionLost:
            logger.warning("could not send the final status update: the connection is gone")
    logger.info("stopped at confirmed position %s", format_lsn(ack.flushed_lsn))


async def _run_session_or_stop(config, sink, ack: AckTracker, stop: trio.Event, on_streaming,
                               backfill=None) -> None:
    """run_session, abandoned when `stop` comes before streaming began (connecting, waiting for
    CREATE_REPLICATION_SLOT): nothing is in flight then, so there is nothing to finish."""
    streaming = False

    def started():
        nonlocal streaming
        streaming = True
        on_streaming()

    async with trio.open_nursery() as nursery:
        async def cancel_setup_on_stop():
            await stop.wait()
            if not streaming:
                nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_setup_on_stop)
        await run_session(config, sink, ack, stop, started, backfill)
        nursery.cancel_scope.cancel()


def first_error(exc: BaseException) -> BaseException:
    """The error that matters in what a nursery raised: a wal2http error before anything else."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        for leaf in leaves:
            if isinstance(leaf, Wal2HttpError) and not isinstance(leaf, ConnectionLost):
                return leaf
        for leaf in leaves:
            if not isinstance(leaf, trio.Cancelled):
                return leaf
        return leaves[0]
    return exc


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


RECONNECT_PROGRESS_S = 60.0  #: a session that streamed this long resets the backoff, as progress does
RECONNECT_ALERT_AFTER_S = 300.0  #: failing this long without progress: alert (mailed when configured)
RECONNECT_ALERT_KEY = "postgresql"


class ReconnectPolicy:
    """When run_replication reconnects, and when it alerts.

    The backoff doubles from RECONNECT_BASE_S to RECONNECT_MAX_S and starts again only after
    progress (the flushed position moved, or a session streamed RECONNECT_PROGRESS_S): an error
    that comes back at the same place each time (the server fails decoding some WAL) must not
    become a reconnection every second.  A failing period ends only when the slot advances;
    failing for RECONNECT_ALERT_AFTER_S is one alert, and the advance after it one "recovered"."""

    def __init__(self, ack: AckTracker, alerter=None):
        self.ack = ack
        self.alerter = alerter
        self.backoff = Backoff(RECONNECT_BASE_S, RECONNECT_MAX_S)
        self.failing = FailingPeriod(alerter, RECONNECT_ALERT_KEY)
        self.streaming_since: float | None = None  # Trio time the current session began streaming
        self._flushed_before = ack.flushed_lsn

    def session_starts(self) -> None:
        self.streaming_since, self._flushed_before = None, self.ack.flushed_lsn

    def streaming(self) -> None:
        self.streaming_since = trio.current_time()

    def session_failed(self, error: BaseException) -> float:
        """Logs the failure, alerts when it has lasted; returns the delay before the next try."""
        advanced = self.ack.flushed_lsn > self._flushed_before
        streamed_s = 0.0 if self.streaming_since is None else trio.current_time() - self.streaming_since
        if advanced:
            self.failing.since = None  # a new period (an alerted one ended at the advance)
        if advanced or streamed_s >= RECONNECT_PROGRESS_S:
            self.backoff.reset()
        self.failing.failed()
        delay = self.backoff.next_delay()
        logger.warning("%s; reconnecting in %.1f s", error, delay)
        if (self.alerter is not None and not self.failing.alerted
                and self.failing.duration_s >= RECONNECT_ALERT_AFTER_S):
            self.failing.alert("wal2http cannot stream from PostgreSQL",
                               f"The replication connection has failed for {self.failing.duration_s:.0f} s "
                               f"without the slot advancing; wal2http keeps reconnecting.\n"
                               f"Last error: {error}\n")
            self.ack.on_progress = self._slot_advanced  # armed: the next advance ends the period
        return delay

    def _slot_advanced(self) -> None:
        self.ack.on_progress = None
        self.failing.ended("wal2http streams from PostgreSQL again",
                           "The replication connection works again and the slot advances.\n")


async def run_replication(config, sink, stop: trio.Event, task_status=trio.TASK_STATUS_IGNORED,
                          alerter=None, stats=None, backfill=None) -> AckTracker:
    """Stream until `stop` is set, reconnecting with backoff (ReconnectPolicy) when the
    connection is lost; any other error propagates.  `stats`: the operations port's Stats;
    `backfill`: a Backfill (section 10)."""
    ack = AckTracker()
    ack.stats = stats
    policy, started = ReconnectPolicy(ack, alerter), False

    def on_streaming():
        nonlocal started
        policy.streaming()
        if stats is not None:
            stats.state = "streaming"
        if not started:
            started = True
            task_status.started(ack)

    while not stop.is_set():
        policy.session_starts()
        try:
            await _run_session_or_stop(config, sink, ack, stop, on_streaming, backfill)
            return ack
        except Exception as exc:  # noqa: BLE001 - sorted below; anything not retryable propagates
            error = first_error(exc)
            if not isinstance(error, ConnectionLost):
                raise error from None
            delay = policy.session_failed(error)
            if stats is not None:
                stats.reconnecting()
        with trio.move_on_after(delay):
            await stop.wait()
    return ack


# =====================================================================================================
# 10. Backfill: existing rows, between watermarks
# =====================================================================================================
# Sends the rows a table already has as `read` events while streaming goes on (README, "Backfill").
# Theory of operation (the DBLog watermark method): a table is read in chunks, in the order of its
# primary key (or replica-identity index), over an ordinary connection of its own.  Each chunk is
#   low watermark -> SELECT the next BACKFILL_CHUNK_ROWS rows after the cursor -> high watermark
# where a watermark is a non-transactional logical message (prefix wal2http.watermark), so it
# takes its place in the stream at once.  In the stream, between the chunk's two watermarks, every
# change of the table names a key: that row is dropped from the chunk, because the change (or a
# later one) carries state at least as new.  At the high watermark the chunk's remaining rows go
# out as read events, in its place.  So for every row the last event a receiver gets holds the
# row's latest committed state, whatever writes run during the backfill.
#
# Two details make that hold in PostgreSQL, where a commit is written to WAL slightly before other
# sessions see it: each watermark is made durable at once (the logical walsender sends only flushed
# WAL; see emit_watermark), and the chunk's snapshot is taken again while a transaction it cannot
# see has committed by the commit log (UNSEEN_COMMITS_SQL), so that every transaction the stream
# shows before the low watermark is in the chunk.  (One whose commit is flushed but whose backend
# has not yet marked it in the commit log, a window of a few instructions, cannot be seen by any
# query.)
#
# Pure: table patterns, the state file's document, the chunk query, ChunkWindow (what the stream
# shows between the watermarks).  I/O: Backfill (the queue, the state file, the reading task).

BACKFILL_SIGNAL_PREFIX = "wal2http.backfill"  #: pg_logical_emit_message(true, this, '<tables>') asks for one
WATERMARK_PREFIX = "wal2http.watermark"  #: the chunks' low and high watermarks (never delivered)
BACKFILL_SLOW_CHUNK_S = 2.0  #: a chunk's SELECT slower than this halves the next chunk's rows
BACKFILL_MIN_CHUNK_ROWS = 10  #: the smallest chunk that adapting goes down to
BACKFILL_STATEMENT_TIMEOUT_S = 60.0  #: statement_timeout of the backfill connection
BACKFILL_PROGRESS_S = 5.0  #: a progress line this often while a table is read
BACKFILL_SNAPSHOT_TRIES = 50  #: snapshots tried per chunk before a new low watermark
STATE_FORMAT = 1  #: the state file's "version"

#: Transactions the snapshot does not see although they have committed: a snapshot taken while
#: one of them finished.  Taken again until none (see the section comment).
UNSEEN_COMMITS_SQL = ("SELECT count(*) FROM pg_catalog.pg_snapshot_xip(pg_catalog.pg_current_snapshot()) AS x "
                      "WHERE pg_catalog.pg_xact_status(x) = 'committed'")

_TABLE_PATTERN = re.compile(r'\s*(?:(\*)|("(?:[^"]|"")+"|[^".,\s]+)\.(?:(\*)|("(?:[^"]|"")+"|[^".,\s]+)))\s*')


class BackfillRefused(Wal2HttpError):
    """A table cannot be backfilled; the message names it and says why.  The others go on."""


def _identifier(text: str) -> str:
    """An identifier as PostgreSQL reads it: "Quoted" exactly, unquoted folded to lower case."""
    return text[1:-1].replace('""', '"') if text.startswith('"') else text.lower()


def parse_backfill_tables(value: str, variable: str = "BACKFILL_TABLES") -> tuple[str, ...]:
    """`schema.table`, `schema.*` or `*`, comma-separated -> those patterns, each as
    "schema.table", "schema.*" or "*" (quoted names exact, unquoted ones in lower case)."""
    problem = f"{variable}: expected schema.table, schema.* or *, comma-separated (got {value!r})"
    patterns, pos = [], 0
    while True:
        match = _TABLE_PATTERN.match(value, pos)
        if match is None:
            raise ConfigError(problem)
        everything, schema, any_table, table = match.groups()
        patterns.append("*" if everything else
                        f"{_identifier(schema)}.{'*' if any_table else _identifier(table)}")
        pos = match.end()
        if pos == len(value):
            break
        if value[pos] != ",":
            raise ConfigError(problem)
        pos += 1
    return tuple(dict.fromkeys(patterns))


def table_text(table: tuple[str, str]) -> str:
    return f"{table[0]}.{table[1]}"


def match_tables(patterns: Iterable[str], published: Iterable[tuple[str, str]]) -> tuple[list, list]:
    """(the published tables the patterns name, in the order of `published`; the patterns that
    name a table which is not published, as "schema.table").  `schema.*` and `*` only ever mean
    published tables."""
    published = list(published)
    names = {table_text(t) for t in published}
    schemas = {p[:-2] for p in patterns if p.endswith(".*")}
    chosen = [t for t in published
              if "*" in patterns or t[0] in schemas or table_text(t) in patterns]
    unknown = [p for p in patterns if p != "*" and not p.endswith(".*") and p not in names]
    return chosen, unknown


# --- the state file -------------------------------------------------------------------------------

def encode_state(requests: list[dict], queue: list[dict], done: dict[str, str]) -> bytes:
    return (json.dumps({"version": STATE_FORMAT, "requests": requests, "queue": queue, "done": done},
                       indent=1) + "\n").encode()


def decode_state(data: bytes, path: str) -> tuple[list[dict], list[dict], dict[str, str]]:
    """The state file's (requests, queue, done); ConfigError (exit 2) naming the file when it is
    not one."""
    try:
        document = json.loads(data)
        if document.get("version") != STATE_FORMAT:
            raise ValueError(f"version {document.get('version')!r}, expected {STATE_FORMAT}")
        requests, queue, done = document["requests"], document["queue"], document["done"]
        for request in requests:
            if not isinstance(request["source"], str) or not all(isinstance(p, str) for p in request["tables"]):
                raise ValueError("a request is not {tables, source}")
        for entry in queue:
            after = entry["after"]
            if not (isinstance(entry["schema"], str) and isinstance(entry["table"], str)
                    and isinstance(entry["rows"], int) and isinstance(entry["source"], str)
                    and (after is None or all(v is None or isinstance(v, str) for v in after))):
                raise ValueError("a queue entry is not {schema, table, after, rows, source}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in done.items()):
            raise ValueError("done is not an object of strings")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(f"STATE_FILE: {path} is not a wal2http state file ({exc}); move it away "
                          f"to start over (backfills then start from the beginning)") from None
    return requests, queue, done


def write_file_atomically(path: str, data: bytes) -> None:
    """Replaces `path` with `data` so that a crash leaves the old file or the new one, never a
    mix: a temporary file beside it, fsync'ed, renamed over it, then the directory fsync'ed."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".wal2http-state-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


# --- one table, and one chunk of it ---------------------------------------------------------------

@dataclasses.dataclass
class BackfillTable:
    """What reading one table needs, from the catalog (describe_backfill_table)."""

    schema: str
    table: str
    writer: RelationWriter  #: the published columns, as pgoutput would send them
    order: tuple[str, ...]  #: the primary key's (or replica-identity index's) columns
    order_types: tuple[str, ...]  #: their types as SQL (format_type), for the cursor's literals
    order_json: tuple[Callable[[str], str], ...]  #: their converters to JSON text
    row_filter: str | None  #: the publications' row filters, OR-ed (None: every row)
    estimated_rows: int | None  #: pg_class.reltuples (None: never counted)
    #: The SELECT reads the writer's columns, then the order columns that are not among them.
    extra: tuple[str, ...] = dataclasses.field(init=False)
    order_positions: tuple[int, ...] = dataclasses.field(init=False)  #: in the SELECT's columns
    #: Changes name their row by its key's JSON text, which is the order columns' (see ChunkWindow).
    keyed_by_order: bool = dataclasses.field(init=False)
    _key_line: str = dataclasses.field(init=False)  # the key's JSON text, its values as %s
    _key_values: Callable = dataclasses.field(init=False)  # a row's values -> the key's
    _row_line: str = dataclasses.field(init=False)  # a read event from "schema" to its lsn's value

    def __post_init__(self) -> None:
        writer = self.writer
        self.extra = tuple(c for c in self.order if c not in writer.names)
        columns = (*writer.names, *self.extra)
        self.order_positions = tuple(columns.index(c) for c in self.order)
        self.keyed_by_order = set(self.order) == set(writer.key_names)
        members = [member.replace("%", "%%") + "%s" for member in writer.members.values()]
        keys = writer.key_indexes
        self._key_line = "{" + ",".join(members[i] for i in keys) + "}" if keys else "null"
        self._key_values = operator.itemgetter(*keys) if keys else lambda values: ()
        self._row_line = (writer.head.replace("%", "%%") + '"key":%s,"new":{' + ",".join(members) +
                          '},"old":null,"unchanged_toast":[],"xid":null,"lsn":"')

    @property
    def name(self) -> str:
        return table_text((self.schema, self.table))

    def read_row(self, line: bytes) -> tuple[bytes, str, str]:
        """A row of the chunk's COPY (text format; the writer's columns first) -> (its bytes, its
        key's JSON text, its read event's line from "schema" to the lsn's value).  Split by
        str.split and converted by the writer's converters, as a change's values are; what that
        does not take (NULLs and escapes, a value a converter refuses, malformed bytes) goes the
        general way (_convert_tuple: such a value stays a string; ProtocolError when malformed)."""
        converters = self.writer.converters
        try:
            if 92 in line or line[-1] != 10:  # a backslash (NULL, an escape), or no newline at the end
                raise ValueError("not plain")
            values = line[:-1].decode().split("\t")
            if len(values) < len(converters):
                raise ValueError("column count")
            values = [convert(value) for convert, value in zip(converters, values)]
        except (IndexError, *_VALUE_ERRORS):  # UnicodeDecodeError is a ValueError
            values = self._values_slowly(line)
        key = self._key_line % self._key_values(values)  # one key column: its value, else a tuple
        return line, key, self._row_line % (key, *values)

    def _values_slowly(self, line: bytes) -> list[str]:
        values = decode_copy_text(line)
        names = self.writer.names
        if len(values) < len(names):
            raise ProtocolError(f"malformed CopyData message: {len(values)} columns, {len(names)} expected "
                                f"for {self.name}")
        row, _ = _convert_tuple(self.writer, values[:len(names)], "COPY")
        return [row[name] for name in names]

    def order_values(self, line: bytes) -> list[str | None]:
        """A selected row's order-column values as text (the cursor)."""
        values = decode_copy_text(line)
        return [values[i] for i in self.order_positions]


def build_chunk_query(table: BackfillTable, after: Sequence[str | None] | None, limit: int) -> str:
    """The SELECT of the next chunk, as COPY (text format: one CopyData a row, split in C): the
    published columns (then any order column not among them) of the rows after the cursor
    (keyset pagination) that pass the row filter."""
    order = ", ".join(quote_ident(c) for c in table.order)
    columns = ", ".join(quote_ident(c) for c in (*table.writer.names, *table.extra))
    conditions = [f"({table.row_filter})"] if table.row_filter else []
    if after is not None:
        values = ", ".join("NULL" if v is None else f"{quote_literal(v)}::{t}" for v, t in zip(after, table.order_types))
        conditions.append(f"({order}) > ({values})" if len(table.order) > 1 else f"{order} > {values}")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    return (f"COPY (SELECT {columns} FROM {quote_ident(table.schema)}.{quote_ident(table.table)}{where} "
            f"ORDER BY {order} LIMIT {limit}) TO STDOUT")


#: A read event's line: START, its number in the chunk, OP, BackfillTable.read_row's text, END.
_READ_LINE_START, _READ_LINE_OP = '{"id":"%s:r', '","op":"read",'
_READ_LINE_END = '%s","commit_lsn":null,"commit_time":null,"seq":null}'


def _order_identity(values: Iterable) -> tuple[str, ...]:
    """A row's order-column values as compared between the chunk and the stream."""
    return tuple(encode_json(value) for value in values)


class ChunkWindow:
    """One chunk between its watermarks (pure; the Backfill task fills it, the stream reads it).

    `rows` (set before the high watermark is written): per row selected, BackfillTable.read_row's
    (COPY line, key JSON text, read line).  `observe` takes the stream's events between the
    watermarks and notes the rows they change; `read_chunk` at the high watermark gives the read
    events of the rows left.  Rows are told apart by their order columns.  When those are the
    replica identity's (the primary key, or the index of REPLICA IDENTITY USING INDEX), a change
    names its row by its key's JSON text (and its old key's, when it changed the key): written by
    the same converters from the same text as the chunk's, so they compare as they are, at no cost
    per row.  Otherwise (REPLICA IDENTITY FULL, whose key is every column) both sides are decoded
    and compared by value.  A change whose row cannot be told (its key lacks a column, being
    unchanged TOAST) makes the whole chunk be read again: `read_chunk` then gives None."""

    def __init__(self, run_id: str, number: int, table: BackfillTable):
        self.run_id, self.number, self.table = run_id, number, table
        self.rows: list[tuple[bytes, str, str]] = []
        self.opened = False  # the low watermark went by in the stream
        self.changed: set = set()  # key JSON texts, or order values (see the class comment)
        self.truncated = False
        self.unknown_row = False
        self.high_lsn: int | None = None
        self.sent = 0  # read events in the chunk given
        self.closed = trio.Event()  # the high watermark went by (read_chunk called)
        self._head = table.writer.head

    def watermark(self, mark: str) -> str:
        """The content of this chunk's low or high watermark message."""
        return encode_json({"backfill": self.run_id, "chunk": self.number, "mark": mark,
                            "table": self.table.name})

    def observe(self, events: Iterable[Event]) -> None:
        head = self._head
        for event in events:
            line = event.line
            at = line.find(',"schema":')  # the first is the envelope's: ids and ops hold none
            if at < 0 or not line.startswith(head, at + 1):
                continue
            op = event_op(event)
            if op == "truncate":
                self.truncated = True
            elif op != "message":
                texts = _written_keys(line, at + 1 + len(head)) if self.table.keyed_by_order else None
                if texts is None or '"unchanged_toast":[]' not in line:
                    self._observe_decoded(event.data, texts)
                else:
                    self.changed.update(texts)

    def _observe_decoded(self, data: Mapping, texts: list[str] | None) -> None:
        order = self.table.order
        if texts is not None:  # keyed by order, with unchanged TOAST: is the key whole?
            if all(column in (data["key"] or ()) for column in order):
                self.changed.update(texts)
            else:
                self.unknown_row = True
            return
        found = False
        for row in (data["key"], data["new"], data["old"]):
            if row and all(column in row for column in order):
                self.changed.add(_order_identity(row[column] for column in order))
                found = True
        self.unknown_row |= not found

    def read_chunk(self, high_lsn: int) -> Chunk | None:
        """The read events of the rows no change touched, at the high watermark `high_lsn`."""
        self.high_lsn = high_lsn
        if self.unknown_row:
            return None
        rows = enumerate(self.rows)
        if self.truncated:
            rows = ()
        elif self.changed and self.table.keyed_by_order:
            changed = self.changed
            rows = [(n, row) for n, row in rows if row[1] not in changed]
        elif self.changed:
            converters, changed, values = self.table.order_json, self.changed, self.table.order_values
            rows = [(n, row) for n, row in rows if _order_identity(
                None if v is None else decode_event_line(convert(v))
                for convert, v in zip(converters, values(row[0]))) not in changed]
        lsn = format_lsn(high_lsn)
        start, end = _READ_LINE_START % lsn, _READ_LINE_END % lsn
        events = [Event(f"{start}{n}{_READ_LINE_OP}{line}{end}") for n, (_, _, line) in rows]
        self.rows, self.sent = [], len(events)  # the rows' memory goes with the events
        return Chunk(events, high_lsn, {"read": len(events)} if events else None, transaction=False)


def _written_keys(line: str, pos: int) -> list[str] | None:
    """The JSON texts of a change event's `key` and, when not null, `old`, as the envelope wrote
    them (`pos`: where '"key":' should begin).  Under the replica identity's key, `old` is the old
    key (an update that changed it, a delete).  None when the line is not as the envelope writes."""
    if not line.startswith('"key":', pos):
        return None
    try:
        _, end = _JSON_CHECK(line, pos + 6)
        texts = [line[pos + 6:end]]
        if not line.startswith(',"new":', end):
            return None
        _, old = _JSON_CHECK(line, end + 7)
        if not line.startswith(',"old":', old):
            return None
        _, stop = _JSON_CHECK(line, old + 7)
    except (StopIteration, ValueError):
        return None
    if stop - old - 7 != 4 or not line.startswith("null", old + 7):
        texts.append(line[old + 7:stop])
    return texts


# --- reading (I/O) --------------------------------------------------------------------------------

async def read_published_tables(conn: PgConnection, publications: Sequence[str]) -> dict[tuple[str, str], tuple]:
    """(schema, table) -> (published column names or None for all, row filter or None) over the
    publications: a row goes out when any publication's filter passes, a column when any lists it."""
    names = ", ".join(quote_literal(p) for p in publications)
    details = "attnames::text, rowfilter" if conn.server_version_num >= 150000 else "NULL, NULL"
    rows = await conn.simple_query(f"SELECT schemaname, tablename, {details} FROM pg_catalog.pg_publication_tables "
                                   f"WHERE pubname IN ({names}) ORDER BY 1, 2")
    tables: dict[tuple[str, str], tuple] = {}
    for schema, table, attnames, row_filter in rows:
        columns = None if attnames is None else frozenset(decode_array_text(attnames))
        if (schema, table) in tables:
            known_columns, known_filter = tables[(schema, table)]
            columns = None if known_columns is None or columns is None else known_columns | columns
            row_filter = None if known_filter is None or row_filter is None else f"({known_filter}) OR ({row_filter})"
        tables[(schema, table)] = (columns, row_filter)
    return tables


_FIRST_USER_OID = 16384  #: FirstNormalObjectId: types from this oid on are the database's own


async def describe_backfill_table(conn: PgConnection, schema: str, table: str, published: Mapping,
                                  base_types: Mapping[int, int]) -> BackfillTable:
    """The catalog's description of a published table; BackfillRefused saying why it cannot be read."""
    name = table_text((schema, table))
    if (schema, table) not in published:
        raise BackfillRefused(f"backfill of {name} refused: it is not in the publications (any more)")
    found = await conn.simple_query(
        "SELECT c.oid, c.relreplident, c.reltuples::bigint, pg_catalog.has_table_privilege(c.oid, 'SELECT') "
        "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE n.nspname = {quote_literal(schema)} AND c.relname = {quote_literal(table)}")
    if not found:
        raise BackfillRefused(f"backfill of {name} refused: the table does not exist")
    oid, identity, reltuples, may_select = found[0]
    if may_select != "t":
        raise BackfillRefused(f"backfill of {name} refused: user {conn.conninfo.user!r} has no SELECT privilege "
                              f"on it (GRANT SELECT ON {quote_ident(schema)}.{quote_ident(table)} TO "
                              f"{quote_ident(conn.conninfo.user)};)")
    columns = await conn.simple_query(
        "SELECT a.attnum, a.attname, a.atttypid, a.atttypmod, a.attnotnull, a.attgenerated <> '', "
        "pg_catalog.format_type(a.atttypid, a.atttypmod), t.typname, tn.nspname "
        "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid "
        "JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace "
        f"WHERE a.attrelid = {oid} AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum")
    indexes = await conn.simple_query(
        "SELECT i.indkey::text, i.indisprimary, i.indisreplident FROM pg_catalog.pg_index i "
        f"WHERE i.indrelid = {oid} AND i.indisunique AND i.indisvalid AND i.indpred IS NULL "
        "AND i.indexprs IS NULL ORDER BY i.indisprimary DESC, i.indisreplident DESC, i.indexrelid")
    by_number = {int(row[0]): row for row in columns}
    order_numbers = choose_order_columns(name, identity, indexes, {n: row[4] == "t" for n, row in by_number.items()})
    listed, row_filter = published[(schema, table)]
    sent = [row for row in columns if (listed is None and row[5] != "t") or (
        listed is not None and row[1] in listed and (row[5] != "t" or conn.server_version_num >= 180000))]
    key_numbers = set(order_numbers) if identity in "di" else {int(row[0]) for row in sent}
    types = {int(row[2]): Type(None, int(row[2]), row[8], row[7]) for row in columns if int(row[2]) >= _FIRST_USER_OID}
    relation = Relation(None, int(oid), schema, table, identity, tuple(
        Column(COLUMN_FLAG_KEY if int(row[0]) in key_numbers else 0, row[1], int(row[2]), int(row[3])) for row in sent))
    order = [by_number[n] for n in order_numbers]
    return BackfillTable(
        schema, table, RelationWriter(relation, types, base_types=base_types), tuple(row[1] for row in order),
        tuple(row[6] for row in order),
        tuple(_column_json_text(Column(0, row[1], int(row[2]), int(row[3])), types, base_types) for row in order),
        row_filter, int(reltuples) if int(reltuples) >= 0 else None)


def choose_order_columns(name: str, identity: str, indexes: list[tuple], not_null: Mapping[int, bool]) -> list[int]:
    """The column numbers a table is read in the order of: its replica identity's index, or the
    primary key (under REPLICA IDENTITY FULL, else a unique index on NOT NULL columns).  Changes
    name their row by these columns, which is what lets a chunk drop the rows they touched."""
    candidates = [([int(n) for n in keys.split()], primary == "t", replica == "t") for keys, primary, replica in indexes]
    if identity == "n":
        raise BackfillRefused(f"backfill of {name} refused: its REPLICA IDENTITY is NOTHING, so its changes do "
                              "not say which row they touched")
    for numbers, primary, replica in candidates:
        if (identity == "i" and replica) or (identity == "d" and primary):
            return numbers
    if identity == "f":
        for numbers, _, _ in candidates:
            if all(not_null.get(n) for n in numbers):
                return numbers
    raise BackfillRefused(f"backfill of {name} refused: it has no primary key or replica-identity index to read "
                          "it in order by (REPLICA IDENTITY FULL needs a primary key or a unique index on NOT "
                          "NULL columns)")


async def emit_watermark(conn: PgConnection, content: str) -> int:
    """Writes a watermark; returns its LSN.  It is made durable at once: a logical walsender sends
    only flushed WAL, and the commit of a transaction with an xid flushes (synchronous_commit is
    `local` on this connection), so the stream shows the watermark now, not when the WAL writer
    next runs, and every commit written before it is flushed too."""
    rows = await conn.simple_query(
        f"BEGIN; SELECT pg_catalog.pg_logical_emit_message(false, {quote_literal(WATERMARK_PREFIX)}, "
        f"{quote_literal(content)})::text, pg_catalog.pg_current_xact_id()::text; COMMIT")
    return parse_lsn(rows[0][0])


async def select_chunk(conn: PgConnection, query: str, convert_row: Callable[[bytes], object]) -> list | None:
    """The rows of `query` (through `convert_row`), read in a snapshot that sees every transaction
    committed before it (see the section comment); None when BACKFILL_SNAPSHOT_TRIES snapshots
    in a row did not."""
    for attempt in range(BACKFILL_SNAPSHOT_TRIES):
        await conn.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        try:
            (unseen,), = await conn.simple_query(UNSEEN_COMMITS_SQL)
            if unseen == "0":
                return await conn.copy_out(query, convert_row, BACKFILL_STATEMENT_TIMEOUT_S + 10)
        finally:
            await conn.simple_query("ROLLBACK")
        await trio.sleep(0.001 * attempt)
    return None


class Backfill:
    """The backfills asked for, queued and running, kept across sessions and restarts
    (STATE_FILE), and the task that reads them.

    A request (BACKFILL_TABLES, BACKFILL_ON_CREATE, the wal2http.backfill signal, POST /backfill)
    waits as its patterns until the task resolves it against the publications into one queue
    entry per table (a table already queued is not queued twice); the first entry is read chunk
    by chunk, its cursor (`after`: the order columns' text of the last row read) saved once the
    chunk's read events are acknowledged.  The replication reader calls `filter` for each chunk
    while a window is open or the chunk holds messages: it moves the window and takes the
    watermarks and signals out of the stream."""

    def __init__(self, config, alerter=None):
        self.config = config
        self.alerter = alerter
        self.path = config.state_file
        self.requests: list[dict] = []  # {"tables": patterns, "source": text, "again": bool}
        self.queue: list[dict] = []  # {"schema", "table", "after": cursor or None, "rows", "source"}
        self.done: dict[str, str] = {}  # "schema.table" -> when its last backfill ended (UTC)
        self.refused: dict[str, str] = {}  # "schema.table" -> why (this run)
        self.window: ChunkWindow | None = None
        self.rows_total = 0  # read events acknowledged (this run)
        self.stopped: str | None = None  # why backfilling stopped (the state file cannot be written)
        self.reading: dict | None = None  # the table being read: estimated rows, rate
        self._run_id = uuid.uuid4().hex[:12]
        self._chunks = 0
        self._wakeup = trio.Event()
        self._write_lock = threading.Lock()  # _write runs in a worker thread too
        self._version = self._written = 0  # states made, and the newest written

    @property
    def active(self) -> bool:
        """A backfill was asked for (now or in the state file): /status shows it."""
        return bool(self.requests or self.queue or self.done or self.refused or self.stopped)

    def load(self) -> None:
        """Reads STATE_FILE (a missing one is an empty state); ConfigError (exit 2) when it is not one."""
        try:
            with open(self.path, "rb") as state:
                data = state.read()
        except (FileNotFoundError, NotADirectoryError):  # nothing to resume (and saving will say so)
            return
        except OSError as exc:
            raise ConfigError(f"STATE_FILE: cannot read {self.path}: {exc.strerror}") from None
        self.requests, self.queue, self.done = decode_state(data, self.path)
        if self.queue:
            logger.info("backfill resumes (STATE_FILE %s): %s", self.path, ", ".join(
                f"{table_text((e['schema'], e['table']))} after {e['rows']} rows" for e in self.queue))

    def request(self, patterns: Sequence[str], source: str, again: bool = True) -> None:
        """Asks for a backfill of the tables `patterns` name.  `again`: also tables the state
        file records as done (False only for BACKFILL_TABLES at start-up).  Saved at once, so a
        signal acknowledged with its transaction is not lost."""
        self.requests.append({"tables": list(patterns), "source": source, "again": again})
        logger.info("backfill of %s asked for (%s)", ", ".join(patterns), source)
        self._save()
        self._wakeup.set()

    # -- the stream side (sans-IO but for saving a signal's request) -------------------------------

    def filter(self, chunk: Chunk) -> Sequence[Chunk]:
        """What goes on to delivery in place of `chunk`."""
        counts = chunk.op_counts
        if not counts or "message" not in counts:
            window = self.window
            if window is not None and window.opened:
                window.observe(chunk.events)
            return (chunk,)
        if len(chunk.events) == 1 and chunk.end_lsn is None and _is_watermark(chunk.events[0]):
            return self._at_watermark(chunk.events[0])
        kept = []
        for event in chunk.events:
            if event_op(event) == "message" and event["prefix"] in (BACKFILL_SIGNAL_PREFIX, WATERMARK_PREFIX):
                if event["prefix"] == BACKFILL_SIGNAL_PREFIX:
                    self._signal(event)
                continue
            kept.append(event)
        if self.window is not None and self.window.opened:
            self.window.observe(kept)
        if len(kept) == len(chunk.events):
            return (chunk,)
        return (Chunk(kept, chunk.end_lsn, count_event_ops(kept), chunk.commit_time_us, chunk.transaction),)

    def _at_watermark(self, event: Event) -> Sequence[Chunk]:
        window = self.window
        try:
            mark = json.loads(event["content"])
            ours = (window is not None and mark["backfill"] == window.run_id and mark["chunk"] == window.number)
        except (KeyError, TypeError, ValueError):
            ours = False
        if not ours:  # an earlier run's, or of a chunk given up: its rows are not in memory
            logger.debug("watermark %s ignored: not the chunk being read", event.get("content"))
            return ()
        if mark["mark"] == "low":
            window.opened = True
            return ()
        self.window = None
        read = window.read_chunk(parse_lsn(event["lsn"]))
        window.closed.set()
        return () if read is None else (read,)

    def _signal(self, event: Event) -> None:
        where = f"signal at {event['lsn']}"
        try:
            patterns = parse_backfill_tables(event.get("content", ""), f"{BACKFILL_SIGNAL_PREFIX} message")
        except ConfigError as exc:
            logger.warning("%s ignored: %s", where, exc)
            return
        self.request(patterns, where)

    # -- the reading task ---------------------------------------------------------------------------

    async def run(self, conninfo, ack: AckTracker) -> None:
        """Reads what is asked for, as long as the session streams; never returns.  `conninfo`:
        the replication connection's server (the watermarks must go into its WAL)."""
        backoff = Backoff(RECONNECT_BASE_S, RECONNECT_MAX_S)
        while True:
            while self.stopped or not (self.requests or self.queue):
                await self._wakeup.wait()
                self._wakeup = trio.Event()
            try:
                await self._work(conninfo, ack)
                backoff.reset()
            except (ServerError, ConnectionLost) as exc:  # never replication's end: try again later
                delay = backoff.next_delay()
                logger.warning("backfill: %s; trying again in %.1f s (replication goes on)", exc, delay)
                await trio.sleep(delay)

    async def _work(self, conninfo, ack: AckTracker) -> None:
        """Reads until nothing is asked for, over one connection."""
        async with open_pg_connection(conninfo, replication=False) as conn:
            await conn.simple_query(f"SET statement_timeout = '{BACKFILL_STATEMENT_TIMEOUT_S:g}s'; "
                                    "SET synchronous_commit = local")
            base_types = await load_domain_base_types(conn)
            while (self.requests or self.queue) and not self.stopped:
                published = await read_published_tables(conn, self.config.publications)
                self._resolve(published)
                if self.queue and not self.stopped:
                    await self._read_table(conn, ack, published, base_types)

    def refuse_all(self, reason: str) -> None:
        """This server cannot backfill: say so for what is asked (kept for a server that can)."""
        for request in self.requests:
            for pattern in request["tables"]:
                self.refused[pattern] = reason
        for entry in self.queue:
            self.refused[table_text((entry["schema"], entry["table"]))] = reason
        if self.requests or self.queue:
            logger.warning("backfill of %s refused: %s", ", ".join(self.refused), reason)

    def _resolve(self, published: Mapping) -> None:
        """Requests -> queue entries, one per published table, each table once."""
        while self.requests:
            request = self.requests[0]
            chosen, unknown = match_tables(request["tables"], published)
            for name in unknown:
                self._refuse(name, f"it is not in the publication(s) {', '.join(self.config.publications)}")
            queued = {(e["schema"], e["table"]) for e in self.queue}
            for schema, table in chosen:
                name = table_text((schema, table))
                if (schema, table) in queued:
                    logger.info("backfill of %s: already queued or running", name)
                elif not request.get("again", True) and name in self.done:
                    logger.info("backfill of %s: done at %s (STATE_FILE), not started again", name, self.done[name])
                else:
                    self.queue.append({"schema": schema, "table": table, "after": None, "rows": 0,
                                       "source": request["source"]})
                    queued.add((schema, table))
            self.requests.pop(0)
            self._save()

    async def _resolve_now(self, conn: PgConnection) -> None:
        try:
            self._resolve(await read_published_tables(conn, self.config.publications))
        except ServerError as exc:  # the table being read goes on; the requests wait
            logger.warning("backfill: cannot read the publications' tables now (%s); the requests wait", exc)

    def _refuse(self, name: str, reason: str) -> None:
        self.refused[name] = reason
        logger.warning("backfill of %s refused: %s", name, reason)

    async def _read_table(self, conn: PgConnection, ack: AckTracker, published: Mapping,
                          base_types: Mapping[int, int]) -> None:
        entry = self.queue[0]
        name = table_text((entry["schema"], entry["table"]))
        try:
            table = await describe_backfill_table(conn, entry["schema"], entry["table"], published, base_types)
            self.reading = {"table": name, "estimated_rows": table.estimated_rows, "rows_at_start": entry["rows"],
                            "started": trio.current_time(), "logged": trio.current_time()}
            logger.info("backfill of %s: %s (about %s rows, chunks of %d)", name,
                        "resumed after " + str(entry["rows"]) + " rows" if entry["after"] else "started",
                        "?" if table.estimated_rows is None else table.estimated_rows, self.config.backfill_chunk_rows)
            limit = self.config.backfill_chunk_rows
            while limit and not self.stopped:
                if self.requests:  # asked for meanwhile: queued now, so this table is not read twice
                    await self._resolve_now(conn)
                limit = await self._read_chunk(conn, ack, table, entry, limit)
        except (BackfillRefused, ServerError) as exc:
            self._refuse(name, str(exc).removeprefix(f"backfill of {name} refused: "))
        else:
            if self.stopped:  # the state file cannot be written: the entry stays as it is
                return
            self.done[name] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            logger.info("backfill of %s: done, %d rows", name, entry["rows"])
            self.refused.pop(name, None)
        finally:
            self.reading = None
        self.queue.pop(0)
        self._save()

    async def _read_chunk(self, conn: PgConnection, ack: AckTracker, table: BackfillTable, entry: dict,
                          limit: int) -> int:
        """One chunk, from its low watermark to the acknowledgement of its read events.  Returns
        the next chunk's size, 0 when the table is done."""
        while True:
            self._chunks += 1
            window = self.window = ChunkWindow(self._run_id, self._chunks, table)
            try:
                await emit_watermark(conn, window.watermark("low"))
                began = trio.current_time()
                try:
                    rows = await select_chunk(conn, build_chunk_query(table, entry["after"], limit), table.read_row)
                except ServerError as exc:
                    if exc.fields.get("C") != "57014" or limit <= BACKFILL_MIN_CHUNK_ROWS:
                        raise
                    limit = max(BACKFILL_MIN_CHUNK_ROWS, limit // 2)  # statement timeout: smaller chunks
                    logger.warning("backfill of %s: a chunk's SELECT was cancelled by the statement timeout; "
                                   "chunks of %d rows from now on", table.name, limit)
                    continue
                if rows is None:
                    continue  # no snapshot seeing every commit came: a new low watermark
                if not rows:
                    return 0
                window.rows, last, selected = rows, rows[-1][0], len(rows)
                del rows  # the window holds them until the high watermark, no longer
                seconds = trio.current_time() - began
                await emit_watermark(conn, window.watermark("high"))
                await window.closed.wait()
            finally:
                self.window = None
            if not window.unknown_row:
                break
            logger.info("backfill of %s: a change between the watermarks did not name its row; the chunk "
                        "is read again", table.name)
        await ack.wait_flushed(window.high_lsn)
        entry["after"], entry["rows"] = table.order_values(last), entry["rows"] + selected
        self.rows_total += window.sent
        await self._save_in_thread()
        self._log_progress(table, entry)
        if selected < limit:
            return 0
        if seconds > BACKFILL_SLOW_CHUNK_S and limit > BACKFILL_MIN_CHUNK_ROWS:
            limit = max(BACKFILL_MIN_CHUNK_ROWS, limit // 2)
            logger.info("backfill of %s: a chunk's SELECT took %.1f s; chunks of %d rows from now on",
                        table.name, seconds, limit)
        return limit

    def _log_progress(self, table: BackfillTable, entry: dict) -> None:
        reading, now = self.reading, trio.current_time()
        if reading is None or now - reading["logged"] < BACKFILL_PROGRESS_S:
            return
        reading["logged"] = now
        rate, left = self.rate_and_eta(entry)
        estimated = table.estimated_rows
        logger.info("backfill of %s: %d of about %s rows, %.0f rows/s%s", table.name, entry["rows"],
                    "?" if estimated is None else estimated, rate,
                    "" if left is None else f", about {left:.0f} s left")

    def rate_and_eta(self, entry: dict) -> tuple[float, float | None]:
        """Rows per second read of the current table in this run, and the seconds left at that rate."""
        reading = self.reading
        if reading is None:
            return 0.0, None
        elapsed = trio.current_time() - reading["started"]
        rate = (entry["rows"] - reading["rows_at_start"]) / elapsed if elapsed > 0 else 0.0
        estimated = reading["estimated_rows"]
        if not rate or estimated is None:
            return rate, None
        return rate, max(0.0, (estimated - entry["rows"]) / rate)

    def _save(self) -> None:
        """Writes STATE_FILE now (a request: saved before the stream goes on)."""
        try:
            self._write(*self._snapshot())
        except OSError as exc:
            self._cannot_save(exc)

    async def _save_in_thread(self) -> None:
        """Writes STATE_FILE in a worker thread (after each chunk: its fsyncs take milliseconds
        that the replication reader should not wait for)."""
        try:
            await trio.to_thread.run_sync(self._write, *self._snapshot())
        except OSError as exc:
            self._cannot_save(exc)

    def _snapshot(self) -> tuple[int, bytes]:
        self._version += 1
        return self._version, encode_state(self.requests, self.queue, self.done)

    def _write(self, version: int, data: bytes) -> None:
        """One save at a time, never an older state over a newer one (OSError when it fails)."""
        with self._write_lock:
            if version > self._written:
                write_file_atomically(self.path, data)
                self._written = version

    def _cannot_save(self, exc: OSError) -> None:
        """A state file that cannot be written is an alert and stops backfilling (never replication)."""
        if self.stopped is None:
            self.stopped = f"STATE_FILE {self.path} cannot be written: {exc.strerror or exc}"
            logger.error("backfill stopped: %s (replication goes on)", self.stopped)
            if self.alerter is not None:
                self.alerter.alert("backfill", "wal2http stopped a backfill: its state file cannot be written",
                                   f"{self.stopped}\nReplication goes on; no backfill runs until "
                                   "wal2http is restarted with a STATE_FILE it can write.\n")

    def status(self) -> dict | None:
        """The /status `backfill` object; None when no backfill was ever asked for."""
        if not self.active:
            return None
        entry = self.queue[0] if self.queue and self.reading else None
        rate, left = self.rate_and_eta(entry) if entry else (0.0, None)
        return {
            "table": entry and table_text((entry["schema"], entry["table"])),
            "rows": entry and entry["rows"],
            "estimated_rows": self.reading and self.reading["estimated_rows"],
            "rows_per_second": round(rate, 1), "eta_seconds": None if left is None else round(left),
            "queued": [table_text((e["schema"], e["table"])) for e in self.queue[1 if entry else 0:]],
            "requested": [p for r in self.requests for p in r["tables"]],
            "done": sorted(self.done), "refused": dict(self.refused), "rows_total": self.rows_total,
            "stopped": self.stopped,
        }


def _is_watermark(event: Event) -> bool:
    return event_op(event) == "message" and event["prefix"] == WATERMARK_PREFIX


# =====================================================================================================
# 11. Delivery: the sink interface, retries, ON_FAILURE, dead-letter file
# =====================================================================================================
# The sink interface (`Sink`): every sink (stdout, HTTP, Hook0, ReliableSink around them, and an
# application's own, passed to `run`) follows it.  Events are Event objects (section 8), written as
# their `line`; sinks take plain dicts too, for applications that import wal2http.
# ReliableSink.deliver returns only when every event it was given is delivered or dead-lettered;
# the replication loop acknowledges nothing before that (README, "Delivery guarantees").  A sink's
# DeliveryError says how many leading events got through, so a partial success is never resent.


@typing.runtime_checkable
class Sink(typing.Protocol):
    """Where events go.  A sink that wants each table's column names (Hook0, to tell an outbox
    table from a delete that carries only the key) also has a `relation_columns` dict, which the
    replication loop fills from Relation messages."""

    name: str  #: "stdout", "http", "hook0", or an application's own name
    batch_size: int  #: most events per deliver() call

    async def deliver(self, events: list[Event]) -> None:
        """Returns once every event is delivered; otherwise raises DeliveryError saying how many
        leading events got through (`delivered`), or SinkAuthError (exit 4)."""

    async def check(self) -> str:
        """--check: a line saying the sink is reachable; raises DeliveryError when it is not."""

    async def aclose(self) -> None:
        """Releases connections; called once at exit."""


RETRY_FOREVER_MIN_DELAY_S = 0.1  #: ON_FAILURE=retry never retries faster, whatever RETRY_MAX_DELAY_MS says
RELIABLE_ALERT_KEY = "delivery:"  #: + the sink name; one alert key per sink
ALERT_EVENT_IDS = 5  #: event ids named in an alert; the rest are counted


def append_dead_letters(path: str, events: list[Event]) -> None:
    """Appends the events as JSON Lines (the stdout format) and fsyncs them (blocking: run it in a
    worker thread).  A new file's directory entry is fsynced too, so the file survives a crash."""
    created = not os.path.exists(path)
    with open(path, "ab") as file:
        file.write(encode_event_lines(events))
        file.flush()
        os.fsync(file.fileno())
    if created:
        directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def describe_event_ids(events: list[Event]) -> str:
    ids = ", ".join(str(event.get("id")) for event in events[:ALERT_EVENT_IDS])
    more = len(events) - ALERT_EVENT_IDS
    return f"{ids} and {more} more ({len(events)} events)" if more > 0 else f"{ids} ({len(events)} events)"


class ReliableSink:
    """Wraps a sink with retries and ON_FAILURE (see the section comment); same interface.
    Several deliveries may run at once (DELIVERY_CONCURRENCY): each has its own retries, and
    the sink's failing period ends when none of them is failing any more.

    `stop`, when set, means shutdown has begun: the deliveries in flight may still finish within
    the shutdown timeout, but no new alert says they keep retrying."""

    def __init__(self, sink: Sink, config, alerter, *, sleep=trio.sleep, random=random.random,
                 stop: trio.Event | None = None, stats=None):
        self.sink = sink
        self.stats = stats  # the operations port's Stats (requests, dead letters), or None
        self.last_error: str | None = None  # of the failing period, for /status
        self.config = config
        self.name = sink.name
        self.batch_size = sink.batch_size
        self.relation_columns = getattr(sink, "relation_columns", None)  # passed through (Hook0)
        self._sleep = sleep
        self._random = random
        self.failing = FailingPeriod(alerter, RELIABLE_ALERT_KEY + sink.name)
        self._failing_deliveries = 0  # deliveries in flight that have failed at least once
        self._stop = stop

    async def deliver(self, events: list[Event]) -> None:
        """Returns when every event is delivered or dead-lettered; raises DeliveryFailed
        (ON_FAILURE=exit; its `delivered` says how many leading events got through) or
        SinkAuthError (never retried)."""
        backoff = Backoff(self.config.retry_base_delay_s, self.config.retry_max_delay_s, jitter=self._random)
        position, failed_once = 0, False  # events[:position] are delivered or dead-lettered
        try:
            while position < len(events):
                began = time.perf_counter()
                try:
                    await self.sink.deliver(events[position:])
                    self._request_done(began, "ok")
                    break
                except SinkAuthError:
                    self._request_done(began, "failed")
                    raise
                except DeliveryError as error:
                    if not failed_once:
                        failed_once, self._failing_deliveries = True, self._failing_deliveries + 1
                    self._request_done(began, self._outcome(error, backoff.retries + 1))
                    delivered, failed = self._progress_of(error, len(events) - position)
                    position += delivered
                    if delivered:
                        backoff.reset()  # its retries count the failed attempts for events[position:]
                    if position < len(events):
                        skipped = await self._handle_failure(events, position, failed, error, backoff)
                        position += skipped
                        if skipped:
                            backoff.reset()
            else:
                return  # the last events were dead-lettered: the failing period goes on
        finally:
            self._failing_deliveries -= failed_once
        if not self._failing_deliveries:
            self._recovered()

    async def check(self) -> str:
        return await self.sink.check()

    async def aclose(self) -> None:
        await self.sink.aclose()

    # -- failure handling -------------------------------------------------------------------------

    @staticmethod
    def _progress_of(error: DeliveryError, remaining: int) -> tuple[int, int]:
        """(events delivered, events the failure covers), both kept within the remaining events."""
        delivered = min(max(error.delivered, 0), remaining)
        failed = remaining - delivered if error.failed is None else error.failed
        return delivered, min(max(failed, 1), max(remaining - delivered, 1))

    def _max_attempts(self, error: DeliveryError) -> int:
        return max(1, self.config.retry_max_attempts) if error.retryable else 1

    def _outcome(self, error: DeliveryError, attempts: int) -> str:
        """For the metrics: whether the request that failed is tried again."""
        retried = attempts < self._max_attempts(error) or self.config.on_failure == "retry"
        return "retried" if retried else "failed"

    def _request_done(self, began: float, outcome: str) -> None:
        if self.stats is not None:
            self.stats.request_done(began, outcome)

    @property
    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def _handle_failure(self, events: list[Event], position: int, failed: int,
                              error: DeliveryError, backoff: Backoff) -> int:
        """Waits before the next attempt, or applies ON_FAILURE; returns how many events are
        done with (dead-lettered), 0 when they are to be tried again."""
        self.failing.failed()
        self.last_error = str(error)
        attempts = backoff.retries + 1  # this failure included
        if attempts < self._max_attempts(error):
            delay = backoff.next_delay(error.retry_after)
            self._log_attempt(f"attempt {attempts} of {self.config.retry_max_attempts}", delay, error)
            await self._sleep(delay)
            return 0
        failing = events[position:position + failed]
        if self.config.on_failure == "retry":
            backoff.retries += 1
            return await self._keep_retrying(failing, attempts, error)
        if self.config.on_failure == "skip":
            return await self._dead_letter(failing, attempts, error, position)
        self._alert(failing, attempts, error, "wal2http stops (ON_FAILURE=exit); nothing from the first "
                    "of these events on is acknowledged, so it is sent again after a restart", stops=True)
        raise DeliveryFailed(f"delivery to the {self.name} sink failed after {attempts} attempt(s): "
                               f"{error}; {position} of the {len(events)} events were delivered, event "
                               f"{events[position].get('id')} and those after it were not", position)

    async def _keep_retrying(self, failing: list[Event], attempts: int, error: DeliveryError) -> int:
        delay = max(self.config.retry_max_delay_s, RETRY_FOREVER_MIN_DELAY_S)
        if not self.failing.alerted and not self._stopping:
            self._alert(failing, attempts, error, f"wal2http keeps retrying every {delay:g} s "
                        "(ON_FAILURE=retry) and holds back everything after these events")
        self._log_attempt(f"attempt {attempts}, retrying until it works (ON_FAILURE=retry)", delay, error)
        await self._sleep(delay)
        return 0

    async def _dead_letter(self, failing: list[Event], attempts: int, error: DeliveryError,
                           position: int) -> int:
        """Appends the failing events to DEAD_LETTER_FILE; if that fails too, nothing can be
        acknowledged, so it is ON_FAILURE=exit after all."""
        path = self.config.dead_letter_file
        try:
            await trio.to_thread.run_sync(append_dead_letters, path, failing)
        except OSError as exc:
            self._alert(failing, attempts, error, f"writing them to DEAD_LETTER_FILE {path} failed too "
                        f"({exc}), so wal2http stops; they are sent again after a restart", stops=True)
            raise DeliveryFailed(f"cannot append {len(failing)} undeliverable event(s) to DEAD_LETTER_FILE "
                                   f"{path}: {exc}; nothing from event {failing[0].get('id')} on is "
                                   "acknowledged", position) from None
        self._alert(failing, attempts, error, f"the events were appended to DEAD_LETTER_FILE {path} "
                    "(ON_FAILURE=skip) and wal2http goes on")
        logger.error("dead-lettered %d event(s) to %s: %s", len(failing), path, describe_event_ids(failing))
        if self.stats is not None:
            self.stats.dead_lettered(failing)
        return len(failing)

    def _log_attempt(self, attempt: str, delay: float, error: DeliveryError) -> None:
        logger.warning("delivery to the %s sink failed (%s): %s; retrying in %.1f s",
                       self.name, attempt, error, delay)

    def _alert(self, failing: list[Event], attempts: int, error: DeliveryError, action: str,
               stops: bool = False) -> None:
        """The alert for events that could not be delivered.  When wal2http stops, the alert has
        its own key and subject: an earlier alert (say, a skip a minute ago) must not hold back
        the mail that says the service is down."""
        subject = f"delivery to the {self.name} sink is failing"
        if stops:
            subject = f"wal2http stopped: delivery to the {self.name} sink failed"
        self.failing.alert(
            subject,
            f"wal2http could not deliver events to the {self.name} sink.\n"
            f"Failing since: {_utc_text(self.failing.since)} ({attempts} attempt(s) for these events)\n"
            f"Events: {describe_event_ids(failing)}\n"
            f"Last error: {error}\n"
            f"What happens now: {action}.\n", key_suffix=":stopped" if stops else "")

    def _recovered(self) -> None:
        since = self.failing.since
        if since is None:
            return  # healthy: the common case, after every delivery
        self.last_error = None
        if self.failing.alerted:
            logger.info("delivery to the %s sink recovered", self.name)
        self.failing.ended(f"delivery to the {self.name} sink recovered",
                           f"Deliveries to the {self.name} sink work again "
                           f"(failing since {_utc_text(since)}).\n")


# =====================================================================================================
# 12. stdout sink
# =====================================================================================================
# JSON lines on stdout: the sink of `--demo`, and of pipelines that read wal2http's output.


def _may_block_forever(out) -> bool:
    """Whether writing to `out` can wait on a reader (pipe, socket, terminal), as opposed to a
    regular file or a device like /dev/null."""
    try:
        fd = out.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return False  # an in-memory file
    return not (stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd)))


def event_lines(events: list[Event]) -> list[str]:
    """The JSON text of each event (see event_line)."""
    try:
        return [event.line for event in events]
    except AttributeError:  # plain dicts among them
        return [event_line(event) for event in events]


def encode_event_lines(events: list[Event]) -> bytes:
    """JSON Lines: one compact object per event, each line ending in a newline."""
    return ("\n".join(event_lines(events)) + "\n").encode()


class StdoutSink:
    """JSON lines on stdout (or any binary file), flushed before delivery is confirmed.

    A stdout consumer that stops reading stalls the stream (nothing is confirmed before it is
    written and flushed), but not the process: SIGTERM still ends it cleanly.
    """

    name = "stdout"
    batch_size = 5000

    def __init__(self, out=None):
        self.out = out if out is not None else sys.stdout.buffer
        self._may_block = _may_block_forever(self.out)

    async def deliver(self, events: list[Event]) -> None:
        data = encode_event_lines(events)
        try:
            if self._may_block:
                # In a worker thread: a reader that stops reading blocks only this delivery,
                # while keepalives, status updates and SIGTERM are still handled.
                await trio.to_thread.run_sync(self._write, data, abandon_on_cancel=True)
            else:
                self._write(data)  # a file or /dev/null: no reader to wait for, no thread hop
        except OSError as exc:
            raise DeliveryError(f"cannot write to stdout: {exc}", retryable=False) from None

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()

    async def check(self) -> str:
        return "stdout is writable" if not self.out.closed else "stdout is closed"

    async def aclose(self) -> None:
        pass


# =====================================================================================================
# 13. HTTP client (h11 over Trio)
# =====================================================================================================
# Theory of operation: one h11.Connection per TCP (or TLS) connection, kept alive between requests
# and used by one request at a time (a lock serialises callers).  h11 does the framing (Content-Length
# and chunked bodies, keep-alive rules); this code only moves bytes and turns every failure into a
# DeliveryError.  HTTP_TIMEOUT_SECS is one deadline over a whole request(): connect, TLS handshake,
# send and receive.  Retry rule: a request that fails on a *reused* connection before any byte of the
# answer arrived is sent once more on a fresh connection: the server most likely closed the idle
# connection just before we used it (RFC 9112 section 9.3.1).  The server may, rarely, have seen the
# first copy; our receivers deduplicate on event ids (Idempotency-Key, webhook-id, Hook0 event_id),
# so one duplicate is acceptable, and a connection that never answered is no worse than a retry.

HTTP_MAX_BODY_BYTES = 64 * 1024  #: most bytes of a response body read; the rest is never read
HTTP_MAX_HEAD_BYTES = 64 * 1024  #: most bytes of a response's status line and headers
HTTP_RECEIVE_CHUNK_BYTES = 16 * 1024  #: bytes asked of the socket per receive
HTTP_DEFAULT_PORTS = {"http": 80, "https": 443}
_URL_SAFE = "!$%&'()*+,/:;=?@[]~"  #: kept as they are in a request target (with letters, digits, -._)
HTTP_USER_AGENT = f"wal2http/{__version__}"
#: Headers the client computes itself; callers' values for them are dropped.
_HTTP_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  #: lower-case names; repeated headers joined by ", "
    body: bytes  #: at most HTTP_MAX_BODY_BYTES

    def scrubbed(self, secrets: Iterable[str]) -> HttpResponse:
        """This answer with every secret in an error body replaced by `***`: done on the whole
        body, before anything shortens it (a secret cut in two would no longer be recognised)."""
        if 200 <= self.status < 300 or not self.body:
            return self
        text = self.body.decode("utf-8", "replace")
        clean = scrub_secrets(text, secrets)
        return self if clean == text else HttpResponse(self.status, self.headers, clean.encode("utf-8"))


@dataclass(frozen=True)
class HttpEndpoint:
    """A parsed http(s) URL.  `where` names it in messages: scheme, host and port only (user info,
    path and query may hold a token)."""

    scheme: str
    host: str  #: host name or IP address, without IPv6 brackets
    port: int
    target: str  #: path and query, "/" when empty
    host_header: str
    authorization: str | None  #: Basic credentials from user info in the URL, if any

    @property
    def where(self) -> str:
        return f"{self.scheme}://{self.host_header}" + ("/..." if self.target != "/" else "")


def parse_http_url(url: str, variable: str = "URL") -> HttpEndpoint:
    """Splits an http:// or https:// URL; raises ConfigError naming `variable` (the setting it
    comes from) without echoing the URL (it may hold credentials)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts = port = None
    scheme = parts.scheme.lower() if parts else ""
    if scheme not in HTTP_DEFAULT_PORTS or not parts.hostname or any(c.isspace() for c in url):
        raise ConfigError(f"{variable} must be an http:// or https:// URL with a host name")
    if not is_valid_host(parts.hostname):
        raise ConfigError(f"{variable}: the URL's host is not a valid host name or address")
    host = parts.hostname if parts.hostname.isascii() else parts.hostname.encode("idna").decode("ascii")
    port = port or HTTP_DEFAULT_PORTS[scheme]
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if port == HTTP_DEFAULT_PORTS[scheme] else f"{bracketed}:{port}"
    # A request target is ASCII: percent-encode anything else (as browsers do), keep escapes.
    target = urllib.parse.quote(parts.path or "/", safe=_URL_SAFE) + (
        "?" + urllib.parse.quote(parts.query, safe=_URL_SAFE) if parts.query else "")
    authorization = None
    if parts.username is not None:  # user info is percent-encoded in a URL: decode it
        credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
    return HttpEndpoint(scheme, host, port, target, host_header, authorization)


def build_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """The system trust store, plus `ca_file` (HTTP_CA_FILE) when given; hostname checked."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load HTTP_CA_FILE {ca_file}: {exc}") from None
    return context


def _merge_headers(*layers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Later layers replace earlier headers of the same name (case-insensitive); framing headers
    are dropped because the client sets them from the body."""
    merged: list[tuple[str, str]] = []
    for layer in layers:
        names = {name.lower() for name, _ in layer}
        merged = [(n, v) for n, v in merged if n.lower() not in names]
        merged.extend((n, v) for n, v in layer if n.lower() not in _HTTP_FRAMING_HEADERS)
    return merged


def _join_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    joined: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        joined[name] = f"{joined[name]}, {value}" if name in joined else value
    return joined


class _StaleConnection(Exception):
    """A reused connection failed before any byte of the answer: send once more on a new one."""


class _Connection:
    """One open stream and its h11 state machine."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=HTTP_MAX_HEAD_BYTES)
        self.exchanges = 0  # completed request/response pairs
        self.received_bytes = 0  # in the current exchange

    async def next_event(self):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(HTTP_RECEIVE_CHUNK_BYTES)
            self.received_bytes += len(data)
            self.h11.receive_data(data)

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE


class HttpClient:
    """HTTP/1.1 requests to one origin over persistent connections (see the theory above): one
    connection per request in flight, at most `max_connections` requests in flight (the others
    wait their turn), idle connections kept for the next requests."""

    def __init__(self, url: str, *, timeout_s: float, ca_file: str | None = None,
                 headers: Sequence[tuple[str, str]] = (), ssl_context: ssl.SSLContext | None = None,
                 max_connections: int = 1):
        self.endpoint = parse_http_url(url)
        self.timeout_s = timeout_s
        defaults = [("Host", self.endpoint.host_header), ("User-Agent", HTTP_USER_AGENT)]
        if self.endpoint.authorization:
            defaults.append(("Authorization", self.endpoint.authorization))
        self._headers = _merge_headers(defaults, tuple(headers))
        _validate_headers(self._headers)
        self._ssl_context = None
        if self.endpoint.scheme == "https":
            self._ssl_context = ssl_context or build_ssl_context(ca_file)
        self._idle: list[_Connection] = []  # open, kept alive, not in use
        self._slots = trio.Semaphore(max_connections)  # one per request in flight

    async def request(self, method: str, target: str, *, headers: Sequence[tuple[str, str]] = (),
                      body: bytes = b"") -> HttpResponse:
        """Sends one request and returns the answer, whatever its status.  Raises DeliveryError:
        retryable for connection errors, resets and timeouts; not retryable when TLS verification
        fails or a header is invalid."""
        request = self._build_request(method, target, headers, body)
        try:
            # A free slot is taken without a schedule point: the request goes out now, rather than
            # after the replication reader has decoded another chunk (the send itself yields).
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            with trio.fail_after(self.timeout_s):
                return await self._request_once_or_twice(request, body)
        except trio.TooSlowError:
            raise DeliveryError(f"no answer from {self.endpoint.where} within {self.timeout_s:g} s "
                                "(HTTP_TIMEOUT_SECS)", retryable=True) from None
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)

    def _build_request(self, method: str, target: str, headers: Sequence[tuple[str, str]],
                       body: bytes) -> h11.Request:
        all_headers = _merge_headers(self._headers, tuple(headers))
        if body or method.upper() in ("POST", "PUT", "PATCH"):
            all_headers.append(("Content-Length", str(len(body))))
        try:
            return h11.Request(method=method, target=target, headers=all_headers)
        except (h11.LocalProtocolError, UnicodeError):
            # h11's message quotes the offending value, which may be a secret: name nothing.
            raise DeliveryError(f"invalid {method} request to {self.endpoint.where}: a header or the "
                                "target has characters HTTP does not allow", retryable=False) from None

    async def _request_once_or_twice(self, request: h11.Request, body: bytes) -> HttpResponse:
        if self._idle:
            try:
                return await self._exchange(self._idle.pop(), request, body)
            except _StaleConnection:
                logger.debug("%s closed the kept-alive connection; sending again on a new one",
                             self.endpoint.where)
        return await self._exchange(await self._open(), request, body)  # fresh: never _StaleConnection

    async def _open(self) -> _Connection:
        endpoint = self.endpoint
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except OSError as exc:
            raise DeliveryError(f"cannot connect to {endpoint.where}: {describe_os_error(exc)}",
                                retryable=True) from None
        if self._ssl_context is not None:
            stream = await self._start_tls(stream)
        return _Connection(stream)

    async def _start_tls(self, stream: trio.abc.Stream) -> trio.SSLStream:
        # https_compatible: HTTP servers commonly close without a TLS close_notify.
        tls = trio.SSLStream(stream, self._ssl_context, server_hostname=self.endpoint.host,
                             https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException as exc:
            await trio.aclose_forcefully(stream)
            if not isinstance(exc, (trio.BrokenResourceError, OSError)):
                raise  # cancelled (the deadline)
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise DeliveryError(f"TLS verification of {self.endpoint.where} failed: "
                                    f"{cause.verify_message or cause}; trust its CA with HTTP_CA_FILE",
                                    retryable=False) from None
            raise DeliveryError(f"TLS handshake with {self.endpoint.where} failed: {cause or exc}",
                                retryable=True) from None
        return tls

    async def _exchange(self, conn: _Connection, request: h11.Request, body: bytes) -> HttpResponse:
        """One request/response on `conn`; closes it on any failure or when it cannot be reused."""
        reused = conn.exchanges > 0
        conn.received_bytes = 0
        try:
            early = await self._send_request(conn, request, body)
            response = early or await self._receive_response(conn)
            if reused and response.status == 408:
                # Usually the server's idle timeout, written on the kept-alive connection before
                # our request reached it: not an answer to it.  Send again on a new connection.
                raise _StaleConnection("408 on a kept-alive connection")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError) as exc:
            await trio.aclose_forcefully(conn.stream)
            if reused and conn.received_bytes == 0:
                raise _StaleConnection(str(exc)) from None
            raise DeliveryError(f"connection to {self.endpoint.where} failed: {_describe_io_error(exc)}",
                                retryable=True) from None
        except BaseException:
            await trio.aclose_forcefully(conn.stream)  # cancelled or timed out mid-exchange: state unknown
            raise
        conn.exchanges += 1
        if early is None and conn.reusable:
            conn.h11.start_next_cycle()
            self._idle.append(conn)
        else:
            await trio.aclose_forcefully(conn.stream)  # e.g. an early answer left our request half sent
        return response

    async def _send_request(self, conn: _Connection, request: h11.Request, body: bytes) -> HttpResponse | None:
        """Writes the request; None once it is all sent.  A server may answer before reading the
        whole body (a 413 for a batch over its limit, a 401) and close: then the send fails, and
        the answer it sent first is returned, because that is what counts."""
        data = conn.h11.send(request)
        if body:
            data += conn.h11.send(h11.Data(data=body))
        data += conn.h11.send(h11.EndOfMessage())
        try:
            await conn.stream.send_all(data)
        except (OSError, trio.BrokenResourceError) as exc:
            response = await self._early_response(conn)
            if response is None:
                raise exc from None
            return response
        return None

    async def _early_response(self, conn: _Connection) -> HttpResponse | None:
        """The whole answer the server sent before our send failed, or None."""
        try:
            return await self._receive_response(conn)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return None

    async def _receive_response(self, conn: _Connection) -> HttpResponse:
        """Reads the answer; stops reading the body at HTTP_MAX_BODY_BYTES (the connection is then
        closed, since the rest of the body was never read)."""
        event = await conn.next_event()
        while isinstance(event, h11.InformationalResponse):  # 100 Continue and the like
            event = await conn.next_event()
        if not isinstance(event, h11.Response):
            raise h11.RemoteProtocolError(f"expected a response, got {type(event).__name__}")
        body = bytearray()
        while True:
            part = await conn.next_event()
            if isinstance(part, h11.Data):
                body += part.data[:HTTP_MAX_BODY_BYTES - len(body)]
                if len(body) >= HTTP_MAX_BODY_BYTES:
                    break
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(part).__name__} in a response body")
        return HttpResponse(event.status_code, _join_headers(event.headers), bytes(body))


def _validate_headers(headers: list[tuple[str, str]]) -> None:
    """Fails at start-up (exit 2) on a header h11 would refuse, naming the header but not its value."""
    for name, value in headers:
        try:
            host = [] if name.lower() == "host" else [("Host", "x")]  # h11 requires exactly one
            h11.Request(method="GET", target="/", headers=[*host, (name, value)])
        except (h11.LocalProtocolError, UnicodeError):  # h11 takes ASCII only
            raise ConfigError(f"HTTP header {name.encode('ascii', 'replace').decode()!r} has a name or value "
                              "HTTP does not allow: control or non-ASCII characters (check HTTP_HEADERS)") from None


def _describe_io_error(exc: BaseException) -> str:
    """A short reason without any request data: the cause of a Trio error, or the error itself."""
    if isinstance(exc, trio.ClosedResourceError):
        return "connection closed"
    if isinstance(exc, h11.RemoteProtocolError):
        return f"invalid HTTP from the server ({exc})"
    cause = exc.__cause__ or exc
    return str(cause) or type(cause).__name__


# =====================================================================================================
# 14. HTTP sink
# =====================================================================================================
# POST each event (HTTP_BATCH_SIZE=1) or {"events": [...]} (N>1) to HTTP_ENDPOINT_URL, optionally
# signed the Standard Webhooks way (https://www.standardwebhooks.com/, spec/standard-webhooks.md:
# "Signature scheme").  Retries and ON_FAILURE are ReliableSink's job; this sink says what happened.

HTTP_RETRYABLE_STATUSES = frozenset({408, 425, 429})  #: retried besides every 5xx, by both HTTP sinks
HTTP_ERROR_BODY_CHARS = 200  #: how much of a failed response's body goes into the error message
WEBHOOK_SECRET_PREFIX = "whsec_"


def is_retryable_status(status: int) -> bool:
    """Whether an answer with this status may succeed when sent again (HTTP and Hook0 sinks):
    408, 425, 429 and 5xx; 6xx-9xx are not HTTP and never retried."""
    return 500 <= status < 600 or status in HTTP_RETRYABLE_STATUSES


class _RequestSink:
    """What the HTTP and Hook0 sinks share: events go out in order, `batch_size` per request
    (`_send`), a failed request says how many events before it were delivered; and every text
    that may reach a log or a mail is scrubbed of the configured secrets (a receiver may echo a
    token back in its error body)."""

    name = ""
    batch_size = 1
    _client: HttpClient

    def __init__(self, config):
        self._secrets = config_secrets(config)

    async def deliver(self, events: list[Event]) -> None:
        for start in range(0, len(events), self.batch_size):
            batch = events[start:start + self.batch_size]
            try:
                await self._send(batch)
            except DeliveryError as error:
                raise DeliveryError(str(error), retryable=error.retryable, retry_after=error.retry_after,
                                    delivered=start, failed=len(batch)) from None

    async def _send(self, events: list[Event]) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        await self._client.aclose()

    def _redact(self, text: str) -> str:
        return scrub_secrets(text, self._secrets)


def build_message_id(events: list[Event], batched: bool) -> str:
    """Idempotency-Key and webhook-id: the event's id, or for a batch `<first id>..<last id>`.  A
    batch is a run of consecutive events of the stream, so this names exactly the events it
    holds: sent again, it keeps its id; cut differently after a restart, it gets a new one, and
    a receiver that deduplicates on it never drops events it has not seen."""
    first = str(events[0]["id"])
    return f"{first}..{events[-1]['id']}" if batched else first


def build_http_body(events: list[Event], batched: bool) -> bytes:
    """One event as itself, or a batch as {"events": [...]} in order."""
    if not batched:
        return event_line(events[0]).encode()
    return ('{"events":[' + ",".join(event_lines(events)) + "]}").encode()


def decode_signing_secret(secret: str) -> bytes:
    """The HMAC key: base64 after `whsec_` (Standard Webhooks secrets), else the UTF-8 bytes."""
    if secret.startswith(WEBHOOK_SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX):], validate=True)
        except binascii.Error:
            key = b""
        if not key:
            raise ConfigError(f"HTTP_SIGNING_SECRET starts with '{WEBHOOK_SECRET_PREFIX}' but what "
                              "follows is not valid base64")
        return key
    return secret.encode("utf-8")


def sign_webhook(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "<msg_id>.<timestamp>.<body>">` (webhook-signature header)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(decode_signing_secret(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def decode_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date (RFC 9110 section 10.2.3).
    None when absent or unreadable; never negative."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit alone takes "²" too, which float() refuses
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def shorten_body(body: bytes, limit: int = HTTP_ERROR_BODY_CHARS) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    text = " ".join(text.split())  # one line in the log
    return text if len(text) <= limit else text[:limit] + "..."


def classify_http_response(response: HttpResponse, where: str) -> DeliveryError | None:
    """None for 2xx (delivered); otherwise the DeliveryError to raise: retryable for 408, 425, 429
    and 5xx (with Retry-After), not retryable for every other status."""
    status = response.status
    if 200 <= status < 300:
        return None
    detail = shorten_body(response.body)
    message = f"{where} answered HTTP {status}" + (f": {detail}" if detail else "")
    return DeliveryError(message, retryable=is_retryable_status(status),
                         retry_after=decode_retry_after(response.headers.get("retry-after")))


class HttpSink(_RequestSink):
    """POSTs events to HTTP_ENDPOINT_URL (see the README, "HTTP sink")."""

    name = "http"

    def __init__(self, config, *, ssl_context: ssl.SSLContext | None = None, alerter=None):
        super().__init__(config)
        self.batch_size = max(1, config.http_batch_size)
        self._alerter = alerter
        self._secret = config.http_signing_secret
        if self._secret:
            decode_signing_secret(self._secret)  # a bad whsec_ secret is a start-up error
        self._client = HttpClient(config.http_endpoint_url, timeout_s=config.http_timeout_s,
                                  ca_file=config.http_ca_file, headers=config.http_headers,
                                  ssl_context=ssl_context, max_connections=config.delivery_concurrency)
        self._clock = time.time  # replaced by tests

    async def check(self) -> str:
        """--check: any HTTP answer to an OPTIONS request (which no receiver takes as an event)
        proves the endpoint reachable; connection and TLS failures raise DeliveryError."""
        response = await self._client.request("OPTIONS", self._client.endpoint.target)
        return f"{self._client.endpoint.where} is reachable (OPTIONS answered {response.status})"

    async def _send(self, events: list[Event]) -> None:
        batched = self.batch_size > 1
        body = build_http_body(events, batched)
        message_id = build_message_id(events, batched)
        headers = [("Content-Type", "application/json"), ("Idempotency-Key", message_id)]
        if self._secret:
            headers.extend(self._signature_headers(message_id, body))
        response = await self._client.request("POST", self._client.endpoint.target, headers=headers, body=body)
        response = response.scrubbed(self._secrets)
        if response.status in (401, 403):  # rejected credentials are exit 4, never retried
            message = self._redact(f"{self._client.endpoint.where} rejected our credentials (HTTP {response.status}): "
                                   "check HTTP_HEADERS / the URL's user info; nothing was acknowledged")
            if self._alerter is not None:
                self._alerter.alert("http-auth", "the HTTP endpoint rejected the credentials", message)
            raise SinkAuthError(message)
        error = classify_http_response(response, self._client.endpoint.where)
        if error is not None:
            raise DeliveryError(self._redact(str(error)), retryable=error.retryable,
                                retry_after=error.retry_after)

    def _signature_headers(self, msg_id: str, body: bytes) -> list[tuple[str, str]]:
        timestamp = int(self._clock())  # signed at each attempt: receivers reject stale timestamps
        return [("webhook-id", msg_id), ("webhook-timestamp", str(timestamp)),
                ("webhook-signature", sign_webhook(self._secret, msg_id, timestamp, body))]


# =====================================================================================================
# 15. Hook0 sink: mapping (pure)
# =====================================================================================================
# Nothing here touches a socket: events (Event or dict: any mapping) in, Hook0 bodies (or a
# non-retryable DeliveryError) out.

#: Appended to HOOK0_API_URL when it has no path (or only "/").
HOOK0_API_PATH = "/api/v1"
#: Columns that make a table an outbox table (README, "Hook0 sink").
HOOK0_OUTBOX_COLUMNS = ("event_id", "event_type", "created_at", "payload", "metadata", "labels")
#: Hook0's own limits (api/src/handlers/events.rs and validators.rs): checked before sending so
#: the error names the column instead of coming back as a 422.
HOOK0_EVENT_TYPE_MAX_CHARS = 200
HOOK0_EVENT_TYPE_PART_MAX_CHARS = 50          # service, resource_type, verb when creating a type
HOOK0_PAYLOAD_MAX_CHARS = 699_050             # 512 KiB of payload once base64 encoded
HOOK0_LABELS_MIN_ENTRIES = 1
HOOK0_LABELS_MAX_ENTRIES = 10
HOOK0_METADATA_MAX_ENTRIES = 50
HOOK0_PROPERTY_MAX_BYTES = 50                 # keys and values of labels and metadata, UTF-8
#: Namespace of the uuid5 event ids of HOOK0_TABLE_EVENTS: fixed forever, or ids change.
HOOK0_TABLE_EVENT_NAMESPACE = uuid.UUID("86ce6e04-7559-46d8-9ac2-f6c5bdb0c64b")
#: Operations that become table events under HOOK0_TABLE_EVENTS (truncate and message do not).
HOOK0_TABLE_EVENT_OPS = frozenset({"insert", "update", "delete", "read"})
HOOK0_PAYLOAD_CONTENT_TYPE = "application/json"

_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def hook0_api_base(url: str) -> str:
    """The API base for HOOK0_API_URL: `/api/v1` appended when the URL has no path or only `/`,
    a trailing slash removed otherwise (`https://h/` -> `https://h/api/v1`,
    `https://h/hook0/api/v1/` -> `https://h/hook0/api/v1`)."""
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/") or HOOK0_API_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _table_name(event: Mapping) -> str:
    return f"{event.get('schema')}.{event.get('table')}"


def _undeliverable(event: Mapping, column: str, problem: str) -> DeliveryError:
    """The error for a row Hook0 cannot take: names table, column and event, never retried."""
    return DeliveryError(
        f"cannot send event {event.get('id')} of table {_table_name(event)} to Hook0: "
        f"column {column} {problem}", retryable=False)


def _columns_sent(event: Mapping) -> set[str]:
    columns = set(event.get("new") or ()) | set(event.get("old") or ())
    return columns | set(event.get("unchanged_toast") or ())


def is_hook0_outbox_event(event: Mapping, known_outbox_tables: Collection[tuple[str, str]] = (),
                          table_columns: Collection[str] | None = None) -> bool:
    """Whether the event's table is an outbox table.  An insert or update carries every column
    the table had when the change was decoded (sent, or listed as unchanged TOAST): that decides,
    never the table's current columns, which a later ALTER TABLE may already have changed while
    this event waits for delivery or a retry.  Otherwise `table_columns`, the table's columns from
    its latest Relation message, decides when given; else `known_outbox_tables` ((schema, table)
    pairs recognised earlier) and what the event carries."""
    if event.get("op") in ("insert", "update"):
        return set(HOOK0_OUTBOX_COLUMNS) <= _columns_sent(event)
    if table_columns is not None:
        return set(HOOK0_OUTBOX_COLUMNS) <= set(table_columns)
    if (event.get("schema"), event.get("table")) in known_outbox_tables:
        return True
    sent = _columns_sent(event)
    if event.get("op") == "delete" and "event_id" in sent and sent <= set(HOOK0_OUTBOX_COLUMNS):
        # Under the default replica identity a delete carries only the key: an outbox table's
        # event_id.  Decided the same way in every session, restarted or not.
        return True
    return set(HOOK0_OUTBOX_COLUMNS) <= sent


def convert_hook0_string(value) -> str | None:
    """One label or metadata value as Hook0's string: text as is, numbers and booleans as their
    JSON text ("3", "true"), objects and arrays as compact JSON text, null as None (dropped)."""
    if value is None or isinstance(value, str):
        return value
    return encode_json(value)


def convert_hook0_string_map(event: Mapping, column: str, value) -> dict[str, str]:
    """A labels/metadata column as a string-to-string map; a NULL column is an empty map."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _undeliverable(event, column, f"is a JSON {type(value).__name__}, not an object")
    converted = {key: convert_hook0_string(item) for key, item in value.items()}
    return {key: item for key, item in converted.items() if item is not None}


def hook0_string_map_problem(values: Mapping[str, str], min_entries: int,
                             max_entries: int) -> str | None:
    """What breaks Hook0's size rules for labels and metadata (validators.rs), or None: entry
    count, and every key and value 1 to 50 bytes of UTF-8.  Used for HOOK0_LABELS too."""
    if not min_entries <= len(values) <= max_entries:
        return f"has {len(values)} entries; Hook0 accepts {min_entries} to {max_entries}"
    for key, value in values.items():
        for what, text in (("key", key), ("value", value)):
            size = len(text.encode("utf-8"))
            if not 1 <= size <= HOOK0_PROPERTY_MAX_BYTES:
                return (f"has a {what} of {size} bytes (key {key[:60]!r}); "
                        f"Hook0 accepts 1 to {HOOK0_PROPERTY_MAX_BYTES}")
    return None


def _check_string_map(event: Mapping, column: str, values: dict[str, str], min_entries: int,
                      max_entries: int) -> None:
    problem = hook0_string_map_problem(values, min_entries, max_entries)
    if problem:
        raise _undeliverable(event, column, problem)


def _check_event_type(event: Mapping, column: str, event_type) -> str:
    if event_type is None:
        raise _undeliverable(event, column, "is NULL or missing")
    if not isinstance(event_type, str):
        raise _undeliverable(event, column, "is not text")
    if not 1 <= len(event_type) <= HOOK0_EVENT_TYPE_MAX_CHARS:
        raise _undeliverable(event, column, f"is {len(event_type)} characters long; Hook0 accepts "
                                            f"1 to {HOOK0_EVENT_TYPE_MAX_CHARS}")
    if _CONTROL_CHARACTER.search(event_type):
        raise _undeliverable(event, column, "contains control characters")
    return event_type


def _check_payload(event: Mapping, column: str, text: str) -> str:
    if len(text) > HOOK0_PAYLOAD_MAX_CHARS:
        raise _undeliverable(event, column, f"is {len(text)} characters of JSON; Hook0 accepts at "
                                            f"most {HOOK0_PAYLOAD_MAX_CHARS}")
    return text


def encode_hook0_timestamp(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC with `Z`, fractional digits as PostgreSQL prints them (none when zero)."""
    moment = moment.astimezone(datetime.timezone.utc)
    text = (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
            f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def convert_hook0_occurred_at(event: Mapping, created_at) -> str:
    """`created_at` (timestamptz text, any offset) in UTC; NULL -> the transaction's commit time.
    A timestamp without a zone is taken as UTC (wal2http reads with TimeZone UTC)."""
    if created_at is None:
        created_at = event.get("commit_time")
        if created_at is None:   # row changes always have a commit time; be safe anyway
            return encode_hook0_timestamp(datetime.datetime.now(datetime.timezone.utc))
    try:
        moment = datetime.datetime.fromisoformat(str(created_at))
    except ValueError:
        raise _undeliverable(event, "created_at", f"is {str(created_at)[:40]!r}, not a date and "
                                                  "time Hook0 accepts") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return encode_hook0_timestamp(moment)


def _labels_from_config(config) -> dict[str, str]:
    return dict(config.hook0_labels or ())


def _convert_event_id(event: Mapping, value) -> str:
    if value is None:
        raise _undeliverable(event, "event_id", "is NULL or missing")
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise _undeliverable(event, "event_id", f"is {str(value)[:60]!r}, not a UUID") from None


def build_hook0_outbox_event(event: Mapping, config, application_id: str) -> dict:
    """The Hook0 body for an inserted or updated outbox row (README, "Hook0 sink")."""
    row = event.get("new") or {}
    for column in set(event.get("unchanged_toast") or ()) & set(HOOK0_OUTBOX_COLUMNS):
        # An update that left a large value alone: PostgreSQL did not send it, and sending {}
        # (or HOOK0_LABELS) in its place would be sending wrong data.
        raise _undeliverable(event, column, "was not sent by PostgreSQL (an unchanged TOASTed value "
                                            "of an update; REPLICA IDENTITY FULL sends it)")
    event_id = _convert_event_id(event, row.get("event_id"))
    event_type = _check_event_type(event, "event_type", row.get("event_type"))
    if row.get("payload") is None:
        raise _undeliverable(event, "payload", "is NULL or missing")
    payload = _check_payload(event, "payload", encode_json(row["payload"]))
    metadata = convert_hook0_string_map(event, "metadata", row.get("metadata"))
    _check_string_map(event, "metadata", metadata, 0, HOOK0_METADATA_MAX_ENTRIES)
    labels = convert_hook0_string_map(event, "labels", row.get("labels")) or _labels_from_config(config)
    if not labels:
        raise _undeliverable(event, "labels", "is empty and HOOK0_LABELS is not set; Hook0 needs "
                                              "at least one label")
    _check_string_map(event, "labels", labels, HOOK0_LABELS_MIN_ENTRIES, HOOK0_LABELS_MAX_ENTRIES)
    return {
        "application_id": application_id,
        "event_id": event_id,
        "event_type": event_type,
        "payload": payload,
        "payload_content_type": HOOK0_PAYLOAD_CONTENT_TYPE,
        "metadata": metadata,
        "occurred_at": convert_hook0_occurred_at(event, row.get("created_at")),
        "labels": labels,
    }


def build_hook0_table_event_id(event: Mapping, slot_name: str) -> str:
    """The deterministic event_id of a table event: uuid5 over the slot name, the table and the
    wal2http event id.  The event id alone is unique within one slot's stream; the slot and table
    keep two databases that happen to reach the same LSN from sharing ids (Hook0 would answer 409
    and the second event would be lost as a "redelivery")."""
    return str(uuid.uuid5(HOOK0_TABLE_EVENT_NAMESPACE, f"{slot_name}:{_table_name(event)}:{event['id']}"))


def hook0_name(name: str, max_bytes: int = HOOK0_PROPERTY_MAX_BYTES) -> str:
    """A schema or table name as Hook0 takes it in a label or an event type part: as it is when
    it fits in `max_bytes` of UTF-8 (PostgreSQL allows 63), else its first characters, `~` and 8
    hex digits of its SHA-256, so that it stays recognisable, distinct and the same every time."""
    if len(name.encode("utf-8")) <= max_bytes:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    head = name.encode("utf-8")[:max_bytes - 9].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def build_hook0_table_event(event: Mapping, config, application_id: str) -> dict:
    """The Hook0 body of a plain table's change under HOOK0_TABLE_EVENTS=true: event type
    `<schema>.<table>.<op>` and labels exactly {"schema", "table"} (README, "Hook0 sink").  A dot
    in a name becomes `_` in the event type (a type has three dot-separated parts), and a name
    longer than Hook0 allows is shortened by `hook0_name`."""
    schema, table = event["schema"], event["table"]
    event_type = _check_event_type(event, "(event type)", ".".join(
        hook0_name(part.replace(".", "_")) for part in (schema, table)) + f".{event['op']}")
    labels = {"schema": hook0_name(schema), "table": hook0_name(table)}
    _check_string_map(event, "(labels)", labels, HOOK0_LABELS_MIN_ENTRIES, HOOK0_LABELS_MAX_ENTRIES)
    return {
        "application_id": application_id,
        "event_id": build_hook0_table_event_id(event, config.slot_name),
        "event_type": event_type,
        "payload": _check_payload(event, "(whole event as payload)", event_line(event)),
        "payload_content_type": HOOK0_PAYLOAD_CONTENT_TYPE,
        "metadata": {},
        "occurred_at": convert_hook0_occurred_at(event, None),
        "labels": labels,
    }


def build_hook0_event(event: Mapping, config, application_id: str, *,
                      known_outbox_tables: Collection[tuple[str, str]] = (),
                      table_columns: Collection[str] | None = None) -> dict | None:
    """The Hook0 body for a wal2http event, or None when the event is not sent to Hook0.

    Outbox rows (insert, update) are mapped; deletes of outbox rows, a backfill's reads of them
    (events sent when their rows were inserted), truncates and messages are ignored; other
    tables' rows are ignored unless HOOK0_TABLE_EVENTS, which maps their inserts, updates,
    deletes and backfilled reads to `<schema>.<table>.<op>`.  An undeliverable row raises a
    `DeliveryError(retryable=False)` naming the table and column.
    """
    op = event.get("op")
    if op not in HOOK0_TABLE_EVENT_OPS:
        return None
    if is_hook0_outbox_event(event, known_outbox_tables, table_columns):
        return build_hook0_outbox_event(event, config, application_id) if op in ("insert", "update") else None
    if config.hook0_table_events:
        return build_hook0_table_event(event, config, application_id)
    return None


# =====================================================================================================
# 16. Hook0 sink: answers (pure)
# =====================================================================================================
# Hook0 answers errors as RFC 7807 problem JSON with an "id" (api/src/problems.rs); its rate
# limiter may answer 429 as text/plain "Too many requests, retry in Ns" with Retry-After.

_RETRY_IN = re.compile(rb"retry in (\d+(?:\.\d+)?)\s*s", re.IGNORECASE)


@dataclass(frozen=True)
class Hook0Answer:
    """What a Hook0 response says: status, problem id ("" when none) and its text."""

    status: int
    problem_id: str = ""
    title: str = ""
    detail: str = ""
    validation: object = None
    retry_after_s: float | None = None
    secrets: tuple[str, ...] = dataclasses.field(default=(), repr=False)  #: scrubbed from describe()

    def describe(self) -> str:
        """Short text for errors and logs: status, id, title, detail, validation; secrets scrubbed
        before it is shortened (a secret cut in two would no longer be recognised)."""
        head = f"{self.status} {self.problem_id}".strip()
        text = "; ".join(part for part in (self.title, self.detail) if part)
        if self.validation:
            try:
                text += f"; validation: {encode_json(self.validation)}"
            except (ValueError, RecursionError):  # 1e999, or nested too deep to write back
                text += "; validation: (unreadable)"
        # As written inside JSON text too (a secret with a quote or a backslash is escaped there).
        secrets = [*self.secrets, *(json.dumps(s)[1:-1] for s in self.secrets)]
        return _shorten(scrub_secrets(f"{head}: {text}" if text else head, secrets))


def _shorten(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def decode_hook0_retry_after(value: str | None, body: bytes = b"") -> float | None:
    """Seconds to wait: the Retry-After header (as the HTTP sink reads it), else the rate
    limiter's text body "Too many requests, retry in Ns"; None when neither says."""
    seconds = decode_retry_after(value)
    if seconds is not None:
        return seconds
    found = _RETRY_IN.search(body[:200])
    return float(found.group(1)) if found else None


def decode_hook0_answer(response: HttpResponse, secrets: Iterable[str] = ()) -> Hook0Answer:
    """A Hook0 response as a `Hook0Answer` whose text shows none of `secrets` (its problem id,
    which decides what happens, is read as sent); never raises on a malformed body."""
    secrets = tuple(secrets)
    retry_after_s = decode_hook0_retry_after(response.headers.get("retry-after"), response.body)
    problem = {}
    if "json" in response.headers.get("content-type", ""):
        try:
            problem = json.loads(response.body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json follows
            problem = {}
    if not isinstance(problem, dict):
        problem = {}
    if not problem and response.body and not 200 <= response.status < 300:
        text = scrub_secrets(response.body.decode("utf-8", "replace"), secrets)  # before it is cut
        problem = {"detail": text[:300].strip()}
    return Hook0Answer(response.status, str(problem.get("id") or ""), str(problem.get("title") or ""),
                       str(problem.get("detail") or ""), problem.get("validation"), retry_after_s, secrets)


def split_hook0_event_type(event_type: str) -> tuple[str, str, str] | None:
    """`service.resource_type.verb` -> its three parts, or None when Hook0 could not create it
    (not exactly three non-empty parts of at most 50 characters)."""
    parts = event_type.split(".")
    if len(parts) != 3 or not all(1 <= len(part) <= HOOK0_EVENT_TYPE_PART_MAX_CHARS for part in parts):
        return None
    return parts[0], parts[1], parts[2]


# =====================================================================================================
# 17. Hook0 sink: delivery (I/O)
# =====================================================================================================
# One event per request; HttpClient raises DeliveryError(retryable=True) on connection errors and
# timeouts.  ReliableSink wraps this sink for retries, ON_FAILURE and the dead-letter file.

HOOK0_ALERT_AUTH = "hook0-auth"
HOOK0_ALERT_QUOTA = "hook0-quota"
HOOK0_ALERT_EVENT_TYPE = "hook0-event-type:"   # + the event type


class Hook0Sink(_RequestSink):
    """Sends events to Hook0's `POST <api>/event`, one per request (see the README, "Hook0 sink")."""

    name = "hook0"
    batch_size = 1

    def __init__(self, config, alerter, *, ssl_context: ssl.SSLContext | None = None):
        super().__init__(config)
        self.config = config
        self.alerter = alerter
        self.api_base = hook0_api_base(config.hook0_api_url)
        endpoint = parse_http_url(self.api_base)
        self._api_path = endpoint.target  # percent-encoded
        self._shown_base = endpoint.where  #: for messages: scheme://host:port/... only
        try:
            self.application_id = str(uuid.UUID(config.hook0_application_id))
        except (TypeError, ValueError):
            raise ConfigError("HOOK0_APPLICATION_ID must be a UUID") from None
        self._token = config.hook0_api_token
        self._client = HttpClient(self.api_base, timeout_s=config.http_timeout_s,
                                  ca_file=config.http_ca_file, ssl_context=ssl_context,
                                  headers=(("Authorization", f"Bearer {self._token}"),),
                                  max_connections=config.delivery_concurrency)
        self._outbox_tables: set[tuple[str, str]] = set()
        # (schema, table) -> column names, filled by the replication loop from Relation messages
        # (sent before a table's first change in every session): outbox or not is then known
        # from the table itself, even for a delete that carries only the key.
        self.relation_columns: dict[tuple[str, str], tuple[str, ...]] = {}
        self._warned_tables: set[tuple[str, str]] = set()
        self._rate_limited_until = 0.0  # Trio time before which no request goes out

    # -- Sink interface ---------------------------------------------------------------------------

    async def check(self) -> str:
        """--check: lists the application's event types, which needs a working token."""
        query = urlencode({"application_id": self.application_id})
        response = await self._client.request("GET", f"{self._api_path}/event_types?{query}")
        answer = decode_hook0_answer(response, self._secrets)
        if 200 <= answer.status < 300 and "json" in response.headers.get("content-type", ""):
            return f"Hook0 API {self._shown_base} accepts the token for application {self.application_id}"
        if 200 <= answer.status < 300:   # e.g. a web front end at that URL: not the API
            raise DeliveryError(f"{self._shown_base}/event_types answered {answer.status} without JSON: "
                                "is HOOK0_API_URL the Hook0 API?", retryable=False)
        if answer.status in (401, 403):
            raise self._auth_error(answer, "listing event types")
        raise DeliveryError(self._redact(f"Hook0 API {self._shown_base} answered {answer.describe()} "
                                         "when listing event types"),
                            retryable=is_retryable_status(answer.status), retry_after=answer.retry_after_s)

    # -- one event --------------------------------------------------------------------------------

    async def _send(self, events: list[Event]) -> None:
        event = events[0]  # batch_size is 1
        try:
            body = self._build(event)
        except RecursionError:  # jsonb nested deeper than Python's JSON reader follows
            raise DeliveryError(f"cannot send event {event['id']} to Hook0: its JSON is nested too "
                                "deeply to be read here", retryable=False) from None
        if body is None:
            return
        where = f"event {event.get('id')} of table {_table_name(event)}"
        answer = await self._post_event(body)
        if answer.problem_id == "EventTypeDoesNotExist" and self.config.hook0_create_event_types:
            await self._create_event_type(body["event_type"], where)
            answer = await self._post_event(body)
            if answer.problem_id == "EventTypeDoesNotExist":
                raise DeliveryError(f"Hook0 still rejects event type {body['event_type']!r} of {where} "
                                    "after creating it", retryable=False)
        self._check_event_answer(answer, body, where)

    def _build(self, event: Mapping) -> dict | None:
        """Maps the event, remembering outbox tables (for deletes) and warning once per table whose
        rows are ignored."""
        table = (event.get("schema"), event.get("table"))
        columns = self.relation_columns.get(table)
        if event.get("op") in ("insert", "update") and is_hook0_outbox_event(event, (), columns):
            self._outbox_tables.add(table)
        body = build_hook0_event(event, self.config, self.application_id,
                                 known_outbox_tables=self._outbox_tables, table_columns=columns)
        if (body is None and event.get("op") in ("insert", "update") and table not in self._outbox_tables
                and table not in self._warned_tables):
            self._warned_tables.add(table)
            logger.warning("Hook0 sink: ignoring changes of table %s: it is not an outbox table "
                           "(columns %s) and HOOK0_TABLE_EVENTS is false",
                           _table_name(event), ", ".join(HOOK0_OUTBOX_COLUMNS))
        return body

    async def _post_event(self, body: dict) -> Hook0Answer:
        """One POST; Hook0's rate limit (429 with a delay) holds back every request to the API,
        not just the one it answered, for as long as it asks (at most RETRY_MAX_DELAY_MS)."""
        if trio.current_time() < self._rate_limited_until:
            await trio.sleep_until(self._rate_limited_until)
        response = await self._client.request(
            "POST", f"{self._api_path}/event", headers=(("Content-Type", "application/json"),),
            body=encode_json(body).encode("utf-8"))
        answer = decode_hook0_answer(response, self._secrets)
        if answer.status == 429 and answer.retry_after_s:
            self._rate_limited_until = max(self._rate_limited_until,
                                           trio.current_time() + min(answer.retry_after_s, self.config.retry_max_delay_s))
        return answer

    def _check_event_answer(self, answer: Hook0Answer, body: dict, where: str) -> None:
        """Returns when Hook0 has the event (2xx, or 409 EventAlreadyIngested: a redelivery);
        raises SinkAuthError or DeliveryError otherwise, as the README's Hook0 table of answers says."""
        if 200 <= answer.status < 300:
            return
        if answer.status == 409 and answer.problem_id == "EventAlreadyIngested":
            logger.debug("Hook0 already had %s (event_id %s): counted as delivered", where, body["event_id"])
            return
        if answer.status in (401, 403):
            raise self._auth_error(answer, f"sending {where}")
        if answer.problem_id == "EventTypeDoesNotExist":
            event_type = body["event_type"]
            self.alerter.alert(
                HOOK0_ALERT_EVENT_TYPE + event_type,
                f"Hook0 event type {event_type} does not exist",
                f"Hook0 application {self.application_id} has no event type {event_type!r}, so {where} "
                "could not be delivered. Create the event type in Hook0, or set "
                "HOOK0_CREATE_EVENT_TYPES=true.")
            raise DeliveryError(f"Hook0 has no event type {event_type!r} ({where}); create it or set "
                                "HOOK0_CREATE_EVENT_TYPES=true", retryable=False)
        if answer.problem_id == "TooManyEventsToday":
            self.alerter.alert(HOOK0_ALERT_QUOTA, "Hook0 daily event quota reached",
                               self._redact(f"Hook0 refuses new events: {answer.describe()}"))
        raise DeliveryError(self._redact(f"Hook0 answered {answer.describe()} for {where}"),
                            retryable=is_retryable_status(answer.status), retry_after=answer.retry_after_s)

    async def _create_event_type(self, event_type: str, where: str) -> None:
        """POST <api>/event_types for HOOK0_CREATE_EVENT_TYPES; Hook0 reactivates an existing one,
        and older versions answer 409 EventTypeAlreadyExist, which is as good."""
        parts = split_hook0_event_type(event_type)
        if parts is None:
            raise DeliveryError(
                f"Hook0 has no event type {event_type!r} ({where}) and HOOK0_CREATE_EVENT_TYPES cannot "
                "create it: an event type must be service.resource_type.verb (three dot-separated "
                f"parts of 1 to {HOOK0_EVENT_TYPE_PART_MAX_CHARS} characters)", retryable=False)
        service, resource_type, verb = parts
        body = {"application_id": self.application_id, "service": service,
                "resource_type": resource_type, "verb": verb}
        response = await self._client.request(
            "POST", f"{self._api_path}/event_types", headers=(("Content-Type", "application/json"),),
            body=encode_json(body).encode("utf-8"))
        answer = decode_hook0_answer(response, self._secrets)
        if 200 <= answer.status < 300 or answer.problem_id == "EventTypeAlreadyExist":
            logger.info("Hook0 sink: created event type %s in application %s",
                        event_type, self.application_id)
            return
        if answer.status in (401, 403):
            raise self._auth_error(answer, f"creating event type {event_type!r}")
        raise DeliveryError(self._redact(f"Hook0 answered {answer.describe()} when creating event type "
                                         f"{event_type!r} for {where}"),
                            retryable=is_retryable_status(answer.status), retry_after=answer.retry_after_s)

    # -- helpers ----------------------------------------------------------------------------------

    def _auth_error(self, answer: Hook0Answer, doing: str) -> SinkAuthError:
        """Alerts and returns the exit-4 error for a rejected token (never retried)."""
        message = self._redact(
            f"Hook0 rejected HOOK0_API_TOKEN ({answer.status} {answer.problem_id or 'no problem id'}) when "
            f"{doing}: check the token and its rights on application {self.application_id}")
        self.alerter.alert(HOOK0_ALERT_AUTH, "Hook0 rejected the API token", message)
        return SinkAuthError(message)


# =====================================================================================================
# 18. Alerts
# =====================================================================================================
# Alerts are always logged; mailed when EMAIL_SMTP_HOST, EMAIL_FROM and EMAIL_TO are set.
# `alert()` / `recovered()` never block and never raise: they put the mail on a bounded channel
# (a full channel drops the mail, with a log line).  `Alerter.run` sends the mails one at a time
# with smtplib in a worker thread, so a dead or slow SMTP server never holds up replication.

ALERT_REPEAT_S = 300.0  #: one mail per alert key per 5 minutes at most
ALERT_QUEUE_SIZE = 32  #: mails waiting for the SMTP thread; more are dropped
SMTP_TIMEOUT_S = 30.0  #: each SMTP operation (connect, each command)
SMTP_SEND_DEADLINE_S = 120.0  #: one whole mail; the thread is abandoned after that
ALERT_SUBJECT_PREFIX = "[wal2http]"
MAX_SUBJECT_CHARS = 200


def _utc_text(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def build_alert_message(config: Config, *, kind: str, key: str, subject: str, body: str,
                        since: datetime.datetime, now: datetime.datetime) -> email.message.EmailMessage:
    """The mail for an alert (kind "ALERT") or a recovery (kind "RECOVERED"): pure."""
    message = email.message.EmailMessage()
    message["Subject"] = f"{ALERT_SUBJECT_PREFIX} {kind}: {_one_line(subject, MAX_SUBJECT_CHARS)}"
    message["From"] = config.email_from or ""
    message["To"] = ", ".join(config.email_to)
    message["Date"] = email.utils.format_datetime(now)
    message["Message-ID"] = email.utils.make_msgid(domain="wal2http.invalid")
    where = f"slot {config.slot_name}"
    if config.conninfo:
        info = config.conninfo
        where += f" on {info.host}:{info.port}/{info.dbname}"
    lines = [f"wal2http on {socket.gethostname()} ({where})", "",
             f"What failed:   {key}: {subject}"]
    if kind == "RECOVERED":
        lines += [f"Failing since: {_utc_text(since)} (UTC)", f"Recovered at:  {_utc_text(now)} (UTC)"]
    else:
        lines += [f"Failing since: {_utc_text(since)} (UTC)",
                  f"Repeated at most every {int(ALERT_REPEAT_S // 60)} minutes while it lasts."]
    message.set_content("\n".join(lines + ["", body, ""]))
    return message


def _open_smtp(config: Config, ssl_context: ssl.SSLContext, timeout_s: float) -> smtplib.SMTP:
    """Blocking: connect, greet, STARTTLS or SSL per EMAIL_SMTP_TLS, log in when a user is set."""
    host, port, tls = config.email_smtp_host, config.email_smtp_port, config.email_smtp_tls
    if tls == "ssl":
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=timeout_s, context=ssl_context)
    else:
        smtp = smtplib.SMTP(host, port, timeout=timeout_s)
    try:
        smtp.ehlo()
        if tls == "starttls":
            smtp.starttls(context=ssl_context)
        if config.email_smtp_username:
            smtp.login(config.email_smtp_username, config.email_smtp_password or "")
    except BaseException:
        smtp.close()
        raise
    return smtp


def send_smtp_message(config: Config, message: email.message.EmailMessage, *,
                      ssl_context: ssl.SSLContext, timeout_s: float = SMTP_TIMEOUT_S) -> None:
    """Blocking: one mail through EMAIL_SMTP_HOST (run it in a thread).  Raises OSError or
    smtplib.SMTPException on failure."""
    with _open_smtp(config, ssl_context, timeout_s) as smtp:
        smtp.send_message(message)


async def check_smtp(config: Config, ssl_context: ssl.SSLContext | None = None,
                     timeout_s: float = SMTP_TIMEOUT_S) -> None:
    """--check: connect to and greet the SMTP server (TLS and login as configured); send nothing."""
    context = ssl_context or ssl.create_default_context()

    def greet() -> None:
        with _open_smtp(config, context, timeout_s) as smtp:
            smtp.noop()

    try:
        await _run_in_worker_thread(greet)
    except (OSError, smtplib.SMTPException) as exc:
        detail = scrub_secrets(_one_line(f"{type(exc).__name__}: {exc}", 300), config_secrets(config))
        raise PreconditionError(f"SMTP server {config.email_smtp_host}:{config.email_smtp_port} "
                                f"(EMAIL_SMTP_HOST): {detail}") from None


async def _run_in_worker_thread(function: Callable[[], None]) -> None:
    """In a worker thread, abandoned on cancel: a hung SMTP server never blocks the caller."""
    await trio.to_thread.run_sync(function, abandon_on_cancel=True)


@dataclasses.dataclass
class _AlertState:
    since: datetime.datetime
    mailed_at: float | None = None  # `now()` when the last mail for this key was queued


class Alerter:
    """Logs alerts, and mails them (rate-limited per key) when email is configured.

    `send_mail(message)` is the blocking sender (default: smtplib per EMAIL_*); `now` the
    monotonic clock used for the 5-minute rule; `ssl_context` verifies the SMTP server (default:
    the system store).
    """

    def __init__(self, config: Config, *,
                 send_mail: Callable[[email.message.EmailMessage], None] | None = None,
                 now: Callable[[], float] = time.monotonic, ssl_context: ssl.SSLContext | None = None,
                 smtp_timeout_s: float = SMTP_TIMEOUT_S, queue_size: int = ALERT_QUEUE_SIZE):
        self._config = config
        self._enabled = email_enabled(config)
        self._now = now
        self._secrets = config_secrets(config)
        self._ssl_context = ssl_context
        self._smtp_timeout_s = smtp_timeout_s
        self._send_mail = send_mail or self._send_smtp
        self._states: dict[str, _AlertState] = {}
        # When each key's alert was last mailed; kept across recoveries, so a flapping failure
        # is still mailed at most once per ALERT_REPEAT_S.
        self._last_mailed: dict[str, float] = {}
        self._send_channel, self._receive_channel = trio.open_memory_channel(queue_size)
        self._drained = trio.Event()
        self.alerts_total = 0  # alerts raised (wal2http_alerts_total)

    def _send_smtp(self, message: email.message.EmailMessage) -> None:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        send_smtp_message(self._config, message, ssl_context=self._ssl_context,
                          timeout_s=self._smtp_timeout_s)

    def alert(self, key: str, subject: str, body: str, since: datetime.datetime | None = None) -> None:
        """Something failed (since `since`, default now): log it, and mail it unless this key was
        mailed less than 5 min ago."""
        subject, body = scrub_secrets(subject, self._secrets), scrub_secrets(body, self._secrets)
        logger.warning("alert [%s]: %s: %s", key, subject, _one_line(body, 500))
        self.alerts_total += 1
        state = self._states.setdefault(key, _AlertState(since=since or datetime.datetime.now(datetime.timezone.utc)))
        if not self._enabled:
            return
        last = self._last_mailed.get(key)
        if last is not None and self._now() - last < ALERT_REPEAT_S:
            logger.debug("alert [%s] already mailed less than %d s ago", key, ALERT_REPEAT_S)
            return
        if self._queue("ALERT", key, subject, body, state):
            state.mailed_at = self._last_mailed[key] = self._now()

    def recovered(self, key: str, subject: str, body: str) -> None:
        """The failure behind `key` is over: log it; mail it if the failure was mailed."""
        subject, body = scrub_secrets(subject, self._secrets), scrub_secrets(body, self._secrets)
        state = self._states.pop(key, None)
        if state is None:
            logger.debug("recovered [%s] without an earlier alert: %s", key, subject)
            return
        logger.info("recovered [%s]: %s: %s", key, subject, _one_line(body, 500))
        if self._enabled and state.mailed_at is not None:
            self._queue("RECOVERED", key, subject, body, state)

    def _queue(self, kind: str, key: str, subject: str, body: str, state: _AlertState) -> bool:
        try:
            message = build_alert_message(self._config, kind=kind, key=key, subject=subject,
                                          body=body, since=state.since,
                                          now=datetime.datetime.now(datetime.timezone.utc))
            self._send_channel.send_nowait(message)
        except trio.WouldBlock:
            logger.warning("alert mail for [%s] dropped: %d mails already wait for the SMTP server",
                           key, self._send_channel.statistics().max_buffer_size)
            return False
        except Exception as exc:  # never let an alert break the caller
            logger.warning("alert mail for [%s] not queued: %s", key, type(exc).__name__)
            return False
        return True

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Sends queued mails one by one; never returns."""
        task_status.started()
        try:
            async with self._receive_channel:
                async for message in self._receive_channel:
                    await self._deliver(message)
        finally:
            self._drained.set()  # also when cancelled: drain() must not wait for a sender that is gone
        await trio.sleep_forever()

    async def drain(self, timeout_s: float) -> None:
        """At exit: take no new mail and let the queued ones go out (bounded), so the alert that
        comes with exit code 3 or 4 is not lost.  Needs `run` running."""
        self._send_channel.close()
        with trio.move_on_after(timeout_s):
            await self._drained.wait()

    async def _deliver(self, message: email.message.EmailMessage) -> None:
        subject = message["Subject"]
        server = f"{self._config.email_smtp_host}:{self._config.email_smtp_port}"
        with trio.move_on_after(SMTP_SEND_DEADLINE_S) as scope:
            try:
                await _run_in_worker_thread(lambda: self._send_mail(message))
            except Exception as exc:  # a failed mail is logged and dropped, never fatal
                detail = scrub_secrets(_one_line(f"{type(exc).__name__}: {exc}", 300), self._secrets)
                logger.warning("could not send alert mail %r via %s: %s", subject, server, detail)
                return
            logger.info("alert mail %r sent to %s", subject, ", ".join(self._config.email_to))
        if scope.cancelled_caught:
            logger.warning("could not send alert mail %r via %s: gave up after %.0f s",
                           subject, server, SMTP_SEND_DEADLINE_S)


# =====================================================================================================
# 19. Operations port: health, metrics, slot guard, live tap
# =====================================================================================================
# OPS_ADDR serves /health, /ready, /status and /metrics over HTTP/1.1: a small h11 server in the
# same nursery as replication; GET /events hands the connection to trio-websocket (the live tap)
# and GET / serves the page that shows it; POST /backfill (the one request with a body) asks for
# a backfill (section 10).  The slot guard reads the slot's retained WAL over its
# own ordinary connection every SLOT_CHECK_INTERVAL_SECS, whether or not OPS_ADDR is set.
# Rules: the replication loop only bumps plain integers in `Stats`, once per chunk or per sink
# request, never per event; the JSON and the exposition are built when a client asks.  A client of
# the port costs at most its own socket: a bounded head, deadlines, a cap on connections, and no
# request ever waits on replication.  Tokens and request targets are never logged.

OPS_MAX_HEAD_BYTES = 16 * 1024  #: request line and headers
OPS_MAX_CONNECTIONS = 64  #: more are closed at once
OPS_HEAD_TIMEOUT_S = 5.0  #: a request head must arrive within this (also the keep-alive idle time)
OPS_SEND_TIMEOUT_S = 10.0  #: a client that does not read its answer is dropped after this
OPS_MAX_BODY_BYTES = 64 * 1024  #: POST /backfill's body; it must arrive within OPS_HEAD_TIMEOUT_S too
OPS_RATE_SAMPLE_S = 5.0  #: events_per_second: one sample of the delivered count this often...
OPS_RATE_WINDOW_S = 60.0  #: ...over the last minute
#: Histogram buckets (seconds) for webhook latencies, 1 ms to 60 s.
DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                      30.0, 60.0)
EVENT_OPS = ("insert", "update", "delete", "truncate", "message", "read")
REQUEST_OUTCOMES = ("ok", "retried", "failed")
WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")  #: pg_replication_slots.wal_status
TAP_CLOSE_REASONS = ("too_slow",)
SLOT_ALERT_RETAINED = "slot-retained"
SLOT_ALERT_UNRESERVED = "slot-unreserved"
SLOT_ALERT_LOST = "slot-lost"
#: What PostgreSQL says when a client asks for changes from an invalidated slot (SQLSTATE 55000):
#: START_REPLICATION's check, then the decoding context's (logical.c), with the why as DETAIL;
#: PostgreSQL 18 says it once, when the slot is acquired.
SLOT_INVALIDATED_TEXTS = ("cannot read from logical replication slot",
                          "can no longer get changes from replication slot",
                          "can no longer access replication slot")
SLOT_COLUMNS = ("wal_status", "safe_wal_size", "restart_lsn", "confirmed_flush_lsn", "conflicting",
                "invalidation_reason")  #: read where the server has them (13+, 16+, 17+)


class Histogram:
    """Cumulative on exposition only: `observe` adds to one bucket (the first bound >= value)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS_S):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if value < 0.0:  # a clock step
            value = 0.0
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


@dataclasses.dataclass
class SlotHealth:
    """One reading of the slot by the slot guard (None: the server has no such column)."""

    exists: bool
    wal_status: str | None = None
    retained_wal_bytes: int | None = None
    safe_wal_size_bytes: int | None = None
    confirmed_flush_lsn: int | None = None
    current_wal_lsn: int | None = None
    invalidation_reason: str | None = None
    conflicting: bool = False

    @property
    def lost(self) -> bool:
        return self.exists and (self.wal_status == "lost" or bool(self.invalidation_reason)
                                or self.conflicting)


class Stats:
    """What the operations port shows, as plain attributes.  The replication loop, the delivery
    loop and ReliableSink update the counters (one line each, per chunk or per request); the
    positions are read from the AckTracker and the DeliveryLoop when a client asks."""

    def __init__(self, config=None):
        self.config = config
        self.state = "connecting"  # connecting, streaming, reconnecting (stopping: read from `stop`)
        self.reconnects = 0
        self.ack: AckTracker | None = None
        self.delivery: DeliveryLoop | None = None
        self.sink: ReliableSink | None = None
        self.alerter: Alerter | None = None
        self.stop: trio.Event | None = None
        self.events_confirmed = dict.fromkeys(EVENT_OPS, 0)  # dead-lettered events included
        self.events_dead_lettered = dict.fromkeys(EVENT_OPS, 0)
        self.transactions = 0
        self.requests = dict.fromkeys(REQUEST_OUTCOMES, 0)
        self.request_seconds = Histogram()
        self.commit_to_delivery_seconds = Histogram()
        self.slot: SlotHealth | None = None
        self.server_version: str | None = None
        self.backfill: Backfill | None = None
        self.tap = LiveTap(self)
        self.tap_clients_closed = dict.fromkeys(TAP_CLOSE_REASONS, 0)
        self.started_at = process_start_time()
        self.rate_samples: list[tuple[float, int]] = []  # (monotonic time, events delivered)
        self._taken: collections.deque[Chunk] = collections.deque()  # held by the delivery loop, in order
        self._open_txn_events = False  # the transaction being confirmed has events
        self._shown_delivered = dict.fromkeys(EVENT_OPS, 0)  # counters never go down

    def start(self, config, sink: ReliableSink, alerter: Alerter, stop: trio.Event) -> None:
        """What one `run` gives these stats to read."""
        self.config, self.sink, self.alerter, self.stop = config, sink, alerter, stop

    # -- hooks: once per session, chunk or request --------------------------------------------------

    def attach(self, delivery: DeliveryLoop) -> Stats:
        """A new session's delivery loop: what the last one held is streamed again."""
        self.delivery, self.ack = delivery, delivery.ack
        self._taken, self._open_txn_events = collections.deque(), False
        return self

    def chunk_taken(self, chunk: Chunk) -> None:
        """The delivery loop took `chunk` (in stream order) to hand its events to the sink: the
        live tap's hook too, one attribute check per chunk while no tap client is connected."""
        self._taken.append(chunk)
        if self.tap.clients:
            self.tap.publish(chunk.events)

    def chunks_confirmed(self, count: int) -> None:
        """The delivery loop confirmed its `count` oldest chunks: counts their events by op, and
        each transaction they end (with its commit-to-confirmation time)."""
        if not count:
            return
        confirmed, taken = self.events_confirmed, self._taken
        now_us = None
        for _ in range(count):
            chunk = taken.popleft()
            events = chunk.events
            if events:
                op_counts = chunk.op_counts
                if op_counts is None:
                    confirmed["insert"] += len(events)
                else:
                    for op, number in op_counts.items():
                        confirmed[op] = confirmed.get(op, 0) + number
                    confirmed["insert"] += len(events) - sum(op_counts.values())
                self._open_txn_events = chunk.transaction or self._open_txn_events
            if chunk.end_lsn is not None and chunk.transaction and self._open_txn_events:
                self._open_txn_events = False
                self.transactions += 1
                if chunk.commit_time_us is not None:
                    now_us = now_us or time.time_ns() // 1000 - PG_EPOCH_OFFSET_US
                    self.commit_to_delivery_seconds.observe((now_us - chunk.commit_time_us) / 1e6)

    def request_done(self, began: float, outcome: str) -> None:
        """One sink request (ReliableSink: one sink.deliver call) ended: ok, retried or failed."""
        self.requests[outcome] += 1
        self.request_seconds.observe(time.perf_counter() - began)

    def dead_lettered(self, events: list) -> None:
        others = count_event_ops(events) or {}
        for op, number in others.items():
            self.events_dead_lettered[op] = self.events_dead_lettered.get(op, 0) + number
        self.events_dead_lettered["insert"] += len(events) - sum(others.values())

    def reconnecting(self) -> None:
        self.state = "reconnecting"
        self.reconnects += 1

    # -- reading ------------------------------------------------------------------------------------

    @property
    def tap_clients(self) -> int:
        return len(self.tap.clients)

    @property
    def current_state(self) -> str:
        return "stopping" if self.stop is not None and self.stop.is_set() else self.state

    @property
    def confirmed_lsn(self) -> int:
        return self.ack.flushed_lsn if self.ack else 0

    @property
    def received_lsn(self) -> int:
        return self.ack.received_lsn if self.ack else 0

    @property
    def server_wal_end_lsn(self) -> int:
        """The newest of what the stream said and what the slot guard last read."""
        guard = self.slot.current_wal_lsn if self.slot and self.slot.current_wal_lsn else 0
        return max(self.received_lsn, guard)

    @property
    def lag_bytes(self) -> int:
        return max(0, self.server_wal_end_lsn - self.confirmed_lsn) if self.confirmed_lsn else 0

    def lag_seconds(self, now: float) -> float:
        """Now minus the commit time of the oldest event handed to the sink and not confirmed."""
        delivery = self.delivery
        oldest = delivery.oldest_event() if delivery is not None else None
        if oldest is None:
            return 0.0
        commit = commit_time_of(oldest)
        return max(0.0, now - commit) if commit is not None else 0.0

    def events_delivered(self) -> dict[str, int]:
        """Confirmed minus dead-lettered, by op; never lower than what was shown before (a
        dead-lettered event is counted before the chunk that holds it is confirmed)."""
        shown = self._shown_delivered
        for op, number in self.events_confirmed.items():
            shown[op] = max(shown.get(op, 0), number - self.events_dead_lettered.get(op, 0))
        return dict(shown)

    @property
    def in_flight(self) -> int:
        return self.delivery.requests_in_flight if self.delivery is not None else 0

    @property
    def failing_since(self) -> float | None:
        since = self.sink.failing.since if self.sink is not None else None
        return since.timestamp() if since is not None else None

    def last_error(self) -> str | None:
        if self.sink is None or self.sink.last_error is None:
            return None
        secrets = config_secrets(self.config) if self.config else ()
        return scrub_secrets(self.sink.last_error, secrets)

    def sample_rate(self, now: float) -> None:
        self.rate_samples.append((now, sum(self.events_delivered().values())))
        cutoff = now - OPS_RATE_WINDOW_S
        while len(self.rate_samples) > 2 and self.rate_samples[1][0] <= cutoff:
            del self.rate_samples[0]

    def events_per_second(self, now: float) -> float:
        """Over the last minute (from the samples and the count now)."""
        if not self.rate_samples:
            return 0.0
        then, count_then = self.rate_samples[0]
        elapsed = now - then
        count_now = sum(self.events_delivered().values())
        return (count_now - count_then) / elapsed if elapsed > 0 else 0.0


def process_start_time() -> float:
    """When this process started (POSIX time), from /proc where there is one; else now."""
    try:
        with open("/proc/self/stat") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/stat") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith("btime "))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def commit_time_of(event) -> float | None:
    """An event's commit_time as a POSIX timestamp, read from its JSON text without decoding it
    (the key comes after every row value, so the last occurrence is the event's own); None for a
    non-transactional message."""
    line = getattr(event, "line", None)
    if line is None:
        text = event.get("commit_time") if isinstance(event, Mapping) else None
    else:
        start = line.rfind('"commit_time":"')
        text = line[start + 15:line.find('"', start + 15)] if start >= 0 else None
    if not text or text[0] not in "0123456789":  # null, or "infinity" cannot be a commit time
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- What the endpoints answer (pure: Stats in, JSON or text out) -------------------------------

def _lsn_or_none(lsn: int) -> str | None:
    return format_lsn(lsn) if lsn else None


def _utc_iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return _utc_text(datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc))


def build_readiness(stats: Stats) -> tuple[bool, dict]:
    """(ready, body) for /ready: streaming from PostgreSQL and the sink not in a failing period.
    /ready is open to probes without a token, so the reasons carry no error text (/status does)."""
    state = stats.current_state
    postgres = {"streaming": "streaming", "connecting": "connecting",
                "reconnecting": "reconnecting after an error", "stopping": "stopping"}[state]
    failing = stats.failing_since
    sink = "ok" if failing is None else f"failing since {_utc_iso(failing)}"
    ready = state == "streaming" and failing is None
    return ready, {"status": "ready" if ready else "unready", "postgres": postgres, "sink": sink}


def build_status(stats: Stats, now: float, monotonic_now: float) -> dict:
    """The /status document (README "Operations")."""
    config = stats.config
    slot = stats.slot
    delivered = stats.events_delivered()
    return {
        "version": __version__, "sink": config.event_sink, "slot": config.slot_name,
        "publications": list(config.publications), "state": stats.current_state,
        "confirmed_lsn": _lsn_or_none(stats.confirmed_lsn),
        "received_lsn": _lsn_or_none(stats.received_lsn),
        "server_wal_end_lsn": _lsn_or_none(stats.server_wal_end_lsn),
        "lag_bytes": stats.lag_bytes, "lag_seconds": round(stats.lag_seconds(now), 3),
        "events_delivered": sum(delivered.values()),
        "events_per_second": round(stats.events_per_second(monotonic_now), 1),
        "failing_since": _utc_iso(stats.failing_since), "last_error": stats.last_error(),
        "slot_health": {
            "wal_status": slot.wal_status if slot else None,
            "retained_wal_bytes": slot.retained_wal_bytes if slot else None,
            "safe_wal_size_bytes": slot.safe_wal_size_bytes if slot else None,
        },
        "backfill": stats.backfill.status() if stats.backfill else None,
    }


# --- Prometheus text exposition, version 0.0.4 ----------------------------------------------------

def escape_label_value(value: str) -> str:
    """Backslash, double quote and newline escaped, as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{escape_label_value(str(value))}"' for name, value in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    """Writes metric families: `# HELP`, `# TYPE`, then the samples."""

    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]

    def one(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text, [({}, value)])

    def histogram(self, name: str, help_text: str, histogram: Histogram) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip((*histogram.bounds, math.inf), histogram.counts):
            cumulative += count
            self.lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        self.lines += [f"{name}_sum {_number(histogram.sum)}", f"{name}_count {histogram.count}"]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _process_metrics(out: Exposition, start_time: float) -> None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # noqa: PLC0415 - not on every platform; peak RSS as a fallback
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.one("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss)
    out.one("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
            time.process_time())
    out.one("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
            start_time)


def build_metrics_text(stats: Stats) -> str:
    """The /metrics document (every metric is described in the README, "Operations")."""
    out = Exposition()
    delivered = stats.events_delivered()
    out.family("wal2http_events_delivered_total", "counter",
               "Events the sink confirmed (dead-lettered events not included), by op.",
               [({"op": op}, delivered.get(op, 0)) for op in EVENT_OPS])
    out.one("wal2http_transactions_total", "counter", "Transactions whose events the sink confirmed.",
            stats.transactions)
    out.one("wal2http_events_dead_lettered_total", "counter",
            "Events appended to DEAD_LETTER_FILE (ON_FAILURE=skip).", sum(stats.events_dead_lettered.values()))
    out.family("wal2http_delivery_requests_total", "counter",
               "Sink requests: ok (2xx), retried (failed, tried again), failed (failed, not retried).",
               [({"outcome": outcome}, stats.requests[outcome]) for outcome in REQUEST_OUTCOMES])
    out.one("wal2http_delivery_requests_in_flight", "gauge", "Sink requests being made now.", stats.in_flight)
    out.histogram("wal2http_delivery_duration_seconds", "Duration of each sink request.",
                  stats.request_seconds)
    out.histogram("wal2http_commit_to_delivery_seconds",
                  "From a transaction's commit to the sink's confirmation of its events.",
                  stats.commit_to_delivery_seconds)
    out.one("wal2http_confirmed_lsn", "gauge",
            "Position confirmed to PostgreSQL as flushed (the slot's confirmed_flush_lsn).", stats.confirmed_lsn)
    out.one("wal2http_server_wal_end_lsn", "gauge", "End of WAL on the server, as last seen.",
            stats.server_wal_end_lsn)
    out.one("wal2http_replication_lag_bytes", "gauge", "Server WAL end minus the confirmed position.",
            stats.lag_bytes)
    _slot_metrics(out, stats.slot)
    up = {"postgres": int(stats.current_state == "streaming"), "sink": int(stats.failing_since is None)}
    out.family("wal2http_up", "gauge", "1 when the component works: streaming from PostgreSQL; the sink "
               "not failing.", [({"component": name}, value) for name, value in up.items()])
    out.one("wal2http_reconnects_total", "counter", "Replication connections lost and retried.",
            stats.reconnects)
    out.one("wal2http_alerts_total", "counter", "Alerts raised (logged, and mailed when configured).",
            stats.alerter.alerts_total if stats.alerter else 0)
    backfill = stats.backfill
    out.one("wal2http_backfill_rows_total", "counter", "Rows a backfill sent as read events, acknowledged.",
            backfill.rows_total if backfill else 0)
    out.one("wal2http_backfill_tables_remaining", "gauge", "Tables queued or being backfilled.",
            len(backfill.queue) if backfill else 0)
    out.one("wal2http_tap_clients", "gauge", "Live tap clients connected.", stats.tap_clients)
    out.family("wal2http_tap_clients_closed_total", "counter", "Live tap clients closed by wal2http, by reason.",
               [({"reason": reason}, count) for reason, count in stats.tap_clients_closed.items()])
    out.family("wal2http_build_info", "gauge", "wal2http's version and the PostgreSQL server's.",
               [({"version": __version__, "server_version": stats.server_version or ""}, 1)])
    _process_metrics(out, stats.started_at)
    return out.text()


def _slot_metrics(out: Exposition, slot: SlotHealth | None) -> None:
    if slot is None or not slot.exists:
        return
    if slot.retained_wal_bytes is not None:
        out.one("wal2http_slot_retained_wal_bytes", "gauge",
                "WAL the slot makes PostgreSQL keep (current WAL position minus restart_lsn).",
                slot.retained_wal_bytes)
    if slot.safe_wal_size_bytes is not None:
        out.one("wal2http_slot_safe_wal_size_bytes", "gauge",
                "WAL that can still be written before the slot is at risk (max_slot_wal_keep_size).",
                slot.safe_wal_size_bytes)
    if slot.wal_status is not None:
        statuses = WAL_STATUSES if slot.wal_status in WAL_STATUSES else (*WAL_STATUSES, slot.wal_status)
        out.family("wal2http_slot_wal_status", "gauge", "The slot's wal_status: 1 for the current one.",
                   [({"status": status}, int(status == slot.wal_status)) for status in statuses])


# --- The live tap: filters and client queues ---------------------------------------------------
# Theory of operation: Stats.chunk_taken hands each chunk's events to LiveTap.publish as the
# delivery loop takes it, in stream order, only while a client is connected.  publish never waits:
# it frames each event's line once as a WebSocket text message, for every client; a client whose
# queue is empty gets at once what its socket takes without waiting (`write_now`: a non-blocking
# write, since the delivery loop may take many chunks before a writer task runs); the rest goes to
# its queue, which its writer task sends in writes of up to TAP_WRITE_EVENTS messages.  A client
# with more than TAP_QUEUE_EVENTS events
# queued and not yet written has fallen behind: it gets no new event, takes what is queued, then
# the close 1013 "too slow" (within TAP_DRAIN_TIMEOUT_S, or its socket is closed).

TAP_QUEUE_EVENTS = 1000  #: a client with more events queued and not yet written is too slow
TAP_WRITE_EVENTS = 250  #: most messages in one write to a client's socket
TAP_DRAIN_TIMEOUT_S = 30.0  #: a client found too slow has this long to take its queue and the close
TAP_CLOSE_TOO_SLOW = 1013  #: WebSocket close code "Try Again Later" (RFC 6455 registry)
TAP_MAX_MESSAGE_BYTES = 4096  #: largest message a tap client may send (it has nothing to say)


class TapRequestError(ValueError):
    """A /events query string that cannot be a filter (answered 400 with this message)."""


@dataclasses.dataclass(frozen=True)
class TapFilter:
    """What one tap client asked for: `table=schema.table` or `schema.*`, `op=insert,...`.
    Empty sets select everything."""

    tables: frozenset[str] = frozenset()  # "schema.table"
    schemas: frozenset[str] = frozenset()  # from "schema.*"
    ops: frozenset[str] = frozenset()

    @property
    def everything(self) -> bool:
        return not (self.tables or self.schemas or self.ops)

    def matches(self, event) -> bool:
        if self.ops and event_op(event) not in self.ops:
            return False
        if not (self.tables or self.schemas):
            return True
        schema, table = event_table(event)
        return schema is not None and (schema in self.schemas or f"{schema}.{table}" in self.tables)


def parse_tap_filter(query: str) -> TapFilter:
    """/events' query string -> TapFilter.  `table` and `op` are repeatable or comma-separated
    and URL-decoded; other parameters (the token) are ignored.  Raises TapRequestError."""
    tables: set[str] = set()
    schemas: set[str] = set()
    ops: set[str] = set()
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True, errors="replace"):
        items = [item.strip() for item in value.split(",") if item.strip()]
        if name == "table":
            for item in items:
                if item.endswith(".*") and len(item) > 2:
                    schemas.add(item[:-2])
                elif item.strip(".").count(".") and "*" not in item:
                    tables.add(item)
                else:
                    raise TapRequestError(f"table={item}: schema.table or schema.* expected")
        elif name == "op":
            unknown = [item for item in items if item not in EVENT_OPS]
            if unknown:
                raise TapRequestError(f"op={unknown[0]}: one of {', '.join(EVENT_OPS)} expected")
            ops.update(items)
    return TapFilter(frozenset(tables), frozenset(schemas), frozenset(ops))


_JSON_VALUE = json.JSONDecoder()


def event_table(event) -> tuple[str | None, str | None]:
    """(schema, table) of an event: read from its text, where the envelope writes them right after
    the op, without decoding the rest; from its value otherwise (and for messages: None)."""
    line = getattr(event, "line", None)
    if line is not None and line.startswith('{"id":"'):
        start = line.index('"', 7) + 8  # past '","op":"'
        position = line.index('"', start) + 1
        try:
            if line.startswith(',"schema":', position):
                schema, position = _JSON_VALUE.raw_decode(line, position + 10)
                if line.startswith(',"table":', position):
                    return schema, _JSON_VALUE.raw_decode(line, position + 9)[0]
        except ValueError:
            pass
    return event["schema"], event["table"]


_FRAME_HEAD_16 = struct.Struct(">BBH")
_FRAME_HEAD_64 = struct.Struct(">BBQ")


def encode_text_frame(text: str) -> bytes:
    """One whole WebSocket text message from a server (RFC 6455 section 5.2: FIN and opcode 1 in
    the first byte, unmasked, no extension negotiated): the same bytes as wsproto writes.  Built
    once per event and written to every client that asked for it."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return _FRAME_HEAD_16.pack(0x81, 126, size) + payload
    return _FRAME_HEAD_64.pack(0x81, 127, size) + payload


class TapClient:
    """One WebSocket client of the live tap: its filter, and what is queued for it: the frames of
    its events (the first may be the rest of a frame `write_now` wrote in part)."""

    def __init__(self, selection: TapFilter):
        self.selection = selection
        self.frames: collections.deque[bytes] = collections.deque()
        #: Set by its writer while nothing else writes to its socket: frames -> (how many it took,
        #: the bytes left of the last one taken when it went out in part), without waiting.
        self.write_now: Callable[[list[bytes]], tuple[int, bytes]] | None = None
        self.unwritten = 0  # events queued, or being written
        self.too_slow = False
        self.closing = False  # its writer is closing the WebSocket
        self.drain_scope = trio.CancelScope()  # its writer's: gets a deadline when it falls behind
        self._wakeup = trio.Event()

    def offer(self, events: list, frames: list[bytes]) -> bool:
        """Queues the frames of the events it asked for, without waiting.  True when this made it
        fall behind (more than TAP_QUEUE_EVENTS unwritten): it keeps what fits, and gets no more."""
        if self.too_slow:
            return False
        if not self.selection.everything:
            matches = self.selection.matches
            frames = [frame for event, frame in zip(events, frames) if matches(event)]
            if not frames:
                return False
        if not self.frames and self.write_now is not None:
            taken, rest = self.write_now(frames)
            frames = ([rest] if rest else []) + frames[taken:]
            if not frames:
                return False
        room = TAP_QUEUE_EVENTS - self.unwritten
        fell_behind = len(frames) > room
        self.frames.extend(frames[:room])
        self.unwritten += min(len(frames), room)
        if fell_behind:
            self.fall_behind()
        self._wakeup.set()
        return fell_behind

    def fall_behind(self) -> None:
        """No more events: what is queued, then the close, within TAP_DRAIN_TIMEOUT_S."""
        self.too_slow, self.write_now = True, None
        self.drain_scope.deadline = trio.current_time() + TAP_DRAIN_TIMEOUT_S
        self._wakeup.set()

    async def next_frames(self) -> list[bytes]:
        """The next frames to write (TAP_WRITE_EVENTS at most); none once the queue is empty and
        the client fell behind."""
        while not self.frames:
            if self.too_slow:
                return []
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        queue = self.frames
        return [queue.popleft() for _ in range(min(len(queue), TAP_WRITE_EVENTS))]

    def written(self, count: int) -> None:
        self.unwritten -= count


class LiveTap:
    """The tap's clients; `publish` is called by Stats.chunk_taken only while there are some."""

    def __init__(self, stats: Stats):
        self.stats = stats
        self.clients: list[TapClient] = []

    def publish(self, events: list) -> None:
        frames = [encode_text_frame(line) for line in event_lines(events)]
        for client in self.clients:
            try:
                fell_behind = client.offer(events, frames)
            except Exception:  # noqa: BLE001 - a fault in the tap must not stop delivery
                logger.warning("live tap: a client is closed after an error", exc_info=True)
                client.fall_behind()
                continue
            if fell_behind:
                self.stats.tap_clients_closed["too_slow"] += 1
                logger.warning("live tap: a client fell %d events behind; it gets what is queued for "
                               "it, then the close %d (too slow)", TAP_QUEUE_EVENTS, TAP_CLOSE_TOO_SLOW)


# --- The page (GET /) -------------------------------------------------------------------------------
# One self-contained document: no external script, style, font or image.  Its script and its style
# are allowed by hash in the Content-Security-Policy (computed below), nothing else is: no inline
# event handler, no eval, no other origin.  Every value from the stream goes in with textContent.

TAP_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>wal2http live tap</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 0; color: #212121; background: #fafafa; }
header { display: flex; flex-wrap: wrap; gap: .4em 1.6em; padding: .6em 1em; background: #263238; color: #b0bec5; }
header b, header output { color: #fff; }
header .bad { color: #ff8a80; }
main { padding: 0 1em 1em; }
canvas { display: block; width: 100%; height: 120px; margin: .8em 0; background: #fff; border: 1px solid #ddd; }
#controls { display: flex; flex-wrap: wrap; gap: 1em; align-items: center; margin-bottom: .5em; }
table { border-collapse: collapse; width: 100%; background: #fff; font: 13px ui-monospace, monospace; }
th, td { text-align: left; padding: .2em .6em; border-bottom: 1px solid #eee; white-space: nowrap;
         max-width: 32em; overflow: hidden; text-overflow: ellipsis; }
tbody tr { cursor: pointer; }
tbody tr:hover { background: #e3f2fd; }
tbody tr.chosen { background: #bbdefb; }
pre { background: #fff; border: 1px solid #ddd; padding: .6em; white-space: pre-wrap; word-break: break-all; }
</style>
</head>
<body>
<header>
<b>wal2http live tap</b>
<span>state <output id="state">…</output></span>
<span>lag <output id="lag">…</output></span>
<span>events/s <output id="rate">…</output></span>
<span>sink <output id="sink">…</output></span>
<span>slot <output id="slot">…</output></span>
<span>backfill <output id="backfill">…</output></span>
<span>tap <output id="tap">connecting</output></span>
</header>
<main>
<canvas id="chart" width="1200" height="120"></canvas>
<div id="controls">
<label>Table <input id="table" size="30" placeholder="public.orders, public.*"></label>
<label>Op <select id="op"><option value="">all</option><option>insert</option><option>update</option>
<option>delete</option><option>truncate</option><option>message</option><option>read</option></select></label>
<button type="button" id="pause">Pause</button>
<output id="waiting"></output>
</div>
<table>
<thead><tr><th>time (UTC)</th><th>op</th><th>table</th><th>key</th><th>id</th></tr></thead>
<tbody id="rows"></tbody>
</table>
<pre id="detail" hidden></pre>
</main>
<script>
"use strict";
const KEPT = 500;     // rows kept (and events held while paused)
const SECONDS = 300;  // the chart's span
const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => token ? path + "?token=" + encodeURIComponent(token) : path;
let shown = [];       // {event, line, row}, newest first
let waiting = [];     // received, not shown yet (all of them while paused), oldest first
let paused = false;
const perSecond = new Array(SECONDS).fill(0);
let second = Math.floor(Date.now() / 1000);

function say(id, value, bad) {
  $(id).textContent = value;
  $(id).className = bad ? "bad" : "";
}

function tick() {
  const now = Math.floor(Date.now() / 1000);
  for (let n = Math.min(now - second, SECONDS); n > 0; n--) { perSecond.shift(); perSecond.push(0); }
  second = now;
}

function receive(line) {
  const event = JSON.parse(line);
  tick();
  perSecond[SECONDS - 1]++;
  waiting.push({event, line, at: new Date().toISOString()});
  if (waiting.length > KEPT) waiting.splice(0, waiting.length - KEPT);
}

function selected() {
  const op = $("op").value;
  const names = $("table").value.split(",").map((name) => name.trim()).filter(Boolean);
  const tableMatches = (e) => e.table != null && names.some((name) => name === e.schema + "." + e.table
    || (name.endsWith(".*") && name.slice(0, -2) === e.schema));
  return (e) => (!op || e.op === op) && (!names.length || tableMatches(e));
}

function refilter() {
  const keep = selected();
  for (const item of shown) item.row.hidden = !keep(item.event);
}

function cell(row, value) {
  const td = row.insertCell();
  td.textContent = value;
  td.title = value;
}

function choose(item) {
  for (const chosen of document.querySelectorAll("tr.chosen")) chosen.classList.remove("chosen");
  item.row.classList.add("chosen");
  $("detail").textContent = item.line;
  $("detail").hidden = false;
}

function makeRow(item) {
  const e = item.event, row = document.createElement("tr");
  cell(row, (e.commit_time || item.at).slice(11, 23));
  cell(row, e.op);
  cell(row, e.table == null ? "" : e.schema + "." + e.table);
  cell(row, e.key == null ? "" : JSON.stringify(e.key));
  cell(row, e.id);
  row.addEventListener("click", () => choose(item));
  return row;
}

function show() {
  $("waiting").textContent = paused && waiting.length ? waiting.length + " waiting" : "";
  if (paused || !waiting.length) return;
  const keep = selected(), rows = $("rows");
  for (const item of waiting) {
    item.row = makeRow(item);
    item.row.hidden = !keep(item.event);
    rows.prepend(item.row);
    shown.unshift(item);
  }
  waiting = [];
  while (shown.length > KEPT) shown.pop().row.remove();
}

function draw() {
  tick();
  const canvas = $("chart"), g = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  const top = Math.max(10, ...perSecond);
  const y = (n) => h - n / top * (h - 18);
  g.clearRect(0, 0, w, h);
  g.beginPath();
  g.moveTo(0, h);
  perSecond.forEach((n, i) => g.lineTo(i * w / (SECONDS - 1), y(n)));
  g.lineTo(w, h);
  g.closePath();
  g.fillStyle = "#90caf9";
  g.fill();
  g.strokeStyle = "#1e88e5";
  g.stroke();
  g.fillStyle = "#546e7a";
  g.font = "12px system-ui, sans-serif";
  g.fillText("events/s over the last " + SECONDS / 60 + " minutes (scale " + top + ")", 6, 13);
}

function connect() {
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + withToken("/events"));
  ws.onopen = () => say("tap", "connected");
  ws.onmessage = (message) => receive(message.data);
  ws.onclose = (close) => {
    say("tap", (close.code === 1013 ? "too slow" : "closed") + ", reconnecting", true);
    setTimeout(connect, 2000);
  };
}

function backfill(b) {
  if (!b) return "none";
  if (b.stopped) return "stopped: " + b.stopped;
  const more = b.queued.length + b.requested.length ? ", " + (b.queued.length + b.requested.length) + " more queued" : "";
  if (b.table) {
    return b.table + ": " + b.rows + (b.estimated_rows != null ? " of about " + b.estimated_rows : "") + " rows" +
      (b.eta_seconds != null ? ", " + b.eta_seconds + " s left" : "") + more;
  }
  return (more ? "starting" + more : "idle") + ", " + b.rows_total + " rows sent";
}

function size(bytes) {
  return bytes == null ? "?" : bytes < 1048576 ? (bytes / 1024).toFixed(0) + " kB" : (bytes / 1048576).toFixed(1) + " MB";
}

async function poll() {
  try {
    const response = await fetch(withToken("/status"), {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const s = await response.json(), slot = s.slot_health;
    say("state", s.state, s.state !== "streaming");
    say("lag", s.lag_seconds.toFixed(1) + " s, " + size(s.lag_bytes), s.lag_seconds > 60);
    say("rate", s.events_per_second.toFixed(1));
    say("sink", s.failing_since ? "failing since " + s.failing_since + ": " + s.last_error : "ok", !!s.failing_since);
    say("slot", slot.wal_status == null ? "not read yet" : slot.wal_status + ", retains " + size(slot.retained_wal_bytes),
        slot.wal_status === "unreserved" || slot.wal_status === "lost");
    say("backfill", backfill(s.backfill), !!(s.backfill && (s.backfill.stopped || Object.keys(s.backfill.refused).length)));
  } catch (error) {
    say("state", "no answer (" + error.message + ")", true);
  }
  setTimeout(poll, 2000);
}

$("table").addEventListener("input", refilter);
$("op").addEventListener("change", refilter);
$("pause").addEventListener("click", () => {
  paused = !paused;
  $("pause").textContent = paused ? "Resume" : "Pause";
  show();
});
setInterval(show, 250);
setInterval(draw, 1000);
draw();
connect();
poll();
</script>
</body>
</html>
"""


def _csp_hash(page: str, element: str) -> str:
    """'sha256-...' of the text of the page's one <script> or <style>, as CSP hashes it."""
    text = page.split(f"<{element}>", 1)[1].split(f"</{element}>", 1)[0]
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: The page's script and style by hash, WebSockets and fetches to this origin only, nothing else.
TAP_PAGE_CSP = (f"default-src 'none'; script-src {_csp_hash(TAP_PAGE, 'script')}; "
                f"style-src {_csp_hash(TAP_PAGE, 'style')}; connect-src 'self'; img-src data:; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# --- The HTTP server (h11) ------------------------------------------------------------------------
# Theory of operation: one task per connection (at most OPS_MAX_CONNECTIONS; more are closed at
# once), one h11.Connection per socket, requests answered one after the other on a kept-alive
# connection.  Each request head must arrive within OPS_HEAD_TIMEOUT_S and fit OPS_MAX_HEAD_BYTES;
# requests carry no body.  A client that breaks any rule gets a 4xx and a closed socket.

OPS_READ_BYTES = 4096
_BAD_REQUEST = (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s")


@dataclasses.dataclass(frozen=True)
class OpsAnswer:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _json_answer(status: int, document: dict) -> OpsAnswer:
    return OpsAnswer(status, "application/json", json.dumps(document).encode() + b"\n")


def answer_health(stats: Stats) -> OpsAnswer:
    return _json_answer(200, {"status": "ok"})


def answer_ready(stats: Stats) -> OpsAnswer:
    ready, document = build_readiness(stats)
    return _json_answer(200 if ready else 503, document)


def answer_status(stats: Stats) -> OpsAnswer:
    return _json_answer(200, build_status(stats, time.time(), time.monotonic()))


def answer_metrics(stats: Stats) -> OpsAnswer:
    return OpsAnswer(200, "text/plain; version=0.0.4; charset=utf-8",
                     build_metrics_text(stats).encode())


_TAP_PAGE_BYTES = TAP_PAGE.encode()


def answer_page(stats: Stats) -> OpsAnswer:
    return OpsAnswer(200, "text/html; charset=utf-8", _TAP_PAGE_BYTES,
                     (("Content-Security-Policy", TAP_PAGE_CSP), ("Referrer-Policy", "no-referrer"),
                      ("X-Frame-Options", "DENY")))


def answer_backfill(stats: Stats, body: bytes) -> OpsAnswer:
    """POST /backfill {"tables": ["schema.table", "schema.*", "*", ...]}: 202 once queued (the
    tables are resolved, or refused, by the backfill task: see /status)."""
    try:
        tables = json.loads(body)["tables"]
        if not isinstance(tables, list) or not tables or not all(isinstance(t, str) for t in tables):
            raise TypeError
        patterns = parse_backfill_tables(",".join(tables), "tables")
    except (ValueError, KeyError, TypeError):  # ConfigError is not one of them
        return OpsAnswer(400, "text/plain", b'expected {"tables": ["schema.table", "schema.*" or "*", ...]}\n')
    except ConfigError as exc:
        return OpsAnswer(400, "text/plain", f"{exc}\n".encode())
    if stats.backfill is None:  # Stats not given to run()
        return OpsAnswer(503, "text/plain", b"no backfill in this process\n")
    stats.backfill.request(patterns, "POST /backfill")
    return _json_answer(202, {"status": "accepted", "tables": list(patterns)})


def answer_events(stats: Stats) -> OpsAnswer:
    """GET /events without a WebSocket handshake."""
    return OpsAnswer(426, "text/plain", b"GET /events is a WebSocket (see the README, \"Live tap\")\n",
                     (("Upgrade", "websocket"),))


@dataclasses.dataclass(frozen=True)
class Route:
    """One path of the port.  `token`: OPS_TOKEN required (when set); `row_data`: shows row data,
    so it is off (404) on an address beyond loopback without OPS_TOKEN; `websocket`: a WebSocket
    handshake there goes to the live tap (`answer` answers any other request)."""

    answer: Callable[[Stats], OpsAnswer] | None
    token: bool = True
    row_data: bool = False
    websocket: bool = False
    post: Callable[[Stats, bytes], OpsAnswer] | None = None  #: POST with a body; OPS_TOKEN must be set


#: GET routes.  A WebSocket handshake on /events takes over its connection: the request h11
#: parsed, and what followed it, go to trio-websocket (see OpsServer.serve_tap).
OPS_ROUTES: dict[str, Route] = {
    "/health": Route(answer_health, token=False),
    "/ready": Route(answer_ready, token=False),
    "/status": Route(answer_status, row_data=True),
    "/metrics": Route(answer_metrics),
    "/": Route(answer_page, row_data=True),
    "/events": Route(answer_events, row_data=True, websocket=True),
    "/backfill": Route(None, row_data=True, post=answer_backfill),
}


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return value
    return None


def is_websocket_request(request: h11.Request) -> bool:
    """Whether the request asks for a WebSocket (RFC 6455 section 4.1: GET, Upgrade: websocket)."""
    upgrade = _header(request, b"upgrade")
    return request.method == b"GET" and upgrade is not None and upgrade.strip().lower() == b"websocket"


def refuse_tap_handshake(request: h11.Request, clients: int, max_clients: int) -> OpsAnswer | TapFilter:
    """The live tap's rules for a WebSocket handshake on /events (token checked before): the
    client's filter, or the refusal.  A page on another site must not read the stream through a
    browser on the operator's machine, so an `Origin` other than http:// + the request's Host is
    403 (cross-site WebSocket hijacking); at most TAP_MAX_CLIENTS clients, more are 503."""
    origin, host = _header(request, b"origin"), _header(request, b"host") or b""
    if origin is not None and origin.strip().lower() != b"http://" + host.strip().lower():
        return OpsAnswer(403, "text/plain", b"a WebSocket from another origin is refused\n")
    if _header(request, b"sec-websocket-key") is None or _header(request, b"sec-websocket-version") != b"13":
        return OpsAnswer(400, "text/plain", b"a WebSocket handshake needs Sec-WebSocket-Key and version 13\n",
                         (("Sec-WebSocket-Version", "13"),))
    try:
        selection = parse_tap_filter(request.target.partition(b"?")[2].decode("utf-8", "replace"))
    except TapRequestError as exc:
        return OpsAnswer(400, "text/plain", f"{exc}\n".encode())
    if clients >= max_clients:
        return OpsAnswer(503, "text/plain", b"the live tap has TAP_MAX_CLIENTS clients already\n")
    return selection


def is_loopback_host_header(host: bytes) -> bool:
    """Whether a Host header names this machine (a loopback address or localhost, any port).
    Without OPS_TOKEN, row data goes only to such requests: a web page elsewhere whose name was
    made to resolve to 127.0.0.1 (DNS rebinding) sends its own name, and gets nothing."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        name, bracket, _ = text[1:].partition("]")
        return bool(bracket) and is_loopback_host(name)
    return is_loopback_host(text.rpartition(":")[0] if ":" in text else text)


def presented_token(request: h11.Request) -> bytes | None:
    """The token of `Authorization: Bearer <token>`, else of `?token=<token>`."""
    authorization = _header(request, b"authorization")
    if authorization is not None and authorization[:7].lower() == b"bearer ":
        return authorization[7:].strip()
    _, _, query = request.target.partition(b"?")
    for name, value in urllib.parse.parse_qsl(query.decode("ascii", "replace"), keep_blank_values=True,
                                              errors="replace"):
        if name == "token":
            return value.encode("utf-8")
    return None


class OpsServer:
    """Answers the requests of the operations port (see the theory of operation above)."""

    def __init__(self, config, stats: Stats, routes: Mapping[str, Route] = OPS_ROUTES):
        self.stats = stats
        self.routes = routes
        self.token = config.ops_token.encode() if config.ops_token else None
        self.row_data = self.token is not None or is_loopback_host(config.ops_addr[0])
        self.tap_max_clients = config.tap_max_clients
        self.connections = 0

    def route(self, request: h11.Request, body: bytes = b"") -> OpsAnswer | TapFilter:
        """The answer to one request, or the filter of a tap client to serve: pure but for
        reading Stats (and POST /backfill's request)."""
        route = self._route_of(request)
        if route is None or (route.row_data and not self.row_data):
            return OpsAnswer(404, "text/plain", b"not found\n")
        if route.post is not None and self.token is None:
            return OpsAnswer(403, "text/plain", b"POST /backfill needs OPS_TOKEN: set it to ask for "
                             b"backfills over the operations port\n")
        if route.token and self.token is not None:
            given = presented_token(request)
            if given is None or not hmac.compare_digest(given, self.token):
                return OpsAnswer(401, "text/plain", b"a valid OPS_TOKEN is required\n",
                                 (("WWW-Authenticate", 'Bearer realm="wal2http"'),))
        elif route.row_data and not is_loopback_host_header(_header(request, b"host") or b""):
            return OpsAnswer(403, "text/plain", b"without OPS_TOKEN, row data is served to this machine's "
                             b"own names only (Host: 127.0.0.1, [::1] or localhost)\n")
        if route.post is not None:
            if request.method != b"POST":
                return OpsAnswer(405, "text/plain", b"only POST\n", (("Allow", "POST"),))
            return route.post(self.stats, body)
        if request.method not in (b"GET", b"HEAD"):
            return OpsAnswer(405, "text/plain", b"only GET\n", (("Allow", "GET, HEAD"),))
        if route.websocket and is_websocket_request(request):
            return refuse_tap_handshake(request, self.stats.tap_clients, self.tap_max_clients)
        return route.answer(self.stats)

    def _route_of(self, request: h11.Request) -> Route | None:
        return self.routes.get(request.target.partition(b"?")[0].decode("latin-1"))

    async def handle(self, stream: trio.abc.Stream) -> None:
        """One connection; whatever happens, only this socket is closed."""
        if self.connections >= OPS_MAX_CONNECTIONS:
            await _close_quietly(stream)
            return
        self.connections += 1
        try:
            await self._serve(stream)
        except (*_IO_ERRORS, h11.LocalProtocolError):
            pass
        except Exception:  # noqa: BLE001 - a bug answering one client must not end replication
            logger.warning("operations port: a connection failed", exc_info=True)
        finally:
            self.connections -= 1
            await _close_quietly(stream)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=OPS_MAX_HEAD_BYTES)
        while True:
            request = None
            with trio.move_on_after(OPS_HEAD_TIMEOUT_S):
                try:
                    request = await self._next_request(stream, conn)
                except h11.RemoteProtocolError as exc:  # garbage, or a head over the limit (431)
                    await self._refuse(stream, exc.error_status_hint, "bad request")
                    return
            if request is None:
                return  # closed, or no whole head within OPS_HEAD_TIMEOUT_S
            route = self._route_of(request)
            if route is not None and route.post is not None and request.method == b"POST":
                body = await self._read_body(stream, conn, request)
                if body is None:
                    return
            elif (_header(request, b"content-length") not in (None, b"0")
                    or _header(request, b"transfer-encoding") is not None):
                await self._refuse(stream, 413, "requests take no body")
                return
            else:
                body = b""
                if not isinstance(conn.next_event(), h11.EndOfMessage):
                    return
            answer = self.route(request, body)
            if isinstance(answer, TapFilter):
                await self.serve_tap(stream, request, conn.trailing_data[0], answer)
                return
            with trio.move_on_after(OPS_SEND_TIMEOUT_S) as scope:
                await self._send(stream, conn, answer, head_only=request.method == b"HEAD")
            if scope.cancelled_caught or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    @staticmethod
    async def _next_request(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None:
        """The next request head, or None when the client closed the connection.  h11 bounds only
        what it buffers at once, so the head's size is counted here."""
        received = 0
        while True:
            event = conn.next_event()
            if received > OPS_MAX_HEAD_BYTES:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            if isinstance(event, h11.Request):
                return event
            if event is not h11.NEED_DATA:  # ConnectionClosed
                return None
            data = await stream.receive_some(OPS_READ_BYTES)
            received += len(data)
            conn.receive_data(data)

    async def _read_body(self, stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request) -> bytes | None:
        """A POST's body (Content-Length, at most OPS_MAX_BODY_BYTES, within OPS_HEAD_TIMEOUT_S);
        None when refused or cut off (then the connection ends)."""
        length = _header(request, b"content-length")
        if length is None or not length.isdigit() or int(length) > OPS_MAX_BODY_BYTES:
            await self._refuse(stream, 413 if length and length.isdigit() else 411 if length is None else 400,
                               f"a body of at most {OPS_MAX_BODY_BYTES} bytes, with Content-Length")
            return None
        body = b""
        with trio.move_on_after(OPS_HEAD_TIMEOUT_S):
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return body
                elif event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(OPS_READ_BYTES))
                else:
                    return None
        return None

    @staticmethod
    async def _send(stream: trio.abc.Stream, conn: h11.Connection, answer: OpsAnswer,
                    head_only: bool) -> None:
        headers = [("Content-Type", answer.content_type), ("Content-Length", str(len(answer.body))),
                   ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), *answer.headers]
        data = conn.send(h11.Response(status_code=answer.status, headers=headers))
        if not head_only:  # HEAD: h11 frames the answer without a body
            data += conn.send(h11.Data(data=answer.body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)

    @staticmethod
    async def _refuse(stream: trio.abc.Stream, status: int, reason: str) -> None:
        status = status if 400 <= status < 500 else 400
        body = (reason + "\n").encode()
        phrase = {400: b"Bad Request", 408: b"Request Timeout", 411: b"Length Required", 413: b"Content Too Large",
                  431: b"Request Header Fields Too Large"}.get(status, b"Bad Request")
        with trio.move_on_after(1):
            await stream.send_all(_BAD_REQUEST % (status, phrase, len(body), body))

    async def serve_tap(self, stream: trio.abc.Stream, request: h11.Request, trailing: bytes,
                        selection: TapFilter) -> None:
        """One live tap client, from its handshake (already checked) to its close.  The client
        joins the tap before anything is awaited, so TAP_MAX_CLIENTS holds."""
        import trio_websocket  # noqa: PLC0415 - loaded by the first tap client: others never pay for it
        client = TapClient(selection)
        tap = self.stats.tap
        tap.clients.append(client)
        try:
            async with trio.open_nursery() as nursery:
                with contextlib.suppress(trio_websocket.ConnectionClosed):  # the client went away
                    websocket = await accept_websocket(nursery, stream, request, trailing)
                    if websocket is not None:
                        if isinstance(stream, trio.SocketStream):
                            client.write_now = direct_writer(websocket, stream.socket)
                        nursery.start_soon(_read_tap_client, websocket, client, nursery.cancel_scope)
                        await write_tap_client(websocket, client)
                nursery.cancel_scope.cancel()
        finally:
            tap.clients.remove(client)


class _ReplayStream(trio.abc.Stream):
    """A stream that gives back bytes already read before reading its own: trio-websocket reads
    the handshake that h11 has parsed already, from the start."""

    def __init__(self, stream: trio.abc.Stream, replay: bytes):
        self.stream = stream
        self.replay = replay

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self.replay:
            return await self.stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self.replay) if max_bytes is None else max_bytes
        data, self.replay = self.replay[:size], self.replay[size:]
        return data

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


def encode_request_head(request: h11.Request) -> bytes:
    """A request head as bytes again (header names as the client wrote them)."""
    lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
    lines += [name + b": " + value for name, value in request.headers.raw_items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def accept_websocket(nursery: trio.Nursery, stream: trio.abc.Stream, request: h11.Request,
                           trailing: bytes):
    """trio-websocket's server side on a connection whose handshake h11 has read; None when the
    handshake does not complete within OPS_HEAD_TIMEOUT_S."""
    import trio_websocket  # noqa: PLC0415 - see serve_tap
    replay = _ReplayStream(stream, encode_request_head(request) + trailing)
    with trio.move_on_after(OPS_HEAD_TIMEOUT_S):
        handshake = await trio_websocket.wrap_server_stream(
            nursery, replay, message_queue_size=1, max_message_size=TAP_MAX_MESSAGE_BYTES)
        return await handshake.accept()
    return None


async def write_tap_client(websocket, client: TapClient) -> None:
    """Sends the client its queued frames until it falls behind; then what was queued for it and
    the close 1013, within TAP_DRAIN_TIMEOUT_S (else its socket is closed)."""
    with client.drain_scope:
        try:
            while frames := await client.next_frames():
                await send_frames(websocket, frames)
                client.written(len(frames))
        finally:
            client.write_now = None
        client.closing = True
        await websocket.aclose(TAP_CLOSE_TOO_SLOW, "too slow")


async def send_frames(websocket, frames: list[bytes]) -> None:
    """Whole text messages (encode_text_frame) in one write.  trio-websocket's send_message makes
    one write per message; this does what it does (writes under the connection's stream lock, a
    broken stream is ConnectionClosed) once for all of them."""
    import trio_websocket  # noqa: PLC0415 - see serve_tap
    if websocket.closed:
        raise trio_websocket.ConnectionClosed(websocket.closed)
    async with websocket._stream_lock:
        try:
            await websocket._stream.send_all(b"".join(frames))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise trio_websocket.ConnectionClosed(websocket.closed) from None


def direct_writer(websocket, sock) -> Callable[[list[bytes]], tuple[int, bytes]]:
    """TapClient.write_now for a WebSocket on the Trio socket `sock` (non-blocking, as Trio keeps
    it): writes what the socket takes now, unless the connection is busy writing or closed.  The
    descriptor is read at each call: a closed socket has none (its number may be another's now)."""

    def write_now(frames: list[bytes]) -> tuple[int, bytes]:
        fd = sock.fileno()
        if fd < 0 or websocket.closed or websocket._stream_lock.locked():
            return 0, b""
        try:
            sent = os.write(fd, b"".join(frames))
        except OSError:  # full (BlockingIOError), or broken: the writer task finds out
            return 0, b""
        return split_written(frames, sent)

    return write_now


def split_written(frames: list[bytes], sent: int) -> tuple[int, bytes]:
    """After a write of `sent` bytes of the joined frames: how many frames it took (wholly or in
    part), and the bytes left of the last one when it went out in part."""
    for index, frame in enumerate(frames):
        if sent < len(frame):
            return (index + 1, frame[sent:]) if sent else (index, b"")
        sent -= len(frame)
    return len(frames), b""


async def _read_tap_client(websocket, client: TapClient, scope: trio.CancelScope) -> None:
    """Reads what the client sends (trio-websocket answers pings; messages are dropped) until it
    closes, then ends its tap, unless wal2http is closing it (then the close is under way)."""
    import trio_websocket  # noqa: PLC0415 - see serve_tap
    with contextlib.suppress(trio_websocket.ConnectionClosed):
        while True:
            await websocket.get_message()
    if not client.closing:
        scope.cancel()


async def run_ops_server(config, stats: Stats, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serves OPS_ADDR until cancelled (returns at once when it is unset).  A port that cannot be
    bound is a ConfigError naming OPS_ADDR, raised before task_status.started()."""
    if config.ops_addr is None:
        task_status.started()
        return
    host, port = config.ops_addr
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
    except OSError as exc:
        raise ConfigError(f"OPS_ADDR: cannot listen on {shown}: {exc.strerror or exc}") from None
    server = OpsServer(config, stats)
    logger.info("operations port listening on %s (%s)", shown,
                "token required" if server.token else "no token" if server.row_data
                else "no token: /health, /ready and /metrics only")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_rate_sampler, stats)
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started()


async def _run_rate_sampler(stats: Stats) -> None:
    while True:
        stats.sample_rate(time.monotonic())
        await trio.sleep(OPS_RATE_SAMPLE_S)


# --- The slot guard -------------------------------------------------------------------------------

#: The slot and the server's WAL position in one query that works on every version: to_jsonb of
#: the row has whichever columns this server's pg_replication_slots has (wal_status and
#: safe_wal_size 13+, conflicting 16+, invalidation_reason 17+).  On a standby (logical decoding
#: there, 16+) the position is the last WAL replayed.
SLOT_HEALTH_SQL = """SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
            ELSE pg_catalog.pg_current_wal_lsn() END, pg_catalog.to_jsonb(s)
FROM (SELECT) AS one LEFT JOIN pg_catalog.pg_replication_slots AS s ON s.slot_name = {slot}"""


def decode_slot_health(current_lsn: str | None, row_json: str | None) -> SlotHealth:
    """One SLOT_HEALTH_SQL row -> SlotHealth (pure)."""
    current = parse_lsn(current_lsn) if current_lsn else None
    row = json.loads(row_json) if row_json else None
    if not row or row.get("slot_name") is None:
        return SlotHealth(exists=False, current_wal_lsn=current)
    restart = parse_lsn(row["restart_lsn"]) if row.get("restart_lsn") else None
    confirmed = parse_lsn(row["confirmed_flush_lsn"]) if row.get("confirmed_flush_lsn") else None
    safe = row.get("safe_wal_size")
    return SlotHealth(
        exists=True, wal_status=row.get("wal_status"),
        retained_wal_bytes=max(0, current - restart) if current is not None and restart is not None else None,
        safe_wal_size_bytes=int(safe) if safe is not None else None,
        confirmed_flush_lsn=confirmed, current_wal_lsn=current,
        invalidation_reason=row.get("invalidation_reason"), conflicting=row.get("conflicting") is True)


async def read_slot_health(conn: PgConnection, slot_name: str) -> SlotHealth:
    try:
        (current, row), = await conn.simple_query(SLOT_HEALTH_SQL.format(slot=quote_literal(slot_name)))
    except ServerError as exc:
        raise classify_server_error(exc, f"reading replication slot {slot_name!r}") from None
    return decode_slot_health(current, row)


class SlotInvalidated(PreconditionError):
    """PostgreSQL invalidated the slot: its changes since the last confirmed position are gone."""


def build_slot_lost_message(slot_name: str, why: str, confirmed_lsn: int | None) -> str:
    """What happened, what is lost, and the SQL to go on: one line (exit 4, alert)."""
    since = f" {format_lsn(confirmed_lsn)}" if confirmed_lsn else ""
    literal = quote_literal(slot_name)
    return (f"replication slot {slot_name!r} (SLOT_NAME) was invalidated by PostgreSQL ({why}): the WAL "
            f"it needed was removed, so the changes committed after its last confirmed position{since} "
            f"are lost and cannot be streamed; wal2http never re-creates the slot by itself. To go on, "
            f"drop and re-create the slot: SELECT pg_drop_replication_slot({literal}); SELECT "
            f"pg_create_logical_replication_slot({literal}, 'pgoutput'); then backfill the tables (a "
            f"backfill re-sends their current rows) and start wal2http again")


def _describe_lost(health: SlotHealth) -> str:
    parts = [f"wal_status {health.wal_status}"] if health.wal_status else []
    if health.invalidation_reason:
        parts.append(f"invalidation_reason {health.invalidation_reason}")
    if health.conflicting:
        parts.append("conflicting with recovery")
    return ", ".join(parts) or "lost"


def slot_lost(config, alerter: Alerter, why: str, confirmed_lsn: int | None) -> SlotInvalidated:
    """Alerts (the mail goes out before the process exits: `run` drains the alerter) and returns
    the exit-4 error."""
    message = build_slot_lost_message(config.slot_name, why, confirmed_lsn)
    alerter.alert(SLOT_ALERT_LOST, f"slot {config.slot_name} was invalidated by PostgreSQL (lost)",
                  f"{message}.\n\nwal2http has stopped (exit code 4).\n")
    return SlotInvalidated(message)


def _megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f}"


class SlotGuard:
    """Alerts on one slot reading: retained WAL over SLOT_MAX_RETAINED_MB, wal_status unreserved
    (and "recovered" when they end); a lost slot is SlotInvalidated."""

    def __init__(self, config, alerter: Alerter, now: Callable[[], float] = time.monotonic):
        self.config = config
        self.alerter = alerter
        self._now = now
        self._alerted_at: dict[str, float] = {}  # key -> when its alert was last raised

    def _alert(self, key: str, subject: str, body: str) -> None:
        """Raised when the condition begins, then again every ALERT_REPEAT_S while it lasts (not
        at every check: the log would repeat it every SLOT_CHECK_INTERVAL_SECS)."""
        last = self._alerted_at.get(key)
        if last is None or self._now() - last >= ALERT_REPEAT_S:
            self._alerted_at[key] = self._now()
            self.alerter.alert(key, subject, body)

    def _recovered(self, key: str, subject: str, body: str) -> None:
        if self._alerted_at.pop(key, None) is not None:
            self.alerter.recovered(key, subject, body)

    def check(self, health: SlotHealth) -> None:
        if not health.exists:
            return
        if health.lost:
            raise slot_lost(self.config, self.alerter, _describe_lost(health), health.confirmed_flush_lsn)
        slot, limit = self.config.slot_name, self.config.slot_max_retained_mb
        retained = health.retained_wal_bytes
        if retained is not None and retained > limit * 2**20:
            self._alert(
                SLOT_ALERT_RETAINED, f"slot {slot} retains {_megabytes(retained)} MB of WAL",
                f"Replication slot {slot} retains {_megabytes(retained)} MB of WAL, more than "
                f"SLOT_MAX_RETAINED_MB={limit}: PostgreSQL keeps every WAL file the slot still needs, "
                f"so its disk fills while wal2http does not confirm events (is the sink stalled?).\n")
        elif retained is not None:
            self._recovered(
                SLOT_ALERT_RETAINED, f"slot {slot} recovered: retains {_megabytes(retained)} MB of WAL",
                f"Replication slot {slot} has recovered: it retains {_megabytes(retained)} MB of WAL, "
                f"no more than SLOT_MAX_RETAINED_MB={limit}.\n")
        if health.wal_status == "unreserved":
            self._alert(
                SLOT_ALERT_UNRESERVED, f"slot {slot} is unreserved: PostgreSQL may soon remove WAL it needs",
                f"Replication slot {slot} has wal_status unreserved: it retains more WAL than "
                f"max_slot_wal_keep_size allows, and PostgreSQL may remove WAL it needs at the next "
                f"checkpoint, which invalidates the slot (its changes would be lost).\n")
        else:
            self._recovered(
                SLOT_ALERT_UNRESERVED, f"slot {slot} recovered: wal_status {health.wal_status}",
                f"Replication slot {slot} has recovered: wal_status is {health.wal_status} again.\n")


async def run_slot_guard(config, stats: Stats, alerter: Alerter) -> None:
    """Reads the slot every SLOT_CHECK_INTERVAL_SECS over its own ordinary connection (opened for
    each check).  A check that fails is logged once and retried; only a lost slot ends it
    (SlotInvalidated)."""
    guard, failing = SlotGuard(config, alerter), False
    timeout_s = config.conninfo.connect_timeout_s + DEFAULT_QUERY_TIMEOUT_S
    while True:
        try:
            with trio.fail_after(timeout_s):
                async with open_pg_connection(config.conninfo, replication=False) as conn:
                    health = await read_slot_health(conn, config.slot_name)
                    stats.server_version = conn.parameters.get("server_version")
        except Exception as exc:  # noqa: BLE001 - a reading that fails is never fatal
            if not failing:
                logger.warning("slot guard: cannot read replication slot %r: %s; retrying every %g s",
                               config.slot_name, _describe_check_failure(exc), config.slot_check_interval_s)
            failing = True
        else:
            if failing:
                logger.info("slot guard: reading replication slot %r works again", config.slot_name)
            failing = False
            stats.slot = health
            guard.check(health)
        await trio.sleep(config.slot_check_interval_s)


def _describe_check_failure(error: Exception) -> str:
    if isinstance(error, trio.TooSlowError):
        return "no answer in time"
    if isinstance(error, Wal2HttpError):
        return str(error)
    return f"unexpected {type(error).__name__}: {error}"


def is_slot_invalidated_error(error: BaseException) -> bool:
    return isinstance(error, PreconditionError) and any(text in str(error) for text in SLOT_INVALIDATED_TEXTS)


def describe_invalidation(error: PreconditionError) -> str:
    """Why, as the server's DETAIL says it (classify_server_error puts it in parentheses)."""
    message = str(error)
    detail = next(message.split(text, 1)[1] for text in SLOT_INVALIDATED_TEXTS if text in message)
    if "(" in detail and ")" in detail:
        return detail.split("(", 1)[1].rsplit(")", 1)[0].strip().rstrip(".")
    return "lost"


async def run_guarded_replication(config, sink, stop: trio.Event, task_status, alerter: Alerter,
                                  stats: Stats) -> AckTracker:
    """run_replication beside the slot guard.  A slot PostgreSQL invalidated, seen by the guard or
    by the replication connection (SLOT_INVALIDATED_TEXTS), ends both with SlotInvalidated (exit 4)
    and its alert."""
    async with trio.open_nursery() as nursery:
        if config.conninfo is not None:
            nursery.start_soon(run_slot_guard, config, stats, alerter)
        try:
            ack = await run_replication(config, sink, stop, task_status, alerter, stats=stats,
                                        backfill=stats.backfill)
        except PreconditionError as exc:
            if not is_slot_invalidated_error(exc) or isinstance(exc, SlotInvalidated):
                raise
            raise slot_lost(config, alerter, describe_invalidation(exc), stats.confirmed_lsn or None) from None
        nursery.cancel_scope.cancel()
    return ack


async def check_slot_health(conn: PgConnection, config) -> str:
    """--check's `ok slot` detail: wal_status and retained WAL; a lost slot fails."""
    health = await read_slot_health(conn, config.slot_name)
    if health.lost:
        raise PreconditionError(build_slot_lost_message(config.slot_name, _describe_lost(health),
                                                        health.confirmed_flush_lsn))
    parts = [f"wal_status {health.wal_status}"] if health.wal_status else []
    if health.retained_wal_bytes is not None:
        parts.append(f"retains {_megabytes(health.retained_wal_bytes)} MB of WAL")
    return ", ".join(parts)


# =====================================================================================================
# 20. Configuration
# =====================================================================================================
# Pure: environment mapping and argv in, a frozen `Config` (or a one-line ConfigError naming the
# variable) out.  No socket is opened here.  Every setting is one entry of SETTINGS, which drives
# --help, the flags, the environment, Config's fields, describe_config() and config_secrets(); a
# few plain functions hold the rules between settings (choose_sink, check_sink_settings,
# check_retry_delays, smtp_port_and_tls).  The rule for secrets: no error message, log line or
# repr() built here contains the database password, HOOK0_API_TOKEN, EMAIL_SMTP_PASSWORD,
# HTTP_SIGNING_SECRET, an HTTP_HEADERS value or a URL's credentials; the database is only ever
# shown through ConnInfo.describe().

DEFAULT_PG_HOST = "localhost"
DEFAULT_PG_PORT = 5432
DEFAULT_PG_USER = "postgres"  #: when the OS user cannot be determined
DEFAULT_SSLMODE = "prefer"
DEFAULT_CONNECT_TIMEOUT_S = 10.0  #: used when connect_timeout is unset or 0: never wait forever
MIN_CONNECT_TIMEOUT_S = 2.0  #: libpq raises 1 s to 2 s too: shorter timeouts are unreliable
DEFAULT_APPLICATION_NAME = "wal2http"
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
URL_SCHEMES = ("postgresql://", "postgres://")

#: libpq keywords DATABASE_URL may set ("Parameter Key Words" in the libpq docs), each with the
#: environment variable that fills it when the string leaves it out ("Environment Variables").
CONNINFO_KEYWORDS = {
    "host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
    "dbname": "PGDATABASE", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME", "fallback_application_name": None,
    "target_session_attrs": "PGTARGETSESSIONATTRS", "load_balance_hosts": "PGLOADBALANCEHOSTS",
}
#: target_session_attrs as libpq defines them: which server of several hosts will do.
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
LOAD_BALANCE_HOSTS = ("disable", "random")

#: libpq keywords accepted and ignored: TCP tuning and client-side choices wal2http makes its own way
#: (it always speaks UTF-8, never uses GSSAPI or channel binding).  None: any value is ignored; a
#: set: only these values are (a value that asks for a feature wal2http lacks is an error).
IGNORED_CONNINFO_KEYWORDS: dict[str, frozenset[str] | None] = {
    "keepalives": None, "keepalives_idle": None, "keepalives_interval": None,
    "keepalives_count": None, "tcp_user_timeout": None, "client_encoding": None,
    "sslcompression": None,
    "sslsni": None, "krbsrvname": None, "gsslib": None,
    "gssencmode": frozenset({"disable", "allow", "prefer"}),
    "channel_binding": frozenset({"disable", "prefer"}),
    "sslnegotiation": frozenset({"postgres"}),
}

_CONNINFO_WHITESPACE = " \t\n\r\f\v"
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclasses.dataclass(frozen=True)
class ConnInfo:
    """Where and how to connect to PostgreSQL, after libpq's precedence: string, PG*, defaults.
    With several hosts, `host` and `port` are the first; `each_host()` gives one ConnInfo per
    host, in the order they are to be tried."""

    host: str  # hostname, IP address, or a Unix socket directory (starts with "/")
    port: int
    user: str
    password: str | None = dataclasses.field(repr=False)
    dbname: str
    sslmode: str
    sslrootcert: str | None
    sslcert: str | None
    sslkey: str | None
    connect_timeout_s: float
    application_name: str
    hosts: tuple[tuple[str, int], ...] = ()  #: every (host, port), in order; () means just host:port
    target_session_attrs: str = "any"
    load_balance_hosts: str = "disable"

    def each_host(self) -> list[ConnInfo]:
        """One ConnInfo per host to try, in order (shuffled with load_balance_hosts=random)."""
        hosts = list(self.hosts or [(self.host, self.port)])
        if self.load_balance_hosts == "random":
            random.shuffle(hosts)
        return [dataclasses.replace(self, host=host, port=port, hosts=()) for host, port in hosts]

    def describe(self) -> str:
        """Where this connects, as a URL fit for a log line: the password, if any, as `***`."""
        user = urllib.parse.quote(self.user, safe="") + (":***" if self.password else "")
        query = [f"sslmode={self.sslmode}"]
        sockets = [host for host, _ in self.hosts or [(self.host, self.port)] if is_unix_socket(host)]
        if sockets:
            query.insert(0, f"host={urllib.parse.quote(','.join(sockets))}")
        where = ",".join(_url_host(host, port) for host, port in self.hosts or [(self.host, self.port)])
        for name, value, default in (("target_session_attrs", self.target_session_attrs, "any"),
                                     ("load_balance_hosts", self.load_balance_hosts, "disable")):
            if value != default:
                query.append(f"{name}={value}")
        return f"postgresql://{user}@{where}/{urllib.parse.quote(self.dbname, safe='')}?{'&'.join(query)}"


def _url_host(host: str, port: int) -> str:
    if is_unix_socket(host):
        return f":{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _conninfo_error(reason: str, source: str = "DATABASE_URL") -> ConfigError:
    where = "" if source == "DATABASE_URL" else f" (from {source})"
    return ConfigError(f"DATABASE_URL: {reason}{where}")


def _keyword_error(reason: str) -> ConfigError:
    return _conninfo_error(f"not a valid key=value connection string: {reason}")


def _percent_decode(text: str, part: str) -> str:
    """Strict RFC 3986 percent-decoding, as libpq does it: bad escapes and NUL bytes are errors."""
    if _BAD_PERCENT.search(text):
        raise _conninfo_error(f"invalid percent-encoding in the {part}")
    try:
        decoded = urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise _conninfo_error(f"the {part} is not valid UTF-8 after percent-decoding") from None
    if "\0" in decoded:
        raise _conninfo_error(f"the {part} contains a NUL byte")
    return decoded


def _split_url_hosts(hostports: str) -> list[tuple[str, str]]:
    """`host[:port],...` from a URL's authority, as libpq's comma-separated host and port lists."""
    if "," not in hostports:
        return _split_url_hostport(hostports)
    hosts, ports = [], []
    for hostport in hostports.split(","):
        pairs = dict(_split_url_hostport(hostport))
        hosts.append(pairs.get("host", ""))
        ports.append(pairs.get("port", ""))
    return [("host", ",".join(hosts)), ("port", ",".join(ports))]


def _split_url_hostport(hostport: str) -> list[tuple[str, str]]:
    """`host[:port]` or `[ipv6][:port]` from a URL's authority, percent-decoded."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise _conninfo_error("an IPv6 address opened with '[' has no closing ']'")
        host, after = hostport[1:end], hostport[end + 1:]
        if after and not after.startswith(":"):
            raise _conninfo_error("unexpected text after the ']' of an IPv6 address")
        port = after[1:]
    else:
        host, _, port = hostport.partition(":")
    pairs = [("host", _percent_decode(host, "host"))] if host else []
    return pairs + ([("port", _percent_decode(port, "port"))] if port else [])


def _split_url(text: str) -> list[tuple[str, str]]:
    """postgresql://[user[:password]@][host][:port][/dbname][?keyword=value&...] as pairs."""
    rest = text.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    # The last '@' ends the user info: a password holding an unencoded '@' still parses.
    userinfo, at, hostport = authority.rpartition("@")
    pairs: list[tuple[str, str]] = []
    if at:
        user, colon, password = userinfo.partition(":")
        pairs.append(("user", _percent_decode(user, "user name")))
        if colon:
            pairs.append(("password", _percent_decode(password, "password")))
    pairs += _split_url_hosts(hostport)
    if path:
        pairs.append(("dbname", _percent_decode(path, "database name")))
    for item in filter(None, query.split("&")):
        key, equals, value = item.partition("=")
        if not equals:
            raise _conninfo_error("a query parameter has no '=' (use keyword=value)")
        key = _percent_decode(key, "query parameters")
        value = _percent_decode(value, "query parameters")
        if key == "ssl" and value == "true":  # libpq's JDBC-compatible spelling
            key, value = "sslmode", "require"
        pairs.append((key, value))
    return pairs


def _scan_keyword_values(text: str) -> list[tuple[str, str]]:
    """libpq `keyword = value` pairs as (keyword, value).

    Whitespace may surround '='; a value is either bare (up to whitespace) or single-quoted; a
    backslash takes the next character literally in both ("Connection Strings" in the libpq docs).
    """
    pairs, pos, end = [], 0, len(text)

    def skip_space(i: int) -> int:
        while i < end and text[i] in _CONNINFO_WHITESPACE:
            i += 1
        return i

    while (pos := skip_space(pos)) < end:
        start = pos
        while pos < end and text[pos] not in _CONNINFO_WHITESPACE and text[pos] != "=":
            pos += 1
        key = text[start:pos]
        pos = skip_space(pos)
        if pos >= end or text[pos] != "=":
            raise _keyword_error("a keyword is missing its '=' (quote values that hold spaces: key='...')")
        pos = skip_space(pos + 1)
        quoted, chars = pos < end and text[pos] == "'", []
        pos += quoted
        while True:
            if pos >= end:
                if quoted:
                    raise _keyword_error("a quoted value has no closing quote")
                break
            char = text[pos]
            if char == "\\":
                if pos + 1 >= end:
                    raise _keyword_error("a value ends with a lone backslash")
                chars.append(text[pos + 1])
                pos += 2
                continue
            if (quoted and char == "'") or (not quoted and char in _CONNINFO_WHITESPACE):
                pos += quoted
                break
            chars.append(char)
            pos += 1
        pairs.append((key, "".join(chars)))
    return pairs


def _split_connection_string(text: str) -> list[tuple[str, str]]:
    if text.startswith(URL_SCHEMES):
        return _split_url(text)
    if "://" in text.split("=", 1)[0] or (text and "=" not in text):
        raise ConfigError("DATABASE_URL must start with postgresql:// or postgres://, "
                          "or use the libpq key=value form")
    return _scan_keyword_values(text)


def _collect_keywords(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Checks the keywords; later pairs win, as in libpq.  Empty values count as unset."""
    given: dict[str, str] = {}
    previous = ""
    for key, value in pairs:
        if key in CONNINFO_KEYWORDS:
            if value:
                given[key] = value
        elif key in IGNORED_CONNINFO_KEYWORDS:
            allowed = IGNORED_CONNINFO_KEYWORDS[key]
            if allowed is not None and value not in allowed:
                raise _conninfo_error(f"this {key} value is not supported (wal2http supports only "
                                      f"{', '.join(sorted(allowed))})")
        elif previous == "password" or not re.fullmatch(r"[a-z_]{1,40}", key):
            # What follows an unquoted password may be the rest of it: never echo it.
            raise _conninfo_error("unsupported keyword after the password (a password that "
                                  "holds spaces must be quoted: password='...')")
        else:
            raise _conninfo_error(f"unsupported keyword {key!r} (supported: "
                                  f"{', '.join(k for k in CONNINFO_KEYWORDS)})")
        previous = key
    return given


def _default_user() -> str:
    try:
        return getpass.getuser() or DEFAULT_PG_USER
    except (OSError, KeyError, ImportError):
        return DEFAULT_PG_USER


def _parse_port(text: str, source: str) -> int:
    if not text:
        return DEFAULT_PG_PORT
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise _conninfo_error("the port must be a number from 1 to 65535", source)
    return int(text)


def _parse_hosts(host_text: str, port_text: str, source) -> tuple[tuple[str, int], ...]:
    """libpq's lists: hosts and ports comma-separated, one port for all hosts or one per host; an
    empty entry is the default."""
    hosts = [host or DEFAULT_PG_HOST for host in host_text.split(",")]
    ports = [_parse_port(port, source("port")) for port in port_text.split(",")]
    if len(ports) == 1:
        ports *= len(hosts)
    if len(ports) != len(hosts):
        raise _conninfo_error(f"{len(hosts)} hosts but {len(ports)} ports are given (give one port "
                              "for all hosts, or one per host)", source("port", "DATABASE_URL"))
    return tuple(zip(hosts, ports))


def _parse_choice(values: Mapping[str, str], key: str, choices: tuple[str, ...], source,
                  default: str | None = None) -> str:
    """`key`'s value, one of `choices` (the default: the first)."""
    value = values.get(key, default or choices[0]).lower()
    if value not in choices:
        raise _conninfo_error(f"{key} must be one of {', '.join(choices)}", source(key, "DATABASE_URL"))
    return value


def _parse_connect_timeout(text: str | None, source: str) -> float:
    """libpq's rule (whole seconds, under 2 means 2) except that 0 or unset is our 10 s."""
    if text is None:
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        seconds = int(text.strip())
    except ValueError:
        raise _conninfo_error("connect_timeout must be a whole number of seconds", source) from None
    if seconds <= 0:
        return DEFAULT_CONNECT_TIMEOUT_S
    return max(float(seconds), MIN_CONNECT_TIMEOUT_S)


def parse_database_url(text: str, environ: Mapping[str, str]) -> ConnInfo:
    """DATABASE_URL (URL or key=value form) -> ConnInfo, with libpq's PG* variables and defaults.

    Several hosts (`host=a,b port=5432,5433`, `postgresql://a:5432,b:5433/db`) are tried in
    order at each connection, as libpq does.  `service` files and other libpq features wal2http
    lacks are a ConfigError naming DATABASE_URL; no message ever contains the password.
    """
    given = _collect_keywords(_split_connection_string(text.strip()))
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for key, variable in CONNINFO_KEYWORDS.items():
        if key in given:
            values[key], sources[key] = given[key], "DATABASE_URL"
        elif variable and environ.get(variable):
            values[key], sources[key] = environ[variable], variable
    source = sources.get
    hosts = _parse_hosts(values.get("host", ""), values.get("port", ""), source)
    user = values.get("user") or _default_user()
    return ConnInfo(
        host=hosts[0][0], port=hosts[0][1], user=user, password=values.get("password"),
        dbname=values.get("dbname", user),
        sslmode=_parse_choice(values, "sslmode", SSLMODES, source, DEFAULT_SSLMODE),
        sslrootcert=values.get("sslrootcert"), sslcert=values.get("sslcert"),
        sslkey=values.get("sslkey"),
        connect_timeout_s=_parse_connect_timeout(values.get("connect_timeout"),
                                                 source("connect_timeout", "DATABASE_URL")),
        application_name=values.get("application_name")
        or values.get("fallback_application_name", DEFAULT_APPLICATION_NAME),
        hosts=hosts if len(hosts) > 1 else (),
        target_session_attrs=_parse_choice(values, "target_session_attrs", TARGET_SESSION_ATTRS, source),
        load_balance_hosts=_parse_choice(values, "load_balance_hosts", LOAD_BALANCE_HOSTS, source),
    )


# --- Value parsers: (text, variable) -> value; each message is one line and names the variable ------

SINKS = ("stdout", "http", "hook0")
ON_FAILURE_CHOICES = ("exit", "retry", "skip")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SMTP_TLS_MODES = ("starttls", "ssl", "none")
SMTP_SSL_PORT = 465
MAX_DELIVERY_CONCURRENCY = 256  #: most requests in flight at once
SMTP_SUBMISSION_PORT = 587
MAX_SLOT_NAME_LENGTH = 63  #: NAMEDATALEN - 1
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})
#: Headers that frame the HTTP message: set by the HTTP sink alone.
RESERVED_HTTP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SLOT_NAME = re.compile(rf"[a-z0-9_]{{1,{MAX_SLOT_NAME_LENGTH}}}")


def _shown(value: str) -> str:
    """A non-secret value quoted for an error message: one line, bounded."""
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _as_given(value: str, variable: str) -> str:
    return value


def _stripped(value: str, variable: str) -> str:
    return value.strip()


def parse_bool(value: str, variable: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{variable} must be true or false (or 1/0, yes/no, on/off), got {_shown(value)}")


def _int_parser(minimum: int, maximum: int | None = None) -> Callable[[str, str], int]:
    def parse(value: str, variable: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            number = None
        if number is None or number < minimum or (maximum is not None and number > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(f"{variable} must be a whole number {bound}, got {_shown(value)}")
        return number
    return parse


def _parse_milliseconds(value: str, variable: str) -> float:
    """Whole milliseconds >= 0, as seconds."""
    return _int_parser(0)(value, variable) / 1000


def _parse_seconds(value: str, variable: str) -> float:
    try:
        seconds = float(value.strip())
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{variable} must be a number of seconds greater than 0, got {_shown(value)}")
    return seconds


def _choice_parser(choices: tuple[str, ...], upper: bool = False) -> Callable[[str, str], str]:
    def parse(value: str, variable: str) -> str:
        word = value.strip().upper() if upper else value.strip().lower()
        if word not in choices:
            raise ConfigError(f"{variable} must be one of {', '.join(choices)}, got {_shown(value)}")
        return word
    return parse


def _parse_sink(value: str, variable: str) -> str:
    sink = value.strip().lower()
    if sink not in SINKS:
        raise ConfigError(f"{variable}: Event sink must be one of: 'http', 'hook0', or 'stdout' "
                          f"(got {_shown(value)})")
    return sink


def _text_parser(is_valid: Callable[[str], object], problem: str) -> Callable[[str, str], str]:
    """A parser of text taken as it is (stripped) when `is_valid`, else a ConfigError saying the
    variable `problem`."""
    def parse(value: str, variable: str) -> str:
        text = value.strip()
        if not is_valid(text):
            raise ConfigError(f"{variable} {problem}, got {_shown(value)}")
        return text
    return parse


_parse_host = _text_parser(is_valid_host, "is not a valid host name or address")
_parse_slot_name = _text_parser(_SLOT_NAME.fullmatch, f"must be 1 to {MAX_SLOT_NAME_LENGTH} lowercase "
                                                      "letters, digits or underscores")
_parse_address = _text_parser(lambda text: "@" in text and not any(c in text for c in "\r\n\0"),
                              "must be an email address")


def _parse_http_url(value: str, variable: str) -> str:
    """Checked as the HTTP client will read it (parse_http_url); never echoed: the URL may carry
    credentials or a token in its query."""
    url = value.strip()
    parse_http_url(url, variable)
    return url


def _parse_hook0_api_url(value: str, variable: str) -> str:
    url = _parse_http_url(value, variable)
    if urllib.parse.urlsplit(url).query:
        raise ConfigError(f"{variable}: the URL of Hook0's API takes no query (?...)")
    return url


def _parse_publications(value: str, variable: str) -> tuple[str, ...]:
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise ConfigError(f"{variable} must be publication names separated by commas, with no empty "
                          f"name, got {_shown(value)}")
    return tuple(dict.fromkeys(names))  # duplicates dropped, order kept


def _parse_json_object(value: str, variable: str) -> dict:
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        # The decoder's message holds a position, never the text: safe for header values too.
        raise ConfigError(f"{variable} must be a JSON object: {exc.msg} at character {exc.pos}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{variable} must be a JSON object, e.g. {{\"name\": \"value\"}}")
    return data


def _parse_http_headers(value: str, variable: str) -> tuple[tuple[str, str], ...]:
    headers = []
    for name, header_value in _parse_json_object(value, variable).items():
        if not _HTTP_TOKEN.fullmatch(name):
            raise ConfigError(f"{variable}: {_shown(name)} is not a valid header name")
        if name.lower() in RESERVED_HTTP_HEADERS:
            raise ConfigError(f"{variable}: the {name} header is set by wal2http itself")
        if not isinstance(header_value, str) or any(c in header_value for c in "\r\n\0"):
            raise ConfigError(f"{variable}: the value of {name} must be a string on one line")
        headers.append((name, header_value))
    return tuple(headers)


def _parse_hook0_labels(value: str, variable: str) -> tuple[tuple[str, str], ...]:
    """Converted and checked by Hook0's rules as each event's labels are: checked here, or every
    event that falls back on these labels would be undeliverable."""
    labels = {}
    for name, label in _parse_json_object(value, variable).items():
        if isinstance(label, (dict, list)):
            raise ConfigError(f"{variable}: label {_shown(name)} must be a string, number or boolean")
        if isinstance(label, float) and not math.isfinite(label):
            raise ConfigError(f"{variable}: label {_shown(name)} must be a finite number")
        if label is not None:
            labels[name] = convert_hook0_string(label)
    problem = hook0_string_map_problem(labels, 0, HOOK0_LABELS_MAX_ENTRIES)
    if problem:
        raise ConfigError(f"{variable} {problem}")
    return tuple(labels.items())


def _parse_uuid(value: str, variable: str) -> str:
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise ConfigError(f"{variable} must be a UUID, got {_shown(value)}") from None


def _parse_bearer_token(value: str, variable: str) -> str:
    token = value.strip()  # a secret file's trailing newline is not part of the token
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"{variable} has characters a bearer token cannot have "
                          "(spaces, control or non-ASCII characters)")
    return token


def _parse_signing_secret(value: str, variable: str) -> str:
    decode_signing_secret(value)  # the HTTP sink's own reading: a bad whsec_ secret fails here
    return value


def _parse_file(value: str, variable: str) -> str:
    path = value.strip()
    if not os.path.isfile(path):
        raise ConfigError(f"{variable}: no such file {_shown(path)}")
    return path


def parse_ops_addr(value: str, variable: str = "OPS_ADDR") -> tuple[str, int]:
    """OPS_ADDR `host:port`, `[ipv6]:port` or `:port` (every interface) -> (host, port)."""
    text = value.strip()
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if (not colon or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535
            or (host and not is_valid_host(host))):
        raise ConfigError(f"{variable} must be host:port with a port from 1 to 65535 (e.g. "
                          f"127.0.0.1:9187, or :9187 for every interface), got {_shown(value)}")
    return host, int(port)


def _parse_recipients(value: str, variable: str) -> tuple[str, ...]:
    return tuple(_parse_address(item, variable) for item in value.split(",") if item.strip())


# --- Secrets: what in a setting's value must never be shown --------------------------------------
# Each function takes the value as given (text) or as parsed: the text is scrubbed from errors
# raised while parsing, the parsed value from everything built later.

URL_TOKEN_USER_MIN_CHARS = 16  #: a URL user name this long is taken for a token


def url_secrets(url: str | None) -> list[str]:
    """The credentials in a URL's user info (its password, or a user name with no password, as
    written and decoded) and the Basic header value built from them: never to be shown."""
    try:
        parts = urllib.parse.urlsplit(url or "")
        username, password = parts.username, parts.password
    except ValueError:
        return []
    if username is None:
        return []
    user, secret = urllib.parse.unquote(username), urllib.parse.unquote(password or "")
    basic = base64.b64encode(f"{user}:{secret}".encode()).decode("ascii")
    # A user name is no secret (hiding "wal2http" would mangle every message that contains it),
    # unless it is the credential: alone (https://<token>@host), or long, beside a dummy password
    # (https://<api key>:X@host, https://<token>:x-oauth-basic@host).
    values = [password, secret, basic]
    if not password or len(user) >= URL_TOKEN_USER_MIN_CHARS:
        values += [username, user]
    return [value for value in values if value]


def _whole_value(value) -> list[str]:
    return [value] if isinstance(value, str) else []


def _header_values(value) -> list[str]:
    if isinstance(value, str):
        try:
            return [str(item) for item in json.loads(value).values()]
        except (ValueError, AttributeError):
            return []
    return [header_value for _, header_value in value]


def _database_passwords(value) -> list[str]:
    try:
        return [item for key, item in _split_connection_string(value or "") if key == "password"]
    except ConfigError:
        return []


# --- The settings: one table drives --help, the flags, the environment, Config, logs, secrets -----

@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its environment variable (the flag is the same name, `--lower-case-dashed`),
    the Config field it fills, and everything else about it."""

    variable: str
    field: str
    group: str  #: database, replication, delivery, logging, or a sink or alerts: http, hook0, email
    parse: Callable[[str, str], object]  #: (text, variable) -> value, or a ConfigError naming it
    default: object  #: the Config field's default
    help: str
    shown_default: str = ""  #: the default as --help shows it, when the value's text would not do
    secrets: Callable[[object], list[str]] | None = None  #: its secrets; also keeps it out of repr()
    required: bool = False  #: required when its group is the chosen sink
    log: str = ""  #: its name in the start-up description (describe_config), if shown there

    @property
    def flag(self) -> str:
        return "--" + self.variable.lower().replace("_", "-")

    @property
    def help_default(self) -> str:
        if self.shown_default or self.default is None:
            return self.shown_default or "unset"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, tuple):
            return ",".join(self.default)
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


SETTINGS: tuple[Setting, ...] = (
    Setting("DATABASE_URL", "database_url", "database", _as_given, None,
            "postgresql://user:password@host:port/dbname?sslmode=... or libpq key=value form; "
            "PG* variables fill what it leaves out", "required except with --demo",
            secrets=_database_passwords, log="database"),
    Setting("SLOT_NAME", "slot_name", "replication", _parse_slot_name, "sub",
            "logical replication slot (pgoutput)", log="slot"),
    Setting("PUB_NAME", "publications", "replication", _parse_publications, ("pub",),
            "publication(s), comma-separated", log="publications"),
    Setting("CREATE_SLOT", "create_slot", "replication", parse_bool, True,
            "create the slot if it does not exist"),
    Setting("EVENT_SINK", "event_sink", "delivery", _parse_sink, "stdout", "stdout, http or hook0",
            "hook0 if all HOOK0_* are set, else http if HTTP_ENDPOINT_URL is set, else stdout",
            log="sink"),
    Setting("SLOT_FAILOVER", "slot_failover", "replication", parse_bool, False,
            "create the slot with failover (PostgreSQL 17+), so standbys with slot "
            "synchronisation keep it; an existing slot is altered"),
    Setting("FEEDBACK_INTERVAL_SECS", "feedback_interval_s", "replication", _parse_seconds, 1.0,
            "seconds between standby status updates (fractions allowed)"),
    Setting("STREAMING", "streaming", "replication", parse_bool, False,
            "stream large in-progress transactions (PostgreSQL 14+)"),
    Setting("ON_FAILURE", "on_failure", "delivery", _choice_parser(ON_FAILURE_CHOICES), "exit",
            "when delivery retries are exhausted: exit, retry or skip", log="on_failure"),
    Setting("DEAD_LETTER_FILE", "dead_letter_file", "delivery", _stripped,
            "wal2http-dead-letter.jsonl", "where ON_FAILURE=skip writes events"),
    Setting("RETRY_MAX_ATTEMPTS", "retry_max_attempts", "delivery", _int_parser(1), 5,
            "attempts per delivery, the first included"),
    Setting("RETRY_BASE_DELAY_MS", "retry_base_delay_s", "delivery", _parse_milliseconds, 1.0,
            "first backoff delay, milliseconds", "1000"),
    Setting("RETRY_MAX_DELAY_MS", "retry_max_delay_s", "delivery", _parse_milliseconds, 30.0,
            "largest backoff delay, milliseconds", "30000"),
    Setting("DELIVERY_CONCURRENCY", "delivery_concurrency", "delivery",
            _int_parser(1, MAX_DELIVERY_CONCURRENCY), 1,
            "HTTP and Hook0 requests in flight at once (1-256); events of one row stay in order",
            log="concurrency"),
    Setting("LOG_LEVEL", "log_level", "logging", _choice_parser(LOG_LEVELS, upper=True), "INFO",
            "DEBUG, INFO, WARNING or ERROR"),
    Setting("HTTP_ENDPOINT_URL", "http_endpoint_url", "http", _parse_http_url, None,
            "http:// or https:// URL the HTTP sink POSTs to", secrets=url_secrets, required=True),
    Setting("HTTP_BATCH_SIZE", "http_batch_size", "http", _int_parser(1), 1,
            "events per HTTP request"),
    Setting("HTTP_TIMEOUT_SECS", "http_timeout_s", "http", _parse_seconds, 10.0,
            "timeout of each HTTP request, seconds"),
    Setting("HTTP_HEADERS", "http_headers", "http", _parse_http_headers, (),
            "JSON object of extra request headers", "unset", secrets=_header_values),
    Setting("HTTP_SIGNING_SECRET", "http_signing_secret", "http", _parse_signing_secret, None,
            "Standard Webhooks signing secret (whsec_...)", secrets=_whole_value),
    Setting("HTTP_CA_FILE", "http_ca_file", "http", _parse_file, None,
            "extra trusted CA certificates (PEM) for https"),
    Setting("HOOK0_API_URL", "hook0_api_url", "hook0", _parse_hook0_api_url, None,
            "Hook0 API URL (/api/v1 is added when it has no path)", secrets=url_secrets,
            required=True),
    Setting("HOOK0_APPLICATION_ID", "hook0_application_id", "hook0", _parse_uuid, None,
            "Hook0 application id (UUID)", required=True),
    Setting("HOOK0_API_TOKEN", "hook0_api_token", "hook0", _parse_bearer_token, None,
            "Hook0 API token", secrets=_whole_value, required=True),
    Setting("HOOK0_TABLE_EVENTS", "hook0_table_events", "hook0", parse_bool, False,
            "send every row change, not only outbox rows"),
    Setting("HOOK0_LABELS", "hook0_labels", "hook0", _parse_hook0_labels, (),
            "JSON object of labels for events without labels", "unset"),
    Setting("HOOK0_CREATE_EVENT_TYPES", "hook0_create_event_types", "hook0", parse_bool, False,
            "create missing Hook0 event types"),
    Setting("EMAIL_SMTP_HOST", "email_smtp_host", "email", _parse_host, None,
            "SMTP server for alert mails"),
    Setting("EMAIL_SMTP_PORT", "email_smtp_port", "email", _int_parser(1, 65535),
            SMTP_SUBMISSION_PORT, "SMTP port", "465 with EMAIL_SMTP_TLS=ssl, else 587"),
    Setting("EMAIL_SMTP_USERNAME", "email_smtp_username", "email", _as_given, None,
            "SMTP login (no login when unset)"),
    Setting("EMAIL_SMTP_PASSWORD", "email_smtp_password", "email", _as_given, None,
            "SMTP password", secrets=_whole_value),
    Setting("EMAIL_FROM", "email_from", "email", _parse_address, None,
            "sender address of alert mails"),
    Setting("EMAIL_TO", "email_to", "email", _parse_recipients, (),
            "recipients of alert mails, comma-separated", "unset", log="alerts"),
    Setting("EMAIL_SMTP_TLS", "email_smtp_tls", "email", _choice_parser(SMTP_TLS_MODES),
            "starttls", "starttls, ssl or none", "ssl on port 465, else starttls"),
    Setting("OPS_ADDR", "ops_addr", "ops", parse_ops_addr, None,
            "host:port of the operations port (/health, /ready, /status, /metrics); :9187 listens "
            "on every interface", "unset (no listener)"),
    Setting("OPS_TOKEN", "ops_token", "ops", _parse_bearer_token, None,
            "bearer token the operations port requires (not on /health, /ready)", secrets=_whole_value),
    Setting("SLOT_CHECK_INTERVAL_SECS", "slot_check_interval_s", "ops", _parse_seconds, 30.0,
            "seconds between two checks of the slot's retained WAL"),
    Setting("SLOT_MAX_RETAINED_MB", "slot_max_retained_mb", "ops", _int_parser(1), 4096,
            "alert when the slot retains more WAL than this, in MB"),
    # At most half the port's 64 connections, so that probes and scrapes always get through.
    Setting("TAP_MAX_CLIENTS", "tap_max_clients", "ops", _int_parser(1, 32), 16,
            "live tap WebSocket clients at once (GET /events); more get 503"),
    Setting("BACKFILL_TABLES", "backfill_tables", "backfill", parse_backfill_tables, (),
            "tables whose existing rows are sent as read events at start-up (schema.table, "
            "schema.* or *, comma-separated); those STATE_FILE records as done are skipped", "unset"),
    Setting("BACKFILL_ON_CREATE", "backfill_on_create", "backfill", parse_bool, False,
            "backfill every published table when wal2http creates the slot"),
    Setting("BACKFILL_CHUNK_ROWS", "backfill_chunk_rows", "backfill", _int_parser(1, 1_000_000), 10_000,
            "rows per backfill chunk (halved while a chunk's SELECT takes over 2 s)"),
    Setting("STATE_FILE", "state_file", "backfill", _stripped, "wal2http-state.json",
            "where backfill progress is kept, to resume after a restart"),
)


def _config_field(setting: Setting) -> tuple[str, type, dataclasses.Field]:
    return setting.field, object, dataclasses.field(default=setting.default,
                                                    repr=setting.secrets is None)


Config = dataclasses.make_dataclass(
    "Config", [_config_field(SETTINGS[0]), ("conninfo", object, dataclasses.field(default=None))]
    + [_config_field(setting) for setting in SETTINGS[1:]], frozen=True,
    namespace={"__module__": __name__, "__doc__": (
        "Everything wal2http runs with (frozen): a field per entry of SETTINGS, named by its "
        "`field`, with its default\n(secret-bearing ones left out of repr()), and `conninfo`, "
        "DATABASE_URL as parse_database_url() reads it.")})


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (exit 2, one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # Keep option names, drop values: `--databse-url postgresql://u:pw@h` must not echo pw.
        if message.startswith("unrecognized arguments:"):
            names = [arg.split("=", 1)[0] for arg in message.split(":", 1)[1].split()
                     if arg.startswith("-")]
            message = (f"unrecognized option(s): {' '.join(names)}" if names
                       else "unexpected arguments (options take the form --name value)")
        message = re.sub(r"(--[\w-]+)=\S+", r"\1=...", message)
        raise ConfigError(f"command line: {message} (see --help)")


#: --help lists these groups' settings under their own heading, the others under "options".
HELP_GROUPS = {"http": "HTTP sink (EVENT_SINK=http)", "hook0": "Hook0 sink (EVENT_SINK=hook0)",
               "email": "email alerts", "ops": "operations port and slot guard",
               "backfill": "backfill (existing rows as read events)"}


def build_arg_parser() -> argparse.ArgumentParser:
    """Every long option mirrors an environment variable; a flag wins over the environment.  The
    usage line names the program as it was run (argparse's default: the basename of argv[0])."""
    parser = _ArgumentParser(
        allow_abbrev=False,
        description="Stream PostgreSQL logical replication changes to stdout, HTTP or Hook0.",
        epilog="Each option can also be set by the environment variable shown; an empty variable "
               "counts as unset. Booleans accept true/false, 1/0, yes/no, on/off.")
    groups = {group: parser.add_argument_group(title) for group, title in HELP_GROUPS.items()}
    for setting in SETTINGS:
        extra = {"nargs": "?", "const": "true"} if setting.parse is parse_bool else {}
        shown = f"[env {setting.variable}; default: {setting.help_default}]"
        groups.get(setting.group, parser).add_argument(
            setting.flag, dest=setting.variable, default=None, metavar=setting.variable,
            help=f"{setting.help} {shown}", **extra)
    parser.add_argument("--check", action="store_true",
                        help="verify the database, publication, slot and sink, print one line "
                             "per check, and exit (0 only if all pass)")
    parser.add_argument("--demo", action="store_true",
                        help="run against a throwaway local PostgreSQL with a demo table")
    parser.add_argument("--version", action="version", version=f"wal2http {__version__}")
    return parser


# --- Building the Config: the table, then the rules that tie settings together -------------------

def _raw_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str | None]:
    """Flag over environment; empty or blank means unset (the default applies)."""
    raw = {}
    for setting in SETTINGS:
        value = getattr(args, setting.variable)
        if value is None:
            value = environ.get(setting.variable)
        raw[setting.variable] = value if value is not None and value.strip() else None
    return raw


def _database_settings(url: str | None, environ: Mapping[str, str], mode: str) -> dict:
    if mode == "demo":  # the demo starts its own server and sets these itself
        return {"database_url": None, "conninfo": None}
    if url is None:
        raise ConfigError("DATABASE_URL is required (postgresql://user:password@host:5432/dbname "
                          "or libpq key=value form; --database-url works too), or use --demo")
    return {"database_url": url, "conninfo": parse_database_url(url, environ)}


def _missing(settings: Mapping[str, object], sink: str) -> list[str]:
    """The variables `sink` requires that are not set, in table order."""
    return [setting.variable for setting in SETTINGS
            if setting.group == sink and setting.required and settings.get(setting.field) is None]


def choose_sink(settings: Mapping[str, object]) -> str:
    """EVENT_SINK if set, else the priority rule: Hook0 if all its required variables are set
    (HOOK0_API_URL, HOOK0_APPLICATION_ID, HOOK0_API_TOKEN), else HTTP if HTTP_ENDPOINT_URL is,
    else stdout."""
    if settings.get("event_sink"):
        return settings["event_sink"]
    return next((sink for sink in ("hook0", "http") if not _missing(settings, sink)), "stdout")


def check_sink_settings(settings: Mapping[str, object], sink: str) -> None:
    missing = _missing(settings, sink)
    if missing and sink == "http":
        raise ConfigError(f"HTTP event sink specified but missing {', '.join(missing)}")
    if missing:
        raise ConfigError(f"Hook0 event sink specified but missing required configuration "
                          f"({', '.join(missing)})")


def check_retry_delays(settings: Mapping[str, object]) -> None:
    base = settings.get("retry_base_delay_s", Config.retry_base_delay_s)  # or the default
    largest = settings.get("retry_max_delay_s", Config.retry_max_delay_s)
    if base > largest:
        raise ConfigError(f"RETRY_BASE_DELAY_MS ({round(base * 1000)}) must not be larger than "
                          f"RETRY_MAX_DELAY_MS ({round(largest * 1000)})")


def smtp_port_and_tls(settings: Mapping[str, object]) -> dict:
    """EMAIL_SMTP_TLS and EMAIL_SMTP_PORT default from each other: 465 <-> ssl, else starttls/587."""
    port, tls = settings.get("email_smtp_port"), settings.get("email_smtp_tls")
    tls = tls or ("ssl" if port == SMTP_SSL_PORT else "starttls")
    port = port or (SMTP_SSL_PORT if tls == "ssl" else SMTP_SUBMISSION_PORT)
    return {"email_smtp_port": port, "email_smtp_tls": tls}


def _setting_secrets(value_of: Callable[[Setting], object]) -> list[str]:
    """The secrets of the settings that hold some, from their values as `value_of` gives them."""
    return [secret for setting in SETTINGS if setting.secrets and (value := value_of(setting))
            for secret in setting.secrets(value)]


def _given_secrets(raw: Mapping[str, str | None], environ: Mapping[str, str]) -> list[str]:
    """The secrets in the settings as given, for scrubbing an error raised while parsing them."""
    return [environ.get("PGPASSWORD", ""), *_setting_secrets(lambda setting: raw[setting.variable])]


def load_config(argv: list[str], environ: Mapping[str, str]) -> tuple[Config, str]:
    """Command line and environment -> (Config, mode), mode being "run", "check" or "demo".

    --help and --version raise SystemExit(0) from argparse; every problem is a one-line
    ConfigError naming the variable, without secrets.
    """
    args = build_arg_parser().parse_args(argv)
    if args.check and args.demo:
        raise ConfigError("command line: --check and --demo cannot be used together")
    mode = "check" if args.check else "demo" if args.demo else "run"
    raw = _raw_settings(args, environ)
    try:
        settings = {setting.field: setting.parse(raw[setting.variable], setting.variable)
                    for setting in SETTINGS if raw[setting.variable] is not None}
        settings["event_sink"] = sink = choose_sink(settings)
        check_sink_settings(settings, sink)
        settings.update(_database_settings(settings.get("database_url"), environ, mode))
        check_retry_delays(settings)
        settings.update(smtp_port_and_tls(settings))
    except ConfigError as exc:
        raise ConfigError(scrub_secrets(str(exc), _given_secrets(raw, environ))) from None
    return Config(**settings), mode


def config_secrets(config: Config) -> tuple[str, ...]:
    """Every secret value the config holds, for scrubbing text built from outside input."""
    values = [config.conninfo.password if config.conninfo else None,
              *_setting_secrets(lambda setting: getattr(config, setting.field))]
    return tuple(dict.fromkeys(value for value in values if value))


def email_enabled(config: Config) -> bool:
    return bool(config.email_smtp_host and config.email_from and config.email_to)


def config_warnings(config: Config) -> list[str]:
    """Problems worth a WARNING at start-up that do not stop wal2http."""
    warnings = []
    email_parts = {"EMAIL_SMTP_HOST": config.email_smtp_host, "EMAIL_FROM": config.email_from,
                   "EMAIL_TO": config.email_to}
    if not email_enabled(config) and (any(email_parts.values()) or config.email_smtp_username
                                      or config.email_smtp_password):
        missing = ", ".join(name for name, value in email_parts.items() if not value)
        warnings.append(f"email alerts are disabled: EMAIL_SMTP_HOST, EMAIL_FROM and EMAIL_TO "
                        f"must all be set (missing: {missing})")
    if bool(config.email_smtp_username) != bool(config.email_smtp_password):
        warnings.append("EMAIL_SMTP_USERNAME and EMAIL_SMTP_PASSWORD should be set together")
    if config.email_smtp_password and config.email_smtp_tls == "none":
        warnings.append("EMAIL_SMTP_TLS=none sends EMAIL_SMTP_PASSWORD unencrypted")
    hook0_parts = (config.hook0_api_url, config.hook0_application_id, config.hook0_api_token)
    if config.event_sink != "hook0" and any(hook0_parts):
        warnings.append(f"HOOK0_* settings are ignored: the event sink is {config.event_sink}")
    if config.event_sink != "http" and config.http_endpoint_url:
        warnings.append(f"HTTP_ENDPOINT_URL is ignored: the event sink is {config.event_sink}")
    if config.event_sink == "http" and config.http_signing_secret and \
            not config.http_signing_secret.startswith(WEBHOOK_SECRET_PREFIX):
        warnings.append("HTTP_SIGNING_SECRET does not start with whsec_: Standard Webhooks libraries "
                        "expect whsec_ followed by the base64 of the key (wal2http signs with the "
                        "secret's UTF-8 bytes as the key)")
    if config.event_sink == "stdout" and config.delivery_concurrency > 1:
        warnings.append("DELIVERY_CONCURRENCY is ignored: the stdout sink writes one batch at a time")
    if config.ops_addr and not config.ops_token and not is_loopback_host(config.ops_addr[0]):
        warnings.append("OPS_ADDR listens beyond this machine without OPS_TOKEN: only /health, /ready "
                        "and /metrics are served; /status, the live tap and the page are off because "
                        "they show row data (set OPS_TOKEN to turn them on)")
    return warnings


def _describe(config: Config, field: str) -> str:
    """One setting's value as the start-up log shows it: never a secret, never a URL's path."""
    value = getattr(config, field)
    if field == "database_url":
        return config.conninfo.describe() if config.conninfo else "(demo)"
    if field == "email_to":
        return ", ".join(value) if email_enabled(config) else "log only"
    if field == "event_sink" and value == "http" and config.http_endpoint_url:
        return f"http {parse_http_url(config.http_endpoint_url).where}"
    if field == "event_sink" and value == "hook0" and config.hook0_api_url:
        return (f"hook0 {parse_http_url(config.hook0_api_url).where} "
                f"application {config.hook0_application_id}")
    return ",".join(value) if isinstance(value, tuple) else str(value)


def describe_config(config: Config) -> str:
    """One line for the start-up log: the settings the table gives a `log` name, shown safely."""
    return " ".join(f"{setting.log}={_describe(config, setting.field)}"
                    for setting in SETTINGS if setting.log)


# =====================================================================================================
# 21. Service: run() and --check
# =====================================================================================================


def open_sink(config, alerter):
    """The sink EVENT_SINK names (already resolved by the priority rule)."""
    if config.event_sink == "http":
        return HttpSink(config, alerter=alerter)
    if config.event_sink == "hook0":
        return Hook0Sink(config, alerter)
    return StdoutSink()


async def run(config, *, sink: Sink | None = None, stop: trio.Event | None = None,
              task_status=trio.TASK_STATUS_IGNORED, stats=None) -> None:
    """Run wal2http until `stop` is set (or forever).  `sink` replaces the configured one; `stats`
    (an operations `Stats`) is what the operations port and the slot guard read and fill.

    task_status.started() is called once streaming has begun, with the AckTracker.
    Raises DeliveryFailed (ON_FAILURE=exit), PreconditionError, or another Wal2HttpError.
    """
    stop = trio.Event() if stop is None else stop
    alerter = Alerter(config)
    sink = sink or open_sink(config, alerter)
    logger.info("wal2http %s starting: %s", __version__, describe_config(config))
    stats = stats if stats is not None else Stats(config)
    reliable = ReliableSink(sink, config, alerter, stop=stop, stats=stats)
    stats.start(config, reliable, alerter, stop)
    stats.backfill = open_backfill(config, alerter)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(alerter.run)
            await nursery.start(run_ops_server, config, stats)
            try:
                await run_guarded_replication(config, reliable, stop, task_status, alerter, stats)
            finally:
                with trio.CancelScope(shield=True):
                    await sink.aclose()
                    await alerter.drain(ALERT_DRAIN_TIMEOUT_S)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        error = first_error(group)
        if isinstance(error, Exception):
            raise error from None
        raise


ALERT_DRAIN_TIMEOUT_S = 15.0  #: at exit, how long queued alert mails may take to go out


def open_backfill(config, alerter) -> Backfill:
    """The backfills of this run: STATE_FILE's (a file that is not one: exit 2), then
    BACKFILL_TABLES' (but tables the file records as done)."""
    backfill = Backfill(config, alerter)
    backfill.load()
    if config.backfill_tables:
        backfill.request(config.backfill_tables, "BACKFILL_TABLES", again=False)
    return backfill


async def run_check(config, out=None) -> int:
    """--check: one line per check on stdout; 0 when all pass, 4 otherwise."""
    out = out or sys.stdout
    results: list[tuple[str, str | None]] = []
    timeout_s = config.conninfo.connect_timeout_s
    hosts_timeout_s = timeout_s * len(config.conninfo.each_host()) * (
        2 if config.conninfo.target_session_attrs == "prefer-standby" else 1)
    try:
        with trio.fail_after(hosts_timeout_s):
            async with open_pg_connection(config.conninfo, replication=False) as conn:
                version = conn.parameters.get("server_version", "?").split()[0]
                results.append((f"connect to {_where(conn.conninfo)} (PostgreSQL {version})", None))
                await _check_database(conn, config, results)
        results.append(await _check_one("replication connection", timeout_s, _check_replication_connection(config)))
    except trio.TooSlowError:
        results.append(("connect", f"no answer within {hosts_timeout_s:g} s"))
    except Wal2HttpError as exc:
        results.append(("connect", str(exc)))
    results.append(await _check_one(f"sink {config.event_sink}", config.conninfo.connect_timeout_s,
                                    _check_sink(config)))
    if email_enabled(config):
        results.append(await _check_one("email", config.conninfo.connect_timeout_s, check_smtp(config)))
    if config.backfill_tables or os.path.exists(config.state_file):
        results.append(check_state_file(config))
    for name, failure in results:
        print(f"ok {name}" if failure is None else f"FAIL {name}: {failure}", file=out, flush=True)
    return 0 if all(failure is None for _, failure in results) else 4


def check_state_file(config) -> tuple[str, str | None]:
    """--check's STATE_FILE line: readable as a state file, and its directory writable."""
    name = f"state file {config.state_file}"
    backfill = Backfill(config)
    try:
        backfill.load()
    except ConfigError as exc:
        return name, str(exc)
    if not os.access(os.path.dirname(os.path.abspath(config.state_file)), os.W_OK):
        return name, "its directory is not writable (the file is replaced atomically, beside it)"
    return f"{name}: {len(backfill.queue)} table(s) queued, {len(backfill.done)} done", None


async def _check_one(name: str, timeout_s: float, awaitable) -> tuple[str, str | None]:
    try:
        with trio.fail_after(timeout_s):
            await awaitable
        return name, None
    except trio.TooSlowError:
        return name, f"no answer within {timeout_s:g} s"
    except Wal2HttpError as exc:
        return name, str(exc)
    except Exception as exc:  # one check's bug must not hide the others' results
        logger.debug("--check %s", name, exc_info=True)
        return name, f"unexpected {type(exc).__name__} (LOG_LEVEL=DEBUG shows where)"


async def _check_sink(config) -> None:
    sink = open_sink(config, Alerter(config))
    try:
        await sink.check()
    finally:
        await sink.aclose()


async def _check_database(conn: PgConnection, config, results: list) -> None:
    version = (conn.parameters.get("server_version") or "?").split()[0]
    checks = [
        (f"server version {version}", _check_server_version(conn)),
        ("wal_level", check_wal_level(conn)),
        ("replication privilege", _check_privilege(conn)),
        (f"publication {','.join(config.publications)}", check_publications(conn, config.publications)),
        (f"slot {config.slot_name}", _check_slot(conn, config)),
    ]
    for name, awaitable in checks:
        try:
            detail = await awaitable
            results.append((f"{name}: {detail}" if detail else name, None))
        except ServerError as exc:
            results.append((name, str(classify_server_error(exc, name))))
        except Wal2HttpError as exc:
            results.append((name, str(exc)))


async def _check_replication_connection(config) -> None:
    try:
        async with open_pg_connection(config.conninfo) as conn:
            await conn.simple_query("IDENTIFY_SYSTEM")
    except ServerError as exc:
        raise classify_server_error(exc, "IDENTIFY_SYSTEM") from None


async def _check_server_version(conn: PgConnection) -> None:
    check_server_version(conn)


async def _check_privilege(conn: PgConnection) -> None:
    (allowed,), = await conn.simple_query(
        "SELECT rolreplication OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user")
    if allowed != "t":
        raise PreconditionError(f"user {conn.conninfo.user!r} lacks the REPLICATION privilege: "
                                f"ALTER ROLE {quote_ident(conn.conninfo.user)} REPLICATION;")


async def _check_slot(conn: PgConnection, config) -> str:
    """Like ensure_slot, but never creates: a missing slot passes when CREATE_SLOT=true.  Returns
    the slot's health (wal_status, retained WAL); a slot PostgreSQL invalidated fails."""
    try:
        await ensure_slot(conn, dataclasses.replace(config, create_slot=False))
    except PreconditionError as exc:
        if not (config.create_slot and "does not exist" in str(exc)):
            raise
        return "does not exist yet; wal2http creates it (CREATE_SLOT=true)"
    return await check_slot_health(conn, config)


# =====================================================================================================
# 22. --demo: a throwaway PostgreSQL
# =====================================================================================================
# Runs the real thing end to end against a cluster made with initdb in a temporary directory, run
# as an unprivileged user when we are root (PostgreSQL refuses to run as root), removed at the end.

DEMO_SQL = [
    "CREATE TABLE demo_orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount numeric(12,2),"
    " tags text[], meta jsonb, created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE PUBLICATION wal2http_demo FOR ALL TABLES",
]
DEMO_CHANGES = [  # (statement, events it makes, from this server_version_num on)
    ("INSERT INTO demo_orders (customer, amount, tags, meta) VALUES ('ada', 19.90, '{new,web}', "
     "'{\"source\": \"demo\"}'), ('grace', 5.00, NULL, NULL)", 2, 0),
    ("UPDATE demo_orders SET amount = 21.50, meta = '{\"paid\": true}' WHERE customer = 'ada'", 1, 0),
    # pgoutput sends logical messages from PostgreSQL 14 (protocol 2) on
    ("SELECT pg_logical_emit_message(true, 'wal2http.demo', 'hello from --demo')", 1, 140000),
    ("DELETE FROM demo_orders WHERE customer = 'grace'", 1, 0),
    ("TRUNCATE demo_orders", 1, 0),
]
DEMO_TIMEOUT_S = 60.0


def find_postgres_bin() -> str | None:
    """The directory holding initdb: PATH first, then /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: [int(x) for x in re.findall(r"\d+", p)])
    return os.path.dirname(versions[-1]) if versions else None


class DemoCluster:
    """initdb + pg_ctl in a temporary directory; `url` connects to it over 127.0.0.1."""

    def __init__(self) -> None:
        self.bin = find_postgres_bin()
        if self.bin is None:
            raise PreconditionError("--demo needs the PostgreSQL server binaries (initdb, pg_ctl): "
                                    "install them, e.g. apt-get install postgresql")
        self.root = tempfile.mkdtemp(prefix="wal2http-demo-")
        self.data = os.path.join(self.root, "data")
        self.port = _free_tcp_port()
        self.user = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self.user = _unprivileged_user()
            os.chmod(self.root, 0o755)
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres?sslmode=disable"

    def _run(self, program: str, *args: str) -> None:
        kwargs = {}
        if self.user:
            kwargs = dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        result = subprocess.run([os.path.join(self.bin, program), *args], capture_output=True,
                                text=True, cwd=self.root, **kwargs)
        if result.returncode:
            raise Wal2HttpError(f"{program} failed: {(result.stderr or result.stdout).strip()[-500:]}")

    def start(self) -> None:
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.root}'\nwal_level = logical\nfsync = off\n")
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "server.log"), "-w", "start")

    def remove(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            with contextlib.suppress(Wal2HttpError):
                self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unprivileged_user():
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PreconditionError("--demo runs as root but found no unprivileged user (postgres, nobody) "
                            "to run PostgreSQL as")


class _CountingSink:
    """Wraps the demo's sink to know when every change made has been delivered."""

    def __init__(self, sink):
        self.sink, self.name, self.batch_size = sink, sink.name, sink.batch_size
        self.delivered = 0
        self.changed = trio.Event()

    async def deliver(self, events):
        await self.sink.deliver(events)
        self.delivered += len(events)
        self.changed.set()
        self.changed = trio.Event()

    async def check(self):
        return await self.sink.check()

    async def aclose(self):
        await self.sink.aclose()


def run_demo(config) -> int:
    logger.info("--demo: starting a throwaway PostgreSQL")
    cluster = DemoCluster()
    try:
        cluster.start()
        demo = dataclasses.replace(config, database_url=cluster.url, conninfo=parse_database_url(cluster.url, {}),
                                   slot_name="wal2http_demo", publications=("wal2http_demo",), create_slot=True)
        trio.run(_demo_session, demo)
    finally:
        cluster.remove()
    logger.info("--demo: done; the throwaway PostgreSQL is stopped and removed")
    return 0


async def _demo_session(config) -> None:
    async with open_pg_connection(config.conninfo, replication=False) as conn:
        for sql in DEMO_SQL:
            await conn.simple_query(sql)
        server_version_num = conn.server_version_num
    alerter = Alerter(config)
    sink = _CountingSink(open_sink(config, alerter))
    stop = trio.Event()
    expected = 0
    try:
        with trio.fail_after(DEMO_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: run(config, sink=sink, stop=stop, task_status=task_status))
                async with open_pg_connection(config.conninfo, replication=False) as conn:
                    for sql, events, since in DEMO_CHANGES:
                        logger.info("--demo: %s", sql)
                        await conn.simple_query(sql)
                        expected += events if server_version_num >= since else 0
                while sink.delivered < expected:
                    await sink.changed.wait()
                stop.set()
    except trio.TooSlowError:
        raise Wal2HttpError(f"--demo: {sink.delivered} of the {expected} events expected arrived within "
                            f"{DEMO_TIMEOUT_S:g} s") from None


# =====================================================================================================
# 23. Command line
# =====================================================================================================

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
GC_THRESHOLDS = (50_000, 20, 100)  #: allocations between young collections (CPython's default: 700)


def tune_runtime() -> None:
    """For the command line's own process: every event allocates a few dicts that reference
    counting frees, yet at CPython's default threshold the cyclic collector runs every 700
    allocations and costs about a tenth of the CPU.  Collect less often, and leave the objects
    made at start-up out of every collection.  `run()` leaves the host process's settings alone."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger("wal2http")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


async def _run_until_signal(config) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        async def watch_signals():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    logger.info("received %s: shutting down", signal.Signals(signum).name)
                    stop.set()
                    return
        nursery.start_soon(watch_signals)
        await run(config, stop=stop)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """The command line: returns the exit code (see the README's table of exit codes)."""
    try:
        config, mode = load_config(list(sys.argv[1:] if argv is None else argv), os.environ)
    except ConfigError as exc:
        print(f"wal2http: {exc}", file=sys.stderr)
        return exc.exit_code
    configure_logging(config.log_level)
    tune_runtime()
    for warning in config_warnings(config):
        logger.warning("%s", warning)
    try:
        if mode == "check":
            return trio.run(run_check, config)
        if mode == "demo":
            return run_demo(config)
        trio.run(_run_until_signal, config)
        return 0
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        error = first_error(exc)
        if isinstance(error, Wal2HttpError):
            logger.error("%s", error)
            return error.exit_code
        if isinstance(error, KeyboardInterrupt):
            return 0
        logger.error("unexpected error", exc_info=error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
