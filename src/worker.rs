//! The delivery loop: wait → claim → render → send → record. The only part that knows
//! the outbox, rendering, transports and retry timing together.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::Retryable;
use lettre::message::Mailbox;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, field};

use crate::config::DeliveryConfig;
use crate::render::{self, Rendered};
use crate::retry;
use crate::settings::{SenderKind, Settings};
use crate::store::{self, AttemptRecord, ClaimedRow, Ending, Finish, RowStatus, Store};
use crate::token::{TokenError, TokenManager};
use crate::transport::{Context, Outcome, Stop, Transport};

/// Settings and the transport built from them; a message keeps the snapshot it started
/// with, so a settings change never disturbs mail in flight.
pub struct Delivery {
    pub settings: Arc<Settings>,
    pub transport: Transport,
}

impl Delivery {
    pub fn new(settings: Arc<Settings>, ctx: &Context) -> Delivery {
        Delivery {
            transport: Transport::build(&settings, ctx),
            settings,
        }
    }

    /// Sends with a token where the transport needs one. A refused token is dropped
    /// and a fresh one tried once; refused again, the settings are at fault.
    pub async fn send(
        &self,
        tokens: &Arc<TokenManager>,
        rendered: &Rendered,
        stop: &Stop,
    ) -> Outcome {
        let Some(key) = self.transport.token_key(&self.settings) else {
            return self.transport.send(rendered, None, stop).await;
        };
        let Ok(Some(oauth)) = &self.settings.oauth else {
            return self.transport.send(rendered, None, stop).await;
        };
        for first_try in [true, false] {
            let token = match tokens.token(&key, &oauth.secret).await {
                Ok(token) => token,
                Err(TokenError::Transient(reason)) => {
                    return Outcome::Transient {
                        reason,
                        code: None,
                        retry_after: None,
                    };
                }
                Err(TokenError::Configuration(reason)) => {
                    return Outcome::Configuration { reason, code: None };
                }
            };
            match self.transport.send(rendered, Some(&token), stop).await {
                Outcome::TokenRejected { reason, .. } if first_try => {
                    tracing::info!(reason = %reason, "token refused; fetching a new one and trying once more");
                    tokens.invalidate(&key, &token);
                }
                Outcome::TokenRejected { reason, code } => {
                    return Outcome::Configuration { reason, code };
                }
                outcome => return outcome,
            }
        }
        unreachable!("the second try always returns")
    }
}

pub struct Worker {
    store: Store,
    /// Where finished attempts go to be written in batches (see `record_batches`).
    recorder: mpsc::UnboundedSender<Recording>,
    ctx: Context,
    tokens: Arc<TokenManager>,
    /// This daemon's name in lease_owner: host, pid and a random part, so that two
    /// daemons on one host (or one restarted) never mistake each other's leases.
    owner: String,
    message_id_domain: String,
    settings: Mutex<watch::Receiver<Arc<Settings>>>,
    delivery: Mutex<Arc<Delivery>>,
    /// Fired by NOTIFY (or anyone) when new mail may be due.
    wake: Arc<Notify>,
    /// Senders paused by a configuration failure, and when that list was read: claims
    /// skip them without a query each time.
    paused: Mutex<(Option<Instant>, Vec<String>)>,
}

/// How long the list of paused senders may be reused before it is read again.
const PAUSED_TTL: Duration = Duration::from_secs(1);
/// Longest wait between two tries to reach the database after an error.
const DB_RETRY_CAP: Duration = Duration::from_secs(30);

/// What one pass over the outbox did; `run_once` returns it to tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub claimed: usize,
}

