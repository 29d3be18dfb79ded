"""Run every benchmark (``./run.sh bench``): LoRA vs PEFT vs the floor, then the family sections.

Each benchmark runs in its own fresh interpreter so one cannot warm up (or fragment memory for) the next. Options
are passed through: ``--quick`` (tiny sizes, 2 rounds: a smoke run in well under a minute), ``--rounds N``,
``--threads N``, ``--no-peak``, ``--out DIR``; ``--only lora`` / ``--only methods`` / ``--only to_lora`` runs
one file, and ``--sections dora vera`` restricts the family benchmark.

Results: ``benchmarks/results/{lora,methods,to_lora}.md`` and ``.json`` (``*_quick`` for smoke runs), and a combined
``benchmarks/results/summary.md``.

Example:
    .venv/bin/python benchmarks/run_all.py --quick
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="run every lorakit benchmark")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-peak", action="store_true")
    p.add_argument("--out", type=Path)
    # "compile" (bench_compile.py: eager vs torch.compile; 2-3 min idle, far longer on a busy machine) runs when asked
    p.add_argument("--only", choices=["lora", "methods", "to_lora", "compile"], nargs="+",
                   default=["lora", "methods", "to_lora"])
    p.add_argument("--sections", nargs="+", help="family sections to run (see bench_methods.py --help)")
    args = p.parse_args(argv)

    common: list[str] = []
    if args.quick:
        common.append("--quick")
    for flag, value in (("--rounds", args.rounds), ("--warmup", args.warmup), ("--threads", args.threads),
                        ("--out", args.out)):
        if value is not None:
            common += [flag, str(value)]
    if args.no_peak:
        common.append("--no-peak")

    out_dir = args.out or HERE / "results"
    suffix = "_quick" if args.quick else ""
    failures, parts = [], []
    for name in args.only:
        script = HERE / f"bench_{name}.py"
        cmd = [sys.executable, str(script), *common]
        if name == "methods" and args.sections:
            cmd += ["--only", *args.sections]
        print(f"[run_all] {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"[run_all] {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failures.append(name)
    for name in ("lora", "methods", "to_lora", "compile"):  # the latest result of each, including ones not rerun now
        md = Path(out_dir) / f"{name}{suffix}.md"
        if md.exists():
            parts.append(md.read_text())
    if parts:
        summary = Path(out_dir) / f"summary{suffix}.md"
        summary.write_text("# lorakit benchmarks\n\n" + "\n\n".join(parts))
        print(f"[run_all] wrote {summary}")
    if failures:
        print(f"[run_all] failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
