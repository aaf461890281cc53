//! The embedded engine: one SQLite file in the data directory, WAL mode, one writer
//! thread that group-commits (`group_commit`) and a few reader connections so that pulls
//! never wait behind a push.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, TransactionBehavior};

use crate::engine::{Cell, Dialect, Durability, ReadFn, Row, Tx, Value, WriteFn};
use crate::schema::{expand, MIGRATIONS};
use crate::MetaError;

mod group_commit;

const READERS: usize = 4;

/// Statements kept prepared per connection: every statement of the push and pull paths,
/// with room to spare (rusqlite's default of 16 made them evict each other).
const STATEMENT_CACHE: usize = 128;

pub(crate) fn backend(e: rusqlite::Error) -> MetaError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == ErrorCode::ConstraintViolation
                && (f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY) =>
        {
            MetaError::Conflict(String::new())
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DiskFull => {
            MetaError::Full(e.to_string())
        }
        _ => MetaError::Backend(e.to_string()),
    }
}

/// The SQLite engine.
pub(crate) struct SqliteEngine {
    writer: group_commit::GroupCommitter,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: AtomicUsize,
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    // WAL: readers never block the writer. synchronous=FULL: an acknowledged push survives
    // power loss, not only a process crash. (The writer connection switches to NORMAL and
    // flushes the log itself, off its own thread: see `group_commit`.)
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // No memory map: each connection's map counted the database again in the process's
    // RSS (five connections, five times its size), and under pushes every read after a
    // commit unmapped it, interrupting the other cores. The connections' own page caches
    // serve the hot pages as fast (PERFORMANCE.md).
    conn.pragma_update(None, "mmap_size", 0)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // 8 MiB of page cache per connection (SQLite's default is 2): the manifests clients
    // ask for at once stay cached at a million blobs (bench/scale.sh: manifest GETs over
    // 1,000 manifests of 200,000 fell to 0.74x of a small store's rate with 2 MiB). Pages
    // are allocated as touched, so a small store stays small.
    conn.pragma_update(None, "cache_size", -8192)?;
    Ok(conn)
}

/// Applies the migrations the file lacks; `PRAGMA user_version` counts those applied.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        tx.execute_batch(&expand(migration, Dialect::Sqlite))?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteEngine {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub(crate) fn open(path: &Path) -> Result<Self, MetaError> {
        let mut writer = open_connection(path).map_err(backend)?;
        migrate(&mut writer).map_err(backend)?;
        let readers = (0..READERS)
            .map(|_| open_connection(path).map(Mutex::new))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(backend)?;
        Ok(SqliteEngine {
            writer: group_commit::GroupCommitter::start(writer, path).map_err(backend)?,
            readers: Arc::new(readers),
            next_reader: AtomicUsize::new(0),
        })
    }

    pub(crate) async fn read<T: Send + 'static>(
        &self,
        read: impl ReadFn<T>,
    ) -> Result<T, MetaError> {
        // Reads are indexed lookups on pages the connection has cached: a few microseconds,
        // cheaper to run right here than to hand to a blocking thread and back (measured:
        // the hand-off halved HEAD and manifest GET rates). Only when every reader is busy
        // does the read go to the blocking pool.
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..READERS {
            if let Ok(conn) = self.readers[(start + i) % READERS].try_lock() {
                return read(&mut SqliteTx(&conn));
            }
        }
        let readers = self.readers.clone();
        let index = start % READERS;
        tokio::task::spawn_blocking(move || {
            let conn = readers[index]
                .lock()
                .map_err(|_| MetaError::Backend("reader lock poisoned".into()))?;
            read(&mut SqliteTx(&conn))
        })
        .await
        .map_err(|e| MetaError::Backend(e.to_string()))?
    }

    /// A read of several statements that see one snapshot, on the blocking pool (it may
    /// take seconds: a collection's preview). WAL: the writer goes on meanwhile.
    pub(crate) async fn read_snapshot<T: Send + 'static>(
        &self,
        read: impl ReadFn<T>,
    ) -> Result<T, MetaError> {
        let readers = self.readers.clone();
        let index = self.next_reader.fetch_add(1, Ordering::Relaxed) % READERS;
        tokio::task::spawn_blocking(move || {
            let conn = readers[index]
                .lock()
                .map_err(|_| MetaError::Backend("reader lock poisoned".into()))?;
            conn.execute_batch("BEGIN DEFERRED").map_err(backend)?;
            let outcome = read(&mut SqliteTx(&conn));
            // Read-only: ending it either way changes nothing, but it must end, or every
            // later read on this connection would see this snapshot.
            let ended = conn
                .execute_batch("COMMIT")
                .or_else(|_| conn.execute_batch("ROLLBACK"))
                .map_err(backend);
            let value = outcome?;
            ended.map(|()| value)
        })
        .await
        .map_err(|e| MetaError::Backend(e.to_string()))?
    }

    pub(crate) async fn write<T: Send + 'static>(
        &self,
        durability: Durability,
        mut write: impl WriteFn<T>,
    ) -> Result<T, MetaError> {
        self.writer
            .write(durability, move |conn| write(&mut SqliteTx(conn)))
            .await
    }

    pub(crate) fn submit(&self, mut write: impl WriteFn<()>) {
        self.writer.submit(move |conn| write(&mut SqliteTx(conn)));
    }
}

/// Statements on one SQLite connection, all through its statement cache: preparing a
/// statement cost more than running it for most writes here (a fifth of the metadata
/// writer's time in profiles of many small pushes).
struct SqliteTx<'c>(&'c Connection);

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Value::Bytes(v) => ToSqlOutput::Borrowed(ValueRef::Blob(v)),
            // Read by `json_each` (see `Dialect::in_list`).
            Value::TextList(items) => {
                ToSqlOutput::Owned(rusqlite::types::Value::Text(json_array(items)))
            }
        })
    }
}

/// A JSON array of strings.
fn json_array(items: &[String]) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push(']');
    out
}

impl Tx for SqliteTx<'_> {
    fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64, MetaError> {
        let mut stmt = self.0.prepare_cached(sql).map_err(backend)?;
        let n = stmt
            .execute(rusqlite::params_from_iter(args.iter()))
            .map_err(backend)?;
        Ok(n as u64)
    }

    fn query(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Vec<Row>, MetaError> {
        let mut stmt = self.0.prepare_cached(sql).map_err(backend)?;
        let columns = stmt.column_count();
        let mut rows = stmt
            .query(rusqlite::params_from_iter(args.iter()))
            .map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            let mut cells = Vec::with_capacity(columns);
            for i in 0..columns {
                cells.push(match row.get_ref(i).map_err(backend)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Int(v),
                    ValueRef::Real(v) => Cell::Int(v as i64),
                    ValueRef::Text(v) => Cell::Text(String::from_utf8_lossy(v).into_owned()),
                    ValueRef::Blob(v) => Cell::Bytes(v.to_vec()),
                });
            }
            out.push(Row(cells));
        }
        Ok(out)
    }

    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_bound_as_json_arrays() {
        let list =
            |items: &[&str]| json_array(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(list(&[]), "[]");
        assert_eq!(list(&["a", "b\"c", "d\\"]), r#"["a","b\"c","d\\"]"#);
        let conn = Connection::open_in_memory().unwrap();
        let items = vec!["x\u{1}".to_owned(), "y".to_owned()];
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM json_each(?1)",
                [Value::TextList(items)],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 2);
    }
}
