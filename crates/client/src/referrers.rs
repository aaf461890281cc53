//! Referrers: the referrers API, and the tag schema (`sha256-<hex>`) the specification
//! keeps for registries without it, read and written.

use berth_oci::Digest;
use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::StatusCode;

use crate::{read_bounded, ClientError, Manifest, RegistryClient, MAX_MANIFEST};

impl RegistryClient {
    /// The manifests that name `digest` as their subject (signatures, SBOMs…), as
    /// descriptors: from the referrers API, or, where the registry has none, from the
    /// `sha256-<hex>` tag the specification's fallback keeps.
    pub async fn referrers(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<Vec<serde_json::Value>, ClientError> {
        let url = format!("{}/v2/{repository}/referrers/{digest}", self.base);
        let scope = format!("repository:{repository}:pull");
        let response = self
            .send(&scope, true, |http| {
                http.get(&url)
                    .header(ACCEPT, "application/vnd.oci.image.index.v1+json")
            })
            .await?;
        let index: serde_json::Value = if response.status().is_success() {
            let what = format!("referrers of {digest}");
            let bytes = read_bounded(response, MAX_MANIFEST, &what).await?;
            serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Protocol(format!("{what}: {e}")))?
        } else if response.status() == StatusCode::NOT_FOUND {
            match self.manifest(repository, &fallback_tag(digest)).await {
                Ok(found) => serde_json::from_slice(&found.bytes).unwrap_or_default(),
                Err(ClientError::NotFound(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        } else {
            return Err(Self::failure(response, &format!("referrers of {digest}")).await);
        };
        Ok(index["manifests"].as_array().cloned().unwrap_or_default())
    }

    /// Keeps the referrers tag schema for a registry without the referrers API: the
    /// `sha256-<hex>` tag of the subject is an index listing its referrers.
    pub(crate) async fn add_to_fallback_index(
        &self,
        repository: &str,
        subject: &Digest,
        referrer: &Manifest,
    ) -> Result<(), ClientError> {
        let tag = fallback_tag(subject);
        let mut index = match self.manifest(repository, &tag).await {
            Ok(existing) => {
                serde_json::from_slice(&existing.bytes).unwrap_or_else(|_| empty_index())
            }
            Err(ClientError::NotFound(_)) => empty_index(),
            Err(e) => return Err(e),
        };
        let parsed: serde_json::Value = serde_json::from_slice(&referrer.bytes).unwrap_or_default();
        let mut descriptor = serde_json::json!({
            "mediaType": referrer.media_type,
            "digest": referrer.digest.to_string(),
            "size": referrer.bytes.len(),
        });
        let artifact_type = parsed["artifactType"]
            .as_str()
            .or(parsed["config"]["mediaType"].as_str());
        if let Some(artifact_type) = artifact_type {
            descriptor["artifactType"] = artifact_type.into();
        }
        if !parsed["annotations"].is_null() {
            descriptor["annotations"] = parsed["annotations"].clone();
        }
        let Some(entries) = index["manifests"].as_array_mut() else {
            return Err(ClientError::Protocol(format!("{tag} is not an index")));
        };
        if entries.iter().any(|e| e["digest"] == descriptor["digest"]) {
            return Ok(());
        }
        entries.push(descriptor);
        let bytes = Bytes::from(
            serde_json::to_vec(&index).map_err(|e| ClientError::Protocol(e.to_string()))?,
        );
        let updated = Manifest {
            digest: Digest::sha256_of(&bytes),
            bytes,
            media_type: "application/vnd.oci.image.index.v1+json".to_owned(),
        };
        let url = format!("{}/v2/{repository}/manifests/{tag}", self.base);
        let scope = format!("repository:{repository}:pull,push");
        let response = self
            .send(&scope, true, |http| {
                http.put(&url)
                    .header(CONTENT_TYPE, updated.media_type.as_str())
                    .body(updated.bytes.clone())
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(Self::failure(response, &format!("referrers tag {tag}")).await);
        }
        Ok(())
    }
}

/// The tag the referrers tag schema keeps a subject's referrers under.
fn fallback_tag(digest: &Digest) -> String {
    format!("{}-{}", digest.algorithm().as_str(), digest.hex())
}

fn empty_index() -> serde_json::Value {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [],
    })
}

/// The `subject` a manifest names, if any.
pub(crate) fn subject_of(bytes: &[u8]) -> Option<Digest> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    Digest::parse(value["subject"]["digest"].as_str()?).ok()
}
