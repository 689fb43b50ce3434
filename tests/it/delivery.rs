//! Delivery through a real SMTP server on loopback, on every database: what arrives is
//! what the row said, failures end up where an operator expects them.

use std::time::Duration;

use mail_parser::{MessageParser, MimeHeaders};
use teos_mailer::store::{NewAttachment, NewMail};

use crate::on_every_db;
use crate::support::{
    Daemon, Dialect, Peer, TestDb, assert_waits, eventually, header, mail, until_paused, worker,
};

on_every_db!(
    delivers_headers_bodies_and_attachments_intact,
    transient_failure_retries_with_the_same_message_id,
    permanent_rejection_fails_with_the_reason,
    bad_rows_fail_with_reasons_and_the_rest_goes,
    wrong_relay_password_pauses_until_the_settings_are_fixed,
);

const ICS: &str = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nMETHOD:REQUEST\r\nPRODID:-//Sony//TEOS Manage//EN\r\nBEGIN:VEVENT\r\nUID:booking-4711@teos.test\r\nDTSTART:20261207T090000Z\r\nDTEND:20261207T100000Z\r\nSUMMARY:Room 4.12 – Sprint review\r\nORGANIZER:mailto:teos@contoso.test\r\nATTENDEE;RSVP=TRUE:mailto:ann@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";

