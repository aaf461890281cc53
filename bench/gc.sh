#!/usr/bin/env bash
# Garbage-collection benchmark: berth's `berth gc` against Docker Distribution's
# `docker-registry garbage-collect` on the same content, in one run.
#
#   1. push $IMAGES images (shared base-layer sets + unique layers and config) into
#      $GC_REPOS repositories of each registry, with the same seed, then DELETE half of
#      the manifests by digest through the API (bench/regbench.py gc-populate);
#   2. stop both and snapshot their storage;
#   3. $REPS times, alternating: restore each snapshot and time its collector
#      (Distribution's needs the registry stopped; berth's does not, but is timed the same
#      way for a like-for-like comparison);
#   4. start each registry on its collected storage and check that every kept image pulls
#      completely and no garbage is served (regbench gc-verify);
#   5. print medians and the ratio.
#
# Needs: cargo, python3, curl, jq, docker-registry (Debian package). Environment: IMAGES
# (2000), GC_REPOS (20), REPS (3), DIST_PORT (5203), BERTH_PORT (5213), KEEP=1 keeps the
# work directory.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh

IMAGES=${IMAGES:-2000}
GC_REPOS=${GC_REPOS:-20}
REPS=${REPS:-3}
DIST_PORT=${DIST_PORT:-5203}
BERTH_PORT=${BERTH_PORT:-5213}
WORK=$(mktemp -d "${TMPDIR_BASE:-/tmp}/berth-gc-bench.XXXXXX")
STATUS=0
cleanup() {
  stop_started
  [ "${KEEP:-0}" = 1 ] && log "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --quiet -p berth || exit 1
BERTH=$PWD/target/release/berth
DIST=$WORK/dist
BERTHW=$WORK/berth
mkdir -p "$DIST" "$BERTHW"

start_berth() {
  port_free "$BERTH_PORT" || { echo "port $BERTH_PORT is busy" >&2; return 1; }
  "$BERTH" serve --auth none --listen "127.0.0.1:$BERTH_PORT" --data-dir "$BERTHW/data" --log-level warn \
    >>"$BERTHW/berth.log" 2>&1 &
  BERTH_PID=$!
  STARTED_PIDS+=("$BERTH_PID")
  wait_http "http://127.0.0.1:$BERTH_PORT/v2/" || return 1
}
count_files() { find "$1" -type f -name data 2>/dev/null | wc -l; }
bytes_of() { du -sb "$1" 2>/dev/null | cut -f1; }

# 1-2: populate both with the same content, then stop and snapshot.
write_registry_config "$DIST" "$DIST_PORT"
start_registry "$DIST" "$DIST_PORT" || exit 1
$REGBENCH gc-populate --url "http://127.0.0.1:$DIST_PORT" --label distribution --pid "$REG_PID" \
  --images "$IMAGES" --repos "$GC_REPOS" --state "$DIST/state.json" || exit 1
stop_pid "$REG_PID"
start_berth || exit 1
$REGBENCH gc-populate --url "http://127.0.0.1:$BERTH_PORT" --label berth --pid "$BERTH_PID" \
  --images "$IMAGES" --repos "$GC_REPOS" --state "$BERTHW/state.json" || exit 1
stop_pid "$BERTH_PID"
STARTED_PIDS=()
cp -a "$DIST/data" "$DIST/snapshot"
cp -a "$BERTHW/data" "$BERTHW/snapshot"
DIST_BLOBS=$DIST/data/docker/registry/v2/blobs
BERTH_BLOBS=$BERTHW/data/blobs
DIST_BEFORE=$(count_files "$DIST_BLOBS")
BERTH_BEFORE=$(count_files "$BERTH_BLOBS")
log "populated: distribution $DIST_BEFORE blob files (manifests included), berth $BERTH_BEFORE blob files (manifests live in meta.db)"

# 3: time each collector on fresh copies, alternating.
RESULTS=$WORK/results.jsonl
for ((i = 0; i < REPS; i++)); do
  for who in distribution berth; do
    if [ "$who" = distribution ]; then
      dir=$DIST; blobs=$DIST_BLOBS; before=$DIST_BEFORE
      cmd=(docker-registry garbage-collect "$DIST/config.yml")
    else
      dir=$BERTHW; blobs=$BERTH_BLOBS; before=$BERTH_BEFORE
      cmd=("$BERTH" gc --data-dir "$BERTHW/data" --blob-grace-secs 0 --log-level warn)
    fi
    rm -rf "$dir/data"
    cp -a "$dir/snapshot" "$dir/data"
    sync -f "$WORK"
    bytes_before=$(bytes_of "$blobs")
    rec=$($REGBENCH timecmd --name gc --label "$who" --rep "$i" --log "$dir/gc-$i.log" -- "${cmd[@]}") || STATUS=1
    after=$(count_files "$blobs")
    echo "$rec" | jq -c --argjson before "$before" --argjson after "$after" \
      --argjson freed "$((bytes_before - $(bytes_of "$blobs")))" --argjson images "$IMAGES" \
      '. + {images: $images, blobs_before: $before, blobs_after: $after, blob_files_removed: ($before - $after), bytes_freed: $freed}' \
      | tee -a "$RESULTS"
    log "gc $who rep $i: removed $((before - after)) of $before blob files"
  done
done

# 4: both registries serve exactly what they should after collection.
start_registry "$DIST" "$DIST_PORT" || exit 1
$REGBENCH gc-verify --url "http://127.0.0.1:$DIST_PORT" --label distribution --state "$DIST/state.json" --mode plain || STATUS=1
stop_pid "$REG_PID"
start_berth || exit 1
$REGBENCH gc-verify --url "http://127.0.0.1:$BERTH_PORT" --label berth --state "$BERTHW/state.json" --mode plain || STATUS=1
stop_pid "$BERTH_PID"
STARTED_PIDS=()

# 5: summary.
python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def pick(label, key):
    return [r[key] for r in rows if r.get("label") == label]
wall_key = "wall_s" if "wall_s" in rows[0] else next(k for k in rows[0] if k.startswith("wall"))
d, b = pick("distribution", wall_key), pick("berth", wall_key)
print(f"\n{'collector':<14}{'median s':>10}{'min s':>9}{'max s':>9}{'blob files removed':>20}{'bytes freed':>14}")
for label, walls in (("distribution", d), ("berth", b)):
    removed = pick(label, "blob_files_removed")[0]
    freed = pick(label, "bytes_freed")[0]
    print(f"{label:<14}{statistics.median(walls):>10.3f}{min(walls):>9.3f}{max(walls):>9.3f}{removed:>20}{freed:>14}")
print(f"\nberth is {statistics.median(d) / statistics.median(b):.1f}x faster (median over {len(b)} repetitions, "
      f"{rows[0]['images']} images); Distribution's count includes the deleted manifests' own blobs, "
      "berth keeps manifests in its metadata and removed those at DELETE time.")
PY
log "gc bench done (status $STATUS); $(uptime)"
exit $STATUS
