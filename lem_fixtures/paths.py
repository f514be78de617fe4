"""Locations on disk that several modules share."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Return the user cache directory of the suite, without creating it.

    Order: $LEM_CACHE_DIR, then $XDG_CACHE_HOME/lem, then ~/.cache/lem.
    An empty variable counts as unset.
    """
    explicit = os.environ.get("LEM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()

    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "lem"

    return Path.home() / ".cache" / "lem"
