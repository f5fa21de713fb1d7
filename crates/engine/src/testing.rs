//! A tiny random llama, written on demand, for tests and benchmarks of the
//! whole stack (runners, links, the API): a Hugging Face directory with
//! `config.json`, `model.safetensors`, a byte-level `tokenizer.json` (every
//! byte is a token, no merges) and a `tokenizer_config.json` with a ChatML
//! template. Deterministic for a given seed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{EngineError, Result};

pub const TINY_HIDDEN: usize = 64;
pub const TINY_FFN: usize = 192;
pub const TINY_LAYERS: usize = 6;
pub const TINY_HEADS: usize = 6;
pub const TINY_KV_HEADS: usize = 2;
pub const TINY_HEAD_DIM: usize = 16;
/// 256 byte tokens and 3 special tokens.
pub const TINY_VOCAB: usize = 259;

const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

const TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// SplitMix64: the same random tensors on every run for a seed.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in `[-1, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `offset` plus uniform noise in `[-scale, scale)`.
    pub fn tensor(&mut self, dims: &[usize], scale: f32, offset: f32) -> Result<Tensor> {
        let n = dims.iter().product::<usize>();
        let data: Vec<f32> = (0..n).map(|_| offset + scale * self.next_f32()).collect();
        Ok(Tensor::from_vec(data, dims, &Device::Cpu)?)
    }
}

/// Set (to `1`) where everything the tests need is installed, as CI does:
/// a test that would skip for a missing model, Python oracle or privilege
/// then fails instead.
pub const REQUIRE_VAR: &str = "SHARDVISOR_REQUIRE_MODEL";

/// A test cannot run here: prints why and returns, or panics when
/// [`REQUIRE_VAR`] says it must run.
pub fn skip(reason: &str) {
    if std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_VAR}=1 but this test cannot run: {reason}");
    }
    eprintln!("skipped: {reason}");
}

/// Whether `python3 -c "import <module>"` works; otherwise says why the
/// test that needs it skips (see [`skip`]: a failure where CI requires it).
pub fn python_has(module: &str, package: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip(&format!(
            "the {package} Python package is not installed (pip install {package})"
        ));
    }
    ok
}

/// The SmolLM2 GGUF fetched by `scripts/fetch-model.sh`
/// (`$SHARDVISOR_MODELS` or the workspace's `models/`), if it is there;
/// otherwise says why a test that needs it is skipped (see [`skip`]).
pub fn smollm2_gguf() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("SHARDVISOR_MODELS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join(crate::FETCHED_MODEL);
    if path.exists() {
        Some(path)
    } else {
        skip(&format!(
            "{} is missing (run scripts/fetch-model.sh)",
            path.display()
        ));
        None
    }
}

/// GPT-2's byte → printable character table, as byte-level BPE uses it.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut table = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    table
}

fn io(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Model {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Writes the tiny model into `dir` (created if needed).
pub fn write_tiny_llama(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut rng = Rng(seed);
    let (h, f, d) = (TINY_HIDDEN, TINY_FFN, TINY_HEAD_DIM);
    let lin = |rng: &mut Rng, out: usize, inp: usize| {
        rng.tensor(&[out, inp], 3f32.sqrt() / (inp as f32).sqrt(), 0.0)
    };
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    // Twice the unit scale: a tied table that also spreads the logits.
    weights.insert(
        "model.embed_tokens.weight".into(),
        rng.tensor(&[TINY_VOCAB, h], 2.0, 0.0)?,
    );
    for i in 0..TINY_LAYERS {
        let p = format!("model.layers.{i}");
        weights.insert(
            format!("{p}.input_layernorm.weight"),
            rng.tensor(&[h], 0.2, 1.0)?,
        );
        weights.insert(
            format!("{p}.self_attn.q_proj.weight"),
            lin(&mut rng, TINY_HEADS * d, h)?,
        );
        weights.insert(
            format!("{p}.self_attn.k_proj.weight"),
            lin(&mut rng, TINY_KV_HEADS * d, h)?,
        );
        weights.insert(
            format!("{p}.self_attn.v_proj.weight"),
            lin(&mut rng, TINY_KV_HEADS * d, h)?,
        );
        weights.insert(
            format!("{p}.self_attn.o_proj.weight"),
            lin(&mut rng, h, TINY_HEADS * d)?,
        );
        weights.insert(
            format!("{p}.post_attention_layernorm.weight"),
            rng.tensor(&[h], 0.2, 1.0)?,
        );
        weights.insert(format!("{p}.mlp.gate_proj.weight"), lin(&mut rng, f, h)?);
        weights.insert(format!("{p}.mlp.up_proj.weight"), lin(&mut rng, f, h)?);
        weights.insert(format!("{p}.mlp.down_proj.weight"), lin(&mut rng, h, f)?);
    }
    weights.insert("model.norm.weight".into(), rng.tensor(&[h], 0.2, 1.0)?);
    let st = dir.join("model.safetensors");
    candle_core::safetensors::save(&weights, &st).map_err(|e| io(&st, e))?;

    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": h, "intermediate_size": f, "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": TINY_HEADS, "num_key_value_heads": TINY_KV_HEADS, "head_dim": d,
        "vocab_size": TINY_VOCAB, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 1024, "tie_word_embeddings": true, "hidden_act": "silu",
        "torch_dtype": "float32", "bos_token_id": 256, "eos_token_id": 258,
    });
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).map_err(|e| io(&path, e))?;

    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), id.into()))
        .chain(
            SPECIAL
                .iter()
                .enumerate()
                .map(|(i, s)| (s.to_string(), (256 + i).into())),
        )
        .collect();
    let added: Vec<serde_json::Value> = SPECIAL
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []},
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tokenizer.to_string()).map_err(|e| io(&path, e))?;
    let tokenizer_config = serde_json::json!({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE,
    });
    let path = dir.join("tokenizer_config.json");
    std::fs::write(&path, tokenizer_config.to_string()).map_err(|e| io(&path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_model_loads_tokenizes_and_renders() {
        let dir = std::env::temp_dir().join(format!("engine-tiny-{}", std::process::id()));
        write_tiny_llama(&dir, 3).unwrap();
        let config = crate::loader::read_config(&dir).unwrap();
        assert_eq!(config.n_layers, TINY_LAYERS);
        assert_eq!(config.valid_tensor_degrees(), vec![1, 2]);
        let tokenizer = crate::tokenizer::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let template =
            crate::chat::ChatTemplate::from_tokenizer_config(dir.join("tokenizer_config.json"))
                .unwrap()
                .unwrap();
        let prompt = template
            .render(&[crate::chat::ChatMessage::new("user", "héllo 42")], true)
            .unwrap();
        let ids = tokenizer.encode(&prompt, true).expect("encode");
        assert_eq!(ids[0], 257, "starts with <|im_start|>");
        assert_eq!(tokenizer.decode(&ids, false), prompt);
        assert!(tokenizer.eos_ids().contains(&258));
        let _ = std::fs::remove_dir_all(dir);
    }
}
