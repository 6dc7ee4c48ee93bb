"""Developer entry points: `nox -s tests`, `nox -s lint`, `nox -s demo`, `nox -s bench`.

Every session installs torch==2.13.0 together with the project, so pip never resolves a CUDA build.
"""

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"
ENV = {
    "WANDB_MODE": "offline",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _install(session: nox.Session) -> None:
    session.install(TORCH, "-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """The default suite (slow tests deselected); pass `-- -m slow` or other pytest args to change it."""
    _install(session)
    args = session.posargs or ["-m", "not slow", "-q"]
    session.run("pytest", *args, env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) over the repository, mypy over the library and callbacks (installed first)."""
    _install(session)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: CoA-LoRA on SST-2 with the packaged MiniLM, evaluated at 2.5/3.0/3.5/4.0 bits."""
    _install(session)
    env = dict(ENV, GLUE_DIR=os.environ.get("GLUE_DIR", os.path.abspath("../shared/data")))
    session.run("coalora", "demo", *session.posargs, env=env)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: each prints JSON and writes it under docs/bench/."""
    _install(session)
    for script in sorted(os.listdir("benchmarks")):
        if (script.startswith("bench_") or script == "throughput.py") and script.endswith(".py"):
            session.run("python", f"benchmarks/{script}", env=ENV)
