"""Running the server: bind the socket here (so a taken port is one clear line), then uvicorn with
uvloop and httptools, in one process or N workers sharing the socket.

SIGHUP reloads the config (reload.py): one process handles it itself; with workers, the
supervisor passes it on to each of them, where uvicorn's own would restart them all.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import re
import resource
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uvicorn import Config
    from uvicorn.supervisors.multiprocess import Multiprocess, Process

    from llmrouter.settings import MetricsSettings, ServerSettings

__all__ = ["SUPERVISOR_PID", "ServeError", "bind", "serve"]

_MAX_FILES = 1 << 20
# Where a worker finds its supervisor, to have every worker reload (POST /api/v1/admin/reload).
SUPERVISOR_PID = "LLMROUTER_SUPERVISOR_PID"


class ServeError(Exception):
    """Cannot serve; the message is one line naming the cause."""


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if not 0 <= port <= 65535:
        sock.close()
        raise ServeError(f"port {port} is not between 0 and 65535")
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == 98:  # EADDRINUSE
            raise ServeError(f"port {port} on {host} is already in use") from None
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _raise_file_limit() -> None:
    """Each connection is a file descriptor, and the soft limit is often 1,024 while the hard one
    is far higher: take what the system allows, so that a thousand idle sockets (until their idle
    deadline closes them) do not turn away the next client. Inherited by the workers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _MAX_FILES if hard == resource.RLIM_INFINITY else min(hard, _MAX_FILES)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


_METRICS_FILE = re.compile(r"^(counter|histogram|summary|gauge_[a-z]+)_\d+\.db$")
# prometheus-client reads it when first imported: set (or unset) before anything imports it.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextlib.contextmanager
def _shared_metrics(workers: int, settings: MetricsSettings) -> Iterator[None]:
    """Under --workers N, the workers' metrics meet in one directory (prometheus-client's
    multiprocess mode): `PROMETHEUS_MULTIPROC_DIR` if the operator set one, else a new one that is
    removed at the end. It starts empty (figures of an earlier run are not this run's), and the
    supervisor serves `metrics.listen`, if set."""
    if workers == 1 or not settings.enabled:
        os.environ.pop(MULTIPROCESS_ENV, None)  # one process: its own registry
        yield
        return
    given = os.environ.get(MULTIPROCESS_ENV)
    directory = given or tempfile.mkdtemp(prefix="llmrouter-metrics-")
    os.makedirs(directory, exist_ok=True)
    files = glob.glob(os.path.join(directory, "*.db"))
    foreign = [f for f in files if not _METRICS_FILE.match(os.path.basename(f))]
    if foreign:  # a scrape reads every *.db there: the folder must be the metrics' alone
        raise ServeError(
            f"{MULTIPROCESS_ENV}={directory} holds {os.path.basename(foreign[0])}, which is not a "
            "metrics file: give the metrics a folder of their own"
        )
    for stale in files:
        os.remove(stale)
    os.environ[MULTIPROCESS_ENV] = directory
    listener = None
    try:
        if settings.listen is not None:
            from llmrouter.obs.metrics import Listener

            try:
                listener = Listener(settings.listen, None)
            except OSError as exc:
                raise ServeError(str(exc)) from None
        yield
    finally:
        if listener is not None:
            listener.shutdown()
        if not given:
            shutil.rmtree(directory, ignore_errors=True)


def serve(
    sock: socket.socket,
    workers: int,
    config_path: str | None,
    settings: ServerSettings,
    metrics: MetricsSettings,
) -> None:
    """Serve on a socket from `bind`, until interrupted."""
    import uvicorn

    from llmrouter.api.protocol import EdgeProtocol

    _raise_file_limit()

    if config_path:
        os.environ["LLMROUTER_CONFIG"] = config_path
    else:
        os.environ.pop("LLMROUTER_CONFIG", None)
    config = uvicorn.Config(
        "llmrouter.app:create_app_from_environment",
        factory=True,
        loop="uvloop",
        # httptools, with the edge's bounds on what a client may send and how slowly.
        # (A partial, not a class, so that it pickles for the worker processes.)
        http=functools.partial(EdgeProtocol, server=settings),  # type: ignore[arg-type]
        ws="none",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,  # llmrouter does not use client addresses; skip the middleware
        date_header=True,
        workers=workers,
    )
    server = uvicorn.Server(config)
    with _shared_metrics(workers, metrics):
        if workers > 1:
            os.environ[SUPERVISOR_PID] = str(os.getpid())
            _supervisor(config, sock).run()
        else:
            os.environ.pop(SUPERVISOR_PID, None)
            server.run(sockets=[sock])


def _supervisor(config: Config, sock: socket.socket) -> Multiprocess:
    """uvicorn's supervisor, SIGHUP passed on to every worker as a reload. uvicorn's own restarts
    them, which cuts what they have in flight and, with a broken file, leaves none serving."""
    from uvicorn.supervisors.multiprocess import Multiprocess, logger

    class Supervisor(Multiprocess):
        def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
            super().__init__(config, sockets)
            self.to_reload: list[Process] = []

        def handle_hup(self) -> None:
            logger.info("Received SIGHUP: every worker reloads the config.")
            self.to_reload = list(self.processes)

        def handle_signals(self) -> None:
            super().handle_signals()
            # A worker handles SIGHUP once it has started (a starting one would die of it), so
            # one still starting is signalled when it has; one replaced meanwhile reads the file
            # anew anyway.
            waiting = []
            for process in self.to_reload:
                if process not in self.processes or process.pid is None:
                    continue
                if process.is_ready(timeout=1):
                    os.kill(process.pid, signal.SIGHUP)
                else:
                    waiting.append(process)
            self.to_reload = waiting

    return Supervisor(config, sockets=[sock])
