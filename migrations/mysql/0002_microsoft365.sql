-- Microsoft 365 delivery: an Entra ID app (client credentials) sending through Graph
-- sendMail or SMTP XOAUTH2. The relay stays for installations without OAuth.
ALTER TABLE mail_settings
    ADD COLUMN oauth_enabled   BOOLEAN      NOT NULL DEFAULT false,
    ADD COLUMN oauth_mode      VARCHAR(16)  NOT NULL DEFAULT 'graph'
                               CHECK (oauth_mode IN ('graph', 'smtp', 'smtp-delegated')),
    ADD COLUMN tenant_id       VARCHAR(255),
    ADD COLUMN client_id       VARCHAR(255),
    ADD COLUMN client_secret   TEXT,
    ADD COLUMN oauth_smtp_host VARCHAR(255) NOT NULL DEFAULT 'smtp.office365.com',
    ADD COLUMN oauth_smtp_port INT          NOT NULL DEFAULT 587,
    ADD COLUMN authority_host  VARCHAR(255) NOT NULL DEFAULT 'login.microsoftonline.com',
    ADD COLUMN graph_base_url  VARCHAR(255) NOT NULL DEFAULT 'https://graph.microsoft.com';
