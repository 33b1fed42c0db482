"""Nothing lost, every bad input named: outputs never replace inputs, writes survive kills and full disks, stages
report the truth in their exit status, and loads check what they load.

Tiny models on CPU; a child process only where a real kill is needed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hybridvl.lit.callbacks import AtomicCheckpointIO
from hybridvl.lit.cli import main as cli_main
from hybridvl.lit.commands.train import StageIncompleteError
from hybridvl.lit.commands.train import main as train_main
from hybridvl.lit.modules import SFT, ForeignCheckpointError
from hybridvl.models.checkpoint import CheckpointMismatchError, CheckpointReadError, NonFiniteWeightsError
from hybridvl.models.config import ConfigError, HybridConfig
from hybridvl.models.convert import convert_checkpoint, convert_directory, convert_model
from hybridvl.models.files import EXPORT_RECORD, TMP_MARK, OutputExistsError, OutputIsInputError, WriteError
from hybridvl.models.hybrid import HybridVLM
from hybridvl.models.positions import TRANSFORMERS4, TRANSFORMERS5, sequence_positions
from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

ROOT = Path(__file__).resolve().parents[1]


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if TMP_MARK in path.name]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    qwen = make_tiny_qwen2_5_vl(root / "qwen", vision_depth=1)
    convert_directory(qwen, root / "student", "S,D,D,D")
    return {"root": root, "qwen": qwen, "student": root / "student"}


def copy_of(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


# --- 1. no output over an input ------------------------------------------------------------------------------


def test_convert_onto_its_teacher_is_refused_and_leaves_it_unchanged(dirs, tmp_path, capsys):
    teacher = copy_of(dirs["qwen"], tmp_path)
    before = digests(teacher)
    for extra in ([], ["--overwrite"]):
        argv = ["convert", "--teacher", str(teacher), "--layout", "S,D,D,D", "--out", str(teacher), *extra]
        assert cli_main(argv) == 2
        error = capsys.readouterr().err
        assert f"hybridvl convert: error: the output folder {teacher} is the input {teacher}" in error
    with pytest.raises(OutputIsInputError, match="writing there would replace what is being read"):
        convert_directory(teacher, teacher / ".." / teacher.name, "S,D,D,D", overwrite=True)
    assert digests(teacher) == before


def test_outputs_refuse_folders_with_files_and_overwrite_removes_stale_shards(dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    shards = {"model-00001-of-00002.safetensors": torch.ones(3), "model-00002-of-00002.safetensors": torch.ones(4)}
    for name, tensor in shards.items():
        save_file({"stale": tensor}, out / name)
    index = {"weight_map": {f"w{i}": name for i, name in enumerate(shards)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    before = digests(out)
    with pytest.raises(OutputExistsError, match=rf"the output folder {out} is not empty .*pass --overwrite"):
        convert_directory(dirs["qwen"], out, "S,D,D,D")
    with pytest.raises(OutputExistsError, match="not empty"):
        HybridVLM.from_pretrained(dirs["student"]).save_pretrained(out)
    with pytest.raises(OutputExistsError, match="not empty"):
        make_tiny_qwen2_5_vl(out)
    assert cli_main(["tiny-qwen", "--out", str(out)]) == 2
    assert f"hybridvl tiny-qwen: error: the output folder {out} is not empty" in capsys.readouterr().err
    assert digests(out) == before

    convert_directory(dirs["qwen"], out, "S,D,D,D", overwrite=True)
    assert not (out / "model.safetensors.index.json").exists() and not any(out.glob("model-*"))
    assert (out / "notes.txt").read_text() == "mine"  # not a model file: kept
    expected, _ = convert_checkpoint(dirs["qwen"], "S,D,D,D")
    loaded = HybridVLM.from_pretrained(out)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    make_tiny_qwen2_5_vl(out, vision_depth=1, overwrite=True)
    assert not (out / "model.safetensors.index.json").exists() and not leftovers(out)


# --- writes that fail part-way ---------------------------------------------------------------------------------


def no_space(data, path, **kwargs) -> None:
    """Stands in for ``save_file(tensors, path)`` and ``torch.save(obj, path)``: writes a little, then fails as a
    full disk does."""
    Path(path).write_bytes(b"\0" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_names_the_file_and_keeps_the_previous_files(dirs, tmp_path, monkeypatch):
    model = HybridVLM.from_pretrained(dirs["student"])
    saved = model.save_pretrained(tmp_path / "model")
    before = digests(saved)
    monkeypatch.setattr("hybridvl.models.checkpoint.save_file", no_space)
    with pytest.raises(WriteError, match=rf"^could not write {saved / 'model.safetensors'}: No space left") as info:
        model.save_pretrained(saved, overwrite=True)
    assert info.value.errno == errno.ENOSPC
    assert digests(saved) == before and not leftovers(saved)

    io = AtomicCheckpointIO()
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1}, checkpoint)
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(WriteError, match=rf"{checkpoint}: No space left on device; the previous file is unchanged"):
        io.save_checkpoint({"step": 2}, checkpoint)
    monkeypatch.undo()
    assert io.load_checkpoint(checkpoint) == {"step": 1} and not leftovers(checkpoint.parent)


KILLED_WRITER = """
import sys, time, torch
from hybridvl.lit.callbacks import AtomicCheckpointIO

