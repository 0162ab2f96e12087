"""``extract``: a LoRA adapter from a base model and its fine-tune, streamed tensor by tensor.

The plan (:mod:`adapterkit.extraction.plan`) is made from headers alone. Then one pass walks the
base's tensors in the order its shards hold them. A reader thread forms each targeted weight's
change ``D = tuned - base`` in float32, a block of rows at a time (its squared norm and the first
product of the randomized SVD are computed from each block while it is in cache), and compares
every other tensor chunk by chunk, noting its relative change if it changed (with
``keep_changed`` it is then carried in full as PEFT's ``modules_to_save``). Meanwhile the
caller's thread factors each change (:mod:`adapterkit.extraction.lowrank`) while the reader goes
on comparing the untargeted tensors that follow. Memory holds one change, in one reused buffer,
and the factors kept so far, whatever the model's size.

While it runs, torch's CPU thread count is 1 (and restored after): the reader takes the other
core, and the factoring's thin products and small QRs and SVDs run faster on one thread than
split, by far on a busy machine (a 5504 x 32 QR took 3.6 ms on one thread and 480 ms on two
with other processes running).

How many ranks each module keeps:

* ``rank``: the same k everywhere (at most the weight's smaller dimension);
* ``energy``: per module, the smallest k whose singular values keep that fraction of the squared
  Frobenius norm of its change (the leading triplets are grown until they do);
* ``budget``: the ranks that keep the most total energy for that many parameters, a rank of a
  module costing its in + out. The first pass keeps every module's leading triplets up to about
  twice the rank a uniform split would give; a module that takes all of its triplets is read
  again for more, until none does. The total never exceeds the budget.

The factors are ``B = U √S`` and ``A = √S Vh`` with scaling 1 (alpha = r per module, through
``rank_pattern`` and ``alpha_pattern``), stored in float32 unless another dtype is asked for. The
relative error and kept energy of every module, the tensors left out, and the fine-tuned model's
fingerprint go into the adapter's lineage.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterkit.devices import resolve_device, single_threaded
from adapterkit.errors import ExtractionError
from adapterkit.extraction.lowrank import (
    Spectrum,
    allocate_budget,
    balanced_factors,
    energy_rank,
    gaussian_sketch,
    relative_error,
    sketch_width,
    top_singular,
    uses_exact_svd,
)
from adapterkit.extraction.pair import ModelPair, change_dtype, torch_dtype
from adapterkit.extraction.plan import ExtractionPlan, PlannedModule, plan_extraction

if TYPE_CHECKING:
    import torch

    from adapterkit.adapter.model import Adapter

__all__ = ["ExtractProgress", "extract"]

#: ``progress(bytes_done, bytes_total, tensor_name)``: bytes of both models read so far, after each tensor.
ExtractProgress = Callable[[int, int, str], None]
#: Triplets an ``energy`` extraction computes first for a module; doubled until they keep enough.
_FIRST_ENERGY_RANK = 32
#: Changes held at once in the first pass. Two (one factored while the next is formed) took 20% less
#: time on a 1 GB pair (hidden 2048) but 44 MB more memory, an eighth of the whole peak: memory is
#: what extraction promises to bound.
_BUFFERS = 1
#: A module's energy below which ``energy - kept`` is too close to rounding to be trusted as the error.
_CANCELLATION = 1e-4


@dataclass
class _Formed:
    """A change the reader formed: the module, the change, its squared norm, its buffer, and a sketch of it."""

    module: PlannedModule
    delta: torch.Tensor
    energy: float
    buffer: torch.Tensor
    sketch: torch.Tensor | None


@dataclass
class _Factored:
    """One module's result: its factors (already in the output dtype) and how well they do."""

    A: torch.Tensor
    B: torch.Tensor
    error: float
    kept: float
    #: ``||D||_F``, the size of the module's change
    norm: float


