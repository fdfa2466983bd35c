"""The graftune command line. Thin: parse, call one library function, print. Errors users can cause print one
line and exit non-zero."""

from __future__ import annotations

import functools
import json
import sys

import typer

from graftune.errors import GraftuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Graft small trainable modules onto frozen pre-trained models.")


@app.callback()
def _root():
    """Graft small trainable modules onto frozen pre-trained models; train, compare and serve them on a CPU."""


def user_errors(fn):
    """GraftuneError -> one line on stderr and exit 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GraftuneError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)

    return wrapper


@app.command()
@user_errors
def methods(as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects.")):
    """List every adaptation method with a one-line description."""
    from graftune import list_methods

    rows = list_methods()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['description']}")


def main():  # pragma: no cover - entry point for `python -m graftune`
    sys.exit(app())
