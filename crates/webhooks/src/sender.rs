//! The consumer and the senders. Every node runs [`run_sender`]; the one holding the
//! `webhooks` cursor lease leads: it turns new events into delivery rows (one transaction
//! with the cursor's advance) and runs a sender task per enabled policy. The others only
//! try, now and then, to take the lease over, so a dead leader's work continues where its
//! cursor and its delivery rows say it stood.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use berth_meta::{
    AccountStore, Database, DeliveryOutcome, DeliveryRecord, DeliveryState, Event, EventLog,
    MetaStore, WebhookRecord, WebhookStore,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::payload::{render, Notice, Origin};
use crate::signature::{sign, ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::Webhooks;

/// The event-log consumer's name (its cursor and lease).
const CONSUMER: &str = "webhooks";
/// How long the lease lasts unless renewed; a dead leader's work resumes after this.
const LEASE_TTL_MS: i64 = 20_000;
/// How often the leader renews the lease.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often a node that does not lead tries to take over.
const FOLLOW_EVERY: Duration = Duration::from_secs(3);
/// How often the leader looks for new events while the log is quiet.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How often the leader re-reads the policies.
const POLICIES_EVERY: Duration = Duration::from_secs(1);
/// How often the leader forgets old finished deliveries.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Events read per step.
const EVENTS_PER_STEP: usize = 500;
/// Pending deliveries a sender reads per step.
const DELIVERIES_PER_STEP: usize = 100;
/// The first pause after a failed attempt; it doubles per attempt.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Upper bounds (ms) of the delivery latency histogram: from the change's commit to the
/// receiver's 2xx.
pub const LATENCY_BUCKETS_MS: [u64; 11] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000,
];

/// What the senders did, for the metrics.
#[derive(Debug, Default)]
pub struct WebhookCounters {
    delivered: AtomicU64,
    failed: AtomicU64,
    attempt_failures: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_MS.len()],
    latency_sum_ms: AtomicU64,
    pending: AtomicU64,
    oldest_pending_ms: AtomicI64,
    leading: AtomicBool,
}

