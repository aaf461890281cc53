use super::*;
use berth_oci::DigestHasher;
use futures_util::StreamExt;

fn body(parts: &[&'static [u8]]) -> ByteStream {
    let items: Vec<Result<Bytes, io::Error>> =
        parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
    Box::pin(futures_util::stream::iter(items))
}

async fn open_session(store: &FsBlobStore) -> UploadId {
    let id = UploadId::new_random();
    store.start_upload(&id).await.unwrap();
    id
}

async fn collect(s: ByteStream) -> Vec<u8> {
    s.map(|c| c.unwrap()).collect::<Vec<_>>().await.concat()
}

#[tokio::test]
async fn a_verified_anonymous_file_is_linked_in_and_anything_else_declined() {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let bytes = b"fetched from upstream";
    let digest = Digest::sha256_of(bytes);
    let mut anonymous = tempfile::tempfile_in(dir.path()).unwrap();
    anonymous.write_all(bytes).unwrap();
    let id = UploadId::new_random();
    // A size that is not the file's is declined, not trusted.
    let wrong = store
        .seal_verified_file(&id, &anonymous, 3, &digest)
        .await
        .unwrap();
    assert!(wrong.is_none());
    let sealed = store
        .seal_verified_file(&id, &anonymous, bytes.len() as u64, &digest)
        .await
        .unwrap()
        .expect("an anonymous file on the store's file system is linked");
    assert_eq!(sealed.publish().await.unwrap(), bytes.len() as u64);
    let stored = std::fs::metadata(store.blob_path(&digest)).unwrap();
    // The same inode, not a copy; and nothing left in the uploads directory.
    assert_eq!(stored.ino(), anonymous.metadata().unwrap().ino());
    assert_eq!(
        std::fs::read_dir(dir.path().join("uploads"))
            .unwrap()
            .count(),
        0
    );
    let read = store.read(&digest, None).await.unwrap().unwrap();
    assert_eq!(collect(read).await, bytes);

    // A file that still has a name is not anonymous: declined, so the caller copies.
    let named = dir.path().join("named");
    std::fs::write(&named, b"other").unwrap();
    let file = File::open(&named).unwrap();
    let other = Digest::sha256_of(b"other");
    std::fs::remove_file(&named).unwrap();
    let declined = store
        .seal_verified_file(&UploadId::new_random(), &file, 5, &other)
        .await
        .unwrap();
    assert!(declined.is_none());
    assert_eq!(store.stat(&other).await.unwrap(), None);
}

#[tokio::test]
async fn chunked_upload_commits_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let id = open_session(&store).await;
    assert_eq!(
        store
            .append(&id, 0, body(&[b"hello ", b"wor"]))
            .await
            .unwrap(),
        9
    );
    let err = store.append(&id, 3, body(&[b"x"])).await.unwrap_err();
    assert!(matches!(
        err,
        StorageError::OutOfOrder {
            expected: 9,
            got: 3
        }
    ));
    assert_eq!(store.append(&id, 9, body(&[b"ld"])).await.unwrap(), 11);
    let wrong = Digest::sha256_of(b"hello");
    assert!(matches!(
        store.commit(&id, &wrong).await,
        Err(StorageError::DigestMismatch { .. })
    ));
    let digest = Digest::sha256_of(b"hello world");
    assert_eq!(store.commit(&id, &digest).await.unwrap(), 11);
    assert_eq!(store.stat(&digest).await.unwrap(), Some(11));
    assert_eq!(
        collect(store.read(&digest, None).await.unwrap().unwrap()).await,
        b"hello world"
    );
    let part = store
        .read(&digest, Some(ByteRange { start: 6, end: 9 }))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(collect(part).await, b"worl");
    // The session is over: nothing is left staged. (Whether an id names a session is
    // the metadata store's to say; to this store, an unknown id holds no bytes.)
    assert!(!store.staged_path(&id).exists());
    assert_eq!(store.upload_len(&id).await.unwrap(), 0);
    store.delete(&digest).await.unwrap();
    assert_eq!(store.stat(&digest).await.unwrap(), None);
}

#[tokio::test]
async fn session_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = FsBlobStore::open(dir.path()).unwrap();
        let id = open_session(&store).await;
        store.append(&id, 0, body(&[b"abc"])).await.unwrap();
        id
    };
    let store = FsBlobStore::open(dir.path()).unwrap();
    assert_eq!(store.upload_len(&id).await.unwrap(), 3);
    store.append(&id, 3, body(&[b"def"])).await.unwrap();
    let digest = Digest::sha256_of(b"abcdef");
    assert_eq!(store.commit(&id, &digest).await.unwrap(), 6);
}

