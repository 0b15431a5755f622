"""Latency profiling on another machine over SSH (a Raspberry Pi, a Jetson): the OpenSSH client only.

    p = profile_remote("pi@raspberrypi.local", Path("m.onnx"), feed, runs=50, warmup=5, threads=4)

The device needs only python3 with numpy and onnxruntime. Steps, each one a separate `ssh` call with
its own timeout: make a temp dir (`mktemp -d`), copy `edgelr/runner.py`, the model and the inputs (.npz)
into it under fixed names (streamed over ssh's stdin: no scp/sftp needed, and local file names never
reach the remote shell), run the runner and read its JSON lines as they come, remove the temp dir.
`run_runner` is one such call for any command that ends in the runner (edgelr.measure.device's batches).

Safety: subprocess argument lists only (never a local shell); every word of a remote command is
shlex-quoted; the host string is checked against a strict pattern, so it can be neither an ssh option
nor shell text. Host keys are verified (StrictHostKeyChecking=yes) and BatchMode=yes never prompts.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path

import numpy as np

from edgelr.errors import EdgelrError
from edgelr.measure import runner as _runner_module
from edgelr.measure.profile import Profile

# [user@]host: host a DNS name / IPv4 / ssh_config alias, or an IPv6 address (bare or in brackets).
_HOST = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?(?:[A-Za-z0-9_][A-Za-z0-9._-]*|\[?[0-9A-Fa-f:.]+\]?)$")
# What `mktemp -d` may hand back that we are willing to put in later commands (they are quoted anyway).
_TMPDIR = re.compile(r"^/[A-Za-z0-9._/-]+$")


class RemoteRunError(EdgelrError):
    """The run on the device stopped part way: `.partial` holds the per-run ms measured before that."""

    def __init__(self, message: str, partial: list[float]):
        super().__init__(message)
        self.partial = partial


def check_host(host: str) -> str:
    """The host string, or an EdgelrError if it could be read as an ssh option or as shell text."""
    if not isinstance(host, str) or not host:
        raise EdgelrError("no host given: use USER@HOST")
    if host.startswith("-") or any(c.isspace() for c in host) or not _HOST.fullmatch(host):
        raise EdgelrError(
            f"{host!r}: not a valid host; use USER@HOST (letters, digits, '.', '-', '_'; IPv6 in brackets), "
            "and no leading '-', spaces or shell characters"
        )
    return host


def _ssh_base(port, identity, known_hosts, timeout) -> list[str]:
    cmd = [
        "ssh", "-T", "-x", "-a",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"ConnectTimeout={max(1, int(timeout))}",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        "-o", "LogLevel=ERROR",
    ]
    if port is not None:
        if not isinstance(port, int) or not 0 < port < 65536:
            raise EdgelrError(f"--port {port}: need a TCP port, 1 to 65535")
        cmd += ["-p", str(port)]
    if identity is not None:
        identity = Path(identity)
        if not identity.is_file():
            raise EdgelrError(f"{identity}: no such identity (private key) file")
        cmd += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    if known_hosts is not None:
        known_hosts = Path(known_hosts)
        if '"' in str(known_hosts):
            raise EdgelrError(f"{known_hosts}: a known_hosts path cannot contain '\"'")
        # ssh splits this option's value on spaces (it takes a list of files): quote it.
        cmd += ["-o", f'UserKnownHostsFile="{known_hosts}"']
    return cmd


def _host_port(host: str, port) -> str:
    bare = host.split("@", 1)[-1]
    return f"[{bare}]:{port}" if port not in (None, 22) else bare


def _classify(host: str, port, known_hosts, stderr: str, what: str) -> EdgelrError:
    """One clear line for a failed ssh call (exit status 255: ssh itself, not the remote command)."""
    hp = _host_port(host, port)
    kh = str(known_hosts) if known_hosts is not None else "~/.ssh/known_hosts"
    scan = f"ssh-keyscan{' -p ' + str(port) if port not in (None, 22) else ''} {host.split('@', 1)[-1]}"
    low = stderr.lower()
    if "remote host identification has changed" in low or "host key for" in low and "has changed" in low:
        return EdgelrError(
            f"{hp}: host key does NOT match the one in {kh} (a different machine, or it was reinstalled); "
            f"if you trust the new key, run `ssh-keygen -R '{hp}' -f {kh}` and then `{scan} >> {kh}`"
        )
    if "host key verification failed" in low or "no " in low and "host key is known" in low:
        return EdgelrError(
            f"{hp}: host key is not known (not in {kh}); check the device's fingerprint and add it with "
            f"`{scan} >> {kh}`, or connect once with plain ssh"
        )
    if "permission denied" in low or "too many authentication failures" in low:
        return EdgelrError(
            f"{host}: authentication failed (key only, no passwords); pass --identity KEY or install your key "
            f"on the device with `ssh-copy-id {host}`"
        )
    for sign in ("connection refused", "timed out", "no route to host", "could not resolve", "network is unreachable",
                 "name or service not known", "connection closed", "connection reset", "invalid characters"):
        if sign in low:
            return EdgelrError(f"{hp}: unreachable while {what} ({_last_line(stderr)})")
    return EdgelrError(f"{hp}: ssh failed while {what} ({_last_line(stderr) or 'no message'})")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("Warning: Permanently")]
    return lines[-1][:200] if lines else ""


def command_line(words: list[str]) -> str:
    """One remote shell command line, every word quoted."""
    return " ".join(shlex.quote(w) for w in words)


class Device:
    """One SSH destination: every call is a separate `ssh` process with its own timeout, and a failure
    is one clear EdgelrError (unreachable, host key, authentication, or the remote command's message)."""

    def __init__(self, host: str, *, port: int | None = None, identity: Path | None = None,
                 known_hosts: Path | None = None, timeout: float = 60):
        self.host, self.port, self.known_hosts, self.timeout = check_host(host), port, known_hosts, timeout
        self.base = _ssh_base(port, identity, known_hosts, timeout) + ["--", host]

    @property
    def name(self) -> str:
        return _host_port(self.host, self.port)

    def run(self, command: str, what: str, stdin_path: Path | None = None, step_timeout: float | None = None,
            ok_codes: tuple[int, ...] = (0,)) -> str:
        """Run one remote shell command line (its words already quoted); its stdout. An exit status
        outside `ok_codes` is an EdgelrError with the command's last line of stderr."""
        step_timeout = self.timeout if step_timeout is None else step_timeout
        try:
            with open(stdin_path, "rb") if stdin_path is not None else open(os.devnull, "rb") as stdin:
                done = subprocess.run(self.base + [command], stdin=stdin, capture_output=True, timeout=step_timeout,
                                      check=False)
        except subprocess.TimeoutExpired:
            raise EdgelrError(f"{self.name}: no answer within {step_timeout:g} s while {what}") from None
        except FileNotFoundError:
            raise EdgelrError("the OpenSSH client `ssh` is not installed here (apt-get install openssh-client)") from None
        err = done.stderr.decode(errors="replace")
        if done.returncode == 255:
            raise _classify(self.host, self.port, self.known_hosts, err, what)
        self.returncode = done.returncode
        if done.returncode not in ok_codes:
            raise EdgelrError(f"{self.name}: {what} failed on the device "
                              f"({_last_line(err) or 'exit status ' + str(done.returncode)})")
        return done.stdout.decode(errors="replace")


def profile_remote(host: str, model: Path, feed: dict, runs: int = 50, warmup: int = 5, threads: int = 1, *,
                   port: int | None = None, identity: Path | None = None, known_hosts: Path | None = None,
                   timeout: float = 60, python: str = "python3", progress=None) -> Profile:
    """Profile `model` on `host` over SSH; the Profile has the same structure as a local one.

    `timeout` bounds each ssh step (connect, mkdir, each copy, cleanup) and, during the run, the silence
    between two lines of the runner's output. `progress(i, ms)`, if given, is called for each timed run.
    """
    check_host(host)
    model = Path(model)
    if not model.is_file():
        raise EdgelrError(f"{model}: no such file; check the path to the ONNX model")
    if runs < 1 or warmup < 0 or threads < 1:
        raise EdgelrError(f"--runs {runs}, --warmup {warmup}, --threads {threads}: need runs >= 1, warmup >= 0, threads >= 1")
    device = Device(host, port=port, identity=identity, known_hosts=known_hosts, timeout=timeout)
    made = device.run(command_line(["mktemp", "-d", "/tmp/edgelr.XXXXXXXX"]), "making a temp dir").strip()
    if not _TMPDIR.fullmatch(made):
        raise EdgelrError(f"{_host_port(host, port)}: `mktemp -d` gave an unexpected answer {made[:80]!r}")
    try:
        with tempfile.TemporaryDirectory(prefix="edgelr-remote-") as tmp:
            inputs = Path(tmp) / "inputs.npz"
            np.savez(inputs, **{k: np.asarray(v) for k, v in feed.items()})
            for local, name in ((Path(_runner_module.__file__), "runner.py"), (model, "model.onnx"), (inputs, "inputs.npz")):
                device.run(command_line(["cat"]) + " > " + shlex.quote(f"{made}/{name}"), f"copying {name}", stdin_path=local)
        command = "cd " + shlex.quote(made) + " && " + command_line([
            python, "-u", "runner.py", "model.onnx", "--inputs", "inputs.npz",
            "--runs", str(int(runs)), "--warmup", str(int(warmup)), "--threads", str(int(threads)),
        ])
        data = _stream(device.base + [command], host, port, known_hosts, python, runs, timeout, progress, model.name)
    finally:
        try:  # best effort: after a lost connection this may fail too
            device.run(command_line(["rm", "-rf", "--", made]), "removing the temp dir", step_timeout=min(timeout, 15))
        except EdgelrError:
            pass
    data["model"] = os.fspath(model)
    data["host"] = host
    return Profile(**data)


def _json_lines(cmd: list[str], timeout: float, on_message, stdin_path: Path | None = None) -> tuple[int, str, bool]:
    """Run `cmd` (an ssh call), handing each JSON object it prints to on_message(obj) as it comes: (its exit
    status, its stderr, whether it fell silent for `timeout` s and was stopped)."""
    with tempfile.TemporaryFile() as errfile, open(stdin_path or os.devnull, "rb") as stdin:
        try:
            proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=errfile)
        except FileNotFoundError:
            raise EdgelrError("the OpenSSH client `ssh` is not installed here (apt-get install openssh-client)") from None
        lines: queue.Queue = queue.Queue()

        def pump():
            for raw in proc.stdout:
                lines.put(raw)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        timed_out = False
        try:
            while True:
                try:
                    raw = lines.get(timeout=timeout)
                except queue.Empty:
                    timed_out = True
                    break
                if raw is None:
                    break
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue  # not ours (a login banner on stdout, say)
                if isinstance(msg, dict):
                    on_message(msg)
        finally:
            if not timed_out:
                try:  # output ended: let ssh exit by itself, so its status and message say why
                    proc.wait(timeout=min(timeout, 10))
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        errfile.seek(0)
        return proc.returncode, errfile.read().decode(errors="replace"), timed_out


