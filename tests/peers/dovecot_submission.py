#!/usr/bin/env python3
"""A private Dovecot 2.3 submission service that accepts SASL XOAUTH2/OAUTHBEARER (test peer).

    python3 tests/peers/dovecot_submission.py --host 127.0.0.1 --port 0 \
        --relay-port N --pub tests/peers/keys/es256.pub --dir RUNDIR \
        [--no-tls] [--client-id ID ...] [--relay-host 127.0.0.1] \
        [--audience https://outlook.office365.com] [--role SMTP.SendAsApp] \
        [--kid KID] [--ignore-stdin] [-v]

Dovecot's oauth2 passdb validates the ES256 JWT locally (introspection_mode = local,
key from an fs:posix dict), accepts it for ANY mailbox user name, and relays the
accepted mail to RELAY_HOST:RELAY_PORT (e.g. tests/peers/smtp_server.py).

Prints {"port": N} on stdout once the submission port answers with its 220 greeting;
logs to stderr (Dovecot's own log: RUNDIR/dovecot.log).  Exits, stopping Dovecot, on
stdin EOF (unless --ignore-stdin), SIGTERM or SIGINT.  See README-oauth.md.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import ctypes  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import peer_common  # noqa: E402

log = None  # set in main()

# Dovecot compares the token's username_attribute, run through username_format, with the
# login user run through the same format.  A format without any %-variable expands to the
# same constant on both sides, so the check passes for every mailbox name while the
# attribute (sub) must still be present.
ANY_USER_FORMAT = "oauth2-app-token"


RUNTIME_PREFIX = "dcsub-"


def remove_stale_runtimes() -> None:
    """Remove /tmp/dcsub-* trees left by wrappers that were SIGKILLed (their owner is gone)."""
    for name in os.listdir("/tmp"):
        if not name.startswith(RUNTIME_PREFIX):
            continue
        path = os.path.join("/tmp", name)
        try:
            with open(os.path.join(path, "owner.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue  # owner still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(path, ignore_errors=True)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_cert(rundir: str) -> tuple[str, str]:
    """A test CA (tls-ca.pem, for the client to trust) and a server certificate it signed
    for localhost, 127.0.0.1 and 127.0.0.2."""
    cert = os.path.join(rundir, "tls-cert.pem")
    key = os.path.join(rundir, "tls-key.pem")
    ca = os.path.join(rundir, "tls-ca.pem")
    ca_key = os.path.join(rundir, "tls-ca-key.pem")
    csr = os.path.join(rundir, "tls.csr")
    ext = os.path.join(rundir, "tls-ext.cnf")
    if not (os.path.exists(cert) and os.path.exists(key) and os.path.exists(ca)):
        def run(*args: str) -> None:
            subprocess.run(list(args), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run("openssl", "req", "-x509", *ec, "-days", "3650", "-subj", "/CN=teos-mailer test CA",
            "-keyout", ca_key, "-out", ca)
        run("openssl", "req", "-new", *ec, "-subj", "/CN=localhost", "-keyout", key, "-out", csr)
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                    "extendedKeyUsage=serverAuth\n"
                    "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:127.0.0.2\n")
        run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-days", "3650", "-extfile", ext, "-out", cert)
    return cert, key


def write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def install_keys(keydir: str, pub_pem: str, kid: str, azps: list[str]) -> list[str]:
    """Store the public key where Dovecot's local JWT validation looks it up.

    Dovecot 2.3 (lib-oauth2/oauth2-jwt.c) looks up the dict key
    "shared/<azp>/<alg>/<kid>", where <azp> is the token's azp claim ("default" when the
    token has none) and <kid> the header's kid ("default" when absent), both with '/' and
    '%' escaped as %2f/%25.  The fs dict drops "shared/" and the posix fs prepends its
    prefix, so the file is <prefix><azp>/ES256/<kid> holding the PEM public key.
    """
    paths = []
    for azp in azps:
        esc = azp.replace("%", "%25").replace("/", "%2f")
        for k in dict.fromkeys([kid, "default"]):
            d = os.path.join(keydir, esc, "ES256")
            os.makedirs(d, mode=0o755, exist_ok=True)
            p = os.path.join(d, k)
            write(p, pub_pem)
            paths.append(p)
    return paths


def dovecot_conf(a, rundir: str, rt: str, port: int, cert: str | None, key: str | None) -> str:
    tls = "no"
    tls_lines = ""
    if cert:
        tls = "yes"
        tls_lines = f"ssl_cert = <{cert}\nssl_key = <{key}\n"
        if os.path.exists("/usr/share/dovecot/dh.pem"):
            tls_lines += "ssl_dh = </usr/share/dovecot/dh.pem\n"
    debug = "yes" if a.verbose else "no"
    return f"""# generated by tests/peers/dovecot_submission.py -- do not edit
