#!/usr/bin/env python3
"""Check one NBS transfer from the JSON summaries of `nbs-mobility connect --json` and `serve --json`.

  check_transfer.py CLIENT_OUT SERVER_OUT --bytes N [--min-active-subflows K]
                    [--client-rc RC] [--server-rc RC] [--max-stall-ms MS]
                    [--max-sent-share PREFIXES PCT]

Each OUT file's last non-empty line must be one JSON object. Prints "PASS: ..." or "FAIL: reason; ..."
and exits 0 or 1.
"""
import argparse
import ipaddress
import json
import sys


def last_json(path):
    try:
        lines = [l for l in open(path, encoding="utf-8", errors="replace").read().splitlines() if l.strip()]
    except OSError as e:
        raise ValueError("cannot read %s: %s" % (path, e))
    if not lines:
        raise ValueError("no output in %s" % path)
    try:
        j = json.loads(lines[-1])
    except ValueError:
        raise ValueError("last line of %s is not JSON: %r" % (path, lines[-1][:200]))
    if not isinstance(j, dict):
        raise ValueError("last line of %s is not a JSON object" % path)
    return j


def main():
    p = argparse.ArgumentParser()
    p.add_argument("client_out")
    p.add_argument("server_out")
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--min-active-subflows", type=int, default=1,
                   help="client subflows with bytes_sent > 0 must be at least this many")
    p.add_argument("--client-rc", type=int, default=0)
    p.add_argument("--server-rc", type=int, default=0)
    p.add_argument("--max-stall-ms", type=float, default=None,
                   help="fail when the receiver's max_stall_ms exceeds this")
    p.add_argument("--max-sent-share", nargs=2, metavar=("PREFIXES", "PCT"), default=None,
                   help="client subflows whose local address is in one of PREFIXES (comma-separated) sent at "
                        "most PCT %% of all the client subflows' bytes_sent")
    a = p.parse_args()

    errors = []
    if a.client_rc != 0:
        errors.append("client exited %d" % a.client_rc)
    if a.server_rc != 0:
        errors.append("server exited %d" % a.server_rc)
    c = s = None
    for name, path in (("client", a.client_out), ("server", a.server_out)):
        try:
            j = last_json(path)
        except ValueError as e:
            errors.append(str(e))
            continue
        if j.get("error"):
            errors.append("%s error: %s" % (name, j.get("error")))
        if name == "client":
            c = j
        else:
            s = j
    if c is not None and s is not None:
        if c.get("bytes") != a.bytes:
            errors.append("client bytes %r != %d" % (c.get("bytes"), a.bytes))
        if s.get("bytes") != c.get("bytes"):
            errors.append("server bytes %r != client bytes %r" % (s.get("bytes"), c.get("bytes")))
        if not c.get("sha256") or s.get("sha256") != c.get("sha256"):
            errors.append("sha256 differs: client %s server %s" % (c.get("sha256"), s.get("sha256")))
        subflows = c.get("subflows") or []
        active = [f for f in subflows if isinstance(f, dict) and (f.get("bytes_sent") or 0) > 0]
        if len(active) < a.min_active_subflows:
            errors.append("%d client subflow(s) sent data, want >= %d: %s" % (
                len(active), a.min_active_subflows,
                ", ".join("%s->%s %s" % (f.get("local"), f.get("remote"), f.get("bytes_sent")) for f in subflows)
                or "no subflows reported"))
        if a.max_sent_share is not None:
            nets = [ipaddress.ip_network(x) for x in a.max_sent_share[0].split(",") if x]
            pct = float(a.max_sent_share[1])

            def inside(addr):
                try:
                    ip = ipaddress.ip_address(str(addr).split("%")[0])
                except ValueError:
                    return False
                return any(ip.version == n.version and ip in n for n in nets)

            total = sum(int(f.get("bytes_sent") or 0) for f in subflows if isinstance(f, dict))
            part = sum(int(f.get("bytes_sent") or 0) for f in subflows if isinstance(f, dict) and inside(f.get("local")))
            share = 100.0 * part / total if total else 0.0
            print("share of bytes_sent from %s: %d of %d B (%.1f %%)" % (a.max_sent_share[0], part, total, share))
            if share > pct:
                errors.append("subflows from %s sent %.1f %% of the bytes, want <= %s %%" % (
                    a.max_sent_share[0], share, a.max_sent_share[1]))
        if a.max_stall_ms is not None and (s.get("max_stall_ms") or 0) > a.max_stall_ms:
            errors.append("receiver stalled %s ms > %s ms" % (s.get("max_stall_ms"), a.max_stall_ms))

    if errors:
        print("FAIL: " + "; ".join(errors))
        return 1
    active = [f for f in c.get("subflows") or [] if (f.get("bytes_sent") or 0) > 0]
    print("PASS: %d bytes, sha256 %s..., %.2f Mbit/s, %d active subflows (%s), max stall %s ms, peer %s (%s)" % (
        a.bytes, str(c.get("sha256"))[:16], float(s.get("goodput_mbps") or c.get("goodput_mbps") or 0),
        len(active), ", ".join("%s->%s %d B" % (f.get("local"), f.get("remote"), f.get("bytes_sent")) for f in active),
        s.get("max_stall_ms"), c.get("peer_name"), c.get("peer_verification")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
