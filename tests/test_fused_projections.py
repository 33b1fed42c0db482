"""Fused input projections: one matrix multiplication per group, the same numbers as separate ``nn.Linear`` s, and
checkpoints under the separate names (float64 on CPU where numerics matter)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file, save_file
from torch import nn

from hybridvl import mixers
from hybridvl.mixers.base import AttentionWeights
from hybridvl.mixers.modules import FusedLinear, with_part_names
from hybridvl.mixers.testing import assert_states_equal
from hybridvl.models.config import HybridConfig
from hybridvl.models.hybrid import HybridVLM, SwiGLU

HIDDEN = 32
OPTIONS = {
    "D": dict(num_heads=2, head_dim=8),
    "S": dict(num_heads=4, num_kv_heads=2, window=6),
    "A": dict(num_heads=4, num_kv_heads=2),
    "G": dict(num_heads=2),
    "G-conv": dict(num_heads=2, conv_size=4),
    "L": dict(num_heads=2, head_dim=8),
    "L-noconv": dict(num_heads=2, head_dim=8, conv_size=0),
}
# today's input projections of each mixer at OPTIONS' sizes, in the order the fused module stacks them:
# (fused module, [(name, output width, bias)])
SEPARATE = {
    "D": ("in_proj", [("q_proj", 16, False), ("k_proj", 16, False), ("v_proj", 32, False), ("a_proj", 2, False),
                      ("b_proj", 2, False), ("g_proj", 32, False)]),
    "S": ("qkv_proj", [("q_proj", 32, True), ("k_proj", 16, True), ("v_proj", 16, True)]),
    "A": ("qkv_proj", [("q_proj", 32, True), ("k_proj", 16, True), ("v_proj", 16, True)]),
    "G": ("in_proj", [("q_proj", 16, False), ("k_proj", 16, False), ("v_proj", 32, False), ("g_proj", 32, False)]),
    "L": ("in_proj", [("q_proj", 16, False), ("k_proj", 16, False), ("v_proj", 32, False)]),
}  # fmt: skip


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return mixers.build_mixer(kind.split("-")[0], HIDDEN, **OPTIONS[kind]).double()


class SeparateProjections(nn.Module):
    """Today's layout: one ``nn.Linear`` per projection, outputs concatenated (what a fused module computes)."""

    def __init__(self, parts: list[tuple[str, int, bool]], weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict()
        for name, width, bias in parts:
            linear = nn.Linear(HIDDEN, width, bias=bias, dtype=torch.float64)
            linear.load_state_dict({k: weights[f"{name}.{k}"] for k in linear.state_dict()})
            self.parts[name] = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(x) for linear in self.parts.values()], dim=-1)


def with_separate_projections(mixer: nn.Module, kind: str) -> nn.Module:
    """A copy of ``mixer`` computing its input projections with separate ``nn.Linear`` s, loaded by today's names."""
    fused_name, parts = SEPARATE[kind.split("-")[0]]
    reference = copy.copy(mixer)  # shares every other module and parameter with ``mixer``
    reference._modules = {**mixer._modules, fused_name: SeparateProjections(parts, mixer.state_dict())}
    return reference


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_fused_mixer_equals_separate_projections(kind):
    """Outputs, states and weight gradients of the fused mixer = today's separate projections, to 1e-12."""
    mixer = make(kind)
    reference = with_separate_projections(mixer, kind)
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64)
    y, state = mixer(x)
    y_ref, state_ref = reference(x)
    assert rel_err(y, y_ref) < 1e-12
    assert_states_equal(state, state_ref, "fused against separate", tol=1e-12)
    y_next, _ = mixer(x[:, :1], state)  # one token continuing from the state
    assert rel_err(y_next, reference(x[:, :1], state_ref)[0]) < 1e-12
    (y * y).sum().backward()
    (y_ref * y_ref).sum().backward()
    fused_name, parts = SEPARATE[kind.split("-")[0]]
    fused, separate = getattr(mixer, fused_name), list(reference._modules[fused_name].parts.values())
    assert rel_err(fused.weight.grad, torch.cat([linear.weight.grad for linear in separate])) < 1e-12
    if parts[0][2]:
        assert rel_err(fused.bias.grad, torch.cat([linear.bias.grad for linear in separate])) < 1e-12


def test_mamba2_keeps_its_single_input_projection():
    mixer = mixers.build_mixer("M", HIDDEN, d_state=8, headdim=16)
    assert type(mixer.in_proj) is nn.Linear and "in_proj.weight" in mixer.state_dict()