impl WebhookCounters {
    /// Deliveries a receiver accepted.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
    /// Deliveries given up on after the retry horizon.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    /// Attempts that did not get a 2xx (each retry counts).
    pub fn attempt_failures(&self) -> u64 {
        self.attempt_failures.load(Ordering::Relaxed)
    }
    /// Delivered counts per [`LATENCY_BUCKETS_MS`] bucket (not cumulative), and the sum
    /// of the latencies in ms.
    pub fn latency(&self) -> ([u64; LATENCY_BUCKETS_MS.len()], u64) {
        let buckets = std::array::from_fn(|i| self.latency_buckets[i].load(Ordering::Relaxed));
        (buckets, self.latency_sum_ms.load(Ordering::Relaxed))
    }
    /// Deliveries waiting, as the leader last counted (0 on other nodes).
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }
    /// When the oldest waiting delivery was enqueued (ms since the epoch), 0 if none.
    pub fn oldest_pending_ms(&self) -> i64 {
        self.oldest_pending_ms.load(Ordering::Relaxed)
    }
    /// Whether this node runs the deliveries now.
    pub fn leading(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    fn record_latency(&self, ms: u64) {
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(LATENCY_BUCKETS_MS.len() - 1);
        self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// Runs the consumer and senders for as long as the process runs. Every node may call
/// it; one at a time leads.
pub async fn run_sender(webhooks: Webhooks) {
    let counters = webhooks.counters.clone();
    let db = webhooks.store.clone();
    let candidate = crate::payload::event_id(&format!("{}", random()), 0);
    let instance_id = loop {
        match db.setting_or_insert("instance_id", &candidate).await {
            Ok(id) => break id,
            Err(e) => {
                tracing::warn!(error = %e, "webhooks: reading the instance id");
                tokio::time::sleep(FOLLOW_EVERY).await;
            }
        }
    };
    let client = match webhooks
        .settings
        .outbound
        .http_client(webhooks.settings.timeout, 3)
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "webhooks: no HTTP client, nothing will be delivered");
            return;
        }
    };
    let context = Arc::new(Context {
        db: db.clone(),
        client,
        webhooks: webhooks.clone(),
        origin: Origin {
            instance_id,
            host: webhooks.settings.public_host.clone(),
        },
        counters,
    });
    let holder = format!("webhooks-{:016x}", random());
    loop {
        match db.claim_cursor(CONSUMER, &holder, LEASE_TTL_MS).await {
            Ok(Some(position)) => {
                tracing::info!(position, "webhooks: this node delivers");
                context.counters.leading.store(true, Ordering::Relaxed);
                lead(&context, &holder, position).await;
                context.counters.leading.store(false, Ordering::Relaxed);
                context.counters.pending.store(0, Ordering::Relaxed);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "webhooks: claiming the event cursor"),
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// What every task of the leader shares.
struct Context {
    db: Arc<Database>,
    client: reqwest::Client,
    webhooks: Webhooks,
    origin: Origin,
    counters: Arc<WebhookCounters>,
}

/// A running sender: its policy (updated in place when it changes) and its wake-up call.
struct PolicySender {
    policy: Arc<RwLock<WebhookRecord>>,
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

/// Leads until the lease is lost: consumes events into deliveries and keeps a sender
/// running per enabled policy.
async fn lead(context: &Arc<Context>, holder: &str, mut position: i64) {
    let mut senders: HashMap<i64, PolicySender> = HashMap::new();
    let mut policies: Vec<WebhookRecord> = Vec::new();
    let mut renewed = Instant::now();
    let mut synced: Option<Instant> = None;
    let mut pruned = Instant::now();
    loop {
        if renewed.elapsed() >= RENEW_EVERY {
            match context
                .db
                .claim_cursor(CONSUMER, holder, LEASE_TTL_MS)
                .await
            {
                Ok(Some(_)) => renewed = Instant::now(),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "webhooks: renewing the event cursor");
                    if renewed.elapsed() >= Duration::from_millis(LEASE_TTL_MS as u64 / 2) {
                        break;
                    }
                }
            }
        }
        if pruned.elapsed() >= PRUNE_EVERY {
            let retention = context.webhooks.settings.log_retention.as_millis() as i64;
            match context.db.prune_deliveries(now_ms() - retention).await {
                Ok(n) if n > 0 => {
                    tracing::info!(deliveries = n, "webhooks: pruned the delivery log")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "webhooks: pruning the delivery log"),
            }
            pruned = Instant::now();
        }
        if synced.is_none_or(|at| at.elapsed() >= POLICIES_EVERY) {
            match context.db.all_webhooks().await {
                Ok(all) => {
                    policies = all;
                    sync_senders(context, &policies, &mut senders);
                    count_backlog(context).await;
                    synced = Some(Instant::now());
                }
                Err(e) => tracing::warn!(error = %e, "webhooks: reading the policies"),
            }
        }
        let events = match context.db.events_after(position, EVENTS_PER_STEP).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "webhooks: reading the event log");
                tokio::time::sleep(POLL_EVERY * 10).await;
                continue;
            }
        };
        let Some(last) = events.last().map(|e| e.seq) else {
            // With no policy to feed, nobody waits for the next event.
            let quiet = if policies.iter().any(|p| p.enabled) {
                POLL_EVERY
            } else {
                POLICIES_EVERY
            };
            tokio::time::sleep(quiet).await;
            continue;
        };
        // The policies as they are now: one created a moment ago is matched against the
        // events after its creation, however late this node learns of it.
        if let Ok(all) = context.db.all_webhooks().await {
            policies = all;
            sync_senders(context, &policies, &mut senders);
        }
        let deliveries = match_policies(&events, &policies, &context.origin.instance_id);
        match context
            .db
            .enqueue_deliveries(CONSUMER, holder, last, deliveries.clone())
            .await
        {
            Ok(true) => {
                position = last;
                for (policy_id, _) in &deliveries {
                    if let Some(sender) = senders.get(policy_id) {
                        sender.wake.notify_one();
                    }
                }
            }
            Ok(false) => break,
            Err(e) => {
                tracing::warn!(error = %e, "webhooks: enqueuing deliveries");
                tokio::time::sleep(POLL_EVERY * 10).await;
            }
        }
    }
    tracing::info!("webhooks: another node delivers now");
    for (_, sender) in senders.drain() {
        sender.task.abort();
    }
}

