#!/usr/bin/env bash
# What access control costs: berth with `--auth none` beside berth with `--auth builtin`,
# used as docker uses it after a login (bearer tokens, pulls audited), alternated inside
# every repetition. Reads by bench/auth.py (JSON lines and a Markdown table of ratios);
# then pushes by bench/regbench.py with `--login` (1 GiB monolithic and in 16 MiB chunks,
# 200 small images from 8 clients), whose ratio lines read builtin / none.
#
# Environment: REPS (3), SECS (10), NONE_PORT (5230), BUILTIN_PORT (5231),
#   AUDIT_PULLS (true; false: the builtin berth records no pulls),
#   ONLY (subset of: reads pushes; default both), SIZE (1GiB), CHUNK (16MiB),
#   IMAGES (200), KEEP=1.
# Needs: cargo, python3, curl, wrk, ab (apache2-utils).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh

REPS=${REPS:-3}
SECS=${SECS:-10}
NONE_PORT=${NONE_PORT:-5230}
BUILTIN_PORT=${BUILTIN_PORT:-5231}
AUDIT_PULLS=${AUDIT_PULLS:-true}
ONLY=${ONLY:-reads pushes}
SIZE=${SIZE:-1GiB}
CHUNK=${CHUNK:-16MiB}
IMAGES=${IMAGES:-200}
WORK=$(mktemp -d "${TMPDIR_BASE:-/tmp}/berth-auth.XXXXXX")
cleanup() {
  stop_started
  [ "${KEEP:-0}" = 1 ] && log "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
for port in "$NONE_PORT" "$BUILTIN_PORT"; do
  port_free "$port" || { echo "port $port is busy" >&2; exit 1; }
done

cargo build --release --quiet -p berth || exit 1
BERTH=$PWD/target/release/berth
PASSWORD=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')

"$BERTH" serve --auth none --listen "127.0.0.1:$NONE_PORT" --data-dir "$WORK/none" \
  --log-level warn >>"$WORK/none.log" 2>&1 &
NONE_PID=$!
STARTED_PIDS+=("$NONE_PID")
printf '[auth]\naudit_pulls = %s\n' "$AUDIT_PULLS" >"$WORK/builtin.toml"
BERTH_ADMIN_PASSWORD=$PASSWORD "$BERTH" serve --config "$WORK/builtin.toml" --auth builtin --listen "127.0.0.1:$BUILTIN_PORT" \
  --data-dir "$WORK/builtin" --log-level warn >>"$WORK/builtin.log" 2>&1 &
BUILTIN_PID=$!
STARTED_PIDS+=("$BUILTIN_PID")
wait_http "http://127.0.0.1:$NONE_PORT/v2/" || exit 1
wait_http "http://127.0.0.1:$BUILTIN_PORT/healthz" || exit 1
log "auth bench: --auth none at :$NONE_PORT, --auth builtin at :$BUILTIN_PORT (audit_pulls $AUDIT_PULLS); $(uptime)"
STATUS=0
want() { [[ " $ONLY " == *" $1 "* ]]; }
if want reads; then
  python3 bench/auth.py --none "http://127.0.0.1:$NONE_PORT" --builtin "http://127.0.0.1:$BUILTIN_PORT" \
    --password "$PASSWORD" --reps "$REPS" --secs "$SECS" || STATUS=1
fi
push() {
  log "regbench $*"
  python3 bench/regbench.py "$@" --reps "$REPS" \
    --url "http://127.0.0.1:$NONE_PORT" --label none --pid "$NONE_PID" --login - \
    --url "http://127.0.0.1:$BUILTIN_PORT" --label builtin --pid "$BUILTIN_PID" \
    --login "admin:$PASSWORD" || STATUS=1
}
if want pushes; then
  push push-blob --size "$SIZE"
  push push-blob --size "$SIZE" --chunked "$CHUNK"
  push push-image-many --images "$IMAGES" --layers 5 --concurrency 8
fi
log "auth bench done (status $STATUS); $(uptime)"
exit $STATUS
