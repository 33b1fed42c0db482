"""Mixers from outside the package: registration checks, the contract suite, saving and loading, conversion."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from hybridvl import mixers
from hybridvl.mixers import registry
from hybridvl.mixers import testing as mixer_testing
from hybridvl.mixers.base import Mixer
from hybridvl.models.config import ConfigError, HybridConfig
from hybridvl.models.hybrid import HybridVLM

REPO = Path(__file__).resolve().parents[1]
MODULE = "hybridvl_test_custom_mixers"
CUSTOM_MIXER = '''
"""A tiny decaying linear attention: S_t = decay * S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (a token loop)."""

import torch
from torch import nn

from hybridvl import mixers
from hybridvl.mixers.base import Mixer
from hybridvl.mixers.state import RecurrentState


@mixers.register_mixer("E", "decaying_linear")
class DecayingLinear(Mixer):
    def __init__(self, hidden_size, num_heads=2, head_dim=8, decay=0.9, backend="auto"):
        super().__init__(hidden_size, backend)
        self.num_heads, self.head_dim, self.decay = num_heads, head_dim, decay
        inner = num_heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden_size, inner, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, x, state=None, *, position_ids=None, cu_seqlens=None):
        n = self._check_input(x, state, cu_seqlens)
        self.last_backend = "torch"
        memory = self.init_state(n, x.device, x.dtype).recurrent if state is None else state.recurrent
        q, k, v = (p(x).unflatten(-1, (self.num_heads, self.head_dim)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cu_seqlens is None:
            spans = [(b, b, 0, x.shape[1]) for b in range(x.shape[0])]
        else:
            bounds = cu_seqlens.tolist()
            spans = [(i, 0, bounds[i], bounds[i + 1]) for i in range(n)]
        outputs, final = torch.zeros_like(q), []
        for sequence, row, start, end in spans:
            s = memory[sequence]
            for t in range(start, end):
                s = self.decay * s + torch.einsum("hk,hv->hkv", k[row, t], v[row, t])
                outputs[row, t] = torch.einsum("hkv,hk->hv", s, q[row, t])
            final.append(s)
        return self.o_proj(outputs.flatten(-2)), RecurrentState(torch.stack(final))

    def init_state(self, batch_size, device=None, dtype=None):
        shape = (batch_size, self.num_heads, self.head_dim, self.head_dim)
        return RecurrentState(torch.zeros(shape, device=self._device(device), dtype=self._dtype(dtype)))
'''
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    mrope_section=None,
    sliding_window=8,
    mixer_options={"D": {"num_heads": 2, "head_dim": 8}, "E": {"num_heads": 2, "head_dim": 8}},
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@pytest.fixture
def custom_module(tmp_path, monkeypatch, registry_snapshot):
    """The folder of an importable module that registers ``E`` (imported here, so ``E`` is registered)."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(CUSTOM_MIXER)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    __import__(MODULE)
    yield folder
    sys.modules.pop(MODULE, None)


