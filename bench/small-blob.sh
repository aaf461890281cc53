#!/usr/bin/env bash
# Small blob GETs on one kept-alive connection, as a client fetching config blobs does:
# berth and Docker Distribution (when `docker-registry` is installed) side by side, the
# same 37-byte blob, REQS requests each, alternating in ROUNDS rounds. Prints medians and
# p95 in ms and the ratio berth / Distribution (below 1: berth is faster).
#
# Environment: REQS (200), ROUNDS (3), PORT_B (5631), PORT_D (5632).
# Needs: cargo, curl, python3; docker-registry for the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
REQS=${REQS:-200}
ROUNDS=${ROUNDS:-3}
PORT_B=${PORT_B:-5631}
PORT_D=${PORT_D:-5632}
cargo build --release --locked --quiet -p berth
WORK=$(mktemp -d "${TMPDIR:-/tmp}/berth-small-blob.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
"$PWD/target/release/berth" serve --listen "127.0.0.1:$PORT_B" --data-dir "$WORK/berth" --auth none \
  --log-level warn 2>>"$WORK/log" &
PIDS+=($!)
PORTS="$PORT_B"
if command -v docker-registry >/dev/null; then
  printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$WORK/dist" "$PORT_D" > "$WORK/dist.yml"
  docker-registry serve "$WORK/dist.yml" >/dev/null 2>&1 &
  PIDS+=($!)
  PORTS="$PORTS $PORT_D"
fi
for port in $PORTS; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
done
python3 - "$REQS" "$ROUNDS" $PORTS <<'PY'
import hashlib, http.client, statistics, sys, time
reqs, rounds, ports = int(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
names = {ports[0]: "berth"} | ({ports[1]: "distribution"} if len(ports) > 1 else {})
data = b'{"architecture":"amd64","os":"linux"}'
digest = "sha256:" + hashlib.sha256(data).hexdigest()
for port in ports:
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("POST", "/v2/bench/small/blobs/uploads/")
    r = c.getresponse(); r.read()
    location = r.getheader("location")
    path = location.split(f":{port}", 1)[-1] if location.startswith("http") else location
    sep = "&" if "?" in path else "?"
    c.request("PUT", f"{path}{sep}digest={digest}", body=data, headers={"content-type": "application/octet-stream"})
    r = c.getresponse(); r.read()
    assert r.status == 201, (port, r.status)
times = {port: [] for port in ports}
for _ in range(rounds):
    for port in ports:
        c = http.client.HTTPConnection("127.0.0.1", port)
        for _ in range(reqs):
            t = time.perf_counter()
            c.request("GET", f"/v2/bench/small/blobs/{digest}")
            r = c.getresponse(); body = r.read()
            times[port].append((time.perf_counter() - t) * 1000)
            assert r.status == 200 and body == data
        c.close()
print(f"a 37-byte blob GET on a kept-alive connection, {reqs} x {rounds} requests:")
for port in ports:
    t = sorted(times[port])
    print(f"  {names[port]:13s} median {statistics.median(t):6.2f} ms  p95 {t[int(len(t) * 0.95) - 1]:6.2f} ms")
if len(ports) > 1:
    print(f"  berth / distribution (median): {statistics.median(times[ports[0]]) / statistics.median(times[ports[1]]):.2f}")
PY
