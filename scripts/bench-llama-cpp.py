#!/usr/bin/env python3
"""Single-process decode and prefill speed of shardvisor against llama.cpp
(llama-cpp-python) on the same GGUF file, prompt, token count and thread
count, measured side by side in one run.

The two are interleaved round by round (shardvisor, then llama.cpp, per
thread count) so that load from elsewhere on the machine hits both alike;
the table holds medians over the rounds.

    pip install llama-cpp-python   # builds llama.cpp from source
    cargo build --release
    python3 scripts/bench-llama-cpp.py --threads 1,2 --rounds 5
    # the quantizations people download, made by llama.cpp's quantizer:
    python3 scripts/bench-llama-cpp.py --quantize q4_k_m,q5_k_m,q6_k,q8_0,f16 \
        --layouts single,pipeline-2 --weights auto --rounds 3

Both sides: the chat prompt "Write a long story about a dragon who learns to
cook." rendered by the model's own template, 64 greedy tokens; prefill =
prompt tokens / time to the first token, decode = tokens after the first /
their time (the `shardvisor bench model` definition).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "Write a long story about a dragon who learns to cook."


def shardvisor_run(binary, model, weights, threads, layouts):
    """One fresh node, one instance per layout; one row per layout.
    `weights` may end in `@NAME=VALUE`: that variable is set for the node and
    its runners (e.g. `auto@SHARDVISOR_Q8_TILES=0`)."""
    env = dict(os.environ)
    if "@" in weights:
        weights, setting = weights.split("@", 1)
        name, value = setting.split("=", 1)
        env[name] = value
    out = subprocess.run(
        [
            binary, "bench", "model", "--model", model, "--layouts", ",".join(layouts),
            "--weights", weights, "--threads", str(threads), "--runs", "1", "--json",
        ],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if len(rows) != len(layouts):
        sys.exit(f"shardvisor bench printed {len(rows)} rows, expected {len(layouts)}:\n{out}")
    return {row["layout"]: row for row in rows}


def quantize(model, names, out_dir):
    """`model` requantized by llama.cpp's own quantizer to each of `names`
    (llama.cpp's ftype names, lower case: q4_k_m, q8_0, f16, ...)."""
    import llama_cpp

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(model))[0].split(".")[0]
    paths = []
    for name in names:
        dst = os.path.join(out_dir, f"{stem}.{name.upper()}.gguf")
        if not os.path.exists(dst):
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")
            params.allow_requantize = True
            params.nthread = 2
            if llama_cpp.llama_model_quantize(model.encode(), dst.encode(), params) != 0:
                sys.exit(f"llama_model_quantize {model} -> {dst} failed")
        paths.append(dst)
    return paths


class LlamaCpp:
    def __init__(self, model, threads, max_tokens):
        import jinja2
        from llama_cpp import Llama

        kwargs = dict(
            model_path=model, n_threads=threads, n_threads_batch=threads,
            n_ctx=512, n_batch=512, verbose=False,
        )
        try:
            # Multi-token batches can crash llama.cpp's extra buffer types on
            # CPUs with AMX; the plain CPU buffers are what is compared here.
            self.llm = Llama(use_extra_bufts=False, **kwargs)
        except TypeError:
            self.llm = Llama(**kwargs)
        template = self.llm.metadata["tokenizer.chat_template"]
        text = jinja2.Environment().from_string(template).render(
            messages=[{"role": "user", "content": PROMPT}],
            add_generation_prompt=True,
        )
        self.prompt = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        self.max_tokens = max_tokens
        self.measure()  # warm-up, like shardvisor's WarmingUp forward pass

    def measure(self):
        llm = self.llm
        llm.reset()
        started = time.perf_counter()
        first = last = None
        n = 0
        for token in llm.generate(self.prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
            if token == llm.token_eos() or n == self.max_tokens:
                break
        return {
            "prompt_tokens": len(self.prompt),
            "prefill_tok_s": len(self.prompt) / (first - started),
            "decode_tok_s": (n - 1) / (last - first) if n > 1 else float("nan"),
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--quantize", default="",
                        help="comma-separated llama.cpp types (q4_k_m,q8_0,f16,...): benchmark "
                             "--model requantized to each by llama.cpp instead of --model itself")
    parser.add_argument("--quant-dir", default="/tmp/shardvisor-bench-quants")
    parser.add_argument("--binary", default="target/release/shardvisor")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--weights", default="auto,f32,q8_0,gguf")
    parser.add_argument("--layouts", default="single")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")

    models = [args.model]
    if args.quantize:
        models = quantize(args.model, args.quantize.split(","), args.quant_dir)
    weights = args.weights.split(",")
    layouts = args.layouts.split(",")
    rows = []
    for model in models:
        for threads in [int(t) for t in args.threads.split(",")]:
            llama = LlamaCpp(model, threads, 64)
            ours = {(w, l): [] for w in weights for l in layouts}
            theirs = []
            for _ in range(args.rounds):
                for w in weights:
                    for layout, row in shardvisor_run(args.binary, model, w, threads, layouts).items():
                        ours[(w, layout)].append(row)
                theirs.append(llama.measure())
            del llama
            ref_decode = statistics.median(s["decode_tok_s"] for s in theirs)
            ref_prefill = statistics.median(s["prefill_tok_s"] for s in theirs)
            name = os.path.basename(model)
            for (w, layout), runs in ours.items():
                decode = statistics.median(s["decode_tok_s"] for s in runs)
                prefill = statistics.median(s["prefill_tok_s"] for s in runs)
                rss = " / ".join(f"{mb:.0f}" for mb in runs[-1]["peak_rss_mb"])
                rows.append((name, threads, f"shardvisor {w}", layout, prefill, prefill / ref_prefill,
                             decode, decode / ref_decode, rss))
            rows.append((name, threads, "llama.cpp", "single", ref_prefill, 1.0, ref_decode, 1.0, ""))

    print(f"| file | threads | engine | layout | prefill tok/s | vs llama.cpp | decode tok/s "
          f"| vs llama.cpp | peak RSS per runner MB |  (medians of {args.rounds} rounds)")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, threads, engine, layout, prefill, pr, decode, dr, rss in rows:
        print(f"| {name} | {threads} | {engine} | {layout} | {prefill:.1f} | {pr:.2f}× "
              f"| {decode:.1f} | {dr:.2f}× | {rss} |")


if __name__ == "__main__":
    main()
