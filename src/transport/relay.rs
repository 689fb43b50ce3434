//! A plain SMTP relay from the mail settings: pooled connections, optional AUTH
//! PLAIN/LOGIN, and a reading of every failure as transient, permanent or configuration.

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::{self, PoolConfig};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::Outcome;
use crate::config::DeliveryConfig;
use crate::render::Rendered;
use crate::settings::{Relay, Security};

#[derive(Clone)]
pub struct RelayTransport {
    smtp: AsyncSmtpTransport<Tokio1Executor>,
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
    pub fn new(
        relay: &Relay,
        cfg: &DeliveryConfig,
        tls: TlsParameters,
    ) -> Result<RelayTransport, String> {
        let tls = match relay.security {
            Security::None => Tls::None,
            Security::StartTls => Tls::Required(tls),
            Security::Tls => Tls::Wrapper(tls),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&relay.host)
            .port(relay.port)
            .tls(tls)
            .timeout(Some(cfg.send_timeout()))
            .pool_config(PoolConfig::new().max_size(cfg.concurrency));
        if let Some((user, password)) = &relay.login {
            builder = builder
                .credentials(Credentials::new(user.clone(), password.0.clone()))
                .authentication(vec![Mechanism::Plain, Mechanism::Login]);
        }
        Ok(RelayTransport {
            smtp: builder.build(),
            server: format!("{}:{}", relay.host, relay.port),
        })
    }

    pub async fn send(&self, message: &Rendered) -> Outcome {
        match self.smtp.send_raw(&message.envelope, &message.bytes).await {
            Ok(response) => Outcome::Sent {
                code: Some(u16::from(response.code())),
                reply: response.message().collect::<Vec<_>>().join(" "),
            },
            Err(e) => classify(&e, &self.server),
        }
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
