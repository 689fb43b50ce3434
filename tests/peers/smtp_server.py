#!/usr/bin/env python3
"""Scriptable SMTP server (aiosmtpd) for teos-mailer's integration tests.

    python3 tests/peers/smtp_server.py --host 127.0.0.1 --port 0 --dir DIR \
        [--auth USER:PASS] [--require-auth] \
        [--starttls-cert CERT --starttls-key KEY] [--ignore-stdin] [-v]

Prints one JSON line {"port": N} on stdout once listening; all logging goes to
stderr.  Exits when stdin reaches EOF (unless --ignore-stdin), on SIGTERM or
on SIGINT.  See tests/peers/README.md for the file layout and the scripted
behaviour selected by the recipient's local part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import ssl
import sys
import threading
import warnings

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

log = logging.getLogger("smtp_server")

SLOW_RE = re.compile(r"^slow(\d+)")

REPLY_REJECT = "550 5.1.1 <{addr}>: Recipient address rejected: User unknown"
REPLY_TEMPFAIL = "451 4.3.0 Temporary failure, try again"
REPLY_THROTTLE = "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
REPLY_TOOLARGE = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"


def local_key(address: str) -> str:
    """Local part, lower-cased, with any +tag removed."""
    local = address.rpartition("@")[0] if "@" in address else address
    return local.split("+", 1)[0].lower()


class Store:
    """Writes messages and stats.json into DIR with atomic renames."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.seq = 0
        self.stats = {"connections": 0, "messages": 0, "auth_ok": 0, "auth_failed": 0}
        self.write_stats()

    def _atomic_write(self, name: str, data: bytes) -> None:
        final = os.path.join(self.dir, name)
        tmp = os.path.join(self.dir, "." + name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)

    def write_stats(self) -> None:
        self._atomic_write("stats.json", json.dumps(self.stats).encode())

    def bump(self, key: str) -> None:
        self.stats[key] += 1
        self.write_stats()

    def save_message(self, content: bytes, meta: dict) -> str:
        self.seq += 1
        base = f"{self.seq:06d}"
        self._atomic_write(base + ".eml", content)
        self._atomic_write(base + ".json", json.dumps(meta).encode())
        self.stats["messages"] += 1
        self.write_stats()
        return base


class Handler:
    def __init__(self, store: Store, require_auth: bool, offer_auth: bool) -> None:
        self.store = store
        self.require_auth = require_auth
        self.offer_auth = offer_auth
        self.once_seen: set[tuple[str, str]] = set()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if not self.offer_auth:
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.require_auth and not session.authenticated:
            return REPLY_AUTH_REQUIRED
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    def _once(self, kind: str, address: str) -> bool:
        """True the first time (kind, address) is seen."""
        key = (kind, address.lower())
        if key in self.once_seen:
            return False
        self.once_seen.add(key)
        return True

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        key = local_key(address)
        if key.startswith("reject"):
            return REPLY_REJECT.format(addr=address)
        if key.startswith("tempfail-once"):
            if self._once("tempfail", address):
                return REPLY_TEMPFAIL
        elif key.startswith("tempfail"):
            return REPLY_TEMPFAIL
        elif key.startswith("throttle-once"):
            if self._once("throttle", address):
                return REPLY_THROTTLE
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        keys = [local_key(a) for a in envelope.rcpt_tos]
        delay_ms = max((int(m.group(1)) for k in keys if (m := SLOW_RE.match(k))), default=0)
        if delay_ms:
            # If the client gives up and disconnects meanwhile, this task is
            # cancelled and the message is not saved.
            await asyncio.sleep(delay_ms / 1000.0)
        if any(k.startswith("toolarge") for k in keys):
            return REPLY_TOOLARGE
        auth = session.auth_data
        auth_user = None
        if isinstance(auth, LoginPassword):
            auth_user = auth.login.decode("utf-8", "replace")
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "auth_user": auth_user,
            "session": server.conn_no,
        }
        base = self.store.save_message(bytes(envelope.original_content), meta)
        log.info("saved %s from=%s to=%s", base, envelope.mail_from, envelope.rcpt_tos)
        return "250 OK"


