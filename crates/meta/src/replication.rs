//! Replication's work: what the endpoints and policies (`replication_config`) make. An
//! execution is one run of a policy; its tasks are the tags to copy or delete, each
//! retried until it succeeds or gives up. Event-triggered tasks are written in the
//! transaction that advances the event consumer's cursor, so a change is queued exactly
//! once however often a node dies; a task is claimed for a while and a claim that lapsed
//! (its node died) is taken again.

use async_trait::async_trait;

use crate::engine::{args, owned, Durability, Row, Tx};
use crate::events::record;
use crate::{now, Actor, Change, Database, MetaError, ReplicationConfigStore};

/// A tag to copy or delete, as a run plans it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    /// `copy` or `delete`.
    pub operation: String,
    /// `repository:tag` (or `repository@digest`) where the image is.
    pub source: String,
    /// `repository:tag` where it goes.
    pub destination: String,
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    /// Waiting for its turn (or for its next attempt).
    Pending,
    /// A node is working on it.
    Running,
    /// Done.
    Succeeded,
    /// Given up on; the error says why.
    Failed,
    /// Nothing to do (the destination had it, or a rule said to leave it).
    Skipped,
}

impl TaskStatus {
    /// The word stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Skipped => "skipped",
        }
    }

    fn parse(word: &str) -> Result<Self, MetaError> {
        Ok(match word {
            "pending" => TaskStatus::Pending,
            "running" => TaskStatus::Running,
            "succeeded" => TaskStatus::Succeeded,
            "failed" => TaskStatus::Failed,
            "skipped" => TaskStatus::Skipped,
            other => return Err(MetaError::Corrupt(format!("task status {other:?}"))),
        })
    }
}

/// One task as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    /// Its id.
    pub id: i64,
    /// Its execution.
    pub execution_id: i64,
    /// Its policy.
    pub policy: String,
    /// `copy` or `delete`.
    pub operation: String,
    /// Where the image is.
    pub source: String,
    /// Where it goes.
    pub destination: String,
    /// Where it stands.
    pub status: TaskStatus,
    /// Attempts so far.
    pub attempts: u32,
    /// When the next attempt is due, ms since the epoch.
    pub next_attempt_ms: i64,
    /// Blob bytes sent.
    pub bytes: u64,
    /// What went wrong last (empty if nothing did), or why it was skipped.
    pub error: String,
    /// A line per attempt: when, how it ended, why (the last 8 KiB).
    pub log: String,
    /// When the first attempt began.
    pub started_ms: Option<i64>,
    /// When it ended.
    pub ended_ms: Option<i64>,
}

/// The result of one attempt at a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskOutcome {
    /// Where it stands now: `Pending` (to retry at `next_attempt_ms`), or final.
    pub status: TaskStatus,
    /// Blob bytes this attempt sent.
    pub bytes: u64,
    /// What went wrong, or why it was skipped.
    pub error: String,
    /// When to try again, for `Pending`.
    pub next_attempt_ms: i64,
}

/// One run of a policy, with its tasks counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionRecord {
    /// Its id.
    pub id: i64,
    /// Its policy.
    pub policy: String,
    /// `manual`, `schedule`, `event` or `reconcile`.
    pub triggered_by: String,
    /// `running`, `succeeded` or `failed`.
    pub status: String,
    /// When it was created.
    pub created_ms: i64,
    /// When its last task ended.
    pub ended_ms: Option<i64>,
    /// Tasks in all.
    pub tasks: u64,
    /// Tasks that succeeded.
    pub succeeded: u64,
    /// Tasks that failed.
    pub failed: u64,
    /// Tasks skipped.
    pub skipped: u64,
    /// Blob bytes sent by all its tasks.
    pub bytes: u64,
}

