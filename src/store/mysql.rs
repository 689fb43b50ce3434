//! MariaDB 10.6+ / MySQL 8 statements. The claim needs two statements (no UPDATE …
//! RETURNING with SKIP LOCKED), so it runs in one short READ COMMITTED transaction that
//! commits before any mail goes out. Timestamps are UTC (`UTC_TIMESTAMP(6)`).

use sqlx::MySqlPool;

use super::{ClaimedRow, DbError, Queries};

pub(super) const QUERIES: Queries = Queries {
    // Claims go through `claim` below.
    claim: "",
    finish: "
        UPDATE mail_outbox
        SET status = ?,
            attempts = attempts - ?,
            next_attempt_at = COALESCE(UTC_TIMESTAMP(6) + INTERVAL (? * 1000) MICROSECOND, next_attempt_at),
            last_error = COALESCE(?, last_error),
            last_smtp_code = COALESCE(?, last_smtp_code),
            last_reply = COALESCE(?, last_reply),
            sent_at = CASE WHEN ? THEN UTC_TIMESTAMP(6) ELSE sent_at END,
            lease_owner = NULL,
            lease_until = NULL,
            updated_at = UTC_TIMESTAMP(6)
        WHERE id = ? AND lease_owner = ? AND status = 'sending'",
    record_attempt: "
        INSERT INTO mail_attempt
            (outbox_id, attempt, duration_ms, transport, outcome, smtp_code, detail, daemon)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    reap: "
        UPDATE mail_outbox
        SET status = CASE WHEN attempts >= COALESCE(max_attempts, ?) THEN 'failed' ELSE 'pending' END,
            last_error = 'the daemon sending it stopped before it finished (its lease expired)',
            lease_owner = NULL,
            lease_until = NULL,
            updated_at = UTC_TIMESTAMP(6)
        WHERE status = 'sending' AND lease_until < UTC_TIMESTAMP(6)",
    pause: "
        INSERT INTO mail_sender_pause (sender, reason, paused_until)
        VALUES (?, ?, UTC_TIMESTAMP(6) + INTERVAL (? * 1000) MICROSECOND)
        ON DUPLICATE KEY UPDATE reason = VALUES(reason), paused_until = VALUES(paused_until)",
    paused: "SELECT sender, reason, paused_until FROM mail_sender_pause WHERE paused_until > UTC_TIMESTAMP(6)",
    purge: "
        DELETE FROM mail_outbox
        WHERE status IN ('sent', 'failed', 'cancelled')
          AND updated_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY",
    enqueue: "
        INSERT INTO mail_outbox
            (module, sender, to_addrs, cc_addrs, bcc_addrs, reply_to, subject, body_text,
             body_html, headers, priority, idempotency_key, max_attempts)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    last_insert_id: "SELECT CAST(LAST_INSERT_ID() AS SIGNED)",
    list: "
        SELECT id, module, sender, to_addrs, subject, priority, status, attempts, max_attempts,
               next_attempt_at, lease_owner, last_error, last_smtp_code, last_reply, message_id,
               idempotency_key, created_at, updated_at, sent_at
        FROM mail_outbox
        WHERE id = COALESCE(?, id) AND status = COALESCE(?, status)
        ORDER BY id DESC
        LIMIT ?",
    retry_one: "
        UPDATE mail_outbox
        SET status = 'pending', attempts = 0, next_attempt_at = UTC_TIMESTAMP(6), updated_at = UTC_TIMESTAMP(6)
        WHERE id = ? AND status IN ('failed', 'cancelled')",
    retry_failed: "
        UPDATE mail_outbox
        SET status = 'pending', attempts = 0, next_attempt_at = UTC_TIMESTAMP(6), updated_at = UTC_TIMESTAMP(6)
        WHERE status = 'failed'",
    cancel: "
        UPDATE mail_outbox SET status = 'cancelled', updated_at = UTC_TIMESTAMP(6)
        WHERE id = ? AND status = 'pending'",
    set_relay: "
        UPDATE mail_settings
        SET relay_host = ?, relay_port = ?, relay_security = ?, relay_username = ?,
            relay_password = ?, general_sender = COALESCE(?, general_sender),
            reception_sender = COALESCE(?, reception_sender), updated_at = UTC_TIMESTAMP(6)
        WHERE id = 1",
    set_oauth: "
        UPDATE mail_settings
        SET oauth_enabled = ?, oauth_mode = ?, tenant_id = COALESCE(?, tenant_id),
            client_id = COALESCE(?, client_id), client_secret = COALESCE(?, client_secret),
            oauth_smtp_host = COALESCE(?, oauth_smtp_host),
            oauth_smtp_port = COALESCE(?, oauth_smtp_port),
            authority_host = COALESCE(?, authority_host),
            graph_base_url = COALESCE(?, graph_base_url),
            general_sender = COALESCE(?, general_sender),
            reception_sender = COALESCE(?, reception_sender), updated_at = UTC_TIMESTAMP(6)
        WHERE id = 1",
    oldest_due_secs: "
        SELECT CAST(TIMESTAMPDIFF(SECOND, MIN(next_attempt_at), UTC_TIMESTAMP(6)) AS SIGNED)
        FROM mail_outbox WHERE status = 'pending' AND next_attempt_at <= UTC_TIMESTAMP(6)",
};

/// The index `mail_outbox_due (status, priority, next_attempt_at, id)` matches this
/// WHERE and ORDER BY, so InnoDB walks it in order and locks only what it returns.
const SELECT_DUE: &str = "
    SELECT id FROM mail_outbox
    WHERE status = 'pending'
      AND next_attempt_at <= UTC_TIMESTAMP(6)
      AND (not_before IS NULL OR not_before <= UTC_TIMESTAMP(6))
      AND COALESCE(sender, CASE WHEN module = 'reception' THEN 'reception' ELSE 'general' END)
          NOT IN (?, ?)
    ORDER BY priority, next_attempt_at, id
    LIMIT ?
    FOR UPDATE SKIP LOCKED";

pub(super) async fn claim(
    pool: &MySqlPool,
    owner: &str,
    limit: i64,
    lease_ms: i64,
    message_id_domain: &str,
    skip0: &str,
    skip1: &str,
) -> Result<Vec<ClaimedRow>, DbError> {
    let mut tx = pool.begin().await?;
    let ids: Vec<i64> = sqlx::query_scalar(SELECT_DUE)
        .bind(skip0)
        .bind(skip1)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
    if ids.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    // The ids come from the database as integers, so they are safe to inline.
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let update = format!(
        "UPDATE mail_outbox
         SET status = 'sending',
             attempts = attempts + 1,
             lease_owner = ?,
             lease_until = UTC_TIMESTAMP(6) + INTERVAL (? * 1000) MICROSECOND,
             message_id = COALESCE(message_id, CONCAT('<', UUID(), '@', ?, '>')),
             updated_at = UTC_TIMESTAMP(6)
         WHERE id IN ({list})"
    );
    sqlx::query(sqlx::AssertSqlSafe(update))
        .persistent(false)
        .bind(owner)
        .bind(lease_ms)
        .bind(message_id_domain)
        .execute(&mut *tx)
        .await?;
    let select = format!(
        "SELECT id, module, sender, to_addrs, cc_addrs, bcc_addrs, reply_to, subject, body_text,
                body_html, headers, priority, attempts, max_attempts, message_id,
                (SELECT COUNT(*) FROM mail_attachment a WHERE a.outbox_id = mail_outbox.id)
                    AS attachment_count
         FROM mail_outbox WHERE id IN ({list})"
    );
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(select))
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows)
}
