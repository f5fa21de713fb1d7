"""Tiny random models of every architecture the engine runs, written as GGUF
and quantized by llama.cpp's own quantizer, with llama.cpp's answers.

Run by `arch_it` (crates/engine/tests):

    python3 arch_oracle.py OUT_DIR

For each architecture (see ARCHS) it writes OUT_DIR/<arch>-f32.gguf with the
`gguf` package, quantizes it with `llama_model_quantize` to Q8_0, Q4_K_M and
Q6_K (the first architecture also to Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_M,
Q5_K_M, F16 and BF16), and evaluates every file with llama.cpp (`llama-cpp-python`): the
logits of every position of PROMPT and 32 greedy tokens after it. The same
weights also go into OUT_DIR/<arch>-hf (Hugging Face config.json and
safetensors), whose expected answers are the f32 file's. Writes
OUT_DIR/oracle.json:

    {"prompt": [...], "files": [{"arch", "file", "ftype", "tied",
      "logits": [[...vocab] per position], "greedy": [32 ids],
      "gaps": [the top-two logit gap before each greedy id]}],
     "unsupported": [files in IQ4_NL, a type the engine does not multiply]}

Dimensions are multiples of 256 so K-quants apply to every matrix, and
tensor parallelism of degree 2 slices them on whole 256-element blocks.
"""

import json
import os
import sys

import gguf
import numpy as np
import llama_cpp
from llama_greedy import greedy as llama_greedy

out = sys.argv[1]
os.makedirs(out, exist_ok=True)

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 512, 1024, 2, 8, 4, 64, 512
CONTEXT = 256
PROMPT = [1, 17, 300, 42, 5, 88, 260, 7, 411, 99, 3, 128]
GREEDY = 32