impl Worker {
    pub fn new(
        store: Store,
        ctx: Context,
        tokens: Arc<TokenManager>,
        settings: watch::Receiver<Arc<Settings>>,
        wake: Arc<Notify>,
    ) -> Worker {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
        let owner = format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..));
        let (recorder, queue) = mpsc::unbounded_channel();
        tokio::spawn(record_batches(store.clone(), owner.clone(), queue));
        let message_id_domain = if ctx.delivery.message_id_domain.is_empty() {
            host
        } else {
            ctx.delivery.message_id_domain.clone()
        };
        let first = settings.borrow().clone();
        Worker {
            delivery: Mutex::new(Arc::new(Delivery::new(first, &ctx))),
            settings: Mutex::new(settings),
            recorder,
            store,
            ctx,
            tokens,
            owner,
            message_id_domain,
            wake,
            paused: Mutex::new((None, Vec::new())),
        }
    }

    fn cfg(&self) -> &DeliveryConfig {
        &self.ctx.delivery
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The delivery snapshot for the current settings, rebuilt only when they changed.
    fn delivery(&self) -> Arc<Delivery> {
        let mut rx = self.settings.lock().unwrap();
        let mut current = self.delivery.lock().unwrap();
        if rx.has_changed().unwrap_or(false) {
            let settings = rx.borrow_and_update().clone();
            let app = |s: &Settings| {
                s.oauth
                    .as_ref()
                    .ok()
                    .cloned()
                    .flatten()
                    .map(|o| (o.authority, o.tenant, o.client_id, o.secret, o.mode))
            };
            if app(&settings) != app(&current.settings) {
                // Another app, tenant or secret makes the old tokens worthless; another
                // mode (or OAuth off) makes them unused, so stop renewing them.
                self.tokens.clear();
            }
            *current = Arc::new(Delivery::new(settings, &self.ctx));
        }
        current.clone()
    }

    async fn paused(&self) -> Result<Vec<String>, sqlx::Error> {
        if let (Some(at), list) = &*self.paused.lock().unwrap() {
            if at.elapsed() < PAUSED_TTL {
                return Ok(list.clone());
            }
        }
        let list: Vec<String> = self
            .store
            .paused_senders()
            .await?
            .into_iter()
            .map(|p| p.sender)
            .collect();
        *self.paused.lock().unwrap() = (Some(Instant::now()), list.clone());
        Ok(list)
    }

    /// Claims up to `limit` due rows; an empty result when every sender is paused.
    async fn claim(&self, limit: usize) -> Result<Vec<ClaimedRow>, sqlx::Error> {
        let paused = self.paused().await?;
        if paused.iter().any(|p| p == "*") {
            return Ok(Vec::new());
        }
        let paused: Vec<&str> = paused.iter().map(String::as_str).collect();
        self.store
            .claim(
                &self.owner,
                u32::try_from(limit).unwrap_or(u32::MAX),
                self.cfg().lease(),
                &self.message_id_domain,
                &paused,
            )
            .await
    }

    /// One batch, start to finish: claims up to `concurrency` rows and delivers them.
    /// Tests call this to drive the worker one step at a time.
    pub async fn run_once(self: &Arc<Self>) -> Result<Pass, sqlx::Error> {
        let rows = self.claim(self.cfg().concurrency as usize).await?;
        let claimed = rows.len();
        let (_stop_tx, stop) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for row in rows {
            tasks.spawn(self.clone().deliver(row, stop.clone(), None));
        }
        while tasks.join_next().await.is_some() {}
        Ok(Pass { claimed })
    }

    /// Delivers until `shutdown` resolves, then stops claiming, lets messages already
    /// being sent finish within the grace period and gives back the rest.
    /// With `until_idle`, also returns once nothing is due and nothing is in flight.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>, until_idle: bool) {
        tokio::pin!(shutdown);
        let slots = Arc::new(Semaphore::new(self.cfg().concurrency as usize));
        let (stop_tx, stop) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut db_backoff = None;
        loop {
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a delivery task failed");
                }
            }
            let first = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.expect("semaphore is never closed"),
                () = &mut shutdown => break,
            };
            let free = slots.available_permits() + 1;
            match self.claim(free).await {
                Ok(rows) if !rows.is_empty() => {
                    db_backoff = None;
                    let mut first = Some(first);
                    for row in rows {
                        let permit = match first.take() {
                            Some(p) => p,
                            None => slots.clone().acquire_owned().await.expect("never closed"),
                        };
                        tasks.spawn(self.clone().deliver(row, stop.clone(), Some(permit)));
                    }
                }
                Ok(_) => {
                    db_backoff = None;
                    drop(first);
                    if until_idle && tasks.is_empty() {
                        break;
                    }
                    tokio::select! {
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(self.cfg().poll_interval()) => {}
                        Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                        () = &mut shutdown => break,
                    }
                }
                Err(e) if store::is_contention(&e) => {
                    tracing::debug!(error = %e, "claim collided with another daemon's; claiming again");
                }
                Err(e) => {
                    drop(first);
                    let delay = db_backoff
                        .get_or_insert_with(|| {
                            backon::BackoffBuilder::build(retry::reconnect_backoff(DB_RETRY_CAP))
                        })
                        .next()
                        .unwrap_or(DB_RETRY_CAP);
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot claim mail; the database is not answering");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = &mut shutdown => break,
                    }
                }
            }
        }
        stop_tx.send_replace(true);
        let in_flight = tasks.len();
        if in_flight > 0 {
            tracing::info!(
                in_flight,
                grace_secs = self.cfg().shutdown_grace_secs,
                "draining"
            );
        }
        let drained = tokio::time::timeout(self.cfg().shutdown_grace(), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "messages still being sent after the grace period stay leased; another daemon retries them when the lease runs out"
            );
            tasks.shutdown().await;
        }
    }

    /// Takes one claimed row to its end: sent, retry later, failed, or waiting for the
    /// settings to be fixed.
    async fn deliver(
        self: Arc<Self>,
        row: ClaimedRow,
        stop: Stop,
        slot: Option<OwnedSemaphorePermit>,
    ) {
        let delivery = self.delivery();
        let span = tracing::info_span!(
            "mail",
            id = row.id,
            attempt = row.attempts,
            module = %row.module,
            message_id = %row.message_id,
            transport = delivery.transport.name(),
            sender = field::Empty,
        );
        async move {
            let started = Instant::now();
            let (kind, outcome) = if *stop.borrow() {
                (None, Outcome::Stopped)
            } else {
                self.attempt(&row, &delivery, &stop).await
            };
            // The slot bounds the sessions with the mail server; writing the outcome
            // needs none, so the next claim need not wait for it.
            drop(slot);
            self.conclude(
                &row,
                kind,
                outcome,
                started.elapsed(),
                delivery.transport.name(),
            )
            .await;
        }
        .instrument(span)
        .await
    }

    async fn attempt(
        &self,
        row: &ClaimedRow,
        delivery: &Delivery,
        stop: &Stop,
    ) -> (Option<SenderKind>, Outcome) {
        let kind = match SenderKind::for_row(&row.module, row.sender.as_deref()) {
            Ok(kind) => kind,
            Err(reason) => return (None, Outcome::Permanent { reason, code: None }),
        };
        tracing::Span::current().record("sender", kind.as_str());
        let from = match (delivery.settings.sender(kind), &delivery.transport) {
            (Ok(from), _) => from.clone(),
            (Err(_), Transport::Pickup(_)) => pickup_sender(),
            (Err(reason), _) => {
                let outcome = Outcome::Configuration {
                    reason: reason.clone(),
                    code: None,
                };
                return (Some(kind), outcome);
            }
        };
        let rendered = match self.render(row, &from).await {
            Ok(r) => r,
            Err(outcome) => return (Some(kind), outcome),
        };
        (
            Some(kind),
            delivery.send(&self.tokens, &rendered, stop).await,
        )
    }

    async fn render(&self, row: &ClaimedRow, from: &Mailbox) -> Result<Rendered, Outcome> {
        let attachments = if row.attachment_count == 0 {
            Vec::new()
        } else {
            self.store
                .attachments(row.id)
                .await
                .map_err(|e| Outcome::Transient {
                    reason: format!("cannot read the attachments: {e}"),
                    code: None,
                    retry_after: None,
                })?
        };
        render::render(row, &attachments, from, self.cfg().max_message_bytes).map_err(|e| {
            Outcome::Permanent {
                reason: e.0,
                code: None,
            }
        })
    }

    async fn conclude(
        &self,
        row: &ClaimedRow,
        kind: Option<SenderKind>,
        outcome: Outcome,
        took: Duration,
        transport: &'static str,
    ) {
        let max_attempts = row
            .max_attempts
            .and_then(|m| u32::try_from(m).ok())
            .unwrap_or(self.cfg().max_attempts);
        let attempt = u32::try_from(row.attempts).unwrap_or(0);
        let code = outcome.code();
        let took_ms = took.as_millis() as u64;
        if outcome == Outcome::Stopped {
            // Nothing was attempted: the row goes back as it was, for this daemon's
            // successor or another one, without waiting for the lease.
            tracing::info!("given back unsent: the daemon is stopping");
            let mut back = finish(RowStatus::Pending, None, None, None);
            back.give_back = true;
            self.record(row, back, None).await;
            return;
        }
        let (finish, detail) = match &outcome {
            Outcome::Stopped => unreachable!("handled above"),
            Outcome::Sent { reply, .. } => {
                tracing::info!(code, reply = %reply, took_ms, "sent");
                (
                    finish(RowStatus::Sent, None, code, Some(reply)),
                    reply.clone(),
                )
            }
            Outcome::Permanent { reason, .. } => {
                tracing::warn!(code, reason = %reason, "failed for good");
                (
                    finish(RowStatus::Failed, Some(reason), code, None),
                    reason.clone(),
                )
            }
            Outcome::Transient { reason, .. } if attempt >= max_attempts => {
                let why = format!("gave up after {attempt} attempts; the last one: {reason}");
                tracing::warn!(code, reason = %reason, attempt, "failed after the last attempt");
                (
                    finish(RowStatus::Failed, Some(&why), code, None),
                    reason.clone(),
                )
            }
            Outcome::Transient {
                reason,
                retry_after,
                ..
            } => {
                let delay = retry_after.unwrap_or_else(|| {
                    retry::next_delay(
                        attempt,
                        Duration::from_secs(self.cfg().retry_base_secs),
                        Duration::from_secs(self.cfg().retry_cap_secs),
                    )
                });
                tracing::info!(code, reason = %reason, retry_in_secs = delay.as_secs(), "will retry");
                let mut f = finish(RowStatus::Pending, Some(reason), code, None);
                f.retry_in = Some(delay);
                (f, reason.clone())
            }
            Outcome::Configuration { reason, .. } | Outcome::TokenRejected { reason, .. } => {
                let sender = kind.map_or("*", SenderKind::as_str);
                if self
                    .pause(sender, reason, self.cfg().config_recheck())
                    .await
                {
                    tracing::error!(
                        sender,
                        reason = %reason,
                        recheck_in_secs = self.cfg().config_recheck_secs,
                        "sender paused: its mail waits until the mail settings are fixed"
                    );
                }
                let mut f = finish(RowStatus::Pending, Some(reason), code, None);
                f.give_back = true;
                (f, reason.clone())
            }
            Outcome::Throttled {
                reason,
                retry_after,
                ..
            } => {
                let sender = kind.map_or("*", SenderKind::as_str);
                let pause = retry_after.unwrap_or(Duration::from_secs(
                    self.ctx.microsoft365.throttle_pause_secs,
                ));
                if self.pause(sender, reason, pause).await {
                    tracing::warn!(sender, code, reason = %reason, pause_secs = pause.as_secs(), "mailbox throttled: backing off");
                }
                let mut f = finish(RowStatus::Pending, Some(reason), code, None);
                f.give_back = true;
                (f, reason.clone())
            }
        };
        let record = AttemptRecord {
            attempt: row.attempts,
            duration: took,
            transport,
            outcome: outcome.label(),
            detail: Some(detail),
        };
        self.record(row, finish, Some(record)).await;
    }

    /// Pauses a sender for `pause`. True when it was not paused yet, so that the caller
    /// logs the reason once, not once per message.
    async fn pause(&self, sender: &str, reason: &str, pause: Duration) -> bool {
        let new = match self.store.pause_sender(sender, reason, pause).await {
            Ok(new) => new,
            Err(e) => {
                tracing::warn!(error = %e, sender, "could not record the pause");
                false
            }
        };
        self.paused.lock().unwrap().0 = None;
        new
    }

    /// Writes the end of an attempt, retrying through a database outage for as long as
    /// the lease lasts. If it never gets through, the lease runs out and the row is
    /// tried again: a message may then go twice, but is never lost.
    async fn record(&self, row: &ClaimedRow, finish: Finish, record: Option<AttemptRecord>) {
        let ending = Ending {
            id: row.id,
            finish,
            record,
        };
        let write = || async {
            let (done, written) = oneshot::channel();
            self.recorder
                .send((ending.clone(), done))
                .map_err(|_| "the recorder has stopped".to_string())?;
            written
                .await
                .map_err(|_| "the recorder has stopped".to_string())?
        };
        let written = write
            .retry(
                retry::reconnect_backoff(Duration::from_secs(10))
                    .with_total_delay(Some(self.cfg().lease() / 2)),
            )
            .notify(|e, after| {
                tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64, "cannot record the outcome yet");
            })
            .await;
        match written {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "the lease ran out before the outcome was recorded; another daemon owns the row now"
            ),
            Err(e) => {
                tracing::error!(error = %e, "outcome not recorded; the row will be retried when its lease runs out")
            }
        }
    }
}

