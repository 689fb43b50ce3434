//! PostgreSQL statements. `FOR UPDATE SKIP LOCKED` lets several daemons claim from one
//! table without waiting on each other; the claim is one statement, so it commits alone.

use sqlx::PgPool;

use super::{DbError, Ending, Queries, RowStatus, duration_ms};

/// A batch of outcomes and their history rows in one statement: the rows come in as
/// parallel arrays, and only rows still leased by $1 are touched.
const FINISH_MANY: &str = "
    WITH input AS (
        SELECT * FROM UNNEST(
            $2::bigint[], $3::text[], $4::int[], $5::bigint[], $6::text[], $7::int[], $8::text[],
            $9::bool[], $10::int[], $11::bigint[], $12::text[], $13::text[], $14::text[]
        ) AS t(id, status, give_back, retry_ms, error, code, reply, sent,
               attempt, duration_ms, transport, outcome, detail)
    ), done AS (
        UPDATE mail_outbox AS m
        SET status = i.status,
            attempts = m.attempts - i.give_back,
            next_attempt_at = COALESCE(now() + make_interval(secs => i.retry_ms / 1000.0), m.next_attempt_at),
            last_error = COALESCE(i.error, m.last_error),
            last_smtp_code = COALESCE(i.code, m.last_smtp_code),
            last_reply = COALESCE(i.reply, m.last_reply),
            sent_at = CASE WHEN i.sent THEN now() ELSE m.sent_at END,
            lease_owner = NULL,
            lease_until = NULL,
            updated_at = now()
        FROM input AS i
        WHERE m.id = i.id AND m.lease_owner = $1 AND m.status = 'sending'
        RETURNING m.id
    ), history AS (
        INSERT INTO mail_attempt
            (outbox_id, attempt, duration_ms, transport, outcome, smtp_code, detail, daemon)
        SELECT i.id, i.attempt, i.duration_ms, i.transport, i.outcome, i.code, i.detail, $1
        FROM input AS i JOIN done AS d ON d.id = i.id
        WHERE i.attempt IS NOT NULL
    )
    SELECT id FROM done";

pub(super) async fn finish_many(
    pool: &PgPool,
    owner: &str,
    endings: &[Ending],
) -> Result<Vec<i64>, DbError> {
    let ids: Vec<i64> = endings.iter().map(|e| e.id).collect();
    let status: Vec<&str> = endings.iter().map(|e| e.finish.status.as_str()).collect();
    let give_back: Vec<i32> = endings
        .iter()
        .map(|e| i32::from(e.finish.give_back))
        .collect();
    let retry_ms: Vec<Option<i64>> = endings
        .iter()
        .map(|e| e.finish.retry_in.map(duration_ms))
        .collect();
    let error: Vec<Option<&str>> = endings.iter().map(|e| e.finish.error.as_deref()).collect();
    let code: Vec<Option<i32>> = endings
        .iter()
        .map(|e| e.finish.smtp_code.map(i32::from))
        .collect();
    let reply: Vec<Option<&str>> = endings.iter().map(|e| e.finish.reply.as_deref()).collect();
    let sent: Vec<bool> = endings
        .iter()
        .map(|e| e.finish.status == RowStatus::Sent)
        .collect();
    let attempt: Vec<Option<i32>> = endings
        .iter()
        .map(|e| e.record.as_ref().map(|r| r.attempt))
        .collect();
    let duration: Vec<Option<i64>> = endings
        .iter()
        .map(|e| e.record.as_ref().map(|r| duration_ms(r.duration)))
        .collect();
    let transport: Vec<Option<&str>> = endings
        .iter()
        .map(|e| e.record.as_ref().map(|r| r.transport))
        .collect();
    let outcome: Vec<Option<&str>> = endings
        .iter()
        .map(|e| e.record.as_ref().map(|r| r.outcome))
        .collect();
    let detail: Vec<Option<&str>> = endings
        .iter()
        .map(|e| e.record.as_ref().and_then(|r| r.detail.as_deref()))
        .collect();
    sqlx::query_scalar(FINISH_MANY)
        .bind(owner)
        .bind(ids)
        .bind(status)
        .bind(give_back)
        .bind(retry_ms)
        .bind(error)
        .bind(code)
        .bind(reply)
        .bind(sent)
        .bind(attempt)
        .bind(duration)
        .bind(transport)
        .bind(outcome)
        .bind(detail)
        .fetch_all(pool)
        .await
}

