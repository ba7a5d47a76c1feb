#!/usr/bin/env python3
"""Publish events to herald's ingest socket (standard library only).

    scripts/examples/publish.py TOPIC DATA [--event TYPE] [--id ID] [--ingest HOST:PORT | --unix PATH]
"""
import argparse
import json
import socket

p = argparse.ArgumentParser()
p.add_argument("topic")
p.add_argument("data")
p.add_argument("--event")
p.add_argument("--id")
p.add_argument("--ingest", default="127.0.0.1:7070")
p.add_argument("--unix")
a = p.parse_args()

event = {"topic": a.topic, "data": a.data}
if a.event:
    event["event"] = a.event
if a.id:
    event["id"] = a.id

if a.unix:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(a.unix)
else:
    host, port = a.ingest.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
with s:
    s.sendall((json.dumps(event) + "\n").encode())
    s.shutdown(socket.SHUT_WR)  # herald answers every line it refused, then closes
    replies = b"".join(iter(lambda: s.recv(65536), b""))
print(replies.decode().strip() or "published")
