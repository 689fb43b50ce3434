#!/usr/bin/env python3
"""XOAUTH2 benchmark: messages through Dovecot's submission service with an app token.

    python3 bench/xoauth2.py [--rows 5000] [--no-build]

Drains pre-inserted rows (PostgreSQL) through `teos-mailer run --until-idle` in mode
`smtp`: STARTTLS, SASL XOAUTH2 with a token from tests/peers/token_server.py, Dovecot
validating the JWT and relaying to Postfix's smtp-sink. Prints messages/s, the token
requests the daemon made, and how many SMTP logins (sessions) Dovecot saw: the point is
that neither grows with the number of messages. Writes the table to
bench/results-xoauth2.md. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "teos-mailer")
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT = "6731de76-14a6-49ae-97bc-6eba6914391e"
SECRET = "Xy8Q~bench.secret-value"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer(script: str, *args: str) -> tuple[subprocess.Popen, int]:
    """A tests/peers peer; ready once it printed {"port": N}. Exits when stdin closes."""
    p = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "peers", script), "--host", "127.0.0.1", "--port", "0", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True,
    )
    line = p.stdout.readline()
    return p, json.loads(line)["port"]


def psql(db: str, sql: str) -> str:
    return subprocess.run(
        ["psql", "-qtAX", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-c", sql],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--timeout", type=int, default=300, help="longest the drain may take, seconds")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)

    started: list[subprocess.Popen] = []
    db = f"teos_bench_xoauth2_{os.getpid()}"
    rundir = tempfile.mkdtemp(prefix="teos-bench-dovecot-")
    try:
        sink_port = free_port()
        sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "1024"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(sink)
        time.sleep(0.3)
        dovecot, dovecot_port = peer("dovecot_submission.py", "--relay-port", str(sink_port),
                                     "--pub", "tests/peers/keys/es256.pub", "--dir", rundir)
        started.append(dovecot)
        token, token_port = peer("token_server.py", "--tenant", TENANT, "--client-id", CLIENT,
                                 "--secret", SECRET, "--key", "tests/peers/keys/es256.key")
        started.append(token)

        psql("test", f"CREATE DATABASE {db}")
        env = dict(os.environ,
                   TEOS_MAILER__DATABASE__URL=f"postgres://postgres@127.0.0.1:5432/{db}",
                   TEOS_MAILER__LOG__LEVEL="warn",
                   TEOS_MAILER__DELIVERY__CONCURRENCY="16",
                   TEOS_MAILER__DELIVERY__EXTRA_CA_FILE=os.path.join(rundir, "tls-ca.pem"),
                   TEOS_MAILER__MICROSOFT365__MESSAGES_PER_MINUTE="0")
        env.pop("RUST_LOG", None)
        subprocess.run([BIN, "migrate"], env=env, check=True, capture_output=True)
        subprocess.run([BIN, "settings", "set-oauth", "--mode", "smtp", "--tenant-id", TENANT,
                        "--client-id", CLIENT, "--secret-stdin", "--smtp-host", "127.0.0.1",
                        "--smtp-port", str(dovecot_port), "--authority-host", f"http://127.0.0.1:{token_port}",
                        "--general-sender", "general@contoso.test", "--reception-sender", "reception@contoso.test"],
                       env=env, input=SECRET + "\n", text=True, check=True, capture_output=True)
        psql(db, "INSERT INTO mail_outbox (module, to_addrs, subject, body_text) "
                 f"SELECT 'report', '[\"ann@example.com\"]', 'Report ' || g, repeat('x', 2000) "
                 f"FROM generate_series(1, {args.rows}) g")

        t0 = time.monotonic()
        drain = subprocess.Popen([BIN, "run", "--until-idle"], env=env, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = drain.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            drain.send_signal(signal.SIGTERM)
            _, stderr = drain.communicate(timeout=30)
        took = time.monotonic() - t0
        sent = int(psql(db, "SELECT COUNT(*) FROM mail_outbox WHERE status = 'sent'"))
        stats = json.load(urllib.request.urlopen(f"http://127.0.0.1:{token_port}/_stats", timeout=5))
        with open(os.path.join(rundir, "dovecot.log"), errors="replace") as f:
            logins = sum(1 for line in f if re.search(r"submission-login: (Info: )?Login:", line))

        rows = [
            ("XOAUTH2 via Dovecot → smtp-sink: drain, `run --until-idle`, concurrency 16, 1 mailbox",
             f"{sent / took:,.0f} msg/s ({sent:,} of {args.rows:,} sent in {took:.1f} s; exit {drain.returncode})"),
            ("token requests for the whole drain", f"{stats['requests']} (target: 1)"),
            ("SMTP logins (sessions) Dovecot saw", f"{logins} (bound: smtp_sessions_per_mailbox = 3)"),
            ("messages per session", f"{sent / max(logins, 1):,.0f}"),
        ]
        warn = [line for line in stderr.splitlines() if line.strip()]
        table = ["| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
        out = "\n".join([
            "# XOAUTH2 benchmark", "",
            f"`python3 bench/xoauth2.py --rows {args.rows}` on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
            f"{os.cpu_count()} CPUs.", "", *table, "",
            *([f"Daemon warnings: {len(warn)}; first: `{warn[0][:200]}`"] if warn else []),
        ])
        print(out)
        with open(os.path.join(ROOT, "bench", "results-xoauth2.md"), "w") as f:
            f.write(out + "\n")
    finally:
        for p in reversed(started):
            if p.stdin:
                p.stdin.close()
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["psql", "-qh", "127.0.0.1", "-U", "postgres", "-d", "test", "-c", f"DROP DATABASE IF EXISTS {db}"],
                       capture_output=True)
        shutil.rmtree(rundir, ignore_errors=True)


if __name__ == "__main__":
    main()
