//! The daemon's own configuration: `config/default.toml`, then a `--config` file, then
//! `TEOS_MAILER__SECTION__KEY` environment variables. Mail settings are not here: they
//! live in the database (see `settings`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The shipped defaults, compiled in so that the binary runs without any file.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub delivery: DeliveryConfig,
    pub microsoft365: Microsoft365Config,
    pub log: LogConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// May carry a password, hence unprintable.
    pub url: SecretString,
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// As the mail settings in the database say.
    Database,
    /// `.eml` files in a folder, for trying the daemon out.
    Pickup,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    pub transport: TransportKind,
    pub pickup_dir: PathBuf,
    pub concurrency: u32,
    pub poll_interval_ms: u64,
    pub lease_secs: u64,
    pub send_timeout_secs: u64,
    pub max_attempts: u32,
    pub retry_base_secs: u64,
    pub retry_cap_secs: u64,
    pub config_recheck_secs: u64,
    pub settings_poll_secs: u64,
    pub shutdown_grace_secs: u64,
    pub max_message_bytes: u64,
    pub message_id_domain: String,
    pub retention_days: u32,
    pub extra_ca_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Microsoft365Config {
    pub token_refresh_margin_secs: u64,
    pub smtp_sessions_per_mailbox: u32,
    pub graph_requests_per_mailbox: u32,
    pub messages_per_minute: u32,
    pub throttle_pause_secs: u64,
    pub http_timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// A configuration that cannot be used; the binary exits with status 78 (EX_CONFIG).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads the layers and checks the result.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError(format!(
                    "configuration file {} does not exist",
                    file.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(file)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let loaded = builder
            .add_source(
                config::Environment::with_prefix("TEOS_MAILER")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .and_then(|c| c.try_deserialize::<Config>())
            .map_err(|e| {
                let place = file.map_or("the defaults or TEOS_MAILER__* variables".into(), |f| {
                    format!("{} or TEOS_MAILER__* variables", f.display())
                });
                ConfigError(format!("invalid configuration in {place}: {e}"))
            })?;
        loaded.check()?;
        Ok(loaded)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let d = &self.delivery;
        let url = self.database.url.expose_secret();
        let problems = [
            (
                !["sqlite:", "postgres:", "postgresql:", "mysql:", "mariadb:"]
                    .iter()
                    .any(|p| url.starts_with(p)),
                "database.url must start with sqlite:, postgres: or mysql:",
            ),
            (
                self.database.max_connections < 2,
                "database.max_connections must be at least 2",
            ),
            (
                d.concurrency == 0,
                "delivery.concurrency must be at least 1",
            ),
            (
                d.lease_secs <= d.send_timeout_secs,
                "delivery.lease_secs must be longer than delivery.send_timeout_secs",
            ),
            (
                d.poll_interval_ms == 0,
                "delivery.poll_interval_ms must be above 0",
            ),
            (
                d.settings_poll_secs == 0,
                "delivery.settings_poll_secs must be above 0",
            ),
            (
                d.max_attempts == 0,
                "delivery.max_attempts must be at least 1",
            ),
            (
                d.retry_base_secs == 0 || d.retry_cap_secs < d.retry_base_secs,
                "delivery.retry_base_secs must be above 0 and at most retry_cap_secs",
            ),
            (
                self.microsoft365.smtp_sessions_per_mailbox == 0
                    || self.microsoft365.graph_requests_per_mailbox == 0,
                "microsoft365.smtp_sessions_per_mailbox and graph_requests_per_mailbox must be at least 1",
            ),
            (
                !d.extra_ca_file.as_os_str().is_empty() && !d.extra_ca_file.is_file(),
                "delivery.extra_ca_file names a file that does not exist",
            ),
        ];
        match problems.iter().find(|(bad, _)| *bad) {
            Some((_, why)) => Err(ConfigError((*why).to_string())),
            None => Ok(()),
        }
    }
}

impl DeliveryConfig {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs)
    }
    pub fn send_timeout(&self) -> Duration {
        Duration::from_secs(self.send_timeout_secs)
    }
    pub fn config_recheck(&self) -> Duration {
        Duration::from_secs(self.config_recheck_secs)
    }
    pub fn settings_poll(&self) -> Duration {
        Duration::from_secs(self.settings_poll_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_pass_the_check() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.delivery.transport, TransportKind::Database);
        assert!(c.database.url.expose_secret().starts_with("sqlite:"));
    }

    #[test]
    fn unknown_key_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[delivery]\nconcurency = 4\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("concurency"), "{err}");
        assert!(err.contains("bad.toml"), "{err}");
    }

    #[test]
    fn lease_shorter_than_send_timeout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[delivery]\nlease_secs = 10\nsend_timeout_secs = 30\n",
        )
        .unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("lease_secs"), "{err}");
    }
}
