//! SQLite statements. Timestamps are text in one format (`strftime('%Y-%m-%d %H:%M:%f')`,
//! UTC) so that they compare as strings; `?NNN` parameters keep the bind order of the
//! other dialects. The claim is one UPDATE, which takes the write lock for itself.

use super::Queries;

/// Now, in the one format every timestamp column holds.
macro_rules! now {
    () => {
        "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    };
}

/// Now plus the milliseconds in parameter `$p`.
macro_rules! now_plus_ms {
    ($p:literal) => {
        concat!(
            "strftime('%Y-%m-%d %H:%M:%f', 'now', '+' || (",
            $p,
            " / 1000.0) || ' seconds')"
        )
    };
}

pub(super) const QUERIES: Queries = Queries {
    claim: concat!("
        UPDATE mail_outbox
        SET status = 'sending',
            attempts = attempts + 1,
            lease_owner = ?4,
            lease_until = ", now_plus_ms!("?5"), ",
            message_id = COALESCE(message_id, '<' || lower(hex(randomblob(16))) || '@' || ?6 || '>'),
            updated_at = ", now!(), "
        WHERE id IN (
            -- Without statistics SQLite would pick the status index and sort every
            -- pending row for each claim.
            SELECT id FROM mail_outbox INDEXED BY mail_outbox_due
            WHERE status = 'pending'
              AND next_attempt_at <= ", now!(), "
              AND (not_before IS NULL OR julianday(not_before) <= julianday('now'))
              AND COALESCE(sender, CASE WHEN module = 'reception' THEN 'reception' ELSE 'general' END)
                  NOT IN (?1, ?2)
            ORDER BY priority, next_attempt_at, id
            LIMIT ?3
        )
        RETURNING id, module, sender, to_addrs, cc_addrs, bcc_addrs, reply_to, subject, body_text,
                  body_html, headers, priority, attempts, max_attempts, message_id,
                  (SELECT COUNT(*) FROM mail_attachment a WHERE a.outbox_id = mail_outbox.id)
                      AS attachment_count"),
    finish: concat!("
        UPDATE mail_outbox
        SET status = ?1,
            attempts = attempts - ?2,
            next_attempt_at = COALESCE(", now_plus_ms!("?3"), ", next_attempt_at),
            last_error = COALESCE(?4, last_error),
            last_smtp_code = COALESCE(?5, last_smtp_code),
            last_reply = COALESCE(?6, last_reply),
            sent_at = CASE WHEN ?7 THEN ", now!(), " ELSE sent_at END,
            lease_owner = NULL,
            lease_until = NULL,
            updated_at = ", now!(), "
        WHERE id = ?8 AND lease_owner = ?9 AND status = 'sending'"),
    record_attempt: "
        INSERT INTO mail_attempt
            (outbox_id, attempt, duration_ms, transport, outcome, smtp_code, detail, daemon)
        VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    reap: concat!("
        UPDATE mail_outbox
        SET status = CASE WHEN attempts >= COALESCE(max_attempts, ?1) THEN 'failed' ELSE 'pending' END,
            last_error = 'the daemon sending it stopped before it finished (its lease expired)',
            lease_owner = NULL,
            lease_until = NULL,
            updated_at = ", now!(), "
        WHERE status = 'sending' AND lease_until < ", now!()),
    pause: concat!("
        INSERT INTO mail_sender_pause (sender, reason, paused_until)
        VALUES (?1, ?2, ", now_plus_ms!("?3"), ")
        ON CONFLICT (sender) DO UPDATE
        SET reason = excluded.reason, paused_until = excluded.paused_until"),
    paused: concat!(
        "SELECT sender, reason, paused_until FROM mail_sender_pause WHERE paused_until > ",
        now!()
    ),
    purge: "
        DELETE FROM mail_outbox
        WHERE status IN ('sent', 'failed', 'cancelled')
          AND updated_at < strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ?1 || ' days')",
    enqueue: "
        INSERT INTO mail_outbox
            (module, sender, to_addrs, cc_addrs, bcc_addrs, reply_to, subject, body_text,
             body_html, headers, priority, idempotency_key, max_attempts)
        VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    last_insert_id: "SELECT last_insert_rowid()",
    list: "
        SELECT id, module, sender, to_addrs, subject, priority, status, attempts, max_attempts,
               next_attempt_at, lease_owner, last_error, last_smtp_code, last_reply, message_id,
               idempotency_key, created_at, updated_at, sent_at
        FROM mail_outbox
        WHERE id = COALESCE(?1, id) AND status = COALESCE(?2, status)
        ORDER BY id DESC
        LIMIT ?3",
    retry_one: concat!("
        UPDATE mail_outbox
        SET status = 'pending', attempts = 0, next_attempt_at = ", now!(), ", updated_at = ", now!(), "
        WHERE id = ?1 AND status IN ('failed', 'cancelled')"),
    retry_failed: concat!("
        UPDATE mail_outbox
        SET status = 'pending', attempts = 0, next_attempt_at = ", now!(), ", updated_at = ", now!(), "
        WHERE status = 'failed'"),
    cancel: concat!("
        UPDATE mail_outbox SET status = 'cancelled', updated_at = ", now!(), "
        WHERE id = ?1 AND status = 'pending'"),
    set_relay: concat!("
        UPDATE mail_settings
        SET relay_host = ?1, relay_port = ?2, relay_security = ?3, relay_username = ?4,
            relay_password = ?5, general_sender = COALESCE(?6, general_sender),
            reception_sender = COALESCE(?7, reception_sender), updated_at = ", now!(), "
        WHERE id = 1"),
    set_oauth: concat!("
        UPDATE mail_settings
        SET oauth_enabled = ?1, oauth_mode = ?2, tenant_id = COALESCE(?3, tenant_id),
            client_id = COALESCE(?4, client_id), client_secret = COALESCE(?5, client_secret),
            oauth_smtp_host = COALESCE(?6, oauth_smtp_host),
            oauth_smtp_port = COALESCE(?7, oauth_smtp_port),
            authority_host = COALESCE(?8, authority_host),
            graph_base_url = COALESCE(?9, graph_base_url),
            general_sender = COALESCE(?10, general_sender),
            reception_sender = COALESCE(?11, reception_sender), updated_at = ", now!(), "
        WHERE id = 1"),
    oldest_due_secs: concat!("
        SELECT CAST((julianday('now') - julianday(MIN(next_attempt_at))) * 86400 AS INTEGER)
        FROM mail_outbox WHERE status = 'pending' AND next_attempt_at <= ", now!()),
};
