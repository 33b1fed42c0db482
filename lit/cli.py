"""The ``hybridvl`` command line.

Each sub-command lives in its own module and is imported only when used, so ``hybridvl layout`` starts
in a moment.

Errors take one path (:func:`run_command`): a command that fails on the user's input (see :func:`is_user_error`)
prints one line, ``hybridvl <command>: error: <message>``, and exits with status 2, as do bad options
(:class:`ArgumentParser`); ``--debug`` anywhere on the command line prints the traceback as well. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import torch

# command -> (module with a `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "hybridvl.lit.commands.quickstart",
        "the whole pipeline at toy size on CPU: teacher, conversion, distillation",
    ),
    "demo": ("hybridvl.lit.commands.demo", "run every mixer on CPU: parallel vs streamed agreement, state size, speed"),
    "layout": ("hybridvl.lit.commands.layout", "expand a layout string and report layers and state bytes per kind"),
    "convert": ("hybridvl.lit.commands.convert", "convert a Qwen2.5-VL checkpoint into a hybrid student"),
    "generate": ("hybridvl.lit.commands.generate", "answer a prompt about an image or a video with a saved model"),
    "ablate": (
        "hybridvl.lit.commands.ablate",
        "run or resume an ablation study: hybridvl ablate --config study.yaml [--smoke]",
    ),
    "ablate-report": (
        "hybridvl.lit.ablation.report",
        "RESULTS.md from ablation results: tables, plots, claim verdicts",
    ),
    "stream": (
        "hybridvl.lit.commands.stream",
        "feed a video frame by frame into the state and answer questions on the way",
    ),
    "tiny-qwen": (
        "hybridvl.lit.commands.tiny_qwen",
        "write a tiny random-weight Qwen2.5-VL checkpoint (for trying things)",
    ),
    "fit": ("hybridvl.lit.commands.train", "train a stage: hybridvl fit --config stage.yaml (LightningCLI)"),
    "validate": ("hybridvl.lit.commands.train", "validate a stage's model (LightningCLI)"),
    "test": ("hybridvl.lit.commands.train", "not defined by the stages: use validate with the sources under data.val"),
    "predict": ("hybridvl.lit.commands.train", "not defined by the stages: use generate"),
}
# commands whose module takes the command name as its first argument
PASS_COMMAND = {"fit", "validate", "test", "predict"}

PROJECT_FOLDERS = ("lit", "mixers", "models", "vision")
"""The folders of the project's subpackages (``hybridvl.lit`` is ``lit/``, ...): ``ValueError``/``TypeError`` raised
in their code, and exceptions of the project's classes, are the user's errors."""
_ROOT = Path(__file__).resolve().parents[1]
_DEBUG: ContextVar[bool] = ContextVar("hybridvl_debug", default=False)


def version() -> str:
    """The installed distribution's version (``importlib.metadata``); ``unknown`` when run from a source tree
    that was never installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("hybridvl")
    except PackageNotFoundError:
        return "unknown"


def usage() -> str:
    """The help ``hybridvl`` prints without a command: the commands and the error conventions."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: hybridvl <command> [options] [--import MODULE ...] [--debug]",
        "       hybridvl --version",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        "Run `hybridvl <command> --help` for a command's options. A bad input is reported in one line (exit status",
        "2); --debug prints its traceback too. --import MODULE imports a module first, e.g. one that registers",
        "your own mixers, so that any command can use them.",
    ]
    return "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that keeps the description's line breaks and ends each option's help with its default,
    ``(default: 64)``; options without a meaningful default (``None``, an empty list, an on/off flag) show none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_ = action.help
        default = action.default
        if (
            help_ is None
            or "%(default)" in help_
            or default is None
            or default is argparse.SUPPRESS
            or action.nargs == 0  # store_true / store_false / count-like flags
            or (isinstance(default, list | tuple | dict | set) and not default)
            or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        ):
            return help_
        return f"{help_} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``<prog>: error: <message>``, with exit status 2, and
    whose help shows every option's default (:class:`HelpFormatter`, unless another ``formatter_class`` is given)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def device_argument(text: str) -> torch.device:
    """An argparse ``type`` for ``--device``: a CPU, CUDA or MPS device present on this machine."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has CUDA GPUs cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda or cuda:N")
    return device


