"""What the llama.cpp oracles (`arch_oracle.py`, `quant_oracle.py`) share."""

import numpy as np


def greedy(llm, last, n):
    """`n` greedy tokens from a loaded llama-cpp-python model whose logits
    at the end of its context are `last`, each with the gap between the top
    two logits it was picked from."""
    tokens, gaps = [], []
    for _ in range(n):
        nxt = int(np.argmax(last))
        top2 = np.sort(last)[-2:]
        tokens.append(nxt)
        gaps.append(float(top2[1] - top2[0]))
        llm.eval([nxt])
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    return tokens, gaps
