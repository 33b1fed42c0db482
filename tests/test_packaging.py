"""Packaging: the version flag, defaults in every command's help, the wheel's contents and the declared
dependencies."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from hybridvl.lit import cli
from hybridvl.lit.cli import COMMANDS, PASS_COMMAND

ROOT = Path(__file__).resolve().parents[1]
ARGPARSE_COMMANDS = sorted(name for name in COMMANDS if name not in PASS_COMMAND)  # the rest are LightningCLI

# distribution name -> module it is imported as, where they differ
IMPORT_NAMES = {
    "flash-linear-attention": "fla",
    "flash-attn": "flash_attn",
    "mamba-ssm": "mamba_ssm",
    "pillow": "PIL",
    "pyyaml": "yaml",
    "jsonargparse": "jsonargparse",
}
# declared but never imported, on purpose
NOT_IMPORTED = {
    "torchvision": "transformers' Qwen2.5-VL image and video processors need it",
    "ruff": "a linter, run as a command",
}


def test_version_flag_prints_the_installed_version():
    expected = f"hybridvl {importlib.metadata.version('hybridvl')}"
    for flag in ("--version", "-V"):
        result = subprocess.run(
            [sys.executable, "-m", "hybridvl.lit.cli", flag], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected


def test_usage_mentions_version(capsys):
    assert cli.main([]) == 0
    assert "--version" in capsys.readouterr().out


class ParsedError(Exception):
    pass


def command_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``hybridvl <name>`` builds, caught as it parses."""
    captured = []

    def parse_args(self, args=None, namespace=None):
        captured.append(self)
        raise ParsedError

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", parse_args)
    module = importlib.import_module(COMMANDS[name][0])
    with pytest.raises(ParsedError):
        module.main([])
    return captured[0]


@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_every_option_has_help_and_shows_its_default(name, monkeypatch):
    parser = command_parser(name, monkeypatch)
    help_text = parser.format_help()
    flat = " ".join(help_text.split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"hybridvl {name} {label} has no help"
        meaningful = action.default is not None and action.nargs != 0 and action.default != [] and action.default != {}
        if action.option_strings and meaningful:
            shown = f"(default: {action.default})"
            assert shown in flat, f"hybridvl {name} --help does not show {label}'s default {shown}"


def test_help_runs_for_every_command(capsys):
    for name in ARGPARSE_COMMANDS:
        assert cli.main([name, "--help"]) == 0, name
        assert "(default:" in capsys.readouterr().out, name


def test_no_model_export_is_tracked():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "model"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert tracked.stdout == ""
    ignored = subprocess.run(["git", "check-ignore", "-q", "model/model.safetensors"], cwd=ROOT)
    assert ignored.returncode == 0, "model/ exports are not ignored"


def _python_files() -> list[Path]:
    skip = {".venv", "build", "dist", ".git"}
    return [path for path in ROOT.rglob("*.py") if not skip & set(path.relative_to(ROOT).parts)]


def _imported_modules() -> set[str]:
    pattern = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", re.MULTILINE)
    dynamic = re.compile(r"""(?:import_module|find_spec)\(\s*["']([A-Za-z_]\w*)""")
    modules = set()
    for path in _python_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        modules |= set(pattern.findall(text)) | set(dynamic.findall(text))
    return modules


def _requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()


def test_every_declared_dependency_is_imported():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [_requirement_name(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        declared += [_requirement_name(r) for r in extra]
    imported = _imported_modules()
    unused = [
        name
        for name in declared
        if name not in NOT_IMPORTED and IMPORT_NAMES.get(name, name.replace("-", "_")) not in imported
    ]
    assert unused == [], f"declared in pyproject.toml but never imported: {unused}"


def test_cuda_constraints_pin_the_tested_stack():
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints-cuda.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert pins["torch"] == "2.11.0" and pins["triton"] == "3.6.0" and pins["flash-linear-attention"] == "0.6.0"


def _copy_project(target: Path) -> None:
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("hybridvl", "lit", "mixers", "models", "vision"):
        shutil.copytree(ROOT / package, target / package, ignore=ignore)
    shutil.copytree(ROOT / "experiments" / "tiny", target / "experiments" / "tiny")


def test_wheel_ships_the_quickstart_yamls(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    source = tmp_path / "src"
    source.mkdir()
    _copy_project(source)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("hybridvl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    yamls = sorted(path.name for path in (ROOT / "experiments" / "tiny").glob("*.yaml"))
    assert yamls
    for name in yamls:
        packaged = zipfile.ZipFile(wheel).read(f"hybridvl/lit/experiments/tiny/{name}")
        assert packaged == (ROOT / "experiments" / "tiny" / name).read_bytes()
    assert not any(name.startswith(("model/", "experiments/", "tests/")) for name in names)
    for module in ("__init__.py", "mixers/__init__.py", "models/hybrid.py", "vision/tower.py", "lit/cli.py"):
        assert f"hybridvl/{module}" in names  # the folders install under hybridvl.
    assert not any(name.startswith(("mixers/", "models/", "vision/", "lit/")) for name in names)  # no top-level


def test_pipeline_finds_the_packaged_yamls_without_a_checkout(tmp_path, monkeypatch):
    from hybridvl.lit import pipeline

    fake_lit = tmp_path / "site-packages" / "hybridvl" / "lit"
    shutil.copytree(ROOT / "experiments" / "tiny", fake_lit / "experiments" / "tiny")
    monkeypatch.setattr(pipeline, "__file__", str(fake_lit / "pipeline.py"))
    found = pipeline._experiments()
    assert found == (fake_lit / "experiments" / "tiny").resolve()
    assert {path.stem for path in found.glob("*.yaml")} >= set(pipeline.STAGES)


def test_stages_log_progress_lines(tmp_path, monkeypatch):
    from hybridvl.lit import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "train", calls.append)
    pipeline.run_stage("sft", tmp_path, 0.01)
    assert "--trainer.callbacks+=hybridvl.lit.callbacks.StageProgress" in calls[0]
    record = (tmp_path / "runs" / "sft" / "done.json").read_text()
    assert "StageProgress" not in record  # runs recorded before the progress lines still resume


def test_stage_progress_writes_a_line_per_tenth(caplog):
    import torch

    from hybridvl.lit.callbacks import StageProgress

    trainer = SimpleNamespace(
        max_steps=100,
        estimated_stepping_batches=100,
        global_step=0,
        default_root_dir="runs/teacher",
        is_global_zero=True,
    )
    progress = StageProgress(interval=1e9)
    with caplog.at_level(logging.INFO, logger="hybridvl.progress"):
        progress.on_train_start(trainer, None)
        for step in range(1, 101):
            trainer.global_step = step
            progress.on_train_batch_end(trainer, None, {"loss": torch.tensor(2.0)}, None, step - 1)
    lines = [record.getMessage() for record in caplog.records if "step " in record.getMessage()]
    assert len(lines) == 10
    assert lines[0].startswith("teacher: step 10/100 (10%)  loss 2.0000  elapsed ")
    assert " left " in lines[0] and lines[-1].startswith("teacher: step 100/100 (100%)")
