//! The ways a rendered message leaves: an SMTP relay or a pickup folder. A transport
//! never sees a row; it gets bytes and an envelope and answers with an `Outcome`.

mod pickup;
mod relay;

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{DeliveryConfig, TransportKind};
use crate::render::Rendered;
use crate::settings::Settings;

pub use pickup::Pickup;
pub use relay::RelayTransport;

/// What one attempt to send came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server took responsibility for the message.
    Sent { code: Option<u16>, reply: String },
    /// Worth another try later: 4xx, a dropped connection, a timeout.
    Transient {
        reason: String,
        code: Option<u16>,
        retry_after: Option<Duration>,
    },
    /// This message will never go: 5xx for its recipients or content.
    Permanent { reason: String, code: Option<u16> },
    /// Nothing is wrong with the message; the settings are. The sender's queue waits,
    /// and no attempt is spent.
    Configuration { reason: String, code: Option<u16> },
}

impl Outcome {
    /// The word stored in the attempt history.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::Transient { .. } => "transient",
            Outcome::Permanent { .. } => "permanent",
            Outcome::Configuration { .. } => "configuration",
        }
    }

    pub fn code(&self) -> Option<u16> {
        match self {
            Outcome::Sent { code, .. }
            | Outcome::Transient { code, .. }
            | Outcome::Permanent { code, .. }
            | Outcome::Configuration { code, .. } => *code,
        }
    }
}

/// The transport the current settings call for.
#[derive(Debug, Clone)]
pub enum Transport {
    Relay(RelayTransport),
    Pickup(Pickup),
    /// The settings do not allow sending; the reason says what to fix.
    Unconfigured(String),
}

impl Transport {
    /// Built once per settings version and shared by every send until the next change.
    pub fn build(settings: &Settings, cfg: &DeliveryConfig) -> Transport {
        match cfg.transport {
            TransportKind::Pickup => Transport::Pickup(Pickup::new(PathBuf::from(&cfg.pickup_dir))),
            TransportKind::Database => match &settings.relay {
                Ok(relay) => RelayTransport::new(relay, cfg)
                    .map(Transport::Relay)
                    .unwrap_or_else(Transport::Unconfigured),
                Err(why) => Transport::Unconfigured(why.clone()),
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Transport::Relay(_) => "relay",
            Transport::Pickup(_) => "pickup",
            Transport::Unconfigured(_) => "none",
        }
    }

    pub async fn send(&self, message: &Rendered) -> Outcome {
        match self {
            Transport::Relay(relay) => relay.send(message).await,
            Transport::Pickup(pickup) => pickup.send(message).await,
            Transport::Unconfigured(why) => Outcome::Configuration {
                reason: why.clone(),
                code: None,
            },
        }
    }
}