/// The work replication policies make: executions and their tasks. The endpoints and
/// policies themselves are [`ReplicationConfigStore`].
#[async_trait]
pub trait ReplicationStore: ReplicationConfigStore {
    /// Creates an execution of `policy` with its tasks (none: it ends at once); the
    /// audit log records who started it. Returns its id.
    async fn start_replication(
        &self,
        policy: &str,
        triggered_by: &str,
        tasks: Vec<NewTask>,
        by: &Actor,
    ) -> Result<i64, MetaError>;
    /// Event-triggered work: one execution per policy with tasks, created in the
    /// transaction that advances the `consumer` cursor to `position`; false (nothing
    /// written) unless `holder` still holds the cursor.
    async fn enqueue_replication(
        &self,
        consumer: &str,
        holder: &str,
        position: i64,
        runs: Vec<(String, Vec<NewTask>)>,
    ) -> Result<bool, MetaError>;
    /// Claims up to `limit` due tasks for `lease_ms`: pending ones whose time came and
    /// running ones whose claim lapsed, never one behind an open earlier task of the same
    /// policy and destination (so a push and a later delete of a tag stay in order).
    async fn claim_replication_tasks(
        &self,
        limit: usize,
        lease_ms: i64,
    ) -> Result<Vec<TaskRecord>, MetaError>;
    /// Extends the claim on tasks still being worked on.
    async fn renew_replication_tasks(&self, ids: Vec<i64>, lease_ms: i64) -> Result<(), MetaError>;
    /// Hands a claimed task back untouched (the node had no room for it): pending again,
    /// the claim's attempt not counted.
    async fn release_replication_task(&self, id: i64) -> Result<(), MetaError>;
    /// Records an attempt's outcome; ends the execution when it was its last open task.
    async fn finish_replication_task(&self, id: i64, outcome: TaskOutcome)
        -> Result<(), MetaError>;
    /// Forgets executions (with their tasks) that ended before `cutoff_ms`; how many.
    async fn prune_replication(&self, cutoff_ms: i64) -> Result<u64, MetaError>;
    /// A policy's executions, newest first, at most `limit`.
    async fn replication_executions(
        &self,
        policy: &str,
        limit: usize,
    ) -> Result<Vec<ExecutionRecord>, MetaError>;
    /// An execution's tasks, in order.
    async fn replication_tasks(&self, execution: i64) -> Result<Vec<TaskRecord>, MetaError>;
    /// Open tasks (pending or running) per policy, for the metrics.
    async fn replication_backlog(&self) -> Result<Vec<(String, u64)>, MetaError>;
}

/// The longest error kept per task.
const MAX_ERROR: usize = 2048;
/// The most of a task's log kept (its latest lines).
const MAX_LOG: usize = 8192;

/// `text` cut to at most `max` bytes, at a character boundary.
fn bounded(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The last at most `max` bytes of `text`, from a line start when one is in reach.
fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let kept = &text[start..];
    kept.find('\n')
        .map_or(kept, |newline| &kept[newline + 1..])
        .to_owned()
}

macro_rules! task_columns {
    () => {
        "id, execution_id, policy, operation, source, destination, status, attempts,
         next_attempt_at, bytes, error, log, started_at, ended_at"
    };
}

fn task_row(mut r: Row) -> Result<TaskRecord, MetaError> {
    Ok(TaskRecord {
        id: r.int(0)?,
        execution_id: r.int(1)?,
        policy: r.text(2)?,
        operation: r.text(3)?,
        source: r.text(4)?,
        destination: r.text(5)?,
        status: TaskStatus::parse(&r.text(6)?)?,
        attempts: u32::try_from(r.int(7)?).unwrap_or(u32::MAX),
        next_attempt_ms: r.int(8)?,
        bytes: r.size(9)?,
        error: r.text(10)?,
        log: r.text(11)?,
        started_ms: r.opt_int(12)?,
        ended_ms: r.opt_int(13)?,
    })
}

/// Writes an execution and its tasks; an execution without tasks ends at once.
fn insert_execution(
    tx: &mut dyn Tx,
    policy: &str,
    triggered_by: &str,
    tasks: &[NewTask],
) -> Result<i64, MetaError> {
    let at = now();
    let (status, ended) = if tasks.is_empty() {
        ("succeeded", Some(at))
    } else {
        ("running", None)
    };
    let id = tx
        .query_one(
            "INSERT INTO replication_executions (policy, triggered_by, status, created_at, ended_at)
             VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
            args![policy, triggered_by, status, at, ended],
        )?
        .int(0)?;
    for task in tasks {
        tx.execute(
            "INSERT INTO replication_tasks (execution_id, policy, operation, source, destination,
               status, attempts, next_attempt_at, bytes, error, log)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, 0, '', '')",
            args![
                id,
                policy,
                &task.operation,
                &task.source,
                &task.destination,
                at
            ],
        )?;
    }
    Ok(id)
}

#[async_trait]
impl ReplicationStore for Database {
    async fn start_replication(
        &self,
        policy: &str,
        triggered_by: &str,
        tasks: Vec<NewTask>,
        by: &Actor,
    ) -> Result<i64, MetaError> {
        let (policy, triggered_by, by) = (policy.to_owned(), triggered_by.to_owned(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                if !tx.exists(
                    "SELECT 1 FROM replication_policies WHERE name = ?1",
                    args![&policy],
                )? {
                    return Err(MetaError::NotFound(format!("replication policy {policy}")));
                }
                let id = insert_execution(tx, &policy, &triggered_by, &tasks)?;
                let change = Change::ReplicationStarted {
                    policy: policy.clone(),
                    execution: id,
                    trigger: triggered_by.clone(),
                };
                record(tx, &by, &[change])?;
                Ok(id)
            })
            .await
    }

