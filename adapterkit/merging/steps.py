"""What a merge does to one base tensor, and the maths that does it to a block of rows (no files here).

A merged tensor is the base tensor put through an ordered list of steps, one or more per adapter
in the order the adapters were given, as PEFT merges several adapters one after another:

* :class:`Contribution`: a LoRA module's ``factor * B @ A`` is added; for a DoRA module the sum is
  then rescaled so that each row (or column) has the norm the adapter's magnitude vector gives it.
  As in PEFT's merge and forward, a DoRA module's norms are those of the *base* weight plus its own
  change, whatever other adapters add around it: the rescale factors depend on the base alone.
* :class:`Replacement`: the adapter's own copy of the tensor replaces it (``modules_to_save`` copies,
  trained biases); it may have more rows than the base's (an embedding resized for added tokens).
* :class:`RowReplacement`: the adapter's trained rows replace those rows (trainable tokens).
* :class:`BiasAddition`: ``factor * b`` is added to a bias (``lora_bias``: lora_B's own bias).

Blocks are runs of whole rows, so every step is row-local except a DoRA norm taken down the
columns (embeddings, and ``fan_in_fan_out`` layers stored transposed): those norms are summed
block by block over the base before the tensor is written (:func:`column_norm_squares`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from adapterkit.adapter.model import LoraModule

__all__ = [
    "BiasAddition",
    "Contribution",
    "PreparedStep",
    "Replacement",
    "RowReplacement",
    "Step",
    "apply_steps",
    "column_norm_squares",
    "dora_axis",
    "prepare_steps",
]


def dora_axis(module: LoraModule) -> str:
    """``"rows"`` or ``"columns"``: which way a DoRA module's norms run in the tensor as stored.

    PEFT takes the norm of each output feature over the inputs: a row of a linear or conv weight,
    a column of a weight stored transposed (an embedding, whose "output" is the embedding
    dimension, and a GPT-2 style ``fan_in_fan_out`` layer).
    """
    return "columns" if module.spec.kind == "embedding" or module.spec.fan_in_fan_out else "rows"


@dataclass(frozen=True)
class Contribution:
    """One adapter module's share of one base tensor: ``factor * B @ A`` laid out like the tensor.

    ``magnitude`` is set for a DoRA module (its ``lora_magnitude_vector``, one entry per row or
    column as :func:`dora_axis` says); its factor is then the scaling alone (DoRA merges at weight 1).
    """

    adapter: int
    module: LoraModule
    factor: float  # weight * scaling
    magnitude: torch.Tensor | None = None


@dataclass(frozen=True)
class Replacement:
    """The adapter's own value of a whole tensor, in place of the base's."""

    adapter: int
    source: str  # the adapter's key for it
    value: torch.Tensor
    what: str  # "modules_to_save copy", "trained bias"


@dataclass(frozen=True)
class RowReplacement:
    """Trained rows (trainable tokens) in place of the base's rows ``rows``."""

    adapter: int
    source: str
    rows: tuple[int, ...]
    values: torch.Tensor  # (len(rows), cols)


@dataclass(frozen=True)
class BiasAddition:
    """``factor * vector`` added to a bias: PEFT's ``lora_bias`` (lora_B's bias times the scaling)."""

    adapter: int
    source: str
    vector: torch.Tensor
    factor: float  # weight * scaling


Step = Contribution | Replacement | RowReplacement | BiasAddition


@dataclass(frozen=True)
class PreparedStep:
    """A step with its tensors on the compute device, in the compute dtype, laid out as ``(rows, cols)`` slices.

    ``kind`` is ``"add"`` (``factor * left @ right``), ``"dora"`` (the same, then rows or columns
    rescaled), ``"rows"`` (rows copied in) or ``"bias"`` (``factor * left`` added).
    """

    kind: str
    left: torch.Tensor  # (rows, r); "rows": (n, cols) trained rows; "bias": (rows, 1)
    right: torch.Tensor | None = None  # (r, cols)
    factor: float = 1.0
    axis: str = "rows"  # "dora" only
    magnitude: torch.Tensor | None = None  # "dora": (rows,) or (1, cols)
    column_scale: torch.Tensor | None = None  # "dora" by columns: magnitude / column norms, set by the pre-pass
    indices: torch.Tensor | None = None  # "rows": the row of each trained row, sorted


