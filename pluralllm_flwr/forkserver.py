"""Warm ClientApp starts for SuperNodes: Flower and torch imported once, still one process per message.

flwr 1.42's SuperExec starts a new `flwr-clientapp` process for every message, and each spends seconds
of CPU importing Flower and torch before training for a fraction of that (docs/deployment.md, "Speed").
This fork server imports them once; for every message it forks a child that runs Flower's own
`flwr-clientapp` entry point with that message's command line, environment, working directory and
standard streams. Each message still gets a fresh process that exits after its reply; only the
imported modules are shared (copy-on-write). Nothing in flwr is patched: the SuperExec starts
`flwr-clientapp` by name from PATH, so a SuperNode whose PATH starts with `<dir>/bin` runs the
launcher written there, which hands its command line to the server or, when no server answers,
runs Flower's own `flwr-clientapp` unchanged.

    pluralllm deploy clientapp-server DIR     # then start the SuperNode with PATH=DIR/bin:$PATH

The app's own modules are never preloaded: each child imports them from the run's FAB, as Flower's
own process does, so the code that runs is the code the run shipped.
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path

# Flower's ClientApp process and the heavy libraries the app imports; not the app itself.
PRELOAD = ("flwr.supernode.cli", "flwr.supernode.runtime.run_clientapp", "flwr.app", "flwr.clientapp",
           "flwr.clientapp.mod", "torch", "numpy", "safetensors.torch", "psutil")
FLOWER_CLIENTAPP = Path(sys.executable).with_name("flwr-clientapp")
SOCKET_NAME, LAUNCHER = "clientapp.sock", "flwr-clientapp"
_APP_PACKAGE = __name__.split(".")[0]
_HEADER = struct.Struct("!I")

LAUNCHER_SOURCE = '''#!{python} -S
# Written by {module}: runs this flwr-clientapp in the warm fork server, or Flower's own when none answers.
import json, os, signal, socket, struct, sys
SERVER, FLOWER = {socket!r}, {flower!r}
try:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(SERVER)
except OSError:
    os.execv(FLOWER, [FLOWER, *sys.argv[1:]])
for fd in (0, 1, 2):  # a closed standard stream cannot be handed over: /dev/null takes its place
    try:
        os.fstat(fd)
    except OSError:
        os.open(os.devnull, os.O_RDWR)
payload = json.dumps({{"argv": [FLOWER, *sys.argv[1:]], "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
message = struct.pack("!I", len(payload)) + payload
try:
    sock.sendall(message[socket.send_fds(sock, [message], [0, 1, 2]):])
    replies = sock.makefile()
    started = replies.readline()
except OSError:
    started = ""
if not started.startswith("pid "):  # the server did not start it: nothing ran, so run Flower's own
    os.execv(FLOWER, [FLOWER, *sys.argv[1:]])
child = int(started.split()[1])
for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(number, lambda n, _: os.kill(child, n))
ended = replies.readline()
code = int(ended.split()[1]) if ended.startswith("exit ") else 1
if code < 0:  # the child died of a signal: so does this process
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
'''


class ForkServerError(RuntimeError):
    """The fork server cannot start."""


def launcher_dir(directory: str | Path) -> Path:
    """The folder a SuperNode's PATH must start with to run the fork server of `directory`."""
    return Path(directory) / "bin"


def write_launcher(directory: str | Path, socket_path: str | Path, flower: str | Path = FLOWER_CLIENTAPP) -> Path:
    """`<directory>/bin/flwr-clientapp`, the launcher a SuperNode runs once its PATH starts with
    `launcher_dir(directory)`. Returns that folder."""
    bin_dir = launcher_dir(Path(directory).resolve())
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / LAUNCHER
    launcher.write_text(LAUNCHER_SOURCE.format(python=sys.executable, module=__name__,
                                               socket=str(Path(socket_path).resolve()), flower=str(flower)))
    launcher.chmod(0o755)
    return bin_dir


def serve(socket_path: str | Path, preload: Sequence[str] = PRELOAD, ready=None) -> None:
    """Import `preload`, listen on `socket_path` (owner-only), and fork a ClientApp per request
    until SIGTERM or SIGINT. `ready()` is called once it listens."""
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError as ex:
            raise ForkServerError(f"cannot preload module {name!r}: {ex}") from ex
    if threading.active_count() > 1:  # fork copies one thread: locks another holds would stay held
        raise ForkServerError(f"importing {list(preload)} started threads; the fork server needs a single thread")
    for fd in (0, 1, 2):  # so that the streams a request brings arrive as descriptors 3 and up
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    path = Path(socket_path)
    if path.exists():
        path.unlink()
    listener = socket.socket(socket.AF_UNIX)
    old_umask = os.umask(0o077)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    Server(listener).run(ready)


