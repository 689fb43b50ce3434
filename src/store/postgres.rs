//! PostgreSQL statements. `FOR UPDATE SKIP LOCKED` lets several daemons claim from one
//! table without waiting on each other; the claim is one statement, so it commits alone.

use super::Queries;

/// Ends an attempt on a row this daemon holds: (status, give back 0/1, retry delay ms or
/// NULL, error, code, reply, sent, id, owner).
macro_rules! finish_update {
    () => {
        "
        UPDATE mail_outbox
        SET status = $1,
            attempts = attempts - $2,
            next_attempt_at = COALESCE(now() + make_interval(secs => $3 / 1000.0), next_attempt_at),
            last_error = COALESCE($4, last_error),
            last_smtp_code = COALESCE($5, last_smtp_code),
            last_reply = COALESCE($6, last_reply),
            sent_at = CASE WHEN $7 THEN now() ELSE sent_at END,
            lease_owner = NULL,
            lease_until = NULL,
            updated_at = now()
        WHERE id = $8 AND lease_owner = $9 AND status = 'sending'"
    };
}

/// The outcome and its history row in one statement: one round trip and one commit
/// instead of four round trips in a transaction. The history parameters follow the
/// outcome's: (attempt, duration ms, transport, outcome, code, detail) → rows updated.
pub(super) const FINISH_AND_RECORD: &str = concat!(
    "WITH done AS (",
    finish_update!(),
    "
        RETURNING id
    ), history AS (
        INSERT INTO mail_attempt
            (outbox_id, attempt, duration_ms, transport, outcome, smtp_code, detail, daemon)
        SELECT id, $10, $11, $12, $13, $14, $15, $9 FROM done
    )
    SELECT COUNT(*) FROM done"
);

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
    finish: finish_update!(),
    record_attempt: "
        INSERT INTO mail_attempt
            (outbox_id, attempt, duration_ms, transport, outcome, smtp_code, detail, daemon)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
