//! Every layout and weight format against single-process f32 and each other.

use crate::common::*;

// ------------------------------------------------------------ agreement tests

#[test]
fn shardings_agree_with_single_process_on_logits_and_greedy_tokens() {
    let model = tiny_model(false);
    let single = decode(
        &model.hf,
        WeightFormat::F32,
        &Setup::Single,
        &PROMPT,
        DECODE_STEPS,
    );
    assert_eq!(single.tokens.len(), DECODE_STEPS + 1);
    assert!(single.logits.iter().all(|l| l.len() == VOCAB));
    assert!(single.logits.iter().flatten().all(|x| x.is_finite()));
    for setup in [
        Setup::Pipeline(2),
        Setup::Pipeline(3),
        Setup::Tensor(2),
        Setup::PipelineOfTensor(2),
    ] {
        let other = decode(&model.hf, WeightFormat::F32, &setup, &PROMPT, DECODE_STEPS);
        assert_eq!(
            other.tokens, single.tokens,
            "{setup:?}: greedy tokens differ"
        );
        let diff = max_abs_diff(&other.logits, &single.logits);
        println!(
            "{setup:?}: max |logit diff| = {diff:e} over {} steps",
            single.logits.len()
        );
        assert!(diff <= 1e-4, "{setup:?}: logits differ by {diff}");
    }
}

/// `Logits::All` gives, in row `i`, the logits of position `i`: the same
/// as `Logits::Last` on the prompt cut after `i` (a fresh cache; f32, equal
/// up to the order of summation), in one step or in chunks.
#[test]
fn every_position_logits_are_each_prefix_last_logits() {
    let model = tiny_model(false);
    let cfg = read_config(&model.hf).expect("config");
    let shard = load(&model.hf, &ShardSpec::full(&cfg), WeightFormat::F32);
    let prefix_last: Vec<Vec<f32>> = (1..=PROMPT.len())
        .map(|n| {
            let mut cache = shard.new_cache();
            let out = shard
                .forward(
                    StageInput::Tokens(PROMPT[..n].to_vec()),
                    0,
                    &mut cache,
                    &mut NoAllReduce,
                )
                .expect("forward");
            logits_of(out)
        })
        .collect();
    let rows = |out: StageOutput| -> Vec<Vec<f32>> {
        match out {
            StageOutput::Logits(t) => t.to_vec2::<f32>().expect("[seq, vocab] logits"),
            StageOutput::Hidden(_) => panic!("the full model returned hidden states"),
        }
    };
    let mut cache = shard.new_cache();
    let all = rows(
        shard
            .forward_logits(
                StageInput::Tokens(PROMPT.to_vec()),
                0,
                &mut cache,
                &mut NoAllReduce,
                Logits::All,
            )
            .expect("forward all"),
    );
    assert_eq!(all.len(), PROMPT.len());
    assert_eq!(all[0].len(), VOCAB);
    let diff = max_abs_diff(&all, &prefix_last);
    assert!(diff < 1e-4, "one step: rows differ from prefixes by {diff}");
    // In chunks of 2, 2 and 1 over one cache.
    let mut cache = shard.new_cache();
    let mut chunked = Vec::new();
    for (start, end) in [(0, 2), (2, 4), (4, 5)] {
        let out = shard
            .forward_logits(
                StageInput::Tokens(PROMPT[start..end].to_vec()),
                start,
                &mut cache,
                &mut NoAllReduce,
                Logits::All,
            )
            .expect("forward a chunk");
        chunked.extend(rows(out));
    }
    let diff = max_abs_diff(&chunked, &prefix_last);
    assert!(diff < 1e-4, "chunked: rows differ from prefixes by {diff}");
}

#[test]
fn pipeline_stages_cover_the_tiny_model() {
    let model = tiny_model(false);
    let cfg = read_config(&model.hf).expect("config");
    for n in 1..=LAYERS {
        let stages = ShardSpec::pipeline_stages(&cfg, n);
        assert_eq!(stages.len(), n);
        assert_eq!(stages[0].layers.start, 0);
        assert_eq!(stages[n - 1].layers.end, LAYERS);
        for s in &stages {
            s.validate(&cfg).expect("valid stage");
        }
    }
}

