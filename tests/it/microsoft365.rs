//! Microsoft 365 delivery against real peers: an Entra-like token endpoint that signs
//! ES256 JWTs, a Graph sendMail server that verifies them, and Dovecot's submission
//! service validating them for SASL XOAUTH2.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use teos_mailer::config::Config;
use teos_mailer::settings::{Password, Settings};
use teos_mailer::store::{OAuthUpdate, Store};
use teos_mailer::token::{GRAPH_SCOPE, TokenKey, TokenManager};

use crate::support::{
    Daemon, Dialect, Peer, TestDb, assert_waits, eventually, header, mail, run_until_sent,
    until_paused, worker,
};

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT: &str = "6731de76-14a6-49ae-97bc-6eba6914391e";
const SECRET: &str = "Xy8Q~right.secret-value";
const KEY: &str = "tests/peers/keys/es256.key";
const PUB: &str = "tests/peers/keys/es256.pub";

fn entra(extra: &[&str]) -> Peer {
    let mut args = vec![
        "--tenant",
        TENANT,
        "--client-id",
        CLIENT,
        "--secret",
        SECRET,
        "--key",
        KEY,
    ];
    args.extend_from_slice(extra);
    Peer::start("token_server.py", &args)
}

/// Dovecot's submission service relaying to a fresh sink; returns (dovecot, sink).
fn dovecot(extra: &[&str]) -> (Peer, Peer) {
    let sink = Peer::smtp(&[]);
    let relay_port = sink.port.to_string();
    let mut args = vec!["--relay-port", &relay_port, "--pub", PUB, "--dir", "{dir}"];
    args.extend_from_slice(extra);
    (Peer::start("dovecot_submission.py", &args), sink)
}

fn graph() -> Peer {
    Peer::start(
        "graph_server.py",
        &["--dir", "{dir}", "--pub", PUB, "--tenant", TENANT],
    )
}

async fn use_oauth(
    db: &TestDb,
    mode: &str,
    token: &Peer,
    secret: &str,
    smtp: Option<u16>,
    graph: Option<u16>,
) {
    let store = db.store().await;
    store
        .set_oauth(&OAuthUpdate {
            enabled: true,
            mode: mode.into(),
            tenant_id: Some(TENANT.into()),
            client_id: Some(CLIENT.into()),
            client_secret: Some(SecretString::from(secret.to_string())),
            smtp_host: smtp.map(|_| "127.0.0.1".into()),
            smtp_port: smtp,
            authority_host: Some(format!("http://127.0.0.1:{}", token.port)),
            graph_base_url: graph.map(|p| format!("http://127.0.0.1:{p}")),
            general_sender: Some("TEOS <general@contoso.test>".into()),
            reception_sender: Some("Reception <reception@contoso.test>".into()),
        })
        .await
        .unwrap();
    store.close().await;
}

/// Test timings, no pacing, and a worker that can run many messages at once.
fn m365_config(db: &TestDb) -> Config {
    let mut cfg = db.config();
    cfg.microsoft365.messages_per_minute = 0;
    cfg.delivery.concurrency = 32;
    cfg
}

