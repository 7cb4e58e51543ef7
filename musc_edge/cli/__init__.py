"""The ``musc-edge`` command line: a click group whose commands load lazily.

Each command lives in ``musc_edge/commands/<name>.py`` and is imported only when it runs, so
``musc-edge --help`` stays fast and the scoring box never imports torch. A
:class:`~musc_edge.core.errors.MuscEdgeError` becomes one line on stderr and exit code 2; any other
exception is an internal error, exit code 1 (traceback only with ``--debug``).
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from musc_edge import __version__
from musc_edge.core.errors import MuscEdgeError

#: command name -> "module:attribute"
COMMANDS: dict[str, str] = {
    "export": "musc_edge.cli.commands.export:export",
    "score": "musc_edge.cli.commands.score:score",
    "watch": "musc_edge.cli.commands.watch:watch",
    "calibrate": "musc_edge.cli.commands.calibrate:calibrate",
    "threshold": "musc_edge.cli.commands.threshold:threshold",
}

HELP = {
    "export": "Export a backbone to ONNX (and optionally a TensorRT engine).",
    "score": "Score a folder of images offline; metrics when masks exist.",
    "watch": "Watch a folder and score each new image as it lands.",
    "calibrate": "Build an INT8 model from line images, with an accuracy report.",
    "threshold": "Compute a threshold from a scored run (labels, or known-good parts).",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:  # an optional extra is not installed
            missing = e.name or str(e)

            @click.command(name=name, help=HELP[name], context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def unavailable(args: tuple[str, ...]) -> None:
                raise MuscEdgeError(f"`musc-edge {name}` needs the module {missing!r}, which is not installed: "
                                    f"{_install_hint(name)}")

            return unavailable

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, HELP[n]) for n in self.list_commands(ctx)])


def _install_hint(name: str) -> str:
    return {
        "export": "pip install 'musc-edge[cpu,export]'",
        "calibrate": "pip install 'musc-edge[cpu,calib]'",
    }.get(name, "pip install 'musc-edge[cpu]' (or [gpu])")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="musc-edge")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, debug: bool) -> None:
    """musc-edge: MuSc zero-shot anomaly detection on the production line."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"debug": debug}


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map errors onto exit codes 0 / 1 / 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="musc-edge", standalone_mode=False)
    except MuscEdgeError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns bugs into exit 1
        if debug:
            raise
        click.echo(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
