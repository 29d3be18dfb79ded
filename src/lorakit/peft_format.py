"""Kept for imports written before lorakit 0.2: PEFT's folder format now lives in :mod:`lorakit.io.peft`.

Example:
    >>> from lorakit.peft_format import is_peft_folder
    >>> import tempfile
    >>> is_peft_folder(tempfile.mkdtemp())
    False
"""
from .io.peft import (PEFT_CONFIG, PEFT_LORA_FEATURES, PEFT_TASK_TYPES, PEFT_UNSUPPORTED_INITS, PEFT_WEIGHTS,
                      PREFIX, UNSUPPORTED_LORA_OPTIONS, PeftFileMissing, PeftFormatError, infer_task_type,
                      is_peft_folder, load_peft, peft_adapter_folders, peft_loftq_settings, peft_to_lorakit,
                      read_peft_folder, save_peft)
from .methods.adalora import AdaLoraAdapter
from .methods.dora import DoraAdapter
from .methods.peft_lora import LORA_KEYS
from .methods.vera import VeraAdapter

#: per PEFT type: saved-key suffix -> lorakit tensor name (each method declares its own as ``peft_keys``)
DORA_KEYS = {k: v for k, v in DoraAdapter.peft_keys.items() if k not in LORA_KEYS}
VERA_KEYS = VeraAdapter.peft_keys
ADALORA_KEYS = AdaLoraAdapter.peft_keys

__all__ = ["ADALORA_KEYS", "DORA_KEYS", "LORA_KEYS", "PEFT_CONFIG", "PEFT_LORA_FEATURES", "PEFT_TASK_TYPES",
           "PEFT_UNSUPPORTED_INITS", "PEFT_WEIGHTS", "PREFIX", "UNSUPPORTED_LORA_OPTIONS", "VERA_KEYS",
           "PeftFileMissing", "PeftFormatError", "infer_task_type", "is_peft_folder", "load_peft",
           "peft_adapter_folders", "peft_loftq_settings", "peft_to_lorakit", "read_peft_folder", "save_peft"]