async fn requests(token: &Peer) -> u64 {
    token.stats().await["requests"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_sends_1000_messages_with_one_token_and_oauth_wins_over_the_relay() {
    let db = TestDb::new(Dialect::Postgres).await;
    let (token, graph, relay) = (entra(&[]), graph(), Peer::smtp(&[]));
    db.use_relay(relay.port, None).await;
    use_oauth(&db, "graph", &token, SECRET, None, Some(graph.port)).await;
    let store = db.store().await;
    for i in 0..999 {
        store
            .enqueue(&mail("ann@example.com", &format!("m{i}")))
            .await
            .unwrap();
    }
    let mut visitor = mail("guest@example.com", "Your visitor has arrived");
    visitor.module = Some("reception".into());
    let (visitor_id, _) = store.enqueue(&visitor).await.unwrap();

    let mut cfg = m365_config(&db);
    cfg.delivery.concurrency = 16;
    let daemon = Daemon::start(cfg);
    let all = eventually(Duration::from_secs(120), || async {
        db.count("SELECT COUNT(*) FROM mail_outbox WHERE status = 'sent'")
            .await
            == 1000
    })
    .await;
    daemon.stop().await;
    assert!(all, "1000 messages sent through Graph");
    assert_eq!(
        requests(&token).await,
        1,
        "one token request for 1000 messages"
    );
    assert_eq!(graph.received().len(), 1000);
    assert!(
        relay.received().is_empty(),
        "the relay is no second chance when OAuth is on"
    );

    let senders: Vec<String> = graph
        .received()
        .iter()
        .map(|(j, _)| j["sender"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        senders
            .iter()
            .filter(|s| *s == "reception@contoso.test")
            .count(),
        1
    );
    let visitor_mail = graph
        .received()
        .into_iter()
        .find(|(j, _)| j["sender"] == "reception@contoso.test")
        .unwrap();
    let row = &store.list(Some(visitor_id), None, 1).await.unwrap()[0];
    assert_eq!(header(&visitor_mail.1, "Message-ID"), row.message_id);
    assert!(
        header(&visitor_mail.1, "From")
            .unwrap()
            .contains("reception@contoso.test")
    );
    store.close().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_throttling_backs_the_mailbox_off_without_spending_the_attempt() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let (token, graph) = (entra(&[]), graph());
    use_oauth(&db, "graph", &token, SECRET, None, Some(graph.port)).await;
    let store = db.store().await;
    let (id, _) = store
        .enqueue(&mail("graph429-once@example.com", "slow down"))
        .await
        .unwrap();
    store
        .enqueue(&mail("ann@example.com", "same mailbox"))
        .await
        .unwrap();
    let w = worker(&m365_config(&db)).await;
    w.run_once().await.unwrap();

    // The whole mailbox backs off; the message keeps its attempt.
    assert_waits(&store, id, "429").await;

    // Retry-After: 1 — then both go.
    assert!(run_until_sent(&w, &db, 2).await);
    let history: Vec<String> = store
        .attempts(id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(history.first().map(String::as_str), Some("throttled"));
    assert_eq!(history.last().map(String::as_str), Some("sent"));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_pauses_with_the_aadsts_reason_until_the_settings_change() {
    let db = TestDb::new(Dialect::Postgres).await;
    let (token, graph) = (entra(&[]), graph());
    use_oauth(
        &db,
        "graph",
        &token,
        "Xy8Q~a.wrong.secret",
        None,
        Some(graph.port),
    )
    .await;
    let store = Arc::new(db.store().await);
    let (id, _) = store
        .enqueue(&mail("ann@example.com", "after the fix"))
        .await
        .unwrap();
    let mut cfg = m365_config(&db);
    cfg.delivery.settings_poll_secs = 1;
    let daemon = Daemon::start(cfg);

    assert!(until_paused(&store).await);
    assert_waits(&store, id, "AADSTS7000215").await;
    let reason = store.stats().await.unwrap().pauses[0].reason.clone();
    assert!(reason.contains("Certificates & secrets"), "{reason}");

    // The admin pastes the right secret: the pause lifts and mail flows at once.
    use_oauth(&db, "graph", &token, SECRET, None, Some(graph.port)).await;
    assert_eq!(graph.wait_for(1, Duration::from_secs(15)).await.len(), 1);
    daemon.stop().await;
    let row = &store.list(Some(id), None, 1).await.unwrap()[0];
    assert_eq!((row.status.as_str(), row.attempts), ("sent", 1));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_down_makes_mail_wait_then_flow() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let (token, graph) = (entra(&[]), graph());
    use_oauth(&db, "graph", &token, SECRET, None, Some(graph.port)).await;
    token.control(serde_json::json!({"mode": "down"})).await;
    let store = db.store().await;
    let (id, _) = store
        .enqueue(&mail("ann@example.com", "patience"))
        .await
        .unwrap();
    let w = worker(&m365_config(&db)).await;
    w.run_once().await.unwrap();
    let row = &store.list(Some(id), None, 1).await.unwrap()[0];
    assert_eq!(row.status, "pending");
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("token endpoint"),
        "{:?}",
        row.last_error
    );
    assert!(graph.received().is_empty());

    token.control(serde_json::json!({"mode": "ok"})).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            w.run_once().await.unwrap().claimed == 1
        })
        .await
    );
    assert_eq!(graph.wait_for(1, Duration::from_secs(5)).await.len(), 1);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_before_expiry_with_no_send_waiting() {
    let token = entra(&["--lifetime", "8"]);
    let http = reqwest::Client::new();
    let tokens = TokenManager::new(http, Duration::from_secs(600));
    let key = TokenKey {
        authority: format!("http://127.0.0.1:{}", token.port),
        tenant: TENANT.into(),
        client_id: CLIENT.into(),
        scope: GRAPH_SCOPE,
    };
    let secret = Password(SECRET.into());
    let first = tokens.token(&key, &secret).await.unwrap();
    // Many sends at once while no token is cached still make one request.
    let again = futures_join(&tokens, &key, &secret, 20).await;
    assert!(again.iter().all(|t| *t == first));
    assert_eq!(requests(&token).await, 1);

    // An 8 s token is renewed in the background after at most 4 s, before it expires.
    assert!(
        eventually(Duration::from_secs(7), || async {
            requests(&token).await == 2
        })
        .await
    );
    let fresh = tokens.token(&key, &secret).await.unwrap();
    assert_ne!(fresh, first);
    assert!(fresh.expires_at > first.expires_at);
    assert_eq!(
        requests(&token).await,
        2,
        "the send found the renewed token ready"
    );
}

async fn futures_join(
    tokens: &Arc<TokenManager>,
    key: &TokenKey,
    secret: &Password,
    n: usize,
) -> Vec<teos_mailer::token::AccessToken> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (t, k, s) = (tokens.clone(), key.clone(), secret.clone());
        tasks.spawn(async move { t.token(&k, &s).await.unwrap() });
    }
    tasks.join_all().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_token_requests_are_shared_by_concurrent_sends() {
    let token = entra(&[]);
    token
        .control(serde_json::json!({"mode": "slow", "delay_ms": 500}))
        .await;
    let tokens = TokenManager::new(reqwest::Client::new(), Duration::from_secs(600));
    let key = TokenKey {
        authority: format!("http://127.0.0.1:{}", token.port),
        tenant: TENANT.into(),
        client_id: CLIENT.into(),
        scope: GRAPH_SCOPE,
    };
    let got = futures_join(&tokens, &key, &Password(SECRET.into()), 50).await;
    assert!(got.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        requests(&token).await,
        1,
        "50 waiting sends, one token request"
    );
}

/// The XOAUTH2 path against Dovecot, which validates the JWT itself and relays to a sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_xoauth2_through_dovecot_with_starttls() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let (dovecot, sink) = dovecot(&[]);
    let token = entra(&[]);
    use_oauth(&db, "smtp", &token, SECRET, Some(dovecot.port), None).await;
    let store = db.store().await;
    for i in 0..5 {
        store
            .enqueue(&mail("ann@example.com", &format!("xoauth2 {i}")))
            .await
            .unwrap();
    }
    let mut visitor = mail("guest@example.com", "visitor");
    visitor.module = Some("reception".into());
    store.enqueue(&visitor).await.unwrap();

    let mut cfg = m365_config(&db);
    cfg.delivery.extra_ca_file = dovecot.dir.path().join("tls-ca.pem");
    worker(&cfg).await.run_once().await.unwrap();

    let got = sink.wait_for(6, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 6);
    let from: Vec<&str> = got
        .iter()
        .map(|(j, _)| j["mail_from"].as_str().unwrap())
        .collect();
    assert_eq!(
        from.iter()
            .filter(|f| **f == "reception@contoso.test")
            .count(),
        1
    );
    assert!(
        got.iter()
            .all(|(_, eml)| eml.contains("with ESMTPSA") || eml.contains("with ESMTPA"))
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM mail_outbox WHERE status = 'sent'")
            .await,
        6
    );
    assert_eq!(requests(&token).await, 1);
    store.close().await;
}