# arch (GGUF general.architecture), name, what the file exercises.
ARCHS = [
    # Llama 2 / SmolLM2 shape: untied head.
    dict(name="llama", arch="llama", tied=False),
    # Llama 3.1: per-frequency rope factors (rope_freqs.weight), tied head.
    dict(name="llama3", arch="llama", tied=True, rope_freqs=True, theta=500000.0),
    # Qwen2.5: q/k/v biases, rotate-half RoPE as stored, tied head.
    dict(name="qwen2", arch="qwen2", tied=True, qkv_bias=True, theta=1000000.0),
    # Qwen3: per-head RMSNorm of q and k, no biases.
    dict(name="qwen3", arch="qwen3", tied=False, qk_norm=True, theta=1000000.0),
    # Mistral: a llama GGUF; its Hugging Face config says "mistral" (with a
    # sliding window longer than the context). Its quantized files would
    # repeat llama's.
    dict(name="mistral", arch="llama", hf_type="mistral", tied=False, theta=1000000.0, quantize=False),
]
FTYPES = [
    ("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
    ("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M),
    ("q6_k", llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K),
]
# Every other type candle multiplies, on the first architecture only (the
# block types are the same for every architecture): the legacy 4/5-bit
# blocks, the remaining K-quants as llama.cpp's mixes use them, and the
# float types.
EXTRA_FTYPES = [
    ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
    ("q4_1", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1),
    ("q5_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0),
    ("q5_1", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1),
    ("q2_k", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K),
    ("q3_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M),
    ("q5_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M),
    ("f16", llama_cpp.LLAMA_FTYPE_MOSTLY_F16),
    ("bf16", llama_cpp.LLAMA_FTYPE_MOSTLY_BF16),
]


def llama3_factors(head_dim, theta, factor=8.0, low=1.0, high=4.0, original=8192.0):
    """Llama 3.1's rope scaling as per-frequency factors, as llama.cpp's
    converter stores it in rope_freqs.weight (transformers'
    `_compute_llama3_parameters`: the frequency is divided by the factor)."""
    out = []
    for i in range(head_dim // 2):
        f = 1.0 / theta ** (2 * i / head_dim)
        wavelen = 2 * np.pi / f
        if wavelen > original / low:
            out.append(factor)
        elif wavelen < original / high:
            out.append(1.0)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)


def tensors(spec, seed):
    """The model's tensors under their GGUF names, q/k rows as llama.cpp
    stores them for the architecture."""
    rng = np.random.default_rng(seed)

    def mat(rows, cols, scale=1.0):
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {}
    # Embeddings small beside the layers' outputs, so that a tied head does
    # not just predict the last token again (its own embedding dominates
    # e·h otherwise); a tied head gets a larger final norm instead, so the
    # logits of every file spread over several units (clear greedy choices).
    emb, out_gain = (0.05, 4.0) if spec["tied"] else (0.2, 1.0)
    t["token_embd.weight"] = (emb * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float32)
    t["output_norm.weight"] = out_gain * norm(HIDDEN)
    if not spec["tied"]:
        t["output.weight"] = mat(VOCAB, HIDDEN, 4.0)
    if spec.get("rope_freqs"):
        t["rope_freqs.weight"] = llama3_factors(HEAD_DIM, spec["theta"])
    q_width, kv_width = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        b = f"blk.{i}."
        t[b + "attn_norm.weight"] = norm(HIDDEN)
        t[b + "attn_q.weight"] = mat(q_width, HIDDEN)
        t[b + "attn_k.weight"] = mat(kv_width, HIDDEN)
        t[b + "attn_v.weight"] = mat(kv_width, HIDDEN)
        t[b + "attn_output.weight"] = mat(HIDDEN, q_width)
        if spec.get("qkv_bias"):
            for name, n in (("q", q_width), ("k", kv_width), ("v", kv_width)):
                t[b + f"attn_{name}.bias"] = (0.5 * rng.standard_normal(n)).astype(np.float32)
        if spec.get("qk_norm"):
            t[b + "attn_q_norm.weight"] = norm(HEAD_DIM)
            t[b + "attn_k_norm.weight"] = norm(HEAD_DIM)
        t[b + "ffn_norm.weight"] = norm(HIDDEN)
        t[b + "ffn_gate.weight"] = mat(FFN, HIDDEN)
        t[b + "ffn_up.weight"] = mat(FFN, HIDDEN)
        t[b + "ffn_down.weight"] = mat(HIDDEN, FFN)
    return t


def write_gguf(spec, t, path):
    w = gguf.GGUFWriter(path, spec["arch"])
    w.add_name(f"tiny-{spec['name']}")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(spec.get("theta", 10000.0))
    w.add_vocab_size(VOCAB)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # A SentencePiece vocabulary llama.cpp accepts: unk, bos, eos, the 256
    # byte tokens, then plain pieces.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(VOCAB - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(VOCAB - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    for name, x in t.items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def unpermute(w, heads):
    """Undoes llama.cpp's converter's q/k row permutation (`permute` in
    convert_hf_to_gguf.py): GGUF order back to Hugging Face's."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def write_hf(spec, t, d):
    """The same model as a Hugging Face directory (config.json and one f32
    model.safetensors, written by hand: the format is a JSON header and the
    raw bytes)."""
    os.makedirs(d, exist_ok=True)
    hf = {}
    for name, x in t.items():
        if name == "token_embd.weight":
            hf["model.embed_tokens.weight"] = x
        elif name == "output_norm.weight":
            hf["model.norm.weight"] = x
        elif name == "output.weight":
            hf["lm_head.weight"] = x
        elif name == "rope_freqs.weight":
            continue  # config.json's rope_scaling says it
        else:
            _, i, rest = name.split(".", 2)
            if spec["arch"] == "llama" and rest in ("attn_q.weight", "attn_k.weight"):
                x = unpermute(x, HEADS if rest == "attn_q.weight" else KV_HEADS)
            hf[f"model.layers.{i}.{HF_NAMES[rest]}"] = x
    header, blobs, at = {}, [], 0
    for name, x in hf.items():
        data = np.ascontiguousarray(x, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(x.shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for data in blobs:
            f.write(data)
    config = dict(
        model_type=spec.get("hf_type", spec["arch"]),
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        vocab_size=VOCAB, rope_theta=spec.get("theta", 10000.0), rms_norm_eps=1e-6,
        max_position_embeddings=CONTEXT, tie_word_embeddings=spec["tied"], hidden_act="silu",
    )
    if spec.get("rope_freqs"):
        config["rope_scaling"] = LLAMA3_SCALING
    if spec["arch"] == "qwen2":
        config["use_sliding_window"] = False
        config["sliding_window"] = 4096
    if spec.get("hf_type") == "mistral":
        config["sliding_window"] = 4096
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)


def quantize(src, dst, ftype):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize {src} -> {dst} failed: {rc}")


def evaluate(path):
    # An f32 KV cache and no flash attention (which rounds q to f16): the
    # attention is then f32 like the engine's.
    llm = llama_cpp.Llama(model_path=path, n_ctx=CONTEXT, n_batch=CONTEXT, n_threads=2,
                          logits_all=True, verbose=False, type_k=0, type_v=0, flash_attn=False,
                          use_extra_bufts=False)
    llm.reset()
    llm.eval(PROMPT)
    logits = np.array(llm.scores[: len(PROMPT)], dtype=np.float32)
    greedy, gaps = llama_greedy(llm, logits[-1], GREEDY)
    del llm
    return logits, greedy, gaps


files = []
# A type this engine does not multiply, made by llama.cpp: loading it must
# fail naming the tensor and the type.
unsupported = []
for n, spec in enumerate(ARCHS):
    f32 = os.path.join(out, f"{spec['name']}-f32.gguf")
    t = tensors(spec, seed=100 + n)
    write_gguf(spec, t, f32)
    # The same weights from Hugging Face's layout: the engine must read them
    # as llama.cpp reads the GGUF (its answers are the f32 file's).
    write_hf(spec, t, os.path.join(out, f"{spec['name']}-hf"))
    variants = [("f32", f32)]
    ftypes = (FTYPES + (EXTRA_FTYPES if n == 0 else [])) if spec.get("quantize", True) else []
    for name, ftype in ftypes:
        dst = os.path.join(out, f"{spec['name']}-{name}.gguf")
        quantize(f32, dst, ftype)
        variants.append((name, dst))
    if n == 0:
        dst = os.path.join(out, f"{spec['name']}-iq4_nl.gguf")
        quantize(f32, dst, llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL)
        unsupported.append(os.path.basename(dst))
    for name, path in variants:
        logits, greedy, gaps = evaluate(path)
        entry = dict(arch=spec["name"], file=os.path.basename(path), ftype=name, tied=spec["tied"],
                     logits=logits.tolist(), greedy=greedy, gaps=gaps)
        files.append(entry)
        if name == "f32":
            files.append(dict(entry, file=f"{spec['name']}-hf", ftype="hf"))
        print(f"{os.path.basename(path)}: greedy {greedy[:8]}…")

with open(os.path.join(out, "oracle.json"), "w") as f:
    json.dump(dict(prompt=PROMPT, files=files, unsupported=unsupported), f)
print(f"arch oracle: {len(files)} files written")
