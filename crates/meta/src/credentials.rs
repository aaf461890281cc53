//! Credentials other than a user's password: a project's robot accounts and the refresh
//! tokens `docker login` keeps. Records only, as in `accounts.rs`: `berth-auth` decides
//! what they allow.

use async_trait::async_trait;

use crate::accounts::{clash, project_exists};
use crate::changes::Change;
use crate::engine::{args, owned, Durability, Row};
use crate::events::{record, Actor};
use crate::{now, Database, MetaError};

/// A refresh token: what `docker login` keeps instead of the password (its identity
/// token), one per login, valid until it expires or is revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshTokenRecord {
    /// The token's `jti`: how it is listed and revoked (the token itself is never stored).
    pub id: String,
    /// The user or robot name.
    pub subject: String,
    /// `user` or `robot`.
    pub subject_kind: String,
    /// The account's id when issued (a recreated account of the same name is another).
    pub subject_id: i64,
    /// The `client_id` the client gave, if any (bounded).
    pub client: String,
    /// The address it was issued to.
    pub address: String,
    /// When it was issued (ms since the epoch).
    pub created_ms: i64,
    /// When it expires.
    pub expires_ms: i64,
    /// When it was last used to get an access token (to the minute).
    pub last_used_ms: i64,
}

/// A project's robot account: a machine credential with chosen permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RobotRecord {
    /// Stable id; tokens carry it.
    pub id: i64,
    /// The project it belongs to.
    pub project: String,
    /// Its short name; it logs in as `robot$<project>+<name>`.
    pub name: String,
    /// Hash of its secret (Argon2id PHC string).
    pub secret_hash: String,
    /// Permission names, as `berth-auth` spells them.
    pub permissions: Vec<String>,
    /// After this time (ms since the epoch) it can no longer log in; `None` for never.
    pub expires_ms: Option<i64>,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
}

/// Robot accounts and refresh tokens.
#[async_trait]
pub trait CredentialStore: Send + Sync {
    /// Creates a robot account; [`MetaError::Conflict`] if the name is taken in the
    /// project, [`MetaError::NotFound`] if the project does not exist.
    async fn create_robot(
        &self,
        project: &str,
        name: &str,
        secret_hash: &str,
        permissions: &[String],
        expires_ms: Option<i64>,
        by: &Actor,
    ) -> Result<RobotRecord, MetaError>;
    /// A robot by project and name.
    async fn robot(&self, project: &str, name: &str) -> Result<Option<RobotRecord>, MetaError>;
    /// A project's robots, by name.
    async fn robots(&self, project: &str) -> Result<Vec<RobotRecord>, MetaError>;
    /// Sets when a robot expires (`None`: never); true if it exists.
    async fn set_robot_expiry(
        &self,
        project: &str,
        name: &str,
        expires_ms: Option<i64>,
        by: &Actor,
    ) -> Result<bool, MetaError>;
    /// Removes a robot; true if it existed.
    async fn delete_robot(&self, project: &str, name: &str, by: &Actor) -> Result<bool, MetaError>;

    /// Records a refresh token at its issue (its id is the token's `jti`).
    async fn record_refresh_token(&self, token: &RefreshTokenRecord) -> Result<(), MetaError>;
    /// A live (recorded, unexpired) refresh token by id, its last use noted.
    async fn use_refresh_token(&self, id: &str) -> Result<Option<RefreshTokenRecord>, MetaError>;
    /// The live refresh tokens of a user or robot, newest first.
    async fn refresh_tokens(&self, subject: &str) -> Result<Vec<RefreshTokenRecord>, MetaError>;
    /// Revokes one of `subject`'s refresh tokens; true if it existed.
    async fn revoke_refresh_token(
        &self,
        subject: &str,
        id: &str,
        by: &Actor,
    ) -> Result<bool, MetaError>;
}

/// Live refresh tokens kept per user or robot; older ones are dropped at the next login.
const MAX_REFRESH_TOKENS: i64 = 100;

/// The columns [`refresh_token_row`] reads.
macro_rules! refresh_token_columns {
    () => {
        "id, subject, subject_kind, subject_id, client, address, created_at, expires_at, last_used_at"
    };
}

fn refresh_token_row(mut r: Row) -> Result<RefreshTokenRecord, MetaError> {
    Ok(RefreshTokenRecord {
        id: r.text(0)?,
        subject: r.text(1)?,
        subject_kind: r.text(2)?,
        subject_id: r.int(3)?,
        client: r.text(4)?,
        address: r.text(5)?,
        created_ms: r.int(6)?,
        expires_ms: r.int(7)?,
        last_used_ms: r.int(8)?,
    })
}

/// The columns [`robot_row`] reads.
macro_rules! robot_columns {
    () => {
        "id, project, name, secret_hash, permissions, expires_at, created_at"
    };
}

fn robot_row(mut r: Row) -> Result<RobotRecord, MetaError> {
    let permissions = r.text(4)?;
    Ok(RobotRecord {
        id: r.int(0)?,
        project: r.text(1)?,
        name: r.text(2)?,
        secret_hash: r.text(3)?,
        permissions: permissions
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect(),
        expires_ms: r.opt_int(5)?,
        created_ms: r.int(6)?,
    })
}

