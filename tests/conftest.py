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
