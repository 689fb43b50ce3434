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

/// A checked snapshot of the settings row. Each part that is wrong says why, in words an
/// admin can act on; mail that needs it waits instead of failing.
#[derive(Debug, Clone)]
pub struct Settings {
    pub raw: SettingsRow,
    pub general: Result<Mailbox, String>,
    pub reception: Result<Mailbox, String>,
    pub relay: Result<Relay, String>,
}

impl Settings {
    pub fn from_row(raw: SettingsRow) -> Settings {
        Settings {
            general: sender_address("general", raw.general_sender.as_deref()),
            reception: sender_address("reception", raw.reception_sender.as_deref()),
            relay: relay(&raw),
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
}
