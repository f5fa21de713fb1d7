#!/usr/bin/env python3
"""Time to first token for long prompts: shardvisor (single and pipeline-2)
against llama.cpp (llama-cpp-python) on the same GGUF file, prompt and
thread count, side by side in one run.

    pip install llama-cpp-python   # builds llama.cpp from source
    cargo build --release
    python3 scripts/bench-ttft.py --sizes 512,2048,7000 --threads 2 --rounds 3

Each size's prompt is one user message of a repeated sentence, grown until
the chat prompt (the model's own template, rendered with jinja2 and
tokenized by llama.cpp) holds at least that many tokens; both engines get
the same text. Rounds interleave the engines (shardvisor's layouts, then
llama.cpp) so that load from elsewhere falls on all alike; the table holds
medians. TTFT = submission to the first generated token, with no prompt
cache (llama.cpp is reset before every run; shardvisor has none).
shardvisor's instances are started before the clock starts, as llama.cpp's
model is loaded before it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SENTENCE = ("The river ran past the old mill, and the miller counted sacks of grain "
            "while his daughter read about ships, stars and distant cities. ")


def shardvisor_rows(binary, model, weights, threads, layouts, prompt_file):
    out = subprocess.run(
        [binary, "bench", "model", "--model", model, "--layouts", layouts,
         "--weights", weights, "--threads", str(threads), "--runs", "1",
         "--prompt-file", prompt_file, "--max-tokens", "2", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--binary", default="target/release/shardvisor")
    parser.add_argument("--sizes", default="512,2048,7000")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default="q8_0")
    parser.add_argument("--layouts", default="single,pipeline-2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import jinja2
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python and jinja2 are needed: pip install llama-cpp-python")

    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=8192, n_batch=512, verbose=False)
    template = jinja2.Environment().from_string(llm.metadata["tokenizer.chat_template"])

    def chat_tokens(text):
        rendered = template.render(messages=[{"role": "user", "content": text}],
                                   add_generation_prompt=True)
        return llm.tokenize(rendered.encode(), add_bos=False, special=True)

    def llama_ttft(tokens):
        llm.reset()
        started = time.perf_counter()
        for _ in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, reset=True):
            return time.perf_counter() - started

    rows = []
    tmp = tempfile.mkdtemp()
    for size in [int(s) for s in args.sizes.split(",")]:
        text = ""
        while len(chat_tokens(text)) < size:
            text += SENTENCE
        tokens = chat_tokens(text)
        path = os.path.join(tmp, f"prompt-{size}.txt")
        with open(path, "w") as f:
            f.write(text)
        llama_ttft(chat_tokens("warm up"))
        samples = {}
        for _ in range(args.rounds):
            for w in args.weights.split(","):
                for row in shardvisor_rows(args.binary, args.model, w, args.threads, args.layouts, path):
                    key = (f"shardvisor {row['layout']} {w}", row["prompt_tokens"])
                    samples.setdefault(key, []).append(row["ttft_ms"])
            samples.setdefault(("llama.cpp", len(tokens)), []).append(llama_ttft(tokens) * 1000)
        reference = statistics.median(samples[("llama.cpp", len(tokens))])
        for (name, n), ttfts in samples.items():
            ttft = statistics.median(ttfts)
            rows.append((size, name, n, ttft, n / ttft * 1000, reference / ttft))
        print(f"size {size} done", file=sys.stderr, flush=True)

    print(f"| prompt | engine | prompt tokens | TTFT ms | prefill tok/s | speed vs llama.cpp |"
          f"  (medians of {args.rounds} rounds, {args.threads} threads)")
    print("|---|---|---|---|---|---|")
    for size, name, n, ttft, speed, ratio in rows:
        print(f"| {size} | {name} | {n} | {ttft:.0f} | {speed:.1f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
