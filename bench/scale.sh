#!/usr/bin/env bash
# berth at production size, against the same measures on a small data set, in one run:
#
#   1. two data sets are generated straight into data directories (bench/scale-data.py):
#      small (SMALL_*: 10,000 blobs, 2,000 manifests, 1,000 tags in one repository, 1,000
#      repositories) and large (1,000,000 blobs, 200,000 manifests, 100,000 tags in one
#      repository, 20,000 repositories);
#   2. a release berth (embedded default, --auth none) is started on each and the data set
#      is checked through the API (every catalog name and big-repository tag, 200
#      manifests and their blobs pulled);
#   3. page times of the tag list and the catalog, first and middle page (REQS each);
#      manifest GET by digest at 64 connections over 1,000 manifests spread over the
#      repositories (wrk, DURATION seconds, REPS times: median); the process's peak RSS;
#   4. `berth check` on the large set (throughput of tiny blobs: per-file cost) and on
#      CHECK_MIB of large blobs beside `sha256sum` of the same files (the hashing rate);
#   5. every other manifest of the large set is deleted through the API and a collection
#      runs on the serving registry (`POST /api/v1/gc`) while a client pushes small images
#      one after another: the collection's time, and the pushes' latency beside it and
#      without it; a dry run (with --delete-untagged) before it, with pushes beside it too;
#   6. `berth gc` against Distribution's `garbage-collect` on the same content (GC_*:
#      100,000 blobs, 20,000 manifests; Distribution's layout takes ~5 files and
#      directories per blob: 20 GB at the large set's size), each on a fresh copy, GC_REPS
#      times (GC_REPS=1: on the generated data, no copy; for the full size).
#
# Environment: BLOBS MANIFESTS BIG_TAGS REPOS (the large set), REQS (200), DURATION (10),
# REPS (3), CHECK_MIB (1024), CHECK_REPS (3), PORT (5621), GC_BLOBS GC_MANIFESTS
# GC_BIG_TAGS GC_REPOS GC_REPS (3), PARTS (any of: measure check gc compare, all by
# default; or hash: only the large-blob check beside sha256sum and openssl, a few
# minutes), KEEP=1 keeps the work directory.
# Needs: cargo, python3, curl, wrk, sha256sum, openssl, docker-registry. Disk: about 5 GB for the large set.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
BLOBS=${BLOBS:-1000000}
MANIFESTS=${MANIFESTS:-200000}
BIG_TAGS=${BIG_TAGS:-100000}
REPOS=${REPOS:-20000}
REQS=${REQS:-200}
DURATION=${DURATION:-10}
REPS=${REPS:-3}
CHECK_MIB=${CHECK_MIB:-1024}
CHECK_REPS=${CHECK_REPS:-3}
PORT=${PORT:-5621}
GC_BLOBS=${GC_BLOBS:-100000}
GC_MANIFESTS=${GC_MANIFESTS:-20000}
GC_BIG_TAGS=${GC_BIG_TAGS:-10000}
GC_REPOS=${GC_REPOS:-2000}
GC_REPS=${GC_REPS:-3}
PARTS=${PARTS:-measure check gc compare}
want() { [[ " $PARTS " == *" $1 "* ]]; }
cargo build --release --locked --quiet -p berth
BERTH=$PWD/target/release/berth
WORK=$(mktemp -d "${TMPDIR:-/tmp}/berth-scale-bench.XXXXXX")
PID=
stop() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=; fi
}
cleanup() {
  stop
  if [ "${KEEP:-0}" = 1 ]; then echo "# kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

start() {
  "$BERTH" serve --listen "127.0.0.1:$PORT" --data-dir "$1" --auth none --log-level warn \
    2>>"$WORK/log" &
  PID=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null && return; sleep 0.1; done
  echo "berth did not start" >&2; exit 1
}

# make NAME BLOBS MANIFESTS BIG_TAGS REPOS: a data directory with a generated data set.
make_set() {
  local dir=$WORK/$1
  start "$dir"   # berth creates meta.db at its current schema
  stop
  log "generating $1: $2 blobs, $3 manifests, $4 tags in big/app, $5 repositories"
  python3 bench/scale-data.py "$dir" "$2" "$3" "$4" "$5" >"$WORK/$1.generated"
  cat "$WORK/$1.generated" >&2
}

# measure NAME REPOS BIG_TAGS: prints one JSON line of figures for the data set.
measure() {
  local dir=$WORK/$1
  start "$dir"
  log "$1: checking through the API"
  python3 bench/scale-measure.py verify "$PORT" "$2" "$3" >"$WORK/$1.verified"
  cat "$WORK/$1.verified" >&2
  log "$1: page times"
  python3 bench/scale-measure.py pages "$PORT" "$REQS" >"$WORK/$1.pages"
  python3 bench/scale-measure.py paths "$PORT" 1000 "$WORK/$1.paths"
  : >"$WORK/$1.wrk"
  for rep in $(seq "$REPS"); do
    log "$1: manifest GET, repetition $rep"
    WRK_PATHS=$WORK/$1.paths WRK_ACCEPT=application/vnd.oci.image.manifest.v1+json \
      wrk -t2 -c64 -d"${DURATION}s" -s bench/wrk-paths.lua "http://127.0.0.1:$PORT" \
      | grep WRKJSON | sed 's/^WRKJSON //' >>"$WORK/$1.wrk"
  done
  grep VmHWM "/proc/$PID/status" | awk '{print $2}' >"$WORK/$1.rss"
  stop
}

if want measure || want check || want gc; then
  make_set small "${SMALL_BLOBS:-10000}" "${SMALL_MANIFESTS:-2000}" "${SMALL_BIG_TAGS:-1000}" "${SMALL_REPOS:-1000}"
  make_set large "$BLOBS" "$MANIFESTS" "$BIG_TAGS" "$REPOS"
fi
if want measure; then
measure small "${SMALL_REPOS:-1000}" "${SMALL_BIG_TAGS:-1000}"
measure large "$REPOS" "$BIG_TAGS"
fi

if want check; then
log "berth check on the large set"
"$BERTH" check --data-dir "$WORK/large" --log-level warn 2>/dev/null \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({k: r[k] for k in ("blobs_verified","bytes_verified","seconds","bytes_per_second")}))' \
  >"$WORK/check-large"
