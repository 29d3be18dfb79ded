"""Export an adapter for where it will be served: PEFT, vLLM, SGLang, llama.cpp, Ollama or a merged model.

Each target gets what it loads, normalised to what it reads, and :func:`check_export` lists what a folder would
break in a target. The rules come from each server's source (read 2026-11):

* **vLLM** – ``vllm/lora/peft_helper.py`` (``PEFTHelper._validate_features`` / ``validate_legal``, vLLM 0.9–0.11):
  ``modules_to_save`` must be None, ``use_dora`` is refused, ``bias != "none"`` needs ``--enable-lora-bias`` (removed
  later), ``r`` must not exceed ``--max-lora-rank``, one of ``(8, 16, 32, 64, 128, 256, 320, 512)``
  (``vllm/config.py`` ``LoRAConfig.__post_init__``); the scale is ``lora_alpha / r`` (``/ √r`` with ``use_rslora``)
  for the whole adapter: ``rank_pattern``/``alpha_pattern`` are not read. ``vllm/lora/lora_model.py``
  (``LoRAModel.from_local_checkpoint``) refuses any tensor of a module outside the LoRA-able layers (saved heads) and
  DoRA magnitudes.
* **SGLang** – ``python/sglang/srt/lora/lora.py`` (``LoRAAdapter``, 2024-25): ``peft_type`` must be LORA, the scale is
  ``lora_alpha / r`` for the whole adapter (``use_rslora`` is ignored), q/k/v and gate/up LoRA weights of a layer are
  stacked, built from q_proj / gate_proj (a missing k/v/up is zero-filled); ``lora_config.py`` reads ``use_dora``,
  which it does not run. Rank/alpha patterns are only read by recent versions (``rank_overrides``); lorakit writes
  none.
* **llama.cpp** – ``convert_lora_to_gguf.py`` (b6000-era): one ``lora_alpha`` for the adapter (``adapter.lora.alpha``;
  the runtime scales each tensor by ``alpha / its rank``), ``use_rslora`` and ``alpha_pattern`` are ignored, any
  tensor that is not a ``lora_A``/``lora_B`` (or a norm) aborts the conversion (DoRA magnitudes, saved heads).
* Init markers (``init_lora_weights`` of pissa/olora/loftq/corda..., a ``loftq_config``): the adapter then belongs to
  a base its init modified; servers load the original base, so the outputs would be wrong.

:func:`export` writes PEFT's layout (``lorakit.io.peft``'s writer) for ``peft``/``vllm``/``sglang``; GGUF
(``llama.cpp``, ``ollama``) through :mod:`lorakit.io.gguf`; ``merged``: a transformers folder.
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..convert import ToLoraReport, describe_conversion, to_lora
from ..lowrank import check_rank_energy
from ..methods import get_method
from ..methods.peft_lora import PEFT_BASE_CHANGING_INITS, peft_init_changes_base
from ..model import active_adapters, delete, registry, set_active, unload
from ..registry import adapter_entries
from .api import load
from .files import atomic_folder, check_save_target
from .gguf import write_lora_adapter, write_merged_model
from .lorakit_format import CONFIG_FILE
from .peft import PEFT_CONFIG, PEFT_WEIGHTS, save_peft

__all__ = ["TARGETS", "ExportReport", "check_export", "export"]

#: every export target, with what it holds
TARGETS = {
    "peft": "PEFT adapter folder (each member in its own PEFT type where PEFT has one, else as plain LoRA)",
    "vllm": "PEFT folder of one plain LoRA: one rank and alpha, no DoRA/rsLoRA/patterns/heads (vLLM --enable-lora)",
    "sglang": "PEFT folder of one plain LoRA: one rank and alpha, no DoRA/rsLoRA/patterns/heads (SGLang --lora-paths)",
    "llama.cpp": "GGUF LoRA adapter (llama-cli --lora)",
    "ollama": "merged GGUF model plus a Modelfile (ollama create)",
    "merged": "transformers folder with the adapter merged into the weights",
}
#: vLLM's allowed --max-lora-rank values (vllm/config.py, LoRAConfig.__post_init__, vLLM 0.8+)
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
#: PEFT init_lora_weights values whose adapter needs the base its init modified (LoRA's PEFT rule, kept here under
#: its 0.1.0 name)
BASE_CHANGING_INITS = PEFT_BASE_CHANGING_INITS
#: (general.type, adapter.type) of a llama.cpp GGUF LoRA adapter (llama.cpp's own adapter layout; a GGUF key's value,
#: not a lorakit method name)
GGUF_LORA_ADAPTER = ("adapter", "lora")


@dataclass
class ExportReport:
    """What :func:`export` wrote and changed, and the largest output difference it causes on a probe input."""

    target: str
    folder: Path
    name: str
    changes: list[str] = field(default_factory=list)
    conversion: ToLoraReport | None = None
    max_logit_diff: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [f"export of adapter {self.name!r} for {self.target} -> {self.folder}"]
        rows += [f"  - {line}" for line in self.changes] or ["  - nothing changed: written as it is"]
        diff = ("not measured (pass probe=<input ids>)" if self.max_logit_diff is None
                else f"{self.max_logit_diff:.3g}")
        rows.append(f"  largest output difference on the probe (max |Δlogit|): {diff}")
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# checking a folder
# ---------------------------------------------------------------------------------------------------------------
def check_export(folder: str | os.PathLike, target: str) -> list[str]:
    """What the PEFT adapter folder ``folder`` would break in ``target`` (one line each); empty = fine.

    ``target``: ``peft``, ``vllm``, ``sglang`` or ``llama.cpp`` (a PEFT folder to be converted with
    ``convert_lora_to_gguf.py``, or a folder holding a GGUF adapter). The rules and their sources are in this
    module's docstring.

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="dora", r=2))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/dora", format="peft")
        >>> check_export(folder, "vllm")[0][:40]
        'use_dora: vLLM refuses DoRA adapters (vl'
    """
    _check_target(target)
    if target in ("ollama", "merged"):
        return _check_model_folder(Path(folder), target)
    folder = Path(folder)
    if target == "llama.cpp" and list(folder.glob("*.gguf")):
        return _check_gguf_folder(folder)
    cfg_file, w_file = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not cfg_file.is_file() or not w_file.is_file():
        return [f"{folder} is not a PEFT adapter folder ({PEFT_CONFIG} and {PEFT_WEIGHTS} needed)"]
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        with safe_open(str(w_file), framework="pt") as f:
            keys = list(f.keys())
            ranks = {k: f.get_slice(k).get_shape() for k in keys}
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return [f"{folder}: unreadable ({err})"]
    if not isinstance(cfg, dict):
        return [f"{cfg_file}: not a JSON object"]
    if target == "peft":
        return [] if cfg.get("peft_type") else [f"{cfg_file}: no peft_type"]
    problems: list[str] = []
    server = {"vllm": "vLLM", "sglang": "SGLang", "llama.cpp": "llama.cpp"}[target]
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        problems.append(f"peft_type={cfg.get('peft_type')!r}: {server} loads LoRA adapters only")
    if cfg.get("use_dora"):
        where = {"vllm": "vllm/lora/peft_helper.py", "sglang": "sglang/srt/lora/lora_config.py reads it but runs "
                 "plain LoRA", "llama.cpp": "convert_lora_to_gguf.py aborts on the magnitude tensors"}[target]
        problems.append(f"use_dora: {server} refuses DoRA adapters ({where}); export with lorakit export --for "
                        f"{target}, which converts DoRA to plain LoRA")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg['modules_to_save']}: {server} cannot load whole trained modules "
                        f"(heads); train without them or serve the merged model")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        problems.append(f"bias={cfg.get('bias')!r}/lora_bias: {server} serves LoRA without trained biases "
                        f"(vLLM only behind --enable-lora-bias in old versions)")
    init = cfg.get("init_lora_weights")
    if peft_init_changes_base(cfg):
        problems.append(f"init_lora_weights={init!r}{' / loftq_config' if cfg.get('loftq_config') else ''}: the "
                        f"adapter belongs to a base its init modified, but {server} loads the original base; export "
                        f"with lorakit (PiSSA becomes a plain LoRA for the original weights)")
    if cfg.get("use_rslora") and target != "vllm":
        problems.append(f"use_rslora: {server} scales by lora_alpha / r and ignores use_rslora, so the adapter is "
                        f"mis-scaled by √r; fold the scale (lorakit export --for {target})")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) and (target != "llama.cpp" or key == "alpha_pattern"):
            problems.append(f"{key}: {server} reads one rank and one alpha for the whole adapter and ignores "
                            f"{key}, so those layers are mis-scaled; export with one rank (scale folded into B)")
    lora_keys = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
    other = [k for k in keys if not k.endswith(lora_keys)]
    if target == "llama.cpp":
        other = [k for k in other if not ("_layernorm" in k or ".norm" in k)]
    if other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        problems.append(f"tensors that are not LoRA A/B pairs ({shown}): {server} refuses them (DoRA magnitudes, "
                        f"saved heads)")
    r = cfg.get("r")
    if target == "vllm" and isinstance(r, int) and r > max(VLLM_MAX_RANKS):
        problems.append(f"r={r}: vLLM's largest --max-lora-rank is {max(VLLM_MAX_RANKS)}; export with rank <= "
                        f"{max(VLLM_MAX_RANKS)} (lorakit export --rank)")
    if target in ("vllm", "sglang") and isinstance(r, int):
        bigger = sorted({k for k, shape in ranks.items() if k.endswith(".lora_A.weight") and shape[0] > r})
        if bigger:
            problems.append(f"layers with a rank above r={r} ({bigger[0]}...): {server} allocates r per layer")
    if target == "sglang":
        problems += _sglang_stacking(keys)
    return problems


def _sglang_stacking(keys: list[str]) -> list[str]:
    """SGLang stacks a layer's q/k/v and gate/up LoRA weights into one (``LoRAAdapter.normalize_qkv_proj`` /
    ``normalize_gate_up_proj``, python/sglang/srt/lora/lora.py, 2025): a missing k/v or up is zero-filled, but the
    stack is built from q_proj / gate_proj, which must be there."""
    leads = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    found: dict[str, set[str]] = {}
    for key in keys:
        m = re.search(r"^(.*)\.(\w+)\.lora_A\.weight$", key)
        if m:
            found.setdefault(m.group(1), set()).add(m.group(2))
    for prefix, have in sorted(found.items()):
        for member, lead in leads.items():
            if member in have and lead not in have:
                return [f"{prefix}: SGLang stacks {lead} with {member} into one LoRA weight and builds it from "
                        f"{lead}, which this adapter does not adapt there (sglang/srt/lora/lora.py); add {lead} to "
                        f"the targets"]
    return []


def _check_gguf_folder(folder: Path) -> list[str]:
    try:
        from gguf import GGUFReader
    except ImportError:
        return ["the gguf package is needed to check a GGUF file (pip install gguf)"]
    problems = []
    for path in sorted(folder.glob("*.gguf")):
        reader = GGUFReader(str(path))
        fields = reader.fields

        def text(key: str) -> str | None:
            fld = fields.get(key)
            return None if fld is None else bytes(fld.parts[fld.data[0]]).decode("utf-8", "replace")

        if (text("general.type"), text("adapter.type")) != GGUF_LORA_ADAPTER:
            problems.append(f"{path.name}: not a GGUF LoRA adapter (general.type={text('general.type')!r}, "
                            f"adapter.type={text('adapter.type')!r})")
        if "adapter.lora.alpha" not in fields:
            problems.append(f"{path.name}: no adapter.lora.alpha")
        names = [t.name for t in reader.tensors]
        odd = [n for n in names if not n.endswith((".lora_a", ".lora_b"))]
        if odd:
            problems.append(f"{path.name}: tensors that are not lora_a/lora_b ({', '.join(odd[:3])})")
    return problems


def _check_model_folder(folder: Path, target: str) -> list[str]:
    if target == "ollama":
        problems = [] if list(folder.glob("*.gguf")) else [f"{folder}: no .gguf model file"]
        return problems + ([] if (folder / "Modelfile").is_file() else [f"{folder}: no Modelfile"])
    if not (folder / "config.json").is_file():
        return [f"{folder}: no config.json (not a transformers model folder)"]
    if not list(folder.glob("*.safetensors")):
        return [f"{folder}: no .safetensors weights"]
    return []


def _check_target(target: Any) -> None:
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not an export target; choose one of {', '.join(TARGETS)}")


# ---------------------------------------------------------------------------------------------------------------
# exporting
# ---------------------------------------------------------------------------------------------------------------
def export(model: nn.Module, folder: str | os.PathLike, target: str = "peft", name: str = "default",
           rank: int | None = None, energy: float | None = None, probe: torch.Tensor | None = None,
           dtype: str = "f16", tokenizer: Any = None) -> ExportReport:
    """Write adapter ``name`` into ``folder`` for ``target`` and report what changed and what it costs.

    * ``peft``: PEFT's folder; members PEFT has a type for (LoRA, rsLoRA, DoRA, VeRA, AdaLoRA, PiSSA as rank-2r
      LoRA...) as they are, the rest (Delta-LoRA) converted to plain LoRA by :func:`lorakit.to_lora`;
    * ``vllm``/``sglang``: PEFT's folder of one plain LoRA, every member converted by ``to_lora(uniform=True)``:
      one rank for every layer (zero padding), scale folded into B, ``lora_alpha = r``, no rsLoRA flag, no
      patterns; ``modules_to_save`` heads are refused;
    * ``llama.cpp``: a GGUF LoRA adapter; ``ollama``: a merged GGUF model (``dtype`` f32/f16/q8_0) with a Modelfile;
    * ``merged``: a transformers folder (``save_pretrained``) with the adapter merged (plus ``tokenizer`` if given).

    ``rank``/``energy`` bound the converted rank (a warning gives the error). The largest ``|Δlogit|`` between the
    model with the adapter and what was written is measured on ``probe`` (input ids; default: 8 random tokens for a
    model with ``config.vocab_size``). Refusals raise before anything is written; folders are written atomically;
    the model is left as it was (its active adapters too).

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="dora", r=2))
        >>> report = lorakit.export(net, tempfile.mkdtemp() + "/vllm", target="vllm", probe=torch.randn(2, 8))
        >>> report.max_logit_diff < 1e-4, lorakit.check_export(report.folder, "vllm")
        (True, [])
    """
    _check_target(target)
    reg = registry(model)
    if name not in reg.configs:
        raise ValueError(f"export: unknown adapter {name!r}; this model has {list(reg.configs)}")
    check_rank_energy(rank, energy, "export")
    if (rank is not None or energy is not None) and target in ("merged", "ollama"):
        raise ValueError(f"export: rank/energy bound a conversion to plain LoRA; target {target!r} merges the adapter "
                         f"exactly, so drop them (or export --for peft/vllm/sglang/llama.cpp)")
    if dtype not in ("f32", "f16", "q8_0"):
        raise ValueError(f"export: dtype={dtype!r} is invalid; allowed: f32, f16, q8_0")
    folder = Path(folder)
    report = ExportReport(target=target, folder=folder, name=name)
    active = list(active_adapters(model))
    try:
        if target in ("peft", "vllm", "sglang"):
            _export_peft_like(model, folder, target, name, rank, energy, probe, report)
        elif target == "llama.cpp":
            _export_gguf_adapter(model, folder, name, rank, energy, probe, report)
        else:
            _export_merged(model, folder, target, name, probe, dtype, tokenizer, report)
    finally:
        if active:
            set_active(model, active)
    return report


def _export_peft_like(model, folder, target, name, rank, energy, probe, report) -> None:
    reg = registry(model)
    config = reg.configs[name]
    strategy = get_method(config.method)
    heads = list(reg.modules_to_save.get(name, []))
    server = target != "peft"
    if server and heads:
        raise ValueError(f"export --for {target}: adapter {name!r} trains whole modules {heads} (modules_to_save); "
                         f"{target} loads LoRA pairs only (vllm/lora/peft_helper.py refuses modules_to_save). Export "
                         f"the merged model (--for merged) or train without modules_to_save")
    check_save_target(folder, "peft", CONFIG_FILE, "lorakit")
    native = not server and rank is None and energy is None and _writes_natively(strategy, name, config, model)
    tmp = _free_name(model, f"{name}__export")
    written = name
    if not native:
        report.conversion = to_lora(model, name, new_name=tmp, rank=rank, energy=energy, uniform=server)
        written = tmp
        report.changes.append(describe_conversion(report.conversion))
        if server:
            report.changes.append(f"one rank for every layer: r = lora_alpha = {report.conversion.uniform_rank} "
                                  f"(scale folded into B, lower ranks zero-padded; no use_rslora, no patterns)")
        if "ORIGINAL" in report.conversion.base:
            report.changes.append("the member moved the base weights: the LoRA written is for the ORIGINAL base")
        if reg.extra.get(tmp, {}).get("base"):
            report.changes.append(f"the LoRA applies to the base it was fitted to ({report.conversion.base}); serve "
                                  f"it on that base")
        if heads:
            report.changes.append(f"modules_to_save {heads} written as PEFT's modules_to_save")
    else:
        report.changes.append(f"written as PEFT {strategy.peft_type} (PEFT runs this member natively)")
    try:
        save_peft(model, folder, [written])
        if server:
            bad = check_export(folder, target)
            if bad:  # lorakit wrote it; a rule it breaks is a lorakit bug, said plainly
                report.changes.append("check_export found: " + "; ".join(bad))
        # what was written, read back into the model, against the member
        report.max_logit_diff = _reload_diff(model, folder, name, probe)
    finally:
        if tmp in reg.configs:
            delete(model, tmp)


def _reload_diff(model, folder: Path, name: str, probe) -> float | None:
    """max |Δlogit| between the model with adapter ``name`` and with the adapter read back from ``folder``."""
    probe = _probe(model, probe)
    if probe is None:
        return None
    back = _free_name(model, f"{name}__written")
    load(model, folder, name=back)
    try:
        return _diff(model, probe, name, back)
    finally:
        delete(model, back)


def _diff(model, probe, first: str, second: str) -> float:
    return float((_run(model, probe, first) - _run(model, probe, second)).abs().max())


def _run(model, probe, name: str | None) -> torch.Tensor:
    if name is not None:
        set_active(model, name)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=probe) if _is_lm(model) else model(probe)
    finally:
        model.train(was_training)
    out = getattr(out, "logits", out)
    return out.float()


def _is_lm(model) -> bool:
    return getattr(getattr(model, "config", None), "vocab_size", None) is not None


def _probe(model, probe):
    if probe is not None:
        return probe
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        return None
    device = next(model.parameters()).device
    return torch.randint(0, int(vocab), (1, 8), generator=torch.Generator().manual_seed(0)).to(device)


def _writes_natively(strategy, name, config, model) -> bool:
    """True when the member's own PEFT translation accepts it (a dry run of ``to_peft``, nothing written)."""
    if strategy.peft_type is None:
        return False
    entries = adapter_entries(model, name)
    try:
        strategy.to_peft(name, config, entries, registry(model).shared.get(name))
    except ValueError:
        return False
    return True


