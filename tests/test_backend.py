"""Tests of lem_fixtures.backend: OpenBLAS preloading, the checked mlx import and backend_info.

Preloading only works before mlx is imported, so the cases that depend on import order run in a
fresh interpreter.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys
import types

import pytest

from lem_fixtures import backend
from lem_fixtures.errors import BackendError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preloading is Linux-only")

SYSTEM_OPENBLAS = backend.find_openblas() if sys.platform.startswith("linux") else None
needs_openblas = pytest.mark.skipif(
    SYSTEM_OPENBLAS is None, reason=f"no system OpenBLAS; install it with `{backend.INSTALL_OPENBLAS_HINT}`"
)


def run_python(code: str, env_updates: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON object as its last stdout line."""
    import os

    env = {key: value for key, value in os.environ.items() if key not in ("LEM_OPENBLAS", "LD_PRELOAD")}
    env.update(env_updates or {})
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["stderr"] = completed.stderr
    return result


PRELOAD_THEN_IMPORT = """
import json, logging
logging.basicConfig(level=logging.WARNING)
from lem_fixtures import backend
path = backend.preload_openblas()
info = backend.backend_info()
print(json.dumps({"path": path, "info": info}))
"""

IMPORT_THEN_PRELOAD = """
import json, logging
logging.basicConfig(level=logging.WARNING)
import mlx.core
from lem_fixtures import backend
path = backend.preload_openblas()
print(json.dumps({"path": path, "mapped": backend.mapped_openblas()}))
"""


@needs_openblas
def test_preload_before_import_uses_openblas():
    result = run_python(PRELOAD_THEN_IMPORT)

    assert result["path"] == SYSTEM_OPENBLAS
    assert result["info"]["blas_is_openblas"] is True
    assert "libopenblas" in result["info"]["openblas_mapped"]
    assert "WARNING" not in result["stderr"]


@needs_openblas
def test_preload_after_mlx_import_warns_too_late():
    result = run_python(IMPORT_THEN_PRELOAD)

    assert result["path"] is None
    assert result["mapped"] is None
    assert "imported before OpenBLAS was preloaded" in result["stderr"]


@needs_openblas
def test_preload_accepts_ld_preload():
    result = run_python(IMPORT_THEN_PRELOAD, {"LD_PRELOAD": SYSTEM_OPENBLAS})

    assert result["path"] is not None
    assert "libopenblas" in result["path"]
    assert "too late" not in result["stderr"]


def test_preload_disabled_by_environment():
    result = run_python(PRELOAD_THEN_IMPORT, {"LEM_OPENBLAS": "off"})

    assert result["path"] is None
    assert result["info"]["blas_is_openblas"] is False
    assert result["info"]["openblas_preloaded"] is None


@needs_openblas
def test_preload_missing_configured_path_falls_back(tmp_path):
    result = run_python(PRELOAD_THEN_IMPORT, {"LEM_OPENBLAS": str(tmp_path / "missing.so")})

    assert result["path"] == SYSTEM_OPENBLAS
    assert "missing.so: file not found" in result["stderr"]


def test_preload_not_found_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(backend, "_preloaded_path", None)
    monkeypatch.setattr(backend, "_warned_not_found", False)
    monkeypatch.setattr(backend, "mapped_openblas", lambda: None)
    monkeypatch.setattr(backend, "find_openblas", lambda: None)
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    monkeypatch.delenv("LEM_OPENBLAS", raising=False)

    with caplog.at_level(logging.WARNING, logger="lem_fixtures.backend"):
        first = backend.preload_openblas()
        second = backend.preload_openblas()

    assert first is None
    assert second is None
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "apt-get install libopenblas0-pthread" in warnings[0]


def test_preload_noop_on_macos(monkeypatch):
    monkeypatch.setattr(backend, "_preloaded_path", None)
    monkeypatch.setattr(sys, "platform", "darwin")

    assert backend.preload_openblas() is None


def test_import_mlx_missing_raises_backend_error(monkeypatch):
    # A None entry in sys.modules makes `import mlx.core` raise ImportError, as a missing package does.
    monkeypatch.setitem(sys.modules, "mlx.core", None)

    with pytest.raises(BackendError) as raised:
        backend.import_mlx()

    assert 'pip install "mlx[cpu]"' in str(raised.value)


def test_import_mlx_without_backend_raises(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("[ones] no CPU backend is available")

    fake_core = types.ModuleType("mlx.core")
    fake_core.ones = fail
    fake_mlx = types.ModuleType("mlx")
    fake_mlx.core = fake_core
    monkeypatch.setitem(sys.modules, "mlx", fake_mlx)
    monkeypatch.setitem(sys.modules, "mlx.core", fake_core)

    with pytest.raises(BackendError) as raised:
        backend.import_mlx()

    message = str(raised.value)
    assert "no CPU backend is available" in message
    assert 'pip install "mlx[cpu]"' in message


def test_import_mlx_returns_working_module():
    mx = backend.import_mlx()

    assert (mx.array([1.0, 2.0]) * 2).tolist() == [2.0, 4.0]


def test_backend_info_versions_and_device():
    info = backend.backend_info()

    assert info["mlx"] == importlib.metadata.version("mlx")
    assert info["mlx_lm"] == importlib.metadata.version("mlx-lm")
    assert "cpu" in info["default_device"].lower()
    assert isinstance(info["blas_is_openblas"], bool)
    assert info["blas_is_openblas"] == (backend.mapped_openblas() is not None)
