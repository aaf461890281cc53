//! The behaviour of the metadata store, run on SQLite always and on PostgreSQL whenever its
//! server binaries are installed (always in CI): the same test on both engines is what
//! keeps one set of queries honest on two databases.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_meta::{
    AccountStore, Actor, AuditFilter, BlobArrival, Change, CredentialStore, Database,
    DeliveryOutcome, DeliveryState, Event, EventLog, GcSelection, MaintenanceStore, MetaError,
    MetaStore, NewAuditEvent, NewManifest, NewWebhook, Page, ProjectOrigin, RefreshTokenRecord,
    TagChange, WebhookPatch, WebhookStore, MAX_WEBHOOKS_PER_SCOPE,
};
use berth_oci::{Digest, EdgeKind, ManifestEdge, Reference, RepoName, Tag};

/// Where a store lives, so a test can open a second handle on it (a second node, or a
/// later process).
#[derive(Clone)]
enum Place {
    Sqlite(PathBuf),
    Postgres { url: String, schema: String },
}

impl Place {
    async fn open(&self) -> Database {
        match self {
            Place::Sqlite(path) => Database::open_sqlite(path).expect("open SQLite"),
            Place::Postgres { url, schema } => {
                let mut last = None;
                // The shared cluster may still be starting.
                for _ in 0..100 {
                    match Database::connect_postgres(url, Some(schema)).await {
                        Ok(db) => return db,
                        Err(e) => last = Some(e),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("connecting to PostgreSQL: {last:?}");
            }
        }
    }
}

/// `engine_test!(name, |place| { … })`: a test whose body runs on a fresh store of each
/// engine (`place.open().await` opens a handle on it).
macro_rules! engine_test {
    ($(#[$doc:meta])* $name:ident, |$place:ident| $body:block) => {
        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            on_each_engine(|$place| async move { $body }).await;
        }
    };
}

/// Runs `test` on a fresh store of each engine.
async fn on_each_engine<F, Fut>(test: F)
where
    F: Fn(Place) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    eprintln!("on SQLite");
    test(Place::Sqlite(dir.path().join("meta.db"))).await;
    if let Some(cluster) = berth_testkit::shared_cluster() {
        eprintln!("on PostgreSQL");
        test(Place::Postgres {
            url: cluster.url().to_owned(),
            schema: berth_testkit::unique_schema(),
        })
        .await;
    }
}

fn digest(c: char) -> Digest {
    Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
}

fn numbered_digest(n: usize) -> Digest {
    Digest::parse(&format!("sha256:{n:064x}")).unwrap()
}

fn repo(name: &str) -> RepoName {
    RepoName::parse(name).unwrap()
}

fn tag(name: &str) -> Tag {
    Tag::parse(name).unwrap()
}

fn all() -> Page<'static> {
    Page {
        limit: None,
        after: None,
    }
}

fn layer(d: &Digest) -> ManifestEdge {
    ManifestEdge {
        digest: d.clone(),
        kind: EdgeKind::Layer,
    }
}

fn child(d: &Digest) -> ManifestEdge {
    ManifestEdge {
        digest: d.clone(),
        kind: EdgeKind::Child,
    }
}

fn manifest(d: &Digest, edges: Vec<ManifestEdge>, subject: Option<Digest>) -> NewManifest {
    NewManifest {
        digest: d.clone(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        artifact_type: subject.as_ref().map(|_| "application/x.sig".to_owned()),
        subject,
        annotations_json: Some(r#"{"a":"b"}"#.into()),
        edges,
        raw: format!("{{\"m\":\"{}\"}}", d.as_str()).into_bytes(),
    }
}

fn actor() -> Actor {
    Actor {
        name: "alice".into(),
        kind: "user".into(),
        address: "127.0.0.1".into(),
    }
}

const UPLOADED: BlobArrival<'static> = BlobArrival::Uploaded { session: None };

/// Reserves and links a blob, as a finished upload does.
async fn push_blob(db: &Database, repo: &RepoName, d: &Digest, size: u64) {
    db.reserve_blob(d).await.unwrap();
    db.link_blob(repo, d, size, UPLOADED, &actor())
        .await
        .unwrap();
}

const NO_GC_CUTOFF: i64 = 0;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn far_future() -> i64 {
    i64::MAX / 2
}

/// A whole collection's mark as the registry runs it: the untagged manifests removed a
/// few per transaction, then the blobs marked a few per transaction, then the collection
/// recorded. Returns what went, each in the order a preview lists it.
async fn mark_all(
    db: &Database,
    selection: GcSelection,
) -> (Vec<(String, Digest)>, Vec<(Digest, u64)>) {
    let mut manifests = Vec::new();
    if let Some(cutoff) = selection.untagged_pushed_before_ms {
        let mut after = None;
        loop {
            let candidates = db.unreached_manifests(cutoff, after, 4).await.unwrap();
            let Some(last) = candidates.last() else {
                break;
            };
            after = Some(last.clone());
            for batch in candidates.chunks(3) {
                let removed = db.remove_unreached_manifests(batch.to_vec(), cutoff);
                manifests.extend(removed.await.unwrap());
            }
        }
    }
    let (mut blobs, mut after) = (Vec::new(), String::new());
    loop {
        let step = db.mark_unused_blobs(&after, 3, selection.blobs_unused_before_ms);
        let step = step.await.unwrap();
        blobs.extend(step.marked);
        match step.next {
            Some(next) => after = next,
            None => break,
        }
    }
    let bytes = blobs.iter().map(|(_, size)| size).sum();
    db.record_collection(manifests.len() as u64, blobs.len() as u64, bytes)
        .await
        .unwrap();
    manifests.sort();
    blobs.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
    (manifests, blobs)
}

engine_test!(blobs_are_visible_only_where_linked, |place| {
    let db = place.open().await;
    let (app, other) = (repo("team/app"), repo("team/other"));
    let a = digest('a');
    assert!(
        matches!(
            db.link_blob(&app, &a, 3, UPLOADED, &actor()).await,
            Err(MetaError::BlobBeingDeleted)
        ),
        "a link needs a reservation first"
    );
    assert!(db.any_linked_blob_size(&a).await.unwrap().is_none());
    push_blob(&db, &app, &a, 3).await;
    let linked = db.linked_blob(&app, &a).await.unwrap().unwrap();
    assert_eq!(linked.size, 3);
    assert!(db.linked_blob(&other, &a).await.unwrap().is_none());
    assert_eq!(db.any_linked_blob_size(&a).await.unwrap(), Some(3));
    db.touch_blob(&a).await.unwrap();
    let touched = db.linked_blob(&app, &a).await.unwrap().unwrap();
    assert!(touched.last_used_ms >= linked.last_used_ms);
    assert!(db.unlink_blob(&app, &a, &actor()).await.unwrap());
    assert!(!db.unlink_blob(&app, &a, &actor()).await.unwrap());
    assert!(db.linked_blob(&app, &a).await.unwrap().is_none());
    assert!(db.any_linked_blob_size(&a).await.unwrap().is_none());
    db.ping().await.unwrap();
});

engine_test!(
    /// Pushing image content leaves the access change count alone, so that the node's
    /// access decisions stay cached while clients push; a new repository (which can make
    /// a project without a record exist) and a new project count.
    pushes_of_content_are_not_access_changes,
    |place| {
        let db = place.open().await;
        let app = repo("team/app");
        let (a, d, e) = (digest('a'), digest('d'), digest('e'));
        let start = (db.changes(), db.access_changes());
        push_blob(&db, &app, &a, 2).await;
        assert_eq!(db.access_changes(), start.1, "a blob linked");
        assert!(db.changes() > start.0, "a link is still a change");
        db.put_manifest(&app, manifest(&d, vec![layer(&a)], None), Some(&tag("v1")), &actor())
            .await
            .unwrap();
        let created = db.access_changes();
        assert!(created > start.1, "the first manifest created the repository");
        let before = db.changes();
        db.put_manifest(&app, manifest(&e, vec![layer(&a)], None), Some(&tag("v2")), &actor())
            .await
            .unwrap();
        assert_eq!(db.access_changes(), created, "a manifest into a known repository");
        assert!(db.changes() > before);
        db.create_project("team", false, None, ProjectOrigin::Requested, &actor())
            .await
            .unwrap();
        assert!(db.access_changes() > created, "a project created");
    }
);

engine_test!(
    manifests_require_their_references_and_keep_their_bytes,
    |place| {
        let db = place.open().await;
        let (app, other) = (repo("team/app"), repo("team/other"));
        let (a, d, e, idx) = (digest('a'), digest('d'), digest('e'), digest('f'));
        let v1 = tag("v1");
        let err = db
            .put_manifest(
                &app,
                manifest(&d, vec![layer(&a), layer(&a)], None),
                Some(&v1),
                &actor(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, MetaError::MissingReferences { ref missing } if missing == std::slice::from_ref(&a)),
            "{err:?}"
        );
        push_blob(&db, &other, &a, 2).await;
        assert!(
            db.put_manifest(
                &app,
                manifest(&d, vec![layer(&a)], None),
                Some(&v1),
                &actor()
            )
            .await
            .is_err(),
            "a blob of another repository does not count"
        );
        db.link_blob(&app, &a, 2, UPLOADED, &actor()).await.unwrap();
        let pushed = manifest(&d, vec![layer(&a)], None);
        db.put_manifest(&app, pushed.clone(), Some(&v1), &actor())
            .await
            .unwrap();
        let got = db
            .get_manifest(&app, &Reference::Tag(v1.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((got.digest, got.raw), (d.clone(), pushed.raw.clone()));
        let by_digest = db
            .get_manifest(&app, &Reference::Digest(d.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(by_digest.media_type, pushed.media_type);
        assert!(db
            .get_manifest(&other, &Reference::Digest(d.clone()))
            .await
            .unwrap()
            .is_none());

        // An index needs its children in the same repository.
        let index = manifest(&idx, vec![child(&d)], None);
        assert!(db
            .put_manifest(&other, index.clone(), None, &actor())
            .await
            .is_err());
        db.put_manifest(&app, index, Some(&tag("multi")), &actor())
            .await
            .unwrap();

        // Referrers, filtered by artifact type.
        db.put_manifest(&app, manifest(&e, vec![], Some(d.clone())), None, &actor())
            .await
            .unwrap();
        let refs = db.referrers(&app, &d, None).await.unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].digest, e);
        assert_eq!(refs[0].artifact_type.as_deref(), Some("application/x.sig"));
        assert_eq!(refs[0].annotations_json.as_deref(), Some(r#"{"a":"b"}"#));
        assert!(
            db.referrers(&app, &d, Some("application/x.sig"))
                .await
                .unwrap()
                .len()
                == 1
        );
        assert!(db
            .referrers(&app, &d, Some("other"))
            .await
            .unwrap()
            .is_empty());
        assert!(db.referrers(&app, &a, None).await.unwrap().is_empty());

        // A tag moves; deleting it leaves the manifest; deleting the manifest its tags.
        db.put_manifest(
            &app,
            manifest(&e, vec![], Some(d.clone())),
            Some(&v1),
            &actor(),
        )
        .await
        .unwrap();
        let moved = db
            .get_manifest(&app, &Reference::Tag(v1.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(moved.digest, e);
        assert!(db.delete_tag(&app, &v1, &actor()).await.unwrap());
        assert!(!db.delete_tag(&app, &v1, &actor()).await.unwrap());
        assert!(db
            .get_manifest(&app, &Reference::Digest(e.clone()))
            .await
            .unwrap()
            .is_some());
        assert!(db.delete_manifest(&app, &idx, &actor()).await.unwrap());
        assert!(db
            .get_manifest(&app, &Reference::Tag(tag("multi")))
            .await
            .unwrap()
            .is_none());
        assert!(!db.delete_manifest(&app, &idx, &actor()).await.unwrap());
    }
);

engine_test!(tags_and_the_catalog_page_in_byte_order, |place| {
    let db = place.open().await;
    let a = digest('a');
    let names = ["team/app", "team/app/sub", "other/x", "Z/upper", "team-b/y"];
    for name in names {
        let r = RepoName::parse(&name.to_lowercase()).unwrap();
        push_blob(&db, &r, &a, 1).await;
        db.put_manifest(
            &r,
            manifest(&digest('d'), vec![layer(&a)], None),
            None,
            &actor(),
        )
        .await
        .unwrap();
    }
    let app = repo("team/app");
    for t in ["b", "B", "a", "a-1", "1", "Z"] {
        db.put_manifest(
            &app,
            manifest(&digest('d'), vec![layer(&a)], None),
            Some(&tag(t)),
            &actor(),
        )
        .await
        .unwrap();
    }
    let tags = db.list_tags(&app, all()).await.unwrap().unwrap();
    assert_eq!(tags, ["1", "B", "Z", "a", "a-1", "b"]);
    let page = db
        .list_tags(
            &app,
            Page {
                limit: Some(2),
                after: Some("Z"),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(page, ["a", "a-1"]);
    assert!(db
        .list_tags(&repo("nobody/here"), all())
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        db.list_tags(&repo("other/x"), all())
            .await
            .unwrap()
            .unwrap(),
        Vec::<String>::new(),
        "a repository without tags lists none"
    );

    let catalog = db.catalog(all(), None).await.unwrap();
    assert_eq!(
        catalog,
        ["other/x", "team-b/y", "team/app", "team/app/sub", "z/upper"]
    );
    let page = db
        .catalog(
            Page {
                limit: Some(2),
                after: Some("team-b/y"),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(page, ["team/app", "team/app/sub"]);
    let within = ["team".to_owned(), "z".to_owned(), "x\"y".to_owned()];
    assert_eq!(
        db.catalog(all(), Some(&within)).await.unwrap(),
        ["team/app", "team/app/sub", "z/upper"]
    );
    assert!(db.catalog(all(), Some(&[])).await.unwrap().is_empty());

    // Projects from repository names: a skip over each project's own repositories, not
    // into its neighbours' ("team-b", "team.c") nor past a one-segment name ("team").
    for name in ["team", "team.c/d", "teamz/q/r"] {
        let r = repo(name);
        push_blob(&db, &r, &a, 1).await;
        db.put_manifest(
            &r,
            manifest(&digest('d'), vec![layer(&a)], None),
            None,
            &actor(),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        db.repository_projects(100).await.unwrap(),
        ["other", "team", "team-b", "team.c", "teamz", "z"]
    );
    assert_eq!(db.repository_projects(2).await.unwrap(), ["other", "team"]);
    let recent = db.recent_tags(100).await.unwrap();
    assert_eq!(recent.len(), 6, "{recent:?}");
    assert!(recent.iter().all(|t| t.repo == "team/app"));
    assert!(recent
        .windows(2)
        .all(|w| w[0].updated_ms >= w[1].updated_ms));
});

engine_test!(
    upload_sessions_are_known_at_once_and_to_every_later_handle,
    |place| {
        let db = place.open().await;
        let app = repo("team/app");
        db.record_upload("s1", &app).await.unwrap();
        db.record_upload("s2", &app).await.unwrap();
        assert_eq!(
            db.upload_repo("s1").await.unwrap().as_deref(),
            Some("team/app")
        );
        assert_eq!(db.upload_repo("nope").await.unwrap(), None);
        // A durable write commits after any queued one: another handle sees both.
        db.try_lease("barrier", "x", 60_000).await.unwrap();
        let other = place.open().await;
        assert_eq!(
            other.upload_repo("s2").await.unwrap().as_deref(),
            Some("team/app")
        );
        assert_eq!(
            other.uploads_started_before(i64::MAX).await.unwrap(),
            ["s1", "s2"]
        );
        assert!(other.uploads_started_before(0).await.unwrap().is_empty());
        db.forget_upload("s1").await.unwrap();
        assert_eq!(db.upload_repo("s1").await.unwrap(), None);
        assert_eq!(other.upload_repo("s1").await.unwrap(), None);
        // A session finished by a link is forgotten too.
        db.reserve_blob(&digest('a')).await.unwrap();
        db.link_blob(
            &app,
            &digest('a'),
            3,
            BlobArrival::Uploaded {
                session: Some("s2"),
            },
            &actor(),
        )
        .await
        .unwrap();
        assert_eq!(db.upload_repo("s2").await.unwrap(), None);
        assert_eq!(other.upload_repo("s2").await.unwrap(), None);
    }
);

engine_test!(leases_are_exclusive_until_released_or_expired, |place| {
    let db = place.open().await;
    let node_b = place.open().await;
    assert!(db.try_lease("gc", "a", 60_000).await.unwrap());
    assert!(db.try_lease("gc", "a", 60_000).await.unwrap(), "renewal");
    assert!(!node_b.try_lease("gc", "b", 60_000).await.unwrap());
    assert!(node_b.try_lease("other", "b", 60_000).await.unwrap());
    node_b.release_lease("gc", "b").await.unwrap();
    assert!(
        !node_b.try_lease("gc", "b", 60_000).await.unwrap(),
        "only the holder releases"
    );
    db.release_lease("gc", "a").await.unwrap();
    assert!(node_b.try_lease("gc", "b", 1).await.unwrap());
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(
        db.try_lease("gc", "a", 60_000).await.unwrap(),
        "expired: taken over"
    );
});

engine_test!(garbage_collection_marks_what_nothing_reaches, |place| {
    let db = place.open().await;
    let app = repo("team/app");
    let (kept, shared, orphan, lonely) = (digest('1'), digest('2'), digest('3'), digest('4'));
    for d in [&kept, &shared, &orphan, &lonely] {
        push_blob(&db, &app, d, 10).await;
    }
    let (tagged, untagged, idx, sig, child_m) = (
        digest('a'),
        digest('b'),
        digest('c'),
        digest('e'),
        digest('f'),
    );
    db.put_manifest(
        &app,
        manifest(&tagged, vec![layer(&kept), layer(&shared)], None),
        Some(&tag("v1")),
        &actor(),
    )
    .await
    .unwrap();
    db.put_manifest(
        &app,
        manifest(&untagged, vec![layer(&orphan), layer(&shared)], None),
        None,
        &actor(),
    )
    .await
    .unwrap();
    // A tagged index keeps its child; a referrer of a reached manifest is reached.
    db.put_manifest(&app, manifest(&child_m, vec![], None), None, &actor())
        .await
        .unwrap();
    db.put_manifest(
        &app,
        manifest(&idx, vec![child(&child_m)], None),
        Some(&tag("multi")),
        &actor(),
    )
    .await
    .unwrap();
    db.put_manifest(
        &app,
        manifest(&sig, vec![], Some(tagged.clone())),
        None,
        &actor(),
    )
    .await
    .unwrap();

    let selection = GcSelection {
        untagged_pushed_before_ms: Some(far_future()),
        blobs_unused_before_ms: far_future(),
    };
    let dry = db.preview_garbage(selection, 1000).await.unwrap();
    assert_eq!(dry.manifests, [("team/app".to_owned(), untagged.clone())]);
    assert_eq!(dry.manifest_count, 1);
    let mut expected = vec![(orphan.clone(), 10), (lonely.clone(), 10)];
    expected.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
    assert_eq!(dry.blobs, expected);
    assert_eq!((dry.blob_count, dry.bytes), (2, 20));
    // A listing is bounded; the counts are not.
    let first = db.preview_garbage(selection, 1).await.unwrap();
    assert_eq!(first.blobs, expected[..1]);
    assert_eq!((first.blob_count, first.bytes), (2, 20));
    // Keeping every manifest keeps the blobs of the untagged one.
    let keeping = GcSelection {
        untagged_pushed_before_ms: None,
        ..selection
    };
    let kept_all = db.preview_garbage(keeping, 1000).await.unwrap();
    assert_eq!((kept_all.manifest_count, kept_all.manifests.len()), (0, 0));
    assert_eq!(kept_all.blobs, [(lonely.clone(), 10)]);
    assert!(
        db.blobs_being_deleted("", 1000).await.unwrap().is_empty(),
        "a dry run changes nothing"
    );
    assert!(db
        .get_manifest(&app, &Reference::Digest(untagged.clone()))
        .await
        .unwrap()
        .is_some());

    let marked = mark_all(&db, selection).await;
    assert_eq!(marked, (dry.manifests, dry.blobs));
    for d in [&tagged, &idx, &sig, &child_m] {
        assert!(db
            .get_manifest(&app, &Reference::Digest(d.clone()))
            .await
            .unwrap()
            .is_some());
    }
    assert!(db
        .get_manifest(&app, &Reference::Digest(untagged))
        .await
        .unwrap()
        .is_none());
    assert_eq!(db.blobs_being_deleted("", 1000).await.unwrap(), expected);
    assert!(db.linked_blob(&app, &orphan).await.unwrap().is_none());
    assert!(matches!(
        db.reserve_blob(&orphan).await,
        Err(MetaError::BlobBeingDeleted)
    ));
    assert!(matches!(
        db.link_blob(&app, &orphan, 10, UPLOADED, &actor()).await,
        Err(MetaError::BlobBeingDeleted)
    ));
    let mut live = db.live_blobs("", 1000).await.unwrap();
    live.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
    assert_eq!(live, [(kept.clone(), 10), (shared.clone(), 10)]);

    db.forget_deleted_blobs(&[orphan.clone(), lonely.clone(), kept.clone()])
        .await
        .unwrap();
    assert!(db.blobs_being_deleted("", 1000).await.unwrap().is_empty());
    assert_eq!(
        db.live_blobs("", 1000).await.unwrap().len(),
        2,
        "live blobs are not forgotten"
    );
    // After the sweep the digest may be pushed again.
    push_blob(&db, &app, &orphan, 10).await;

    // A pass that keeps manifests and spares recently used blobs.
    let spared = mark_all(
        &db,
        GcSelection {
            untagged_pushed_before_ms: None,
            blobs_unused_before_ms: NO_GC_CUTOFF,
        },
    )
    .await;
    assert!(spared.0.is_empty() && spared.1.is_empty());

    // The scrub's view: a dropped blob leaves its manifests' edges dangling.
    assert!(db.dangling_edges().await.unwrap().is_empty());
    db.drop_blob(&kept).await.unwrap();
    let dangling = db.dangling_edges().await.unwrap();
    assert_eq!(dangling.len(), 1);
    assert_eq!(
        (
            dangling[0].manifest.as_str(),
            dangling[0].target.as_str(),
            dangling[0].kind.as_str()
        ),
        (tagged.as_str(), kept.as_str(), "layer")
    );
    assert!(db.linked_blob(&app, &kept).await.unwrap().is_none());

    // A dry run leaves no reader on its snapshot: a write after it is seen by every read.
    for _ in 0..8 {
        db.preview_garbage(selection, 1).await.unwrap();
    }
    let later = digest('9');
    push_blob(&db, &app, &later, 10).await;
    for _ in 0..16 {
        assert!(db.linked_blob(&app, &later).await.unwrap().is_some());
    }
});

engine_test!(
    /// Pushes race a collector that would delete every unreferenced blob at once. Whatever
    /// interleaving happens, a manifest the store accepted never loses a blob: either the
    /// link commits first and the mark sees the blob in use, or the mark commits first and
    /// the push is refused.
    marking_under_concurrent_pushes_never_strands_a_manifest,
    |place| {
        let db = Arc::new(place.open().await);
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let db = db.clone();
                tokio::spawn(async move {
                    let mut accepted = Vec::new();
                    for i in 0..25 {
                        let r = repo(&format!("p/w{w}"));
                        let blob = numbered_digest(w * 1000 + i);
                        let m = numbered_digest(100_000 + w * 1000 + i);
                        let pushed = async {
                            db.reserve_blob(&blob).await?;
                            db.link_blob(&r, &blob, 5, UPLOADED, &actor()).await?;
                            db.put_manifest(
                                &r,
                                manifest(&m, vec![layer(&blob)], None),
                                Some(&tag(&format!("t{i}"))),
                                &actor(),
                            )
                            .await
                        };
                        match pushed.await {
                            Ok(()) => accepted.push((r, m)),
                            Err(
                                MetaError::BlobBeingDeleted | MetaError::MissingReferences { .. },
                            ) => {}
                            Err(e) => panic!("unexpected push failure: {e}"),
                        }
                    }
                    accepted
                })
            })
            .collect();
        let collector = {
            let db = db.clone();
            tokio::spawn(async move {
                let mut passes = 0;
                loop {
                    let selection = GcSelection {
                        untagged_pushed_before_ms: None,
                        blobs_unused_before_ms: far_future(),
                    };
                    let (_, blobs) = mark_all(&db, selection).await;
                    let digests: Vec<Digest> = blobs.into_iter().map(|(d, _)| d).collect();
                    db.forget_deleted_blobs(&digests).await.unwrap();
                    passes += 1;
                    if passes >= 10 {
                        return;
                    }
                }
            })
        };
        let mut accepted = Vec::new();
        for w in writers {
            accepted.extend(w.await.unwrap());
        }
        collector.await.unwrap();
        assert!(!accepted.is_empty(), "some pushes got through");
        assert!(db.dangling_edges().await.unwrap().is_empty());
        for (r, m) in &accepted {
            let stored = db
                .get_manifest(r, &Reference::Digest(m.clone()))
                .await
                .unwrap();
            assert!(stored.is_some(), "{r:?} {m:?}");
        }
        let live = db.live_blobs("", 1000).await.unwrap().len();
        assert_eq!(
            live,
            accepted.len(),
            "every accepted manifest's blob, and nothing else, is live"
        );
});

engine_test!(users_are_named_once_and_versioned_by_password, |place| {
    let db = place.open().await;
    assert_eq!(db.count_users().await.unwrap(), 0);
    let alice = db
        .create_user("alice", "hash-1", false, "", &actor())
        .await
        .unwrap();
    assert_eq!(
        (alice.name.as_str(), alice.admin, alice.generation),
        ("alice", false, 0)
    );
    let err = db
        .create_user("alice", "other", true, "", &actor())
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetaError::Conflict(ref m) if m.contains("alice")),
        "{err:?}"
    );
    db.create_user("bob", "hash-b", true, "", &actor())
        .await
        .unwrap();
    assert_eq!(db.count_users().await.unwrap(), 2);
    let names: Vec<String> = db
        .users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, ["alice", "bob"]);

    let changed = db
        .update_user("alice", Some("hash-2"), Some(true), &actor())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            changed.password_hash.as_str(),
            changed.admin,
            changed.generation
        ),
        ("hash-2", true, 1)
    );
    let demoted = db
        .update_user("alice", None, Some(false), &actor())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((demoted.admin, demoted.generation), (false, 1));
    assert!(db
        .update_user("nobody", Some("x"), None, &actor())
        .await
        .unwrap()
        .is_none());
    db.rehash_password(alice.id, "hash-3").await.unwrap();
    let rehashed = db.user("alice").await.unwrap().unwrap();
    assert_eq!(
        (rehashed.password_hash.as_str(), rehashed.generation),
        ("hash-3", 1)
    );

    db.create_project(
        "team",
        false,
        Some((alice.id, "admin")),
        ProjectOrigin::Requested,
        &actor(),
    )
    .await
    .unwrap();
    assert_eq!(
        db.member_projects(alice.id).await.unwrap(),
        [("team".to_owned(), "admin".to_owned())]
    );
    assert!(db.delete_user("alice", &actor()).await.unwrap());
    assert!(!db.delete_user("alice", &actor()).await.unwrap());
    assert!(db.user("alice").await.unwrap().is_none());
    assert!(
        db.members("team").await.unwrap().is_empty(),
        "memberships go with the user"
    );
    let again = db
        .create_user("alice", "hash-4", false, "", &actor())
        .await
        .unwrap();
    assert_ne!(again.id, alice.id, "a new account is a new id");
});

engine_test!(projects_members_and_robots, |place| {
    let db = place.open().await;
    let owner = db
        .create_user("owner", "h", false, "", &actor())
        .await
        .unwrap();
    let dev = db
        .create_user("dev", "h", false, "", &actor())
        .await
        .unwrap();
    let team = db
        .create_project(
            "team",
            false,
            Some((owner.id, "admin")),
            ProjectOrigin::Requested,
            &actor(),
        )
        .await
        .unwrap();
    assert!(!team.public);
    assert!(matches!(
        db.create_project("team", true, None, ProjectOrigin::Requested, &actor())
            .await,
        Err(MetaError::Conflict(_))
    ));
    db.create_project("open", true, None, ProjectOrigin::Requested, &actor())
        .await
        .unwrap();
    let names: Vec<String> = db
        .projects()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["open", "team"]);
    assert!(db.project("open").await.unwrap().unwrap().public);
    assert!(db.set_project_public("team", true, &actor()).await.unwrap());
    assert!(db.project("team").await.unwrap().unwrap().public);
    assert!(!db.set_project_public("nope", true, &actor()).await.unwrap());

    // Members.
    assert!(db
        .set_member("team", "dev", "developer", &actor())
        .await
        .unwrap());
    assert!(
        !db.set_member("team", "dev", "maintainer", &actor())
            .await
            .unwrap(),
        "changed, not added"
    );
    assert_eq!(
        db.member_role("team", dev.id).await.unwrap().as_deref(),
        Some("maintainer")
    );
    assert!(matches!(
        db.set_member("nope", "dev", "guest", &actor()).await,
        Err(MetaError::NotFound(_))
    ));
    assert!(matches!(
        db.set_member("team", "ghost", "guest", &actor()).await,
        Err(MetaError::NotFound(_))
    ));
    let members: Vec<(String, String)> = db
        .members("team")
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.user, m.role))
        .collect();
    assert_eq!(
        members,
        [
            ("dev".into(), "maintainer".into()),
            ("owner".into(), "admin".into())
        ]
    );

    // What one authorization reads.
    let access = db.project_access("team", Some(dev.id)).await.unwrap();
    assert_eq!(access.project.as_ref().map(|p| p.public), Some(true));
    assert_eq!(access.role.as_deref(), Some("maintainer"));
    assert!(!access.unrecorded_repositories);
    let anonymous = db.project_access("team", None).await.unwrap();
    assert!(anonymous.role.is_none() && anonymous.project.is_some());
    let unrecorded = db.project_access("legacy", Some(dev.id)).await.unwrap();
    assert!(unrecorded.project.is_none() && !unrecorded.unrecorded_repositories);
    assert!(!db.project_in_use("legacy").await.unwrap());
    push_blob(&db, &repo("legacy/app"), &digest('a'), 1).await;
    assert!(
        db.project_access("legacy", None)
            .await
            .unwrap()
            .unrecorded_repositories
    );
    assert!(db.project_in_use("legacy").await.unwrap());
    assert!(
        !db.project_in_use("leg").await.unwrap(),
        "a prefix is not a project"
    );

    assert!(db.remove_member("team", "dev", &actor()).await.unwrap());
    assert!(!db.remove_member("team", "dev", &actor()).await.unwrap());
    assert!(db.member_role("team", dev.id).await.unwrap().is_none());

    // Robots.
    let perms = vec!["pull".to_owned(), "push".to_owned()];
    let robot = db
        .create_robot("team", "ci", "secret-hash", &perms, Some(42), &actor())
        .await
        .unwrap();
    assert_eq!(
        (robot.permissions.clone(), robot.expires_ms),
        (perms.clone(), Some(42))
    );
    assert!(matches!(
        db.create_robot("team", "ci", "x", &perms, None, &actor())
            .await,
        Err(MetaError::Conflict(_))
    ));
    assert!(matches!(
        db.create_robot("nope", "ci", "x", &[], None, &actor())
            .await,
        Err(MetaError::NotFound(_))
    ));
    db.create_robot("team", "bot", "x", &[], None, &actor())
        .await
        .unwrap();
    assert_eq!(db.robot("team", "ci").await.unwrap(), Some(robot));
    let robots: Vec<String> = db
        .robots("team")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(robots, ["bot", "ci"]);
    assert!(db
        .robot("team", "bot")
        .await
        .unwrap()
        .unwrap()
        .permissions
        .is_empty());
    assert!(db.delete_robot("team", "bot", &actor()).await.unwrap());
    assert!(!db.delete_robot("team", "bot", &actor()).await.unwrap());

    // A project holding repositories cannot go; an empty one takes its robots along.
    let app = repo("team/app");
    push_blob(&db, &app, &digest('b'), 1).await;
    assert!(matches!(
        db.delete_project("team", &actor()).await,
        Err(MetaError::NotEmpty(_))
    ));
    db.unlink_blob(&app, &digest('b'), &actor()).await.unwrap();
    assert!(db.delete_project("team", &actor()).await.unwrap());
    assert!(!db.delete_project("team", &actor()).await.unwrap());
    assert!(db.robot("team", "ci").await.unwrap().is_none());
    assert!(db.member_projects(owner.id).await.unwrap().is_empty());
});

engine_test!(settings_keep_the_first_value, |place| {
    let db = place.open().await;
    let node_b = place.open().await;
    assert_eq!(db.setting_or_insert("key", "first").await.unwrap(), "first");
    assert_eq!(
        node_b.setting_or_insert("key", "second").await.unwrap(),
        "first"
    );
    assert_eq!(node_b.setting_or_insert("other", "x").await.unwrap(), "x");
});

fn audit_event(
    at_ms: i64,
    actor: &str,
    action: &str,
    resource: &str,
    result: &str,
) -> NewAuditEvent {
    NewAuditEvent {
        at_ms,
        actor: actor.into(),
        actor_kind: "user".into(),
        address: "127.0.0.1".into(),
        action: action.into(),
        resource: resource.into(),
        result: result.into(),
        detail: "\u{1b}[31m".into(),
        change: None,
        repeats: 1,
    }
}

engine_test!(the_audit_log_filters_and_pages_newest_first, |place| {
    let db = place.open().await;
    db.append_audit(Arc::from(vec![
        audit_event(100, "alice", "push", "team/app:v1", "success"),
        audit_event(200, "bob", "pull", "team/app:v1", "success"),
        audit_event(300, "alice", "delete", "other/x@sha256:1", "denied"),
        audit_event(400, "alice", "push", "team/lib:v2", "failed"),
    ]))
    .await
    .unwrap();
    let list = |filter: AuditFilter| {
        let db = &db;
        async move {
            db.audit(filter)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.event.at_ms)
                .collect::<Vec<_>>()
        }
    };
    let everything = AuditFilter {
        limit: 10,
        ..AuditFilter::default()
    };
    assert_eq!(list(everything.clone()).await, [400, 300, 200, 100]);
    let all = db.audit(everything.clone()).await.unwrap();
    assert_eq!(
        all[0].event,
        audit_event(400, "alice", "push", "team/lib:v2", "failed")
    );
    assert!(all.windows(2).all(|w| w[0].id > w[1].id));
    let filtered = |f: fn(&mut AuditFilter)| {
        let mut filter = everything.clone();
        f(&mut filter);
        filter
    };
    assert_eq!(
        list(filtered(|f| f.actor = Some("alice".into()))).await,
        [400, 300, 100]
    );
    assert_eq!(
        list(filtered(|f| f.action = Some("push".into()))).await,
        [400, 100]
    );
    assert_eq!(
        list(filtered(|f| f.resource_prefix = Some("team/".into()))).await,
        [400, 200, 100]
    );
    assert_eq!(
        list(filtered(|f| f.resource_prefix = Some("%".into()))).await,
        Vec::<i64>::new()
    );
    assert_eq!(
        list(filtered(|f| f.result = Some("denied".into()))).await,
        [300]
    );
    assert_eq!(
        list(filtered(|f| f.since_ms = Some(200))).await,
        [400, 300, 200]
    );
    assert_eq!(list(filtered(|f| f.until_ms = Some(200))).await, [100]);
    assert_eq!(list(filtered(|f| f.limit = 2)).await, [400, 300]);
    let before = AuditFilter {
        before_id: Some(all[1].id),
        ..everything.clone()
    };
    assert_eq!(list(before).await, [200, 100]);
});

fn changes(events: &[berth_meta::Event]) -> Vec<Change> {
    events.iter().map(|e| e.change.clone()).collect()
}

engine_test!(
    every_committed_change_is_one_event_and_a_refused_one_none,
    |place| {
        let db = place.open().await;
        let (app, other) = (repo("team/app"), repo("team/other"));
        let (a, m1, m2) = (digest('a'), digest('1'), digest('2'));
        let start = db.last_event().await.unwrap();
        push_blob(&db, &app, &a, 7).await;
        db.link_blob(&other, &a, 7, BlobArrival::Mounted, &actor())
            .await
            .unwrap();
        // Refused: a missing reference, an unknown tag, an absent link. No events.
        let missing = manifest(&m1, vec![layer(&digest('f'))], None);
        assert!(db
            .put_manifest(&app, missing, Some(&tag("v1")), &actor())
            .await
            .is_err());
        assert!(!db.delete_tag(&app, &tag("nope"), &actor()).await.unwrap());
        assert!(!db.unlink_blob(&app, &digest('e'), &actor()).await.unwrap());
        for (m, subject) in [(&m1, None), (&m2, None), (&m2, None)] {
            db.put_manifest(
                &app,
                manifest(m, vec![layer(&a)], subject),
                Some(&tag("v1")),
                &actor(),
            )
            .await
            .unwrap();
        }
        db.put_manifest(
            &app,
            manifest(&m1, vec![layer(&a)], None),
            Some(&tag("old")),
            &actor(),
        )
        .await
        .unwrap();
        assert!(db.delete_tag(&app, &tag("v1"), &actor()).await.unwrap());
        assert!(db.delete_manifest(&app, &m1, &actor()).await.unwrap());
        assert!(db.unlink_blob(&other, &a, &actor()).await.unwrap());

        let events = db.events_after(start, 100).await.unwrap();
        assert!(
            events.windows(2).all(|w| w[1].seq == w[0].seq + 1),
            "gapless: {events:?}"
        );
        assert_eq!(events[0].seq, start + 1);
        assert_eq!(db.last_event().await.unwrap(), events.last().unwrap().seq);
        assert!(events.iter().all(|e| e.actor == actor()));
        let pushed = |m: &Digest, t: &str, how: TagChange| Change::ManifestPushed {
            repository: "team/app".into(),
            digest: m.to_string(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: manifest(m, vec![], None).raw.len() as u64,
            subject: None,
            tag: Some((t.into(), how)),
        };
        assert_eq!(
            changes(&events),
            [
                Change::BlobUploaded {
                    repository: "team/app".into(),
                    digest: a.to_string(),
                    size: 7
                },
                Change::BlobMounted {
                    repository: "team/other".into(),
                    digest: a.to_string(),
                    size: 7
                },
                pushed(&m1, "v1", TagChange::Created),
                pushed(
                    &m2,
                    "v1",
                    TagChange::Moved {
                        from: m1.to_string()
                    }
                ),
                pushed(&m2, "v1", TagChange::Unchanged),
                pushed(&m1, "old", TagChange::Created),
                Change::TagDeleted {
                    repository: "team/app".into(),
                    tag: "v1".into(),
                    digest: m2.to_string()
                },
                Change::ManifestDeleted {
                    repository: "team/app".into(),
                    digest: m1.to_string(),
                    tags: vec!["old".into()]
                },
                Change::BlobDeleted {
                    repository: "team/other".into(),
                    digest: a.to_string()
                },
            ]
        );
        // Paging through the log.
        let second = db.events_after(events[1].seq, 2).await.unwrap();
        assert_eq!(second, events[2..4]);

        // The audit log shows the same changes in its words, with attempts beside them.
        db.append_audit(Arc::from(vec![audit_event(
            1,
            "bob",
            "pull",
            "team/app:v1",
            "denied",
        )]))
        .await
        .unwrap();
        let pushes = db
            .audit(AuditFilter {
                action: Some("push".into()),
                limit: 10,
                ..AuditFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(pushes.len(), 4);
        assert_eq!(pushes[0].event.resource, "team/app:old");
        assert_eq!(
            (
                pushes[0].event.actor.as_str(),
                pushes[0].event.result.as_str()
            ),
            ("alice", "success")
        );
        assert_eq!(
            db.events_after(start, 100).await.unwrap().len(),
            events.len(),
            "attempts are not changes"
        );

        // A collection is an event; a dry run is not.
        let selection = GcSelection {
            untagged_pushed_before_ms: Some(far_future()),
            blobs_unused_before_ms: far_future(),
        };
        let before = db.last_event().await.unwrap();
        db.preview_garbage(selection, 10).await.unwrap();
        assert_eq!(db.last_event().await.unwrap(), before);
        mark_all(&db, selection).await;
        let gc = db.events_after(before, 10).await.unwrap();
        assert_eq!(gc.len(), 1);
        assert!(
            matches!(gc[0].change, Change::GarbageCollected { manifests: 1, .. }),
            "{gc:?}"
        );
        assert_eq!(gc[0].actor, Actor::system("gc"));
        // One that finds nothing is recorded too: "the last collection" means the last run.
        let before = db.last_event().await.unwrap();
        mark_all(&db, selection).await;
        let gc = db.events_after(before, 10).await.unwrap();
        assert!(
            matches!(
                gc[..],
                [Event {
                    change: Change::GarbageCollected {
                        manifests: 0,
                        blobs: 0,
                        ..
                    },
                    ..
                }]
            ),
            "{gc:?}"
        );
        assert_eq!(
            db.last_collection().await.unwrap().map(|(at, _)| at),
            Some(gc[0].at_ms)
        );
    }
);

engine_test!(
    a_consumer_cursor_has_one_holder_and_only_moves_forward,
    |place| {
        let node_a = place.open().await;
        let node_b = place.open().await;
        assert_eq!(
            node_a.claim_cursor("webhooks", "a", 60_000).await.unwrap(),
            Some(0)
        );
        assert_eq!(
            node_b.claim_cursor("webhooks", "b", 60_000).await.unwrap(),
            None
        );
        assert_eq!(
            node_b
                .claim_cursor("replication", "b", 60_000)
                .await
                .unwrap(),
            Some(0)
        );
        assert!(node_a.advance_cursor("webhooks", "a", 3).await.unwrap());
        assert!(
            !node_b.advance_cursor("webhooks", "b", 9).await.unwrap(),
            "not the holder"
        );
        assert!(
            !node_a.advance_cursor("webhooks", "a", 1).await.unwrap(),
            "never back"
        );
        assert_eq!(
            node_a.claim_cursor("webhooks", "a", 1).await.unwrap(),
            Some(3),
            "renewed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            !node_a.advance_cursor("webhooks", "a", 4).await.unwrap(),
            "expired"
        );
        assert_eq!(
            node_b.claim_cursor("webhooks", "b", 60_000).await.unwrap(),
            Some(3),
            "taken over where it stood"
        );
    }
);

engine_test!(
    retention_prunes_old_events_no_consumer_still_needs,
    |place| {
        let db = place.open().await;
        db.append_audit(Arc::from(vec![
            audit_event(100, "a", "login", "a", "success"),
            audit_event(200, "a", "login", "a", "success"),
        ]))
        .await
        .unwrap();
        push_blob(&db, &repo("team/app"), &digest('a'), 1).await;
        let last = db.last_event().await.unwrap();
        assert_eq!(db.claim_cursor("slow", "n", 60_000).await.unwrap(), Some(0));
        assert_eq!(
            db.prune_events(1_000).await.unwrap(),
            0,
            "the slow consumer has read nothing"
        );
        assert!(db.advance_cursor("slow", "n", last - 2).await.unwrap());
        assert_eq!(
            db.prune_events(1_000).await.unwrap(),
            1,
            "only what the consumer passed"
        );
        assert!(db.advance_cursor("slow", "n", last).await.unwrap());
        assert_eq!(
            db.prune_events(1_000).await.unwrap(),
            1,
            "the recent push stays"
        );
        // A consumer gone for longer than the retention holds nothing back.
        assert_eq!(db.claim_cursor("gone", "n", 1).await.unwrap(), Some(0));
        db.append_audit(Arc::from(vec![audit_event(
            300, "a", "login", "a", "success",
        )]))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            db.prune_events(now_ms()).await.unwrap(),
            1,
            "the gone consumer holds nothing back, the slow one what it has not read"
        );
        db.release_lease("event-consumer:slow", "n").await.unwrap();
        assert_eq!(db.prune_events(now_ms()).await.unwrap(), 1);
        assert_eq!(
            db.audit(AuditFilter {
                limit: 10,
                ..AuditFilter::default()
            })
            .await
            .unwrap()
            .len(),
            0
        );
    }
);

engine_test!(
    /// Appenders on two nodes race while a reader follows the log: whatever it has seen is
    /// always a gapless prefix, so a consumer that remembers "up to N" never skips an event
    /// that commits later with a smaller number.
    a_reader_following_concurrent_appenders_never_skips_one,
    |place| {
        let nodes = [Arc::new(place.open().await), Arc::new(place.open().await)];
        let start = nodes[0].last_event().await.unwrap();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let db = nodes[w % 2].clone();
                tokio::spawn(async move {
                    for i in 0..20 {
                        push_blob(
                            &db,
                            &repo(&format!("p/w{w}")),
                            &numbered_digest(w * 100 + i),
                            1,
                        )
                        .await;
                    }
                })
            })
            .collect();
        let reader = nodes[1].clone();
        let mut seen = start;
        let total = start + 80;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while seen < total && std::time::Instant::now() < deadline {
            for event in reader.events_after(seen, 7).await.unwrap() {
                assert_eq!(event.seq, seen + 1, "a gap after {seen}");
                seen = event.seq;
            }
        }
        for w in writers {
            w.await.unwrap();
        }
        assert_eq!(seen, total);
});

engine_test!(account_changes_are_events_in_the_audit_log_words, |place| {
    let db = place.open().await;
    let start = db.last_event().await.unwrap();
    let by = actor();
    db.create_user("dev", "h", false, "", &by).await.unwrap();
    assert!(db.create_user("dev", "h", false, "", &by).await.is_err());
    db.update_user("dev", Some("h2"), Some(true), &by)
        .await
        .unwrap();
    assert!(db
        .update_user("ghost", Some("h"), None, &by)
        .await
        .unwrap()
        .is_none());
    db.create_project("team", false, None, ProjectOrigin::Requested, &by)
        .await
        .unwrap();
    db.create_project("pushed", false, None, ProjectOrigin::FirstPush, &by)
        .await
        .unwrap();
    db.set_project_public("team", true, &by).await.unwrap();
    db.set_member("team", "dev", "developer", &by)
        .await
        .unwrap();
    db.set_member("team", "dev", "guest", &by).await.unwrap();
    db.remove_member("team", "dev", &by).await.unwrap();
    assert!(!db.remove_member("team", "dev", &by).await.unwrap());
    db.create_robot("team", "ci", "h", &["pull".to_owned()], None, &by)
        .await
        .unwrap();
    db.delete_robot("team", "ci", &by).await.unwrap();
    db.delete_project("team", &by).await.unwrap();
    db.delete_user("dev", &by).await.unwrap();
    assert!(!db.delete_user("dev", &by).await.unwrap());

    let events = db.events_after(start, 100).await.unwrap();
    assert_eq!(events.len(), 12, "{events:#?}");
    assert!(
        matches!(events[0].change, Change::UserCreated { ref name, admin: false, .. } if name == "dev")
    );
    assert!(matches!(
        events[1].change,
        Change::UserChanged {
            password: true,
            admin: Some(true),
            ..
        }
    ));
    assert!(matches!(
        events[3].change,
        Change::ProjectCreated { by_push: true, .. }
    ));
    assert!(matches!(
        events[5].change,
        Change::MemberSet { added: true, .. }
    ));
    assert!(matches!(
        events[6].change,
        Change::MemberSet { added: false, .. }
    ));
    assert!(matches!(events[11].change, Change::UserDeleted { .. }));
    let audit = db
        .audit(AuditFilter {
            limit: 12,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    let words: Vec<(String, String, String)> = audit
        .into_iter()
        .rev()
        .map(|r| (r.event.action, r.event.resource, r.event.detail))
        .collect();
    let w = |a: &str, r: &str, d: &str| (a.to_owned(), r.to_owned(), d.to_owned());
    assert_eq!(
        words,
        [
            w("user.create", "dev", ""),
            w("user.update", "dev", "password admin=true"),
            w("project.create", "team", "private"),
            w("project.create", "pushed", "created by push"),
            w("project.update", "team", "public"),
            w("member.add", "team", "dev as developer"),
            w("member.update", "team", "dev as guest"),
            w("member.remove", "team", "dev"),
            w("robot.create", "team", "robot$team+ci [pull]"),
            w("robot.delete", "team", "robot$team+ci"),
            w("project.delete", "team", ""),
            w("user.delete", "dev", ""),
        ]
    );
});

engine_test!(logins_are_typed_events_beside_the_changes, |place| {
    let db = place.open().await;
    let start = db.last_event().await.unwrap();
    let mut login = audit_event(1, "dev", "login", "dev", "failed");
    login.change = Some(Change::LoginFailed {
        name: "dev".into(),
        reason: "bad password".into(),
    });
    db.append_audit(Arc::from(vec![
        audit_event(2, "dev", "pull", "team/app:v1", "denied"),
        login.clone(),
    ]))
    .await
    .unwrap();
    let events = db.events_after(start, 10).await.unwrap();
    assert_eq!(events.len(), 1, "the refused pull is the audit log's only");
    assert_eq!(events[0].change, login.change.clone().unwrap());
    assert_eq!(events[0].seq, start + 2);
    let audit = db
        .audit(AuditFilter {
            action: Some("login".into()),
            limit: 10,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(audit[0].event, login);
});

engine_test!(
    /// Names and details come from clients (a failed login records the name it claimed): the
    /// log keeps a bounded part of each, so it is no way to fill the disk.
    the_log_keeps_a_bounded_part_of_each_client_string,
    |place| {
        let db = place.open().await;
        let huge = "é".repeat(50_000);
        db.append_audit(Arc::from(vec![audit_event(1, &huge, "login", &huge, "failed")]))
            .await
            .unwrap();
        let by = Actor {
            name: huge.clone(),
            kind: "user".into(),
            address: "127.0.0.1".into(),
        };
        push_blob(&db, &repo("team/app"), &digest('a'), 1).await;
        db.unlink_blob(&repo("team/app"), &digest('a'), &by)
            .await
            .unwrap();
        let records = db
            .audit(AuditFilter {
                limit: 10,
                ..AuditFilter::default()
            })
            .await
            .unwrap();
        for record in &records {
            for field in [&record.event.actor, &record.event.resource] {
                assert!(field.len() <= 1024, "{}", field.len());
            }
        }
        assert!(records[0].event.actor.ends_with('…'));
        assert!(records[2].event.resource.ends_with('…'));
});

engine_test!(
    /// A user's refresh tokens: recorded at login, found while live, listed newest first,
    /// revoked one by one (with an event), and never more than a hundred kept.
    refresh_tokens_are_kept_per_login_and_revoked_one_by_one,
    |place| {
        let db = place.open().await;
        let token = |id: &str, created_ms: i64, expires_ms: i64| RefreshTokenRecord {
            id: id.to_owned(),
            subject: "rita".to_owned(),
            subject_kind: "user".to_owned(),
            subject_id: 7,
            client: "docker".to_owned(),
            address: "10.0.0.1".to_owned(),
            created_ms,
            expires_ms,
            last_used_ms: created_ms,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        db.record_refresh_token(&token("old", now - 10, now + 60_000))
            .await
            .unwrap();
        db.record_refresh_token(&token("new", now, now + 60_000))
            .await
            .unwrap();
        db.record_refresh_token(&token("dead", now - 5, now - 1))
            .await
            .unwrap();
        assert!(db.use_refresh_token("dead").await.unwrap().is_none(), "expired");
        assert_eq!(db.use_refresh_token("old").await.unwrap().unwrap().subject, "rita");
        let listed: Vec<String> = db
            .refresh_tokens("rita")
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(listed, ["new", "old"]);
        assert!(db.revoke_refresh_token("rita", "old", &actor()).await.unwrap());
        assert!(!db.revoke_refresh_token("rita", "old", &actor()).await.unwrap());
        assert!(!db.revoke_refresh_token("someone", "new", &actor()).await.unwrap());
        assert!(db.use_refresh_token("old").await.unwrap().is_none());
        for i in 0..105 {
            db.record_refresh_token(&token(&format!("t{i:03}"), now + 1 + i, now + 60_000))
                .await
                .unwrap();
        }
        let kept = db.refresh_tokens("rita").await.unwrap();
        assert_eq!(kept.len(), 100, "the newest hundred");
        assert_eq!(kept[0].id, "t104");
    }
);

fn new_webhook(project: Option<&str>, name: &str) -> NewWebhook {
    NewWebhook {
        project: project.map(str::to_owned),
        name: name.to_owned(),
        url: "http://127.0.0.1:9/hook".to_owned(),
        events: vec!["push".to_owned(), "delete".to_owned()],
        format: "cloudevents".to_owned(),
        secret: "s3cret".to_owned(),
        enabled: true,
    }
}

engine_test!(
    webhook_policies_are_scoped_unique_bounded_and_go_with_their_project,
    |place| {
        let db = place.open().await;
        assert!(matches!(
            db.create_webhook(&new_webhook(Some("team"), "ci"), &actor())
                .await,
            Err(MetaError::NotFound(_))
        ));
        db.create_project("team", false, None, ProjectOrigin::Requested, &actor())
            .await
            .unwrap();
        let created = db
            .create_webhook(&new_webhook(Some("team"), "ci"), &actor())
            .await
            .unwrap();
        assert_eq!(created.events, vec!["push", "delete"]);
        assert!(created.enabled);
        // The same name in another scope is another policy.
        db.create_webhook(&new_webhook(None, "ci"), &actor())
            .await
            .unwrap();
        assert!(matches!(
            db.create_webhook(&new_webhook(None, "ci"), &actor()).await,
            Err(MetaError::Conflict(_))
        ));
        for i in 1..MAX_WEBHOOKS_PER_SCOPE {
            db.create_webhook(&new_webhook(None, &format!("h{i}")), &actor())
                .await
                .unwrap();
        }
        assert!(matches!(
            db.create_webhook(&new_webhook(None, "one-too-many"), &actor())
                .await,
            Err(MetaError::Conflict(_))
        ));
        let patch = WebhookPatch {
            enabled: Some(false),
            events: Some(vec!["delete".to_owned()]),
            ..WebhookPatch::default()
        };
        let changed = db
            .update_webhook(Some("team"), "ci", &patch, &actor())
            .await
            .unwrap()
            .unwrap();
        assert!(!changed.enabled);
        assert_eq!(changed.events, vec!["delete"]);
        assert_eq!(changed.url, created.url);
        assert_eq!(db.webhooks(Some("team")).await.unwrap().len(), 1);
        assert_eq!(
            db.webhooks(None).await.unwrap().len() as i64,
            MAX_WEBHOOKS_PER_SCOPE
        );
        db.delete_project("team", &actor()).await.unwrap();
        assert!(db.webhook(Some("team"), "ci").await.unwrap().is_none());
        assert!(db.delete_webhook(None, "ci", &actor()).await.unwrap());
        assert!(!db.delete_webhook(None, "ci", &actor()).await.unwrap());
    }
);

engine_test!(
    deliveries_are_enqueued_once_with_the_cursor_and_worked_in_event_order,
    |place| {
        let db = place.open().await;
        let hook = db
            .create_webhook(&new_webhook(None, "all"), &actor())
            .await
            .unwrap();
        push_blob(&db, &repo("team/app"), &digest('a'), 1).await;
        push_blob(&db, &repo("team/app"), &digest('b'), 2).await;
        let events = db.events_after(0, 100).await.unwrap();
        let seqs: Vec<i64> = events
            .iter()
            .filter(|e| matches!(e.change, Change::BlobUploaded { .. }))
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs.len(), 2);
        let last = *seqs.last().unwrap();
        assert_eq!(
            db.claim_cursor("webhooks", "n1", 60_000).await.unwrap(),
            Some(0)
        );
        let pairs: Vec<(i64, i64)> = seqs.iter().rev().map(|s| (hook.id, *s)).collect();
        assert!(
            !db.enqueue_deliveries("webhooks", "n2", last, pairs.clone())
                .await
                .unwrap(),
            "only the holder enqueues"
        );
        assert!(db
            .enqueue_deliveries("webhooks", "n1", last, pairs.clone())
            .await
            .unwrap());
        // Again (a consumer that crashed before it knew): nothing doubles.
        assert!(db
            .enqueue_deliveries("webhooks", "n1", last, pairs)
            .await
            .unwrap());
        let pending = db.pending_deliveries(hook.id, 10).await.unwrap();
        assert_eq!(
            pending.iter().map(|(d, _)| d.seq).collect::<Vec<_>>(),
            seqs,
            "oldest first"
        );
        assert!(pending
            .iter()
            .all(|(d, e)| d.state == DeliveryState::Pending
                && e.as_ref().map(|e| e.seq) == Some(d.seq)));
        let backlog = db.delivery_backlog().await.unwrap();
        assert_eq!(backlog.len(), 1);
        assert_eq!(backlog[0].pending, 2);

        let outcome = |seq, state, attempts| DeliveryOutcome {
            policy_id: hook.id,
            seq,
            state,
            attempts,
            next_attempt_ms: now_ms() + 1000,
            attempted_ms: now_ms(),
            status: Some(500),
            error: "HTTP 500".to_owned(),
            latency_ms: 3,
        };
        db.record_deliveries(vec![
            outcome(seqs[0], DeliveryState::Delivered, 1),
            outcome(seqs[1], DeliveryState::Failed, 7),
        ])
        .await
        .unwrap();
        assert!(db.pending_deliveries(hook.id, 10).await.unwrap().is_empty());
        let log = db.deliveries(hook.id, None, 10).await.unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].seq, seqs[1], "newest first");
        assert_eq!(log[0].state, DeliveryState::Failed);
        assert_eq!(log[0].attempts, 7);
        assert_eq!(log[0].last_status, Some(500));
        assert_eq!(
            db.deliveries(hook.id, Some(seqs[1]), 10)
                .await
                .unwrap()
                .len(),
            1
        );

        assert!(db.redeliver(hook.id, seqs[1]).await.unwrap());
        let again = db.pending_deliveries(hook.id, 10).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0.attempts, 0);
        assert!(!db.redeliver(hook.id, 999_999).await.unwrap());

        assert_eq!(
            db.prune_deliveries(now_ms() + 1).await.unwrap(),
            1,
            "the pending one stays"
        );
        let cursors = db.cursors().await.unwrap();
        assert_eq!(cursors, vec![("webhooks".to_owned(), last)]);
    }
);

engine_test!(
    /// What a pull-through cache stores and how its eviction sees it: a cached manifest
    /// need not have its blobs yet; manifests come least recently pulled first, with their
    /// bytes; a project's bytes count each of its blobs once; other projects stay out.
    cached_manifests_come_least_recently_pulled_first,
    |place| {
        let db = place.open().await;
        let (one, two, elsewhere) = (repo("hub/one"), repo("hub/two"), repo("hubby/x"));
        let (a, b, c) = (digest('a'), digest('b'), digest('c'));
        let (m1, m2, m3) = (digest('1'), digest('2'), digest('3'));
        // Cached before any of its layers arrived.
        db.put_cached_manifest(&one, manifest(&m1, vec![layer(&a)], None), Some(&tag("v1")), &actor())
            .await
            .unwrap();
        push_blob(&db, &one, &a, 1000).await;
        push_blob(&db, &two, &a, 1000).await;
        push_blob(&db, &two, &b, 500).await;
        push_blob(&db, &elsewhere, &c, 7).await;
        db.put_cached_manifest(&two, manifest(&m2, vec![layer(&a), layer(&b)], None), None, &actor())
            .await
            .unwrap();
        db.put_cached_manifest(&elsewhere, manifest(&m3, vec![layer(&c)], None), None, &actor())
            .await
            .unwrap();
        assert_eq!(db.project_bytes("hub").await.unwrap(), 1500, "a once, b once; not hubby's");
        // m1 pulled now: m2 (never pulled) comes first.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        db.touch_manifest(&one, &m1).await.unwrap();
        let listed = db.least_recently_pulled("hub", 10).await.unwrap();
        let order: Vec<(&str, &Digest)> = listed.iter().map(|m| (m.repo.as_str(), &m.digest)).collect();
        assert_eq!(order, vec![("hub/two", &m2), ("hub/one", &m1)]);
        let manifest_size = |d: &Digest| manifest(d, vec![], None).raw.len() as u64;
        assert!(listed[0].bytes >= 1500 && listed[0].bytes < 1500 + 4 * manifest_size(&m2) + 200);
        assert!(listed[1].last_pulled_ms >= listed[0].last_pulled_ms);
        assert_eq!(db.least_recently_pulled("hub", 1).await.unwrap().len(), 1);
    }
);

engine_test!(
    a_collection_in_batches_keeps_what_a_push_reached_since_its_snapshot,
    |place| {
        let db = place.open().await;
        let app = repo("team/app");
        let [a, b, c, d, e] = ['a', 'b', 'c', 'd', 'e'].map(digest);
        for blob in [&a, &b, &c, &d, &e] {
            push_blob(&db, &app, blob, 1).await;
        }
        let (untagged, index, child_m, referrer, tagged) = (
            digest('1'),
            digest('2'),
            digest('3'),
            digest('4'),
            digest('5'),
        );
        for (m, edges, subject, t) in [
            (&untagged, vec![layer(&a)], None, None),
            (&child_m, vec![layer(&b)], None, None),
            (&index, vec![child(&child_m)], None, None),
            (&referrer, vec![layer(&c)], Some(untagged.clone()), None),
            (&tagged, vec![layer(&d)], None, Some(tag("v1"))),
        ] {
            db.put_manifest(&app, manifest(m, edges, subject), t.as_ref(), &actor())
                .await
                .unwrap();
        }
        let candidates = db
            .unreached_manifests(far_future(), None, 10)
            .await
            .unwrap();
        let names: Vec<&Digest> = candidates.iter().map(|(_, d)| d).collect();
        assert_eq!(names, [&untagged, &index, &child_m, &referrer]);
        // In pages, from where the last one ended.
        let first = db.unreached_manifests(far_future(), None, 3).await.unwrap();
        let rest = db.unreached_manifests(far_future(), first.last().cloned(), 3);
        assert_eq!([first, rest.await.unwrap()].concat(), candidates);

        // A push tags one candidate after the snapshot: it stays, and so does its
        // referrer; the index and its child go, in one batch, the index first.
        db.put_manifest(
            &app,
            manifest(&untagged, vec![layer(&a)], None),
            Some(&tag("late")),
            &actor(),
        )
        .await
        .unwrap();
        let removed = db
            .remove_unreached_manifests(candidates, far_future())
            .await
            .unwrap();
        let removed: Vec<&Digest> = removed.iter().map(|(_, d)| d).collect();
        assert_eq!(removed, [&index, &child_m]);
        for kept in [&untagged, &referrer, &tagged] {
            assert!(db
                .get_manifest(&app, &Reference::Digest(kept.clone()))
                .await
                .unwrap()
                .is_some());
        }

        // Blobs, two per transaction: only what nothing references any more.
        let (mut after, mut marked, mut steps) = (String::new(), Vec::new(), 0);
        loop {
            let step = db.mark_unused_blobs(&after, 2, far_future()).await.unwrap();
            assert!(step.marked.len() <= 2);
            marked.extend(step.marked);
            steps += 1;
            match step.next {
                Some(next) => after = next,
                None => break,
            }
        }
        assert_eq!(steps, 3, "five blobs, two per step");
        assert_eq!(marked, [(b.clone(), 1), (e.clone(), 1)]);
        assert!(db.linked_blob(&app, &b).await.unwrap().is_none());
        assert_eq!(
            db.blobs_being_deleted("", 1).await.unwrap(),
            [(b.clone(), 1)]
        );
        assert_eq!(
            db.blobs_being_deleted(b.as_str(), 1).await.unwrap(),
            [(e.clone(), 1)]
        );
        assert!(db
            .blobs_being_deleted(e.as_str(), 1)
            .await
            .unwrap()
            .is_empty());
        db.record_collection(2, 2, 2).await.unwrap();
        assert!(db
            .last_collection()
            .await
            .unwrap()
            .unwrap()
            .1
            .contains("2 manifests"));
    }
);
