//! The background side, on every node: the event consumer (one node at a time, through
//! its cursor), the scheduler (one node at a time, through a lease), and the task worker
//! (every node; tasks are claimed, so each runs on one).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_client::{copy, ClientError, CopyOptions, Endpoint, ImageRef, Progress, RegistryClient};
use berth_meta::{Actor, EventLog, ReplicationStore, TaskOutcome, TaskRecord, TaskStatus};
use berth_oci::{Reference, RepoName};
use futures_util::StreamExt;

use crate::local::LocalRepo;
use crate::settings::{Direction, Policy, Trigger};
use crate::{Replication, ReplicationError};

/// The event log cursor replication consumes.
const CONSUMER: &str = "replication";
/// How long a cursor or task claim lasts unless renewed.
const CLAIM_MS: i64 = 30_000;
/// How often the consumer and scheduler look again when idle.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// Events read per batch.
const EVENT_BATCH: usize = 500;
/// Tasks one node runs at once, across policies.
const NODE_TASKS: usize = 8;
/// The longest pause between attempts at a failing task.
const MAX_BACKOFF_MS: i64 = 300_000;
/// How long finished runs are kept.
const KEEP_RUNS_MS: i64 = 7 * 24 * 3600 * 1000;
/// How long a task is retried before it is given up on: a target down for a day still
/// gets every change.
const RETRY_HORIZON_MS: i64 = 24 * 3600 * 1000;

/// Runs replication's background work for as long as the process runs.
pub async fn run(replication: Replication) {
    let holder = format!("replication-{:016x}", random());
    tokio::spawn(consume_events(replication.clone(), holder));
    tokio::spawn(schedule(replication.clone()));
    work(replication).await;
}

fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Turns changes into tasks, holding the cursor while it can.
async fn consume_events(replication: Replication, holder: String) {
    loop {
        let claimed = replication
            .db
            .claim_cursor(CONSUMER, &holder, CLAIM_MS)
            .await;
        let mut position = match claimed {
            Ok(Some(position)) => position,
            Ok(None) => {
                tokio::time::sleep(FOLLOW_EVERY).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "replication: claiming the event cursor");
                tokio::time::sleep(FOLLOW_EVERY).await;
                continue;
            }
        };
        let mut renewed = Instant::now();
        loop {
            if renewed.elapsed() > Duration::from_millis(CLAIM_MS as u64 / 3) {
                match replication
                    .db
                    .claim_cursor(CONSUMER, &holder, CLAIM_MS)
                    .await
                {
                    Ok(Some(_)) => renewed = Instant::now(),
                    _ => break,
                }
            }
            match consume_batch(&replication, &holder, position).await {
                Ok(Some(next)) => position = next,
                Ok(None) => tokio::time::sleep(FOLLOW_EVERY).await,
                Err(e) => {
                    tracing::warn!(error = %e, "replication: following the event log");
                    tokio::time::sleep(FOLLOW_EVERY).await;
                    break;
                }
            }
        }
    }
}

/// One batch of events after `position`: the new position, or `None` when there was
/// nothing new.
async fn consume_batch(
    replication: &Replication,
    holder: &str,
    position: i64,
) -> Result<Option<i64>, ReplicationError> {
    let events = replication.db.events_after(position, EVENT_BATCH).await?;
    let Some(last) = events.last().map(|e| e.seq) else {
        return Ok(None);
    };
    let policies = replication.policies().await?;
    let mut runs = Vec::new();
    for (policy, created_seq) in &policies {
        let tasks: Vec<_> = events
            .iter()
            .flat_map(|event| policy.tasks_for(event, *created_seq))
            .collect();
        if !tasks.is_empty() {
            runs.push((policy.name.clone(), tasks));
        }
    }
    let queued = !runs.is_empty();
    if !replication
        .db
        .enqueue_replication(CONSUMER, holder, last, runs)
        .await?
    {
        return Err(ReplicationError::Conflict(
            "the event cursor went to another node".to_owned(),
        ));
    }
    if queued {
        replication.wake.notify_one();
    }
    Ok(Some(last))
}

