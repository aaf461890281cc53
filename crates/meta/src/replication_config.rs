//! Replication's configuration: registry endpoints and policies, each kept as the JSON
//! settings the API took (the replication crate reads them), with a change recorded for
//! each edit. The work they make is [`crate::ReplicationStore`].

use async_trait::async_trait;

use crate::engine::{args, owned};
use crate::events::record;
use crate::{now, Actor, Change, Database, MetaError};

/// Registry endpoints and replication policies.
#[async_trait]
pub trait ReplicationConfigStore: Send + Sync {
    /// Adds or replaces a registry endpoint.
    async fn set_replication_registry(
        &self,
        name: &str,
        settings: &str,
        by: &Actor,
    ) -> Result<(), MetaError>;
    /// Removes a registry endpoint; false if there was none; [`MetaError::Conflict`] while
    /// a policy uses it.
    async fn remove_replication_registry(&self, name: &str, by: &Actor) -> Result<bool, MetaError>;
    /// Every registry endpoint: name and settings.
    async fn replication_registries(&self) -> Result<Vec<(String, String)>, MetaError>;
    /// Adds or replaces a policy; [`MetaError::NotFound`] if its registry is unknown.
    async fn set_replication_policy(
        &self,
        name: &str,
        registry: &str,
        settings: &str,
        by: &Actor,
    ) -> Result<(), MetaError>;
    /// Removes a policy with its executions; false if there was none.
    async fn remove_replication_policy(&self, name: &str, by: &Actor) -> Result<bool, MetaError>;
    /// Every policy: name, registry, settings, and the event that created it (event
    /// triggers replicate the changes after it).
    async fn replication_policies(&self) -> Result<Vec<(String, String, String, i64)>, MetaError>;
}

#[async_trait]
impl ReplicationConfigStore for Database {
    async fn set_replication_registry(
        &self,
        name: &str,
        settings: &str,
        by: &Actor,
    ) -> Result<(), MetaError> {
        let (name, settings, by) = (name.to_owned(), settings.to_owned(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                tx.execute(
                    "INSERT INTO replication_registries (name, settings, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET settings = excluded.settings, updated_at = excluded.updated_at",
                    args![&name, &settings, now()],
                )?;
                record(tx, &by, &[Change::ReplicationRegistrySet { name: name.clone() }])
            })
            .await
    }

    async fn remove_replication_registry(&self, name: &str, by: &Actor) -> Result<bool, MetaError> {
        let (name, by) = (name.to_owned(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                if tx.exists(
                    "SELECT 1 FROM replication_policies WHERE registry = ?1",
                    args![&name],
                )? {
                    return Err(MetaError::Conflict(format!(
                        "registry {name} is used by a replication policy"
                    )));
                }
                let removed = tx.execute(
                    "DELETE FROM replication_registries WHERE name = ?1",
                    args![&name],
                )?;
                if removed > 0 {
                    record(
                        tx,
                        &by,
                        &[Change::ReplicationRegistryRemoved { name: name.clone() }],
                    )?;
                }
                Ok(removed > 0)
            })
            .await
    }

    async fn replication_registries(&self) -> Result<Vec<(String, String)>, MetaError> {
        let sql = "SELECT name, settings FROM replication_registries ORDER BY name";
        self.read_rows(sql, owned![], |mut r| Ok((r.text(0)?, r.text(1)?)))
            .await
    }

    async fn set_replication_policy(
        &self,
        name: &str,
        registry: &str,
        settings: &str,
        by: &Actor,
    ) -> Result<(), MetaError> {
        let (name, registry, settings, by) = (
            name.to_owned(),
            registry.to_owned(),
            settings.to_owned(),
            by.clone(),
        );
        self.engine
            .write_recorded(move |tx| {
                if !tx.exists(
                    "SELECT 1 FROM replication_registries WHERE name = ?1",
                    args![&registry],
                )? {
                    return Err(MetaError::NotFound(format!("registry {registry}")));
                }
                record(tx, &by, &[Change::ReplicationPolicySet { name: name.clone() }])?;
                // Event triggers replicate what happens after the policy was made: the
                // event just recorded. A changed policy keeps its place.
                let seq = tx
                    .query_one("SELECT last_seq FROM event_counter WHERE id = 1", args![])?
                    .int(0)?;
                tx.execute(
                    "INSERT INTO replication_policies (name, registry, settings, created_seq, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (name) DO UPDATE SET registry = excluded.registry,
                       settings = excluded.settings, updated_at = excluded.updated_at",
                    args![&name, &registry, &settings, seq, now()],
                )?;
                Ok(())
            })
            .await
    }

    async fn remove_replication_policy(&self, name: &str, by: &Actor) -> Result<bool, MetaError> {
        let (name, by) = (name.to_owned(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                tx.execute(
                    "DELETE FROM replication_tasks WHERE policy = ?1",
                    args![&name],
                )?;
                let removed = tx.execute(
                    "DELETE FROM replication_policies WHERE name = ?1",
                    args![&name],
                )?;
                if removed > 0 {
                    record(
                        tx,
                        &by,
                        &[Change::ReplicationPolicyRemoved { name: name.clone() }],
                    )?;
                }
                Ok(removed > 0)
            })
            .await
    }

    async fn replication_policies(&self) -> Result<Vec<(String, String, String, i64)>, MetaError> {
        let sql =
            "SELECT name, registry, settings, created_seq FROM replication_policies ORDER BY name";
        self.read_rows(sql, owned![], |mut r| {
            Ok((r.text(0)?, r.text(1)?, r.text(2)?, r.int(3)?))
        })
        .await
    }
}
