"""wal2http: stream PostgreSQL row changes to stdout, a webhook or Hook0.

(Skeleton: the module docstring, table of contents and sections are filled in as parts land.)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import glob
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import stringprep
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata

import trio

__version__ = "0.1.0"

logger = logging.getLogger("wal2http")


# =====================================================================================================
# 2. Errors
# =====================================================================================================
# One root class.  Only the I/O code turns OSError / trio.BrokenResourceError into these.


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
    """Retries are exhausted and ON_FAILURE=exit (exit 3)."""

    exit_code = 3


class SinkAuthError(PreconditionError):
    """The sink rejected our credentials (HTTP 401/403 from Hook0): exit 4, never retried."""


# =====================================================================================================
# 4. Wire codec (sans-IO)
# =====================================================================================================
# Frontend/Backend protocol v3 ("Message Formats" in the PostgreSQL docs).  Pure functions from
# values to bytes and back; `MessageBuffer` splits a byte stream into backend messages.  Nothing
# here touches a socket.

PROTOCOL_VERSION_3 = 196608  #: 3.0, the StartupMessage version
SSL_REQUEST_CODE = 80877103  #: SSLRequest's magic "version"
MAX_BACKEND_MESSAGE_BYTES = 1 << 30  #: the server never sends a message larger than 1 GiB

# Backend message tags.
AUTHENTICATION = ord("R")
PARAMETER_STATUS = ord("S")
BACKEND_KEY_DATA = ord("K")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
ROW_DESCRIPTION = ord("T")
DATA_ROW = ord("D")
COMMAND_COMPLETE = ord("C")
EMPTY_QUERY_RESPONSE = ord("I")
COPY_BOTH_RESPONSE = ord("W")
COPY_OUT_RESPONSE = ord("H")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
NEGOTIATE_PROTOCOL_VERSION = ord("v")
NOTIFICATION_RESPONSE = ord("A")

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

#: ErrorResponse / NoticeResponse field codes worth naming in logs.
ERROR_FIELD_NAMES = {"S": "severity", "V": "severity", "C": "sqlstate", "M": "message", "D": "detail",
                     "H": "hint", "P": "position", "W": "where", "F": "file", "L": "line", "R": "routine"}


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
    """

    def __init__(self) -> None:
        self._data = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._data):
            self._data.clear()
            self._pos = 0
        elif self._pos > 65536:
            del self._data[:self._pos]
            self._pos = 0
        self._data += data

    def next_message(self) -> tuple[int, bytes] | None:
        data, pos = self._data, self._pos
        if len(data) - pos < 5:
            return None
        tag, length = _HEADER.unpack_from(data, pos)
        if length < 4 or length > MAX_BACKEND_MESSAGE_BYTES:
            raise ProtocolError(f"malformed message from server: {chr(tag)!r} with length {length}")
        end = pos + 1 + length
        if len(data) < end:
            return None
        self._pos = end
        return tag, bytes(data[pos + 5:end])

    def pending(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._data) - self._pos

    def take_raw(self) -> bytes:
        """Everything not yet parsed (used once, after SSLRequest's one-byte answer)."""
        rest = bytes(self._data[self._pos:])
        self._data.clear()
        self._pos = 0
        return rest


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


def decode_command_complete(body: bytes) -> str:
    return _split_cstrings(body, "CommandComplete")[0]


