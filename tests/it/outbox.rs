//! The queue's contract, on every database: claims are exclusive, leases expire,
//! attempts are counted only when spent, and modules' own INSERTs work as documented.

use std::time::Duration;

use secrecy::SecretString;
use teos_mailer::settings::{OAuthMode, Settings};
use teos_mailer::store::{Finish, OAuthUpdate, RowStatus};

use crate::on_every_db;
use crate::support::{Dialect, TestDb, mail};

on_every_db!(
    claims_are_exclusive_and_expired_leases_come_back,
    idempotency_key_gives_one_row,
    given_back_claims_spend_no_attempt,
    priority_and_not_before_order_the_claims,
    paused_senders_are_skipped,
    module_inserts_from_the_readme_are_delivered_shape,
    operator_commands_and_settings_round_trip,
);

async fn claims_are_exclusive_and_expired_leases_come_back(db: &TestDb) {
    let store = db.store().await;
    for i in 0..5 {
        store
            .enqueue(&mail("ann@example.com", &format!("m{i}")))
            .await
            .unwrap();
    }
    let lease = Duration::from_millis(300);
    let a = store
        .claim("daemon-a", 10, lease, "teos.test", &[])
        .await
        .unwrap();
    assert_eq!(a.len(), 5);
    assert!(
        a.iter()
            .all(|r| r.attempts == 1 && r.message_id.ends_with("@teos.test>"))
    );
    assert!(
        store
            .claim("daemon-b", 10, lease, "teos.test", &[])
            .await
            .unwrap()
            .is_empty()
    );

    // A daemon that no longer holds the lease cannot write the outcome.
    let sent = Finish {
        status: RowStatus::Sent,
        give_back: false,
        retry_in: None,
        error: None,
        smtp_code: Some(250),
        reply: Some("ok".into()),
    };
    assert!(
        !store
            .finish("daemon-b", a[0].id, &sent, None)
            .await
            .unwrap()
    );

    // daemon-a "dies": after the lease its rows are due again, same Message-ID.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(store.reap_expired(10).await.unwrap(), 5);
    let b = store
        .claim("daemon-b", 10, lease, "teos.test", &[])
        .await
        .unwrap();
    assert_eq!(b.len(), 5);
    for row in &b {
        let before = a.iter().find(|r| r.id == row.id).unwrap();
        assert_eq!(row.message_id, before.message_id);
        assert_eq!(row.attempts, 2);
    }
    assert!(
        !store
            .finish("daemon-a", b[0].id, &sent, None)
            .await
            .unwrap()
    );
    assert!(
        store
            .finish("daemon-b", b[0].id, &sent, None)
            .await
            .unwrap()
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM mail_outbox WHERE status = 'sent'")
            .await,
        1
    );

    // A row whose daemon keeps dying is failed once its attempts are used up.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(store.reap_expired(2).await.unwrap(), 4);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM mail_outbox WHERE status = 'failed'")
            .await,
        4
    );
    store.close().await;
}

async fn idempotency_key_gives_one_row(db: &TestDb) {
    let store = db.store().await;
    let mut m = mail("ann@example.com", "booking 4711 confirmed");
    m.idempotency_key = Some("booking-4711-confirmed".into());
    let (first, inserted) = store.enqueue(&m).await.unwrap();
    assert!(inserted);
    let (second, inserted) = store.enqueue(&m).await.unwrap();
    assert!(!inserted);
    assert_eq!(first, second);
    assert_eq!(db.count("SELECT COUNT(*) FROM mail_outbox").await, 1);
    store.close().await;
}

async fn given_back_claims_spend_no_attempt(db: &TestDb) {
    let store = db.store().await;
    let (id, _) = store.enqueue(&mail("ann@example.com", "x")).await.unwrap();
    let rows = store
        .claim("d", 1, Duration::from_secs(60), "teos.test", &[])
        .await
        .unwrap();
    let back = Finish {
        status: RowStatus::Pending,
        give_back: true,
        retry_in: None,
        error: Some("no SMTP relay host is set".into()),
        smtp_code: None,
        reply: None,
    };
    assert!(store.finish("d", rows[0].id, &back, None).await.unwrap());
    let row = &store.list(Some(id), None, 1).await.unwrap()[0];
    assert_eq!((row.status.as_str(), row.attempts), ("pending", 0));
    assert_eq!(row.last_error.as_deref(), Some("no SMTP relay host is set"));
    store.close().await;
}

async fn priority_and_not_before_order_the_claims(db: &TestDb) {
    let store = db.store().await;
    let mut low = mail("ann@example.com", "report");
    low.priority = Some(200);
    let mut high = mail("ann@example.com", "alert");
    high.priority = Some(10);
    store.enqueue(&low).await.unwrap();
    let (high_id, _) = store.enqueue(&high).await.unwrap();
    let later = match db.dialect {
        Dialect::Postgres => "now() + interval '1 hour'",
        Dialect::MySql => "UTC_TIMESTAMP() + INTERVAL 1 HOUR",
        Dialect::Sqlite => "datetime('now', '+1 hour')",
    };
    db.exec(&format!(
        "INSERT INTO mail_outbox (to_addrs, subject, body_text, priority, not_before) \
         VALUES ('[\"ann@example.com\"]', 'scheduled', 'x', 0, {later})"
    ))
    .await;
    let first = store
        .claim("d", 1, Duration::from_secs(60), "t", &[])
        .await
        .unwrap();
    assert_eq!(first[0].id, high_id);
    let rest = store
        .claim("d", 10, Duration::from_secs(60), "t", &[])
        .await
        .unwrap();
    assert_eq!(rest.len(), 1, "the scheduled row is not due yet");
    assert_eq!(rest[0].subject, "report");
    store.close().await;
}

