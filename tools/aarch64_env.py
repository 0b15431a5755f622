"""An emulated aarch64 Python (a Raspberry Pi OS userland) to run a bundle's run.py on an x86 machine.

    python tools/aarch64_env.py setup [--onnxruntime 1.19.2]     # assemble it once (cached; later calls are instant)
    python tools/aarch64_env.py run BUNDLE [run.py options]       # run.py's JSON, its exit status

Debian's arm64 python3.11 packages (the Pi's Debian 12) are unpacked into a root folder, aarch64 wheels of
onnxruntime and numpy onto a PYTHONPATH folder, and `qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11` runs
them: no binfmt_misc, no chroot. Everything lives under $EDGELR_CACHE/aarch64 (default ~/.cache/edgelr).
The first setup needs root for apt (`dpkg --add-architecture arm64`, `apt-get update`) unless that is done:

    apt-get install -y qemu-user-static && dpkg --add-architecture arm64 && apt-get update

Timings under emulation mean nothing; outputs do (x86 vs aarch64 parity).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgelr.deploy.ort_bundle import last_json  # noqa: E402
from edgelr.errors import EdgelrError  # noqa: E402
from edgelr.io.cache import cache_root  # noqa: E402

QEMU = "qemu-aarch64-static"
PYTHON_VERSION = "3.11"  # Debian 12 (bookworm) and Raspberry Pi OS bookworm
DEBIAN_PACKAGES = [
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libgcc-s1", "libstdc++6",
    "zlib1g", "libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libuuid1", "libcrypt1",
]
WHEEL_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
READY = ".edgelr-ready.json"  # written last: a folder without it is incomplete and rebuilt


@dataclass(frozen=True)
class Aarch64Env:
    rootfs: Path      # Debian arm64 packages unpacked: ROOT/usr/bin/python3.11 and its libraries
    site: Path        # aarch64 wheels unpacked (onnxruntime, numpy): the PYTHONPATH
    qemu: str
    onnxruntime: str
    numpy: str

    @property
    def python(self) -> Path:
        return self.rootfs / "usr" / "bin" / f"python{PYTHON_VERSION}"

    def command(self, *args: str) -> list[str]:
        return [self.qemu, "-L", str(self.rootfs), str(self.python), *args]

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(self.site),
                "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8",
                "HOME": os.environ.get("HOME", "/tmp")}


@dataclass(frozen=True)
class EmulatedRun:
    returncode: int
    report: dict      # run.py's JSON object
    seconds: float


def env_dir() -> Path:
    return cache_root() / "aarch64"


def ensure_env(onnxruntime: str = "1.19.2", progress: bool = True) -> Aarch64Env:
    """The emulated Python with onnxruntime==`onnxruntime`, assembled into the cache the first time."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise EdgelrError(f"{QEMU} not found; install it with: apt-get install -y qemu-user-static")
    rootfs = _ready(env_dir() / "rootfs", lambda tmp: _unpack_debs(tmp, progress), progress, "Debian arm64 python3.11")
    site = _ready(env_dir() / f"site-onnxruntime-{onnxruntime}", lambda tmp: _unpack_wheels(tmp, onnxruntime, progress),
                  progress, f"aarch64 wheels for onnxruntime {onnxruntime}")
    versions = json.loads((site / READY).read_text())
    return Aarch64Env(rootfs, site, qemu, versions["onnxruntime"], versions["numpy"])


def _ready(folder: Path, build, progress: bool, what: str) -> Path:
    """`folder`, built by build(tmp) -> dict into a temporary folder and renamed into place, unless already done."""
    if (folder / READY).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"assembling {what} in {folder} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        built = Path(tmp) / "built"
        built.mkdir()
        info = build(built)
        (built / READY).write_text(json.dumps(info))
        if folder.exists():  # an incomplete earlier attempt
            shutil.rmtree(folder)
        os.replace(built, folder)
    return folder


def _unpack_debs(root: Path, progress: bool) -> dict:
    _ensure_arm64_apt()
    packages = [f"{name}:arm64" for name in DEBIAN_PACKAGES]
    with tempfile.TemporaryDirectory() as debs:
        proc = _run(["apt-get", "download", *packages], cwd=debs)
        if proc.returncode and os.geteuid() == 0:  # a stale package index: refresh once and retry
            _run(["apt-get", "update", "-qq"])
            proc = _run(["apt-get", "download", *packages], cwd=debs)
        if proc.returncode:
            raise EdgelrError(f"apt-get download of the arm64 python{PYTHON_VERSION} packages failed "
                              f"({_last_line(proc.stderr)}); this needs Debian 12 (bookworm) apt sources with "
                              "arm64 enabled: dpkg --add-architecture arm64 && apt-get update")
        for deb in sorted(Path(debs).glob("*.deb")):
            proc = _run(["dpkg", "-x", str(deb), str(root)])
            if proc.returncode:
                raise EdgelrError(f"dpkg -x {deb.name} failed ({_last_line(proc.stderr)})")
    if not (root / "usr" / "bin" / f"python{PYTHON_VERSION}").is_file():
        raise EdgelrError(f"the arm64 packages hold no usr/bin/python{PYTHON_VERSION}")
    return {"packages": DEBIAN_PACKAGES}