def _free_name(model, base: str) -> str:
    taken = set(registry(model).configs)
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}{i}"
    return name


def _export_gguf_adapter(model, folder, name, rank, energy, probe, report) -> None:
    # the one-rank plain LoRA the GGUF holds, built on the side: its error against the member is measured on the
    # model, then the GGUF writer writes exactly it (with rank/energy, the bounded conversion, not the exact one)
    tmp = _free_name(model, f"{name}__export")
    try:
        report.conversion = to_lora(model, name, new_name=tmp, rank=rank, energy=energy, uniform=True)
        report.changes.append(describe_conversion(report.conversion))
        report.changes.append(f"one rank and alpha for the adapter (adapter.lora.alpha = r = "
                              f"{report.conversion.uniform_rank}, scale folded into B, zero padding)")
        if "ORIGINAL" in report.conversion.base:
            report.changes.append("the member moved the base weights: the LoRA written is for the ORIGINAL base")
        p = _probe(model, probe)
        report.max_logit_diff = _diff(model, p, name, tmp) if p is not None else None
        report.details = dict(write_lora_adapter(model, tmp, folder) or {})
    finally:
        if tmp in registry(model).configs:
            delete(model, tmp)


def _export_merged(model, folder, target, name, probe, dtype, tokenizer, report) -> None:
    if target == "merged" and not hasattr(model, "save_pretrained"):
        raise ValueError("export --for merged writes a transformers folder and needs a transformers model "
                         "(save_pretrained); for another nn.Module use lorakit.unload(model, merge=True) and "
                         "torch/safetensors yourself")
    if target == "merged":
        check_save_target(folder, "merged", CONFIG_FILE, "lorakit")
    twin = copy.deepcopy(model)
    set_active(twin, name)
    plain = unload(twin, merge=True)
    p = _probe(model, probe)
    if p is not None:
        report.max_logit_diff = float((_run(model, p, name) - _run(plain, p, None)).abs().max())
    report.changes.append(f"adapter {name!r} merged into the base weights")
    if target == "ollama":
        # the merged copy (no adapters left) goes to the GGUF writer; the model itself is never changed
        report.details = dict(write_merged_model(plain, folder, dtype=dtype) or {})
        return

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_folder(folder, write)
