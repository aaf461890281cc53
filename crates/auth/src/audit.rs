//! The audit trail. Every event goes through one queue, written in batches by one task,
//! so the log's order is the order events happened in. Frequent events (pulls, pushes,
//! logins) do not wait for the write; administrative changes wait until their event is
//! written before the call that made them returns.
//!
//! An event without a change (a pull, a refusal, a failure) that is the same in every
//! field as one still waiting to be written is only counted into that one ([`Tally`]):
//! a client pulling one manifest in a loop costs a lookup per pull, not a record built,
//! queued, merged and freed on another core. Such counted events are also written at
//! most once per [`PACE`]: otherwise the writer took each one as soon as it was queued,
//! and steady pulls cost a durable commit every few milliseconds (80 a second at 60,000
//! pulls a second), with the flusher's wake-ups on the cores serving the pulls.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_meta::{AccountStore, Change, NewAuditEvent};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use crate::policy::Caller;
use crate::time::now_ms;

/// Events queued at most before recording waits for the writer.
const QUEUE: usize = 8192;
/// Events written in one transaction at most.
const BATCH: usize = 512;
/// How long the writer gathers events before writing a batch that is not full, once it
/// is busy: audited pulls arrive by the thousand a second, and a commit of a few rows
/// costs as much as one of hundreds (a profile at 30,000 audited pulls a second had the
/// writer and flusher threads at a quarter of the server's time, committing small
/// batches).
const LINGER: Duration = Duration::from_millis(20);
/// The shortest period between two writes of counted events only (see [`Tally`]): a
/// pull's count reaches the log at most this late, and steady pulls cost ten durable
/// commits a second, not one per commit the disk can make.
const PACE: Duration = Duration::from_millis(100);
/// Events found waiting at once that mean the writer is busy. Below it, each event is
/// written at once: changes are recorded in their own transactions, and an event that
/// waited would land after changes that came later (a login after the push it allowed).
const BUSY: usize = 32;
/// Unwritten events kept at most while the store refuses them (some tens of megabytes).
const MAX_PENDING: usize = 100_000;

/// Outcome of an audited operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It was done.
    Success,
    /// The caller was not allowed.
    Denied,
    /// It was allowed but failed (bad input, missing content, credentials).
    Failed,
}

