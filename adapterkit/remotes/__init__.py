"""Remote backends: where adapters are pushed to and pulled from (see ``base.Remote``)."""

from adapterkit.remotes.base import Remote, TransferResult

__all__ = ["Remote", "TransferResult"]
