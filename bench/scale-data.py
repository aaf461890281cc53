#!/usr/bin/env python3
"""A production-size data set for berth's embedded default, written straight into a
data directory's metadata database and blob files (the API would take hours for a
million blobs); bench/scale.sh then checks it through the API before measuring.

    scale-data.py DATA_DIR BLOBS MANIFESTS BIG_TAGS REPOS [DIST_ROOT]

It also writes DATA_DIR.manifests: "repository digest" per line, for the collection
benchmark's deletes. With DIST_ROOT, the same content is also laid out as Docker
Distribution stores it (blobs/, and per repository _layers/, _manifests/revisions/ and
_manifests/tags/ links) under DIST_ROOT/docker/registry/v2, with every other manifest of
the listing deleted as Distribution's DELETE leaves it: its revision and tag links gone,
its blobs and layer links kept for the collector.

DATA_DIR must hold a meta.db that berth created (so that the schema is berth's own,
migrated to the current version) and nothing pushed yet. The shape:

- `big/app` holds BIG_TAGS manifests, each tagged `t<n>`;
- REPOS - 1 more repositories `p<k>/r<j>` (in 200 projects) share the other manifests,
  each tagged `v<n>` in its repository;
- every manifest is an OCI image manifest of its own config and layers, so BLOBS /
  MANIFESTS blobs each, none shared; blob bytes are small and distinct;
- everything was pushed two days ago (past every grace period a collection applies).

Rows are written as berth writes them (repositories, blobs, repo_blobs, manifests,
manifest_edges, tags) in one transaction; no events are recorded (webhooks and
replication do not replay history).
"""
import hashlib
import json
import os
import sqlite3
import sys
import time

# The migration that added the last column written here (tags.pushed_by); later ones
# only add what this leaves at its default.
MIN_SCHEMA = 14
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


def link(path, digest):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "link"), "w") as f:
        f.write(digest)


def distribution(root, repo, tag, digest, raw, descriptors, deleted):
    """One manifest of the set in Distribution's layout."""
    def blob(d, content):
        hex_ = d.split(":")[1]
        path = os.path.join(root, "blobs", "sha256", hex_[:2], hex_)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "data"), "wb") as f:
            f.write(content)
    base = os.path.join(root, "repositories", repo)
    for d, _ in descriptors:
        # The generator's blob bytes, again (they are a function of their serial).
        blob(d, descriptors_content[d])
        link(os.path.join(base, "_layers", "sha256", d.split(":")[1]), d)
    blob(digest, raw)
    if not deleted:
        hex_ = digest.split(":")[1]
        link(os.path.join(base, "_manifests", "revisions", "sha256", hex_), digest)
        link(os.path.join(base, "_manifests", "tags", tag, "current"), digest)
        link(os.path.join(base, "_manifests", "tags", tag, "index", "sha256", hex_), digest)


descriptors_content = {}


def main():
    data, blobs, manifests, big_tags, repos = sys.argv[1], *map(int, sys.argv[2:6])
    dist = os.path.join(sys.argv[6], "docker", "registry", "v2") if len(sys.argv) > 6 else None
    per_manifest = blobs // manifests
    if per_manifest < 2 or big_tags > manifests or repos < 2:
        sys.exit("need BLOBS >= 2 * MANIFESTS, BIG_TAGS <= MANIFESTS and REPOS >= 2")
    db = sqlite3.connect(os.path.join(data, "meta.db"), isolation_level=None)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version < MIN_SCHEMA:
        sys.exit(f"meta.db is at schema {version}; this generator writes schema {MIN_SCHEMA} or later")
    if db.execute("SELECT COUNT(*) FROM manifests").fetchone()[0]:
        sys.exit("meta.db already holds manifests")
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA cache_size = -262144")
    at = int(time.time() * 1000) - 2 * 86_400_000
    blob_root = os.path.join(data, "blobs", "sha256")
    for i in range(256):
        os.makedirs(os.path.join(blob_root, f"{i:02x}"), exist_ok=True)

    names = ["big/app"] + [f"p{j % 200}/r{j}" for j in range(1, repos)]
    started = time.time()
    db.execute("BEGIN")
    db.executemany("INSERT INTO repositories (name, created_at) VALUES (?, ?)",
                   ((n, at) for n in names))
    blob_rows, link_rows, edge_rows, manifest_rows, tag_rows = [], [], [], [], []

    def flush():
        db.executemany("INSERT INTO blobs (digest, size, created_at, last_used_at, state) "
                       "VALUES (?, ?, ?, ?, 'live')", blob_rows)
        db.executemany("INSERT INTO repo_blobs (repo, digest, linked_at) VALUES (?, ?, ?)", link_rows)
        db.executemany("INSERT INTO manifest_edges (repo, manifest, target, kind) VALUES (?, ?, ?, ?)",
                       edge_rows)
        db.executemany("INSERT INTO manifests (repo, digest, media_type, artifact_type, subject, "
                       "annotations, size, raw, pushed_at) VALUES (?, ?, ?, NULL, NULL, NULL, ?, ?, ?)",
                       manifest_rows)
        db.executemany("INSERT INTO tags (repo, tag, digest, updated_at, pushed_by) "
                       "VALUES (?, ?, ?, ?, 'generator')", tag_rows)
        for rows in (blob_rows, link_rows, edge_rows, manifest_rows, tag_rows):
            rows.clear()

    serial = 0
    listing = open(data.rstrip("/") + ".manifests", "w")
    for m in range(manifests):
        if m < big_tags:
            repo, tag = names[0], f"t{m}"
        else:
            repo = names[1 + (m - big_tags) % (repos - 1)]
            tag = f"v{(m - big_tags) // (repos - 1)}"
        descriptors = []
        for b in range(per_manifest):
            serial += 1
            content = f"berth scale blob {serial}\n".encode()
            digest = hashlib.sha256(content).hexdigest()
            with open(os.path.join(blob_root, digest[:2], digest), "wb") as f:
                f.write(content)
            descriptors.append((f"sha256:{digest}", len(content)))
            if dist:
                descriptors_content[f"sha256:{digest}"] = content
            blob_rows.append((f"sha256:{digest}", len(content), at, at))
            link_rows.append((repo, f"sha256:{digest}", at))
        (config, config_size), layers = descriptors[0], descriptors[1:]
        raw = json.dumps({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config, "size": config_size},
            "layers": [{"mediaType": LAYER_TYPE, "digest": d, "size": s} for d, s in layers],
        }, separators=(",", ":")).encode()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        manifest_rows.append((repo, digest, MANIFEST_TYPE, len(raw), raw, at))
        edge_rows.append((repo, digest, config, "config"))
        edge_rows.extend((repo, digest, d, "layer") for d, _ in layers)
        tag_rows.append((repo, tag, digest, at))
        listing.write(f"{repo} {digest}\n")
        if dist:
            distribution(dist, repo, tag, digest, raw, descriptors, deleted=m % 2 == 0)
            descriptors_content.clear()
        if len(manifest_rows) >= 10_000:
            flush()
            print(f"  {m + 1} manifests, {serial} blobs, {time.time() - started:.0f} s",
                  file=sys.stderr, flush=True)
    flush()
    listing.close()
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(json.dumps({"blobs": serial, "manifests": manifests, "repositories": repos,
                      "tags": manifests, "big_repository_tags": big_tags,
                      "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
