"""The ``coalora`` command: LightningCLI for fit/validate/test, plain subcommands for the rest.

``coalora fit --config configs/sst2_minilm.yaml`` trains; ``coalora allocate|evaluate|adapt|demo`` are
small argparse programs in :mod:`coalora.commands`. Every user mistake ends in one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from coalora.errors import CoaloraError
from coalora.utils import one_line

#: subcommand -> (module in coalora.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "allocate": ("allocate", "allocate quantization configurations for bit budgets"),
    "evaluate": ("evaluate", "evaluate a checkpoint at budgets or qconfig files; table, JSON, CSV, plot"),
    "adapt": ("adapt", "write a deployable model for one configuration from a checkpoint"),
    "demo": ("demo", "train CoA-LoRA on SST-2 with the packaged MiniLM and evaluate it"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises a one-line error (with a pointer to --help) instead of printing usage."""

    def error(self, message: str):
        raise CoaloraError(f"{message}; see `{self.prog} --help`")


def _named_task_path(argv: Sequence[str]) -> str | None:
    """The ``model.class_path`` that ``argv`` selects: the last ``--model.class_path`` / ``--model`` value,
    else the last ``--config`` file's ``model.class_path`` (None if neither names one)."""
    import yaml

    found = None
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if key == "--config" and Path(value).is_file():
            try:
                data = yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError:
                continue  # LightningCLI reports the broken file
            model = data.get("model") if isinstance(data, dict) else None
            if isinstance(model, dict) and isinstance(model.get("class_path"), str):
                found = model["class_path"]
        elif key in ("--model.class_path", "--model") and value and not value.endswith((".yaml", ".yml")):
            found = value
    return found


def task_class_for(argv: Sequence[str]):
    """The task class a command line selects (ClassificationTask when it names none or an unknown one)."""
    import coalora.tasks as tasks
    from coalora.tasks.base import CoALoRATask

    path = _named_task_path(argv)
    if path is not None:
        module_name, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name) if module_name else tasks, name)
        except (ImportError, AttributeError, ValueError):
            cls = None  # LightningCLI names the bad class_path itself
        if isinstance(cls, type) and issubclass(cls, CoALoRATask):
            return cls
    return tasks.ClassificationTask


def _check_checkpoint_task(argv: Sequence[str], task) -> None:
    """A ``--ckpt_path`` file must be a coalora checkpoint of the selected task, said before any work
    (LightningCLI would otherwise load its hyperparameters into the wrong task or data module)."""
    from coalora.tasks.checkpoint import read_checkpoint

    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key != "--ckpt_path":
            continue
        value = value or (argv[i + 1] if i + 1 < len(argv) else "")
        if value in ("", "last", "best", "hpc", "registry") or not Path(value).is_file():
            continue  # Lightning's own names, and a missing file, which Lightning reports
        written_by = read_checkpoint(value)["coalora"].get("task", "classification")
        if written_by != task.task_type:
            raise CoaloraError(
                f"checkpoint '{value}' was written by a '{written_by}' task, not '{task.task_type}' "
                f"({task.__name__}); pass the config it was trained with"
            )


def lightning_main(args: Sequence[str] | None):
    """LightningCLI over every task (``model.class_path`` picks one) and that task's data module.

    ``args=None`` reads sys.argv. The task class names its data module (GLUE for classification, text
    for causal LMs) and the task arguments linked into it (backbone, GLUE task, seed), so a config names
    each once.
    """
    from lightning.pytorch.cli import LightningCLI

    from coalora.tasks.base import CoALoRATask

    argv = list(sys.argv[1:] if args is None else args)
    task = task_class_for(argv)
    _check_checkpoint_task(argv, task)
    module_name, _, class_name = task.datamodule_class.rpartition(".")
    datamodule = getattr(importlib.import_module(module_name), class_name)

    class CoaloraCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # one seed for the run: the search split and shuffling follow the task's seed (two different
            # values would also make Lightning refuse to merge the two hyperparameter sets)
            for name in task.linked_arguments:
                parser.link_arguments(f"model.init_args.{name}", f"data.{name}")

    return CoaloraCLI(
        CoALoRATask,
        datamodule,
        subclass_mode_model=True,
        args=None if args is None else list(args),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
    )


#: jsonargparse's report of a bad value inside the chosen task class, nested in its Union report
_NESTED_VALUE = re.compile(
    r'Parser key "(?P<key>[\w.]+)": Expected a (?P<type>.+?)\. Got value: (?P<value>\S+)'
)
_CLASS = re.compile(r"<class '(?P<name>[\w.]+)'>")
_LITERAL = re.compile(r"typing\.Literal\[(?P<choices>.*)\]")


def config_error(message: str) -> str:
    """jsonargparse's message for a bad task argument, cut to the argument, what it takes and what it got.

    In subclass mode a bad ``--model.method`` is reported as a failed match against every subclass; the
    useful part is the innermost ``Parser key "method": Expected a Literal[...]. Got value: magic``.
    """
    match = _NESTED_VALUE.search(message)
    if match is None or "Problem with given class_path" not in message:
        return message
    expected = _CLASS.sub(lambda m: ("an " if m["name"][0] in "aeiou" else "a ") + m["name"], match["type"])
    literal = _LITERAL.fullmatch(expected)
    if literal is not None:
        expected = "one of " + literal["choices"]
    return f"model.{match['key']} must be {expected}, got '{match['value']}'; see `coalora fit --help`"


def _wrapped_error(err: BaseException) -> CoaloraError | None:
    """A CoaloraError that ``err`` was raised while handling (jsonargparse wraps a constructor's error in
    "Does not validate against any of the Union subtypes")."""
    seen = 0
    cause = err.__cause__ or err.__context__
    while cause is not None and seen < 10:
        if isinstance(cause, CoaloraError):
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        names = ", ".join((*LIGHTNING_COMMANDS, *COMMANDS))
        print(f"usage: coalora {{{names}}} ...\n\n  fit|validate|test --config FILE   LightningCLI")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<32} {help_text}")
        return 0
    try:
        if argv[0] in COMMANDS:
            module = importlib.import_module(f"coalora.commands.{COMMANDS[argv[0]][0]}")
            parser = OneLineParser(prog=f"coalora {argv[0]}", description=COMMANDS[argv[0]][1])
            module.add_arguments(parser)
            if getattr(module, "ACCEPTS_OVERRIDES", False):
                args, overrides = parser.parse_known_args(argv[1:])
                args.overrides = overrides
            else:
                args = parser.parse_args(argv[1:])
            return int(module.run(args) or 0)
        lightning_main(None if from_command_line else argv)
        return 0
    except (CoaloraError, argparse.ArgumentError) as err:
        print(f"coalora: error: {config_error(one_line(err))}", file=sys.stderr)
        return 2
    except Exception as err:  # jsonargparse raises its own ArgumentError subclass for bad configs
        ours = _wrapped_error(err)
        if ours is not None:  # our one-line error, raised by a class jsonargparse was instantiating
            print(f"coalora: error: {one_line(ours)}", file=sys.stderr)
            return 2
        if type(err).__name__ in ("ArgumentError", "ParserError"):
            print(f"coalora: error: {config_error(one_line(err))}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
