//! The shared engine: PostgreSQL, for several berth nodes sharing one metadata store.
//! Every write is one SERIALIZABLE transaction, run again when PostgreSQL reports a
//! serialization conflict, so the guarantees the single SQLite writer gives by
//! construction (garbage collection's mark against a concurrent link, a manifest's edge
//! check against a concurrent unlink) hold across nodes. Text keys use the "C" collation
//! (see `schema`): listings sort by bytes, as the spec's paging expects and as SQLite does.
//!
//! The logic above [`Tx`] is synchronous, so a transaction runs on a blocking thread that
//! drives each statement to completion on the runtime; the connection's I/O stays on the
//! runtime's workers. One hop per operation, small beside a network round trip.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::runtime::Handle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::{NoTls, Statement};

use crate::engine::{Cell, Dialect, Durability, ReadFn, Row, Tx, Value, WriteFn};
use crate::schema::{expand, postgres_legacy_version, MIGRATIONS};
use crate::MetaError;

/// Whether a write must take the event log's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Any time: a conflict with a concurrent write is retried.
    Any,
    /// After every other appender to the event log. Appenders number their events from
    /// one counter row; under SERIALIZABLE, two that overlap would fail each other again
    /// and again, so they take turns instead (across nodes, through an advisory lock).
    EventLog,
}

/// The advisory lock that orders appenders to the event log.
const EVENT_LOG_TURN_TAKE: &str = "SELECT pg_advisory_lock(7392020)";
const EVENT_LOG_TURN_GIVE: &str = "SELECT pg_advisory_unlock(7392020)";

/// Connections per node.
const POOL_SIZE: usize = 16;
/// How long a request waits for a connection before answering that the store is down.
const OUTAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of a write that keeps meeting serialization conflicts.
const MAX_ATTEMPTS: usize = 20;

fn pg(e: tokio_postgres::Error) -> MetaError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        return MetaError::Conflict(String::new());
    }
    match e.as_db_error() {
        // The server shutting down or refusing connections is an outage, not a fault.
        Some(db) if db.code().code().starts_with("57P") || db.code().code().starts_with("08") => {
            MetaError::Unavailable(format!("postgres: {}", db.message()))
        }
        // Class 53: insufficient resources (disk full, out of memory).
        Some(db) if *db.code() == SqlState::DISK_FULL => {
            MetaError::Full(format!("postgres: {}", db.message()))
        }
        Some(db) => MetaError::Backend(format!("postgres: {}", db.message())),
        // No server answer at all: the connection broke or could not be made.
        None if e.is_closed() || e.code().is_none() => {
            MetaError::Unavailable(format!("postgres: {e}"))
        }
        None => MetaError::Backend(format!("postgres: {e}")),
    }
}

fn is_conflict(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

fn pool_error(e: deadpool_postgres::PoolError) -> MetaError {
    MetaError::Unavailable(format!("postgres: {e}"))
}

/// The pause before retrying a conflicting transaction: growing with the attempt, and
/// spread (by the clock's nanoseconds) so that conflicting nodes do not retry in step.
fn retry_pause(attempt: usize) -> Duration {
    let spread = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()) % 1000)
        .unwrap_or(0);
    Duration::from_micros(attempt as u64 * 1000 + spread)
}

/// The PostgreSQL engine.
pub(crate) struct PostgresEngine {
    pool: Pool,
}

