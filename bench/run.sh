#!/usr/bin/env bash
# The performance comparison: builds berth in release mode and measures it against Docker
# Distribution (Debian package `docker-registry`) and nginx serving Distribution's storage
# (the physical limit for the same bytes), alternating the targets inside every
# repetition. Prints JSON lines on stdout, a human summary on stderr, and a Markdown table
# of medians, min-max and ratios at the end (bench/report.py). The small images (`many`)
# run twice: from regbench.py's own threads, then from the compiled load generator
# (`crates/cli/examples/pushgen.rs`), which sends the same requests for a fraction of the CPU.
#
# Environment: SIZE (1GiB), CHUNK (16MiB), REPS (3), SECS (10), CONNS (64), IMAGES (200),
#   TAGS (10000), REPOS (5000), ONLY (subset of: push pull manifest head many tags catalog
#   start), DIST_PORT (5201), MIRROR_PORT (5202), BERTH_PORT (5210), KEEP=1.
# Needs: cargo, python3, curl, jq, wrk, ab (apache2-utils), nginx, docker-registry.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh

SIZE=${SIZE:-1GiB}
CHUNK=${CHUNK:-16MiB}
REPS=${REPS:-3}
SECS=${SECS:-10}
CONNS=${CONNS:-64}
IMAGES=${IMAGES:-200}
TAGS=${TAGS:-10000}
REPOS=${REPOS:-5000}
DIST_PORT=${DIST_PORT:-5201}
MIRROR_PORT=${MIRROR_PORT:-5202}
BERTH_PORT=${BERTH_PORT:-5210}
ONLY=${ONLY:-start push pull manifest head many tags catalog}
WORK=$(mktemp -d "${TMPDIR_BASE:-/tmp}/berth-bench.XXXXXX")
OUT=${OUT:-$WORK/results.jsonl}
STATUS=0
cleanup() {
  stop_started
  [ "${KEEP:-0}" = 1 ] && log "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --quiet -p berth --bin berth --example pushgen || exit 1
BERTH=$PWD/target/release/berth
# The compiled load generator for the small images: the Python client took about a third
# of the machine during berth's runs, as wrk and ab stand in for Python on the reads.
PUSHGEN=$PWD/target/release/examples/pushgen

write_registry_config "$WORK" "$DIST_PORT"
start_registry "$WORK" "$DIST_PORT" || exit 1
DIST_PID=$REG_PID
mkdir -p "$WORK/nginx/www"
write_nginx_config "$WORK/nginx" "$MIRROR_PORT" "$WORK/nginx/www" "$WORK/data"
start_nginx "$WORK/nginx" "$MIRROR_PORT" || exit 1

want() { [[ " $ONLY " == *" $1 "* ]]; }

# Cold start: time from exec to the first 200 of GET /v2/ on an empty data directory.
if want start; then
  for ((i = 0; i < REPS; i++)); do
    dir=$WORK/cold-$i
    python3 - "$BERTH" "$dir" "$BERTH_PORT" "$i" <<'PY' | tee -a "$OUT"
import json, subprocess, sys, time, urllib.request
berth, data, port, rep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
p = subprocess.Popen([berth, "serve", "--auth", "none", "--listen", f"127.0.0.1:{port}", "--data-dir", data, "--log-level", "warn"])
while True:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).status == 200:
            break
    except OSError:
        time.sleep(0.001)
ms = (time.perf_counter() - t0) * 1000
p.terminate(); p.wait()
print(json.dumps({"kind": "rep", "bench": "cold-start", "label": "berth", "rep": rep, "ms": round(ms, 1)}))
print(f"cold start rep {rep}: {ms:.1f} ms", file=sys.stderr)
PY
  done
fi

port_free "$BERTH_PORT" || { echo "port $BERTH_PORT is busy" >&2; exit 1; }
"$BERTH" serve --auth none --listen "127.0.0.1:$BERTH_PORT" --data-dir "$WORK/berth-data" --log-level warn >>"$WORK/berth.log" 2>&1 &
BERTH_PID=$!
STARTED_PIDS+=("$BERTH_PID")
wait_http "http://127.0.0.1:$BERTH_PORT/v2/" || exit 1
D="http://127.0.0.1:$DIST_PORT"
B="http://127.0.0.1:$BERTH_PORT"
M="http://127.0.0.1:$MIRROR_PORT"
log "berth pid $BERTH_PID at $B, distribution pid $DIST_PID at $D, nginx mirror at $M; $(uptime)"

rb() {
  local sub=$1
  shift
  log "regbench $sub $*"
  $REGBENCH "$sub" --url "$D" --label distribution --pid "$DIST_PID" \
    --url "$B" --label berth --pid "$BERTH_PID" --reps "$REPS" "$@" | tee -a "$OUT" || STATUS=1
}

# The hashing limit: OpenSSL's SHA-256 (SHA-NI) over the benchmark's own blob file, in
# page cache. A push cannot beat it; the report divides the push rates by it.
if want push; then
  size_bytes=$(python3 -c "import sys; sys.path.insert(0, 'bench'); import regbench; print(regbench.parse_size('$SIZE'))")
  blob_file="${REGBENCH_CACHE:-/tmp/regbench-cache}/blob-$size_bytes.bin"
  python3 -c "import sys; sys.path.insert(0, 'bench'); import regbench; regbench.BigBlob($size_bytes)" || exit 1
  for ((i = 0; i < REPS; i++)); do
    $REGBENCH timecmd --name sha256sum --label openssl-sha-ni --rep "$i" --bytes "$size_bytes" \
      -- openssl dgst -sha256 "$blob_file" | tee -a "$OUT" || STATUS=1
  done
fi
want push && rb push-blob --size "$SIZE" --dav "$M/dav/"
want push && rb push-blob --size "$SIZE" --chunked "$CHUNK" --dav "$M/dav/"
want pull && rb pull-blob --size "$SIZE" --parallel 1,4,16 --mirror "$M"
want manifest && rb manifest-rps --conns "$CONNS" --secs "$SECS" --mirror "$M"
want manifest && rb manifest-rps --conns "$CONNS" --secs "$SECS" --by-digest --mirror "$M"
want head && rb head-blob-rps --conns "$CONNS" --secs "$SECS" --mirror "$M"
want many && rb push-image-many --images "$IMAGES" --layers 5 --concurrency 8
want many && rb push-image-many --images "$IMAGES" --layers 5 --concurrency 8 --pusher "$PUSHGEN"
want tags && rb tags-list --tags "$TAGS"
want catalog && rb catalog --repos "$REPOS"

log "berth RSS now $(grep VmRSS /proc/$BERTH_PID/status | awk '{print $2}') KiB, peak $(grep VmHWM /proc/$BERTH_PID/status | awk '{print $2}') KiB"
python3 bench/report.py "$OUT" 2>/dev/null || true
[ "${KEEP:-0}" = 1 ] && cp "$OUT" "$WORK/results-copy.jsonl"
log "bench done (status $STATUS); $(uptime)"
exit $STATUS
