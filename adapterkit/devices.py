"""The one check of a ``device`` argument, shared by compose, its dry run, merge and its dry run.

torch accepts a device name without asking whether the machine has one (``torch.device("cuda")``
works on a CPU-only build) and refuses an unknown name with a long RuntimeError; either would
surface as a traceback in the middle of the maths, or not at all when a strategy never touches
the device (a one-adapter ``linear`` blend). Checking here, before any work, gives one line and
the same answer for every command.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from adapterkit.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device", "single_threaded"]


def _detail(exc: BaseException) -> str:
    """The first sentence of torch's message: it lists every device type it knows, which runs long."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if text.startswith("Expected one of"):
        return "unknown device type; use cpu, cuda, cuda:N or mps"
    return text.split(" at start of device string", 1)[0].split(". ", 1)[0][:120]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device ``device`` names (CPU for None), or a one-line error when this machine cannot use it.

    ``meta`` is refused too: it holds shapes but no values, so the maths would produce nothing.
    """
    import torch

    if device is None:
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"device {str(device)!r} is not a torch device ({_detail(exc)})") from None
    if chosen.type == "cpu":
        return chosen
    if chosen.type == "meta":
        raise InvalidInputError(f"device {str(device)!r} holds no values; use cpu or a GPU")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {str(device)!r} is not available (torch sees no CUDA GPU)")
        count = torch.cuda.device_count()
        if chosen.index is not None and chosen.index >= count:
            raise InvalidInputError(
                f"device {str(device)!r} is not available (torch sees {count} CUDA GPU{'s' if count != 1 else ''})"
            )
        return chosen
    try:  # mps, xpu and the rest: allocating one element asks the backend whether it is there
        torch.empty(1, device=chosen)
    except Exception as exc:  # torch raises RuntimeError, AssertionError, ... for a backend it was built without
        raise InvalidInputError(f"device {str(device)!r} is not available ({_detail(exc)})") from None
    return chosen


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one CPU thread for the block (restored after).

    Many small tensor operations (rewriting factors, a merge's blocks, an extraction's thin QRs
    and SVDs) run slower on torch's thread pool than on one thread, badly so on a busy machine
    (a GGUF export of an 8B-sized adapter took 17 s with two threads on a loaded 2-core machine,
    3 s with one); and merge and extract keep the other cores for threads of their own.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