#[test]
fn hf_directory_and_gguf_f32_agree() {
    let model = tiny_model(false);
    let hf = decode(&model.hf, WeightFormat::F32, &Setup::Single, &PROMPT, 8);
    let gguf = decode(
        &model.gguf_f32,
        WeightFormat::F32,
        &Setup::Single,
        &PROMPT,
        8,
    );
    assert_eq!(gguf.tokens, hf.tokens);
    let diff = max_abs_diff(&gguf.logits, &hf.logits);
    println!("HF vs GGUF F32: max |logit diff| = {diff:e}");
    assert!(diff <= 1e-4, "HF and GGUF logits differ by {diff}");
    // The F32 GGUF read as "quantized" keeps float matrices dense: same maths.
    let gguf_q = decode(
        &model.gguf_f32,
        WeightFormat::Quantized,
        &Setup::Single,
        &PROMPT,
        8,
    );
    assert!(max_abs_diff(&gguf_q.logits, &hf.logits) <= 1e-4);
}

#[test]
fn gguf_tensor_parallel_undoes_the_qk_permutation_per_rank() {
    let model = tiny_model(false);
    let hf = decode(&model.hf, WeightFormat::F32, &Setup::Single, &PROMPT, 8);
    let tp = decode(
        &model.gguf_f32,
        WeightFormat::F32,
        &Setup::Tensor(2),
        &PROMPT,
        8,
    );
    assert_eq!(tp.tokens, hf.tokens);
    assert!(max_abs_diff(&tp.logits, &hf.logits) <= 1e-4);
}

#[test]
fn q8_0_gguf_quantized_path_tracks_f32() {
    let model = tiny_model_from(&peaked_weights(11), false, "peaked");
    let f32_ref = decode(
        &model.hf,
        WeightFormat::F32,
        &Setup::Single,
        &PROMPT,
        DECODE_STEPS,
    );
    // Same Q8_0 blocks, dequantized: differs from the reference by weight
    // rounding only.
    let dequant = decode(
        &model.gguf_q8,
        WeightFormat::F32,
        &Setup::Single,
        &PROMPT,
        DECODE_STEPS,
    );
    // Q8_0 blocks multiplied as blocks: also rounds the activations to 8 bits.
    let quant = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Single,
        &PROMPT,
        DECODE_STEPS,
    );
    // 8-bit rounding of weights (and, on the QMatMul path, of activations)
    // moves this model's logits (range about ±10) by about 0.05-0.15.
    const TOLERANCE: f32 = 0.3;
    let deq_diff = max_abs_diff(&dequant.logits, &f32_ref.logits);
    let quant_diff = max_abs_diff(&quant.logits, &f32_ref.logits);
    let gap = min_top2_gap(&f32_ref);
    println!(
        "Q8_0 over {} steps: dequantized vs f32 {deq_diff:.4}, quantized vs f32 {quant_diff:.4}; \
         smallest top-2 gap of the f32 run {gap:.3}",
        f32_ref.logits.len()
    );
    // The premise of comparing greedy tokens: no pick is a near-tie.
    assert!(
        gap > 2.0 * TOLERANCE,
        "the peaked model has a near-tie ({gap})"
    );
    assert_eq!(
        dequant.tokens, f32_ref.tokens,
        "dequantized Q8_0 decodes differently"
    );
    assert_eq!(
        quant.tokens, f32_ref.tokens,
        "quantized Q8_0 decodes differently"
    );
    assert!(
        deq_diff <= TOLERANCE,
        "dequantized Q8_0 is off by {deq_diff}"
    );
    assert!(
        quant_diff <= TOLERANCE,
        "quantized Q8_0 is off by {quant_diff}"
    );
    // The f32 safetensors requantized to Q8_0 at load: the same rounding.
    let requant = decode(
        &model.hf,
        WeightFormat::Q8_0,
        &Setup::Single,
        &PROMPT,
        DECODE_STEPS,
    );
    let requant_diff = max_abs_diff(&requant.logits, &f32_ref.logits);
    println!("HF f32 requantized to Q8_0 vs f32 {requant_diff:.4}");
    assert_eq!(
        requant.tokens, f32_ref.tokens,
        "requantized decodes differently"
    );
    assert!(
        requant_diff <= TOLERANCE,
        "requantized Q8_0 is off by {requant_diff}"
    );
}