def _low_rank_factors(module: LoraModule, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``(left, right)`` with ``left @ right`` the module's ``B @ A`` laid out like its base tensor.

    A linear or conv weight is ``(out, in * kernel)`` and gains ``B @ A``; an embedding or a
    ``fan_in_fan_out`` weight is stored transposed, ``(in, out)``, and gains ``A^T @ B^T``. Either
    way, rows ``i:j`` of the update need only rows ``i:j`` of ``left``.
    """
    a = module.A.to(device=device, dtype=dtype).flatten(1)
    b = module.B.to(device=device, dtype=dtype).flatten(1)
    if module.spec.kind == "embedding" or module.spec.fan_in_fan_out:
        return a.T.contiguous(), b.T.contiguous()
    return b, a


def prepare_steps(steps: Sequence[Step], device: torch.device, dtype: torch.dtype) -> list[PreparedStep]:
    """The row-sliceable form of ``steps`` (a :class:`Replacement` is the block's source, not a step: skipped)."""
    import torch

    prepared = []
    for step in steps:
        if isinstance(step, Contribution):
            left, right = _low_rank_factors(step.module, device, dtype)
            if step.magnitude is None:
                prepared.append(PreparedStep("add", left, right, step.factor))
                continue
            axis = dora_axis(step.module)
            magnitude = step.magnitude.to(device=device, dtype=dtype).flatten()
            prepared.append(
                PreparedStep(
                    "dora",
                    left,
                    right,
                    step.factor,
                    axis=axis,
                    magnitude=magnitude if axis == "rows" else magnitude.view(1, -1),
                )
            )
        elif isinstance(step, RowReplacement):
            order = sorted(range(len(step.rows)), key=lambda i: step.rows[i])
            indices = torch.tensor([step.rows[i] for i in order], dtype=torch.long, device=device)
            values = step.values.to(device=device, dtype=dtype)[torch.tensor(order, dtype=torch.long, device=device)]
            prepared.append(PreparedStep("rows", values.flatten(1), indices=indices))
        elif isinstance(step, BiasAddition):
            prepared.append(
                PreparedStep("bias", step.vector.to(device=device, dtype=dtype).view(-1, 1), None, step.factor)
            )
    return prepared


def column_norm_squares(base: torch.Tensor, step: PreparedStep, first_row: int) -> torch.Tensor:
    """This block's share of ``|| W + factor * left @ right ||^2`` down each column, in float64.

    ``base`` is the block of the base weight in the compute dtype; it is not changed.
    """
    import torch

    rows = base.shape[0]
    assert step.right is not None
    updated = torch.addmm(base, step.left[first_row : first_row + rows], step.right, alpha=step.factor)
    return updated.double().square_().sum(dim=0)


def apply_steps(
    block: torch.Tensor, steps: Sequence[PreparedStep], first_row: int = 0, base: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply ``steps`` in order to ``block`` (rows ``first_row : first_row + len(block)``) in place; returns it.

    ``addmm_`` folds each rank-r product straight into the block, so no dense delta is formed
    beside it. A DoRA step by rows needs the norms of the *base* rows plus its own change: when
    it is the first step those are the block's own; otherwise ``base`` (the block's base values
    in the compute dtype) must be given.
    """
    import torch

    rows = block.shape[0]
    for position, step in enumerate(steps):
        if step.kind == "add":
            assert step.right is not None
            block.addmm_(step.left[first_row : first_row + rows], step.right, alpha=step.factor)
        elif step.kind == "dora":
            assert step.right is not None and step.magnitude is not None
            left = step.left[first_row : first_row + rows]
            if step.axis == "columns":
                assert step.column_scale is not None, "column norms are summed before the tensor is written"
                block.addmm_(left, step.right, alpha=step.factor).mul_(step.column_scale)
                continue
            if position == 0:
                norms = torch.linalg.vector_norm(block.addmm_(left, step.right, alpha=step.factor), dim=1)
            else:
                assert base is not None, "a DoRA step after others needs the base rows"
                norms = torch.linalg.vector_norm(torch.addmm(base, left, step.right, alpha=step.factor), dim=1)
                block.addmm_(left, step.right, alpha=step.factor)
            block.mul_((step.magnitude[first_row : first_row + rows] / norms).unsqueeze(1))
        elif step.kind == "rows":
            assert step.indices is not None
            inside = (step.indices >= first_row) & (step.indices < first_row + rows)
            if bool(inside.any()):
                block.index_copy_(0, step.indices[inside] - first_row, step.left[inside])
        else:  # "bias"
            block.add_(step.left[first_row : first_row + rows], alpha=step.factor)
    return block