def test_fused_mlp_equals_separate_gate_and_up():
    torch.manual_seed(0)
    mlp = SwiGLU(HIDDEN, 48).double()
    weights = mlp.state_dict()
    assert set(weights) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    gate, up = (nn.Linear(HIDDEN, 48, bias=False, dtype=torch.float64) for _ in range(2))
    gate.weight.data.copy_(weights["gate_proj.weight"])
    up.weight.data.copy_(weights["up_proj.weight"])
    x = torch.randn(3, 7, HIDDEN, dtype=torch.float64)
    y = mlp(x)
    y_ref = mlp.down_proj(nn.functional.silu(gate(x)) * up(x))
    assert rel_err(y, y_ref) < 1e-12
    y.sum().backward()
    y_ref.sum().backward()
    assert rel_err(mlp.gate_up_proj.weight.grad, torch.cat([gate.weight.grad, up.weight.grad])) < 1e-12


def test_fused_linear_rejects_bad_parts_and_names_its_parts():
    with pytest.raises(ValueError, match="positive output widths"):
        FusedLinear(4, {"q_proj": 0})
    with pytest.raises(ValueError, match="positive output widths"):
        FusedLinear(4, {})
    fused = FusedLinear(4, {"q_proj": 2, "k_proj": 3}, bias=True)
    assert fused.sizes == [2, 3] and "parts=(q_proj=2, k_proj=3)" in repr(fused)
    assert fused.weight_part("k_proj").data_ptr() == fused.weight[2:].data_ptr()
    assert fused.bias_part("q_proj").shape == (2,)
    with pytest.raises(KeyError, match="no part 'v_proj'; its parts are q_proj, k_proj"):
        fused.weight_part("v_proj")


# --- whole models ---------------------------------------------------------------------------------------------

LAYOUT = "S,D,A,G,L,M"
MIXER_OPTIONS = {
    "D": {"num_heads": 2, "head_dim": 8},
    "G": {"num_heads": 2},
    "L": {"num_heads": 2, "head_dim": 8},
    "M": {"d_state": 8, "headdim": 16},
}


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> HybridVLM:
    torch.manual_seed(seed)
    config = HybridConfig(
        layout=LAYOUT,
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=None,
        sliding_window=8,
        mixer_options=MIXER_OPTIONS,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return HybridVLM(config).to(dtype).eval()


def todays_names() -> set[str]:
    """The state-dict names of ``tiny_model`` as separate projections name them (not derived from the model)."""
    mixer = {
        "S": ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
              "o_proj.weight"],
        "D": ["q_proj.weight", "k_proj.weight", "v_proj.weight", "q_conv1d.weight", "k_conv1d.weight",
              "v_conv1d.weight", "a_proj.weight", "b_proj.weight", "g_proj.weight", "o_proj.weight", "A_log",
              "dt_bias", "o_norm.weight"],
        "G": ["q_proj.weight", "k_proj.weight", "v_proj.weight", "g_proj.weight", "gk_proj.0.weight",
              "gk_proj.1.weight", "gk_proj.1.bias", "o_proj.weight", "o_norm.weight"],
        "L": ["q_proj.weight", "k_proj.weight", "v_proj.weight", "q_conv1d.weight", "k_conv1d.weight",
              "v_conv1d.weight", "o_proj.weight", "o_norm.weight"],
        "M": ["in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
              "out_proj.weight"],
    }  # fmt: skip
    mixer["A"] = mixer["S"]
    layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
             "mlp.down_proj.weight"]  # fmt: skip
    names = {"language_model.embed_tokens.weight", "language_model.norm.weight", "lm_head.weight"}
    for i, kind in enumerate(LAYOUT.split(",")):
        names |= {f"language_model.layers.{i}.{n}" for n in layer}
        names |= {f"language_model.layers.{i}.self_attn.{n}" for n in mixer[kind]}
    return names