pub(super) const QUERIES: Queries = Queries {
    claim: "
        WITH due AS (
            SELECT id FROM mail_outbox
            WHERE status = 'pending'
              AND next_attempt_at <= now()
              AND (not_before IS NULL OR not_before <= now())
              AND COALESCE(sender, CASE WHEN module = 'reception' THEN 'reception' ELSE 'general' END)
                  NOT IN ($1, $2)
            ORDER BY priority, next_attempt_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        )
        UPDATE mail_outbox AS m
        SET status = 'sending',
            attempts = m.attempts + 1,
            lease_owner = $4,
            lease_until = now() + make_interval(secs => $5 / 1000.0),
            message_id = COALESCE(m.message_id, '<' || gen_random_uuid() || '@' || $6 || '>'),
            updated_at = now()
        FROM due
        WHERE m.id = due.id
        RETURNING m.id, m.module, m.sender, m.to_addrs, m.cc_addrs, m.bcc_addrs, m.reply_to,
                  m.subject, m.body_text, m.body_html, m.headers, m.priority, m.attempts,
                  m.max_attempts, m.message_id,
                  (SELECT COUNT(*) FROM mail_attachment a WHERE a.outbox_id = m.id) AS attachment_count",
    // Outcomes go through `finish_many` below.
    finish: "",
    // History rows are written by `finish_many` below.
    record_attempt: "",
    reap: "
        UPDATE mail_outbox
        SET status = CASE WHEN attempts >= COALESCE(max_attempts, $1) THEN 'failed' ELSE 'pending' END,
            last_error = 'the daemon sending it stopped before it finished (its lease expired)',
            lease_owner = NULL,
            lease_until = NULL,
            updated_at = now()
        WHERE status = 'sending' AND lease_until < now()",
    pause: "
        INSERT INTO mail_sender_pause (sender, reason, paused_until)
        VALUES ($1, $2, now() + make_interval(secs => $3 / 1000.0))
        ON CONFLICT (sender) DO UPDATE
        SET reason = EXCLUDED.reason, paused_until = EXCLUDED.paused_until",
    paused: "SELECT sender, reason, paused_until FROM mail_sender_pause WHERE paused_until > now()",
    purge: "
        DELETE FROM mail_outbox
        WHERE status IN ('sent', 'failed', 'cancelled')
          AND updated_at < now() - make_interval(days => $1::int)",
    enqueue: "
        INSERT INTO mail_outbox
            (module, sender, to_addrs, cc_addrs, bcc_addrs, reply_to, subject, body_text,
             body_html, headers, priority, idempotency_key, max_attempts)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    last_insert_id: "SELECT currval(pg_get_serial_sequence('mail_outbox', 'id'))",
    list: "
        SELECT id, module, sender, to_addrs, subject, priority, status, attempts, max_attempts,
               next_attempt_at, lease_owner, last_error, last_smtp_code, last_reply, message_id,
               idempotency_key, created_at, updated_at, sent_at
        FROM mail_outbox
        WHERE id = COALESCE($1, id) AND status = COALESCE($2, status)
        ORDER BY id DESC
        LIMIT $3",
    retry_one: "
        UPDATE mail_outbox
        SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
        WHERE id = $1 AND status IN ('failed', 'cancelled')",
    retry_failed: "
        UPDATE mail_outbox
        SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
        WHERE status = 'failed'",
    cancel: "
        UPDATE mail_outbox SET status = 'cancelled', updated_at = now()
        WHERE id = $1 AND status = 'pending'",
    set_relay: "
        UPDATE mail_settings
        SET relay_host = $1, relay_port = $2, relay_security = $3, relay_username = $4,
            relay_password = $5, general_sender = COALESCE($6, general_sender),
            reception_sender = COALESCE($7, reception_sender), updated_at = now()
        WHERE id = 1",
    set_oauth: "
        UPDATE mail_settings
        SET oauth_enabled = $1, oauth_mode = $2, tenant_id = COALESCE($3, tenant_id),
            client_id = COALESCE($4, client_id), client_secret = COALESCE($5, client_secret),
            oauth_smtp_host = COALESCE($6, oauth_smtp_host),
            oauth_smtp_port = COALESCE($7, oauth_smtp_port),
            authority_host = COALESCE($8, authority_host),
            graph_base_url = COALESCE($9, graph_base_url),
            general_sender = COALESCE($10, general_sender),
            reception_sender = COALESCE($11, reception_sender), updated_at = now()
        WHERE id = 1",
    oldest_due_secs: "
        SELECT CAST(EXTRACT(EPOCH FROM now() - MIN(next_attempt_at)) AS BIGINT)
        FROM mail_outbox WHERE status = 'pending' AND next_attempt_at <= now()",
};