fi

if want check || want hash; then
log "berth check on $CHECK_MIB MiB of large blobs, beside sha256sum and openssl"
start "$WORK/check"
python3 - "$PORT" "$CHECK_MIB" <<'PY'
import hashlib, http.client, os, sys
port, mib = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port)
each = 256
for i in range(max(1, mib // each)):
    data = os.urandom(each << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn.request("POST", f"/v2/check/blobs/uploads/?digest={digest}", body=data,
                 headers={"content-type": "application/octet-stream"})
    r = conn.getresponse(); r.read()
    assert r.status == 201, r.status
PY
stop
sync
# Pushed blobs are written past the page cache (O_DIRECT): read them once, untimed, so that
# all three hash the same cached bytes rather than the first one reading the disk.
find "$WORK/check/blobs" -type f -print0 | xargs -0 cat >/dev/null
rate() { echo "$(( CHECK_MIB * 1048576 * 1000000000 / ($2 - $1) ))"; }
for ((rep = 0; rep < CHECK_REPS; rep++)); do
  "$BERTH" check --data-dir "$WORK/check" --log-level warn 2>/dev/null \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["bytes_per_second"])' \
    >>"$WORK/check-rates"
  start_ns=$(date +%s%N)
  find "$WORK/check/blobs" -type f -print0 | xargs -0 sha256sum >/dev/null
  rate "$start_ns" "$(date +%s%N)" >>"$WORK/sha256sum-rates"
  # OpenSSL's SHA-256 uses the CPU's SHA extensions where coreutils' does not: the limit.
  start_ns=$(date +%s%N)
  find "$WORK/check/blobs" -type f -print0 | xargs -0 openssl dgst -sha256 >/dev/null
  rate "$start_ns" "$(date +%s%N)" >>"$WORK/openssl-rates"
  # One openssl per core, as berth check hashes one blob per core.
  start_ns=$(date +%s%N)
  find "$WORK/check/blobs" -type f -print0 | xargs -0 -n 1 -P "$(nproc)" openssl dgst -sha256 >/dev/null
  rate "$start_ns" "$(date +%s%N)" >>"$WORK/openssl-per-core-rates"
  log "check rep $rep: berth $(tail -1 "$WORK/check-rates"), sha256sum $(tail -1 "$WORK/sha256sum-rates"), openssl $(tail -1 "$WORK/openssl-rates"), openssl per core $(tail -1 "$WORK/openssl-per-core-rates") B/s"
done
fi

if want gc; then
log "collection at size: every other manifest of the large set deleted through the API"
start "$WORK/large"
python3 bench/scale-measure.py delete "$PORT" "$WORK/large.manifests" >"$WORK/deleted"
cat "$WORK/deleted" >&2
log "pushes with no collection running"
python3 bench/scale-measure.py pushes "$PORT" 10 "$WORK/pushes-idle"
# beside_pushes NAME QUERY: POST /api/v1/gc?QUERY while a client pushes small images one
# after another; the report in NAME-report, the wall time in NAME-ms, the pushes'
# latencies in pushes-NAME.
beside_pushes() {
  python3 bench/scale-measure.py pushes "$PORT" 900 "$WORK/pushes-$1" &
  local pusher=$!
  sleep 1
  local t0 t1
  t0=$(date +%s%N)
  curl -sf -X POST "http://127.0.0.1:$PORT/api/v1/gc?$2" >"$WORK/$1-report"
  t1=$(date +%s%N)
  sleep 1
  touch "$WORK/pushes-$1.stop"
  wait "$pusher"
  echo "$(( (t1 - t0) / 1000000 ))" >"$WORK/$1-ms"
}
# A dry run first: read from one snapshot, it must hold up no push however long it takes.
log "dry-run collection through the API beside pushes"
beside_pushes dry "dry_run=true&delete_untagged=true"
# Through the serving node's API, as the web UI and the schedule run it (`berth gc` from
# another process works too, but its SQLite writes then wait on the file lock's
# backoff instead of the node's write queue).
log "collection through the API beside pushes"
beside_pushes gc ""
stop
fi

# The collector against Distribution's on the same content: a GC_* sized set generated in
# both layouts, every other manifest deleted (through berth's API; Distribution's layout
# is written as its DELETE leaves it), each collector timed on a fresh copy GC_REPS times
# with its registry stopped (Distribution's requires it).
if want compare; then
log "collector comparison: generating $GC_BLOBS blobs for berth and Distribution"
mkdir -p "$WORK/dist"
write_registry_config "$WORK/dist" 5699
start "$WORK/gcset"
stop
python3 bench/scale-data.py "$WORK/gcset" "$GC_BLOBS" "$GC_MANIFESTS" "$GC_BIG_TAGS" "$GC_REPOS" \
  "$WORK/dist/data" >/dev/null
start "$WORK/gcset"
python3 bench/scale-measure.py delete "$PORT" "$WORK/gcset.manifests" >/dev/null
stop
# One repetition runs on the generated data itself: at full size (GC_* as large as the
# large set) Distribution's layout alone takes about 20 GB, too much to copy twice.
if [ "$GC_REPS" -gt 1 ]; then
  cp -a "$WORK/gcset" "$WORK/gcset.snapshot"
  cp -a "$WORK/dist/data" "$WORK/dist.snapshot"
fi
: >"$WORK/gc-compare"
for rep in $(seq "$GC_REPS"); do
  if [ "$GC_REPS" -gt 1 ]; then
    rm -rf "$WORK/gcset" "$WORK/dist/data"
    cp -a "$WORK/gcset.snapshot" "$WORK/gcset"
    cp -a "$WORK/dist.snapshot" "$WORK/dist/data"
  fi
  sync
  t0=$(date +%s%N)
  "$BERTH" gc --data-dir "$WORK/gcset" --log-level warn >"$WORK/gcset.report" 2>>"$WORK/log"
  t1=$(date +%s%N)
  docker-registry garbage-collect "$WORK/dist/config.yml" >"$WORK/dist-gc.log" 2>&1
  t2=$(date +%s%N)
  berth_removed=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["blobs_removed_count"])' "$WORK/gcset.report")
  dist_left=$(find "$WORK/dist/data/docker/registry/v2/blobs" -name data | wc -l)
  echo "$(( (t1 - t0) / 1000000 )) $(( (t2 - t1) / 1000000 )) $berth_removed $dist_left" >>"$WORK/gc-compare"
  log "collector repetition $rep: $(tail -1 "$WORK/gc-compare") (berth ms, Distribution ms, berth blobs removed, Distribution blobs left)"
done
fi

python3 - "$WORK" <<'PY'
import json, os, statistics, sys
work = sys.argv[1]
def load(name): return open(f"{work}/{name}").read()
def have(name): return os.path.exists(f"{work}/{name}")
def pct(values, q): return values[min(len(values) - 1, int(len(values) * q))]

if have("large.wrk"):
    sets = {}
    for name in ("small", "large"):
        runs = [json.loads(l) for l in load(f"{name}.wrk").splitlines() if l.strip()]
        sets[name] = {
            "gen": json.loads(load(f"{name}.generated")),
            "pages": json.loads(load(f"{name}.pages")),
            "rps": statistics.median(r["rps"] for r in runs),
            "rps_all": [round(r["rps"]) for r in runs],
            "p99_ms": statistics.median(r["p99_us"] for r in runs) / 1000,
            "non_200": sum(r["non_200"] for r in runs),
            "rss_mib": int(load(f"{name}.rss")) / 1024,
        }
    s, l = sets["small"], sets["large"]
    print(f"data sets: small {s['gen']['blobs']} blobs / {s['gen']['manifests']} manifests / "
          f"{s['gen']['repositories']} repositories; large {l['gen']['blobs']} / {l['gen']['manifests']} / "
          f"{l['gen']['repositories']} (generated in {l['gen']['seconds']} s)")
    print(f"{'page (median / p95 ms)':28} {'small':>16} {'large':>16} {'p95 ratio':>10}")
    for page in s["pages"]:
        a, b = s["pages"][page], l["pages"][page]
        print(f"{page:28} {a[0]:7.2f} / {a[1]:6.2f} {b[0]:7.2f} / {b[1]:6.2f} {b[1] / a[1]:9.2f}x")
    print(f"manifest GET by digest, 64 conns: small {s['rps']:.0f} req/s {s['rps_all']}, "
          f"large {l['rps']:.0f} req/s {l['rps_all']}: large/small {l['rps'] / s['rps']:.2f}x "
          f"(target >= 0.91); p99 {s['p99_ms']:.2f} / {l['p99_ms']:.2f} ms; non-200: {s['non_200'] + l['non_200']}")
    print(f"peak RSS: small {s['rss_mib']:.0f} MiB, large {l['rss_mib']:.0f} MiB (target <= 128)")

if have("check-large"):
    check_large = json.loads(load("check-large"))
    print(f"berth check, large set: {check_large['blobs_verified']} blobs in {check_large['seconds']} s "
          f"({check_large['blobs_verified'] / check_large['seconds']:.0f} blobs/s)")
if have("check-rates"):
    rates = {name: [int(x) for x in load(f"{name}-rates").split()]
             for name in ("check", "sha256sum", "openssl", "openssl-per-core")}
    med = lambda xs: sorted(xs)[len(xs) // 2]
    for limit in ("openssl", "openssl-per-core"):
        per_rep = [c / o for c, o in zip(rates["check"], rates[limit])]
        print(f"berth check, large blobs (page cache warm): {med(rates['check']) / 1e6:.0f} MB/s; {limit} "
              f"{med(rates[limit]) / 1e6:.0f} MB/s; per repetition {', '.join(f'{r:.2f}' for r in per_rep)}, "
              f"median {med(per_rep):.2f}x (target >= 0.8); sha256sum {med(rates['sha256sum']) / 1e6:.0f} MB/s")

if have("gc-ms"):
    gc = json.loads(load("gc-report"))
    deleted = json.loads(load("deleted"))
    idle = sorted(float(x) for x in load("pushes-idle").split())
    beside = sorted(float(x) for x in load("pushes-gc").split())
    print(f"collection after deleting {deleted['deleted']} manifests: {int(load('gc-ms')) / 1000:.1f} s wall "
          f"(mark {gc['mark_ms'] / 1000:.1f} s, sweep {gc['sweep_ms'] / 1000:.1f} s), "
          f"{gc['blobs_removed_count']} blobs removed (target <= 60 s)")
    print(f"pushes (blob + manifest): idle p50 {pct(idle, .5):.1f} / p99 {pct(idle, .99):.1f} / max {idle[-1]:.1f} ms "
          f"({len(idle)}); beside the collection p50 {pct(beside, .5):.1f} / p99 {pct(beside, .99):.1f} / "
          f"max {beside[-1]:.1f} ms ({len(beside)}) (target: p99 under 100 ms)")

if have("dry-ms"):
    dry = json.loads(load("dry-report"))
    beside = sorted(float(x) for x in load("pushes-dry").split())
    print(f"dry run (delete_untagged): {int(load('dry-ms')) / 1000:.1f} s wall, would remove "
          f"{dry['manifests_removed_count']} manifests and {dry['blobs_removed_count']} blobs; pushes beside it "
          f"p50 {pct(beside, .5):.1f} / p99 {pct(beside, .99):.1f} / max {beside[-1]:.1f} ms ({len(beside)})")

if have("gc-compare"):
    runs = [list(map(int, l.split())) for l in load("gc-compare").splitlines() if l.strip()]
    b, d = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    print(f"collector, same content in both ({runs[0][2]} blobs removed by berth, {runs[0][3]} left by "
          f"Distribution): berth {b / 1000:.1f} s, Distribution {d / 1000:.1f} s: {d / b:.1f}x "
          f"({[(r[0], r[1]) for r in runs]} ms)")
PY