#[test]
fn quantized_shardings_agree_with_quantized_single() {
    let model = tiny_model(false);
    let single = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Single,
        &PROMPT,
        16,
    );
    let requant_single = decode(&model.hf, WeightFormat::Q8_0, &Setup::Single, &PROMPT, 16);
    for setup in [Setup::Pipeline(2), Setup::Tensor(2)] {
        let other = decode(&model.gguf_q8, WeightFormat::Quantized, &setup, &PROMPT, 16);
        let requant = decode(&model.hf, WeightFormat::Q8_0, &setup, &PROMPT, 16);
        assert_eq!(other.tokens, single.tokens, "{setup:?}");
        assert_eq!(
            requant.tokens, requant_single.tokens,
            "{setup:?} requantized"
        );
        let diff = max_abs_diff(&other.logits, &single.logits);
        let requant_diff = max_abs_diff(&requant.logits, &requant_single.logits);
        println!(
            "quantized {setup:?}: max |logit diff| = {diff:e}, requantized at load {requant_diff:e}"
        );
        // Column slices fall on block boundaries, so each rank quantizes the
        // same activation blocks as the single process: only the order of
        // the final sums differs.
        assert!(diff <= 1e-4, "{setup:?}: {diff}");
        assert!(
            requant_diff <= 1e-4,
            "{setup:?} requantized: {requant_diff}"
        );
    }
}

#[test]
fn every_supported_gguf_dtype_loads_in_every_format() {
    // The peaked model, so that greedy picks are no near-ties and tokens can
    // be compared across formats despite 4-bit rounding.
    let weights = peaked_weights(11);
    let reference = tiny_model_from(&weights, false, "dtype-ref");
    let f32_ref = decode(&reference.hf, WeightFormat::F32, &Setup::Single, &PROMPT, 8);
    let dir = TempDir::new("dtypes");
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
    ] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        write_gguf(&path, &weights, dtype, "llama");
        let dequant = decode(&path, WeightFormat::F32, &Setup::Single, &PROMPT, 8);
        let quant = decode(&path, WeightFormat::Quantized, &Setup::Single, &PROMPT, 8);
        let quant_tp = decode(
            &path,
            WeightFormat::Quantized,
            &Setup::Tensor(2),
            &PROMPT,
            8,
        );
        let requant = decode(&path, WeightFormat::Q8_0, &Setup::Single, &PROMPT, 8);
        let requant_tp = decode(&path, WeightFormat::Q8_0, &Setup::Tensor(2), &PROMPT, 8);
        let range = f32_ref.logits[0].iter().fold(0f32, |m, x| m.max(x.abs()));
        let d_requant = max_abs_diff(&requant.logits, &dequant.logits);
        let d_requant_tp = max_abs_diff(&requant_tp.logits, &requant.logits);
        let d_dequant = max_abs_diff(&dequant.logits, &f32_ref.logits);
        let d_quant = max_abs_diff(&quant.logits, &dequant.logits);
        let d_tp = max_abs_diff(&quant_tp.logits, &quant.logits);
        println!(
            "{dtype:?}: dequantized vs f32 {d_dequant:.4}, quantized vs dequantized {d_quant:.4}, \
             quantized tp2 vs single {d_tp:.4}, requantized to Q8_0 vs dequantized \
             {d_requant:.4} (tp2 vs single {d_requant_tp:.4}) (max |logit| {range:.1})"
        );
        // Weight rounding against the f32 original: none for F32, tiny for
        // F16, about one percent of the logit range for 8 bits, and for 4
        // bits on random weights (no structure to preserve) over ten
        // percent, enough to change picks, so 4-bit tokens are compared
        // with the dequantized run of the same file instead.
        let (weight_tolerance, same_tokens_as_f32) = match dtype {
            GgmlDType::F32 => (0.0, true),
            GgmlDType::F16 => (2e-3 * range, true),
            GgmlDType::Q8_0 => (0.03 * range, true),
            _ => (0.3 * range, false),
        };
        assert!(d_dequant <= weight_tolerance, "{dtype:?}: {d_dequant}");
        if same_tokens_as_f32 {
            assert_eq!(dequant.tokens, f32_ref.tokens, "{dtype:?} dequantized");
        }
        // Same weights, 8-bit activation rounding on the QMatMul path:
        // about one percent; the tensor split changes nothing visible.
        assert!(d_quant <= 0.05 * range, "{dtype:?}: {d_quant}");
        assert!(d_tp <= 0.05 * range, "{dtype:?}: {d_tp}");
        assert_eq!(quant.tokens, dequant.tokens, "{dtype:?} quantized");
        assert_eq!(quant_tp.tokens, quant.tokens, "{dtype:?} quantized tp2");
        // Requantizing to Q8_0 rounds each block to 255 levels (plus the
        // 8-bit activation rounding): within the same bound.
        assert!(d_requant <= 0.05 * range, "{dtype:?}: {d_requant}");
        assert!(d_requant_tp <= 0.05 * range, "{dtype:?}: {d_requant_tp}");
        assert_eq!(requant.tokens, dequant.tokens, "{dtype:?} requantized");
        assert_eq!(
            requant_tp.tokens, requant.tokens,
            "{dtype:?} requantized tp2"
        );
        // The default resolves per stored type to one of the two, exactly.
        let auto = decode(&path, WeightFormat::Auto, &Setup::Single, &PROMPT, 8);
        let (name, expect) = match WeightFormat::Auto.for_stored(dtype, Kernels::detect()) {
            WeightFormat::Quantized => ("as stored", &quant),
            _ => ("requantized", &requant),
        };
        assert_eq!(auto.logits, expect.logits, "{dtype:?} auto: {name}");
    }
}

