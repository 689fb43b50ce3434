-- The outbox TEOS modules write to, its attachments, the history of every
-- delivery attempt, the mail settings an admin edits, and per-sender pauses.

CREATE TABLE mail_outbox (
    id              BIGSERIAL PRIMARY KEY,
    module          TEXT        NOT NULL DEFAULT 'general',
    sender          TEXT,
    to_addrs        TEXT        NOT NULL,
    cc_addrs        TEXT,
    bcc_addrs       TEXT,
    reply_to        TEXT,
    subject         TEXT        NOT NULL DEFAULT '',
    body_text       TEXT,
    body_html       TEXT,
    headers         TEXT,
    priority        INTEGER     NOT NULL DEFAULT 100,
    not_before      TIMESTAMPTZ,
    idempotency_key TEXT UNIQUE,
    status          TEXT        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'cancelled')),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    max_attempts    INTEGER,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_owner     TEXT,
    lease_until     TIMESTAMPTZ,
    last_error      TEXT,
    last_smtp_code  INTEGER,
    last_reply      TEXT,
    message_id      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at         TIMESTAMPTZ
);

-- Serves the claim query: due pending rows in priority order.
CREATE INDEX mail_outbox_due ON mail_outbox (priority, next_attempt_at, id) WHERE status = 'pending';
-- Serves the lease reaper.
CREATE INDEX mail_outbox_leased ON mail_outbox (lease_until) WHERE status = 'sending';
-- Serves retention and `queue list --status`.
CREATE INDEX mail_outbox_status_updated ON mail_outbox (status, updated_at);

CREATE TABLE mail_attachment (
    id           BIGSERIAL PRIMARY KEY,
    outbox_id    BIGINT NOT NULL REFERENCES mail_outbox (id) ON DELETE CASCADE,
    filename     TEXT   NOT NULL,
    content_type TEXT   NOT NULL DEFAULT 'application/octet-stream',
    content      BYTEA  NOT NULL
);
CREATE INDEX mail_attachment_outbox ON mail_attachment (outbox_id);

CREATE TABLE mail_attempt (
    id          BIGSERIAL PRIMARY KEY,
    outbox_id   BIGINT      NOT NULL REFERENCES mail_outbox (id) ON DELETE CASCADE,
    attempt     INTEGER     NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    duration_ms BIGINT      NOT NULL,
    transport   TEXT        NOT NULL,
    outcome     TEXT        NOT NULL,
    smtp_code   INTEGER,
    detail      TEXT,
    daemon      TEXT        NOT NULL
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
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO mail_settings (id) VALUES (1);

CREATE TABLE mail_sender_pause (
    sender       TEXT PRIMARY KEY,
    reason       TEXT        NOT NULL,
    paused_until TIMESTAMPTZ NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Wake the daemons as soon as a module commits new mail or an admin saves settings.
CREATE FUNCTION teos_mailer_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END $$;

CREATE TRIGGER mail_outbox_notify AFTER INSERT ON mail_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION teos_mailer_notify('teos_mailer_outbox');
CREATE TRIGGER mail_settings_notify AFTER UPDATE ON mail_settings
    FOR EACH STATEMENT EXECUTE FUNCTION teos_mailer_notify('teos_mailer_settings');
