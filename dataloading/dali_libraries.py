"""Whether the shared libraries that DALI's backend loads are all present in this Python environment.

DALI's PyPI wheels do not depend on every CUDA library they use: NPP, cuFFT, the CUDA runtime and nvJPEG are loaded
with ``dlopen`` when a GPU operator first needs them, and a missing one only shows on a GPU, mid-run. This module
finds, without a GPU and without importing DALI, every library that DALI's backend needs (the ELF ``NEEDED`` entries
of its libraries and of nvImageCodec's decoder plugins, plus the CUDA libraries their code names for ``dlopen``) and
resolves each the way the dynamic loader would: the file's ``RUNPATH`` (``$ORIGIN`` expanded), ``LD_LIBRARY_PATH``,
the loader cache and the system folders. Libraries of the NVIDIA driver (``libcuda``, ``libnvidia-ml``,
``libnvcuvid``) come with the driver and are not looked for.

    python -m dataloading.dali_libraries        # prints the DALI build and each missing library; exit 1 if any
"""
from __future__ import annotations

import glob
import importlib.util
import mmap
import os
import re
import struct
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

# Provided by the installed NVIDIA driver, not by any wheel.
DRIVER_LIBRARIES = ("libcuda.so.1", "libnvidia-ml.so.1", "libnvcuvid.so.1")
# Loaded only by features this project does not use (GPUDirect Storage reads; Intel VTune markers).
OPTIONAL_PREFIXES = ("libcufile", "libittnotify")
# The C runtime: always present where Python runs.
SYSTEM_PREFIXES = ("libc.so", "libm.so", "libdl.so", "libpthread.so", "librt.so", "libgcc_s.so", "libstdc++.so",
                   "ld-linux")
# CUDA libraries that DALI and nvImageCodec open with dlopen: their versioned names appear in the binaries' strings.
DLOPENED = re.compile(rb"lib(?:cufft|npp[a-z]*|nvjpeg2?k?|nvimgcodec|nvcomp|cudart|nvtiff|cublas(?:Lt)?|curand"
                      rb"|nvrtc|cufile)\.so\.[0-9]+")
SYSTEM_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
               "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")

DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 1, 5, 15, 29
PT_LOAD, PT_DYNAMIC = 1, 2


@dataclass
class ElfInfo:
    path: str
    needed: List[str] = field(default_factory=list)
    search_path: List[str] = field(default_factory=list)
    dlopened: List[str] = field(default_factory=list)


@dataclass
class Report:
    """The result of :func:`check`: the DALI distribution found and the libraries that did not resolve."""

    dali_dir: Optional[str]
    distribution: Optional[str]
    missing: Dict[str, List[str]]  # library name -> the DALI files that need it
    checked: int

    @property
    def ok(self) -> bool:
        return self.dali_dir is not None and not self.missing

    def describe(self) -> str:
        if self.dali_dir is None:
            return "NVIDIA DALI is not installed"
        if not self.missing:
            return f"{self.distribution}: all {self.checked} libraries that DALI's backend loads resolve"
        lines = [f"{self.distribution}: {len(self.missing)} of {self.checked} libraries that DALI's backend loads "
                 "are missing:"]
        for name, users in sorted(self.missing.items()):
            lines.append(f"  {name} (needed by {', '.join(sorted(users))})")
        return "\n".join(lines)


def read_elf(path: str, scan_dlopen: bool = True) -> ElfInfo:
    """NEEDED entries, RUNPATH/RPATH (``$ORIGIN`` expanded) and dlopen'ed CUDA library names of a 64-bit ELF."""
    info = ElfInfo(path)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"\x7fELF" or data[4] != 2:
            raise ValueError(f"{path}: not a 64-bit ELF file")
        endian = "<" if data[5] == 1 else ">"
        phoff, = struct.unpack_from(endian + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x36)
        loads: List[Tuple[int, int, int]] = []
        dynamic: Optional[Tuple[int, int]] = None
        for index in range(phnum):
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
                endian + "IIQQQQ", data, phoff + index * phentsize)
            if p_type == PT_LOAD:
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == PT_DYNAMIC:
                dynamic = (p_offset, p_filesz)

        def offset_of(address: int) -> int:
            for vaddr, offset, size in loads:
                if vaddr <= address < vaddr + size:
                    return offset + address - vaddr
            raise ValueError(f"{path}: address {address:#x} outside the loaded segments")

        entries: List[Tuple[int, int]] = []
        if dynamic is not None:
            for position in range(dynamic[0], dynamic[0] + dynamic[1], 16):
                tag, value = struct.unpack_from(endian + "qQ", data, position)
                if tag == 0:
                    break
                entries.append((tag, value))
        strtab = next((value for tag, value in entries if tag == DT_STRTAB), None)

        def string(offset: int) -> str:
            start = offset_of(strtab) + offset
            return data[start:data.find(b"\0", start)].decode()

        origin = os.path.dirname(os.path.abspath(path))
        for tag, value in entries:
            if tag == DT_NEEDED:
                info.needed.append(string(value))
            elif tag in (DT_RUNPATH, DT_RPATH):
                for folder in string(value).split(":"):
                    if folder:
                        info.search_path.append(os.path.normpath(folder.replace("$ORIGIN", origin)
                                                                 .replace("${ORIGIN}", origin)))
        if scan_dlopen:
            own = os.path.basename(path)
            info.dlopened = sorted({match.group().decode() for match in DLOPENED.finditer(data)} - {own})
    return info


