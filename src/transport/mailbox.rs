//! Per-mailbox limits for Microsoft 365: how many sessions at once (lowered when the
//! service throttles, raised again after a run of successes) and how many messages a
//! minute.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use super::{Outcome, Stop};
use tokio::time::Instant;

/// Successes in a row after which a lowered limit goes up by one again.
const RECOVER_AFTER: u32 = 50;

pub struct MailboxLimits {
    slots: Semaphore,
    /// Slots in force now; at most `max`.
    limit: AtomicU32,
    max: u32,
    successes: AtomicU32,
    /// Earliest start of the next message; `None` when pacing is off.
    next_start: Option<Mutex<Instant>>,
    /// Time between two message starts.
    spacing: Duration,
}

impl MailboxLimits {
    pub fn new(max: u32, per_minute: u32) -> MailboxLimits {
        MailboxLimits {
            slots: Semaphore::new(max as usize),
            limit: AtomicU32::new(max),
            max,
            successes: AtomicU32::new(0),
            next_start: (per_minute > 0).then(|| Mutex::new(Instant::now())),
            spacing: Duration::from_secs(60) / per_minute.max(1),
        }
    }

    /// Waits for a free session and for the mailbox's turn; `None` when the daemon
    /// stops first, so the message can be given back unsent.
    pub async fn enter(&self, stop: &Stop) -> Option<SemaphorePermit<'_>> {
        let stopping = super::stopping(stop.clone());
        tokio::pin!(stopping);
        let permit = tokio::select! {
            permit = self.slots.acquire() => permit.expect("never closed"),
            () = &mut stopping => return None,
        };
        if let Some(next) = &self.next_start {
            let start = {
                let mut next = next.lock().unwrap();
                let start = (*next).max(Instant::now());
                *next = start + self.spacing;
                start
            };
            tokio::select! {
                () = tokio::time::sleep_until(start) => {}
                () = &mut stopping => return None,
            }
        }
        Some(permit)
    }

    /// Learns from an outcome: a run of successes raises a lowered limit, throttling
    /// lowers it.
    pub fn observe(&self, outcome: &Outcome, mailbox: &str) {
        match outcome {
            Outcome::Sent { .. } => self.succeeded(),
            Outcome::Throttled { .. } => {
                let sessions = self.throttled();
                tracing::warn!(
                    mailbox,
                    sessions,
                    "throttled; fewer sessions at once for this mailbox"
                );
            }
            _ => {}
        }
    }

    fn succeeded(&self) {
        let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
        if n % RECOVER_AFTER == 0 {
            let raised = self
                .limit
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                    (l < self.max).then_some(l + 1)
                });
            if raised.is_ok() {
                self.slots.add_permits(1);
            }
        }
    }

    /// The service throttled this mailbox: one session fewer, down to one.
    fn throttled(&self) -> u32 {
        self.successes.store(0, Ordering::Relaxed);
        let lowered = self
            .limit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                (l > 1).then_some(l - 1)
            });
        if lowered.is_ok() {
            self.slots.forget_permits(1);
        }
        self.limit.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacing_spaces_starts_and_throttling_lowers_the_limit() {
        let limits = MailboxLimits::new(3, 30);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(limits.enter(&stop).await.unwrap());
        }
        // 30 a minute: the third message starts 4 s after the first.
        assert_eq!(Instant::now() - t0, Duration::from_secs(4));
        // A message still waiting for its turn when the daemon stops goes back unsent.
        let waiting = limits.enter(&stop);
        stop_tx.send_replace(true);
        assert!(waiting.await.is_none());
        assert_eq!(limits.throttled(), 2);
        assert_eq!(limits.throttled(), 1);
        assert_eq!(limits.throttled(), 1);
        for _ in 0..RECOVER_AFTER {
            limits.succeeded();
        }
        assert_eq!(limits.limit.load(Ordering::Relaxed), 2);
    }
}