impl PostgresEngine {
    /// Connects to `url` (`postgres://user:password@host:port/db` or a key=value string),
    /// using `schema` if given (created if missing), and applies migrations.
    pub(crate) async fn connect(url: &str, schema: Option<&str>) -> Result<Self, MetaError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| MetaError::Backend(format!("postgres url: {e}")))?;
        config.connect_timeout(OUTAGE_TIMEOUT);
        if let Some(schema) = schema {
            if !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(MetaError::Backend(format!(
                    "schema name {schema:?}: letters, digits and _ only"
                )));
            }
        }
        // No JIT: on small tables the planner's guesses for the collection's recursive
        // query pass the JIT threshold, and compiling it took 200-400 ms of a 2 ms query
        // on every pass. Nothing here runs long enough to repay a compilation. Options
        // given in the URL are kept.
        let mut options = config.get_options().unwrap_or_default().to_owned();
        options.push_str(" -c jit=off");
        if let Some(schema) = schema {
            options.push_str(&format!(" -c search_path={schema}"));
        }
        config.options(options.trim_start());
        if let Some(schema) = schema {
            let (client, connection) = config.connect(NoTls).await.map_err(pg)?;
            let task = tokio::spawn(connection);
            client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .await
                .map_err(pg)?;
            drop(client);
            let _ = task.await;
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // Bounded waits: during an outage requests fail fast with 503 instead of piling up.
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(OUTAGE_TIMEOUT))
            .create_timeout(Some(OUTAGE_TIMEOUT))
            .recycle_timeout(Some(OUTAGE_TIMEOUT))
            .build()
            .map_err(|e| MetaError::Backend(format!("postgres pool: {e}")))?;
        let engine = PostgresEngine { pool };
        engine.migrate().await?;
        Ok(engine)
    }

    /// Applies missing migrations in one transaction under an advisory lock: nodes may
    /// start together; one migrates, the others wait and then find nothing to do.
    async fn migrate(&self) -> Result<(), MetaError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.batch_execute(
            "SELECT pg_advisory_xact_lock(7392019);
             CREATE TABLE IF NOT EXISTS berth_migrations (applied BIGINT NOT NULL)",
        )
        .await
        .map_err(pg)?;
        let applied = match tx
            .query_opt("SELECT applied FROM berth_migrations", &[])
            .await
            .map_err(pg)?
        {
            Some(row) => row.get::<_, i64>(0) as usize,
            None => {
                let legacy = tx
                    .query_one("SELECT to_regclass('berth_schema') IS NOT NULL", &[])
                    .await
                    .map_err(pg)?
                    .get::<_, bool>(0);
                let applied = if legacy {
                    let old = tx
                        .query_opt("SELECT version FROM berth_schema", &[])
                        .await
                        .map_err(pg)?
                        .map_or(0, |r| i64::from(r.get::<_, i32>(0)));
                    postgres_legacy_version(old)
                } else {
                    0
                };
                tx.execute(
                    "INSERT INTO berth_migrations (applied) VALUES ($1)",
                    &[&(applied as i64)],
                )
                .await
                .map_err(pg)?;
                applied
            }
        };
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
            tx.batch_execute(&expand(migration, Dialect::Postgres))
                .await
                .map_err(pg)?;
            tx.execute(
                "UPDATE berth_migrations SET applied = $1",
                &[&(i as i64 + 1)],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }

    pub(crate) async fn read<T: Send + 'static>(
        &self,
        read: impl ReadFn<T>,
    ) -> Result<T, MetaError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let runtime = Handle::current();
        tokio::task::spawn_blocking(move || read(&mut PostgresTx::new(&client, &runtime)))
            .await
            .map_err(|e| MetaError::Backend(e.to_string()))?
    }

    /// A read of several statements that see one snapshot (`REPEATABLE READ`, read only):
    /// writers go on meanwhile.
    pub(crate) async fn read_snapshot<T: Send + 'static>(
        &self,
        read: impl ReadFn<T>,
    ) -> Result<T, MetaError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let runtime = Handle::current();
        tokio::task::spawn_blocking(move || {
            let mut tx = PostgresTx::new(&client, &runtime);
            tx.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
            let outcome = read(&mut tx);
            let ended = tx.batch(if outcome.is_ok() {
                "COMMIT"
            } else {
                "ROLLBACK"
            });
            let value = outcome?;
            ended.map(|()| value)
        })
        .await
        .map_err(|e| MetaError::Backend(e.to_string()))?
    }

    pub(crate) async fn write<T: Send + 'static>(
        &self,
        durability: Durability,
        turn: Turn,
        mut write: impl WriteFn<T>,
    ) -> Result<T, MetaError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let runtime = Handle::current();
        tokio::task::spawn_blocking(move || {
            for attempt in 1..=MAX_ATTEMPTS {
                let mut tx = PostgresTx::new(&client, &runtime);
                let outcome = match turn {
                    Turn::Any => tx.attempt(durability, &mut write),
                    Turn::EventLog => tx.in_turn(|tx| tx.attempt(durability, &mut write)),
                };
                match outcome {
                    Err(e) if !tx.conflicted => return Err(e),
                    Err(_) => std::thread::sleep(retry_pause(attempt)),
                    Ok(value) => return Ok(value),
                }
            }
            Err(MetaError::Backend(
                "postgres: too many serialization conflicts".into(),
            ))
        })
        .await
        .map_err(|e| MetaError::Backend(e.to_string()))?
    }

    pub(crate) fn submit(&self, write: impl WriteFn<()>) {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let engine = PostgresEngine { pool };
            if let Err(e) = engine.write(Durability::Visible, Turn::Any, write).await {
                tracing::warn!(error = %e, "a queued metadata write failed");
            }
        });
    }
}