class Stall:  # pickled half-way through the checkpoint: the write is under way until the parent kills us
    def __reduce__(self):
        open(sys.argv[2], "w").close()
        time.sleep(120)
        return (int, ())

AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.zeros(1000), "stall": Stall()}, sys.argv[1])
"""


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    """``kill -9`` while the next ``last.ckpt`` is written, ``$TMPDIR`` on another folder: the previous one stays
    whole and loads; nothing was staged in ``$TMPDIR``; the next write clears the leftover."""
    checkpoint, started, elsewhere = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "started", tmp_path / "tmp"
    elsewhere.mkdir()
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, checkpoint)
    before = digests(checkpoint.parent)
    env = {**os.environ, "TMPDIR": str(elsewhere), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(checkpoint), str(started)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert child.poll() is None, "the writer ended before it was killed"
            assert time.monotonic() < deadline, "the writer never started its write"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert {k: v for k, v in digests(checkpoint.parent).items() if TMP_MARK not in k} == before
    assert io.load_checkpoint(checkpoint)["step"] == 1
    assert not any(elsewhere.iterdir())
    assert [p.name for p in leftovers(checkpoint.parent)] and not list(checkpoint.parent.glob(".*.ckpt"))
    io.save_checkpoint({"step": 3}, checkpoint)
    assert io.load_checkpoint(checkpoint) == {"step": 3} and not leftovers(checkpoint.parent)


def test_a_damaged_checkpoint_is_named(tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.ones(10_000)}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:4096])
    with pytest.raises(CheckpointReadError, match=rf"cannot read the checkpoint {checkpoint} .*truncated"):
        AtomicCheckpointIO().load_checkpoint(checkpoint)


# --- 2. exit codes tell the truth --------------------------------------------------------------------------------


def stage_config(dirs, root: Path, max_steps: int = 3) -> list[str]:
    """``hybridvl fit`` arguments for a few SFT steps of the tiny student, checkpointing every step, in ``root``."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "default_root_dir": str(root),
        },
        "model": {
            "class_path": "hybridvl.lit.modules.SFT",
            "init_args": {
                "model": str(dirs["student"]),
                "generation_max_new_tokens": 0,
                "export_dir": str(root / "export"),
            },
        },
        "data": {
            "processor": str(dirs["student"]),
            "max_tokens": 256,
            "length_grouping": 0,
            "train": [{"type": "synthetic", "tasks": ["ocr"], "size_per_task": 8, "split": "train", "image_size": 56}],
        },
        "checkpoint": {"every_n_train_steps": 1},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "stage.yaml").write_text(json.dumps(config))
    return ["fit", "--config", str(root / "stage.yaml")]


def last_checkpoint(root: Path) -> Path:
    """The run's ``last.ckpt`` (under its logger's version folder)."""
    (path,) = root.rglob("last.ckpt")
    return path


def export_record(export: Path) -> dict:
    return json.loads((export / EXPORT_RECORD).read_text())


