"""Kernel files: the system-prompt texts that define the non-baseline conditions.

A kernel spec is `name=path`, or a bare `path` whose file stem becomes the name. A path may
end in `#N` to take the N-th (1-based) of several JSON documents written one after another in
one file, as the upstream lek-1-kernel.txt does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import KernelError

BASELINE = "baseline"

_DOCUMENT_SUFFIX_RE = re.compile(r"^(?P<path>.+)#(?P<number>[0-9]+)$")


@dataclass(frozen=True)
class Kernel:
    """A named kernel text; `sha256` is the hex digest of the text encoded as UTF-8."""

    name: str
    path: Path
    text: str
    sha256: str
    document: int | None = None  # the 1-based JSON document number for a `path#N` spec


def text_sha256(text: str) -> str:
    """Return the SHA-256 hex digest of the text encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def parse_kernel_spec(spec: str) -> tuple[str, Path]:
    """Split `name=path` into (name, path); a spec without "=" is named after the file stem.

    A trailing `#N` stays part of the returned path. Raises KernelError for an empty name or path.
    """
    if "=" in spec:
        name, _, raw_path = spec.partition("=")
        name = name.strip()
    else:
        raw_path = spec
        name = Path(_DOCUMENT_SUFFIX_RE.sub(r"\g<path>", spec)).stem
    if not raw_path:
        raise KernelError(f"kernel spec {spec!r} has no path; write NAME=PATH, for example json=kernel/axioms.json")
    if not name:
        raise KernelError(f"kernel spec {spec!r} has no name; write NAME=PATH, for example json=kernel/axioms.json")
    return name, Path(raw_path)


def load_kernel(spec: str, base_dir: str | os.PathLike[str] | None = None) -> Kernel:
    """Load the kernel of one spec; relative paths are resolved against base_dir (default: cwd).

    Raises KernelError when the file is missing, a directory, unreadable, not UTF-8, empty or
    whitespace only, or when `#N` names a JSON document the file does not have.
    """
    name, spec_path = parse_kernel_spec(spec)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    path = spec_path if spec_path.is_absolute() else base / spec_path

    document = None
    suffix = _DOCUMENT_SUFFIX_RE.match(str(path))
    if suffix is not None and not path.exists():
        path = Path(suffix["path"])
        document = int(suffix["number"])

    text = _read_kernel_file(path, spec)
    if document is not None:
        text = _json_document(text, document, path, spec)
    if not text.strip():
        raise KernelError(f"kernel file {path} (spec {spec!r}) is empty or only whitespace; give a file with the kernel text")
    return Kernel(name=name, path=path, text=text, sha256=text_sha256(text), document=document)


def load_kernels(specs: Iterable[str], base_dir: str | os.PathLike[str] | None = None) -> list[Kernel]:
    """Load kernels in order. Raises KernelError for a repeated name or the reserved name "baseline"."""
    kernels: list[Kernel] = []
    for spec in specs:
        kernel = load_kernel(spec, base_dir)
        if kernel.name == BASELINE:
            raise KernelError(f"kernel spec {spec!r} uses the reserved name {BASELINE!r}; name it with NAME=PATH")
        if any(other.name == kernel.name for other in kernels):
            raise KernelError(f"kernel name {kernel.name!r} is given twice (spec {spec!r}); name each kernel with NAME=PATH")
        kernels.append(kernel)
    return kernels


def condition_names(kernels: Iterable[Kernel]) -> list[str]:
    """Return the condition names of a run: "baseline", then each kernel name in order."""
    return [BASELINE, *(kernel.name for kernel in kernels)]


def _read_kernel_file(path: Path, spec: str) -> str:
    if not path.exists():
        raise KernelError(f"kernel file not found: {path} (spec {spec!r}); check the path or pass an absolute one")
    if path.is_dir():
        raise KernelError(f"kernel path {path} (spec {spec!r}) is a directory; give a file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise KernelError(f"cannot read kernel file {path} (spec {spec!r}): {error.strerror or error}") from error
    try:
        # Decoded without newline translation, so the text is the file's content as stored.
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise KernelError(
            f"kernel file {path} (spec {spec!r}) is not valid UTF-8 (byte {error.start}: {error.reason}); save it as UTF-8"
        ) from error


def _json_document(text: str, number: int, path: Path, spec: str) -> str:
    """Return the source text of the number-th JSON document of text, from its first to its last character.

    NOTE: whitespace between documents belongs to no document. So when a source file ended in a
    newline before the files were concatenated, its `#N` text lacks that newline.
    """
    decoder = json.JSONDecoder()
    position = 0
    found = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            break
        try:
            _, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise KernelError(
                f"kernel file {path} (spec {spec!r}) is not a sequence of JSON documents: {error.msg} "
                f"at line {error.lineno} column {error.colno}; drop the #N suffix to use the whole file"
            ) from error
        found += 1
        if found == number:
            return text[position:end]
        position = end
    raise KernelError(
        f"kernel file {path} (spec {spec!r}) has {found} JSON documents, so #{number} does not exist; "
        f"use #1 to #{found}"
    )
