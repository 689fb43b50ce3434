//! All SQL of the daemon: the outbox queue, its history, sender pauses and the mail
//! settings row. One file per dialect holds the statements; this file runs them.

mod mysql;
mod postgres;
mod sqlite;

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{ConnectOptions, Executor};

use crate::config::DatabaseConfig;

pub use sqlx::Error as DbError;

/// The three databases TEOS runs on. Each variant owns a typed pool; the statements for
/// it live in the module of the same name.
#[derive(Clone, Debug)]
pub enum Store {
    Postgres(PgPool),
    MySql(MySqlPool),
    Sqlite(SqlitePool),
}

/// The statements that differ between dialects. Every statement binds its parameters in
/// the same order in all three, so the code that runs them is written once.
pub(crate) struct Queries {
    /// (limit, owner, lease ms, message-id domain, paused sender, paused sender) → ClaimedRow
    claim: &'static str,
    /// (status, give back 0/1, retry delay ms or NULL, error, code, reply, sent, id, owner);
    /// PostgreSQL writes a batch with `postgres::finish_many` instead
    finish: &'static str,
    /// (outbox id, attempt, duration ms, transport, outcome, code, detail, daemon)
    record_attempt: &'static str,
    /// (default max attempts) → rows whose daemon died are due again, or failed
    reap: &'static str,
    /// (sender, reason, pause ms) — insert or extend
    pause: &'static str,
    /// () → senders paused now
    paused: &'static str,
    /// (days) → purged sent/failed/cancelled rows
    purge: &'static str,
    /// NewMail columns
    enqueue: &'static str,
    /// () → the id the last INSERT on this connection assigned
    last_insert_id: &'static str,
    /// (id, status filter or NULL, limit)
    list: &'static str,
    retry_one: &'static str,
    retry_failed: &'static str,
    cancel: &'static str,
    set_relay: &'static str,
    set_oauth: &'static str,
    /// () → seconds since the oldest due pending row was due
    oldest_due_secs: &'static str,
}

/// One claimed message: what rendering and sending need, nothing more. Timestamps stay
/// in the database so that a module's odd value cannot make the claim itself fail.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedRow {
    pub id: i64,
    pub module: String,
    pub sender: Option<String>,
    pub to_addrs: String,
    pub cc_addrs: Option<String>,
    pub bcc_addrs: Option<String>,
    pub reply_to: Option<String>,
    pub subject: String,
    pub body_text: Option<String>,
    pub body_html: Option<String>,
    pub headers: Option<String>,
    pub priority: i32,
    /// Counts this attempt: the claim added one.
    pub attempts: i32,
    pub max_attempts: Option<i32>,
    /// Assigned at the first claim, reused on every retry.
    pub message_id: String,
    /// Rows in mail_attachment; most mail has none, and then none are read.
    pub attachment_count: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub content: Vec<u8>,
}

/// A row as `queue list` and `queue show` print it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxSummary {
    pub id: i64,
    pub module: String,
    pub sender: Option<String>,
    pub to_addrs: String,
    pub subject: String,
    pub priority: i32,
    pub status: String,
    pub attempts: i32,
    pub max_attempts: Option<i32>,
    pub next_attempt_at: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub last_error: Option<String>,
    pub last_smtp_code: Option<i32>,
    pub last_reply: Option<String>,
    pub message_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub attempt: i32,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub transport: String,
    pub outcome: String,
    pub smtp_code: Option<i32>,
    pub detail: Option<String>,
    pub daemon: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PauseRow {
    pub sender: String,
    pub reason: String,
    pub paused_until: DateTime<Utc>,
}

#[derive(Debug, Default)]
pub struct Stats {
    /// (status, rows)
    pub by_status: Vec<(String, i64)>,
    /// Seconds the oldest due pending row has waited past its due time.
    pub oldest_due_secs: Option<i64>,
    pub pauses: Vec<PauseRow>,
}

