//! The admin's "test e-mail": walks the path a message takes with the settings as they
//! are stored now (settings, token, connection, send) and says at each step what is
//! wrong, in words a person can act on.

use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use tokio::time::Instant;

use crate::render;
use crate::settings::{SenderKind, Settings};
use crate::store::{ClaimedRow, SettingsRow};
use crate::token::{TokenError, TokenManager};
use crate::transport::{Context, Outcome, Transport};
use crate::worker::Delivery;

/// One step of the check and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub steps: Vec<Step>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.steps.iter().all(|s| s.ok)
    }

    fn pass(&mut self, name: &'static str, detail: String) {
        self.steps.push(Step {
            name,
            ok: true,
            detail,
        });
    }

    fn fail(mut self, name: &'static str, detail: String) -> Report {
        self.steps.push(Step {
            name,
            ok: false,
            detail,
        });
        self
    }
}

/// Sends one test message to `to` from the `kind` mailbox.
pub async fn test_email(row: SettingsRow, ctx: &Context, to: &str, kind: SenderKind) -> Report {
    let mut report = Report::default();
    let settings = Arc::new(Settings::from_row(row));
    let delivery = Delivery::new(settings.clone(), ctx);
    let from: Mailbox = match settings.sender(kind) {
        Ok(from) => from.clone(),
        Err(why) => return report.fail("settings", why.clone()),
    };
    let path = match &delivery.transport {
        Transport::Unconfigured(why) => return report.fail("settings", why.clone()),
        Transport::Relay(_) => "the SMTP relay".to_string(),
        Transport::Xoauth2(_) => "Microsoft 365 over SMTP (XOAUTH2)".to_string(),
        Transport::Graph(_) => "Microsoft Graph sendMail".to_string(),
        Transport::Pickup(_) => "the pickup folder".to_string(),
    };
    report.pass("settings", format!("sending as {from} through {path}"));

    let tokens = TokenManager::new(
        ctx.http.clone(),
        Duration::from_secs(ctx.microsoft365.token_refresh_margin_secs),
    );
    if let (Some(key), Ok(Some(oauth))) = (delivery.transport.token_key(&settings), &settings.oauth)
    {
        let started = Instant::now();
        match tokens.token(&key, &oauth.secret).await {
            Ok(token) => report.pass(
                "token",
                format!(
                    "Entra ID issued a token in {} ms, valid for {} min",
                    started.elapsed().as_millis(),
                    token.lifetime.as_secs() / 60
                ),
            ),
            Err(TokenError::Configuration(why)) => return report.fail("token", why),
            Err(TokenError::Transient(why)) => {
                return report.fail(
                    "token",
                    format!("{why}. Check the network path to {}", oauth.authority),
                );
            }
        }
    }

    let message = ClaimedRow {
        id: 0,
        module: "diagnose".into(),
        sender: Some(kind.as_str().into()),
        to_addrs: serde_json::json!([to]).to_string(),
        cc_addrs: None,
        bcc_addrs: None,
        reply_to: None,
        subject: "TEOS mail test".into(),
        body_text: Some(format!(
            "This is a test message from teos-mailer, sent as {from} through {path}.\r\nIf you can read it, TEOS can send e-mail."
        )),
        body_html: None,
        headers: None,
        priority: 0,
        attempts: 1,
        max_attempts: None,
        message_id: format!("<test-{:016x}@{}>", fastrand::u64(..), from.email.domain()),
        attachment_count: 0,
    };
    let rendered = match render::render(&message, &[], &from, ctx.delivery.max_message_bytes) {
        Ok(r) => r,
        Err(e) => return report.fail("message", format!("the test message cannot be built: {e}")),
    };
    let started = Instant::now();
    // The check runs to its end: nothing ever asks it to stop.
    let (_never, stop) = tokio::sync::watch::channel(false);
    match delivery.send(&tokens, &rendered, &stop).await {
        Outcome::Sent { code, reply } => {
            let code = code.map_or(String::new(), |c| format!("{c} "));
            report.pass(
                "send",
                format!(
                    "accepted in {} ms: {code}{reply}",
                    started.elapsed().as_millis()
                ),
            );
            report
        }
        Outcome::Transient { reason, .. } => report.fail(
            "send",
            format!("{reason}. This may pass on its own; try again in a few minutes"),
        ),
        Outcome::Throttled { reason, .. } => {
            report.fail("send", format!("{reason}. Try again in a few minutes"))
        }
        Outcome::Permanent { reason, .. }
        | Outcome::Configuration { reason, .. }
        | Outcome::TokenRejected { reason, .. } => report.fail("send", reason),
        Outcome::Stopped => report.fail("send", "stopped before sending".into()),
    }
}
