"""Profiles: small tables of parameters that size every experiment (``smoke``, ``cpu``, ``paper``).

Profiles are data, not code paths: a notebook reads ``get(name)`` and passes the values on.
``smoke`` runs every notebook in minutes on 2 CPU cores (tests, CI); ``cpu`` is what the
book publishes (hours on a 2-core CPU, resumable); ``paper`` is the paper-scale schedule
for a GPU.
"""
from __future__ import annotations

import copy
import os

__all__ = ["PROFILES", "DEFAULT_PROFILE", "get", "current"]

#: The profile whose results the book publishes.
DEFAULT_PROFILE = "cpu"

_BASELINE_CPU = {
    # Our choice: the schedule of the public 92.60% ResNet20 reproduction (paper.md), 200 epochs of
    # cosine decay, Nesterov SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 256.
    "epochs": 200, "batch_size": 256, "lr": 0.1, "schedule": "cosine", "momentum": 0.9,
    "nesterov": True, "weight_decay": 5e-4, "seed": 0, "eval_every": 5,
    "train_subset": None, "test_subset": None,
}

PROFILES: dict[str, dict] = {
    "smoke": {
        "description": "every notebook in minutes on 2 CPU cores; what tests and CI run",
        "baseline": {**_BASELINE_CPU, "epochs": 1, "batch_size": 128, "eval_every": 1,
                     "train_subset": 1024, "test_subset": 500},
    },
    "cpu": {
        "description": "the published results: hours on a 2-core CPU, resumable",
        "baseline": dict(_BASELINE_CPU),
    },
    "paper": {
        "description": "the paper-scale schedule, for a GPU",
        "baseline": dict(_BASELINE_CPU),
    },
}


def get(name: str | None = None) -> dict:
    """A deep copy of profile ``name`` (default: ``HAWQ_PROFILE`` or :data:`DEFAULT_PROFILE`)."""
    name = name or current()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    return {"name": name, **copy.deepcopy(PROFILES[name])}


def current() -> str:
    """The profile named by ``HAWQ_PROFILE``, else the default."""
    return os.environ.get("HAWQ_PROFILE") or DEFAULT_PROFILE
