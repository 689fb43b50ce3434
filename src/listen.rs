//! PostgreSQL LISTEN: wakes the worker when a module commits new mail and the settings
//! watcher when an admin saves settings. The connection comes back with a capped backoff;
//! after any gap both are woken, since notifications in the gap are lost.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::Notify;

use crate::retry;

pub const OUTBOX_CHANNEL: &str = "teos_mailer_outbox";
pub const SETTINGS_CHANNEL: &str = "teos_mailer_settings";

/// Longest wait between two tries to listen again.
const LISTEN_RETRY_CAP: Duration = Duration::from_secs(30);

pub async fn listen(pool: PgPool, outbox: Arc<Notify>, settings: Arc<Notify>) {
    let mut backoff = backon::BackoffBuilder::build(retry::reconnect_backoff(LISTEN_RETRY_CAP));
    loop {
        match subscribe(&pool).await {
            Ok(mut listener) => {
                tracing::debug!("listening for new mail");
                backoff = backon::BackoffBuilder::build(retry::reconnect_backoff(LISTEN_RETRY_CAP));
                // Registered now: whatever was committed before is found by this look.
                outbox.notify_one();
                settings.notify_one();
                loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) if n.channel() == SETTINGS_CHANNEL => settings.notify_one(),
                        Ok(Some(_)) => outbox.notify_one(),
                        // The connection dropped and was made again.
                        Ok(None) => {
                            outbox.notify_one();
                            settings.notify_one();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "lost the LISTEN connection; polling until it is back");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot LISTEN; polling until it works"),
        }
        let delay = backoff.next().unwrap_or(LISTEN_RETRY_CAP);
        tokio::time::sleep(delay).await;
    }
}

async fn subscribe(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([OUTBOX_CHANNEL, SETTINGS_CHANNEL])
        .await?;
    Ok(listener)
}
