#!/usr/bin/env python3
"""A push/pull mix against one address (a load balancer in front of several berth nodes)
for a bounded time, counting every request that did not get the answer it should: run
it while the nodes behind the address are restarted one after the other. Each worker
pushes small images (a layer uploaded in a POST, a PATCH and a PUT that the balancer may
send to different nodes, the config in one POST, the manifest by tag) and pulls images
pushed before (manifest by tag, every blob, content checked). At the end every pushed
image is pulled again. Prints one JSON line: requests, failures (with the first few),
images pushed and pulled, and the slowest request.

Usage: rolling.py --url http://127.0.0.1:PORT --secs 30 --workers 4
"""

import argparse
import hashlib
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Tally:
    """What all workers saw."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.failures = []
        self.slowest = 0.0
        self.pushed = []
        self.pulls = 0

    def request(self, seconds):
        with self.lock:
            self.requests += 1
            self.slowest = max(self.slowest, seconds)

    def fail(self, what):
        with self.lock:
            self.failures.append(f"{time.strftime('%H:%M:%S')} {what}")


class Worker:
    """One client with a kept-alive connection to the balancer; no retries: a request
    that fails is counted, then the worker goes on."""

    def __init__(self, base, tally):
        u = urllib.parse.urlsplit(base)
        self.host, self.port = u.hostname, u.port
        self.tally = tally
        self.conn = None

    def req(self, method, path, body=None, headers=None, expect=(200,)):
        t0 = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            self.conn.request(method, path, body=body, headers=headers or {})
            r = self.conn.getresponse()
            data = r.read()
            if r.will_close:
                self.conn.close()
                self.conn = None
        except (OSError, http.client.HTTPException) as e:
            if self.conn:
                self.conn.close()
                self.conn = None
            self.tally.request(time.perf_counter() - t0)
            self.tally.fail(f"{method} {path}: {type(e).__name__} {e}")
            return None, {}, b""
        self.tally.request(time.perf_counter() - t0)
        if r.status not in expect:
            self.tally.fail(f"{method} {path}: {r.status} {data[:160]!r}")
            return None, {}, b""
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def push(self, rng, repo, tag):
        layer = rng.randbytes(rng.randint(8, 64) * 1024)
        layer_digest = digest_of(layer)
        # The layer in three requests: a session the next request may continue elsewhere.
        st, h, _ = self.req("POST", f"/v2/{repo}/blobs/uploads/", b"", expect=(202,))
        if st is None:
            return None
        half = len(layer) // 2
        st, h, _ = self.req("PATCH", urllib.parse.urlsplit(h["location"]).path, layer[:half],
                            {"Content-Type": "application/octet-stream",
                             "Content-Range": f"0-{half - 1}"}, expect=(202,))
        if st is None:
            return None
        loc = urllib.parse.urlsplit(h["location"])
        query = (loc.query + "&" if loc.query else "") + f"digest={layer_digest}"
        st, _, _ = self.req("PUT", f"{loc.path}?{query}", layer[half:],
                            {"Content-Type": "application/octet-stream",
                             "Content-Range": f"{half}-{len(layer) - 1}"}, expect=(201,))
        if st is None:
            return None
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
                             "config": {"Labels": {"nonce": f"{repo}:{tag}"}}}).encode()
        config_digest = digest_of(config)
        st, _, _ = self.req("POST", f"/v2/{repo}/blobs/uploads/?digest={config_digest}", config,
                            {"Content-Type": "application/octet-stream"}, expect=(201,))
        if st is None:
            return None
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
        }).encode()
        st, _, _ = self.req("PUT", f"/v2/{repo}/manifests/{tag}", manifest,
                            {"Content-Type": OCI_MANIFEST}, expect=(201,))
        if st is None:
            return None
        return {"repo": repo, "tag": tag, "digest": digest_of(manifest),
                "blobs": [layer_digest, config_digest]}

    def pull(self, image):
        st, h, body = self.req("GET", f"/v2/{image['repo']}/manifests/{image['tag']}",
                               headers={"Accept": OCI_MANIFEST})
        if st is None:
            return False
        if digest_of(body) != image["digest"]:
            self.tally.fail(f"GET {image['repo']}:{image['tag']}: another manifest")
            return False
        for blob in image["blobs"]:
            st, _, data = self.req("GET", f"/v2/{image['repo']}/blobs/{blob}")
            if st is None:
                return False
            if digest_of(data) != blob:
                self.tally.fail(f"GET {image['repo']}@{blob}: other bytes")
                return False
        return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--secs", type=float, default=30)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    tally = Tally()
    deadline = time.monotonic() + args.secs

    def work(n):
        rng = random.Random(n * 7919 + time.time_ns())
        w = Worker(args.url, tally)
        i = 0
        while time.monotonic() < deadline:
            image = w.push(rng, f"rolling/w{n}", f"t{i}")
            i += 1
            if image:
                with tally.lock:
                    tally.pushed.append(image)
                    earlier = rng.choice(tally.pushed)
                if w.pull(earlier):
                    with tally.lock:
                        tally.pulls += 1

    threads = [threading.Thread(target=work, args=(n,)) for n in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    during = tally.requests
    failed_during = len(tally.failures)
    # Everything acknowledged is still there, whole.
    checker = Worker(args.url, tally)
    missing = sum(1 for image in tally.pushed if not checker.pull(image))
    result = {"kind": "rolling", "requests": during, "failures": failed_during,
              "images_pushed": len(tally.pushed), "pulls": tally.pulls,
              "lost_after": missing, "slowest_ms": round(tally.slowest * 1000, 1),
              "first_failures": tally.failures[:10]}
    print(json.dumps(result))
    print(f"rolling: {during} requests, {failed_during} failed, {len(tally.pushed)} images pushed, "
          f"{tally.pulls} pulled, {missing} missing after, slowest {tally.slowest * 1000:.0f} ms",
          file=sys.stderr)
    for f in tally.failures[:10]:
        print(f"  {f}", file=sys.stderr)
    sys.exit(1 if tally.failures or missing else 0)


if __name__ == "__main__":
    main()
