"""The DataModule every stage uses: conversation sources mixed by weight, encoded with the checkpoint's
processor, packed into token-bounded variable-length batches, resumable mid-epoch.

A source is a dict in YAML:

.. code-block:: yaml

    train:
      - {type: json, path: data/llava.jsonl, media_root: data/media}       # LLaVA / ShareGPT JSON or JSONL
      - {type: synthetic, tasks: [ocr, counting], size_per_task: 500, split: train}
      - {type: json, path: data/video.jsonl, media_root: data/media, weight: 4}

      - {type: my_lab.data.ChartQA, root: data/chartqa, split: train}  # your own Dataset class, by import path

``weight`` repeats a source (or, below 1, subsamples it deterministically) to set mixing ratios. ``type`` is
``json``, ``synthetic`` or the import path of your own ``torch.utils.data.Dataset`` class whose items are
:class:`~hybridvl.lit.data.types.Conversation` objects; the other keys are its constructor's arguments. The sources are
checked when the DataModule is built, before any model loads: a source must be a mapping with a known or
importable ``type``, only that type's keys (and ``weight``), a positive ``weight``, and for ``json`` an existing
``path`` file and ``media_root`` folder.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hybridvl.lit.data.conversations import ConversationDataset
from hybridvl.lit.data.encoding import count_tokens, encode
from hybridvl.lit.data.packing import LengthGroupedBatchSampler, pack
from hybridvl.lit.data.synthetic import SyntheticSuite
from hybridvl.lit.data.types import Conversation, Sample
from hybridvl.models.chat import load_processor

logger = logging.getLogger("hybridvl.data")

SOURCES: dict[str, Callable[..., Dataset]] = {"json": ConversationDataset, "synthetic": SyntheticSuite}


def check_source(spec: Any, where: str = "data source") -> None:
    """Raise ``ValueError`` naming ``where`` and the key at fault unless ``spec`` is a well-formed source dict (see
    the module docstring); the dataset's own arguments are checked when it is built."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a source must be a mapping such as {{type: json, path: ...}}, got {spec!r}")
    kind = spec.get("type")
    parameters = inspect.signature(source_class(kind, where)).parameters
    allowed = ["type", *parameters, "weight"]
    for key in spec:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{where}: unknown key {key!r} for a {kind!r} source{hint}; its keys are {', '.join(allowed)}"
            )
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty and name not in spec:
            raise ValueError(f"{where}: a {kind!r} source needs {name!r}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < math.inf:
        raise ValueError(f"{where}: weight must be a positive number, got {weight!r}")
    if kind == "json":
        _check_path(where, "path", spec["path"], Path.is_file, "file")
        _check_path(where, "media_root", spec["media_root"], Path.is_dir, "folder")


def _check_path(where: str, key: str, value: Any, exists: Callable[[Path], bool], noun: str) -> None:
    if not isinstance(value, str | os.PathLike) or not os.fspath(value) or "\0" in str(value):
        raise ValueError(f"{where}: {key} must be the path of a {noun}, got {value!r}")
    if not exists(Path(value)):
        raise ValueError(f"{where}: {key} {str(value)!r} is not an existing {noun} (relative to {Path.cwd()})")


def source_class(kind: Any, where: str = "data source") -> Callable[..., Dataset]:
    """The dataset class a source's ``type`` names: a built-in (:data:`SOURCES`) or ``module.Class``, imported."""
    if isinstance(kind, str) and kind in SOURCES:
        return SOURCES[kind]
    choices = f"choose one of {', '.join(SOURCES)}, or the import path of your own Dataset class (my_lab.data.MyData)"
    if not isinstance(kind, str) or "." not in kind.strip("."):
        raise ValueError(f"{where}: unknown source type {kind!r}; {choices}")
    module_name, _, class_name = kind.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except ImportError as error:
        raise ValueError(f"{where}: source type {kind!r}: cannot import {module_name!r} ({error})") from error
    except AttributeError:
        raise ValueError(f"{where}: source type {kind!r}: module {module_name!r} has no {class_name!r}") from None
    if not isinstance(found, type) or not issubclass(found, Dataset):
        raise ValueError(f"{where}: source type {kind!r} is not a torch.utils.data.Dataset class; {choices}")
    return found


def build_source(spec: dict[str, Any], where: str = "data source") -> Dataset:
    """A conversation dataset from a source dict (``type`` plus the dataset's arguments; ``weight`` excluded),
    checked first by :func:`check_source`; a dataset of your own must yield
    :class:`~hybridvl.lit.data.types.Conversation` items (its first is checked)."""
    check_source(spec, where)
    dataset = source_class(spec["type"], where)(**{k: v for k, v in spec.items() if k not in ("type", "weight")})
    if spec["type"] not in SOURCES and len(dataset) and not isinstance(first := dataset[0], Conversation):
        raise TypeError(
            f"{where}: a {spec['type']!r} source must yield hybridvl.lit.data.types.Conversation items, its first is a "
            f"{type(first).__name__}"
        )
    return dataset


class MixedConversations(Dataset):
    """Several conversation datasets, each repeated ``weight`` times (fractions subsample deterministically)."""

    def __init__(self, sources: list[Dataset], weights: list[float], seed: int = 0) -> None:
        self.sources = sources
        self.index: list[tuple[int, int]] = []
        for number, (source, weight) in enumerate(zip(sources, weights)):
            if weight <= 0:
                raise ValueError(f"source weights must be positive, got {weight}")
            whole, fraction = int(weight), weight - int(weight)
            items = [(number, i) for i in range(len(source))] * whole
            extra = list(range(len(source)))
            random.Random(seed + number).shuffle(extra)
            items += [(number, i) for i in sorted(extra[: math.floor(fraction * len(source))])]
            self.index += items

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> Conversation:
        source, item = self.index[index]
        return self.sources[source][item]

    def outline(self, index: int) -> Conversation:
        """The conversation with media described by size only where the source can (for counting tokens)."""
        source, item = self.index[index]
        dataset = self.sources[source]
        return dataset.outline(item) if hasattr(dataset, "outline") else dataset[item]


class EncodedConversations(Dataset):
    """Conversations encoded into :class:`Sample` objects on access (the processor loads once per worker)."""

    def __init__(self, conversations: MixedConversations, processor_dir: str, max_length: int | None, truncate: bool):
        self.conversations = conversations
        self.processor_dir = processor_dir
        self.max_length, self.truncate = max_length, truncate
        self._processor = None
        self._lengths: list[int] | None = None

    @property
    def processor(self) -> Any:
        if self._processor is None:
            self._processor = load_processor(self.processor_dir)
        return self._processor

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Sample:
        return encode(self.conversations[index], self.processor, self.max_length, self.truncate)

    def lengths(self) -> list[int]:
        """Token count of every sample, without encoding pixels (counted once, then kept)."""
        if self._lengths is None:
            counts = [count_tokens(self.conversations.outline(i), self.processor) for i in range(len(self))]
            self._lengths = [min(c, self.max_length) if self.max_length and self.truncate else c for c in counts]
        return self._lengths


class CachedSamples(Dataset):
    """Encoded samples kept in a folder of shard files: encoded once (under a lock, so processes sharing the folder
    encode it once), then read back memory-mapped, so runs and processes share the pages instead of encoding
    again."""

    SHARD_SIZE = 256
    """Samples per shard file: the unit of work of each encoding process."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    @classmethod
    def load_or_encode(cls, dataset: EncodedConversations, path: Path, workers: int = 0) -> CachedSamples:
        """The samples of ``dataset`` from the folder ``path``, encoding them first (``workers`` processes side by
        side, or this one with 0) if the folder is missing."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_name(path.name + ".lock")):
            if not path.is_dir():
                partial = path.with_name(path.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
                partial.mkdir()
                shards = _ShardEncoder(dataset, partial, cls.SHARD_SIZE)
                with tqdm(total=len(dataset), desc=f"encoding {path.name}") as progress:
                    for count in DataLoader(shards, batch_size=None, num_workers=workers):
                        progress.update(count)
                (partial / "manifest.json").write_text(json.dumps({"samples": len(dataset), "shards": len(shards)}))
                partial.replace(path)
                logger.info("encoded %d samples into %s", len(dataset), path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            files = sorted(path.glob("shard-*.pt"))
            samples = [sample for file in files for sample in torch.load(file, mmap=True, weights_only=False)]
            if (len(files), len(samples)) != (manifest["shards"], manifest["samples"]):
                raise ValueError(
                    f"{len(samples)} samples in {len(files)} shards, where {manifest['samples']} samples in "
                    f"{manifest['shards']} shards were written"
                )
        except Exception as error:  # a folder this class wrote, damaged since
            raise RuntimeError(f"the data cache {path} cannot be read ({error}); delete it to encode again") from error
        return cls(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def lengths(self) -> list[int]:
        return [len(sample) for sample in self.samples]


class _ShardEncoder(Dataset):
    """Item ``k`` encodes the ``k``-th run of ``shard_size`` samples of ``dataset`` into ``shard-<k>.pt`` in
    ``folder`` and returns how many it wrote: loader workers encode shards side by side, and only counts travel
    back between processes."""

    def __init__(self, dataset: EncodedConversations, folder: Path, shard_size: int) -> None:
        self.dataset, self.folder, self.shard_size = dataset, folder, shard_size

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.shard_size)

    def __getitem__(self, shard: int) -> int:
        indices = range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.dataset)))
        torch.save([self.dataset[i] for i in indices], self.folder / f"shard-{shard:06d}.pt")
        return len(indices)


