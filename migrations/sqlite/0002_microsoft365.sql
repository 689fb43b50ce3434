-- Microsoft 365 delivery: an Entra ID app (client credentials) sending through Graph
-- sendMail or SMTP XOAUTH2. The relay stays for installations without OAuth.
ALTER TABLE mail_settings ADD COLUMN oauth_enabled BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE mail_settings ADD COLUMN oauth_mode TEXT NOT NULL DEFAULT 'graph'
    CHECK (oauth_mode IN ('graph', 'smtp', 'smtp-delegated'));
ALTER TABLE mail_settings ADD COLUMN tenant_id TEXT;
ALTER TABLE mail_settings ADD COLUMN client_id TEXT;
ALTER TABLE mail_settings ADD COLUMN client_secret TEXT;
ALTER TABLE mail_settings ADD COLUMN oauth_smtp_host TEXT NOT NULL DEFAULT 'smtp.office365.com';
ALTER TABLE mail_settings ADD COLUMN oauth_smtp_port INTEGER NOT NULL DEFAULT 587;
ALTER TABLE mail_settings ADD COLUMN authority_host TEXT NOT NULL DEFAULT 'login.microsoftonline.com';
ALTER TABLE mail_settings ADD COLUMN graph_base_url TEXT NOT NULL DEFAULT 'https://graph.microsoft.com';
