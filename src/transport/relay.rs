//! A plain SMTP relay from the mail settings: pooled sessions, optional AUTH
//! PLAIN/LOGIN, and a reading of every failure as transient, permanent or configuration.

use std::sync::Arc;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::TlsParameters;
use lettre::transport::smtp::{self};

use super::Outcome;
use super::session::{Security as SessionSecurity, SessionError, SessionPool};
use crate::config::DeliveryConfig;
use crate::render::Rendered;
use crate::settings::{Relay, Security};

#[derive(Clone)]
pub struct RelayTransport {
    smtp: Arc<SessionPool>,
    /// host:port, for logs and errors.
    server: String,
}

impl std::fmt::Debug for RelayTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayTransport")
            .field("server", &self.server)
            .finish()
    }
}

impl RelayTransport {
    pub fn new(relay: &Relay, cfg: &DeliveryConfig, tls: TlsParameters) -> RelayTransport {
        let security = match relay.security {
            Security::None => SessionSecurity::Plain,
            Security::StartTls => SessionSecurity::StartTls(tls),
            Security::Tls => SessionSecurity::Implicit(tls),
        };
        let login = relay.login.as_ref().map(|(user, password)| {
            let credentials = Credentials::new(user.clone(), password.0.clone());
            (vec![Mechanism::Plain, Mechanism::Login], credentials)
        });
        RelayTransport {
            smtp: Arc::new(SessionPool::new(
                &relay.host,
                relay.port,
                security,
                cfg.send_timeout(),
                login,
                cfg.concurrency,
            )),
            server: format!("{}:{}", relay.host, relay.port),
        }
    }

    pub async fn send(&self, message: &Rendered) -> Outcome {
        match self.smtp.send(&message.envelope, &message.bytes).await {
            Ok(response) => sent(&response),
            Err(e) => classify_session(e, &self.server, classify),
        }
    }
}

pub(crate) fn sent(response: &lettre::transport::smtp::response::Response) -> Outcome {
    Outcome::Sent {
        code: Some(u16::from(response.code())),
        reply: response.message().collect::<Vec<_>>().join(" "),
    }
}

/// Connection failures and timeouts are transient; what the server said is read by
/// `classify`, which knows the transport.
pub(crate) fn classify_session(
    e: SessionError,
    server: &str,
    classify: impl Fn(&smtp::Error, &str) -> Outcome,
) -> Outcome {
    match e {
        SessionError::Smtp(e) => classify(&e, server),
        SessionError::Connect(e) => Outcome::Transient {
            reason: format!("cannot connect to {server}: {e}"),
            code: None,
            retry_after: None,
        },
        SessionError::Timeout => Outcome::Transient {
            reason: format!("{server} did not answer in time"),
            code: None,
            retry_after: None,
        },
    }
}

/// Reply codes that mean the login itself was refused: the settings are wrong, not
/// the message.
const AUTH_CODES: [u16; 4] = [530, 534, 535, 538];

pub(crate) fn classify(e: &smtp::Error, server: &str) -> Outcome {
    let code = e.status().map(u16::from);
    let text = e.to_string();
    match code {
        Some(c) if AUTH_CODES.contains(&c) => Outcome::Configuration {
            reason: format!("{server} refused the login: {text}"),
            code,
        },
        Some(_) if e.is_permanent() => Outcome::Permanent {
            reason: format!("{server} rejected the message: {text}"),
            code,
        },
        Some(_) => Outcome::Transient {
            reason: format!("{server} deferred the message: {text}"),
            code,
            retry_after: None,
        },
        None if e.is_tls() => Outcome::Configuration {
            reason: format!("TLS with {server} failed: {text}"),
            code,
        },
        None if e.is_client() => Outcome::Configuration {
            reason: format!("{server} cannot be used as configured: {text}"),
            code,
        },
        None if e.is_timeout() => Outcome::Transient {
            reason: format!("{server} did not answer in time: {text}"),
            code,
            retry_after: None,
        },
        None => Outcome::Transient {
            reason: format!("connection to {server} failed: {text}"),
            code,
            retry_after: None,
        },
    }
}
