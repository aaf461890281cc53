//! What a registry holds: its repositories (`/v2/_catalog`) and a repository's tags,
//! followed page by page through `Link`, and deleting a tag or manifest. Replication
//! plans from these.

use reqwest::StatusCode;

use crate::{read_bounded, ClientError, RegistryClient};

/// Names asked for per page.
const PAGE: usize = 1000;

/// The most names a listing returns: a registry on the other side of the network must not
/// be able to make a listing grow without end.
pub const MAX_LISTED: usize = 100_000;

/// The most a page of names may weigh.
const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

impl RegistryClient {
    /// Every repository the registry lists to these credentials.
    pub async fn catalog(&self) -> Result<Vec<String>, ClientError> {
        let first = format!("{}/v2/_catalog?n={PAGE}", self.base);
        self.names(first, "registry:catalog:*", "repositories")
            .await
    }

    /// Every tag of `repository`; empty when it does not exist.
    pub async fn tags(&self, repository: &str) -> Result<Vec<String>, ClientError> {
        let first = format!("{}/v2/{repository}/tags/list?n={PAGE}", self.base);
        let scope = format!("repository:{repository}:pull");
        match self.names(first, &scope, "tags").await {
            Err(ClientError::NotFound(_)) => Ok(Vec::new()),
            other => other,
        }
    }

    /// Deletes a tag (where the registry deletes tags) or a manifest by digest; `false`
    /// when it was not there.
    pub async fn delete_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<bool, ClientError> {
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base);
        let scope = format!("repository:{repository}:delete");
        let response = self.send(&scope, true, |http| http.delete(&url)).await?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(Self::failure(response, &format!("deleting {repository}:{reference}")).await),
        }
    }

    /// The names under `member` of every page from `url` on.
    async fn names(
        &self,
        mut url: String,
        scope: &str,
        member: &str,
    ) -> Result<Vec<String>, ClientError> {
        let mut names = Vec::new();
        loop {
            let response = self.send(scope, true, |http| http.get(&url)).await?;
            if !response.status().is_success() {
                return Err(Self::failure(response, member).await);
            }
            let next = next_page(&self.base, response.headers());
            let bytes = read_bounded(response, MAX_PAGE_BYTES, member).await?;
            let page: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Protocol(format!("{member}: {e}")))?;
            for name in page[member].as_array().into_iter().flatten() {
                if let Some(name) = name.as_str() {
                    names.push(name.to_owned());
                }
            }
            if names.len() > MAX_LISTED {
                return Err(ClientError::Protocol(format!(
                    "more than {MAX_LISTED} {member}"
                )));
            }
            match next {
                // A page that leads back to itself would never end.
                Some(next) if next != url => url = next,
                _ => return Ok(names),
            }
        }
    }
}

/// The next page a `Link: <...>; rel="next"` header names, on the same registry.
fn next_page(base: &str, headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    let target = link.split(';').next()?.trim();
    let target = target.strip_prefix('<')?.strip_suffix('>')?;
    let joined = url::Url::parse(base).ok()?.join(target).ok()?;
    // Only pages of the same registry: a Link must not send credentials elsewhere.
    joined
        .as_str()
        .starts_with(base)
        .then(|| joined.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_stays_on_the_registry() {
        let mut headers = reqwest::header::HeaderMap::new();
        let base = "http://127.0.0.1:5000";
        headers.insert(
            reqwest::header::LINK,
            "</v2/_catalog?last=b&n=2>; rel=\"next\"".parse().unwrap(),
        );
        assert_eq!(
            next_page(base, &headers).as_deref(),
            Some("http://127.0.0.1:5000/v2/_catalog?last=b&n=2")
        );
        headers.insert(
            reqwest::header::LINK,
            "<http://elsewhere.invalid/v2/_catalog>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(next_page(base, &headers), None);
    }
}
