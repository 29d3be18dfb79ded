"""examples/chat_smollm2.py: its pieces on a tiny Llama (fast) and the real run on SmolLM2-135M-Instruct (slow)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "chat_smollm2.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("chat_smollm2_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_split_holds_out_every_answer_of_a_question(example):
    rows = [_chat(f"q{i % 20}", f"a{i}") for i in range(60)]  # 20 questions, 3 answers each
    train, held = example.split_by_question(rows, ["q3", "q7"], val_fraction=0.1, seed=1)
    q = lambda r: r["messages"][0]["content"]  # noqa: E731
    held_q, train_q = {q(r) for r in held}, {q(r) for r in train}
    assert {"q3", "q7"} <= held_q and not held_q & train_q
    assert len(held_q) == 2 + 2  # 10% of the 18 other questions, rounded
    assert len(train) + len(held) == 60 and len(held) == 3 * len(held_q)
    assert example.split_by_question(rows, ["q3", "q7"], 0.1, seed=1) == (train, held)  # seeded
    assert example.split_by_question(rows, ["q3"], val_fraction=0.0)[1] == [r for r in rows if q(r) == "q3"]


def test_heldout_loss_is_mean_ce_over_assistant_tokens(example, tiny_chat_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = tiny_chat_folder
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = [_chat("how are you", "i am fine thanks"), _chat("do you like music", "yes i like music a lot")]
    got = example.heldout_loss(model, tok, rows, max_length=64, batch_size=1)
    # reference: sum of -log p(token) over the assistant reply + <|im_end|> + "\n", over both rows, / count
    nll, n = 0.0, 0
    for row in rows:
        prompt = tok.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(row["messages"], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert ids[:len(p_ids)] == p_ids
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        for t in range(len(p_ids), len(ids)):
            nll -= float(logp[t - 1, ids[t]])
            n += 1
    assert n == 4 + 6 + 2  # "i am fine thanks", "yes i like music a lot", one <|im_end|> each
    assert got == pytest.approx(nll / n, rel=1e-5)


def test_method_settings_and_unknown_method(example):
    adapter, train, quantize = example.method_settings("adalora", 40)
    assert adapter["method"] == "adalora" and adapter["total_steps"] == 40 and not quantize
    assert example.method_settings("dora", 36)[0]["method"] == "dora"
    assert "full" not in example.METHODS and "lora_drop" not in example.METHODS
    with pytest.raises(ValueError, match="--method 'full'.*lora"):
        example.method_settings("full", 10)


def test_example_end_to_end_on_tiny_llama(example, tiny_chat_folder, tmp_path, capsys):
    """Train, answer, export, and re-load the merged folder in a process where lorakit cannot be imported."""
    folder, data = tiny_chat_folder
    out = tmp_path / "run"
    summary = example.main(["--model", str(folder), "--data", str(data), "--question", "how are you",
                            "--val-fraction", "0", "--method", "lora", "--steps", "25", "--batch-size", "4",
                            "--lr", "0.02", "--max-length", "48", "--max-new-tokens", "6", "--out", str(out),
                            "--no-progress"])
    printed = capsys.readouterr().out
    assert summary["train_rows"] == 12 and summary["heldout_rows"] == 6  # 3 questions x 6 copies; one held out
    losses = summary["train_losses"]
    assert len(losses) == 25 and sum(losses[-5:]) < 0.9 * sum(losses[:5])
    assert summary["merged_equal"] and summary["merged_answers"] == summary["after"]
    # not vacuous: training changed the answer, and the merged folder gives the trained one, not the base's
    assert summary["after"] != summary["before"] and summary["merged_answers"] != summary["before"]
    assert summary["lorakit_importable_in_check"] is False and summary["lorakit_modules_in_check"] == []
    assert "Q: how are you" in printed and "before:" in printed and "after:" in printed
    assert "equal the adapted model's for 1/1 questions" in printed
    merged = Path(summary["merged"])
    assert (merged / "config.json").exists() and not (merged / "lorakit_config.json").exists()
    assert json.loads((out / "summary.json").read_text())["after"] == summary["after"]


@pytest.mark.slow
def test_chat_example_on_smollm2(tmp_path):
    """The real run, shortened: SmolLM2-135M-Instruct + chatterbot (downloads 93 MB once into the cache)."""
    out = tmp_path / "chat"
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "16", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "dora"
    # held-out questions, assistant tokens only (36 steps: 2.63 -> 1.97); the per-batch training loss is too
    # noisy over 16 batches of 8 mixed conversations to assert a trend on
    assert summary["heldout_loss_after"] < 0.95 * summary["heldout_loss_before"]
    assert len(summary["train_losses"]) == 16
    for q, before, after in zip(summary["questions"], summary["before"], summary["after"]):
        assert f"Q: {q}" in proc.stdout and f"before: {before}" in proc.stdout and f"after:  {after}" in proc.stdout
        assert after.strip()
    assert summary["merged_equal"] and summary["merged_answers"] == summary["after"]
    assert summary["lorakit_importable_in_check"] is False
    assert "equal the adapted model's for 3/3 questions" in proc.stdout
    # the example ends in llama.cpp (llama-cpp-python is a dev dependency): SmolLM2's Q4_1 GGUF + the adapter as GGUF
    assert summary["llama_cpp_equal"] is not None and len(summary["llama_cpp_answers"]) == 3, proc.stdout[-2000:]
    assert all(answer.strip() for answer in summary["llama_cpp_answers"])
    assert "llama.cpp (" in proc.stdout and "greedy answers equal the adapted model's for" in proc.stdout
