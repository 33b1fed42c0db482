"""Training stages on a tiny model (CPU): losses, trainable parameters, export, resuming, configs."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from hybridvl.lit.callbacks import StepTimer
from hybridvl.lit.commands.train import main as train_main
from hybridvl.lit.datamodule import HybridDataModule
from hybridvl.lit.modules import SFT, DistillEndToEnd, DistillLayerwise, HybridStage, LongSFT
from hybridvl.models.convert import convert_directory
from hybridvl.models.hybrid import HybridVLM
from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [{"type": "synthetic", "size_per_task": 20, "split": "train"}]
VAL = [{"type": "synthetic", "size_per_task": 2, "split": "val"}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    qwen = make_tiny_qwen2_5_vl(root / "qwen")
    convert_directory(qwen, root / "teacher", "A x4")
    convert_directory(root / "teacher", root / "student", "S,D,D,D")
    return {"teacher": str(root / "teacher"), "student": str(root / "student"), "root": root}


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def fit(
    module: HybridStage, dirs, tmp_path, max_steps=4, ckpt_path=None, callbacks=(), val=None, num_workers=0
) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=1,  # as the recipes: the schedule length then depends on the loader, counted before resuming
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1 if val else 0,
        val_check_interval=max_steps,
        check_val_every_n_epoch=None,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )
    data = HybridDataModule(
        processor=dirs["student"], train=TRAIN, val=val, max_tokens=256, seed=0, num_workers=num_workers
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def test_resume_mid_epoch_reproduces_the_loss_curve(dirs, tmp_path):
    def run(ckpt_path=None):
        recorder = LossRecorder()
        checkpoints = ModelCheckpoint(
            dirpath=tmp_path / "ckpt",
            every_n_train_steps=3,
            save_top_k=-1,
            filename="step{step}",
            auto_insert_metric_name=False,
        )
        module = SFT(model=dirs["student"], learning_rate=1e-3, generation_max_new_tokens=0)
        # with loader workers, as the recipes: a DataLoader with workers starts its sampler twice before a batch
        trainer = fit(
            module, dirs, tmp_path, max_steps=8, ckpt_path=ckpt_path, callbacks=[recorder, checkpoints], num_workers=2
        )
        return recorder.losses, trainer

    uninterrupted, trainer = run()
    assert trainer.num_training_batches > 8, "the test must resume in the middle of an epoch"
    resumed, _ = run(ckpt_path=tmp_path / "ckpt" / "step3.ckpt")
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    for step, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step


def test_distillation_checkpoints_leave_the_teacher_out_and_load_strictly(dirs):
    """The teacher's keys may be missing from a checkpoint (plain or FSDP-wrapped names); the student's may not."""
    from torch.nn.modules.module import _IncompatibleKeys

    from hybridvl.lit.modules import _teacher_keys_may_be_missing

    module = DistillLayerwise(model=dirs["student"], teacher=dirs["teacher"])
    module.configure_model()
    saved = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(saved)
    assert saved["state_dict"] and not any(key.startswith("teacher.") for key in saved["state_dict"])
    module.load_state_dict(saved["state_dict"])  # strict
    dropped = next(iter(saved["state_dict"]))
    with pytest.raises(RuntimeError, match=dropped):
        module.load_state_dict({k: v for k, v in saved["state_dict"].items() if k != dropped})
    wrapped = _IncompatibleKeys(
        [
            "_fsdp_wrapped_module.teacher.language_model.layers.0._fsdp_wrapped_module.mlp.up_proj.weight",
            "_fsdp_wrapped_module.student.lm_head.weight",
        ],
        [],
    )
    _teacher_keys_may_be_missing(module, wrapped)
    assert wrapped.missing_keys == ["_fsdp_wrapped_module.student.lm_head.weight"]


def test_export_from_gathered_weights_equals_the_student_and_checks_them(dirs, tmp_path):
    """The FSDP export path: a full state dict is checked against the config and written without a model."""
    from hybridvl.models.checkpoint import CheckpointMismatchError

    stage = SFT(model=dirs["student"], generation_max_new_tokens=0)
    stage.configure_model()
    weights = {name: tensor.clone() for name, tensor in stage.student.state_dict().items()}
    exported = HybridVLM.from_pretrained(stage.export(tmp_path / "gathered", weights))
    for name, tensor in stage.student.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    assert (tmp_path / "gathered" / "tokenizer_config.json").is_file()
    weights.pop(next(iter(weights)))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        stage.export(tmp_path / "incomplete", weights)


class _ShardedModel:
    """Stands in for FSDP's root module: records the clipping calls made on it."""

    def __init__(self) -> None:
        self.clipped: list[float] = []

    def clip_grad_norm_(self, max_norm: float) -> None:
        self.clipped.append(max_norm)