protocols = submission
listen = {a.host}
base_dir = {rt}/base
state_dir = {rt}/state
log_path = {rundir}/dovecot.log
info_log_path = {rundir}/dovecot.log
debug_log_path = {rundir}/dovecot.log
instance_name = teos-test-{port}
hostname = mail.contoso.test
postmaster_address = postmaster@contoso.test
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
first_valid_uid = 1
shutdown_clients = yes
version_ignore = yes

ssl = {tls}
{tls_lines}
disable_plaintext_auth = yes
auth_mechanisms = xoauth2 oauthbearer
auth_verbose = yes
auth_debug = {debug}
auth_failure_delay = 0
login_log_format_elements = user=<%u> method=%m rip=%r lip=%l mpid=%e %c session=<%{{session}}>

passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {rundir}/dovecot-oauth2.conf.ext
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={rt}/home/%d/%n allow_all_users=yes
}}

# Submission only needs a mail store for BURL; give it one under the runtime dir.
mail_location = maildir:~/Maildir

submission_relay_host = {a.relay_host}
submission_relay_port = {a.relay_port}
submission_relay_trusted = no
submission_relay_ssl = no
submission_max_mail_size = 0

service submission-login {{
  inet_listener submission {{
    address = {a.host}
    port = {port}
  }}
  process_min_avail = 1
}}
# No anvil-auth-penalty socket: the auth process then disables its failure penalty
# (up to 15 s per attempt from the same IP), which would slow tests of bad tokens.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


def oauth2_conf(a, keydir: str) -> str:
    lines = [
        "# generated by tests/peers/dovecot_submission.py -- do not edit",
        "introspection_mode = local",
        f"local_validation_key_dict = fs:posix:prefix={keydir}/",
        # Every app token has sub (= the service principal's object id).
        "username_attribute = sub",
        f"username_format = {ANY_USER_FORMAT}",
        f"debug = {'yes' if a.verbose else 'no'}",
    ]
    if a.audience:
        # With client_id set, Dovecot requires it to be one of the token's aud values.
        lines.append(f"client_id = {a.audience}")
    if a.role:
        # roles is copied as a tab-separated field; the token server issues exactly one role.
        lines += ["active_attribute = roles", f"active_value = {a.role}"]
    return "\n".join(lines) + "\n"


