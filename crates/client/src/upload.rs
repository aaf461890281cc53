//! The push side of [`RegistryClient`]: mounting a blob from another repository,
//! uploading one (monolithic or in chunks, resuming where the registry says it stopped)
//! and putting a manifest.

use berth_oci::Digest;
use bytes::Bytes;
use futures_util::Stream;
use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::{Method, Response, StatusCode};

use crate::{header, referrers, ClientError, Manifest, RegistryClient};

impl RegistryClient {
    /// Links a blob another repository of this registry holds; false if the registry
    /// would rather have it uploaded.
    pub async fn mount(
        &self,
        repository: &str,
        digest: &Digest,
        from: &str,
    ) -> Result<bool, ClientError> {
        let url = format!(
            "{}/v2/{repository}/blobs/uploads/?mount={digest}&from={from}",
            self.base
        );
        let scope = format!("repository:{repository}:pull,push repository:{from}:pull");
        let response = self.send(&scope, true, |http| http.post(&url)).await?;
        match response.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => Ok(false),
            _ => Err(Self::failure(response, &format!("mount into {repository}")).await),
        }
    }

    /// Uploads a blob from `body` (a stream of `size` bytes hashing to `digest`): in one
    /// streamed request, or, when it is larger than the chunk size, in chunks each of
    /// which is sent again (from where the registry says it stopped) if it fails.
    pub async fn push_blob<S>(
        &self,
        repository: &str,
        digest: &Digest,
        size: u64,
        body: S,
    ) -> Result<(), ClientError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let scope = format!("repository:{repository}:pull,push");
        let start = format!("{}/v2/{repository}/blobs/uploads/", self.base);
        let response = self.send(&scope, true, |http| http.post(&start)).await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(Self::failure(response, &format!("upload into {repository}")).await);
        }
        let mut url = self.upload_location(&response)?;
        let final_body = if size > self.chunk_size {
            url = self.push_chunks(&scope, url, body, 0, size, None).await?;
            None
        } else {
            Some(reqwest::Body::wrap_stream(body))
        };
        self.close_upload(repository, digest, url, final_body, size)
            .await
    }

    /// Uploads a blob in chunks, going on with the upload at `upload` when it holds one
    /// (an earlier attempt's, interrupted) from where the registry says it stopped:
    /// `open(offset)` gives the blob's bytes from there. `upload` always holds where the
    /// upload stands, so a failed attempt leaves it for the next, and it is emptied once
    /// the blob is stored. A blob interrupted many times is sent little more than once.
    pub async fn push_blob_resuming<F, Fut, S>(
        &self,
        repository: &str,
        digest: &Digest,
        size: u64,
        upload: &std::sync::Mutex<Option<url::Url>>,
        open: F,
    ) -> Result<u64, ClientError>
    where
        F: FnOnce(u64) -> Fut,
        Fut: std::future::Future<Output = Result<S, ClientError>>,
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let scope = format!("repository:{repository}:pull,push");
        let unfinished = upload.lock().ok().and_then(|u| u.clone());
        let resumed = match unfinished {
            Some(url) => match self.upload_held(&scope, &url).await {
                Ok(held) => Some(held),
                // Not reached: the session is likely still there, and the next attempt
                // asks again rather than sending the whole blob anew.
                Err(e @ ClientError::Unreachable(_)) => return Err(e),
                // The registry answered that it has no such session (expired, purged).
                Err(_) => None,
            },
            None => None,
        };
        let (offset, url) = match resumed {
            Some((held, url)) if held <= size => (held, url),
            _ => {
                let start = format!("{}/v2/{repository}/blobs/uploads/", self.base);
                let response = self.send(&scope, true, |http| http.post(&start)).await?;
                if response.status() != StatusCode::ACCEPTED {
                    return Err(
                        Self::failure(response, &format!("upload into {repository}")).await,
                    );
                }
                (0, self.upload_location(&response)?)
            }
        };
        if let Ok(mut upload) = upload.lock() {
            *upload = Some(url.clone());
        }
        let body = open(offset).await?;
        let url = self
            .push_chunks(&scope, url, body, offset, size, Some(upload))
            .await?;
        self.close_upload(repository, digest, url, None, size)
            .await?;
        if let Ok(mut upload) = upload.lock() {
            *upload = None;
        }
        Ok(size - offset)
    }

    /// The closing `PUT ?digest=` of an upload, with the last bytes or none.
    async fn close_upload(
        &self,
        repository: &str,
        digest: &Digest,
        mut url: url::Url,
        final_body: Option<reqwest::Body>,
        size: u64,
    ) -> Result<(), ClientError> {
        let scope = format!("repository:{repository}:pull,push");
        url.query_pairs_mut().append_pair("digest", digest.as_str());
        let length = if final_body.is_some() { size } else { 0 };
        let body = std::sync::Mutex::new(final_body);
        let response = self
            .send(&scope, false, |http| {
                let request = http
                    .request(Method::PUT, url.as_str())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header("content-length", length.to_string());
                match body.lock().ok().and_then(|mut b| b.take()) {
                    Some(body) => request.body(body),
                    None => request,
                }
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(Self::failure(response, &format!("blob {digest} into {repository}")).await);
        }
        Ok(())
    }

    /// The absolute URL an upload answer's `Location` names.
    pub(crate) fn upload_location(&self, response: &Response) -> Result<url::Url, ClientError> {
        let location = header(response.headers(), LOCATION.as_str()).ok_or_else(|| {
            ClientError::Protocol("an upload answered without Location".to_owned())
        })?;
        url::Url::parse(&self.base)
            .and_then(|base| base.join(&location))
            .map_err(|e| ClientError::Protocol(format!("upload location {location:?}: {e}")))
    }

    /// Stores a manifest under `reference` (a tag or its digest); returns its digest.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        manifest: &Manifest,
    ) -> Result<Digest, ClientError> {
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base);
        let scope = format!("repository:{repository}:pull,push");
        let response = self
            .send(&scope, true, |http| {
                http.put(&url)
                    .header(CONTENT_TYPE, manifest.media_type.as_str())
                    .body(manifest.bytes.clone())
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(
                Self::failure(response, &format!("manifest {repository}:{reference}")).await,
            );
        }
        let subject_processed = response.headers().contains_key("oci-subject");
        if !subject_processed {
            if let Some(subject) = referrers::subject_of(&manifest.bytes) {
                self.add_to_fallback_index(repository, &subject, manifest)
                    .await?;
            }
        }
        Ok(manifest.digest.clone())
    }
}
