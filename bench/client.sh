#!/usr/bin/env bash
# The client side against skopeo and umoci, side by side in one run, alternating inside
# every repetition: `berth copy` registry → registry against `skopeo copy`, and
# `berth pull --unpack` against `skopeo copy` to a layout + `umoci unpack`. Two berth
# servers on 127.0.0.1 hold the images: "big" (one layer: a tar of SIZE random bytes, so
# nothing compresses it) and "debian" (a debootstrap minbase bookworm root filesystem
# as one gzip layer, about 50 MB holding 120 MB in 6,000 files; built when debootstrap is
# there and the script runs as root). Prints each measure's median and the ratio
# berth / other (below 1: berth is faster).
#
# Environment: SIZE (1GiB), REPS (3), PORT_A (5301), PORT_B (5302), DEBIAN (1; 0 skips it).
# Needs: cargo, skopeo, umoci, curl, python3, GNU tar, gzip; debootstrap for "debian".
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1GiB}
REPS=${REPS:-3}
PORT_A=${PORT_A:-5301}
PORT_B=${PORT_B:-5302}
cargo build --release --locked --quiet -p berth
BERTH=$PWD/target/release/berth
WORK=$(mktemp -d "${TMPDIR:-/tmp}/berth-client-bench.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  chmod -R u+rwx "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
B_PID=
start_server() { # port data-dir -> pid
  "$BERTH" serve --listen "127.0.0.1:$1" --data-dir "$2" --auth none 2>>"$WORK/log" &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$1/v2/" >/dev/null && break; sleep 0.1; done
  B_PID=$pid
}
# A fresh, empty destination for every copy: neither tool may find (or mount) what the
# other, or its own previous run, put there.
fresh_destination() {
  if [ -n "$B_PID" ]; then kill "$B_PID"; wait "$B_PID" 2>/dev/null || true; fi
  rm -rf "$WORK/data-b"
  start_server "$PORT_B" "$WORK/data-b"
}
start_server "$PORT_A" "$WORK/data-a"
B_PID=

push_blob() { # repository file -> digest (streamed: -T; the URL must not end in / or curl appends the name)
  local digest="sha256:$(sha256sum "$2" | cut -d' ' -f1)"
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/octet-stream' -T "$2" \
    "http://127.0.0.1:$PORT_A/v2/$1/blobs/uploads?digest=$digest")
  [ "$code" = 201 ] || { echo "pushing $2: HTTP $code" >&2; return 1; }
  echo "$digest"
}
push_image() { # repository layer-file media-type diff-id: a one-layer image tagged v1
  local layer_digest layer_size config_digest config_size
  layer_digest=$(push_blob "$1" "$2") || exit 1
  layer_size=$(stat -c %s "$2")
  printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["%s"]},"config":{}}' "$4" > "$WORK/config.json"
  config_digest=$(push_blob "$1" "$WORK/config.json") || exit 1
  config_size=$(stat -c %s "$WORK/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"%s","digest":"%s","size":%s}]}' \
    "$config_digest" "$config_size" "$3" "$layer_digest" "$layer_size" > "$WORK/manifest.json"
  curl -sf -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' --data-binary "@$WORK/manifest.json" \
    "http://127.0.0.1:$PORT_A/v2/$1/manifests/v1" >/dev/null
}

# "big": one tar layer holding SIZE random bytes.
bytes=$(numfmt --from=iec-i "${SIZE%B}")
mkdir -p "$WORK/content"
head -c "$bytes" /dev/urandom > "$WORK/content/random.bin"
tar -C "$WORK/content" -cf "$WORK/layer.tar" random.bin
rm -rf "$WORK/content"
digest="sha256:$(sha256sum "$WORK/layer.tar" | cut -d' ' -f1)"
push_image bench/big "$WORK/layer.tar" application/vnd.oci.image.layer.v1.tar "$digest"
rm -f "$WORK/layer.tar"
IMAGES=(big)

