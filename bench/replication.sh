#!/usr/bin/env bash
# Replication against `skopeo sync`, side by side in one run: a berth source holds SMALL
# small images (one repository, a tag each: a config and a 16 KiB layer of their own) and
# one image with a BIG layer of random bytes. Each repetition replicates the whole set to
# a fresh, empty berth with a push policy (timed from the API call to the execution's
# end), and copies it to another fresh berth with `skopeo sync` (both repositories, every
# tag). Then a policy with a bandwidth limit replicates the big image again, and the rate
# it kept is compared with the limit. Prints medians and the ratio berth / skopeo (below
# 1: berth is faster).
#
# Environment: SMALL (200), BIG (1GiB), REPS (3), LIMIT (67108864 bytes/s), PORTS
#   5501-5503.
# Needs: cargo, curl, python3, skopeo.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=${SMALL:-200}
BIG=${BIG:-1GiB}
REPS=${REPS:-3}
LIMIT=${LIMIT:-67108864}
SRC=5501
DST=5502
cargo build --release --locked --quiet -p berth
BERTH=$PWD/target/release/berth
WORK=$(mktemp -d "${TMPDIR:-/tmp}/berth-replication-bench.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
printf '[outbound]\nallow_cidrs = ["127.0.0.0/8"]\n' > "$WORK/berth.toml"
LAST_PID=
start() { # port data-dir
  "$BERTH" serve --listen "127.0.0.1:$1" --data-dir "$2" --auth none --log-level warn \
    --config "$WORK/berth.toml" 2>>"$WORK/log" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$1/v2/" >/dev/null && return 0; sleep 0.1; done
  echo "berth on $1 did not start" >&2; exit 1
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

start "$SRC" "$WORK/source"
echo "filling the source: $SMALL small images and one $BIG layer" >&2
python3 - "$SRC" "$SMALL" <<'PY'
import hashlib, http.client, json, os, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port)
def blob(repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn.request("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", body=data,
                 headers={"content-type": "application/octet-stream"})
    r = conn.getresponse(); r.read()
    assert r.status == 201, r.status
    return digest, len(data)
for i in range(count):
    config = blob("bench/small", json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode())
    layer = blob("bench/small", os.urandom(16 * 1024))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer[0], "size": layer[1]}]}).encode()
    conn.request("PUT", f"/v2/bench/small/manifests/t{i}", body=manifest,
                 headers={"content-type": "application/vnd.oci.image.manifest.v1+json"})
    r = conn.getresponse(); r.read()
    assert r.status == 201, r.status
PY
bytes=$(numfmt --from=iec-i "${BIG%B}")
head -c "$bytes" /dev/urandom > "$WORK/big.bin"
push_file() { # repo file -> digest
  local digest="sha256:$(sha256sum "$2" | cut -d' ' -f1)"
  curl -sf -o /dev/null -X POST -H 'content-type: application/octet-stream' -T "$2" \
    "http://127.0.0.1:$SRC/v2/$1/blobs/uploads?digest=$digest"  # no slash: -T would append the file name
  echo "$digest"
}
layer=$(push_file bench/big "$WORK/big.bin")
printf '{"architecture":"amd64","os":"linux"}' > "$WORK/config.json"
config=$(push_file bench/big "$WORK/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
  "$config" "$(stat -c %s "$WORK/config.json")" "$layer" "$bytes" > "$WORK/manifest.json"
curl -sf -o /dev/null -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' \
  --data-binary "@$WORK/manifest.json" "http://127.0.0.1:$SRC/v2/bench/big/manifests/v1"
rm -f "$WORK/big.bin"

api() { curl -sf -H 'content-type: application/json' "$@"; }
now() { date +%s.%N; }
# Waits for the newest execution of a policy to end; prints it.
wait_run() {
  for _ in $(seq 6000); do
    run=$(api "http://127.0.0.1:$SRC/api/v1/replication/policies/$1/executions?n=1")
    if ! echo "$run" | grep -q '"status":"running"'; then echo "$run"; return 0; fi
    sleep 0.05
  done
  echo "the run of $1 did not end" >&2; exit 1
}
api -o /dev/null -X POST "http://127.0.0.1:$SRC/api/v1/registries" \
  -d "{\"name\":\"dst\",\"url\":\"http://127.0.0.1:$DST\"}"
api -o /dev/null -X POST "http://127.0.0.1:$SRC/api/v1/replication/policies" \
  -d '{"name":"all","direction":"push","registry":"dst","source":"bench/**","concurrency":8}'

: > "$WORK/results"
for rep in $(seq "$REPS"); do
  rm -rf "$WORK/dst"; start "$DST" "$WORK/dst"; pid=$LAST_PID
  t0=$(now)
  api -o /dev/null -X POST "http://127.0.0.1:$SRC/api/v1/replication/policies/all/executions"
  run=$(wait_run all)
  t1=$(now)
  echo "$run" | python3 -c "import json,sys; r=json.load(sys.stdin)[0]; assert r['status']=='succeeded' and r['succeeded']==r['total'], r" \
    || { echo "berth's run failed: $run" >&2; exit 1; }
  echo "berth $(python3 -c "print($t1 - $t0)")" >> "$WORK/results"
  stop "$pid"

  rm -rf "$WORK/dst"; start "$DST" "$WORK/dst"; pid=$LAST_PID
  t0=$(now)
  for repo in bench/small bench/big; do
    # Into <dest>/<last path component>: bench/small and bench/big, as berth's copies.
    skopeo sync --src docker --dest docker --src-tls-verify=false --dest-tls-verify=false \
      "127.0.0.1:$SRC/$repo" "127.0.0.1:$DST/bench" >/dev/null 2>>"$WORK/log"
  done
  t1=$(now)
  echo "skopeo $(python3 -c "print($t1 - $t0)")" >> "$WORK/results"
  stop "$pid"
done

# The bandwidth limit: the big image alone, at LIMIT bytes per second.
rm -rf "$WORK/dst"; start "$DST" "$WORK/dst"; pid=$LAST_PID
api -o /dev/null -X POST "http://127.0.0.1:$SRC/api/v1/replication/policies" \
  -d "{\"name\":\"limited\",\"direction\":\"push\",\"registry\":\"dst\",\"source\":\"bench/big\",\"bandwidth_bytes_per_sec\":$LIMIT}"
t0=$(now)
api -o /dev/null -X POST "http://127.0.0.1:$SRC/api/v1/replication/policies/limited/executions"
run=$(wait_run limited)
t1=$(now)
stop "$pid"

python3 - "$WORK/results" "$SMALL" "$BIG" "$LIMIT" "$bytes" "$t0" "$t1" "$run" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    who, seconds = line.split()
    rows.setdefault(who, []).append(float(seconds))
berth, skopeo = statistics.median(rows["berth"]), statistics.median(rows["skopeo"])
print(f"replicating {sys.argv[2]} small images and one {sys.argv[3]} image to an empty berth, medians of {len(rows['berth'])}:")
print(f"  berth push policy   {berth:7.2f} s")
print(f"  skopeo sync         {skopeo:7.2f} s")
print(f"  berth / skopeo      {berth / skopeo:7.2f}")
limit, size = int(sys.argv[4]), int(sys.argv[5])
run = json.loads(sys.argv[8])[0]
task = run["tasks"][0]
rate = size / (task["duration_ms"] / 1000)
print(f"  bandwidth limit {limit / 1e6:.1f} MB/s: the task moved {task['bytes']} bytes in {task['duration_ms'] / 1000:.2f} s"
      f" = {rate / 1e6:.1f} MB/s ({(rate / limit - 1) * 100:+.1f} %)")
PY
