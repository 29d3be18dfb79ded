"""GGUF, the format llama.cpp, Ollama and LM Studio load: a LoRA adapter file and a merged model with a Modelfile.

What is written (files in the given folder; every other file there is left alone, and the writes are atomic):

* :func:`write_lora_adapter` -> ``adapter.gguf`` (:data:`ADAPTER_FILE`): llama.cpp's own LoRA adapter layout, for
  ``llama-cli -m base.gguf --lora adapter.gguf`` or ``llama_cpp.Llama(model_path=..., lora_path=...)``.
* :func:`write_merged_model` -> ``model.gguf`` (:data:`MODEL_FILE`, f32 / f16 / q8_0) and ``Modelfile``
  (:data:`MODELFILE`) for ``ollama create NAME -f Modelfile``.

llama.cpp's rules this follows (llama.cpp as vendored by llama-cpp-python 0.3.36, ``src/llama-adapter.cpp``
``llama_adapter_lora_init_impl`` and ``llama-adapter.h``; ``convert_lora_to_gguf.py``; ``conversion/llama.py``):

* the adapter file holds ``general.type = "adapter"``, ``adapter.type = "lora"``, ``general.architecture`` equal to
  the base model's (else "model arch and LoRA arch mismatch") and ``adapter.lora.alpha`` (float32);
* a layer's pair is ``<base tensor name>.lora_a`` / ``.lora_b``, e.g. ``blk.3.attn_q.weight.lora_a``; in numpy terms
  (GGUF lists dimensions reversed) ``lora_a`` is ``A [r, in]`` and ``lora_b`` is ``B [out, r]``, as PEFT stores them;
* llama.cpp computes ``W x + s * B (A x)`` with ``s = lora_scale * alpha / r`` (``r`` read from ``lora_b``): with
  lorakit's per-layer scaling folded into ``B`` and ``alpha = r`` (one rank for all layers, zero-padded), ``s`` is
  the user's ``lora_scale`` (1 by default);
* Llama-family GGUF files keep ``attn_q`` / ``attn_k`` rows in llama.cpp's rotary order (``LlamaModel.permute``):
  the same permutation applies to the output side of a LoRA pair, i.e. the rows of ``B`` only;
* only LoRA pairs on linear layers are read; a tensor that is not ``*.lora_a`` / ``*.lora_b`` (or a norm) aborts the
  load, so token-embedding and output-head adapters are refused here (export the merged model instead).

Example:
    >>> import lorakit, tempfile  # doctest: +SKIP
    >>> from transformers import AutoModelForCausalLM  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(lorakit.assets.smollm2_path())  # doctest: +SKIP
    >>> _ = lorakit.attach(model, lorakit.AdapterConfig(r=8, targets=["q_proj", "v_proj"]))  # doctest: +SKIP
    >>> write_lora_adapter(model, "default", tempfile.mkdtemp())["tensors"]  # doctest: +SKIP
    120
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import assets
from ..convert import uniform_lora_factors
from ..model import unload
from ..registry import adapted_layers, registry_or_none
from .files import atomic_folder

ADAPTER_FILE = "adapter.gguf"
MODEL_FILE = "model.gguf"
MODELFILE = "Modelfile"
#: transformers architectures whose GGUF layout is llama.cpp's "llama" (conversion/llama.py registers both)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_SUPPORTED_MODEL_TYPES = ("llama", "mistral")
MERGED_DTYPES = ("f32", "f16", "q8_0")
ADAPTER_DTYPES = ("f32", "f16")


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is part of lorakit[assets] and the dev extras
        raise ImportError("writing GGUF needs the gguf package: pip install gguf (or pip install 'lorakit[assets]')"
                          ) from None
    return gguf


@dataclass(frozen=True)
class LlamaLayout:
    """What the GGUF writer needs to know of a Llama-family model (read from its transformers config)."""

    architecture: str
    n_layers: int
    n_head: int
    n_head_kv: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    tie_word_embeddings: bool


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def llama_layout(config: Any) -> LlamaLayout:
    """The Llama-family layout of a transformers config (object or dict), or a ValueError naming the supported ones.

    Example:
        >>> llama_layout({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2,
        ...               "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}).n_head_kv
        2
    """
    archs = list(_get(config, "architectures", None) or [])
    model_type = _get(config, "model_type", None)
    known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if not known and not (not archs and model_type in _SUPPORTED_MODEL_TYPES):
        shown = ", ".join(archs) or f"model_type={model_type!r}"
        raise ValueError(f"GGUF export supports the Llama family ({', '.join(SUPPORTED_ARCHITECTURES)}: llama.cpp's "
                         f"'llama' layout); this model is {shown}. Export it for PEFT or merged instead")
    if _get(config, "num_local_experts", None):
        raise ValueError("GGUF export does not support mixture-of-experts Llama models (num_local_experts); "
                         "export it for PEFT or merged instead")
    n_head = int(_get(config, "num_attention_heads"))
    hidden = int(_get(config, "hidden_size"))
    rope = _get(config, "rope_parameters", None) or _get(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", _get(config, "rope_theta", 10000.0)) if isinstance(rope, Mapping) else 10000.0
    rope_type = (rope.get("rope_type") or rope.get("type") or "default") if isinstance(rope, Mapping) else "default"
    return LlamaLayout(
        architecture=known[0] if known else str(model_type), n_layers=int(_get(config, "num_hidden_layers")),
        n_head=n_head, n_head_kv=int(_get(config, "num_key_value_heads", None) or n_head), hidden_size=hidden,
        intermediate_size=int(_get(config, "intermediate_size", 0) or 0),
        head_dim=int(_get(config, "head_dim", None) or hidden // n_head),
        vocab_size=int(_get(config, "vocab_size", 0) or 0),
        context_length=int(_get(config, "max_position_embeddings", 0) or 0),
        rms_norm_eps=float(_get(config, "rms_norm_eps", 1e-6)), rope_theta=float(theta or 10000.0),
        rope_type=str(rope_type), tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)))


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """``weight``'s rows (first dimension) in llama.cpp's rotary order for ``n_head`` heads: within each head, the
    two halves of the head dimension are interleaved (llama.cpp's ``LlamaModel.permute``, applied to ``attn_q``
    with the query head count and to ``attn_k`` with the key/value head count).

    Example:
        >>> permute_rows(torch.arange(8.0), n_head=2).tolist()
        [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {rows} rows for {n_head} heads (needs a multiple of {2 * n_head})")
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _name_map(layout: LlamaLayout):
    gguf = _gguf()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layout.n_layers)


def _row_heads(gguf, kind, layout: LlamaLayout) -> int | None:
    """Heads to permute a tensor's rows for (q and k only), or None."""
    if kind == gguf.MODEL_TENSOR.ATTN_Q:
        return layout.n_head
    if kind == gguf.MODEL_TENSOR.ATTN_K:
        return layout.n_head_kv
    return None


def _map_tensor(name_map, name: str):
    """``(MODEL_TENSOR, gguf name)`` for a transformers tensor name, suffix kept: ``model.layers.0.self_attn.q_proj.weight``
    -> ``blk.0.attn_q.weight`` (a leading ``base_model.`` or missing ``model.`` tolerated), or None."""
    candidates = [name, name.removeprefix("base_model."), "model." + name]
    for candidate in candidates:
        found = name_map.get_type_and_name(candidate, try_suffixes=(".weight", ".bias"))
        if found is not None:
            return found
    return None


def _check_dtype(dtype: str, allowed: tuple[str, ...], what: str) -> None:
    if dtype not in allowed:
        raise ValueError(f"dtype={dtype!r} is not available for {what}; allowed: {', '.join(allowed)}")


def write_lora_factors(folder: str | os.PathLike, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       alpha: float, config: Any, dtype: str = "f32", filename: str = ADAPTER_FILE,
                       name: str | None = None) -> dict:
    """Write LoRA pairs ``{layer path: (A [r, in], B [out, r])}`` (one rank for all) as llama.cpp's GGUF adapter.

    ``config`` is the base model's transformers config (object or dict; Llama family only). ``alpha`` is written as
    ``adapter.lora.alpha``; llama.cpp scales each pair by ``alpha / r``, so pass ``alpha = r`` for factors whose
    scaling is already folded into ``B``. The rows of ``B`` of ``q_proj`` / ``k_proj`` are put in llama.cpp's rotary
    order (:func:`permute_rows`). Everything is checked before anything is written. Returns ``{"path", "rank",
    "alpha", "tensors", "layers", "dtype"}``.

    Example:
        >>> import tempfile
        >>> cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "num_attention_heads": 2,
        ...        "num_key_value_heads": 2, "hidden_size": 8}
        >>> pair = (torch.zeros(2, 8), torch.zeros(8, 2))
        >>> write_lora_factors(tempfile.mkdtemp(), {"model.layers.0.self_attn.q_proj": pair}, 2.0, cfg)["tensors"]
        2
    """
    gguf = _gguf()
    import numpy as np

    layout = llama_layout(config)
    _check_dtype(dtype, ADAPTER_DTYPES, "a GGUF LoRA adapter")
    if not factors:
        raise ValueError("no LoRA pairs to write (the adapter adapts no layer)")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha={alpha!r} is invalid; llama.cpp needs a positive adapter.lora.alpha")
    name_map = _name_map(layout)
    ranks = {int(a.shape[0]) for a, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"llama.cpp reads one rank per layer pair but one alpha per adapter: the pairs need one rank, "
                         f"got {sorted(ranks)} (use lorakit.convert.uniform_lora_factors, which zero-pads)")
    rank = ranks.pop()
    np_dtype = np.float32 if dtype == "f32" else np.float16
    tensors: list[tuple[str, Any]] = []
    for path, (a, b) in factors.items():
        a = a.detach().float().cpu()
        b = b.detach().float().cpu()
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{path}: expected A [r, in] and B [out, r], got {tuple(a.shape)} and {tuple(b.shape)}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{path}: the LoRA pair holds NaN or infinite values; nothing was written")
        found = _map_tensor(name_map, path + ".weight")
        if found is None:
            raise ValueError(f"{path}: no llama.cpp tensor corresponds to this layer (llama.cpp's name map for "
                             f"'llama'); adapt only the decoder's linear layers (q/k/v/o_proj, gate/up/down_proj)")
        kind, gguf_name = found
        if kind in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT):
            raise ValueError(f"{path}: llama.cpp's GGUF adapters do not carry token-embedding or output-head "
                             f"adapters here; drop them from the adapter or export the merged model "
                             f"(--for ollama / write_merged_model)")
        heads = _row_heads(gguf, kind, layout)
        if heads is not None:
            b = permute_rows(b, heads)
        tensors.append((gguf_name + ".lora_a", a.numpy().astype(np_dtype)))  # gguf_name ends in ".weight"
        tensors.append((gguf_name + ".lora_b", b.numpy().astype(np_dtype)))
    seen = [t for t, _ in tensors]
    if len(set(seen)) != len(seen):
        raise ValueError("two layer paths map to the same llama.cpp tensor; pass each layer once")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp / filename), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
            if name:
                writer.add_name(name)
            for tensor_name, data in tensors:
                writer.add_tensor(tensor_name, data)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_folder(Path(folder), write)
    return {"path": str(Path(folder) / filename), "rank": rank, "alpha": float(alpha), "tensors": len(tensors),
            "layers": len(factors), "dtype": dtype}


