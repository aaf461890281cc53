//! The audit trail. Every event goes through one queue, written in batches by one task,
//! so the log's order is the order events happened in. Frequent events (pulls, pushes,
//! logins) do not wait for the write; administrative changes wait until their event is
//! written before the call that made them returns.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use berth_meta::{AccountStore, Change, NewAuditEvent};
use tokio::sync::{mpsc, oneshot};

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
    use std::collections::HashMap;
    use std::hash::{Hash, Hasher};
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
    let mut out: Vec<NewAuditEvent> = Vec::new();
    // By a hash of the fields; a collision only costs a merge not made.
    let mut first: HashMap<u64, usize> = HashMap::new();
    for record in records {
        if record.change.is_none() {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            fields(&record).hash(&mut hasher);
            let key = hasher.finish();
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

/// Where events go.
#[derive(Clone)]
pub(crate) struct AuditLog {
    queue: mpsc::Sender<Queued>,
}

/// An event, and whom to tell once it is written.
/// `None` as the event is a flush: answered once everything queued before it is written.
type Queued = (Option<NewAuditEvent>, Option<oneshot::Sender<()>>);

impl AuditLog {
    /// Starts the writer task on the current runtime. Events that cannot be written (the
    /// store is down, the disk is full) are kept and written again, oldest first, once
    /// the store takes them; only past [`MAX_PENDING`] unwritten events are the oldest
    /// dropped (and counted in the log), so memory stays bounded.
    pub(crate) fn start(store: Arc<dyn AccountStore>) -> Self {
        let (queue, mut events) = mpsc::channel::<Queued>(QUEUE);
        tokio::spawn(async move {
            let mut batch: Vec<Queued> = Vec::with_capacity(BATCH);
            let mut pending: VecDeque<NewAuditEvent> = VecDeque::new();
            let mut retry = Duration::from_millis(250);
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
                let flushing = batch.iter().any(|(_, waiting)| waiting.is_some());
                if received != usize::MAX && (BUSY..BATCH).contains(&batch.len()) && !flushing {
                    tokio::time::sleep(LINGER).await;
                    while batch.len() < BATCH {
                        match events.try_recv() {
                            Ok(queued) => batch.push(queued),
                            Err(_) => break,
                        }
                    }
                }
                let busy = batch.len() >= BUSY;
                let (records, waiting): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
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
        AuditLog { queue }
    }

    /// Queues an event; waits only if the writer is far behind.
    pub(crate) async fn record(&self, event: NewAuditEvent) {
        if self.queue.send((Some(event), None)).await.is_err() {
            tracing::error!("audit log writer stopped");
        }
    }

    /// Waits until every event queued so far is written (at shutdown).
    pub(crate) async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.queue.send((None, Some(done))).await.is_ok() {
            let _ = written.await;
        }
    }

    /// Queues an event and waits until it is written.
    pub(crate) async fn record_now(&self, event: NewAuditEvent) {
        let (done, written) = oneshot::channel();
        if self.queue.send((Some(event), Some(done))).await.is_err() || written.await.is_err() {
            tracing::error!("audit log writer stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_meta::{AuditFilter, Database};

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
}