/// Dovecot answers a bad token with a 334 JSON challenge, then 535: one new token is
/// fetched, refused too, and then the sender pauses with advice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_token_is_refetched_once_then_pauses_the_sender() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let (dovecot, sink) = dovecot(&[]);
    // Tokens signed under a key id Dovecot does not know.
    let token = entra(&["--kid", "unknown1"]);
    use_oauth(&db, "smtp", &token, SECRET, Some(dovecot.port), None).await;
    let store = db.store().await;
    let (id, _) = store
        .enqueue(&mail("ann@example.com", "refused"))
        .await
        .unwrap();
    let mut cfg = m365_config(&db);
    cfg.delivery.extra_ca_file = dovecot.dir.path().join("tls-ca.pem");
    worker(&cfg).await.run_once().await.unwrap();

    assert_eq!(requests(&token).await, 2, "one refetch after the refusal");
    assert_waits(&store, id, "SMTP.SendAsApp").await;
    assert!(sink.received().is_empty());
    store.close().await;
}

/// A server that does not offer STARTTLS never sees a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_over_an_unencrypted_connection() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let (dovecot, sink) = dovecot(&["--no-tls"]);
    let token = entra(&[]);
    use_oauth(&db, "smtp", &token, SECRET, Some(dovecot.port), None).await;
    let store = db.store().await;
    store
        .enqueue(&mail("ann@example.com", "plaintext"))
        .await
        .unwrap();
    worker(&m365_config(&db)).await.run_once().await.unwrap();
    let pauses = store.stats().await.unwrap().pauses;
    assert_eq!(pauses.len(), 1);
    assert!(
        pauses[0].reason.contains("STARTTLS"),
        "{}",
        pauses[0].reason
    );
    assert!(sink.received().is_empty());
    let log = std::fs::read_to_string(dovecot.dir.path().join("dovecot.log")).unwrap_or_default();
    assert!(!log.contains("oauth2"), "no AUTH reached Dovecot: {log}");
    store.close().await;
}

