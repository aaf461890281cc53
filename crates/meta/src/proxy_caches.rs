//! Pull-through cache settings made through the API (those in the config file are not
//! stored): one row per proxy project, the settings as the JSON the API took (the
//! proxy crate reads it), removed with its project.

use async_trait::async_trait;

use crate::engine::{args, owned};
use crate::events::record;
use crate::{now, Actor, Change, Database, MetaError};

/// Stored pull-through cache settings, by project.
#[async_trait]
pub trait ProxyCacheStore: Send + Sync {
    /// Makes `project` a proxy cache with `settings` (replacing earlier ones);
    /// [`MetaError::NotFound`] if there is no such project.
    async fn set_proxy_cache(
        &self,
        project: &str,
        settings: &str,
        by: &Actor,
    ) -> Result<(), MetaError>;
    /// Makes `project` an ordinary project again (what it cached stays); false if it was
    /// not a proxy cache.
    async fn remove_proxy_cache(&self, project: &str, by: &Actor) -> Result<bool, MetaError>;
    /// Every stored proxy cache: project and settings.
    async fn proxy_caches(&self) -> Result<Vec<(String, String)>, MetaError>;
}

#[async_trait]
impl ProxyCacheStore for Database {
    async fn set_proxy_cache(
        &self,
        project: &str,
        settings: &str,
        by: &Actor,
    ) -> Result<(), MetaError> {
        let (project, settings, by) = (project.to_owned(), settings.to_owned(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                if !tx.exists("SELECT 1 FROM projects WHERE name = ?1", args![&project])? {
                    return Err(MetaError::NotFound(format!("project {project}")));
                }
                tx.execute(
                    "INSERT INTO proxy_caches (project, settings, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (project) DO UPDATE SET settings = excluded.settings, updated_at = excluded.updated_at",
                    args![&project, &settings, now()],
                )?;
                let change = Change::ProxyCacheSet { project: project.clone() };
                record(tx, &by, std::slice::from_ref(&change))?;
                Ok(())
            })
            .await
    }

    async fn remove_proxy_cache(&self, project: &str, by: &Actor) -> Result<bool, MetaError> {
        let (project, by) = (project.to_owned(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                let removed = tx.execute(
                    "DELETE FROM proxy_caches WHERE project = ?1",
                    args![&project],
                )?;
                if removed == 0 {
                    return Ok(false);
                }
                let change = Change::ProxyCacheRemoved {
                    project: project.clone(),
                };
                record(tx, &by, std::slice::from_ref(&change))?;
                Ok(true)
            })
            .await
    }

    async fn proxy_caches(&self) -> Result<Vec<(String, String)>, MetaError> {
        let sql = "SELECT project, settings FROM proxy_caches ORDER BY project";
        self.read_rows(sql, owned![], |mut r| Ok((r.text(0)?, r.text(1)?)))
            .await
    }
}