class _FSDPTrainer:
    """The parts of a Trainer under FSDP that the stages use (no process group needed)."""

    def __init__(self, module: HybridStage, log_dir: Path) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        whole = {name: tensor.clone() for name, tensor in module.state_dict().items()}

        class GatheringFSDP(FSDPStrategy):
            def lightning_module_state_dict(self) -> dict:  # FSDP gathers the full state on rank 0
                return whole

        self.strategy = GatheringFSDP()
        self.strategy.model = _ShardedModel()
        self.log_dir = str(log_dir)
        self.default_root_dir = str(log_dir)
        self.is_global_zero = True
        self.received_sigterm = False
        self.max_steps, self.max_epochs, self.datamodule, self.estimated_stepping_batches = 10, None, None, 10


def test_fsdp_clipping_and_export_go_through_the_sharded_model(dirs, tmp_path):
    """Under FSDP the stage clips with FSDP's own norm and exports the gathered weights (checked, loadable)."""
    stage = DistillLayerwise(model=dirs["student"], teacher=dirs["teacher"], generation_max_new_tokens=0)
    stage.configure_model()
    stage._trainer = _FSDPTrainer(stage, tmp_path)
    stage.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert stage.trainer.strategy.model.clipped == [0.5]
    with pytest.raises(ValueError, match="not supported with FSDP"):
        stage.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="value")
    whole = {name: tensor.clone() for name, tensor in stage.student.state_dict().items()}
    with torch.no_grad():  # this rank's own parameters are only shards: they must not be what gets exported
        for parameter in stage.student.parameters():
            parameter.zero_()
    stage.on_fit_end()
    exported = HybridVLM.from_pretrained(tmp_path / "model")
    for name, tensor in whole.items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="LongSFT trains LoRA adapters"):
        long_sft = LongSFT(model=dirs["student"], generation_max_new_tokens=0)
        long_sft._trainer = _FSDPTrainer(long_sft, tmp_path)
        long_sft.configure_model()


def test_the_vision_tower_trains_at_its_own_learning_rate(dirs, tmp_path):
    """``vision_learning_rate`` is the rate of the vision tower's parameters alone, under the same schedule: at 0
    the tower stays as it was while the rest trains, and otherwise its groups' rates stand to the others' as asked."""
    frozen = SFT(model=dirs["teacher"], trainable=["*"], vision_learning_rate=0.0, generation_max_new_tokens=0)
    frozen.configure_model()
    before = {name: p.detach().clone() for name, p in frozen.student.named_parameters()}
    fit(frozen, dirs, tmp_path / "frozen", max_steps=2)
    after = dict(frozen.student.named_parameters())
    vision = [name for name in before if name.startswith("visual.")]
    assert vision and all(torch.equal(before[name], after[name]) for name in vision)
    assert not torch.equal(before["language_model.embed_tokens.weight"], after["language_model.embed_tokens.weight"])

    stage = SFT(
        model=dirs["teacher"],
        trainable=["*"],
        learning_rate=1e-3,
        vision_learning_rate=3e-3,
        min_lr_ratio=0.5,  # the rates after the last step are not 0
        generation_max_new_tokens=0,
    )
    trainer = fit(stage, dirs, tmp_path / "faster", max_steps=2)
    towers = {id(p) for name, p in stage.student.named_parameters() if name.startswith("visual.")}
    rates = {}
    for group in trainer.optimizers[0].param_groups:
        kinds = {id(p) in towers for p in group["params"]}
        assert len(kinds) == 1  # no group mixes the tower with the rest
        rates.setdefault(kinds.pop(), set()).add(group["lr"])
    (tower_rate,), (rest_rate,) = rates[True], rates[False]
    assert rest_rate > 0 and tower_rate == pytest.approx(3 * rest_rate)