/// Statements on one pooled connection, driven from a blocking thread.
struct PostgresTx<'a> {
    client: &'a Object,
    runtime: &'a Handle,
    /// PostgreSQL aborted the transaction to keep it serializable: run it again.
    conflicted: bool,
}

impl<'a> PostgresTx<'a> {
    fn new(client: &'a Object, runtime: &'a Handle) -> Self {
        PostgresTx {
            client,
            runtime,
            conflicted: false,
        }
    }

    fn batch(&mut self, sql: &str) -> Result<(), MetaError> {
        let outcome = self.runtime.block_on(self.client.batch_execute(sql));
        outcome.map_err(|e| self.fault(e))
    }

    /// One attempt of a write: begin, run, commit; rolled back on any failure, so the
    /// connection goes back to the pool outside a transaction.
    fn attempt<T>(
        &mut self,
        durability: Durability,
        write: &mut dyn FnMut(&mut dyn Tx) -> Result<T, MetaError>,
    ) -> Result<T, MetaError> {
        self.batch(match durability {
            Durability::Synced => "BEGIN ISOLATION LEVEL SERIALIZABLE",
            Durability::Visible => {
                "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL synchronous_commit = off"
            }
        })?;
        let outcome = write(self).and_then(|value| self.batch("COMMIT").map(|()| value));
        if outcome.is_err() {
            // After a failed COMMIT there is no transaction left; the warning is harmless.
            let _ = self.runtime.block_on(self.client.batch_execute("ROLLBACK"));
        }
        outcome
    }

    /// Runs `attempt` holding the event log's turn: a session lock taken before the
    /// transaction begins, so its snapshot already follows the previous appender's
    /// commit, and released after it ended (or with the connection, if that breaks).
    fn in_turn<T>(
        &mut self,
        attempt: impl FnOnce(&mut Self) -> Result<T, MetaError>,
    ) -> Result<T, MetaError> {
        self.batch(EVENT_LOG_TURN_TAKE)?;
        // Given back however the attempt ends, a panic included: a pooled connection
        // that kept the lock would stop every other appender.
        let _turn = HeldTurn {
            client: self.client,
            runtime: self.runtime,
        };
        attempt(self)
    }

    fn fault(&mut self, e: tokio_postgres::Error) -> MetaError {
        if is_conflict(&e) {
            self.conflicted = true;
        }
        pg(e)
    }
}

/// The event log's turn, held by a connection until dropped.
struct HeldTurn<'a> {
    client: &'a Object,
    runtime: &'a Handle,
}

