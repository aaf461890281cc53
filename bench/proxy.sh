#!/usr/bin/env bash
# The pull-through cache, side by side in one run: a berth upstream holds an image with
# one SIZE layer; each repetition pulls the layer directly from the upstream, then
# through a fresh (empty) berth cache twice (cold, then warm), and, when Debian's
# `docker-registry` is installed, through a fresh Docker Distribution in proxy mode the
# same way. Then CLIENTS clients pull the layer at once from a fresh cache, and the bytes
# the upstream sent are read off its own /metrics: 1.00x the layer means one fetch.
# Prints medians and ratios (time to first byte in ms over the direct pull's; throughput
# as a share of the direct pull's; warm as a share of berth serving the blob locally).
#
# Run as root, the upstream lives in a network namespace of its own behind a veth pair,
# and the cold pulls are measured twice: at the machine's speed (everything on these
# cores, so the cache's hashing and writing compete with the client and the upstream),
# and with the upstream's link shaped to RATE, as an upstream across a network is.
#
# Environment: SIZE (1GiB), REPS (3), CLIENTS (50; 0 skips that part), RATE (1gbit; "" skips
#   the shaped runs), PORT_UP (5401), PORT_CACHE (5402), PORT_DIST (5403).
# Needs: cargo, curl, python3, GNU tar; docker-registry for the comparison; root and
#   iproute2 (ip, tc) for the shaped runs.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1GiB}
REPS=${REPS:-3}
CLIENTS=${CLIENTS:-50}
PORT_UP=${PORT_UP:-5401}
PORT_CACHE=${PORT_CACHE:-5402}
PORT_DIST=${PORT_DIST:-5403}
RATE=${RATE-1gbit}
cargo build --release --locked --quiet -p berth
BERTH=$PWD/target/release/berth
WORK=$(mktemp -d "${TMPDIR:-/tmp}/berth-proxy-bench.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
NETNS=
UP_HOST=127.0.0.1
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && command -v tc >/dev/null \
  && ip netns add "berth-bench-$$" 2>/dev/null; then
  NETNS=berth-bench-$$
  VETH=bb$$
  netns_cleanup() { cleanup; ip netns del "$NETNS" 2>/dev/null || true; ip link del "$VETH" 2>/dev/null || true; }
  trap netns_cleanup EXIT
  ip link add "$VETH" type veth peer name up0 netns "$NETNS"
  ip addr add 10.77.0.1/30 dev "$VETH"
  ip link set "$VETH" up
  ip netns exec "$NETNS" ip addr add 10.77.0.2/30 dev up0
  ip netns exec "$NETNS" ip link set up0 up
  ip netns exec "$NETNS" ip link set lo up
  UP_HOST=10.77.0.2
fi
IN_NETNS=()
[ -n "$NETNS" ] && IN_NETNS=(ip netns exec "$NETNS")
# The upstream's link at RATE, or back at full speed.
shape() { if [ "$1" = on ]; then "${IN_NETNS[@]}" tc qdisc add dev up0 root tbf rate "$RATE" burst 1mb latency 100ms; else "${IN_NETNS[@]}" tc qdisc del dev up0 root; fi; }
wait_up() { for _ in $(seq 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done; echo "$1 did not come up" >&2; return 1; }
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

"${IN_NETNS[@]}" "$BERTH" serve --listen "$UP_HOST:$PORT_UP" --data-dir "$WORK/upstream" --auth none --log-level warn 2>>"$WORK/log" &
UP_PID=$!; PIDS+=("$UP_PID")
wait_up "http://$UP_HOST:$PORT_UP/v2/"

# The image: one tar layer of SIZE random bytes (nothing compresses it).
bytes=$(numfmt --from=iec-i "${SIZE%B}")
mkdir -p "$WORK/content"
head -c "$bytes" /dev/urandom > "$WORK/content/random.bin"
tar -C "$WORK/content" -cf "$WORK/layer.tar" random.bin
rm -rf "$WORK/content"
push_blob() { # file -> digest
  local digest="sha256:$(sha256sum "$1" | cut -d' ' -f1)"
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/octet-stream' -T "$1" \
    "http://$UP_HOST:$PORT_UP/v2/bench/big/blobs/uploads?digest=$digest")
  [ "$code" = 201 ] || { echo "pushing $1: HTTP $code" >&2; return 1; }
  echo "$digest"
}
LAYER=$(push_blob "$WORK/layer.tar")
layer_size=$(stat -c %s "$WORK/layer.tar")
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["%s"]},"config":{}}' "$LAYER" > "$WORK/config.json"
config_digest=$(push_blob "$WORK/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
  "$config_digest" "$(stat -c %s "$WORK/config.json")" "$LAYER" "$layer_size" > "$WORK/manifest.json"
curl -sf -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' --data-binary "@$WORK/manifest.json" \
  "http://$UP_HOST:$PORT_UP/v2/bench/big/manifests/v1" >/dev/null
rm -f "$WORK/layer.tar"

printf '[outbound]\nallow_cidrs = ["127.0.0.0/8", "10.77.0.0/30"]\n\n[[proxy_cache]]\nproject = "hub"\nurls = ["http://%s:%s"]\n' "$UP_HOST" "$PORT_UP" > "$WORK/cache.toml"
CACHE_PID=
fresh_cache() {
  [ -n "$CACHE_PID" ] && stop "$CACHE_PID"
  rm -rf "$WORK/cache"
  "$BERTH" serve --listen "127.0.0.1:$PORT_CACHE" --data-dir "$WORK/cache" --auth none --log-level warn \
    --config "$WORK/cache.toml" 2>>"$WORK/log" &
  CACHE_PID=$!; PIDS+=("$CACHE_PID")
  wait_up "http://127.0.0.1:$PORT_CACHE/v2/"
}
DIST=$(command -v docker-registry || true)
DIST_PID=
fresh_distribution() {
  [ -n "$DIST_PID" ] && stop "$DIST_PID"
  rm -rf "$WORK/dist"
  mkdir -p "$WORK/dist"
  printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\nproxy:\n  remoteurl: http://%s:%s\n' \
    "$WORK/dist/data" "$PORT_DIST" "$UP_HOST" "$PORT_UP" > "$WORK/dist/config.yml"
  "$DIST" serve "$WORK/dist/config.yml" >/dev/null 2>&1 &
  DIST_PID=$!; PIDS+=("$DIST_PID")
  wait_up "http://127.0.0.1:$PORT_DIST/v2/"
}
# time to first byte, total time, bytes: one GET.
pull() { curl -s -o /dev/null -w '%{time_starttransfer} %{time_total} %{size_download} %{http_code}\n' "$1"; }
record() { # name url
  local line; line=$(pull "$2")
  set -- "$1" $line
  [ "$5" = 200 ] && [ "$4" = "$layer_size" ] || { echo "$1: HTTP $5, $4 bytes" >&2; exit 1; }
  echo "$1 $2 $3" >> "$WORK/results"
}
stored() { # waits until the cache has no fill under way
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT_CACHE/metrics" | grep -q '^berth_proxy_fills_in_flight{project="hub"} 0$' && return 0
    sleep 0.1
  done
  echo "the fill did not finish" >&2; return 1
}
upstream_bytes() {
  curl -sf "http://$UP_HOST:$PORT_UP/metrics" | awk '/^berth_http_response_bytes_total/ {s += $NF} END {printf "%.0f\n", s}'
}

: > "$WORK/results"
: > "$WORK/cpu"
# A process's CPU time so far (user + system), in seconds.
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
for rep in $(seq "$REPS"); do
  record direct "http://$UP_HOST:$PORT_UP/v2/bench/big/blobs/$LAYER"
  fresh_cache
  cpu_before=$(cpu_seconds "$CACHE_PID")
  record "berth-cold" "http://127.0.0.1:$PORT_CACHE/v2/hub/bench/big/blobs/$LAYER"
  echo "cold $(python3 -c "print($(cpu_seconds "$CACHE_PID") - $cpu_before)")" >> "$WORK/cpu"
  stored # the fill stores the blob after the last byte went out
  echo "stored $(python3 -c "print($(cpu_seconds "$CACHE_PID") - $cpu_before)")" >> "$WORK/cpu"
  # Warm as the direct pull is: the blob was just written (with O_DIRECT, so not in the
  # page cache), so one pull first, then the one measured.
  pull "http://127.0.0.1:$PORT_CACHE/v2/hub/bench/big/blobs/$LAYER" >/dev/null
  record "berth-warm" "http://127.0.0.1:$PORT_CACHE/v2/hub/bench/big/blobs/$LAYER"
  if [ -n "$DIST" ]; then
    fresh_distribution
    record "distribution-cold" "http://127.0.0.1:$PORT_DIST/v2/bench/big/blobs/$LAYER"
    sleep 1
    pull "http://127.0.0.1:$PORT_DIST/v2/bench/big/blobs/$LAYER" >/dev/null
    record "distribution-warm" "http://127.0.0.1:$PORT_DIST/v2/bench/big/blobs/$LAYER"
  fi
done

# The same cold pulls with the upstream's link shaped to RATE.
if [ -n "$NETNS" ] && [ -n "$RATE" ]; then
  shape on
  for rep in $(seq "$REPS"); do
    record "direct@$RATE" "http://$UP_HOST:$PORT_UP/v2/bench/big/blobs/$LAYER"
    fresh_cache
    record "berth-cold@$RATE" "http://127.0.0.1:$PORT_CACHE/v2/hub/bench/big/blobs/$LAYER"
    stored
    if [ -n "$DIST" ]; then
      fresh_distribution
      record "distribution-cold@$RATE" "http://127.0.0.1:$PORT_DIST/v2/bench/big/blobs/$LAYER"
    fi
  done
  shape off
fi

concurrent() { # name base-url: CLIENTS cold pulls at once; prints the upstream bytes ratio
  local before after
  before=$(upstream_bytes)
  for i in $(seq "$CLIENTS"); do
    curl -s -o /dev/null -w '%{size_download} %{http_code}\n' "$2/blobs/$LAYER" > "$WORK/c$i" &
  done
  wait # the clients: this runs in a subshell, whose only children they are
  after=$(upstream_bytes)
  local bad=0
  for i in $(seq "$CLIENTS"); do [ "$(cat "$WORK/c$i")" = "$layer_size 200" ] || bad=$((bad + 1)); done
  echo "$1 $CLIENTS clients: upstream sent $(python3 -c "print(f'{($after - $before) / $layer_size:.2f}')")x the layer; $bad clients without the whole layer"
}
CONCURRENT="(CLIENTS=0: no concurrent pulls)"
if [ "$CLIENTS" -gt 0 ]; then
fresh_cache
CONCURRENT=$(concurrent berth "http://127.0.0.1:$PORT_CACHE/v2/hub/bench/big")
# One of them, verified end to end.
sum=$(curl -s "http://127.0.0.1:$PORT_CACHE/v2/hub/bench/big/blobs/$LAYER" | sha256sum | cut -d' ' -f1)
[ "sha256:$sum" = "$LAYER" ] || { echo "the cached layer does not hash to its digest" >&2; exit 1; }
if [ -n "$DIST" ]; then
  fresh_distribution
  CONCURRENT="$CONCURRENT
$(concurrent distribution "http://127.0.0.1:$PORT_DIST/v2/bench/big")"
fi
fi

python3 - "$WORK/results" "$SIZE" "$layer_size" "$RATE" "$WORK/cpu" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, ttfb, total = line.split()
    rows.setdefault(name, []).append((float(ttfb), float(total)))
size = int(sys.argv[3])
def med(name, i):
    return statistics.median(v[i] for v in rows[name])
print(f"pull-through cache, one {sys.argv[2]} layer, medians of {len(rows['direct'])}:")
print(f"  {'pull':20s} {'first byte':>11s} {'total':>9s} {'MB/s':>8s}")
for name in rows:
    print(f"  {name:20s} {med(name, 0) * 1000:8.1f} ms {med(name, 1):7.2f} s {size / med(name, 1) / 1e6:8.0f}")
direct = med("direct", 1)
for who in ("berth", "distribution"):
    if f"{who}-cold" not in rows:
        continue
    print(f"  {who}: cold first byte {1000 * (med(who + '-cold', 0) - med('direct', 0)):+.1f} ms over the direct pull;"
          f" cold throughput {direct / med(who + '-cold', 1):.2f}x the direct pull's;"
          f" warm {direct / med(who + '-warm', 1):.2f}x berth serving it locally")
rate = sys.argv[4]
if f"direct@{rate}" in rows:
    shaped = med(f"direct@{rate}", 1)
    for who in ("berth", "distribution"):
        if f"{who}-cold@{rate}" in rows:
            print(f"  {who}, upstream at {rate}: cold first byte"
                  f" {1000 * (med(who + '-cold@' + rate, 0) - med('direct@' + rate, 0)):+.1f} ms over the direct pull;"
                  f" cold throughput {shaped / med(who + '-cold@' + rate, 1):.2f}x the direct pull's")
cpu = {}
for line in open(sys.argv[5]):
    what, seconds = line.split()
    cpu.setdefault(what, []).append(float(seconds))
if cpu:
    print(f"  berth's CPU for one cold pull: {statistics.median(cpu['cold']):.2f} s while serving it,"
          f" {statistics.median(cpu['stored']):.2f} s with storing it (medians)")
PY
echo "$CONCURRENT"