#[async_trait]
impl CredentialStore for Database {
    async fn create_robot(
        &self,
        project: &str,
        name: &str,
        secret_hash: &str,
        permissions: &[String],
        expires_ms: Option<i64>,
        by: &Actor,
    ) -> Result<RobotRecord, MetaError> {
        let change = Change::RobotCreated {
            project: project.to_owned(),
            name: name.to_owned(),
            permissions: permissions.to_vec(),
        };
        let (project, name, hash) = (project.to_owned(), name.to_owned(), secret_hash.to_owned());
        let (permissions, by) = (permissions.join(","), by.clone());
        self.engine
            .write_recorded(move |tx| {
                if !project_exists(tx, &project)? {
                    return Err(MetaError::NotFound(format!("project {project}")));
                }
                let row = tx
                    .query_one(
                        concat!(
                            "INSERT INTO robots (project, name, secret_hash, permissions, expires_at, created_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING ",
                            robot_columns!()
                        ),
                        args![&project, &name, &hash, &permissions, expires_ms, now()],
                    )
                    .map_err(clash(format!("robot {name} exists in project {project}")))?;
                record(tx, &by, std::slice::from_ref(&change))?;
                robot_row(row)
            })
            .await
    }

    async fn robot(&self, project: &str, name: &str) -> Result<Option<RobotRecord>, MetaError> {
        let sql = concat!(
            "SELECT ",
            robot_columns!(),
            " FROM robots WHERE project = ?1 AND name = ?2"
        );
        self.read_row(sql, owned![project, name], robot_row).await
    }

    async fn record_refresh_token(&self, t: &RefreshTokenRecord) -> Result<(), MetaError> {
        let t = t.clone();
        self.engine
            .write(Durability::Synced, move |tx| {
                tx.execute(
                    "INSERT INTO refresh_tokens (id, subject, subject_kind, subject_id, client, address, created_at, expires_at, last_used_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?7)",
                    args![&t.id, &t.subject, &t.subject_kind, t.subject_id, &t.client, &t.address, t.created_ms, t.expires_ms],
                )?;
                // Expired tokens go, and past the newest hundred the oldest: logins cannot
                // grow the table without bound.
                tx.execute(
                    "DELETE FROM refresh_tokens WHERE subject = ?1 AND (expires_at <= ?2 OR id IN
                        (SELECT id FROM refresh_tokens WHERE subject = ?1 ORDER BY created_at DESC, id LIMIT 100000 OFFSET ?3))",
                    args![&t.subject, t.created_ms, MAX_REFRESH_TOKENS],
                )?;
                Ok(())
            })
            .await
    }

    async fn use_refresh_token(&self, id: &str) -> Result<Option<RefreshTokenRecord>, MetaError> {
        let sql = concat!(
            "SELECT ",
            refresh_token_columns!(),
            " FROM refresh_tokens WHERE id = ?1 AND expires_at > ?2"
        );
        let found = self
            .read_row(sql, owned![id, now()], refresh_token_row)
            .await?;
        if let Some(token) = &found {
            // Noted to the minute: a refresh per pull must not become a write per pull.
            if now() - token.last_used_ms >= 60_000 {
                let sql = "UPDATE refresh_tokens SET last_used_at = ?2 WHERE id = ?1";
                self.write_statement(Durability::Visible, sql, owned![id, now()])
                    .await?;
            }
        }
        Ok(found)
    }

    async fn refresh_tokens(&self, subject: &str) -> Result<Vec<RefreshTokenRecord>, MetaError> {
        let sql = concat!(
            "SELECT ",
            refresh_token_columns!(),
            " FROM refresh_tokens WHERE subject = ?1 AND expires_at > ?2 ORDER BY created_at DESC, id"
        );
        self.read_rows(sql, owned![subject, now()], refresh_token_row)
            .await
    }

    async fn revoke_refresh_token(
        &self,
        subject: &str,
        id: &str,
        by: &Actor,
    ) -> Result<bool, MetaError> {
        let sql = "DELETE FROM refresh_tokens WHERE subject = ?1 AND id = ?2";
        let change = Change::RefreshTokenRevoked {
            subject: subject.to_owned(),
            id: id.to_owned(),
        };
        self.change_statement(sql, owned![subject, id], change, by)
            .await
    }

    async fn robots(&self, project: &str) -> Result<Vec<RobotRecord>, MetaError> {
        let sql = concat!(
            "SELECT ",
            robot_columns!(),
            " FROM robots WHERE project = ?1 ORDER BY name"
        );
        self.read_rows(sql, owned![project], robot_row).await
    }

    async fn set_robot_expiry(
        &self,
        project: &str,
        name: &str,
        expires_ms: Option<i64>,
        by: &Actor,
    ) -> Result<bool, MetaError> {
        let sql = "UPDATE robots SET expires_at = ?3 WHERE project = ?1 AND name = ?2";
        let change = Change::RobotExpiryChanged {
            project: project.to_owned(),
            name: name.to_owned(),
            expires_ms,
        };
        self.change_statement(sql, owned![project, name, expires_ms], change, by)
            .await
    }

    async fn delete_robot(&self, project: &str, name: &str, by: &Actor) -> Result<bool, MetaError> {
        let sql = "DELETE FROM robots WHERE project = ?1 AND name = ?2";
        let change = Change::RobotDeleted {
            project: project.to_owned(),
            name: name.to_owned(),
        };
        self.change_statement(sql, owned![project, name], change, by)
            .await
    }
}
