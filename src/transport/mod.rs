//! The ways a rendered message leaves: an SMTP relay, Exchange Online over SMTP XOAUTH2,
//! Microsoft Graph sendMail, or a pickup folder. A transport never sees a row; it gets
//! bytes, an envelope and (for Microsoft 365) a token, and answers with an `Outcome`.

mod graph;
mod mailbox;
mod pickup;
mod relay;
mod session;
mod xoauth2;

use std::path::PathBuf;
use std::time::Duration;

use lettre::transport::smtp::client::{Certificate, TlsParameters};

use crate::config::{DeliveryConfig, Microsoft365Config, TransportKind};
use crate::render::Rendered;
use crate::settings::{OAuth, OAuthMode, Settings};
use crate::token::{AccessToken, GRAPH_SCOPE, SMTP_SCOPE, TokenKey};

pub use graph::{GRAPH_MAX_BODY, GraphTransport};
pub use pickup::Pickup;
pub use relay::RelayTransport;
pub use xoauth2::Xoauth2Transport;

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
    /// The server refused the token. The worker fetches a new one and tries once more
    /// before calling it a configuration failure.
    TokenRejected { reason: String, code: Option<u16> },
    /// The service is throttling the mailbox: the whole mailbox backs off, and the
    /// message keeps its attempt.
    Throttled {
        reason: String,
        code: Option<u16>,
        retry_after: Option<Duration>,
    },
    /// The daemon began to stop while the message waited for its turn; nothing was sent.
    Stopped,
}

/// Tells a send still waiting for its turn that the daemon is stopping (`true`).
pub type Stop = tokio::sync::watch::Receiver<bool>;

/// Resolves once `stop` says the daemon stops; never, if nobody can say so any more.
pub(crate) async fn stopping(mut stop: Stop) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Outcome {
    /// The word stored in the attempt history.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::Transient { .. } => "transient",
            Outcome::Permanent { .. } => "permanent",
            Outcome::Configuration { .. } | Outcome::TokenRejected { .. } => "configuration",
            Outcome::Throttled { .. } => "throttled",
            Outcome::Stopped => "stopped",
        }
    }

    pub fn code(&self) -> Option<u16> {
        match self {
            Outcome::Sent { code, .. }
            | Outcome::Transient { code, .. }
            | Outcome::Permanent { code, .. }
            | Outcome::Configuration { code, .. }
            | Outcome::TokenRejected { code, .. }
            | Outcome::Throttled { code, .. } => *code,
            Outcome::Stopped => None,
        }
    }
}

/// What every transport build needs besides the settings.
#[derive(Clone)]
pub struct Context {
    pub delivery: DeliveryConfig,
    pub microsoft365: Microsoft365Config,
    /// Shared by Graph and the token manager: one connection pool for HTTPS.
    pub http: reqwest::Client,
    /// PEM of extra CA certificates (delivery.extra_ca_file), read once at start.
    pub extra_ca: Option<Vec<u8>>,
}

