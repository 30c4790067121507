"""Benchmark wal2http against pg_recvlogical on the same WAL (run by hand, not in CI).

    python bench_wal2http.py                 # throughput: pg_recvlogical vs wal2http stdout sink
    python bench_wal2http.py --rows 50000    # fewer rows
    python bench_wal2http.py --latency       # 200 single-row transactions/s for 10 s: p50/p99
    python bench_wal2http.py --http          # also the HTTP sink, batch sizes 1 and 500
    python bench_wal2http.py --http --http-batch 500 --repeat 6   # medians over 6 rounds
    python bench_wal2http.py --scrape        # also: how long a /metrics scrape takes meanwhile
    python bench_wal2http.py --tap           # also: stdout with one live tap client taking everything
    python bench_wal2http.py --concurrency   # DELIVERY_CONCURRENCY against a receiver taking 20 ms
    python bench_wal2http.py --concurrency --receiver-delay-ms 20 100
    python bench_wal2http.py --backfill --repeat 3   # 1,000,000 rows backfilled to stdout, vs COPY

Needs requirements-bench.txt (orjson, for the HTTP receiver; `--receiver-json json` uses the
stdlib's parser instead).

It starts its own throwaway PostgreSQL (like --demo), creates one slot per consumer before the
writes, writes the rows in transactions of 1,000, then lets each consumer drain its slot up to the
same end LSN.  wal2http runs in a child process (so its peak RSS is its own) with the stdout sink
writing to /dev/null, counting events to prove none is missing.  For the HTTP sink a local
receiver parses every body and counts the events.  On a 2-core machine that receiver shares the
cores with wal2http and the walsender, so its CPU lowers the rate measured; it parses with orjson
(the same objects as json.loads, in half the time) to keep that artefact small.  The output gives
each process's CPU time, so where the time went is visible.

--concurrency measures DELIVERY_CONCURRENCY against a receiver that answers every request after a
fixed delay (a slow real receiver), on as many connections as are opened: HTTP_BATCH_SIZE=1 at
concurrency 1, 8, 32 and 64, HTTP_BATCH_SIZE=100 at 1 and 8, each over distinct rows (inserts),
and the worst case, every event an update of the same row (its order allows one request at a
time), at 1 and 32.  Each run gets its own table, publication and slot, sized so that it lasts a
few seconds; its rate counts from the start of the first request to the last event delivered.

--backfill writes a table of --rows rows (1,000,000 by default) like the bench table, vacuums it,
then in each round: psql's `\\copy (SELECT ... ORDER BY id) TO '/dev/null'` of it (the reference:
PostgreSQL sending the same rows in the same order), a wal2http backfill of it (BACKFILL_TABLES,
an empty STATE_FILE, a new slot) to the stdout sink with no writes, and one while single-row
inserts go on into the table at --rate a second; the child counts the read events written and
stops when the backfill is done (and, with the inserts, once those committed until then are
written: their commit-to-written latency is measured as --latency measures it).  Rows/s count
from wal2http's start to the last read event written.  The server's CPU is that of the backends
that exited meanwhile (the backfill's connection and the walsender; the inserts' backend is
measured apart and left out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import trio

import wal2http as w

TABLE_SQL = ("CREATE TABLE bench (id bigserial PRIMARY KEY, name text, amount numeric(12,2), "
             "created_at timestamptz, payload jsonb) WITH (autovacuum_enabled = off)")
INSERT_SQL = ("INSERT INTO bench (name, amount, created_at, payload) SELECT 'name-' || g, g * 1.25, now(), "
              "jsonb_build_object('n', g, 'tag', 'bench', 'ok', true) FROM generate_series(1, {n}) g")


async def _sql(url: str, *statements: str) -> list[tuple]:
    rows: list[tuple] = []
    async with w.open_pg_connection(w.parse_database_url(url, {}), replication=False) as conn:
        for statement in statements:
            rows = await conn.simple_query(statement)
    return rows


def sql(url: str, *statements: str) -> list[tuple]:
    return trio.run(_sql, url, *statements)


# ---------------------------------------------------------------------------------------------------
# The child: wal2http's stdout path to /dev/null, counting events, until the end LSN is confirmed.
# ---------------------------------------------------------------------------------------------------


class _CountingSink(w.StdoutSink):
    """Counts the events written; with `latencies`, appends (commit time, seconds from commit to
    written) of each change; with `count_reads`, also counts a backfill's read events (and notes
    when the last was written).  Events are looked at as text: decoding them would add to what is
    measured."""

    def __init__(self, out, latencies=None, count_reads=False):
        super().__init__(out)
        self.count = 0
        self.latencies = latencies
        self.reads = 0 if count_reads else None
        self.first_read_at = self.last_read_at = 0.0  # perf_counter() when the first, last read event was written

    async def deliver(self, events):
        await super().deliver(events)
        self.count += len(events)
        if self.reads is not None:
            reads = sum(1 for event in events if event.line.find('"op":"read"', 0, 80) > 0)
            if reads:
                self.first_read_at = self.first_read_at or time.perf_counter()
                self.reads += reads
                self.last_read_at = time.perf_counter()
        if self.latencies is not None:
            now = time.time()
            for event in events:
                line = event.line
                start = line.find('"commit_time":"') + 15
                if start > 14:  # a read event has no commit time
                    commit = _epoch(line[start:line.index('"', start)])
                    self.latencies.append((commit, now - commit))


def _epoch(text: str) -> float:
    import datetime
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


async def _child(env: dict, end_lsn: int, expect: int, latency: bool, tap: bool = False,
                 backfill: bool = False) -> dict:
    config, _ = w.load_config([], env)
    w.tune_runtime()  # as `python wal2http.py` does
    latencies = [] if latency else None
    sink = _CountingSink(open(os.devnull, "wb"), latencies, count_reads=backfill)
    if config.event_sink == "http":
        sink = _CountingHttp(w.HttpSink(config))
    stop, stats, cutoff = trio.Event(), w.Stats(config) if backfill else None, float("inf")
    async with trio.open_nursery() as nursery:
        if tap:  # the operations port first, so that the tap client gets every event
            stats = w.Stats(config)
            await nursery.start(w.run_ops_server, config, stats)
            while not stats.tap.clients:
                await trio.sleep(0.001)
            config = dataclasses.replace(config, ops_addr=None)
        started, usage_started = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        ack = await nursery.start(lambda task_status: w.run(config, sink=sink, stop=stop, stats=stats,
                                                            task_status=task_status))
        if backfill:
            print("streaming", flush=True)  # the driver's cue to start writing
            finished, cutoff = await _backfill_done(env["DATABASE_URL"], config, stats, sink, ack, expect, latency)
        else:
            while ack.flushed_lsn < end_lsn or sink.count < expect:
                await trio.sleep(0.005)
            finished = time.perf_counter()
        elapsed = finished - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        stop.set()
        if tap:
            while any(client.unwritten for client in stats.tap.clients):  # the client has had them all
                await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
    first_request_at = getattr(sink, "first_request_at", None)
    result = {"events": sink.count, "seconds": elapsed, "reads": sink.reads if backfill else None,
              "first_read_s": sink.first_read_at - started if backfill else None,
              "delivery_seconds": finished - first_request_at if first_request_at else elapsed,
              "user_seconds": usage.ru_utime - usage_started.ru_utime,
              "system_seconds": usage.ru_stime - usage_started.ru_stime,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    ordered = sorted(seconds for commit, seconds in latencies or () if commit <= cutoff)
    if ordered:
        result.update(latency_events=len(ordered), p50_ms=1000 * ordered[len(ordered) // 2],
                      p99_ms=1000 * ordered[int(len(ordered) * 0.99)], max_ms=1000 * ordered[-1])
    return result


async def _backfill_done(url: str, config, stats, sink: _CountingSink, ack, expect: int,
                         latency: bool) -> tuple[float, float]:
    """Waits until the backfill of BACKFILL_TABLES (one table) is done, its `expect` read events
    (at least) written; with `latency`, then until the changes committed meanwhile are written too.
    Returns when the last read event was written (perf_counter) and when the backfill was seen done
    (time.time: the changes committed until then are those written while a backfill ran)."""
    name = config.backfill_tables[0]
    while name not in stats.backfill.done:
        if name in stats.backfill.refused:
            raise SystemExit(f"the backfill of {name} was refused: {stats.backfill.refused[name]}")
        await trio.sleep(0.005)
    cutoff = time.time()
    if sink.reads < expect:
        raise SystemExit(f"the backfill of {name} is done, but {sink.reads} read events were written, not {expect}")
    if latency:
        (lsn,), = await _sql(url, "SELECT pg_current_wal_lsn()")
        while ack.flushed_lsn < w.parse_lsn(lsn):
            await trio.sleep(0.005)
    return sink.last_read_at, cutoff


class _CountingHttp:
    def __init__(self, sink):
        self.sink, self.name, self.batch_size, self.count = sink, sink.name, sink.batch_size, 0
        self.first_request_at: float | None = None  # perf_counter() when the first request began

    async def deliver(self, events):
        if self.first_request_at is None:
            self.first_request_at = time.perf_counter()
        await self.sink.deliver(events)
        self.count += len(events)

    async def check(self):
        return await self.sink.check()

    async def aclose(self):
        await self.sink.aclose()


def child_command(env: dict, end_lsn: int, expect: int, latency: bool = False, tap: bool = False,
                  backfill: bool = False) -> list[str]:
    spec = {"env": env, "end_lsn": end_lsn, "expect": expect, "latency": latency, "tap": tap, "backfill": backfill}
    return [sys.executable, __file__, "--child", json.dumps(spec)]


def run_child(env: dict, end_lsn: int, expect: int, latency: bool = False, tap: bool = False,
              backfill: bool = False) -> dict:
    command = child_command(env, end_lsn, expect, latency, tap, backfill)
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"wal2http child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# A minimal HTTP receiver that parses every body and counts events (for --http).
# ---------------------------------------------------------------------------------------------------


def start_receiver(parser: str = "json", delay_ms: float = 0.0) -> tuple[subprocess.Popen, int]:
    """A receiver as lean as a Python one gets, so that on a 2-core machine it takes as little CPU
    as possible from wal2http and the walsender: blocking sockets, a thread per connection, HTTP/1.1
    with Content-Length bodies (what wal2http sends), and a full parse of every body (`json.loads`,
    or with `parser="orjson"` orjson's, which builds the same objects in half the time) to count
    events.  With `delay_ms`, each POST is answered that long after it arrived (a slow receiver;
    the connections wait independently, so N requests in flight take one delay, not N)."""
    code = r'''
import socket, sys, threading, time
import {parser} as json
count = 0
DELAY_S = {delay_s}
def handle(conn):
    global count
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            more = conn.recv(1 << 20)
            if not more:
                return
            data += more
        head, _, data = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(data) < length:
            more = conn.recv(max(1 << 20, length - len(data)))
            if not more:
                return
            data += more
        body, data = data[:length], data[length:]
        if head.startswith(b"GET /count "):  # the bench asks how many events arrived
            answer = str(count).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
            continue
        doc = json.loads(body)
        if DELAY_S:
            time.sleep(DELAY_S)
        count += len(doc["events"]) if "events" in doc else 1
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
'''
    if importlib.util.find_spec(parser) is None:
        raise SystemExit(f"the receiver parses with {parser}, which is not installed: "
                         "pip install -r requirements-bench.txt, or use --receiver-json json")
    code = code.replace("{parser}", parser).replace("{delay_s}", repr(delay_ms / 1000))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def start_tap_client(port: int) -> subprocess.Popen:
    """A WebSocket client of GET /events as lean as a Python one gets (a blocking socket, frames
    parsed by hand: the server's frames are unmasked), in its own process: it connects as soon as
    the port listens, counts the text messages until the connection ends, and prints the count and
    the close code (none: wal2http stopped; 1013: it fell behind)."""
    code = r'''
import socket, struct, sys, time
port = int(sys.argv[1])
while True:
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        break
    except OSError:
        time.sleep(0.001)
sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
data = b""
while b"\r\n\r\n" not in data:
    data += sock.recv(65536)
head, _, data = data.partition(b"\r\n\r\n")
assert head.startswith(b"HTTP/1.1 101"), head
print("connected", flush=True)
count, code, pos = 0, None, 0
while code is None:
    more = sock.recv(1 << 20)
    if not more:
        break
    data = data[pos:] + more
    pos = 0
    while len(data) - pos >= 2:
        opcode, size = data[pos] & 15, data[pos + 1] & 127
        start = pos + 2 + (2 if size == 126 else 8 if size == 127 else 0)
        if len(data) < start:
            break
        if size == 126:
            size = struct.unpack_from("!H", data, pos + 2)[0]
        elif size == 127:
            size = struct.unpack_from("!Q", data, pos + 2)[0]
        if len(data) < start + size:
            break
        if opcode == 1:
            count += 1
        elif opcode == 8:
            code = struct.unpack_from("!H", data, start)[0]
            break
        pos = start + size
print(count, code, flush=True)
'''
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE, text=True)
    return proc


def start_scraper(port: int, interval_s: float = 0.1):
    """Scrapes http://127.0.0.1:<port>/metrics every interval_s in a thread (far more often than
    Prometheus would) until `stop()`; returns (stop, durations in seconds, sizes in bytes)."""
    import threading
    import urllib.request  # here, not at the top: the child's peak RSS would count it
    durations: list[float] = []
    sizes: list[int] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.wait(interval_s):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                    sizes.append(len(response.read()))
            except OSError:
                continue  # not listening yet, or already stopped
            durations.append(time.perf_counter() - started)

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join()
    return stop, durations, sizes


def received_events(port: int) -> int:
    """How many events the receiver has parsed so far."""
    import urllib.request  # here, not at the top: the child's peak RSS would count it
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=10) as response:
        return int(response.read())


# ---------------------------------------------------------------------------------------------------


def _process_cpu_s(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of a process (and, with `children`, of its exited children), from
    /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _server_cpu_s(cluster: w.DemoCluster) -> float:
    """CPU seconds of the PostgreSQL server so far, counting backends that have exited: a walsender
    exits when its consumer disconnects, so first wait until the postmaster has reaped it (until its
    only children are its long-lived auxiliary processes)."""
    with open(os.path.join(cluster.data, "postmaster.pid")) as pidfile:
        postmaster = int(pidfile.readline())
    deadline = time.monotonic() + 10
    while not all(_is_auxiliary(pid) for pid in _children(postmaster)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return _process_cpu_s(postmaster, children=True)


def _children(parent: int) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(pid))
        except OSError:
            pass
    return found


_AUXILIARY = (b"postgres: checkpointer", b"postgres: background writer", b"postgres: walwriter",
              b"postgres: autovacuum launcher", b"postgres: logical replication launcher",
              b"postgres: archiver", b"postgres: stats collector")


def _is_auxiliary(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().startswith(_AUXILIARY)
    except OSError:
        return False


def pg_recvlogical(cluster: w.DemoCluster, slot: str, end_lsn: int) -> float:
    binary = os.path.join(cluster.bin, "pg_recvlogical")
    started = time.perf_counter()
    subprocess.run([binary, "-d", cluster.url.replace("sslmode=disable", "sslmode=disable&dbname=postgres"),
                    "--slot", slot, "--start", "-o", "proto_version=1", "-o", "publication_names=bench",
                    "-E", w.format_lsn(end_lsn), "-f", os.devnull, "--no-loop"], check=True)
    return time.perf_counter() - started


def throughput(args) -> None:
    """`--repeat` rounds, each draining its own slots in turn: pg_recvlogical, the stdout sink, and
    with --http the HTTP sink (batch 500; batch 1 in the first round only, it is slow).  Ratios are
    taken within a round, so that a change in the machine's speed between rounds cancels out."""
    cluster = w.DemoCluster()
    try:
        cluster.start()
        url = cluster.url
        batches = [b for b in (1, 500) if args.http and args.http_batch in (None, b)]
        rounds = [["ref", "w2h"] + (["tap"] if args.tap else []) + [f"http{b}" for b in batches if b == 500 or r == 0]
                  for r in range(args.repeat)]
        slots = [f"bench_{c}_{r}" for r, consumers in enumerate(rounds) for c in consumers]
        if len(slots) > 10:  # the default max_replication_slots and max_wal_senders
            sql(url, f"ALTER SYSTEM SET max_replication_slots = {len(slots) + 2}",
                f"ALTER SYSTEM SET max_wal_senders = {len(slots) + 2}")
            cluster._run("pg_ctl", "-D", cluster.data, "-l", os.path.join(cluster.root, "server.log"), "-w", "restart")
        sql(url, TABLE_SQL, "CREATE PUBLICATION bench FOR ALL TABLES",
            *[f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')" for slot in slots])
        started = time.perf_counter()
        sql(url, *[INSERT_SQL.format(n=1000) for _ in range(args.rows // 1000)])
        print(f"wrote {args.rows} rows in {time.perf_counter() - started:.1f} s")
        (end,), = sql(url, "SELECT pg_current_wal_lsn()")
        end_lsn = w.parse_lsn(end)
        env = {"DATABASE_URL": url, "PUB_NAME": "bench", "CREATE_SLOT": "false", "LOG_LEVEL": "WARNING"}
        receiver, port = start_receiver(args.receiver_json) if batches else (None, 0)
        ratios: dict[str, list[float]] = {}
        try:
            for r, consumers in enumerate(rounds):
                if args.repeat > 1:
                    print(f"round {r + 1} of {args.repeat}")
                rates, cpu_seconds = {}, {}
                for consumer in consumers:
                    server_cpu = _server_cpu_s(cluster)
                    receiver_cpu = _process_cpu_s(receiver.pid) if receiver else 0.0
                    slot = f"bench_{consumer}_{r}"
                    if consumer == "ref":
                        seconds = pg_recvlogical(cluster, slot, end_lsn)
                        rates[consumer] = args.rows / seconds
                        print(f"  pg_recvlogical: {seconds:.2f} s, {rates[consumer]:,.0f} changes/s "
                              f"(walsender CPU {_server_cpu_s(cluster) - server_cpu:.2f} s)")
                        continue
                    child_env = {**env, "SLOT_NAME": slot}
                    if consumer.startswith("http"):
                        child_env.update(EVENT_SINK="http", HTTP_ENDPOINT_URL=f"http://127.0.0.1:{port}/hook",
                                         HTTP_BATCH_SIZE=consumer[4:])
                    received = received_events(port) if consumer.startswith("http") else 0
                    scraper = tap = None
                    if consumer == "tap":
                        with socket.socket() as free:
                            free.bind(("127.0.0.1", 0))
                            child_env["OPS_ADDR"] = f"127.0.0.1:{free.getsockname()[1]}"
                        tap = start_tap_client(int(child_env["OPS_ADDR"].rsplit(":", 1)[1]))
                    if args.scrape and consumer == "w2h":
                        with socket.socket() as free:
                            free.bind(("127.0.0.1", 0))
                            child_env["OPS_ADDR"] = f"127.0.0.1:{free.getsockname()[1]}"
                        scraper = start_scraper(int(child_env["OPS_ADDR"].rsplit(":", 1)[1]))
                    result = run_child(child_env, end_lsn, args.rows, tap=tap is not None)
                    if tap:
                        tap_out = tap.communicate(timeout=60)[0].split()
                        print(f"  live tap client: {tap_out[1]} messages, close code {tap_out[2]}")
                    if scraper:
                        stop, durations, sizes = scraper
                        stop()
                        if durations:
                            ordered = sorted(durations)
                            print(f"  /metrics while streaming: {len(ordered)} scrapes of {max(sizes):,} bytes, "
                                  f"p50 {1000 * ordered[len(ordered) // 2]:.1f} ms, "
                                  f"p99 {1000 * ordered[int(len(ordered) * 0.99)]:.1f} ms, "
                                  f"max {1000 * ordered[-1]:.1f} ms")
                    if consumer.startswith("http") and received_events(port) - received != args.rows:
                        raise SystemExit(f"the receiver parsed {received_events(port) - received} events, "
                                         f"not {args.rows}")
                    rates[consumer] = rate = result["events"] / result["seconds"]
                    if consumer == "w2h":
                        name, ratio = "stdout", f"{rate / rates['ref']:.2f}x of pg_recvlogical"
                        ratios.setdefault("stdout / pg_recvlogical", []).append(rate / rates["ref"])
                    elif consumer == "tap":
                        name, ratio = "stdout + 1 tap client", f"{rate / rates['w2h']:.2f}x of stdout"
                        ratios.setdefault("stdout + tap client / stdout", []).append(rate / rates["w2h"])
                        ratios.setdefault("CPU: stdout + tap client / stdout", []).append(
                            (result["user_seconds"] + result["system_seconds"]) / cpu_seconds["w2h"])
                    else:
                        name, ratio = f"http batch={consumer[4:]}", f"{rate / rates['w2h']:.2f}x of stdout"
                        ratios.setdefault(f"http batch={consumer[4:]} / stdout", []).append(rate / rates["w2h"])
                    cpu_seconds[consumer] = result["user_seconds"] + result["system_seconds"]
                    cpu = f"CPU {result['user_seconds']:.2f} s user + {result['system_seconds']:.2f} s system"
                    others = f"walsender CPU {_server_cpu_s(cluster) - server_cpu:.2f} s"
                    if consumer.startswith("http"):
                        others = f"receiver CPU {_process_cpu_s(receiver.pid) - receiver_cpu:.2f} s, " + others
                    print(f"  wal2http {name}: {result['seconds']:.2f} s, {rate:,.0f} events/s ({result['events']} "
                          f"events), {ratio}, peak RSS {result['peak_rss_mb']:.1f} MB, {cpu} ({others})")
        finally:
            if receiver:
                receiver.kill()
        if args.repeat > 1:
            for name, values in ratios.items():
                print(f"{name}: median {statistics.median(values):.2f}x, range {min(values):.2f}-{max(values):.2f}x "
                      f"over {len(values)} rounds")
    finally:
        cluster.remove()


#: --concurrency runs: (label, HTTP_BATCH_SIZE, DELIVERY_CONCURRENCY, every event updates one row)
CONCURRENCY_RUNS = [("rows", 1, 1, False), ("rows", 1, 8, False), ("rows", 1, 32, False),
                    ("rows", 1, 64, False), ("rows", 100, 1, False), ("rows", 100, 8, False),
                    ("one row", 1, 1, True), ("one row", 1, 32, True)]
CONCURRENCY_RUN_S = 3.0  #: each run is sized to last about this long at its ideal rate...
CONCURRENCY_EVENTS = (100, 20_000)  #: ...within these bounds


def concurrency_events(batch: int, concurrency: int, one_row: bool, delay_ms: float) -> int:
    """Events for one run: what its ideal rate (a full batch per request, `concurrency` requests
    per delay; one request per delay when every event is of the same row) gives in
    CONCURRENCY_RUN_S."""
    ideal_rate = (1 if one_row else concurrency) * batch * 1000 / delay_ms
    low, high = CONCURRENCY_EVENTS
    return max(low, min(high, round(ideal_rate * CONCURRENCY_RUN_S)))


def concurrency(args) -> None:
    """For each receiver delay: every run of CONCURRENCY_RUNS on its own table, publication and
    slot (all slots made before the writes), then drained one after the other."""
    cluster = w.DemoCluster()
    try:
        cluster.start()
        for delay_ms in args.receiver_delay_ms:
            _concurrency_table(cluster.url, delay_ms, args.receiver_json)
    finally:
        cluster.remove()


def _concurrency_setup(url: str, runs: list, delay_ms: float) -> list[str]:
    """Tables, publications and slots for the runs, then their writes; returns the slot names.
    Distinct rows: inserts in transactions of up to 1,000; one row: updates of a
    row inserted before the slot was made, 100 per transaction."""
    slots = []
    for index, (_label, batch, conc, one_row, events) in enumerate(runs):
        name = f"d{delay_ms:g}_c{index}_{batch}_{conc}".replace(".", "_")
        ddl = (f"CREATE TABLE {name} (id int PRIMARY KEY, n bigint); INSERT INTO {name} VALUES (1, 0)" if one_row
               else TABLE_SQL.replace("bench", name, 1))
        sql(url, *ddl.split("; "), f"CREATE PUBLICATION {name} FOR TABLE {name}",
            f"SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')")
        slots.append(name)
    for name, (_label, _batch, _conc, one_row, events) in zip(slots, runs):
        if one_row:
            update = f"UPDATE {name} SET n = n + 1 WHERE id = 1; "
            sql(url, *[f"BEGIN; {update * min(100, events - done)}COMMIT" for done in range(0, events, 100)])
        else:
            insert = INSERT_SQL.replace("bench", name, 1)
            sql(url, *[insert.format(n=min(1000, events - done)) for done in range(0, events, 1000)])
    return slots


def _concurrency_table(url: str, delay_ms: float, parser: str) -> None:
    runs = [(label, batch, conc, one_row, concurrency_events(batch, conc, one_row, delay_ms))
            for label, batch, conc, one_row in CONCURRENCY_RUNS]
    slots = _concurrency_setup(url, runs, delay_ms)
    receiver, port = start_receiver(parser, delay_ms)
    print(f"\nreceiver answering after {delay_ms:g} ms:")
    print("| workload | HTTP_BATCH_SIZE | DELIVERY_CONCURRENCY | events | rate (events/s) | ratio to concurrency 1 "
          "| wal2http CPU |")
    print("|---|---|---|---|---|---|---|")
    base: dict[int, float] = {}
    try:
        for slot, (label, batch, conc, one_row, events) in zip(slots, runs):
            env = {"DATABASE_URL": url, "PUB_NAME": slot, "SLOT_NAME": slot, "CREATE_SLOT": "false",
                   "LOG_LEVEL": "WARNING", "EVENT_SINK": "http", "HTTP_BATCH_SIZE": str(batch),
                   "DELIVERY_CONCURRENCY": str(conc), "HTTP_ENDPOINT_URL": f"http://127.0.0.1:{port}/hook"}
            received = received_events(port)
            result = run_child(env, 0, events)  # until the last event is delivered, not acknowledged
            if received_events(port) - received != events:
                raise SystemExit(f"the receiver parsed {received_events(port) - received} events, not {events}")
            rate = events / result["delivery_seconds"]
            base.setdefault(batch, rate)  # the first run of each batch size is its concurrency 1
            kind = "same row, updates" if one_row else "distinct rows"
            cpu = result["user_seconds"] + result["system_seconds"]
            print(f"| {kind} | {batch} | {conc} | {events:,} | {rate:,.0f} | {rate / base[batch]:.1f}x "
                  f"| {cpu:.2f} s |", flush=True)
    finally:
        receiver.kill()
        sql(url, *[f"SELECT pg_drop_replication_slot('{slot}')" for slot in slots])


def latency(args) -> None:
    cluster = w.DemoCluster()
    try:
        cluster.start()
        url = cluster.url
        sql(url, TABLE_SQL, "CREATE PUBLICATION bench FOR ALL TABLES",
            "SELECT pg_create_logical_replication_slot('bench_lat', 'pgoutput')")
        env = {"DATABASE_URL": url, "SLOT_NAME": "bench_lat", "PUB_NAME": "bench", "CREATE_SLOT": "false",
               "LOG_LEVEL": "WARNING"}
        total = args.rate * args.seconds
        child = subprocess.Popen(child_command(env, 0, total, latency=True), stdout=subprocess.PIPE, text=True)
        time.sleep(2)  # let it connect before the first commit (start-up is not what we measure)
        trio.run(_write_paced, url, args.rate, lambda written: written < total)
        out, _ = child.communicate(timeout=120)
        result = json.loads(out.splitlines()[-1])
        print(f"latency commit->written: p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms "
              f"over {result['events']} single-row transactions at {args.rate}/s")
    finally:
        cluster.remove()


async def _write_paced(url: str, rate: int, more: Callable[[int], bool]) -> tuple[int, float]:
    """Single-row transactions, `rate` a second, while `more(transactions written so far)`;
    returns how many were written and the CPU seconds their backend took."""
    async with w.open_pg_connection(w.parse_database_url(url, {}), replication=False) as conn:
        (pid,), = await conn.simple_query("SELECT pg_backend_pid()")
        start, written = trio.current_time(), 0
        while more(written):
            await trio.sleep_until(start + written / rate)
            await conn.simple_query(INSERT_SQL.format(n=1))
            written += 1
        return written, _process_cpu_s(int(pid))


# ---------------------------------------------------------------------------------------------------
# --backfill: a table's existing rows as read events, beside PostgreSQL's own COPY of them.
# ---------------------------------------------------------------------------------------------------

#: The reference: what PostgreSQL takes to send the same rows, in the same order, to a client.
COPY_SQL = r"\copy (SELECT id, name, amount, created_at, payload FROM bench ORDER BY id) TO '/dev/null'"


def backfill(args) -> None:
    """`--repeat` rounds, each: the COPY reference, a backfill with no writes, then one while
    single-row inserts (--rate a second, as --latency) go on, each backfill by a new wal2http (a
    new slot, an empty STATE_FILE).  Ratios are taken within a round."""
    cluster, state_dir = w.DemoCluster(), tempfile.mkdtemp(prefix="bench-backfill-")
    try:
        cluster.start()
        _backfill_table(cluster.url, args.rows)
        figures: dict[str, list[float]] = {}
        for r in range(args.repeat):
            load = " ".join(f"{value:.2f}" for value in os.getloadavg())
            print(f"round {r + 1} of {args.repeat} (load average {load})")
            copy_rate = _copy_reference(cluster, args.rows)
            figures.setdefault("COPY: rows/s", []).append(copy_rate)
            for concurrent in (False, True):
                result = _backfill_run(cluster, args, os.path.join(state_dir, "state.json"), f"bf_{r}_{concurrent:d}",
                                       concurrent)
                kind = "with inserts" if concurrent else "alone"
                rate = result["reads"] / result["seconds"]
                figures.setdefault(f"backfill {kind}: rows/s", []).append(rate)
                figures.setdefault(f"backfill {kind} / COPY", []).append(rate / copy_rate)
                figures.setdefault(f"backfill {kind}: peak RSS MB", []).append(result["peak_rss_mb"])
                if concurrent:
                    figures.setdefault("inserts while backfilling: p50 ms", []).append(result["p50_ms"])
                    figures.setdefault("inserts while backfilling: p99 ms", []).append(result["p99_ms"])
        if args.repeat > 1:
            for name, values in figures.items():
                low, median, high = (f"{v:,.0f}" if v >= 1000 else f"{v:.2f}"
                                     for v in (min(values), statistics.median(values), max(values)))
                print(f"{name}: median {median}, range {low}-{high} over {len(values)} rounds")
    finally:
        cluster.remove()
        shutil.rmtree(state_dir, ignore_errors=True)


def _backfill_table(url: str, rows: int) -> None:
    """The bench table with `rows` rows, vacuumed (hint bits set, visibility map and statistics
    made), so that neither the reference nor a backfill pays for the load; and its publication."""
    started = time.perf_counter()
    sql(url, TABLE_SQL, "CREATE PUBLICATION bench FOR TABLE bench",
        *[INSERT_SQL.format(n=min(10_000, rows - done)) for done in range(0, rows, 10_000)],
        "VACUUM (FREEZE, ANALYZE) bench", "CHECKPOINT")
    (size,), = sql(url, "SELECT pg_size_pretty(pg_total_relation_size('bench'))")
    print(f"wrote {rows:,} rows ({size}) in {time.perf_counter() - started:.1f} s")


def _copy_reference(cluster: w.DemoCluster, rows: int) -> float:
    """psql's \\copy of the table's rows in key order to /dev/null, timed; returns rows/s."""
    server_cpu, client = _server_cpu_s(cluster), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([os.path.join(cluster.bin, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", cluster.url,
                    "-c", COPY_SQL], check=True)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    psql_cpu = usage.ru_utime + usage.ru_stime - client.ru_utime - client.ru_stime
    print(f"  COPY (SELECT ... ORDER BY id) TO STDOUT via psql: {seconds:.2f} s, {rows / seconds:,.0f} rows/s "
          f"(backend CPU {_server_cpu_s(cluster) - server_cpu:.2f} s, psql CPU {psql_cpu:.2f} s)")
    return rows / seconds


def _backfill_run(cluster: w.DemoCluster, args, state_file: str, slot: str, concurrent: bool) -> dict:
    """One wal2http backfilling the bench table to the stdout sink (to /dev/null) on a new slot,
    with `concurrent` single-row inserts meanwhile (whose latency it measures); prints the figures
    and returns the child's."""
    url = cluster.url
    with contextlib.suppress(FileNotFoundError):
        os.remove(state_file)  # else the table, recorded as done, is not backfilled again
    sql(url, f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
    env = {"DATABASE_URL": url, "PUB_NAME": "bench", "SLOT_NAME": slot, "CREATE_SLOT": "false",
           "LOG_LEVEL": "WARNING", "BACKFILL_TABLES": "public.bench", "STATE_FILE": state_file}
    if args.chunk_rows:
        env["BACKFILL_CHUNK_ROWS"] = str(args.chunk_rows)
    server_cpu, inserts = _server_cpu_s(cluster), ""
    if concurrent:
        child = subprocess.Popen(child_command(env, 0, args.rows, latency=True, backfill=True),
                                 stdout=subprocess.PIPE, text=True)
        if child.stdout.readline() != "streaming\n":
            raise SystemExit(f"wal2http child failed (exit {child.wait()})")
        written, writer_cpu = trio.run(_write_paced, url, args.rate, lambda _: child.poll() is None)
        out, _ = child.communicate()
        if child.returncode:
            raise SystemExit(f"wal2http child failed (exit {child.returncode})")
        result = json.loads(out.splitlines()[-1])
        inserts = (f"; {written} inserts at {args.rate}/s, commit->written while backfilling: p50 "
                   f"{result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms "
                   f"over {result['latency_events']}, their backend's CPU {writer_cpu:.2f} s")
    else:
        result, writer_cpu = run_child(env, 0, args.rows, backfill=True), 0.0
    server = _server_cpu_s(cluster) - server_cpu - writer_cpu
    sql(url, f"SELECT pg_drop_replication_slot('{slot}')",
        f"DELETE FROM bench WHERE id > {args.rows}", "VACUUM bench")  # the table as it was
    print(f"  wal2http backfill {'with inserts' if concurrent else 'alone'}: {result['seconds']:.2f} s, "
          f"{result['reads'] / result['seconds']:,.0f} rows/s ({result['reads']:,} read events, the first "
          f"{result['first_read_s']:.2f} s after start), peak RSS "
          f"{result['peak_rss_mb']:.1f} MB, CPU {result['user_seconds']:.2f} s user + "
          f"{result['system_seconds']:.2f} s system (backfill backend + walsender CPU {server:.2f} s){inserts}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, help="rows written (default 200,000; with --backfill 1,000,000)")
    parser.add_argument("--backfill", action="store_true",
                        help="a table of --rows rows backfilled to stdout, alone and beside inserts, against COPY")
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--http-batch", type=int, choices=(1, 500), help="with --http: only this batch size")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the throughput comparison")
    parser.add_argument("--receiver-json", choices=("orjson", "json"), default="orjson",
                        help="the HTTP receiver's JSON parser: orjson (requirements-bench.txt) or the stdlib's")
    parser.add_argument("--concurrency", action="store_true",
                        help="DELIVERY_CONCURRENCY 1-64 against a receiver that answers after a delay")
    parser.add_argument("--receiver-delay-ms", type=float, nargs="+", default=[20.0],
                        help="with --concurrency: the receiver's delay per request (several: one table each)")
    parser.add_argument("--chunk-rows", type=int, help="with --backfill: BACKFILL_CHUNK_ROWS (default: wal2http's)")
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--scrape", action="store_true",
                        help="with the stdout sink: scrape /metrics every 0.1 s and report how long it takes")
    parser.add_argument("--tap", action="store_true",
                        help="also the stdout sink with one live tap client (GET /events) taking every event")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows is None:
        args.rows = 1_000_000 if args.backfill else 200_000
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(trio.run(_child, spec["env"], spec["end_lsn"], spec["expect"], spec["latency"],
                                  spec["tap"], spec["backfill"])))
    elif args.backfill:
        backfill(args)
    elif args.latency:
        latency(args)
    elif args.concurrency:
        concurrency(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
