#!/usr/bin/env python3
"""A minimal `moppa train --serve` viewer: handshake, then read every frame until the server closes."""
import socket, struct, json, sys, time, re, subprocess
# usage: viewer.py ADDR TOKEN -> reads frames until the server closes; prints counts
host, port = sys.argv[1].rsplit(':', 1)
s = socket.create_connection((host, int(port)))
def send(obj):
    b = json.dumps(obj).encode(); s.sendall(struct.pack('>I', len(b)) + b)
def recv():
    h = b''
    while len(h) < 4:
        c = s.recv(4 - len(h))
        if not c: return None
        h += c
    n = struct.unpack('>I', h)[0]; body = b''
    while len(body) < n:
        c = s.recv(n - len(body))
        if not c: return None
        body += c
    return json.loads(body)
send({"protocol": 1, "token": sys.argv[2]})
hello = recv(); kinds = {}; nbytes = 0
while True:
    f = recv()
    if f is None: break
    k = next(iter(f)) if isinstance(f, dict) else str(f)
    kinds[k] = kinds.get(k, 0) + 1
print(json.dumps({"hello": hello, "frames": kinds}))
