"""``compose``: the dispatcher that blends adapters through a strategy, and its dry-run plan."""
