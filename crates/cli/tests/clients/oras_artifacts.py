"""Pushes and pulls artifacts with the ORAS Python SDK against a registry on loopback,
attaches a signature-like artifact to the first one through `subject`, and finds it again
through the referrers API. Usage: oras_artifacts.py HOST WORKDIR. Exits non-zero on any
mismatch."""

import filecmp
import json
import os
import sys

import oras.client
import oras.oci
import requests

host, workdir = sys.argv[1], sys.argv[2]
os.chdir(workdir)
with open("artifact.json", "w") as f:
    json.dump({"kind": "example", "version": 1}, f)
with open("payload.bin", "wb") as f:
    f.write(os.urandom(3 * 1024 * 1024 + 17))
with open("signature.sig", "wb") as f:
    f.write(b"not a real signature, but shaped like one")

client = oras.client.OrasClient(hostname=host, insecure=True)
target = f"{host}/clients/oras:v1"
r = client.push(target=target, files=["artifact.json", "payload.bin"])
assert r.status_code == 201, r.text
r = client.push(target=f"{host}/clients/oras:chunked", files=["payload.bin"], do_chunked=True, chunk_size=1024 * 1024)
assert r.status_code == 201, r.text
assert sorted(client.get_tags(f"{host}/clients/oras")) == ["chunked", "v1"]

pulled = client.pull(target=target, outdir="out")
assert sorted(os.path.basename(p) for p in pulled) == ["artifact.json", "payload.bin"], pulled
for name in ["artifact.json", "payload.bin"]:
    assert filecmp.cmp(name, os.path.join("out", name), shallow=False), name
chunked = client.pull(target=f"{host}/clients/oras:chunked", outdir="out-chunked")
assert filecmp.cmp("payload.bin", os.path.join("out-chunked", "payload.bin"), shallow=False)

# The subject's digest, then a signature attached to it.
got = requests.get(f"http://{host}/v2/clients/oras/manifests/v1",
                   headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
subject_digest = got.headers["Docker-Content-Digest"]
subject = oras.oci.Subject(mediaType=got.headers["Content-Type"], digest=subject_digest, size=len(got.content))
r = client.push(target=f"{host}/clients/oras:sig", files=["signature.sig"], subject=subject)
assert r.status_code == 201, r.text
assert r.headers.get("OCI-Subject") == subject_digest, r.headers

listing = requests.get(f"http://{host}/v2/clients/oras/referrers/{subject_digest}")
assert listing.status_code == 200, listing.text
referrers = listing.json()["manifests"]
sig_digest = requests.head(f"http://{host}/v2/clients/oras/manifests/sig").headers["Docker-Content-Digest"]
assert [m["digest"] for m in referrers] == [sig_digest], referrers
print("oras: pushed, pulled and found the referrer", sig_digest)
