"""Probe files in every schema the upstream LEM seeds use, loaded into `Probe` records.

Accepted item schemas (JSON arrays of objects, or JSONL with one object per line):

- P-files: `{id, domain, prompt}`.
- Rephrased sets: `{id, category, prompt, source_probe, rephrase_type}`.
- Regional seeds: ids that are strings, ints, floats or null; `ethic_tension` (a misspelling,
  stored as `ethical_tension`); `prompt_en`; a recorded `response`; items without a prompt.
- lem-prompts.jsonl: `{seed_id, voice, domain, prompt}`, with the id `f"{seed_id}__{voice}"`.

The category is `category`, else `domain`, else "uncategorised", lower-cased. Items that
cannot be used are skipped and counted per reason in `ProbeFile.skipped`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import unicodedata
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import DuplicateProbeIdError, ProbeFileError

logger = logging.getLogger(__name__)

DuplicateIds = Literal["error", "number"]
DUPLICATE_IDS_CHOICES: tuple[str, ...] = ("error", "number")
PROBE_FILE_SUFFIXES: tuple[str, ...] = (".json", ".jsonl")
UNCATEGORISED = "uncategorised"

# Skip reasons, as counted in ProbeFile.skipped.
SKIP_NOT_OBJECT = "not an object"
SKIP_MISSING_PROMPT = "missing prompt"
SKIP_PROMPT_NOT_STRING = "prompt not a string"
SKIP_EMPTY_PROMPT = "empty prompt"
SKIP_INVALID_ID = "id not a string or number"
SKIP_REPEAT = "repeated item (same id and prompt)"

_FIX_DUPLICATES = (
    'pass duplicate_ids="number" (command line and pytest option: --lem-duplicate-ids=number) '
    "to rename later ones to ID~2, ID~3, ..., or give the items unique ids"
)
_TEST_ID_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


@dataclass(frozen=True)
class Probe:
    """One prompt of a probe file.

    `index` is the item's 0-based position: its index in a JSON array, or its line number
    minus one in a JSONL file. `extra` contains every key of the item other than id and prompt.
    """

    id: str
    prompt: str
    category: str
    source: str
    index: int
    test_id: str
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class ProbeFile:
    """The usable probes of one file, and how many items were skipped for each reason."""

    path: Path
    probes: list[Probe]
    skipped: dict[str, int] = field(default_factory=dict)


def canonical_id(raw_id: str | int | float) -> str:
    """Return the id as text: ints as decimal, integral floats without ".0", other floats by repr.

    Raises TypeError for any other type, bool included.
    """
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, float)):
        raise TypeError(f"probe id must be a string or number, got {type(raw_id).__name__}: {raw_id!r}")
    if isinstance(raw_id, float):
        if math.isfinite(raw_id) and raw_id.is_integer():
            return str(int(raw_id))
        return repr(raw_id)
    return str(raw_id)


def make_test_id(raw_id: str | int | float) -> str:
    """Turn a probe id into a stable, ASCII-safe pytest id.

    Characters outside [A-Za-z0-9_.-] are transliterated through Unicode NFKD where that
    yields ASCII letters, digits or "_.-" ("Laïcité" -> "Laicite") and replaced by "_"
    otherwise. When a non-ASCII character had to be replaced, the CRC-32 of the id's UTF-8
    bytes is appended ("法律" -> "__-0323f1bb"), so that ids in other scripts stay distinct.
    Raises TypeError like `canonical_id`.
    """
    text = canonical_id(raw_id)
    characters = []
    lost_non_ascii = False
    for character in text:
        if character in _TEST_ID_CHARACTERS:
            characters.append(character)
            continue
        for part in unicodedata.normalize("NFKD", character):
            if part in _TEST_ID_CHARACTERS:
                characters.append(part)
            elif unicodedata.combining(part):
                continue  # an accent split off by NFKD: "é" -> "e" + U+0301
            else:
                characters.append("_")
                lost_non_ascii = lost_non_ascii or not part.isascii()
    test_id = "".join(characters) or "_"
    if lost_non_ascii:
        checksum = zlib.crc32(text.encode("utf-8", "surrogatepass"))
        test_id += f"-{checksum:08x}"
    return test_id


def load_probe_file(path: str | os.PathLike[str], duplicate_ids: DuplicateIds = "error") -> ProbeFile:
    """Load one .json (array of objects) or .jsonl (one object per line) probe file.

    Raises ProbeFileError when the file cannot be read or parsed, and DuplicateProbeIdError
    when an id repeats with a different prompt (unless duplicate_ids="number") or two probe
    ids map to the same test id.
    """
    (probe_file,) = load_probe_files([path], duplicate_ids=duplicate_ids)
    return probe_file


def load_probes(paths: Sequence[str | os.PathLike[str]], duplicate_ids: DuplicateIds = "error") -> list[Probe]:
    """Load several probe files or directories into one list, in the order given.

    A directory contributes its *.json and *.jsonl files in sorted order. Ids must be
    unique across all files, with the same rules as within one file.
    """
    return [probe for probe_file in load_probe_files(paths, duplicate_ids) for probe in probe_file.probes]


def load_probe_files(paths: Sequence[str | os.PathLike[str]], duplicate_ids: DuplicateIds = "error") -> list[ProbeFile]:
    """Load several probe files or directories, one ProbeFile per file, checking ids across all."""
    if duplicate_ids not in DUPLICATE_IDS_CHOICES:
        raise ValueError(f"duplicate_ids must be one of {DUPLICATE_IDS_CHOICES}, got {duplicate_ids!r}")
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("load_probes takes a sequence of paths; wrap a single path in a list")

    registry = _IdRegistry(duplicate_ids)
    probe_files = [_load_one_file(path, registry) for path in _expand_paths(paths)]
    return probe_files


def _expand_paths(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    for raw_path in paths:
        path = Path(raw_path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in PROBE_FILE_SUFFIXES and p.is_file())
            if not files:
                raise ProbeFileError(f"probe directory {path} has no *.json or *.jsonl files; add probe files or pass a file")
            yield from files
        elif path.exists():
            yield path
        else:
            raise ProbeFileError(f"probe file not found: {path}; check the path")


@dataclass
class _Place:
    path: Path
    index: int
    jsonl: bool

    def __str__(self) -> str:
        if self.jsonl:
            return f"{self.path} line {self.index + 1}"
        return f"{self.path} item {self.index}"


class _IdRegistry:
    """Ids and test ids seen so far in one load, across files."""

    def __init__(self, duplicate_ids: DuplicateIds) -> None:
        self.duplicate_ids = duplicate_ids
        # id -> prompt -> (final id, place of first use)
        self.prompts_by_id: dict[str, dict[str, tuple[str, _Place]]] = {}
        self.final_ids: set[str] = set()
        # test id -> (probe id, place)
        self.test_ids: dict[str, tuple[str, _Place]] = {}

    def assign(self, probe_id: str, prompt: str, place: _Place) -> str | None:
        """Return the final id of a new item, or None when it repeats an earlier item exactly."""
        seen = self.prompts_by_id.setdefault(probe_id, {})
        if prompt in seen:
            return None
        if seen:
            first_id, first_place = next(iter(seen.values()))
            if self.duplicate_ids == "error":
                raise DuplicateProbeIdError(
                    f"duplicate probe id {probe_id!r} with a different prompt: {first_place} and {place}; "
                    + _FIX_DUPLICATES
                )
            final_id = self._numbered(probe_id)
        elif probe_id in self.final_ids:
            # A literal id such as "2048~2" that an earlier rename already took.
            final_id = self._numbered(probe_id)
        else:
            final_id = probe_id
        seen[prompt] = (final_id, place)
        self.final_ids.add(final_id)
        return final_id

    def _numbered(self, probe_id: str) -> str:
        number = 2
        while f"{probe_id}~{number}" in self.final_ids:
            number += 1
        return f"{probe_id}~{number}"

    def claim_test_id(self, test_id: str, probe_id: str, place: _Place) -> None:
        if test_id in self.test_ids:
            other_id, other_place = self.test_ids[test_id]
            raise DuplicateProbeIdError(
                f"probe ids {other_id!r} ({other_place}) and {probe_id!r} ({place}) both become "
                f"test id {test_id!r}; give one of them an id that differs in letters, digits, '_', '.' or '-'"
            )
        self.test_ids[test_id] = (probe_id, place)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ProbeFileError(f"cannot read probe file {path}: {error.strerror or error}; check the path and its permissions") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ProbeFileError(
            f"probe file {path} is not valid UTF-8 (byte {error.start}: {error.reason}); save it as UTF-8"
        ) from error


def _parse_items(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Yield (index, item): the array index for JSON, the line number minus one for JSONL."""
    if path.suffix == ".jsonl":
        for line_index, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ProbeFileError(
                    f"invalid JSON in {path} at line {line_index + 1} column {error.colno}: {error.msg}; "
                    "each line of a .jsonl file must be one JSON object"
                ) from error
            yield line_index, item
        return

    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProbeFileError(
            f"invalid JSON in {path} at line {error.lineno} column {error.colno}: {error.msg}; fix the file"
        ) from error
    if not isinstance(data, list):
        raise ProbeFileError(
            f"probe file {path} contains a JSON {_json_type(data)} at the top level; expected an array of probe objects"
        )
    yield from enumerate(data)


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def _raw_id(item: dict[str, Any], place: _Place) -> str:
    """Return the item's id as text, generated from the file name and position when absent.

    Raises TypeError for an id that is neither string nor number.
    """
    raw = item.get("id")
    if raw is None and item.get("seed_id") is not None:
        seed_id = canonical_id(item["seed_id"])
        voice = item.get("voice")
        return f"{seed_id}__{canonical_id(voice)}" if voice is not None else seed_id
    if raw is None or raw == "":
        position = f"line{place.index + 1}" if place.jsonl else f"item{place.index}"
        return f"{place.path.stem}-{position}"
    return canonical_id(raw)


