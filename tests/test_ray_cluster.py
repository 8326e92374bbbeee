"""The Ray engine beside a real cluster: one head started with `ray start --head` on a free loopback
port, in a temp folder of its own, with token authentication as Ray enables it by default (a token
on this machine, RAY_AUTH_MODE unset). HUDD joins it with --ray-address and gets the local engine's
results; a wrong or missing token is one line in seconds; a port that is no Ray head says so; and
without --ray-address HUDD starts a Ray of its own even while that head runs and is recorded as this
machine's cluster, RAY_ADDRESS names it, or the record is stale. A second head, started with
RAY_AUTH_MODE=disabled for one test, is joined without a token. Only the heads started here are
stopped (each its own process group), never another Ray on the machine."""
import contextlib
import http.server
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import make_tiny_case
from test_ray import _error_line, _same_results, _same_test_results, hudd, ok

pytest.importorskip("ray")

RAY = Path(sys.executable).with_name("ray")
HEAD_START_TIMEOUT = 120
AUTH_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra):
    """This environment without any Ray address or auth setting of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
    return {**env, **{k: str(v) for k, v in extra.items()}}


def _end_group(process):
    """SIGTERM to the head's process group (`ray start --block` stops its processes), then SIGKILL to
    whatever of that group is left (a GCS server can outlive its parent)."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


@contextlib.contextmanager
def _head(**env):
    """A head on 127.0.0.1:<free port>, its Ray temp folder (RAY_TMPDIR) in a folder of its own.

    `ray start --block` keeps one process that owns the head's processes; ending its process group
    stops exactly this head. The folder is short because Ray's socket paths live inside it.
    """
    root = Path(tempfile.mkdtemp(prefix="hudd-ray-"))
    port = _free_port()
    log = open(root / "head.log", "w")
    process = subprocess.Popen([str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                                "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                                "--disable-usage-stats"],
                               env=_env(RAY_TMPDIR=root, **env), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.time() + HEAD_START_TIMEOUT
        while "Ray runtime started" not in (root / "head.log").read_text():
            assert process.poll() is None, (root / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the head did not start in time: " + (root / "head.log").read_text()[-3000:]
            time.sleep(1)
        yield {"address": f"127.0.0.1:{port}", "root": root, "process": process,
               "log": (root / "head.log").read_text()}
    finally:
        _end_group(process)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """The head as Ray 2.60 starts it by default: a token on this machine and RAY_AUTH_MODE unset turn
    token authentication on (the token is the test's own file, so ~/.ray is not touched)."""
    token = tmp_path_factory.mktemp("token") / "auth_token"
    token.write_text(secrets.token_hex(32))
    with _head(RAY_AUTH_TOKEN_PATH=token) as started:
        assert "Token authentication is enabled" in started["log"]
        yield {**started, "token": token}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """The tiny case through the assign step on the local engine, and untouched copies for the Ray runs."""
    root = tmp_path_factory.mktemp("raycluster")
    fresh = make_tiny_case(root / "fresh")
    copies = {name: shutil.copytree(fresh, root / name) for name in ("local", "joined", "recorded", "stale", "open")}
    ok(hudd(copies["local"], "-step", "assign", env=_env()))
    return copies


def test_joining_a_token_protected_head_gives_the_local_results(head, cases):
    """A driver with the cluster's token (RAY_AUTH_MODE unset, as after `ray start --head` with Ray's
    defaults) joins by address for the test and assign steps."""
    started = time.time()
    result = ok(hudd(cases["joined"], "-step", "assign", "--engine", "ray", "--ray-address", head["address"],
                     "--workers", "2", env=_env(RAY_AUTH_TOKEN_PATH=head["token"])))
    assert "InvalidAuthToken" not in result.stderr, result.stderr[-2000:]
    assert time.time() - started < 600
    _same_results(cases["local"], cases["joined"])
    assert head["process"].poll() is None


def _one_line_in_seconds(case, address, env):
    started = time.time()
    result = hudd(case, "-step", "test", "--engine", "ray", "--ray-address", address, env=env)
    line = _error_line(result)
    assert [text for text in result.stderr.splitlines() if text.strip()] == [line], result.stderr
    assert time.time() - started < 60
    assert f"--ray-address {address}:" in line
    return line


def test_a_wrong_or_missing_token_is_one_line_naming_the_address(head, tmp_path, tiny_case):
    address = head["address"]
    line = _one_line_in_seconds(tiny_case, address, _env(RAY_AUTH_TOKEN="0" * 64, RAY_AUTH_TOKEN_PATH=head["token"]))
    assert "requires its auth token" in line and "refused" in line and "RAY_AUTH_TOKEN" in line
    line = _one_line_in_seconds(tiny_case, address, _env(HOME=tmp_path))
    assert "requires its auth token" in line and "has none" in line and "~/.ray/auth_token" in line
    line = _one_line_in_seconds(tiny_case, address, _env(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN_PATH=head["token"]))
    assert "RAY_AUTH_MODE=disabled" in line
    assert not (tiny_case / "testResult.csv").exists()


def test_a_port_that_is_no_ray_head_says_so(tiny_case):
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        line = _one_line_in_seconds(tiny_case, f"127.0.0.1:{server.server_port}", _env())
    finally:
        server.shutdown()
        server.server_close()
    assert "is not a Ray head" in line


def test_without_an_address_ray_is_its_own_beside_a_running_head(head, cases):
    """The head is this machine's recorded cluster (RAY_TMPDIR) and RAY_ADDRESS names it; the run
    starts and stops a Ray of its own and leaves the head running."""
    assert (head["root"] / "ray" / "ray_current_cluster").is_file()
    ok(hudd(cases["recorded"], "-step", "test", "--engine", "ray", "--workers", "2",
            env=_env(RAY_TMPDIR=head["root"], RAY_ADDRESS=head["address"])))
    _same_test_results(cases["local"], cases["recorded"])
    assert head["process"].poll() is None


def test_without_an_address_a_stale_cluster_record_is_ignored(cases):
    """A record left by a head that was killed instead of stopped points at a dead port."""
    root = Path(tempfile.mkdtemp(prefix="hudd-stale-"))
    try:
        (root / "ray").mkdir()
        (root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
        ok(hudd(cases["stale"], "-step", "test", "--engine", "ray", "--workers", "2", env=_env(RAY_TMPDIR=root)))
        _same_test_results(cases["local"], cases["stale"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_auto_names_what_it_found(tiny_case):
    """`--ray-address auto` resolves as Ray does (RAY_ADDRESS first); a dead address is one line naming
    auto, where the address came from, and the address."""
    port = _free_port()
    line = _error_line(hudd(tiny_case, "-step", "test", "--engine", "ray", "--ray-address", "auto",
                            env=_env(RAY_ADDRESS=f"127.0.0.1:{port}")))
    assert line.startswith("error: --ray-address auto (") and f":{port}, from RAY_ADDRESS)" in line
    assert "cannot connect" in line


def test_a_cluster_that_chose_no_authentication_is_joined_without_a_token(head, cases):
    """A head started with RAY_AUTH_MODE=disabled, joined by a driver that has a token but no RAY_AUTH_MODE:
    it must not demand its token of the cluster's processes (which then cancel every actor)."""
    with _head(RAY_AUTH_MODE="disabled") as open_head:
        assert "Token authentication is enabled" not in open_head["log"]
        ok(hudd(cases["open"], "-step", "test", "--engine", "ray", "--ray-address", open_head["address"],
                "--workers", "2", env=_env(RAY_AUTH_TOKEN_PATH=head["token"])))
    _same_test_results(cases["local"], cases["open"])
