//! The real SmolLM2 GGUF when present, and the sliding-window mask.

use crate::common::*;

// ------------------------------------------------------------ SmolLM2

/// The real model, when `scripts/fetch-model.sh` has fetched it.
fn smollm2() -> Option<PathBuf> {
    engine::testing::smollm2_gguf()
}

#[test]
fn smollm2_single_pipeline_and_tensor_agree() {
    let Some(path) = smollm2() else { return };
    let cfg = read_config(&path).expect("config");
    assert_eq!(
        (
            cfg.n_layers,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.vocab_size
        ),
        (30, 9, 3, 576, 1536, 49152)
    );
    assert_eq!(cfg.rope_theta, 100_000.0);
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.valid_tensor_degrees(), vec![1, 3]);

    // Finite logits of the right shape for ids [1, 2, 3].
    {
        let shard = load(&path, &ShardSpec::full(&cfg), WeightFormat::F32);
        let mut cache = shard.new_cache();
        let out = shard
            .forward(
                StageInput::Tokens(vec![1, 2, 3]),
                0,
                &mut cache,
                &mut NoAllReduce,
            )
            .expect("forward");
        let StageOutput::Logits(logits) = out else {
            panic!("single shard gives logits")
        };
        assert_eq!(logits.dims(), &[49152]);
        let v = logits.to_vec1::<f32>().expect("logits");
        assert!(v.iter().all(|x| x.is_finite()));
    }

    let prompt = [28u32, 1234, 9843];
    let steps = 6;
    let single = decode(&path, WeightFormat::F32, &Setup::Single, &prompt, steps);
    assert!(single.logits.iter().all(|l| l.len() == 49152));
    println!("SmolLM2 f32 greedy after {prompt:?}: {:?}", single.tokens);
    for setup in [Setup::Pipeline(2), Setup::Tensor(3)] {
        let other = decode(&path, WeightFormat::F32, &setup, &prompt, steps);
        let diff = max_abs_diff(&other.logits[..1], &single.logits[..1]);
        println!(
            "SmolLM2 f32 {setup:?}: prompt logits max |diff| = {diff:e}, tokens {:?}",
            other.tokens
        );
        assert!(diff <= 1e-3, "{setup:?}: {diff}");
        assert_eq!(other.tokens, single.tokens, "{setup:?}");
    }

    // The quantized path. Pipeline stages run the very same operations, so
    // they agree bit for bit. Tensor ranks sum partials in another order;
    // QMatMul rounds every activation to 8 bits, which usually absorbs that
    // (bit-identical logits) until one activation lands on the other side
    // of a rounding boundary, and then the logits move by a few tenths on
    // a range of ±30. Greedy tokens stay the same.
    let q_single = decode(
        &path,
        WeightFormat::Quantized,
        &Setup::Single,
        &prompt,
        steps,
    );
    println!(
        "SmolLM2 quantized greedy after {prompt:?}: {:?}",
        q_single.tokens
    );
    let range = q_single
        .logits
        .iter()
        .flatten()
        .fold(0f32, |m, x| m.max(x.abs()));
    for (setup, tolerance) in [(Setup::Pipeline(2), 0.0), (Setup::Tensor(3), 0.05 * range)] {
        let q_other = decode(&path, WeightFormat::Quantized, &setup, &prompt, steps);
        assert_eq!(q_other.tokens, q_single.tokens, "quantized {setup:?}");
        let diff = max_abs_diff(&q_other.logits, &q_single.logits);
        println!("SmolLM2 quantized {setup:?}: max |diff| = {diff:e} (max |logit| {range:.1})");
        assert!(diff <= tolerance, "quantized {setup:?}: {diff}");
    }
    let q_vs_f32 = max_abs_diff(&q_single.logits[..1], &single.logits[..1]);
    println!("SmolLM2 quantized vs f32 prompt logits: max |diff| = {q_vs_f32:e}");
    // Q4_1 is far coarser than f32, but this short continuation is not a
    // close call for the model.
    assert_eq!(
        q_single.tokens, single.tokens,
        "quantized and f32 greedy prefixes"
    );
}

/// A sliding window of `w` positions, checked from first principles: in a
/// one-layer model, position `i` sees only the keys and values of tokens
/// `i-w+1..=i`, and RoPE scores depend only on relative positions, so its
/// logits are the last-position logits of those `w` tokens alone fed to the
/// same model without a window. Fed whole, in chunks and one token at a time
/// (the windowed mask on every path of the attention kernel).
#[test]
fn sliding_window_sees_exactly_the_last_w_positions() {
    const W: usize = 4;
    let weights: Vec<(String, Tensor)> = tiny_weights(11, false)
        .into_iter()
        .filter(|(name, _)| {
            !name.starts_with("model.layers.") || name.starts_with("model.layers.0.")
        })
        .collect();
    let dir = TempDir::new("window");
    let write = |name: &str, window: Option<usize>| -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::create_dir_all(&path).expect("dir");
        let mut config: serde_json::Value =
            serde_json::from_str(&config_json(false)).expect("config json");
        config["model_type"] = "mistral".into();
        config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        config["num_hidden_layers"] = 1.into();
        config["sliding_window"] = window.map_or(serde_json::Value::Null, Into::into);
        std::fs::write(path.join("config.json"), config.to_string()).expect("write config");
        let map: HashMap<String, Tensor> = weights.iter().cloned().collect();
        candle_core::safetensors::save(&map, path.join("model.safetensors")).expect("save");
        path
    };
    let windowed = write("windowed", Some(W));
    let plain = write("plain", None);
    let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
    let load_full = |path: &Path| {
        let cfg = read_config(path).expect("config");
        load(path, &ShardSpec::full(&cfg), WeightFormat::F32)
    };
    let (windowed, plain) = (load_full(&windowed), load_full(&plain));
    let expected: Vec<Vec<f32>> = (0..tokens.len())
        .map(|i| {
            let mut cache = plain.new_cache();
            let seen = tokens[(i + 1).saturating_sub(W)..=i].to_vec();
            logits_of(
                plain
                    .forward(StageInput::Tokens(seen), 0, &mut cache, &mut NoAllReduce)
                    .expect("forward"),
            )
        })
        .collect();
    for chunks in [vec![12], vec![5, 3, 4], vec![1; 12]] {
        let mut cache = windowed.new_cache();
        let mut rows = Vec::new();
        let mut start = 0;
        for n in &chunks {
            let out = windowed
                .forward_logits(
                    StageInput::Tokens(tokens[start..start + n].to_vec()),
                    start,
                    &mut cache,
                    &mut NoAllReduce,
                    Logits::All,
                )
                .expect("forward a chunk");
            match out {
                StageOutput::Logits(t) => rows.extend(t.to_vec2::<f32>().expect("rows")),
                StageOutput::Hidden(_) => panic!("the full model returned hidden states"),
            }
            start += n;
        }
        let diff = max_abs_diff(&rows, &expected);
        assert!(diff < 1e-4, "chunks {chunks:?}: rows differ by {diff}");
    }
    // And the window matters: without it, the last position sees all 12.
    let mut cache = plain.new_cache();
    let all = logits_of(
        plain
            .forward(
                StageInput::Tokens(tokens.clone()),
                0,
                &mut cache,
                &mut NoAllReduce,
            )
            .expect("forward"),
    );
    let moved = max_abs_diff(&[all], &expected[11..]);
    assert!(
        moved > 1e-2,
        "the window changed nothing ({moved}): the test proves nothing"
    );
}
