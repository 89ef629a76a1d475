"""The guest image: Debian's generic kernel (it has the tunnel modules and 9p) and a busybox
initramfs, built from Debian packages into a cache folder, once per kernel version."""
from __future__ import annotations

import glob
import lzma
import os
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "..", "..", ".cache", "interop")
KERNEL_META = "linux-image-amd64"


class ImageError(Exception):
    pass


def _run(*argv, cwd=None) -> str:
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise ImageError(f"{' '.join(argv)}: {(p.stderr or p.stdout).strip()[-300:]}")
    return p.stdout


def kernel_package() -> str:
    """The versioned package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64."""
    out = _run("apt-cache", "depends", KERNEL_META)
    if "linux-image-" not in out:
        _run("apt-get", "update", "-qq")
        out = _run("apt-cache", "depends", KERNEL_META)
    for line in out.splitlines():
        word = line.split(":")[-1].strip()
        if line.strip().startswith("Depends:") and word.startswith("linux-image-") and \
                word[len("linux-image-"):][:1].isdigit():
            return word
    raise ImageError(f"apt-cache depends {KERNEL_META}: no versioned kernel package")


def build(cache: str = CACHE) -> tuple[str, str, str]:
    """(vmlinux, initrd, kernel version); built once, then taken from the cache."""
    pkg = kernel_package()
    kver = pkg[len("linux-image-"):]
    out = os.path.abspath(os.path.join(cache, kver))
    vmlinux, initrd = os.path.join(out, "vmlinux"), os.path.join(out, "initrd.cpio")
    sources = [os.path.join(HERE, "guest", f) for f in ("init", "mkinitrd.sh")]
    if os.path.exists(initrd) and all(os.path.getmtime(initrd) >= os.path.getmtime(f)
                                      for f in sources):
        return vmlinux, initrd, kver
    dl = os.path.join(out, "dl")
    os.makedirs(dl, exist_ok=True)
    if not glob.glob(os.path.join(dl, f"{pkg}_*.deb")):
        _run("apt-get", "download", pkg, cwd=dl)
    kroot = os.path.join(out, "kroot")
    shutil.rmtree(kroot, ignore_errors=True)
    _run("dpkg-deb", "-x", glob.glob(os.path.join(dl, f"{pkg}_*.deb"))[0], kroot)
    _run("depmod", "-b", kroot, kver)           # the .deb leaves modules.dep to its postinst
    # vmlinuz is an xz-compressed bzImage; under TCG decompressing it costs seconds at every
    # boot, so the guest boots the ELF inside it directly (PVH)
    data = open(os.path.join(kroot, "boot", f"vmlinuz-{kver}"), "rb").read()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise ImageError(f"vmlinuz-{kver}: no xz stream in it")
    with open(vmlinux + ".tmp", "wb") as f:
        f.write(lzma.LZMADecompressor().decompress(data[start:]))
    os.replace(vmlinux + ".tmp", vmlinux)
    _run(os.path.join(HERE, "guest", "mkinitrd.sh"), kroot, kver, initrd + ".tmp")
    os.replace(initrd + ".tmp", initrd)
    return vmlinux, initrd, kver
