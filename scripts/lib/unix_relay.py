#!/usr/bin/env python3
"""Relay TCP connections on 127.0.0.1:PORT to a unix socket, byte for byte.

Usage: unix_relay.py SOCKET [--port PORT] [--ready FILE]

For each TCP connection it accepts, it connects to the unix socket SOCKET and copies bytes
both ways (one thread per direction); when either side closes or fails, it closes both. It
understands nothing of what it carries. PORT 0 (the default) takes a free port; once
listening it writes the port it has to FILE (if given) and to stderr. It runs until killed.
scripts/api-check.sh uses it to let schemathesis (TCP only) reach rhyve's API socket.
"""

import argparse
import os
import signal
import socket
import sys
import threading

CHUNK = 65536


def pipe(src, dst, done):
    """Copy src to dst until either end closes; then close both (once)."""
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        # Wake the other direction's recv, then the second of the two threads closes.
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with done["lock"]:
            done["n"] += 1
            last = done["n"] == 2
        if last:
            src.close()
            dst.close()


def serve(client, path):
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(path)
    except OSError as e:
        print(f"unix_relay: cannot connect to {path}: {e}", file=sys.stderr, flush=True)
        upstream.close()
        client.close()
        return
    done = {"lock": threading.Lock(), "n": 0}
    for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=pipe, args=(a, b, done), daemon=True).start()


def main():
    ap = argparse.ArgumentParser(description="Relay 127.0.0.1:PORT to a unix socket.")
    ap.add_argument("socket", help="path of the unix socket to connect each connection to")
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free one)")
    ap.add_argument("--ready", help="file to write the listening port to once listening")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(64)
    port = listener.getsockname()[1]
    if args.ready:
        tmp = args.ready + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.rename(tmp, args.ready)
    print(f"unix_relay: 127.0.0.1:{port} -> {args.socket}", file=sys.stderr, flush=True)
    while True:
        try:
            client, _ = listener.accept()
        except InterruptedError:
            continue
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        serve(client, args.socket)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