def _loader_cache() -> Dict[str, str]:
    """soname -> path from ``ldconfig -p`` (empty where ldconfig is missing)."""
    for ldconfig in ("/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"):
        try:
            output = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        cache = {}
        for line in output.splitlines():
            match = re.match(r"\s*(\S+) .*=> (\S+)$", line)
            if match:
                cache.setdefault(match.group(1), match.group(2))
        return cache
    return {}


def _resolves(name: str, search_path: Iterable[str], cache: Dict[str, str]) -> bool:
    folders = list(search_path) + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if any(os.path.exists(os.path.join(folder, name)) for folder in folders):
        return True
    return name in cache or any(os.path.exists(os.path.join(folder, name)) for folder in SYSTEM_DIRS)


def _skipped(name: str) -> bool:
    return (name in DRIVER_LIBRARIES or name.startswith(OPTIONAL_PREFIXES) or name.startswith(SYSTEM_PREFIXES))


def dali_folder() -> Optional[str]:
    """The installed ``nvidia/dali`` folder, found without importing DALI."""
    try:
        spec = importlib.util.find_spec("nvidia.dali")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _distribution(dali_dir: str) -> str:
    site = os.path.dirname(os.path.dirname(dali_dir))
    names = sorted(os.path.basename(p)[: -len(".dist-info")]
                   for p in glob.glob(os.path.join(site, "nvidia_dali*.dist-info")))
    return ", ".join(names) or "nvidia-dali (version unknown)"


def backend_files(dali_dir: str) -> List[str]:
    """DALI's own libraries, its extension module for this Python, and nvImageCodec's library and decoder plugins
    (which DALI's image decoders load)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    files = sorted(glob.glob(os.path.join(dali_dir, "libdali*.so")))
    files += glob.glob(os.path.join(dali_dir, "backend_impl" + suffix))
    codec = os.path.join(os.path.dirname(dali_dir), "nvimgcodec")
    files += sorted(glob.glob(os.path.join(codec, "libnvimgcodec.so*")))
    files += sorted(glob.glob(os.path.join(codec, "extensions", "*.so*")))
    return files


def check(dali_dir: Optional[str] = None) -> Report:
    """Resolve every library DALI's backend needs (see the module docstring)."""
    dali_dir = dali_dir or dali_folder()
    if dali_dir is None:
        return Report(None, None, {}, 0)
    cache = _loader_cache()
    missing: Dict[str, List[str]] = {}
    checked = set()
    # DALI's files first (with their strings scanned), then what they need (NEEDED entries only)
    pending = [(path, True) for path in backend_files(dali_dir)]
    seen = set()
    while pending:
        path, scan = pending.pop(0)
        if path in seen:
            continue
        seen.add(path)
        info = read_elf(path, scan_dlopen=scan)
        user = os.path.relpath(path, os.path.dirname(os.path.dirname(dali_dir)))
        for name in info.needed + info.dlopened:
            if _skipped(name):
                continue
            checked.add(name)
            found = [os.path.join(folder, name) for folder in info.search_path
                     if os.path.exists(os.path.join(folder, name))]
            if found:
                # follow what the library itself needs (vendored and CUDA libraries), without its strings
                if os.path.realpath(found[0]).startswith(os.path.dirname(os.path.dirname(dali_dir))):
                    pending.append((found[0], False))
            elif not _resolves(name, info.search_path, cache):
                missing.setdefault(name, []).append(user)
    return Report(dali_dir, _distribution(dali_dir), missing, len(checked))


def main() -> int:
    report = check()
    print(report.describe())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
