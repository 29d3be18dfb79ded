"""Shared fixtures: small models built from configs (no hub), fixed seeds."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 64, layers: int = 2, tie: bool = False):
    """A tiny transformers Llama with random weights (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    return model


def tiny_gpt2(seed: int = 0):
    """A tiny GPT-2 (uses transformers' Conv1D, fan-in-fan-out weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(torch.nn.Module):
    """Conv2d + Embedding + Linear in one small module."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 4, 1)
        self.fc = torch.nn.Linear(4 * 5 * 5 + 8, 5)

    def forward(self, img, tok):
        h = self.conv2(torch.relu(self.conv(img))).flatten(1)
        return self.fc(torch.cat([h, self.emb(tok).mean(1)], dim=1))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def token_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (3, 10), generator=g)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(folder, corpus):
    """A word-level fast tokenizer built offline from ``corpus`` (with a ChatML chat template), saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<|im_start|>", "<|im_end|>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="</s>", additional_special_tokens=specials[4:6])
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


SENTIMENT = [("a gorgeous witty film", 1), ("a tedious mess", 0), ("great fun and moving", 1),
             ("dull and boring", 0), ("a wonderful clever story", 1), ("awful plot and bad acting", 0)]


@pytest.fixture
def tiny_classifier_folder(tmp_path):
    """A saved tiny BERT sequence classifier + tokenizer + a JSONL (text, label) file: (model_dir, data_file)."""
    import json

    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path / "tiny-bert"
    texts = [t for t, _ in SENTIMENT]
    tok = tiny_tokenizer(folder, texts)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     max_position_embeddings=64, num_labels=2))
    model.save_pretrained(folder)
    data = tmp_path / "sentiment.jsonl"
    rows = [{"text": t, "label": ["negative", "positive"][y]} for t, y in SENTIMENT * 8]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder, data


@pytest.fixture
def tiny_chat_folder(tmp_path):
    """A saved tiny Llama causal LM + ChatML tokenizer + a chat JSONL file: (model_dir, data_file)."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "tiny-llama"
    pairs = [("what is your name", "my name is bot"), ("how are you", "i am fine thanks"),
             ("do you like music", "yes i like music a lot")]
    corpus = [q for q, _ in pairs] + [a for _, a in pairs] + ["user assistant system"]
    tok = tiny_tokenizer(folder, corpus)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, bos_token_id=tok.cls_token_id))
    model.save_pretrained(folder)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs * 6]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder, data