class Server:
    """One thread, one selector: new requests on the listener, ended children through SIGCHLD's
    wake-up socket, and launchers that went away (their child is then stopped)."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.wake_read, self.wake_write = socket.socketpair()
        self.children: dict[int, socket.socket | None] = {}   # pid -> its launcher's connection
        self.stopping = False

    def run(self, ready=None) -> None:
        for s in (self.wake_read, self.wake_write):
            s.setblocking(False)
        previous = {n: signal.getsignal(n) for n in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)}
        signal.set_wakeup_fd(self.wake_write.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only wakes the selector
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wake_read, selectors.EVENT_READ)
        if ready is not None:
            ready()
        try:
            while not self.stopping:
                for key, _ in self.selector.select():
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self.wake_read:
                        self._reap()
                    else:
                        self._launcher_gone(key.fileobj, key.data)
        finally:
            signal.set_wakeup_fd(-1)
            for number, handler in previous.items():
                signal.signal(number, handler)
            path = self.listener.getsockname()
            self.listener.close()
            Path(path).unlink(missing_ok=True)

    def _stop(self, *_) -> None:
        self.stopping = True

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            conn.settimeout(10.0)
            request, fds = _receive_request(conn)
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
                if pid == 0:
                    self._become_clientapp(request, fds)  # never returns
            finally:
                for fd in fds:  # the child has its own copies
                    os.close(fd)
        except Exception as ex:  # noqa: BLE001 - nothing ran: the launcher runs Flower's own process
            print(f"[forkserver] refused a request: {ex!r}", file=sys.stderr, flush=True)
            conn.close()
            return
        self.children[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)
        try:
            conn.sendall(f"pid {pid}\n".encode())
        except OSError:
            self._launcher_gone(conn, pid)

    def _launcher_gone(self, conn: socket.socket, pid: int) -> None:
        """The launcher sends nothing after its request, so readable means it went away: stop its child."""
        self.selector.unregister(conn)
        conn.close()
        if self.children.get(pid) is conn:
            self.children[pid] = None
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        try:
            while self.wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is not None:
                self.selector.unregister(conn)
                try:
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()

    def _become_clientapp(self, request: dict, fds: list[int]) -> None:
        """In the forked child: take the launcher's streams, directory, environment and command line,
        forget the server, and run Flower's `flwr-clientapp` as a fresh process would."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(number, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.setsid()  # the SuperNode's process, not the server's: a Ctrl-C to the server must not reach it
            self.selector.close()
            for s in (self.listener, self.wake_read, self.wake_write, *filter(None, self.children.values())):
                s.close()
            for target, fd in enumerate(fds):  # received as 3 and up: the server keeps 0-2 open (serve)
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = list(request["argv"])
            sys.path[0] = os.path.dirname(sys.argv[0])  # as for the script itself, not the server's folder
            for name in [m for m in sys.modules if m == _APP_PACKAGE or m.startswith(_APP_PACKAGE + ".")]:
                del sys.modules[name]  # the app comes from the run's FAB, never from the server's copy
            from flwr.supernode.cli import flwr_clientapp
            try:
                flwr_clientapp()
                code = 0
            except SystemExit as ex:  # as the interpreter ends on it: a non-integer code is printed, exit 1
                if ex.code is None or isinstance(ex.code, int):
                    code = ex.code or 0
                else:
                    print(ex.code, file=sys.stderr)
                    code = 1
        except BaseException:  # noqa: BLE001 - a child must never return into the server's loop
            traceback.print_exc()
        finally:
            try:
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


def _receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One launcher request: a length-prefixed JSON {argv, env, cwd} with its three standard streams."""
    data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
    try:
        if len(fds) != 3:
            raise ValueError(f"expected the launcher's 3 standard streams, got {len(fds)} descriptors")
        while len(data) < _HEADER.size:
            data += _recv_some(conn)
        (size,) = _HEADER.unpack_from(data)
        while len(data) < _HEADER.size + size:
            data += _recv_some(conn)
        request = json.loads(data[_HEADER.size:_HEADER.size + size])
        if set(request) != {"argv", "env", "cwd"}:
            raise ValueError(f"a request holds argv, env and cwd, not {sorted(request)}")
        return request, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _recv_some(conn: socket.socket) -> bytes:
    chunk = conn.recv(65536)
    if not chunk:
        raise ValueError("the launcher closed the connection mid-request")
    return chunk


def run(directory: str | Path, preload: Sequence[str] = PRELOAD) -> None:
    """The fork server of `directory` (created, owner-only): its socket and bin/flwr-clientapp."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    socket_path = directory / SOCKET_NAME
    if len(str(socket_path).encode()) > 100:  # AF_UNIX paths are limited to 108 bytes on Linux
        raise ForkServerError(f"{socket_path} is too long for a Unix socket; choose a shorter folder")
    bin_dir = write_launcher(directory, socket_path)

    def ready() -> None:
        print(f"clientapp-server: ready on {socket_path}; start each SuperNode with PATH={bin_dir}:$PATH", flush=True)
    serve(socket_path, preload, ready)


if __name__ == "__main__":  # python -m pluralllm_flwr.forkserver DIR (as `deploy local` starts it)
    run(sys.argv[1])
