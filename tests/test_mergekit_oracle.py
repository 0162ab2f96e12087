"""TIES, DARE and magnitude pruning against an outside implementation: mergekit's sparsify and task arithmetic.

mergekit (PyPI ``mergekit``) merges full weights; a LoRA's dense change ``D_i = s_i B_i A_i`` is exactly the
task vector mergekit computes as ``model_i - base``. So each module's dense task vectors, computed here
with numpy from the PEFT files (not by adapterkit), go through mergekit's own ``merge_tensors`` on a zero
base, and must equal adapterkit's blend before truncation (a truncation to full rank, which keeps every
singular value), within float64 rounding.

Where the definitions differ by design, the test says so and feeds mergekit what makes them coincide
(docs/strategies.md, "adapterkit and mergekit"):

* normalization: adapterkit's TIES and DARE-TIES take the mean of the agreeing weighted entries
  ``w_i D_i'`` (their count divides, the TIES paper's disjoint mean); mergekit divides by the sum of
  the agreeing weights (``ties``) or not at all (``dare_ties``). With every weight 1 the two are the
  same thing; with other weights mergekit gets the weighted task vectors ``w_i D_i`` at weight 1.
* DARE's rescaling: adapterkit divides the survivors by the density (the DARE paper); mergekit's
  ``rescale`` matches each pruned vector's L1 norm instead, so it runs with ``rescale: false`` and the
  weights ``w_i / density``.
* DARE's masks: mergekit draws them with ``torch.bernoulli``; here that draw returns adapterkit's masks,
  read back through ``compose`` itself (a parent whose change is all ones, alone at weight 1).
* kept entries: adapterkit keeps the entries ``>=`` the ``round(density * n)``-th largest magnitude, so
  entries tied at the threshold are all kept; mergekit keeps exactly ``int(density * n)`` of them in
  argsort order. The densities here make ``density * n`` whole and the values have no ties;
  :func:`test_entries_tied_at_the_threshold_are_all_kept` shows the difference.

The unweighted sign election (``elect_on=unweighted``, PEFT's) is checked against PEFT's own merge_utils.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mergekit.merge_methods import api as mergekit_api
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, GeneralizedTaskArithmeticMerge
from mergekit.sparsify import SparsificationMethod
from safetensors.numpy import save_file

from adapterkit import compose
from adapterkit.adapter.model import Adapter
from adapterkit.formats.peft import read_adapter

#: module -> (out, in). Each parent lacks one module, so modules have 2 parents at different positions.
MODULES = {
    "model.layers.0.self_attn.q_proj": (48, 40),
    "model.layers.0.self_attn.v_proj": (24, 40),
    "model.layers.0.mlp.down_proj": (40, 56),
}
#: (r, lora_alpha, use_rslora, modules): scalings 2, 0.5 and 4 / sqrt(4) = 2, all exact in binary.
PARENTS = [
    (4, 8, False, ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]),
    (6, 3, False, ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]),
    (4, 4, True, ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"]),
]
#: Dyadic weights: divided by the density 0.5 they stay exact, so DARE's products are exact in float32 too.
WEIGHTS = [0.75, -0.5, 1.25]
#: ``density * n`` is whole for every module (n = 1920, 960, 2240) at these densities.
DENSITIES = [0.25, 0.5]
FULL_RANK = 64  # >= every module's smaller side: the "truncation" keeps every singular value
TOLERANCE = 1e-12


def write_peft(
    path: Path, factors: dict[str, tuple[np.ndarray, np.ndarray]], r: int, alpha: float, rslora: bool
) -> Path:
    path.mkdir(parents=True)
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(A, dtype=np.float32)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(B, dtype=np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": sorted({name.rsplit(".", 1)[1] for name in factors}),
        "base_model_name_or_path": "org/oracle-base",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


class Parents:
    """Three PEFT adapters on disk, as adapterkit reads them, and their dense changes as numpy computes them."""

    def __init__(self, root: Path, integer: bool) -> None:
        rng = np.random.default_rng(7 if integer else 5)
        self.adapters: list[Adapter] = []
        self.deltas: list[dict[str, np.ndarray]] = []
        for i, (r, alpha, rslora, names) in enumerate(PARENTS):
            factors = {}
            for name in names:
                out_dim, in_dim = MODULES[name]
                if integer:  # small integers: every product and sum below is exact, in float32 as in float64
                    A = rng.integers(-2, 3, (r, in_dim)).astype(np.float64)
                    B = rng.integers(-2, 3, (out_dim, r)).astype(np.float64)
                else:
                    A = rng.standard_normal((r, in_dim)).astype(np.float32).astype(np.float64)
                    B = rng.standard_normal((out_dim, r)).astype(np.float32).astype(np.float64)
                factors[name] = (A, B)
            scaling = alpha / (r**0.5 if rslora else r)
            self.adapters.append(read_adapter(write_peft(root / f"p{i}", factors, r, alpha, rslora)))
            self.deltas.append({name: scaling * (B @ A) for name, (A, B) in factors.items()})
        self.root = root

    def task_vectors(self, name: str) -> list[torch.Tensor]:
        """Every parent's change to ``name`` in call order, zero where a parent lacks the module."""
        return [torch.from_numpy(d.get(name, np.zeros(MODULES[name]))) for d in self.deltas]