def _model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("GGUF export needs a transformers causal LM (a model with .config, e.g. "
                         "LlamaForCausalLM); this model has no config")
    return config


def _require_plain_lora(model: nn.Module, name: str) -> None:
    """Refuse a member without an exact low-rank form (DoRA...): converting it here would hide a choice of rank and
    its error; ``to_lora`` or ``export`` make that choice visible."""
    for _, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        try:
            adapter.as_lora_factors()
        except ValueError:
            raise ValueError(f"adapter {name!r} ({adapter.method}) is not a plain LoRA (no exact low-rank form at layer "
                             f"{adapter.path!r}); convert it first: "
                             f"lorakit.to_lora(model, {name!r}), or lorakit.export(model, folder, "
                             f"target='llama.cpp', name={name!r}) which converts and reports the error") from None


def write_lora_adapter(model: nn.Module, name: str, folder: str | os.PathLike, dtype: str = "f32") -> dict:
    """Write adapter ``name`` of a Llama-family transformers ``model`` as ``folder/adapter.gguf`` for llama.cpp.

    The adapter must be a plain LoRA in exact low-rank form (convert other members with ``lorakit.to_lora``);
    layers are brought to one rank (zero-padded) with their scaling folded into ``B`` and ``alpha = rank``, so
    llama.cpp's ``alpha / rank`` is 1. The model is not changed. Returns ``{"path", "rank", "alpha", "tensors",
    "layers", "dtype"}``. Load it with ``llama_cpp.Llama(model_path=BASE_GGUF, lora_path=...)`` or
    ``llama-cli -m BASE_GGUF --lora adapter.gguf``.

    Example:
        >>> write_lora_adapter(model, "default", "out/llama.cpp")  # doctest: +SKIP
        {'path': 'out/llama.cpp/adapter.gguf', 'rank': 8, 'alpha': 8.0, 'tensors': 420, 'layers': 210, 'dtype': 'f32'}
    """
    config = _model_config(model)
    llama_layout(config)  # the architecture is refused before any conversion work
    _require_plain_lora(model, name)
    factors, alpha, _ = uniform_lora_factors(model, name)
    return write_lora_factors(folder, factors, alpha, config, dtype=dtype, name=name)


