"""The ``mergekit-lore`` command line."""

from pathlib import Path

import click


@click.group()
def main() -> None:
    """mergekit-lore tools (the merge itself runs through `mergekit-yaml`)."""


@main.command()
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--models", "count", default=3, show_default=True, help="Number of fine-tune-like models to build.")
def demo(workdir: Path, count: int) -> None:
    """Build a tiny Llama family locally and merge it with `mergekit-yaml` (method: lore)."""
    from mergekit_lore.demo import run_demo

    out = run_demo(workdir, count=count)
    click.echo(f"merged model written to {out}")
