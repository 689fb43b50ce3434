#!/usr/bin/env python3
"""Microsoft Graph sendMail endpoint, MIME form (test peer).

    python3 tests/peers/graph_server.py --host 127.0.0.1 --port 0 --dir DIR \
        --pub tests/peers/keys/es256.pub [--tenant TENANT_GUID] [--ignore-stdin] [-v]

Prints {"port": N} on stdout when listening; logs to stderr; exits on stdin EOF
(unless --ignore-stdin), SIGTERM or SIGINT.  See README-oauth.md.

  POST /v1.0/users/{sender}/sendMail   Authorization: Bearer <JWT from token_server.py>
                                       Content-Type: text/plain
                                       body: base64 of an RFC 5322 message
       -> 202, and DIR/<seq>.eml (the decoded MIME) + DIR/<seq>.json
  GET  /_stats                         {"requests", "accepted", "by_status", "by_code"}
  POST /_control                       {"mode": "ok"|"down"|"slow", "delay_ms": N, "reset_stats": true}

Scripted behaviour (local part lower-cased, "+tag" removed):
  sender    denied*          403 ErrorAccessDenied
  sender    sendas-denied*   403 ErrorSendAsDenied
  sender    norest*          404 MailboxNotEnabledForRESTAPI
  sender    unknown*         404 ErrorInvalidUser
  first To: graph429-once*   first request for that address 429 ApplicationThrottled
                             (Retry-After: 1), later ones accepted
  first To: graph429-always* always 429
  first To: graph503-once*   first request 503 ServiceNotAvailable (Retry-After: 1)
  first To: graph503-always* always 503
  body over 4 MiB            413
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import base64  # noqa: E402
import binascii  # noqa: E402
import datetime as dt  # noqa: E402
import email.parser  # noqa: E402
import email.policy  # noqa: E402
import email.utils  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
import uuid  # noqa: E402
from http.server import BaseHTTPRequestHandler  # noqa: E402

import jwt  # noqa: E402  (pyjwt)

import peer_common  # noqa: E402

GRAPH_AUD = "https://graph.microsoft.com"
GRAPH_AUDS = [GRAPH_AUD, "00000003-0000-0000-c000-000000000000"]
MAX_BODY = 4 * 1024 * 1024  # Graph's 4 MB request limit
DRAIN_LIMIT = 64 * 1024 * 1024  # bigger bodies are not read at all; the connection is closed
CLOCK_SKEW = 300  # seconds of leeway, like Entra-protected APIs
HEADER_LINE = re.compile(rb"^[!-9;-~]+:")

log = None  # set in main()


def local_key(address: str) -> str:
    """Local part, lower-cased, with any +tag removed (same rule as smtp_server.py)."""
    local = address.rpartition("@")[0] if "@" in address else address
    return local.split("+", 1)[0].lower()


class GraphError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def auth_error(message: str) -> GraphError:
    return GraphError(401, "InvalidAuthenticationToken", message, {
        "WWW-Authenticate": 'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/'
                            'oauth2/authorize", client_id="00000003-0000-0000-c000-000000000000"',
    })


class Store:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.lock = threading.Lock()
        self.seq = 0

    def _atomic_write(self, name: str, data: bytes) -> None:
        peer_common.atomic_write(self.dir, name, data)

    def save(self, mime: bytes, meta: dict) -> str:
        with self.lock:
            self.seq += 1
            base = f"{self.seq:06d}"
            meta = dict(meta, seq=self.seq)
            self._atomic_write(base + ".eml", mime)
            self._atomic_write(base + ".json", json.dumps(meta).encode())  # json last
            return base


class State:
    def __init__(self, a) -> None:
        self.lock = threading.Lock()
        self.pub = peer_common.load_public_key(a.pub)
        self.tenant = a.tenant.lower() if a.tenant else None
        self.store = Store(a.dir)
        self.mode = "ok"
        self.delay_ms = 0
        self.once_seen: set[tuple[str, str]] = set()
        self.reset_stats()

    def reset_stats(self) -> None:
        self.requests = 0
        self.accepted = 0
        self.by_status: dict[str, int] = {}
        self.by_code: dict[str, int] = {}

    def once(self, kind: str, address: str) -> bool:
        key = (kind, address.lower())
        with self.lock:
            if key in self.once_seen:
                return False
            self.once_seen.add(key)
            return True


def verify_token(st: State, authz: str | None) -> dict:
    if not authz or not authz.strip():
        raise auth_error("Access token is empty.")
    scheme, _, token = authz.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise auth_error("Access token is empty.")
    if token.count(".") != 2:
        raise auth_error("CompactToken parsing failed with error code: 80049217")
    try:
        claims = jwt.decode(
            token, st.pub, algorithms=["ES256"], audience=GRAPH_AUDS, leeway=CLOCK_SKEW,
            options={"require": ["exp", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        raise auth_error("Lifetime validation failed, the token is expired.") from None
    except jwt.InvalidAudienceError:
        raise auth_error("Access token validation failure. Invalid audience.") from None
    except jwt.ImmatureSignatureError:
        raise auth_error("Lifetime validation failed, the token is not yet valid.") from None
    except jwt.InvalidTokenError as e:
        log.info("token rejected: %s", e)
        raise auth_error("Access token validation failure.") from None
    if st.tenant and str(claims.get("tid", "")).lower() != st.tenant:
        raise auth_error("Access token validation failure. Invalid issuer.")
    roles = claims.get("roles")
    if not roles and not claims.get("scp"):
        raise auth_error("Either scp or roles claim need to be present in the token.")
    if "Mail.Send" not in (roles or []):
        raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
    return claims


def decode_mime(body: bytes) -> tuple[bytes, object]:
    if not body.strip():
        raise GraphError(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
    compact = re.sub(rb"\s+", b"", body)
    try:
        mime = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise GraphError(400, "ErrorMimeContentInvalidBase64String",
                         "Invalid base64 string for MIME content.") from None
    first = mime.lstrip(b"\r\n").split(b"\n", 1)[0]
    if not mime.strip() or not HEADER_LINE.match(first):
        raise GraphError(400, "ErrorMimeContentInvalid", "Invalid MIME content.")
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(mime)
    if not msg.keys():
        raise GraphError(400, "ErrorMimeContentInvalid", "Invalid MIME content.")
    return mime, msg


def recipients(msg) -> dict[str, list[str]]:
    out = {}
    for h in ("To", "Cc", "Bcc"):
        vals = msg.get_all(h) or []
        addrs = [a for _, a in email.utils.getaddresses([str(v) for v in vals]) if a]
        out[h.lower()] = addrs
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "teos-test-graph"
    sys_version = ""
    st: State = None  # type: ignore[assignment]

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    # ---- plumbing ----
    def _read_body(self) -> bytes | None:
        """The request body; None if it is too big to even read (connection gets closed)."""
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > DRAIN_LIMIT:
                    self.close_connection = True
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline(8)
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        if n > DRAIN_LIMIT:
            self.close_connection = True
            return None
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, status: int, body: bytes = b"", ctype: str | None = None, headers: dict | None = None,
              count: bool = True):
        if count:  # /_stats and /_control answers are not counted
            with self.st.lock:
                self.st.by_status[str(status)] = self.st.by_status.get(str(status), 0) + 1
        self.send_response(status)
        req_id = str(uuid.uuid4())
        self.send_header("request-id", req_id)
        self.send_header("client-request-id", self.headers.get("client-request-id") or req_id)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, count: bool = True):
        self._send(status, json.dumps(obj).encode(), "application/json", headers, count)

    def _graph_error(self, err: GraphError) -> None:
        with self.st.lock:
            self.st.by_code[err.code] = self.st.by_code.get(err.code, 0) + 1
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        req_id = str(uuid.uuid4())
        body = {"error": {"code": err.code, "message": err.message,
                          "innerError": {"date": now, "request-id": req_id,
                                         "client-request-id": self.headers.get("client-request-id") or req_id}}}
        log.info("%s %s -> %d %s", self.command, self.path, err.status, err.code)
        self._json(err.status, body, err.headers)

    # ---- verbs ----
    def do_GET(self):
        if urllib.parse.urlsplit(self.path).path == "/_stats":
            with self.st.lock:
                stats = {"requests": self.st.requests, "accepted": self.st.accepted,
                         "by_status": dict(self.st.by_status), "by_code": dict(self.st.by_code),
                         "mode": self.st.mode, "delay_ms": self.st.delay_ms}
            return self._json(200, stats, count=False)
        self._graph_error(GraphError(405, "Request_BadRequest", "Specified HTTP method is not allowed for the request target."))

    def do_POST(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/_control":
            return self._control()
        try:
            self._send_mail(path)
        except GraphError as e:
            self._graph_error(e)

    def _control(self):
        body = self._read_body() or b"{}"
        try:
            req = json.loads(body)
            assert isinstance(req, dict)
        except (ValueError, AssertionError):
            return self._json(400, {"error": "JSON object expected"}, count=False)
        st = self.st
        with st.lock:
            if "mode" in req:
                if req["mode"] not in ("ok", "down", "slow"):
                    return self._json(400, {"error": "mode must be ok, down or slow"}, count=False)
                st.mode = req["mode"]
            if "delay_ms" in req:
                st.delay_ms = int(req["delay_ms"])
            if req.get("reset_stats"):
                st.reset_stats()
            view = {"mode": st.mode, "delay_ms": st.delay_ms}
        log.info("control: %s", view)
        self._json(200, view, count=False)

    def _send_mail(self, path: str) -> None:
        st = self.st
        with st.lock:
            st.requests += 1
            mode, delay = st.mode, st.delay_ms
        if mode == "slow" and delay > 0:
            time.sleep(delay / 1000.0)

        parts = [urllib.parse.unquote(p) for p in path.split("/") if p]
        body = self._read_body()
        if body is None or len(body) > MAX_BODY:
            raise GraphError(413, "RequestEntityTooLarge",
                             f"The request body exceeds the maximum allowed size of {MAX_BODY} bytes.")
        if mode == "down":
            raise GraphError(503, "ServiceNotAvailable", "The service is temporarily unavailable.",
                             {"Retry-After": "1"})

        is_me = len(parts) == 3 and parts[0].lower() in ("v1.0", "beta") and parts[1].lower() == "me" \
            and parts[2].lower() == "sendmail"
        is_user = len(parts) == 4 and parts[0].lower() in ("v1.0", "beta") and parts[1].lower() == "users" \
            and parts[3].lower() == "sendmail"
        if not (is_me or is_user):
            seg = parts[-1] if parts else ""
            raise GraphError(400, "BadRequest", f"Resource not found for the segment '{seg}'.")

        claims = verify_token(st, self.headers.get("Authorization"))
        if is_me:
            raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")
        sender = parts[2]
        skey = local_key(sender)
        if skey.startswith("sendas-denied"):
            raise GraphError(403, "ErrorSendAsDenied",
                             "The user account which was used to submit this request does not have the right "
                             "to send mail on behalf of the specified sending account., Cannot submit message.")
        if skey.startswith("denied"):
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        if skey.startswith("norest"):
            raise GraphError(404, "MailboxNotEnabledForRESTAPI",
                             "The mailbox is either inactive, soft-deleted, or is hosted on-premise.")
        if skey.startswith("unknown"):
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{sender}' is invalid.")

        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "text/plain":
            if ctype == "application/json":
                try:
                    json.loads(body)
                except ValueError:
                    raise GraphError(400, "BadRequest",
                                     "Unable to read JSON request payload. Please ensure Content-Type header "
                                     "is set and payload is of valid JSON format.") from None
                raise GraphError(400, "BadRequest",
                                 "teos test peer: only the MIME form of sendMail (Content-Type: text/plain, "
                                 "base64 body) is implemented.")
            raise GraphError(415, "UnsupportedMediaType", f"Content-Type '{ctype}' is not supported.")

        mime, msg = decode_mime(body)
        rcpts = recipients(msg)
        if not (rcpts["to"] or rcpts["cc"] or rcpts["bcc"]):
            raise GraphError(400, "ErrorInvalidRecipients",
                             "At least one recipient isn't valid., A message can't be sent because it "
                             "contains no recipients.")
        first_to = (rcpts["to"] or rcpts["cc"] or rcpts["bcc"])[0]
        rkey = local_key(first_to)
        if rkey.startswith("graph429-always") or (rkey.startswith("graph429-once") and st.once("429", first_to)):
            raise GraphError(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.",
                             {"Retry-After": "1"})
        if rkey.startswith("graph503-always") or (rkey.startswith("graph503-once") and st.once("503", first_to)):
            raise GraphError(503, "ServiceNotAvailable", "The service is temporarily unavailable.",
                             {"Retry-After": "1"})

        meta = {
            "sender": sender,
            "token_jti": claims.get("jti"),
            "content_type": self.headers.get("Content-Type"),
            "token_appid": claims.get("appid"),
            "token_tid": claims.get("tid"),
            "token_roles": claims.get("roles"),
            "from": str(msg.get("From", "")),
            "subject": str(msg.get("Subject", "")),
            "message_id": str(msg.get("Message-ID", "")),
            "recipients": rcpts,
            "body_bytes": len(body),
            "mime_bytes": len(mime),
            "received_at": time.time(),
        }
        base = st.store.save(mime, meta)
        with st.lock:
            st.accepted += 1
        log.info("accepted %s sender=%s to=%s", base, sender, rcpts["to"])
        self._send(202)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--dir", required=True, help="where <seq>.eml and <seq>.json are written")
    p.add_argument("--pub", required=True, help="ES256 public key (PEM) that signs the tokens")
    p.add_argument("--tenant", help="if given, the token's tid must match")
    p.add_argument("--ignore-stdin", action="store_true", help="do not exit on stdin EOF (manual use)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global log
    a = parse_args(argv)
    log = peer_common.setup_logging("graph_server", a.verbose)
    st = State(a)
    Handler.st = st
    return peer_common.serve_http(Handler, a.ignore_stdin, a.host, a.port, log, f"writing to {a.dir}")


if __name__ == "__main__":
    sys.exit(main())
