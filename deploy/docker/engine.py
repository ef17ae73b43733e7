#!/usr/bin/env python3
"""Build Kestrel's serving image with whatever container tool this machine has (standard library only).

    python3 deploy/docker/engine.py base  [--name localhost/debian-py:bookworm]   # make base-image
    python3 deploy/docker/engine.py build [--base NAME] [--tag kestrel:cpu]       # make image
    python3 deploy/docker/engine.py report [--tag kestrel:cpu] [--base NAME]      # sizes per layer
    python3 deploy/docker/engine.py base --arch arm64 --name localhost/debian-py:bookworm-arm64   # qemu-user
    python3 deploy/docker/engine.py build --platform linux/arm64 --base localhost/debian-py:bookworm-arm64 \
        --tag kestrel:cpu-arm64

The tool: $KESTREL_ENGINE (docker, podman or buildah) when set, else docker when its daemon answers,
else buildah, else podman. Images are written in Docker's format (OCI has no HEALTHCHECK). buildah and
podman build with `--isolation chroot --network host`: they need no runtime (crun/runc) and no cgroups,
which is what works on machines where `podman run` does not.

`base` makes a Debian bookworm image from Debian's own packages (debootstrap; no image registry needed):
python3 and python3-venv over minbase, apt's lists, caches and the docs trimmed. The serving image's two
stages both start from it (`--build-arg BASE=`).

deploy/docker/image_test.py runs the image and checks it; deploy/docker/footprint.py measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
IGNOREFILE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"
DEFAULT_TAG = "kestrel:cpu"
DEFAULT_BASE = "localhost/debian-py:bookworm"
SUITE = "bookworm"
# python3-venv brings ensurepip's pip wheel (the build stage's venv); python3-pip (and its setuptools,
# wheel and distutils) is not needed by either stage.
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
# trimmed from the debootstrapped tree: nothing a Python server reads
BASE_TRIM = ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*", "var/log/*",
             "usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*",
             "usr/share/lintian/*", "usr/share/common-licenses/*")


class EngineError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[image] {message}", flush=True)


def _works(cmd: list[str]) -> bool:
    if shutil.which(cmd[0]) is None:
        return False
    try:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def choose_engine(requested: str | None = None) -> str:
    requested = requested or os.environ.get("KESTREL_ENGINE") or None
    if requested:
        if shutil.which(requested) is None:
            raise EngineError(f"{requested} is not installed")
        return requested
    if _works(["docker", "info"]):
        return "docker"
    for name in ("buildah", "podman"):
        if shutil.which(name):
            return name
    raise EngineError("no container tool: install docker, podman or buildah "
                      "(Debian: apt-get install buildah podman)")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def output(cmd: list[str]) -> str:
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return done.stdout


def image_exists(engine: str, name: str) -> bool:
    if engine == "buildah":
        return _works(["buildah", "inspect", "--type", "image", name])
    return _works([engine, "image", "inspect", name])


def local_name(engine: str, name: str) -> str:
    """buildah and podman store an unqualified tag as localhost/<name>."""
    if engine != "docker" and "/" not in name.split(":")[0]:
        return f"localhost/{name}"
    return name


# ---- make base-image --------------------------------------------------------------------------
def build_base(engine: str, name: str, mirror: str, packages: str = BASE_PACKAGES, arch: str | None = None) -> dict:
    """debootstrap (for another `arch`, e.g. arm64: emulated with qemu-user-static through binfmt_misc),
    trim, import as `name`."""
    if shutil.which("debootstrap") is None:
        raise EngineError("debootstrap is not installed (Debian: apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise EngineError("debootstrap needs root (it makes device nodes and chroots)")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="kestrel-base-"))
    rootfs = work / "rootfs"
    try:
        arch_args = [f"--arch={arch}"] if arch else []
        log(f"debootstrap --variant=minbase --include={packages} {' '.join(arch_args)} {SUITE} ({mirror})")
        run(["debootstrap", "--variant=minbase", f"--include={packages}", *arch_args, SUITE, str(rootfs), mirror],
            stdout=subprocess.DEVNULL)
        untrimmed = _du(rootfs)
        for pattern in BASE_TRIM:
            for path in rootfs.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        trimmed = _du(rootfs)
        version = output(["chroot", str(rootfs), "python3", "-c",
                          "import platform; print(platform.python_version())"]).strip()
        tarball = work / "rootfs.tar"
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."])
        log(f"importing {tarball.name} ({untrimmed / 1e6:.0f} MB debootstrapped, {trimmed / 1e6:.0f} MB "
            f"after trimming; Python {version}) as {name}")
        _import(engine, tarball, name, arch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - started
    size = image_size(engine, name)
    log(f"base image {name}: {size / 1e6:.0f} MB, Python {version}, {seconds:.0f} s")
    return {"name": name, "bytes": size, "python": version, "seconds": round(seconds, 1)}


def _import(engine: str, tarball: Path, name: str, arch: str | None = None) -> None:
    config = ["CMD [\"python3\"]", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "ENV LANG=C.UTF-8"]
    if engine in ("docker", "podman"):
        changes = [a for c in config for a in ("--change", c)]
        platform = ["--platform", f"linux/{arch}"] if arch else []
        run([engine, "import", *platform, *changes, str(tarball), name], stdout=subprocess.DEVNULL)
        return
    ctr = output(["buildah", "from", "scratch"]).strip()
    try:
        run(["buildah", "add", "--quiet", ctr, str(tarball), "/"], stdout=subprocess.DEVNULL)
        if arch:
            run(["buildah", "config", "--arch", arch, ctr])
        run(["buildah", "config", "--cmd", "python3", "--env", "LANG=C.UTF-8",
             "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", ctr])
        run(["buildah", "commit", "--quiet", "--format", "docker", "--rm", ctr, name], stdout=subprocess.DEVNULL)
    except BaseException:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
        raise


def _du(path: Path) -> int:
    return int(output(["du", "-sb", "--one-file-system", str(path)]).split()[0])


def pip_cert() -> str | None:
    """The CA bundle pip uses here ($PIP_CERT, else pip's configured `cert`), if any: behind a
    TLS-inspecting proxy the image's own CA store does not know the proxy's CA."""
    cert = os.environ.get("PIP_CERT")
    if not cert and shutil.which("pip3"):
        try:
            listed = subprocess.run(["pip3", "config", "list"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            listed = ""
        m = re.search(r"^[\w:.]*cert='([^']+)'", listed, re.MULTILINE)
        cert = m.group(1) if m else None
    return cert if cert and Path(cert).is_file() else None


# ---- make image -----------------------------------------------------------------------------
def build_image(engine: str, tag: str, base: str | None, extras: str = "cpu", platform: str | None = None,
                no_cache: bool = False) -> dict:
    args = ["--build-arg", f"EXTRAS={extras}", "-f", str(DOCKERFILE), "-t", tag]
    if base:
        args += ["--build-arg", f"BASE={base}"]
    if platform:
        args += ["--platform", platform]
    if no_cache:
        args += ["--no-cache"]
    cert = pip_cert()
    if cert:  # a build secret: pip in the build trusts the same CAs as pip here, nothing stays in a layer
        args += ["--secret", f"id=pip_cert,src={cert}"]
    if engine == "docker":
        cmd = ["docker", "build", *args, str(ROOT)]
    else:
        # chroot isolation: no OCI runtime, no cgroups; the host's network (pip reaches PyPI)
        verb = ["buildah", "bud"] if engine == "buildah" else ["podman", "build"]
        cmd = [*verb, "--isolation", "chroot", "--network", "host", "--format", "docker", "--layers",
               "--ignorefile", str(IGNOREFILE), *args, str(ROOT)]
    log(" ".join(cmd))
    started = time.monotonic()
    run(cmd)
    seconds = time.monotonic() - started
    size = image_size(engine, tag)
    log(f"built {tag} in {seconds:.0f} s: {size / 1e6:.0f} MB")
    return {"tag": tag, "seconds": round(seconds, 1), "bytes": size}


# ---- inspection -------------------------------------------------------------------------------
def inspect_image(engine: str, name: str) -> dict:
    """The image's config in Docker's terms: Entrypoint, Cmd, User, Env, Healthcheck, ExposedPorts."""
    if engine == "buildah":
        data = json.loads(output(["buildah", "inspect", "--type", "image", name]))
        docker = data.get("Docker") or {}
        config = dict(docker.get("config") or {})
        config.setdefault("Architecture", docker.get("architecture"))
        config["_format"] = "docker" if data.get("Manifest", "").find("docker.distribution") >= 0 else "oci"
        return config
    data = json.loads(output([engine, "image", "inspect", name]))[0]
    config = dict(data.get("Config") or {})
    config.setdefault("Architecture", data.get("Architecture"))
    return config


def image_size(engine: str, name: str) -> int:
    """Bytes, uncompressed (podman's or docker's count; buildah alone prints it rounded to MB)."""
    tool = engine if engine != "buildah" else ("podman" if shutil.which("podman") else None)
    if tool is not None:
        return int(output([tool, "image", "inspect", "--format", "{{.Size}}", local_name(engine, name)]).strip())
    for row in json.loads(output(["buildah", "images", "--json"])):
        if local_name(engine, name) in (row.get("names") or []):
            return _size_from_text(row)
    raise EngineError(f"no image {name}")


def _size_from_text(row: dict) -> int:
    units = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    m = re.match(r"([\d.]+)\s*([KMG]?B)", str(row.get("size", "")))
    return int(float(m.group(1)) * units[m.group(2)]) if m else 0


def history(engine: str, name: str) -> list[dict]:
    """Layers newest first: {"bytes", "created_by"} (podman or docker; buildah has no history command)."""
    tool = engine if engine != "buildah" else ("podman" if shutil.which("podman") else None)
    if tool is None:
        return []
    if tool == "podman":
        rows = json.loads(output(["podman", "history", "--format", "json", name]))
        return [{"bytes": int(r.get("size") or 0), "created_by": r.get("CreatedBy") or r.get("createdBy") or ""}
                for r in rows]
    rows = [json.loads(line) for line in output(["docker", "history", "--no-trunc", "--human=false",
                                                 "--format", "{{json .}}", name]).splitlines() if line]
    return [{"bytes": int(r.get("Size") or 0), "created_by": r.get("CreatedBy", "")} for r in rows]


def _short(command: str, width: int = 96) -> str:
    command = re.sub(r"\s+", " ", command.replace("/bin/sh -c #(nop) ", "").replace("/bin/sh -c ", "RUN ")).strip()
    return command if len(command) <= width else command[: width - 3] + "..."


def mounted(engine: str, name: str):
    """A context manager giving the image's root filesystem as a host path (buildah/podman: mount)."""

    @contextlib.contextmanager
    def _mount():
        if engine == "docker":
            work = Path(tempfile.mkdtemp(prefix="kestrel-rootfs-"))
            cid = output(["docker", "create", name]).strip()
            try:
                subprocess.run(f"docker export {cid} | tar -C {work} -xf -", shell=True, check=True)
                yield work
            finally:
                subprocess.run(["docker", "rm", cid], capture_output=True)
                shutil.rmtree(work, ignore_errors=True)
            return
        tool = "buildah"
        if shutil.which("buildah") is None:
            raise EngineError("reading the image's files needs buildah (apt-get install buildah)")
        ctr = output([tool, "from", "--pull-never", local_name(engine, name)]).strip()
        try:
            path = output([tool, "mount", ctr]).strip()
            yield Path(path)
        finally:
            subprocess.run([tool, "umount", ctr], capture_output=True)
            subprocess.run([tool, "rm", ctr], capture_output=True)

    return _mount()


def contents(engine: str, name: str) -> dict:
    """What is in the image: the venv's size, its biggest packages, and what must not be there."""
    with mounted(engine, name) as root:
        venv = root / "opt" / "kestrel"
        site = next(iter(sorted(venv.glob("lib/python3*/site-packages"))), None)
        packages = {}
        if site is not None:
            for child in site.iterdir():
                if child.is_dir() and not child.name.endswith((".dist-info", "__pycache__")):
                    packages[child.name] = _du(child)
        found = {
            "tensorflow": any(site.glob("tensorflow*")) if site else False,
            "grpc_tools": any(site.glob("grpc_tools*")) if site else False,
            "pip in the venv": any(site.glob("pip")) if site else False,
            "pip cache": any((root / p).exists() for p in ("root/.cache/pip", "home/kestrel/.cache/pip")),
            "compilers": sorted(str(p.relative_to(root)) for d in ("usr/bin", "usr/local/bin")
                                for n in ("cc", "gcc", "g++", "c++", "clang") for p in [root / d / n]
                                if p.exists() or p.is_symlink()),
            "source tree": (venv / "src").exists(),
        }
        return {"venv_bytes": _du(venv) if venv.exists() else 0,
                "packages": dict(sorted(packages.items(), key=lambda kv: -kv[1])),
                "unwanted": found}


def report(engine: str, tag: str, base: str | None) -> dict:
    size = image_size(engine, tag)
    out = {"engine": engine, "tag": tag, "bytes": size, "config": inspect_image(engine, tag)}
    print(f"\nimage {tag}: {size / 1e6:.0f} MB ({engine})")
    if base and image_exists(engine, base):
        out["base_bytes"] = image_size(engine, base)
        print(f"  base {base}: {out['base_bytes'] / 1e6:.0f} MB; Kestrel adds {(size - out['base_bytes']) / 1e6:.0f} MB")
    layers = history(engine, tag)
    out["layers"] = layers
    if layers:
        print("  layers (newest first):")
        for layer in layers:
            print(f"  {layer['bytes'] / 1e6:9.1f} MB  {_short(layer['created_by'])}")
    else:
        print("  (per-layer sizes need podman or docker)")
    stuff = contents(engine, tag)
    out.update(stuff)
    top = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in list(stuff["packages"].items())[:8])
    print(f"  /opt/kestrel (the venv): {stuff['venv_bytes'] / 1e6:.0f} MB; biggest packages (MB): {top}")
    bad = {k: v for k, v in stuff["unwanted"].items() if v}
    print(f"  left behind: {bad or 'nothing (no TensorFlow, grpc_tools, pip, pip cache, compilers, sources)'}")
    health = out["config"].get("Healthcheck")
    print(f"  HEALTHCHECK kept: {bool(health)}; user {out['config'].get('User')!r}; "
          f"architecture {out['config'].get('Architecture')}")
    return out


