#!/usr/bin/env python3
"""llama.cpp's greedy answers on the real SmolLM2 in the quantizations
people download, for `quant_it.rs`.

    python3 quant_oracle.py MODEL.gguf OUT_DIR

Requantizes MODEL (llama.cpp's quantizer, `allow_requantize`) to Q4_K_M,
Q5_K_M, Q6_K and Q8_0, then for each file and each of three chat prompts
(the model's own template rendered by jinja2, tokenized by llama.cpp with
special tokens parsed) records llama.cpp's prompt ids, its first GREEDY
greedy tokens, at each step the gap between its top two logits, and the
greedy tokens llama.cpp gives when the same prompt is fed one token at a
time (its single-row kernels instead of the batched ones: how far llama.cpp
agrees with itself), with the logits of the prompt's last position both
ways (the batched row, and the largest difference of the other from it).
Writes OUT_DIR/oracle.json. llama.cpp runs with an f32 KV cache and
without flash attention, as the engine computes attention.
"""

import json
import os
import sys

import jinja2
import llama_cpp
import numpy as np
from gguf import GGUFReader
from llama_greedy import greedy

GREEDY = 16
FTYPES = [
    ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M),
    ("Q5_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M),
    ("Q6_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K),
    ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
]
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
]


def template_of(path):
    reader = GGUFReader(path)
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def main():
    model, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(template_of(model))
    texts = [template.render(messages=[{"role": "user", "content": p}],
                             add_generation_prompt=True, bos_token="", eos_token="")
             for p in PROMPTS]
    files = []
    for name, ftype in FTYPES:
        dst = os.path.join(out, f"smollm2-{name}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        params.allow_requantize = True
        rc = llama_cpp.llama_model_quantize(model.encode(), dst.encode(), params)
        if rc != 0:
            sys.exit(f"llama_model_quantize {model} -> {dst} failed: {rc}")
        llm = llama_cpp.Llama(model_path=dst, n_ctx=512, n_batch=512, n_threads=2,
                              logits_all=True, verbose=False, type_k=0, type_v=0,
                              flash_attn=False, use_extra_bufts=False)
        prompts = []
        for text in texts:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            llm.reset()
            llm.eval(ids)
            last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            prompt_logits = last.copy()
            tokens, gaps = greedy(llm, last, GREEDY)
            # llama.cpp against itself: the same prompt fed one token at a
            # time (its single-row kernels instead of the batched ones).
            llm.reset()
            for t in ids:
                llm.eval([t])
            last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            self_diff = float(np.abs(last - prompt_logits).max())
            sequential, _ = greedy(llm, last, GREEDY)
            prompts.append(dict(text=text, ids=ids, greedy=tokens, gaps=gaps,
                                sequential=sequential, logits=prompt_logits.tolist(),
                                self_diff=self_diff))
        del llm
        files.append(dict(ftype=name, file=dst, prompts=prompts))
        print(f"{name}: {[p['greedy'][:6] for p in prompts]}")
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(dict(files=files), f)


if __name__ == "__main__":
    main()
