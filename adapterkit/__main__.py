"""``python -m adapterkit``: the same as the ``adapterkit`` command."""

from adapterkit.cli import main

main()
