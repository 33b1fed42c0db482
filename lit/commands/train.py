"""``hybridvl fit | validate | test | predict --config stage.yaml``: the training stages through LightningCLI.

    hybridvl fit --config experiments/tiny/sft.yaml
    hybridvl fit --config experiments/infinitevl/distill_layerwise.yaml --print_config
    hybridvl fit --config experiments/tiny/sft.yaml --ckpt_path runs/sft/checkpoints/last.ckpt   # resume

The model is any :class:`lit.modules.HybridStage` (``model.class_path: lit.modules.SFT`` ...), the data a
:class:`lit.datamodule.HybridDataModule`. Every run saves its resolved config, logs to TensorBoard, shows a
progress bar and checkpoints every ``checkpoint.every_n_train_steps`` steps (plus ``last.ckpt``), resumable
mid-epoch with ``--ckpt_path``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lit.datamodule import HybridDataModule
from lit.modules import HybridStage

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class HybridCLI(LightningCLI):
    """LightningCLI with a checkpoint callback that every run has and YAML can tune."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 500,
                "checkpoint.save_top_k": -1,
                "checkpoint.filename": "step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )


def main(argv: list[str]) -> int:
    """Run LightningCLI on ``argv`` (subcommand first)."""
    HybridCLI(
        HybridStage,
        HybridDataModule,
        subclass_mode_model=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        # the DataModule's batch sampler splits batches across ranks itself (length-grouped, resumable)
        trainer_defaults={
            "callbacks": [LearningRateMonitor(logging_interval="step")],
            "use_distributed_sampler": False,
        },
        parser_kwargs={"prog": "hybridvl", "default_env": False},
        auto_configure_optimizers=False,
    )
    return 0
