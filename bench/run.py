#!/usr/bin/env python3
"""teos-mailer benchmark: throughput, NOTIFY latency and memory.

Prints a Markdown table of figures (not a pass/fail test) and writes it to
bench/results.md. See bench/README.md for what is measured and how.

Python 3.11 standard library only, plus the `psql` CLI (and `mysql` for MariaDB),
Postfix's `smtp-sink`/`smtp-source`, and cargo to build the release binary.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "teos-mailer"
RESULTS = ROOT / "bench" / "results.md"

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
MY_HOST, MY_PORT, MY_USER = "127.0.0.1", 3306, "root"

DRAIN_ROWS = 20_000
BACKLOG_ROWS = 100_000
CONCURRENCY = 16
RAW_SESSIONS = 16
RAW_MSG_BYTES = 2000
# ~2 KB of 7-bit text in 76-character lines, so that it goes out as is (no encoding).
BODY_LINE = "0123456789" * 7 + "abcdef"
BODY_LINES = 26
BODY = (BODY_LINE + "\n") * BODY_LINES  # 2002 characters
TO_ADDRS = '["ann@example.com"]'
# The same body as an SQL expression for PostgreSQL.
PG_BODY = f"repeat(repeat('0123456789', 7) || 'abcdef' || chr(10), {BODY_LINES})"

SAMPLE_EVERY = 0.05  # RSS sampling period, seconds
CPU_SCAN_EVERY = 0.25  # period of the /proc scan for database backends, seconds
CLK_TCK = os.sysconf("SC_CLK_TCK")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z\s*")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

TARGET_RAW_FRACTION = 0.50
TARGET_IDLE_RSS_MB = 20
TARGET_BACKLOG_RSS_MB = 64


class BenchError(Exception):
    pass


class Interrupted(Exception):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# /proc helpers


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a live process in kB; empty once it is gone or a zombie."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def proc_cpu_split(pid: int) -> tuple[int, int] | None:
    """(utime, stime) of a process, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rfind(")") + 2 :].split()
    return int(fields[11]), int(fields[12])


