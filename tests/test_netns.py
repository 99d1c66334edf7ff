"""scripts/shaped_links.py, which scripts/benchmark_compression.py --link runs ranks on: hosts in private
network namespaces, each on its own link shaped with tc tbf. A TCP stream between two of them carries
about the rate set, in each direction at once (a full-duplex link, not one rate shared by both
directions), two senders into one host share its rate, and far more unshaped. Skipped where namespaces cannot be made (not root, no `ip`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO

_spec = importlib.util.spec_from_file_location("shaped_links", REPO / "scripts" / "shaped_links.py")
shaped_links = sys.modules["shaped_links"] = importlib.util.module_from_spec(_spec)  # a script, not a module of ours
_spec.loader.exec_module(shaped_links)

RATE, MBIT = "50mbit", 50e6
NBYTES = 4 << 20  # 0.7 s at 50 Mbit/s


def aggregate(streams: list[tuple[int, float, float]]) -> float:
    """Bits per second of streams run at once: their bytes over the time from the first start to the last end."""
    return 8 * sum(s[0] for s in streams) / (max(s[2] for s in streams) - min(s[1] for s in streams))


@pytest.fixture(scope="module")
def netns_allowed():
    refusal = shaped_links.netns_refusal()
    if refusal:
        pytest.skip(refusal)


def test_a_shaped_link_carries_its_rate_in_both_directions_at_once(netns_allowed):
    with shaped_links.Hosts(2, RATE) as hosts:
        alone = shaped_links.measure_throughput(hosts, NBYTES)
        # 0 -> 1 and 1 -> 0 together: 2R in all if full duplex, R if not
        streams = shaped_links.streams(hosts, NBYTES, [(0, 1), (1, 0)])
        names = list(hosts.names)
    assert 0.75 * MBIT < alone < 1.25 * MBIT, alone / 1e6
    # well above the R that one link shared by both directions could carry (typically 1.7-1.85 R, down to
    # 1.4 R when losses in the 10 ms queues cost a stream a retransmission timeout)
    assert 1.3 * MBIT < aggregate(streams) < 2.5 * MBIT, streams
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(name in listed for name in names), listed  # removed on leaving the `with`


def test_a_host_receives_at_its_links_rate_from_two_senders_at_once(netns_allowed):
    """The switch's end of each link is shaped too: two hosts sending to a third share its rate."""
    with shaped_links.Hosts(3, RATE) as hosts:
        streams = shaped_links.streams(hosts, NBYTES, [(0, 1), (2, 1)])
    # (below the rate when both streams overflow the switch port's 10 ms queue at once and one waits out
    # TCP's 200 ms retransmission timeout: seen at 0.43 R with 2 MB each, once in a few runs)
    assert 0.5 * MBIT < aggregate(streams) < 1.25 * MBIT, streams


def test_unshaped_links_are_far_faster(netns_allowed):
    with shaped_links.Hosts(2, "none") as hosts:
        assert shaped_links.measure_throughput(hosts, NBYTES) > 4 * MBIT


def test_link_rates_are_parsed_or_refused():
    assert shaped_links.parse_rate("100mbit") == 1e8
    assert shaped_links.parse_rate("2.5gbit") == 2.5e9
    assert shaped_links.parse_rate("none") is None
    with pytest.raises(ValueError, match="expected e.g. 100mbit"):
        shaped_links.parse_rate("100mb")