#[tokio::test]
async fn sha512_and_interrupted_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let id = open_session(&store).await;
    let broken: ByteStream = Box::pin(futures_util::stream::iter(vec![
        Ok(Bytes::from_static(b"keep")),
        Err(io::Error::other("client went away")),
    ]));
    assert!(matches!(
        store.append(&id, 0, broken).await,
        Err(StorageError::BodyInterrupted { kept: 4, .. })
    ));
    store.append(&id, 4, body(&[b"!"])).await.unwrap();
    let mut h = DigestHasher::new(Algorithm::Sha512);
    h.update(b"keep!");
    let digest = h.finish();
    assert_eq!(store.commit(&id, &digest).await.unwrap(), 5);
    assert_eq!(store.stat(&digest).await.unwrap(), Some(5));
    let id2 = open_session(&store).await;
    store.append(&id2, 0, body(&[b"dropped"])).await.unwrap();
    store.abort(&id2).await.unwrap();
    assert!(!store.staged_path(&id2).exists());
    assert_eq!(store.upload_len(&id2).await.unwrap(), 0);
}

#[tokio::test]
async fn a_session_has_no_file_until_its_first_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let id = open_session(&store).await;
    assert!(!store.staged_path(&id).exists());
    assert_eq!(store.upload_len(&id).await.unwrap(), 0);
    // Another process sharing the directory (a second node) sees the same empty session.
    let other = FsBlobStore::open(dir.path()).unwrap();
    assert_eq!(other.upload_len(&id).await.unwrap(), 0);
    // An empty blob is published from a session that never got a byte.
    let empty = Digest::sha256_of(b"");
    assert_eq!(store.commit(&id, &empty).await.unwrap(), 0);
    assert_eq!(store.stat(&empty).await.unwrap(), Some(0));
    // The same for another algorithm, which rehashes the (missing) staged file.
    let id = open_session(&store).await;
    let empty512 = DigestHasher::new(Algorithm::Sha512).finish();
    assert_eq!(other.commit(&id, &empty512).await.unwrap(), 0);
}

#[tokio::test]
async fn an_abandoned_seal_leaves_the_session_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let id = open_session(&store).await;
    store.append(&id, 0, body(&[b"hello "])).await.unwrap();
    let digest = Digest::sha256_of(b"hello world");
    // A final chunk that does not match is kept, as any appended chunk is.
    let wrong = Digest::sha256_of(b"something else");
    assert!(matches!(
        store
            .seal(&id, Some((Some(6), body(&[b"wor"]))), &wrong)
            .await,
        Err(StorageError::DigestMismatch { .. })
    ));
    assert_eq!(store.upload_len(&id).await.unwrap(), 9);
    // The announcement is refused: nothing is published, the bytes stay staged.
    let sealed = store
        .seal(&id, Some((None, body(&[b"ld"]))), &digest)
        .await
        .unwrap();
    sealed.abandon().await;
    assert_eq!(store.stat(&digest).await.unwrap(), None);
    assert_eq!(store.upload_len(&id).await.unwrap(), 11);
    // A later attempt publishes them.
    let sealed = store.seal(&id, None, &digest).await.unwrap();
    assert_eq!(sealed.publish().await.unwrap(), 11);
    assert_eq!(
        collect(store.read(&digest, None).await.unwrap().unwrap()).await,
        b"hello world"
    );
}

#[tokio::test]
async fn a_blob_pushed_whole_is_published_without_an_entry_in_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let uploads = || {
        std::fs::read_dir(dir.path().join("uploads"))
            .unwrap()
            .count()
    };
    // An entry made and removed would move the directory's modification time.
    let changed = || {
        std::fs::metadata(dir.path().join("uploads"))
            .unwrap()
            .modified()
            .unwrap()
    };
    // Past the clock tick in which `open` made the directory.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let before = changed();
    let digest = Digest::sha256_of(b"a whole layer");
    let id = open_session(&store).await;
    let sealed = store
        .seal(&id, Some((None, body(&[b"a whole ", b"layer"]))), &digest)
        .await
        .unwrap();
    assert_eq!(sealed.publish().await.unwrap(), 13);
    assert_eq!(uploads(), 0);
    assert_eq!(changed(), before, "the uploads directory was not touched");
    assert_eq!(
        collect(store.read(&digest, None).await.unwrap().unwrap()).await,
        b"a whole layer"
    );
    // The same bytes again: the first copy is kept, nothing is left behind.
    let id = open_session(&store).await;
    let sealed = store
        .seal(&id, Some((Some(0), body(&[b"a whole layer"]))), &digest)
        .await
        .unwrap();
    assert_eq!(sealed.publish().await.unwrap(), 13);
    assert_eq!(uploads(), 0);

    // A session that got an empty chunk first has an empty staged file: removed too.
    let other = Digest::sha256_of(b"after nothing");
    let id = open_session(&store).await;
    store.append(&id, 0, body(&[])).await.unwrap();
    assert!(store.staged_path(&id).exists());
    let sealed = store
        .seal(&id, Some((None, body(&[b"after nothing"]))), &other)
        .await
        .unwrap();
    assert_eq!(sealed.publish().await.unwrap(), 13);
    assert_eq!(uploads(), 0);
    assert_eq!(store.stat(&other).await.unwrap(), Some(13));
}

