#!/usr/bin/env bash
# A/B: the berth of one revision (B, default HEAD) against another's (BASE, default B's
# parent), both running side by side and measured alternately inside every repetition,
# so that a change's effect is not confused with the machine's noise. Each is built from
# a clean checkout of its revision (uncommitted changes take no part). Prints regbench's
# JSON lines on stdout, its ratios of B to A included, and a Markdown table at the end
# (bench/report.py).
#
# Environment: B (HEAD), BASE (B~1), REPS (5), SECS (10), CONNS (64), IMAGES (200), TAGS (10000),
#   REPOS (5000), SIZE (1GiB), ONLY (subset of: manifest head many tags catalog push pull),
#   A_PORT (5220), B_PORT (5221), KEEP=1.
# Needs: cargo, git, python3, curl, wrk, ab (apache2-utils).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh

B=${B:-HEAD}
BASE=${BASE:-$B~1}
REPS=${REPS:-5}
SECS=${SECS:-10}
CONNS=${CONNS:-64}
IMAGES=${IMAGES:-200}
TAGS=${TAGS:-10000}
REPOS=${REPOS:-5000}
SIZE=${SIZE:-1GiB}
A_PORT=${A_PORT:-5220}
B_PORT=${B_PORT:-5221}
ONLY=${ONLY:-manifest head many tags catalog push pull}
WORK=$(mktemp -d "${TMPDIR_BASE:-/tmp}/berth-ab.XXXXXX")
OUT=${OUT:-$WORK/results.jsonl}
STATUS=0
two_revisions

start_berth() { # binary port name
  port_free "$2" || { echo "port $2 is busy" >&2; exit 1; }
  "$1" serve --auth none --listen "127.0.0.1:$2" --data-dir "$WORK/$3-data" --log-level warn \
    >>"$WORK/$3.log" 2>&1 &
  STARTED_PIDS+=("$!")
  wait_http "http://127.0.0.1:$2/v2/" || exit 1
}
start_berth "$WORK/berth-a" "$A_PORT" a
A_PID=${STARTED_PIDS[-1]}
start_berth "$WORK/berth-b" "$B_PORT" b
B_PID=${STARTED_PIDS[-1]}
log "A = $base_rev (pid $A_PID), B = $b_rev (pid $B_PID); $(uptime)"

want() { [[ " $ONLY " == *" $1 "* ]]; }
rb() {
  local sub=$1
  shift
  log "regbench $sub $*"
  $REGBENCH "$sub" --url "http://127.0.0.1:$A_PORT" --label "A-$base_rev" --pid "$A_PID" \
    --url "http://127.0.0.1:$B_PORT" --label "B-$b_rev" --pid "$B_PID" --reps "$REPS" "$@" |
    tee -a "$OUT" || STATUS=1
}

want manifest && rb manifest-rps --conns "$CONNS" --secs "$SECS"
want manifest && rb manifest-rps --conns "$CONNS" --secs "$SECS" --by-digest
want head && rb head-blob-rps --conns "$CONNS" --secs "$SECS"
want many && rb push-image-many --images "$IMAGES" --layers 5 --concurrency 8
want tags && rb tags-list --tags "$TAGS"
want catalog && rb catalog --repos "$REPOS"
want push && rb push-blob --size "$SIZE"
want pull && rb pull-blob --size "$SIZE" --parallel 1,4

python3 bench/report.py "$OUT" 2>/dev/null || true
log "A/B done (status $STATUS); $(uptime)"
exit $STATUS
