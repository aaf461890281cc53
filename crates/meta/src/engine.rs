//! The cut between the metadata logic and the database engines. Everything above this
//! module — every query, every rule of `MetaStore` and `AccountStore` — is written once
//! against [`Tx`]; below it, SQLite and PostgreSQL each say how a statement runs, how a
//! write commits (group commit on one writer thread; a SERIALIZABLE transaction retried
//! on conflicts) and what little of their SQL differs ([`Dialect`]).
//!
//! Statements are written with SQLite's numbered placeholders (`?1`, `?2`): the embedded
//! default runs them as written, and PostgreSQL's engine rewrites them to `$1`, `$2`.
//! Booleans are bound and read as integers (0 or 1), as SQLite stores them; the PostgreSQL
//! engine converts where a column is `BOOLEAN`.

use std::borrow::Cow;

use berth_oci::Digest;

use crate::postgres::{PostgresEngine, Turn};
use crate::sqlite::SqliteEngine;
use crate::MetaError;

/// A value bound to a statement's placeholder: borrowed inside a transaction, owned
/// (`Value<'static>`) when a statement is handed to an engine whole.
#[derive(Debug, Clone)]
pub(crate) enum Value<'a> {
    /// SQL `NULL`, of whatever type the placeholder has.
    Null,
    /// An integer; also a boolean (0 or 1).
    Int(i64),
    /// Text.
    Text(Cow<'a, str>),
    /// Bytes (a manifest's exact bytes).
    Bytes(Cow<'a, [u8]>),
    /// A list of text values, for [`Dialect::in_list`].
    TextList(Vec<String>),
}

impl Value<'_> {
    /// The value with its text copied, to outlive the caller's borrows.
    pub(crate) fn into_owned(self) -> Value<'static> {
        match self {
            Value::Null => Value::Null,
            Value::Int(v) => Value::Int(v),
            Value::TextList(v) => Value::TextList(v),
            Value::Text(v) => Value::Text(Cow::Owned(v.into_owned())),
            Value::Bytes(v) => Value::Bytes(Cow::Owned(v.into_owned())),
        }
    }
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Int(i64::from(v))
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(Cow::Borrowed(v))
    }
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Text(Cow::Borrowed(v))
    }
}

impl<'a> From<Cow<'a, str>> for Value<'a> {
    fn from(v: Cow<'a, str>) -> Self {
        Value::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(v: &'a [u8]) -> Self {
        Value::Bytes(Cow::Borrowed(v))
    }
}

impl From<&[String]> for Value<'_> {
    fn from(v: &[String]) -> Self {
        Value::TextList(v.to_vec())
    }
}

impl<'a, T: Into<Value<'a>>> From<Option<T>> for Value<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// `args![a, b, c]`: a statement's placeholder values, in order.
macro_rules! args {
    ($($value:expr),* $(,)?) => {
        &[$(crate::engine::Value::from($value)),*]
    };
}
pub(crate) use args;

/// `owned![a, b, c]`: the same, copied, for a statement handed to an engine whole.
macro_rules! owned {
    ($($value:expr),* $(,)?) => {
        vec![$(crate::engine::Value::from($value).into_owned()),*]
    };
}
pub(crate) use owned;

/// One column of a result row, owned.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    /// SQL `NULL`.
    Null,
    /// An integer (or a boolean, as 0 or 1).
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
}

/// A result row. Getters take the column out, so a manifest's bytes move to the caller
/// without a copy; a column of an unexpected type is corrupt data, never a panic.
#[derive(Debug)]
pub(crate) struct Row(pub(crate) Vec<Cell>);

impl Row {
    fn take(&mut self, i: usize) -> Cell {
        self.0
            .get_mut(i)
            .map(|c| std::mem::replace(c, Cell::Null))
            .unwrap_or(Cell::Null)
    }

    fn mismatch(i: usize, want: &str, got: &Cell) -> MetaError {
        MetaError::Corrupt(format!("column {i}: expected {want}, found {got:?}"))
    }

    /// An integer column.
    pub(crate) fn int(&mut self, i: usize) -> Result<i64, MetaError> {
        match self.take(i) {
            Cell::Int(v) => Ok(v),
            other => Err(Self::mismatch(i, "an integer", &other)),
        }
    }

    /// A nullable integer column.
    pub(crate) fn opt_int(&mut self, i: usize) -> Result<Option<i64>, MetaError> {
        match self.take(i) {
            Cell::Null => Ok(None),
            Cell::Int(v) => Ok(Some(v)),
            other => Err(Self::mismatch(i, "an integer", &other)),
        }
    }

