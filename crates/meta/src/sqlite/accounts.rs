//! Users, projects, members, robots and the audit log in SQLite.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{backend, SqliteMeta};
use crate::accounts::{
    AccountStore, AuditFilter, AuditRecord, MemberRecord, NewAuditEvent, ProjectAccess,
    ProjectRecord, RobotRecord, UserRecord,
};
use crate::now;
use crate::MetaError;

const USER_COLUMNS: &str = "id, name, password_hash, admin, generation, created_at";
const ROBOT_COLUMNS: &str = "id, project, name, secret_hash, permissions, expires_at, created_at";

fn user_row(r: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        password_hash: r.get(2)?,
        admin: r.get(3)?,
        generation: r.get(4)?,
        created_ms: r.get(5)?,
    })
}

fn project_row(r: &Row<'_>) -> rusqlite::Result<ProjectRecord> {
    Ok(ProjectRecord {
        name: r.get(0)?,
        public: r.get(1)?,
        created_ms: r.get(2)?,
    })
}

fn robot_row(r: &Row<'_>) -> rusqlite::Result<RobotRecord> {
    let permissions: String = r.get(4)?;
    Ok(RobotRecord {
        id: r.get(0)?,
        project: r.get(1)?,
        name: r.get(2)?,
        secret_hash: r.get(3)?,
        permissions: permissions
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect(),
        expires_ms: r.get(5)?,
        created_ms: r.get(6)?,
    })
}

/// Maps a uniqueness violation to [`MetaError::Conflict`].
fn unique(what: String) -> impl FnOnce(rusqlite::Error) -> MetaError {
    move |e| match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            MetaError::Conflict(what)
        }
        other => backend(other),
    }
}

fn user_id(conn: &Connection, name: &str) -> Result<Option<i64>, MetaError> {
    conn.prepare_cached("SELECT id FROM users WHERE name = ?1")
        .and_then(|mut s| s.query_row(params![name], |r| r.get(0)).optional())
        .map_err(backend)
}

fn project_exists(conn: &Connection, name: &str) -> Result<bool, MetaError> {
    conn.prepare_cached("SELECT 1 FROM projects WHERE name = ?1")
        .and_then(|mut s| s.exists(params![name]))
        .map_err(backend)
}

/// Whether repositories (with manifests, or only blobs so far) live under a project name.
/// `name > p/ AND name < p0` is the index range of `p/…` (`0` follows `/`).
fn holds_repositories(conn: &Connection, project: &str) -> Result<bool, MetaError> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM repositories WHERE name = ?1 OR (name > ?1 || '/' AND name < ?1 || '0'))
             OR EXISTS (SELECT 1 FROM repo_blobs WHERE repo = ?1 OR (repo > ?1 || '/' AND repo < ?1 || '0'))",
    )
    .and_then(|mut s| s.query_row(params![project], |r| r.get::<_, bool>(0)))
    .map_err(backend)
}

fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, MetaError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.query_map(params, map)?.collect())
        .map_err(backend)
}

