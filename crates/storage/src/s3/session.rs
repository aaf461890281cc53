//! Upload sessions in the bucket (the layout is in the parent module's documentation): a
//! chunk's whole parts are sent as they fill, so a commit never reads back or re-sends
//! what earlier chunks stored.

use std::collections::VecDeque;

use berth_oci::{Algorithm, Digest, DigestHasher};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload};
use tokio::task::JoinHandle;

use super::{is_not_found, unavailable, S3BlobStore, PART, PARTS_IN_FLIGHT};
use crate::resumable::ResumableSha256;
use crate::{ByteStream, StorageError, UploadId};

/// S3's limit of parts per multipart upload: with [`PART`], blobs up to 80 GiB.
const MAX_PARTS: u64 = 10_000;
/// Marks a state object, so a foreign object is never mistaken for one.
const STATE_MAGIC: &[u8] = b"berth-upload-2\n";
/// What sessions of the layout before this one began their state with (every chunk an
/// object, copied into the blob at commit): such a session is unknown, its client
/// starts over.
const OLD_STATE_MAGIC: &[u8] = b"berth-upload-1\n";

/// What an upload session's `state` object records. The session's bytes are the first
/// `parts` whole parts of the multipart upload, then the tail object.
#[derive(Clone, Debug, Default)]
struct Session {
    hash: ResumableSha256,
    /// The multipart upload's id, once the session holds a whole part.
    multipart: Option<String>,
    parts: u64,
}

impl Session {
    fn len(&self) -> u64 {
        self.hash.len()
    }

    fn tail_len(&self) -> u64 {
        self.len() - self.parts * PART as u64
    }

    fn to_bytes(&self) -> Vec<u8> {
        let id = self.multipart.as_deref().unwrap_or_default().as_bytes();
        let mut out = STATE_MAGIC.to_vec();
        out.extend_from_slice(&self.parts.to_be_bytes());
        out.extend_from_slice(&(id.len() as u32).to_be_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&self.hash.to_bytes());
        out
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let rest = bytes.strip_prefix(STATE_MAGIC)?;
        let parts = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let id_len = u32::from_be_bytes(rest.get(8..12)?.try_into().ok()?) as usize;
        let id = std::str::from_utf8(rest.get(12..12 + id_len)?).ok()?;
        let hash = ResumableSha256::from_bytes(rest.get(12 + id_len..)?)?;
        let session = Session {
            multipart: (!id.is_empty()).then(|| id.to_owned()),
            parts,
            hash,
        };
        let consistent = session.len() >= parts * PART as u64
            && session.tail_len() < PART as u64
            && (parts == 0 || session.multipart.is_some());
        consistent.then_some(session)
    }
}

impl S3BlobStore {
    /// The bytes the session holds.
    pub(super) async fn session_len(&self, id: &UploadId) -> Result<u64, StorageError> {
        Ok(self.load_session(id).await?.len())
    }

