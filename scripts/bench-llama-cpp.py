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

Both sides: the chat prompt "Write a long story about a dragon who learns to
cook." rendered by the model's own template, 64 greedy tokens; prefill =
prompt tokens / time to the first token, decode = tokens after the first /
their time (the `shardvisor bench model` definition).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

PROMPT = "Write a long story about a dragon who learns to cook."


def shardvisor_run(binary, model, weights, threads, runs):
    out = subprocess.run(
        [
            binary, "bench", "model", "--model", model, "--layouts", "single",
            "--weights", weights, "--threads", str(threads), "--runs", str(runs),
            "--json",
        ],
        check=True, capture_output=True, text=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if len(rows) != 1:
        sys.exit(f"shardvisor bench printed {len(rows)} rows, expected 1:\n{out}")
    return rows[0]


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
    parser.add_argument("--binary", default="target/release/shardvisor")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--weights", default="f32,q8_0,gguf")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")

    weights = args.weights.split(",")
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        llama = LlamaCpp(args.model, threads, 64)
        samples = {w: [] for w in weights + ["llama.cpp"]}
        for _ in range(args.rounds):
            for w in weights:
                samples[w].append(shardvisor_run(args.binary, args.model, w, threads, 1))
            samples["llama.cpp"].append(llama.measure())
        del llama
        reference = statistics.median(s["decode_tok_s"] for s in samples["llama.cpp"])
        for name, runs in samples.items():
            decode = statistics.median(s["decode_tok_s"] for s in runs)
            rows.append((
                threads,
                name if name == "llama.cpp" else f"shardvisor {name}",
                runs[0]["prompt_tokens"],
                statistics.median(s["prefill_tok_s"] for s in runs),
                decode,
                decode / reference,
            ))

    print(f"| threads | engine | prompt tokens | prefill tok/s | decode tok/s "
          f"| decode vs llama.cpp |  (medians of {args.rounds} rounds)")
    print("|---|---|---|---|---|---|")
    for threads, name, prompt_tokens, prefill, decode, ratio in rows:
        print(f"| {threads} | {name} | {prompt_tokens} | {prefill:.1f} | {decode:.1f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