def _ensure_arm64_apt() -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise EdgelrError("apt-get and dpkg are needed to fetch the arm64 Python (a Debian or Ubuntu machine)")
    foreign = _run(["dpkg", "--print-foreign-architectures"]).stdout.split()
    if "arm64" in foreign:
        return
    if os.geteuid() != 0:
        raise EdgelrError("apt does not offer arm64 packages yet; as root run: dpkg --add-architecture arm64 && "
                          "apt-get update")
    for cmd in (["dpkg", "--add-architecture", "arm64"], ["apt-get", "update", "-qq"]):
        proc = _run(cmd)
        if proc.returncode:
            raise EdgelrError(f"{' '.join(cmd)} failed ({_last_line(proc.stderr)})")


def _unpack_wheels(site: Path, onnxruntime: str, progress: bool) -> dict:
    # onnxruntime before 1.19 was built against numpy 1.x (1.19 supports numpy 2)
    numpy = "numpy<2" if tuple(int(p) for p in onnxruntime.split(".")[:2]) < (1, 19) else "numpy"
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    with tempfile.TemporaryDirectory() as wheels:
        for requirement in (f"onnxruntime=={onnxruntime}", numpy):
            proc = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *platforms,
                         "--python-version", PYTHON_VERSION, "--implementation", "cp", "--disable-pip-version-check",
                         "--quiet", "--dest", wheels, requirement])
            if proc.returncode:
                raise EdgelrError(f"pip found no aarch64 wheel of {requirement} for Python {PYTHON_VERSION} "
                                  f"({_last_line(proc.stderr)}); check the network and pip's index")
        versions = {}
        for wheel in sorted(Path(wheels).glob("*.whl")):
            name, version = wheel.name.split("-")[:2]
            versions[name] = version
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
    return versions


def run_bundle(bundle: Path, args: list[str] | tuple = (), env: Aarch64Env | None = None,
               timeout: float = 1800, progress: bool = True) -> EmulatedRun:
    """Run BUNDLE/run.py under aarch64 emulation (onnxruntime: the version the bundle was made for)."""
    bundle = Path(bundle).resolve()
    if not (bundle / "run.py").is_file():
        raise EdgelrError(f"{bundle}: no run.py; give the folder of an ONNX Runtime bundle")
    if env is None:
        env = ensure_env(_bundle_runtime(bundle), progress)
    start = time.perf_counter()
    try:
        proc = subprocess.run(env.command(str(bundle / "run.py"), *args), check=False, capture_output=True, text=True,
                              env=env.env(), cwd=bundle, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EdgelrError(f"run.py under emulation took more than {timeout:.0f} s; ask for fewer --runs") from None
    report = last_json(proc.stdout)
    if report is None:
        raise EdgelrError(f"run.py under emulation printed no JSON (exit status {proc.returncode}: "
                          f"{_last_line(proc.stderr) or 'no message'})")
    return EmulatedRun(proc.returncode, report, time.perf_counter() - start)


def _bundle_runtime(bundle: Path) -> str:
    try:
        return json.loads((bundle / "manifest.json").read_text())["onnxruntime"]["runtime_version"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EdgelrError(f"{bundle}: no readable manifest.json naming its onnxruntime version") from None


def _run(cmd: list[str], cwd=None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=cwd, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EdgelrError(f"{' '.join(cmd[:3])} failed ({exc})") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip() and not line.startswith("W:")]
    return lines[-1][:300] if lines else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="assemble the emulated Python (once)")
    setup.add_argument("--onnxruntime", default="1.19.2", help="the aarch64 onnxruntime release (default 1.19.2)")
    run = sub.add_parser("run", help="run a bundle's run.py under emulation; other options go to run.py")
    run.add_argument("bundle", type=Path)
    run.add_argument("--onnxruntime", help="default: the version in the bundle's manifest.json")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "setup":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            env = ensure_env(args.onnxruntime)
            print(f"ready: {' '.join(env.command())}  (onnxruntime {env.onnxruntime}, numpy {env.numpy})")
            return 0
        env = ensure_env(args.onnxruntime) if args.onnxruntime else None
        done = run_bundle(args.bundle, rest, env)
    except EdgelrError as exc:
        print(f"aarch64_env: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(done.report))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
