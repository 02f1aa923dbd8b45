"""Warm ClientApp starts (forkserver.py): the launcher a SuperNode runs behaves exactly as Flower's own
`flwr-clientapp` (output, exit code, working directory, environment, signals), runs in a child of
the fork server, falls back to Flower's own without a server, and leaves no process behind."""
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from pluralllm_flwr.forkserver import FLOWER_CLIENTAPP, SOCKET_NAME, write_launcher

UNREACHABLE = ["--runtime-api-address", "127.0.0.1:9", "--token", "abc", "--insecure"]  # retries for a long time


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("forkserver")
    proc = subprocess.Popen([sys.executable, "-m", "pluralllm_flwr.forkserver", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert "ready on" in proc.stdout.readline()
    yield proc, folder / "bin" / "flwr-clientapp"
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    assert not (folder / SOCKET_NAME).exists()


def outcome(command, **kwargs):
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=120, **kwargs)
    return done.returncode, done.stdout, done.stderr


def test_the_launcher_answers_exactly_as_flowers_own(server, tmp_path):
    _, launcher = server
    (tmp_path / "empty-token").touch()
    (tmp_path / "elsewhere").mkdir()
    cases = [(["--help"], {}),
             (["--no-such-flag"], {}),
             (["--token-file", "empty-token"], {"cwd": tmp_path}),   # read from the launcher's directory ...
             (["--token-file", "empty-token"], {"cwd": tmp_path / "elsewhere"}),
             (["--token-file", "~/empty-token"], {"env": {"HOME": str(tmp_path)}}),  # ... and its environment
             (["--token-file", "~/empty-token"], {"env": {"HOME": str(tmp_path / "elsewhere")}})]
    answers = set()
    for args, kwargs in cases:
        warm = outcome([launcher, *args], **kwargs)
        assert warm == outcome([FLOWER_CLIENTAPP, *args], **kwargs), args
        answers.add(warm)
    assert len(answers) == 4  # the cases differ, so equal answers are not one fixed reply
    assert sum("does not contain a token" in answer[2] for answer in answers) == 1


def test_a_message_runs_in_a_child_of_the_server_and_stops_with_its_launcher(server):
    proc, launcher = server
    launched = subprocess.Popen([launcher, *UNREACHABLE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = wait_for_child(proc.pid)
    assert child.pid != launched.pid
    launched.kill()   # SIGKILL: nothing can be forwarded, so the server stops the child itself
    launched.wait()
    child.wait(timeout=30)
    assert psutil.Process(proc.pid).children() == []


def test_a_signal_to_the_launcher_ends_the_child_as_it_ends_flowers_own(server):
    proc, launcher = server
    codes = []
    for command in ([launcher, *UNREACHABLE], [FLOWER_CLIENTAPP, *UNREACHABLE]):
        started = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in started.stderr:  # Flower's signal handlers are in place once it tries to connect
            if "Connection attempt failed" in line:
                break
        started.send_signal(signal.SIGTERM)
        started.stderr.close()
        codes.append(started.wait(timeout=60))
    assert codes[0] == codes[1]
    assert psutil.Process(proc.pid).children() == []


def test_without_a_server_the_launcher_runs_flowers_own(tmp_path):
    launcher = write_launcher(tmp_path, tmp_path / "nobody-listens.sock") / "flwr-clientapp"
    assert outcome([launcher, "--no-such-flag"]) == outcome([FLOWER_CLIENTAPP, "--no-such-flag"])


def test_a_server_that_refuses_leaves_the_message_to_flowers_own(tmp_path):
    path = tmp_path / "refusing.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    def refuse():
        conn, _ = listener.accept()
        conn.close()
    refuser = threading.Thread(target=refuse, daemon=True)
    refuser.start()
    launcher = write_launcher(tmp_path, path) / "flwr-clientapp"
    assert outcome([launcher, "--no-such-flag"]) == outcome([FLOWER_CLIENTAPP, "--no-such-flag"])
    refuser.join(timeout=5)
    assert not refuser.is_alive()  # the launcher did ask
    listener.close()


def wait_for_child(pid: int, timeout: float = 30.0) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children()
        if children:
            return children[0]
        time.sleep(0.1)
    raise AssertionError(f"the fork server {pid} started no child within {timeout:.0f} s")


def test_the_cli_serves_with_the_modules_it_is_told_to_preload(tmp_path):
    folder = tmp_path / "warm"
    proc = subprocess.Popen([sys.executable, "-m", "pluralllm_flwr.cli", "deploy", "clientapp-server", str(folder),
                             "--preload", "json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"PATH={folder / 'bin'}:$PATH" in proc.stdout.readline()
        assert outcome([folder / "bin" / "flwr-clientapp", "--help"]) == outcome([FLOWER_CLIENTAPP, "--help"])
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_module_that_cannot_be_preloaded_is_named(tmp_path):
    done = outcome([sys.executable, "-m", "pluralllm_flwr.cli", "deploy", "clientapp-server", tmp_path / "warm",
                    "--preload", "json,no_such_module"])
    assert done[0] == 2 and "cannot preload module 'no_such_module'" in done[2]
