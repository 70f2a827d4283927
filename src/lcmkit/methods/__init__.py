"""Distillation methods: one object each, built from its own settings; loss(nets, batch) -> (loss, logs)."""

from __future__ import annotations

from lcmkit.methods.lcd import LCD

METHODS = {"lcd": LCD}
"""name -> method class, built from its own config section. A new method is one module here and one line."""