class _Extraction:
    """The passes over the pair, and what they found."""

    def __init__(self, plan: ExtractionPlan, pair: ModelPair, device: torch.device) -> None:
        self.plan = plan
        self.pair = pair
        self.device = device
        self.out_dtype = torch_dtype(plan.dtype)
        self.results: dict[str, _Factored] = {}
        self.spectra: dict[str, Spectrum] = {}
        self.unchanged: list[str] = []
        self.changed: dict[str, float] = {}
        #: whether storing the factors rounds them (then errors are measured on the rounded factors)
        self.rounded = plan.dtype in ("F16", "BF16")

    def change(self, module: PlannedModule) -> tuple[torch.Tensor, float]:
        """The module's weight change as its out x in matrix (float32, on the device), and its squared norm."""
        delta, energy = self.pair.delta(module.tensor)
        return self.oriented(module, delta), energy

    def oriented(self, module: PlannedModule, delta: torch.Tensor) -> torch.Tensor:
        delta = delta.to(self.device)
        return delta.T if module.transposed else delta

    def first_pass(self, progress: ExtractProgress | None) -> None:
        """Every tensor once: a reader thread compares tensors and forms each change, which this thread factors.

        Changes are formed into ``_BUFFERS`` reused buffers the size of the largest, so memory
        holds that many changes whatever the model (and freeing and allocating tens of megabytes
        per module never fragments the heap); while a change is factored, the reader compares the
        untargeted tensors after it and waits for the buffer before forming the next change.
        """
        import torch

        by_tensor = {module.tensor: module for module in self.plan.modules}
        handoff: queue.Queue[_Formed | BaseException | None] = queue.Queue()
        free: queue.Queue[torch.Tensor | None] = queue.Queue()
        for _ in range(_BUFFERS):
            free.put(None)  # allocated on first use
        largest = max((m for m in self.plan.modules), key=lambda m: m.in_features * m.out_features)
        size = largest.in_features * largest.out_features
        stop = threading.Event()
        read = [0]

        def take_buffer(dtype: torch.dtype) -> torch.Tensor | None:
            while not stop.is_set():
                try:
                    buffer = free.get(timeout=0.1)
                except queue.Empty:
                    continue
                if buffer is None or buffer.dtype != dtype:
                    buffer = torch.empty(size, dtype=dtype)
                return buffer
            return None

        def reader() -> None:
            try:
                for name, where in self.plan.base_tensors.items():
                    if stop.is_set():
                        return  # the caller failed or was interrupted
                    module = by_tensor.get(name)
                    if module is None:
                        relative = self.pair.relative_change(name)
                        if relative > 0:
                            self.changed[name] = relative
                    else:
                        buffer = take_buffer(change_dtype(where, self.plan.tuned_tensors[name]))
                        if buffer is None:
                            return  # the caller stopped
                        sketch, rows_done = self.sketcher(module, buffer.dtype)
                        delta, energy = self.pair.delta(name, into=buffer, rows_done=rows_done)
                        handoff.put(_Formed(module, delta, energy, buffer, sketch))
                    read[0] += where.info.nbytes + self.plan.tuned_tensors[name].info.nbytes
                handoff.put(None)
            except BaseException as exc:  # handed to the caller's thread, which raises it
                handoff.put(exc)

        thread = threading.Thread(target=reader, name="adapterkit-extract-reader", daemon=True)
        thread.start()
        try:
            while (item := handoff.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                module = item.module
                self.factor(module, self.oriented(module, item.delta), item.energy, item.sketch)
                free.put(item.buffer)
                del item
                if progress is not None:
                    progress(read[0], self.plan.read_bytes, module.tensor)
        finally:
            stop.set()
            thread.join()
        if progress is not None:
            progress(self.plan.read_bytes, self.plan.read_bytes, "")

    def first_rank(self, module: PlannedModule) -> int:
        """The triplets the first factoring of a module looks for."""
        if self.plan.selection.rank is not None:
            return module.rank or 0
        if self.plan.selection.energy is not None:
            return min(_FIRST_ENERGY_RANK, module.max_rank)
        return min(self.first_budget_rank(), module.max_rank)

    def sketcher(
        self, module: PlannedModule, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, Callable[[slice, torch.Tensor], None] | None]:
        """A sketch ``M @ Ω`` to fill while the change is read (a block of rows at a time, in cache), and its filler.

        The first product of the randomized SVD is then done by the reader thread, for free while it
        waits on memory; nothing when the module gets an exact SVD or the maths runs on a GPU.
        """
        import torch

        shape = (module.out_features, module.in_features)
        k = self.first_rank(module)
        if self.device.type != "cpu" or uses_exact_svd(shape, k):
            return None, None
        omega = gaussian_sketch(module.in_features, sketch_width(shape, k), dtype)
        sketch = torch.zeros(module.out_features, omega.shape[1], dtype=dtype)
        if module.transposed:  # M = Dᵀ: M @ Ω is the sum over row blocks of D[rows]ᵀ @ Ω[rows]

            def fill(rows: slice, block: torch.Tensor) -> None:
                sketch.addmm_(block.T, omega[rows])

        else:

            def fill(rows: slice, block: torch.Tensor) -> None:
                torch.mm(block, omega, out=sketch[rows])

        return sketch, fill

    def factor(self, module: PlannedModule, M: torch.Tensor, total: float, sketch: torch.Tensor | None = None) -> None:
        """Factor one module's change ``M`` (``total`` is its squared norm) as the rank rule says.

        ``sketch`` is ``M @ gaussian_sketch(...)`` for :meth:`first_rank` triplets, when the reader formed it.
        """
        selection = self.plan.selection
        if total == 0.0:
            self.unchanged.append(module.name)
            return
        k = self.first_rank(module)
        spectrum = top_singular(M, k, energy=total, sketch=sketch)
        if selection.rank is not None:
            self.finish(module, spectrum, k, M)
        elif selection.energy is not None:
            while (rank := energy_rank(spectrum, selection.energy)) is None:
                k = min(2 * k, module.max_rank)
                spectrum = top_singular(M, k, start=spectrum.Vh.T, energy=total)
            self.finish(module, spectrum, rank, M)
        else:
            self.spectra[module.name] = spectrum.truncate(module.max_rank)

    def first_budget_rank(self) -> int:
        """Triplets the budget's first pass keeps per module: about twice the rank a uniform split affords."""
        budget = self.plan.selection.budget or 0
        uniform = budget / sum(module.cost for module in self.plan.modules)
        return max(8, math.ceil(2 * uniform))

    def finish(self, module: PlannedModule, spectrum: Spectrum, rank: int, M: torch.Tensor | None) -> None:
        """Keep the module's rank-``rank`` factors in the output dtype, with their error and kept energy."""
        if rank == 0:
            self.results.pop(module.name, None)
            return
        A, B = balanced_factors(spectrum, rank)
        A = A.to(device="cpu", dtype=self.out_dtype).contiguous()
        B = B.to(device="cpu", dtype=self.out_dtype).contiguous()
        # Measured on the change itself where the factors were rounded, or where the SVD was exact (a small matrix,
        # cheap to go over again): energy - kept cancels when little is lost, and costs digits the test of 1e-5 needs.
        measured = self.rounded or spectrum.complete
        error = relative_error(spectrum, rank, M, factors=(A, B) if measured else None)
        kept = spectrum.kept(rank) / spectrum.energy
        self.results[module.name] = _Factored(A, B, error, min(kept, 1.0), math.sqrt(spectrum.energy))

    def fit_budget(self) -> dict[str, int]:
        """Share the budget by allocating each next rank where it keeps the most energy per parameter."""
        budget = self.plan.selection.budget
        assert budget is not None
        modules = {module.name: module for module in self.plan.modules if module.name in self.spectra}
        costs = {name: module.cost for name, module in modules.items()}
        while True:
            gains = {name: self.spectra[name].S.double().square().tolist() for name in modules}
            ranks, _ = allocate_budget(gains, costs, budget)
            grow = [
                name
                for name, module in modules.items()
                if ranks[name] == len(gains[name])
                and len(gains[name]) < module.max_rank
                and not self.spectra[name].complete
                and self.spectra[name].energy > self.spectra[name].kept(len(gains[name]))
            ]
            if not grow:
                return ranks
            for name in grow:  # these took every triplet they had: find out what their next ones are worth
                module = modules[name]
                previous = self.spectra[name]
                M, _ = self.change(module)
                k = min(2 * len(previous.S), module.max_rank)
                self.spectra[name] = top_singular(M, k, start=previous.Vh.T, energy=previous.energy).truncate(
                    module.max_rank
                )
                del M

    def finish_budget(self, ranks: dict[str, int]) -> None:
        for module in self.plan.modules:
            spectrum = self.spectra.pop(module.name, None)
            if spectrum is None:
                continue
            rank = ranks[module.name]
            if rank == 0:
                self.results[module.name] = _Factored(_empty(), _empty(), 1.0, 0.0, math.sqrt(spectrum.energy))
                continue
            lost = spectrum.energy - spectrum.kept(rank)
            M = self.change(module)[0] if self.rounded or lost < _CANCELLATION * spectrum.energy else None
            self.finish(module, spectrum, rank, M)


def _empty() -> torch.Tensor:
    import torch

    return torch.empty(0)


def extract(
    base_dir: str | os.PathLike[str],
    tuned_dir: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget: int | None = None,
    targets: list[str] | None = None,
    keep_changed: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    content_digest: bool = False,
    progress: ExtractProgress | None = None,
) -> Adapter:
    """A LoRA adapter whose weight changes approximate ``tuned_dir``'s changes to ``base_dir``.

    Give exactly one of ``rank`` (every module), ``energy`` (a fraction in (0, 1] of each
    module's squared change to keep) or ``budget`` (total factor parameters, shared where they
    keep the most energy). ``targets`` are module names or suffixes as in PEFT's
    ``target_modules`` (``q_proj``, ``model.embed_tokens``, ``lm_head``); ``"all-linear"``, the
    default, is every linear projection of the numbered layers. ``keep_changed`` carries changed
    tensors that are not targeted (norms, biases, embeddings) in full as ``modules_to_save``.
    ``dtype`` is the factors' dtype (float32 by default); ``device`` runs the maths there.
    ``content_digest`` also hashes every tensor of the fine-tuned model for the lineage.

    The result's ``metadata`` holds the base's fingerprint and the lineage: the fine-tuned model,
    the parameters, each module's relative error and kept energy, the changed tensors it leaves
    out and the targets that did not change. ``Store.put`` stores it; ``write_adapter`` writes a
    folder PEFT loads. Both models are read tensor by tensor; nothing is written.
    """
    plan = plan_extraction(
        base_dir,
        tuned_dir,
        rank=rank,
        energy=energy,
        budget=budget,
        targets=targets,
        keep_changed=keep_changed,
        dtype=str(dtype) if dtype is not None else None,
    )
    chosen = resolve_device(device)
    # one torch thread: the reader thread takes the other core; see the module's docstring
    with single_threaded(), ModelPair(plan.base_tensors, plan.tuned_tensors) as pair:
        run = _Extraction(plan, pair, chosen)
        run.first_pass(progress)
        if plan.selection.budget is not None and run.spectra:
            run.finish_budget(run.fit_budget())
        carried = _carry(plan, pair, run) if keep_changed else {}
    return _assemble(plan, run, carried, content_digest)


def _carry(plan: ExtractionPlan, pair: ModelPair, run: _Extraction) -> dict[str, torch.Tensor]:
    """The changed tensors PEFT can take as ``modules_to_save``: every tensor of each changed module, in full."""
    from adapterkit.adapter.config import KEY_PREFIX

    factored = {module.name for module in plan.modules}
    carried: dict[str, torch.Tensor] = {}
    for name in sorted(run.changed):
        owner = name.rpartition(".")[0]
        if not owner or owner in factored:
            continue  # a bias or other tensor of a module that gets a LoRA: PEFT cannot load both on one module
        for tensor, where in plan.tuned_tensors.items():
            if tensor.rpartition(".")[0] == owner and KEY_PREFIX + tensor not in carried:
                carried[KEY_PREFIX + tensor] = pair.read(where).reshape(where.info.shape).clone()
    return carried


def _assemble(
    plan: ExtractionPlan, run: _Extraction, carried: dict[str, torch.Tensor], content_digest: bool
) -> Adapter:
    from adapterkit.adapter.config import KEY_PREFIX, ModuleSpec
    from adapterkit.adapter.model import Adapter, LoraModule
    from adapterkit.base_model import fingerprint
    from adapterkit.composition.engine import derived_config
    from adapterkit.version import __version__

    modules: dict[str, LoraModule] = {}
    errors: dict[str, float] = {}
    kept: dict[str, float] = {}
    norms: dict[str, float] = {}
    for planned in plan.modules:
        result = run.results.get(planned.name)
        if result is None:
            continue
        errors[planned.name] = result.error
        kept[planned.name] = result.kept
        norms[planned.name] = result.norm
        rank = result.A.shape[0]
        if rank == 0:
            continue
        spec = ModuleSpec(
            name=planned.name,
            kind=planned.kind,
            r=rank,
            alpha=rank,
            scaling=1.0,
            in_features=planned.in_features,
            out_features=planned.out_features,
            kernel=(),
            fan_in_fan_out=planned.fan_in_fan_out,
            dtype=plan.dtype,
        )
        modules[planned.name] = LoraModule(spec, result.A, result.B)
    carried_modules = sorted({key.removeprefix(KEY_PREFIX).rpartition(".")[0] for key in carried})
    left_out = {name: value for name, value in run.changed.items() if KEY_PREFIX + name not in carried}
    if not modules:
        changed = sorted(run.changed)
        others = f"; it changes only {', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}" if changed else ""
        raise ExtractionError(f"{plan.tuned_dir} changes none of the targeted weights of {plan.base_dir}{others}")
    config = derived_config(
        {"task_type": plan.task_type, "base_model_name_or_path": plan.base_name, "revision": None}, modules
    )
    if carried_modules:
        config["modules_to_save"] = carried_modules
    tied_module = plan.tied.removesuffix(".weight") if plan.tied else None
    if tied_module is not None and (tied_module in modules or tied_module in carried_modules):
        config["ensure_weight_tying"] = True  # the change applies to the output layer too, as in the tuned model
    source: dict[str, Any] = {"name": str(plan.tuned_dir), "structure_digest": plan.tuned.structure_digest}
    if content_digest:
        source["content_digest"] = fingerprint(plan.tuned_dir, content=True).content_digest
    lineage: dict[str, Any] = {
        "strategy": "extract",
        "parameters": {
            **plan.selection.to_json(),
            "targets": plan.targets,
            "keep_changed": plan.keep_changed,
            "dtype": plan.dtype,
        },
        "parents": [],
        "adapterkit_version": __version__,
        "source": source,
        "truncation_error": errors,
        "kept_energy": kept,
        "change_norm": norms,
        "left_out": dict(sorted(left_out.items())),
        "unchanged": sorted(run.unchanged),
    }
    adapter = Adapter(config=config, modules=modules, extra_tensors=carried, key_prefix=KEY_PREFIX)
    adapter.metadata = {
        "base_model": {"name": plan.base_name, "revision": None, "structure_digest": plan.base.structure_digest},
        "lineage": lineage,
    }
    return adapter