impl Drop for HeldTurn<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .runtime
            .block_on(self.client.batch_execute(EVENT_LOG_TURN_GIVE))
        {
            // The connection is broken, and the lock went with its session.
            tracing::warn!(error = %e, "giving back the event log's turn");
        }
    }
}

/// `?1` → `$1`: statements are written in SQLite's spelling (see `engine`). No statement
/// has a `?` inside a string literal.
fn placeholders(sql: &str) -> String {
    sql.replace('?', "$")
}

/// A `NULL` of whatever type the placeholder has.
#[derive(Debug)]
struct Null;

impl ToSql for Null {
    fn to_sql(
        &self,
        _: &Type,
        _: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(IsNull::Yes)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A value converted to what the placeholder's type takes.
fn bind(value: &Value<'_>, ty: &Type) -> Result<Box<dyn ToSql + Sync + Send>, MetaError> {
    let mismatch = || MetaError::Backend(format!("postgres: cannot bind {value:?} as {ty}"));
    Ok(match value {
        Value::Null => Box::new(Null),
        Value::Int(v) if *ty == Type::INT8 => Box::new(*v),
        Value::Int(v) if *ty == Type::INT4 => Box::new(i32::try_from(*v).map_err(|_| mismatch())?),
        Value::Int(v) if *ty == Type::BOOL => Box::new(*v != 0),
        Value::Text(v) => Box::new(v.to_string()),
        Value::Bytes(v) => Box::new(v.to_vec()),
        Value::TextList(items) => {
            Box::new(items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        }
        Value::Int(_) => return Err(mismatch()),
    })
}

fn cell(row: &tokio_postgres::Row, i: usize) -> Result<Cell, MetaError> {
    let ty = row.columns()[i].type_();
    let get_err = |e: tokio_postgres::Error| MetaError::Corrupt(format!("column {i}: {e}"));
    let cell = if *ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)
            .map_err(get_err)?
            .map(Cell::Int)
    } else if *ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)
            .map_err(get_err)?
            .map(|v| Cell::Int(v.into()))
    } else if *ty == Type::BOOL {
        row.try_get::<_, Option<bool>>(i)
            .map_err(get_err)?
            .map(|v| Cell::Int(v.into()))
    } else if *ty == Type::BYTEA {
        row.try_get::<_, Option<Vec<u8>>>(i)
            .map_err(get_err)?
            .map(Cell::Bytes)
    } else {
        row.try_get::<_, Option<String>>(i)
            .map_err(get_err)?
            .map(Cell::Text)
    };
    Ok(cell.unwrap_or(Cell::Null))
}

impl PostgresTx<'_> {
    /// The statement (from the connection's cache) and its arguments, bound to its
    /// placeholders' types.
    fn prepare(
        &mut self,
        sql: &str,
        args: &[Value<'_>],
    ) -> Result<(Statement, Vec<Box<dyn ToSql + Sync + Send>>), MetaError> {
        let prepared = self
            .runtime
            .block_on(self.client.prepare_cached(&placeholders(sql)));
        let stmt = prepared.map_err(|e| self.fault(e))?;
        let bound = args
            .iter()
            .zip(stmt.params())
            .map(|(v, ty)| bind(v, ty))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((stmt, bound))
    }
}

fn as_params(bound: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    bound
        .iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

impl Tx for PostgresTx<'_> {
    fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64, MetaError> {
        let (stmt, bound) = self.prepare(sql, args)?;
        let outcome = self
            .runtime
            .block_on(self.client.execute(&stmt, &as_params(&bound)));
        outcome.map_err(|e| self.fault(e))
    }

    fn query(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Vec<Row>, MetaError> {
        let (stmt, bound) = self.prepare(sql, args)?;
        let outcome = self
            .runtime
            .block_on(self.client.query(&stmt, &as_params(&bound)));
        outcome
            .map_err(|e| self.fault(e))?
            .iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| cell(row, i))
                    .collect::<Result<_, _>>()
                    .map(Row)
            })
            .collect()
    }

    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }
}