async fn paused_senders_are_skipped(db: &TestDb) {
    let store = db.store().await;
    store
        .enqueue(&mail("ann@example.com", "general mail"))
        .await
        .unwrap();
    let mut visitor = mail("guest@example.com", "your visitor is here");
    visitor.module = Some("reception".into());
    store.enqueue(&visitor).await.unwrap();

    assert!(
        store
            .pause_sender("general", "wrong password", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(
        !store
            .pause_sender("general", "wrong password", Duration::from_secs(60))
            .await
            .unwrap()
    );
    let paused: Vec<String> = store
        .paused_senders()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.sender)
        .collect();
    assert_eq!(paused, ["general"]);
    let paused: Vec<&str> = paused.iter().map(String::as_str).collect();
    let rows = store
        .claim("d", 10, Duration::from_secs(60), "t", &paused)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].module, "reception");

    assert_eq!(store.clear_pauses().await.unwrap(), 1);
    let rows = store
        .claim("d", 10, Duration::from_secs(60), "t", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].subject, "general mail");
    let stats = store.stats().await.unwrap();
    assert!(stats.by_status.contains(&("sending".to_string(), 2)));
    store.close().await;
}

/// The INSERTs the README gives module developers, run as they are written there.
async fn module_inserts_from_the_readme_are_delivered_shape(db: &TestDb) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let tag = match db.dialect {
        Dialect::Postgres => "```sql postgres",
        Dialect::MySql => "```sql mysql",
        Dialect::Sqlite => "```sql sqlite",
    };
    let start = readme
        .find(tag)
        .unwrap_or_else(|| panic!("README has a {tag} block"))
        + tag.len();
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    db.exec(block).await;
    let store = db.store().await;
    let rows = store
        .claim("d", 10, Duration::from_secs(60), "t", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "the README example inserts one due message");
    let atts = store.attachments(rows[0].id).await.unwrap();
    assert_eq!(atts.len(), 1);
    assert!(atts[0].content_type.starts_with("text/calendar"));
    assert!(String::from_utf8_lossy(&atts[0].content).contains("BEGIN:VCALENDAR"));
    store.close().await;
}

/// What an operator and the web UI do besides sending: cancel, retry, purge by
/// retention, and saving the relay and OAuth settings.
async fn operator_commands_and_settings_round_trip(db: &TestDb) {
    let store = db.store().await;
    let (a, _) = store.enqueue(&mail("ann@example.com", "a")).await.unwrap();
    let (b, _) = store.enqueue(&mail("bob@example.com", "b")).await.unwrap();
    assert_eq!(store.cancel(a).await.unwrap(), 1);
    assert_eq!(
        store.cancel(a).await.unwrap(),
        0,
        "only pending rows are cancelled"
    );
    db.exec(&format!(
        "UPDATE mail_outbox SET status = 'failed', attempts = 10 WHERE id = {b}"
    ))
    .await;
    assert_eq!(store.retry_all_failed().await.unwrap(), 1);
    assert_eq!(store.retry(a).await.unwrap(), 1);
    let rows = store.list(None, Some("pending"), 10).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.attempts == 0));

    // Retention removes finished rows older than the limit, with their history.
    let old = match db.dialect {
        Dialect::Postgres => "now() - interval '100 days'",
        Dialect::MySql => "UTC_TIMESTAMP() - INTERVAL 100 DAY",
        Dialect::Sqlite => "datetime('now', '-100 days')",
    };
    db.exec(&format!(
        "UPDATE mail_outbox SET status = 'sent', updated_at = {old} WHERE id = {a}"
    ))
    .await;
    assert_eq!(store.purge(90).await.unwrap(), 1);
    assert_eq!(store.purge(90).await.unwrap(), 0);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM mail_outbox").await,
        1,
        "pending rows are kept"
    );

    store
        .set_oauth(&OAuthUpdate {
            enabled: true,
            mode: "smtp".into(),
            tenant_id: Some("contoso.onmicrosoft.com".into()),
            client_id: Some("6731de76-14a6-49ae-97bc-6eba6914391e".into()),
            client_secret: Some(SecretString::from("Xy8Q~value".to_string())),
            smtp_host: None,
            smtp_port: Some(2587),
            authority_host: Some("login.microsoftonline.us".into()),
            graph_base_url: None,
            general_sender: Some("TEOS <teos@contoso.com>".into()),
            reception_sender: None,
        })
        .await
        .unwrap();
    let settings = Settings::from_row(store.load_settings().await.unwrap());
    let oauth = settings.oauth.unwrap().unwrap();
    assert_eq!(oauth.mode, OAuthMode::Smtp);
    assert_eq!(
        (oauth.smtp_host.as_str(), oauth.smtp_port),
        ("smtp.office365.com", 2587)
    );
    assert_eq!(oauth.authority, "https://login.microsoftonline.us");
    assert_eq!(oauth.graph, "https://graph.microsoft.com");
    assert_eq!(oauth.secret.0, "Xy8Q~value");
    assert!(settings.general.is_ok() && settings.reception.is_err());
    store.close().await;
}
