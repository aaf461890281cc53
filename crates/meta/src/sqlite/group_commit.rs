//! Group commit. SQLite has one writer and `synchronous=FULL` costs an fsync per commit, so
//! committing every write on its own caps the registry at a few hundred small writes per
//! second. Instead one thread owns the write connection and runs every write that is
//! waiting in one transaction, each inside its own savepoint (a failing write is rolled
//! back alone), then commits once and answers them all. Nobody is answered before the
//! commit, so an acknowledged write is durable exactly as before.

use std::sync::mpsc;

use rusqlite::Connection;

use super::backend;
use crate::MetaError;

/// Writes folded into one commit at most; bounds the latency a write adds to others.
const MAX_BATCH: usize = 256;

/// One write waiting for the writer thread.
trait Job: Send {
    /// Whether the caller must not be answered before the write is on disk.
    fn durable(&self) -> bool;
    /// Runs the write inside the shared transaction.
    fn run(&mut self, conn: &Connection);
    /// Answers the caller once the shared transaction ended.
    fn finish(self: Box<Self>, commit: Result<(), String>);
}

struct TypedJob<T, F> {
    durable: bool,
    write: Option<F>,
    outcome: Option<Result<T, MetaError>>,
    reply: tokio::sync::oneshot::Sender<Result<T, MetaError>>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, MetaError> + Send,
{
    fn durable(&self) -> bool {
        self.durable
    }

    fn run(&mut self, conn: &Connection) {
        let Some(write) = self.write.take() else {
            return;
        };
        if let Err(e) = run_cached(conn, "SAVEPOINT job") {
            self.outcome = Some(Err(backend(e)));
            return;
        }
        let outcome = write(conn);
        let end = if outcome.is_ok() {
            run_cached(conn, "RELEASE job")
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        self.outcome = Some(match end {
            Ok(()) => outcome,
            Err(e) => Err(backend(e)),
        });
    }

    fn finish(self: Box<Self>, commit: Result<(), String>) {
        let answer = match (commit, self.outcome) {
            (Ok(()), Some(outcome)) => outcome,
            (Ok(()), None) => Err(MetaError::Backend("write was not run".into())),
            (Err(e), _) => Err(MetaError::Backend(format!("commit failed: {e}"))),
        };
        let _ = self.reply.send(answer);
    }
}

/// Hands writes to the thread that owns the write connection.
pub(super) struct GroupCommitter {
    jobs: mpsc::Sender<Box<dyn Job>>,
}

impl GroupCommitter {
    /// Starts the writer thread; it ends when the committer is dropped.
    pub(super) fn start(conn: Connection) -> Self {
        let (jobs, queue) = mpsc::channel::<Box<dyn Job>>();
        std::thread::Builder::new()
            .name("berth-meta-writer".into())
            .spawn(move || run_writer(&conn, &queue))
            .expect("spawning the metadata writer thread");
        GroupCommitter { jobs }
    }

    /// Runs `write` in the next shared transaction and returns its result once committed.
    /// `durability` says whether that commit must also be on disk before the answer.
    pub(super) async fn write<T, F>(&self, durability: Durability, write: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, MetaError> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = TypedJob {
            durable: durability == Durability::Synced,
            write: Some(write),
            outcome: None,
            reply,
        };
        self.jobs
            .send(Box::new(job))
            .map_err(|_| MetaError::Backend("metadata writer stopped".into()))?;
        answer
            .await
            .map_err(|_| MetaError::Backend("metadata writer stopped".into()))?
    }
}

/// Whether a write must reach the disk before its caller is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Durability {
    /// Acknowledged state (a linked blob, a manifest, a tag): fsync before answering.
    Synced,
    /// Bookkeeping whose loss in a power failure costs a retry, never data: upload
    /// sessions and blob reservations. Committed (visible to every reader, and kept if
    /// only the process dies) but flushed with the next synced commit.
    Visible,
}

/// Runs a statement without parameters or rows from the statement cache: these few run
/// around every write, and parsing them each time showed in profiles.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

fn run_writer(conn: &Connection, queue: &mpsc::Receiver<Box<dyn Job>>) {
    // The connection was opened with synchronous=FULL.
    let mut synced = true;
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|job| job.durable());
        if durable != synced {
            let mode = if durable { "FULL" } else { "OFF" };
            if conn.pragma_update(None, "synchronous", mode).is_ok() {
                synced = durable;
            }
        }
        let commit = match run_cached(conn, "BEGIN IMMEDIATE") {
            Ok(()) => {
                for job in batch.iter_mut() {
                    job.run(conn);
                }
                match run_cached(conn, "COMMIT") {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        let _ = conn.execute_batch("ROLLBACK");
                        Err(e.to_string())
                    }
                }
            }
            Err(e) => Err(e.to_string()),
        };
        for job in batch {
            job.finish(commit.clone());
        }
    }
}
