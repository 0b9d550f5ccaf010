"""The ``mergekit-lore`` command line.

- ``mergekit-lore demo WORKDIR``: build a tiny Llama family and merge it with ``mergekit-yaml``.
- ``mergekit-lore export CONFIG OUT [--merged] [--export-dtype D] [mergekit options]``:
  run the lore merge through mergekit and write ``OUT/base`` (theta_0) plus one PEFT LoRA
  adapter per source model under ``OUT/adapters`` (see ``mergekit_lore.export``); written
  into a temporary sibling of OUT and renamed into place, so an interrupted export leaves
  OUT as it was.
- ``mergekit-lore spectrum CONFIG --out fig.png [--layers PATTERN ...]``: plot the singular
  value decay of the task vectors (see ``mergekit_lore.spectrum``).
- ``mergekit-lore merge-adapters BASE ADAPTER... OUT [--rank R] [--merged] [lore options]``:
  merge PEFT LoRA adapters of one base with lore, exactly in core space, into one adapter
  (or a merged model; see ``mergekit_lore.adapters``).

For a per-tensor report of an ordinary ``mergekit-yaml`` run set
``MERGEKIT_LORE_REPORT=report.jsonl`` (see ``mergekit_lore.report``).
"""

from pathlib import Path
from typing import Optional, Tuple

import click
from mergekit.options import MergeOptions, add_merge_options


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


@main.command()
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--merged/--no-merged", "keep_merged", default=False, show_default=True,
              help="Also keep the merged model in OUT/merged (otherwise it goes to a temp dir that is removed).")