    /// The session's state.
    async fn load_session(&self, id: &UploadId) -> Result<Session, StorageError> {
        match self.store.get(&self.upload_key(id, "state")).await {
            Ok(result) => {
                let bytes = result.bytes().await.map_err(unavailable)?;
                if bytes.starts_with(OLD_STATE_MAGIC) {
                    return Err(StorageError::UploadUnknown(id.clone()));
                }
                Session::from_bytes(&bytes).ok_or_else(|| {
                    StorageError::Io(std::io::Error::other(format!(
                        "upload {id}: unreadable state"
                    )))
                })
            }
            Err(e) if is_not_found(&e) => {
                match self.store.head(&self.upload_key(id, "started")).await {
                    Ok(_) => Ok(Session::default()),
                    Err(e) if is_not_found(&e) => Err(StorageError::UploadUnknown(id.clone())),
                    Err(e) => Err(unavailable(e)),
                }
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Records the session: the commit point of a chunk (what it wrote is ignored until
    /// the state names it).
    async fn save_session(&self, id: &UploadId, session: &Session) -> Result<(), StorageError> {
        self.store
            .put(
                &self.upload_key(id, "state"),
                PutPayload::from(session.to_bytes()),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The tail object of a session of length `len`: named by the length, so a chunk that
    /// failed before its state was saved never overwrote the tail the state names.
    fn tail_key(&self, id: &UploadId, len: u64) -> Path {
        self.upload_key(id, &format!("tail/{len:020}"))
    }

    /// The tail's bytes (under one part).
    async fn read_tail(
        &self,
        id: &UploadId,
        session: &Session,
    ) -> Result<Vec<Bytes>, StorageError> {
        let tail_len = session.tail_len();
        if tail_len == 0 {
            return Ok(Vec::new());
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(0..tail_len)),
            ..GetOptions::default()
        };
        let result = self
            .store
            .get_opts(&self.tail_key(id, session.len()), options)
            .await
            .map_err(unavailable)?;
        let bytes: Vec<Bytes> = result
            .into_stream()
            .try_collect()
            .await
            .map_err(unavailable)?;
        let got: usize = bytes.iter().map(Bytes::len).sum();
        if got as u64 != tail_len {
            return Err(StorageError::Io(std::io::Error::other(format!(
                "upload {id}: tail holds {got} bytes, state says {tail_len}"
            ))));
        }
        Ok(bytes)
    }

    /// The part tags of the session's first `session.parts` parts, from the lists each
    /// chunk wrote (a list a failed chunk left beyond them is ignored).
    async fn part_ids(
        &self,
        id: &UploadId,
        session: &Session,
    ) -> Result<Vec<PartId>, StorageError> {
        let prefix = self.upload_key(id, "parts");
        let mut lists: Vec<(u64, Path)> = self
            .store
            .list(Some(&prefix))
            .map_err(unavailable)
            .try_filter_map(|meta| async move {
                let first = meta.location.filename().and_then(|f| f.parse::<u64>().ok());
                Ok(first.map(|first| (first, meta.location)))
            })
            .try_collect()
            .await?;
        lists.sort_by_key(|(first, _)| *first);
        let mut ids = Vec::with_capacity(session.parts as usize);
        for (first, path) in lists {
            if first >= session.parts {
                break;
            }
            if first != ids.len() as u64 {
                return Err(StorageError::Io(std::io::Error::other(format!(
                    "upload {id}: part list at {first}, expected {}",
                    ids.len()
                ))));
            }
            let text = self.store.get(&path).await.map_err(unavailable)?;
            let text = text.bytes().await.map_err(unavailable)?;
            let text = std::str::from_utf8(&text).map_err(|_| {
                StorageError::Io(std::io::Error::other(format!(
                    "upload {id}: unreadable part list"
                )))
            })?;
            ids.extend(text.lines().map(|tag| PartId {
                content_id: tag.to_owned(),
            }));
        }
        if ids.len() as u64 != session.parts {
            return Err(StorageError::Io(std::io::Error::other(format!(
                "upload {id}: {} part tags, state says {}",
                ids.len(),
                session.parts
            ))));
        }
        Ok(ids)
    }

    /// Makes the session's bytes one object and names it: the tail when they fit in it
    /// (nothing to assemble), else the completed multipart upload (the tail sent as its
    /// last part). `None` for an empty session. Safe to repeat after a failure.
    async fn assemble(
        &self,
        id: &UploadId,
        session: &Session,
    ) -> Result<Option<Path>, StorageError> {
        if session.len() == 0 {
            // Even with a multipart upload begun by a chunk that then failed: S3 does not
            // complete one without parts.
            return Ok(None);
        }
        let Some(multipart) = &session.multipart else {
            return Ok(Some(self.tail_key(id, session.len())));
        };
        let data = self.upload_key(id, "data");
        match self.store.head(&data).await {
            Ok(meta) if meta.size == session.len() => return Ok(Some(data)),
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(unavailable(e)),
        }
        let mut parts = self.part_ids(id, session).await?;
        let tail = self.read_tail(id, session).await?;
        if !tail.is_empty() {
            let last = self
                .store
                .put_part(&data, multipart, parts.len(), PutPayload::from_iter(tail))
                .await
                .map_err(unavailable)?;
            parts.push(last);
        }
        self.store
            .complete_multipart(&data, multipart, parts)
            .await
            .map_err(unavailable)?;
        Ok(Some(data))
    }

    /// Starts sending one part; the tasks run while the next part fills.
    fn send_part(
        &self,
        data: &Path,
        multipart: &str,
        index: u64,
        part: Vec<Bytes>,
    ) -> JoinHandle<object_store::Result<PartId>> {
        let (store, data, multipart) = (self.store.clone(), data.clone(), multipart.to_owned());
        tokio::spawn(async move {
            store
                .put_part(
                    &data,
                    &multipart,
                    index as usize,
                    PutPayload::from_iter(part),
                )
                .await
        })
    }

    /// Appends a chunk: whole parts go out as they fill, the rest becomes the tail.
    pub(super) async fn append_chunk(
        &self,
        id: &UploadId,
        offset: u64,
        mut body: ByteStream,
    ) -> Result<u64, StorageError> {
        let saved = self.load_session(id).await?;
        if offset != saved.len() {
            return Err(StorageError::OutOfOrder {
                expected: saved.len(),
                got: offset,
            });
        }
        let mut session = saved.clone();
        let data = self.upload_key(id, "data");
        let mut filling = self.read_tail(id, &saved).await?;
        let mut filling_len = saved.tail_len() as usize;
        let mut sending: VecDeque<JoinHandle<object_store::Result<PartId>>> = VecDeque::new();
        let mut sent: Vec<PartId> = Vec::new();
        let mut interrupted = None;
        let outcome: Result<(), StorageError> = async {
            loop {
                let mut chunk = match body.next().await {
                    None => break,
                    Some(Ok(chunk)) => chunk,
                    Some(Err(e)) => {
                        interrupted = Some(e);
                        break;
                    }
                };
                session.hash.update(&chunk);
                while !chunk.is_empty() {
                    let take = chunk.len().min(PART - filling_len);
                    filling.push(chunk.split_to(take));
                    filling_len += take;
                    if filling_len < PART {
                        continue;
                    }
                    let index = saved.parts + (sent.len() + sending.len()) as u64;
                    // The last part number is kept for the tail.
                    if index + 1 >= MAX_PARTS {
                        return Err(StorageError::Io(std::io::Error::other(format!(
                            "upload {id}: over {MAX_PARTS} parts of {PART} bytes, the object store's limit"
                        ))));
                    }
                    let multipart = match &session.multipart {
                        Some(multipart) => multipart.clone(),
                        None => {
                            // Recorded at once, so that an abort finds it even if this
                            // chunk fails.
                            let multipart = self.store.create_multipart(&data).await.map_err(unavailable)?;
                            let started = Session {
                                multipart: Some(multipart.clone()),
                                ..saved.clone()
                            };
                            if let Err(e) = self.save_session(id, &started).await {
                                // Unrecorded, nothing would ever abort it: its parts would
                                // be kept (and billed) by the store.
                                let _ = self.store.abort_multipart(&data, &multipart).await;
                                return Err(e);
                            }
                            session.multipart = Some(multipart.clone());
                            multipart
                        }
                    };
                    if sending.len() >= PARTS_IN_FLIGHT {
                        let done = sending.pop_front().expect("a part in flight");
                        sent.push(joined(done.await)?);
                    }
                    sending.push_back(self.send_part(&data, &multipart, index, std::mem::take(&mut filling)));
                    filling_len = 0;
                }
            }
            while let Some(done) = sending.pop_front() {
                sent.push(joined(done.await)?);
            }
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            for task in sending {
                task.abort();
            }
            return Err(e);
        }
        if session.len() == saved.len() {
            return match interrupted {
                Some(source) => Err(StorageError::BodyInterrupted {
                    kept: saved.len(),
                    source,
                }),
                None => Ok(saved.len()),
            };
        }
        if !sent.is_empty() {
            let tags: Vec<&str> = sent.iter().map(|p| p.content_id.as_str()).collect();
            self.store
                .put(
                    &self.upload_key(id, &format!("parts/{:05}", saved.parts)),
                    PutPayload::from(tags.join("\n")),
                )
                .await
                .map_err(unavailable)?;
            session.parts += sent.len() as u64;
        }
        if filling_len > 0 {
            self.store
                .put(
                    &self.tail_key(id, session.len()),
                    PutPayload::from_iter(filling),
                )
                .await
                .map_err(unavailable)?;
        }
        self.save_session(id, &session).await?;
        if saved.tail_len() > 0 {
            // Superseded (its bytes are in a part or in the new tail); left for the
            // session's deletion if this fails.
            let _ = self.store.delete(&self.tail_key(id, saved.len())).await;
        }
        match interrupted {
            Some(source) => Err(StorageError::BodyInterrupted {
                kept: session.len(),
                source,
            }),
            None => Ok(session.len()),
        }
    }

    /// Verifies, assembles and publishes the session's bytes, then ends it.
    pub(super) async fn commit_session(
        &self,
        id: &UploadId,
        expected: &Digest,
    ) -> Result<u64, StorageError> {
        let session = self.load_session(id).await?;
        let len = session.len();
        if expected.algorithm() == Algorithm::Sha256 {
            let actual = session.hash.clone().finish();
            if actual != *expected {
                return Err(StorageError::DigestMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let target = self.blob_key(expected);
        let published = match self.store.head(&target).await {
            Ok(_) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(unavailable(e)),
        };
        if !published {
            let source = self.assemble(id, &session).await?;
            if expected.algorithm() != Algorithm::Sha256 {
                // Only SHA-256 is hashed as the chunks arrive: other digests read the
                // assembled bytes back. A mismatch then ends the session (its parts are
                // one object now, which S3 cannot append to).
                let mut hasher = DigestHasher::new(expected.algorithm());
                if let Some(source) = &source {
                    let mut stream = self.stream_of(source.clone());
                    while let Some(bytes) = stream.next().await {
                        hasher.update(&bytes.map_err(StorageError::Io)?);
                    }
                }
                let actual = hasher.finish();
                if actual != *expected {
                    self.abort_session(id).await?;
                    return Err(StorageError::DigestMismatch {
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            match source {
                None => {
                    self.store
                        .put(&target, PutPayload::default())
                        .await
                        .map_err(unavailable)?;
                }
                // A server-side copy: the blob appears whole or not at all. A store that
                // refuses it (S3 copies at most 5 GiB in one request) gets the bytes
                // streamed into a multipart upload of the blob instead.
                Some(source) => {
                    if self.store.copy(&source, &target).await.is_err() {
                        let (written, failed) = self
                            .write_stream(&target, self.stream_of(source), |_| {})
                            .await?;
                        if let Some(e) = failed {
                            return Err(StorageError::Io(e));
                        }
                        debug_assert_eq!(written, len);
                    }
                }
            }
        }
        self.abort_session(id).await?;
        Ok(len)
    }

    /// Ends the session: its multipart upload and every object under it.
    pub(super) async fn abort_session(&self, id: &UploadId) -> Result<(), StorageError> {
        match self.load_session(id).await {
            Ok(Session {
                multipart: Some(multipart),
                ..
            }) => {
                // Its parts are stored apart from objects; gone already once completed.
                match self
                    .store
                    .abort_multipart(&self.upload_key(id, "data"), &multipart)
                    .await
                {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(unavailable(e)),
                }
            }
            Ok(_) | Err(StorageError::UploadUnknown(_)) => {}
            Err(StorageError::Io(_)) => {}
            Err(e) => return Err(e),
        }
        self.delete_prefix(self.key(&format!("uploads/{id}"))).await
    }
}

/// A sent part's tag, or why it was not sent.
fn joined(
    done: Result<object_store::Result<PartId>, tokio::task::JoinError>,
) -> Result<PartId, StorageError> {
    match done {
        Ok(result) => result.map_err(unavailable),
        Err(e) => Err(StorageError::Io(std::io::Error::other(format!(
            "sending a part: {e}"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_reads_back_and_an_inconsistent_one_is_refused() {
        let mut session = Session {
            multipart: Some("upload-7".to_owned()),
            parts: 2,
            ..Session::default()
        };
        session.hash.update(&vec![1u8; 2 * PART + 5]);
        let read = Session::from_bytes(&session.to_bytes()).unwrap();
        assert_eq!(read.parts, 2);
        assert_eq!(read.multipart.as_deref(), Some("upload-7"));
        assert_eq!(read.tail_len(), 5);
        assert_eq!(read.hash, session.hash);

        // Parts without a multipart upload, or a tail of a whole part, are not a state.
        let orphan = Session {
            multipart: None,
            ..session.clone()
        };
        assert!(Session::from_bytes(&orphan.to_bytes()).is_none());
        let mut overfull = session.clone();
        overfull.hash.update(&vec![0u8; PART]);
        assert!(Session::from_bytes(&overfull.to_bytes()).is_none());
        let mut old = OLD_STATE_MAGIC.to_vec();
        old.extend_from_slice(&session.hash.to_bytes());
        assert!(Session::from_bytes(&old).is_none());
        assert!(Session::from_bytes(b"berth-upload-2\n\0\0").is_none());
    }
}