#[test]
fn quantized_column_slices_off_block_boundaries_fall_back_to_f32() {
    // FFN 96 split in two gives down_proj 48 input columns per rank, which
    // is not a whole number of 32-element blocks: that matrix is
    // dequantized for the rank, the rest stays quantized. The ranks'
    // down_proj then skips the 8-bit activation rounding the single
    // process applies, hence a loose comparison.
    let weights = tiny_weights_with_ffn(3, false, 96);
    let model = tiny_model_from(&weights, false, "ffn96");
    let cfg = read_config(&model.gguf_q8).expect("config");
    assert_eq!(cfg.intermediate_size, 96);
    let single = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Single,
        &PROMPT,
        0,
    );
    let tp = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Tensor(2),
        &PROMPT,
        0,
    );
    let dequant = decode(
        &model.gguf_q8,
        WeightFormat::F32,
        &Setup::Tensor(2),
        &PROMPT,
        0,
    );
    let range = single.logits[0].iter().fold(0f32, |m, x| m.max(x.abs()));
    let d_tp = max_abs_diff(&tp.logits, &single.logits);
    let d_deq = max_abs_diff(&tp.logits, &dequant.logits);
    println!("ffn 96 Q8_0: quantized tp2 vs single {d_tp:.4}, vs dequantized tp2 {d_deq:.4} (max |logit| {range:.1})");
    assert!(d_tp <= 0.05 * range, "{d_tp}");
    assert!(d_deq <= 0.05 * range, "{d_deq}");
    // The load says so, naming the matrices: each rank holds its 4
    // down_proj slices (one per layer) as f32, the other 24 matrices and
    // lm_head as Q8_0 blocks.
    for spec in ShardSpec::tensor_ranks(&cfg, 2) {
        let shard = load_shard(
            &model.gguf_q8,
            &spec,
            WeightFormat::Quantized,
            &mut |_, _| {},
        )
        .expect("rank loads");
        assert_eq!(
            shard.held(),
            "25 Q8_0 as stored, 4 Q8_0 as f32; 4 held as f32 because the slice is off \
             block boundaries or the row length does not suit the kernel: \
             blk.0.ffn_down.weight, blk.1.ffn_down.weight, blk.2.ffn_down.weight, \
             blk.3.ffn_down.weight"
        );
    }
    let whole = load_shard(
        &model.gguf_q8,
        &ShardSpec::full(&cfg),
        WeightFormat::Quantized,
        &mut |_, _| {},
    )
    .expect("single loads");
    assert_eq!(whole.held(), "29 Q8_0 as stored");
}

#[test]
fn tied_embeddings_load_from_hf_and_gguf_without_output_weight() {
    let model = tiny_model(true);
    let cfg = read_config(&model.gguf_f32).expect("config");
    assert!(
        cfg.tie_word_embeddings,
        "GGUF without output.weight is tied"
    );
    let hf = decode(&model.hf, WeightFormat::F32, &Setup::Single, &PROMPT, 8);
    for (path, format, setup) in [
        (&model.gguf_f32, WeightFormat::F32, Setup::Single),
        (&model.hf, WeightFormat::F32, Setup::Pipeline(2)),
        (&model.gguf_f32, WeightFormat::F32, Setup::Tensor(2)),
    ] {
        let other = decode(path, format, &setup, &PROMPT, 8);
        assert_eq!(other.tokens, hf.tokens, "{path:?} {setup:?}");
        assert!(
            max_abs_diff(&other.logits, &hf.logits) <= 1e-4,
            "{path:?} {setup:?}"
        );
    }
    // Quantized and tied: one copy of the blocks serves lookup and lm_head.
    let q_single = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Single,
        &PROMPT,
        8,
    );
    let q_pipe = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Pipeline(2),
        &PROMPT,
        8,
    );
    assert_eq!(q_single.tokens, q_pipe.tokens);
    assert!(max_abs_diff(&q_single.logits, &q_pipe.logits) <= 1e-4);
    // Q8_0 rounding on random weights: loose, relative to the logit range.
    let range = hf.logits[0].iter().fold(0f32, |m, x| m.max(x.abs()));
    let q_diff = max_abs_diff(&q_single.logits[..1], &hf.logits[..1]);
    println!("tied Q8_0 vs f32 prompt logits: {q_diff:.4} (max |logit| {range:.2})");
    assert!(q_diff <= 0.03 * range, "{q_diff} of {range}");
}