impl Context {
    /// Reads the extra CA file and builds the HTTP client: redirects off (a token
    /// endpoint that redirects is misconfigured, and a token must not follow one).
    pub fn new(
        delivery: &DeliveryConfig,
        microsoft365: &Microsoft365Config,
    ) -> Result<Context, String> {
        let extra_ca = if delivery.extra_ca_file.as_os_str().is_empty() {
            None
        } else {
            Some(std::fs::read(&delivery.extra_ca_file).map_err(|e| {
                format!(
                    "cannot read delivery.extra_ca_file {}: {e}",
                    delivery.extra_ca_file.display()
                )
            })?)
        };
        let mut http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(microsoft365.http_timeout_secs))
            .user_agent(concat!("teos-mailer/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &extra_ca {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("delivery.extra_ca_file is not PEM certificates: {e}"))?
            {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http
            .build()
            .map_err(|e| format!("the HTTP client cannot be built: {e}"))?;
        Ok(Context {
            delivery: delivery.clone(),
            microsoft365: microsoft365.clone(),
            http,
            extra_ca,
        })
    }
}

/// The transport the current settings call for.
#[derive(Debug)]
pub enum Transport {
    Relay(RelayTransport),
    Xoauth2(Xoauth2Transport),
    Graph(GraphTransport),
    Pickup(Pickup),
    /// The settings do not allow sending; the reason says what to fix.
    Unconfigured(String),
}

impl Transport {
    /// Built once per settings version and shared by every send until the next change.
    /// OAuth on wins over the relay: the relay is no silent second chance.
    pub fn build(settings: &Settings, ctx: &Context) -> Transport {
        let cfg = &ctx.delivery;
        if cfg.transport == TransportKind::Pickup {
            return Transport::Pickup(Pickup::new(PathBuf::from(&cfg.pickup_dir)));
        }
        let built = match (&settings.oauth, &settings.relay) {
            (Err(why), _) => Err(why.clone()),
            (Ok(Some(oauth)), _) => microsoft365(oauth, ctx),
            (Ok(None), Ok(relay)) => tls_parameters(&relay.host, ctx)
                .map(|tls| Transport::Relay(RelayTransport::new(relay, cfg, tls))),
            (Ok(None), Err(why)) => Err(why.clone()),
        };
        built.unwrap_or_else(Transport::Unconfigured)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Transport::Relay(_) => "relay",
            Transport::Xoauth2(_) => "smtp-xoauth2",
            Transport::Graph(_) => "graph",
            Transport::Pickup(_) => "pickup",
            Transport::Unconfigured(_) => "none",
        }
    }

    /// The token this transport needs, if any.
    pub fn token_key(&self, settings: &Settings) -> Option<TokenKey> {
        let scope = match self {
            Transport::Xoauth2(_) => SMTP_SCOPE,
            Transport::Graph(_) => GRAPH_SCOPE,
            _ => return None,
        };
        let oauth = settings.oauth.as_ref().ok()?.as_ref()?;
        Some(TokenKey::new(oauth, scope))
    }

    pub async fn send(
        &self,
        message: &Rendered,
        token: Option<&AccessToken>,
        stop: &Stop,
    ) -> Outcome {
        match (self, token) {
            (Transport::Relay(relay), _) => relay.send(message).await,
            (Transport::Pickup(pickup), _) => pickup.send(message).await,
            (Transport::Xoauth2(smtp), Some(token)) => smtp.send(message, token, stop).await,
            (Transport::Graph(graph), Some(token)) => graph.send(message, token, stop).await,
            (Transport::Xoauth2(_) | Transport::Graph(_), None) => Outcome::Configuration {
                reason: "no token for Microsoft 365".into(),
                code: None,
            },
            (Transport::Unconfigured(why), _) => Outcome::Configuration {
                reason: why.clone(),
                code: None,
            },
        }
    }
}

/// The envelope sender: the mailbox a Microsoft 365 transport logs in or posts as.
fn sender(message: &Rendered) -> Result<String, Outcome> {
    message
        .envelope
        .from()
        .map(ToString::to_string)
        .ok_or(Outcome::Permanent {
            reason: "the message has no sender".into(),
            code: None,
        })
}

fn microsoft365(oauth: &OAuth, ctx: &Context) -> Result<Transport, String> {
    let m = &ctx.microsoft365;
    Ok(match oauth.mode {
        OAuthMode::Graph => Transport::Graph(GraphTransport::new(
            ctx.http.clone(),
            &oauth.graph,
            m.graph_requests_per_mailbox,
            m.messages_per_minute,
        )),
        OAuthMode::Smtp => Transport::Xoauth2(Xoauth2Transport::new(
            &oauth.smtp_host,
            oauth.smtp_port,
            tls_parameters(&oauth.smtp_host, ctx)?,
            ctx.delivery.send_timeout(),
            m.smtp_sessions_per_mailbox,
            m.messages_per_minute,
        )),
    })
}

/// TLS for `host`, trusting the public web roots and any extra CA the operator gave.
fn tls_parameters(host: &str, ctx: &Context) -> Result<TlsParameters, String> {
    let mut builder = TlsParameters::builder(host.to_string());
    if let Some(pem) = &ctx.extra_ca {
        let ca = Certificate::from_pem(pem)
            .map_err(|e| format!("delivery.extra_ca_file cannot be used: {e}"))?;
        builder = builder.add_root_certificate(ca);
    }
    builder
        .build_rustls()
        .map_err(|e| format!("TLS for {host} cannot be set up: {e}"))
}