/// The mail settings row as stored. `settings` turns it into something usable.
#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SettingsRow {
    pub general_sender: Option<String>,
    pub reception_sender: Option<String>,
    pub relay_host: Option<String>,
    pub relay_port: Option<i32>,
    pub relay_security: String,
    pub relay_username: Option<String>,
    pub relay_password: Option<String>,
    pub oauth_enabled: bool,
    pub oauth_mode: String,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub oauth_smtp_host: String,
    pub oauth_smtp_port: i32,
    pub authority_host: String,
    pub graph_base_url: String,
}

impl std::fmt::Debug for SettingsRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettingsRow")
            .field("general_sender", &self.general_sender)
            .field("reception_sender", &self.reception_sender)
            .field("relay_host", &self.relay_host)
            .field("relay_port", &self.relay_port)
            .field("relay_security", &self.relay_security)
            .field("relay_username", &self.relay_username)
            .field(
                "relay_password",
                &self.relay_password.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// What `settings set-relay` writes.
pub struct RelayUpdate {
    pub host: String,
    pub port: u16,
    pub security: String,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub general_sender: Option<String>,
    pub reception_sender: Option<String>,
}

/// What `settings set-oauth` writes; `None` keeps the stored value.
pub struct OAuthUpdate {
    pub enabled: bool,
    pub mode: String,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub smtp_host: Option<String>,
    pub smtp_port: Option<u16>,
    pub authority_host: Option<String>,
    pub graph_base_url: Option<String>,
    pub general_sender: Option<String>,
    pub reception_sender: Option<String>,
}

/// A message to insert, as `enqueue` and tests write it: the same columns a module fills.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMail {
    #[serde(default)]
    pub module: Option<String>,
    #[serde(default)]
    pub sender: Option<String>,
    pub to: Vec<String>,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub bcc: Vec<String>,
    #[serde(default)]
    pub reply_to: Option<String>,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub body_text: Option<String>,
    #[serde(default)]
    pub body_html: Option<String>,
    #[serde(default)]
    pub headers: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub max_attempts: Option<i32>,
    #[serde(default)]
    pub attachments: Vec<NewAttachment>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAttachment {
    pub filename: String,
    #[serde(default = "octet_stream")]
    pub content_type: String,
    /// Base64 in JSON documents.
    #[serde(with = "base64_bytes")]
    pub content: Vec<u8>,
}

fn octet_stream() -> String {
    "application/octet-stream".into()
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(serde::de::Error::custom)
    }
}

/// How a claimed row ends its attempt.
#[derive(Debug, Clone)]
pub struct Finish {
    pub status: RowStatus,
    /// Gives the attempt back: a configuration problem or a shutdown, not the message.
    pub give_back: bool,
    /// Pending again after this long; `None` keeps the due time.
    pub retry_in: Option<Duration>,
    pub error: Option<String>,
    pub smtp_code: Option<u16>,
    pub reply: Option<String>,
}

/// One row of history: what one attempt did. Its reply code is the outcome's.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempt: i32,
    pub duration: Duration,
    pub transport: &'static str,
    pub outcome: &'static str,
    pub detail: Option<String>,
}

/// The end of one attempt on row `id`: the outcome, and its history row unless the
/// attempt was given back untried.
#[derive(Debug, Clone)]
pub struct Ending {
    pub id: i64,
    pub finish: Finish,
    pub record: Option<AttemptRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowStatus {
    Pending,
    Sent,
    Failed,
}

impl RowStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RowStatus::Pending => "pending",
            RowStatus::Sent => "sent",
            RowStatus::Failed => "failed",
        }
    }
}

/// Runs `$body` with `$pool` bound to the typed pool of whichever database this is.
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Postgres($pool) => $body,
            Store::MySql($pool) => $body,
            Store::Sqlite($pool) => $body,
        }
    };
}

/// The statuses an operator may filter `queue list` by.
pub const STATUSES: [&str; 5] = ["pending", "sending", "sent", "failed", "cancelled"];

