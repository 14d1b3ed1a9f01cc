"""One training step and its parts: the engine, the non-finite step guard, precision, optimizer, schedules,
progress counters."""