@pytest.fixture(scope="module")
def float_parents(tmp_path_factory: pytest.TempPathFactory) -> Parents:
    return Parents(tmp_path_factory.mktemp("float-parents"), integer=False)


@pytest.fixture(scope="module")
def integer_parents(tmp_path_factory: pytest.TempPathFactory) -> Parents:
    return Parents(tmp_path_factory.mktemp("integer-parents"), integer=True)


def mergekit_merge(method: Any, tasks: list[torch.Tensor], **parameters: Any) -> torch.Tensor:
    """mergekit's result for ``tasks`` as task vectors over a zero base: its merged delta."""
    base = torch.zeros_like(tasks[0])
    return mergekit_api.merge_tensors([base, *tasks], method, parameters=parameters, base_index=0)


def gta(consensus: ConsensusMethod | None, sparsification: SparsificationMethod | None, normalize: bool) -> Any:
    """One of mergekit's generalized task arithmetic methods (the registered ones are instances of it)."""
    return GeneralizedTaskArithmeticMerge(
        consensus_method=consensus,
        sparsification_method=sparsification,
        default_normalize=normalize,
        default_rescale=False,
        method_name="oracle",
        method_pretty_name=None,
        method_reference_url=None,
    )


def blend(parents: Parents, weights: list[float], strategy: str, **params: Any) -> Adapter:
    return compose(parents.adapters, weights, strategy, rank=FULL_RANK, dtype=torch.float64, **params)


def assert_equal_deltas(ours: Adapter, expected: Callable[[str], torch.Tensor]) -> None:
    for name in MODULES:
        want = expected(name)
        got = ours.delta(name, torch.float64)
        assert got.shape == want.shape, name
        error = float((got - want).norm() / want.norm())
        assert error <= TOLERANCE, (name, error)


SIGN_METHODS = {"total": ConsensusMethod.sum, "frequency": ConsensusMethod.count}


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_with_unit_weights_is_mergekits_ties(float_parents: Parents, method: str, density: float) -> None:
    """Weights 1: mergekit's registered ``ties`` (and its ``count`` consensus) as it is, no adjustment."""
    ours = blend(float_parents, [1.0, 1.0, 1.0], "ties", density=density, majority_sign_method=method)
    registered = "ties" if method == "total" else gta(SIGN_METHODS[method], SparsificationMethod.magnitude, True)
    assert_equal_deltas(
        ours, lambda name: mergekit_merge(registered, float_parents.task_vectors(name), weight=1.0, density=density)
    )


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_with_weights_elects_on_the_weighted_deltas(float_parents: Parents, method: str, density: float) -> None:
    """Any weights, one negative: mergekit's election on ``w_i D_i'``; the mean over the agreeing entries.

    mergekit divides by the agreeing weights' sum; given the weighted vectors at weight 1, that sum is the count.
    """
    ours = blend(float_parents, WEIGHTS, "ties", density=density, majority_sign_method=method)
    method_object = gta(SIGN_METHODS[method], SparsificationMethod.magnitude, True)

    def expected(name: str) -> torch.Tensor:
        weighted = [w * t for w, t in zip(WEIGHTS, float_parents.task_vectors(name), strict=True)]
        return mergekit_merge(method_object, weighted, weight=1.0, density=density)

    assert_equal_deltas(ours, expected)
    # mergekit's own normalization (by the sum of the agreeing weights) is another result: the difference is real.
    name = "model.layers.0.self_attn.q_proj"
    theirs = mergekit_merge(method_object, float_parents.task_vectors(name), weight=WEIGHTS, density=density)
    assert float((ours.delta(name, torch.float64) - theirs).norm() / theirs.norm()) > 0.05