impl Store {
    /// Opens a pool. One attempt; the caller decides how to wait through an outage.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Store, DbError> {
        let url = cfg.url.expose_secret();
        let timeout = Duration::from_secs(cfg.connect_timeout_secs);
        let store = if url.starts_with("postgres") {
            let options = PgConnectOptions::from_str(url)?
                .application_name("teos-mailer")
                .log_statements(tracing::log::LevelFilter::Trace);
            let pool = PgPoolOptions::new()
                .max_connections(cfg.max_connections)
                .acquire_timeout(timeout)
                .connect_with(options)
                .await?;
            Store::Postgres(pool)
        } else if url.starts_with("mysql") || url.starts_with("mariadb") {
            let url = url.replacen("mariadb", "mysql", 1);
            let options = MySqlConnectOptions::from_str(&url)?
                .log_statements(tracing::log::LevelFilter::Trace);
            let pool = MySqlPoolOptions::new()
                .max_connections(cfg.max_connections)
                .acquire_timeout(timeout)
                // A claim must not lock rows it only looked at; REPEATABLE READ would.
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                            .await
                            .map(|_| ())
                    })
                })
                .connect_with(options)
                .await?;
            Store::MySql(pool)
        } else {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                .log_statements(tracing::log::LevelFilter::Trace);
            // SQLite takes one writer at a time; writers queueing on one connection
            // beat writers spinning on the file lock.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(timeout)
                .connect_with(options)
                .await?;
            Store::Sqlite(pool)
        };
        Ok(store)
    }

    pub fn dialect(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::MySql(_) => "mysql",
            Store::Sqlite(_) => "sqlite",
        }
    }

    fn queries(&self) -> &'static Queries {
        match self {
            Store::Postgres(_) => &postgres::QUERIES,
            Store::MySql(_) => &mysql::QUERIES,
            Store::Sqlite(_) => &sqlite::QUERIES,
        }
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        match self {
            Store::Postgres(pool) => sqlx::migrate!("migrations/postgres").run(pool).await,
            Store::MySql(pool) => sqlx::migrate!("migrations/mysql").run(pool).await,
            Store::Sqlite(pool) => sqlx::migrate!("migrations/sqlite").run(pool).await,
        }
    }

    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }

    /// The PostgreSQL pool, for LISTEN.
    pub fn postgres(&self) -> Option<&PgPool> {
        match self {
            Store::Postgres(pool) => Some(pool),
            _ => None,
        }
    }

    /// Senders paused right now (`*` pauses all).
    pub async fn paused_senders(&self) -> Result<Vec<PauseRow>, DbError> {
        let q = self.queries();
        with_pool!(self, pool => sqlx::query_as(q.paused).fetch_all(pool).await)
    }

    /// Reserves up to `limit` due rows for `owner` until the lease runs out, and commits
    /// before returning: no lock is held while the messages go out. Rows of a sender in
    /// `paused` are left alone.
    pub async fn claim(
        &self,
        owner: &str,
        limit: u32,
        lease: Duration,
        message_id_domain: &str,
        paused: &[&str],
    ) -> Result<Vec<ClaimedRow>, DbError> {
        // Sender kinds are a closed set of two, so two slots always suffice; an empty
        // string matches no row.
        let skip = |i: usize| paused.get(i).copied().unwrap_or("");
        let (limit, lease_ms) = (i64::from(limit), duration_ms(lease));
        let mut rows: Vec<ClaimedRow> = match self {
            Store::MySql(pool) => {
                mysql::claim(
                    pool,
                    owner,
                    limit,
                    lease_ms,
                    message_id_domain,
                    skip(0),
                    skip(1),
                )
                .await?
            }
            _ => {
                let q = self.queries();
                with_pool!(self, pool => sqlx::query_as(q.claim)
                    .bind(skip(0))
                    .bind(skip(1))
                    .bind(limit)
                    .bind(owner)
                    .bind(lease_ms)
                    .bind(message_id_domain)
                    .fetch_all(pool)
                    .await?)
            }
        };
        rows.sort_by_key(|r| (r.priority, r.id));
        Ok(rows)
    }

    pub async fn attachments(&self, outbox_id: i64) -> Result<Vec<Attachment>, DbError> {
        let sql = match self {
            Store::Postgres(_) => {
                "SELECT filename, content_type, content FROM mail_attachment WHERE outbox_id = $1 ORDER BY id"
            }
            _ => {
                "SELECT filename, content_type, content FROM mail_attachment WHERE outbox_id = ? ORDER BY id"
            }
        };
        with_pool!(self, pool => sqlx::query_as(sql).bind(outbox_id).fetch_all(pool).await)
    }

    /// Ends an attempt on a row this daemon holds, with its history row. Returns false
    /// when the lease was no longer ours (another daemon took the row over after it
    /// expired): then nothing is written.
    pub async fn finish(
        &self,
        owner: &str,
        id: i64,
        finish: &Finish,
        record: Option<&AttemptRecord>,
    ) -> Result<bool, DbError> {
        let ending = Ending {
            id,
            finish: finish.clone(),
            record: record.cloned(),
        };
        Ok(!self.finish_many(owner, &[ending]).await?.is_empty())
    }

    /// Ends several attempts in one transaction (on PostgreSQL, one statement), so that
    /// a busy daemon pays one commit for a batch of messages. Returns the ids whose lease
    /// was still ours; the others are left as they are.
    pub async fn finish_many(&self, owner: &str, endings: &[Ending]) -> Result<Vec<i64>, DbError> {
        if let Store::Postgres(pool) = self {
            return postgres::finish_many(pool, owner, endings).await;
        }
        let q = self.queries();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let mut ours = Vec::with_capacity(endings.len());
            for e in endings {
                let f = &e.finish;
                let updated = sqlx::query(q.finish)
                    .bind(f.status.as_str())
                    .bind(i32::from(f.give_back))
                    .bind(f.retry_in.map(duration_ms))
                    .bind(f.error.as_deref())
                    .bind(f.smtp_code.map(i32::from))
                    .bind(f.reply.as_deref())
                    .bind(f.status == RowStatus::Sent)
                    .bind(e.id)
                    .bind(owner)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if updated == 0 {
                    continue;
                }
                ours.push(e.id);
                if let Some(r) = &e.record {
                    sqlx::query(q.record_attempt)
                        .bind(e.id)
                        .bind(r.attempt)
                        .bind(duration_ms(r.duration))
                        .bind(r.transport)
                        .bind(r.outcome)
                        .bind(f.smtp_code.map(i32::from))
                        .bind(r.detail.as_deref())
                        .bind(owner)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
            Ok(ours)
        })
    }

    /// Rows whose lease ran out (their daemon died or hung) become due again, or failed
    /// once they have used up their attempts. Returns how many rows it touched.
    pub async fn reap_expired(&self, default_max_attempts: u32) -> Result<u64, DbError> {
        let q = self.queries();
        let max = i64::from(default_max_attempts);
        with_pool!(self, pool => Ok(sqlx::query(q.reap).bind(max).execute(pool).await?.rows_affected()))
    }

    /// Pauses a sender (or `*`, all) for `pause`. Returns true when it was not paused
    /// already, so that the reason is logged once, not once per message.
    pub async fn pause_sender(
        &self,
        sender: &str,
        reason: &str,
        pause: Duration,
    ) -> Result<bool, DbError> {
        let already = self
            .paused_senders()
            .await?
            .iter()
            .any(|p| p.sender == sender);
        let q = self.queries();
        with_pool!(self, pool => sqlx::query(q.pause)
            .bind(sender)
            .bind(reason)
            .bind(duration_ms(pause))
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(!already)
    }

    /// Lifts every pause: the settings changed, so every sender deserves a new try.
    pub async fn clear_pauses(&self) -> Result<u64, DbError> {
        with_pool!(self, pool => Ok(sqlx::query("DELETE FROM mail_sender_pause")
            .execute(pool)
            .await?
            .rows_affected()))
    }

    pub async fn purge(&self, days: u32) -> Result<u64, DbError> {
        let q = self.queries();
        with_pool!(self, pool => Ok(sqlx::query(q.purge)
            .bind(i64::from(days))
            .execute(pool)
            .await?
            .rows_affected()))
    }

    /// Inserts a message with its attachments. With an idempotency key that is already
    /// there, inserts nothing and returns the existing row's id.
    pub async fn enqueue(&self, mail: &NewMail) -> Result<(i64, bool), DbError> {
        if let Some(existing) = self.find_by_key(mail.idempotency_key.as_deref()).await? {
            return Ok((existing, false));
        }
        let json = |v: &Vec<String>| (!v.is_empty()).then(|| serde_json::json!(v).to_string());
        let to = serde_json::json!(mail.to).to_string();
        let headers = mail
            .headers
            .as_ref()
            .map(|h| serde_json::Value::Object(h.clone()).to_string());
        let q = self.queries();
        let inserted: Result<i64, DbError> = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let insert = sqlx::query(q.enqueue)
                .bind(mail.module.as_deref().unwrap_or("general"))
                .bind(mail.sender.as_deref())
                .bind(&to)
                .bind(json(&mail.cc))
                .bind(json(&mail.bcc))
                .bind(mail.reply_to.as_deref())
                .bind(&mail.subject)
                .bind(mail.body_text.as_deref())
                .bind(mail.body_html.as_deref())
                .bind(headers.as_deref())
                .bind(mail.priority.unwrap_or(100))
                .bind(mail.idempotency_key.as_deref())
                .bind(mail.max_attempts);
            insert.execute(&mut *tx).await?;
            let id: i64 = sqlx::query_scalar(q.last_insert_id).fetch_one(&mut *tx).await?;
            for a in &mail.attachments {
                sqlx::query(q_attachment(self))
                    .bind(id)
                    .bind(&a.filename)
                    .bind(&a.content_type)
                    .bind(&a.content)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(id)
        });
        match inserted {
            Ok(id) => Ok((id, true)),
            // Another writer inserted the same key between our look and our insert.
            Err(DbError::Database(e)) if e.is_unique_violation() => {
                let id = self.find_by_key(mail.idempotency_key.as_deref()).await?;
                id.map(|id| (id, false)).ok_or(DbError::Database(e))
            }
            Err(e) => Err(e),
        }
    }

    async fn find_by_key(&self, key: Option<&str>) -> Result<Option<i64>, DbError> {
        let Some(key) = key else { return Ok(None) };
        let sql = match self {
            Store::Postgres(_) => "SELECT id FROM mail_outbox WHERE idempotency_key = $1",
            _ => "SELECT id FROM mail_outbox WHERE idempotency_key = ?",
        };
        with_pool!(self, pool => sqlx::query_scalar(sql).bind(key).fetch_optional(pool).await)
    }

    pub async fn stats(&self) -> Result<Stats, DbError> {
        let q = self.queries();
        let sql = "SELECT status, COUNT(*) FROM mail_outbox GROUP BY status ORDER BY status";
        let by_status: Vec<(String, i64)> =
            with_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await?);
        let oldest_due_secs: Option<i64> = with_pool!(self, pool => sqlx::query_scalar(q.oldest_due_secs)
            .fetch_one(pool)
            .await?);
        let pauses = self.paused_senders().await?;
        Ok(Stats {
            by_status,
            oldest_due_secs,
            pauses,
        })
    }

    /// Newest first. `id` selects one row.
    pub async fn list(
        &self,
        id: Option<i64>,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<OutboxSummary>, DbError> {
        let q = self.queries();
        with_pool!(self, pool => sqlx::query_as(q.list)
            .bind(id)
            .bind(status)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)
    }

    pub async fn attempts(&self, outbox_id: i64) -> Result<Vec<AttemptRow>, DbError> {
        let sql = match self {
            Store::Postgres(_) => {
                "SELECT attempt, finished_at, duration_ms, transport, outcome, smtp_code, detail, daemon \
                 FROM mail_attempt WHERE outbox_id = $1 ORDER BY id"
            }
            _ => {
                "SELECT attempt, finished_at, duration_ms, transport, outcome, smtp_code, detail, daemon \
                 FROM mail_attempt WHERE outbox_id = ? ORDER BY id"
            }
        };
        with_pool!(self, pool => sqlx::query_as(sql).bind(outbox_id).fetch_all(pool).await)
    }

    /// A failed or cancelled row is due again now, with a fresh set of attempts.
    pub async fn retry(&self, id: i64) -> Result<u64, DbError> {
        let q = self.queries();
        with_pool!(self, pool => Ok(sqlx::query(q.retry_one).bind(id).execute(pool).await?.rows_affected()))
    }

    pub async fn retry_all_failed(&self) -> Result<u64, DbError> {
        let q = self.queries();
        with_pool!(self, pool => Ok(sqlx::query(q.retry_failed).execute(pool).await?.rows_affected()))
    }

    /// Cancels a row that has not been sent and is not being sent right now.
    pub async fn cancel(&self, id: i64) -> Result<u64, DbError> {
        let q = self.queries();
        with_pool!(self, pool => Ok(sqlx::query(q.cancel).bind(id).execute(pool).await?.rows_affected()))
    }

    pub async fn load_settings(&self) -> Result<SettingsRow, DbError> {
        let sql = "SELECT general_sender, reception_sender, relay_host, relay_port, relay_security, \
                   relay_username, relay_password, oauth_enabled, oauth_mode, tenant_id, client_id, \
                   client_secret, oauth_smtp_host, oauth_smtp_port, authority_host, graph_base_url \
                   FROM mail_settings WHERE id = 1";
        with_pool!(self, pool => sqlx::query_as(sql).fetch_one(pool).await)
    }

    pub async fn set_relay(&self, relay: &RelayUpdate) -> Result<(), DbError> {
        let q = self.queries();
        with_pool!(self, pool => sqlx::query(q.set_relay)
            .bind(&relay.host)
            .bind(i32::from(relay.port))
            .bind(&relay.security)
            .bind(relay.username.as_deref())
            .bind(relay.password.as_ref().map(|p| p.expose_secret()))
            .bind(relay.general_sender.as_deref())
            .bind(relay.reception_sender.as_deref())
            .execute(pool)
            .await
            .map(|_| ()))
    }
}

