"""Distillation methods: one object each, built from its own settings; loss(nets, batch) -> (loss, logs)."""

from __future__ import annotations

from lcmkit.methods.lcd import LCD, LCDSettings

METHODS = {"lcd": (LCD, LCDSettings)}
"""name -> (method class, its settings dataclass). A new method is one module here and one line."""