@pytest.mark.parametrize("density", DENSITIES)
def test_magnitude_prune_is_mergekits_sparsified_task_arithmetic(float_parents: Parents, density: float) -> None:
    ours = blend(float_parents, WEIGHTS, "magnitude_prune", density=density)
    method_object = gta(None, SparsificationMethod.magnitude, False)
    assert_equal_deltas(
        ours,
        lambda name: mergekit_merge(method_object, float_parents.task_vectors(name), weight=WEIGHTS, density=density),
    )


# -- DARE: mergekit's random sparsification, drawing adapterkit's masks --------------------------------------------


SEED, DARE_DENSITY = 4, 0.5


def read_back_mask(parents: Parents, name: str, position: int, tmp_path: Path) -> torch.Tensor:
    """The mask adapterkit's DARE draws for the parent at ``position`` of ``parents``' call on module ``name``.

    Read through ``compose``: that parent replaced by one whose change to ``name`` is all ones, at weight 1,
    the others at weight 0, so the blend is the mask divided by the density.
    """
    out_dim, in_dim = MODULES[name]
    folder = tmp_path / f"ones-{position}-{name}"
    ones = read_adapter(write_peft(folder, {name: (np.ones((1, in_dim)), np.ones((out_dim, 1)))}, 1, 1, False))
    adapters = list(parents.adapters)
    adapters[position] = ones
    weights = [1.0 if i == position else 0.0 for i in range(len(adapters))]
    dropped = compose(
        adapters, weights, "dare_linear", density=DARE_DENSITY, seed=SEED, rank=FULL_RANK, dtype=torch.float64
    ).delta(name, torch.float64)
    mask = (dropped * DARE_DENSITY).round()
    assert torch.allclose(dropped * DARE_DENSITY, mask, rtol=0, atol=1e-9) and set(mask.unique().tolist()) <= {0, 1}
    assert 0.3 < float(mask.mean()) < 0.7
    return mask


@pytest.fixture(scope="module")
def masks(integer_parents: Parents, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[torch.Tensor]]:
    root = tmp_path_factory.mktemp("masks")
    return {name: [read_back_mask(integer_parents, name, i, root) for i in range(len(PARENTS))] for name in MODULES}


