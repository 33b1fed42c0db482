"""The ``hybridvl`` command line.

Each sub-command lives in its own module and is imported only when used, so ``hybridvl layout`` starts
in a moment.
"""

from __future__ import annotations

import importlib
import logging
import sys

# command -> (module with a `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "lit.commands.quickstart",
        "the whole pipeline at toy size on CPU: teacher, conversion, distillation",
    ),
    "demo": ("lit.commands.demo", "run every mixer on CPU: parallel vs streamed agreement, state size, speed"),
    "layout": ("lit.commands.layout", "expand a layout string and report layers and state bytes per kind"),
    "convert": ("lit.commands.convert", "convert a Qwen2.5-VL checkpoint into a hybrid student"),
    "generate": ("lit.commands.generate", "answer a prompt about an image or a video with a saved model"),
    "ablate": ("lit.commands.ablate", "run or resume an ablation study: hybridvl ablate --config study.yaml [--smoke]"),
    "ablate-report": ("lit.ablation.report", "RESULTS.md from ablation results: tables, plots, claim verdicts"),
    "stream": ("lit.commands.stream", "feed a video frame by frame into the state and answer questions on the way"),
    "tiny-qwen": ("lit.commands.tiny_qwen", "write a tiny random-weight Qwen2.5-VL checkpoint (for trying things)"),
    "fit": ("lit.commands.train", "train a stage: hybridvl fit --config stage.yaml (LightningCLI)"),
    "validate": ("lit.commands.train", "validate a stage's model (LightningCLI)"),
    "test": ("lit.commands.train", "test a stage's model (LightningCLI)"),
    "predict": ("lit.commands.train", "predict with a stage's model (LightningCLI)"),
}
# commands whose module takes the command name as its first argument
PASS_COMMAND = {"fit", "validate", "test", "predict"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: hybridvl <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `hybridvl <command> --help` for a command's options."]
    return "\n".join(lines)


def show_project_logs(level: int) -> None:
    """Print the project's log lines (loggers under ``hybridvl``) from ``level`` up to stderr; a process that
    calls this again keeps its one handler."""
    project = logging.getLogger("hybridvl")
    if not project.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        project.addHandler(handler)
    project.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hybridvl`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hybridvl: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    show_project_logs(logging.INFO)
    module = importlib.import_module(COMMANDS[command][0])
    return module.main([command, *rest] if command in PASS_COMMAND else rest)


if __name__ == "__main__":
    sys.exit(main())