class CountingSMTP(SMTP):
    """SMTP protocol that numbers its connections and tracks them for shutdown."""

    def __init__(self, *a, store: Store, live: set, **kw) -> None:
        super().__init__(*a, **kw)
        self._store = store
        self._live = live
        self.conn_no = 0

    def connection_made(self, transport) -> None:
        # aiosmtpd calls connection_made a second time after STARTTLS (with
        # self.transport already set): count only the TCP connection.
        first = self.transport is None
        if first:
            self._store.bump("connections")
            self.conn_no = self._store.stats["connections"]
            self._live.add(self)
        super().connection_made(transport)

    def connection_lost(self, error) -> None:
        self._live.discard(self)
        super().connection_lost(error)


def make_authenticator(store: Store, user: bytes, password: bytes):
    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user
            and auth_data.password == password
        )
        store.bump("auth_ok" if ok else "auth_failed")
        if ok:
            return AuthResult(success=True, auth_data=auth_data)
        # handled=False is essential: aiosmtpd's default (handled=True) means
        # "the reply was already sent" and the client would get no answer at all.
        return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication credentials invalid")

    return authenticator


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--dir", required=True, help="where messages and stats.json are written")
    p.add_argument("--auth", metavar="USER:PASS", help="accept AUTH PLAIN/LOGIN with these credentials")
    p.add_argument("--require-auth", action="store_true", help="MAIL FROM without AUTH gets 530")
    p.add_argument("--starttls-cert")
    p.add_argument("--starttls-key")
    p.add_argument("--ignore-stdin", action="store_true", help="do not exit on stdin EOF (manual use)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each message and SMTP command to stderr")
    a = p.parse_args(argv)
    if bool(a.starttls_cert) != bool(a.starttls_key):
        p.error("--starttls-cert and --starttls-key go together")
    if a.require_auth and not a.auth:
        p.error("--require-auth needs --auth")
    if a.auth and ":" not in a.auth:
        p.error("--auth must be USER:PASS")
    return a


def watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Thread body: set `stop` when stdin reaches EOF (works for pipes, files, ttys)."""
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    loop.call_soon_threadsafe(stop.set)


async def amain(a) -> int:
    loop = asyncio.get_running_loop()
    store = Store(a.dir)
    live: set[CountingSMTP] = set()

    tls_context = None
    if a.starttls_cert:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(a.starttls_cert, a.starttls_key)

    smtp_kwargs = dict(
        hostname="localhost",  # never let aiosmtpd call socket.getfqdn() per connection
        tls_context=tls_context,
        auth_require_tls=False,
        decode_data=False,
    )
    if a.auth:
        user, _, password = a.auth.partition(":")
        smtp_kwargs["authenticator"] = make_authenticator(store, user.encode(), password.encode())
    handler = Handler(store, require_auth=a.require_auth, offer_auth=bool(a.auth))

    def factory():
        return CountingSMTP(handler, store=store, live=live, loop=loop, **smtp_kwargs)

    server = await loop.create_server(factory, host=a.host, port=a.port, reuse_address=True, backlog=512)
    port = server.sockets[0].getsockname()[1]

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not a.ignore_stdin:
        threading.Thread(target=watch_stdin, args=(loop, stop), daemon=True).start()

    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()
    log.info("listening on %s:%d, writing to %s", a.host, port, a.dir)

    await stop.wait()
    log.info("shutting down")
    server.close()
    for proto in list(live):
        if proto.transport is not None:
            proto.transport.abort()
    await asyncio.sleep(0)
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if a.verbose else logging.WARNING,
        format="smtp_server[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if not a.verbose:
        # aiosmtpd logs every command at INFO; keep it quiet unless asked.
        logging.getLogger("mail.log").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    return asyncio.run(amain(a))


if __name__ == "__main__":
    sys.exit(main())