def test_weight_decay_groups_survive_fsdp_flattening(dirs, tmp_path):
    """FSDP turns every parameter into a flat 1-D shard before the optimizer is built: the decay groups are
    still those of the whole shapes (matrices decay; biases, norms, A_log, dt_bias do not)."""
    stage = SFT(model=dirs["student"], weight_decay=0.1, generation_max_new_tokens=0)
    stage.configure_model()
    trainable = {name: p for name, p in stage.student.named_parameters() if p.requires_grad}
    expected = {name for name, p in trainable.items() if p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)}
    assert expected and expected != set(trainable)
    with torch.no_grad():
        for parameter in stage.student.parameters():
            parameter.data = parameter.data.flatten()
    stage._trainer = _FSDPTrainer(stage, tmp_path)
    decay, no_decay = stage.configure_optimizers()["optimizer"].param_groups
    names = {id(p): name for name, p in trainable.items()}
    assert {names[id(p)] for p in decay["params"]} == expected and decay["weight_decay"] == 0.1
    assert {names[id(p)] for p in no_decay["params"]} == set(trainable) - expected


def test_step_timer_writes_throughput_memory_and_losses(dirs, tmp_path):
    timer = StepTimer(str(tmp_path / "steps.json"), warmup=1)
    fit(SFT(model=dirs["student"], generation_max_new_tokens=0), dirs, tmp_path, max_steps=3, callbacks=[timer])
    report = json.loads((tmp_path / "steps.json").read_text())
    assert [step["step"] for step in report["steps"]] == [1, 2, 3]
    assert all(step["tokens"] > 0 and step["seconds"] > 0 and step["loss"] > 0 for step in report["steps"])
    digests = [step["samples"] for step in report["steps"]]
    assert len(set(digests)) == len(digests) and all(len(digest) == 16 for digest in digests)  # other batches
    timed = report["steps"][1:]
    expected = sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed)
    assert report["tokens_per_second"] == pytest.approx(expected)
    assert report["timed_steps"] == 2 and report["world_size"] == 1 and report["peak_gib_per_rank"] == [0.0]
    with pytest.raises(ValueError, match="warmup"):
        StepTimer(str(tmp_path / "x.json"), warmup=-1)


def test_stage_defaults_choose_trainable_parameters(dirs):
    distill = DistillLayerwise(model=dirs["student"], teacher=dirs["teacher"])
    distill.configure_model()
    trained = {n for n, p in distill.student.named_parameters() if p.requires_grad}
    assert trained and all(n.split(".")[2] in ("1", "2", "3") and ".self_attn." in n for n in trained)
    assert not any(p.requires_grad for p in distill.teacher.parameters())
    sft = SFT(model=dirs["student"])
    sft.configure_model()
    trained = {n for n, p in sft.student.named_parameters() if p.requires_grad}
    assert any(n.startswith("language_model.layers.0.self_attn.") for n in trained)  # the SWA layer trains too
    assert not any(".mlp." in n or n.startswith("visual.") for n in trained)
    custom = SFT(model=dirs["student"], trainable=["language_model.layers.*.mlp.*"])
    custom.configure_model()
    assert all(".mlp." in n for n, p in custom.student.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="matches no parameter"):
        SFT(model=dirs["student"], trainable=["mixers:M"]).configure_model()


