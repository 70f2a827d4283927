"""Distillation methods: one object each, built from its own settings; loss(nets, batch) -> (loss, logs)."""

from __future__ import annotations

from lcmkit.methods.lcd import LCD
from lcmkit.methods.tcd import PCM, TCD

METHODS = {"lcd": LCD, "tcd": TCD, "pcm": PCM}
"""name -> method class, built from the [lcd] section (w range, grid, distance: every consistency method's) and its
own section if it has one ([pcm]). A new method is one module here and one line."""
