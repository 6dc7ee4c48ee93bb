"""The plain subcommands of ``coalora`` (``fit``/``validate``/``test`` are LightningCLI's): one module per
command, each with ``add_arguments(parser)`` and ``run(args)``; :mod:`coalora.cli` dispatches to them. May
import every room; the heaviest (Lightning, transformers) happen inside ``run``, so ``coalora --help``
stays fast."""