#[tokio::test]
async fn an_abandoned_seal_of_a_whole_blob_keeps_its_bytes_in_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let digest = Digest::sha256_of(b"hello world");
    let id = open_session(&store).await;
    let sealed = store
        .seal(&id, Some((None, body(&[b"hello world"]))), &digest)
        .await
        .unwrap();
    sealed.abandon().await;
    assert_eq!(store.stat(&digest).await.unwrap(), None);
    assert_eq!(store.upload_len(&id).await.unwrap(), 11);
    // After a restart too, and a later attempt publishes them.
    let restarted = FsBlobStore::open(dir.path()).unwrap();
    assert_eq!(restarted.upload_len(&id).await.unwrap(), 11);
    let sealed = restarted.seal(&id, None, &digest).await.unwrap();
    assert_eq!(sealed.publish().await.unwrap(), 11);
    assert_eq!(
        collect(restarted.read(&digest, None).await.unwrap().unwrap()).await,
        b"hello world"
    );
}

/// Deterministic bytes that no two offsets share a pattern of.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005) | 1;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// Commits the session under the digest of `expected` and checks the published file
/// holds exactly those bytes.
async fn commits_exactly(store: &FsBlobStore, id: &UploadId, expected: &[u8]) {
    let digest = Digest::sha256_of(expected);
    assert_eq!(
        store.commit(id, &digest).await.unwrap(),
        expected.len() as u64
    );
    let stored = std::fs::read(store.blob_path(&digest)).unwrap();
    assert!(stored == expected, "the published file differs");
}

fn chunks_of(data: &[u8], size: usize) -> ByteStream {
    let items: Vec<Result<Bytes, io::Error>> = data
        .chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures_util::stream::iter(items))
}

/// Large bodies take the direct-I/O path: appends that start and end off block
/// boundaries, cross batch boundaries, alternate with small buffered ones and are cut
/// off midway must still leave exactly the bytes received, in order.
#[tokio::test]
async fn large_unaligned_appends_keep_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let id = open_session(&store).await;
    let mut expected = Vec::new();
    let sizes = [300_001, 7, 2 * 1024 * 1024 + 4095, 1, 5_000_000, 4096];
    for (i, size) in sizes.into_iter().enumerate() {
        let part = pattern(size, i as u64);
        let len = store
            .append(&id, expected.len() as u64, chunks_of(&part, 65_537))
            .await
            .unwrap();
        expected.extend_from_slice(&part);
        assert_eq!(len, expected.len() as u64);
    }
    // A large body cut off after 1,000,000 bytes keeps exactly those.
    let part = pattern(3_000_000, 99);
    let mut items: Vec<Result<Bytes, io::Error>> = part[..1_000_000]
        .chunks(100_000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    items.push(Err(io::Error::other("client went away")));
    let cut: ByteStream = Box::pin(futures_util::stream::iter(items));
    let kept = expected.len() as u64 + 1_000_000;
    assert!(matches!(
        store.append(&id, expected.len() as u64, cut).await,
        Err(StorageError::BodyInterrupted { kept: k, .. }) if k == kept
    ));
    expected.extend_from_slice(&part[..1_000_000]);
    assert_eq!(store.upload_len(&id).await.unwrap(), kept);
    commits_exactly(&store, &id, &expected).await;
}

