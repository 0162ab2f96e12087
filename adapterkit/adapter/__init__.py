"""The adapter in memory: modules, factors, scalings, PEFT config resolution, the dtype table (pure, no I/O)."""
