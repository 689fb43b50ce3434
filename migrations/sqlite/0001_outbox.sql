-- The outbox TEOS modules write to, its attachments, the history of every
-- delivery attempt, the mail settings an admin edits, and per-sender pauses.
-- Timestamps are UTC text as SQLite's strftime('%Y-%m-%d %H:%M:%f') writes them,
-- so that they compare correctly as strings.

CREATE TABLE mail_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    module          TEXT    NOT NULL DEFAULT 'general',
    sender          TEXT,
    to_addrs        TEXT    NOT NULL,
    cc_addrs        TEXT,
    bcc_addrs       TEXT,
    reply_to        TEXT,
    subject         TEXT    NOT NULL DEFAULT '',
    body_text       TEXT,
    body_html       TEXT,
    headers         TEXT,
    priority        INTEGER NOT NULL DEFAULT 100,
    not_before      TEXT,
    idempotency_key TEXT UNIQUE,
    status          TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'cancelled')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER,
    next_attempt_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    lease_owner     TEXT,
    lease_until     TEXT,
    last_error      TEXT,
    last_smtp_code  INTEGER,
    last_reply      TEXT,
    message_id      TEXT,
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    updated_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    sent_at         TEXT
);

CREATE INDEX mail_outbox_due ON mail_outbox (priority, next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX mail_outbox_leased ON mail_outbox (lease_until) WHERE status = 'sending';
CREATE INDEX mail_outbox_status_updated ON mail_outbox (status, updated_at);

CREATE TABLE mail_attachment (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id    INTEGER NOT NULL REFERENCES mail_outbox (id) ON DELETE CASCADE,
    filename     TEXT    NOT NULL,
    content_type TEXT    NOT NULL DEFAULT 'application/octet-stream',
    content      BLOB    NOT NULL
);
CREATE INDEX mail_attachment_outbox ON mail_attachment (outbox_id);

CREATE TABLE mail_attempt (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id   INTEGER NOT NULL REFERENCES mail_outbox (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    finished_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    duration_ms INTEGER NOT NULL,
    transport   TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,
    smtp_code   INTEGER,
    detail      TEXT,
    daemon      TEXT    NOT NULL
);
CREATE INDEX mail_attempt_outbox ON mail_attempt (outbox_id);

CREATE TABLE mail_settings (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    general_sender   TEXT,
    reception_sender TEXT,
    relay_host       TEXT,
    relay_port       INTEGER,
    relay_security   TEXT NOT NULL DEFAULT 'starttls'
                     CHECK (relay_security IN ('none', 'starttls', 'tls')),
    relay_username   TEXT,
    relay_password   TEXT,
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);
INSERT INTO mail_settings (id) VALUES (1);

CREATE TABLE mail_sender_pause (
    sender       TEXT PRIMARY KEY,
    reason       TEXT NOT NULL,
    paused_until TEXT NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);
