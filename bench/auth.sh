#!/usr/bin/env bash
# What access control costs: berth with `--auth none` beside berth with `--auth builtin`,
# read as docker reads after a login (bearer tokens, pulls audited), alternated inside
# every repetition (bench/auth.py). Prints JSON lines and a Markdown table of ratios.
#
# Environment: REPS (3), SECS (10), NONE_PORT (5230), BUILTIN_PORT (5231),
#   AUDIT_PULLS (true; false: the builtin berth records no pulls), KEEP=1.
# Needs: cargo, python3, curl, wrk, ab (apache2-utils).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh

REPS=${REPS:-3}
SECS=${SECS:-10}
NONE_PORT=${NONE_PORT:-5230}
BUILTIN_PORT=${BUILTIN_PORT:-5231}
AUDIT_PULLS=${AUDIT_PULLS:-true}
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
STARTED_PIDS+=("$!")
printf '[auth]\naudit_pulls = %s\n' "$AUDIT_PULLS" >"$WORK/builtin.toml"
BERTH_ADMIN_PASSWORD=$PASSWORD "$BERTH" serve --config "$WORK/builtin.toml" --auth builtin --listen "127.0.0.1:$BUILTIN_PORT" \
  --data-dir "$WORK/builtin" --log-level warn >>"$WORK/builtin.log" 2>&1 &
STARTED_PIDS+=("$!")
wait_http "http://127.0.0.1:$NONE_PORT/v2/" || exit 1
wait_http "http://127.0.0.1:$BUILTIN_PORT/healthz" || exit 1
log "auth bench: --auth none at :$NONE_PORT, --auth builtin at :$BUILTIN_PORT (audit_pulls $AUDIT_PULLS); $(uptime)"
python3 bench/auth.py --none "http://127.0.0.1:$NONE_PORT" --builtin "http://127.0.0.1:$BUILTIN_PORT" \
  --password "$PASSWORD" --reps "$REPS" --secs "$SECS"
STATUS=$?
log "auth bench done (status $STATUS); $(uptime)"
exit $STATUS