def test_distillation_losses_vanish_for_a_copy_of_the_teacher(dirs):
    batch = next(iter(_loader(dirs)))
    layerwise = DistillLayerwise(model=dirs["teacher"], teacher=dirs["teacher"], trainable=["mixers:A"])
    layerwise.configure_model()
    loss, parts = layerwise.compute_loss(batch)
    assert loss.item() == 0 and len(parts) == 4
    with torch.no_grad():
        layerwise.student.language_model.layers[2].self_attn.o_proj.weight.mul_(1.5)
    loss, parts = layerwise.compute_loss(batch)
    assert loss.item() > 0 and parts["mse/layer2"] > 0 and parts["mse/layer1"] == 0
    end_to_end = DistillEndToEnd(
        model=dirs["teacher"], teacher=dirs["teacher"], trainable=["mixers:A"], ce_weight=0.5, hidden_weight=1.0
    )
    end_to_end.configure_model()
    loss, parts = end_to_end.compute_loss(batch)
    assert parts["kl"].abs().item() < 1e-6 and parts["hidden_mse"].item() == 0
    assert loss.item() == pytest.approx(0.5 * parts["ce"].item(), rel=1e-5)


def _loader(dirs):
    data = HybridDataModule(processor=dirs["student"], train=TRAIN, max_tokens=256, seed=0)
    return data._loader("train", shuffle=False)


@pytest.mark.parametrize("stage", ["layerwise", "end_to_end", "sft", "long_sft"])
def test_each_stage_trains_validates_and_exports(dirs, tmp_path, stage):
    export = tmp_path / "export"
    common = dict(model=dirs["student"], learning_rate=1e-3, generation_max_new_tokens=3, export_dir=str(export))
    module = {
        "layerwise": lambda: DistillLayerwise(teacher=dirs["teacher"], **common),
        "end_to_end": lambda: DistillEndToEnd(teacher=dirs["teacher"], ce_weight=0.1, **common),
        "sft": lambda: SFT(**common),
        "long_sft": lambda: LongSFT(lora_rank=4, lora_alpha=8, **common),
    }[stage]()
    before = {n: p.detach().clone() for n, p in HybridVLM.from_pretrained(dirs["student"]).named_parameters()}
    trainer = fit(module, dirs, tmp_path, max_steps=3, val=VAL)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "val/accuracy" in metrics and "val/token_accuracy" in metrics
    exported = HybridVLM.from_pretrained(export)
    changed = {n for n, p in exported.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "training changed nothing"
    if stage == "long_sft":  # adapters merged into the targeted projections, nothing else touched
        assert all(n.endswith(("_proj.weight",)) for n in changed)
        assert not any("lora" in n for n in exported.state_dict())
    else:
        trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
        assert changed <= trainable
    assert (export / "tokenizer_config.json").is_file()


def test_every_yaml_in_experiments_parses(capsys):
    """Stage configs through LightningCLI's --print_config; ablation studies through the study loader."""
    from hybridvl.lit.ablation import expand, load_study

    configs = sorted((ROOT / "experiments").rglob("*.yaml"))
    assert len(configs) >= 11
    for config in configs:
        if config.relative_to(ROOT / "experiments").parts[0] == "ablations":
            assert expand(load_study(config)) and expand(load_study(config, smoke=True)), config
            continue
        with pytest.raises(SystemExit) as exit_info:
            train_main(["fit", "--config", str(config), "--print_config"])
        assert exit_info.value.code in (0, None), config
        printed = capsys.readouterr().out
        assert "class_path: hybridvl.lit.modules." in printed and "max_tokens:" in printed, config


def test_quickstart_runs_the_whole_pipeline_at_reduced_size(tmp_path, capsys):
    from hybridvl.lit.commands.quickstart import main as quickstart

    assert quickstart(["--out", str(tmp_path), "--scale", "0.01", "--val-size", "1"]) == 0
    printed = capsys.readouterr().out
    assert "teacher (A x4)" in printed and "student (S,D,D,D)" in printed and "cache @ 64K tokens" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["teacher"]["accuracy"]) == {"ocr", "chart", "counting", "video_memory"}
    assert results["student"]["cache_bytes_1k"] == results["student"]["cache_bytes_64k"]
    assert results["teacher"]["cache_bytes_64k"] > 63 * results["teacher"]["cache_bytes_1k"]  # KV caches grow
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    for stage in ("teacher", "distill_layerwise", "distill_e2e", "sft"):
        assert list((tmp_path / "runs" / stage).rglob("events.out.tfevents.*")), stage
        assert list((tmp_path / "runs" / stage).rglob("config.yaml")), stage  # the resolved config of the run
    assert HybridVLM.from_pretrained(tmp_path / "student").kinds == ["S", "D", "D", "D"]


