"""Quickstart: LoRA on a real pretrained model and real labelled data, end to end, on CPU in a few minutes.

all-MiniLM-L6-v2 (from its pip package, loaded offline with transformers) learns binary sentiment on the VADER
movie-review snippets. The script reports held-out accuracy before and after training, merges the adapter for
zero-overhead inference, saves it, reloads it into a fresh copy of the pretrained model and checks that the
reloaded model agrees with the merged one.

    python examples/quickstart.py [--steps 200] [--out runs/quickstart]
"""
from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import torch

import lorakit
from lorakit.assets import minilm_path, movie_reviews


def batches(rows, tokenizer, batch_size, max_length=64):
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        yield enc, torch.tensor([r["label"] for r in chunk])


@torch.no_grad()
def accuracy(model, rows, tokenizer) -> float:
    model.eval()
    correct = 0
    for enc, labels in batches(rows, tokenizer, 128):
        correct += (model(**enc).logits.argmax(-1) == labels).sum().item()
    return correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-size", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    pretrained = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    rows = movie_reviews()
    random.Random(0).shuffle(rows)
    held_out, train = rows[:args.eval_size], rows[args.eval_size:]
    print(f"model: all-MiniLM-L6-v2 from {path}")
    print(f"data: {len(rows)} movie-review snippets ({len(train)} train, {len(held_out)} held out)")

    model = copy.deepcopy(pretrained)
    lorakit.attach(model, lorakit.AdapterConfig(method="lora", r=8, alpha=16, modules_to_save=["classifier"],
                                                seed=0))
    print(lorakit.parameter_report(model))
    before = accuracy(model, held_out, tokenizer)
    print(f"held-out accuracy before training: {before:.3f}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20)
                                                 * max(0.0, 1 - s / args.steps))
    model.train()
    step, start, data = 0, time.time(), []
    while step < args.steps:
        if not data:
            data = list(batches(random.Random(step).sample(train, len(train)), tokenizer, args.batch_size))
        enc, labels = data.pop(0)
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, labels)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        step += 1
        if step % 25 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  {(time.time() - start) / step:.2f}s/step")
    after = accuracy(model, held_out, tokenizer)
    print(f"held-out accuracy after {args.steps} steps: {after:.3f} (before: {before:.3f})")

    folder = lorakit.save(model, args.out / "adapter")
    lorakit.merge(model)
    merged_acc = accuracy(model, held_out, tokenizer)
    reloaded = lorakit.load(copy.deepcopy(pretrained), folder)
    enc, _ = next(batches(held_out, tokenizer, 64))
    with torch.no_grad():
        diff = (reloaded.eval()(**enc).logits - model.eval()(**enc).logits).abs().max().item()
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"merged accuracy {merged_acc:.3f}; adapter saved to {folder} ({size / 1e6:.2f} MB); "
          f"reloaded vs merged max |logit diff| = {diff:.2e}")
    assert diff < 1e-4, "reloaded adapter disagrees with the merged model"
    assert abs(merged_acc - after) < 1e-9, "merging changed the predictions"
    print("OK")


if __name__ == "__main__":
    main()
