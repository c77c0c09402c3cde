#!/usr/bin/env python3
"""Bulk transfer over plain TCP or kernel MPTCP, for the reference figures NBS is measured against.

  mptcp_xfer.py server --port P [--bind ADDR] [--proto tcp|mptcp] [--timeout S]
  mptcp_xfer.py client --connect ADDR --port P --bytes N [--proto tcp|mptcp] [--timeout S]

The server accepts one connection, reads until EOF, answers with the byte count and the SHA-256 of what it
read (one line), and exits. The client sends N deterministic pseudo-random bytes, shuts down its sending
side and waits for that answer. Each prints one JSON line. The receiver's figure (first byte to EOF) is the
goodput; the client's also includes the handshake and the final answer.
"""
import argparse
import hashlib
import json
import socket
import struct
import sys
import time

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO = 1
CHUNK = 64 * 1024


def proto_number(name):
    return IPPROTO_MPTCP if name == "mptcp" else socket.IPPROTO_TCP


def mptcp_subflows(sock):
    """Number of subflows of an MPTCP socket (None when not MPTCP or when it fell back to TCP)."""
    try:
        info = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 64)
    except OSError:
        return None
    if len(info) < 4:
        return None
    subflows, _signal, _accepted, _max = struct.unpack_from("BBBB", info)
    return subflows + 1  # mptcpi_subflows counts the subflows after the first one


def pattern():
    """1 MiB of deterministic pseudo-random bytes (SHA-256 in counter mode)."""
    return b"".join(hashlib.sha256(b"nbs-bench-%d" % i).digest() for i in range(1024 * 1024 // 32))


def family_of(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def server(args):
    fam = family_of(args.bind)
    ls = socket.socket(fam, socket.SOCK_STREAM, proto_number(args.proto))
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.bind, args.port))
    ls.listen(1)
    ls.settimeout(args.timeout)
    conn, peer = ls.accept()
    conn.settimeout(args.timeout)
    deadline = time.monotonic() + args.timeout
    h = hashlib.sha256()
    n = 0
    first = None
    max_gap = 0.0
    last = None
    subflows = 0
    while True:
        buf = conn.recv(256 * 1024)
        now = time.monotonic()
        if not buf:
            break
        if first is None:
            first = now
        if last is not None:
            max_gap = max(max_gap, now - last)
        last = now
        n += len(buf)
        h.update(buf)
        if args.proto == "mptcp":
            subflows = max(subflows, mptcp_subflows(conn) or 0)
        if now > deadline:
            sys.exit("server: timed out")
    end = time.monotonic()
    digest = h.hexdigest()
    conn.sendall(("%d %s\n" % (n, digest)).encode())
    conn.close()
    secs = (end - first) if first is not None else 0.0
    print(json.dumps({
        "role": "server", "proto": args.proto, "peer": peer[0], "bytes": n, "sha256": digest,
        "seconds": round(secs, 3), "goodput_mbps": round(n * 8 / secs / 1e6, 2) if secs > 0 else 0.0,
        "max_stall_ms": round(max_gap * 1000, 1), "subflows_max": subflows if args.proto == "mptcp" else 1,
    }), flush=True)


def client(args):
    fam = family_of(args.connect)
    s = socket.socket(fam, socket.SOCK_STREAM, proto_number(args.proto))
    s.settimeout(args.timeout)
    block = memoryview(pattern())
    deadline = time.monotonic() + args.timeout
    t0 = time.monotonic()
    s.connect((args.connect, args.port))
    h = hashlib.sha256()
    left = args.bytes
    subflows = 0
    while left > 0:
        off = (args.bytes - left) % len(block)
        chunk = block[off:off + min(CHUNK, left, len(block) - off)]
        s.sendall(chunk)
        h.update(chunk)
        left -= len(chunk)
        if args.proto == "mptcp":
            subflows = max(subflows, mptcp_subflows(s) or 0)
        if time.monotonic() > deadline:
            sys.exit("client: timed out")
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while not answer.endswith(b"\n"):
        buf = s.recv(256)
        if not buf:
            break
        answer += buf
    t1 = time.monotonic()
    s.close()
    parts = answer.decode().split()
    ok = len(parts) == 2 and int(parts[0]) == args.bytes and parts[1] == h.hexdigest()
    secs = t1 - t0
    print(json.dumps({
        "role": "client", "proto": args.proto, "bytes": args.bytes, "sha256": h.hexdigest(),
        "seconds": round(secs, 3), "goodput_mbps": round(args.bytes * 8 / secs / 1e6, 2),
        "subflows_max": subflows if args.proto == "mptcp" else 1, "verified": ok,
    }), flush=True)
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role", required=True)
    ps = sub.add_parser("server")
    ps.add_argument("--bind", default="0.0.0.0")
    pc = sub.add_parser("client")
    pc.add_argument("--connect", required=True)
    pc.add_argument("--bytes", type=int, default=16 * 1024 * 1024)
    for q in (ps, pc):
        q.add_argument("--port", type=int, required=True)
        q.add_argument("--proto", choices=["tcp", "mptcp"], default="tcp")
        q.add_argument("--timeout", type=float, default=60.0, help="bound on the whole transfer (s)")
    args = p.parse_args()
    return server(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    sys.exit(main() or 0)
