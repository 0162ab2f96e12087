"""A plugin whose import fails: adapterkit must warn and carry on without it."""

raise ImportError("this plugin is broken on purpose")