/// How many attempt ends go into one write at most.
const RECORD_BATCH: usize = 64;

type Recording = (Ending, oneshot::Sender<Result<bool, String>>);

/// Writes the ends of attempts in batches: whatever queued up while the last write ran
/// goes into the next one, so a busy daemon pays one commit for many messages and a
/// quiet one waits for nothing. Each sender learns whether its lease was still valid.
async fn record_batches(
    store: Store,
    owner: String,
    mut queue: mpsc::UnboundedReceiver<Recording>,
) {
    let mut batch: Vec<Recording> = Vec::with_capacity(RECORD_BATCH);
    while queue.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        let endings: Vec<Ending> = batch.iter().map(|(e, _)| e.clone()).collect();
        let result = store.finish_many(&owner, &endings).await;
        for (ending, done) in batch.drain(..) {
            let answer = match &result {
                Ok(ours) => Ok(ours.contains(&ending.id)),
                Err(e) => Err(e.to_string()),
            };
            let _ = done.send(answer);
        }
    }
}

fn finish(
    status: RowStatus,
    error: Option<&str>,
    code: Option<u16>,
    reply: Option<&str>,
) -> Finish {
    Finish {
        status,
        give_back: false,
        retry_in: None,
        error: error.map(str::to_string),
        smtp_code: code,
        reply: reply.map(str::to_string),
    }
}

/// The From of pickup-folder mail when no sender is configured, so that trying the
/// daemon out needs no settings at all.
fn pickup_sender() -> Mailbox {
    "TEOS Mailer <teos-mailer@localhost>"
        .parse()
        .expect("valid")
}
