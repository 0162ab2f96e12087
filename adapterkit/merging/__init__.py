"""The streamed merge into base weights (plan, low-rank updates, shard writer, output folder) and ``attach``."""
