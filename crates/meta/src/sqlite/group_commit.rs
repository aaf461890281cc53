//! Group commit. SQLite has one writer and `synchronous=FULL` costs an fsync per commit, so
//! committing every write on its own caps the registry at a few hundred small writes per
//! second. Instead one thread owns the write connection and runs every write that is
//! waiting in one transaction, each inside its own savepoint (a failing write is rolled
//! back alone), then commits once. Writes that must be durable are answered only after a
//! second thread has `fdatasync`ed the write-ahead log past their commit; the writer
//! meanwhile runs the next batch, so bookkeeping writes never queue behind another
//! batch's flush, and one flush answers every durable batch committed while the previous
//! one ran. The connection runs with `synchronous=NORMAL`: commits do not sync, but
//! checkpoints do (the log is synced before its frames are copied into the database and
//! the database after), which is what keeps the file intact on power loss.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rusqlite::Connection;

use super::backend;
use crate::engine::Durability;
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
    fn finish(self: Box<Self>, commit: Result<(), CommitError>);
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

    fn finish(self: Box<Self>, commit: Result<(), CommitError>) {
        let answer = match (commit, self.outcome) {
            (Ok(()), Some(outcome)) => outcome,
            (Ok(()), None) => Err(MetaError::Backend("write was not run".into())),
            (Err(e), _) if e.full => Err(MetaError::Full(format!("commit failed: {}", e.message))),
            (Err(e), _) => Err(MetaError::Backend(format!("commit failed: {}", e.message))),
        };
        let _ = self.reply.send(answer);
    }
}

/// Why a batch did not commit (or flush), told to each of its writes; a full disk is
/// told apart, so that clients hear that the storage is full.
#[derive(Debug, Clone)]
pub(super) struct CommitError {
    message: String,
    full: bool,
}

impl CommitError {
    fn sqlite(e: &rusqlite::Error) -> Self {
        CommitError {
            message: e.to_string(),
            full: matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull),
        }
    }

    fn other(message: &str) -> Self {
        CommitError {
            message: message.to_owned(),
            full: false,
        }
    }
}

/// Hands writes to the thread that owns the write connection.
pub(super) struct GroupCommitter {
    jobs: mpsc::Sender<Box<dyn Job>>,
}

impl GroupCommitter {
    /// Starts the writer and log-flushing threads for the database at `db_path`; they end
    /// when the committer is dropped.
    pub(super) fn start(conn: Connection, db_path: &Path) -> rusqlite::Result<Self> {
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let mut wal = db_path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        let (jobs, queue) = mpsc::channel::<Box<dyn Job>>();
        let (flushes, flush_queue) = mpsc::channel::<Vec<Box<dyn Job>>>();
        std::thread::Builder::new()
            .name("berth-meta-writer".into())
            .spawn(move || run_writer(&conn, &queue, &flushes))
            .expect("spawning the metadata writer thread");
        std::thread::Builder::new()
            .name("berth-meta-flush".into())
            .spawn(move || run_flusher(&wal, &flush_queue))
            .expect("spawning the metadata flush thread");
        Ok(GroupCommitter { jobs })
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

impl GroupCommitter {
    /// Queues `write` for the next shared transaction without waiting for it: for
    /// records nobody reads back before a restart. A failure is logged.
    pub(super) fn submit<F>(&self, write: F)
    where
        F: FnOnce(&Connection) -> Result<(), MetaError> + Send + 'static,
    {
        let (reply, _) = tokio::sync::oneshot::channel();
        let job = TypedJob {
            durable: false,
            write: Some(move |conn: &Connection| {
                let outcome = write(conn);
                if let Err(e) = &outcome {
                    tracing::warn!(error = %e, "a queued metadata write failed");
                }
                outcome
            }),
            outcome: None,
            reply,
        };
        if self.jobs.send(Box::new(job)).is_err() {
            tracing::warn!("metadata writer stopped; a queued write was dropped");
        }
    }
}

/// Runs a statement without parameters or rows from the statement cache: these few run
/// around every write, and parsing them each time showed in profiles.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

fn run_writer(
    conn: &Connection,
    queue: &mpsc::Receiver<Box<dyn Job>>,
    flushes: &mpsc::Sender<Vec<Box<dyn Job>>>,
) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
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
                        Err(CommitError::sqlite(&e))
                    }
                }
            }
            Err(e) => Err(CommitError::sqlite(&e)),
        };
        let (durable, visible): (Vec<_>, Vec<_>) = batch.into_iter().partition(|j| j.durable());
        for job in visible {
            job.finish(commit.clone());
        }
        if durable.is_empty() {
            continue;
        }
        if commit.is_err() {
            for job in durable {
                job.finish(commit.clone());
            }
            continue;
        }
        if let Err(mpsc::SendError(durable)) = flushes.send(durable) {
            for job in durable {
                job.finish(Err(CommitError::other("metadata flush thread stopped")));
            }
        }
    }
}

/// Answers committed durable writes once the write-ahead log is on disk: one flush for
/// every batch that arrived while the previous flush ran.
fn run_flusher(wal: &Path, queue: &mpsc::Receiver<Vec<Box<dyn Job>>>) {
    let mut log = None;
    while let Ok(first) = queue.recv() {
        let mut waiting = first;
        while let Ok(more) = queue.try_recv() {
            waiting.extend(more);
        }
        let flushed = sync_log(wal, &mut log).map_err(|e| CommitError {
            full: matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            message: format!("flushing the metadata write-ahead log: {e}"),
        });
        for job in waiting {
            job.finish(flushed.clone());
        }
    }
}

/// An open write-ahead log and the identity of the file it was opened as.
struct OpenLog {
    file: File,
    identity: (u64, u64),
}

/// `fdatasync`s the write-ahead log at `path`, reopening it if SQLite replaced the file
/// since the last flush (it deletes the log when the last connection closes and creates
/// it again on the next open). The first flush of a log file also syncs its directory,
/// so that the file's name survives a power loss too.
fn sync_log(path: &Path, log: &mut Option<OpenLog>) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    let identity = (meta.dev(), meta.ino());
    let current = match log.take() {
        Some(open) if open.identity == identity => open,
        _ => {
            let file = File::open(path)?;
            if let Some(dir) = path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                File::open(dir)?.sync_all()?;
            }
            OpenLog { file, identity }
        }
    };
    current.file.sync_data()?;
    *log = Some(current);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flush follows the log file: a replaced file is reopened, a missing one is an
    /// error (never a silent success).
    #[test]
    fn flushing_follows_a_replaced_log() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("meta.db-wal");
        let mut log = None;
        assert!(sync_log(&wal, &mut log).is_err());
        std::fs::write(&wal, b"first").unwrap();
        sync_log(&wal, &mut log).unwrap();
        let first = log.as_ref().unwrap().identity;
        sync_log(&wal, &mut log).unwrap();
        assert_eq!(log.as_ref().unwrap().identity, first, "kept open");
        let replacement = dir.path().join("new");
        std::fs::write(&replacement, b"second").unwrap();
        std::fs::rename(&replacement, &wal).unwrap();
        sync_log(&wal, &mut log).unwrap();
        assert_ne!(log.as_ref().unwrap().identity, first, "reopened");
    }
}
