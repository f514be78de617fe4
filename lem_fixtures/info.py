"""`lem info`: versions, the MLX backend and device, OpenBLAS status, the cache and the model registry."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
from typing import Any

from lem_fixtures import __version__, convert, models
from lem_fixtures.backend import INSTALL_OPENBLAS_HINT
from lem_fixtures.errors import LemError


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info() -> dict[str, Any]:
    """Return everything `lem info` prints, as a dict. Backend problems are reported, not raised."""
    from lem_fixtures.backend import backend_info

    try:
        backend: dict[str, Any] = backend_info()
        backend["error"] = None
    except LemError as error:
        backend = {"error": str(error)}

    registry = models.load_registry()
    cache_dir = convert.models_cache_dir()
    return {
        "versions": {
            "python": platform.python_version(),
            "lem_fixtures": __version__,
            "mlx": _version("mlx"),
            "mlx-cpu": _version("mlx-cpu"),
            "mlx-lm": _version("mlx-lm"),
            "gguf": _version("gguf"),
            "tokenizers": _version("tokenizers"),
            "transformers": _version("transformers"),
        },
        "platform": f"{platform.system()} {platform.machine()}",
        "backend": backend,
        "cache_dir": str(cache_dir),
        "converted_models": [{"name": name, "bytes": size} for name, size in convert.list_converted_models(cache_dir)],
        "registry": {
            "models": len(registry),
            "embedded": sorted(name for name, spec in registry.items() if spec.embedded),
            "default": models.DEFAULT_MODEL,
        },
    }


def _format_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _openblas_line(backend: dict[str, Any]) -> str:
    if backend.get("error"):
        return "unknown (mlx unavailable)"
    if backend.get("blas_is_openblas"):
        return f"in use ({backend.get('openblas_mapped')})"
    if sys.platform == "darwin":
        return "not used (macOS: mlx uses Accelerate)"
    return f"not in use: mlx runs its bundled reference BLAS (slow); install it with `{INSTALL_OPENBLAS_HINT}`"


def format_info(info: dict[str, Any]) -> str:
    """Render `collect_info()` as the text that `lem info` prints."""
    lines = ["versions:"]
    lines += [f"  {name:<13} {version or 'not installed'}" for name, version in info["versions"].items()]
    backend = info["backend"]
    lines.append(f"platform:       {info['platform']}")
    if backend.get("error"):
        lines.append(f"backend:        unavailable: {backend['error']}")
    else:
        lines.append(f"device:         {backend['default_device']}")
    lines.append(f"openblas:       {_openblas_line(backend)}")
    lines.append(f"cache dir:      {info['cache_dir']}")
    converted = info["converted_models"]
    lines.append(f"converted models: {len(converted)}")
    lines += [f"  {entry['name']}  {_format_bytes(entry['bytes'])}" for entry in converted]
    registry = info["registry"]
    lines.append(
        f"registry:       {registry['models']} models "
        f"(embedded: {', '.join(registry['embedded'])}; default: {registry['default']})"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lem info", description="Print versions, the MLX backend and device, OpenBLAS status and cached models."
    )
    parser.add_argument("--json", action="store_true", help="print the same facts as one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = collect_info()
    except LemError as error:
        print(f"lem: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
