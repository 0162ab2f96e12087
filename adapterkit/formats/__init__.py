"""Readers and writers of adapter files, each a :class:`~adapterkit.formats.base.Format` registered through
``register_formats``: PEFT folders are the built-in one; safetensors headers and canonical bytes are shared."""
