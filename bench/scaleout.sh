#!/usr/bin/env bash
# berth on its scale-out backends (blobs in S3 on a local Garage, metadata in a local
# PostgreSQL) beside berth on its embedded default (file system + SQLite), measured
# through the public API by the same harness, targets alternated inside every repetition:
# push and pull throughput and manifest requests per second. A third berth shares the
# scale-out backends with `redirect = true`. The limits measured in the same run: the same
# file written to the same bucket by an S3 client (rclone), and the redirected blob pulled
# straight from its pre-signed URL. All berths run with `--auth none`, as in bench/run.sh.
# Prints JSON lines and a Markdown table at the end.
#
# Last, a rolling restart: two nodes behind nginx, one restarted after the other under a
# push/pull mix (bench/rolling.py), which counts every request answered wrongly or not at
# all and pulls every acknowledged image again at the end.
#
# Environment: SIZE (1GiB), CHUNK (16MiB), REPS (3), SECS (10), CONNS (64), ONLY (subset
#   of: push chunked pull manifest rolling), EMBEDDED_PORT (5220), SCALEOUT_PORT (5221),
#   REDIRECT_PORT (5222), SECOND_PORT (5223), ROLL_PORT (5224), ROLL_SECS (30),
#   ROLL_WORKERS (4), KEEP=1.
# Needs: cargo, python3, curl, wrk, rclone, nginx, the postgresql package and garage
#   (`cargo install garage --version 2.5.0 --locked`).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh

SIZE=${SIZE:-1GiB}
CHUNK=${CHUNK:-16MiB}
REPS=${REPS:-3}
SECS=${SECS:-10}
CONNS=${CONNS:-64}
EMBEDDED_PORT=${EMBEDDED_PORT:-5220}
SCALEOUT_PORT=${SCALEOUT_PORT:-5221}
REDIRECT_PORT=${REDIRECT_PORT:-5222}
SECOND_PORT=${SECOND_PORT:-5223}
ROLL_PORT=${ROLL_PORT:-5224}
ROLL_SECS=${ROLL_SECS:-30}
ROLL_WORKERS=${ROLL_WORKERS:-4}
ONLY=${ONLY:-push chunked pull manifest rolling}
WORK=$(mktemp -d "${TMPDIR_BASE:-/tmp}/berth-scaleout.XXXXXX")
OUT=${OUT:-$WORK/results.jsonl}
STATUS=0
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
GARAGE=$(command -v garage || echo "${CARGO_HOME:-$HOME/.cargo}/bin/garage")
AS_PG=()
[ "$(id -u)" = 0 ] && AS_PG=(runuser -u postgres --)

cleanup() {
  stop_started
  [ -n "${PG_BIN:-}" ] && [ -d "$WORK/pg/data" ] &&
    "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -m fast -w stop >/dev/null 2>&1
  [ "${KEEP:-0}" = 1 ] && log "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$PG_BIN/initdb" ] || { echo "PostgreSQL server binaries not found" >&2; exit 1; }
[ -x "$GARAGE" ] || { echo "garage not found" >&2; exit 1; }
command -v rclone >/dev/null || { echo "rclone not found" >&2; exit 1; }
for port in "$EMBEDDED_PORT" "$SCALEOUT_PORT" "$REDIRECT_PORT"; do
  port_free "$port" || { echo "port $port is busy" >&2; exit 1; }
done

cargo build --release --quiet -p berth || exit 1
BERTH=$PWD/target/release/berth

# PostgreSQL: a throwaway cluster on a Unix socket in $WORK/pg (durable settings, as a
# real deployment would run it).
chmod 755 "$WORK"
mkdir -p "$WORK/pg"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$WORK/pg"
"${AS_PG[@]}" "$PG_BIN/initdb" --auth=trust --username=postgres --locale=C -D "$WORK/pg/data" >/dev/null || exit 1
"${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
  -o "-k $WORK/pg -c listen_addresses=" start >/dev/null || exit 1
PG_URL="host=$WORK/pg user=postgres dbname=postgres"