def dtype_argument(text: str) -> torch.dtype:
    """An argparse ``type`` for ``--dtype``: a floating-point torch dtype by name (``bfloat16``)."""
    import torch

    dtype = getattr(torch, text, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use bfloat16, float16 or float32")
    return dtype


def show_project_logs(level: int) -> None:
    """Print the project's log lines (loggers under ``hybridvl``) from ``level`` up to stderr; a process that
    calls this again keeps its one handler."""
    project = logging.getLogger("hybridvl")
    if not project.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        project.addHandler(handler)
    project.setLevel(level)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports a problem with the user's input or machine rather than a bug:

    * an exception of a class the project defines (``LayoutError``, ``DataError``, ``VisionInputError``,
      ``StudyError``, ``UnknownMixerError``, ``BackendUnavailableError``, ...);
    * a ``ValueError`` or ``TypeError`` raised in the project's code, which raises them for bad arguments, files
      and configs (one raised inside a library is a bug of ours: it keeps its traceback);
    * an ``OSError``: a path that does not exist or cannot be read or written, a full disk.
    """
    if isinstance(error, OSError) or type(error).__module__.partition(".")[0] == "hybridvl":
        return True
    if not isinstance(error, ValueError | TypeError) or error.__traceback__ is None:
        return False
    raised_in = Path(traceback.extract_tb(error.__traceback__)[-1].filename).resolve()
    return raised_in.is_relative_to(_ROOT) and raised_in.relative_to(_ROOT).parts[0] in PROJECT_FOLDERS


def one_line(error: BaseException) -> str:
    """``error``'s message on one line; a layout error's caret becomes the character position."""
    from hybridvl.mixers.layout import LayoutError

    if isinstance(error, LayoutError):
        return f"{error.reason} (at character {error.position + 1} of {error.layout!r})"
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def run_command(prog: str, command: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run ``command(argv)`` (``--debug`` taken out) and return its exit status, with the error path of the module
    docstring: the user's errors print ``<prog>: error: <message>`` and return 2 (with the traceback under
    ``--debug``, here or in an enclosing call); other exceptions propagate."""
    debug = "--debug" in argv or _DEBUG.get()
    token = _DEBUG.set(debug)
    try:
        return command([arg for arg in argv if arg != "--debug"])
    except SystemExit as stop:  # argparse and LightningCLI end this way (--help, bad options)
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except Exception as error:
        if not is_user_error(error):
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    finally:
        _DEBUG.reset(token)


def take_imports(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--import MODULE`` (repeatable, anywhere after the command) taken out of ``argv``: the modules to import
    before the command runs, such as a package that registers its own mixers; and the arguments left."""
    modules, rest, args = [], [], iter(argv)
    for arg in args:
        if arg == "--import":
            module = next(args, None)
            if module is None or module.startswith("-"):
                raise ValueError("--import needs a module name, e.g. --import my_lab.mixers")
            modules.append(module)
        elif arg.startswith("--import="):
            modules.append(arg.removeprefix("--import="))
        else:
            rest.append(arg)
    return modules, rest


def import_modules(modules: list[str]) -> None:
    """Import each module by name (its mixers register themselves), naming one that cannot be imported."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(
                f"--import {name}: cannot import it ({error}); install it or add its folder to PYTHONPATH"
            ) from error


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hybridvl`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    options = [arg for arg in argv if arg != "--debug"]
    if not options or options[0] in ("-h", "--help"):
        print(usage())
        return 0
    if options[0] in ("-V", "--version"):
        print(f"hybridvl {version()}")
        return 0
    command = options[0]
    if command not in COMMANDS:
        print(f"hybridvl: error: unknown command {command!r} (see hybridvl --help)", file=sys.stderr)
        return 2
    rest = list(argv)
    rest.remove(command)  # its first occurrence: only --debug may come before it
    show_project_logs(logging.INFO)
    module = importlib.import_module(COMMANDS[command][0])

    def command_main(args: list[str]) -> int:
        modules, args = take_imports(args)
        import_modules(modules)
        return module.main(args)

    return run_command(f"hybridvl {command}", command_main, [command, *rest] if command in PASS_COMMAND else rest)


if __name__ == "__main__":
    sys.exit(main())
