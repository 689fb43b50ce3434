//! Entra ID access tokens for the tenant's app (client-credentials grant), kept in memory
//! and refreshed in the background well before they expire, so that a send waits on the
//! token endpoint only for the very first token. One request at a time per token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{AuthType, ClientId, ClientSecret, RequestTokenError, Scope, TokenResponse, TokenUrl};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::retry;
use crate::settings::{OAuth, Password};

pub const SMTP_SCOPE: &str = "https://outlook.office365.com/.default";
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

/// Longest wait between two tries while the token endpoint fails.
const REFRESH_RETRY_CAP: Duration = Duration::from_secs(60);

/// Which token: one per (authority, tenant, client, scope).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub authority: String,
    pub tenant: String,
    pub client_id: String,
    pub scope: &'static str,
}

impl TokenKey {
    pub fn new(oauth: &OAuth, scope: &'static str) -> TokenKey {
        TokenKey {
            authority: oauth.authority.clone(),
            tenant: oauth.tenant.clone(),
            client_id: oauth.client_id.clone(),
            scope,
        }
    }

    fn url(&self) -> String {
        format!("{}/{}/oauth2/v2.0/token", self.authority, self.tenant)
    }
}

/// A bearer token. Prints nothing of itself.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    secret: Arc<str>,
    pub expires_at: Instant,
    /// Its whole lifetime, as the endpoint gave it.
    pub lifetime: Duration,
}

impl AccessToken {
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Still good for a send that starts now.
    fn usable(&self) -> bool {
        let safety = (self.lifetime / 4).min(Duration::from_secs(60));
        self.expires_at > Instant::now() + safety
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The endpoint is down, slow or throttling: try again later.
    #[error("{0}")]
    Transient(String),
    /// The app registration or the settings are wrong; the words say what to fix.
    #[error("{0}")]
    Configuration(String),
}

struct Entry {
    secret: Password,
    current: Mutex<Option<AccessToken>>,
    /// Held while a request is out: however many sends wait, one request goes.
    fetching: tokio::sync::Mutex<()>,
}

impl Entry {
    fn usable(&self) -> Option<AccessToken> {
        self.current
            .lock()
            .unwrap()
            .clone()
            .filter(AccessToken::usable)
    }
}

/// A token's entry and its background refresh, once started.
type Cached = (Arc<Entry>, Option<AbortHandle>);

pub struct TokenManager {
    http: reqwest::Client,
    /// Refresh this long before a token expires (plus up to a minute of jitter).
    margin: Duration,
    entries: Mutex<HashMap<TokenKey, Cached>>,
    /// Token requests sent, for logs and benchmarks.
    requests: AtomicU64,
}

impl TokenManager {
    pub fn new(http: reqwest::Client, margin: Duration) -> Arc<TokenManager> {
        Arc::new(TokenManager {
            http,
            margin,
            entries: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
        })
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A usable token for `key`: the cached one, or a fresh one if there is none yet.
    pub async fn token(
        self: &Arc<Self>,
        key: &TokenKey,
        secret: &Password,
    ) -> Result<AccessToken, TokenError> {
        let entry = self.entry(key, secret);
        if let Some(token) = entry.usable() {
            return Ok(token);
        }
        let _one_at_a_time = entry.fetching.lock().await;
        if let Some(token) = entry.usable() {
            return Ok(token);
        }
        let token = self.fetch(key, secret).await?;
        *entry.current.lock().unwrap() = Some(token.clone());
        self.keep_fresh(key, &entry);
        Ok(token)
    }

    /// The server refused `token`: forget it so the next send fetches another.
    pub fn invalidate(&self, key: &TokenKey, token: &AccessToken) {
        if let Some((entry, _)) = self.entries.lock().unwrap().get(key) {
            let mut current = entry.current.lock().unwrap();
            if current.as_ref() == Some(token) {
                *current = None;
            }
        }
    }

    /// Drops every cached token, e.g. after the secret or tenant changed.
    pub fn clear(&self) {
        for (_, (_, refresher)) in self.entries.lock().unwrap().drain() {
            if let Some(r) = refresher {
                r.abort();
            }
        }
    }

    /// The entry for `key`; a different secret than the cached token's starts afresh.
    fn entry(&self, key: &TokenKey, secret: &Password) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap();
        if let Some((entry, _)) = entries.get(key) {
            if entry.secret == *secret {
                return entry.clone();
            }
        }
        let entry = Arc::new(Entry {
            secret: secret.clone(),
            current: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        });
        if let Some((_, Some(old))) = entries.insert(key.clone(), (entry.clone(), None)) {
            old.abort();
        }
        entry
    }