def test_pipeline_stage_is_skipped_when_done_with_the_same_arguments_and_weights(tmp_path, monkeypatch, caplog):
    """A finished stage is not trained again for the same arguments and input weights; new input weights or a
    missing export train it again."""
    from safetensors.torch import save_file

    from hybridvl.lit import pipeline

    runs = []

    def fake_train(argv):
        runs.append(argv)
        export = Path(argv[argv.index("--model.init_args.export_dir") + 1])
        export.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.ones(2)}, export / "model.safetensors")
        (tmp_path / "runs" / "sft").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(pipeline, "train", fake_train)
    source, export = tmp_path / "source", tmp_path / "student"
    source.mkdir()
    save_file({"w": torch.zeros(2)}, source / "model.safetensors")
    paths = {"model.init_args.model": source, "model.init_args.export_dir": export}
    with caplog.at_level(logging.INFO, logger="hybridvl.pipeline"):
        for _ in range(2):
            pipeline.run_stage("sft", tmp_path, 0.01, **paths)
    assert len(runs) == 1 and "skipped" in caplog.text
    save_file({"w": torch.full((2,), 3.0)}, source / "model.safetensors")
    pipeline.run_stage("sft", tmp_path, 0.01, **paths)
    assert len(runs) == 2
    (export / "model.safetensors").unlink()
    pipeline.run_stage("sft", tmp_path, 0.01, **paths)
    assert len(runs) == 3
    pipeline.run_stage("sft", tmp_path, 0.02, **paths)  # other arguments
    assert len(runs) == 4 and "--trainer.accelerator" not in runs[-1]  # the stage config's accelerator
    pipeline.run_stage("sft", tmp_path, 0.02, accelerator="auto", **paths)  # another accelerator trains again
    assert len(runs) == 5 and runs[-1][runs[-1].index("--trainer.accelerator") + 1] == "auto"


def test_conversion_is_reproducible_under_a_seed(tmp_path):
    """A stopped distillation cell resumes its stages only if re-converting the teacher gives the same student."""
    from hybridvl.lit import pipeline

    make_tiny_qwen2_5_vl(tmp_path / "qwen", seed=0, num_hidden_layers=4, vision_depth=1)
    digests = []
    for attempt in range(2):
        L.seed_everything(1, verbose=False)
        convert_directory(tmp_path / "qwen", tmp_path / f"student{attempt}", "S,D,D,D", init="mimic", sliding_window=8)
        digests.append(pipeline._weights_digests({"model": tmp_path / f"student{attempt}"}))
    assert digests[0] == digests[1] and digests[0]["model"]


def test_an_optimizer_and_schedule_given_in_yaml_are_the_ones_used(dirs, tmp_path):
    """A stage's optimizer and learning-rate schedule as LightningCLI class paths replace AdamW and the
    warm-up/cosine default; the matrices and the rest still form two groups, the rest without weight decay."""
    config = tmp_path / "stage.yaml"
    config.write_text(
        "trainer: {accelerator: cpu, devices: 1, max_steps: 2, enable_progress_bar: false,\n"
        f"          limit_val_batches: 0, default_root_dir: {tmp_path / 'run'}}}\n"
        "model:\n"
        "  class_path: hybridvl.lit.modules.SFT\n"
        f"  init_args:\n    model: {dirs['student']}\n    export_dir: {tmp_path / 'export'}\n"
        "    generation_max_new_tokens: 0\n"
        "    optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.9, weight_decay: 0.01}}\n"
        "    lr_scheduler: {class_path: torch.optim.lr_scheduler.StepLR, init_args: {step_size: 1, gamma: 0.5}}\n"
        f"data: {{processor: {dirs['student']}, max_tokens: 256, train: {json.dumps(TRAIN)}}}\n"
    )
    seen = {}

    def record(self, *args, **kwargs):
        real_fit(self, *args, **kwargs)
        seen["optimizer"], seen["scheduler"] = self.optimizers[0], self.lr_scheduler_configs[0].scheduler

    real_fit = L.Trainer.fit
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(L.Trainer, "fit", record)
        train_main(["fit", "--config", str(config)])
    optimizer, scheduler = seen["optimizer"], seen["scheduler"]
    assert type(optimizer) is torch.optim.SGD and type(scheduler) is torch.optim.lr_scheduler.StepLR
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)  # two steps of StepLR