def test_sigterm_during_fit_fails_the_stage_and_a_resume_finishes_and_exports(dirs, tmp_path, monkeypatch):
    root = tmp_path / "run"
    argv = stage_config(dirs, root)
    training_step = SFT.training_step

    def terminated_at_step_one(self, batch, batch_idx):
        if self.trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: the loop stops after this step
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(SFT, "training_step", terminated_at_step_one)
    with pytest.raises(StageIncompleteError, match=r"stopped by SIGTERM at step 2, before it finished") as info:
        train_main(argv)
    last = last_checkpoint(root)
    assert f"resume it with --ckpt_path {last}" in str(info.value)
    assert not (root / "export").exists()
    monkeypatch.undo()
    train_main([*argv, "--ckpt_path", str(last)])
    assert export_record(root / "export")["complete"]
    assert HybridVLM.from_pretrained(root / "export").kinds == ["S", "D", "D", "D"]


def test_sigterm_during_the_export_fails_the_stage_and_a_resume_redoes_it(dirs, tmp_path, monkeypatch):
    root = tmp_path / "run"
    argv = stage_config(dirs, root)

    def terminated(source, out):  # the weights are written, the processor files not yet
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    monkeypatch.setattr("hybridvl.lit.modules.copy_processor_files", terminated)
    with pytest.raises(StageIncompleteError, match="stopped by SIGTERM at step 3"):
        train_main(argv)
    export = root / "export"
    assert not export_record(export)["complete"] and not (export / "tokenizer_config.json").exists()
    assert not leftovers(export)
    monkeypatch.undo()
    train_main([*argv, "--ckpt_path", str(last_checkpoint(root))])  # the last step's checkpoint
    assert export_record(export)["complete"] and (export / "tokenizer_config.json").is_file()
    HybridVLM.from_pretrained(export)


def test_sigterm_from_outside_exits_non_zero(dirs, tmp_path):
    """The command run as a user runs it, terminated by another process while it trains."""
    root = tmp_path / "run"
    argv = stage_config(dirs, root, max_steps=10_000)
    command = [sys.executable, "-m", "hybridvl.lit.cli", *argv]
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(root.rglob("last.ckpt")):
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 2, stderr[-3000:]
    assert "hybridvl fit: error: the stage was stopped by SIGTERM" in stderr and not (root / "export").exists()


