"""Checkpoints: one file that open_clip loads, per-rank files for the per-sample state, one restore."""
