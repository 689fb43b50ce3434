-- The outbox TEOS modules write to, its attachments, the history of every
-- delivery attempt, the mail settings an admin edits, and per-sender pauses.
-- All timestamps are UTC.

CREATE TABLE mail_outbox (
    id              BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    module          VARCHAR(64)  NOT NULL DEFAULT 'general',
    sender          VARCHAR(64),
    to_addrs        MEDIUMTEXT   NOT NULL,
    cc_addrs        MEDIUMTEXT,
    bcc_addrs       MEDIUMTEXT,
    reply_to        TEXT,
    subject         TEXT         NOT NULL DEFAULT '',
    body_text       LONGTEXT,
    body_html       LONGTEXT,
    headers         MEDIUMTEXT,
    priority        INT          NOT NULL DEFAULT 100,
    not_before      DATETIME(6),
    idempotency_key VARCHAR(255) UNIQUE,
    status          VARCHAR(16)  NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'cancelled')),
    attempts        INT          NOT NULL DEFAULT 0,
    max_attempts    INT,
    next_attempt_at DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    lease_owner     VARCHAR(255),
    lease_until     DATETIME(6),
    last_error      TEXT,
    last_smtp_code  INT,
    last_reply      TEXT,
    message_id      VARCHAR(255),
    created_at      DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    updated_at      DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    sent_at         DATETIME(6),
    -- Matches the claim query's WHERE and ORDER BY, so InnoDB neither filesorts
    -- nor locks rows it does not return.
    INDEX mail_outbox_due (status, priority, next_attempt_at, id),
    INDEX mail_outbox_leased (status, lease_until),
    INDEX mail_outbox_status_updated (status, updated_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE mail_attachment (
    id           BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    outbox_id    BIGINT       NOT NULL,
    filename     VARCHAR(255) NOT NULL,
    content_type VARCHAR(255) NOT NULL DEFAULT 'application/octet-stream',
    content      LONGBLOB     NOT NULL,
    INDEX mail_attachment_outbox (outbox_id),
    FOREIGN KEY (outbox_id) REFERENCES mail_outbox (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE mail_attempt (
    id          BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    outbox_id   BIGINT       NOT NULL,
    attempt     INT          NOT NULL,
    finished_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    duration_ms BIGINT       NOT NULL,
    transport   VARCHAR(32)  NOT NULL,
    outcome     VARCHAR(32)  NOT NULL,
    smtp_code   INT,
    detail      TEXT,
    daemon      VARCHAR(255) NOT NULL,
    INDEX mail_attempt_outbox (outbox_id),
    FOREIGN KEY (outbox_id) REFERENCES mail_outbox (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE mail_settings (
    id               INT          NOT NULL PRIMARY KEY CHECK (id = 1),
    general_sender   VARCHAR(320),
    reception_sender VARCHAR(320),
    relay_host       VARCHAR(255),
    relay_port       INT,
    relay_security   VARCHAR(16)  NOT NULL DEFAULT 'starttls'
                     CHECK (relay_security IN ('none', 'starttls', 'tls')),
    relay_username   VARCHAR(320),
    relay_password   TEXT,
    updated_at       DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
INSERT INTO mail_settings (id) VALUES (1);

CREATE TABLE mail_sender_pause (
    sender       VARCHAR(64) NOT NULL PRIMARY KEY,
    reason       TEXT        NOT NULL,
    paused_until DATETIME(6) NOT NULL,
    created_at   DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