#[tokio::test]
async fn oauth_settings_an_admin_saves_wrong_are_reported_and_mail_waits() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let store: Store = db.store().await;
    store
        .set_oauth(&OAuthUpdate {
            enabled: true,
            mode: "graph".into(),
            tenant_id: Some("contoso".into()),
            client_id: Some(CLIENT.into()),
            client_secret: Some(SecretString::from(SECRET.to_string())),
            smtp_host: None,
            smtp_port: None,
            authority_host: None,
            graph_base_url: None,
            general_sender: Some("general@contoso.test".into()),
            reception_sender: None,
        })
        .await
        .unwrap();
    let settings = Settings::from_row(store.load_settings().await.unwrap());
    assert!(settings.oauth.unwrap_err().contains("tenant ID"));
    let (id, _) = store
        .enqueue(&mail("ann@example.com", "waits"))
        .await
        .unwrap();
    worker(&db.config()).await.run_once().await.unwrap();
    let row = &store.list(Some(id), None, 1).await.unwrap()[0];
    assert_eq!(
        (row.status.as_str(), row.attempts),
        ("pending", 0),
        "waits, not failed"
    );
    assert!(row.last_error.as_deref().unwrap().contains("tenant ID"));
    store.close().await;
}

/// An Exchange-like server: STARTTLS with a test CA, then XOAUTH2 in `mode`.
fn exchange(mode: &str) -> Peer {
    Peer::smtp(&[
        "--xoauth2",
        mode,
        "--tls-dir",
        "{dir}/tls",
        "--require-auth",
    ])
}

fn exchange_config(db: &TestDb, server: &Peer) -> Config {
    let mut cfg = m365_config(db);
    cfg.delivery.extra_ca_file = server.dir.path().join("tls/tls-ca.pem");
    cfg
}

/// Exchange's own form: 535 at once, no challenge. One refetch, then a pause with advice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_535_refetches_once_and_a_fresh_token_can_pass() {
    for (mode, expect_sent, expect_words) in [
        ("reject-once", true, ""),
        ("reject", false, "SMTP.SendAsApp"),
        ("disabled", false, "SmtpClientAuthenticationDisabled"),
    ] {
        let db = TestDb::new(Dialect::Sqlite).await;
        let (server, token) = (exchange(mode), entra(&[]));
        use_oauth(&db, "smtp", &token, SECRET, Some(server.port), None).await;
        let store = db.store().await;
        let (id, _) = store.enqueue(&mail("ann@example.com", mode)).await.unwrap();
        worker(&exchange_config(&db, &server))
            .await
            .run_once()
            .await
            .unwrap();

        assert_eq!(requests(&token).await, 2, "{mode}: exactly one refetch");
        let row = &store.list(Some(id), None, 1).await.unwrap()[0];
        if expect_sent {
            assert_eq!(row.status, "sent", "{mode}");
            assert_eq!(server.received()[0].0["auth_user"], "general@contoso.test");
        } else {
            assert_waits(&store, id, expect_words).await;
            assert!(server.received().is_empty());
        }
        store.close().await;
    }
}

/// 432 4.3.2: the mailbox backs off and runs one session fewer; the message keeps its
/// attempt and goes after the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_432_throttles_the_mailbox() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let (server, token) = (exchange("accept"), entra(&[]));
    use_oauth(&db, "smtp", &token, SECRET, Some(server.port), None).await;
    let store = db.store().await;
    let (id, _) = store
        .enqueue(&mail("throttle-once@example.com", "busy"))
        .await
        .unwrap();
    let mut cfg = exchange_config(&db, &server);
    cfg.microsoft365.throttle_pause_secs = 1;
    let w = worker(&cfg).await;
    w.run_once().await.unwrap();
    assert_waits(&store, id, "4.3.2").await;
    assert!(run_until_sent(&w, &db, 1).await);
    let tokens: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(server.dir.path().join("stats.json")).unwrap())
            .map(|s: serde_json::Value| s["tokens"].as_array().unwrap().clone())
            .unwrap();
    assert!(!tokens.is_empty());
    assert_eq!(requests(&token).await, 1);
    store.close().await;
}