@pytest.fixture
def adapterkit_draws(monkeypatch: pytest.MonkeyPatch, masks: dict[str, list[torch.Tensor]]) -> Iterator[Any]:
    """``draw(name)``: while mergekit merges module ``name``, its ``torch.bernoulli`` returns adapterkit's masks.

    mergekit sparsifies the task vectors in input order, one draw each, with every entry's probability the
    density; the replacement checks that and hands out the parents' masks in that order.
    """
    queue: list[torch.Tensor] = []

    def bernoulli(probabilities: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert not args and not kwargs and bool((probabilities == DARE_DENSITY).all())
        mask = queue.pop(0)
        assert mask.shape == probabilities.shape
        return mask.to(probabilities.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)

    def draw(name: str) -> None:
        assert not queue, "mergekit drew fewer masks than it has task vectors"
        queue.extend(masks[name])

    yield draw
    assert not queue


def test_dare_linear_is_mergekits_dare_linear(integer_parents: Parents, adapterkit_draws: Any) -> None:
    """mergekit's ``dare_linear`` (rescale off, the weights divided by the density) with the same masks.

    The integer-valued changes keep everything exact in the float32 mergekit's CPU draw works in.
    """
    ours = blend(integer_parents, WEIGHTS, "dare_linear", density=DARE_DENSITY, seed=SEED)

    def expected(name: str) -> torch.Tensor:
        adapterkit_draws(name)
        weights = [w / DARE_DENSITY for w in WEIGHTS]
        tasks = integer_parents.task_vectors(name)
        return mergekit_merge("dare_linear", tasks, weight=weights, density=DARE_DENSITY, rescale=False)

    assert_equal_deltas(ours, expected)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_is_mergekits_dare_ties(
    integer_parents: Parents, adapterkit_draws: Any, masks: dict[str, list[torch.Tensor]], method: str
) -> None:
    """mergekit's ``dare_ties`` (``count`` consensus for frequency) on ``(w_i / d) D_i`` at weight 1, normalized.

    Integer changes cancel exactly in places: where the dropped deltas' total is 0, mergekit elects +
    and adapterkit nothing (docs/strategies.md), so mergekit's result is zeroed there.
    """
    ours = blend(integer_parents, WEIGHTS, "dare_ties", density=DARE_DENSITY, seed=SEED, majority_sign_method=method)
    method_object = "dare_ties" if method == "total" else gta(SIGN_METHODS[method], SparsificationMethod.random, False)
    cancelled = 0

    def expected(name: str) -> torch.Tensor:
        nonlocal cancelled
        adapterkit_draws(name)
        tasks = [w / DARE_DENSITY * t for w, t in zip(WEIGHTS, integer_parents.task_vectors(name), strict=True)]
        theirs = mergekit_merge(method_object, tasks, weight=1.0, density=DARE_DENSITY, rescale=False, normalize=True)
        if method == "frequency":
            return theirs
        total = sum(t * m for t, m in zip(tasks, masks[name], strict=True))
        zero_total = (total == 0) & (theirs != 0)
        cancelled += int(zero_total.sum())
        return theirs.masked_fill(zero_total, 0.0)

    assert_equal_deltas(ours, expected)
    assert method == "frequency" or cancelled > 0  # the case the zeroing is for does arise here


# -- where the definitions differ by design -------------------------------------------------------------------------


def test_entries_tied_at_the_threshold_are_all_kept(integer_parents: Parents) -> None:
    """Integer changes are full of ties: adapterkit keeps every entry as large as the k-th, mergekit exactly k."""
    name = "model.layers.0.self_attn.q_proj"
    density = 0.25
    task = integer_parents.task_vectors(name)[0]
    theirs = mergekit_merge(gta(None, SparsificationMethod.magnitude, False), [task], weight=1.0, density=density)
    ours = compose([integer_parents.adapters[0]], [1.0], "magnitude_prune", density=density, rank=FULL_RANK,
                   dtype=torch.float64).delta(name, torch.float64)  # fmt: skip
    k = int(density * task.numel())
    threshold = task.abs().flatten().sort(descending=True).values[k - 1]
    assert int((theirs != 0).sum()) == k
    kept = ours.abs() > 0.5  # the entries are whole numbers; the truncation's rounding is far below 0.5
    assert torch.equal(kept, task.abs() >= threshold) and int(kept.sum()) > k
    assert torch.equal(theirs[task.abs() > threshold], task[task.abs() > threshold])  # both keep all above it


# -- PEFT's election (elect_on=unweighted), against PEFT's merge_utils ----------------------------------------------


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_unweighted_election_is_peft_ties(float_parents: Parents, method: str) -> None:
    from peft.utils import merge_utils

    density = 0.5
    ours = blend(float_parents, WEIGHTS, "ties", density=density, majority_sign_method=method, elect_on="unweighted")

    def expected(name: str) -> torch.Tensor:
        present = [i for i, d in enumerate(float_parents.deltas) if name in d]
        tasks = [float_parents.task_vectors(name)[i] for i in present]
        weights = torch.tensor([WEIGHTS[i] for i in present], dtype=torch.float64)
        return merge_utils.ties(tasks, weights, density, majority_sign_method=method)

    assert_equal_deltas(ours, expected)