impl Outcome {
    /// The spelling in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// Builds an event for `caller` now.
pub fn event(
    caller: &Caller,
    action: &str,
    resource: &str,
    outcome: Outcome,
    detail: &str,
) -> NewAuditEvent {
    NewAuditEvent {
        at_ms: now_ms(),
        actor: caller.principal.actor().to_owned(),
        actor_kind: caller.principal.kind().to_owned(),
        address: caller.address.clone(),
        action: action.to_owned(),
        resource: resource.to_owned(),
        result: outcome.as_str().to_owned(),
        detail: detail.to_owned(),
        change: None,
        repeats: 1,
    }
}

/// The most of a claimed login name an event keeps: the name is whatever the client sent.
const MAX_CLAIMED_NAME: usize = 256;

/// A login attempt's event: the actor is the name claimed, not (yet) proven (and cut to
/// [`MAX_CLAIMED_NAME`] bytes).
pub fn login_event(name: &str, address: &str, outcome: Outcome, detail: &str) -> NewAuditEvent {
    let mut end = name.len().min(MAX_CLAIMED_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let name = &name[..end];
    NewAuditEvent {
        at_ms: now_ms(),
        actor: name.to_owned(),
        actor_kind: "unauthenticated".to_owned(),
        address: address.to_owned(),
        action: "login".to_owned(),
        resource: name.to_owned(),
        result: outcome.as_str().to_owned(),
        detail: detail.to_owned(),
        change: Some(match outcome {
            Outcome::Success => Change::LoginSucceeded {
                name: name.to_owned(),
            },
            Outcome::Denied | Outcome::Failed => Change::LoginFailed {
                name: name.to_owned(),
                reason: detail.to_owned(),
            },
        }),
        repeats: 1,
    }
}

/// Identical records without a change among `records`, as one record each with their
/// count (`repeats`), at the first one's time and place in the order. Only for a busy
/// batch: a client pulling one manifest in a loop, or failing one login in a loop, then
/// adds a row per batch instead of one per request, and nothing is lost but the spacing.
/// Records with a change are never merged: webhooks and replication read each.
fn coalesce(records: impl Iterator<Item = NewAuditEvent>) -> Vec<NewAuditEvent> {
    let mut out: Vec<NewAuditEvent> = Vec::new();
    // By a hash of the fields; a collision only costs a merge not made.
    let mut first: HashMap<u64, usize> = HashMap::new();
    for record in records {
        if record.change.is_none() {
            let key = key_of(&fields(&record));
            match first.get(&key) {
                Some(&at) if fields(&out[at]) == fields(&record) => {
                    out[at].repeats += record.repeats;
                    continue;
                }
                Some(_) => {}
                None => {
                    first.insert(key, out.len());
                }
            }
        }
        out.push(record);
    }
    out
}

/// The fields that make two records the same (all but the time, the change and the count).
fn fields(e: &NewAuditEvent) -> [&str; 7] {
    [
        &e.actor,
        &e.actor_kind,
        &e.address,
        &e.action,
        &e.resource,
        &e.result,
        &e.detail,
    ]
    .map(String::as_str)
}

/// A hash of [`fields`]; equal keys are compared field by field before records merge.
///
/// Eight bytes a step, unkeyed (SipHash over the ~250 bytes of an audited pull was half
/// of what counting it cost). A collision, even a forced one, only makes an event queue
/// on its own, as an event with a different resource would.
fn key_of(fields: &[&str; 7]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut hash = 0u64;
    let mut mix = |word: u64| hash = (hash.rotate_left(5) ^ word).wrapping_mul(K);
    for field in fields {
        let mut words = field.as_bytes().chunks_exact(8);
        for word in &mut words {
            mix(u64::from_le_bytes(word.try_into().unwrap_or_default()));
        }
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        mix(u64::from_le_bytes(tail));
        // The length ends the field, so that bytes cannot move from one field to the next.
        mix(field.len() as u64);
    }
    hash
}

/// Change-less events queued and not yet written, by [`key_of`] their fields, each with
/// how many identical ones were counted into it meanwhile. An entry lives from its event's
/// queueing to its writing, so there are never more than the queue holds.
#[derive(Default)]
struct Tally {
    waiting: Mutex<HashMap<u64, Counted>>,
}

/// A queued event (a copy, for the comparison) and its count so far.
struct Counted {
    first: NewAuditEvent,
    count: u64,
}

impl Tally {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Counted>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The highest count among the batch's tallied events: a high one means the log is
    /// busy, as a long queue does.
    fn highest(&self, batch: &[Queued]) -> u64 {
        let waiting = self.lock();
        batch
            .iter()
            .filter_map(|q| q.tallied.and_then(|key| waiting.get(&key)))
            .map(|c| c.count)
            .max()
            .unwrap_or(0)
    }

    /// Takes the batch's events out of the tally, with their final counts: an identical
    /// event from now on is queued anew.
    fn settle(&self, batch: &mut [Queued]) {
        let mut waiting = self.lock();
        for queued in batch.iter_mut() {
            if let (Some(event), Some(key)) = (&mut queued.event, queued.tallied) {
                if let Some(counted) = waiting.remove(&key) {
                    event.repeats = counted.count;
                }
            }
        }
    }
}

/// Where events go.
#[derive(Clone)]
pub(crate) struct AuditLog {
    queue: mpsc::Sender<Queued>,
    tally: Arc<Tally>,
    /// Told when anything but a counted event is queued: it ends the writer's wait for
    /// more counted ones, so that a login is never written after the push it allowed.
    urgent: Arc<Notify>,
}

/// What the writer is sent.
struct Queued {
    /// `None`: a flush, answered once everything queued before it is written.
    event: Option<NewAuditEvent>,
    /// The event's key in the [`Tally`], if identical ones are counted into it.
    tallied: Option<u64>,
    /// Whom to tell once it is written.
    done: Option<oneshot::Sender<()>>,
}

impl AuditLog {
    /// Starts the writer task on the current runtime. Events that cannot be written (the
    /// store is down, the disk is full) are kept and written again, oldest first, once
    /// the store takes them; only past [`MAX_PENDING`] unwritten events are the oldest
    /// dropped (and counted in the log), so memory stays bounded.
    pub(crate) fn start(store: Arc<dyn AccountStore>) -> Self {
        let (queue, mut events) = mpsc::channel::<Queued>(QUEUE);
        let tally = Arc::new(Tally::default());
        let counted = tally.clone();
        let urgent = Arc::new(Notify::new());
        let woken = urgent.clone();
        tokio::spawn(async move {
            let mut batch: Vec<Queued> = Vec::with_capacity(BATCH);
            let mut pending: VecDeque<NewAuditEvent> = VecDeque::new();
            let mut retry = Duration::from_millis(250);
            let mut last_write: Option<Instant> = None;
            loop {
                let received = if pending.is_empty() {
                    events.recv_many(&mut batch, BATCH).await
                } else {
                    // Unwritten events: try again after a pause, or sooner with new ones.
                    match tokio::time::timeout(retry, events.recv_many(&mut batch, BATCH)).await {
                        Ok(n) => n,
                        Err(_) => usize::MAX,
                    }
                };
                if received == 0 {
                    break;
                }
                let flushing = batch.iter().any(|q| q.done.is_some());
                let busy = batch.len() >= BUSY || counted.highest(&batch) >= BUSY as u64;
                // Only counted events, and the last write was a moment ago: they wait
                // for its period to end (or for an event that must not wait).
                let paced = last_write.map(|at| at + PACE).filter(|due| {
                    *due > Instant::now() && batch.iter().all(|q| q.tallied.is_some())
                });
                if received != usize::MAX
                    && batch.len() < BATCH
                    && !flushing
                    && (busy || paced.is_some())
                {
                    match paced {
                        Some(due) => {
                            tokio::select! {
                                () = tokio::time::sleep_until(due) => {}
                                () = woken.notified() => {}
                            }
                        }
                        None => tokio::time::sleep(LINGER).await,
                    }
                    while batch.len() < BATCH {
                        match events.try_recv() {
                            Ok(queued) => batch.push(queued),
                            Err(_) => break,
                        }
                    }
                }
                counted.settle(&mut batch);
                let (records, waiting): (Vec<_>, Vec<_>) =
                    batch.drain(..).map(|q| (q.event, q.done)).unzip();
                let records = records.into_iter().flatten();
                if busy {
                    pending.extend(coalesce(records));
                } else {
                    pending.extend(records);
                }
                let overflow = pending.len().saturating_sub(MAX_PENDING);
                if overflow > 0 {
                    pending.drain(..overflow);
                    tracing::error!(
                        dropped = overflow,
                        "audit events dropped: the store has refused them for too long"
                    );
                }
                // A batch of flushes only has nothing to write.
                if !pending.is_empty() {
                    last_write = Some(Instant::now());
                    let records: Arc<[NewAuditEvent]> = pending.drain(..).collect();
                    match store.append_audit(records.clone()).await {
                        Ok(()) => retry = Duration::from_millis(250),
                        Err(e) => {
                            // Copied back only when it failed: the usual path moves them.
                            pending.extend(records.iter().cloned());
                            tracing::error!(error = %e, kept = pending.len(), "writing the audit log failed; the events are kept and written again");
                            retry = (retry * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                for done in waiting.into_iter().flatten() {
                    let _ = done.send(());
                }
            }
        });
        AuditLog {
            queue,
            tally,
            urgent,
        }
    }

    /// Queues an event; waits only if the writer is far behind.
    pub(crate) async fn record(&self, event: NewAuditEvent) {
        self.send(Some(event), None, None).await;
    }

    /// Queues [`event`]`(caller, …)`, or counts it into an identical one still waiting
    /// (see [`Tally`]): for events without a change.
    pub(crate) async fn count(
        &self,
        caller: &Caller,
        action: &str,
        resource: &str,
        outcome: Outcome,
        detail: &str,
    ) {
        let fields = [
            caller.principal.actor(),
            caller.principal.kind(),
            &caller.address,
            action,
            resource,
            outcome.as_str(),
            detail,
        ];
        let key = key_of(&fields);
        // `Some(key)`: the event is new to the tally; `None`: another event under the same
        // key is waiting, and this one is queued on its own.
        let tallied = {
            let mut waiting = self.tally.lock();
            match waiting.get_mut(&key) {
                Some(counted) if self::fields(&counted.first) == fields => {
                    counted.count += 1;
                    return;
                }
                Some(_) => None,
                None => {
                    let first = event(caller, action, resource, outcome, detail);
                    waiting.insert(key, Counted { first, count: 1 });
                    Some(key)
                }
            }
        };
        // Boxed: the tally above answers almost every call, and without the queue's
        // future inline a request that counts its pull keeps a small future of its own.
        let record = event(caller, action, resource, outcome, detail);
        Box::pin(self.queue_counted(record, tallied)).await;
    }

    /// Queues an event `count` could not add to a waiting one.
    async fn queue_counted(&self, record: NewAuditEvent, tallied: Option<u64>) {
        if !self.send(Some(record), tallied, None).await {
            if let Some(key) = tallied {
                self.tally.lock().remove(&key);
            }
        }
    }

    /// Puts one item on the queue; `false` if the writer is gone.
    async fn send(
        &self,
        event: Option<NewAuditEvent>,
        tallied: Option<u64>,
        done: Option<oneshot::Sender<()>>,
    ) -> bool {
        let queued = Queued {
            event,
            tallied,
            done,
        };
        let sent = self.queue.send(queued).await.is_ok();
        if tallied.is_none() {
            self.urgent.notify_one();
        }
        if !sent {
            tracing::error!("audit log writer stopped");
        }
        sent
    }

    /// Waits until every event queued so far is written (at shutdown).
    pub(crate) async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.send(None, None, Some(done)).await {
            let _ = written.await;
        }
    }

    /// Queues an event and waits until it is written.
    pub(crate) async fn record_now(&self, event: NewAuditEvent) {
        let (done, written) = oneshot::channel();
        if !self.send(Some(event), None, Some(done)).await || written.await.is_err() {
            tracing::error!("audit log writer stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_meta::{AuditFilter, Database};

    /// Up to 100 records of the log, newest first.
    async fn newest_first(store: &Database) -> Vec<berth_meta::AuditRecord> {
        let all = AuditFilter {
            limit: 100,
            ..AuditFilter::default()
        };
        store.audit(all).await.unwrap()
    }

    fn pull(actor: &str, resource: &str) -> NewAuditEvent {
        NewAuditEvent {
            at_ms: now_ms(),
            actor: actor.into(),
            actor_kind: "user".into(),
            address: "127.0.0.1".into(),
            action: "pull".into(),
            resource: resource.into(),
            result: "success".into(),
            detail: String::new(),
            change: None,
            repeats: 1,
        }
    }

    #[test]
    fn keys_tell_fields_apart_where_bytes_shift_between_them() {
        let key = |first: &str, second: &str| key_of(&[first, second, "", "", "", "", ""]);
        assert_eq!(key("alice", "pull"), key("alice", "pull"));
        assert_ne!(key("alice", "pull"), key("alicep", "ull"));
        // A field ending in zero bytes is not the shorter one padded.
        assert_ne!(key("a", ""), key("a\0", ""));
        assert_ne!(key("abcdefgh", ""), key("abcdefgh\0", ""));
        assert_ne!(key("abcdefgh", "i"), key("abcdefghi", ""));
        assert_ne!(key("", "x"), key("x", ""));
    }

    #[test]
    fn identical_records_are_counted_once_and_changes_never_merged() {
        let login = login_event("alice", "127.0.0.1", Outcome::Success, "");
        let records = vec![
            pull("alice", "app:v1"),
            login.clone(),
            pull("alice", "app:v1"),
            pull("bob", "app:v1"),
            login.clone(),
            pull("alice", "app:v2"),
            pull("alice", "app:v1"),
        ];
        let merged = coalesce(records.into_iter());
        let seen: Vec<(&str, &str, &str, u64)> = merged
            .iter()
            .map(|e| {
                let what = (e.actor.as_str(), e.action.as_str());
                (what.0, what.1, e.resource.as_str(), e.repeats)
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("alice", "pull", "app:v1", 3),
                ("alice", "login", "alice", 1),
                ("bob", "pull", "app:v1", 1),
                ("alice", "login", "alice", 1),
                ("alice", "pull", "app:v2", 1),
            ]
        );
    }

    /// A flood of one client's identical pulls costs a few rows, and every pull is
    /// counted; a quiet sequence keeps one row per event.
    #[tokio::test]
    async fn a_busy_batch_is_written_counted_and_a_quiet_one_row_by_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Database::open_sqlite(&dir.path().join("meta.db")).unwrap());
        let log = AuditLog::start(store.clone());
        // Queued before the writer runs (this runtime has one thread): one busy batch.
        for _ in 0..300 {
            log.record(pull("alice", "app:v1")).await;
        }
        log.record(pull("bob", "app:v1")).await;
        log.flush().await;
        let all = AuditFilter {
            limit: 100,
            ..AuditFilter::default()
        };
        let rows = store.audit(all.clone()).await.unwrap();
        let counts: Vec<(String, u64)> = rows
            .iter()
            .map(|r| (r.event.actor.clone(), r.event.repeats))
            .collect();
        assert_eq!(counts, [("bob".into(), 1), ("alice".into(), 300)]);

        // One at a time, each written before the next: nothing is merged.
        for _ in 0..3 {
            log.record(pull("carol", "app:v1")).await;
            log.flush().await;
        }
        let carol = store
            .audit(AuditFilter {
                actor: Some("carol".into()),
                ..all
            })
            .await
            .unwrap();
        assert_eq!(carol.len(), 3);
        assert!(carol.iter().all(|r| r.event.repeats == 1));
    }

    /// Pulls counted where they happen: identical ones while the first waits are one row
    /// with their number, different ones (another resource, another outcome) rows of
    /// their own, and a pull made after the last one was written a row of its own.
    #[tokio::test]
    async fn pulls_are_counted_into_the_one_still_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Database::open_sqlite(&dir.path().join("meta.db")).unwrap());
        let log = AuditLog::start(store.clone());
        let dave = Caller {
            principal: crate::policy::Principal::User {
                id: 7,
                name: "dave".into(),
                admin: false,
            },
            proof: crate::policy::Proof::Password,
            address: "10.0.0.7".into(),
        };
        // Counted before the writer runs (this runtime has one thread).
        for _ in 0..250 {
            log.count(&dave, "pull", "app:v1", Outcome::Success, "sha256:aa")
                .await;
        }
        assert_eq!(
            QUEUE - log.queue.capacity(),
            1,
            "one event queued for 250 pulls"
        );
        log.count(&dave, "pull", "app:v2", Outcome::Success, "sha256:bb")
            .await;
        for _ in 0..5 {
            log.count(&dave, "pull", "app:v1", Outcome::Denied, "no")
                .await;
        }
        log.flush().await;
        log.count(&dave, "pull", "app:v1", Outcome::Success, "sha256:aa")
            .await;
        log.flush().await;
        let rows = newest_first(&store).await;
        let mut seen: Vec<(String, String, String, u64)> = rows
            .iter()
            .map(|r| {
                let e = &r.event;
                (
                    e.resource.clone(),
                    e.result.clone(),
                    e.detail.clone(),
                    e.repeats,
                )
            })
            .collect();
        seen.sort();
        let row = |resource: &str, result: &str, detail: &str, repeats| {
            (resource.into(), result.into(), detail.into(), repeats)
        };
        assert_eq!(
            seen,
            [
                row("app:v1", "denied", "no", 5),
                row("app:v1", "success", "sha256:aa", 1),
                row("app:v1", "success", "sha256:aa", 250),
                row("app:v2", "success", "sha256:bb", 1),
            ]
        );
        assert!(rows.iter().all(|r| r.event.actor == "dave"));
        assert!(log.tally.lock().is_empty(), "nothing left waiting");
    }

    #[tokio::test]
    async fn steady_pulls_are_written_once_per_pace_and_a_login_does_not_wait_behind_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Database::open_sqlite(&dir.path().join("meta.db")).unwrap());
        let log = AuditLog::start(store.clone());
        let erin = Caller::anonymous("10.0.0.9");
        let started = Instant::now();
        // A pull every few milliseconds: each would be written on its own, unpaced.
        for _ in 0..40 {
            log.count(&erin, "pull", "app:v1", Outcome::Success, "sha256:aa")
                .await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        log.record_now(login_event("erin", "10.0.0.9", Outcome::Success, ""))
            .await;
        let rows = newest_first(&store).await;
        let (logins, pulls): (Vec<_>, Vec<_>) =
            rows.iter().partition(|r| r.event.action == "login");
        assert_eq!(logins.len(), 1);
        assert_eq!(pulls.iter().map(|r| r.event.repeats).sum::<u64>(), 40);
        // At most one write per pace, whatever the machine's speed: the first pull is
        // written at once, then one row per period at most (and the one the login cut short).
        let periods = (elapsed.as_millis() / PACE.as_millis()) as usize;
        assert!(
            pulls.len() <= periods + 2,
            "{} rows in {elapsed:?}",
            pulls.len()
        );
        // Newest first: the login came after every pull.
        assert_eq!(rows[0].event.action, "login");
    }
}