impl Store {
    pub async fn set_oauth(&self, o: &OAuthUpdate) -> Result<(), DbError> {
        let q = self.queries();
        with_pool!(self, pool => sqlx::query(q.set_oauth)
            .bind(o.enabled)
            .bind(&o.mode)
            .bind(o.tenant_id.as_deref())
            .bind(o.client_id.as_deref())
            .bind(o.client_secret.as_ref().map(|s| s.expose_secret()))
            .bind(o.smtp_host.as_deref())
            .bind(o.smtp_port.map(i32::from))
            .bind(o.authority_host.as_deref())
            .bind(o.graph_base_url.as_deref())
            .bind(o.general_sender.as_deref())
            .bind(o.reception_sender.as_deref())
            .execute(pool)
            .await
            .map(|_| ()))
    }
}

fn q_attachment(store: &Store) -> &'static str {
    match store {
        Store::Postgres(_) => {
            "INSERT INTO mail_attachment (outbox_id, filename, content_type, content) VALUES ($1, $2, $3, $4)"
        }
        _ => {
            "INSERT INTO mail_attachment (outbox_id, filename, content_type, content) VALUES (?, ?, ?, ?)"
        }
    }
}

/// A deadlock or serialization failure: another daemon got there first. Harmless for a
/// claim, which simply runs again.
pub fn is_contention(e: &DbError) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "40001" || code == "40P01")
}

pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
