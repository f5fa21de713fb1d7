#!/usr/bin/env python3
"""Batched throughput of shardvisor against llama.cpp (llama-cpp-python's
low-level `llama_batch` API) on the same GGUF file, prompts, token count,
thread count and client counts, measured side by side in one run.

llama.cpp's side is what its `batched` example and its server do: one
context with a sequence per client, every prompt prefilled in one
`llama_decode`, then one `llama_decode` per step with each sequence's last
token (its own `seq_id` and position), greedy sampling of each sequence's
logits. shardvisor's side is `shardvisor bench load` (an embedded node,
real runner processes, N streaming clients at once). The two alternate
round by round so that load from elsewhere on the machine hits both alike;
the table holds medians over the rounds.

    # llama.cpp built for this CPU (CI's wheel is portable, AVX2 only):
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36
    cargo build --release
    python3 scripts/bench-llama-cpp-batched.py --threads 2 --clients 1,2,4,8,16 --rounds 3

Prompts: client i asks "Write a long story about a dragon who learns to
cook. Make it story number i." rendered by the model's own chat template,
64 tokens each (llama.cpp's side generates exactly 64; shardvisor's stops
earlier only at an end-of-text token). Aggregate = every client's tokens
over the round's wall time, prefills included; decode = the tokens after
each stream's first over the time from the first to the last, summed over
the streams (the `bench load` definitions).

`--llama-model` names the file llama.cpp runs when it should differ from
shardvisor's (e.g. the same weights requantized to Q8_0 by llama.cpp's own
quantizer, the format shardvisor's `q8_0` computes in).
"""

import argparse
import ctypes
import os
import re
import statistics
import subprocess
import sys
import time

PROMPT = "Write a long story about a dragon who learns to cook."


def client_prompt(i):
    return f"{PROMPT} Make it story number {i + 1}."


def shardvisor_round(binary, model, weights, threads, clients, max_tokens):
    """One `bench load` run of a single runner: {clients: (aggregate, decode)}."""
    out = subprocess.run(
        [
            binary, "bench", "load", "--model", model, "--layouts", f"single:{threads}",
            "--weights", weights, "--clients", ",".join(map(str, clients)),
            "--max-tokens", str(max_tokens), "--long-prompt", "0",
        ],
        check=True, capture_output=True, text=True,
    ).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0] == "single" and cells[2].isdigit():
            rows[int(cells[2])] = (float(cells[3]), float(cells[5]))
    if sorted(rows) != sorted(clients):
        sys.exit(f"shardvisor bench load printed rows for {sorted(rows)}, expected {clients}:\n{out}")
    return rows