def proc_cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks."""
    split = proc_cpu_split(pid)
    return sum(split) if split else None


def pids_by_comm(names: tuple[str, ...]) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as f:
                if f.read().strip() in names:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def pg_backends_of(db: str) -> list[int]:
    """PostgreSQL backend processes connected to database `db` (their process title)."""
    pids = []
    for pid in pids_by_comm(("postgres",)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f" {db} " in title:
            pids.append(pid)
    return pids


class CpuTracker:
    """CPU seconds of the database side and of smtp-sink during a run. PostgreSQL: the backends of our database (new processes; the last reading of
    each is kept, so a backend that exits loses at most one scan period). MariaDB: the
    whole mariadbd process (it is shared, so this includes other clients)."""

    def __init__(self, pg_db: str | None = None, mariadb: bool = False, sink_pid: int | None = None):
        self.pg_db = pg_db
        self.pg_last: dict[int, tuple[int, int]] = {}
        self.maria_pids = pids_by_comm(("mariadbd", "mysqld")) if mariadb else []
        self.maria_start = sum(proc_cpu_ticks(p) or 0 for p in self.maria_pids)
        self.sink_pid = sink_pid
        self.sink_start = proc_cpu_ticks(sink_pid) if sink_pid else None
        self.last_scan = 0.0
        self.result: dict[str, float] = {}

    def scan(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_scan < CPU_SCAN_EVERY:
            return
        self.last_scan = now
        if self.pg_db:
            for pid in set(pg_backends_of(self.pg_db)) | set(self.pg_last):
                ticks = proc_cpu_split(pid)
                if ticks is not None:
                    self.pg_last[pid] = max(ticks, self.pg_last.get(pid, (0, 0)))

    def finish(self) -> dict[str, float]:
        self.scan(force=True)
        res: dict[str, float] = {}
        if self.pg_db:
            res["db_cpu_s"] = sum(sum(v) for v in self.pg_last.values()) / CLK_TCK
            res["db_sys_s"] = sum(v[1] for v in self.pg_last.values()) / CLK_TCK
            res["db_backends"] = len(self.pg_last)
        if self.maria_pids:
            res["db_cpu_s"] = (sum(proc_cpu_ticks(p) or 0 for p in self.maria_pids) - self.maria_start) / CLK_TCK
        if self.sink_pid and self.sink_start is not None:
            res["sink_cpu_s"] = ((proc_cpu_ticks(self.sink_pid) or self.sink_start) - self.sink_start) / CLK_TCK
        self.result = res
        return res


@dataclass
class Exit:
    code: int | None  # None: still running when the deadline passed
    rusage: object | None = None
    peak_rss_kb: int = 0  # largest VmRSS sample / VmHWM seen
    last_rss_kb: int = 0


class Daemon:
    """A teos-mailer process we started. Waits with wait4 (exact peak RSS and CPU time
    from the kernel) while sampling VmRSS every 50 ms."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log_path: Path):
        self.log_path = log_path
        self.log_file = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [str(BIN), *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=self.log_file, stderr=subprocess.STDOUT,
        )
        self.started = time.monotonic()
        self.peak_rss_kb = 0
        self.last_rss_kb = 0
        self.samples: list[tuple[float, int]] = []
        self.exit: Exit | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sample(self) -> None:
        st = proc_status(self.pid)
        if "VmRSS" in st:
            self.last_rss_kb = st["VmRSS"]
            self.samples.append((time.monotonic() - self.started, st["VmRSS"]))
            self.peak_rss_kb = max(self.peak_rss_kb, st["VmRSS"], st.get("VmHWM", 0))

    def poll(self) -> bool:
        """True once the process has exited (and was reaped by us)."""
        if self.exit is not None:
            return True
        pid, status, ru = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return False
        code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code
        self.peak_rss_kb = max(self.peak_rss_kb, ru.ru_maxrss)  # kB on Linux
        self.exit = Exit(code, ru, self.peak_rss_kb, self.last_rss_kb)
        self.log_file.close()
        return True

    def supervise(self, seconds: float, tracker: CpuTracker | None = None, until=None) -> bool:
        """Samples until the process exits (True), `until()` is true or `seconds`
        pass (False)."""
        deadline = time.monotonic() + seconds
        next_check = 0.0
        while True:
            if self.poll():
                return True
            self.sample()
            if tracker:
                tracker.scan()
            now = time.monotonic()
            if until is not None and now >= next_check:
                next_check = now + 0.25
                if until():
                    return False
            if now >= deadline:
                return False
            time.sleep(SAMPLE_EVERY)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, wait up to `grace` s, then SIGKILL. Returns the exit code."""
        if self.poll():
            return self.exit.code
        os.kill(self.pid, signal.SIGTERM)
        if not self.supervise(grace):
            log(f"teos-mailer {self.pid} did not stop within {grace:.0f} s of SIGTERM; killing it")
            os.kill(self.pid, signal.SIGKILL)
            self.supervise(10)
            return None
        return self.exit.code

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []


def daemon_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEOS_MAILER__") and k != "RUST_LOG"}
    env.update(
        TEOS_MAILER__DATABASE__URL=url,
        TEOS_MAILER__DELIVERY__CONCURRENCY=str(CONCURRENCY),
        TEOS_MAILER__LOG__LEVEL="warn",
    )
    return env


def mailer(args: list[str], url: str, cwd: Path, timeout: float = 120) -> str:
    r = subprocess.run([str(BIN), *args], env=daemon_env(url), cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise BenchError(f"teos-mailer {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r.stdout


# ---------------------------------------------------------------------------------------
# Databases


def psql(db: str, sql: str, timeout: float = 300) -> str:
    r = subprocess.run(
        ["psql", "-X", "-q", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1", "-h", PG_HOST,
         "-p", str(PG_PORT), "-U", PG_USER, "-d", db, "-c", sql],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if r.returncode != 0:
        raise BenchError(f"psql on {db} failed: {r.stderr.strip()}\n  SQL: {sql[:300]}")
    return r.stdout.strip()


def mysql(db: str | None, sql: str, timeout: float = 300) -> str:
    cmd = ["mysql", "-h", MY_HOST, "-P", str(MY_PORT), "-u", MY_USER, "-N", "-B", "-e", sql]
    if db:
        cmd.append(db)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise BenchError(f"mysql failed: {r.stderr.strip()}\n  SQL: {sql[:300]}")
    return r.stdout.strip()


class Target:
    """One fresh database (or SQLite file) for one run."""

    kind = ""
    url = ""

    def create(self) -> None: ...
    def insert(self, n: int) -> None: ...
    def after_insert(self) -> None: ...
    def status_counts(self) -> dict[str, int]: ...
    def sent_span(self) -> tuple[int, float]: ...  # (sent rows, seconds first → last sent_at)
    def sent_count(self) -> int: ...
    def sent_times(self) -> list[float]: ...  # sent_at of every sent row, seconds, ascending
    def drop(self) -> None: ...
    def xacts(self) -> int | None:
        return None


class PgTarget(Target):
    kind = "PostgreSQL"

    def __init__(self, name: str):
        self.name = name
        self.url = f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
        self.created = False

    def create(self) -> None:
        psql("postgres", f"CREATE DATABASE {self.name}")
        self.created = True

    def insert(self, n: int) -> None:
        psql(self.name,
             "INSERT INTO mail_outbox (to_addrs, subject, body_text) "
             f"SELECT '{TO_ADDRS}', 'Bench message ' || g, {PG_BODY} FROM generate_series(1, {n}) AS g")

    def after_insert(self) -> None:
        # Steady state: autovacuum would have analysed a table this size within a
        # minute. The checkpoint keeps the insert's dirty pages out of the timed run.
        psql(self.name, "VACUUM ANALYZE mail_outbox")
        psql(self.name, "CHECKPOINT")

    def status_counts(self) -> dict[str, int]:
        out = psql(self.name, "SELECT status, count(*) FROM mail_outbox GROUP BY status")
        return {s: int(c) for s, c in (line.split("|") for line in out.splitlines() if line)}

    def sent_span(self) -> tuple[int, float]:
        out = psql(self.name, "SELECT count(*), COALESCE(extract(epoch FROM max(sent_at) - min(sent_at)), 0) "
                              "FROM mail_outbox WHERE status = 'sent'")
        n, span = out.split("|")
        return int(n), float(span)

    def sent_count(self) -> int:
        return int(psql(self.name, "SELECT count(*) FROM mail_outbox WHERE status = 'sent'"))

    def sent_times(self) -> list[float]:
        out = psql(self.name, "SELECT extract(epoch FROM sent_at) FROM mail_outbox WHERE status = 'sent' ORDER BY 1")
        return [float(x) for x in out.split()]

    def xacts(self) -> int | None:
        out = psql(self.name, f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{self.name}'")
        return int(out) if out else None

    def drop(self) -> None:
        if self.created:
            psql("postgres", f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
            self.created = False


class SqliteTarget(Target):
    kind = "SQLite"

    def __init__(self, path: Path):
        self.path = path
        self.url = f"sqlite://{path}"  # absolute path: sqlite:///tmp/…/bench.db

    def create(self) -> None:
        pass  # `teos-mailer migrate` creates the file

    def connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        con.execute("PRAGMA busy_timeout = 30000")
        return con

    def insert(self, n: int) -> None:
        con = self.connect()
        try:
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("BEGIN")
            con.execute(
                "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?) "
                "INSERT INTO mail_outbox (to_addrs, subject, body_text) "
                "SELECT ?, 'Bench message ' || n, ? FROM g", (n, TO_ADDRS, BODY))
            con.execute("COMMIT")
        finally:
            con.close()

    def after_insert(self) -> None:
        con = self.connect()
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()

    def query(self, sql: str):
        con = self.connect()
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()

    def status_counts(self) -> dict[str, int]:
        return {s: c for s, c in self.query("SELECT status, count(*) FROM mail_outbox GROUP BY status")}

    def sent_span(self) -> tuple[int, float]:
        n, span = self.query("SELECT count(*), COALESCE((julianday(max(sent_at)) - julianday(min(sent_at))) * 86400.0, 0) "
                             "FROM mail_outbox WHERE status = 'sent'")[0]
        return int(n), float(span)

    def sent_times(self) -> list[float]:
        return [r[0] for r in self.query(
            "SELECT julianday(sent_at) * 86400.0 FROM mail_outbox WHERE status = 'sent' ORDER BY 1")]

    def sent_count(self) -> int:
        return self.query("SELECT count(*) FROM mail_outbox WHERE status = 'sent'")[0][0]

    def drop(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass


class MariaTarget(Target):
    kind = "MariaDB"

    def __init__(self, name: str):
        self.name = name
        self.url = f"mysql://{MY_USER}@{MY_HOST}:{MY_PORT}/{name}"
        self.created = False

    def create(self) -> None:
        mysql(None, f"CREATE DATABASE {self.name}")
        self.created = True

    def insert(self, n: int) -> None:
        body = f"REPEAT(CONCAT(REPEAT('0123456789', 7), 'abcdef', CHAR(10)), {BODY_LINES})"
        mysql(self.name,
              "INSERT INTO mail_outbox (to_addrs, subject, body_text) "
              f"SELECT '{TO_ADDRS}', CONCAT('Bench message ', seq), {body} FROM seq_1_to_{n}")

    def after_insert(self) -> None:
        mysql(self.name, "ANALYZE TABLE mail_outbox")

    def status_counts(self) -> dict[str, int]:
        out = mysql(self.name, "SELECT status, count(*) FROM mail_outbox GROUP BY status")
        return {s: int(c) for s, c in (line.split("\t") for line in out.splitlines() if line)}

    def sent_span(self) -> tuple[int, float]:
        out = mysql(self.name, "SELECT count(*), COALESCE(TIMESTAMPDIFF(MICROSECOND, min(sent_at), max(sent_at)), 0) / 1e6 "
                               "FROM mail_outbox WHERE status = 'sent'")
        n, span = out.split("\t")
        return int(n), float(span)

    def sent_times(self) -> list[float]:
        out = mysql(self.name, "SELECT UNIX_TIMESTAMP(sent_at) FROM mail_outbox WHERE status = 'sent' ORDER BY 1")
        return [float(x) for x in out.split()]

    def sent_count(self) -> int:
        return int(mysql(self.name, "SELECT count(*) FROM mail_outbox WHERE status = 'sent'"))

    def drop(self) -> None:
        if self.created:
            mysql(None, f"DROP DATABASE IF EXISTS {self.name}")
            self.created = False


# ---------------------------------------------------------------------------------------
# SMTP sink and raw rate


def free_port() -> int:
    for port in range(25250, 25300):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise BenchError("no free port in 127.0.0.1:25250-25299")


class Sink:
    def __init__(self, tmp: Path):
        self.port = free_port()
        cmd = ["smtp-sink"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        # PIPELINING is announced by default; no -d/-D: nothing is written to disk.
        cmd += ["-m", "256", f"127.0.0.1:{self.port}", "4096"]
        self.err = open(tmp / "smtp-sink.log", "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.err)
        for _ in range(100):  # up to 5 s
            if self.proc.poll() is not None:
                raise BenchError(f"smtp-sink exited with {self.proc.returncode}; see {tmp / 'smtp-sink.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                    if c.recv(100).startswith(b"220"):
                        c.sendall(b"QUIT\r\n")
                        break
            except OSError:
                time.sleep(0.05)
        else:
            raise BenchError("smtp-sink did not answer within 5 s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.err.close()


def smtp_source_rate(port: int, reuse: bool, n: int) -> float:
    cmd = ["smtp-source", "-s", str(RAW_SESSIONS)] + (["-d"] if reuse else []) + [
        "-m", str(n), "-l", str(RAW_MSG_BYTES), "-f", "a@x.test", "-t", "b@y.test", f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise BenchError(f"smtp-source failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return n / dt


# ---------------------------------------------------------------------------------------
# Phases


@dataclass
class DrainRun:
    kind: str
    rep: int
    rows: int
    wall_s: float = 0.0
    rate: float = 0.0
    span_s: float = 0.0
    span_rate: float = 0.0
    sent: int = 0
    statuses: dict = field(default_factory=dict)
    exit_code: int | None = None
    peak_rss_mb: float = 0.0
    daemon_cpu_s: float = 0.0
    daemon_sys_s: float = 0.0
    cpu: dict = field(default_factory=dict)
    xacts_per_msg: float | None = None
    log_lines: list = field(default_factory=list)
    timed_out: bool = False
    insert_s: float = 0.0
    fifths: list = field(default_factory=list)  # msg/s in each fifth of the sent rows
    load_before: str = "?"


class Bench:
    def __init__(self, args):
        self.args = args
        self.tag = f"teos_bench_{os.getpid()}"
        self.tmp = Path(tempfile.mkdtemp(prefix="teos-bench-"))
        self.targets: list[Target] = []
        self.daemons: list[Daemon] = []
        self.sink: Sink | None = None
        self.rows: list[tuple[str, str, str, str]] = []
        self.notes: list[str] = []
        self.t_start = time.monotonic()
        self.raw_reuse = 0.0
        self.raw_new = 0.0

    # -- bookkeeping -------------------------------------------------------------------

    def remaining(self) -> float:
        return self.args.budget - (time.monotonic() - self.t_start)

    def row(self, figure: str, value: str, target: str = "—", ratio: str = "—") -> None:
        self.rows.append((figure, value, target, ratio))

    def note(self, text: str) -> None:
        log(text)
        self.notes.append(text)

    def new_target(self, t: Target) -> Target:
        self.targets.append(t)
        return t

    def start_daemon(self, args: list[str], url: str, name: str) -> Daemon:
        d = Daemon(args, daemon_env(url), self.tmp, self.tmp / f"{name}.log")
        self.daemons.append(d)
        return d

    def daemon_problems(self, d: Daemon, name: str) -> list[str]:
        """Summarises what the daemon logged at level warn: kinds of line, counted."""
        lines = [ANSI.sub("", l).strip() for l in d.log_lines()]
        lines = [l for l in lines if l]
        if lines:
            kinds: dict[str, list] = {}
            for line in lines:
                text = TIMESTAMP.sub("", line)
                key = re.sub(r"\d+(\.\d+)?", "N", text)[:90]
                kinds.setdefault(key, [0, text])[0] += 1
            top = sorted(kinds.values(), key=lambda kv: -kv[0])[:3]
            self.note(f"{name}: teos-mailer wrote {len(lines)} line(s) at level warn: "
                      + "; ".join(f"{n}× `{text[:220]}`" for n, text in top))
        return lines

    def prepare(self, t: Target, rows: int) -> float:
        t.create()
        mailer(["migrate"], t.url, self.tmp)
        mailer(["settings", "set-relay", "--host", "127.0.0.1", "--port", str(self.sink.port),
                "--security", "none", "--general-sender", "bench@teos.test",
                "--reception-sender", "rec@teos.test"], t.url, self.tmp)
        t0 = time.monotonic()
        if rows:
            t.insert(rows)
        took = time.monotonic() - t0
        t.after_insert()
        return took

    # -- phases ------------------------------------------------------------------------

    def build(self) -> None:
        if self.args.no_build:
            if not BIN.exists():
                raise BenchError(f"{BIN} does not exist; run without --no-build")
            log(f"using the existing {BIN} (--no-build)")
            return
        log("cargo build --release --locked (a few minutes when not built yet)")
        t0 = time.monotonic()
        r = subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise BenchError("cargo build --release --locked failed:\n" + r.stderr[-4000:])
        log(f"built in {time.monotonic() - t0:.0f} s")

    def raw(self) -> None:
        n = self.args.rows
        reuse, new = [], []
        for i in range(self.args.reps):
            reuse.append(smtp_source_rate(self.sink.port, True, n))
            new.append(smtp_source_rate(self.sink.port, False, n))
            log(f"smtp-source run {i + 1}: {reuse[-1]:,.0f} msg/s with -d, {new[-1]:,.0f} msg/s one connection per message")
        self.raw_reuse = statistics.median(reuse)
        self.raw_new = statistics.median(new)
        self.row(f"smtp-source → smtp-sink, {RAW_SESSIONS} sessions reusing connections (-d), {n:,} × {RAW_MSG_BYTES} B",
                 f"{self.raw_reuse:,.0f} msg/s (runs {fmt_runs(reuse)})", "reference", "1.00")
        self.row(f"smtp-source → smtp-sink, {RAW_SESSIONS} sessions, one connection per message",
                 f"{self.raw_new:,.0f} msg/s (runs {fmt_runs(new)})", "reference",
                 f"{self.raw_new / self.raw_reuse:.2f} of -d")

    def drain_once(self, t: Target, rep: int, timeout: float) -> DrainRun:
        rows = self.args.rows
        run = DrainRun(t.kind, rep, rows)
        run.insert_s = self.prepare(t, rows)
        x0 = t.xacts()
        run.load_before = loadavg1()
        tracker = CpuTracker(pg_db=t.name if isinstance(t, PgTarget) else None,
                             mariadb=isinstance(t, MariaTarget), sink_pid=self.sink.pid)
        name = f"drain-{t.kind.lower()}-{rep}"
        t0 = time.monotonic()
        d = self.start_daemon(["run", "--until-idle"], t.url, name)
        done = d.supervise(timeout, tracker)
        run.wall_s = time.monotonic() - t0
        if not done:
            run.timed_out = True
            self.note(f"{name}: still running after {timeout:.0f} s; sending SIGTERM")
            d.stop()
        cpu = tracker.finish()
        run.cpu = cpu
        run.exit_code = d.exit.code if d.exit else None
        ru = d.exit.rusage if d.exit else None
        run.daemon_cpu_s = (ru.ru_utime + ru.ru_stime) if ru else 0.0
        run.daemon_sys_s = ru.ru_stime if ru else 0.0
        run.peak_rss_mb = d.peak_rss_kb / 1024
        run.statuses = t.status_counts()
        run.sent, run.span_s = t.sent_span()
        run.rate = run.sent / run.wall_s if run.wall_s else 0.0
        run.fifths = rate_by_fifth(t.sent_times())
        run.span_rate = (run.sent - 1) / run.span_s if run.span_s > 0 else 0.0
        x1 = t.xacts()
        if x0 is not None and x1 is not None and run.sent:
            run.xacts_per_msg = (x1 - x0) / run.sent
        run.log_lines = self.daemon_problems(d, name)
        if run.exit_code != 0:
            self.note(f"{name}: teos-mailer exited with {run.exit_code}")
        if run.statuses.get("sent", 0) != rows:
            self.note(f"{name}: expected {rows:,} rows 'sent', found {run.statuses}")
        db_cpu = cpu.get("db_cpu_s")
        log(f"{name}: {run.sent:,} sent in {run.wall_s:.2f} s = {run.rate:,.0f} msg/s "
            f"(first→last sent_at {run.span_rate:,.0f} msg/s); peak RSS {run.peak_rss_mb:.1f} MB; "
            f"CPU s: teos-mailer {run.daemon_cpu_s:.2f}, db {db_cpu if db_cpu is not None else float('nan'):.2f}, "
            f"smtp-sink {cpu.get('sink_cpu_s', 0):.2f}; load average before {run.load_before}"
            + (f"; {run.xacts_per_msg:.2f} PostgreSQL transactions per message" if run.xacts_per_msg else "")
            + f"; msg/s per fifth of the rows: {fmt_runs(run.fifths)}")
        return run

    def drains(self, kind: str, make) -> list[DrainRun]:
        runs = []
        for rep in range(1, self.args.reps + 1):
            left = self.remaining()
            if runs and left < 2 * max(r.wall_s for r in runs) + 30:
                self.note(f"{kind}: stopped after {len(runs)} run(s), the time budget is nearly used up")
                break
            t = self.new_target(make(rep))
            try:
                runs.append(self.drain_once(t, rep, timeout=max(30.0, min(self.args.drain_timeout, left))))
            finally:
                t.drop()
        return runs

    def report_drains(self, kind: str, runs: list[DrainRun], target: bool) -> None:
        if not runs:
            return
        rate = statistics.median(r.rate for r in runs)
        ratio = rate / self.raw_reuse if self.raw_reuse else 0.0
        all_sent = all(r.statuses.get("sent", 0) == r.rows and not r.timed_out for r in runs)
        check = "all sent" if all_sent else "NOT all sent: " + "; ".join(
            f"run {r.rep}: {r.statuses}" + (" after SIGTERM at the drain timeout" if r.timed_out else "")
            for r in runs if r.statuses.get("sent", 0) != r.rows or r.timed_out)
        codes = sorted({r.exit_code for r in runs}, key=str)
        check += "; exit status " + "/".join(str(c) for c in codes)
        self.row(f"{kind}: drain {self.args.rows:,} rows, `run --until-idle`, concurrency {CONCURRENCY} (median of {len(runs)})",
                 f"{rate:,.0f} msg/s (runs {fmt_runs([r.rate for r in runs])}; {check})",
                 f"≥ {TARGET_RAW_FRACTION:.0%} of raw = {TARGET_RAW_FRACTION * self.raw_reuse:,.0f} msg/s" if target else "—",
                 f"{ratio:.1%} of raw")
        self.row(f"{kind}: drain rate between first and last `sent_at` (median)",
                 f"{statistics.median(r.span_rate for r in runs):,.0f} msg/s", "—",
                 f"{statistics.median(r.span_rate for r in runs) / self.raw_reuse:.1%} of raw" if self.raw_reuse else "—")
        mid = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]
        if mid.fifths:
            self.row(f"{kind}: msg/s in each fifth of the rows, by `sent_at` (median run)",
                     fmt_runs(mid.fifths), "—",
                     f"last ÷ first fifth {mid.fifths[-1] / mid.fifths[0]:.2f}" if mid.fifths[0] else "—")
        self.row(f"{kind}: peak RSS during the drain (median)",
                 f"{statistics.median(r.peak_rss_mb for r in runs):.1f} MB", "—", "—")
        cpu_parts = [f"teos-mailer {statistics.median(r.daemon_cpu_s for r in runs):.2f} "
                     f"(of which kernel {statistics.median(r.daemon_sys_s for r in runs):.2f})"]
        if all("db_cpu_s" in r.cpu for r in runs):
            label = "postgres backends" if kind == "PostgreSQL" else "mariadbd (whole server)"
            part = f"{label} {statistics.median(r.cpu['db_cpu_s'] for r in runs):.2f}"
            if all("db_sys_s" in r.cpu for r in runs):
                part += f" (of which kernel {statistics.median(r.cpu['db_sys_s'] for r in runs):.2f})"
            cpu_parts.append(part)
        cpu_parts.append(f"smtp-sink {statistics.median(r.cpu.get('sink_cpu_s', 0) for r in runs):.2f}")
        cpu_parts.append("1-min load average before each run " + " / ".join(r.load_before for r in runs))
        per_msg = f"{statistics.median(r.daemon_cpu_s / max(1, r.sent) for r in runs) * 1e6:,.0f} µs teos-mailer"
        if all("db_cpu_s" in r.cpu for r in runs):
            per_msg += f" + {statistics.median(r.cpu['db_cpu_s'] / max(1, r.sent) for r in runs) * 1e6:,.0f} µs database"
        self.row(f"{kind}: CPU seconds per drain (median)", ", ".join(cpu_parts), "—", per_msg + " CPU per message")
        if all(r.xacts_per_msg for r in runs):
            self.row(f"{kind}: database transactions per message (pg_stat_database)",
                     f"{statistics.median(r.xacts_per_msg for r in runs):.2f}", "—", "—")

    def latency(self) -> None:
        t = self.new_target(PgTarget(f"{self.tag}_lat"))
        try:
            self.prepare(t, 0)
            d = self.start_daemon(["run"], t.url, "latency")
            d.supervise(self.args.idle_wait)
            if d.exit:
                raise BenchError(f"teos-mailer run exited early with {d.exit.code}: {' | '.join(d.log_lines()[-5:])}")
            idle_rss_mb = proc_status(d.pid).get("VmRSS", 0) / 1024
            log(f"idle RSS after {self.args.idle_wait:.0f} s: {idle_rss_mb:.1f} MB")
            self.row(f"PostgreSQL: idle RSS of `teos-mailer run` (VmRSS after {self.args.idle_wait:.0f} s, empty outbox)",
                     f"{idle_rss_mb:.1f} MB", f"≤ {TARGET_IDLE_RSS_MB} MB", f"{idle_rss_mb / TARGET_IDLE_RSS_MB:.2f} of target")

            rate, secs = self.args.latency_rate, self.args.latency_secs
            n = int(rate * secs)
            feeder = subprocess.Popen(
                ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", t.name],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                t0 = time.monotonic()
                for i in range(n):
                    due = t0 + i / rate
                    while True:  # sleep to the next slot while sampling the daemon
                        now = time.monotonic()
                        if now >= due:
                            break
                        d.sample()
                        time.sleep(min(SAMPLE_EVERY, due - now))
                    feeder.stdin.write(
                        "INSERT INTO mail_outbox (to_addrs, subject, body_text) VALUES "
                        f"('{TO_ADDRS}', 'Latency {i}', {PG_BODY});\n")
                    feeder.stdin.flush()
                feeder.stdin.close()
                feeder.wait(30)
            finally:
                if feeder.poll() is None:
                    feeder.kill()
                    feeder.wait(5)
            if feeder.returncode != 0:
                raise BenchError(f"psql feeding the inserts failed: {feeder.stderr.read()[-500:]}")
            d.supervise(15, until=lambda: t.sent_count() >= n)
            sent = t.sent_count()
            out = psql(t.name, """
                SELECT count(*),
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
                       max(ms)
                FROM (SELECT extract(epoch FROM sent_at - created_at) * 1000 AS ms
                      FROM mail_outbox WHERE status = 'sent') s""")
            cnt, p50, p99, mx = out.split("|")
            rss_mb = d.peak_rss_kb / 1024
            code = d.stop()
            self.daemon_problems(d, "latency")
            log(f"latency: {cnt} rows, p50 {float(p50):.1f} ms, p99 {float(p99):.1f} ms, max {float(mx):.1f} ms; "
                f"SIGTERM → exit {code}")
            if sent != n:
                self.note(f"latency: {sent} of {n} inserted rows were sent within 15 s of the last insert")
            self.row(f"PostgreSQL + NOTIFY: insert → accepted latency, `sent_at - created_at`, {n} single-row "
                     f"transactions at {rate:g}/s: p50 / p99 / max",
                     f"{float(p50):.1f} / {float(p99):.1f} / {float(mx):.1f} ms ({cnt} of {n} sent)", "—",
                     f"p50 = {float(p50) / self.args.poll_ms:.3f} of the {self.args.poll_ms} ms poll interval")
            self.row("PostgreSQL: peak RSS during the latency phase", f"{rss_mb:.1f} MB", "—", "—")
            self.row("PostgreSQL: `teos-mailer run` exit status after SIGTERM (latency phase)",
                     str(code), "0", "ok" if code == 0 else "WRONG")
        finally:
            t.drop()

    def backlog(self) -> None:
        t = self.new_target(PgTarget(f"{self.tag}_mem"))
        try:
            took = self.prepare(t, BACKLOG_ROWS)
            log(f"backlog: {BACKLOG_ROWS:,} rows inserted in {took:.1f} s")
            d = self.start_daemon(["run"], t.url, "backlog")
            secs = self.args.backlog_secs
            t0 = time.monotonic()
            d.supervise(secs, until=None)
            elapsed = time.monotonic() - t0
            if d.exit:
                raise BenchError(f"teos-mailer run exited early with {d.exit.code}: {' | '.join(d.log_lines()[-5:])}")
            peak_mb = d.peak_rss_kb / 1024
            last_mb = d.last_rss_kb / 1024
            t_term = time.monotonic()
            code = d.stop()
            stop_s = time.monotonic() - t_term
            counts = t.status_counts()
            sent = counts.get("sent", 0)
            self.daemon_problems(d, "backlog")
            log(f"backlog: peak RSS {peak_mb:.1f} MB (last {last_mb:.1f} MB), {sent:,} sent in {elapsed:.1f} s, "
                f"SIGTERM → exit {code} after {stop_s:.1f} s; rows now {counts}")
            leftover = counts.get("sending", 0)
            if leftover:
                self.note(f"backlog: {leftover} row(s) still 'sending' after the daemon stopped")
            self.row(f"PostgreSQL: peak RSS of `teos-mailer run` with a {BACKLOG_ROWS:,}-row backlog "
                     f"(VmRSS every 50 ms for {secs:.0f} s)", f"{peak_mb:.1f} MB",
                     f"≤ {TARGET_BACKLOG_RSS_MB} MB", f"{peak_mb / TARGET_BACKLOG_RSS_MB:.2f} of target")
            self.row(f"PostgreSQL: send rate with a {BACKLOG_ROWS:,}-row backlog (first {secs:.0f} s, incl. start)",
                     f"{sent / elapsed:,.0f} msg/s ({sent:,} sent)", "—",
                     f"{sent / elapsed / self.raw_reuse:.1%} of raw" if self.raw_reuse else "—")
            self.row("PostgreSQL: `teos-mailer run` exit status after SIGTERM mid-backlog "
                     f"(took {stop_s:.1f} s; rows left 'sending': {leftover})",
                     str(code), "0", "ok" if code == 0 and not leftover else "WRONG")
        finally:
            t.drop()

    def mariadb_available(self) -> bool:
        try:
            mysql(None, "SELECT 1", timeout=10)
            return True
        except (BenchError, FileNotFoundError, subprocess.TimeoutExpired) as e:
            self.note(f"MariaDB skipped: {e}")
            return False

    # -- main --------------------------------------------------------------------------

    def run(self) -> int:
        self.build()
        self.t_start = time.monotonic()  # the budget counts from here
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        log(f"load average before the run: {' '.join(load)}; temp dir {self.tmp}")
        self.sink = Sink(self.tmp)
        log(f"smtp-sink pid {self.sink.pid} on 127.0.0.1:{self.sink.port}")

        self.raw()
        pg = self.drains("PostgreSQL", lambda rep: PgTarget(f"{self.tag}_pg{rep}"))
        self.report_drains("PostgreSQL", pg, target=True)
        self.latency()
        self.backlog()
        sq = self.drains("SQLite", lambda rep: SqliteTarget(self.tmp / f"bench-{rep}.db"))
        self.report_drains("SQLite", sq, target=False)
        if self.args.no_mariadb:
            self.note("MariaDB skipped (--no-mariadb)")
        elif self.remaining() < 90:
            self.note(f"MariaDB skipped: only {self.remaining():.0f} s of the time budget left")
        elif self.mariadb_available():
            my = self.drains("MariaDB", lambda rep: MariaTarget(f"{self.tag}_my{rep}"))
            self.report_drains("MariaDB", my, target=False)
        self.finish_report(load)
        return 0

    def finish_report(self, load: list[str]) -> None:
        total = time.monotonic() - self.t_start
        lines = [
            "| figure | value | target | ratio |",
            "|---|---|---|---|",
        ]
        for fig, val, tgt, ratio in self.rows:
            lines.append(f"| {fig} | {val} | {tgt} | {ratio} |".replace("\n", " "))
        table = "\n".join(lines)
        print()
        print(table)
        if self.notes:
            print()
            for n in self.notes:
                print(f"- {n}")
        header = [
            "# teos-mailer benchmark results",
            "",
            f"`python3 bench/run.py` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {socket.gethostname()}, "
            f"{os.cpu_count()} CPUs, load average before {' '.join(load)}, benchmark {total:.0f} s "
            f"(build excluded). Commit {git_head()}.",
            "",
            f"Drains: {self.args.rows:,} rows of ~2 KB each, concurrency {CONCURRENCY}, log level warn, "
            f"{self.args.reps} run(s) each, fresh database per run. \"raw\" is the median smtp-source rate with "
            f"{RAW_SESSIONS} sessions reusing connections. Ratios: throughput rows give the fraction of raw; "
            "memory rows give value ÷ target.",
            "",
        ]
        body = header + [table, ""]
        if self.notes:
            body += ["Notes:", ""] + [f"- {n}" for n in self.notes] + [""]
        RESULTS.write_text("\n".join(body))
        log(f"wrote {RESULTS}")

    def cleanup(self) -> None:
        for d in self.daemons:
            try:
                if not d.poll():
                    d.stop(grace=30)
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                log(f"could not stop teos-mailer {d.pid}: {e}")
        if self.sink:
            self.sink.stop()
        for t in self.targets:
            try:
                t.drop()
            except Exception as e:  # noqa: BLE001
                log(f"could not drop {getattr(t, 'name', getattr(t, 'path', t))}: {e}")
        # Only small files are left here (logs; SQLite files were removed one by one).
        for p in sorted(self.tmp.glob("*")):
            try:
                p.unlink()
            except OSError:
                pass
        try:
            self.tmp.rmdir()
        except OSError:
            pass


def loadavg1() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def rate_by_fifth(times: list[float]) -> list[float]:
    """Messages per second within each fifth of the rows, ordered by sent_at."""
    n = len(times)
    if n < 10:
        return []
    out = []
    for k in range(5):
        a, b = k * n // 5, (k + 1) * n // 5 - 1
        span = times[b] - times[a]
        out.append((b - a) / span if span > 0 else 0.0)
    return out


def fmt_runs(values: list[float]) -> str:
    return " / ".join(f"{v:,.0f}" for v in values)


def git_head() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        head = r.stdout.strip() or "?"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "migrations", "Cargo.toml", "Cargo.lock"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" (src has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="runs of each drain and of smtp-source (median reported)")
    p.add_argument("--rows", type=int, default=DRAIN_ROWS, help="rows per drain and messages per smtp-source run")
    p.add_argument("--budget", type=float, default=540, help="seconds for the benchmark after the build; "
                   "later drains (MariaDB first) are skipped when it runs out")
    p.add_argument("--drain-timeout", type=float, default=150, help="longest a single drain may take, seconds")
    p.add_argument("--idle-wait", type=float, default=2.0, help="seconds before the idle RSS is read")
    p.add_argument("--latency-rate", type=float, default=20.0, help="single-row inserts per second")
    p.add_argument("--latency-secs", type=float, default=10.0, help="seconds of single-row inserts")
    p.add_argument("--backlog-secs", type=float, default=10.0, help="seconds of RSS sampling with the backlog")
    p.add_argument("--poll-ms", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--no-build", action="store_true", help="use the existing target/release/teos-mailer")
    p.add_argument("--no-mariadb", action="store_true", help="skip the MariaDB drains")
    args = p.parse_args()
    if args.reps < 1 or args.rows < 2:
        p.error("--reps must be ≥ 1 and --rows ≥ 2")

    def on_signal(signum, _frame):
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    bench = Bench(args)
    try:
        return bench.run()
    except (BenchError, Interrupted, KeyboardInterrupt) as e:
        log(f"benchmark aborted: {e}")
        if bench.rows:
            bench.note(f"aborted: {e}")
            bench.finish_report(["?"] * 3)
        return 1
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
