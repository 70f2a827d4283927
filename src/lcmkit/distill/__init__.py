"""The distillation recipe: its options (config.py), the refusals before work (checks.py), setup, validation, and
recipe.py."""
