"""The installed import names: everything lives under ``hybridvl.``, so a research project with its own ``models``,
``mixers``, ``vision`` or ``lit`` package uses hybridvl beside them. The README's examples run from such a project."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_PACKAGES = ("models", "mixers", "vision", "lit")
CUDA_ONLY = "cuda_graphs"  # the README block of CUDA graphs needs a GPU


def readme_python_blocks() -> list[str]:
    """The README's ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def user_project(tmp_path: Path) -> Path:
    """A folder with the user's own ``models``, ``mixers``, ``vision`` and ``lit`` packages, which fail loudly when
    anything imports them."""
    for name in OWN_PACKAGES:
        (tmp_path / name).mkdir()
        message = f"the project's own {name!r} was imported"
        (tmp_path / name / "__init__.py").write_text(f"raise RuntimeError({message!r})\n")
    return tmp_path


def hybridvl_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hybridvl.lit.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_the_readme_has_the_examples_this_test_runs():
    blocks = readme_python_blocks()
    assert len(blocks) >= 3
    assert any("build_mixer" in block for block in blocks) and any("from_pretrained" in block for block in blocks)


def test_the_package_exposes_its_main_api_and_no_top_level_folders():
    code = (
        "import sys, hybridvl\n"
        "print(sorted(name for name in ('build_mixer', 'register_mixer', 'parse_layout', 'HybridVLM', 'HybridConfig')"
        " if hasattr(hybridvl, name)))\n"
        f"print(sorted(name for name in {OWN_PACKAGES!r} if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    api, top_level = result.stdout.splitlines()
    assert api == str(sorted(["build_mixer", "register_mixer", "parse_layout", "HybridVLM", "HybridConfig"]))
    assert top_level == "[]"


def test_the_readme_examples_run_beside_a_projects_own_models_and_mixers(tmp_path):
    project = user_project(tmp_path)
    for args in (
        ("tiny-qwen", "--out", "tiny-qwen"),
        ("convert", "--teacher", "tiny-qwen", "--layout", "S,D,D,D", "--init", "mimic", "--out", "tiny-hybrid"),
    ):
        result = hybridvl_command(*args, cwd=project)
        assert result.returncode == 0, result.stderr
    blocks = [block for block in readme_python_blocks() if CUDA_ONLY not in block]
    prelude = (
        "import torch\n"
        "from PIL import Image\n"
        "image = Image.new('RGB', (56, 56), 'white')\n"
        "next_ids = torch.tensor([[11]])\n"
        "input_ids = torch.tensor([[11, 12, 13]])\n"
    )
    script = project / "readme_examples.py"
    script.write_text(prelude + "\n".join(blocks))
    result = subprocess.run([sys.executable, str(script)], cwd=project, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (project / "copy" / "config.json").is_file()  # the last Python example saves the model


@pytest.mark.parametrize("name", OWN_PACKAGES)
def test_the_projects_own_package_is_the_one_its_name_imports(tmp_path, name):
    """Beside hybridvl, ``import models`` still means the project's package (here one that raises)."""
    project = user_project(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", f"import hybridvl.mixers, hybridvl.models.hybrid\nimport {name}"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and f"the project's own {name!r} was imported" in result.stderr