def format_lsn(lsn: int) -> str:
    """An LSN the way PostgreSQL prints it: high and low 32 bits in upper-case hex."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


# =====================================================================================================
# 5. Authentication (pure)
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
        salted = hashlib.pbkdf2_hmac("sha256", self._password, base64.b64decode(salt), int(iterations))
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


# =====================================================================================================
# 6. Replication framing (sans-IO)
# =====================================================================================================
# Inside CopyData during START_REPLICATION ("Streaming Replication Protocol"): XLogData 'w' and
# Primary keepalive 'k' from the server, Standby status update 'r' from us.  Times are
# microseconds since 2000-01-01 UTC.

XLOG_DATA = ord("w")
PRIMARY_KEEPALIVE = ord("k")
STANDBY_STATUS_UPDATE = b"r"
PG_EPOCH_OFFSET_US = 946_684_800_000_000  #: 2000-01-01 minus 1970-01-01, in microseconds

_XLOG_DATA_HEADER = struct.Struct("!BQQQ")
_KEEPALIVE = struct.Struct("!BQQB")
_STATUS_UPDATE = struct.Struct("!cQQQQB")


def decode_xlog_header(data: bytes) -> tuple[int, int]:
    """XLogData: (wal_start, wal_end); the pgoutput message follows at offset 25."""
    if len(data) < _XLOG_DATA_HEADER.size:
        raise ProtocolError("malformed XLogData message: truncated header")
    _, wal_start, wal_end, _ = _XLOG_DATA_HEADER.unpack_from(data)
    return wal_start, wal_end


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
# 12. PostgreSQL connection (I/O)
# =====================================================================================================
# The thin I/O layer over the codec: TCP or Unix socket, SSLRequest and TLS with libpq's sslmode
# semantics, the authentication exchange, simple queries.  This is the only section that turns
# OSError, trio.BrokenResourceError and timeouts into ConnectionLost.

RECEIVE_BYTES = 256 * 1024  #: one socket read
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


def classify_server_error(error: ServerError, context: str) -> Wal2HttpError:
    """Turn an ErrorResponse into what the caller should do: retry, exit 4, or fail."""
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


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


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
        """The next message that is not a notice (notices are logged) or parameter status."""
        while True:
            message = self.buffer.next_message()
            if message is None:
                self.buffer.feed(await self.receive_some())
                continue
            tag, body = message
            if tag == NOTICE_RESPONSE:
                fields = decode_error_fields(body, "NoticeResponse")
                logger.info("PostgreSQL %s: %s", fields.get("S", "NOTICE"), fields.get("M", ""))
            elif tag == PARAMETER_STATUS:
                name, value = decode_parameter_status(body)
                self.parameters[name] = value
            elif tag == NOTIFICATION_RESPONSE:
                continue
            else:
                return tag, body

    async def simple_query(self, sql: str, timeout_s: float = DEFAULT_QUERY_TIMEOUT_S) -> list[tuple]:
        """Run one statement; returns its rows (tuples of str or None). ServerError on failure."""
        await self.send(encode_query(sql))
        rows: list[tuple] = []
        error = None
        with trio.move_on_after(timeout_s) as scope:
            while True:
                tag, body = await self.receive_message()
                if tag == DATA_ROW:
                    rows.append(decode_data_row(body))
                elif tag == ERROR_RESPONSE:
                    error = ServerError(decode_error_fields(body))
                elif tag == READY_FOR_QUERY:
                    break
                elif tag not in (ROW_DESCRIPTION, COMMAND_COMPLETE, EMPTY_QUERY_RESPONSE):
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
        if conninfo.host.startswith("/"):
            return await trio.open_unix_socket(f"{conninfo.host}/.s.PGSQL.{conninfo.port}")
        return await trio.open_tcp_stream(conninfo.host, conninfo.port)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to PostgreSQL at {_where(conninfo)}: {exc.strerror or exc}") from None


def _where(conninfo) -> str:
    if conninfo.host.startswith("/"):
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
    sni = host if (verify == "full" or not _is_ip_address(host)) else None
    tls = trio.SSLStream(stream, _ssl_context(conninfo, verify), server_hostname=sni)
    try:
        await tls.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        raise AuthenticationError(f"TLS verification of PostgreSQL at {_where(conninfo)} failed "
                                  f"(sslmode={conninfo.sslmode}): {exc.verify_message}") from None
    except _IO_ERRORS as exc:
        raise ConnectionLost(f"TLS handshake with PostgreSQL at {_where(conninfo)} failed: {exc}") from None
    return tls


async def _authenticate(conn: PgConnection) -> None:
    """From StartupMessage to ReadyForQuery: answer whatever authentication the server asks."""
    info, scram = conn.conninfo, None
    while True:
        tag, body = await conn.receive_message()
        if tag == READY_FOR_QUERY:
            return
        if tag == ERROR_RESPONSE:
            raise classify_server_error(ServerError(decode_error_fields(body)),
                                        f"PostgreSQL refused the connection as user {info.user!r}")
        if tag == BACKEND_KEY_DATA:
            conn.backend_pid = _INT32.unpack_from(body)[0] if len(body) >= 4 else 0
            continue
        if tag == NEGOTIATE_PROTOCOL_VERSION:
            continue
        if tag != AUTHENTICATION:
            raise ProtocolError(f"unexpected message {chr(tag)!r} during authentication")
        code, rest = decode_authentication(body)
        if code == AUTH_OK:
            continue
        if code not in (AUTH_SASL_CONTINUE, AUTH_SASL_FINAL) and info.password is None:
            raise AuthenticationError(f"PostgreSQL asks a password for user {info.user!r}: put it in "
                                      "DATABASE_URL or PGPASSWORD")
        if code == AUTH_CLEARTEXT_PASSWORD:
            await conn.send(encode_password(info.password.encode()))
        elif code == AUTH_MD5_PASSWORD:
            await conn.send(encode_password(build_md5_password(info.user, info.password, rest[:4])))
        elif code == AUTH_SASL:
            if SCRAM_MECHANISM not in decode_sasl_mechanisms(rest):
                raise AuthenticationError(f"no supported SASL mechanism among {decode_sasl_mechanisms(rest)}")
            scram = ScramClient(info.password)
            await conn.send(encode_sasl_initial_response(SCRAM_MECHANISM, scram.client_first()))
        elif code == AUTH_SASL_CONTINUE and scram:
            await conn.send(encode_sasl_response(scram.client_final(rest)))
        elif code == AUTH_SASL_FINAL and scram:
            scram.verify_server_final(rest)
        else:
            raise AuthenticationError(f"unsupported authentication request {code} from PostgreSQL")


def build_startup_parameters(conninfo, replication: bool) -> dict[str, str]:
    params = {"user": conninfo.user, "database": conninfo.dbname,
              "application_name": conninfo.application_name, **SESSION_SETTINGS}
    if replication:
        params["replication"] = "database"
    return params


@contextlib.asynccontextmanager
async def open_pg_connection(conninfo, *, replication: bool = True):
    """An authenticated connection, closed on exit.  Honours sslmode like libpq."""
    conn = None
    try:
        with trio.fail_after(conninfo.connect_timeout_s):
            conn = await _connect(conninfo, replication)
    except trio.TooSlowError:
        raise ConnectionLost(f"cannot connect to PostgreSQL at {_where(conninfo)}: "
                             f"no answer within connect_timeout={conninfo.connect_timeout_s:g} s") from None
    try:
        yield conn
    finally:
        await conn.aclose()


async def _connect(conninfo, replication: bool) -> PgConnection:
    mode = "disable" if conninfo.host.startswith("/") else conninfo.sslmode  # libpq: no TLS on Unix sockets
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
# 13. Replication loop
# =====================================================================================================
# One connection = one nursery with three tasks linked by a bounded channel:
#   reader    socket -> MessageBuffer -> XLogData -> ChangeAssembler -> Chunk -> channel
#   delivery  channel -> ReliableSink.deliver -> AckTracker.delivered
#   feedback  AckTracker -> Standby status update, every FEEDBACK_INTERVAL_SECS
# Keepalives are answered by the reader.  A lost connection ends the nursery; `run` reconnects with
# backoff and the stream resumes from the last acknowledged position, so everything not confirmed
# by the sink is delivered again (at-least-once, same ids).

CHANNEL_CHUNKS = 8  #: chunks buffered between reader and delivery (each at most CHUNK_EVENTS events)
CHUNK_EVENTS = 1000  #: events per chunk of a large transaction
SPILL_BYTES = 16 * 1024 * 1024  #: a streamed transaction spills to a temporary file past this size
LIVENESS_PING_S = 10.0  #: ask the server for a keepalive this often, to notice a dead peer
READ_IDLE_TIMEOUT_S = 35.0  #: no byte from the server for this long: the connection is lost
SHUTDOWN_TIMEOUT_S = 10.0  #: at SIGINT/SIGTERM, wait this long for the delivery in flight
RECONNECT_BASE_S = 1.0  #: first delay before reconnecting to PostgreSQL
RECONNECT_MAX_S = 30.0  #: longest delay between reconnection attempts
BATCH_LINGER_S = 0.05  #: longest wait for a partial HTTP batch to fill
COALESCE_READ_BELOW_BYTES = 16 * 1024  #: after a read smaller than this, let the server batch...
COALESCE_READ_S = 0.002  #: ...for this long before reading again (fewer wake-ups on both sides)


def pgoutput_proto_version(server_version_num: int) -> int:
    """The highest pgoutput protocol version the server speaks (v2 PG14, v3 PG15, v4 PG16+)."""
    for version, minimum in ((4, 160000), (3, 150000), (2, 140000)):
        if server_version_num >= minimum:
            return version
    return 1


def build_start_replication(config, proto_version: int, start_lsn: int) -> str:
    names = ",".join(quote_ident(name) for name in config.publications)
    options = [f"proto_version '{proto_version}'", f"publication_names {quote_literal(names)}"]
    if proto_version >= 1:
        options.append("messages 'true'")
    if proto_version >= 2:
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

    def queued(self) -> None:
        self.in_flight += 1

    def delivered(self, end_lsn: int | None) -> None:
        self.in_flight -= 1
        if end_lsn is not None and end_lsn > self.flushed_lsn:
            self.flushed_lsn = end_lsn

    def received(self, wal_end: int) -> None:
        if wal_end > self.received_lsn:
            self.received_lsn = wal_end

    def keepalive(self, wal_end: int, assembler_idle: bool) -> None:
        self.received(wal_end)
        if assembler_idle and self.in_flight == 0 and wal_end > self.flushed_lsn:
            self.flushed_lsn = wal_end

    def discard_in_flight(self) -> None:
        """After a lost connection: what was queued will be streamed again."""
        self.in_flight = 0

    def status_update(self, reply_requested: bool = False) -> bytes:
        write = max(self.received_lsn, self.flushed_lsn)
        return encode_standby_status(write, self.flushed_lsn, self.flushed_lsn,
                                     time.time_ns() // 1000, reply_requested)


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


async def ensure_slot(conn: PgConnection, config) -> bool:
    """Check the slot (pgoutput, this database); create it when CREATE_SLOT allows.  True if created."""
    rows = await conn.simple_query(
        "SELECT plugin, slot_type, database FROM pg_catalog.pg_replication_slots "
        f"WHERE slot_name = {quote_literal(config.slot_name)}")
    if rows:
        plugin, slot_type, database = rows[0]
        if slot_type != "logical" or plugin != "pgoutput":
            raise PreconditionError(f"replication slot {config.slot_name!r} (SLOT_NAME) uses "
                                    f"{plugin or slot_type!r}, not pgoutput: drop it or choose another SLOT_NAME")
        if database != conn.conninfo.dbname:
            raise PreconditionError(f"replication slot {config.slot_name!r} (SLOT_NAME) belongs to "
                                    f"database {database!r}, not {conn.conninfo.dbname!r}")
        return False
    if not config.create_slot:
        raise PreconditionError(
            f"replication slot {config.slot_name!r} (SLOT_NAME) does not exist and CREATE_SLOT=false: "
            f"create it with SELECT pg_create_logical_replication_slot({quote_literal(config.slot_name)}, 'pgoutput');")
    await conn.simple_query(f"CREATE_REPLICATION_SLOT {quote_ident(config.slot_name)} LOGICAL pgoutput NOEXPORT_SNAPSHOT")
    logger.info("created replication slot %r", config.slot_name)
    return True


async def prepare_replication(conn: PgConnection, config) -> None:
    """Every precondition of streaming, with errors that say what to fix."""
    try:
        await check_wal_level(conn)
        await check_publications(conn, config.publications)
        await ensure_slot(conn, config)
    except ServerError as exc:
        raise classify_server_error(exc, "preparing replication") from None


async def start_streaming(conn: PgConnection, config, start_lsn: int) -> int:
    """START_REPLICATION; returns the pgoutput protocol version in use."""
    proto = pgoutput_proto_version(conn.server_version_num)
    if config.streaming and proto < 2:
        logger.warning("STREAMING=true needs PostgreSQL 14 or later; streaming large transactions is off")
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

    def __init__(self, conn: PgConnection, assembler, ack: AckTracker, send_channel):
        self.conn = conn
        self.assembler = assembler
        self.ack = ack
        self.send_channel = send_channel

    async def run_reader(self) -> None:
        conn, buffer = self.conn, self.conn.buffer
        while True:
            with trio.move_on_after(READ_IDLE_TIMEOUT_S) as scope:
                data = await conn.receive_some()
            if scope.cancelled_caught:
                raise ConnectionLost(f"no data from PostgreSQL for {READ_IDLE_TIMEOUT_S:g} s")
            buffer.feed(data)
            while (message := buffer.next_message()) is not None:
                await self.handle_message(*message)
            if len(data) < COALESCE_READ_BELOW_BYTES:
                await trio.sleep(COALESCE_READ_S)

    async def handle_message(self, tag: int, body: bytes) -> None:
        if tag == COPY_DATA and body and body[0] == XLOG_DATA:
            wal_start, wal_end = decode_xlog_header(body)
            self.ack.received(wal_end)
            for chunk in self.assembler.feed(wal_start, body[25:]):
                self.ack.queued()
                await self.send_channel.send(chunk)
        elif tag == COPY_DATA and body and body[0] == PRIMARY_KEEPALIVE:
            wal_end, reply = decode_keepalive(body)
            idle = not self.assembler.in_transaction and not self.assembler.open_streams
            self.ack.keepalive(wal_end, idle)
            if reply:
                await self.conn.send(self.ack.status_update())
        elif tag == ERROR_RESPONSE:
            raise classify_server_error(ServerError(decode_error_fields(body)), "replication stream")
        elif tag == NOTICE_RESPONSE:
            fields = decode_error_fields(body, "NoticeResponse")
            logger.info("PostgreSQL %s: %s", fields.get("S", "NOTICE"), fields.get("M", ""))
        elif tag == PARAMETER_STATUS:
            name, value = decode_parameter_status(body)
            self.conn.parameters[name] = value
        elif tag == COPY_DONE:
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
    """Takes chunks in order, delivers them in batches of up to the sink's batch size, and tells
    the AckTracker which chunks are confirmed.  A batch may span chunks and transactions."""

    def __init__(self, sink, ack: AckTracker, batch_size: int, linger_s: float):
        self.sink = sink
        self.ack = ack
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.events: list[dict] = []
        self.marks: list[tuple[int, int | None]] = []  # (events in self.events after the chunk, end_lsn)
        self.stopping = False
        self.in_flight: trio.Event | None = None  # set when the batch being delivered is confirmed

    async def run(self, receive_channel) -> None:
        async with receive_channel:
            while not self.stopping:
                chunk = await self._next_chunk(receive_channel)
                if chunk is None:
                    await self._flush(len(self.events))
                    continue
                self.events.extend(chunk.events)
                self.marks.append((len(self.events), chunk.end_lsn))
                while len(self.events) >= self.batch_size and not self.stopping:
                    await self._flush(self.batch_size)

    async def finish(self, timeout_s: float) -> None:
        """At shutdown: take no new chunk, let the batch in flight finish (bounded)."""
        self.stopping = True
        if self.in_flight is not None:
            with trio.move_on_after(timeout_s):
                await self.in_flight.wait()

    async def _next_chunk(self, receive_channel):
        """The next chunk; None when a partial batch should go out now."""
        if not self.marks:
            return await receive_channel.receive()
        try:
            return receive_channel.receive_nowait()
        except trio.WouldBlock:
            if not self.linger_s:
                return None
        with trio.move_on_after(self.linger_s):
            return await receive_channel.receive()
        return None

    async def _flush(self, count: int) -> None:
        batch = self.events[:count]
        self.in_flight = trio.Event()
        if batch:
            await self.sink.deliver(batch)
        del self.events[:count]
        confirmed = 0
        for after, end_lsn in self.marks:
            if after > count:
                break
            self.ack.delivered(end_lsn)
            confirmed += 1
        self.marks = [(after - count, lsn) for after, lsn in self.marks[confirmed:]]
        self.in_flight.set()
        self.in_flight = None


async def run_session(config, sink, ack: AckTracker, stop: trio.Event, on_streaming=None) -> None:
    """One connection from connect to stop or failure.  Returns only after `stop` was set."""
    async with open_pg_connection(config.conninfo) as conn:
        await prepare_replication(conn, config)
        await start_streaming(conn, config, ack.flushed_lsn)
        if on_streaming:
            on_streaming()
        assembler = ChangeAssembler(chunk_events=CHUNK_EVENTS, spill_bytes=SPILL_BYTES)
        send_channel, receive_channel = trio.open_memory_channel(CHANNEL_CHUNKS)
        linger = BATCH_LINGER_S if sink.batch_size > 1 and sink.name != "stdout" else 0.0
        delivery = DeliveryLoop(sink, ack, sink.batch_size, linger)
        stream = ReplicationStream(conn, assembler, ack, send_channel)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_feedback, conn, ack, config.feedback_interval_s)
                nursery.start_soon(delivery.run, receive_channel)
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


async def run_replication(config, sink, stop: trio.Event, task_status=trio.TASK_STATUS_IGNORED) -> AckTracker:
    """Stream until `stop` is set, reconnecting with backoff when the connection is lost."""
    ack, delay, started = AckTracker(), RECONNECT_BASE_S, False

    def on_streaming():
        nonlocal delay, started
        delay = RECONNECT_BASE_S
        if not started:
            started = True
            task_status.started(ack)

    while not stop.is_set():
        try:
            await run_session(config, sink, ack, stop, on_streaming)
            return ack
        except Exception as exc:  # noqa: BLE001 - sorted below; anything not retryable propagates
            error = first_error(exc)
            if not isinstance(error, ConnectionLost):
                raise error from None
            logger.warning("%s; reconnecting in %.1f s", error, delay)
        with trio.move_on_after(delay):
            await stop.wait()
        delay = min(delay * 2, RECONNECT_MAX_S)
    return ack


# =====================================================================================================
# 11a. stdout sink
# =====================================================================================================

_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def encode_event_lines(events: list[dict]) -> bytes:
    """JSON Lines: one compact object per event, each line ending in a newline."""
    return ("\n".join(map(_encode_json, events)) + "\n").encode()


class StdoutSink:
    """JSON lines on stdout (or any binary file), flushed before delivery is confirmed.

    The write is synchronous: a stdout consumer that stops reading stalls the stream, which then
    resumes where it was; nothing is confirmed before it is written and flushed.
    """

    name = "stdout"
    batch_size = 5000

    def __init__(self, out=None):
        self.out = out if out is not None else sys.stdout.buffer

    async def deliver(self, events: list[dict]) -> None:
        try:
            self.out.write(encode_event_lines(events))
            self.out.flush()
        except OSError as exc:
            raise DeliveryError(f"cannot write to stdout: {exc}", retryable=False) from None

    async def check(self) -> str:
        return "stdout is writable" if not self.out.closed else "stdout is closed"

    async def aclose(self) -> None:
        pass


def open_sink(config, alerter):
    """The sink EVENT_SINK names (already resolved by the priority rule)."""
    if config.event_sink == "http":
        return HttpSink(config)
    if config.event_sink == "hook0":
        return Hook0Sink(config, alerter)
    return StdoutSink()


# =====================================================================================================
# 14. Service, --check
# =====================================================================================================


async def run(config, *, sink=None, stop: trio.Event | None = None,
              task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run wal2http until `stop` is set (or forever).  `sink` replaces the configured one.

    task_status.started() is called once streaming has begun, with the AckTracker.
    Raises DeliveryFailed (ON_FAILURE=exit), PreconditionError, or another Wal2HttpError.
    """
    stop = stop or trio.Event()
    alerter = Alerter(config)
    sink = sink or open_sink(config, alerter)
    logger.info("wal2http %s starting: %s", __version__, describe_config(config))
    async with trio.open_nursery() as nursery:
        await nursery.start(alerter.run)
        try:
            await run_replication(config, ReliableSink(sink, config, alerter), stop, task_status)
        finally:
            with trio.CancelScope(shield=True):
                await sink.aclose()
                await alerter.drain(ALERT_DRAIN_TIMEOUT_S)
        nursery.cancel_scope.cancel()


