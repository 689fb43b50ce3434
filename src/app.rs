//! The daemon: connect (an outage never exits), migrate, start the parts, deliver until
//! told to stop, drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::config::{Config, ConfigError};
use crate::settings::{self, Settings};
use crate::store::Store;
use crate::token::TokenManager;
use crate::transport;
use crate::worker::Worker;
use crate::{listen, retry, systemd};

/// Longest wait between two tries to reach the database at start.
const CONNECT_RETRY_CAP: Duration = Duration::from_secs(30);
/// How often sent, failed and cancelled rows past retention are purged.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Options of `teos-mailer run`.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunOptions {
    /// Return once nothing is due and nothing is being sent.
    pub until_idle: bool,
}

/// Runs the daemon until `shutdown` resolves. Returns early only if `shutdown` does
/// before the database is reachable, or at once for a configuration it cannot use.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()>,
    opts: RunOptions,
) -> Result<(), ConfigError> {
    let ctx = transport::Context::new(&cfg.delivery, &cfg.microsoft365).map_err(ConfigError)?;
    let tokens = TokenManager::new(
        ctx.http.clone(),
        Duration::from_secs(cfg.microsoft365.token_refresh_margin_secs),
    );
    tokio::pin!(shutdown);
    let store = tokio::select! {
        store = connect_and_migrate(&cfg) => store,
        () = &mut shutdown => return Ok(()),
    };
    let first = tokio::select! {
        s = until_ok("read the mail settings", || store.load_settings()) => s,
        () = &mut shutdown => return Ok(()),
    };
    let (settings_tx, settings_rx) = watch::channel(Arc::new(Settings::from_row(first)));
    let outbox_wake = Arc::new(Notify::new());
    let settings_wake = Arc::new(Notify::new());

    let mut background = tokio::task::JoinSet::new();
    if let Some(pool) = store.postgres() {
        background.spawn(listen::listen(
            pool.clone(),
            outbox_wake.clone(),
            settings_wake.clone(),
        ));
    }
    background.spawn(settings::watch_settings(
        store.clone(),
        settings_tx,
        cfg.delivery.settings_poll(),
        settings_wake,
    ));
    background.spawn(maintain(store.clone(), cfg.delivery.clone()));

    let worker = Arc::new(Worker::new(
        store.clone(),
        ctx,
        tokens.clone(),
        settings_rx,
        outbox_wake,
    ));
    tracing::info!(
        database = store.dialect(),
        transport = ?cfg.delivery.transport,
        concurrency = cfg.delivery.concurrency,
        daemon = worker.owner(),
        "delivering"
    );
    systemd::notify("READY=1");
    worker.run(shutdown, opts.until_idle).await;
    systemd::notify("STOPPING=1");
    background.shutdown().await;
    store.close().await;
    tracing::info!(token_requests = tokens.requests(), "stopped");
    Ok(())
}

/// Connects and applies the migrations, waiting through any outage with a capped backoff.
pub async fn connect_and_migrate(cfg: &Config) -> Store {
    let store = until_ok("connect to the database", || Store::connect(&cfg.database)).await;
    if cfg.database.migrate_on_start {
        until_ok("apply the migrations", || store.migrate()).await;
    }
    store
}

/// Retries `op` until it succeeds, logging each failure; never gives up.
async fn until_ok<T, E, F, Fut>(what: &str, op: F) -> T
where
    E: std::fmt::Display,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = backon::BackoffBuilder::build(retry::reconnect_backoff(CONNECT_RETRY_CAP));
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) => {
                let delay = backoff.next().unwrap_or(CONNECT_RETRY_CAP);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot {what} yet");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Gives the rows of dead daemons back to the queue, and purges old rows.
async fn maintain(store: Store, cfg: crate::config::DeliveryConfig) {
    // A quarter of the lease: a dead daemon's rows wait at most 1.25 leases.
    let reap_every = (cfg.lease() / 4).max(Duration::from_secs(1));
    let mut reap = tokio::time::interval(reap_every);
    let mut purge = tokio::time::interval(PURGE_EVERY);
    loop {
        tokio::select! {
            _ = reap.tick() => match store.reap_expired(cfg.max_attempts).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(rows = n, "took back rows whose daemon stopped before finishing them"),
                Err(e) => tracing::debug!(error = %e, "lease check skipped"),
            },
            _ = purge.tick(), if cfg.retention_days > 0 => match store.purge(cfg.retention_days).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, days = cfg.retention_days, "purged rows past retention"),
                Err(e) => tracing::debug!(error = %e, "purge skipped"),
            },
        }
    }
}
