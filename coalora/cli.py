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
from typing import Any

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


def lightning_main(args: Sequence[str] | None):
    """LightningCLI over every task (``model.class_path`` picks one) and that task's data module.

    ``args=None`` reads sys.argv. The task class names its data module (GLUE for classification, text
    for causal LMs) and the task arguments linked into it (backbone, GLUE task, seed), so a config names
    each once. Before any work the parsed config is checked (:mod:`coalora.commands.runs`): trainer
    numbers, output folders, and the ``--ckpt_path`` file (read weights-only: a coalora checkpoint of this
    task and, once the task is built, of this backbone); ``--ckpt_path last`` means the newest last.ckpt
    under the run's folders.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from coalora.commands import runs
    from coalora.tasks.base import CoALoRATask
    from coalora.tasks.checkpoint import check_backbone_of, check_task_of, read_checkpoint
    from coalora.tasks.validation import check_trainable

    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "predict":
        raise CoaloraError(
            "`coalora predict` is not supported; use `coalora evaluate --ckpt FILE` or "
            "AdaptiveModel.from_checkpoint(FILE).predict(texts)"
        )
    task = task_class_for(argv)
    module_name, _, class_name = task.datamodule_class.rpartition(".")
    datamodule = getattr(importlib.import_module(module_name), class_name)
    state: dict = {}

    class CoaloraCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # one seed for the run: the search split and shuffling follow the task's seed (two different
            # values would also make Lightning refuse to merge the two hyperparameter sets)
            for name in task.linked_arguments:
                parser.link_arguments(f"model.init_args.{name}", f"data.{name}")

        def _parse_ckpt_path(self) -> None:
            """Check the parsed config before LightningCLI reads the checkpoint's hyperparameters into it
            (its own read gives a traceback on a bad file) and before anything is instantiated."""
            config = self.config[self.config.subcommand]
            if config.get("weights_only") is False:
                raise CoaloraError(
                    "--weights_only false is refused: checkpoints are always read weights-only, so a file "
                    "from elsewhere cannot run code; drop the option"
                )
            trainer = config.trainer.as_dict()
            runs.check_trainer(trainer)
            roots = runs.check_outputs(trainer)
            ckpt = config.get("ckpt_path")
            if ckpt == "last":
                ckpt = config.ckpt_path = str(runs.find_last(roots))
            if ckpt and ckpt not in runs.LIGHTNING_NAMES:
                checkpoint = read_checkpoint(ckpt)
                check_task_of(checkpoint, ckpt, task)
                state["checkpoint"] = (ckpt, checkpoint)
            if "weights_only" in config:
                config.weights_only = True
            super()._parse_ckpt_path()

        def _before_run(self, stage: str) -> None:
            """Checks that need the built task and data: the checkpoint's backbone, and the data files
            (read now, which the Trainer would do after creating the run folder; setup is idempotent)."""
            if "checkpoint" in state:
                check_backbone_of(state["checkpoint"][1], state["checkpoint"][0], self.model)
                del state["checkpoint"]  # the file is read again by Lightning; keep one copy in memory
            for callback in self.trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    callback.save_on_exception = True  # Ctrl-C / SIGTERM leave a resumable checkpoint
            if stage == "fit":
                check_trainable(self.model)
            self.datamodule.prepare_data()
            self.datamodule.setup(stage)
            state["trainer"] = self.trainer
            state["folder"] = runs.RunFolder(self.trainer.log_dir or self.trainer.default_root_dir)
            held.release()  # the inputs are good: Lightning's messages (seed, devices) may show now
            if stage == "fit":
                warn_if_bf16_is_emulated(self.trainer)

        def before_fit(self) -> None:
            self._before_run("fit")

        def before_validate(self) -> None:
            self._before_run("validate")

        def before_test(self) -> None:
            self._before_run("test")

    held = runs.HeldLogs()
    try:
        return CoaloraCLI(
            CoALoRATask,
            datamodule,
            subclass_mode_model=True,
            args=None if args is None else list(args),
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
        )
    except SystemExit as stop:  # Lightning ends an interrupted fit with SystemExit (or SIGTERMException)
        trainer = state.get("trainer")
        if trainer is None or not trainer.interrupted:
            raise
        raise runs.interrupted(trainer, argv, isinstance(stop, SIGTERMException)) from None
    except Exception as err:
        if "folder" in state and (isinstance(err, CoaloraError) or _wrapped_error(err) is not None):
            state["folder"].remove()  # refused before training: leave no run folder behind
        raise
    finally:
        held.drop()


def warn_if_bf16_is_emulated(trainer: Any) -> None:
    """One line on stderr when bf16 autocast will run on a CPU that only emulates bf16 (many times slower
    than fp32 there); the config's precision is kept: the numbers it gives are the user's choice."""
    from lightning.pytorch.accelerators import CPUAccelerator

    from coalora.utils import cpu_has_native_bf16

    on_cpu = isinstance(trainer.accelerator, CPUAccelerator)
    if str(trainer.precision).startswith("bf16") and on_cpu and not cpu_has_native_bf16():
        print(
            f"warning: trainer.precision {trainer.precision} on a CPU without native bf16 "
            "(AVX512-BF16/AMX) runs many times slower than fp32; pass --trainer.precision 32-true",
            file=sys.stderr,
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


def _with_fix(message: str, command: str) -> str:
    """Every error line says how to go on: a message without a fix of its own points to ``--help``."""
    return message if ";" in message else f"{message}; see `coalora {command} --help`"


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
    except KeyboardInterrupt:  # outside training (Lightning handles it there): nothing half-written
        print(f"coalora: {argv[0]} interrupted; nothing was written, run it again", file=sys.stderr)
        return 130
    except CoaloraError as err:
        exit_code = getattr(err, "exit_code", 2)  # TrainingInterrupted: 130 (Ctrl-C) or 143 (SIGTERM)
        line = _with_fix(config_error(one_line(err)), argv[0])
        print(f"coalora: {'' if exit_code != 2 else 'error: '}{line}", file=sys.stderr)
        return exit_code
    except argparse.ArgumentError as err:
        print(f"coalora: error: {_with_fix(config_error(one_line(err)), argv[0])}", file=sys.stderr)
        return 2
    except Exception as err:  # jsonargparse raises its own ArgumentError subclass for bad configs
        ours = _wrapped_error(err)
        if ours is not None:  # our one-line error, raised by a class jsonargparse was instantiating
            print(f"coalora: error: {_with_fix(one_line(ours), argv[0])}", file=sys.stderr)
            return 2
        if type(err).__name__ in ("ArgumentError", "ParserError", "MisconfigurationException"):
            print(f"coalora: error: {_with_fix(config_error(one_line(err)), argv[0])}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
