//! Exchange Online over SMTP with SASL XOAUTH2: the app's token, the sender mailbox as
//! the user, STARTTLS required. Connections are pooled per mailbox and rebuilt when the
//! token changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::{self, PoolConfig};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::mailbox::MailboxLimits;
use super::{Outcome, relay};
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
    /// The pool and the token its connections logged in with.
    smtp: Mutex<Option<(AccessToken, AsyncSmtpTransport<Tokio1Executor>)>>,
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

    fn pool(
        &self,
        mailbox: &Mailbox,
        user: &str,
        token: &AccessToken,
    ) -> AsyncSmtpTransport<Tokio1Executor> {
        let mut smtp = mailbox.smtp.lock().unwrap();
        if let Some((t, pool)) = smtp.as_ref() {
            if t == token {
                return pool.clone();
            }
        }
        // Port 465 speaks TLS from the first byte; anything else must upgrade with
        // STARTTLS, or lettre refuses before a token is sent.
        let tls = if self.port == 465 {
            Tls::Wrapper(self.tls.clone())
        } else {
            Tls::Required(self.tls.clone())
        };
        let pool = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&self.host)
            .port(self.port)
            .tls(tls)
            .timeout(Some(self.timeout))
            .credentials(Credentials::new(
                user.to_string(),
                token.secret().to_string(),
            ))
            .authentication(vec![Mechanism::Xoauth2])
            .pool_config(PoolConfig::new().max_size(self.sessions))
            .build();
        *smtp = Some((token.clone(), pool.clone()));
        pool
    }

    pub async fn send(&self, message: &Rendered, token: &AccessToken) -> Outcome {
        let Some(from) = message.envelope.from() else {
            return Outcome::Permanent {
                reason: "the message has no sender".into(),
                code: None,
            };
        };
        let user = from.to_string();
        let mailbox = self.mailbox(&user);
        let _session = mailbox.limits.enter().await;
        let pool = self.pool(&mailbox, &user, token);
        match pool.send_raw(&message.envelope, &message.bytes).await {
            Ok(response) => {
                mailbox.limits.succeeded();
                Outcome::Sent {
                    code: Some(u16::from(response.code())),
                    reply: response.message().collect::<Vec<_>>().join(" "),
                }
            }
            Err(e) => {
                let outcome = classify(&e, &format!("{}:{}", self.host, self.port), &user);
                if let Outcome::Throttled { .. } = outcome {
                    let sessions = mailbox.limits.throttled();
                    tracing::warn!(mailbox = %user, sessions, "throttled; fewer sessions for this mailbox");
                }
                outcome
            }
        }
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