#[test]
fn sharded_safetensors_with_index_load_like_one_file() {
    let model = tiny_model(false);
    let dir = TempDir::new("index");
    let weights = tiny_weights(1, false);
    std::fs::write(dir.path().join("config.json"), config_json(false)).expect("config");
    let (first, second): (Vec<_>, Vec<_>) =
        weights.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let map: HashMap<String, Tensor> = part
            .iter()
            .map(|(_, (n, t))| (n.clone(), t.clone()))
            .collect();
        for name in map.keys() {
            weight_map.insert(name.clone(), serde_json::Value::String(file.into()));
        }
        candle_core::safetensors::save(&map, dir.path().join(file)).expect("save part");
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .expect("index");
    let one = decode(&model.hf, WeightFormat::F32, &Setup::Single, &PROMPT, 4);
    let split = decode(
        dir.path(),
        WeightFormat::F32,
        &Setup::Pipeline(2),
        &PROMPT,
        4,
    );
    assert_eq!(split.tokens, one.tokens);
    assert!(max_abs_diff(&split.logits, &one.logits) <= 1e-4);
}

#[test]
fn f16_and_bf16_safetensors_load_as_f32() {
    for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
        let dir = TempDir::new("half");
        let weights: Vec<(String, Tensor)> = tiny_weights(1, false)
            .into_iter()
            .map(|(n, t)| (n, t.to_dtype(dtype).expect("to half")))
            .collect();
        write_hf(dir.path(), &weights, false);
        let d = decode(dir.path(), WeightFormat::F32, &Setup::Tensor(2), &PROMPT, 2);
        assert!(
            d.logits.iter().flatten().all(|x| x.is_finite()),
            "{dtype:?}"
        );
        // Same weights rounded to half precision, then widened exactly.
        let widened: Vec<(String, Tensor)> = weights
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.to_dtype(candle_core::DType::F32).expect("widen"),
                )
            })
            .collect();
        let dir32 = TempDir::new("widened");
        write_hf(dir32.path(), &widened, false);
        let d32 = decode(dir32.path(), WeightFormat::F32, &Setup::Single, &PROMPT, 2);
        assert_eq!(d.tokens, d32.tokens, "{dtype:?}");
        assert!(max_abs_diff(&d.logits, &d32.logits) <= 1e-4, "{dtype:?}");
    }
}

#[test]
fn a_stage_reads_only_its_own_tensors() {
    // A file that lacks layer 3 entirely still serves the stages before it,
    // and the full model fails naming the first missing tensor.
    let dir = TempDir::new("partial");
    let weights: Vec<(String, Tensor)> = tiny_weights(1, false)
        .into_iter()
        .filter(|(n, _)| {
            !n.starts_with("model.layers.3.") && n != "lm_head.weight" && n != "model.norm.weight"
        })
        .collect();
    write_hf(dir.path(), &weights, false);
    let cfg = read_config(dir.path()).expect("config");
    let spec = ShardSpec {
        layers: 0..3,
        tp_rank: 0,
        tp_degree: 1,
    };
    let mut calls = Vec::new();
    let shard = load_shard(dir.path(), &spec, WeightFormat::F32, &mut |done, total| {
        calls.push((done, total))
    })
    .expect("stage 0..3 loads without layer 3");
    assert_eq!(
        calls,
        vec![(1, 3), (2, 3), (3, 3)],
        "progress once per layer"
    );
    let mut cache = shard.new_cache();
    let out = shard
        .forward(
            StageInput::Tokens(PROMPT.to_vec()),
            0,
            &mut cache,
            &mut NoAllReduce,
        )
        .expect("forward");
    assert!(matches!(out, StageOutput::Hidden(ref h) if h.dims() == [PROMPT.len(), HIDDEN]));
    let err = load_shard(
        dir.path(),
        &ShardSpec::full(&cfg),
        WeightFormat::F32,
        &mut |_, _| {},
    )
    .expect_err("the full model needs the missing tensors");
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("model.norm.weight"),
        "{msg}"
    );
}