def random_weights(model: HybridVLM, seed: int) -> dict[str, torch.Tensor]:
    """Weights under today's names, shaped as ``model``'s (the head tied to the embeddings), as a checkpoint
    written before fusion holds them."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        name: 0.1 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        for name, tensor in model.state_dict().items()
    }
    weights["lm_head.weight"] = weights["language_model.embed_tokens.weight"]
    return weights


def test_model_state_dict_has_todays_names_and_views_of_the_fused_weights():
    model = tiny_model()
    saved = model.state_dict()
    assert set(saved) == todays_names()
    fused = model.language_model.layers[1].self_attn.in_proj.weight  # q 16, k 16, v 32, a 2, b 2, g 32 rows
    assert saved["language_model.layers.1.self_attn.a_proj.weight"].data_ptr() == fused[64:66].data_ptr()
    assert saved["language_model.layers.1.self_attn.g_proj.weight"].data_ptr() == fused[68:].data_ptr()


def test_an_old_checkpoint_loads_strictly_and_computes_what_separate_projections_compute(tmp_path):
    """A safetensors file under today's names (as written before fusion) loads bit for bit through
    ``from_pretrained``, saves back under the same names, and the model's outputs equal a model whose mixers
    compute the projections with separate ``nn.Linear`` s loaded from the same file."""
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path / "old")
    weights = random_weights(model, seed=1)
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, tmp_path / "old" / "model.safetensors")
    loaded = HybridVLM.from_pretrained(tmp_path / "old").eval()
    state = loaded.state_dict()
    assert set(state) == todays_names()
    for name, tensor in weights.items():
        if name != "lm_head.weight":  # tied to the embeddings
            assert torch.equal(state[name], tensor), name
    loaded.save_pretrained(tmp_path / "again")
    written = load_file(tmp_path / "again" / "model.safetensors")
    assert set(written) == todays_names() - {"lm_head.weight"}
    assert all(torch.equal(written[name], weights[name]) for name in written)
    loaded.double()
    reference = HybridVLM.from_pretrained(tmp_path / "old").double().eval()
    for layer, kind in zip(reference.language_model.layers, LAYOUT.split(",")):
        if kind in SEPARATE:
            layer.self_attn = with_separate_projections(layer.self_attn, kind)
        layer.mlp.gate_up_proj = SeparateMLPInput(layer.mlp.state_dict())
    ids = torch.randint(3, 64, (2, 13))
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, reference(ids).logits) < 1e-12


class SeparateMLPInput(nn.Module):
    """The MLP's gate and up projections as two ``nn.Linear`` s, concatenated as ``gate_up_proj`` returns them."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        width, hidden = weights["gate_proj.weight"].shape
        self.gate_proj, self.up_proj = (nn.Linear(hidden, width, bias=False, dtype=torch.float64) for _ in range(2))
        self.gate_proj.weight.data.copy_(weights["gate_proj.weight"])
        self.up_proj.weight.data.copy_(weights["up_proj.weight"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)


def test_missing_unexpected_and_misshapen_keys_are_reported_by_todays_names():
    model = tiny_model()
    weights = random_weights(model, seed=2)
    gone = "language_model.layers.1.self_attn.a_proj.weight"
    extra = "language_model.layers.1.self_attn.extra.weight"
    fused = "language_model.layers.0.self_attn.qkv_proj.weight"
    partial = {k: v for k, v in weights.items() if k != gone} | {extra: torch.zeros(1), fused: torch.zeros(64, 32)}
    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(partial)
    message = str(error.value)
    assert f'Missing key(s) in state_dict: "{gone}"' in message
    assert extra in message and fused in message and "Unexpected key(s)" in message
    assert "in_proj" not in message.split("Unexpected")[0]
    before = model.language_model.layers[1].self_attn.in_proj.weight_part("a_proj").clone()
    missing, unexpected = model.load_state_dict(partial, strict=False)
    assert missing == [gone] and sorted(unexpected) == sorted([extra, fused])
    state = model.state_dict()
    assert torch.equal(state[gone], before)  # the missing part keeps its value, the others load
    assert all(torch.equal(state[name], weights[name]) for name in weights if name not in (gone, "lm_head.weight"))
    misshapen = dict(weights)
    misshapen["language_model.layers.2.self_attn.k_proj.bias"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"size mismatch for language_model\.layers\.2\.self_attn\.k_proj\.bias"):
        model.load_state_dict(misshapen)
    mlp = {k: v for k, v in weights.items() if k != "language_model.layers.3.mlp.up_proj.weight"}
    missing, _ = model.load_state_dict(mlp, strict=False)
    assert missing == ["language_model.layers.3.mlp.up_proj.weight"]


def test_mimic_and_transfer_init_write_their_parts_of_the_fused_weights():
    for kind in ("D", "L", "G"):
        mixer = make(kind)
        before = {n: t.clone() for n, t in mixer.state_dict().items()}
        mixer.mimic_init()
        after = mixer.state_dict()
        zeroed = {"a_proj.weight", "b_proj.weight"} if kind == "D" else set()
        for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight"):
            if name in before:
                assert torch.equal(after[name], torch.zeros_like(before[name]) if name in zeroed else before[name])
        heads, head_dim = 2, mixer.key_dim // 2
        width = heads * head_dim
        q, k, v = (torch.randn(width, HIDDEN, dtype=torch.float64) for _ in range(3))
        o = torch.randn(HIDDEN, width, dtype=torch.float64)
        written = mixer.transfer_init(AttentionWeights(q, k, v, o, heads, head_dim))
        assert written == {
            "q_proj.weight": ["q"],
            "k_proj.weight": ["k"],
            "v_proj.weight": ["v"],
            "o_proj.weight": ["o"],
        }
        state = mixer.state_dict()
        repeat = mixer.head_v_dim // head_dim
        assert torch.equal(state["q_proj.weight"], q) and torch.equal(state["k_proj.weight"], k)
        assert torch.equal(state["v_proj.weight"], v.unflatten(0, (heads, head_dim)).repeat(1, repeat, 1).flatten(0, 1))
        for name in ("a_proj.weight", "b_proj.weight", "g_proj.weight"):  # the gates keep their values
            if name in after:
                assert torch.equal(state[name], after[name]), (kind, name)


# --- training: parameter patterns, LoRA, FSDP ------------------------------------------------------------------


def test_trainable_patterns_select_fused_weights_and_refuse_their_parts():
    from hybridvl.lit.params import select_parameters

    model = tiny_model()
    assert "language_model.layers.0.self_attn.qkv_proj.bias" in select_parameters(model, ["*.qkv_proj.*"])
    assert "language_model.layers.1.mlp.gate_up_proj.weight" in select_parameters(model, ["*.mlp.*"])
    with pytest.raises(ValueError, match=r"names parts of fused projections.*q_proj\.bias is part of .*qkv_proj\.bias"):
        select_parameters(model, ["language_model.layers.0.self_attn.q_proj.*"])
    with pytest.raises(ValueError, match=r"up_proj\.weight is part of .*gate_up_proj\.weight"):
        select_parameters(model, ["*.mlp.[du]*_proj.weight"])  # matches down_proj; up_proj only as a part


def test_lora_on_fused_projections_trains_merges_and_exports_under_todays_names(tmp_path):
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    from hybridvl.lit.modules import _check_lora_targets

    model = tiny_model(dtype=torch.float32).train()
    with pytest.raises(ValueError, match=r"q_proj \(in in_proj / qkv_proj\).*target the fused modules"):
        _check_lora_targets(model, ["q_proj", "o_proj"])
    targets = ["qkv_proj", "in_proj", "o_proj", "gate_up_proj", "down_proj"]
    _check_lora_targets(model, targets)
    lora = LoraModel(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False), "default")
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert (
        "language_model.layers.0.self_attn.qkv_proj" in adapted
        and "language_model.layers.1.mlp.gate_up_proj" in adapted
    )
    assert (
        "language_model.layers.1.self_attn.in_proj" in adapted
        and "language_model.layers.5.self_attn.in_proj" in adapted
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.ndim == 2 for p in trainable)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    ids = torch.randint(3, 64, (2, 9))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        adapted_logits = model(ids).logits
    merged = lora.merge_and_unload()
    assert isinstance(merged.language_model.layers[1].self_attn.in_proj, FusedLinear)
    assert set(merged.state_dict()) == todays_names()
    with torch.no_grad():
        assert rel_err(merged(ids).logits, adapted_logits) < 1e-5
    merged.save_pretrained(tmp_path / "merged")
    assert set(load_file(tmp_path / "merged" / "model.safetensors")) == todays_names() - {"lm_head.weight"}
    reloaded = HybridVLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, merged(ids).logits)


FSDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType, FullStateDictConfig
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
sys.path.insert(0, {tests!r})
from test_fused_projections import tiny_model, random_weights, todays_names
from hybridvl.mixers.modules import with_part_names
from hybridvl.models.hybrid import HybridDecoderLayer
dist.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)
plain = tiny_model(dtype=torch.float32)
sharded = FSDP(tiny_model(dtype=torch.float32), auto_wrap_policy=ModuleWrapPolicy({{HybridDecoderLayer}}),
               use_orig_params=True, device_id=torch.device("cpu"))
full = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT, full):
    gathered = with_part_names(sharded.module, sharded.state_dict())
expected = plain.state_dict()
assert set(gathered) == set(expected) == todays_names(), sorted(set(gathered) ^ todays_names())
assert all(torch.equal(gathered[n], expected[n]) for n in expected)
weights = {{n: t.float() for n, t in random_weights(plain, seed=3).items()}}
with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT, full):
    sharded.load_state_dict(weights)
    again = with_part_names(sharded.module, sharded.state_dict())
assert all(torch.equal(again[n], weights[n]) for n in weights if n != "lm_head.weight")
dist.destroy_process_group()
print("ok")
"""


def test_fsdp_gathers_fused_names_that_with_part_names_renames_and_loads_todays_names(tmp_path):
    """FSDP's full state dict (one process over gloo, one unit per decoder layer) keeps the fused names while it
    gathers; :func:`with_part_names` gives today's names, and a state dict under today's names loads."""
    script = FSDP_SCRIPT.format(tests=str(Path(__file__).parent), store=str(tmp_path / "store"))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_with_part_names_leaves_split_names_alone():
    model = tiny_model()
    state = model.state_dict()
    assert with_part_names(model, state) == state