def _runner_failed(hp: str, python: str, failure: dict, model_name: str | None = None) -> EdgelrError:
    """One line for the runner's {"error": ...} message (a missing module: how to install it)."""
    missing, error = failure.get("missing"), str(failure["error"])
    if missing:
        return EdgelrError(f"{hp}: {python} there has no {missing}; install it on the device "
                           f"(`{python} -m pip install {missing}`)")
    if model_name and error.startswith("model.onnx:"):  # the copy's fixed name: say which file the user gave
        error = f"{model_name}{error[len('model.onnx'):]}"
    return EdgelrError(f"{hp}: the runner failed: {error}")


def _no_python(hp: str, python: str) -> EdgelrError:
    return EdgelrError(f"{hp}: no `{python}` on the device; install python3 with numpy and onnxruntime there")


def run_runner(device: Device, command: str, what: str, python: str, stdin_path: Path | None = None,
               on_message=None) -> dict:
    """A remote command line that ends in runner.py, as one ssh call: the runner's final {"done": true, ...}
    message. `on_message(obj)` sees the others (keep-alives); `device.timeout` bounds the silence between them."""
    said: dict = {}

    def take(msg: dict) -> None:
        if msg.get("done") or "error" in msg:
            said["done" if msg.get("done") else "error"] = msg
        elif on_message is not None:
            on_message(msg)

    rc, stderr, timed_out = _json_lines(device.base + [command], device.timeout, take, stdin_path)
    if "done" in said:
        return said["done"]
    if timed_out:
        raise EdgelrError(f"{device.name}: no output for {device.timeout:g} s while {what} (the device or the "
                          "connection hung); a slow device needs a longer --timeout")
    if rc == 255:
        raise _classify(device.host, device.port, device.known_hosts, stderr, what)
    if "error" in said:
        raise _runner_failed(device.name, python, said["error"])
    if rc == 127 or "command not found" in stderr:
        raise _no_python(device.name, python)
    raise EdgelrError(f"{device.name}: {what} failed on the device ({_last_line(stderr) or 'exit status ' + str(rc)})")


