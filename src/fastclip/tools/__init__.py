"""Offline tools on a run's outputs: export a checkpoint as an open_clip model, plot runs' curves."""