@click.option("--export-dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="dtype of OUT/base and the adapters; auto: the config's out_dtype/dtype, else float32.")
@click.option("--force", is_flag=True,
              help="Replace an existing export in OUT (other files in OUT stay). OUT changes only once the "
                   "export is complete.")
@add_merge_options
def export(
    merge_options: MergeOptions,
    config_file: Path,
    out_path: Path,
    keep_merged: bool,
    export_dtype: str,
    force: bool,
) -> None:
    """Merge CONFIG_FILE with lore and export theta_0 + one LoRA adapter per source model to OUT_PATH."""
    from mergekit_lore.export import export_lore

    merge_options.apply_global_options()
    source = config_file.read_text(encoding="utf-8")
    try:
        result = export_lore(
            source,
            out_path,
            merge_options,
            keep_merged=keep_merged,
            export_dtype=export_dtype,
            config_source=source,
            force=force,
        )
    except (FileExistsError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"base (theta_0): {result.base}")
    for info in result.adapters.values():
        error = "n/a" if info.relative_error is None else f"{info.relative_error:.4g}"
        ranks = list(info.targets.values()) + list(info.parameters.values())
        line = (
            f"adapter {info.path}: {len(info.targets)} LoRA modules"
            + (f" + {len(info.parameters)} LoRA parameters" if info.parameters else "")
            + f", max rank {max(ranks, default=0)}, modules_to_save {len(info.modules_to_save)}, "
            f"relative distance to the source model {error}"
        )
        if info.residual:
            line += f", residual tensors {len(info.residual)} (not expressible as LoRA; see lore_export.json)"
        click.echo(line)
    if result.merged:
        click.echo(f"merged model: {result.merged}")
    click.echo(f"report: {result.report}")
    click.echo(result.storage_line())


@main.command()
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Figure to write (PNG, or any format matplotlib knows from the suffix).")
@click.option("--layers", "patterns", multiple=True, metavar="PATTERN",
              help="Tensor names to plot: glob (fnmatch) or, prefixed with 're:', a regular expression. "
                   "Repeatable. Default: the 2-D weights of the middle layer.")
@click.option("--max-tensors", default=12, show_default=True, help="Plot at most this many tensors.")
@click.option("--top", default=None, type=int, help="Plot only the first TOP singular values.")
@click.option("--normalize/--no-normalize", default=True, show_default=True,
              help="Divide by the largest singular value of each task vector.")
@click.option("--data", "data_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the singular values as JSON.")
@add_merge_options
def spectrum(
    merge_options: MergeOptions,
    config_file: Path,
    out_file: Path,
    patterns: Tuple[str, ...],
    max_tensors: int,
    top: Optional[int],
    normalize: bool,
    data_file: Optional[Path],
) -> None:
    """Plot the singular value decay of the task vectors theta_i - reference (the paper's Figure 1).

    reference = the config's base_model if it has one, else the mean of the models.
    """
    from mergekit_lore.spectrum import plot_spectrum, task_vector_spectra

    merge_options.apply_global_options()
    try:
        result = task_vector_spectra(
            config_file.read_text(encoding="utf-8"),
            patterns=list(patterns),
            max_tensors=max_tensors,
            options=merge_options,
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    plot_spectrum(result, out_file, top=top, normalize=normalize)
    if data_file is not None:
        result.save_json(data_file)
    click.echo(f"{len(result.tensors)} tensors x {len(result.models)} models ({result.reference_label}) -> {out_file}")
    for tensor in result.tensors:
        ranks = ", ".join(
            f"{result.short_name(m)}: {result.effective_rank(tensor, m)}" for m in result.models
        )
        click.echo(f"  {tensor}: rank for 90% energy {ranks}")


def _floats(text: Optional[str]):
    """'0.2' or '0.2,0.3,0.1' (one per adapter) -> list of floats (None stays None)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as error:
        raise click.BadParameter(f"expected a number or comma-separated numbers, got {text!r}") from error


# Option -> lore parameter, with the help text; defaults are the method's (LORE_PARAMETERS).
_ADAPTER_OPTIONS = (
    ("--mu", "mu", "Absolute threshold(s), one or one per adapter (overrides --mu-ratio)."),
    ("--mu-ratio", "mu_ratio", "Threshold(s) as a fraction of s_1(B_i A_i), one or one per adapter."),
    ("--weight", "weight", "Per-adapter weight(s) for the combine."),
    ("--lambda", "lambda", "Scale of the combined task vectors."),
    ("--combine", "combine", "sum or average (ties needs dense entries: use mergekit-yaml)."),
    ("--base-mode", "base_mode", "anchor, fixed, init, or none (this tool: the base-free problem)."),
    ("--base-weight", "base_weight", "Anchor strength (base_mode anchor)."),
    ("--solver", "solver", "fista or cd."),
    ("--max-iter", "max_iter", "Iteration cap."),
    ("--tol", "tol", "Relative stopping tolerance (fista)."),
)
_PER_ADAPTER = ("mu", "mu_ratio", "weight")


def _lore_options(command):
    """Add one option per entry of ``_ADAPTER_OPTIONS``, showing the method's default."""
    from mergekit_lore.params import parameter_defaults

    defaults = parameter_defaults()
    for flag, name, text in reversed(_ADAPTER_OPTIONS):
        command = click.option(flag, name, default=None,
                               help=f"{text} [default: {defaults[name]}]")(command)
    return command


@main.command("merge-adapters")
@click.argument("base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER... OUT", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Cap every module's output rank (best approximation; the error is reported). Default: exact.")
@click.option("--merged", is_flag=True, help="Write the full base model with the merged update instead of an adapter.")
@_lore_options
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="auto: float32 adapter, or the base's dtype with --merged.")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
def merge_adapters_command(base, paths, rank, merged, dtype, force, **options) -> None:
    """LoRE-merge PEFT LoRA adapters ADAPTER_1 .. ADAPTER_n of BASE into one adapter OUT (last path).

    Solved exactly in core space (the same result as method: lore on the merged-in models).
    """
    from mergekit_lore.adapters import merge_adapters
    from mergekit_lore.params import LoreParameterError

    if len(paths) < 2:
        raise click.UsageError("give at least one adapter and the output directory: BASE ADAPTER... OUT")
    *adapters, out = paths
    parameters = {
        name: (_floats(value) if name in _PER_ADAPTER else value)
        for name, value in options.items() if value is not None
    }
    try:
        result = merge_adapters(base, adapters, out, parameters=parameters, rank=rank, merged=merged,
                                dtype=dtype, force=force)
    except (FileExistsError, ValueError, LoreParameterError) as error:
        raise click.ClickException(str(error)) from error
    ranks = [m.rank for m in result.modules.values()]
    what = "merged model" if merged else "adapter"
    click.echo(f"{what} written to {result.out}: {len(ranks)} modules, rank {min(ranks)}..{max(ranks)}, "
               f"{result.seconds:.2f} s")
    if rank is not None:
        click.echo(f"max relative truncation error at --rank {rank}: {result.max_truncation_error:.3g}")
    for name, modules in result.missing.items():
        click.echo(f"note: {name} does not target {len(modules)} module(s); its update there is 0")
