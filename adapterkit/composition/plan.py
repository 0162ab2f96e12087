"""``compose --dry-run``: what a blend would produce and cost, asked of each strategy, without composing.

Each strategy owns its estimate (``Strategy.estimate``), as it owns its maths: a new strategy
brings its own figures, and one without an estimate is reported as unknown rather than guessed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapterkit.composition.engine import check_not_empty, delta_norm, prepare
from adapterkit.strategies.base import PlannedModule

if TYPE_CHECKING:
    import torch

    from adapterkit.adapter.model import Adapter
    from adapterkit.plugins import Plugins

__all__ = ["plan_compose"]


def plan_compose(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    strategy: str = "linear",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    plugins: Plugins | None = None,
    **params: Any,
) -> dict[str, Any]:
    """What ``compose`` with the same arguments would produce and cost, without composing; JSON-able.

    Raises what ``compose`` raises before its first module (weights, strategy, parameters,
    bases, module shapes), and the empty-blend error where the plan can tell. Per module, the
    strategy's estimate gives the output rank (None where it depends on the data, ``rank_max``
    bounding it), FLOPs and working set; the built-ins document their formulas. ``linear`` at
    weight 1 on one adapter is the parent itself: nothing is computed.

    ``module_peak_bytes`` is the largest module's working set; ``peak_bytes`` adds the parents'
    factors and the result's factors, which compose holds throughout. These are estimates for
    choosing between settings, not measurements.
    """
    import torch

    from adapterkit.adapter.dtypes import torch_dtypes

    blend = prepare(adapters, weights, strategy, params, device=device, dtype=dtype, force=force, plugins=plugins)
    estimate = blend.strategy.estimate
    out_dtype: torch.dtype | None = None if blend.identity else blend.out_dtype
    notes: list[str] = []
    if blend.identity:
        notes.append("one adapter with weight 1: the result is the parent itself, bit for bit")
    elif estimate is None:
        notes.append(f"strategy {strategy!r} is not one whose output rank can be predicted; ranks and costs unknown")
    esize = torch.empty((), dtype=blend.compute).element_size()
    device_type = blend.device.type
    #: ||delta|| of each module's result and sum_i |w_i| ||D_i|| of its parents, where the estimate can tell.
    norms: dict[str, float] = {}
    scales: dict[str, float] = {}

    modules: dict[str, Any] = {}
    sizes: dict[str, tuple[int, int]] = {}  # (out, in * kernel): an output factor pair holds rank * (out + in) values
    for name in blend.names:
        module_input, shape = blend.module_input(name, torch.device("cpu"))
        m, n = shape.out_features, shape.in_features * math.prod(shape.kernel)
        sizes[name] = (m, n)
        ranks = list(module_input.ranks)
        entry: dict[str, Any] = {
            "shape": list(shape.base_shape),
            "adapters": [i for i, _, _ in blend.present(name)],
            "input_ranks": ranks,
            "input_rank": sum(ranks),
        }
        if blend.identity:
            module = adapters[0].modules[name]
            norms[name] = scales[name] = delta_norm(module.A * module.spec.scaling, module.B)
            entry.update(rank=ranks[0], rank_max=ranks[0], truncation_error=None, flops=0, peak_bytes=0)
        elif estimate is None:
            entry.update(rank=None, rank_max=None, flops=None, peak_bytes=None)
        else:
            cost = estimate(PlannedModule(module_input, m, n, esize, device_type), **blend.params)
            entry.update(rank=cost.rank, rank_max=cost.rank_max, flops=cost.flops, peak_bytes=cost.peak_bytes)
            if not cost.truncates or cost.truncation_error is not None:
                entry["truncation_error"] = cost.truncation_error
            if cost.norm is not None:
                norms[name], scales[name] = cost.norm, blend.scale(module_input)
        modules[name] = entry

    known = [e["rank"] for e in modules.values() if e["rank"] is not None]
    dropped = sorted(name for name, e in modules.items() if e["rank"] == 0)
    if norms:  # a strategy that works on the dense deltas gives no norm: compose itself tells
        check_not_empty(norms, scales, torch.float64 if blend.identity else blend.compute, strategy)
    unknown = len(known) < len(modules)
    kept = [k for k in known if k > 0]
    output_parameters: int | None = None
    output_bytes: int | None = None
    if blend.identity:
        output_parameters, output_bytes = adapters[0].num_parameters, adapters[0].factor_bytes
    elif not unknown:
        assert out_dtype is not None
        output_parameters = sum(e["rank"] * sum(sizes[name]) for name, e in modules.items())
        output_bytes = output_parameters * torch.empty((), dtype=out_dtype).element_size()
    input_bytes = sum(a.factor_bytes for a in adapters)
    flops = None if any(e["flops"] is None for e in modules.values()) else sum(e["flops"] for e in modules.values())
    module_peak = (
        None if estimate is None and not blend.identity else max((e["peak_bytes"] for e in modules.values()), default=0)
    )
    return {
        "strategy": strategy,
        "parameters": {key: value for key, value in blend.params.items() if value is not None},
        "weights": blend.weights,
        "device": str(device) if device is not None else "cpu",
        "dtype": torch_dtypes()[out_dtype] if out_dtype is not None else None,
        "compute_dtype": torch_dtypes()[blend.compute],
        "base_model": blend.base_model,
        "num_modules": len(modules) - len(dropped),
        "dropped_modules": dropped,
        "ranks": {"min": min(kept), "max": max(kept)} if kept else None,
        "ranks_known": not unknown,
        "output_parameters": output_parameters,
        "output_bytes": output_bytes,
        "input_bytes": input_bytes,
        "flops": flops,
        "module_peak_bytes": module_peak,
        "peak_bytes": None if module_peak is None or output_bytes is None else input_bytes + output_bytes + module_peak,
        "notes": notes,
        "modules": modules,
    }