# "debian": a debootstrap root filesystem, gzip-compressed as registries serve images.
if [ "${DEBIAN:-1}" = 1 ] && command -v debootstrap >/dev/null && [ "$(id -u)" = 0 ]; then
  debootstrap --variant=minbase bookworm "$WORK/debian" >"$WORK/debootstrap.log" 2>&1
  rm -rf "$WORK/debian/var/cache/apt/archives/"*.deb "$WORK/debian/var/lib/apt/lists/"*
  tar --sort=name --numeric-owner -C "$WORK/debian" -cf "$WORK/debian.tar" .
  rm -rf "$WORK/debian"
  diff_id="sha256:$(sha256sum "$WORK/debian.tar" | cut -d' ' -f1)"
  gzip -6 "$WORK/debian.tar"
  push_image bench/debian "$WORK/debian.tar.gz" application/vnd.oci.image.layer.v1.tar+gzip "$diff_id"
  rm -f "$WORK/debian.tar.gz"
  IMAGES+=(debian)
fi

seconds() { local start=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }; echo "$(date +%s.%N) - $start" | bc; }
: > "$WORK/results"
for rep in $(seq "$REPS"); do
  for image in "${IMAGES[@]}"; do
    SRC=127.0.0.1:$PORT_A/bench/$image:v1
    fresh_destination
    t=$(seconds "$BERTH" copy "$SRC" "127.0.0.1:$PORT_B/berth$rep/$image:v1"); echo "$image copy berth $t" >> "$WORK/results"
    fresh_destination
    t=$(seconds skopeo copy --quiet --src-tls-verify=false --dest-tls-verify=false "docker://$SRC" "docker://127.0.0.1:$PORT_B/skopeo$rep/$image:v1"); echo "$image copy skopeo $t" >> "$WORK/results"
    t=$(seconds "$BERTH" pull "$SRC" --platform linux/amd64 --store "$WORK/store$rep" --unpack "$WORK/rootfs$rep"); echo "$image pull+unpack berth $t" >> "$WORK/results"
    t=$(seconds sh -c "skopeo copy --quiet --src-tls-verify=false docker://$SRC oci:$WORK/layout$rep:v1 && umoci unpack --rootless --image $WORK/layout$rep:v1 $WORK/bundle$rep"); echo "$image pull+unpack skopeo+umoci $t" >> "$WORK/results"
    chmod -R u+rwx "$WORK/rootfs$rep" "$WORK/bundle$rep" 2>/dev/null || true
    rm -rf "$WORK/store$rep" "$WORK/rootfs$rep" "$WORK/layout$rep" "$WORK/bundle$rep"
    # The second pull of an image whose layers are stored downloads nothing.
    "$BERTH" pull "$SRC" --platform linux/amd64 --store "$WORK/store-warm" >/dev/null 2>&1
    t=$(seconds "$BERTH" pull "$SRC" --platform linux/amd64 --store "$WORK/store-warm"); echo "$image pull (stored) berth $t" >> "$WORK/results"
  done
done
python3 - "$WORK/results" "$SIZE" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    *name, value = line.split()
    rows.setdefault(" ".join(name), []).append(float(value))
print(f"client benchmark (big: one {sys.argv[2]} layer; debian: debootstrap minbase), medians of {len(next(iter(rows.values())))}:")
for name, values in rows.items():
    print(f"  {name:40s} {statistics.median(values):8.2f} s  (min {min(values):.2f}, max {max(values):.2f})")
def ratio(a, b):
    return statistics.median(rows[a]) / statistics.median(rows[b])
for image in sorted({name.split()[0] for name in rows}):
    print(f"  {image}: berth copy / skopeo copy: {ratio(image + ' copy berth', image + ' copy skopeo'):.2f}")
    print(f"  {image}: berth pull+unpack / skopeo copy + umoci unpack: {ratio(image + ' pull+unpack berth', image + ' pull+unpack skopeo+umoci'):.2f}")
PY