/// A session staged by an earlier version (`uploads/<id>/data`) is adopted: its
/// length is reported, it can be continued and committed, and the purge sees it.
#[tokio::test]
async fn sessions_staged_the_older_way_are_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let id = UploadId::new_random();
    let legacy = dir.path().join("uploads").join(id.as_str());
    std::fs::create_dir_all(&legacy).unwrap();
    std::fs::write(legacy.join("data"), b"old ").unwrap();
    let listed = store.list_uploads().await.unwrap();
    assert!(listed.iter().any(|(l, _)| *l == id), "purge sees it");
    assert_eq!(store.upload_len(&id).await.unwrap(), 4);
    assert!(!legacy.exists(), "moved to the current layout");
    store.append(&id, 4, body(&[b"session"])).await.unwrap();
    let digest = Digest::sha256_of(b"old session");
    assert_eq!(store.commit(&id, &digest).await.unwrap(), 11);
    assert!(store.list_uploads().await.unwrap().is_empty());

    // An empty legacy directory (an interrupted start) is listed and removed by abort.
    let stray = UploadId::new_random();
    std::fs::create_dir_all(dir.path().join("uploads").join(stray.as_str())).unwrap();
    assert_eq!(store.list_uploads().await.unwrap().len(), 1);
    store.abort(&stray).await.unwrap();
    assert!(store.list_uploads().await.unwrap().is_empty());
}

/// Blobs in Distribution's layout (`<hex>/data`) are served, found by a push of the
/// same bytes and deleted; an empty directory of that layout does not block a push.
#[tokio::test]
async fn blobs_in_distribution_layout_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let old = Digest::sha256_of(b"published long ago");
    let old_dir = store.blob_path(&old);
    std::fs::create_dir_all(&old_dir).unwrap();
    std::fs::write(old_dir.join("data"), b"published long ago").unwrap();

    assert_eq!(store.stat(&old).await.unwrap(), Some(18));
    let local = store.open_local(&old).await.unwrap().unwrap();
    assert_eq!(local.size, 18);
    let part = store
        .read(&old, Some(ByteRange { start: 10, end: 13 }))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(collect(part).await, b"long");

    // Pushing the same bytes keeps the existing copy where it is.
    let id = open_session(&store).await;
    store
        .append(&id, 0, body(&[b"published long ago"]))
        .await
        .unwrap();
    assert_eq!(store.commit(&id, &old).await.unwrap(), 18);
    assert!(old_dir.join("data").is_file());
    assert!(store.list_uploads().await.unwrap().is_empty());

    store.delete_many(std::slice::from_ref(&old)).await.unwrap();
    assert!(!old_dir.exists(), "file and directory are gone");
    assert_eq!(store.stat(&old).await.unwrap(), None);

    // An empty directory where the blob goes: the push replaces it with the file.
    let fresh = Digest::sha256_of(b"fresh");
    std::fs::create_dir_all(store.blob_path(&fresh)).unwrap();
    assert_eq!(store.stat(&fresh).await.unwrap(), None);
    let id = open_session(&store).await;
    store.append(&id, 0, body(&[b"fresh"])).await.unwrap();
    assert_eq!(store.commit(&id, &fresh).await.unwrap(), 5);
    assert_eq!(std::fs::read(store.blob_path(&fresh)).unwrap(), b"fresh");
    store.delete(&fresh).await.unwrap();
    assert!(!store.blob_path(&fresh).exists());
}

/// A large append's hash runs behind its write and may still be catching up when the
/// request is answered: after a restart (nothing hashed in memory) the first large
/// append hashes what was staged before its own bytes, a wrong digest is refused without
/// losing the session, and the right one commits exactly the bytes sent.
#[tokio::test]
async fn hashes_catching_up_across_requests_and_a_restart_cover_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let first = pattern(1_000_003, 7);
    let id = {
        let store = FsBlobStore::open(dir.path()).unwrap();
        let id = open_session(&store).await;
        let len = store
            .append(&id, 0, chunks_of(&first, 300_000))
            .await
            .unwrap();
        assert_eq!(len, first.len() as u64);
        id
    };
    let store = FsBlobStore::open(dir.path()).unwrap();
    let mut expected = first.clone();
    for (i, size) in [3_000_000, 2 * 1024 * 1024, 700_001]
        .into_iter()
        .enumerate()
    {
        let part = pattern(size, 100 + i as u64);
        store
            .append(&id, expected.len() as u64, chunks_of(&part, 262_144))
            .await
            .unwrap();
        expected.extend_from_slice(&part);
    }
    let wrong = Digest::sha256_of(&expected[1..]);
    assert!(matches!(
        store.commit(&id, &wrong).await,
        Err(StorageError::DigestMismatch { .. })
    ));
    commits_exactly(&store, &id, &expected).await;
}
