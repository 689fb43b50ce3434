//! Several real daemons (the binary) sharing one database: every row goes exactly once,
//! and the rows of a daemon killed mid-batch are delivered by another after the lease.

use std::collections::{BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Dialect, Peer, TestDb, eventually, header};

/// The real binary as a daemon on `db`, with test-friendly timings.
fn spawn_daemon(db: &TestDb, lease_secs: u64, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_teos-mailer"));
    cmd.arg("run")
        .env("TEOS_MAILER__DATABASE__URL", &db.url)
        .env("TEOS_MAILER__DELIVERY__POLL_INTERVAL_MS", "100")
        .env("TEOS_MAILER__DELIVERY__LEASE_SECS", lease_secs.to_string())
        .env(
            "TEOS_MAILER__DELIVERY__SEND_TIMEOUT_SECS",
            (lease_secs - 1).to_string(),
        )
        .env("TEOS_MAILER__DELIVERY__MESSAGE_ID_DOMAIN", "teos.test")
        .env("TEOS_MAILER__LOG__LEVEL", "warn")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("the teos-mailer binary starts")
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One multi-row INSERT, as a busy module would write.
async fn insert_rows(db: &TestDb, n: usize, to: &str) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let values: Vec<String> = chunk
            .iter()
            .map(|i| format!("('report', '[\"{to}\"]', 'Report {i}', 'Body {i}')"))
            .collect();
        db.exec(&format!(
            "INSERT INTO mail_outbox (module, to_addrs, subject, body_text) VALUES {}",
            values.join(", ")
        ))
        .await;
    }
}

async fn three_daemons_drain_2000_rows_exactly_once(dialect: Dialect) {
    let db = TestDb::new(dialect).await;
    let smtp = Peer::smtp(&[]);
    db.use_relay(smtp.port, None).await;
    // All three are up and delivering (each said READY=1, as to systemd) before the
    // rows arrive, so the work is shared rather than raced for by whoever starts first.
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let ready = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    ready
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let socket = notify.to_str().unwrap();
    let mut daemons: Vec<Child> = (0..3)
        .map(|_| spawn_daemon(&db, 30, &[("NOTIFY_SOCKET", socket)]))
        .collect();
    for _ in 0..3 {
        let mut buf = [0u8; 64];
        let n = ready.recv(&mut buf).expect("each daemon says READY=1");
        assert_eq!(&buf[..n], b"READY=1");
    }
    insert_rows(&db, 2000, "ann@example.com").await;

    let all_sent = eventually(Duration::from_secs(180), || async {
        db.count("SELECT COUNT(*) FROM mail_outbox WHERE status = 'sent'")
            .await
            == 2000
    })
    .await;
    for d in &mut daemons {
        assert!(
            terminate(d).success(),
            "SIGTERM ends the daemon with status 0"
        );
    }
    assert!(all_sent, "all 2000 rows sent");

    let got = smtp.received();
    assert_eq!(got.len(), 2000, "each row arrived once, no duplicates");
    let ids: BTreeSet<String> = got
        .iter()
        .filter_map(|(_, eml)| header(eml, "Message-ID"))
        .collect();
    assert_eq!(ids.len(), 2000, "2000 distinct Message-IDs");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM mail_outbox WHERE attempts <> 1")
            .await,
        0
    );
    let workers = db
        .count("SELECT COUNT(DISTINCT daemon) FROM mail_attempt")
        .await;
    assert_eq!(workers, 3, "all three daemons delivered part of the rows");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_share_postgres() {
    three_daemons_drain_2000_rows_exactly_once(Dialect::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_share_mariadb() {
    three_daemons_drain_2000_rows_exactly_once(Dialect::MySql).await;
}

async fn killed_daemon_rows_are_taken_over(dialect: Dialect) {
    let db = TestDb::new(dialect).await;
    let smtp = Peer::smtp(&[]);
    db.use_relay(smtp.port, None).await;
    // The server holds each DATA reply for 4 s, so the first daemon dies mid-send.
    insert_rows(&db, 12, "slow4000@example.com").await;
    let mut first = spawn_daemon(&db, 6, &[("TEOS_MAILER__DELIVERY__CONCURRENCY", "4")]);
    let busy = eventually(Duration::from_secs(15), || async {
        db.count("SELECT COUNT(*) FROM mail_outbox WHERE status = 'sending'")
            .await
            > 0
    })
    .await;
    assert!(busy, "the first daemon claimed rows");
    first.kill().unwrap();
    first.wait().unwrap();
    let stranded = db
        .count("SELECT COUNT(*) FROM mail_outbox WHERE status = 'sending'")
        .await;
    assert!(stranded > 0);

    let mut second = spawn_daemon(&db, 6, &[("TEOS_MAILER__DELIVERY__CONCURRENCY", "12")]);
    let all_sent = eventually(Duration::from_secs(60), || async {
        db.count("SELECT COUNT(*) FROM mail_outbox WHERE status = 'sent'")
            .await
            == 12
    })
    .await;
    assert!(terminate(&mut second).success());
    assert!(all_sent, "every row sent after the lease ran out");
    let taken_over = db
        .count("SELECT COUNT(*) FROM mail_outbox WHERE attempts >= 2")
        .await;
    assert!(
        taken_over >= stranded,
        "{taken_over} rows retried, {stranded} were stranded"
    );

    // At least once: every row arrived, duplicates only for rows cut off mid-send.
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for (_, eml) in smtp.received() {
        *per_id
            .entry(header(&eml, "Message-ID").unwrap())
            .or_default() += 1;
    }
    assert_eq!(per_id.len(), 12);
    let duplicates: usize = per_id.values().map(|n| n - 1).sum();
    assert!(duplicates as i64 <= stranded);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_daemon_is_taken_over_on_postgres() {
    killed_daemon_rows_are_taken_over(Dialect::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_daemon_is_taken_over_on_sqlite() {
    killed_daemon_rows_are_taken_over(Dialect::Sqlite).await;
}

/// PostgreSQL is unreachable when the daemon starts and goes away while it runs: the
/// daemon waits, never exits, and delivers once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_waited_out() {
    use crate::support::{Daemon, Proxy, mail};

    let db = TestDb::new(Dialect::Postgres).await;
    let smtp = Peer::smtp(&[]);
    db.use_relay(smtp.port, None).await;
    let proxy = Proxy::start(5432).await;
    let mut cfg = db.config();
    cfg.database.url =
        secrecy::SecretString::from(db.url.replace(":5432/", &format!(":{}/", proxy.port)));
    cfg.database.connect_timeout_secs = 1;
    let daemon = Daemon::start(cfg);

    let store = db.store().await;
    store
        .enqueue(&mail("ann@example.com", "before"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        daemon.is_running(),
        "the daemon waits for the database instead of exiting"
    );
    assert!(smtp.received().is_empty());

    proxy.set_up(true);
    assert_eq!(
        smtp.wait_for(1, Duration::from_secs(40)).await.len(),
        1,
        "delivered once the database answers"
    );

    proxy.set_up(false);
    store
        .enqueue(&mail("ann@example.com", "during"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(daemon.is_running());
    proxy.set_up(true);
    assert_eq!(
        smtp.wait_for(2, Duration::from_secs(40)).await.len(),
        2,
        "delivered after the outage"
    );

    daemon.stop().await;
    let got = smtp.received();
    assert_eq!(header(&got[1].1, "Subject").as_deref(), Some("during"));
    store.close().await;
    db.cleanup().await;
}