    /// A size or count column (never negative when written by us).
    pub(crate) fn size(&mut self, i: usize) -> Result<u64, MetaError> {
        let v = self.int(i)?;
        u64::try_from(v).map_err(|_| MetaError::Corrupt(format!("column {i}: negative size {v}")))
    }

    /// A boolean column (stored as 0/1 or as a PostgreSQL `BOOLEAN`).
    pub(crate) fn bool(&mut self, i: usize) -> Result<bool, MetaError> {
        Ok(self.int(i)? != 0)
    }

    /// A text column.
    pub(crate) fn text(&mut self, i: usize) -> Result<String, MetaError> {
        match self.take(i) {
            Cell::Text(v) => Ok(v),
            other => Err(Self::mismatch(i, "text", &other)),
        }
    }

    /// A nullable text column.
    pub(crate) fn opt_text(&mut self, i: usize) -> Result<Option<String>, MetaError> {
        match self.take(i) {
            Cell::Null => Ok(None),
            Cell::Text(v) => Ok(Some(v)),
            other => Err(Self::mismatch(i, "text", &other)),
        }
    }

    /// A bytes column.
    pub(crate) fn bytes(&mut self, i: usize) -> Result<Vec<u8>, MetaError> {
        match self.take(i) {
            Cell::Bytes(v) => Ok(v),
            // SQLite hands back what was stored; an empty blob may come back as text.
            Cell::Text(v) => Ok(v.into_bytes()),
            other => Err(Self::mismatch(i, "bytes", &other)),
        }
    }

    /// A digest column; a malformed digest means corruption.
    pub(crate) fn digest(&mut self, i: usize) -> Result<Digest, MetaError> {
        let text = self.text(i)?;
        Digest::parse(&text).map_err(|e| MetaError::Corrupt(e.to_string()))
    }
}

/// Statements inside one transaction (a write) or on one connection (a read).
///
/// Errors are already [`MetaError`]s: a uniqueness violation is
/// [`MetaError::Conflict`] (with an empty message, for the caller to name what clashed),
/// an unreachable backend [`MetaError::Unavailable`].
pub(crate) trait Tx {
    /// Runs a statement; returns how many rows it changed.
    fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64, MetaError>;
    /// Runs a statement and returns every row.
    fn query(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Vec<Row>, MetaError>;
    /// Which SQL this transaction speaks, for the few statements that differ.
    fn dialect(&self) -> Dialect;
}

impl dyn Tx + '_ {
    /// The first row, if any.
    pub(crate) fn query_opt(
        &mut self,
        sql: &str,
        args: &[Value<'_>],
    ) -> Result<Option<Row>, MetaError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The one row the statement always returns.
    pub(crate) fn query_one(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Row, MetaError> {
        self.query_opt(sql, args)?
            .ok_or_else(|| MetaError::Backend("a statement returned no row".into()))
    }

    /// Whether the statement returns any row.
    pub(crate) fn exists(&mut self, sql: &str, args: &[Value<'_>]) -> Result<bool, MetaError> {
        Ok(!self.query(sql, args)?.is_empty())
    }

    /// Maps every row.
    pub(crate) fn query_map<T>(
        &mut self,
        sql: &str,
        args: &[Value<'_>],
        map: impl FnMut(Row) -> Result<T, MetaError>,
    ) -> Result<Vec<T>, MetaError> {
        self.query(sql, args)?.into_iter().map(map).collect()
    }
}

/// The SQL the engines do not share. Everything else is written once, in the subset both
/// understand (`ON CONFLICT`, `RETURNING`, `CAST`, recursive CTEs with one recursive term).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// The embedded engine.
    Sqlite,
    /// The shared engine.
    Postgres,
}

impl Dialect {
    /// `<expr> <in_list(n)>` tests membership in the [`Value::TextList`] bound to `?n`:
    /// SQLite reads it as a JSON array, PostgreSQL as a `text[]`.
    pub(crate) fn in_list(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("IN (SELECT value FROM json_each(?{n}))"),
            Dialect::Postgres => format!("= ANY(?{n})"),
        }
    }

    /// The first `/`-separated segment of a text column: a repository's project.
    pub(crate) fn first_segment(self, column: &str) -> String {
        match self {
            Dialect::Sqlite => format!(
                "(CASE WHEN instr({column}, '/') > 0 THEN substr({column}, 1, instr({column}, '/') - 1) ELSE {column} END)"
            ),
            Dialect::Postgres => format!("split_part({column}, '/', 1)"),
        }
    }

    /// The statement that keeps writers of `blobs` out while garbage collection marks,
    /// so that the long mark is not starved by the pushes beside it. SQLite has one
    /// writer already.
    pub(crate) fn lock_blobs_against_writers(self) -> Option<&'static str> {
        match self {
            Dialect::Sqlite => None,
            Dialect::Postgres => Some("LOCK TABLE blobs IN SHARE ROW EXCLUSIVE MODE"),
        }
    }
}

/// A read: statements on one connection, run once.
pub(crate) trait ReadFn<T>:
    FnOnce(&mut dyn Tx) -> Result<T, MetaError> + Send + 'static
{
}
impl<T, F: FnOnce(&mut dyn Tx) -> Result<T, MetaError> + Send + 'static> ReadFn<T> for F {}

/// A write: one transaction's statements, run again if the engine retries it.
pub(crate) trait WriteFn<T>:
    FnMut(&mut dyn Tx) -> Result<T, MetaError> + Send + 'static
{
}
impl<T, F: FnMut(&mut dyn Tx) -> Result<T, MetaError> + Send + 'static> WriteFn<T> for F {}

/// Whether a write must reach the disk before its caller is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Acknowledged state (a linked blob, a manifest, a tag, an account): on disk before
    /// answering. (Other connections may read it a moment earlier, while the log is being
    /// flushed; anything that deletes bytes on the strength of what it read, such as
    /// garbage collection, does so only after a durable write of its own, whose flush
    /// covers every commit before it.)
    Synced,
    /// Bookkeeping whose loss in a power failure costs a retry, never data: blob
    /// reservations and touches. Committed and visible at once, flushed with a later
    /// synced commit (SQLite) or with `synchronous_commit = off` (PostgreSQL).
    Visible,
}

