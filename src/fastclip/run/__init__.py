"""A run's lifecycle around the steps: control between steps, stop signals, the folder lock, the remote copy,
logs and the start-up summary."""
