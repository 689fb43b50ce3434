"""Helpers shared by the OAuth test peers (token_server, graph_server, dovecot_submission).

Not a peer itself.  Peers import it from their own directory; bytecode writing
is switched off by the importers so tests/peers/ stays free of __pycache__.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import signal
import sys
import threading

from cryptography.hazmat.primitives import serialization


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_public_key(path: str):
    with open(path, "rb") as f:
        return serialization.load_pem_public_key(f.read())


def load_private_key(path: str):
    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def kid_for_public_key(pub) -> str:
    """Key id of a public key: base64url of the first 6 bytes of SHA-1(SPKI DER), 8 chars.

    Entra's kids are 27 chars (a full SHA-1 thumbprint); ours is cut short because the
    whole JWT must fit in Dovecot's ~1 KB AUTH line (see README-oauth.md).  Only
    [A-Za-z0-9_-], so it is safe as a file name in Dovecot's key dict.  token_server.py
    puts it in the JWT header; dovecot_submission.py stores the key under it; both compute
    it from the same key pair.
    """
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b64url(hashlib.sha1(der).digest()[:6])


def setup_logging(name: str, verbose: bool) -> logging.Logger:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"{name}[%(process)d] %(levelname)s: %(message)s",
    )
    return logging.getLogger(name)


def atomic_write(directory: str, name: str, data: bytes) -> None:
    """Writes DIR/name through a temporary file, so a reader never sees half of it."""
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, "." + name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, final)


def serve_http(handler, ignore_stdin: bool, host: str, port: int, log, what: str) -> int:
    """Serves `handler` on host:port until stdin closes or a signal comes; announces the
    port once listening."""
    from http.server import ThreadingHTTPServer

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    srv = ThreadingHTTPServer((host, port), handler)
    port = srv.server_address[1]
    stop = stop_event(ignore_stdin)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    log.info("listening on %s:%d, %s", host, port, what)
    announce({"port": port})
    wait_for(stop)
    log.info("shutting down")
    srv.shutdown()
    srv.server_close()
    return 0


def announce(obj: dict) -> None:
    """Print the single ready line on stdout and flush."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def stop_event(ignore_stdin: bool) -> threading.Event:
    """An Event set on SIGTERM/SIGINT or (unless ignore_stdin) when stdin reaches EOF."""
    ev = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        ev.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if not ignore_stdin:
        def watch():
            try:
                while os.read(0, 65536):
                    pass
            except OSError:
                pass
            ev.set()

        threading.Thread(target=watch, name="stdin-watch", daemon=True).start()
    return ev


def wait_for(ev: threading.Event) -> None:
    # Event.wait() with a timeout in a loop keeps the main thread responsive to signals.
    while not ev.wait(0.5):
        pass