def test_every_stage_logs_its_throughput_to_tensorboard(dirs, tmp_path):
    from hybridvl.lit.commands.train import THROUGHPUT_WINDOW
    from hybridvl.lit.evaluate import latest_run, read_scalars

    steps = THROUGHPUT_WINDOW + 2
    config = tmp_path / "stage.yaml"
    config.write_text(
        f"trainer: {{accelerator: cpu, devices: 1, max_steps: {steps}, log_every_n_steps: 1, "
        f"enable_progress_bar: false, limit_val_batches: 0, default_root_dir: {tmp_path / 'run'}}}\n"
        f"model: {{class_path: hybridvl.lit.modules.SFT, init_args: {{model: {dirs['student']}, "
        f"export_dir: {tmp_path / 'export'}, generation_max_new_tokens: 0}}}}\n"
        f"data: {{processor: {dirs['student']}, max_tokens: 256, train: {json.dumps(TRAIN)}}}\n"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_main(["fit", "--config", str(config)])
    assert not [w for w in caught if "flops_per_batch" in str(w.message)]  # no warning the project causes
    run = latest_run(tmp_path / "run")
    found, tokens_per_second = read_scalars(run, "train/device/items_per_sec")
    assert found and all(value > 0 for value in tokens_per_second)
    assert read_scalars(run, "train/device/samples_per_sec")[0]
    found, flops_per_second = read_scalars(run, "train/device/flops_per_sec")  # model FLOPs (lit/flops.py)
    assert found and all(value > 0 for value in flops_per_second)
    assert not read_scalars(run, "train/device/mfu")[0]  # the CPU has no known peak: no MFU rather than a guess


def test_compile_compiles_every_block_in_place_and_keeps_the_names(dirs):
    """``compile: true`` compiles each decoder layer and vision block in place: the state dict (and so checkpoints
    and exports) keeps its names. (Training through the compiled blocks is checked on a GPU.)"""
    plain = SFT(model=dirs["student"], generation_max_new_tokens=0)
    plain.configure_model()
    stage = SFT(model=dirs["student"], generation_max_new_tokens=0, compile=True)
    stage.configure_model()
    blocks = [*stage.student.language_model.layers, *stage.student.visual.blocks]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert plain.student.language_model.layers[0]._compiled_call_impl is None
    assert list(stage.student.state_dict()) == list(plain.student.state_dict())


@pytest.mark.gpu
def test_compiled_blocks_train_as_eager_ones_on_cuda(dirs):
    """Three bf16 SFT steps over packed batches of changing lengths through compiled blocks give the eager steps'
    losses to bf16 rounding."""
    assert compiled_block_losses(dirs, "cuda", True) == pytest.approx(
        compiled_block_losses(dirs, "cuda", False), rel=1e-2
    )


def compiled_block_losses(dirs, device: str, compiled: bool) -> list[float]:
    """Losses of three SFT steps (AdamW, bf16 autocast on CUDA) over packed random batches of changing lengths."""
    from hybridvl.lit.data.packing import pack
    from hybridvl.lit.data.types import Sample

    torch.manual_seed(0)
    stage = SFT(model=dirs["student"], generation_max_new_tokens=0, compile=compiled)
    stage.configure_model()
    stage.student.to(device)
    optimizer = torch.optim.AdamW([p for p in stage.student.parameters() if p.requires_grad], lr=1e-3)
    generator, losses = torch.Generator().manual_seed(1), []
    for length in (40, 56, 48):
        rows = torch.randint(10, 400, (2, length), generator=generator)
        batch = pack([Sample(input_ids=row, labels=row.clone(), prompt_length=4) for row in rows]).to(device)
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            loss, _ = stage.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses
