//! Users, projects, members, robots and the audit log in PostgreSQL.

use async_trait::async_trait;
use tokio_postgres::Row;

use super::{unique, write_tx, Durability, Fail, PostgresMeta};
use crate::accounts::{
    AccountStore, AuditFilter, AuditRecord, MemberRecord, NewAuditEvent, ProjectAccess,
    ProjectRecord, RobotRecord, UserRecord,
};
use crate::now;
use crate::MetaError;

const USER_COLUMNS: &str = "id, name, password_hash, admin, generation, created_at";
const ROBOT_COLUMNS: &str = "id, project, name, secret_hash, permissions, expires_at, created_at";

fn user_row(r: &Row) -> Result<UserRecord, MetaError> {
    Ok(UserRecord {
        id: r.get(0),
        name: r.get(1),
        password_hash: r.get(2),
        admin: r.get(3),
        generation: r.get(4),
        created_ms: r.get(5),
    })
}

fn project_row(r: &Row) -> Result<ProjectRecord, MetaError> {
    Ok(ProjectRecord {
        name: r.get(0),
        public: r.get(1),
        created_ms: r.get(2),
    })
}

fn robot_row(r: &Row) -> Result<RobotRecord, MetaError> {
    let permissions: String = r.get(4);
    Ok(RobotRecord {
        id: r.get(0),
        project: r.get(1),
        name: r.get(2),
        secret_hash: r.get(3),
        permissions: permissions
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect(),
        expires_ms: r.get(5),
        created_ms: r.get(6),
    })
}

/// Whether repositories (with manifests, or only blobs so far) live under a project name.
const HOLDS_REPOSITORIES: &str = "
SELECT EXISTS (SELECT 1 FROM repositories WHERE name = $1 OR (name > $1 || '/' AND name < $1 || '0'))
    OR EXISTS (SELECT 1 FROM repo_blobs WHERE repo = $1 OR (repo > $1 || '/' AND repo < $1 || '0'))";

#[async_trait]
impl AccountStore for PostgresMeta {
    async fn count_users(&self) -> Result<u64, MetaError> {
        let n = self
            .row(
                "SELECT count(*) FROM users",
                &[],
                |r| Ok(r.get::<_, i64>(0)),
            )
            .await?;
        Ok(n.unwrap_or(0) as u64)
    }

    async fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
    ) -> Result<UserRecord, MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO users (name, password_hash, admin, created_at) VALUES ($1, $2, $3, $4)
                         RETURNING {USER_COLUMNS}"
                    ),
                    &[&name, &password_hash, &admin, &now()],
                )
                .await
                .map_err(unique(format!("user {name} exists")))?;
            Ok(user_row(&row)?)
        })
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, MetaError> {
        self.row(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE name = $1"),
            &[&name],
            user_row,
        )
        .await
    }

    async fn users(&self) -> Result<Vec<UserRecord>, MetaError> {
        self.rows(
            &format!("SELECT {USER_COLUMNS} FROM users ORDER BY name"),
            &[],
            user_row,
        )
        .await
    }

    async fn update_user(
        &self,
        name: &str,
        password_hash: Option<&str>,
        admin: Option<bool>,
    ) -> Result<Option<UserRecord>, MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            if let Some(hash) = password_hash {
                tx.execute(
                    "UPDATE users SET password_hash = $2, generation = generation + 1 WHERE name = $1",
                    &[&name, &hash],
                )
                .await?;
            }
            if let Some(admin) = admin {
                tx.execute(
                    "UPDATE users SET admin = $2 WHERE name = $1",
                    &[&name, &admin],
                )
                .await?;
            }
            let row = tx
                .query_opt(
                    &format!("SELECT {USER_COLUMNS} FROM users WHERE name = $1"),
                    &[&name],
                )
                .await?;
            Ok(row.as_ref().map(user_row).transpose()?)
        })
    }

    async fn rehash_password(&self, user_id: i64, password_hash: &str) -> Result<(), MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            tx.execute(
                "UPDATE users SET password_hash = $2 WHERE id = $1",
                &[&user_id, &password_hash],
            )
            .await?;
            Ok(())
        })
    }

    async fn delete_user(&self, name: &str) -> Result<bool, MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            let n = tx
                .execute("DELETE FROM users WHERE name = $1", &[&name])
                .await?;
            Ok(n > 0)
        })
    }

    async fn create_project(
        &self,
        name: &str,
        public: bool,
        owner: Option<(i64, &str)>,
    ) -> Result<ProjectRecord, MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            let t = now();
            tx.execute(
                "INSERT INTO projects (name, public, created_at) VALUES ($1, $2, $3)",
                &[&name, &public, &t],
            )
            .await
            .map_err(unique(format!("project {name} exists")))?;
            if let Some((user_id, role)) = owner {
                tx.execute(
                    "INSERT INTO members (project, user_id, role) VALUES ($1, $2, $3)",
                    &[&name, &user_id, &role],
                )
                .await?;
            }
            Ok(ProjectRecord {
                name: name.to_owned(),
                public,
                created_ms: t,
            })
        })
    }

    async fn project(&self, name: &str) -> Result<Option<ProjectRecord>, MetaError> {
        self.row(
            "SELECT name, public, created_at FROM projects WHERE name = $1",
            &[&name],
            project_row,
        )
        .await
    }

    async fn projects(&self) -> Result<Vec<ProjectRecord>, MetaError> {
        self.rows(
            "SELECT name, public, created_at FROM projects ORDER BY name",
            &[],
            project_row,
        )
        .await
    }

    async fn project_access(
        &self,
        project: &str,
        user_id: Option<i64>,
    ) -> Result<ProjectAccess, MetaError> {
        let row = self
            .row(
                "SELECT p.name, p.public, p.created_at,
                        (SELECT role FROM members m WHERE m.project = $1 AND m.user_id = $2),
                        p.name IS NULL AND (
                            EXISTS (SELECT 1 FROM repositories
                                    WHERE name = $1 OR (name > $1 || '/' AND name < $1 || '0'))
                            OR EXISTS (SELECT 1 FROM repo_blobs
                                    WHERE repo = $1 OR (repo > $1 || '/' AND repo < $1 || '0')))
                 FROM (SELECT $1::text AS wanted) q LEFT JOIN projects p ON p.name = q.wanted",
                &[&project, &user_id],
                |r| {
                    let name: Option<String> = r.get(0);
                    Ok(ProjectAccess {
                        project: name.map(|name| ProjectRecord {
                            name,
                            public: r.get(1),
                            created_ms: r.get(2),
                        }),
                        role: r.get(3),
                        unrecorded_repositories: r.get(4),
                    })
                },
            )
            .await?;
        row.ok_or_else(|| MetaError::Corrupt("project access query returned no row".into()))
    }

    async fn project_in_use(&self, name: &str) -> Result<bool, MetaError> {
        Ok(self
            .row(HOLDS_REPOSITORIES, &[&name], |r| Ok(r.get::<_, bool>(0)))
            .await?
            .unwrap_or(false))
    }

    async fn set_project_public(&self, name: &str, public: bool) -> Result<bool, MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            let n = tx
                .execute(
                    "UPDATE projects SET public = $2 WHERE name = $1",
                    &[&name, &public],
                )
                .await?;
            Ok(n > 0)
        })
    }

    async fn delete_project(&self, name: &str) -> Result<bool, MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            let holds: bool = tx.query_one(HOLDS_REPOSITORIES, &[&name]).await?.get(0);
            if holds {
                return Err(Fail::Meta(MetaError::NotEmpty(format!(
                    "project {name} still holds repositories"
                ))));
            }
            let n = tx
                .execute("DELETE FROM projects WHERE name = $1", &[&name])
                .await?;
            Ok(n > 0)
        })
    }

    async fn members(&self, project: &str) -> Result<Vec<MemberRecord>, MetaError> {
        self.rows(
            "SELECT u.name, m.role FROM members m JOIN users u ON u.id = m.user_id
             WHERE m.project = $1 ORDER BY u.name",
            &[&project],
            |r| {
                Ok(MemberRecord {
                    user: r.get(0),
                    role: r.get(1),
                })
            },
        )
        .await
    }

    async fn member_role(&self, project: &str, user_id: i64) -> Result<Option<String>, MetaError> {
        self.row(
            "SELECT role FROM members WHERE project = $1 AND user_id = $2",
            &[&project, &user_id],
            |r| Ok(r.get(0)),
        )
        .await
    }

    async fn member_projects(&self, user_id: i64) -> Result<Vec<(String, String)>, MetaError> {
        self.rows(
            "SELECT project, role FROM members WHERE user_id = $1 ORDER BY project",
            &[&user_id],
            |r| Ok((r.get(0), r.get(1))),
        )
        .await
    }

    async fn set_member(&self, project: &str, user: &str, role: &str) -> Result<bool, MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            if tx
                .query_opt("SELECT 1 FROM projects WHERE name = $1", &[&project])
                .await?
                .is_none()
            {
                return Err(Fail::Meta(MetaError::NotFound(format!(
                    "project {project}"
                ))));
            }
            let Some(row) = tx
                .query_opt("SELECT id FROM users WHERE name = $1", &[&user])
                .await?
            else {
                return Err(Fail::Meta(MetaError::NotFound(format!("user {user}"))));
            };
            let id: i64 = row.get(0);
            let updated = tx
                .execute(
                    "UPDATE members SET role = $3 WHERE project = $1 AND user_id = $2",
                    &[&project, &id, &role],
                )
                .await?;
            if updated > 0 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO members (project, user_id, role) VALUES ($1, $2, $3)",
                &[&project, &id, &role],
            )
            .await?;
            Ok(true)
        })
    }

    async fn remove_member(&self, project: &str, user: &str) -> Result<bool, MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            let n = tx
                .execute(
                    "DELETE FROM members WHERE project = $1
                     AND user_id = (SELECT id FROM users WHERE name = $2)",
                    &[&project, &user],
                )
                .await?;
            Ok(n > 0)
        })
    }

    async fn create_robot(
        &self,
        project: &str,
        name: &str,
        secret_hash: &str,
        permissions: &[String],
        expires_ms: Option<i64>,
    ) -> Result<RobotRecord, MetaError> {
        let permissions = permissions.join(",");
        write_tx!(self, Durability::Synced, |tx| {
            if tx
                .query_opt("SELECT 1 FROM projects WHERE name = $1", &[&project])
                .await?
                .is_none()
            {
                return Err(Fail::Meta(MetaError::NotFound(format!(
                    "project {project}"
                ))));
            }
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO robots (project, name, secret_hash, permissions, expires_at, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {ROBOT_COLUMNS}"
                    ),
                    &[&project, &name, &secret_hash, &permissions, &expires_ms, &now()],
                )
                .await
                .map_err(unique(format!("robot {name} exists in project {project}")))?;
            Ok(robot_row(&row)?)
        })
    }

    async fn robot(&self, project: &str, name: &str) -> Result<Option<RobotRecord>, MetaError> {
        self.row(
            &format!("SELECT {ROBOT_COLUMNS} FROM robots WHERE project = $1 AND name = $2"),
            &[&project, &name],
            robot_row,
        )
        .await
    }

    async fn robots(&self, project: &str) -> Result<Vec<RobotRecord>, MetaError> {
        self.rows(
            &format!("SELECT {ROBOT_COLUMNS} FROM robots WHERE project = $1 ORDER BY name"),
            &[&project],
            robot_row,
        )
        .await
    }

    async fn delete_robot(&self, project: &str, name: &str) -> Result<bool, MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            let n = tx
                .execute(
                    "DELETE FROM robots WHERE project = $1 AND name = $2",
                    &[&project, &name],
                )
                .await?;
            Ok(n > 0)
        })
    }

    async fn setting_or_insert(&self, name: &str, candidate: &str) -> Result<String, MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            tx.execute(
                "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name, &candidate],
            )
            .await?;
            let row = tx
                .query_one("SELECT value FROM settings WHERE name = $1", &[&name])
                .await?;
            Ok(row.get::<_, String>(0))
        })
    }

    async fn append_audit(&self, events: Vec<NewAuditEvent>) -> Result<(), MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO audit (at, actor, actor_kind, address, action, resource, result, detail)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .await?;
            for e in &events {
                tx.execute(
                    &stmt,
                    &[
                        &e.at_ms,
                        &e.actor,
                        &e.actor_kind,
                        &e.address,
                        &e.action,
                        &e.resource,
                        &e.result,
                        &e.detail,
                    ],
                )
                .await?;
            }
            Ok(())
        })
    }

    async fn audit(&self, filter: AuditFilter) -> Result<Vec<AuditRecord>, MetaError> {
        self.rows(
            "SELECT id, at, actor, actor_kind, address, action, resource, result, detail FROM audit
             WHERE ($1::text IS NULL OR actor = $1)
               AND ($2::text IS NULL OR action = $2)
               AND ($3::text IS NULL OR starts_with(resource, $3))
               AND ($4::text IS NULL OR result = $4)
               AND ($5::bigint IS NULL OR at >= $5)
               AND ($6::bigint IS NULL OR at < $6)
               AND ($7::bigint IS NULL OR id < $7)
             ORDER BY id DESC LIMIT $8",
            &[
                &filter.actor,
                &filter.action,
                &filter.resource_prefix,
                &filter.result,
                &filter.since_ms,
                &filter.until_ms,
                &filter.before_id,
                &(filter.limit as i64),
            ],
            |r| {
                Ok(AuditRecord {
                    id: r.get(0),
                    event: NewAuditEvent {
                        at_ms: r.get(1),
                        actor: r.get(2),
                        actor_kind: r.get(3),
                        address: r.get(4),
                        action: r.get(5),
                        resource: r.get(6),
                        result: r.get(7),
                        detail: r.get(8),
                    },
                })
            },
        )
        .await
    }
}