def _stream(cmd: list[str], host, port, known_hosts, python, runs, timeout, progress, model_name) -> dict:
    """Run the runner, reading its JSON lines as they come; the final profile dict."""
    hp = _host_port(host, port)
    partial: list[float] = []
    said: dict = {"node_runs": 0}

    def take(msg: dict) -> None:
        if "run" in msg:
            partial.append(float(msg["ms"]))
            if progress is not None:
                progress(int(msg["run"]), float(msg["ms"]))
        elif "node_run" in msg:
            said["node_runs"] += 1
        elif msg.get("done"):
            said["result"] = msg["profile"]
        elif "error" in msg:
            said["error"] = msg

    rc, stderr, timed_out = _json_lines(cmd, timeout, take)
    if "result" in said:
        return said["result"]
    if "error" in said:
        raise _runner_failed(hp, python, said["error"], model_name)
    if timed_out:
        why = f"no output for {timeout:g} s (the device or the connection hung)"
    elif rc == 255:
        first_step = _classify(host, port, known_hosts, stderr, "running the model")
        why = f"the connection was lost ({_last_line(stderr) or 'ssh exit 255'})" if partial or said["node_runs"] else None
        if why is None:
            raise first_step
    elif rc == 127 or "command not found" in stderr or "No such file or directory" in stderr and not partial:
        raise _no_python(hp, python)
    elif not partial:
        raise EdgelrError(f"{hp}: the runner failed ({_last_line(stderr) or 'exit status ' + str(rc)})")
    else:
        why = f"the runner stopped ({_last_line(stderr) or 'exit status ' + str(rc)})"
    if len(partial) < runs:
        missing_part = f"runs {len(partial) + 1}..{runs} and the per-node table are missing"
    else:
        missing_part = "all timed runs are in; the per-node table is missing"
    raise RemoteRunError(f"{hp}: {why} after {len(partial)} of {runs} timed runs; {missing_part} "
                         "(the runs measured are in .partial)", partial)


