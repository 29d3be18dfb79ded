"""lorakit.train.data: every file type and format, loss masks against plainly written references, row errors with
file and line, seeded splits, packing, collation, and batches a Trainer accepts."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import tiny_tokenizer

from lorakit import assets
from lorakit.train import data as D
from lorakit.train.data import IGNORE_INDEX, DataError

CORPUS = ["what is your name", "my name is bot", "how are you", "i am fine thanks", "be nice", "yes no",
          "user assistant system", "add 2 and 3", "the answer is 5", "numbers", "good bad film great awful"]


@pytest.fixture
def tok(tmp_path):
    """A word-level fast tokenizer with a ChatML chat template (see conftest), EOS '</s>', PAD '[PAD]'."""
    return tiny_tokenizer(tmp_path / "tok", CORPUS)


def _offline_or_slow(name: str, converted: bool = False):
    """Run in the fast suite when the asset is on this machine (for SmolLM2: already converted), else mark slow."""
    ready = (assets.cache_dir() / assets.SMOLLM2_DIR / "config.json").exists() if converted else \
        assets.available_offline(name)
    return (lambda test: test) if ready else pytest.mark.slow


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _supervised(example) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


ROWS = [{"text": "good film", "label": "pos"}, {"text": "awful", "label": "neg"}, {"text": "great", "label": "pos"}]


# -- reading files -----------------------------------------------------------------------------------------------
def test_file_types_give_the_same_rows_with_their_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]))
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "a.csv").write_text("text,label\ngood film,pos\nawful,neg\ngreat,pos\n")
    (tmp_path / "a.tsv").write_text("text\tlabel\ngood film\tpos\nawful\tneg\ngreat\tpos\n")
    for name in ("a.jsonl", "a.json", "a.csv", "a.tsv"):
        assert D.load_records(tmp_path / name) == ROWS, name
    assert [r.origin for r in D.load_records(tmp_path / "a.jsonl")] == \
        [f"{tmp_path / 'a.jsonl'}, line {n}" for n in (1, 2, 4)]  # the blank line 3 is skipped, still counted
    # json.dumps(indent=2) puts item k at line 2 + 4k ("[", then "{", two fields, "},")
    assert [r.origin.rsplit(" ", 1)[1] for r in D.load_records(tmp_path / "a.json")] == ["2", "6", "10"]
    assert [r.origin.rsplit(" ", 1)[1] for r in D.load_records(tmp_path / "a.csv")] == ["2", "3", "4"]
    mem = D.load_records(ROWS)
    assert mem == ROWS and mem[2].origin == "row 3"


def test_record_keeps_its_origin_through_pickle(tmp_path):
    rec = D.load_records([{"text": "x"}])[0]
    back = pickle.loads(pickle.dumps(rec))
    assert back == {"text": "x"} and back.origin == "row 1"


@pytest.mark.parametrize("name, content, where, what", [
    ("bad.jsonl", '{"text": "ok"}\n\n{"text": "broken"\n', "line 3", "not valid JSON"),
    ("bad.jsonl", '{"text": "ok"}\n["a list"]\n', "line 2", "expected a JSON object, got list"),
    ("bad.json", '[\n  {"text": "ok"},\n  {"text": oops}\n]', "line 3", "not valid JSON"),
    ("bad.json", '[\n  {"text": "ok"},\n  "a string"\n]', "line 3", "expected a JSON object, got str"),
    ("bad.json", '{"text": "ok"}\n{"text": "b"}\n', "line 2", "name it .jsonl"),
    ("bad.json", '{"text": "ok"}', "line 1", "expected a JSON array"),
    ("bad.csv", 'text,label\n"two\nlines",pos\nonly-one-field\n', "line 4", "has 1 fields but the header has 2"),
    ("bad.csv", 'text,text\na,b\n', "line 1", "repeated column names"),
    ("bad.csv", 'text,label\n"unterminated,pos\n', "line", "not valid CSV"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, where, what):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        D.load_records(path)
    assert str(info.value).startswith(f"{path}, {where}")
    assert what in str(info.value)


def test_missing_file_unknown_extension_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(ValueError, match="unknown extension '.parquet'"):
        D.load_records(tmp_path / "x.parquet")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no data rows"):
        D.load_records(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="movie_reviews, chatterbot"):
        D.load_source("no_such_dataset")


# -- formats -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row, fmt", [
    ({"text": "a"}, "text"),
    ({"text": "a", "label": 1}, "classification"),
    ({"instruction": "a", "output": "b"}, "instruction"),
    ({"instruction": "a", "input": "", "output": "b"}, "instruction"),
    ({"messages": []}, "chat"),
])
def test_detect_format(row, fmt):
    assert D.detect_format([row]) == fmt


def test_detect_format_unknown_keys_names_the_row(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"q.jsonl, line 1: cannot tell the data format from the keys "
                                        r"\['answer', 'question'\]"):
        D.detect_format(D.load_records(path))


@pytest.mark.parametrize("fmt, bad_row, what", [
    ("text", {"text": ""}, "field 'text' is empty"),
    ("text", {"text": 3}, "field 'text' must be a string, got int"),
    ("instruction", {"instruction": "add 2 and 3"}, "field 'output' is missing"),
    ("instruction", {"instruction": "add", "input": 5, "output": "5"}, "field 'input' must be a string"),
    ("chat", {"messages": [{"content": "hi"}]}, "message 1 has no 'role'"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     "message 2 (assistant) needs a string 'content'"),
    ("chat", {"messages": [{"role": "user", "content": "how are you"}]}, "no assistant message"),
    ("chat", {"messages": "[not json"}, "not valid JSON"),
    ("chat", {"messages": []}, "must be a non-empty list"),
    ("classification", {"text": "good"}, "field 'label' is missing"),
    ("classification", {"text": "good", "label": ""}, "field 'label' is empty"),
])
def test_malformed_rows_name_file_and_line(tmp_path, tok, fmt, bad_row, what):
    good = {"text": {"text": "be nice"}, "instruction": {"instruction": "add 2 and 3", "output": "5"},
            "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
            "classification": {"text": "good", "label": "pos"}}[fmt]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, good, bad_row, good)) + "\n")
    records = D.load_records(path)
    with pytest.raises(DataError) as info:
        D.encode(records, tok, fmt, max_length=64)
    assert str(info.value).startswith(f"{path}, line 3: ")
    assert what in str(info.value)


def test_text_format_labels_are_the_ids_plus_eos(tok):
    [ex] = D.encode([{"text": "how are you"}], tok, "text", max_length=16)
    assert ex["input_ids"] == _ids(tok, "how are you") + [tok.eos_token_id]
    assert ex["labels"] == ex["input_ids"] and ex["attention_mask"] == [1] * 4
    [cut] = D.encode([{"text": "i am fine thanks how are you"}], tok, "text", max_length=3)
    assert cut["input_ids"] == _ids(tok, "i am fine")


def test_instruction_loss_only_on_the_response(tok):
    row = {"instruction": "add 2 and 3", "input": "numbers", "output": "the answer is 5"}
    [ex] = D.encode([row], tok, "instruction", max_length=128)
    prompt, response = D.render_instruction(row)
    assert "### Input:\nnumbers" in prompt and response == "the answer is 5"
    # reference: prompt tokens carry no loss, then the response and EOS do
    n_prompt = len(_ids(tok, prompt))
    assert ex["input_ids"] == _ids(tok, prompt) + _ids(tok, response) + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * n_prompt + _ids(tok, response) + [tok.eos_token_id]
    [all_tokens] = D.encode([row], tok, "instruction", max_length=128, train_on_prompt=True)
    assert all_tokens["labels"] == all_tokens["input_ids"]
    no_input, _ = D.render_instruction({"instruction": "add", "output": "5"})
    assert "### Input" not in no_input


CONVERSATION = [{"role": "system", "content": "be nice"},
                {"role": "user", "content": "what is your name"},
                {"role": "assistant", "content": "my name is bot"},
                {"role": "user", "content": "yes"},  # the same text as the next reply: masks go by position
                {"role": "assistant", "content": "yes"}]


def test_chat_loss_only_on_assistant_turns_chatml(tok):
    [ex] = D.encode([{"messages": CONVERSATION}], tok, "chat", max_length=128)
    # reference, turn by turn: ChatML "<|im_start|>role\ncontent<|im_end|>\n"; the header never carries loss,
    # the content and <|im_end|> do for assistant turns only
    ids, labels = [], []
    for m in CONVERSATION:
        header = _ids(tok, "<|im_start|> " + m["role"])
        body = _ids(tok, m["content"] + " <|im_end|>")
        ids += header + body
        labels += [IGNORE_INDEX] * len(header) + (body if m["role"] == "assistant" else [IGNORE_INDEX] * len(body))
    assert ex["input_ids"] == ids
    assert ex["labels"] == labels
    assert tok.decode(_supervised(ex)) == "my name is bot <|im_end|> yes <|im_end|>"
    [everything] = D.encode([{"messages": CONVERSATION}], tok, "chat", max_length=128, train_on_prompt=True)
    assert everything["labels"] == ids


WORDPIECE_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP] {% endfor %}"
                      "{% if add_generation_prompt %}[assistant] {% endif %}")


@_offline_or_slow("minilm")
def test_chat_masking_with_a_real_wordpiece_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.minilm_path())
    tok.chat_template = WORDPIECE_TEMPLATE
    [ex] = D.encode([{"messages": CONVERSATION}], tok, "chat", max_length=128)
    expected = [t for m in CONVERSATION if m["role"] == "assistant" for t in _ids(tok, m["content"] + " [SEP]")]
    assert _supervised(ex) == expected
    assert ex["input_ids"] == _ids(tok, tok.apply_chat_template(CONVERSATION, tokenize=False))


@_offline_or_slow("smollm2", converted=True)
def test_chat_masking_with_smollm2_bpe_and_its_default_system_prompt():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.smollm2_path())
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}]
    [ex] = D.encode([{"messages": messages}], tok, "chat", max_length=256)
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert tok.decode(_supervised(ex)) == "Hello! How can I help?<|im_end|>\nyes<|im_end|>\n"
    # tokenised exactly as apply_chat_template tokenises for generation
    assert ex["input_ids"] == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_chat_template_that_is_not_prefix_consistent(tok):
    tok.chat_template = "{% for m in messages|reverse %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    with pytest.raises(DataError, match="row 1: the chat template does not render .* as a prefix"):
        D.encode([{"messages": CONVERSATION}], tok, "chat")


def test_chat_template_errors_and_missing_template(tok):
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}"
                         "{% endif %}{% for m in messages %}{{ m['content'] }} {% endfor %}")
    with pytest.raises(DataError, match="row 1: the tokenizer's chat template rejected .*start with a user turn"):
        D.encode([{"messages": CONVERSATION}], tok, "chat")
    tok.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        D.encode([{"messages": CONVERSATION}], tok, "chat")


def test_truncation_that_removes_every_assistant_token_is_an_error(tok):
    with pytest.raises(DataError, match=r"row 1: no assistant tokens are left .* max_length=6"):
        D.encode([{"messages": CONVERSATION}], tok, "chat", max_length=6)


# -- classification ----------------------------------------------------------------------------------------------
def test_classification_label_mapping_is_sorted_and_stable(tok):
    assert D.label_names(ROWS) == ["neg", "pos"] == D.label_names(ROWS[::-1])
    examples = D.encode(ROWS, tok, "classification", max_length=8)
    assert [e["labels"] for e in examples] == [1, 0, 1]
    assert examples[0]["input_ids"] == _ids(tok, "good film")
    # integer labels, also as CSV strings, sort numerically and keep their ids; "10" sorts after "2"
    numeric = [{"text": "a", "label": "10"}, {"text": "b", "label": 2}, {"text": "c", "label": 0.0}]
    assert D.label_names(numeric) == [0, 2, 10]
    assert [e["labels"] for e in D.encode(numeric, tok, "classification")] == [2, 1, 0]


def test_classification_label_errors(tok):
    with pytest.raises(DataError, match=r"row 2: label 'neutral' is not one of the known labels \['neg', 'pos'\]"):
        D.encode([{"text": "good", "label": "pos"}, {"text": "meh", "label": "neutral"}], tok, "classification",
                 labels=["neg", "pos"])
    with pytest.raises(DataError, match="row 2: label 'pos' is a name but other labels are integers"):
        D.label_names([{"text": "a", "label": 1}, {"text": "b", "label": "pos"}])
    with pytest.raises(ValueError, match="packing=True is for causal-LM formats"):
        D.encode(ROWS, tok, "classification", packing=True)


# -- split, packing, collation -----------------------------------------------------------------------------------
def test_split_is_seeded_and_complete():
    rows = list(range(100))
    train, val = D.split(rows, val_fraction=0.2, seed=7)
    assert (len(train), len(val)) == (80, 20)
    assert sorted(train + val) == rows and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)  # original order kept
    assert D.split(rows, 0.2, seed=7) == (train, val)
    assert D.split(rows, 0.2, seed=8)[1] != val
    assert D.split(rows, 0.0) == (rows, [])
    assert [len(p) for p in D.split([1, 2], 0.01)] == [1, 1]  # a positive fraction gives at least one row
    with pytest.raises(ValueError, match="val_fraction=1.0 is invalid"):
        D.split(rows, 1.0)


def test_packing_concatenates_with_eos_and_chunks(tok):
    rows = [{"text": "how are you"}, {"text": "i am fine thanks"}, {"text": "yes"}]
    blocks = D.encode(rows, tok, "text", max_length=4, packing=True)
    eos = tok.eos_token_id
    stream = _ids(tok, "how are you") + [eos] + _ids(tok, "i am fine thanks") + [eos] + _ids(tok, "yes") + [eos]
    assert [len(b["input_ids"]) for b in blocks] == [4, 4, 3]  # 11 tokens: two full blocks and the rest
    assert [t for b in blocks for t in b["input_ids"]] == stream
    assert all(b["labels"] == b["input_ids"] and b["attention_mask"] == [1] * len(b["input_ids"]) for b in blocks)
    # packed chat keeps its masks
    chat = D.encode([{"messages": CONVERSATION}] * 2, tok, "chat", max_length=16, packing=True)
    single = D.encode([{"messages": CONVERSATION}], tok, "chat", max_length=128)[0]
    assert [t for b in chat for t in b["labels"]] == single["labels"] * 2


def test_collator_pads_lm_and_classification(tok):
    lm = D.encode([{"text": "how are you"}, {"text": "yes"}], tok, "text")
    batch = D.Collator(tok)(lm)
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [lm[0]["input_ids"], lm[1]["input_ids"] + [pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist()[1] == lm[1]["input_ids"] + [IGNORE_INDEX] * 2
    left = D.Collator(tok, padding_side="left", pad_to_multiple_of=8)(lm)
    assert left["input_ids"].shape == (2, 8) and left["attention_mask"][1].tolist() == [0] * 6 + [1, 1]
    cls = D.Collator(tok)(D.encode(ROWS, tok, "classification"))
    assert cls["labels"].tolist() == [1, 0, 1] and cls["labels"].dtype == torch.long
    # pad == eos (common for causal LMs): a real EOS keeps its label, padding does not
    tok.pad_token = tok.eos_token
    batch = D.Collator(tok)(lm)
    assert batch["labels"][1].tolist() == lm[1]["labels"] + [IGNORE_INDEX] * 2


# -- with models and the Trainer ---------------------------------------------------------------------------------
def test_chat_batches_train_a_causal_lm(tiny_chat_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit
    from lorakit.train.trainer import TrainConfig, Trainer

    folder, path = tiny_chat_folder
    tok = AutoTokenizer.from_pretrained(folder)
    data = D.prepare(path, tok, val_fraction=0.2, max_length=32)
    assert data.format == "chat" and data.labels is None and (len(data.train), len(data.val)) == (14, 4)
    model = AutoModelForCausalLM.from_pretrained(folder)
    batch = D.Collator(tok)(data.train[:4])
    # the model's own loss equals cross-entropy over the assistant tokens only (reference, shifted by one)
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    reference = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(out.loss, reference, atol=1e-5)
    lorakit.attach(model, lorakit.AdapterConfig(r=2))
    result = Trainer(model, TrainConfig(steps=3, batch_size=4, progress=False), data.train, data.val,
                     collate_fn=D.Collator(tok), task="lm").train()
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert "perplexity" in result.final_eval


def test_classification_batches_train_a_classifier(tiny_classifier_folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import lorakit
    from lorakit.train.trainer import TrainConfig, Trainer

    folder, path = tiny_classifier_folder
    tok = AutoTokenizer.from_pretrained(folder)
    data = D.prepare(path, tok, val_fraction=0.25, max_length=16, seed=3)
    assert data.format == "classification" and data.labels == ["negative", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    lorakit.attach(model, lorakit.AdapterConfig(r=2, modules_to_save=["classifier"]))
    result = Trainer(model, TrainConfig(steps=2, batch_size=8, progress=False), data.train, data.val,
                     collate_fn=D.Collator(tok), task="classification").train()
    assert 0.0 <= result.final_eval["accuracy"] <= 1.0 and len(result.losses) == 2


@_offline_or_slow("chatterbot")
def test_named_sources():
    rows = D.load_source("chatterbot")
    assert D.detect_format(rows) == "chat" and len(rows) == 1176
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    assert rows[0].origin == "chatterbot row 1"