/// The (policy, event) pairs to enqueue: every enabled policy whose scope and event types
/// cover the event.
fn match_policies(
    events: &[Event],
    policies: &[WebhookRecord],
    instance_id: &str,
) -> Vec<(i64, i64)> {
    let mut pairs = Vec::new();
    for event in events {
        let Some(notice) = Notice::of(event, instance_id) else {
            continue;
        };
        for policy in policies.iter().filter(|p| p.enabled) {
            let in_scope = policy
                .project
                .as_deref()
                .is_none_or(|project| project == notice.project());
            let after_creation = event.seq > policy.created_seq;
            if in_scope && after_creation && policy.events.iter().any(|e| e == notice.kind) {
                pairs.push((policy.id, event.seq));
            }
        }
    }
    pairs
}

/// Starts senders for new enabled policies, stops those of removed or disabled ones, and
/// hands changed ones their new settings.
fn sync_senders(
    context: &Arc<Context>,
    policies: &[WebhookRecord],
    senders: &mut HashMap<i64, PolicySender>,
) {
    senders.retain(|id, sender| {
        let keep = policies.iter().any(|p| p.id == *id && p.enabled);
        if !keep {
            sender.task.abort();
        }
        keep
    });
    for policy in policies.iter().filter(|p| p.enabled) {
        match senders.get(&policy.id) {
            Some(sender) => {
                let mut current = sender.policy.write().unwrap_or_else(|e| e.into_inner());
                if *current != *policy {
                    *current = policy.clone();
                }
            }
            None => {
                let shared = Arc::new(RwLock::new(policy.clone()));
                let wake = Arc::new(Notify::new());
                let task = tokio::spawn(send_policy(context.clone(), shared.clone(), wake.clone()));
                senders.insert(
                    policy.id,
                    PolicySender {
                        policy: shared,
                        wake,
                        task,
                    },
                );
            }
        }
    }
}

/// Updates the backlog gauges.
async fn count_backlog(context: &Context) {
    if let Ok(backlog) = context.db.delivery_backlog().await {
        let pending = backlog.iter().map(|b| b.pending).sum();
        let oldest = backlog
            .iter()
            .filter_map(|b| b.oldest_ms)
            .min()
            .unwrap_or(0);
        context.counters.pending.store(pending, Ordering::Relaxed);
        context
            .counters
            .oldest_pending_ms
            .store(oldest, Ordering::Relaxed);
    }
}

