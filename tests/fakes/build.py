"""Compile the emulated GPU (tests/fakes/fake_nvml.c) and the fake libcuda (fake_cuda.c) into
shared libraries.

Used by tests/conftest.py (session fixtures), tests/test_timeline.py, and usable from benchmarks
and by hand::

    python tests/fakes/build.py [full|minimal|no_required] [OUT_DIR]   # prints the .so path
    python tests/fakes/build.py cuda[:full|:old|:no_devices] [OUT_DIR]  # the fake libcuda

Builds are cached: a variant is recompiled only when its library is missing or older than its
source or this file. Several processes (pytest-xdist workers) may build at once: each compiles
to a private temporary name and renames it into place atomically. One build per variant also
means one path: the package loads libcuda once per process, so every test must name the same
file for the fake's control functions (ctypes) to reach the instance the package uses.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

FAKES_DIR = Path(__file__).resolve().parent
SOURCE = FAKES_DIR / "fake_nvml.c"
CUDA_SOURCE = FAKES_DIR / "fake_cuda.c"
REPO_ROOT = FAKES_DIR.parent.parent
NVML_API_HEADER = REPO_ROOT / "csrc" / "nvml_api.h"
#: Default output directory (git-ignored); override with FAKE_NVML_BUILD_DIR.
DEFAULT_OUT_DIR = FAKES_DIR / "build"

#: variant name -> extra compiler flags
VARIANTS: dict[str, tuple[str, ...]] = {
    "full": (),
    # only the fallback names of versioned pairs; no buffer, energy counter or fields
    "minimal": ("-DFAKE_NVML_MINIMAL",),
    # lacks nvmlDeviceGetName, a required symbol
    "no_required": ("-DFAKE_NVML_NO_REQUIRED",),
}

#: fake libcuda variant name -> extra compiler flags
CUDA_VARIANTS: dict[str, tuple[str, ...]] = {
    "full": (),
    # only unversioned names (cuEventDestroy, cuDeviceGetUuid, ...), no cuLaunchHostFunc
    "old": ("-DFAKE_CUDA_OLD",),
    # no cuDeviceGetCount / cuDeviceGet / cuDeviceGetUuid(_v2)
    "no_devices": ("-DFAKE_CUDA_NO_DEVICES",),
}

CFLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11",
          "-fvisibility=hidden", "-pthread")


class FakeBuildError(RuntimeError):
    """The C compiler is missing or rejected fake_nvml.c (message has its output)."""


def library_name(variant: str) -> str:
    """File name of a variant's library, e.g. ``libfake_nvml_minimal.so``."""
    return "libfake_nvml.so" if variant == "full" else f"libfake_nvml_{variant}.so"


def _compiler(env_var: str, default: str) -> str:
    cc = os.environ.get(env_var) or default
    if shutil.which(cc.split()[0]) is None:
        raise FakeBuildError(f"C compiler {cc!r} not found (set {env_var}); the emulated GPU "
                             f"needs one to build tests/fakes/fake_nvml.c and fake_cuda.c")
    return cc


def build_fake(variant: str = "full", out_dir: str | os.PathLike | None = None) -> Path:
    """Compile a variant of the emulated NVML library and return the path of the ``.so``.

    Args:
        variant: ``"full"``, ``"minimal"`` (no optional primaries: exercises the fallbacks and
            capability flags) or ``"no_required"`` (no nvmlDeviceGetName).
        out_dir: where to put it; default ``$FAKE_NVML_BUILD_DIR`` or ``tests/fakes/build``.

    Raises:
        ValueError: unknown variant.
        FakeBuildError: no compiler, or the compilation failed.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown fake NVML variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return _compile(SOURCE, VARIANTS[variant], library_name(variant), out_dir, "the emulated GPU")


def cuda_library_name(variant: str) -> str:
    """File name of a fake libcuda variant's library, e.g. ``libfake_cuda_old.so``."""
    return "libfake_cuda.so" if variant == "full" else f"libfake_cuda_{variant}.so"


def build_fake_cuda(variant: str = "full", out_dir: str | os.PathLike | None = None) -> Path:
    """Compile a variant of the fake libcuda (tests/fakes/fake_cuda.c) and return its path.

    Args:
        variant: ``"full"``, ``"old"`` (unversioned names only, no cuLaunchHostFunc) or
            ``"no_devices"`` (no device enumeration symbols).
        out_dir: as for :func:`build_fake`.

    Raises:
        ValueError: unknown variant.
        FakeBuildError: no compiler, or the compilation failed.
    """
    if variant not in CUDA_VARIANTS:
        raise ValueError(f"unknown fake CUDA variant {variant!r}; choose one of {sorted(CUDA_VARIANTS)}")
    return _compile(CUDA_SOURCE, CUDA_VARIANTS[variant], cuda_library_name(variant), out_dir,
                    "the fake libcuda")


def _compile(source: Path, flags: tuple[str, ...], name: str, out_dir: str | os.PathLike | None,
             what: str) -> Path:
    out = Path(out_dir or os.environ.get("FAKE_NVML_BUILD_DIR") or DEFAULT_OUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    lib = out / name
    newest_input = max(source.stat().st_mtime, Path(__file__).stat().st_mtime)
    if lib.exists() and lib.stat().st_mtime >= newest_input:
        return lib
    cc = _compiler("CC", "cc")
    tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
    cmd = [*cc.split(), *CFLAGS, *flags, str(source), "-o", str(tmp), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise FakeBuildError(f"building {what} failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, lib)
    return lib


def abi_check(cxx: str | None = None) -> subprocess.CompletedProcess:
    """Compile fake_nvml.c as C++ against csrc/nvml_api.h with ``-DFAKE_NVML_ABI_CHECK``.

    Static assertions in the source then verify, for every member of the package's
    ``LLM_DVFS_NVML_SYMBOLS`` list, that the fake exports the primary and fallback names with
    exactly the function type the package casts them to, and that the struct layouts agree.
    Returns the finished process (returncode 0 = consistent). Raises FakeBuildError without C++.
    """
    cxx = cxx or _compiler("CXX", "c++")
    cmd = [*cxx.split(), "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           "-DFAKE_NVML_ABI_CHECK", f"-I{NVML_API_HEADER.parent}", "-x", "c++", str(SOURCE)]
    return subprocess.run(cmd, capture_output=True, text=True)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "full"
    where = sys.argv[2] if len(sys.argv) > 2 else None
    if which == "cuda" or which.startswith("cuda:"):
        print(build_fake_cuda(which.partition(":")[2] or "full", where))
    else:
        print(build_fake(which, where))
