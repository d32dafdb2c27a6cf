//! Synapse's PostgreSQL database as the core's storage: the sender-owned state lives in
//! Synapse's own tables (so a Python sender and fedsend can replace each other without losing
//! anything), the homeserver-owned facts are read from the tables Synapse's sender reads.
//!
//! Only state with no Synapse table — the core's `incarnation` — lives in a `fedsend` schema of
//! the same database; nothing is ever created in Synapse's namespace.
//!
//! Every query is parameterised and prepared once per pooled connection. Errors say whether a
//! retry can help ([`PgError::is_transient`]).

mod devices;
mod events;
mod state;

use std::fmt;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use fedsend_core::{ServerName, should_handle};
use serde_json::Value;
use tokio_postgres::NoTls;

pub use devices::DeviceListOptions;
pub use events::{EXTREMITIES_PER_ROOM_MAX, NewEventId};
pub use state::CacheInvalidation;

/// The oldest `schema_version` whose tables the queries here were checked against
/// (Synapse 1.163.2 writes 94).
pub const SCHEMA_VERSION_MIN: i64 = 94;
/// The schema the queries were written for. A newer database is accepted only while its
/// `schema_compat_version` is at most this: Synapse raises the compat version exactly when
/// code written for an older schema would stop working.
pub const SCHEMA_VERSION_CHECKED: i64 = 94;

/// Why a database call failed. Nothing was written when it is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgError {
    /// The database could not be reached, the connection dropped, or the server asked us to
    /// retry (serialisation failure, deadlock, shutdown): retry with backoff.
    Unavailable(String),
    /// The database answered but refused the statement or returned rows we cannot use: a
    /// retry will fail the same way.
    Data(String),
    /// The schema is not one the queries were checked against.
    Schema(String),
    /// The core asked for a write a `federation_sender` instance never makes (the rows are
    /// written by the process that accepted them from a client).
    Unsupported(&'static str),
}

impl PgError {
    /// Whether retrying the same call later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable(why) => write!(f, "database unavailable: {why}"),
            Self::Data(why) => write!(f, "database error: {why}"),
            Self::Schema(why) => write!(f, "unsupported Synapse schema: {why}"),
            Self::Unsupported(what) => write!(f, "not written by a federation sender instance: {what}"),
        }
    }
}

impl std::error::Error for PgError {}

impl From<tokio_postgres::Error> for PgError {
    fn from(error: tokio_postgres::Error) -> Self {
        // SQLSTATE classes 08 (connection), 40 (rollback: serialisation, deadlock), 53
        // (resources), 57 (operator intervention: shutdown) are the server's way of saying
        // "not now"; everything else will fail again.
        let transient = error.is_closed()
            || error.as_db_error().is_none_or(|db| {
                let code = db.code().code();
                ["08", "40", "53", "57"].iter().any(|class| code.starts_with(class))
            });
        let text = match error.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => error.to_string(),
        };
        if transient { Self::Unavailable(text) } else { Self::Data(text) }
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(inner) => inner.into(),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

/// How to reach the database: the `database.args` of Synapse's `psycopg2` configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct PgArgs {
    /// Host name, address, or a directory holding the Unix socket.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role to connect as.
    pub user: String,
    /// Its password, if the server wants one.
    pub password: Option<String>,
    /// Database name.
    pub dbname: String,
    /// Connections kept in the pool.
    pub pool_size: usize,
}

impl fmt::Debug for PgArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgArgs")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// Connections a sender needs: one for fan-out, one for persists, a few for catch-up queries.
pub const POOL_SIZE_DEFAULT: usize = 5;

impl PgArgs {
    /// Reads psycopg2's connection keywords (`host`, `port`, `user`, `password`,
    /// `dbname` or `database`, `cp_max`) from Synapse's `database.args`, with libpq's defaults.
    pub fn from_psycopg2(args: &Value) -> Result<Self, PgError> {
        let text = |key: &str| args.get(key).and_then(Value::as_str).map(str::to_owned);
        let port = match args.get("port") {
            None | Some(Value::Null) => Some(5432),
            Some(Value::Number(n)) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
            Some(Value::String(s)) => s.parse().ok(),
            Some(_) => None,
        }
        .map_or_else(|| Err(PgError::Data(format!("database.args.port {:?} is not a port", args.get("port")))), Ok)?;
        Ok(Self {
            host: text("host").unwrap_or_else(|| "localhost".into()),
            port,
            user: text("user").unwrap_or_else(|| "postgres".into()),
            password: text("password"),
            dbname: text("dbname").or_else(|| text("database")).unwrap_or_else(|| "synapse".into()),
            pool_size: args
                .get("cp_max")
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n > 0)
                .unwrap_or(POOL_SIZE_DEFAULT),
        })
    }
}

/// The `schema_version` and `schema_compat_version` rows Synapse maintains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchemaVersion {
    /// Schema version the database was last upgraded to.
    pub version: i64,
    /// Oldest schema version whose code still works with this database (absent before
    /// Synapse introduced the table).
    pub compat_version: Option<i64>,
    /// False until the upgrade that wrote `version` finished.
    pub upgraded: bool,
}