/// Starts scheduled runs, and whole runs of event-triggered policies every
/// `reconcile_every`, on the one node holding the scheduler lease.
async fn schedule(replication: Replication) {
    let lease = "replication-scheduler";
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    let mut pruned: Option<Instant> = None;
    loop {
        ticker.tick().await;
        match replication
            .registry
            .try_lease(lease, Duration::from_millis(CLAIM_MS as u64))
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "replication: the scheduler lease");
                continue;
            }
        }
        if let Err(e) = start_due_runs(&replication).await {
            tracing::warn!(error = %e, "replication: starting scheduled runs");
        }
        // Runs are kept for a week, then forgotten, so the record cannot grow without end.
        if pruned.is_none_or(|at| at.elapsed() > Duration::from_secs(3600)) {
            pruned = Some(Instant::now());
            match replication
                .db
                .prune_replication(now_ms() - KEEP_RUNS_MS)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(executions = n, "replication: forgot old runs"),
                Err(e) => tracing::warn!(error = %e, "replication: forgetting old runs"),
            }
        }
    }
}

async fn start_due_runs(replication: &Replication) -> Result<(), ReplicationError> {
    let now = now_ms();
    let by = Actor::system("replication");
    for (policy, _) in replication.policies().await? {
        if !policy.enabled {
            continue;
        }
        let latest = replication
            .db
            .replication_executions(&policy.name, 20)
            .await?;
        let last_of = |kinds: &[&str]| {
            latest
                .iter()
                .filter(|e| kinds.contains(&e.triggered_by.as_str()))
                .map(|e| e.created_ms)
                .max()
        };
        let due = match &policy.trigger {
            // Once per named minute.
            Trigger::Schedule(schedule) => {
                schedule.due_at(now)
                    && last_of(&["schedule"]).is_none_or(|at| at / 60_000 != now / 60_000)
            }
            Trigger::Event => last_of(&["reconcile", "manual"]).is_none_or(|at| {
                now - at
                    >= i64::try_from(replication.reconcile_every.as_millis()).unwrap_or(i64::MAX)
            }),
            Trigger::Manual => false,
        };
        if due {
            let trigger = match policy.trigger {
                Trigger::Event => "reconcile",
                _ => "schedule",
            };
            if let Err(e) = replication.start(&policy.name, trigger, &by).await {
                tracing::warn!(policy = %policy.name, error = %e, "replication: a run did not start");
            }
        }
    }
    Ok(())
}

/// Per-policy limits shared by the node's tasks: how many run at once and the bandwidth.
#[derive(Default)]
struct Limits {
    running: HashMap<String, usize>,
    throttles: HashMap<String, Arc<Throttle>>,
}