def test_resuming_another_runs_checkpoint_is_refused_naming_both(dirs, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train_main(stage_config(dirs, first, max_steps=2))
    theirs = last_checkpoint(first)
    argv = [*stage_config(dirs, second, max_steps=2), "--ckpt_path", str(theirs)]
    with pytest.raises(ForeignCheckpointError, match="written by another run") as info:
        train_main(argv)
    message = str(info.value)
    assert str(theirs) in message and f"root folder {first}" in message and f"root folder {second}" in message
    assert "resume_other_run" in message and not (second / "export").exists()
    train_main([*argv, "--model.init_args.resume_other_run", "true"])  # asked for explicitly
    assert export_record(second / "export")["complete"]


def test_an_export_folder_another_run_wrote_is_refused(dirs, tmp_path):
    run = tmp_path / "run"
    argv = stage_config(dirs, run, max_steps=1)
    (run / "export").mkdir(parents=True)
    (run / "export" / "model.safetensors").write_bytes(b"someone else's")
    with pytest.raises(OutputExistsError, match=r"the export folder .* is not empty .*overwrite: true"):
        train_main(argv)
    assert (run / "export" / "model.safetensors").read_bytes() == b"someone else's"
    with pytest.raises(OutputIsInputError, match="is the input"):
        train_main([*argv, "--model.init_args.export_dir", str(dirs["student"])])


# --- 3. loads check what they load -------------------------------------------------------------------------------


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def test_a_config_without_layout_is_refused(dirs, tmp_path):
    model = copy_of(dirs["student"], tmp_path)
    edit_config(model, layout=None)
    with pytest.raises(ConfigError, match=r"config.json lacks the required field\(s\) layout"):
        HybridVLM.from_pretrained(model)


def test_a_layout_other_than_the_weights_metadata_is_refused(dirs, tmp_path):
    """S and A layers hold the same tensors: only the layout recorded with the weights tells them apart."""
    model = copy_of(dirs["student"], tmp_path)
    edit_config(model, layout="A,D,D,D")
    with pytest.raises(CheckpointMismatchError, match=r"gives the layout 'A,D,D,D', but .* layout 'S,D,D,D'"):
        HybridVLM.from_pretrained(model)


def rewrite_weights(directory: Path, name: str, change) -> None:
    """Replace tensor ``name`` of ``directory``'s weights by ``change(tensor)``, keeping the metadata."""
    path = directory / "model.safetensors"
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    tensors[name] = change(tensors[name])
    save_file(tensors, path, metadata=metadata)


def test_integer_weights_are_refused_naming_the_tensor(dirs, tmp_path):
    model = copy_of(dirs["student"], tmp_path)
    name = "language_model.layers.1.self_attn.q_proj.weight"
    rewrite_weights(model, name, lambda tensor: (tensor * 100).to(torch.int32))
    with pytest.raises(CheckpointMismatchError, match=rf"dtype mismatch .*\n    {name}: checkpoint torch.int32"):
        HybridVLM.from_pretrained(model)


def test_nonfinite_weights_are_refused_naming_the_tensor_unless_allowed(dirs, tmp_path):
    model = copy_of(dirs["student"], tmp_path)
    name = "language_model.layers.2.mlp.up_proj.weight"

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor[0, 0], tensor[1, 1] = float("nan"), float("inf")
        return tensor

    rewrite_weights(model, name, poison)
    with pytest.raises(NonFiniteWeightsError, match=rf"NaN or infinite values(?s:.*)\n    {name}: 2 of \d+ values"):
        HybridVLM.from_pretrained(model)
    loaded = HybridVLM.from_pretrained(model, allow_nonfinite=True)
    assert loaded.state_dict()[name].isnan().sum() == 1


# --- the video position rule of imported InfiniteVL checkpoints ------------------------------------------------

VIDEO = 9  # token id of the video placeholder in the position tests


def video_prompt(grid_t: int) -> torch.Tensor:
    """``text, <vision_start>, 4 * grid_t video tokens (a 2 x 2 merged grid per temporal patch), <vision_end>,
    text``: tokens 1, 2, video, 3, 4."""
    return torch.tensor([1, 2, *[VIDEO] * (4 * grid_t), 3, 4])


def reference_positions(rule: str, seconds: float, grid_t: int = 4, tokens_per_second: int = 2) -> list[list[int]]:
    """The positions each rule defines for :func:`video_prompt`, written out from the definitions: two text
    tokens at 0 and 1; the video from start 2, temporal patch ``i`` at ``2 + time(i)`` with
    ``time(i) = int(i * tokens_per_second * seconds)`` (transformers 5.x) or
    ``i * int(seconds) * tokens_per_second`` (transformers 4.x), rows and columns at ``2 + (0, 1)``; the text after
    the video at ``start + max(rows, columns) = 4`` (5.x) or at the video's largest position plus one (4.x)."""
    start, rows = 2, 2
    if rule == TRANSFORMERS5:
        times = [int(i * tokens_per_second * seconds) for i in range(grid_t)]
    else:
        times = [i * int(seconds) * tokens_per_second for i in range(grid_t)]
    video = [(start + time, start + row, start + column) for time in times for row in range(2) for column in range(2)]
    after = start + rows if rule == TRANSFORMERS5 else max(max(p) for p in video) + 1
    tokens = [(0, 0, 0), (1, 1, 1), *video, (after,) * 3, (after + 1,) * 3]
    return [list(axis) for axis in zip(*tokens)]


@pytest.mark.parametrize("rule", [TRANSFORMERS5, TRANSFORMERS4])
@pytest.mark.parametrize("fps", [2, 4])
def test_video_positions_follow_the_rule(rule, fps):
    seconds = 2 / fps  # a temporal patch holds two frames
    positions, next_position = sequence_positions(
        video_prompt(4),
        image_token_id=8,
        video_token_id=VIDEO,
        merge_size=2,
        tokens_per_second=2,
        image_grids=iter([]),
        video_grids=iter([(torch.tensor([4, 4, 4]), torch.tensor(seconds))]),
        video_position_rule=rule,
    )
    expected = reference_positions(rule, seconds)
    assert positions.tolist() == expected
    assert next_position == max(max(axis) for axis in expected) + 1


def tiny_vlm(layout: str = "S,D") -> HybridVLM:
    torch.manual_seed(0)
    return HybridVLM(
        HybridConfig(
            layout=layout,
            vocab_size=64,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            mrope_section=[2, 3, 3],
            sliding_window=64,
            mixer_options={"D": {"num_heads": 2, "head_dim": 16, "expand_v": 2.0}},
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "num_heads": 1,
                "intermediate_size": 16,
                "out_hidden_size": 32,
                "spatial_merge_size": 2,
                "tokens_per_second": 2,
            },
            image_token_id=8,
            video_token_id=VIDEO,
            vision_start_token_id=10,
            vision_end_token_id=11,
            bos_token_id=None,
            eos_token_id=1,
            pad_token_id=0,
        )
    )


