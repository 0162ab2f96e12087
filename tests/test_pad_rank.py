"""``--pad-rank``: every module at one rank with one r/lora_alpha, exactly; PEFT's hotswap as the oracle.

PEFT's ``hotswap_adapter`` swaps a second adapter's weights into a loaded PeftModel in place; it
refuses adapters whose ``use_rslora``/``alpha_pattern`` differ and (once compiled) needs one rank
everywhere. Two adapters that differ in all of that, padded to the same rank by adapterkit, must
swap into one model and give the logits each gives when loaded on its own.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import load_peft, logits, save_lora, tiny_llama

from adapterkit.adapter.equivalence import Factors, relative_difference
from adapterkit.adapter.transforms import common_scaling, pad_rank
from adapterkit.errors import ExportError
from adapterkit.formats.peft import read_adapter, write_adapter

#: Two adapters on the same modules that PEFT's hotswap refuses to swap as they are.
PLAIN = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
PATTERNED = dict(
    r=4,
    lora_alpha=8,
    use_rslora=True,
    target_modules=["q_proj", "v_proj", "down_proj"],
    rank_pattern={"down_proj": 6, r"model\.layers\.1\.self_attn\.q_proj": 2},
    alpha_pattern={"v_proj": 3.5},
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("pad")
    base = tiny_llama(seed=0)
    save_lora(base, root / "plain", seed=1, **PLAIN)
    save_lora(base, root / "patterned", seed=2, **PATTERNED)
    return {"root": root, "base": base}


def _padded(setup: dict[str, object], name: str, rank: int) -> Path:
    root = setup["root"]
    assert isinstance(root, Path)
    out = root / f"{name}-pad{rank}"
    if not out.exists():
        write_adapter(pad_rank(read_adapter(root / name), rank), out)
    return out


def test_padded_adapter_has_one_rank_and_scaling_and_the_same_deltas(setup: dict[str, object]) -> None:
    root = setup["root"]
    assert isinstance(root, Path)
    original = read_adapter(root / "patterned")
    padded = read_adapter(_padded(setup, "patterned", 16))  # re-read: the config must give what was folded
    assert padded.config["r"] == 16 and not padded.config["use_rslora"]
    assert padded.config["rank_pattern"] == {} and padded.config["alpha_pattern"] == {}
    assert {m.spec.r for m in padded.modules.values()} == {16}
    assert len({m.spec.scaling for m in padded.modules.values()}) == 1
    for name, module in original.modules.items():
        got = padded.modules[name]
        assert torch.allclose(got.delta(torch.float64), module.delta(torch.float64), rtol=1e-6, atol=1e-6)
        diff = relative_difference(
            Factors(module.A, module.B, module.spec.scaling), Factors(got.A, got.B, got.spec.scaling)
        )
        assert diff < 1e-6, (name, diff)


def test_modules_at_the_common_scaling_keep_their_factors_bit_for_bit(setup: dict[str, object]) -> None:
    root = setup["root"]
    assert isinstance(root, Path)
    original = read_adapter(root / "plain")
    padded = pad_rank(original, 16)
    assert padded.config["lora_alpha"] == 32  # scaling 2 for every module: alpha = 16 * 2, nothing folded
    for name, module in original.modules.items():
        assert torch.equal(padded.modules[name].B[:, :8], module.B)
        assert torch.equal(padded.modules[name].A[:8], module.A)
        assert not padded.modules[name].B[:, 8:].any() and not padded.modules[name].A[8:].any()


def test_hotswap_of_two_padded_adapters_gives_each_ones_own_logits(setup: dict[str, object]) -> None:
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    base, root = setup["base"], setup["root"]
    assert isinstance(root, Path)
    want_plain = logits(load_peft(base, root / "plain"))
    want_patterned = logits(load_peft(base, root / "patterned"))
    assert (want_plain - want_patterned).abs().max() > 0.1  # the two adapters do differ

    model = PeftModel.from_pretrained(copy.deepcopy(base), _padded(setup, "plain", 16)).eval()
    got_plain = logits(model)
    hotswap_adapter(model, str(_padded(setup, "patterned", 16)), adapter_name="default", torch_device="cpu")
    got_patterned = logits(model)
    hotswap_adapter(model, str(_padded(setup, "plain", 16)), adapter_name="default", torch_device="cpu")
    got_plain_again = logits(model)

    scale = want_plain.abs().max()
    assert (got_plain - want_plain).abs().max() / scale < 1e-5
    assert (got_patterned - want_patterned).abs().max() / want_patterned.abs().max() < 1e-5
    assert (got_plain_again - want_plain).abs().max() / scale < 1e-5


def test_hotswap_refuses_the_same_adapters_unpadded(setup: dict[str, object]) -> None:
    """The reason for --pad-rank: PEFT will not swap the originals (rsLoRA and alpha_pattern differ)."""
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    base, root = setup["base"], setup["root"]
    assert isinstance(root, Path)
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / "plain").eval()
    with pytest.raises(ValueError, match="incompatible"):
        hotswap_adapter(model, str(root / "patterned"), adapter_name="default", torch_device="cpu")


def test_pad_rank_refuses_a_rank_below_the_adapters(setup: dict[str, object]) -> None:
    root = setup["root"]
    assert isinstance(root, Path)
    with pytest.raises(ExportError, match=r"--pad-rank 4 is below the rank of .* \(largest: .*down_proj' has r=6\)"):
        pad_rank(read_adapter(root / "patterned"), 4)


def test_pad_rank_refuses_dora(tmp_path: Path) -> None:
    base = tiny_llama(seed=0)
    save_lora(base, tmp_path / "dora", seed=3, r=4, lora_alpha=8, use_dora=True)
    with pytest.raises(ExportError, match="this adapter sets 'use_dora'"):
        pad_rank(read_adapter(tmp_path / "dora"), 8)


def test_common_scaling_is_the_one_of_most_parameters(setup: dict[str, object]) -> None:
    root = setup["root"]
    assert isinstance(root, Path)
    adapter = read_adapter(root / "patterned")
    by_scaling: dict[float, int] = {}
    for module in adapter.modules.values():
        by_scaling[module.spec.scaling] = by_scaling.get(module.spec.scaling, 0) + module.spec.num_parameters
    assert common_scaling(adapter.modules) == max(by_scaling, key=lambda s: (by_scaling[s], -s))


def test_cli_export_pad_rank(setup: dict[str, object], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from adapterkit.cli import cli

    root = setup["root"]
    assert isinstance(root, Path)
    runner = CliRunner()
    home = ["--store", str(tmp_path / "store")]
    assert runner.invoke(cli, [*home, "add", str(root / "patterned"), "-t", "p:1"]).exit_code == 0
    out = runner.invoke(cli, [*home, "export", "p:1", str(tmp_path / "out"), "--pad-rank", "16"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[1].startswith("certificate: 6 modules re-read, largest relative difference ")
    assert read_adapter(tmp_path / "out").config["r"] == 16
    too_big = runner.invoke(cli, [*home, "export", "p:1", str(tmp_path / "big"), "--pad-rank", "1024"])
    assert too_big.exit_code == 1
    assert too_big.output.splitlines()[-1] == (
        "Error: format 'peft': parameter 'pad_rank' must be at most 512, the largest max_lora_rank vLLM accepts "
        "(vllm/config/lora.py, MaxLoRARanks), got 1024"
    )
    too_small = runner.invoke(cli, [*home, "export", "p:1", str(tmp_path / "small"), "--pad-rank", "4"])
    assert too_small.exit_code == 1 and "is below the rank of" in too_small.output
    assert not (tmp_path / "big").exists() and not (tmp_path / "small").exists()