def run_python(code: str, *paths: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with ``paths`` and the repository on ``PYTHONPATH``."""
    env = {"PYTHONPATH": ":".join(map(str, [*paths, REPO])), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


# --- registration --------------------------------------------------------------------------------------


def test_registering_a_class_without_init_state_names_it_and_the_base_class(registry_snapshot):
    class NoState(Mixer):
        def forward(self, x, state=None, *, position_ids=None, cu_seqlens=None):
            return x, state

    with pytest.raises(TypeError, match=r"NoState lacks init_state; .*subclass hybridvl\.mixers\.base\.Mixer"):
        mixers.register_mixer("E", "no_state")(NoState)
    with pytest.raises(mixers.UnknownMixerError):
        mixers.resolve_kind("E")  # nothing was registered


def test_registering_a_bare_module_or_a_non_module_names_what_is_missing(registry_snapshot):
    class Bare(nn.Module):
        pass

    with pytest.raises(TypeError, match="Bare lacks forward, init_state, state_bytes"):
        mixers.register_mixer("E", "bare")(Bare)
    with pytest.raises(TypeError, match=r"not a torch\.nn\.Module; subclass hybridvl\.mixers\.base\.Mixer"):
        mixers.register_mixer("E", "plain")(type("Plain", (), {}))


def test_a_factory_that_builds_a_non_mixer_is_refused_when_built(registry_snapshot):
    mixers.register_mixer("E", "linear_factory")(lambda hidden_size: nn.Linear(hidden_size, hidden_size))
    with pytest.raises(TypeError, match=r"factory of mixer E .* built a Linear: Linear lacks init_state"):
        mixers.build_mixer("E", 8)


def test_registration_sets_letter_and_name(custom_module):
    cls = mixers.get_spec("decaying_linear").factory
    assert (cls.letter, cls.name) == ("E", "decaying_linear")
    assert mixers.get_spec("E").module == MODULE and not mixers.get_spec("E").built_in
    assert all(spec.built_in for spec in mixers.registered() if spec.letter != "E")


# --- the contract suite --------------------------------------------------------------------------------

SMALL = {"D": dict(num_heads=2, head_dim=8), "S": dict(window=6), "M": dict(d_state=8, headdim=16)}


@pytest.mark.parametrize("kind", [spec.letter for spec in mixers.registered()])
def test_check_mixer_passes_for_every_built_in_kind(kind):
    mixer_testing.check_mixer(kind, hidden_size=32, **SMALL.get(kind, {}))


def test_check_mixer_passes_for_a_custom_mixer(custom_module):
    mixer_testing.check_mixer("E", hidden_size=16, num_heads=2, head_dim=4)


def test_check_mixer_names_the_property_that_fails(custom_module):
    cls = mixers.get_spec("E").factory

    class Forgetful(cls):
        def forward(self, x, state=None, **kwargs):  # drops the state it is given
            return super().forward(x, None, **kwargs)

    class Misreported(cls):
        def state_bytes(self, batch_size=1, seq_len=0, dtype=None):
            return 0

    mixers.register_mixer("F", "forgetful")(Forgetful)
    mixers.register_mixer("W", "misreported")(Misreported)
    with pytest.raises(AssertionError, match=r"mixer F \(Forgetful\): token-by-token outputs .* relative error"):
        mixer_testing.check_mixer("F", hidden_size=16)
    with pytest.raises(AssertionError, match=r"state_bytes\(3\) reports 0 bytes but init_state\(3\) holds"):
        mixer_testing.check_state_size(mixer_testing.make_mixer("W", 16))


# --- saving and loading --------------------------------------------------------------------------------


def test_a_custom_mixer_saved_in_one_process_loads_in_another(custom_module, tmp_path):
    torch.manual_seed(0)
    model = HybridVLM(HybridConfig(layout="S,E,D,E", **TINY)).eval()
    assert model.config.mixer_modules == {"E": MODULE}
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["mixer_modules"] == {"E": MODULE}
    ids = torch.randint(3, 64, (2, 11))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(ids).logits
    code = textwrap.dedent(f"""
        import torch
        from hybridvl.models.hybrid import HybridVLM
        model = HybridVLM.from_pretrained({str(tmp_path / "model")!r}).eval()
        assert model.kinds == ["S", "E", "D", "E"], model.kinds
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
    """)
    result = run_python(code, custom_module)
    assert result.returncode == 0, result.stderr
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_a_model_whose_mixer_module_is_missing_names_the_module_and_the_letter(custom_module, tmp_path):
    HybridVLM(HybridConfig(layout="S,E,D,E", **TINY)).save_pretrained(tmp_path / "model")
    result = run_python(
        f"from hybridvl.models.hybrid import HybridVLM; HybridVLM.from_pretrained({str(tmp_path / 'model')!r})"
    )
    assert result.returncode != 0
    assert f"mixer E comes from module '{MODULE}', which cannot be imported" in result.stderr
    assert "add its folder to PYTHONPATH" in result.stderr


def test_a_module_that_does_not_register_the_letter_is_named(custom_module, tmp_path):
    config = HybridConfig(layout="S,E,D,E", **TINY).to_dict()
    config["mixer_modules"] = {"E": "json"}
    registry._BY_LETTER.pop("E")
    with pytest.raises(ConfigError, match="module 'json' was imported but registers no mixer E"):
        HybridConfig.from_dict(config)


def test_a_mixer_defined_in_main_is_refused_before_anything_is_written(custom_module, tmp_path):
    cls = mixers.get_spec("E").factory
    script_mixer = type("ScriptMixer", (cls,), {"__module__": "__main__"})
    mixers.register_mixer("F", "script_mixer")(script_mixer)
    model = HybridVLM(HybridConfig(layout="S,F,D,E", **{**TINY, "mixer_options": {"F": {}}}))
    assert model.config.mixer_modules == {"F": "__main__", "E": MODULE}
    with pytest.raises(ConfigError, match=r"mixer F \(script_mixer\): it is defined in module '__main__'"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists() or not any((tmp_path / "model").iterdir())


def test_configs_with_built_in_mixers_record_no_modules():
    config = HybridConfig(layout="S,D,M,G", **{**TINY, "mixer_options": {}})
    assert config.mixer_modules == {} and config.to_dict()["mixer_modules"] == {}
