"""How the service's workers share the port's connections.

BentoML's arbiter binds the port and every worker waits on that one socket. The kernel wakes the
waiters in the same order, so the worker it favours took nearly every connection: 32 keep-alive
clients split 28 / 4 over 2 workers, and the clients of the busy one waited 7 times longer (the c32
p99 ~1.6 x the p50). Two mechanisms spread them:

- dealing: each worker binds a socket of its own to the port (SO_REUSEPORT), and a classic BPF
  program on the port's group deals each new connection to a worker's socket at random;
- evening out: dealt at random, 32 connections still split 13 / 19 often enough (59 against 86 ms
  at the median), so a worker holding two or more connections than the least loaded one answers
  with `connection: close`, and the client's next connection is dealt again.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import socket
import struct
from pathlib import Path

logger = logging.getLogger(__name__)

API_SERVER_SOCKET = "_bento_api_server"  # _bentoml_impl.server.serving.API_SERVER_NAME
SO_ATTACH_REUSEPORT_CBPF = 51  # linux/socket.h; the socket module does not name it
CLOSE = [(b"connection", b"close")]


class ConnectionShares(set):
    """This worker's open connections, as uvicorn keeps them (server_state.connections), whose count
    goes, as each opens and closes, to the worker's 8-byte slot in a file the server's workers map
    (next to BentoML's multiprocess metrics, named by the shared socket: one per server). Counted
    as they open, not as they are answered: counts written with the answers lagged at start-up,
    when a worker busy with its first batch had answered none, and 32 clients took ~90 closes to
    even out instead of 8-30."""

    def __init__(self, path: Path, worker: int, workers: int):
        """worker: this worker's index, 1..workers (BentoML's worker id)."""
        super().__init__()
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(descriptor).st_size < 8 * workers:
                os.ftruncate(descriptor, 8 * workers)
            self.mapped = mmap.mmap(descriptor, 8 * workers)
        finally:
            os.close(descriptor)
        self.counts = memoryview(self.mapped).cast("q")
        self.slot = worker - 1
        self.counts[self.slot] = 0

    def add(self, connection) -> None:
        super().add(connection)
        self.counts[self.slot] = len(self)

    def discard(self, connection) -> None:
        super().discard(connection)
        self.counts[self.slot] = len(self)

    def remove(self, connection) -> None:
        super().remove(connection)
        self.counts[self.slot] = len(self)

    def over_share(self) -> bool:
        """Whether this worker holds two or more connections than the least loaded one: then it
        closes the connection it is answering on."""
        return self.counts[self.slot] - min(self.counts) >= 2


worker_shares: ConnectionShares | None = None  # this worker's, once its server has started


def spread_connections_over_workers(service) -> None:
    """For the BentoML `service`: the arbiter's API socket is made SO_REUSEPORT; each worker, as uvicorn starts, binds its own
    socket beside it, sets the dealing program, and keeps serving the shared socket too. The shared
    socket (index 0 of the port's group, bound first) is dealt no connection while every worker
    listens. While one restarts, the group is a socket short, and a pick past its end falls back to
    the kernel's hash over all of them, the shared socket included, which every worker still serves.
    Where the kernel refuses the program (not Linux), the worker serves the shared socket alone, as
    before, and closes no connection (the next one would land on the same favoured worker)."""
    from circus.sockets import CircusSocket
    import uvicorn

    if getattr(CircusSocket, "_maas_reuseport", False):
        return
    circus_init, uvicorn_startup = CircusSocket.__init__, uvicorn.Server.startup

    def init(self, *args, **kwargs):  # the arbiter: its API socket lets the workers bind the port too
        circus_init(self, *args, **kwargs)
        # Set here, not as circus's so_reuseport: with that, circus hands each process a socket of
        # its own instead of the shared one, and the shared one, still listening, keeps its share
        # of the connections unanswered.
        if kwargs.get("name") == API_SERVER_SOCKET and not self.is_unix and hasattr(socket, "SO_REUSEPORT"):
            self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    async def startup(self, sockets=None):  # a worker: its own socket first, the shared one still served
        global worker_shares
        if sockets:
            workers = api_worker_count(service)
            owned = [own for own in (own_listener(shared, workers) for shared in sockets)
                     if own is not None]
            if owned:
                worker_shares = shares_file(sockets[0], workers)
                if worker_shares is not None:  # uvicorn's protocols add and discard themselves here
                    self.server_state.connections = worker_shares
            sockets = owned + list(sockets)
        await uvicorn_startup(self, sockets)

    CircusSocket.__init__, uvicorn.Server.startup = init, startup
    CircusSocket._maas_reuseport = True


def api_worker_count(service) -> int:
    """How many API workers BentoML starts for the service (its allocator: `workers`, "cpu_count",
    and any BentoML configuration over them)."""
    from _bentoml_impl.server.allocator import ResourceAllocator

    return ResourceAllocator().get_worker_env(service)[0]


def shares_file(shared: socket.socket, workers: int) -> ConnectionShares | None:
    """This worker's ConnectionShares, or None outside a BentoML worker (no worker id, no metrics folder)."""
    from bentoml._internal.context import server_context

    folder, worker = os.environ.get("PROMETHEUS_MULTIPROC_DIR"), server_context.worker_index
    if not folder or not worker or not 1 <= worker <= workers:
        return None
    path = Path(folder) / f"maas-connections-{os.fstat(shared.fileno()).st_ino}"
    return ConnectionShares(path, worker, workers)


def attach_dealing_program(listener: socket.socket, workers: int) -> None:
    """Sets `A = random; A %= workers; A += 1; return A` on the listener's SO_REUSEPORT group: the
    group's socket to take each new connection, past the shared one at index 0."""
    random_word = (-0x1000 + 56) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_RANDOM
    instructions = [(0x20, random_word),  # BPF_LD | BPF_W | BPF_ABS
                    (0x94, workers),  # BPF_ALU | BPF_MOD | BPF_K
                    (0x04, 1),  # BPF_ALU | BPF_ADD | BPF_K
                    (0x16, 0)]  # BPF_RET | BPF_A
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", op, 0, 0, k) for op, k in instructions))
    program = struct.pack("@HP", len(instructions), ctypes.addressof(code))  # struct sock_fprog
    listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, program)


def own_listener(shared: socket.socket, workers: int) -> socket.socket | None:
    """This worker's socket, bound to the port beside the shared one (SO_REUSEPORT), to join the
    port's group as it listens; or None where the shared socket is not in such a group (another
    server, a Unix socket, one worker) or the kernel refuses the dealing program."""
    if (workers < 2 or shared.family not in (socket.AF_INET, socket.AF_INET6) or not hasattr(socket, "SO_REUSEPORT")
            or not shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)):
        return None
    own = None
    try:
        attach_dealing_program(shared, workers)
        own = socket.socket(shared.family, socket.SOCK_STREAM)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        own.bind(shared.getsockname())
        # Not listening yet: the event loop listens when uvicorn starts serving, after the service
        # has loaded its models. Listening now, the socket would be dealt connections to hold
        # unanswered through the load.
        own.setblocking(False)
        return own
    except OSError as error:
        if own is not None:
            own.close()
        logger.warning("connections go to whichever worker accepts first: %s", error)
        return None