    /// Starts the background refresh of `key`, once.
    fn keep_fresh(self: &Arc<Self>, key: &TokenKey, entry: &Arc<Entry>) {
        let mut entries = self.entries.lock().unwrap();
        let Some((current, refresher)) = entries.get_mut(key) else {
            return;
        };
        if refresher.is_some() || !Arc::ptr_eq(current, entry) {
            return;
        }
        let task = tokio::spawn(self.clone().refresh_loop(key.clone(), entry.clone()));
        *refresher = Some(task.abort_handle());
    }

    async fn refresh_loop(self: Arc<Self>, key: TokenKey, entry: Arc<Entry>) {
        loop {
            let due = match entry.current.lock().unwrap().as_ref() {
                Some(t) => t
                    .expires_at
                    .checked_sub(self.lead(t.lifetime))
                    .unwrap_or_else(Instant::now),
                None => Instant::now(),
            };
            tokio::time::sleep_until(due).await;
            let mut backoff =
                backon::BackoffBuilder::build(retry::reconnect_backoff(REFRESH_RETRY_CAP));
            loop {
                let result = {
                    let _one_at_a_time = entry.fetching.lock().await;
                    self.fetch(&key, &entry.secret).await
                };
                match result {
                    Ok(token) => {
                        tracing::debug!(
                            scope = key.scope,
                            lifetime_secs = token.lifetime.as_secs(),
                            "token refreshed"
                        );
                        *entry.current.lock().unwrap() = Some(token);
                        break;
                    }
                    Err(e) => {
                        let delay = backoff.next().unwrap_or(REFRESH_RETRY_CAP);
                        tracing::warn!(scope = key.scope, error = %e, retry_in_secs = delay.as_secs(),
                            "cannot refresh the token; the current one is used while it lasts");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }

    /// How long before expiry to refresh: the margin plus jitter, but never in the
    /// first half of a token's life (short-lived tokens in tests, odd endpoints).
    fn lead(&self, lifetime: Duration) -> Duration {
        let jitter = Duration::from_secs(60)
            .mul_f64(fastrand::f64())
            .min(lifetime / 8);
        (self.margin + jitter).min(lifetime / 2)
    }

    async fn fetch(&self, key: &TokenKey, secret: &Password) -> Result<AccessToken, TokenError> {
        let url = TokenUrl::new(key.url()).map_err(|e| {
            TokenError::Configuration(format!(
                "the token endpoint {} is not a valid URL: {e}",
                key.url()
            ))
        })?;
        let client = BasicClient::new(ClientId::new(key.client_id.clone()))
            .set_client_secret(ClientSecret::new(secret.0.clone()))
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(url);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let response = client
            .exchange_client_credentials()
            .add_scope(Scope::new(key.scope.to_string()))
            .request_async(&self.http)
            .await
            .map_err(|e| classify(&e, key))?;
        let lifetime = response.expires_in().unwrap_or(Duration::from_secs(3599));
        let secret: Arc<str> = response.access_token().secret().as_str().into();
        if let Some(why) = missing_permission(&secret, key.scope) {
            return Err(TokenError::Configuration(why));
        }
        tracing::info!(
            scope = key.scope,
            lifetime_secs = lifetime.as_secs(),
            "token obtained"
        );
        Ok(AccessToken {
            secret,
            expires_at: started + lifetime,
            lifetime,
        })
    }
}

type TokenRequestError =
    RequestTokenError<oauth2::HttpClientError<reqwest::Error>, oauth2::basic::BasicErrorResponse>;

fn classify(e: &TokenRequestError, key: &TokenKey) -> TokenError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let description = r.error_description().map(String::as_str).unwrap_or("");
            let first_line = description.lines().next().unwrap_or("");
            let code = aadsts(description);
            let known = code.and_then(advice);
            let config_error = matches!(
                r.error(),
                BasicErrorResponseType::InvalidClient
                    | BasicErrorResponseType::InvalidGrant
                    | BasicErrorResponseType::InvalidRequest
                    | BasicErrorResponseType::InvalidScope
                    | BasicErrorResponseType::UnauthorizedClient
                    | BasicErrorResponseType::UnsupportedGrantType
            );
            match known {
                Some(advice) => TokenError::Configuration(format!(
                    "Entra ID refused the app's token request (AADSTS{}): {advice}",
                    code.unwrap_or_default()
                )),
                None if config_error => TokenError::Configuration(format!(
                    "Entra ID refused the app's token request ({}): {first_line}",
                    r.error()
                )),
                None => TokenError::Transient(format!(
                    "the token endpoint {} answered {}: {first_line}",
                    key.authority,
                    r.error()
                )),
            }
        }
        RequestTokenError::Request(e) => TokenError::Transient(format!(
            "cannot reach the token endpoint {}: {e}",
            key.authority
        )),
        RequestTokenError::Parse(_, body) => TokenError::Transient(format!(
            "the token endpoint {} gave an unreadable answer ({} bytes)",
            key.authority,
            body.len()
        )),
        RequestTokenError::Other(e) => {
            TokenError::Transient(format!("the token endpoint {} failed: {e}", key.authority))
        }
    }
}

/// The number in "AADSTS7000215: Invalid client secret provided…".
fn aadsts(description: &str) -> Option<u32> {
    let rest = &description[description.find("AADSTS")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What an admin should do about an Entra ID error, in the TEOS admin's words.
fn advice(code: u32) -> Option<&'static str> {
    Some(match code {
        7000215 => {
            "the client secret is wrong. Paste the secret's Value (not its Secret ID) from Entra ID > App registrations > the app > Certificates & secrets"
        }
        7000222 => {
            "the client secret has expired. Create a new client secret under Certificates & secrets and paste its Value into the TEOS mail settings"
        }
        700016 => {
            "there is no application with this client ID in the tenant. Check the Application (client) ID and the Directory (tenant) ID"
        }
        90002 => "the tenant does not exist. Check the Directory (tenant) ID",
        900023 | 90013 => {
            "the tenant ID is not valid. Copy the Directory (tenant) ID from the app's overview page"
        }
        65001 => {
            "an administrator has not granted consent. Grant admin consent for the app's API permissions (Mail.Send for Graph, SMTP.SendAsApp for SMTP)"
        }
        7000112 => {
            "the application is disabled. Enable it in Entra ID > Enterprise applications, or use another app"
        }
        1002012 | 70011 => "the requested scope is not valid for this app",
        _ => return None,
    })
}

/// An app token without application permissions (`roles`) is what Entra issues when
/// admin consent was never granted: every send would be refused, so say so now.
fn missing_permission(token: &str, scope: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let has_roles = claims["roles"].as_array().is_some_and(|r| !r.is_empty());
    let needed = if scope == GRAPH_SCOPE {
        "Mail.Send"
    } else {
        "SMTP.SendAsApp"
    };
    (!has_roles).then(|| {
        format!(
            "the app's token carries no application permission: add the {needed} application permission to the app and have an administrator grant admin consent"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aadsts_codes_become_advice() {
        assert_eq!(
            aadsts("AADSTS7000215: Invalid client secret provided."),
            Some(7000215)
        );
        assert_eq!(aadsts("nothing here"), None);
        assert!(advice(7000222).unwrap().contains("expired"));
    }

    #[test]
    fn tokens_print_nothing_secret() {
        let t = AccessToken {
            secret: "eyJ.secret.sig".into(),
            expires_at: Instant::now(),
            lifetime: Duration::from_secs(3599),
        };
        assert!(!format!("{t:?}").contains("secret.sig"));
    }

    #[test]
    fn refresh_lead_fits_the_lifetime() {
        let m = TokenManager::new(reqwest::Client::new(), Duration::from_secs(600));
        let lead = m.lead(Duration::from_secs(3599));
        assert!(lead >= Duration::from_secs(600) && lead <= Duration::from_secs(660));
        assert!(m.lead(Duration::from_secs(20)) <= Duration::from_secs(10));
    }

    #[test]
    fn a_token_without_roles_means_missing_consent() {
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let without = format!("{}.{}.sig", enc("{}"), enc(r#"{"aud":"x"}"#));
        let with = format!("{}.{}.sig", enc("{}"), enc(r#"{"roles":["Mail.Send"]}"#));
        assert!(
            missing_permission(&without, GRAPH_SCOPE)
                .unwrap()
                .contains("Mail.Send")
        );
        assert!(missing_permission(&with, GRAPH_SCOPE).is_none());
        assert!(missing_permission("opaque-token", SMTP_SCOPE).is_none());
    }
}