# ---- running the image ------------------------------------------------------------------------
def choose_runner(engine: str, image: str, requested: str | None = None) -> str:
    """How to run the image: $KESTREL_RUNNER, else docker (daemon answers), else podman when `podman run`
    works here, else `buildah run --isolation chroot` (no OCI runtime, no cgroups)."""
    requested = requested or os.environ.get("KESTREL_RUNNER") or None
    if requested:
        return requested
    if engine == "docker" or _works(["docker", "info"]):
        return "docker"
    if shutil.which("podman") and _works(["podman", "run", "--rm", "--network", "none", "--entrypoint", "true",
                                          local_name("podman", image)]):
        return "podman"
    if shutil.which("buildah"):
        return "buildah"
    raise EngineError("nothing can run the image: install docker, podman or buildah")


class Container:
    """One run of an image with its ENTRYPOINT and CMD (plus `args`) and read-only bind mounts.

    docker/podman: `run -d` with each exposed port published on 127.0.0.1 (a free host port).
    buildah: `buildah run --isolation chroot --network host` on a working container of the image: the
    image's filesystem, user, environment and working folder, the caller's network namespace (ports as
    the image declares them) and no PID namespace (the server's host PID is known). `exec` runs another
    command in the same container (same mounts), as a healthcheck or `docker exec` would.
    """

    def __init__(self, runner: str, image: str, args: Sequence[str] = (), volumes: Sequence[tuple] = (),
                 log_path: Path | None = None):
        self.runner, self.args, self.volumes = runner, list(args), list(volumes)
        self.image = local_name(runner if runner != "docker" else "docker", image)
        self.log_path = log_path
        self.name = f"kestrel-test-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.process: subprocess.Popen | None = None
        self.ctr: str | None = None
        self._pid: int | None = None
        self._log = None

    def _mounts(self) -> list[str]:
        out = []
        for src, dst, *ro in self.volumes:
            out += ["-v", f"{src}:{dst}" + (":ro" if ro and ro[0] else "")]
        return out

    def start(self) -> "Container":
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        if self.runner == "buildah":
            config = inspect_image("buildah", self.image)
            command = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or []) + self.args
            self.ctr = output(["buildah", "from", "--pull-never", "--name", self.name, self.image]).strip()
            self.process = subprocess.Popen(
                ["buildah", "run", "--isolation", "chroot", "--network", "host", *self._mounts(), self.ctr, "--",
                 *command], stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        else:
            publish = [a for p in inspect_image(self.runner, self.image).get("ExposedPorts") or {}
                       for a in ("-p", f"127.0.0.1::{p.split('/')[0]}")]
            self.ctr = output([self.runner, "run", "-d", "--name", self.name, *publish, *self._mounts(), self.image,
                               *self.args]).strip()
            self.process = subprocess.Popen([self.runner, "logs", "-f", self.ctr], stdout=self._log,
                                            stderr=subprocess.STDOUT)
        return self

    def host_port(self, port: int) -> int:
        if self.runner == "buildah":
            return port
        text = output([self.runner, "port", self.ctr, f"{port}/tcp"]).split()[0]
        return int(text.rsplit(":", 1)[1])

    def server_pid(self, timeout: float = 30.0) -> int:
        """The host PID of the image's main process (`python -m serve ...`)."""
        if self._pid:
            return self._pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.runner != "buildah":
                pid = int(output([self.runner, "inspect", "-f", "{{.State.Pid}}", self.ctr]).strip() or 0)
            else:
                pid = _descendant(self.process.pid, lambda argv: argv[1:3] == ["-m", "serve"])
            if pid:
                self._pid = pid
                return pid
            if self.runner == "buildah" and self.process.poll() is not None:
                raise EngineError(f"the container exited ({self.process.returncode}) before the server started")
            time.sleep(0.05)
        raise EngineError(f"no server process in the container after {timeout:.0f} s")

    def exec(self, command: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        if self.runner == "buildah":
            cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host", *self._mounts(), self.ctr, "--",
                   *command]
        else:
            cmd = [self.runner, "exec", self.ctr, *command]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def kill(self, sig: int) -> None:
        if self.runner == "buildah":
            os.kill(self.server_pid(), sig)
        else:
            run([self.runner, "kill", "--signal", str(int(sig)), self.ctr], stdout=subprocess.DEVNULL)

    def wait(self, timeout: float) -> int:
        """The main process's exit code (TimeoutExpired when it is still running)."""
        if self.runner == "buildah":
            return self.process.wait(timeout)
        done = subprocess.run([self.runner, "wait", self.ctr], capture_output=True, text=True, timeout=timeout,
                              check=True)
        return int(done.stdout.strip().splitlines()[-1])

    def remove(self) -> None:
        if self.process is not None and self.process.poll() is None:
            if self.runner == "buildah":
                with contextlib.suppress(ProcessLookupError, EngineError):
                    os.kill(self.server_pid(timeout=0.1), 9)
            else:
                subprocess.run([self.runner, "kill", self.ctr], capture_output=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(20)
        if self.ctr:
            subprocess.run([self.runner, "rm", "-f", self.ctr] if self.runner != "buildah" else
                           ["buildah", "rm", self.ctr], capture_output=True)
            self.ctr = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.remove()


def _descendant(root: int, match) -> int | None:
    """The first process below `root` whose argv satisfies `match`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if match(argv):
            return pid
        todo += children.get(pid, [])
    return None


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def private_network(argv: Sequence[str]) -> None:
    """Re-run this script in a network namespace of its own (root, buildah: the image's fixed ports 8080,
    8081 and 8002 then clash with nothing on this machine); returns when already inside one."""
    if os.environ.get("KESTREL_PRIVATE_NET") == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        log("not root (or no unshare/ip): running in this machine's network namespace; ports 8080, 8081 and "
            "8002 must be free")
        return
    env = dict(os.environ, KESTREL_PRIVATE_NET="1")
    os.execvpe("unshare", ["unshare", "--net", "--", sys.executable, *argv], env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["base", "build", "report", "engine"])
    p.add_argument("--engine", help="docker, podman or buildah (default: $KESTREL_ENGINE, else the first that works)")
    p.add_argument("--name", default=DEFAULT_BASE, help=f"base image name (default {DEFAULT_BASE})")
    p.add_argument("--arch", help="base for another Debian architecture, e.g. arm64 (needs qemu-user-static "
                   "registered in binfmt_misc)")
    p.add_argument("--mirror", default=os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian"))
    p.add_argument("--tag", default=DEFAULT_TAG)
    p.add_argument("--base", default=None, help="BASE build-arg (default: the Dockerfile's, python:3.11-slim); "
                   "'auto': --base-image when it exists here, else the Dockerfile's")
    p.add_argument("--base-image", default=DEFAULT_BASE, help="what --base auto looks for (make base-image's)")
    p.add_argument("--extras", default="cpu")
    p.add_argument("--platform", default=None, help="e.g. linux/arm64 (needs qemu-user binfmt on an x86 host)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--json", type=Path, help="write the build's figures here")
    args = p.parse_args(argv)
    try:
        engine = choose_engine(args.engine)
        if args.command == "engine":
            print(engine)
            return 0
        if args.command == "base":
            result = build_base(engine, args.name, args.mirror, arch=args.arch)
        elif args.command == "build":
            if args.base == "auto":
                args.base = args.base_image if image_exists(engine, args.base_image) else None
                log(f"base: {args.base or 'the Dockerfile default (python:3.11-slim, from a registry)'}")
            if args.base and not image_exists(engine, args.base):
                raise EngineError(f"base image {args.base} is not here: `make base-image` builds it from "
                                  "Debian's packages (no registry needed)")
            result = build_image(engine, args.tag, args.base, args.extras, args.platform, args.no_cache)
            result["report"] = report(engine, args.tag, args.base)
        else:
            result = report(engine, args.tag, args.base if args.base != "auto" else args.base_image)
    except (EngineError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
