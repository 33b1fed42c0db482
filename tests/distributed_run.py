"""Train the SFT stage for a few steps on CPU with N processes (Lightning DDP over gloo); used by
tests/test_distributed.py. Rank 0 writes the trained weights and the logged losses."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from hybridvl.lit.datamodule import HybridDataModule
from hybridvl.lit.modules import SFT


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is not None:
            self.losses[trainer.global_step] = float(outputs["loss"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    losses = Losses()
    callbacks = [losses]
    if args.save_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=args.out / "ckpt",
                every_n_train_steps=args.save_every,
                save_top_k=-1,
                filename="step{step}",
                auto_insert_metric_name=False,
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        accumulate_grad_batches=args.accumulate,
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(args.save_every),
        callbacks=callbacks,
        default_root_dir=args.out,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    module = SFT(
        model=args.student,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        min_lr_ratio=1.0,
        generation_max_new_tokens=0,
        resume_other_run=args.ckpt is not None,  # a resumed run writes into another folder than the one it resumes
    )
    data = HybridDataModule(
        processor=args.student,
        train=[{"type": "synthetic", "size_per_task": 40, "split": "train"}],
        max_tokens=256,
        seed=0,
    )
    trainer.fit(module, data, ckpt_path=args.ckpt)
    if trainer.is_global_zero:
        torch.save({k: v for k, v in module.student.state_dict().items()}, args.out / "weights.pt")
        (args.out / "losses.json").write_text(json.dumps(losses.losses))


if __name__ == "__main__":
    main()