class LlamaCppBatched:
    """One llama.cpp model; a fresh context per client count."""

    def __init__(self, path, threads, max_tokens):
        import jinja2
        import llama_cpp as L
        import numpy as np  # a llama-cpp-python dependency

        self.np = np

        self.L = L
        L.llama_backend_init()
        params = L.llama_model_default_params()
        load = getattr(L, "llama_model_load_from_file", None) or L.llama_load_model_from_file
        self.model = load(path.encode(), params)
        if not self.model:
            sys.exit(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.threads = threads
        self.max_tokens = max_tokens
        buf = ctypes.create_string_buffer(1 << 16)
        n = L.llama_model_meta_val_str(self.model, b"tokenizer.chat_template", buf, len(buf))
        if n < 0:
            sys.exit(f"{path} has no tokenizer.chat_template")
        template = jinja2.Environment().from_string(buf.value.decode())
        self.template = template

    def tokens(self, text):
        L = self.L
        raw = text.encode()
        arr = (L.llama_token * (len(raw) + 16))()
        n = L.llama_tokenize(self.vocab, raw, len(raw), arr, len(arr), False, True)
        if n < 0:
            sys.exit(f"llama_tokenize needs {-n} tokens")
        return list(arr[:n])

    def prompt(self, i):
        text = self.template.render(
            messages=[{"role": "user", "content": client_prompt(i)}],
            add_generation_prompt=True,
        )
        return self.tokens(text)

    def context(self, n_seq, n_ctx, n_batch):
        L = self.L
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        make = getattr(L, "llama_init_from_model", None) or L.llama_new_context_with_model
        ctx = make(self.model, params)
        if not ctx:
            sys.exit("llama.cpp could not make a context")
        return ctx

    def measure(self, n):
        """N clients: (aggregate tok/s, decode tok/s)."""
        L = self.L
        prompts = [self.prompt(i) for i in range(n)]
        total_prompt = sum(map(len, prompts))
        per_seq = max(map(len, prompts)) + self.max_tokens + 8
        ctx = self.context(n, n * per_seq, max(total_prompt, n, 512))
        batch = L.llama_batch_init(max(total_prompt, n), 0, n)
        try:
            def decode(entries):
                """entries: (token, pos, seq, wants logits); returns the
                batch index of each entry that wants logits."""
                batch.n_tokens = len(entries)
                out = []
                for k, (tok, pos, seq, logits) in enumerate(entries):
                    batch.token[k] = tok
                    batch.pos[k] = pos
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = seq
                    batch.logits[k] = logits
                    if logits:
                        out.append(k)
                rc = L.llama_decode(ctx, batch)
                if rc != 0:
                    sys.exit(f"llama_decode returned {rc}")
                return out

            np = self.np

            def greedy(k):
                row = L.llama_get_logits_ith(ctx, k)
                return int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())

            started = time.perf_counter()
            entries = []
            for s, p in enumerate(prompts):
                entries += [(t, i, s, i == len(p) - 1) for i, t in enumerate(p)]
            rows = decode(entries)
            last = [greedy(k) for k in rows]
            first_at = time.perf_counter()
            pos = [len(p) for p in prompts]
            for _ in range(self.max_tokens - 1):
                rows = decode([(last[s], pos[s], s, True) for s in range(n)])
                last = [greedy(k) for k in rows]
                pos = [p + 1 for p in pos]
            ended = time.perf_counter()
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)
        aggregate = n * self.max_tokens / (ended - started)
        decode_rate = n * (self.max_tokens - 1) / (ended - first_at) if self.max_tokens > 1 else float("nan")
        return aggregate, decode_rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--llama-model", default="", help="the file llama.cpp runs (default: --model)")
    parser.add_argument("--binary", default="target/release/shardvisor")
    parser.add_argument("--weights", default="q8_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")
    clients = [int(c) for c in args.clients.split(",")]
    llama_path = args.llama_model or args.model
    llama = LlamaCppBatched(llama_path, args.threads, args.max_tokens)
    llama.measure(1)  # warm-up, like shardvisor's WarmingUp forward pass
    ours = {n: [] for n in clients}
    theirs = {n: [] for n in clients}
    for _ in range(args.rounds):
        for n, row in shardvisor_round(args.binary, args.model, args.weights, args.threads,
                                       clients, args.max_tokens).items():
            ours[n].append(row)
        for n in clients:
            theirs[n].append(llama.measure(n))

    def med(rows, i):
        return statistics.median(r[i] for r in rows)

    base_ours, base_theirs = med(ours[clients[0]], 0), med(theirs[clients[0]], 0)
    print(f"shardvisor {args.weights} on {os.path.basename(args.model)}; llama.cpp on "
          f"{os.path.basename(llama_path)}; {args.threads} threads; {args.max_tokens} tokens a client; "
          f"medians of {args.rounds} rounds")
    print()
    print(f"| clients | shardvisor aggregate tok/s | vs {clients[0]} client | llama.cpp aggregate tok/s "
          f"| vs {clients[0]} client | shardvisor / llama.cpp | shardvisor decode tok/s | llama.cpp decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for n in clients:
        a, b = med(ours[n], 0), med(theirs[n], 0)
        print(f"| {n} | {a:.1f} | {a / base_ours:.2f}x | {b:.1f} | {b / base_theirs:.2f}x | {a / b:.2f}x "
              f"| {med(ours[n], 1):.1f} | {med(theirs[n], 1):.1f} |")


if __name__ == "__main__":
    main()
