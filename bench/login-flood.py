#!/usr/bin/env python3
"""A flood of wrong-password logins from rotating loopback addresses, and what it does to
an unrelated client: the median and p95 latency of anonymous manifest GETs of a public
project, first in quiet, then under the flood, for each registry given. Prints one JSON
line per registry and phase, and the ratio flood/quiet.

Usage: login-flood.py --url http://127.0.0.1:PORT --label NAME [--url ... --label ...]
       [--rate 34] [--secs 15] [--admin-password PW]
Each registry must run builtin auth with the admin password given, and a public project
"pub" holding pub/app:v1 (bench/login-flood.sh prepares them).
"""
import argparse
import base64
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
import http.client


def get_manifest_ms(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    t = time.perf_counter()
    conn.request("GET", "/v2/pub/app/manifests/v1",
                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    r = conn.getresponse()
    r.read()
    ms = (time.perf_counter() - t) * 1000
    conn.close()
    if r.status != 200:
        raise SystemExit(f"manifest GET answered {r.status}")
    return ms


def measure(host, port, secs):
    samples = []
    end = time.time() + secs
    while time.time() < end:
        samples.append(get_manifest_ms(host, port))
        time.sleep(0.02)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 2),
        "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 2),
        "requests": len(samples),
    }


def flood(host, port, rate, stop, sent):
    """`rate` wrong-password logins a second, each for a new name from the next of 62,500
    loopback addresses."""
    i = 0
    interval = 1.0 / rate
    next_at = time.time()
    while not stop.is_set():
        source = f"127.0.{(i // 250) % 250 + 1}.{i % 250 + 2}"
        i += 1
        # A new name each time: no lockout ever stops the hashing.
        auth = base64.b64encode(f"user{i}:wrong-{i}".encode()).decode()

        def one(src=source, a=auth):
            try:
                c = http.client.HTTPConnection(host, port, timeout=30, source_address=(src, 0))
                c.request("GET", "/v2/", headers={"Authorization": f"Basic {a}"})
                c.getresponse().read()
                c.close()
            except OSError:
                pass
        threading.Thread(target=one, daemon=True).start()
        sent[0] += 1
        next_at += interval
        time.sleep(max(0, next_at - time.time()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", action="append", required=True)
    p.add_argument("--label", action="append", required=True)
    p.add_argument("--rate", type=float, default=34)
    p.add_argument("--secs", type=float, default=15)
    args = p.parse_args()
    for url, label in zip(args.url, args.label):
        host, port = url.split("//")[1].split(":")
        port = int(port)
        quiet = measure(host, port, args.secs / 2)
        print(json.dumps({"label": label, "phase": "quiet", **quiet}), flush=True)
        stop, sent = threading.Event(), [0]
        t = threading.Thread(target=flood, args=(host, port, args.rate, stop, sent), daemon=True)
        t.start()
        time.sleep(2)  # let the flood reach its rate
        loud = measure(host, port, args.secs)
        stop.set()
        t.join()
        print(json.dumps({"label": label, "phase": "flood", "logins_sent": sent[0],
                          "rate_per_s": args.rate, **loud,
                          "median_ratio_flood_to_quiet": round(loud["median_ms"] / quiet["median_ms"], 2)}),
              flush=True)
        time.sleep(3)  # the flood's last logins drain before the next registry


if __name__ == "__main__":
    main()
