#!/usr/bin/env python3
"""Scriptable SMTP server (aiosmtpd) for teos-mailer's integration tests.

    python3 tests/peers/smtp_server.py --host 127.0.0.1 --port 0 --dir DIR \
        [--auth USER:PASS] [--xoauth2 accept|reject|disabled|reject-once] \
        [--require-auth] [--starttls-cert CERT --starttls-key KEY | --tls-dir TLSDIR] \
        [--ignore-stdin] [-v]

Prints one JSON line {"port": N} on stdout once listening; all logging goes to
stderr.  Exits when stdin reaches EOF (unless --ignore-stdin), on SIGTERM or
on SIGINT.  See tests/peers/README.md for the file layout and the scripted
behaviour selected by the recipient's local part.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import base64
import binascii
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import NamedTuple

from aiosmtpd.smtp import MISSING, SMTP, AuthResult

sys.dont_write_bytecode = True
import peer_common  # noqa: E402  (beside this file)

log = logging.getLogger("smtp_server")

SLOW_RE = re.compile(r"^slow(\d+)")

REPLY_REJECT = "550 5.1.1 <{addr}>: Recipient address rejected: User unknown"
REPLY_TEMPFAIL = "451 4.3.0 Temporary failure, try again"
REPLY_THROTTLE = "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
REPLY_TOOLARGE = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"

# Exchange Online's replies to SASL XOAUTH2 (it never sends a 334 error challenge).
EXO_HOST = "[SN4PR0501CA0052.namprd05.prod.outlook.com]"
REPLY_XOAUTH2_REJECT = "535 5.7.3 Authentication unsuccessful " + EXO_HOST
REPLY_XOAUTH2_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
    "Visit https://aka.ms/smtp_auth_disabled for more information. " + EXO_HOST
)
REPLY_XOAUTH2_NO_TLS = "504 5.7.4 Unrecognized authentication type " + EXO_HOST
REPLY_BAD_BASE64 = "501 5.5.2 Can't decode base64"
XOAUTH2_MODES = ("accept", "reject", "disabled", "reject-once")
# base64("user=" + user + "\x01auth=Bearer " + token + "\x01\x01")
XOAUTH2_RE = re.compile(rb"user=([^\x01]+)\x01auth=Bearer ([^\x01]+)\x01\x01")


class XOAuth2Data(NamedTuple):
    """session.auth_data after a successful XOAUTH2 (`login` like aiosmtpd's LoginPassword)."""

    login: bytes
    token_sha: str


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
        self.stats = {"connections": 0, "messages": 0, "auth_ok": 0, "auth_failed": 0, "tokens": []}
        self.write_stats()

    def _atomic_write(self, name: str, data: bytes) -> None:
        peer_common.atomic_write(self.dir, name, data)

    def write_stats(self) -> None:
        self._atomic_write("stats.json", json.dumps(self.stats).encode())

    def bump(self, key: str) -> None:
        self.stats[key] += 1
        self.write_stats()

    def token_ok(self, token_sha: str) -> None:
        """A successful XOAUTH2: auth_ok + 1 and the token's hash appended, in one write."""
        self.stats["auth_ok"] += 1
        self.stats["tokens"].append(token_sha)
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
    def __init__(self, store: Store, require_auth: bool, offer_auth: bool,
                 xoauth2: str | None = None, xoauth2_needs_tls: bool = False) -> None:
        self.store = store
        self.require_auth = require_auth
        self.offer_auth = offer_auth
        self.xoauth2 = xoauth2
        self.xoauth2_needs_tls = xoauth2_needs_tls
        self.xoauth2_rejected_once = False
        self.once_seen: set[tuple[str, str]] = set()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        out = []
        for r in responses:
            if r[4:].startswith("AUTH"):
                if not self.offer_auth:
                    continue
                mechs = r[9:].split()
                if self.xoauth2_needs_tls and not server.tls_active:
                    mechs = [m for m in mechs if m != "XOAUTH2"]
                if not mechs:
                    continue
                r = r[:4] + "AUTH " + " ".join(mechs)
            out.append(r)
        return out

    async def auth_XOAUTH2(self, server, args):
        """SASL XOAUTH2, both `AUTH XOAUTH2 <b64>` and `AUTH XOAUTH2` / `334 ` / `<b64>`.

        Registered by aiosmtpd because of its name; excluded unless --xoauth2 is given.
        """
        if self.xoauth2_needs_tls and not server.tls_active:
            return AuthResult(success=False, handled=False, message=REPLY_XOAUTH2_NO_TLS)
        if len(args) == 1:
            blob = await server.challenge_auth("")  # "334 " (empty challenge)
            if blob is MISSING:  # "*" or bad base64: aiosmtpd has already replied 501
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await server.push(REPLY_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        mode = self.xoauth2
        if mode == "reject-once":
            mode = "accept" if self.xoauth2_rejected_once else "reject"
            self.xoauth2_rejected_once = True
        m = XOAUTH2_RE.fullmatch(blob)
        if mode == "accept" and m:
            user = m.group(1)
            token_sha = hashlib.sha256(m.group(2)).hexdigest()[:16]
            self.store.token_ok(token_sha)
            log.info("XOAUTH2 ok user=%s token=%s", user.decode("utf-8", "replace"), token_sha)
            return AuthResult(success=True, auth_data=XOAuth2Data(user, token_sha))
        self.store.bump("auth_failed")
        reply = REPLY_XOAUTH2_DISABLED if mode == "disabled" else REPLY_XOAUTH2_REJECT
        log.info("XOAUTH2 %s (%s)", "malformed" if not m else mode, reply)
        return AuthResult(success=False, handled=False, message=reply)

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
        login = getattr(auth, "login", None)  # LoginPassword or XOAuth2Data
        if isinstance(login, bytes):
            auth_user = login.decode("utf-8", "replace")
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

    # RFC 5321's 512 is too short for AUTH XOAUTH2 with a real token (Entra's are
    # 1.5-3 KB and Exchange accepts them inline); Exchange takes far longer lines.
    command_size_limit = 16384

    def __init__(self, *a, store: Store, live: set, **kw) -> None:
        super().__init__(*a, **kw)
        # aiosmtpd's per-command limits default to SMTP.command_size_limit (512).
        self.command_size_limits = collections.defaultdict(lambda: CountingSMTP.command_size_limit)
        self._store = store
        self._live = live
        self.conn_no = 0
        self.tls_active = False

    def connection_made(self, transport) -> None:
        # aiosmtpd calls connection_made a second time after STARTTLS (with
        # self.transport already set): count only the TCP connection.
        first = self.transport is None
        if first:
            self._store.bump("connections")
            self.conn_no = self._store.stats["connections"]
            self._live.add(self)
        else:
            self.tls_active = True
        super().connection_made(transport)

    def connection_lost(self, error) -> None:
        self._live.discard(self)
        super().connection_lost(error)


def make_authenticator(store: Store, user: bytes, password: bytes):
    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            hasattr(auth_data, "password")
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


def make_tls_dir(tls_dir: str) -> tuple[str, str]:
    """A test CA (TLSDIR/tls-ca.pem) and a server certificate it signed for DNS:localhost,
    IP:127.0.0.1, IP:127.0.0.2 (EC prime256v1, like make_cert in dovecot_submission.py, same
    file names).  Reused if already there; an flock and renames make concurrent starts on
    the same directory safe."""
    os.makedirs(tls_dir, exist_ok=True)
    cert = os.path.join(tls_dir, "tls-cert.pem")
    key = os.path.join(tls_dir, "tls-key.pem")
    ca = os.path.join(tls_dir, "tls-ca.pem")
    with open(os.path.join(tls_dir, ".tls.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(os.path.exists(p) for p in (cert, key, ca)):
            return cert, key
        tmp = tempfile.mkdtemp(prefix=".tls-", dir=tls_dir)
        try:
            def t(name: str) -> str:
                return os.path.join(tmp, name)

            def run(*args: str) -> None:
                r = subprocess.run(list(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(args[:2])} failed: {r.stderr.decode(errors='replace')}")

            ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            run("openssl", "req", "-x509", *ec, "-days", "3650", "-subj", "/CN=teos-mailer test CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout", t("tls-ca-key.pem"), "-out", t("tls-ca.pem"))
            run("openssl", "req", "-new", *ec, "-subj", "/CN=localhost",
                "-keyout", t("tls-key.pem"), "-out", t("tls.csr"))
            with open(t("tls-ext.cnf"), "w") as f:
                f.write("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                        "extendedKeyUsage=serverAuth\n"
                        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:127.0.0.2\n")
            run("openssl", "x509", "-req", "-in", t("tls.csr"), "-CA", t("tls-ca.pem"),
                "-CAkey", t("tls-ca-key.pem"), "-CAcreateserial", "-days", "3650",
                "-extfile", t("tls-ext.cnf"), "-out", t("tls-cert.pem"))
            # The CA last: the three files checked above appear only as a complete set.
            for name in ("tls-ca-key.pem", "tls-ca.srl", "tls.csr", "tls-ext.cnf",
                         "tls-key.pem", "tls-cert.pem", "tls-ca.pem"):
                if os.path.exists(t(name)):
                    os.replace(t(name), os.path.join(tls_dir, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cert, key


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--dir", required=True, help="where messages and stats.json are written")
    p.add_argument("--auth", metavar="USER:PASS", help="accept AUTH PLAIN/LOGIN with these credentials")
    p.add_argument("--xoauth2", choices=XOAUTH2_MODES, metavar="MODE",
                   help="offer AUTH XOAUTH2 (after STARTTLS if TLS is configured): " + "|".join(XOAUTH2_MODES))
    p.add_argument("--require-auth", action="store_true", help="MAIL FROM without AUTH gets 530")
    p.add_argument("--starttls-cert")
    p.add_argument("--starttls-key")
    p.add_argument("--tls-dir", metavar="TLSDIR",
                   help="create (or reuse) TLSDIR/tls-ca.pem and a certificate it signed, for STARTTLS")
    p.add_argument("--ignore-stdin", action="store_true", help="do not exit on stdin EOF (manual use)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each message and SMTP command to stderr")
    a = p.parse_args(argv)
    if bool(a.starttls_cert) != bool(a.starttls_key):
        p.error("--starttls-cert and --starttls-key go together")
    if a.tls_dir and a.starttls_cert:
        p.error("--tls-dir replaces --starttls-cert/--starttls-key")
    if a.require_auth and not (a.auth or a.xoauth2):
        p.error("--require-auth needs --auth or --xoauth2")
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

    if a.tls_dir:
        a.starttls_cert, a.starttls_key = make_tls_dir(a.tls_dir)
    tls_context = None
    if a.starttls_cert:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(a.starttls_cert, a.starttls_key)

    exclude = []
    if not a.xoauth2:
        exclude.append("XOAUTH2")
    elif not a.auth:
        exclude += ["PLAIN", "LOGIN"]

    smtp_kwargs = dict(
        hostname="localhost",  # never let aiosmtpd call socket.getfqdn() per connection
        tls_context=tls_context,
        auth_require_tls=False,
        decode_data=False,
        auth_exclude_mechanism=exclude,
    )
    if a.auth:
        user, _, password = a.auth.partition(":")
        smtp_kwargs["authenticator"] = make_authenticator(store, user.encode(), password.encode())
    handler = Handler(
        store,
        require_auth=a.require_auth,
        offer_auth=bool(a.auth or a.xoauth2),
        xoauth2=a.xoauth2,
        xoauth2_needs_tls=tls_context is not None,
    )

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