ALERT_DRAIN_TIMEOUT_S = 15.0  #: at exit, how long queued alert mails may take to go out


async def run_check(config, out=None) -> int:
    """--check: one line per check on stdout; 0 when all pass, 4 otherwise."""
    out = out or sys.stdout
    results: list[tuple[str, str | None]] = []
    try:
        with trio.fail_after(config.conninfo.connect_timeout_s):
            async with open_pg_connection(config.conninfo) as conn:
                results.append(("connect", None))
                await _check_database(conn, config, results)
    except trio.TooSlowError:
        results.append(("connect", f"no answer within {config.conninfo.connect_timeout_s:g} s"))
    except Wal2HttpError as exc:
        results.append(("connect", str(exc)))
    results.append(await _check_one(f"sink {config.event_sink}", config.conninfo.connect_timeout_s,
                                    _check_sink(config)))
    if email_enabled(config):
        results.append(await _check_one("email", config.conninfo.connect_timeout_s, check_smtp(config)))
    for name, failure in results:
        print(f"ok {name}" if failure is None else f"FAIL {name}: {failure}", file=out, flush=True)
    return 0 if all(failure is None for _, failure in results) else 4


async def _check_one(name: str, timeout_s: float, awaitable) -> tuple[str, str | None]:
    try:
        with trio.fail_after(timeout_s):
            await awaitable
        return name, None
    except trio.TooSlowError:
        return name, f"no answer within {timeout_s:g} s"
    except Wal2HttpError as exc:
        return name, str(exc)


