//! Mail settings held in the database (the TEOS web UI writes them): loaded, checked,
//! and published to the worker, which picks up a change without a restart.

use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use tokio::sync::{Notify, watch};

use crate::store::{SettingsRow, Store};

/// The two mailboxes an admin configures. Reception module mail defaults to the
/// reception mailbox; everything else to the general one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenderKind {
    General,
    Reception,
}

impl SenderKind {
    pub fn for_row(module: &str, sender: Option<&str>) -> Result<SenderKind, String> {
        match sender.map(str::trim) {
            None | Some("") if module == "reception" => Ok(SenderKind::Reception),
            None | Some("") => Ok(SenderKind::General),
            Some("general") => Ok(SenderKind::General),
            Some("reception") => Ok(SenderKind::Reception),
            Some(other) => Err(format!(
                "unknown sender {other:?}: use 'general' or 'reception' (the mailboxes set in the mail settings)"
            )),
        }
    }

    /// The key of this sender's pause.
    pub fn as_str(self) -> &'static str {
        match self {
            SenderKind::General => "general",
            SenderKind::Reception => "reception",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    None,
    StartTls,
    Tls,
}

/// The plain SMTP relay, used when Microsoft 365 delivery is not enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    pub host: String,
    pub port: u16,
    pub security: Security,
    /// With a password; both or neither.
    pub login: Option<(String, Password)>,
}

/// Prints nothing but stars.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthMode {
    /// Microsoft Graph sendMail with the Mail.Send application permission.
    Graph,
    /// SMTP AUTH XOAUTH2 with an app token (SMTP.SendAsApp).
    Smtp,
}

/// An Entra ID app registration that sends as the configured mailboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth {
    pub mode: OAuthMode,
    pub tenant: String,
    pub client_id: String,
    pub secret: Password,
    pub smtp_host: String,
    pub smtp_port: u16,
    /// `https://login.microsoftonline.com`, a sovereign cloud's, or a test server's.
    pub authority: String,
    /// `https://graph.microsoft.com` without a trailing slash.
    pub graph: String,
}

/// A checked snapshot of the settings row. Each part that is wrong says why, in words an
/// admin can act on; mail that needs it waits instead of failing.
#[derive(Debug, Clone)]
pub struct Settings {
    pub raw: SettingsRow,
    pub general: Result<Mailbox, String>,
    pub reception: Result<Mailbox, String>,
    pub relay: Result<Relay, String>,
    /// `Ok(None)`: OAuth is off and the relay delivers.
    pub oauth: Result<Option<OAuth>, String>,
}

impl Settings {
    pub fn from_row(raw: SettingsRow) -> Settings {
        Settings {
            general: sender_address("general", raw.general_sender.as_deref()),
            reception: sender_address("reception", raw.reception_sender.as_deref()),
            relay: relay(&raw),
            oauth: oauth(&raw),
            raw,
        }
    }

    pub fn sender(&self, kind: SenderKind) -> &Result<Mailbox, String> {
        match kind {
            SenderKind::General => &self.general,
            SenderKind::Reception => &self.reception,
        }
    }
}

fn sender_address(kind: &str, value: Option<&str>) -> Result<Mailbox, String> {
    let value = value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("no {kind} sender address is set in the mail settings"))?;
    value.parse::<Mailbox>().map_err(|e| {
        format!("the {kind} sender address {value:?} in the mail settings is not valid ({e})")
    })
}

fn relay(raw: &SettingsRow) -> Result<Relay, String> {
    let host = raw
        .relay_host
        .as_deref()
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or("no SMTP relay host is set in the mail settings")?;
    let security = match raw.relay_security.as_str() {
        "none" => Security::None,
        "starttls" => Security::StartTls,
        "tls" => Security::Tls,
        other => {
            return Err(format!(
                "relay security {other:?} is not none, starttls or tls"
            ));
        }
    };
    let default_port = if security == Security::Tls { 465 } else { 587 };
    let port = match raw.relay_port {
        None => default_port,
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(format!("relay port {p} is not a port number"))?,
    };
    let login = match (raw.relay_username.as_deref(), raw.relay_password.as_deref()) {
        (None | Some(""), _) => None,
        (Some(user), Some(pass)) => Some((user.to_string(), Password(pass.to_string()))),
        (Some(user), None) => {
            return Err(format!("relay user {user:?} is set but has no password"));
        }
    };
    Ok(Relay {
        host: host.to_string(),
        port,
        security,
        login,
    })
}

fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_domain(s: &str) -> bool {
    s.contains('.')
        && s.split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

fn oauth(raw: &SettingsRow) -> Result<Option<OAuth>, String> {
    if !raw.oauth_enabled {
        return Ok(None);
    }
    let mode = match raw.oauth_mode.as_str() {
        "graph" => OAuthMode::Graph,
        "smtp" => OAuthMode::Smtp,
        "smtp-delegated" => {
            return Err("OAuth mode smtp-delegated needs a mailbox sign-in, which this version cannot do yet; choose graph or smtp".into());
        }
        other => return Err(format!("OAuth mode {other:?} is not graph or smtp")),
    };
    let field = |v: &Option<String>, what: &str| {
        v.as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .ok_or(format!(
                "OAuth is enabled but no {what} is set in the mail settings"
            ))
    };
    let tenant = field(&raw.tenant_id, "tenant ID (Directory ID)")?;
    if !is_guid(&tenant) && !is_domain(&tenant) {
        return Err(format!(
            "the tenant ID {tenant:?} is neither a GUID like 72f988bf-86f1-41af-91ab-2d7cd011db47 nor a domain like contoso.onmicrosoft.com; copy the Directory (tenant) ID from the app's overview page in Entra ID"
        ));
    }
    let client_id = field(&raw.client_id, "client ID (Application ID)")?;
    if !is_guid(&client_id) {
        return Err(format!(
            "the client ID {client_id:?} is not a GUID; copy the Application (client) ID from the app's overview page in Entra ID"
        ));
    }
    let secret = field(&raw.client_secret, "client secret")?;
    if is_guid(&secret) {
        return Err("the client secret looks like a Secret ID (a GUID); paste the secret's Value from Certificates & secrets instead".into());
    }
    let smtp_port = u16::try_from(raw.oauth_smtp_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(format!(
            "OAuth SMTP port {} is not a port number",
            raw.oauth_smtp_port
        ))?;
    let authority = raw.authority_host.trim().trim_end_matches('/');
    let authority = if authority.contains("://") {
        authority.to_string()
    } else {
        format!("https://{authority}")
    };
    Ok(Some(OAuth {
        mode,
        tenant,
        client_id,
        secret: Password(secret),
        smtp_host: raw.oauth_smtp_host.trim().to_string(),
        smtp_port,
        authority,
        graph: raw.graph_base_url.trim().trim_end_matches('/').to_string(),
    }))
}

/// Keeps `tx` up to date with the settings row: looks every `every`, and at once when
/// `wake` fires (PostgreSQL NOTIFY). A failed look keeps the last good settings.
pub async fn watch_settings(
    store: Store,
    tx: watch::Sender<Arc<Settings>>,
    every: Duration,
    wake: Arc<Notify>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wake.notified() => {}
            _ = tx.closed() => return,
        }
        match store.load_settings().await {
            Ok(row) if row != tx.borrow().raw => {
                let settings = Settings::from_row(row);
                tracing::info!(
                    relay = ?settings.relay.as_ref().map(|r| (&r.host, r.port)),
                    "mail settings changed"
                );
                match store.clear_pauses().await {
                    Ok(n) if n > 0 => {
                        tracing::info!(senders = n, "pauses lifted after the settings change")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not lift the sender pauses"),
                }
                tx.send_replace(Arc::new(settings));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not read the mail settings; keeping the last ones")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> SettingsRow {
        SettingsRow {
            general_sender: Some("TEOS <teos@example.com>".into()),
            reception_sender: None,
            relay_host: Some("smtp.example.com".into()),
            relay_port: None,
            relay_security: "starttls".into(),
            relay_username: Some("teos".into()),
            relay_password: Some("hunter2".into()),
            oauth_enabled: false,
            oauth_mode: "graph".into(),
            tenant_id: None,
            client_id: None,
            client_secret: None,
            oauth_smtp_host: "smtp.office365.com".into(),
            oauth_smtp_port: 587,
            authority_host: "login.microsoftonline.com".into(),
            graph_base_url: "https://graph.microsoft.com/".into(),
        }
    }

    #[test]
    fn reception_module_defaults_to_reception_sender() {
        assert_eq!(
            SenderKind::for_row("reception", None),
            Ok(SenderKind::Reception)
        );
        assert_eq!(
            SenderKind::for_row("catering", None),
            Ok(SenderKind::General)
        );
        assert_eq!(
            SenderKind::for_row("reception", Some("general")),
            Ok(SenderKind::General)
        );
        assert!(
            SenderKind::for_row("x", Some("boss"))
                .unwrap_err()
                .contains("boss")
        );
    }

    #[test]
    fn missing_parts_are_named_and_the_password_never_printed() {
        let s = Settings::from_row(row());
        assert_eq!(s.relay.as_ref().unwrap().port, 587);
        assert!(
            s.reception
                .as_ref()
                .unwrap_err()
                .contains("reception sender")
        );
        let printed = format!("{s:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
    }

    #[test]
    fn oauth_values_an_admin_may_paste_wrong_are_explained() {
        let mut r = row();
        r.oauth_enabled = true;
        r.tenant_id = Some("contoso.onmicrosoft.com".into());
        r.client_id = Some("6731de76-14a6-49ae-97bc-6eba6914391e".into());
        r.client_secret = Some("Abc8Q~verysecretvalue".into());
        let o = Settings::from_row(r.clone()).oauth.unwrap().unwrap();
        assert_eq!(o.authority, "https://login.microsoftonline.com");
        assert_eq!(o.graph, "https://graph.microsoft.com");
        assert!(!format!("{o:?}").contains("verysecret"));

        let cases = [
            ("tenant", "not a tenant", "neither a GUID"),
            ("client", "my-app", "not a GUID"),
            (
                "secret",
                "2d1f7a56-0c3e-4b8f-9a41-7c2e9d0b1f34",
                "Secret ID",
            ),
            ("secret", "", "no client secret"),
        ];
        for (field, value, expected) in cases {
            let mut bad = r.clone();
            match field {
                "tenant" => bad.tenant_id = Some(value.into()),
                "client" => bad.client_id = Some(value.into()),
                _ => bad.client_secret = Some(value.into()),
            }
            let err = Settings::from_row(bad).oauth.unwrap_err();
            assert!(err.contains(expected), "{field}: {err}");
        }
    }
}
