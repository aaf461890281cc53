"""The ORAS Python SDK with its default (token) auth backend against a registry with
access control: logs in, pushes and pulls in the user's own project, and is refused a
push into a project it is not a member of. Usage: oras_login.py HOST USER PASSWORD
WORKDIR. Prints what happened; exits non-zero on any surprise."""

import filecmp
import os
import sys

import oras.client

host, user, password, workdir = sys.argv[1:5]
os.chdir(workdir)
with open("artifact.txt", "w") as f:
    f.write("pushed after a login\n")

client = oras.client.OrasClient(hostname=host, insecure=True)
assert client.login(username=user, password=password)["Status"] == "Login Succeeded"
target = f"{host}/{user}/artifact:v1"
r = client.push(target=target, files=["artifact.txt"])
assert r.status_code == 201, r.text
pulled = client.pull(target=target, outdir="out")
assert filecmp.cmp("artifact.txt", os.path.join("out", "artifact.txt"), shallow=False)
print("pushed and pulled after login")

try:
    r = client.push(target=f"{host}/private/artifact:v1", files=["artifact.txt"])
    refused = r.status_code >= 400
except ValueError as e:
    refused = "DENIED" in str(e) or "403" in str(e)
    print(f"refused: {e}")
assert refused, "a push into someone else's private project must be refused"
print("refused where it may not push")
