"""The ``coalora`` command: LightningCLI for fit/validate/test, plain subcommands for the rest.

``coalora fit --config configs/sst2_minilm.yaml`` trains; ``coalora allocate|evaluate|adapt|demo`` are
small argparse programs in :mod:`coalora.commands`. Every user mistake ends in one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from coalora.errors import CoaloraError

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
    """LightningCLI with our module and data module; ``args=None`` reads sys.argv."""
    from lightning.pytorch.cli import LightningCLI

    from coalora.datamodule import GLUEDataModule
    from coalora.module import CoALoRAModule

    class CoaloraCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.model_name", "data.model_name")
            parser.link_arguments("model.task", "data.task")
            # one seed for the run: the search split and shuffling follow the module's seed (two different
            # values would also make Lightning refuse to merge the two hyperparameter sets)
            parser.link_arguments("model.seed", "data.seed")

    return CoaloraCLI(
        CoALoRAModule,
        GLUEDataModule,
        args=None if args is None else list(args),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
    )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


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
        print(f"coalora: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # jsonargparse raises its own ArgumentError subclass for bad configs
        if type(err).__name__ in ("ArgumentError", "ParserError"):
            print(f"coalora: error: {_one_line(err)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