# ---------------------------------------------------------------------------------------------------------------
# Merged model + Ollama's Modelfile
# ---------------------------------------------------------------------------------------------------------------
def _source_gguf(model: nn.Module, given: str | os.PathLike | None) -> Path:
    """The GGUF file whose tokenizer (and chat template) the merged model carries over."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise ValueError(f"tokenizer_gguf={str(given)!r} is not a file; pass the base model's GGUF file")
        return path
    folder = _get(_model_config(model), "name_or_path", None) or _get(_model_config(model), "_name_or_path", None)
    marker = Path(folder) / "lorakit_asset.json" if folder else None
    if marker is not None and marker.is_file():
        source = json.loads(marker.read_text()).get("gguf")
        if source == assets.SMOLLM2_GGUF:
            return Path(assets.smollm2_gguf_path())
    raise ValueError("the merged GGUF needs the base model's tokenizer in GGUF form: pass tokenizer_gguf=<the base "
                     "model's .gguf file> (lorakit finds it itself for models from lorakit.assets)")


def _tokenizer_fields(gguf, reader, vocab_size: int) -> list[tuple[str, Any, Any, Any]]:
    """Every ``tokenizer.*`` key of ``reader`` as ``(key, value, type, array element type)``, checked against the
    model's vocabulary size."""
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        is_array = field.types[0] == gguf.GGUFValueType.ARRAY
        fields.append((key, field.contents(), field.types[0], field.types[-1] if is_array else None))
    tokens = next((value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise ValueError("the tokenizer GGUF has no tokenizer.ggml.tokens; pass the base model's GGUF file")
    if vocab_size and len(tokens) != vocab_size:
        raise ValueError(f"the tokenizer GGUF has {len(tokens)} tokens but the model's vocabulary is {vocab_size}; "
                         f"pass the GGUF of this model's base")
    return fields


def _ollama_template(chat_template: str | None) -> tuple[str | None, str | None, list[str]]:
    """``(Go TEMPLATE, default SYSTEM, stop strings)`` for a recognised Jinja chat template; None where unknown."""
    if not chat_template:
        return None, None, []
    if "<|im_start|>" in chat_template:  # ChatML (SmolLM2, Qwen, ...)
        system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", chat_template, re.S)
        # Ollama puts SYSTEM first as a system message when a chat has none, which is what the Jinja template's
        # default-system branch does; so the template itself only renders the messages and the generation prompt.
        template = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                    "{{ end }}<|im_start|>assistant\n")
        return template, (system.group(1) if system else None), ["<|im_end|>", "<|im_start|>"]
    if "<|start_header_id|>" in chat_template:  # Llama 3
        template = ("<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
                    "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
        return template, None, ["<|eot_id|>", "<|start_header_id|>"]
    return None, None, []


def modelfile_text(chat_template: str | None, context_length: int = 0, model_file: str = MODEL_FILE) -> str:
    """Ollama's ``Modelfile`` for a merged GGUF: ``FROM``, the chat template in Ollama's Go-template syntax (ChatML
    and Llama 3 are recognised; otherwise Ollama reads the GGUF's own template), ``SYSTEM``, stop tokens, context.

    Example:
        >>> print(modelfile_text("{{'<|im_start|>' + m + '<|im_end|>'}}", 2048).splitlines()[0])
        FROM ./model.gguf
    """
    template, system, stops = _ollama_template(chat_template)
    lines = [f"FROM ./{model_file}", ""]
    if template is None:
        lines += ["# The chat template was not recognised as ChatML or Llama 3: Ollama uses the one stored in the",
                  "# GGUF file (tokenizer.chat_template). Add a TEMPLATE here if it does not."]
    else:
        lines += [f'TEMPLATE """{template}"""']
    if system:
        lines += [f'SYSTEM """{system}"""']
    lines += [""] + [f'PARAMETER stop "{s}"' for s in stops]
    if context_length:
        lines += [f"PARAMETER num_ctx {min(context_length, 4096)}"]
    return "\n".join(lines) + "\n"


def _merged_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """The plain weights of ``model`` with its active adapters merged, computed on a copy (the model is unchanged);
    and whether the output head is still tied to the token embeddings."""
    plain = copy.deepcopy(model)
    if registry_or_none(plain) is not None:
        unload(plain, merge=True)
    head = plain.get_output_embeddings() if hasattr(plain, "get_output_embeddings") else None
    embed = plain.get_input_embeddings() if hasattr(plain, "get_input_embeddings") else None
    tied = head is not None and embed is not None and head.weight is embed.weight
    return {k: v.detach() for k, v in plain.state_dict().items()}, tied


def write_merged_model(model: nn.Module, folder: str | os.PathLike, dtype: str = "f16",
                       tokenizer_gguf: str | os.PathLike | None = None, name: str | None = None) -> dict:
    """Write the Llama-family ``model`` with its active adapters merged as ``folder/model.gguf`` plus an Ollama
    ``Modelfile``; the model itself is not changed (the merge happens on a copy).

    ``dtype``: ``f32``, ``f16`` or ``q8_0`` for the 2-D weights (norms stay f32; a weight whose rows are not a
    multiple of 32 falls back to f16 under q8_0). The tokenizer and chat template are copied from
    ``tokenizer_gguf`` (the base model's GGUF; found automatically for models from :mod:`lorakit.assets`). Returns
    ``{"path", "modelfile", "dtype", "tensors", "template"}``; then ``ollama create NAME -f folder/Modelfile``.

    Example:
        >>> write_merged_model(model, "out/ollama", dtype="q8_0")["modelfile"]  # doctest: +SKIP
        'out/ollama/Modelfile'
    """
    gguf = _gguf()
    import numpy as np

    config = _model_config(model)
    layout = llama_layout(config)
    _check_dtype(dtype, MERGED_DTYPES, "a merged GGUF model")
    if layout.rope_type != "default":
        raise ValueError(f"rope_type={layout.rope_type!r} is not supported by lorakit's merged GGUF writer (it "
                         f"needs llama.cpp's rope scaling keys); only models with default RoPE are; export the "
                         f"adapter for llama.cpp on the base model's own GGUF instead")
    source = _source_gguf(model, tokenizer_gguf)
    reader = gguf.GGUFReader(str(source))
    tokenizer = _tokenizer_fields(gguf, reader, layout.vocab_size)
    name_map = _name_map(layout)
    state, tied = _merged_state(model)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    tensors: list[tuple[str, Any, Any]] = []
    for key, value in state.items():
        if tied and key.startswith("lm_head."):
            continue  # llama.cpp uses token_embd for a tied head (no output.weight)
        found = _map_tensor(name_map, key)
        if found is None:
            raise ValueError(f"{key}: no llama.cpp tensor corresponds to this weight (llama.cpp's 'llama' layout); "
                             f"lorakit's GGUF writer supports plain Llama-family decoders")
        kind, gguf_name = found
        data = value.float().cpu()
        heads = _row_heads(gguf, kind, layout)
        if heads is not None:
            data = permute_rows(data, heads)
        array = data.numpy()
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            tensors.append((gguf_name, array.astype(np.float32), None))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            tensors.append((gguf_name, gguf.quants.quantize(array, qtype), qtype))
        else:
            tensors.append((gguf_name, array.astype(np.float16), None))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    chat_template = None
    field = reader.fields.get("tokenizer.chat_template")
    if field is not None:
        chat_template = field.contents()
    modelfile = modelfile_text(chat_template, layout.context_length)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp / MODEL_FILE), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(name or f"{layout.architecture} merged by lorakit")
            writer.add_context_length(layout.context_length)
            writer.add_embedding_length(layout.hidden_size)
            writer.add_block_count(layout.n_layers)
            writer.add_feed_forward_length(layout.intermediate_size)
            writer.add_head_count(layout.n_head)
            writer.add_head_count_kv(layout.n_head_kv)
            writer.add_rope_freq_base(layout.rope_theta)
            writer.add_layer_norm_rms_eps(layout.rms_norm_eps)
            writer.add_rope_dimension_count(layout.head_dim)
            if layout.head_dim * layout.n_head != layout.hidden_size:
                writer.add_key_length(layout.head_dim)
                writer.add_value_length(layout.head_dim)
            writer.add_vocab_size(layout.vocab_size)
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for key, value, vtype, sub_type in tokenizer:
                writer.add_key_value(key, value, vtype, sub_type=sub_type)
            for tensor_name, data, raw in tensors:
                writer.add_tensor(tensor_name, data, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        (tmp / MODELFILE).write_text(modelfile, encoding="utf-8")

    atomic_folder(Path(folder), write)
    template, _, _ = _ollama_template(chat_template)
    return {"path": str(Path(folder) / MODEL_FILE), "modelfile": str(Path(folder) / MODELFILE), "dtype": dtype,
            "tensors": len(tensors), "template": "recognised" if template else "from the GGUF"}
