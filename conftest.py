"""Settings for every test session in this checkout. The `lem` plugin itself loads through its entry point."""

import os

# Plots are written to files; no test needs a display.
os.environ.setdefault("MPLBACKEND", "Agg")

# The plugin's own tests run pytest in a temporary folder.
pytest_plugins = ("pytester",)
