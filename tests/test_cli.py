"""The ``hybridvl`` command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hybridvl.lit.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hybridvl.lit.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_layout_command_reports_layers_and_state():
    result = run_cli("layout", "S,D,D,D x9", "--mixer-options", '{"S": {"num_kv_heads": 2}}')
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "S,D,D,D x9  (36 layers)" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in ("S", "D")}
    assert rows["S"].split()[2] == "9" and rows["D"].split()[2] == "27"
    # SWA ring: 8192 slots x 2 (k, v) x 2 heads x 128 dims x 2 bytes; GDN: 16 x 128 x 256 fp32 + conv tails
    assert "8.0 MiB" in rows["S"] and "2.1 MiB" in rows["D"]


def test_layout_command_points_at_empty_item():
    result = run_cli("layout", "S,D,,D")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "hybridvl layout: error: empty item: a mixer is missing before this ',' (at character 5 of 'S,D,,D')"
    ]


def test_layout_command_checks_declared_layers():
    result = run_cli("layout", "S,D x3", "--num-layers", "8")
    assert result.returncode == 2 and "gives 6 layers but the model declares 8" in result.stderr


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 0
    assert "layout" in capsys.readouterr().out


def test_available_prints_every_kind():
    result = subprocess.run(
        [sys.executable, "-c", "import hybridvl; print(hybridvl.mixers.available())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    kinds = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert kinds == ["D", "S", "A", "M", "G", "L"]


@pytest.mark.parametrize("argv", [["--seq-len", "96", "--decode", "8", "--hidden-size", "64"]])
def test_demo_runs_and_agrees(argv, capsys):
    assert main(["demo", *argv]) == 0
    out = capsys.readouterr().out
    assert "streamed == parallel for every mixer: yes" in out


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "qwen"
    result = run_cli("tiny-qwen", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_convert_then_generate_prints_text(tiny_teacher, tmp_path):
    from media import make_test_video, render_text_image

    student = tmp_path / "student"
    result = run_cli(
        "convert", "--teacher", str(tiny_teacher), "--layout", "S,D,D,D", "--init", "mimic", "--out", str(student)
    )
    assert result.returncode == 0, result.stderr
    assert "inherited" in result.stdout and (student / "conversion_report.json").is_file()
    render_text_image("cat 7", size=(112, 84)).save(tmp_path / "image.png")
    make_test_video(tmp_path / "clip.mp4", num_frames=12, size=(64, 48), fps=10.0)
    for media in (["--image", str(tmp_path / "image.png")], ["--video", str(tmp_path / "clip.mp4")]):
        result = run_cli(
            "generate", "--model", str(student), *media, "--prompt", "What is it?", "--max-new-tokens", "4", "--sample"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip(), "no text printed"
        assert "4 tokens in" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layout", "S,D x3"], "the layout gives 6 layers but the model declares 4"),
        (["--layout", "S,D,,D"], "empty item"),
    ],
)
def test_convert_rejects_bad_layouts(tiny_teacher, tmp_path, args, message):
    result = run_cli("convert", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2 and message in result.stderr


def test_convert_rejects_missing_and_foreign_teachers(tmp_path):
    result = run_cli("convert", "--teacher", str(tmp_path / "missing"), "--layout", "A", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    result = run_cli("convert", "--teacher", str(tmp_path / "bert"), "--layout", "A", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "model_type 'bert'" in result.stderr


def test_generate_names_bad_inputs(tiny_teacher, tmp_path):
    student = tmp_path / "student"
    assert run_cli("convert", "--teacher", str(tiny_teacher), "--layout", "A x4", "--out", str(student)).returncode == 0
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = run_cli("generate", "--model", str(student), "--image", str(tmp_path / "broken.png"), "--prompt", "hi")
    assert result.returncode == 2 and "broken.png" in result.stderr
    result = run_cli("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert result.returncode == 2 and "nowhere" in result.stderr
