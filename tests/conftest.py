"""Shared test set-up: Ray auth off and identical for every process; no hidden downloads."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