# Garage: one node, one bucket, one key.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
S3_PORT=$(free_port) RPC_PORT=$(free_port) ADMIN_PORT=$(free_port)
mkdir -p "$WORK/garage"
cat >"$WORK/garage/garage.toml" <<EOF
metadata_dir = "$WORK/garage/meta"
data_dir = "$WORK/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
EOF
export GARAGE_DEFAULT_ACCESS_KEY="GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export GARAGE_DEFAULT_SECRET_KEY="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export GARAGE_DEFAULT_BUCKET=berth-bench
"$GARAGE" -c "$WORK/garage/garage.toml" server --single-node --default-bucket >"$WORK/garage/log" 2>&1 &
STARTED_PIDS+=("$!")
wait_http "http://127.0.0.1:$ADMIN_PORT/health" 60 || exit 1

"$BERTH" serve --auth none --listen "127.0.0.1:$EMBEDDED_PORT" --data-dir "$WORK/embedded" \
  --log-level warn >>"$WORK/embedded.log" 2>&1 &
EMBEDDED_PID=$!
STARTED_PIDS+=("$EMBEDDED_PID")
# start_node NAME PORT [CONFIG]: a berth on the scale-out backends; sets NODE_PID.
start_node() {
  local name=$1 port=$2 config=${3:+--config $3}
  BERTH_STORAGE=s3 BERTH_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" BERTH_S3_REGION=garage \
    BERTH_S3_BUCKET=berth-bench BERTH_S3_ACCESS_KEY_ID="$GARAGE_DEFAULT_ACCESS_KEY" \
    BERTH_S3_SECRET_ACCESS_KEY="$GARAGE_DEFAULT_SECRET_KEY" BERTH_POSTGRES_URL="$PG_URL" \
    "$BERTH" serve $config --auth none --listen "127.0.0.1:$port" --data-dir "$WORK/$name" \
    --log-level warn >>"$WORK/$name.log" 2>&1 &
  NODE_PID=$!
  STARTED_PIDS+=("$NODE_PID")
}
start_node scaleout "$SCALEOUT_PORT"
SCALEOUT_PID=$NODE_PID
printf '[storage.s3]\nredirect = true\n' >"$WORK/redirect.toml"
start_node redirect "$REDIRECT_PORT" "$WORK/redirect.toml"
REDIRECT_PID=$NODE_PID
wait_http "http://127.0.0.1:$EMBEDDED_PORT/v2/" || exit 1
wait_http "http://127.0.0.1:$SCALEOUT_PORT/readyz" 30 || { cat "$WORK/scaleout.log" >&2; exit 1; }
wait_http "http://127.0.0.1:$REDIRECT_PORT/readyz" 30 || { cat "$WORK/redirect.log" >&2; exit 1; }
E="http://127.0.0.1:$EMBEDDED_PORT"
S="http://127.0.0.1:$SCALEOUT_PORT"
R="http://127.0.0.1:$REDIRECT_PORT"
log "embedded berth pid $EMBEDDED_PID at $E, S3+PostgreSQL berth pid $SCALEOUT_PID at $S, with redirects pid $REDIRECT_PID at $R; $(uptime)"

# The S3 client of the limit: rclone, configured through its environment, writing to the
# same bucket as berth (multipart, its default parts in flight; no MD5 pass over the file
# before the upload, as berth makes none; no custom CA bundle, the endpoint is plain HTTP).
export RCLONE_CONFIG_GARAGE_TYPE=s3 RCLONE_CONFIG_GARAGE_PROVIDER=Other \
  RCLONE_CONFIG_GARAGE_ENDPOINT="http://127.0.0.1:$S3_PORT" RCLONE_CONFIG_GARAGE_REGION=garage \
  RCLONE_CONFIG_GARAGE_ACCESS_KEY_ID="$GARAGE_DEFAULT_ACCESS_KEY" \
  RCLONE_CONFIG_GARAGE_SECRET_ACCESS_KEY="$GARAGE_DEFAULT_SECRET_KEY" \
  RCLONE_CONFIG_GARAGE_FORCE_PATH_STYLE=true RCLONE_S3_DISABLE_CHECKSUM=true
S3_DIRECT=(--limit-label s3-client-direct
  --limit-cmd 'env -u AWS_CA_BUNDLE rclone copyto --s3-no-check-bucket "$FILE" "garage:berth-bench/direct/$KEY"'
  --limit-cleanup 'env -u AWS_CA_BUNDLE rclone deletefile "garage:berth-bench/direct/$KEY"')