impl SchemaVersion {
    /// Why this schema is refused, if it is.
    pub fn refusal(&self) -> Option<String> {
        if !self.upgraded {
            return Some(format!("schema {} is only partly applied; let Synapse finish its upgrade", self.version));
        }
        if self.version < SCHEMA_VERSION_MIN {
            return Some(format!(
                "schema version {} is older than {SCHEMA_VERSION_MIN}; upgrade Synapse first",
                self.version
            ));
        }
        let compat = self.compat_version.unwrap_or(self.version);
        if compat > SCHEMA_VERSION_CHECKED {
            return Some(format!(
                "schema compat version {compat} is newer than {SCHEMA_VERSION_CHECKED}, which this fedsend was checked against"
            ));
        }
        None
    }
}

/// Which destinations this instance sends to, as Synapse shards them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ownership {
    /// This instance's name (`worker_name`).
    pub instance: String,
    /// `federation_sender_instances`, in configured order.
    pub instances: Vec<String>,
}

impl Ownership {
    /// Whether this instance sends to `destination`.
    pub fn owns(&self, destination: &str) -> bool {
        should_handle(&self.instances, &self.instance, destination)
    }
}

/// Rows after a stream position, read in pages that never split one stream id: `rows` is
/// what this instance owns among them, `next_after` where the next page starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch<T> {
    /// The owned rows.
    pub rows: Vec<T>,
    /// The highest stream id scanned (owned or not); `after` when nothing was found.
    pub next_after: u64,
    /// The page was full: more rows may follow `next_after`.
    pub more: bool,
}

/// Synapse's database, shared by all tasks of the process.
#[derive(Clone)]
pub struct SynapseDb {
    pool: Pool,
    server_name: ServerName,
}

impl fmt::Debug for SynapseDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SynapseDb").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl SynapseDb {
    /// A pool of connections to Synapse's database for the homeserver `server_name`. The
    /// first connection is opened (and the schema checked) by [`Self::check_schema`].
    pub fn connect(args: &PgArgs, server_name: ServerName) -> Result<Self, PgError> {
        let mut config = tokio_postgres::Config::new();
        config.host(&args.host).port(args.port).user(&args.user).dbname(&args.dbname);
        config.application_name("fedsend");
        // A server that vanishes without closing the connection must not hang a query forever:
        // the kernel gives up on unacknowledged data, and connecting has a bound.
        config.connect_timeout(std::time::Duration::from_secs(10));
        config.keepalives_idle(std::time::Duration::from_secs(30));
        config.tcp_user_timeout(std::time::Duration::from_secs(30));
        if let Some(password) = &args.password {
            config.password(password);
        }
        // `Fast` skips a round trip per checkout; a dead connection shows up as a transient
        // error on first use and the caller retries.
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(args.pool_size.max(1))
            .wait_timeout(Some(std::time::Duration::from_secs(30)))
            .create_timeout(Some(std::time::Duration::from_secs(10)))
            .recycle_timeout(Some(std::time::Duration::from_secs(10)))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| PgError::Data(format!("cannot build the connection pool: {e}")))?;
        Ok(Self { pool, server_name })
    }

    /// The homeserver this database belongs to.
    pub fn server_name(&self) -> &ServerName {
        &self.server_name
    }

    /// Reads Synapse's schema version and refuses one the queries were not checked against.
    pub async fn check_schema(&self) -> Result<SchemaVersion, PgError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt("SELECT version::bigint, upgraded FROM schema_version", &[])
            .await
            .map_err(|e| match PgError::from(e) {
                PgError::Data(why) => {
                    PgError::Schema(format!("no schema_version table ({why}): is this Synapse's database?"))
                }
                other => other,
            })?
            .ok_or_else(|| {
                PgError::Schema("schema_version is empty: Synapse never finished creating its schema".into())
            })?;
        let compat_exists: bool =
            client.query_one("SELECT to_regclass('schema_compat_version') IS NOT NULL", &[]).await?.get(0);
        let compat_version = if compat_exists {
            client.query_opt("SELECT compat_version::bigint FROM schema_compat_version", &[]).await?.map(|r| r.get(0))
        } else {
            None
        };
        let version = SchemaVersion { version: row.get(0), compat_version, upgraded: row.get(1) };
        match version.refusal() {
            Some(why) => Err(PgError::Schema(why)),
            None => Ok(version),
        }
    }
}

/// Synapse stores every id and timestamp in signed 64 bits; the core uses unsigned ones.
fn to_i64(value: u64, what: &str) -> Result<i64, PgError> {
    i64::try_from(value).map_err(|_| PgError::Data(format!("{what} {value} exceeds 2^63-1")))
}

/// Synapse writes -1 or NULL for "none" in some position columns; both read as absent.
fn to_u64(value: i64) -> Option<u64> {
    u64::try_from(value).ok()
}

fn parse_server(name: &str, what: &str) -> Result<ServerName, PgError> {
    ServerName::parse(name).map_err(|e| PgError::Data(format!("{what} {name:?} is not a server name: {e}")))
}