# Unpacks the bundle beside DEST, then swaps it in: the device never holds a half-copied bundle under
# DEST, and a folder there that is not an edgelr bundle is never replaced.
_INSTALL = r"""
set -e
dest="$1"; tmp="$1.edgelr-partial"
if [ -e "$dest" ] && [ ! -f "$dest/manifest.json" ]; then
    echo "$dest exists and is not an edgelr bundle; pick another path or remove it" >&2; exit 3
fi
mkdir -p -- "$(dirname -- "$dest")"
rm -rf -- "$tmp"; mkdir -- "$tmp"
if ! err=$(tar -x -f - -C "$tmp" 2>&1); then
    rm -rf -- "$tmp"; printf '%s\n' "$err" | grep -v 'Exiting with failure' | head -n 2 | tr '\n' ' ' >&2; exit 4
fi
rm -rf -- "$dest"; mv -- "$tmp" "$dest"
"""


def split_destination(text: str) -> tuple[str, str]:
    """'pi@raspberrypi.local:models/yolo' -> ('pi@raspberrypi.local', 'models/yolo'); IPv6 in brackets."""
    host, sep, path = (text.partition("]:") if "]:" in text else text.partition(":"))
    if "]:" in text:
        host += "]"
    if not sep or not path:
        raise EdgelrError(f"--to {text!r}: give USER@HOST:PATH, e.g. pi@raspberrypi.local:edgelr/yolo")
    check_host(host)
    path = path.removeprefix("~/")  # ssh starts in the home folder; "~" would be quoted
    if path.startswith("-") or any(c in path for c in "\n\r\0") or path.rstrip("/") in ("", ".", "~"):
        raise EdgelrError(f"--to {text!r}: {path!r} is not a usable folder path on the device")
    return host, path.rstrip("/")


def copy_bundle(device: Device, bundle: Path, dest: str) -> None:
    """Copy the folder `bundle` to `dest` on the device (one tar stream over ssh's stdin), atomically."""
    with tempfile.TemporaryDirectory(prefix="edgelr-ship-") as tmp:
        archive = Path(tmp) / "bundle.tar"
        with tarfile.open(archive, "w") as tar:
            for path in sorted(bundle.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(bundle)), recursive=False)
        device.run(command_line(["sh", "-c", _INSTALL, "edgelr", dest]), f"copying the bundle to {dest}",
                   stdin_path=archive, step_timeout=max(device.timeout, 600))


def run_bundle(device: Device, dest: str, python: str = "python3", runs: int = 20, warmup: int = 3) -> dict:
    """The bundle's run.py on the device: its JSON (ok, parity, latency_ms, ...). EdgelrError if it cannot run."""
    command = "cd " + shlex.quote(dest) + " && " + command_line([python, "run.py", "--runs", str(int(runs)),
                                                            "--warmup", str(int(warmup))])
    out = device.run(command, "running the bundle's run.py", step_timeout=max(device.timeout, 600),
                     ok_codes=(0, 1, 2, 3))
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise EdgelrError(f"{device.name}: run.py printed no result (exit status {device.returncode}); "
                          f"is `{python}` there a Python 3 with numpy and onnxruntime?") from None
    if device.returncode in (2, 3):
        raise EdgelrError(f"{device.name}: the bundle cannot run there: {result.get('error', 'no message')}")
    return result
