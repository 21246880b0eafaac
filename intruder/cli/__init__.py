"""Command line: one click group; each command lives in its own module and calls the library."""

from __future__ import annotations

import importlib
from types import FrameType

import click

from .. import __version__
from ..errors import Terminated
from ..run.threads import set_thread_env
from ..settings import SettingsError, check_all
from .common import fail

# Command modules register themselves on `cli`; add a module name here to add a command.
COMMAND_MODULES = ("scan_cmd", "layers_cmd", "scale_cmd", "eval_cmd", "report_cmd", "cache_cmd",
                   "track_cmd")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="intruder")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Spectral forensics for fine-tuned models: find and rescale intruder dimensions.

    \b
    Examples:
      intruder scan base.safetensors tuned.safetensors
      intruder scan base-model-dir/ peft-adapter-dir/ --epsilon 0.3,0.5,0.7,0.9
      intruder layers model-dir/
      intruder scale --alpha 0.5 --eval wikitext
    """
    ctx = click.get_current_context()
    try:  # every INTRUDER_* variable, before any work (intruder/settings.py)
        check_all()
    except SettingsError as exc:
        if debug:
            raise
        fail(ctx, exc)
    if ctx.invoked_subcommand in ("scan", "compare", "track"):  # before torch is imported
        set_thread_env()


for _name in COMMAND_MODULES:  # each registers its command on `cli`
    importlib.import_module(f"{__name__}.{_name}")


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def main() -> None:
    import signal

    try:  # SIGTERM unwinds like Ctrl-C: temporary outputs are removed (SIGKILL cannot be caught)
        signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread: leave the default
        pass
    cli(prog_name="intruder")
