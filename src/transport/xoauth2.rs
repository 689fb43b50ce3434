//! Exchange Online over SMTP with SASL XOAUTH2: the app's token, the sender mailbox as
//! the user, STARTTLS required. Connections are pooled per mailbox and rebuilt when the
//! token changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::TlsParameters;
use lettre::transport::smtp::{self};

use super::mailbox::MailboxLimits;
use super::session::{Security, SessionPool};
use super::{Outcome, Stop, relay, sender};
use crate::render::Rendered;
use crate::token::AccessToken;

pub struct Xoauth2Transport {
    host: String,
    port: u16,
    tls: TlsParameters,
    timeout: std::time::Duration,
    sessions: u32,
    per_minute: u32,
    mailboxes: Mutex<HashMap<String, Arc<Mailbox>>>,
}

struct Mailbox {
    limits: MailboxLimits,
    /// The sessions and the token they logged in with.
    smtp: Mutex<Option<(AccessToken, Arc<SessionPool>)>>,
}

impl Xoauth2Transport {
    pub fn new(
        host: &str,
        port: u16,
        tls: TlsParameters,
        timeout: std::time::Duration,
        sessions: u32,
        per_minute: u32,
    ) -> Xoauth2Transport {
        Xoauth2Transport {
            host: host.to_string(),
            port,
            tls,
            timeout,
            sessions,
            per_minute,
            mailboxes: Mutex::new(HashMap::new()),
        }
    }

    fn mailbox(&self, address: &str) -> Arc<Mailbox> {
        self.mailboxes
            .lock()
            .unwrap()
            .entry(address.to_ascii_lowercase())
            .or_insert_with(|| {
                Arc::new(Mailbox {
                    limits: MailboxLimits::new(self.sessions, self.per_minute),
                    smtp: Mutex::new(None),
                })
            })
            .clone()
    }

    /// The mailbox's sessions for `token`; a new token starts new sessions.
    fn pool(&self, mailbox: &Mailbox, user: &str, token: &AccessToken) -> Arc<SessionPool> {
        let mut smtp = mailbox.smtp.lock().unwrap();
        if let Some((t, pool)) = smtp.as_ref() {
            if t == token {
                return pool.clone();
            }
        }
        // Port 465 speaks TLS from the first byte; anything else must upgrade with
        // STARTTLS, or the session ends before a token is sent.
        let security = if self.port == 465 {
            Security::Implicit(self.tls.clone())
        } else {
            Security::StartTls(self.tls.clone())
        };
        let credentials = Credentials::new(user.to_string(), token.secret().to_string());
        let pool = Arc::new(SessionPool::new(
            &self.host,
            self.port,
            security,
            self.timeout,
            Some((vec![Mechanism::Xoauth2], credentials)),
            self.sessions,
        ));
        *smtp = Some((token.clone(), pool.clone()));
        pool
    }

    pub async fn send(&self, message: &Rendered, token: &AccessToken, stop: &Stop) -> Outcome {
        let user = match sender(message) {
            Ok(address) => address,
            Err(outcome) => return outcome,
        };
        let mailbox = self.mailbox(&user);
        let Some(_session) = mailbox.limits.enter(stop).await else {
            return Outcome::Stopped;
        };
        let pool = self.pool(&mailbox, &user, token);
        let server = format!("{}:{}", self.host, self.port);
        let outcome = match pool.send(&message.envelope, &message.bytes).await {
            Ok(response) => relay::sent(&response),
            Err(e) => relay::classify_session(e, &server, |e, server| classify(e, server, &user)),
        };
        mailbox.limits.observe(&outcome, &user);
        outcome
    }
}

impl std::fmt::Debug for Xoauth2Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xoauth2Transport")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish()
    }
}

fn classify(e: &smtp::Error, server: &str, mailbox: &str) -> Outcome {
    let code = e.status().map(u16::from);
    let text = e.to_string();
    // Exchange refuses a token with 535 at once; Dovecot (the Gmail-style flow) first
    // sends a 334 with a JSON error, which lettre reports as an unexpected challenge.
    let refused = matches!(code, Some(530 | 534 | 535))
        || text.contains("does not expect a challenge")
        || text.contains("Unexpected number of challenges");
    if refused {
        let why = if text.contains("5.7.139") || text.contains("SmtpClientAuthentication") {
            format!(
                "SMTP AUTH is disabled for {mailbox} or the tenant ({text}). Enable it (Set-CASMailbox {mailbox} -SmtpClientAuthenticationDisabled $false) or switch the mode to graph"
            )
        } else {
            format!(
                "{server} refused the app's token for {mailbox} ({text}). Check that the app has the SMTP.SendAsApp permission with admin consent, and that its service principal is registered in Exchange Online (New-ServicePrincipal) with access to the mailbox (Add-MailboxPermission -AccessRights FullAccess)"
            )
        };
        return Outcome::TokenRejected { reason: why, code };
    }
    if e.is_client() && text.contains("STARTTLS") {
        return Outcome::Configuration {
            reason: format!(
                "{server} does not offer STARTTLS, and a token is never sent over an unencrypted connection ({text})"
            ),
            code,
        };
    }
    if e.is_client() && text.contains("authentication mechanism") {
        return Outcome::Configuration {
            reason: format!("{server} does not offer XOAUTH2 login ({text})"),
            code,
        };
    }
    // Syntax errors and unknown commands come from the protocol, not from this message.
    if matches!(code, Some(500 | 502 | 504)) {
        return Outcome::Configuration {
            reason: format!("{server} did not understand the session ({text})"),
            code,
        };
    }
    if matches!(code, Some(421 | 432)) || text.contains("4.3.2") {
        return Outcome::Throttled {
            reason: format!("{server} throttled {mailbox}: {text}"),
            code,
            retry_after: None,
        };
    }
    relay::classify(e, server)
}