#[async_trait]
impl AccountStore for SqliteMeta {
    async fn count_users(&self) -> Result<u64, MetaError> {
        self.read(|conn| {
            conn.query_row("SELECT count(*) FROM users", [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(backend)
        })
        .await
    }

    async fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
    ) -> Result<UserRecord, MetaError> {
        let (name, hash) = (name.to_owned(), password_hash.to_owned());
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO users (name, password_hash, admin, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, hash, admin, now()],
            )
            .map_err(unique(format!("user {name} exists")))?;
            tx.query_row(
                &format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"),
                params![tx.last_insert_rowid()],
                user_row,
            )
            .map_err(backend)
        })
        .await
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, MetaError> {
        let name = name.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?1"))
                .and_then(|mut s| s.query_row(params![name], user_row).optional())
                .map_err(backend)
        })
        .await
    }

    async fn users(&self) -> Result<Vec<UserRecord>, MetaError> {
        self.read(|conn| {
            query_all(
                conn,
                &format!("SELECT {USER_COLUMNS} FROM users ORDER BY name"),
                [],
                user_row,
            )
        })
        .await
    }

    async fn update_user(
        &self,
        name: &str,
        password_hash: Option<&str>,
        admin: Option<bool>,
    ) -> Result<Option<UserRecord>, MetaError> {
        let name = name.to_owned();
        let hash = password_hash.map(str::to_owned);
        self.write(move |tx| {
            if let Some(hash) = &hash {
                tx.execute(
                    "UPDATE users SET password_hash = ?2, generation = generation + 1 WHERE name = ?1",
                    params![name, hash],
                )
                .map_err(backend)?;
            }
            if let Some(admin) = admin {
                tx.execute(
                    "UPDATE users SET admin = ?2 WHERE name = ?1",
                    params![name, admin],
                )
                .map_err(backend)?;
            }
            tx.query_row(
                &format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?1"),
                params![name],
                user_row,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn rehash_password(&self, user_id: i64, password_hash: &str) -> Result<(), MetaError> {
        let hash = password_hash.to_owned();
        self.write(move |tx| {
            tx.execute(
                "UPDATE users SET password_hash = ?2 WHERE id = ?1",
                params![user_id, hash],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn delete_user(&self, name: &str) -> Result<bool, MetaError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let n = tx
                .execute("DELETE FROM users WHERE name = ?1", params![name])
                .map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    async fn create_project(
        &self,
        name: &str,
        public: bool,
        owner: Option<(i64, &str)>,
    ) -> Result<ProjectRecord, MetaError> {
        let name = name.to_owned();
        let owner = owner.map(|(id, role)| (id, role.to_owned()));
        self.write(move |tx| {
            let t = now();
            tx.execute(
                "INSERT INTO projects (name, public, created_at) VALUES (?1, ?2, ?3)",
                params![name, public, t],
            )
            .map_err(unique(format!("project {name} exists")))?;
            if let Some((user_id, role)) = owner {
                tx.execute(
                    "INSERT INTO members (project, user_id, role) VALUES (?1, ?2, ?3)",
                    params![name, user_id, role],
                )
                .map_err(backend)?;
            }
            Ok(ProjectRecord {
                name,
                public,
                created_ms: t,
            })
        })
        .await
    }

    async fn project(&self, name: &str) -> Result<Option<ProjectRecord>, MetaError> {
        let name = name.to_owned();
        self.read(move |conn| {
            conn.prepare_cached("SELECT name, public, created_at FROM projects WHERE name = ?1")
                .and_then(|mut s| s.query_row(params![name], project_row).optional())
                .map_err(backend)
        })
        .await
    }

    async fn projects(&self) -> Result<Vec<ProjectRecord>, MetaError> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT name, public, created_at FROM projects ORDER BY name",
                [],
                project_row,
            )
        })
        .await
    }

    async fn project_access(
        &self,
        project: &str,
        user_id: Option<i64>,
    ) -> Result<ProjectAccess, MetaError> {
        let project = project.to_owned();
        self.read(move |conn| {
            let row = conn
                .prepare_cached(
                    "SELECT p.name, p.public, p.created_at,
                            (SELECT role FROM members m WHERE m.project = ?1 AND m.user_id = ?2)
                     FROM projects p WHERE p.name = ?1",
                )
                .and_then(|mut s| {
                    s.query_row(params![project, user_id], |r| {
                        Ok((project_row(r)?, r.get::<_, Option<String>>(3)?))
                    })
                    .optional()
                })
                .map_err(backend)?;
            Ok(match row {
                Some((record, role)) => ProjectAccess {
                    project: Some(record),
                    role,
                    unrecorded_repositories: false,
                },
                None => ProjectAccess {
                    project: None,
                    role: None,
                    unrecorded_repositories: holds_repositories(conn, &project)?,
                },
            })
        })
        .await
    }

    async fn project_in_use(&self, name: &str) -> Result<bool, MetaError> {
        let name = name.to_owned();
        self.read(move |conn| holds_repositories(conn, &name)).await
    }

    async fn set_project_public(&self, name: &str, public: bool) -> Result<bool, MetaError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let n = tx
                .execute(
                    "UPDATE projects SET public = ?2 WHERE name = ?1",
                    params![name, public],
                )
                .map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    async fn delete_project(&self, name: &str) -> Result<bool, MetaError> {
        let name = name.to_owned();
        self.write(move |tx| {
            if holds_repositories(tx, &name)? {
                return Err(MetaError::NotEmpty(format!(
                    "project {name} still holds repositories"
                )));
            }
            let n = tx
                .execute("DELETE FROM projects WHERE name = ?1", params![name])
                .map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    async fn members(&self, project: &str) -> Result<Vec<MemberRecord>, MetaError> {
        let project = project.to_owned();
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT u.name, m.role FROM members m JOIN users u ON u.id = m.user_id
                 WHERE m.project = ?1 ORDER BY u.name",
                params![project],
                |r| {
                    Ok(MemberRecord {
                        user: r.get(0)?,
                        role: r.get(1)?,
                    })
                },
            )
        })
        .await
    }

    async fn member_role(&self, project: &str, user_id: i64) -> Result<Option<String>, MetaError> {
        let project = project.to_owned();
        self.read(move |conn| {
            conn.prepare_cached("SELECT role FROM members WHERE project = ?1 AND user_id = ?2")
                .and_then(|mut s| {
                    s.query_row(params![project, user_id], |r| r.get(0))
                        .optional()
                })
                .map_err(backend)
        })
        .await
    }

    async fn member_projects(&self, user_id: i64) -> Result<Vec<(String, String)>, MetaError> {
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT project, role FROM members WHERE user_id = ?1 ORDER BY project",
                params![user_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
    }

    async fn set_member(&self, project: &str, user: &str, role: &str) -> Result<bool, MetaError> {
        let (project, user, role) = (project.to_owned(), user.to_owned(), role.to_owned());
        self.write(move |tx| {
            if !project_exists(tx, &project)? {
                return Err(MetaError::NotFound(format!("project {project}")));
            }
            let Some(id) = user_id(tx, &user)? else {
                return Err(MetaError::NotFound(format!("user {user}")));
            };
            let updated = tx
                .execute(
                    "UPDATE members SET role = ?3 WHERE project = ?1 AND user_id = ?2",
                    params![project, id, role],
                )
                .map_err(backend)?;
            if updated > 0 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO members (project, user_id, role) VALUES (?1, ?2, ?3)",
                params![project, id, role],
            )
            .map_err(backend)?;
            Ok(true)
        })
        .await
    }

    async fn remove_member(&self, project: &str, user: &str) -> Result<bool, MetaError> {
        let (project, user) = (project.to_owned(), user.to_owned());
        self.write(move |tx| {
            let n = tx
                .execute(
                    "DELETE FROM members WHERE project = ?1
                     AND user_id = (SELECT id FROM users WHERE name = ?2)",
                    params![project, user],
                )
                .map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    async fn create_robot(
        &self,
        project: &str,
        name: &str,
        secret_hash: &str,
        permissions: &[String],
        expires_ms: Option<i64>,
    ) -> Result<RobotRecord, MetaError> {
        let (project, name, hash) = (project.to_owned(), name.to_owned(), secret_hash.to_owned());
        let permissions = permissions.join(",");
        self.write(move |tx| {
            if !project_exists(tx, &project)? {
                return Err(MetaError::NotFound(format!("project {project}")));
            }
            tx.execute(
                "INSERT INTO robots (project, name, secret_hash, permissions, expires_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![project, name, hash, permissions, expires_ms, now()],
            )
            .map_err(unique(format!("robot {name} exists in project {project}")))?;
            tx.query_row(
                &format!("SELECT {ROBOT_COLUMNS} FROM robots WHERE id = ?1"),
                params![tx.last_insert_rowid()],
                robot_row,
            )
            .map_err(backend)
        })
        .await
    }

    async fn robot(&self, project: &str, name: &str) -> Result<Option<RobotRecord>, MetaError> {
        let (project, name) = (project.to_owned(), name.to_owned());
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {ROBOT_COLUMNS} FROM robots WHERE project = ?1 AND name = ?2"
            ))
            .and_then(|mut s| s.query_row(params![project, name], robot_row).optional())
            .map_err(backend)
        })
        .await
    }

    async fn robots(&self, project: &str) -> Result<Vec<RobotRecord>, MetaError> {
        let project = project.to_owned();
        self.read(move |conn| {
            query_all(
                conn,
                &format!("SELECT {ROBOT_COLUMNS} FROM robots WHERE project = ?1 ORDER BY name"),
                params![project],
                robot_row,
            )
        })
        .await
    }

    async fn delete_robot(&self, project: &str, name: &str) -> Result<bool, MetaError> {
        let (project, name) = (project.to_owned(), name.to_owned());
        self.write(move |tx| {
            let n = tx
                .execute(
                    "DELETE FROM robots WHERE project = ?1 AND name = ?2",
                    params![project, name],
                )
                .map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    async fn setting_or_insert(&self, name: &str, candidate: &str) -> Result<String, MetaError> {
        let (name, candidate) = (name.to_owned(), candidate.to_owned());
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO settings (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
                params![name, candidate],
            )
            .map_err(backend)?;
            tx.query_row(
                "SELECT value FROM settings WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .map_err(backend)
        })
        .await
    }

    async fn append_audit(&self, events: Vec<NewAuditEvent>) -> Result<(), MetaError> {
        self.write(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO audit (at, actor, actor_kind, address, action, resource, result, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(backend)?;
            for e in &events {
                stmt.execute(params![
                    e.at_ms,
                    e.actor,
                    e.actor_kind,
                    e.address,
                    e.action,
                    e.resource,
                    e.result,
                    e.detail
                ])
                .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn audit(&self, filter: AuditFilter) -> Result<Vec<AuditRecord>, MetaError> {
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT id, at, actor, actor_kind, address, action, resource, result, detail FROM audit
                 WHERE (?1 IS NULL OR actor = ?1)
                   AND (?2 IS NULL OR action = ?2)
                   AND (?3 IS NULL OR substr(resource, 1, length(?3)) = ?3)
                   AND (?4 IS NULL OR result = ?4)
                   AND (?5 IS NULL OR at >= ?5)
                   AND (?6 IS NULL OR at < ?6)
                   AND (?7 IS NULL OR id < ?7)
                 ORDER BY id DESC LIMIT ?8",
                params![
                    filter.actor,
                    filter.action,
                    filter.resource_prefix,
                    filter.result,
                    filter.since_ms,
                    filter.until_ms,
                    filter.before_id,
                    filter.limit as i64
                ],
                |r| {
                    Ok(AuditRecord {
                        id: r.get(0)?,
                        event: NewAuditEvent {
                            at_ms: r.get(1)?,
                            actor: r.get(2)?,
                            actor_kind: r.get(3)?,
                            address: r.get(4)?,
                            action: r.get(5)?,
                            resource: r.get(6)?,
                            result: r.get(7)?,
                            detail: r.get(8)?,
                        },
                    })
                },
            )
        })
        .await
    }
}
