"""The ``mergekit-lore`` command line."""

import click


@click.group()
def main() -> None:
    """mergekit-lore tools (the merge itself runs through `mergekit-yaml`)."""
