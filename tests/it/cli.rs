//! The binary as an operator uses it: exit codes, masked secrets, readable answers.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::support::{Dialect, TestDb};

fn teos(db: &TestDb, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_teos-mailer"))
        .args(args)
        .env("TEOS_MAILER__DATABASE__URL", &db.url)
        .env("TEOS_MAILER__LOG__LEVEL", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn bad_configuration_exits_78_naming_the_key() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("teos.toml");
    std::fs::write(&file, "[delivery]\nconcurency = 4\n").unwrap();
    let out = teos(
        &db,
        &["--config", file.to_str().unwrap(), "queue", "stats"],
        "",
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out).contains("concurency"), "{}", text(&out));
}

#[tokio::test]
async fn relay_password_comes_from_stdin_and_is_never_shown() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let out = teos(
        &db,
        &[
            "settings",
            "set-relay",
            "--host",
            "relay.contoso.test",
            "--port",
            "25",
            "--security",
            "none",
            "--username",
            "teos",
            "--password-stdin",
            "--general-sender",
            "teos@contoso.test",
        ],
        "s3cr3t-Pa55\n",
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = teos(&db, &["settings", "show"], "");
    let shown = text(&out);
    assert!(
        shown.contains("relay.contoso.test") && shown.contains("(set)"),
        "{shown}"
    );
    assert!(!shown.contains("s3cr3t"), "{shown}");
    assert!(shown.contains("no reception sender address"), "{shown}");
    let stored = db
        .count("SELECT COUNT(*) FROM mail_settings WHERE relay_password = 's3cr3t-Pa55'")
        .await;
    assert_eq!(stored, 1);
}

#[tokio::test]
async fn enqueue_json_then_cancel_retry_and_show() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let doc = r#"{"module": "catering", "to": ["chef@contoso.test"], "subject": "Lunch for 12",
                  "body_text": "Room 4.12 at noon", "idempotency_key": "order-99",
                  "attachments": [{"filename": "order.csv", "content_type": "text/csv", "content": "aXRlbSxxdHkKc291cCwxMgo="}]}"#;
    let out = teos(&db, &["enqueue", "--json"], doc);
    assert!(text(&out).contains("queued as 1"), "{}", text(&out));
    let out = teos(&db, &["enqueue", "--json"], doc);
    assert!(text(&out).contains("already queued as 1"), "{}", text(&out));
    assert_eq!(
        db.count("SELECT COUNT(*) FROM mail_attachment WHERE length(content) = 17")
            .await,
        1
    );

    let out = teos(&db, &["queue", "cancel", "1"], "");
    assert!(out.status.success());
    let stats = text(&teos(&db, &["queue", "stats"], ""));
    assert!(
        stats.contains("pending    0") && stats.contains("cancelled  1"),
        "{stats}"
    );
    let out = teos(&db, &["queue", "cancel", "1"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("not pending"), "{}", text(&out));
    let out = teos(&db, &["queue", "retry", "1"], "");
    assert!(text(&out).contains("due again"), "{}", text(&out));
    let out = teos(&db, &["queue", "show", "1"], "");
    let shown = text(&out);
    assert!(
        shown.contains("status:          pending") && shown.contains("Lunch for 12"),
        "{shown}"
    );
    let out = teos(&db, &["queue", "show", "7"], "");
    assert!(text(&out).contains("there is no outbox row 7"));
}

/// Under systemd (Type=notify) the daemon says READY=1 once it can deliver and
/// STOPPING=1 when it drains.
#[tokio::test]
async fn the_daemon_notifies_systemd() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_teos-mailer"))
        .args(["run", "--until-idle"])
        .env("TEOS_MAILER__DATABASE__URL", &db.url)
        .env("TEOS_MAILER__DELIVERY__TRANSPORT", "pickup")
        .env(
            "TEOS_MAILER__DELIVERY__PICKUP_DIR",
            dir.path().join("pickup"),
        )
        .env("NOTIFY_SOCKET", &socket_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < 2 {
        let n = socket.recv(&mut buf).unwrap();
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(got, ["READY=1", "STOPPING=1"]);
}