async def _check_sink(config) -> None:
    sink = open_sink(config, Alerter(config))
    try:
        await sink.check()
    finally:
        await sink.aclose()


async def _check_database(conn: PgConnection, config, results: list) -> None:
    checks = [
        ("wal_level", check_wal_level(conn)),
        ("replication privilege", _check_privilege(conn)),
        (f"publication {','.join(config.publications)}", check_publications(conn, config.publications)),
        (f"slot {config.slot_name}", _check_slot(conn, config)),
    ]
    for name, awaitable in checks:
        try:
            await awaitable
            results.append((name, None))
        except ServerError as exc:
            results.append((name, str(classify_server_error(exc, name))))
        except Wal2HttpError as exc:
            results.append((name, str(exc)))


async def _check_privilege(conn: PgConnection) -> None:
    (allowed,), = await conn.simple_query(
        "SELECT rolreplication OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user")
    if allowed != "t":
        raise PreconditionError(f"user {conn.conninfo.user!r} lacks the REPLICATION privilege: "
                                f"ALTER ROLE {quote_ident(conn.conninfo.user)} REPLICATION;")


async def _check_slot(conn: PgConnection, config) -> None:
    """Like ensure_slot, but never creates: a missing slot passes when CREATE_SLOT=true."""
    try:
        await ensure_slot(conn, dataclasses.replace(config, create_slot=False))
    except PreconditionError as exc:
        if not (config.create_slot and "does not exist" in str(exc)):
            raise


