"""Build hook: the wheel ships ``experiments/tiny/*.yaml`` (the stage configs ``hybridvl quickstart`` runs) inside
the ``hybridvl.lit`` package, as ``hybridvl/lit/experiments/tiny/*.yaml``, so the quickstart works from a regular
install as well as from a checkout. Everything else is declared in ``pyproject.toml``."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGED_EXPERIMENTS = ("experiments/tiny", "hybridvl/lit/experiments/tiny")  # (source folder, folder in the wheel)


class BuildPyWithExperiments(build_py):
    """``build_py`` that also copies the quickstart's YAMLs into the built ``hybridvl.lit`` package."""

    def run(self) -> None:
        super().run()
        source, target = PACKAGED_EXPERIMENTS
        yamls = sorted((ROOT / source).glob("*.yaml"))
        if not yamls:
            raise FileNotFoundError(f"no YAML files in {ROOT / source}: the quickstart's configs are missing")
        self.mkpath(str(Path(self.build_lib, target)))
        for yaml in yamls:
            self.copy_file(str(yaml), str(Path(self.build_lib, target, yaml.name)))


setup(cmdclass={"build_py": BuildPyWithExperiments})
