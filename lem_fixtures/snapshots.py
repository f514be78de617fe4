"""Response snapshots: what a person reviews when a case's output changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from syrupy.extensions.json import JSONSnapshotExtension

# Keys of a case result that go into its snapshot. Timings and scores stay out: timings differ on
# every run, and scores follow from the response.
SNAPSHOT_KEYS = (
    "probe", "model", "condition", "rendered_prompt", "mode", "params",
    "response", "finish_reason", "prompt_tokens", "generation_tokens",
)


class ResponseSnapshotExtension(JSONSnapshotExtension):
    """One JSON file per case with sorted keys, so a snapshot is byte-stable across runs and workers."""


def snapshot_view(result: Mapping[str, Any]) -> dict[str, Any]:
    """The reviewed part of a case result."""
    return {key: result[key] for key in SNAPSHOT_KEYS if key in result}