# =====================================================================================================
# 15. --demo: a throwaway PostgreSQL
# =====================================================================================================
# Runs the real thing end to end against a cluster made with initdb in a temporary directory, run
# as an unprivileged user when we are root (PostgreSQL refuses to run as root), removed at the end.

DEMO_SQL = [
    "CREATE TABLE demo_orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount numeric(12,2),"
    " tags text[], meta jsonb, created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE PUBLICATION wal2http_demo FOR ALL TABLES",
]
DEMO_CHANGES = [  # (statement, events it makes)
    ("INSERT INTO demo_orders (customer, amount, tags, meta) VALUES ('ada', 19.90, '{new,web}', "
     "'{\"source\": \"demo\"}'), ('grace', 5.00, NULL, NULL)", 2),
    ("UPDATE demo_orders SET amount = 21.50, meta = '{\"paid\": true}' WHERE customer = 'ada'", 1),
    ("SELECT pg_logical_emit_message(true, 'wal2http.demo', 'hello from --demo')", 1),
    ("DELETE FROM demo_orders WHERE customer = 'grace'", 1),
    ("TRUNCATE demo_orders", 1),
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
    alerter = Alerter(config)
    sink = _CountingSink(open_sink(config, alerter))
    stop = trio.Event()
    with trio.fail_after(DEMO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run(config, sink=sink, stop=stop, task_status=task_status))
            expected = 0
            async with open_pg_connection(config.conninfo, replication=False) as conn:
                for sql, events in DEMO_CHANGES:
                    logger.info("--demo: %s", sql)
                    await conn.simple_query(sql)
                    expected += events
            while sink.delivered < expected:
                await sink.changed.wait()
            stop.set()


# =====================================================================================================
# 16. Command line
# =====================================================================================================

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    """The command line: returns the exit code (CONTRACT.md section 1)."""
    try:
        config, mode = load_config(list(sys.argv[1:] if argv is None else argv), os.environ)
    except ConfigError as exc:
        print(f"wal2http: {exc}", file=sys.stderr)
        return exc.exit_code
    configure_logging(config.log_level)
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
