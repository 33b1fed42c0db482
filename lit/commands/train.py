"""``hybridvl fit | validate --config stage.yaml``: the training stages through LightningCLI.

    hybridvl fit --config experiments/tiny/sft.yaml
    hybridvl fit --config experiments/infinitevl/distill_layerwise.yaml --print_config
    hybridvl fit --config experiments/tiny/sft.yaml --ckpt_path runs/sft/checkpoints/last.ckpt   # resume

The model is any :class:`hybridvl.lit.modules.HybridStage` (``model.class_path: hybridvl.lit.modules.SFT`` ...), the
data a :class:`hybridvl.lit.datamodule.HybridDataModule`. Every run saves its resolved config, logs to TensorBoard,
shows a progress bar and checkpoints every ``checkpoint.every_n_train_steps`` steps (plus ``last.ckpt``, each written
atomically), resumable mid-epoch with ``--ckpt_path``.

``fit`` succeeds only when the stage finished and exported its student: a run stopped by SIGTERM (or one that
ended without its export) raises :class:`StageIncompleteError`, so the command exits non-zero and a chain
``hybridvl fit a && hybridvl fit b`` stops. Resuming it with ``--ckpt_path`` finishes it and exports, also from a
checkpoint of the last step. A ``--ckpt_path`` that another run wrote is refused
(:class:`hybridvl.lit.modules.ForeignCheckpointError`) unless ``--model.init_args.resume_other_run true``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from hybridvl.lit.cli import is_user_error
from hybridvl.lit.data.types import PackedBatch
from hybridvl.lit.datamodule import HybridDataModule
from hybridvl.lit.modules import HybridStage

SUBCOMMANDS = ("fit", "validate", "test", "predict")
logger = logging.getLogger("hybridvl.train")
UNDEFINED = {
    "test": "to score a stage's model, list the sources under data.val and run hybridvl validate --config stage.yaml",
    "predict": "to answer prompts with a stage's export, run hybridvl generate --model <its export_dir>",
}
"""LightningCLI subcommands that no stage implements, and what to run instead."""


class StageIncompleteError(RuntimeError):
    """A ``fit`` that ended before the stage finished and exported its student."""


class StageConfigError(ValueError):
    """A stage's command line or YAML that LightningCLI cannot parse (an unknown key, a value of the wrong type)."""


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

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        """Lightning's, without the learning-rate monitor when ``trainer.logger`` is false (it refuses to run without
        a logger); a log line says so."""
        if config.get("logger") is False:
            logger.info("trainer.logger is false: learning rates and throughput are not logged")
            defaults = [c for c in self.trainer_defaults["callbacks"] if not isinstance(c, LearningRateMonitor)]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        """Lightning's, re-raising the error a stage raised on a bad option (:func:`hybridvl.lit.cli.is_user_error`):
        jsonargparse wraps it in a ``ValueError`` of its own, which would read as a bug."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = error.__cause__
            while cause is not None and not is_user_error(cause):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None

    def _parse_ckpt_path(self) -> None:
        """Keep the model the config names. LightningCLI would replace its arguments by the hyperparameters stored
        in ``--ckpt_path``, so that a checkpoint of another run silently trained that run's model and exported it
        into that run's folder; instead the stage checks that the checkpoint is this run's
        (:meth:`hybridvl.lit.modules.HybridStage.on_load_checkpoint`)."""

    def fit(self, model: HybridStage, **kwargs: Any) -> None:
        """``Trainer.fit``, then the check that the stage finished and exported.

        Raises:
            StageIncompleteError: SIGTERM stopped the fit (Lightning ends it with an exception that would exit
                with status 0), or it ended without an export; the message says how to resume.
        """
        try:
            self.trainer.fit(model, **kwargs)
        except SIGTERMException:
            raise StageIncompleteError(
                f"the stage was stopped by SIGTERM at step {self.trainer.global_step}, before it finished and "
                f"exported its student; {self._resume_hint()}"
            ) from None
        if model.exported_to is None:
            raise StageIncompleteError(f"the stage ended without exporting its student; {self._resume_hint()}")

    def _resume_hint(self) -> str:
        last = self.trainer.checkpoint_callback.last_model_path if self.trainer.checkpoint_callback else ""
        if last:
            return f"resume it with --ckpt_path {last}"
        return "no checkpoint was written yet: run it again"


THROUGHPUT_WINDOW = 10
"""Logged steps the throughput is averaged over."""


def batch_samples(batch: PackedBatch) -> int:
    return len(batch.samples)


def batch_tokens(batch: PackedBatch) -> int:
    return batch.num_tokens


def throughput_monitor() -> ThroughputMonitor:
    """Lightning's throughput logging for every stage: batches, samples, tokens ("items") and model FLOPs
    (:meth:`hybridvl.lit.modules.HybridStage.batch_flops`) per second, and MFU on GPUs whose bf16/fp16/tf32 peak
    Lightning knows (H100, H200, A100, ...), to the run's logger (TensorBoard) every ``log_every_n_steps``,
    averaged over :data:`THROUGHPUT_WINDOW` of them."""
    return ThroughputMonitor(batch_samples, batch_tokens, window_size=THROUGHPUT_WINDOW)


def main(argv: list[str]) -> int:
    """Run LightningCLI on ``argv`` (subcommand first).

    Raises:
        StageConfigError: ``test`` or ``predict``, which no stage defines a step for; or the arguments or the YAML
            do not parse (raised, not printed with the whole usage, so that the command reports it in one line).
    """
    if argv and argv[0] in UNDEFINED:
        raise StageConfigError(f"the stages define no {argv[0]} step; {UNDEFINED[argv[0]]}")
    # hybridvl hands LightningCLI the command line it was given: its warning against doing so is noise here
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    parsing = {"prog": "hybridvl", "default_env": False, "exit_on_error": False}
    try:
        HybridCLI(
            HybridStage,
            HybridDataModule,
            subclass_mode_model=True,
            args=argv,
            save_config_kwargs={"overwrite": True},
            # the DataModule's batch sampler splits batches across ranks itself (length-grouped, resumable)
            trainer_defaults={
                "callbacks": [LearningRateMonitor(logging_interval="step"), throughput_monitor()],
                "use_distributed_sampler": False,
            },
            parser_kwargs={**parsing, **{name: {"exit_on_error": False} for name in SUBCOMMANDS}},
            auto_configure_optimizers=False,
        )
    except ArgumentError as error:
        raise StageConfigError(f"{error} (hybridvl {argv[0] if argv else 'fit'} --help lists the options)") from None
    return 0
