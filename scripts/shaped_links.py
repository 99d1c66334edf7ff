"""Hosts on a slow network, on one machine: private network namespaces joined by rate-limited links
(Linux, root, iproute2). scripts/benchmark_compression.py --link runs its ranks on them;
tests/test_netns.py checks that a link carries what it was set to.

`Hosts(n, "1gbit")` makes n namespaces ("hosts", each with one interface `eth0` at 10.77.0.<k+1>) and a
switch namespace with a bridge; each host is joined to the bridge by a veth pair, and both ends of
every pair are shaped with a token bucket (tc tbf) at the rate: the host's end limits what the host
sends, the switch's end what it receives. So each host has its own full-duplex link of that rate to a
non-blocking switch, as one NIC per rank in a cluster (a 2-host all-reduce sends and receives at R at
once; it does not share one R between both directions, as shaping a common loopback would).
`"none"` leaves the links unshaped (the veth pairs' own speed, CPU-bound).

Nothing leaves the namespaces: they have no route to the machine's own interfaces, and the addresses
are private to them. Namespaces are named after this process's id and removed on exit (`close`,
`with`, or at interpreter exit).
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import subprocess
import sys

_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_created = itertools.count()
SUBNET = "10.77.0"
PORT = 5201  # inside the namespaces only (streams at once use the next ones)


def parse_rate(rate: str) -> float | None:
    """'100mbit' -> 1e8 bits per second; 'none' -> None (unshaped). ValueError otherwise."""
    if rate == "none":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", rate)
    if not match:
        raise ValueError(f"link rate {rate!r}: expected e.g. 100mbit, 1gbit, 10gbit or none")
    return float(match[1]) * _UNITS[match[2]]


def _ip(*args: str, tool: str = "ip") -> None:
    subprocess.run([tool, *args], check=True, capture_output=True, text=True)


class Hosts:
    """n namespaces on a switch, each link shaped to `rate` in both directions (see the module doc)."""

    def __init__(self, n: int, rate: str):
        self.bits_per_s = parse_rate(rate)
        self.rate = rate
        tag = f"{os.getpid()}-{next(_created)}"
        self.switch = f"lr-sw-{tag}"
        self.names = [f"lr-h{k}-{tag}" for k in range(n)]
        self.addresses = [f"{SUBNET}.{k + 1}" for k in range(n)]
        self._made: list[str] = []
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for name in [self.switch, *self.names]:
            _ip("netns", "add", name)
            self._made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for k, (name, address) in enumerate(zip(self.names, self.addresses, strict=True)):
            port = f"p{k}"
            _ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            for namespace, device in ((name, "eth0"), (self.switch, port)):
                _ip("-n", namespace, "link", "set", device, "up")
                if self.bits_per_s:
                    self._shape(namespace, device)

    def _shape(self, namespace: str, device: str) -> None:
        """tbf at the rate on the device's egress. The bucket holds at least one 64 KiB segment (veth
        hands tc whole GSO segments) and about 1 ms at the rate (so a fast link is not held back by
        timer granularity); 10 ms of queue before tbf drops. (With 50 ms, a stream's ACKs wait behind the
        reverse stream's data: two 4 MB streams, one each way, measured 27-48 Mbit/s on a 50 Mbit/s link,
        against 44-48 with 10 ms.)"""
        burst = max(64 * 1024, int(self.bits_per_s / 8 / 1000))
        _ip(
            "-n",
            namespace,
            "qdisc",
            "add",
            "dev",
            device,
            "root",
            "tbf",
            "rate",
            f"{int(self.bits_per_s)}bit",
            "burst",
            str(burst),
            "latency",
            "10ms",
            tool="tc",
        )

    def command(self, k: int, argv: list[str]) -> list[str]:
        """`argv` run inside host k."""
        return ["ip", "netns", "exec", self.names[k], *argv]

    def close(self) -> None:
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_RECEIVE = """
import socket, sys, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
connection, _ = server.accept()
first = received = len(connection.recv(1 << 16))
start = time.monotonic()  # timed from the first bytes: what arrives after them, over how long
while chunk := connection.recv(1 << 20):
    received += len(chunk)
print(received, first, start, time.monotonic())  # (one clock for the whole machine)
"""
_SEND = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as connection:
    print("connected", flush=True)
    sys.stdin.readline()  # go: every stream of a measurement starts at once
    connection.sendall(bytes(int(sys.argv[3])))
"""


def streams(hosts: Hosts, nbytes: int, pairs: list[tuple[int, int]]) -> list[tuple[int, float, float]]:
    """Send `nbytes` over one TCP connection per (sender, receiver) host pair, all at once (connected
    first, then started together): per stream, the bytes after the receiver's first read and the
    monotonic times of that read and of the last, so that the connection set-up is left out."""
    python, running = sys.executable, []
    try:
        for k, (sender, receiver) in enumerate(pairs):
            address, port = hosts.addresses[receiver], str(PORT + k)
            receive = subprocess.Popen(
                hosts.command(receiver, [python, "-c", _RECEIVE, address, port]), stdout=subprocess.PIPE, text=True
            )
            running.append(receive)
            assert receive.stdout.readline().strip() == "listening"
            send = subprocess.Popen(
                hosts.command(sender, [python, "-c", _SEND, address, port, str(nbytes)]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            running.append(send)
            assert send.stdout.readline().strip() == "connected"
        for send in running[1::2]:
            send.stdin.write("go\n")
            send.stdin.flush()
        results = [receive.communicate(timeout=120)[0].split() for receive in running[::2]]
        assert all(send.wait(timeout=120) == 0 for send in running[1::2])
    finally:
        for process in running:
            process.kill()
            process.wait()
    assert all(int(received) == nbytes for received, *_ in results), results
    return [(nbytes - int(first), float(start), float(end)) for _, first, start, end in results]


def measure_throughput(hosts: Hosts, nbytes: int, sender: int = 0, receiver: int = 1) -> float:
    """Bits per second of one TCP stream of `nbytes` from host `sender` to host `receiver`."""
    [(timed, start, end)] = streams(hosts, nbytes, [(sender, receiver)])
    return 8 * timed / (end - start)


def netns_refusal() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`, not permitted), or None."""
    try:
        with Hosts(1, "none"):
            return None
    except (OSError, subprocess.CalledProcessError) as e:
        return f"cannot make network namespaces here: {getattr(e, 'stderr', None) or e}".strip()


if __name__ == "__main__":  # python scripts/shaped_links.py 50mbit: one measured stream
    with Hosts(2, sys.argv[1] if len(sys.argv) > 1 else "50mbit") as hosts:
        print(f"{hosts.rate}: {measure_throughput(hosts, 4 << 20) / 1e6:.1f} Mbit/s measured")