/// Claims and runs tasks.
async fn work(replication: Replication) {
    let limits = Arc::new(Mutex::new(Limits::default()));
    let slots = Arc::new(tokio::sync::Semaphore::new(NODE_TASKS));
    loop {
        let free = slots.available_permits();
        if free > 0 {
            match replication.db.claim_replication_tasks(free, CLAIM_MS).await {
                Ok(tasks) if tasks.is_empty() => {}
                Ok(tasks) => {
                    let policies: HashMap<String, Policy> = match replication.policies().await {
                        Ok(p) => p.into_iter().map(|(p, _)| (p.name.clone(), p)).collect(),
                        Err(e) => {
                            tracing::warn!(error = %e, "replication: reading policies");
                            HashMap::new()
                        }
                    };
                    for task in tasks {
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            break;
                        };
                        let policy = policies.get(&task.policy).cloned();
                        let (replication, limits) = (replication.clone(), limits.clone());
                        tokio::spawn(async move {
                            let ran = run_task(&replication, &limits, task, policy).await;
                            drop(permit);
                            // A task handed back (its policy was at its concurrency)
                            // waits for one that ran, not for itself.
                            if ran {
                                replication.wake.notify_one();
                            }
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "replication: claiming tasks"),
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), replication.wake.notified()).await;
    }
}

/// Runs one task attempt and records its outcome; `false` when it was handed back
/// without an attempt.
async fn run_task(
    replication: &Replication,
    limits: &Arc<Mutex<Limits>>,
    task: TaskRecord,
    policy: Option<Policy>,
) -> bool {
    let Some(policy) = policy else {
        let outcome = TaskOutcome {
            status: TaskStatus::Failed,
            bytes: 0,
            error: "the policy is gone".to_owned(),
            next_attempt_ms: 0,
        };
        let _ = replication
            .db
            .finish_replication_task(task.id, outcome)
            .await;
        return true;
    };
    // Over the policy's concurrency: back in the queue for a moment.
    let throttle = {
        let mut limits = limits.lock().unwrap_or_else(|e| e.into_inner());
        let running = limits.running.entry(policy.name.clone()).or_default();
        if *running >= policy.concurrency {
            None
        } else {
            *running += 1;
            Some(policy.bandwidth.map(|rate| {
                limits
                    .throttles
                    .entry(policy.name.clone())
                    .and_modify(|t| t.set_rate(rate))
                    .or_insert_with(|| Arc::new(Throttle::new(rate)))
                    .clone()
            }))
        }
    };
    let Some(throttle) = throttle else {
        // Back in the queue; a task of this policy ending rings for it.
        let _ = replication.db.release_replication_task(task.id).await;
        return false;
    };
    // The claim is renewed while the task runs.
    let renewing = {
        let (db, id) = (replication.db.clone(), task.id);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(CLAIM_MS as u64 / 3)).await;
                let _ = db.renew_replication_tasks(vec![id], CLAIM_MS).await;
            }
        })
    };
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let result = attempt(replication, &policy, &task, throttle, sent.clone()).await;
    renewing.abort();
    {
        let mut limits = limits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = limits.running.get_mut(&policy.name) {
            *running = running.saturating_sub(1);
        }
    }
    let bytes = sent.load(Ordering::Relaxed);
    replication
        .counters
        .bytes
        .fetch_add(bytes, Ordering::Relaxed);
    let counters = &replication.counters;
    let outcome = match result {
        Ok(Done::Did) => {
            counters.succeeded.fetch_add(1, Ordering::Relaxed);
            TaskOutcome {
                status: TaskStatus::Succeeded,
                bytes,
                error: String::new(),
                next_attempt_ms: 0,
            }
        }
        Ok(Done::Skipped(why)) => {
            counters.skipped.fetch_add(1, Ordering::Relaxed);
            TaskOutcome {
                status: TaskStatus::Skipped,
                bytes,
                error: why,
                next_attempt_ms: 0,
            }
        }
        Err(e) => {
            let age = now_ms() - task.started_ms.unwrap_or_else(now_ms);
            let error = e.to_string();
            if age >= RETRY_HORIZON_MS || permanent(&e) {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(policy = %policy.name, task = task.id, error = %error, "replication: a task failed");
                TaskOutcome {
                    status: TaskStatus::Failed,
                    bytes,
                    error,
                    next_attempt_ms: 0,
                }
            } else {
                counters.retried.fetch_add(1, Ordering::Relaxed);
                let exponent = task.attempts.min(20);
                let pause = (500i64 << exponent).min(MAX_BACKOFF_MS);
                tracing::info!(policy = %policy.name, task = task.id, attempt = task.attempts, error = %error, "replication: a task will be retried");
                TaskOutcome {
                    status: TaskStatus::Pending,
                    bytes,
                    error,
                    next_attempt_ms: now_ms() + pause,
                }
            }
        }
    };
    if let Err(e) = replication
        .db
        .finish_replication_task(task.id, outcome)
        .await
    {
        // The claim lapses and another attempt is made: a copy is safe to repeat.
        tracing::warn!(task = task.id, error = %e, "replication: recording a task's outcome");
    }
    true
}