async fn delivers_headers_bodies_and_attachments_intact(db: &TestDb) {
    let smtp = Peer::smtp(&[]);
    db.use_relay(smtp.port, None).await;
    let pdf: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let booking = NewMail {
        module: Some("room_booking".into()),
        to: vec!["Ann Example <ann@example.com>".into()],
        cc: vec!["bob@example.com".into()],
        bcc: vec!["audit@example.com".into()],
        reply_to: Some("facility@contoso.test".into()),
        subject: "Raum 4.12 gebucht – Größe 12".into(),
        body_text: Some("Your booking is confirmed.".into()),
        body_html: Some("<p>Your booking is <b>confirmed</b>.</p>".into()),
        headers: Some(serde_json::from_str(r#"{"X-TEOS-Booking": "4711"}"#).unwrap()),
        attachments: vec![
            NewAttachment {
                filename: "invite.ics".into(),
                content_type: "text/calendar; method=REQUEST; charset=utf-8".into(),
                content: ICS.as_bytes().to_vec(),
            },
            NewAttachment {
                filename: "floorplan.pdf".into(),
                content_type: "application/pdf".into(),
                content: pdf.clone(),
            },
        ],
        ..NewMail::default()
    };
    let store = db.store().await;
    let (id, _) = store.enqueue(&booking).await.unwrap();
    let w = worker(&db.config()).await;
    assert_eq!(w.run_once().await.unwrap().claimed, 1);

    let got = smtp.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    let (envelope, eml) = &got[0];
    let mut rcpt: Vec<&str> = envelope["rcpt_tos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    rcpt.sort();
    assert_eq!(
        rcpt,
        ["ann@example.com", "audit@example.com", "bob@example.com"]
    );
    assert_eq!(envelope["mail_from"], "teos@contoso.test");
    assert!(
        header(eml, "Bcc").is_none(),
        "Bcc must not travel in the message"
    );

    let row = &store.list(Some(id), None, 1).await.unwrap()[0];
    assert_eq!(row.status, "sent");
    assert_eq!(header(eml, "Message-ID"), row.message_id);

    let msg = MessageParser::default().parse(eml.as_bytes()).unwrap();
    assert_eq!(msg.subject(), Some("Raum 4.12 gebucht – Größe 12"));
    assert_eq!(
        msg.from().unwrap().first().unwrap().address(),
        Some("teos@contoso.test")
    );
    assert_eq!(
        msg.reply_to().unwrap().first().unwrap().address(),
        Some("facility@contoso.test")
    );
    assert_eq!(
        msg.header_raw("X-TEOS-Booking").map(str::trim),
        Some("4711")
    );
    assert_eq!(
        msg.body_text(0).as_deref().map(str::trim),
        Some("Your booking is confirmed.")
    );
    assert!(msg.body_html(0).unwrap().contains("<b>confirmed</b>"));
    let ics = msg
        .attachments()
        .find(|a| a.attachment_name() == Some("invite.ics"))
        .expect("invite.ics");
    let ct = ics.content_type().unwrap();
    assert_eq!((ct.ctype(), ct.subtype()), ("text", Some("calendar")));
    assert_eq!(ct.attribute("method"), Some("REQUEST"));
    assert_eq!(ics.contents(), ICS.as_bytes());
    let plan = msg
        .attachments()
        .find(|a| a.attachment_name() == Some("floorplan.pdf"))
        .expect("floorplan.pdf");
    assert_eq!(plan.contents(), &pdf[..]);
    store.close().await;
}

async fn transient_failure_retries_with_the_same_message_id(db: &TestDb) {
    let smtp = Peer::smtp(&[]);
    db.use_relay(smtp.port, None).await;
    let store = db.store().await;
    let (id, _) = store
        .enqueue(&mail("tempfail-once@example.com", "retry me"))
        .await
        .unwrap();
    let w = worker(&db.config()).await;
    w.run_once().await.unwrap();

    let row = &store.list(Some(id), None, 1).await.unwrap()[0];
    assert_eq!(
        (row.status.as_str(), row.attempts, row.last_smtp_code),
        ("pending", 1, Some(451))
    );
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("Temporary failure")
    );
    let first_id = row.message_id.clone().unwrap();
    assert!(smtp.received().is_empty());

    // retry_base_secs = 1: due again within a second.
    assert!(
        eventually(Duration::from_secs(5), || async {
            w.run_once().await.unwrap().claimed == 1
        })
        .await
    );
    let got = smtp.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        header(&got[0].1, "Message-ID").as_deref(),
        Some(first_id.as_str())
    );
    let row = &store.list(Some(id), None, 1).await.unwrap()[0];
    assert_eq!((row.status.as_str(), row.attempts), ("sent", 2));
    let history = store.attempts(id).await.unwrap();
    let outcomes: Vec<(&str, Option<i32>)> = history
        .iter()
        .map(|a| (a.outcome.as_str(), a.smtp_code))
        .collect();
    assert_eq!(outcomes, [("transient", Some(451)), ("sent", Some(250))]);
    store.close().await;
}

async fn permanent_rejection_fails_with_the_reason(db: &TestDb) {
    let smtp = Peer::smtp(&[]);
    db.use_relay(smtp.port, None).await;
    let store = db.store().await;
    let (id, _) = store
        .enqueue(&mail("reject@example.com", "nobody home"))
        .await
        .unwrap();
    let mut cfg = db.config();
    cfg.delivery.max_attempts = 5;
    worker(&cfg).await.run_once().await.unwrap();
    let row = &store.list(Some(id), None, 1).await.unwrap()[0];
    assert_eq!(
        (row.status.as_str(), row.attempts, row.last_smtp_code),
        ("failed", 1, Some(550))
    );
    let why = row.last_error.as_deref().unwrap();
    assert!(
        why.contains("User unknown") && why.contains("rejected"),
        "{why}"
    );
    store.close().await;
}

async fn bad_rows_fail_with_reasons_and_the_rest_goes(db: &TestDb) {
    let smtp = Peer::smtp(&[]);
    db.use_relay(smtp.port, None).await;
    let nl = match db.dialect {
        Dialect::Postgres => "E'Hello\\r\\nBcc: victim@example.com'",
        Dialect::MySql => "'Hello\\r\\nBcc: victim@example.com'",
        Dialect::Sqlite => "'Hello' || char(13, 10) || 'Bcc: victim@example.com'",
    };
    let bad = [
        ("'not json'", "'s'", "'b'", "NULL", "not a JSON array"),
        ("'[]'", "'s'", "'b'", "NULL", "no recipient"),
        (
            "'[\"ann at example\"]'",
            "'s'",
            "'b'",
            "NULL",
            "not a valid e-mail address",
        ),
        ("'[\"ann@example.com\"]'", nl, "'b'", "NULL", "line break"),
        ("'[\"ann@example.com\"]'", "'s'", "NULL", "NULL", "no body"),
        (
            "'[\"ann@example.com\"]'",
            "'s'",
            "'b'",
            "'boss'",
            "unknown sender",
        ),
        (
            "'[\"ann@example.com\", 42]'",
            "'s'",
            "'b'",
            "NULL",
            "not a JSON array",
        ),
    ];
    for (to, subject, body, sender, _) in bad {
        db.exec(&format!(
            "INSERT INTO mail_outbox (to_addrs, subject, body_text, sender) VALUES ({to}, {subject}, {body}, {sender})"
        ))
        .await;
    }
    let store = db.store().await;
    let mut big = mail("ann@example.com", "too big");
    big.attachments.push(NewAttachment {
        filename: "huge.bin".into(),
        content_type: "application/octet-stream".into(),
        content: vec![1; 4096],
    });
    store.enqueue(&big).await.unwrap();
    store
        .enqueue(&mail("ann@example.com", "the good one"))
        .await
        .unwrap();
    let mut cfg = db.config();
    cfg.delivery.max_message_bytes = 4000;
    worker(&cfg).await.run_once().await.unwrap();

    let got = smtp.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        header(&got[0].1, "Subject").as_deref(),
        Some("the good one")
    );
    let mut rows = store.list(None, Some("failed"), 100).await.unwrap();
    rows.sort_by_key(|r| r.id);
    assert_eq!(rows.len(), bad.len() + 1);
    for (row, expected) in rows
        .iter()
        .zip(bad.iter().map(|b| b.4).chain(["over the limit"]))
    {
        let why = row.last_error.as_deref().unwrap_or("");
        assert!(
            why.contains(expected),
            "row {}: {why:?} should say {expected:?}",
            row.id
        );
        assert_eq!(row.attempts, 1);
    }
    store.close().await;
}

async fn wrong_relay_password_pauses_until_the_settings_are_fixed(db: &TestDb) {
    let smtp = Peer::smtp(&["--auth", "teos:right-password", "--require-auth"]);
    db.use_relay(smtp.port, Some(("teos", "wrong-password")))
        .await;
    let store = db.store().await;
    let (id, _) = store
        .enqueue(&mail("ann@example.com", "after the fix"))
        .await
        .unwrap();
    let mut cfg = db.config();
    cfg.delivery.settings_poll_secs = 1;
    let daemon = Daemon::start(cfg);

    assert!(
        until_paused(&store).await,
        "a refused login pauses the sender"
    );
    assert_waits(&store, id, "535").await;

    // The admin fixes the password; the daemon notices, lifts the pause and delivers.
    db.use_relay(smtp.port, Some(("teos", "right-password")))
        .await;
    let got = smtp.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 1, "delivered after the settings change");
    assert_eq!(got[0].0["auth_user"], "teos");
    daemon.stop().await;
    let row = &store.list(Some(id), None, 1).await.unwrap()[0];
    assert_eq!((row.status.as_str(), row.attempts), ("sent", 1));
    store.close().await;
}
