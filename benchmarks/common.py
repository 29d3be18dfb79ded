"""Shared benchmark harness: the core setup, side-by-side timing, bytes saved for backward, peak RSS, tables.

The core benchmark setup (issue 2): a transformers Llama built from a config (hidden 512, intermediate 1376,
4 layers, 8 heads, vocab 8000, random fp32 weights, seeded), a 4x128-token batch, causal-LM loss, adapters on all
seven linear layers (q, k, v, o, gate, up, down), AdamW, ``torch.set_num_threads(2)``.

Every contender is built from a deep copy of the *same* base model and trained side by side in one process:
after warm-up, each timed round runs one training step of every contender in turn (the starting contender rotates
each round), so load from other processes on the machine hits all contenders alike. We report medians and ratios.

Example (tiny sizes, runs in a second):
    >>> import torch
    >>> size = SIZES["quick"]
    >>> base = build_base(size)
    >>> floor = build_floor(copy.deepcopy(base), size)
    >>> times = alternate([floor], train_action(make_batch(size)), warmup=1, rounds=2)
    >>> len(times["floor"]) == 2 and min(times["floor"]) > 0
    True
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------------------
# the setup
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """Model and batch geometry of a benchmark run."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int
    warmup: int
    rounds: int


SIZES: dict[str, Size] = {
    # the core benchmark setup of issue 2
    "full": Size(hidden=512, intermediate=1376, layers=4, heads=8, vocab=8000, batch=4, seq=128, warmup=3, rounds=20),
    # smoke run: same code paths, tiny shapes, two rounds
    "quick": Size(hidden=64, intermediate=172, layers=2, heads=4, vocab=256, batch=2, seq=16, warmup=1, rounds=2),
}


def set_threads(n: int) -> None:
    """Pin intra-op and inter-op thread counts (inter-op can only be set once per process)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (e.g. inside pytest after other torch work)
        pass


def build_base(size: Size, seed: int = 0) -> nn.Module:
    """The Llama-style model of the setup, random fp32 weights from ``seed``, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.heads, max_position_embeddings=max(size.seq, 128),
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.train()
    return model


def make_batch(size: Size, seed: int = 1) -> dict[str, torch.Tensor]:
    """A fixed random token batch; labels = inputs (the model shifts them for the causal-LM loss)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def path_generator(path: str, seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))


def fill_low_rank(path: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Give an adapter's A [r, in] and B [out, r] values that depend only on the layer path, so two libraries hold
    identical weights. B is small but non-zero, so the adapter changes the output (and every gradient is real)."""
    g = path_generator(path)
    with torch.no_grad():
        bound = (1.0 / a.shape[1]) ** 0.5
        a.copy_((torch.rand(a.shape, generator=g) * 2 - 1) * bound)
        b.copy_(torch.randn(b.shape, generator=g) * 0.02)