/// Errors no retry will mend: settings or content the other side refuses for good.
fn permanent(e: &ReplicationError) -> bool {
    matches!(
        e,
        ReplicationError::Invalid(_)
            | ReplicationError::Refused(_)
            | ReplicationError::Remote(ClientError::Mismatch { .. })
            | ReplicationError::Remote(ClientError::BadReference(_))
    )
}

enum Done {
    Did,
    Skipped(String),
}

/// `repository:tag` or `repository@digest`.
fn split(text: &str) -> Result<(RepoName, String), ReplicationError> {
    let (repo, reference) = match text.split_once('@') {
        Some((repo, digest)) => (repo, digest),
        None => text
            .rsplit_once(':')
            .ok_or_else(|| ReplicationError::Invalid(format!("task target {text:?}")))?,
    };
    let repo = RepoName::parse(repo).map_err(|e| ReplicationError::Invalid(e.to_string()))?;
    Reference::parse(reference).map_err(|e| ReplicationError::Invalid(e.to_string()))?;
    Ok((repo, reference.to_owned()))
}

async fn attempt(
    replication: &Replication,
    policy: &Policy,
    task: &TaskRecord,
    throttle: Option<Arc<Throttle>>,
    sent: Arc<std::sync::atomic::AtomicU64>,
) -> Result<Done, ReplicationError> {
    let endpoint = replication.registry_endpoint(&policy.registry).await?;
    let client = replication.client_for(&endpoint)?;
    let (source_repo, source_ref) = split(&task.source)?;
    let (dest_repo, dest_ref) = split(&task.destination)?;
    let by = Actor::system(&format!("replication:{}", policy.name));
    let (local_repo, remote_repo, local_ref, remote_ref) = match policy.direction {
        Direction::Push => (source_repo, dest_repo, source_ref, dest_ref),
        Direction::Pull => (dest_repo, source_repo, dest_ref, source_ref),
    };
    let local = LocalRepo {
        registry: replication.registry.clone(),
        repo: local_repo,
        by,
        throttle,
        unfinished: replication.unfinished.clone(),
    };
    // `split` checked the reference.
    let (tag, digest) = match Reference::parse(&remote_ref) {
        Ok(Reference::Digest(d)) => (None, Some(d)),
        _ => (Some(remote_ref), None),
    };
    let remote_image = ImageRef {
        registry: String::new(),
        repository: remote_repo,
        tag,
        digest,
    };
    let local_end = Endpoint::Local {
        repository: &local,
        reference: local_ref,
    };
    let remote_end = Endpoint::Registry {
        client: &client,
        image: &remote_image,
    };
    let (source, destination) = match policy.direction {
        Direction::Push => (&local_end, &remote_end),
        Direction::Pull => (&remote_end, &local_end),
    };
    if task.operation == "delete" {
        return delete(policy, &local, &client, &remote_image, destination).await;
    }
    let wanted = match source.top_manifest().await {
        Ok(manifest) => manifest,
        Err(ClientError::NotFound(_)) => {
            return Ok(Done::Skipped("gone at the source".to_owned()));
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(why) = policy.filters.refuses_manifest(&wanted.bytes) {
        return Ok(Done::Skipped(format!("filtered: {why}")));
    }
    match destination.top_manifest().await {
        Ok(there) if there.digest == wanted.digest => {
            return Ok(Done::Skipped(format!("up to date at {}", wanted.digest)));
        }
        Ok(there) if !policy.overwrite => {
            return Ok(Done::Skipped(format!(
                "the destination tag points at {}; the policy does not overwrite",
                there.digest
            )));
        }
        Ok(_) | Err(ClientError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let shared = match policy.direction {
        Direction::Push => replication.shared_blobs(&policy.registry),
        Direction::Pull => replication.shared_blobs(""),
    };
    copy(source, destination, &copy_options(&sent, shared)).await?;
    Ok(Done::Did)
}

fn copy_options(
    sent: &Arc<std::sync::atomic::AtomicU64>,
    shared_blobs: Arc<berth_client::SharedBlobs>,
) -> CopyOptions {
    let sent = sent.clone();
    // Bytes read for each blob so far: what moved, resumed uploads included.
    let moved = Mutex::new(HashMap::<berth_oci::Digest, u64>::new());
    CopyOptions {
        platform: None,
        referrers: true,
        shared_blobs: Some(shared_blobs),
        progress: Some(Arc::new(move |event: &Progress| match event {
            Progress::BlobBytes { digest, done, .. } => {
                let mut moved = moved.lock().unwrap_or_else(|e| e.into_inner());
                let before = moved.insert(digest.clone(), *done).unwrap_or(0);
                sent.fetch_add(done.saturating_sub(before), Ordering::Relaxed);
            }
            Progress::BlobDone { digest, .. } => {
                moved
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(digest);
            }
            _ => {}
        })),
    }
}

/// Deletes the destination's tag or manifest (push policies only: a pull policy never
/// deletes here).
async fn delete(
    policy: &Policy,
    local: &LocalRepo,
    client: &RegistryClient,
    remote: &ImageRef,
    destination: &Endpoint<'_>,
) -> Result<Done, ReplicationError> {
    let reference = remote.reference();
    match policy.direction {
        Direction::Push => match client
            .delete_manifest(remote.repository.as_str(), &reference)
            .await
        {
            Ok(true) => Ok(Done::Did),
            Ok(false) => Ok(Done::Skipped("not at the destination".to_owned())),
            // A registry that deletes manifests but not tags (Distribution): the tag's
            // manifest goes, as deleting the tag there can only be done.
            Err(ClientError::Registry {
                status: 400 | 405, ..
            }) if remote.tag.is_some() => {
                let there = match destination.top_manifest().await {
                    Ok(m) => m,
                    Err(ClientError::NotFound(_)) => {
                        return Ok(Done::Skipped("not at the destination".to_owned()))
                    }
                    Err(e) => return Err(e.into()),
                };
                client
                    .delete_manifest(remote.repository.as_str(), there.digest.as_str())
                    .await?;
                Ok(Done::Did)
            }
            Err(e) => Err(e.into()),
        },
        Direction::Pull => Err(ReplicationError::Invalid(format!(
            "pull policy {} does not delete in this registry ({})",
            policy.name, local.repo
        ))),
    }
}

/// A bandwidth limit shared by a policy's tasks: bytes may go only as fast as `rate`
/// per second, measured from when the current busy spell began.
pub(crate) struct Throttle {
    rate: std::sync::atomic::AtomicU64,
    state: Mutex<(Instant, u64)>,
}

impl Throttle {
    fn new(rate: u64) -> Throttle {
        Throttle {
            rate: rate.into(),
            state: Mutex::new((Instant::now(), 0)),
        }
    }

    fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// How long to wait before `bytes` more may go.
    fn delay_for(&self, bytes: u64) -> Duration {
        let rate = self.rate.load(Ordering::Relaxed).max(1);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let due = state.0 + Duration::from_secs_f64(state.1 as f64 / rate as f64);
        // Idle for a while: a new spell starts now (no burst from the idle time).
        if now > due + Duration::from_secs(1) {
            *state = (now, 0);
        }
        state.1 += bytes;
        let due = state.0 + Duration::from_secs_f64(state.1 as f64 / rate as f64);
        due.saturating_duration_since(now)
    }

    /// `stream` at no more than the rate.
    pub(crate) fn limit(
        self: Arc<Self>,
        stream: berth_client::BlobStream,
    ) -> berth_client::BlobStream {
        Box::pin(stream.then(move |chunk| {
            let throttle = self.clone();
            async move {
                if let Ok(bytes) = &chunk {
                    let wait = throttle.delay_for(bytes.len() as u64);
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                chunk
            }
        }))
    }
}
