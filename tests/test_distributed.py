"""Data-parallel training on CPU (Lightning DDP over gloo): two processes equal one with the same global batch,
and checkpoints move between world sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridvl.models.convert import convert_directory
from hybridvl.models.hybrid import HybridVLM
from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

SCRIPT = Path(__file__).with_name("distributed_run.py")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    make_tiny_qwen2_5_vl(root / "qwen")
    convert_directory(root / "qwen", root / "student", "S,D,D,D")
    return root / "student"


def train(student, out: Path, devices: int, accumulate: int, steps: int, save_every=0, ckpt=None) -> dict:
    command = [
        sys.executable,
        str(SCRIPT),
        "--student",
        str(student),
        "--out",
        str(out),
        "--devices",
        str(devices),
        "--accumulate",
        str(accumulate),
        "--steps",
        str(steps),
        "--save-every",
        str(save_every),
    ]
    if ckpt:
        command += ["--ckpt", str(ckpt)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "weights.pt")


def assert_same_weights(a: dict, b: dict) -> None:
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name


def test_two_processes_equal_one_on_the_same_global_batch(student, tmp_path):
    one = train(student, tmp_path / "one", devices=1, accumulate=2, steps=3)
    two = train(student, tmp_path / "two", devices=2, accumulate=1, steps=3)
    initial = HybridVLM.from_pretrained(student).state_dict()
    assert set(one) == set(two)
    assert any(not torch.equal(one[name], initial[name]) for name in one), "training changed nothing"
    assert_same_weights(one, two)


def test_checkpoint_resumes_on_another_world_size(student, tmp_path):
    straight = train(student, tmp_path / "straight", devices=2, accumulate=1, steps=4, save_every=2)
    resumed = train(
        student,
        tmp_path / "resumed",
        devices=1,
        accumulate=2,
        steps=4,
        ckpt=tmp_path / "straight" / "ckpt" / "step2.ckpt",
    )
    assert_same_weights(straight, resumed)


def test_fsdp_recipe_wraps_each_decoder_layer():
    """The FSDP YAML's strategy resolves to Lightning's FSDPStrategy sharding one decoder layer per unit."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from hybridvl.models.hybrid import HybridDecoderLayer

    recipe = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "experiments" / "infinitevl" / "distill_layerwise_fsdp.yaml").read_text()
    )
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate(parser.parse_object({"strategy": recipe["trainer"]["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {HybridDecoderLayer}
    assert strategy.kwargs["use_orig_params"]