def batches_trained(trainer: L.Trainer) -> int:
    """Batches of the current epoch this rank has trained on (the position a :class:`ResumableDataLoader` saves)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`LengthGroupedBatchSampler` whose position survives checkpoints.

    Lightning saves ``state_dict()`` with each checkpoint and loads it before the next iteration. The position
    saved is the number of batches training has consumed (``consumed()``), not the number the loader handed
    out, since the trainer fetches ahead of the step being trained. It is stored for all ranks together
    (the sampler deals batches round-robin), so a run saved on one number of devices resumes on another.
    """

    def __init__(self, *args: Any, consumed: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumed = consumed
        # (epoch, global batches, this rank's consumed count) when a state was loaded
        self._resumed_at = (-1, 0, 0)

    def state_dict(self) -> dict[str, int]:
        epoch = self.batch_sampler.epoch
        resumed_epoch, global_start, local_start = self._resumed_at
        if epoch != resumed_epoch:
            global_start, local_start = 0, 0
        since = self.consumed() - local_start
        return {"epoch": epoch, "global_batches": global_start + since * self.batch_sampler.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        replicas = self.batch_sampler.num_replicas
        if state["global_batches"] % replicas:
            raise ValueError(
                f"the checkpoint stopped after {state['global_batches']} batches, which {replicas} devices cannot "
                "share evenly; resume on a number of devices that divides it"
            )
        self.batch_sampler.load_state_dict(
            {"epoch": state["epoch"], "batches_yielded": state["global_batches"] // replicas}
        )
        self._resumed_at = (state["epoch"], state["global_batches"], self.consumed())


class HybridDataModule(L.LightningDataModule):
    """Training, validation and test data for any stage.

    Batches are split across devices by the DataModule's own sampler, so the Trainer runs with
    ``use_distributed_sampler=False`` (``hybridvl fit`` sets it).

    Args:
        processor: directory with the tokenizer, chat template and image/video processors (a model directory).
        train, val, test: lists of source dicts (see the module docstring), checked here.
        max_tokens: tokens per packed batch (per device).
        max_length: longest sample; longer ones raise, or with ``truncate`` lose the end of their last reply.
        truncate: shorten over-long samples instead of raising.
        num_workers: processes that encode samples: DataLoader workers beside training, or with ``cache_dir``
            the processes that encode the cache. Batches of cached samples are collated in the training process,
            in milliseconds, where a worker would hand each over tensor by tensor through shared memory at many
            times the cost (``python -m benchmarks.data_loading`` times both).
        seed: shuffling and mixing seed.
        shuffle: shuffle the training samples each epoch. Without it batches follow the dataset order, which
            for the synthetic suite is already random and balanced across tasks and answers.
        length_grouping: samples are sorted by length within groups of this many batches' worth of tokens
            (fuller batches, but batches of similar samples); 0 packs samples in order, each batch a run of
            neighbours.
        cache_dir: encode each split once into a folder of shard files here and memory-map them afterwards
            (for data read over many epochs or by many runs, such as the synthetic suite in ablations). The folder
            is named by a fingerprint of the split's sources, the processor directory, the length settings and the
            seed; it does not cover the contents of the files a JSON source points to: clear ``cache_dir`` after
            editing them.
    """

    def __init__(
        self,
        processor: str,
        train: list[dict[str, Any]] | None = None,
        val: list[dict[str, Any]] | None = None,
        test: list[dict[str, Any]] | None = None,
        max_tokens: int = 8192,
        max_length: int | None = None,
        truncate: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        length_grouping: int = 50,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        counts = {"max_tokens": (max_tokens, 1), "num_workers": (num_workers, 0)}
        counts["length_grouping"] = (length_grouping, 0)
        if max_length is not None:
            counts["max_length"] = (max_length, 1)
        for name, (value, minimum) in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"data: {name} must be an integer >= {minimum}, got {value!r}")
        for split, specs in (("train", train), ("val", val), ("test", test)):
            if specs is not None and not isinstance(specs, list):
                raise ValueError(f"data.{split} must be a list of sources, got {specs!r}")
            for index, spec in enumerate(specs or []):
                check_source(spec, f"data.{split}[{index}]")
        self.save_hyperparameters()
        self.datasets: dict[str, EncodedConversations | CachedSamples] = {}

    def _dataset(self, split: str) -> EncodedConversations | CachedSamples:
        if split not in self.datasets:
            specs = getattr(self.hparams, split)
            if not specs:
                raise ValueError(f"the data config has no {split!r} sources")
            sources = [build_source(spec, f"data.{split}[{index}]") for index, spec in enumerate(specs)]
            mixed = MixedConversations(sources, [float(spec.get("weight", 1.0)) for spec in specs], self.hparams.seed)
            encoded = EncodedConversations(
                mixed, self.hparams.processor, self.hparams.max_length, self.hparams.truncate
            )
            logger.info("%s data: %d conversations from %d sources", split, len(mixed), len(sources))
            if self.hparams.cache_dir:
                path = Path(self.hparams.cache_dir) / self._cache_name(split)
                encoded = CachedSamples.load_or_encode(encoded, path, self.hparams.num_workers)
            self.datasets[split] = encoded
        return self.datasets[split]

    def _cache_name(self, split: str) -> str:
        keys = ("processor", "max_length", "truncate", "seed")
        settings = {"sources": getattr(self.hparams, split), **{key: self.hparams[key] for key in keys}}
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"{split}-{digest}"

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self._dataset(split)
        trainer = self.trainer
        sampler = LengthGroupedBatchSampler(
            dataset.lengths(),
            self.hparams.max_tokens,
            shuffle=shuffle,
            seed=self.hparams.seed,
            mega_batch_factor=self.hparams.length_grouping,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
        )
        workers = 0 if isinstance(dataset, CachedSamples) else self.hparams.num_workers  # see num_workers
        options = dict(batch_sampler=sampler, collate_fn=pack, num_workers=workers, persistent_workers=workers > 0)
        if split == "train":
            return ResumableDataLoader(dataset, consumed=self._trained_batches, **options)
        return DataLoader(dataset, **options)

    def _trained_batches(self) -> int:
        return batches_trained(self.trainer)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        """The validation batches; none in a fit without ``val`` sources, which ``hybridvl validate`` needs."""
        if self.hparams.val:
            return self._loader("val", shuffle=False)
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.VALIDATING:
            raise ValueError("data: validating needs sources under data.val (the data config lists none); add them")
        return []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
