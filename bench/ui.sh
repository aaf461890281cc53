#!/usr/bin/env bash
# The web UI's page times at size: a release berth (embedded default) is filled through
# the registry API with one repository of TAGS tags (each its own manifest) and REPOS
# repositories of one image each, all in one project; then each page is asked for REQS
# times, one request at a time over a kept-alive connection, and its median and p95 are
# printed against the target (p95 ≤ 50 ms).
#
# Environment: TAGS (100000), REPOS (5000), REQS (200), PORT (5601).
# Needs: cargo, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
TAGS=${TAGS:-100000}
REPOS=${REPOS:-5000}
REQS=${REQS:-200}
PORT=${PORT:-5601}
cargo build --release --locked --quiet -p berth
WORK=$(mktemp -d "${TMPDIR:-/tmp}/berth-ui-bench.XXXXXX")
PID=
cleanup() {
  [ -n "$PID" ] && { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
  rm -rf "$WORK"
}
trap cleanup EXIT
"$PWD/target/release/berth" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" --auth none \
  --log-level warn 2>>"$WORK/log" &
PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null && break; sleep 0.1; done

python3 - "$PORT" "$TAGS" "$REPOS" "$REQS" <<'PY'
import hashlib, http.client, json, statistics, sys, threading, time
port, tags, repos, reqs = (int(a) for a in sys.argv[1:5])

def connection():
    return http.client.HTTPConnection("127.0.0.1", port)

def blob(conn, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn.request("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", body=data,
                 headers={"content-type": "application/octet-stream"})
    r = conn.getresponse(); r.read()
    assert r.status == 201, r.status
    return digest, len(data)

def manifest(config, layer, note):
    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer[0], "size": layer[1]}],
        "annotations": {"n": note}}).encode()

def put(conn, repo, reference, body):
    conn.request("PUT", f"/v2/{repo}/manifests/{reference}", body=body,
                 headers={"content-type": "application/vnd.oci.image.manifest.v1+json"})
    r = conn.getresponse(); r.read()
    assert r.status == 201, (r.status, repo, reference)

def fill(worker, workers):
    conn = connection()
    config = blob(conn, "bench/big", json.dumps({"architecture": "amd64", "os": "linux"}).encode())
    layer = blob(conn, "bench/big", b"shared layer")
    for i in range(worker, tags, workers):
        put(conn, "bench/big", f"t{i:06d}", manifest(config, layer, str(i)))
    for i in range(worker, repos, workers):
        repo = f"bench/repo-{i:05d}"
        c = blob(conn, repo, json.dumps({"architecture": "amd64", "os": "linux", "r": i}).encode())
        l = blob(conn, repo, f"layer {i}".encode())
        put(conn, repo, "latest", manifest(c, l, repo))

started = time.time()
threads = [threading.Thread(target=fill, args=(w, 4)) for w in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(f"filled {tags} tags and {repos} repositories in {time.time() - started:.0f} s", file=sys.stderr)

conn = connection()
middle_tag, middle_repo = f"t{tags // 2:06d}", f"bench%2Frepo-{repos // 2:05d}"
conn.request("HEAD", f"/v2/bench/big/manifests/{middle_tag}", headers={"accept": "application/vnd.oci.image.manifest.v1+json"})
r = conn.getresponse(); r.read()
digest = r.getheader("docker-content-digest")
pages = [
    ("dashboard", "/"),
    ("project (first page)", "/ui/projects/bench"),
    ("project (a middle page)", f"/ui/projects/bench?last={middle_repo}"),
    ("repository (first page)", "/ui/repositories/bench/big"),
    ("repository (a middle page)", f"/ui/repositories/bench/big?last={middle_tag}"),
    ("repository (filtered)", "/ui/repositories/bench/big?q=t0999"),
    ("artifact", f"/ui/artifact?repository=bench%2Fbig&digest={digest}"),
    ("search", "/ui/search?q=repo-049"),
]
print(f"web UI page times, {tags} tags in one repository, {repos} repositories, {reqs} requests each:")
print(f"  {'page':28s} {'median':>9s} {'p95':>9s}  target p95 <= 50 ms")
for name, path in pages:
    times = []
    for _ in range(reqs):
        t = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse(); body = r.read()
        times.append((time.perf_counter() - t) * 1000)
        assert r.status == 200, (name, r.status)
    times.sort()
    p95 = times[int(len(times) * 0.95) - 1]
    verdict = "met" if p95 <= 50 else "NOT met"
    print(f"  {name:28s} {statistics.median(times):7.1f} ms {p95:7.1f} ms  {verdict}")
PY