def set_pdeathsig() -> None:
    """In the child: get SIGTERM if the wrapper dies, so no Dovecot outlives its test."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def wait_greeting(host: str, port: int, proc: subprocess.Popen, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(5)
                data = s.recv(512)
                if data.startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    except OSError:
                        pass
                    return data.decode("utf-8", "replace").strip()
        except OSError:
            pass
        time.sleep(0.1)
    return None


def stop_dovecot(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.terminate()  # the master stops all its children on SIGTERM
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.warning("dovecot master %d did not stop in 10 s; killing its process group", proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait(timeout=5)


def tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address the submission service binds to")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--relay-host", default="127.0.0.1")
    p.add_argument("--relay-port", type=int, required=True, help="SMTP sink that receives accepted mail")
    p.add_argument("--pub", required=True, help="ES256 public key (PEM) that signs the tokens")
    p.add_argument("--dir", required=True, help="run directory: config, logs, cert")
    p.add_argument("--no-tls", action="store_true", help="ssl = no (no STARTTLS offered)")
    p.add_argument("--client-id", action="append", default=[],
                   help="extra azp value to store the key under (repeatable; see README-oauth.md)")
    p.add_argument("--kid", help="key id to store the key under (default: as token_server.py computes it)")
    p.add_argument("--audience", default="https://outlook.office365.com",
                   help="required token aud ('' = no check)")
    p.add_argument("--role", default="SMTP.SendAsApp", help="required roles value ('' = no check)")
    p.add_argument("--ignore-stdin", action="store_true", help="do not exit on stdin EOF (manual use)")
    p.add_argument("-v", "--verbose", action="store_true", help="auth_debug and oauth2 debug in dovecot.log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global log
    a = parse_args(argv)
    log = peer_common.setup_logging("dovecot_submission", a.verbose)
    if shutil.which("dovecot") is None:
        log.error("dovecot is not installed (apt-get install dovecot-core dovecot-submissiond)")
        return 2
    stop = peer_common.stop_event(a.ignore_stdin)

    rundir = os.path.abspath(a.dir)
    os.makedirs(rundir, exist_ok=True)
    # Dovecot's unprivileged processes (auth runs as "dovecot", login as "dovenull") must
    # reach its sockets and the key files, and UNIX socket paths are limited to 107 bytes,
    # so the runtime tree lives in a short world-traversable directory; RUNDIR/runtime
    # points at it.
    remove_stale_runtimes()
    rt = tempfile.mkdtemp(prefix=RUNTIME_PREFIX, dir="/tmp")
    os.chmod(rt, 0o755)
    write(os.path.join(rt, "owner.pid"), f"{os.getpid()}\n")
    link = os.path.join(rundir, "runtime")
    if os.path.islink(link) or os.path.exists(link):
        os.remove(link)
    os.symlink(rt, link)
    keydir = os.path.join(rt, "keys")
    os.makedirs(keydir, mode=0o755)
    os.makedirs(os.path.join(rt, "home"), mode=0o777)
    os.chmod(os.path.join(rt, "home"), 0o1777)

    pub = peer_common.load_public_key(a.pub)
    kid = a.kid or peer_common.kid_for_public_key(pub)
    with open(a.pub) as f:
        pub_pem = f.read()
    key_paths = install_keys(keydir, pub_pem, kid, ["default"] + a.client_id)
    log.info("public key stored as %s", ", ".join(key_paths))

    cert = key = None
    if not a.no_tls:
        cert, key = make_cert(rundir)
    write(os.path.join(rundir, "dovecot-oauth2.conf.ext"), oauth2_conf(a, keydir))

    proc = None
    port = None
    greeting = None
    try:
        for attempt in range(5):
            port = a.port or free_port(a.host)
            conf_path = os.path.join(rundir, "dovecot.conf")
            write(conf_path, dovecot_conf(a, rundir, rt, port, cert, key))
            stderr_f = open(os.path.join(rundir, "dovecot.stderr"), "ab")
            proc = subprocess.Popen(
                ["dovecot", "-F", "-c", conf_path],
                stdin=subprocess.DEVNULL, stdout=stderr_f, stderr=stderr_f,
                start_new_session=True, preexec_fn=set_pdeathsig,
            )
            stderr_f.close()
            greeting = wait_greeting(a.host, port, proc, timeout=30)
            if greeting is not None:
                break
            log.warning("dovecot did not come up on %s:%d (attempt %d, exit %s):\n%s%s",
                        a.host, port, attempt + 1, proc.poll(),
                        tail(os.path.join(rundir, "dovecot.stderr")), tail(os.path.join(rundir, "dovecot.log")))
            stop_dovecot(proc)
            proc = None
            if a.port or stop.is_set():
                break
        if proc is None:
            log.error("giving up: dovecot did not start")
            return 1
        log.info("dovecot %d ready on %s:%d: %s (relay %s:%d, log %s/dovecot.log)",
                 proc.pid, a.host, port, greeting, a.relay_host, a.relay_port, rundir)
        peer_common.announce({"port": port})
        while not stop.wait(0.5):
            if proc.poll() is not None:
                log.error("dovecot exited unexpectedly (%s):\n%s", proc.returncode,
                          tail(os.path.join(rundir, "dovecot.log")))
                return 1
        log.info("shutting down dovecot %d", proc.pid)
        return 0
    finally:
        if proc is not None:
            stop_dovecot(proc)
        shutil.rmtree(rt, ignore_errors=True)
        try:
            os.remove(link)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