want() { [[ " $ONLY " == *" $1 "* ]]; }
rb() {
  local sub=$1
  shift
  log "regbench $sub $*"
  $REGBENCH "$sub" --url "$E" --label embedded --pid "$EMBEDDED_PID" \
    --url "$S" --label s3-postgres --pid "$SCALEOUT_PID" --reps "$REPS" "$@" | tee -a "$OUT" || STATUS=1
}

want push && rb push-blob --size "$SIZE" "${S3_DIRECT[@]}"
want chunked && rb push-blob --size "$SIZE" --chunked "$CHUNK" "${S3_DIRECT[@]}"
want pull && rb pull-blob --size "$SIZE" --parallel 1,4 --url "$R" --label s3-redirect --pid "$REDIRECT_PID"
want manifest && rb manifest-rps --conns "$CONNS" --secs "$SECS"
want manifest && rb manifest-rps --conns "$CONNS" --secs "$SECS" --by-digest

# Rolling restart: two nodes behind nginx (round robin, a refused connection tried on the
# other node), a push/pull mix through it for ROLL_SECS while each node in turn is sent
# SIGTERM (it stops accepting and finishes what it holds), waited for and started again.
if want rolling; then
  port_free "$ROLL_PORT" || { echo "port $ROLL_PORT is busy" >&2; exit 1; }
  start_node second "$SECOND_PORT"
  NODE_PIDS=("$SCALEOUT_PID" "$NODE_PID")
  wait_http "http://127.0.0.1:$SECOND_PORT/readyz" 30 || exit 1
  mkdir -p "$WORK/lb/tmp"
  cat >"$WORK/lb/nginx.conf" <<EOF
daemon off;
worker_processes 1;
error_log $WORK/lb/error.log warn;
pid $WORK/lb/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/lb/tmp/body;
  proxy_temp_path $WORK/lb/tmp/proxy;
  fastcgi_temp_path $WORK/lb/tmp/fastcgi;
  uwsgi_temp_path $WORK/lb/tmp/uwsgi;
  scgi_temp_path $WORK/lb/tmp/scgi;
  upstream berth {
    server 127.0.0.1:$SCALEOUT_PORT max_fails=0;
    server 127.0.0.1:$SECOND_PORT max_fails=0;
  }
  server {
    listen 127.0.0.1:$ROLL_PORT;
    client_max_body_size 0;
    client_body_buffer_size 1m;
    location / {
      proxy_pass http://berth;
      proxy_set_header Host \$http_host;
      proxy_next_upstream error timeout non_idempotent;
      proxy_next_upstream_tries 2;
    }
  }
}
EOF
  nginx -c "$WORK/lb/nginx.conf" -p "$WORK/lb" -e "$WORK/lb/error.log" &
  STARTED_PIDS+=("$!")
  wait_http "http://127.0.0.1:$ROLL_PORT/v2/" || exit 1
  log "rolling restart: nginx at 127.0.0.1:$ROLL_PORT before nodes ${NODE_PIDS[*]}, ${ROLL_SECS}s of pushes and pulls"
  python3 bench/rolling.py --url "http://127.0.0.1:$ROLL_PORT" --secs "$ROLL_SECS" \
    --workers "$ROLL_WORKERS" >>"$OUT" &
  MIX_PID=$!
  sleep $((ROLL_SECS / 5))
  for i in 0 1; do
    name=$([ "$i" = 0 ] && echo scaleout || echo second)
    port=$([ "$i" = 0 ] && echo "$SCALEOUT_PORT" || echo "$SECOND_PORT")
    t0=$(date +%s.%N)
    kill -TERM "${NODE_PIDS[$i]}"
    wait "${NODE_PIDS[$i]}"
    start_node "$name" "$port"
    NODE_PIDS[$i]=$NODE_PID
    wait_http "http://127.0.0.1:$port/readyz" 30 || exit 1
    log "node $name restarted in $(python3 -c "import time; print(f'{time.time() - $t0:.2f}')") s (new pid $NODE_PID)"
    sleep $((ROLL_SECS / 5))
  done
  wait "$MIX_PID" || STATUS=1
  tail -1 "$OUT" >&2
fi

python3 bench/report.py "$OUT" 2>/dev/null || true
log "scale-out bench done (status $STATUS); $(uptime)"
exit $STATUS
