#!/usr/bin/env python3
"""What access control costs on the read path: the same image in a berth with
`--auth none` and in one with `--auth builtin`, read the way docker reads after a login
(a bearer token from /token, for a user, every pull audited), alternated inside every
repetition. Measures manifest GET by tag and by digest and blob HEAD (wrk, 64
connections; ab for HEAD) and 4 pulls of 256 MiB in a row (curl); prints JSON lines,
then the medians and the per-repetition ratios builtin / none.

Usage: auth.py --none URL --builtin URL --password PASSWORD [--reps 3] [--secs 10]
"""

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REPO = "bench/app"

WRK_SCRIPT = """
wrk.method = os.getenv("BENCH_METHOD")
wrk.headers["Accept"] = "application/vnd.oci.image.manifest.v1+json"
local token = os.getenv("BENCH_TOKEN")
if token ~= nil and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
local errors = 0
function response(status, headers, body)
  if status ~= 200 then errors = errors + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format("JSON {\\"requests\\": %d, \\"rps\\": %.1f, \\"p99_ms\\": %.3f, \\"non_200\\": %d, \\"socket_errors\\": %d}\\n",
    summary.requests, summary.requests / (summary.duration / 1e6), latency:percentile(99) / 1000,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Target:
    """One registry, and how to get a token from it (None: no access control)."""

    def __init__(self, label, base, password):
        self.label, self.base, self.password = label, base.rstrip("/"), password

    def token(self, actions):
        if self.password is None:
            return None
        try:
            urllib.request.urlopen(f"{self.base}/v2/")
            return None
        except urllib.error.HTTPError as e:
            challenge = e.headers.get("WWW-Authenticate", "")
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        query = urllib.parse.urlencode({"service": params.get("service", ""),
                                        "scope": f"repository:{REPO}:{actions}"})
        request = urllib.request.Request(f"{params['realm']}?{query}")
        basic = base64.b64encode(f"admin:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
        with urllib.request.urlopen(request) as r:
            body = json.load(r)
        return body.get("token") or body["access_token"]

    def call(self, method, path, data=None, headers=None, token=None):
        request = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        for k, v in (headers or {}).items():
            request.add_header(k, v)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request) as r:
            return r.status, dict(r.headers), r.read()

    def push_blob(self, data, token):
        digest = digest_of(data)
        self.call("POST", f"/v2/{REPO}/blobs/uploads/?digest={digest}", data,
                  {"Content-Type": "application/octet-stream"}, token)
        return digest

    def push_image(self, big):
        token = self.token("pull,push")
        layer = os.urandom(4096)
        layer_digest = self.push_blob(layer, token)
        big_digest = self.push_blob(big, token)
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}).encode()
        config_digest = self.push_blob(config, token)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": len(layer)}],
        }).encode()
        self.call("PUT", f"/v2/{REPO}/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST}, token)
        return digest_of(manifest), layer_digest, big_digest


def run_wrk(url, method, token, conns, secs, script):
    env = dict(os.environ, BENCH_METHOD=method, BENCH_TOKEN=token or "")
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{secs}s", "-s", script, url],
                         capture_output=True, text=True, env=env, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("JSON "))
    result = json.loads(line[5:])
    if result["non_200"] or result["socket_errors"]:
        sys.exit(f"{method} {url}: {result}")
    return result


def run_ab_head(url, token, conns, secs):
    """HEAD load with ab (wrk waits for a body a HEAD answer never has)."""
    cmd = ["ab", "-i", "-k", "-q", "-c", str(conns), "-t", str(secs), "-n", "100000000"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout

    def grab(pattern):
        m = re.search(pattern, out)
        return float(m.group(1)) if m else 0.0

    requests = grab(r"Complete requests:\s+(\d+)")
    if grab(r"Non-2xx responses:\s+(\d+)") or grab(r"Failed requests:\s+(\d+)"):
        sys.exit(f"HEAD {url}: failures\n{out[-800:]}")
    return {"requests": int(requests), "rps": round(requests / grab(r"Time taken for tests:\s+([\d.]+)"), 1),
            "p99_ms": grab(r"\n\s+99%\s+(\d+)")}


PULLS = 4


def run_pull(url, token, size):
    """PULLS pulls one after another, timed together: one pull of 256 MiB lasts a fifth of
    a second, too short to measure alone on a shared machine."""
    cmd = ["curl", "-sS", "-w", "%{http_code} %{size_download} %{time_total}\n"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    for _ in range(PULLS):
        cmd += ["-o", "/dev/null", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    seconds = 0.0
    for line in out.splitlines():
        code, got, took = line.split()
        if code != "200" or int(got) != size:
            sys.exit(f"pull {url}: {code} {got}")
        seconds += float(took)
    return {"MBps": round(PULLS * size / seconds / 1e6, 1)}


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--none", required=True)
    ap.add_argument("--builtin", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--size", type=int, default=256 << 20)
    args = ap.parse_args()
    targets = [Target("none", args.none, None), Target("builtin", args.builtin, args.password)]
    big = os.urandom(args.size)
    images = {t.label: t.push_image(big) for t in targets}
    del big
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(WRK_SCRIPT)
    script.close()
    measures = {
        "manifest GET by tag": ("GET", lambda m, l, b: f"/v2/{REPO}/manifests/v1", "rps"),
        "manifest GET by digest": ("GET", lambda m, l, b: f"/v2/{REPO}/manifests/{m}", "rps"),
        "blob HEAD": ("HEAD", lambda m, l, b: f"/v2/{REPO}/blobs/{l}", "rps"),
        "pull 4 x 256 MiB": ("PULL", lambda m, l, b: f"/v2/{REPO}/blobs/{b}", "MBps"),
    }
    results = {}
    try:
        for rep in range(args.reps):
            for name, (method, path_of, metric) in measures.items():
                for t in targets:
                    token = t.token("pull")
                    url = t.base + path_of(*images[t.label])
                    if method == "PULL":
                        r = run_pull(url, token, args.size)
                    elif method == "HEAD":
                        r = run_ab_head(url, token, args.conns, args.secs)
                    else:
                        r = run_wrk(url, method, token, args.conns, args.secs, script.name)
                    results.setdefault((name, t.label), []).append(r[metric])
                    print(json.dumps({"kind": "rep", "bench": "auth", "measure": name,
                                      "label": t.label, "rep": rep, **r}), flush=True)
                    print(f"{name} {t.label} rep {rep}: {r[metric]} {metric}"
                          + (f", p99 {r['p99_ms']} ms" if "p99_ms" in r else ""), file=sys.stderr)
    finally:
        os.unlink(script.name)
    print("| measure | --auth none | --auth builtin, bearer token | per-repetition ratios | median |",
          file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    for name, (_, _, metric) in measures.items():
        none, builtin = results[(name, "none")], results[(name, "builtin")]
        ratios = [b / a for a, b in zip(none, builtin)]
        print(json.dumps({"kind": "ratio", "bench": "auth", "measure": name, "metric": metric,
                          "per_rep": [round(r, 3) for r in ratios],
                          "median_ratio": round(median(ratios), 3)}))
        print(f"| {name} | {median(none):,.0f} {metric} | {median(builtin):,.0f} {metric} | "
              f"{', '.join(f'{r:.2f}' for r in ratios)} | {median(ratios):.2f} |", file=sys.stderr)


if __name__ == "__main__":
    main()