/// Works through one policy's deliveries, oldest first, forever: the oldest pending one
/// is retried until it succeeds or passes the horizon before any later one is sent.
async fn send_policy(context: Arc<Context>, policy: Arc<RwLock<WebhookRecord>>, wake: Arc<Notify>) {
    let policy_id = policy.read().unwrap_or_else(|e| e.into_inner()).id;
    loop {
        let pending = match context
            .db
            .pending_deliveries(policy_id, DELIVERIES_PER_STEP)
            .await
        {
            Ok(pending) => pending,
            Err(e) => {
                tracing::warn!(error = %e, policy_id, "webhooks: reading deliveries");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if pending.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
            continue;
        }
        let current = policy.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut outcomes = Vec::new();
        let mut wait = None;
        for (delivery, event) in pending {
            let due_in = delivery.next_attempt_ms - now_ms();
            if due_in > 0 {
                wait = Some(Duration::from_millis(due_in as u64));
                break;
            }
            let outcome = attempt(&context, &current, &delivery, event.as_ref()).await;
            let stop = outcome.state == DeliveryState::Pending;
            if stop {
                wait = Some(Duration::from_millis(
                    (outcome.next_attempt_ms - now_ms()).max(0) as u64,
                ));
            }
            outcomes.push(outcome);
            if stop {
                break;
            }
        }
        record(&context, outcomes).await;
        if let Some(wait) = wait {
            // A redelivery or a policy change is picked up within a second.
            tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
        }
    }
}

/// Records outcomes, retrying a failing store for a while: a lost record only means the
/// delivery is sent again, which receivers de-duplicate.
async fn record(context: &Context, outcomes: Vec<DeliveryOutcome>) {
    for _ in 0..5 {
        match context.db.record_deliveries(outcomes.clone()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "webhooks: recording deliveries");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// One attempt at one delivery, and what it leaves.
async fn attempt(
    context: &Context,
    policy: &WebhookRecord,
    delivery: &DeliveryRecord,
    event: Option<&Event>,
) -> DeliveryOutcome {
    let started = Instant::now();
    let attempted_ms = now_ms();
    let attempts = delivery.attempts.saturating_add(1);
    let finished = |state, status, error: String| DeliveryOutcome {
        policy_id: delivery.policy_id,
        seq: delivery.seq,
        state,
        attempts,
        next_attempt_ms: attempted_ms,
        attempted_ms,
        status,
        error,
        latency_ms: started.elapsed().as_millis() as i64,
    };
    let notice = event.and_then(|e| Notice::of(e, &context.origin.instance_id));
    let Some(notice) = notice else {
        context.counters.failed.fetch_add(1, Ordering::Relaxed);
        return finished(
            DeliveryState::Failed,
            None,
            "the event is no longer in the event log".to_owned(),
        );
    };
    let result = post(context, policy, &notice).await;
    match result {
        Ok(status) => {
            context.counters.delivered.fetch_add(1, Ordering::Relaxed);
            let since_commit = (now_ms() - notice.at_ms).max(0) as u64;
            context.counters.record_latency(since_commit);
            finished(DeliveryState::Delivered, Some(status), String::new())
        }
        Err((status, error)) => {
            context
                .counters
                .attempt_failures
                .fetch_add(1, Ordering::Relaxed);
            let horizon = context.webhooks.settings.retry_for.as_millis() as i64;
            if attempted_ms - delivery.created_ms >= horizon {
                context.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(policy = %policy.name, seq = delivery.seq, %error, "webhooks: giving up on a delivery");
                return finished(DeliveryState::Failed, status, error);
            }
            let mut outcome = finished(DeliveryState::Pending, status, error);
            outcome.next_attempt_ms =
                attempted_ms + backoff(attempts, context.webhooks.settings.max_backoff);
            outcome
        }
    }
}

/// Sends one notice; the status on a 2xx, else the status (if any) and what went wrong.
async fn post(
    context: &Context,
    policy: &WebhookRecord,
    notice: &Notice,
) -> Result<u16, (Option<u16>, String)> {
    let public = if policy.format == "harbor" {
        matches!(context.db.project(notice.project()).await, Ok(Some(p)) if p.public)
    } else {
        false
    };
    let (content_type, body) = render(&policy.format, notice, &context.origin, public);
    let timestamp = now_ms() / 1000;
    let mut request = context
        .client
        .post(&policy.url)
        .header("content-type", content_type)
        .header("user-agent", concat!("berth/", env!("CARGO_PKG_VERSION")))
        .header(ID_HEADER, &notice.id)
        .header(TIMESTAMP_HEADER, timestamp.to_string());
    if !policy.secret.is_empty() {
        request = request.header(
            SIGNATURE_HEADER,
            sign(&policy.secret, &notice.id, timestamp, body.as_bytes()),
        );
    }
    let response = request
        .body(body)
        .send()
        .await
        .map_err(|e| (None, describe(&e)))?;
    let status = response.status();
    // The answer's body is not needed; dropping it closes or reuses the connection.
    drop(response);
    if status.is_success() {
        Ok(status.as_u16())
    } else {
        Err((
            Some(status.as_u16()),
            format!("the receiver answered {status}"),
        ))
    }
}

/// An HTTP client error with its causes (the outbound guard's refusal among them).
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The pause before attempt `attempts + 1`: doubling from one second up to `max`, with
/// jitter (between half and all of it) so that receivers coming back are not hit by every
/// sender at once.
fn backoff(attempts: u32, max: Duration) -> i64 {
    let doubled = FIRST_BACKOFF.saturating_mul(1 << attempts.saturating_sub(1).min(20));
    let full = doubled.min(max).as_millis() as u64;
    let jitter = if full > 1 {
        random() % (full / 2 + 1)
    } else {
        0
    };
    (full - jitter) as i64
}

/// A random number, from the standard library's randomly keyed hasher.
fn random() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let max = Duration::from_secs(600);
        for (attempts, full) in [(1, 1_000), (2, 2_000), (4, 8_000), (30, 600_000)] {
            for _ in 0..50 {
                let pause = backoff(attempts, max);
                assert!(pause <= full && pause >= full / 2, "{attempts}: {pause}");
            }
        }
        assert_eq!(backoff(5, Duration::from_millis(0)), 0);
    }
}
