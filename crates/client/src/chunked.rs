//! Chunked pushes. Each chunk is one `PATCH` whose body streams straight from the source
//! (so reading the source and sending overlap, as in a monolithic push), while a copy of
//! the chunk's bytes is kept: if the request fails, the upload's status says how far the
//! registry got, and the rest of the chunk is sent again from that copy and the source.
//! At most one chunk per blob is held in memory.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use reqwest::header::{CONTENT_TYPE, RANGE};
use reqwest::StatusCode;

use crate::{backoff, header, ClientError, RegistryClient, ATTEMPTS};

type Source = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

/// The blob being pushed, shared by the chunks' request bodies in turn.
struct Feeder {
    source: Source,
    /// Bytes read past the end of the previous chunk.
    leftover: Option<Bytes>,
    /// Why reading the source failed, if it did (then nothing can be resent).
    failed: Option<String>,
}

type SharedFeeder = Arc<tokio::sync::Mutex<Feeder>>;

/// The next `want` bytes of the source as a stream, each piece also added to `kept`.
fn take_from(
    feeder: SharedFeeder,
    want: u64,
    kept: Arc<Mutex<BytesMut>>,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    futures_util::stream::unfold((feeder, want, kept), |(feeder, want, kept)| async move {
        if want == 0 {
            return None;
        }
        let mut state = feeder.lock().await;
        let next = match state.leftover.take() {
            Some(bytes) => Some(Ok(bytes)),
            None => state.source.next().await,
        };
        let piece = match next {
            Some(Ok(mut bytes)) => {
                if bytes.len() as u64 > want {
                    state.leftover = Some(bytes.split_off(want as usize));
                }
                Ok(bytes)
            }
            Some(Err(e)) => Err(e),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the blob ended before its size",
            )),
        };
        match piece {
            Ok(bytes) => {
                if let Ok(mut kept) = kept.lock() {
                    kept.extend_from_slice(&bytes);
                }
                let left = want - bytes.len() as u64;
                drop(state);
                Some((Ok(bytes), (feeder, left, kept)))
            }
            Err(e) => {
                state.failed = Some(e.to_string());
                drop(state);
                Some((Err(e), (feeder, 0, kept)))
            }
        }
    })
}

impl RegistryClient {
    /// Sends the bytes of a `size`-byte blob from `start` on (`body` begins there) to the
    /// upload at `url` as `PATCH` chunks of the chunk size; returns where the upload goes
    /// on (for the closing `PUT`). `track`, when given, always holds where the upload
    /// stands, so a later attempt can go on from there.
    pub(crate) async fn push_chunks<S>(
        &self,
        scope: &str,
        mut url: url::Url,
        body: S,
        start: u64,
        size: u64,
        track: Option<&Mutex<Option<url::Url>>>,
    ) -> Result<url::Url, ClientError>
    where
        S: Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
    {
        let feeder = Arc::new(tokio::sync::Mutex::new(Feeder {
            source: Box::pin(body),
            leftover: None,
            failed: None,
        }));
        let mut offset = start;
        while offset < size {
            let length = self.chunk_size().min(size - offset);
            url = self.push_chunk(scope, url, offset, length, &feeder).await?;
            offset += length;
            if let Some(track) = track {
                *track.lock().map_err(|_| poisoned())? = Some(url.clone());
            }
        }
        Ok(url)
    }

    /// How many bytes the upload at `url` holds (from its `Range: 0-<last byte>`), and
    /// where it goes on.
    pub(crate) async fn upload_held(
        &self,
        scope: &str,
        url: &url::Url,
    ) -> Result<(u64, url::Url), ClientError> {
        let status = self
            .send(scope, true, |http| http.get(url.as_str()))
            .await?;
        if status.status() != StatusCode::NO_CONTENT {
            return Err(Self::failure(status, "an upload's status").await);
        }
        let held = header(status.headers(), RANGE.as_str())
            .and_then(|r| r.split('-').nth(1)?.parse::<u64>().ok())
            // "0-0" is how registries say both "nothing" and "one byte"; a chunk is never
            // one byte, so it means nothing.
            .map_or(0, |last| if last == 0 { 0 } else { last + 1 });
        let next = self
            .upload_location(&status)
            .unwrap_or_else(|_| url.clone());
        Ok((held, next))
    }

    /// Sends the chunk of `length` bytes at `start`. When the request fails, asks the
    /// upload how far it got and sends the rest again, up to [`ATTEMPTS`] times.
    async fn push_chunk(
        &self,
        scope: &str,
        mut url: url::Url,
        start: u64,
        length: u64,
        feeder: &SharedFeeder,
    ) -> Result<url::Url, ClientError> {
        let end = start + length - 1;
        let kept = Arc::new(Mutex::new(BytesMut::new()));
        let mut from = start;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // What was read on an earlier attempt and not yet held by the registry, then
            // the rest of the chunk from the source.
            let (again, read) = {
                let kept = kept.lock().map_err(|_| poisoned())?;
                let skip = ((from - start) as usize).min(kept.len());
                (Bytes::copy_from_slice(&kept[skip..]), kept.len() as u64)
            };
            let fresh = take_from(feeder.clone(), length - read, kept.clone());
            let body = std::sync::Mutex::new(Some(reqwest::Body::wrap_stream(
                futures_util::stream::once(async move { Ok::<_, io::Error>(again) }).chain(fresh),
            )));
            let sent = self
                .send(scope, false, |http| {
                    let request = http
                        .patch(url.as_str())
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header("content-range", format!("{from}-{end}"))
                        .header("content-length", (end + 1 - from).to_string());
                    match body.lock().ok().and_then(|mut b| b.take()) {
                        Some(body) => request.body(body),
                        None => request,
                    }
                })
                .await;
            if let Some(why) = feeder.lock().await.failed.clone() {
                return Err(ClientError::Protocol(format!("reading the blob: {why}")));
            }
            let failure = match sent {
                Ok(response) if response.status() == StatusCode::ACCEPTED => {
                    return self.upload_location(&response);
                }
                Ok(response)
                    if response.status().is_server_error()
                        || response.status() == StatusCode::RANGE_NOT_SATISFIABLE =>
                {
                    Self::failure(response, "an upload chunk").await
                }
                Ok(response) => return Err(Self::failure(response, "an upload chunk").await),
                Err(e @ ClientError::Unreachable(_)) => e,
                Err(e) => return Err(e),
            };
            if attempt >= ATTEMPTS {
                return Err(failure);
            }
            tokio::time::sleep(backoff(attempt, None)).await;
            let (held, next) = self.upload_held(scope, &url).await?;
            let kept_up_to = start + kept.lock().map_err(|_| poisoned())?.len() as u64;
            if held < start || held > end + 1 || held > kept_up_to {
                return Err(failure);
            }
            from = held;
            url = next;
            if from > end {
                return Ok(url);
            }
        }
    }
}

fn poisoned() -> ClientError {
    ClientError::Protocol("a chunk's buffer was poisoned".to_owned())
}
