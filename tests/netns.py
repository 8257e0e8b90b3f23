"""Two network namespaces joined by a veth pair: a second "host" on this machine.

Only the pair's own addresses (10.213.N.1 and 10.213.N.2, N from this process id) and
loopback are used. Needs root and iproute2's ``ip``; ``available()`` says why not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip command is missing"
    return None


class NetnsPair:
    """Namespaces ``a`` and ``b``; ``a`` has address ``addr_a`` on veth ``dev_a``, ``b`` the
    same with ``_b``; ``cut()`` and ``mend()`` take the cable out and put it back."""

    def __init__(self, tag: int | None = None):
        tag = os.getpid() % 10000 if tag is None else tag
        self.a, self.b = f"kvreg{tag}a", f"kvreg{tag}b"
        self.dev_a, self.dev_b = f"kvv{tag}a", f"kvv{tag}b"
        subnet = 1 + tag % 250
        self.addr_a, self.addr_b = f"10.213.{subnet}.1", f"10.213.{subnet}.2"

    def up(self) -> NetnsPair:
        self.down()  # leftovers of an earlier run with the same tag
        try:
            for ns in (self.a, self.b):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", self.dev_a, "type", "veth", "peer", "name", self.dev_b)
            for ns, dev, addr in ((self.a, self.dev_a, self.addr_a), (self.b, self.dev_b, self.addr_b)):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Removes both namespaces (and with them the veth pair); safe to call twice."""
        for ns in (self.a, self.b):
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.dev_a, check=False)

    def cut(self) -> None:
        _ip("-n", self.a, "link", "set", self.dev_a, "down")

    def mend(self) -> None:
        _ip("-n", self.a, "link", "set", self.dev_a, "up")

    def throttle(self, rate: str) -> None:
        """Limits what ``a`` sends to ``rate`` (tc's token bucket), so that a transfer lasts."""
        subprocess.run(
            [
                "tc",
                "-n",
                self.a,
                "qdisc",
                "add",
                "dev",
                self.dev_a,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "64kb",
                "latency",
                "500ms",
            ],
            check=True,
            timeout=30,
        )

    def unthrottle(self) -> None:
        subprocess.run(["tc", "-n", self.a, "qdisc", "del", "dev", self.dev_a, "root"], timeout=30)

    def sent_bytes(self, side: str = "a") -> int:
        ns, dev = (self.a, self.dev_a) if side == "a" else (self.b, self.dev_b)
        info = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", "dev", dev).stdout)
        return int(info[0]["stats64"]["tx"]["bytes"])

    def env(self, side: str) -> dict[str, str]:
        """The environment that keeps UCX on TCP over this pair's veth."""
        return {"UCX_TLS": "tcp", "UCX_NET_DEVICES": self.dev_a if side == "a" else self.dev_b}