/// The admin's test e-mail: the stored settings, step by step, in words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_email_says_what_is_wrong() {
    use std::process::Command;

    let db = TestDb::new(Dialect::Sqlite).await;
    let (token, graph) = (entra(&[]), graph());
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_teos-mailer"))
            .args([
                "test-email",
                "--to",
                "admin@contoso.test",
                "--sender",
                "reception",
            ])
            .env("TEOS_MAILER__DATABASE__URL", &db.url)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    use_oauth(
        &db,
        "graph",
        &token,
        "Xy8Q~expired.or.wrong",
        None,
        Some(graph.port),
    )
    .await;
    let (code, text) = run();
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("FAIL token") && text.contains("AADSTS7000215"),
        "{text}"
    );
    assert!(
        !text.contains("Xy8Q~"),
        "the secret is never printed: {text}"
    );

    use_oauth(&db, "graph", &token, SECRET, None, Some(graph.port)).await;
    let (code, text) = run();
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("ok   token") && text.contains("ok   send") && text.contains("202"),
        "{text}"
    );
    let got = graph.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0["sender"], "reception@contoso.test");
}

/// The daemon's own log, at debug level and as JSON, never carries the client secret, the
/// relay password or a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_tokens_never_reach_the_log() {
    use std::process::{Command, Stdio};

    let db = TestDb::new(Dialect::Sqlite).await;
    let (token, graph) = (entra(&[]), graph());
    db.use_relay(2525, Some(("relay-user", "relay-Pa55word")))
        .await;
    use_oauth(&db, "graph", &token, SECRET, None, Some(graph.port)).await;
    let store = db.store().await;
    store
        .enqueue(&mail("ann@example.com", "logged"))
        .await
        .unwrap();
    store
        .enqueue(&mail("denied@example.com", "also logged"))
        .await
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_teos-mailer"))
        .args(["run", "--until-idle"])
        .env("TEOS_MAILER__DATABASE__URL", &db.url)
        .env("TEOS_MAILER__LOG__LEVEL", "debug")
        .env("TEOS_MAILER__LOG__FORMAT", "json")
        .env("TEOS_MAILER__MICROSOFT365__MESSAGES_PER_MINUTE", "0")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(graph.received().len() == 2, "both sent: {log}");
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(event["level"].is_string() && event["timestamp"].is_string());
    }
    assert!(log.contains("\"message\":\"sent\""), "{log}");
    for secret in [SECRET, "relay-Pa55word", "eyJ"] {
        assert!(!log.contains(secret), "{secret} appears in the log");
    }
    store.close().await;
}

/// Messages waiting for their mailbox's turn (pacing) when the daemon stops are given
/// back at once, unsent, instead of staying leased until the lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_gives_back_paced_messages_unsent() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let (token, graph) = (entra(&[]), graph());
    use_oauth(&db, "graph", &token, SECRET, None, Some(graph.port)).await;
    let store = db.store().await;
    for i in 0..3 {
        store
            .enqueue(&mail("ann@example.com", &format!("paced {i}")))
            .await
            .unwrap();
    }
    let mut cfg = m365_config(&db);
    cfg.microsoft365.messages_per_minute = 6; // one every 10 s
    let daemon = Daemon::start(cfg);
    assert_eq!(graph.wait_for(1, Duration::from_secs(10)).await.len(), 1);
    assert!(
        eventually(Duration::from_secs(5), || async {
            db.count("SELECT COUNT(*) FROM mail_outbox WHERE status = 'sending'")
                .await
                == 2
        })
        .await
    );
    daemon.stop().await;

    assert_eq!(graph.received().len(), 1, "nothing more was sent");
    let waiting = db
        .count("SELECT COUNT(*) FROM mail_outbox WHERE status = 'pending' AND attempts = 0 AND lease_owner IS NULL")
        .await;
    assert_eq!(
        waiting, 2,
        "both waiting messages are due again, with no attempt spent"
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM mail_attempt").await, 1);
    store.close().await;
}
