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


def lightning_main(args: Sequence[str] | None):
    """LightningCLI over every task (``model.class_path`` picks one) and the GLUE data module.

    ``args=None`` reads sys.argv. The task's backbone, GLUE task and seed are linked into the data module,
    so a config names each once.
    """
    from lightning.pytorch.cli import LightningCLI

    from coalora.data.glue_datamodule import GLUEDataModule
    from coalora.tasks.base import CoALoRATask

    class CoaloraCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.init_args.model_name", "data.model_name")
            parser.link_arguments("model.init_args.task", "data.task")
            # one seed for the run: the search split and shuffling follow the task's seed (two different
            # values would also make Lightning refuse to merge the two hyperparameter sets)
            parser.link_arguments("model.init_args.seed", "data.seed")

    return CoaloraCLI(
        CoALoRATask,
        GLUEDataModule,
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
        if type(err).__name__ in ("ArgumentError", "ParserError"):
            print(f"coalora: error: {config_error(one_line(err))}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
