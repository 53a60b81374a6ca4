"""Reproducible measurements of apprentice (overhead, distillation speed, flywheel) and their helpers."""
