#!/usr/bin/env python3
"""Entra ID (Azure AD) v2.0 token endpoint for the client-credentials grant (test peer).

    python3 tests/peers/token_server.py --host 127.0.0.1 --port 0 \
        --tenant TENANT_GUID --client-id CLIENT_GUID --secret SECRET \
        --key tests/peers/keys/es256.key [--lifetime 3599] \
        [--secret-expired] [--no-consent] [--no-roles] [--app-disabled] [--azp] \
        [--tenant-name Contoso] [--app-name teos-mailer] [--kid KID] \
        [--ignore-stdin] [-v]

Prints {"port": N} on stdout when listening; logs to stderr; exits on stdin EOF
(unless --ignore-stdin), SIGTERM or SIGINT.  See README-oauth.md.

Endpoints
  POST /{tenant}/oauth2/v2.0/token     grant_type=client_credentials, client_id,
                                       client_secret (or HTTP Basic), scope
  GET  /{tenant}/discovery/v2.0/keys   JWKS with the signing key
  GET  /_stats                         {"requests", "issued", "by_scope", ...}
  POST /_control                       {"mode": "ok"|"down"|"slow", "delay_ms": N,
                                        "secret": S, "lifetime": N, "secret_expired": b,
                                        "consent": b, "roles": b, "app_disabled": b,
                                        "reset_stats": true}
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import base64  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
import uuid  # noqa: E402
from http.server import BaseHTTPRequestHandler  # noqa: E402

import jwt  # noqa: E402  (pyjwt)
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

import peer_common  # noqa: E402

EXCHANGE = "https://outlook.office365.com"
GRAPH = "https://graph.microsoft.com"
# Resource identifiers Entra knows for the two resource apps we model -> (aud, roles).
RESOURCES = {
    "https://outlook.office365.com": (EXCHANGE, ["SMTP.SendAsApp"]),
    "https://outlook.office.com": (EXCHANGE, ["SMTP.SendAsApp"]),
    "00000002-0000-0ff1-ce00-000000000000": (EXCHANGE, ["SMTP.SendAsApp"]),
    "https://graph.microsoft.com": (GRAPH, ["Mail.Send"]),
    "00000003-0000-0000-c000-000000000000": (GRAPH, ["Mail.Send"]),
}

log = None  # set in main()


class State:
    def __init__(self, a) -> None:
        self.lock = threading.Lock()
        self.tenant = a.tenant.lower()
        self.client_id = a.client_id.lower()
        self.secret = a.secret
        self.secret_expired = a.secret_expired
        self.lifetime = a.lifetime
        self.consent = not a.no_consent
        self.roles = not a.no_roles
        self.app_disabled = a.app_disabled
        self.azp = a.azp
        self.tenant_name = a.tenant_name
        self.app_name = a.app_name
        self.mode = "ok"
        self.delay_ms = 0
        self.key = peer_common.load_private_key(a.key)
        if not isinstance(self.key, ec.EllipticCurvePrivateKey) or self.key.curve.name != "secp256r1":
            raise SystemExit(f"{a.key}: need a P-256 (prime256v1) private key for ES256")
        self.kid = a.kid or peer_common.kid_for_public_key(self.key.public_key())
        # The service principal's object id: stable per (tenant, app), like Entra's.
        self.sp_oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{self.tenant}:{self.client_id}"))
        self.reset_stats()

    def reset_stats(self) -> None:
        self.requests = 0
        self.issued = 0
        self.by_scope: dict[str, int] = {}
        self.by_error: dict[str, int] = {}
        self.by_client_auth = {"basic": 0, "body": 0}
        self.last_token_request: dict | None = None

    def stats(self) -> dict:
        with self.lock:
            return {
                "requests": self.requests,
                "issued": self.issued,
                "by_scope": dict(self.by_scope),
                "by_error": dict(self.by_error),
                "by_client_auth": dict(self.by_client_auth),
                "last_token_request": self.last_token_request,
                "mode": self.mode,
                "delay_ms": self.delay_ms,
                "lifetime": self.lifetime,
                "kid": self.kid,
            }

    def control_view(self) -> dict:
        return {
            "mode": self.mode,
            "delay_ms": self.delay_ms,
            "lifetime": self.lifetime,
            "secret_expired": self.secret_expired,
            "consent": self.consent,
            "roles": self.roles,
            "app_disabled": self.app_disabled,
        }


class EntraError(Exception):
    def __init__(self, status: int, error: str, code: int, message: str, headers: dict | None = None):
        super().__init__(f"AADSTS{code}")
        self.status = status
        self.error = error
        self.code = code
        self.message = message
        self.headers = headers or {}


def entra_error_body(err: EntraError, correlation_id: str | None) -> dict:
    now = dt.datetime.now(dt.timezone.utc)
    ts = now.strftime("%Y-%m-%d %H:%M:%SZ")
    trace_id = str(uuid.uuid4())
    corr = correlation_id or str(uuid.uuid4())
    desc = (
        f"AADSTS{err.code}: {err.message}\r\n"
        f"Trace ID: {trace_id}\r\nCorrelation ID: {corr}\r\nTimestamp: {ts}"
    )
    return {
        "error": err.error,
        "error_description": desc,
        "error_codes": [err.code],
        "timestamp": ts,
        "trace_id": trace_id,
        "correlation_id": corr,
        "error_uri": f"https://login.microsoftonline.com/error?code={err.code}",
    }


def missing_param(name: str) -> EntraError:
    return EntraError(400, "invalid_request", 900144,
                      f"The request body must contain the following parameter: '{name}'.")


def issue_token(st: State, form: dict[str, str], basic: tuple[str, str] | None) -> tuple[dict, str]:
    """Validate a token request the way Entra does; returns (response JSON, scope) or raises."""
    grant_type = form.get("grant_type", "")
    if not grant_type:
        raise missing_param("grant_type")
    if grant_type != "client_credentials":
        raise EntraError(400, "unsupported_grant_type", 70003,
                         f"The app requested an unsupported grant type '{grant_type}'.")

    if basic is not None:
        client_id, secret = basic
    else:
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
    if not client_id:
        raise missing_param("client_id")
    scope = form.get("scope", "")
    if not scope.strip():
        raise missing_param("scope")

    if client_id.lower() != st.client_id:
        raise EntraError(400, "unauthorized_client", 700016,
                         f"Application with identifier '{client_id}' was not found in the directory "
                         f"'{st.tenant_name}'. This can happen if the application has not been installed "
                         "by the administrator of the tenant or consented to by any user in the tenant. "
                         "You may have sent your authentication request to the wrong tenant.")
    if st.app_disabled:
        raise EntraError(400, "unauthorized_client", 7000112,
                         f"Application '{st.client_id}'({st.app_name}) is disabled.")
    if not secret:
        raise EntraError(401, "invalid_client", 7000218,
                         "The request body must contain the following parameter: "
                         "'client_assertion' or 'client_secret'.")
    if secret != st.secret:
        raise EntraError(401, "invalid_client", 7000215,
                         "Invalid client secret provided. Ensure the secret being sent in the request "
                         "is the client secret value, not the client secret ID, for a secret added to "
                         f"app '{st.client_id}'.")
    if st.secret_expired:
        raise EntraError(401, "invalid_client", 7000222,
                         f"The provided client secret keys for app '{st.client_id}' are expired. "
                         "Visit the Azure portal to create new keys for your app: "
                         "https://aka.ms/NewClientSecret, or consider using certificate credentials "
                         "for added security: https://aka.ms/certCreds.")

    scopes = scope.split()
    if len(scopes) != 1:
        raise EntraError(400, "invalid_scope", 70011,
                         "The provided request must include a 'scope' input parameter. The provided "
                         f"value for the input parameter 'scope' is not valid. The scope {scope} is not valid.")
    the_scope = scopes[0]
    if not the_scope.endswith("/.default"):
        raise EntraError(400, "invalid_scope", 1002012,
                         f"The provided value for scope {the_scope} is not valid. Client credential flows "
                         "must have a scope value with /.default suffixed to the resource identifier "
                         "(application ID URI).")
    resource = the_scope[: -len("/.default")].rstrip("/")
    known = RESOURCES.get(resource.lower())
    if known is None:
        raise EntraError(400, "invalid_resource", 500011,
                         f"The resource principal named {resource} was not found in the tenant named "
                         f"{st.tenant_name}. This can happen if the application has not been installed "
                         "by the administrator of the tenant or consented to by any user in the tenant. "
                         "You might have sent your authentication request to the wrong tenant.")
    if not st.consent:
        raise EntraError(400, "invalid_grant", 65001,
                         f"The user or administrator has not consented to use the application with ID "
                         f"'{st.client_id}' named '{st.app_name}'. Send an interactive authorization "
                         "request for this user and resource.")

    aud, roles = known
    now = int(time.time())
    lifetime = st.lifetime
    claims = {
        "aud": aud,
        "iss": f"https://sts.windows.net/{st.tenant}/",
        # Entra back-dates iat/nbf by five minutes to absorb clock skew.
        "iat": now - 300,
        "nbf": now - 300,
        "exp": now + lifetime,
        "appid": st.client_id,
        "oid": st.sp_oid,
        "sub": st.sp_oid,
        "tid": st.tenant,
        "jti": peer_common.b64url(os.urandom(6)),  # 8 chars: unique enough, and short
    }
    if st.azp:
        claims["azp"] = st.client_id
    if st.roles:
        claims["roles"] = roles
    if claims["exp"] < claims["iat"]:
        # Negative lifetimes produce already-expired tokens; keep the times consistent.
        claims["iat"] = claims["nbf"] = claims["exp"] - 60
    # Short kid and jti: every byte counts against Dovecot's AUTH line limit.  ("typ" must
    # stay: Dovecot 2.3 rejects a JWT header without it.)
    token = jwt.encode(claims, st.key, algorithm="ES256", headers={"kid": st.kid, "typ": "JWT"})
    body = {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
            "access_token": token}
    return body, the_scope


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "teos-test-entra"
    sys_version = ""
    st: State = None  # type: ignore[assignment]

    def log_message(self, fmt, *args):  # route http.server's access log to our logger
        log.debug("%s %s", self.address_string(), fmt % args)

    # ---- plumbing ----
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send_json(self, status: int, obj, headers: dict | None = None) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Cache-Control", "no-store, no-cache")
        self.send_header("Pragma", "no-cache")
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _split_path(self):
        path = urllib.parse.urlsplit(self.path).path
        return [p for p in path.split("/") if p]

    def _delay(self) -> None:
        with self.st.lock:
            delay = self.st.delay_ms if self.st.mode == "slow" else 0
        if delay > 0:
            time.sleep(delay / 1000.0)

    # ---- verbs ----
    def do_GET(self):
        parts = self._split_path()
        if parts == ["_stats"]:
            return self._send_json(200, self.st.stats())
        if len(parts) == 4 and parts[1:] == ["discovery", "v2.0", "keys"]:
            return self._jwks(parts[0])
        if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            with self.st.lock:
                self.st.requests += 1
            return self._error(EntraError(400, "invalid_request", 900561,
                                          "The endpoint only accepts POST, OPTIONS requests. "
                                          "Received a GET request."))
        self._send_json(404, {"error": "not_found", "path": self.path})

    def do_POST(self):
        parts = self._split_path()
        body = self._body()
        if parts == ["_control"]:
            return self._control(body)
        if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            return self._token(parts[0], body)
        self._send_json(404, {"error": "not_found", "path": self.path})

    # ---- handlers ----
    def _jwks(self, tenant: str) -> None:
        pub = self.st.key.public_key().public_numbers()
        jwk = {"kty": "EC", "use": "sig", "crv": "P-256", "kid": self.st.kid, "alg": "ES256",
               "x": peer_common.b64url(pub.x.to_bytes(32, "big")),
               "y": peer_common.b64url(pub.y.to_bytes(32, "big")),
               "issuer": f"https://login.microsoftonline.com/{tenant}/v2.0"}
        self._send_json(200, {"keys": [jwk]})

    def _control(self, body: bytes) -> None:
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise ValueError("JSON object expected")
        except ValueError as e:
            return self._send_json(400, {"error": f"bad control request: {e}"})
        st = self.st
        with st.lock:
            if "mode" in req:
                if req["mode"] not in ("ok", "down", "slow"):
                    return self._send_json(400, {"error": "mode must be ok, down or slow"})
                st.mode = req["mode"]
            if "delay_ms" in req:
                st.delay_ms = int(req["delay_ms"])
            if "secret" in req:
                st.secret = str(req["secret"])
            if "lifetime" in req:
                st.lifetime = int(req["lifetime"])
            for flag in ("secret_expired", "consent", "roles", "app_disabled"):
                if flag in req:
                    setattr(st, flag, bool(req[flag]))
            if req.get("reset_stats"):
                st.reset_stats()
            view = st.control_view()
        log.info("control: %s -> %s", req, view)
        self._send_json(200, view)

    def _error(self, err: EntraError) -> None:
        with self.st.lock:
            key = f"AADSTS{err.code}"
            self.st.by_error[key] = self.st.by_error.get(key, 0) + 1
        log.info("token request rejected: %d %s AADSTS%d", err.status, err.error, err.code)
        self._send_json(err.status, entra_error_body(err, self.headers.get("client-request-id")), err.headers)

    def _token(self, tenant: str, body: bytes) -> None:
        st = self.st
        with st.lock:
            st.requests += 1
            mode = st.mode
        self._delay()
        if mode == "down":
            return self._error(EntraError(503, "temporarily_unavailable", 90033,
                                          "A transient error has occurred. Please try again.",
                                          {"Retry-After": "1"}))
        if tenant.lower() != st.tenant:
            return self._error(EntraError(400, "invalid_request", 90002,
                                          f"Tenant '{tenant}' not found. Check to make sure you have the "
                                          "correct tenant ID and are signing into the correct cloud. Check "
                                          "with your subscription administrator, this may happen if there "
                                          "are no active subscriptions for the tenant."))
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return self._error(missing_param("grant_type"))
        try:
            pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            return self._error(missing_param("grant_type"))
        form = {}
        for k, v in pairs:
            form.setdefault(k, v)

        basic = None
        authz = self.headers.get("Authorization") or ""
        if authz[:6].lower() == "basic ":
            try:
                raw = base64.b64decode(authz[6:].strip(), validate=True).decode("utf-8")
                uid, _, pw = raw.partition(":")
                # RFC 6749 2.3.1: both parts are form-urlencoded before base64.
                basic = (urllib.parse.unquote_plus(uid), urllib.parse.unquote_plus(pw))
            except (ValueError, UnicodeDecodeError):
                return self._error(EntraError(401, "invalid_client", 7000215,
                                              "Invalid client secret provided."))
        with st.lock:
            st.by_client_auth["basic" if basic else "body"] += 1
            st.last_token_request = {
                "grant_type": form.get("grant_type"),
                "client_auth": "basic" if basic else "body",
                "client_id": basic[0] if basic else form.get("client_id"),
                "scope": form.get("scope"),
            }
        try:
            with st.lock:
                resp, scope = issue_token(st, form, basic)
                st.issued += 1
                st.by_scope[scope] = st.by_scope.get(scope, 0) + 1
        except EntraError as e:
            return self._error(e)
        log.info("issued token for scope %s (%d chars)", scope, len(resp["access_token"]))
        self._send_json(200, resp)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--tenant", required=True, help="tenant id (GUID) accepted in the URL path")
    p.add_argument("--client-id", required=True, help="the one registered application id")
    p.add_argument("--secret", required=True, help="its client secret")
    p.add_argument("--key", required=True, help="ES256 (P-256) private key, PEM")
    p.add_argument("--kid", help="JWT kid header (default: derived from the public key, see peer_common)")
    p.add_argument("--lifetime", type=int, default=3599, help="expires_in / token lifetime in seconds")
    p.add_argument("--secret-expired", action="store_true", help="the right secret gets AADSTS7000222")
    p.add_argument("--no-consent", action="store_true", help="answer AADSTS65001 invalid_grant")
    p.add_argument("--no-roles", action="store_true",
                   help="issue tokens without a roles claim (what Entra does for an app whose "
                        "application permissions lack admin consent)")
    p.add_argument("--azp", action="store_true",
                   help="also put an azp claim (= client id) in tokens; real Entra v1.0 tokens for "
                        "Exchange/Graph carry only appid.  dovecot_submission.py then needs --client-id")
    p.add_argument("--app-disabled", action="store_true", help="answer AADSTS7000112 (app disabled)")
    p.add_argument("--tenant-name", default="Contoso", help="directory display name used in messages")
    p.add_argument("--app-name", default="teos-mailer", help="app display name used in messages")
    p.add_argument("--ignore-stdin", action="store_true", help="do not exit on stdin EOF (manual use)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global log
    a = parse_args(argv)
    log = peer_common.setup_logging("token_server", a.verbose)
    st = State(a)
    Handler.st = st
    return peer_common.serve_http(Handler, a.ignore_stdin, a.host, a.port, log, f"tenant={st.tenant} client_id={st.client_id} kid={st.kid}")


if __name__ == "__main__":
    sys.exit(main())
