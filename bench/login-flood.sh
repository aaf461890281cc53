#!/usr/bin/env bash
# Wrong-password logins (100 a second by default) from rotating addresses, against the berth of two
# revisions (B, default HEAD, and BASE), one after the other: how much slower an unrelated
# manifest GET gets (bench/login-flood.py). Each is built from a clean checkout.
# Environment: B (HEAD), BASE (B~1), RATE (100), SECS (15), A_PORT (5230), B_PORT (5231), KEEP=1.
# Needs: cargo, git, python3, curl.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh

B=${B:-HEAD}
BASE=${BASE:-$B~1}
RATE=${RATE:-100}
SECS=${SECS:-15}
A_PORT=${A_PORT:-5230}
B_PORT=${B_PORT:-5231}
WORK=$(mktemp -d "${TMPDIR_BASE:-/tmp}/berth-flood.XXXXXX")
two_revisions

PW=flood-admin-password
prepare() { # binary port name
  port_free "$2" || { echo "port $2 is busy" >&2; exit 1; }
  BERTH_ADMIN_PASSWORD=$PW "$1" serve --listen "127.0.0.1:$2" --data-dir "$WORK/$3-data" \
    --log-level warn >>"$WORK/$3.log" 2>&1 &
  STARTED_PIDS+=("$!")
  wait_http "http://127.0.0.1:$2/healthz" || exit 1
  local url="http://127.0.0.1:$2" config='{"architecture":"amd64","os":"linux"}'
  curl -sf -u "admin:$PW" -X POST "$url/api/v1/projects" -H 'content-type: application/json' \
    -d '{"name":"pub","public":true}' >/dev/null || exit 1
  local digest="sha256:$(printf %s "$config" | sha256sum | cut -d' ' -f1)"
  local location
  location=$(curl -sf -u "admin:$PW" -X POST -D - -o /dev/null "$url/v2/pub/app/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
  case "$location" in http*) ;; *) location="$url$location" ;; esac
  curl -sf -u "admin:$PW" -X PUT -H 'content-type: application/octet-stream' \
    --data-binary "$config" "$location&digest=$digest" >/dev/null 2>&1 ||
  curl -sf -u "admin:$PW" -X PUT -H 'content-type: application/octet-stream' \
    --data-binary "$config" "$location?digest=$digest" >/dev/null || exit 1
  curl -sf -u "admin:$PW" -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"$digest\",\"size\":${#config}},\"layers\":[]}" \
    "$url/v2/pub/app/manifests/v1" >/dev/null || exit 1
}
prepare "$WORK/berth-a" "$A_PORT" a
prepare "$WORK/berth-b" "$B_PORT" b
log "A = $base_rev, B = $b_rev; $(uptime)"
python3 bench/login-flood.py --rate "$RATE" --secs "$SECS" \
  --url "http://127.0.0.1:$A_PORT" --label "A-$base_rev" \
  --url "http://127.0.0.1:$B_PORT" --label "B-$b_rev"
