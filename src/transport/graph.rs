//! Microsoft Graph sendMail with the app's token: the MIME message rendered for SMTP,
//! base64-encoded, posted as the sender mailbox. At most a few requests per mailbox at
//! once; 429/503/504 back the mailbox off for as long as Retry-After says.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;

use super::mailbox::MailboxLimits;
use super::{Outcome, Stop, sender};
use crate::render::Rendered;
use crate::token::AccessToken;

/// Graph refuses requests over about 4 MB; the base64 body must fit under it. Larger
/// messages fail with a clear reason (the upload-session path is not implemented).
pub const GRAPH_MAX_BODY: usize = 4 * 1024 * 1024 - 64 * 1024;

pub struct GraphTransport {
    http: reqwest::Client,
    base: String,
    requests: u32,
    per_minute: u32,
    mailboxes: Mutex<HashMap<String, Arc<MailboxLimits>>>,
}

impl GraphTransport {
    pub fn new(
        http: reqwest::Client,
        base: &str,
        requests: u32,
        per_minute: u32,
    ) -> GraphTransport {
        GraphTransport {
            http,
            base: base.to_string(),
            requests,
            per_minute,
            mailboxes: Mutex::new(HashMap::new()),
        }
    }

    fn limits(&self, mailbox: &str) -> Arc<MailboxLimits> {
        self.mailboxes
            .lock()
            .unwrap()
            .entry(mailbox.to_ascii_lowercase())
            .or_insert_with(|| Arc::new(MailboxLimits::new(self.requests, self.per_minute)))
            .clone()
    }

    pub async fn send(&self, message: &Rendered, token: &AccessToken, stop: &Stop) -> Outcome {
        let mailbox = match sender(message) {
            Ok(address) => address,
            Err(outcome) => return outcome,
        };
        let body = base64::engine::general_purpose::STANDARD.encode(&message.bytes);
        if body.len() > GRAPH_MAX_BODY {
            return Outcome::Permanent {
                reason: format!(
                    "the message is {} bytes, {} in base64, over Microsoft Graph's 4 MB request limit; send it through SMTP or make the attachments smaller",
                    message.bytes.len(),
                    body.len()
                ),
                code: Some(413),
            };
        }
        let limits = self.limits(&mailbox);
        let Some(_slot) = limits.enter(stop).await else {
            return Outcome::Stopped;
        };
        let url = format!("{}/v1.0/users/{}/sendMail", self.base, mailbox);
        let sent = self
            .http
            .post(&url)
            .bearer_auth(token.secret())
            .header(reqwest::header::CONTENT_TYPE, "text/plain")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Transient {
                    reason: format!("cannot reach Microsoft Graph at {}: {e}", self.base),
                    code: None,
                    retry_after: None,
                };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let request_id = response
            .headers()
            .get("request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = response.text().await.unwrap_or_default();
        let outcome = classify(status, &text, retry_after, &mailbox, &request_id);
        limits.observe(&outcome, &mailbox);
        outcome
    }
}

impl std::fmt::Debug for GraphTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphTransport")
            .field("base", &self.base)
            .finish()
    }
}

/// Graph's answer to sendMail → what happens to the message.
fn classify(
    status: u16,
    body: &str,
    retry_after: Option<Duration>,
    mailbox: &str,
    request_id: &str,
) -> Outcome {
    let error: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let code_text = error["error"]["code"].as_str().unwrap_or("");
    let message = error["error"]["message"].as_str().unwrap_or(body.trim());
    let said = if request_id.is_empty() {
        format!("{status} {code_text}: {message}")
    } else {
        format!("{status} {code_text}: {message} (request-id {request_id})")
    };
    let code = Some(status);
    match status {
        200..=299 => Outcome::Sent {
            code,
            reply: format!("{status} accepted by Microsoft Graph"),
        },
        429 | 503 | 504 => Outcome::Throttled {
            reason: format!("Microsoft Graph asked {mailbox} to slow down: {said}"),
            code,
            retry_after,
        },
        401 => Outcome::TokenRejected {
            reason: if message.contains("roles") || message.contains("scp") {
                format!(
                    "Microsoft Graph refused the app's token: it has no Mail.Send application permission; grant admin consent for Mail.Send ({said})"
                )
            } else {
                format!(
                    "Microsoft Graph refused the app's token ({said}). Check the Mail.Send application permission and admin consent"
                )
            },
            code,
        },
        403 | 404 if code_text == "ErrorAccessDenied" => Outcome::Configuration {
            reason: format!(
                "the app may not send as {mailbox} ({said}). Grant the Mail.Send application permission with admin consent, and check any Exchange application access policy that limits the app to some mailboxes"
            ),
            code,
        },
        403 | 404 if code_text == "ErrorSendAsDenied" => Outcome::Configuration {
            reason: format!(
                "the app may not send as {mailbox} ({said}); give it Send As on the mailbox"
            ),
            code,
        },
        403 | 404
            if code_text == "MailboxNotEnabledForRESTAPI"
                || code_text == "ErrorInvalidUser"
                || code_text == "ResourceNotFound" =>
        {
            Outcome::Configuration {
                reason: format!(
                    "{mailbox} is not an Exchange Online mailbox that Graph can send from ({said}); check the sender address in the mail settings"
                ),
                code,
            }
        }
        403 => Outcome::Configuration {
            reason: format!("Microsoft Graph refused to send as {mailbox} ({said})"),
            code,
        },
        413 => Outcome::Permanent {
            reason: format!("the message is too large for Microsoft Graph ({said})"),
            code,
        },
        400..=499 => Outcome::Permanent {
            reason: format!("Microsoft Graph rejected the message ({said})"),
            code,
        },
        _ => Outcome::Transient {
            reason: format!("Microsoft Graph failed ({said})"),
            code,
            retry_after,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_answers_are_classified() {
        let access = r#"{"error":{"code":"ErrorAccessDenied","message":"Access is denied."}}"#;
        assert!(matches!(
            classify(202, "", None, "a@b.c", ""),
            Outcome::Sent { .. }
        ));
        assert!(matches!(
            classify(429, "{}", Some(Duration::from_secs(7)), "a@b.c", ""),
            Outcome::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(matches!(
            classify(403, access, None, "a@b.c", ""),
            Outcome::Configuration { .. }
        ));
        assert!(matches!(
            classify(401, "{}", None, "a@b.c", ""),
            Outcome::TokenRejected { .. }
        ));
        assert!(matches!(
            classify(400, "{}", None, "a@b.c", ""),
            Outcome::Permanent { .. }
        ));
        assert!(matches!(
            classify(500, "{}", None, "a@b.c", ""),
            Outcome::Transient { .. }
        ));
    }
}
