"""`edgelr.remote.profile_remote` against a real sshd on 127.0.0.1 (the `sshd` fixture in conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

from edgelr.errors import EdgelrError
from edgelr.measure.profile import profile_model
from edgelr.measure.remote import RemoteRunError, profile_remote


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (the sshd processes serving each connection)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _leftover_dirs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("edgelr.*")}


def test_remote_profile_has_the_local_node_table(sshd):
    before = _leftover_dirs()
    seen = []
    p = profile_remote(sshd["host"], sshd["model"], sshd["feed"], 8, 2, 1, **sshd["kw"],
                       progress=lambda i, ms: seen.append(i))
    local = profile_model(sshd["model"], sshd["feed"], runs=8, warmup=2)
    assert seen == list(range(8)) and p.runs == 8 and p.host == sshd["host"] and p.model == str(sshd["model"])
    assert 0 < p.latency_ms["min"] <= p.latency_ms["p50"] <= p.latency_ms["p99"] and p.peak_rss_mb > 0
    assert sorted((r["name"], r["op"]) for r in p.nodes) == sorted((r["name"], r["op"]) for r in local.nodes)
    assert set(p.to_json()) == set(local.to_json())
    assert _leftover_dirs() == before  # the remote temp dir is gone


def test_lost_connection_keeps_partial_results(sshd):
    master = sshd["proc"].pid
    killed = []

    def kill_connection(i, ms):
        if i == 20 and not killed:
            for pid in _children(master):  # the sshd serving this connection (started by this test)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    start = time.time()
    with pytest.raises(RemoteRunError) as info:
        profile_remote(sshd["host"], sshd["model"], sshd["feed"], 100000, 0, 1, **sshd["kw"], progress=kill_connection)
    assert killed and time.time() - start < 30
    assert len(info.value.partial) >= 21 and all(ms > 0 for ms in info.value.partial)
    msg = str(info.value)
    assert isinstance(info.value, EdgelrError) and "lost" in msg and "of 100000 timed runs" in msg and "missing" in msg
    assert "\n" not in msg


def test_host_key_mismatch_fails_clearly(sshd):
    kw = dict(sshd["kw"], known_hosts=sshd["dir"] / "wrong_known_hosts")
    with pytest.raises(EdgelrError, match="does NOT match") as info:
        profile_remote(sshd["host"], sshd["model"], sshd["feed"], 2, 0, 1, **kw)
    assert "ssh-keygen -R" in str(info.value)
    empty = sshd["dir"] / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(EdgelrError, match="not known.*ssh-keyscan -p"):
        profile_remote(sshd["host"], sshd["model"], sshd["feed"], 2, 0, 1, **dict(sshd["kw"], known_hosts=empty))


def test_auth_failure_fails_clearly(sshd):
    with pytest.raises(EdgelrError, match="authentication failed"):
        profile_remote(sshd["host"], sshd["model"], sshd["feed"], 2, 0, 1,
                       **dict(sshd["kw"], identity=sshd["dir"] / "other_host_key"))


@pytest.mark.parametrize("host", [
    "127.0.0.1;touch /tmp/PWNED", "127.0.0.1;touch${IFS}/tmp/PWNED", "127.0.0.1$(touch${IFS}/tmp/PWNED)",
    "-oProxyCommand=touch${IFS}/tmp/PWNED", "127.0.0.1\ntouch /tmp/PWNED", "`touch${IFS}/tmp/PWNED`@127.0.0.1",
])
def test_hostile_host_strings_run_nothing(sshd, host):
    with pytest.raises(EdgelrError, match="not a valid host"):
        profile_remote(host, sshd["model"], sshd["feed"], 2, 0, 1, **sshd["kw"])
    assert not Path("/tmp/PWNED").exists()


def test_hostile_model_file_name_runs_nothing(sshd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weird = tmp_path / "a;touch PWNED$(id).onnx"
    shutil.copy(sshd["model"], weird)
    p = profile_remote(sshd["host"], weird, sshd["feed"], 2, 0, 1, **sshd["kw"])
    assert p.model == str(weird) and p.nodes
    for folder in (tmp_path, Path.home(), Path("/tmp"), Path.cwd()):  # local and "remote" side: one machine
        assert not list(folder.glob("PWNED*")), folder


def test_missing_remote_python_or_module(sshd, tmp_path):
    with pytest.raises(EdgelrError, match="no `no-such-python3`"):
        profile_remote(sshd["host"], sshd["model"], sshd["feed"], 2, 0, 1, **dict(sshd["kw"], python="no-such-python3"))
    bare = tmp_path / "bare python"  # this interpreter without site-packages: no numpy, no onnxruntime
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    with pytest.raises(EdgelrError, match="there has no numpy; install it"):
        profile_remote(sshd["host"], sshd["model"], sshd["feed"], 2, 0, 1, **dict(sshd["kw"], python=str(bare)))


def test_runner_failure_is_one_line(sshd, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EdgelrError, match="the runner failed: bad.onnx: ONNX Runtime cannot load it") as info:
        profile_remote(sshd["host"], bad, sshd["feed"], 2, 0, 1, **sshd["kw"])
    assert "\n" not in str(info.value)


def test_unreachable_port_fails_within_the_timeout(sshd):
    start = time.time()
    with pytest.raises(EdgelrError, match="unreachable"):
        profile_remote(sshd["host"], sshd["model"], sshd["feed"], 2, 0, 1, **dict(sshd["kw"], port=free_port(), timeout=5))
    assert time.time() - start < 10


def test_cli_profile_on_a_device(sshd, tmp_path):
    """`edgelr profile --on` end to end: the same table and JSON as local, with the host recorded."""
    out = tmp_path / "remote.json"
    kw = sshd["kw"]
    run = subprocess.run(
        [sys.executable, "-m", "edgelr", "profile", str(sshd["model"]), "--on", sshd["host"], "--port", str(kw["port"]),
         "--identity", str(kw["identity"]), "--known-hosts", str(kw["known_hosts"]), "--python", sys.executable,
         "--runs", "4", "--warmup", "1", "--json", str(out),
         "--calib", str(_calib(tmp_path, sshd["feed"]))],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert data["A"]["host"] == sshd["host"] and data["A"]["latency_ms"]["p50"] > 0 and data["A"]["nodes"]


def _calib(tmp_path, feed) -> Path:
    np.savez(tmp_path / "calib.npz", **feed)
    return tmp_path / "calib.npz"