/// A database engine: where statements run and how writes commit, and who is told how
/// long each operation took.
pub(crate) struct Engine {
    kind: Kind,
    observer: std::sync::OnceLock<Observer>,
    /// Durable writes through this engine that ended (committed or not).
    changes: std::sync::atomic::AtomicU64,
    /// Those of `changes` that may change who may do what: all but image content.
    access_changes: std::sync::atomic::AtomicU64,
}

/// The engines.
pub(crate) enum Kind {
    /// One SQLite file, one writer thread with group commit, a few readers.
    Sqlite(SqliteEngine),
    /// A PostgreSQL pool shared by every node.
    Postgres(PostgresEngine),
}

/// Told of every operation: its kind (`read` or `write`), how long it took, and whether it
/// succeeded. The metadata store measures; whoever exports metrics aggregates.
pub type Observer = std::sync::Arc<dyn Fn(&'static str, std::time::Duration, bool) + Send + Sync>;

impl Engine {
    pub(crate) fn new(kind: Kind) -> Self {
        Engine {
            kind,
            observer: std::sync::OnceLock::new(),
            changes: std::sync::atomic::AtomicU64::new(0),
            access_changes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Sets who is told how operations went (once; later calls are ignored).
    pub(crate) fn observe(&self, observer: Observer) {
        let _ = self.observer.set(observer);
    }

    /// The engine's name, as metrics label it.
    pub(crate) fn backend(&self) -> &'static str {
        match self.kind {
            Kind::Sqlite(_) => "sqlite",
            Kind::Postgres(_) => "postgres",
        }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        work: impl std::future::Future<Output = Result<T, MetaError>>,
    ) -> Result<T, MetaError> {
        let Some(observer) = self.observer.get() else {
            return work.await;
        };
        let started = std::time::Instant::now();
        let result = work.await;
        // A refusal the caller expects (a name taken, a record missing) is an answer, not
        // a failure of the store.
        let failed = matches!(
            result,
            Err(MetaError::Unavailable(_)
                | MetaError::Full(_)
                | MetaError::Backend(_)
                | MetaError::Corrupt(_))
        );
        observer(op, started.elapsed(), !failed);
        result
    }

    /// Runs `read` on a connection outside any write. Reads of several statements are not
    /// one snapshot on PostgreSQL: callers never need them to be.
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        read: impl ReadFn<T>,
    ) -> Result<T, MetaError> {
        match &self.kind {
            Kind::Sqlite(e) => self.timed("read", e.read(read)).await,
            Kind::Postgres(e) => self.timed("read", e.read(read)).await,
        }
    }

    /// Runs `read` in one snapshot: every statement sees the same committed state, and
    /// no writer waits for it. For long reads (a collection's preview); always off the
    /// async threads.
    pub(crate) async fn read_snapshot<T: Send + 'static>(
        &self,
        read: impl ReadFn<T>,
    ) -> Result<T, MetaError> {
        match &self.kind {
            Kind::Sqlite(e) => self.timed("read", e.read_snapshot(read)).await,
            Kind::Postgres(e) => self.timed("read", e.read_snapshot(read)).await,
        }
    }

    /// Runs `write` as one atomic transaction: all of its changes commit, or (when it
    /// fails) none. It may run more than once (PostgreSQL retries it after a serialization
    /// conflict), so it must not act outside the transaction.
    pub(crate) async fn write<T: Send + 'static>(
        &self,
        durability: Durability,
        write: impl WriteFn<T>,
    ) -> Result<T, MetaError> {
        let result = match &self.kind {
            Kind::Sqlite(e) => self.timed("write", e.write(durability, write)).await,
            Kind::Postgres(e) => {
                self.timed("write", e.write(durability, Turn::Any, write))
                    .await
            }
        };
        if durability == Durability::Synced {
            self.changed();
        }
        result
    }

    /// A durable [`Engine::write`] that appends to the event log. Appenders take turns
    /// (SQLite's one writer does by construction), so events are numbered in commit order.
    pub(crate) async fn write_recorded<T: Send + 'static>(
        &self,
        write: impl WriteFn<T>,
    ) -> Result<T, MetaError> {
        let result = self.append_to_log(write).await;
        self.changed();
        result
    }

    /// [`Engine::write_recorded`] for image content (blob links, manifests, tags): counted
    /// in [`Engine::changes`] but not in [`Engine::access_changes`], so that pushes leave
    /// the node's access decisions cached. A write that also creates something access
    /// depends on (a repository record) says so with [`Engine::access_changed`].
    pub(crate) async fn write_recorded_content<T: Send + 'static>(
        &self,
        write: impl WriteFn<T>,
    ) -> Result<T, MetaError> {
        let result = self.append_to_log(write).await;
        self.content_changed();
        result
    }

    /// [`Engine::write_recorded`] for records that change nothing a cache keeps (audit
    /// records of pulls, batched): not counted in [`Engine::changes`], so that pulls
    /// audited by the thousand leave the node's caches alone.
    pub(crate) async fn write_recorded_unread<T: Send + 'static>(
        &self,
        write: impl WriteFn<T>,
    ) -> Result<T, MetaError> {
        self.append_to_log(write).await
    }

    async fn append_to_log<T: Send + 'static>(
        &self,
        write: impl WriteFn<T>,
    ) -> Result<T, MetaError> {
        match &self.kind {
            Kind::Sqlite(e) => {
                self.timed("write", e.write(Durability::Synced, write))
                    .await
            }
            Kind::Postgres(e) => {
                self.timed("write", e.write(Durability::Synced, Turn::EventLog, write))
                    .await
            }
        }
    }

    /// Counts a durable write that ended, before its caller hears of it.
    fn changed(&self) {
        self.access_changed();
        self.content_changed();
    }

    /// Counts a durable write that ended and changed image content only.
    fn content_changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Counts a durable write that ended and may have changed who may do what.
    pub(crate) fn access_changed(&self) {
        self.access_changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Durable writes through this engine so far (see [`crate::Database::changes`]).
    pub(crate) fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Durable writes so far that may have changed who may do what (see
    /// [`crate::MetaStore::access_changes`]).
    pub(crate) fn access_changes(&self) -> u64 {
        self.access_changes
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Queues `write` without waiting for it, for records nobody on this node reads back
    /// before they commit (an upload session's owner, known in memory meanwhile). A
    /// failure is logged.
    pub(crate) fn write_unawaited(&self, write: impl WriteFn<()>) {
        match &self.kind {
            Kind::Sqlite(e) => e.submit(write),
            Kind::Postgres(e) => e.submit(write),
        }
    }

    /// Whether this engine's store is used by one node only: then the node may keep what
    /// it alone serves (open upload sessions) in memory.
    pub(crate) fn node_local(&self) -> bool {
        matches!(self.kind, Kind::Sqlite(_))
    }
}