def _category(item: dict[str, Any]) -> str:
    for key in ("category", "domain"):
        value = item.get(key)
        if isinstance(value, str) and value:
            return value.lower()
    return UNCATEGORISED


def _extra(item: dict[str, Any]) -> dict[str, Any]:
    extra = {key: value for key, value in item.items() if key not in ("id", "prompt")}
    if "ethic_tension" in extra and "ethical_tension" not in extra:
        extra["ethical_tension"] = extra.pop("ethic_tension")
    return extra


def _skip_reason(item: Any) -> str | None:
    if not isinstance(item, dict):
        return SKIP_NOT_OBJECT
    if "prompt" not in item or item["prompt"] is None:
        return SKIP_MISSING_PROMPT
    if not isinstance(item["prompt"], str):
        return SKIP_PROMPT_NOT_STRING
    if not item["prompt"].strip():
        return SKIP_EMPTY_PROMPT
    return None


def _load_one_file(path: Path, registry: _IdRegistry) -> ProbeFile:
    text = _read_text(path)
    jsonl = path.suffix == ".jsonl"
    probes: list[Probe] = []
    skipped: dict[str, int] = {}
    renamed = 0

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for index, item in _parse_items(path, text):
        place = _Place(path, index, jsonl)
        reason = _skip_reason(item)
        if reason is not None:
            skip(reason)
            continue
        try:
            probe_id = _raw_id(item, place)
        except TypeError:
            skip(SKIP_INVALID_ID)
            continue

        final_id = registry.assign(probe_id, item["prompt"], place)
        if final_id is None:
            skip(SKIP_REPEAT)
            continue
        if final_id != probe_id:
            renamed += 1
        test_id = make_test_id(final_id)
        registry.claim_test_id(test_id, final_id, place)
        probes.append(
            Probe(
                id=final_id,
                prompt=item["prompt"],
                category=_category(item),
                source=str(path),
                index=index,
                test_id=test_id,
                extra=_extra(item),
            )
        )

    logger.info("loaded %d probes from %s", len(probes), path)
    if renamed:
        logger.warning("renamed %d probes of %s whose ids repeat with a different prompt (ID~2, ID~3, ...)", renamed, path)
    if skipped:
        details = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        logger.warning("%s: skipped items: %s", path, details)
    return ProbeFile(path, probes, skipped)
