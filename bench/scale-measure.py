#!/usr/bin/env python3
"""What bench/scale.sh asks a running berth about a generated data set.

    scale-measure.py verify PORT REPOS BIG_TAGS      walk the catalog and the big repository's
                                                   tags, pull manifests and blobs: the data
                                                   set is whole through the API
    scale-measure.py pages PORT REQS               page times (median, p95 in ms) of the
                                                   tag list and the catalog, first and middle
    scale-measure.py paths PORT COUNT FILE         COUNT manifest-by-digest paths, spread over
                                                   the repositories, for wrk
    scale-measure.py delete PORT LISTING           deletes every other manifest of LISTING
                                                   ("repo digest" lines) through the API
    scale-measure.py pushes PORT SECONDS OUT       pushes small images one after another for
                                                   SECONDS (or until OUT.stop exists), writing
                                                   each push's milliseconds to OUT
"""
import concurrent.futures
import hashlib
import http.client
import json
import os
import random
import statistics
import sys
import time

ACCEPT = "application/vnd.oci.image.manifest.v1+json"


def get(conn, path, accept=None):
    conn.request("GET", path, headers={"Accept": accept} if accept else {})
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        sys.exit(f"GET {path}: {r.status} {body[:200]!r}")
    return r, body


def walk(conn, first):
    """Every name of a paginated listing, following its Link headers."""
    names, path = [], first
    while path:
        r, body = get(conn, path)
        doc = json.loads(body)
        names.extend(doc.get("repositories") or doc.get("tags") or [])
        link = r.getheader("Link")
        path = link[1:link.index(">")] if link else None
    return names


def verify(port, repos, big_tags):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    started = time.time()
    catalog = walk(conn, "/v2/_catalog?n=1000")
    assert len(catalog) == repos, (len(catalog), repos)
    assert catalog == sorted(catalog)
    tags = walk(conn, "/v2/big/app/tags/list?n=1000")
    assert len(tags) == big_tags, (len(tags), big_tags)
    rng = random.Random(7)
    pulled = 0
    for repo in rng.sample(catalog, min(100, len(catalog))):
        for tag in walk(conn, f"/v2/{repo}/tags/list?n=1000")[:2]:
            _, raw = get(conn, f"/v2/{repo}/manifests/{tag}", ACCEPT)
            manifest = json.loads(raw)
            for d in [manifest["config"]] + manifest["layers"]:
                _, blob = get(conn, f"/v2/{repo}/blobs/{d['digest']}")
                assert len(blob) == d["size"]
                pulled += 1
    print(json.dumps({"catalog": len(catalog), "big_repository_tags": len(tags),
                      "blobs_pulled": pulled, "seconds": round(time.time() - started, 1)}))


def timed(conn, path, reqs):
    times = []
    for _ in range(reqs):
        t = time.perf_counter()
        get(conn, path)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def pages(port, reqs):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    catalog = walk(conn, "/v2/_catalog?n=1000")
    tags = sorted(walk(conn, "/v2/big/app/tags/list?n=1000"))
    result = {}
    for name, path in [
        ("tags, first page", "/v2/big/app/tags/list?n=100"),
        ("tags, middle page", f"/v2/big/app/tags/list?n=100&last={tags[len(tags) // 2]}"),
        ("catalog, first page", "/v2/_catalog?n=100"),
        ("catalog, middle page", f"/v2/_catalog?n=100&last={catalog[len(catalog) // 2]}"),
    ]:
        median, p95 = timed(conn, path, reqs)
        result[name] = [round(median, 3), round(p95, 3)]
    print(json.dumps(result))


def paths(port, count, out):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    catalog = walk(conn, "/v2/_catalog?n=1000")
    rng = random.Random(11)
    lines = []
    for repo in rng.choices(catalog, k=count):
        r, _ = get(conn, f"/v2/{repo}/manifests/{rng.choice(walk(conn, f'/v2/{repo}/tags/list?n=1000')[:50])}", ACCEPT)
        lines.append(f"/v2/{repo}/manifests/{r.getheader('Docker-Content-Digest')}")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


def delete(port, listing):
    targets = [line.split() for i, line in enumerate(open(listing)) if i % 2 == 0]

    def work(part):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        for repo, digest in part:
            conn.request("DELETE", f"/v2/{repo}/manifests/{digest}")
            r = conn.getresponse()
            r.read()
            if r.status != 202:
                raise SystemExit(f"DELETE {repo}@{digest}: {r.status}")
        return len(part)

    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        done = sum(pool.map(work, [targets[i::4] for i in range(4)]))
    print(json.dumps({"deleted": done, "seconds": round(time.time() - started, 1)}))


def pushes(port, seconds, out):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    deadline, n, times = time.time() + seconds, 0, []
    while time.time() < deadline and not os.path.exists(out + ".stop"):
        n += 1
        t = time.perf_counter()
        data = f"push beside a collection {os.getpid()} {n} {time.time()}".encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        conn.request("POST", f"/v2/beside/gc/blobs/uploads/?digest={digest}", body=data,
                     headers={"content-type": "application/octet-stream"})
        r = conn.getresponse(); r.read()
        assert r.status == 201, r.status
        raw = json.dumps({"schemaVersion": 2, "mediaType": ACCEPT,
                          "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                     "digest": digest, "size": len(data)},
                          "layers": []}).encode()
        conn.request("PUT", f"/v2/beside/gc/manifests/p{n}", body=raw,
                     headers={"content-type": ACCEPT})
        r = conn.getresponse(); r.read()
        assert r.status == 201, r.status
        times.append((time.perf_counter() - t) * 1000)
    with open(out, "w") as f:
        f.write("\n".join(f"{x:.3f}" for x in times) + "\n")


if __name__ == "__main__":
    command, port = sys.argv[1], int(sys.argv[2])
    if command == "verify":
        verify(port, int(sys.argv[3]), int(sys.argv[4]))
    elif command == "pages":
        pages(port, int(sys.argv[3]))
    elif command == "paths":
        paths(port, int(sys.argv[3]), sys.argv[4])
    elif command == "delete":
        delete(port, sys.argv[3])
    elif command == "pushes":
        pushes(port, float(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(__doc__)
