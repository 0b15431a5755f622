"""Shared fixtures: a private edgelr cache, and a real sshd on 127.0.0.1 (the "device" for remote profiling and export --to).

The device is this machine, so its python is this interpreter (sys.executable): it has numpy and
onnxruntime. Needs: apt-get install -y openssh-server openssh-client (the tests skip without them).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from edgelr.demo import build_model, synthetic_images

SSHD = "/usr/sbin/sshd"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Latency tables and calibration statistics go to a cache of the test session, not ~/.cache
    (tests that need a cold cache set EDGELR_CACHE themselves)."""
    monkeypatch.setenv("EDGELR_CACHE", str(tmp_path_factory.getbasetemp() / "edgelr-cache"))


@pytest.fixture()
def torch_one_thread():
    """Torch on one thread for the test (small models train faster so, beside other work on 2 cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """models/diffusion_tiny's DDPM and text-to-image pipelines saved (ROOT/ddpm, ROOT/sd) and exported for x86-cpu
    (ROOT/ddpm.out, ROOT/sd.out), once per session, torch at one thread (the machine is shared). Read only."""
    import torch

    from edgelr.deploy.pipeline import export_pipeline
    from models import diffusion_tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-pipelines")
    try:
        for name, save in (("ddpm", diffusion_tiny.save_ddpm), ("sd", diffusion_tiny.save_text_to_image)):
            export_pipeline(save(root / name), "x86-cpu", root / f"{name}.out", progress=False)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture()
def demo(tmp_path, monkeypatch):
    """edgelr demo's small convnet (m.onnx) and 8 calibration images (calib.npz), with a cold cache of its own."""
    monkeypatch.setenv("EDGELR_CACHE", str(tmp_path / "cache"))
    onnx.save(build_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", image=synthetic_images(8, seed=1))
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    if not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("needs OpenSSH (apt-get install -y openssh-server openssh-client)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key", "other_host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    port = free_port()
    config = d / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'client_key.pub'}\nPidFile {d / 'sshd.pid'}\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nMaxStartups 50\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    log = open(d / "sshd.log", "wb")  # noqa: SIM115  (sshd writes to it until the fixture ends)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.05)
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    other = (d / "other_host_key.pub").read_text().split()
    (d / "wrong_known_hosts").write_text(f"[127.0.0.1]:{port} {other[0]} {other[1]}\n")
    onnx.save(build_model(), d / "m.onnx")
    env = {
        "dir": d, "port": port, "proc": proc, "host": f"{getpass.getuser()}@127.0.0.1",
        "kw": {"port": port, "identity": d / "client_key", "known_hosts": d / "known_hosts",
               "python": sys.executable, "timeout": 20},
        "model": d / "m.onnx", "feed": {"image": synthetic_images(1, seed=1).astype(np.float32)},
    }
    yield env
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