def write_infinitevl(model: HybridVLM, directory: Path) -> None:
    """``model`` in InfiniteVL's public format: Qwen2.5-VL's legacy tensor names and InfiniteVL's config."""
    config = model.config
    directory.mkdir()
    weights = {
        ("model." + name[len("language_model.") :] if name.startswith("language_model.") else name): tensor
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    gdn = config.mixer_options["D"]
    fields = {
        "model_type": "infinite_vl",
        **{key: getattr(config, key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers")},
        **{key: getattr(config, key) for key in ("num_attention_heads", "num_key_value_heads", "vocab_size")},
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "default", "mrope_section": config.mrope_section},
        "rope_theta": config.rope_theta,
        "sliding_window": config.sliding_window,
        "layer_types": ["sliding_attention", "linear_attention"],
        "num_linear_heads": gdn["num_heads"],
        "num_linear_key_value_heads": gdn["num_heads"],
        "linear_head_dim": gdn["head_dim"],
        "expand_v": gdn["expand_v"],
        "vision_config": {**config.vision_config, "model_type": "infinite_vl"},
        **{f"{kind}_token_id": getattr(config, f"{kind}_token_id") for kind in ("image", "video", "pad", "eos")},
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
    }
    (directory / "config.json").write_text(json.dumps(fields))


def model_positions(model: HybridVLM, seconds: float) -> list[list[int]]:
    ids = video_prompt(4)
    positions, _ = model.positions(
        ids[None],
        torch.tensor([0, len(ids)], dtype=torch.int32),
        torch.zeros(1, dtype=torch.long),
        video_grid_thw=torch.tensor([[4, 4, 4]]),
        second_per_grid_ts=torch.tensor([seconds]),
    )
    return positions[:, 0].tolist()


def test_infinitevl_checkpoints_keep_the_transformers4_video_positions(tmp_path):
    source = tiny_vlm()
    write_infinitevl(source, tmp_path / "infinitevl")
    imported = HybridVLM.from_pretrained(tmp_path / "infinitevl")
    assert imported.config.video_position_rule == TRANSFORMERS4
    assert source.config.video_position_rule == TRANSFORMERS5  # hybridvl's own default
    for fps in (2, 4):
        assert model_positions(imported, 2 / fps) == reference_positions(TRANSFORMERS4, 2 / fps), fps
        assert model_positions(source, 2 / fps) == reference_positions(TRANSFORMERS5, 2 / fps), fps
    saved = HybridVLM.from_pretrained(imported.save_pretrained(tmp_path / "saved"))
    student, _ = convert_model(imported, "S,S")
    assert saved.config.video_position_rule == student.config.video_position_rule == TRANSFORMERS4
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config.pop("video_position_rule")  # a config saved before the field existed meant the 5.x rule
    assert HybridConfig.from_dict(config).video_position_rule == TRANSFORMERS5
    with pytest.raises(ValueError, match="video_position_rule must be one of transformers5, transformers4"):
        HybridConfig.from_dict({**config, "video_position_rule": "transformers3"})