# ---------------------------------------------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Contender:
    """A model in train mode plus how one training step runs on it."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    after_step: Callable[[], None] | None = None  # e.g. a method's training hook after optimizer.step()
    extra_loss: Callable[[], torch.Tensor | None] | None = None  # e.g. AdaLoRA's orthogonal regulariser
    note: str = ""

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One training step: forward, loss, backward, optimizer step (and the method's hook)."""
        loss = self.model(**batch).loss
        if self.extra_loss is not None:
            extra = self.extra_loss()
            if extra is not None:
                loss = loss + extra
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        if self.after_step is not None:
            self.after_step()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def adamw(model: nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    """AdamW with torch's defaults (the per-tensor loop on CPU) over the trainable parameters, the same for every
    contender; None when nothing trains. (``fused=True`` is faster on an idle machine but opens one parallel region
    per tensor, which costs milliseconds each when other processes hold the cores.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr) if params else None


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_floor(base: nn.Module, size: Size) -> Contender:
    """The frozen floor: forward + backward through every layer with no weight gradients at all.

    Every weight is frozen and there is no adapter; the embedding output is marked as requiring grad (what
    transformers' ``enable_input_require_grads`` does), so backward computes the input gradient of every layer —
    the work any adapter's backward must do anyway — and nothing else. No parameter trains, so there is no
    optimizer step. (Making only the final norm trainable would stop backward after the last layer: a floor that
    skips the layers is no floor.)
    """
    for p in base.parameters():
        p.requires_grad_(False)
    emb = base.get_input_embeddings()
    emb.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    return Contender("floor", base, None, note="frozen, no adapter; input grads through every layer, no weight grads")


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------
def train_action(batch: dict[str, torch.Tensor]) -> Callable[[Contender], Any]:
    return lambda c: c.step(batch)


def eval_action(batch: dict[str, torch.Tensor]) -> Callable[[Contender], Any]:
    """Inference forward (logits only) under ``torch.inference_mode``."""
    ids = batch["input_ids"]

    def run(c: Contender):
        with torch.inference_mode():
            return c.model(input_ids=ids).logits

    return run


def alternate(contenders: Sequence[Contender], action: Callable[[Contender], Any], warmup: int,
              rounds: int, cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of ``action`` for every contender, measured round-robin.

    Warm-up calls first (allocator and thread pools settle), then ``rounds`` rounds; each round runs every
    contender once, starting from a different one each round so no contender always follows the same neighbour.
    The garbage collector is paused while timing. If ``cpu_times`` is given it receives the process CPU seconds
    of every call (all threads), a view less sensitive to other processes taking the cores.
    """
    for _ in range(warmup):
        for c in contenders:
            action(c)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(rounds):
            k = i % len(contenders)
            for c in list(contenders[k:]) + list(contenders[:k]):
                c0, t0 = time.process_time(), time.perf_counter()
                action(c)
                times[c.name].append(time.perf_counter() - t0)
                if cpu_times is not None:
                    cpu_times.setdefault(c.name, []).append(time.process_time() - c0)
    finally:
        if was_enabled:
            gc.enable()
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def iqr(xs: Sequence[float]) -> float:
    if len(xs) < 4:
        return float(max(xs) - min(xs))
    q = statistics.quantiles(xs, n=4)
    return float(q[2] - q[0])


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of time(a)/time(b) within the same round: robust to slow stretches of the machine."""
    return median([x / y for x, y in zip(times[a], times[b])])


# ---------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------
def bytes_saved_for_backward(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of tensors autograd keeps for backward during one training forward.

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` is recorded by its storage (deduplicated by
    ``untyped_storage().data_ptr()``, so views and repeats count once). ``total`` counts all of them;
    ``activations`` leaves out storages that belong to the model's parameters and buffers (the weights exist
    anyway; what a method changes is what it keeps alive besides them).
    """
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. wrapper subclasses without storage
            return t
        ptr = st.data_ptr()
        if ptr not in seen:
            seen[ptr] = (st.nbytes(), ptr in owned)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    total = sum(n for n, _ in seen.values())
    weights = sum(n for n, own in seen.values() if own)
    return {"total": total, "activations": total - weights}


def resident_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (deduplicated by storage): the model's resident weight memory."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
    return sum(seen.values())


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_child(spec: str, size_name: str, threads: int, steps: int = 3) -> dict[str, int]:
    """Runs inside a fresh process: build one contender, then measure the peak RSS growth over ``steps``
    training steps above the RSS right after the build (optimizer state, gradients, activations, allocator)."""
    set_threads(threads)
    size = SIZES[size_name]
    module_name, builder_name = spec.split(":")
    sys.path.insert(0, str(HERE))
    builder = getattr(importlib.import_module(module_name), builder_name)
    contender = builder(build_base(size), size)
    batch = make_batch(size)
    gc.collect()
    before = _rss_bytes()
    exact = _reset_peak()
    for _ in range(steps):
        contender.step(batch)
    peak = _peak_bytes()
    return {"rss_after_build": before, "peak_rss": peak, "peak_growth": max(0, peak - before),
            "exact_reset": int(exact), "resident_model": resident_bytes(contender.model)}


def peak_rss(spec: str, size_name: str, threads: int, timeout: float = 600.0) -> dict[str, int] | None:
    """:func:`peak_rss_child` in a fresh interpreter (so each contender's peak is its own), or None on failure.

    ``MALLOC_MMAP_THRESHOLD_`` is pinned so glibc returns large freed blocks to the OS instead of caching them;
    the resident set then follows the live tensors closely."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(HERE) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(HERE / "common.py"), "--peak-child", spec, "--size", size_name,
           "--threads", str(threads)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        print(f"  [peak RSS of {spec} failed: {out.stderr.strip().splitlines()[-1:]}]", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# tables and metadata
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """A titled Markdown table; cells may be numbers (formatted per column) or text."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, table {self.title!r} has {len(self.columns)} columns")
        self.rows.append(list(cells))

    def markdown(self) -> str:
        def fmt(v: Any) -> str:
            if v is None:
                return "—"
            if isinstance(v, float):
                return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
            return str(v)

        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def _interpreter() -> str:
    exe = Path(sys.executable)
    return str(exe.relative_to(HERE.parent)) if exe.is_relative_to(HERE.parent) else exe.name


def metadata(argv: Sequence[str] | None = None, threads: int | None = None) -> dict[str, Any]:
    """What a reader needs to reproduce a result: command, versions, threads, date, machine load."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).is_absolute() and Path(argv[0]).resolve().is_relative_to(HERE.parent):
        argv[0] = str(Path(argv[0]).resolve().relative_to(HERE.parent))  # repo-relative, as typed at the root
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "command": " ".join(shlex.quote(a) for a in [_interpreter(), *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "bitsandbytes": version("bitsandbytes"),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def write_results(name: str, tables: Sequence[Table], meta: dict[str, Any], data: dict[str, Any],
                  out_dir: Path | None = None) -> tuple[Path, Path]:
    """Print the tables and write ``<out_dir>/<name>.md`` and ``<name>.json``."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    header = [f"## {name}", "", f"- command: `{meta['command']}`",
              f"- date: {meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, "
              f"peft {meta['peft']}; {meta['threads']} threads on {meta['cpu_count']} CPUs; "
              f"load average at start {meta['load_average_at_start']}", ""]
    text = "\n".join(header) + "\n" + "\n\n".join(t.markdown() for t in tables) + "\n"
    print(text)
    md_path, json_path = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md_path.write_text(text)
    payload = {"meta": meta, "tables": [asdict(t) for t in tables], "data": data}
    json_path.write_text(json.dumps(payload, indent=2, default=float))
    return md_path, json_path


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 2 rounds, no peak-RSS subprocesses")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20; quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds before timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peak", action="store_true", help="skip the per-contender peak-RSS subprocesses")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    return p


def resolve(args: argparse.Namespace) -> tuple[str, Size]:
    size_name = "quick" if args.quick else "full"
    size = SIZES[size_name]
    size = Size(**{**asdict(size), **({"rounds": args.rounds} if args.rounds else {}),
                   **({"warmup": args.warmup} if args.warmup is not None else {})})
    return size_name, size


def mib(n: int | float | None) -> float | None:
    return None if n is None else n / 2**20


if __name__ == "__main__":  # peak-RSS child process
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak-child", required=True)
    ap.add_argument("--size", default="full")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(json.dumps(peak_rss_child(a.peak_child, a.size, a.threads)))
