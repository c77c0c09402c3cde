#!/usr/bin/env python3
"""A point-to-point link with a fixed one-way delay between two network namespaces, in user space.

This machine's kernel has no netem (nor fq, whose departure times could delay packets), so a path with a
real round trip is built from two TUN devices, one in each namespace, and this process carries every
packet from one to the other after --delay-ms. Enough for handshakes and small transfers (a packet costs
a few microseconds of Python), not for bulk rates.

    delay-link.py --ns NS_A ADDR_A --ns NS_B ADDR_B --delay-ms 10 --seconds 300 [--dev nbsd]

ADDR_A and ADDR_B are the two ends' IPv4 addresses (point to point, no prefix). Prints "ready" on stdout
once both ends are up, then runs until killed, until --seconds pass, or until a namespace goes away.
"""
import argparse
import ctypes
import fcntl
import heapq
import os
import select
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)


def setns(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns %s" % path)
    finally:
        os.close(fd)


def tun_in(ns, dev):
    """A TUN device named dev in namespace ns (an fd bound to it stays bound when we leave the namespace)."""
    setns("/run/netns/" + ns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ns", nargs=2, action="append", metavar=("NS", "ADDR"), required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--dev", default="nbsd")
    a = p.parse_args()
    if len(a.ns) != 2 or not 0 <= a.delay_ms <= 1000 or not 0 < a.seconds <= 3600:
        p.error("two --ns, --delay-ms 0..1000, --seconds 0..3600")
    (ns_a, addr_a), (ns_b, addr_b) = a.ns
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    fd_a, fd_b = tun_in(ns_a, a.dev), tun_in(ns_b, a.dev)
    if libc.setns(home, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns back")
    for ns, local, peer in ((ns_a, addr_a, addr_b), (ns_b, addr_b, addr_a)):
        subprocess.run(["ip", "-n", ns, "addr", "add", local, "peer", peer, "dev", a.dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", a.dev, "up"], check=True)
    print("ready", flush=True)

    other = {fd_a: fd_b, fd_b: fd_a}
    delay = a.delay_ms / 1000
    end = time.monotonic() + a.seconds
    queue = []  # (due, sequence, fd to write, packet): FIFO per direction because the delay is fixed
    sequence = 0
    while time.monotonic() < end:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, fd, packet = heapq.heappop(queue)
            try:
                os.write(fd, packet)
            except BlockingIOError:
                pass  # the receiving side's queue is full: a drop, as on a real link
        timeout = min(max(queue[0][0] - now, 0) if queue else 1.0, end - now)
        try:
            readable, _, _ = select.select([fd_a, fd_b], [], [], max(timeout, 0))
        except InterruptedError:
            continue
        for fd in readable:
            for _ in range(64):  # bounded per wake-up, so the other direction is not starved
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    return 0  # the device went with its namespace
                sequence += 1
                heapq.heappush(queue, (time.monotonic() + delay, sequence, other[fd], packet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
