#!/usr/bin/env python3
"""Bulk transfer over plain TCP or kernel MPTCP, for the reference figures NBS is measured against.

  mptcp_xfer.py server --port P [--bind ADDR] [--proto tcp|mptcp] [--timeout S] [--recv-timeout S] [--timeline FILE]
  mptcp_xfer.py client --connect ADDR --port P (--bytes N | --duration S) [--proto tcp|mptcp] [--timeout S]
                       [--stall-timeout S]

The server accepts one connection, reads until EOF, answers with the byte count and the SHA-256 of what it
read (one line), and exits. The client sends N deterministic pseudo-random bytes (or sends for S seconds,
at most N bytes when both are given), shuts down its sending side and waits for that answer. Each prints
one JSON line. The receiver's figure (first byte to EOF) is the goodput; the client's also includes the
handshake and the final answer. The receiver reports max_stall_ms, the longest gap between two received
chunks (for failover measurements), max_stall_at_s (when it began, seconds after accept), stalls (every gap
of 20 ms or more, at_s, ms; past 1000 the shortest listed gives way to a longer one, and stalls_unlisted
counts those left out: the same rule as nbs-mobility's receiver), and, for MPTCP, events when its number
of subflows changes. --timeline FILE writes the bytes received per 100 ms since the accept, one "t_ms
bytes" line per bin (the format of `nbs-mobility serve --timeline`, so both plot on one chart).

A connection that stops delivering (no data for --recv-timeout seconds at the server, a send or the final
answer blocked for --stall-timeout seconds at the client, or a reset) ends the run with "survived": false,
an "error" starting with "did not survive", and exit status 1; --timeout bounds the whole run either way.
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
# A receiver lists every gap between chunks this long or longer (nbs-mobility's receiver: the same 20 ms).
LISTED_GAP_S = 0.02
CHUNK = 64 * 1024
TIMELINE_BIN_S = 0.1
TIMELINE_MAX_BINS = 1 << 20  # 29 h of 100 ms bins: memory stays bounded


LISTED_GAP_LIMIT = 1000


def list_gap(stalls, gap):
    """Appends gap to stalls, in order; past LISTED_GAP_LIMIT the shortest listed gives way to it if it is
    longer (the longest gap after a fault late in a long transfer stays). Returns 1 when one was left out."""
    if len(stalls) < LISTED_GAP_LIMIT:
        stalls.append(gap)
        return 0
    shortest = min(range(len(stalls)), key=lambda i: stalls[i]["ms"])
    if stalls[shortest]["ms"] < gap["ms"]:
        del stalls[shortest]
        stalls.append(gap)
    return 1


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
    t0 = time.monotonic()
    started_unix = time.time()
    deadline = t0 + args.timeout
    recv_timeout = args.recv_timeout or args.timeout
    h = hashlib.sha256()
    n = 0
    first = None
    max_gap = 0.0
    last = None
    subflows = 0
    current = None
    events = []
    stalls = []  # every gap of LISTED_GAP_S or more: start (s after accept) and length (see list_gap)
    unlisted = 0
    max_gap_at = None
    error = None
    bins = []
    while True:
        now = time.monotonic()
        if now >= deadline:
            error = "timed out after %.0f s (--timeout)" % args.timeout
            break
        conn.settimeout(min(recv_timeout, deadline - now))
        try:
            buf = conn.recv(256 * 1024)
        except socket.timeout:
            now = time.monotonic()
            if now >= deadline:
                error = "timed out after %.0f s (--timeout)" % args.timeout
            else:
                error = "did not survive: no data for %.1f s" % recv_timeout
            break
        except OSError as e:
            now = time.monotonic()
            error = "did not survive: %s" % e
            break
        now = time.monotonic()
        if not buf:
            break
        if first is None:
            first = now
        if last is not None:
            gap = now - last
            if gap > max_gap:
                max_gap, max_gap_at = gap, last - t0
            if gap >= LISTED_GAP_S:
                unlisted += list_gap(stalls, {"at_s": round(last - t0, 3), "ms": round(gap * 1000, 1)})
        last = now
        n += len(buf)
        h.update(buf)
        b = int((now - t0) / TIMELINE_BIN_S)
        if b < TIMELINE_MAX_BINS:
            bins.extend([0] * (b + 1 - len(bins)))
            bins[b] += len(buf)
        if args.proto == "mptcp":
            k = mptcp_subflows(conn)
            if k is not None and k != current:
                events.append({"t": round(now - t0, 3), "event": "subflows %d" % k})
                current = k
            subflows = max(subflows, k or 0)
    end = time.monotonic()
    digest = h.hexdigest()
    if error is None:
        try:
            conn.settimeout(recv_timeout)
            conn.sendall(("%d %s\n" % (n, digest)).encode())
        except OSError as e:
            error = "did not survive: answer: %s" % e
    else:
        # The gap that ended the run is a stall too.
        since = last if last is not None else t0
        if end - since > max_gap:
            max_gap, max_gap_at = end - since, since - t0
        unlisted += list_gap(stalls, {"at_s": round(since - t0, 3), "ms": round((end - since) * 1000, 1)})
        events.append({"t": round(end - t0, 3), "event": error})
    conn.close()
    if args.timeline:
        with open(args.timeline, "w", encoding="utf-8") as f:
            f.writelines("%d %d\n" % (round(i * TIMELINE_BIN_S * 1000), v) for i, v in enumerate(bins))
    secs = ((last if error else end) - first) if first is not None else 0.0
    # From accept, as nbs-mobility's seconds_since_start: start-up counted.
    since_start = (last if last is not None else end) - t0
    print(json.dumps({
        "role": "server", "proto": args.proto, "peer": peer[0], "bytes": n, "sha256": digest,
        "seconds": round(secs, 3), "goodput_mbps": round(n * 8 / secs / 1e6, 2) if secs > 0 else 0.0,
        "seconds_since_start": round(since_start, 3),
        "goodput_since_start_mbps": round(n * 8 / since_start / 1e6, 3) if since_start > 0 else 0.0,
        "max_stall_ms": round(max_gap * 1000, 1),
        "max_stall_at_s": round(max_gap_at, 3) if max_gap_at is not None else None, "stalls": stalls,
        "stalls_unlisted": unlisted, "started_unix": round(started_unix, 3),
        "subflows_max": subflows if args.proto == "mptcp" else 1, "events": events, "survived": error is None, "completed": error is None, "error": error,
    }), flush=True)
    return 0 if error is None else 1


def client(args):
    fam = family_of(args.connect)
    s = socket.socket(fam, socket.SOCK_STREAM, proto_number(args.proto))
    if args.cc:
        # Per socket, so the host's default stays as it is (root may pick any available one).
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, args.cc.encode())
    stall = args.stall_timeout or args.timeout
    s.settimeout(min(stall, args.timeout))
    block = memoryview(pattern())
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    send_until = t0 + args.duration if args.duration else None
    limit = args.bytes if args.bytes is not None else (None if args.duration else 16 * 1024 * 1024)
    h = hashlib.sha256()
    sent = 0
    subflows = 0
    error = None
    answer = b""
    try:
        s.connect((args.connect, args.port))
        while limit is None or sent < limit:
            now = time.monotonic()
            if send_until is not None and now >= send_until:
                break
            if now >= deadline:
                raise TimeoutError("timed out after %.0f s (--timeout)" % args.timeout)
            off = sent % len(block)
            want = CHUNK if limit is None else min(CHUNK, limit - sent)
            chunk = block[off:off + min(want, len(block) - off)]
            s.sendall(chunk)
            h.update(chunk)
            sent += len(chunk)
            if args.proto == "mptcp":
                subflows = max(subflows, mptcp_subflows(s) or 0)
        s.shutdown(socket.SHUT_WR)
        while not answer.endswith(b"\n") and len(answer) < 256:
            if time.monotonic() >= deadline:
                raise TimeoutError("timed out after %.0f s (--timeout)" % args.timeout)
            buf = s.recv(256)
            if not buf:
                break
            answer += buf
    except socket.timeout:
        error = "did not survive: blocked for %.1f s (sent %d bytes)" % (stall, sent)
    except TimeoutError as e:
        error = str(e)
    except OSError as e:
        error = "did not survive: %s (sent %d bytes)" % (e, sent)
    t1 = time.monotonic()
    s.close()
    parts = answer.decode(errors="replace").split()
    ok = error is None and len(parts) == 2 and parts[0] == str(sent) and parts[1] == h.hexdigest()
    if error is None and not ok:
        error = "the receiver's answer %r does not match %d bytes %s" % (answer[:100], sent, h.hexdigest())
    secs = t1 - t0
    print(json.dumps({
        "role": "client", "proto": args.proto, "bytes": sent, "sha256": h.hexdigest(),
        "seconds": round(secs, 3), "goodput_mbps": round(sent * 8 / secs / 1e6, 2) if secs > 0 else 0.0,
        "subflows_max": subflows if args.proto == "mptcp" else 1, "verified": ok,
        "survived": error is None or not error.startswith("did not survive"), "completed": ok, "error": error,
    }), flush=True)
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role", required=True)
    ps = sub.add_parser("server")
    ps.add_argument("--bind", default="0.0.0.0")
    pc = sub.add_parser("client")
    pc.add_argument("--connect", required=True)
    pc.add_argument("--bytes", type=int, default=None, help="bytes to send (default 16 MiB without --duration)")
    pc.add_argument("--duration", type=float, default=None, help="send for this many seconds")
    pc.add_argument("--cc", default=None, help="TCP congestion control of this flow (e.g. cubic, reno, bbr)")
    pc.add_argument("--stall-timeout", type=float, default=None,
                    help="give up when a send or the answer blocks this long (s; default --timeout)")
    ps.add_argument("--recv-timeout", type=float, default=None,
                    help="give up when nothing arrives for this long (s; default --timeout)")
    ps.add_argument("--timeline", default=None, help="write bytes received per 100 ms bin to this file")
    for q in (ps, pc):
        q.add_argument("--port", type=int, required=True)
        q.add_argument("--proto", choices=["tcp", "mptcp"], default="tcp")
        q.add_argument("--timeout", type=float, default=60.0, help="bound on the whole run (s)")
    args = p.parse_args()
    return server(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    sys.exit(main() or 0)
