"""The MLX backend: OpenBLAS preloading, a checked `mlx.core` import and a report of what is in use.

The Linux `mlx[cpu]` wheel (mlx-cpu 0.32) links a bundled reference (netlib) BLAS, which runs a
float32 GEMM at a few GFLOP/s. Loading a system OpenBLAS with RTLD_GLOBAL before mlx is imported
makes the dynamic linker resolve mlx's BLAS symbols to OpenBLAS instead. This module never imports
mlx at import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from lem_fixtures.errors import BackendError

logger = logging.getLogger(__name__)

OPENBLAS_ENV = "LEM_OPENBLAS"
# Values of LEM_OPENBLAS that turn preloading off, for example to time the bundled BLAS.
OPENBLAS_DISABLED_VALUES = {"0", "off", "none", "false"}
INSTALL_OPENBLAS_HINT = "apt-get install libopenblas0-pthread"
INSTALL_MLX_HINT = 'pip install "mlx[cpu]"' if sys.platform.startswith("linux") else "pip install mlx"

_preloaded_path: str | None = None
_warned_not_found = False


def _multiarch_dir() -> str:
    machine = platform.machine()
    triplet = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}
    return f"/usr/lib/{triplet.get(machine, machine + '-linux-gnu')}"


def find_openblas() -> str | None:
    """Return the OpenBLAS library to preload: $LEM_OPENBLAS, then Debian's path, then `find_library`."""
    configured = os.environ.get(OPENBLAS_ENV)
    if configured:
        if configured.strip().lower() in OPENBLAS_DISABLED_VALUES:
            return None
        if Path(configured).is_file():
            return configured
        logger.warning("%s=%s: file not found; looking for OpenBLAS in the system paths", OPENBLAS_ENV, configured)

    debian_path = Path(_multiarch_dir()) / "libopenblas.so.0"
    if debian_path.is_file():
        return str(debian_path)
    return ctypes.util.find_library("openblas")


def mapped_openblas() -> str | None:
    """Return the path of a libopenblas mapped into this process (from /proc/self/maps), or None.

    numpy's own `libscipy_openblas64_` is not counted: its symbols carry a suffix that mlx never binds to.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and os.path.basename(fields[5]).startswith("libopenblas"):
            return fields[5].strip()
    return None


def preload_openblas() -> str | None:
    """Load OpenBLAS with RTLD_GLOBAL so that mlx, imported afterwards, binds its BLAS calls to it.

    Returns the path in use, or None: on macOS (mlx uses Accelerate there), when $LEM_OPENBLAS
    disables it, when no OpenBLAS is installed (a warning, logged once), or when mlx.core was
    imported first, which is too late (a warning). An OpenBLAS already mapped, for example
    through LD_PRELOAD, counts as loaded.
    """
    global _preloaded_path, _warned_not_found

    if _preloaded_path is not None:
        return _preloaded_path
    if not sys.platform.startswith("linux"):
        return None
    configured = os.environ.get(OPENBLAS_ENV, "")
    if configured.strip().lower() in OPENBLAS_DISABLED_VALUES:
        return None

    already_mapped = mapped_openblas()
    if already_mapped is not None:
        _preloaded_path = already_mapped
        return _preloaded_path

    if "mlx.core" in sys.modules:
        logger.warning(
            "mlx.core was imported before OpenBLAS was preloaded, so mlx keeps its bundled reference BLAS "
            "(float32 matrix products run far slower); call lem_fixtures.backend.import_mlx() before "
            "anything imports mlx, or start Python with LD_PRELOAD=<path of libopenblas.so.0>"
        )
        return None

    path = find_openblas()
    if path is None:
        if not _warned_not_found:
            _warned_not_found = True
            logger.warning(
                "OpenBLAS not found, so mlx uses its bundled reference BLAS (float32 matrix products "
                "run far slower); install it with `%s` or set %s to the library path",
                INSTALL_OPENBLAS_HINT,
                OPENBLAS_ENV,
            )
        return None

    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        logger.warning("failed to load OpenBLAS from %s: %s; mlx uses its bundled reference BLAS", path, error)
        return None
    _preloaded_path = path
    logger.debug("preloaded OpenBLAS from %s", path)
    return path


def import_mlx() -> ModuleType:
    """Preload OpenBLAS, import `mlx.core` and run one small operation; return the `mlx.core` module.

    Raises BackendError when mlx is not installed or has no usable backend (the bare `mlx` wheel on
    Linux has no CPU backend and fails at import).
    """
    preload_openblas()
    try:
        import mlx.core as mx
    except ImportError as error:
        raise BackendError(
            f"failed to import mlx.core ({error}); the model side needs mlx with a backend: "
            f"run `{INSTALL_MLX_HINT}`"
        ) from error

    try:
        total = (mx.ones((2, 2)) @ mx.ones((2, 2))).sum()
        mx.eval(total)
        result = total.item()
    except Exception as error:  # mlx raises RuntimeError or ValueError when no device can run it
        raise BackendError(
            f"mlx {_version('mlx')} is installed but cannot run an operation ({error}); "
            f"install a backend with `{INSTALL_MLX_HINT}`"
        ) from error
    if result != 8.0:
        raise BackendError(
            f"mlx {_version('mlx')} computed a 2x2 matrix product sum of {result} instead of 8.0; "
            f"reinstall it with `{INSTALL_MLX_HINT}`"
        )
    return mx


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def backend_info() -> dict[str, Any]:
    """Return the backend in use: mlx and mlx-lm versions, default device and which BLAS mlx calls.

    Imports mlx through `import_mlx`, so it raises BackendError in the same cases.
    """
    mx = import_mlx()
    mapped = mapped_openblas()
    return {
        "mlx": _version("mlx"),
        "mlx_cpu": _version("mlx-cpu"),
        "mlx_lm": _version("mlx-lm"),
        "default_device": str(mx.default_device()),
        "openblas_preloaded": _preloaded_path,
        "blas_is_openblas": mapped is not None if sys.platform.startswith("linux") else False,
        "openblas_mapped": mapped,
    }
