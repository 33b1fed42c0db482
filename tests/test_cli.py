"""The ``hybridvl`` command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lit.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit.cli", *args], capture_output=True, text=True, timeout=120)


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
    assert result.returncode != 0
    assert "empty item" in result.stderr
    lines = result.stderr.splitlines()
    assert lines[-2].strip() == "S,D,,D" and lines[-1].index("^") == lines[-2].index("S,D,,D") + 4


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
        [sys.executable, "-c", "import mixers; print(mixers.available())"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    kinds = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert kinds == ["D", "S", "A", "M", "G", "L"]


@pytest.mark.parametrize("argv", [["--seq-len", "96", "--decode", "8", "--hidden-size", "64"]])
def test_demo_runs_and_agrees(argv, capsys):
    assert main(["demo", *argv]) == 0
    out = capsys.readouterr().out
    assert "streamed == parallel for every mixer: yes" in out
