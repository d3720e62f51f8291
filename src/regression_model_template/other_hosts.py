"""Other hosts for tests: a network namespace joined to this machine by a private link.

A server meant for a network (``server --host``) is only tested for real from another machine:
its certificate, its credentials, what is not reachable, a partition. :func:`other_host` makes
one for the block, with addresses from :data:`TEST_NETWORK` only, and removes it even when the
block fails. Needs root and ``ip`` (Debian's iproute2, installed on first use as root, like
PostgreSQL); Linux only.

Written by hand: ``ip`` does the work; what it lacks is a claim that parallel test processes
cannot share, and a removal that nothing can skip.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import typing as T
from dataclasses import dataclass
from pathlib import Path

from regression_model_template.server.processes import debian_program

__all__ = ["TEST_NETWORK", "OtherHost", "OtherHostUnavailable", "other_host"]

#: The range set aside for network tests (RFC 2544): :func:`other_host` takes its addresses
#: from it and from no other range.
TEST_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")

_LINK_PREFIX = 24  # one /24 per link: this host's end is .1, the other host's .2
_LINKS = 2 ** (_LINK_PREFIX - TEST_NETWORK.prefixlen)  # 512 links in the range
_NAMESPACE_PREFIX = "rmt-"  # namespaces are named rmt-PID-COUNTER
_counter = itertools.count()
_counter_lock = threading.Lock()


class OtherHostUnavailable(RuntimeError):
    """No network namespace can be made here: not root, no ``ip`` program, or the kernel refuses."""


@dataclass(frozen=True)
class OtherHost:
    """Another host for a test: a network namespace joined to this one by a veth pair.

    Its only route is its link: it reaches :attr:`gateway` (this host's end) and nothing else.

    Example:
        >>> host = OtherHost("rmt-1-0", "198.18.3.2", "198.18.3.1", "rmt3h")
        >>> host.command(["curl", "https://198.18.3.1:5000/health"])[:4]
        ['ip', 'netns', 'exec', 'rmt-1-0']
    """

    name: str  #: the network namespace's name
    address: str  #: the other host's address (the namespace's end of the link)
    gateway: str  #: this host's address on the link: where a server for the other host binds
    device: str  #: this host's end of the veth pair

    def command(self, argv: T.Sequence[str]) -> list[str]:
        """``argv`` run on the other host (for ``subprocess``): prefixed by ``ip netns exec``.

        The command keeps this process's user, files and environment; only its network differs.
        """
        return ["ip", "netns", "exec", self.name, *argv]

    @contextlib.contextmanager
    def cut(self) -> T.Iterator[None]:
        """A network partition for the block: the link is down, then up again.

        Connections are not reset: packets are lost both ways, as when a cable is pulled.
        """
        _ip("link", "set", self.device, "down")
        try:
            yield
        finally:
            _ip("link", "set", self.device, "up")


@contextlib.contextmanager
def other_host() -> T.Iterator[OtherHost]:
    """Make another host for the block: a network namespace and a veth pair to this host.

    The link is a ``/24`` of :data:`TEST_NETWORK` that no interface or route here uses; this
    host's end is ``.1`` (:attr:`OtherHost.gateway`), the namespace's ``.2``; ``lo`` is up in the
    namespace. Parallel test processes get different namespaces and links (the name holds the
    process id; claiming a link creates its device, which fails for the second claimant).
    Everything is removed when the block ends, also when it raises: the processes still running
    in the namespace (killed), the veth pair, the namespace. Namespaces left by a killed test
    process are removed on the next call.

    Needs root and ``ip`` (iproute2); Linux only.

    Example (not run here: it needs root)::

        from regression_model_template.server.stack import team_server

        with other_host() as host, team_server(folder, host=host.gateway) as stack:
            curl = ["curl", "--cacert", str(stack.certificate), f"{stack.url}/health"]
            subprocess.run(host.command(curl), check=True)  # from the other host
            with host.cut():
                ...  # a partition: the other host's packets are lost both ways

    Raises:
        OtherHostUnavailable: not root, no ``ip`` program, or the namespace could not be made
            (the message says which, with ``ip``'s own words).
    """
    _check_can_make_namespaces()
    _remove_orphans()
    with _counter_lock:
        name = f"{_NAMESPACE_PREFIX}{os.getpid()}-{next(_counter)}"
    try:
        _ip("netns", "add", name)
    except RuntimeError as error:
        raise OtherHostUnavailable(f"cannot make a network namespace here: {error}") from None
    host: OtherHost | None = None
    try:
        host = _link(name)
        _ip("link", "set", "lo", "up", namespace=name)
        yield host
    finally:
        _remove(name, host.device if host is not None else None)


def _check_can_make_namespaces() -> None:
    if not sys.platform.startswith("linux"):
        raise OtherHostUnavailable(f"network namespaces are Linux only (this is {sys.platform})")
    if os.geteuid() != 0:
        raise OtherHostUnavailable(
            f"making a network namespace needs root; this process runs as uid {os.geteuid()}"
        )
    # a fresh Debian machine may not have it
    debian_program(
        "iproute2", _ip_program, OtherHostUnavailable, "the `ip` program is not installed"
    )


def _ip_program() -> Path | None:
    found = shutil.which("ip")
    return Path(found) if found else None


def _link(namespace: str) -> OtherHost:
    """Claim a free ``/24`` of the test range: a veth pair, addressed and up, into ``namespace``."""
    start = (os.getpid() * 7 + int(namespace.rsplit("-", 1)[1])) % _LINKS  # spread the claims
    for offset in range(_LINKS):
        index = (start + offset) % _LINKS
        first = int(TEST_NETWORK.network_address) + index * 2 ** (32 - _LINK_PREFIX)
        network = ipaddress.IPv4Network((first, _LINK_PREFIX))
        if _in_use(network):
            continue
        device, peer = f"rmt{index}h", f"rmt{index}n"
        try:  # the device's name is the claim: a second process fails here ("File exists")
            _ip("link", "add", device, "type", "veth", "peer", "name", peer, "netns", namespace)
        except RuntimeError:
            continue
        gateway, address = str(network[1]), str(network[2])
        _ip("addr", "add", f"{gateway}/{_LINK_PREFIX}", "dev", device)
        _ip("link", "set", device, "up")
        _ip("addr", "add", f"{address}/{_LINK_PREFIX}", "dev", peer, namespace=namespace)
        _ip("link", "set", peer, "up", namespace=namespace)
        return OtherHost(namespace, address, gateway, device)
    raise OtherHostUnavailable(f"every /{_LINK_PREFIX} of {TEST_NETWORK} is in use here")


def _in_use(network: ipaddress.IPv4Network) -> bool:
    """Whether an address or a route of this host overlaps ``network`` (``default`` aside)."""
    words = _ip("-4", "-o", "addr", "show").split() + _ip("-4", "route", "show").split()
    for word in words:
        with contextlib.suppress(ValueError):
            if word.count(".") == 3 and ipaddress.IPv4Network(word, strict=False).overlaps(network):
                return True
    return False


def _remove(namespace: str, device: str | None) -> None:
    """Kill what runs in ``namespace``, then remove the veth pair and the namespace."""
    with contextlib.suppress(RuntimeError):
        for pid in _ip("netns", "pids", namespace).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    if device is not None:
        with contextlib.suppress(RuntimeError):  # gone already when the namespace went first
            _ip("link", "del", device)
    with contextlib.suppress(RuntimeError):
        _ip("netns", "del", namespace)


def _remove_orphans() -> None:
    """Remove the namespaces of test processes that no longer run (killed before cleaning up)."""
    for line in _ip("netns", "list").splitlines():
        name = line.split(" ", 1)[0]
        parts = name.split("-")
        if len(parts) != 3 or f"{parts[0]}-" != _NAMESPACE_PREFIX or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            _remove(name, None)
        except PermissionError:
            pass


def _ip(*args: str, namespace: str | None = None) -> str:
    """``ip ARGS``'s output (run in ``namespace`` when given); ``RuntimeError`` with its words."""
    prefix = ["ip", "netns", "exec", namespace, "ip"] if namespace else ["ip"]
    done = subprocess.run([*prefix, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.stdout}")
    return done.stdout