    async fn enqueue_replication(
        &self,
        consumer: &str,
        holder: &str,
        position: i64,
        runs: Vec<(String, Vec<NewTask>)>,
    ) -> Result<bool, MetaError> {
        let (consumer, holder) = (consumer.to_owned(), holder.to_owned());
        self.engine
            .write(Durability::Synced, move |tx| {
                if !crate::events::advance_cursor_in(tx, &consumer, &holder, position)? {
                    return Ok(false);
                }
                for (policy, tasks) in &runs {
                    // A policy removed meanwhile gets nothing.
                    let exists = tx.exists(
                        "SELECT 1 FROM replication_policies WHERE name = ?1",
                        args![policy],
                    )?;
                    if exists && !tasks.is_empty() {
                        insert_execution(tx, policy, "event", tasks)?;
                    }
                }
                Ok(true)
            })
            .await
    }

    async fn claim_replication_tasks(
        &self,
        limit: usize,
        lease_ms: i64,
    ) -> Result<Vec<TaskRecord>, MetaError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.engine
            .write(Durability::Synced, move |tx| {
                let at = now();
                let due = tx.query_map(
                    concat!(
                        "SELECT ",
                        task_columns!(),
                        " FROM replication_tasks t
                     WHERE ((t.status = 'pending' AND t.next_attempt_at <= ?1)
                            OR (t.status = 'running' AND t.claimed_until < ?1))
                       AND NOT EXISTS (SELECT 1 FROM replication_tasks e
                            WHERE e.policy = t.policy AND e.destination = t.destination
                              AND e.id < t.id AND e.status IN ('pending', 'running'))
                     ORDER BY t.id LIMIT ?2"
                    ),
                    args![at, limit],
                    task_row,
                )?;
                let mut claimed = Vec::new();
                for mut task in due {
                    // Another node may have claimed it between the look and now.
                    let taken = tx.execute(
                        "UPDATE replication_tasks SET status = 'running', claimed_until = ?2,
                           attempts = attempts + 1, started_at = COALESCE(started_at, ?3)
                         WHERE id = ?1 AND (status = 'pending' OR (status = 'running' AND claimed_until < ?3))",
                        args![task.id, at + lease_ms, at],
                    )?;
                    if taken == 1 {
                        task.status = TaskStatus::Running;
                        task.attempts += 1;
                        task.started_ms.get_or_insert(at);
                        claimed.push(task);
                    }
                }
                Ok(claimed)
            })
            .await
    }

    async fn renew_replication_tasks(&self, ids: Vec<i64>, lease_ms: i64) -> Result<(), MetaError> {
        self.engine
            .write(Durability::Visible, move |tx| {
                let until = now() + lease_ms;
                for id in &ids {
                    tx.execute(
                        "UPDATE replication_tasks SET claimed_until = ?2 WHERE id = ?1 AND status = 'running'",
                        args![*id, until],
                    )?;
                }
                Ok(())
            })
            .await
    }

    async fn release_replication_task(&self, id: i64) -> Result<(), MetaError> {
        let sql = "UPDATE replication_tasks SET status = 'pending', claimed_until = NULL,
                     attempts = attempts - 1,
                     started_at = CASE WHEN attempts = 1 THEN NULL ELSE started_at END
                   WHERE id = ?1 AND status = 'running'";
        self.write_statement(Durability::Visible, sql, owned![id])
            .await
            .map(drop)
    }

    async fn finish_replication_task(
        &self,
        id: i64,
        outcome: TaskOutcome,
    ) -> Result<(), MetaError> {
        self.engine
            .write(Durability::Synced, move |tx| {
                let at = now();
                let ended = (outcome.status != TaskStatus::Pending).then_some(at);
                let bytes = i64::try_from(outcome.bytes).unwrap_or(i64::MAX);
                let Some(mut current) = tx.query_opt(
                    "SELECT attempts, log FROM replication_tasks WHERE id = ?1",
                    args![id],
                )?
                else {
                    return Ok(()); // its policy was removed meanwhile
                };
                let (attempts, log) = (current.int(0)?, current.text(1)?);
                // Errors come from other registries: bounded before they are kept.
                let error = bounded(&outcome.error, MAX_ERROR);
                let line = format!(
                    "{} attempt {attempts}: {}{}{}\n",
                    berth_oci::time::rfc3339(at),
                    outcome.status.as_str(),
                    if error.is_empty() { "" } else { ": " },
                    error
                );
                let log = tail(&(log + &line), MAX_LOG);
                let execution = tx.query_opt(
                    "UPDATE replication_tasks SET status = ?2, bytes = bytes + ?3, error = ?4,
                       next_attempt_at = ?5, claimed_until = NULL, ended_at = ?6, log = ?7
                     WHERE id = ?1 RETURNING execution_id",
                    args![
                        id,
                        outcome.status.as_str(),
                        bytes,
                        error,
                        outcome.next_attempt_ms,
                        ended,
                        &log
                    ],
                )?;
                let Some(mut execution) = execution else {
                    return Ok(()); // its policy was removed meanwhile
                };
                let execution = execution.int(0)?;
                let open = tx.exists(
                    "SELECT 1 FROM replication_tasks WHERE execution_id = ?1 AND status IN ('pending', 'running')",
                    args![execution],
                )?;
                if !open {
                    let failed = tx.exists(
                        "SELECT 1 FROM replication_tasks WHERE execution_id = ?1 AND status = 'failed'",
                        args![execution],
                    )?;
                    let status = if failed { "failed" } else { "succeeded" };
                    tx.execute(
                        "UPDATE replication_executions SET status = ?2, ended_at = ?3 WHERE id = ?1",
                        args![execution, status, at],
                    )?;
                }
                Ok(())
            })
            .await
    }

    async fn prune_replication(&self, cutoff_ms: i64) -> Result<u64, MetaError> {
        self.engine
            .write(Durability::Synced, move |tx| {
                tx.execute(
                    "DELETE FROM replication_tasks WHERE execution_id IN
                       (SELECT id FROM replication_executions WHERE ended_at < ?1)",
                    args![cutoff_ms],
                )?;
                tx.execute(
                    "DELETE FROM replication_executions WHERE ended_at < ?1",
                    args![cutoff_ms],
                )
            })
            .await
    }

    async fn replication_executions(
        &self,
        policy: &str,
        limit: usize,
    ) -> Result<Vec<ExecutionRecord>, MetaError> {
        let sql = "SELECT e.id, e.policy, e.triggered_by, e.status, e.created_at, e.ended_at,
                     COUNT(t.id),
                     CAST(COALESCE(SUM(CASE WHEN t.status = 'succeeded' THEN 1 ELSE 0 END), 0) AS BIGINT),
                     CAST(COALESCE(SUM(CASE WHEN t.status = 'failed' THEN 1 ELSE 0 END), 0) AS BIGINT),
                     CAST(COALESCE(SUM(CASE WHEN t.status = 'skipped' THEN 1 ELSE 0 END), 0) AS BIGINT),
                     CAST(COALESCE(SUM(t.bytes), 0) AS BIGINT)
                   FROM replication_executions e
                   LEFT JOIN replication_tasks t ON t.execution_id = e.id
                   WHERE e.policy = ?1
                   GROUP BY e.id, e.policy, e.triggered_by, e.status, e.created_at, e.ended_at
                   ORDER BY e.id DESC LIMIT ?2";
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_rows(sql, owned![policy, limit], |mut r| {
            Ok(ExecutionRecord {
                id: r.int(0)?,
                policy: r.text(1)?,
                triggered_by: r.text(2)?,
                status: r.text(3)?,
                created_ms: r.int(4)?,
                ended_ms: r.opt_int(5)?,
                tasks: r.size(6)?,
                succeeded: r.size(7)?,
                failed: r.size(8)?,
                skipped: r.size(9)?,
                bytes: r.size(10)?,
            })
        })
        .await
    }

    async fn replication_tasks(&self, execution: i64) -> Result<Vec<TaskRecord>, MetaError> {
        let sql = concat!(
            "SELECT ",
            task_columns!(),
            " FROM replication_tasks WHERE execution_id = ?1 ORDER BY id"
        );
        self.read_rows(sql, owned![execution], task_row).await
    }

    async fn replication_backlog(&self) -> Result<Vec<(String, u64)>, MetaError> {
        let sql = "SELECT policy, COUNT(*) FROM replication_tasks
                   WHERE status IN ('pending', 'running') GROUP BY policy ORDER BY policy";
        self.read_rows(sql, owned![], |mut r| Ok((r.text(0)?, r.size(1)?)))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_logs_stay_bounded_and_whole_characters() {
        assert_eq!(bounded("abc", 2), "ab");
        assert_eq!(bounded("aé", 2), "a", "never half a character");
        let log: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let kept = tail(&log, 100);
        assert!(kept.len() <= 100);
        assert!(
            kept.starts_with("line ") && kept.ends_with("line 999\n"),
            "{kept}"
        );
        assert_eq!(tail("short\n", 100), "short\n");
    }
}
