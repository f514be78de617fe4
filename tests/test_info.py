"""Tests of `lem info` (lem_fixtures.info)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from lem_fixtures import __version__, convert, info, models


@pytest.fixture
def cache_with_one_model(tmp_path, monkeypatch):
    """A LEM cache holding one complete conversion, a stale one and an assembled GGUF."""
    monkeypatch.setenv("LEM_CACHE_DIR", str(tmp_path))
    models_dir = tmp_path / "models"
    for name, version in (("tiny-0123456789abcdef", convert.CONVERTER_VERSION), ("old-0123456789abcdef", 0)):
        directory = models_dir / name
        directory.mkdir(parents=True)
        for file_name in convert.REQUIRED_FILES:
            (directory / file_name).write_text("{}")
        (directory / convert.CONVERSION_RECORD).write_text(json.dumps({"converter_version": version}))
    (models_dir / "tiny-0123456789abcdef" / "model.safetensors").write_bytes(b"\0" * 10240)
    (models_dir / "gguf").mkdir()
    return models_dir


def test_collect_info_reports_versions_and_cache(cache_with_one_model):
    collected = info.collect_info()

    assert collected["versions"]["python"] == platform.python_version()
    assert collected["versions"]["lem_fixtures"] == __version__
    assert collected["cache_dir"] == str(cache_with_one_model)
    assert [entry["name"] for entry in collected["converted_models"]] == ["tiny-0123456789abcdef"]
    assert collected["converted_models"][0]["bytes"] > 10240
    assert collected["registry"]["models"] == len(models.load_registry())
    assert collected["registry"]["default"] == "smollm2-135m-instruct"


def test_collect_info_reports_backend():
    collected = info.collect_info()

    assert collected["backend"]["error"] is None
    assert "cpu" in collected["backend"]["default_device"].lower()


def test_format_info_lists_every_section(cache_with_one_model):
    text = info.format_info(info.collect_info())

    for label in ("versions:", "mlx-lm", "device:", "openblas:", "cache dir:", "converted models: 1", "registry:"):
        assert label in text
    assert "tiny-0123456789abcdef  10.0 KiB" in text
    assert f"{len(models.load_registry())} models" in text


def test_format_info_reports_missing_backend(cache_with_one_model):
    collected = info.collect_info()
    collected["backend"] = {"error": 'failed to import mlx.core; run `pip install "mlx[cpu]"`'}

    text = info.format_info(collected)

    assert 'backend:        unavailable: failed to import mlx.core; run `pip install "mlx[cpu]"`' in text
    assert "openblas:       unknown (mlx unavailable)" in text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preloading is Linux-only")
def test_format_info_without_openblas_gives_install_command(cache_with_one_model):
    collected = info.collect_info()
    collected["backend"].update({"blas_is_openblas": False, "openblas_mapped": None})

    text = info.format_info(collected)

    assert "apt-get install libopenblas0-pthread" in text


def test_lem_info_json_command():
    completed = subprocess.run(
        [sys.executable, "-m", "lem_fixtures.cli", "info", "--json"], capture_output=True, text=True, timeout=120, check=False
    )

    assert completed.returncode == 0, completed.stderr
    printed = json.loads(completed.stdout)
    assert printed["versions"]["lem_fixtures"] == __version__
    assert printed["registry"]["models"] == len(models.load_registry())


def test_lem_info_text_command(capsys):
    assert info.main([]) == 0

    assert "openblas:" in capsys.readouterr().out
