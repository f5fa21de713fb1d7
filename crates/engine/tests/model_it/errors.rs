//! Bad files and misuse: clear errors naming the file and the tensor, never a panic.

use crate::common::*;

// ------------------------------------------------------------ errors

fn load_err(path: &Path, spec: Option<ShardSpec>, format: WeightFormat) -> String {
    let spec = spec.unwrap_or(ShardSpec {
        layers: 0..LAYERS,
        tp_rank: 0,
        tp_degree: 1,
    });
    match load_shard(path, &spec, format, &mut |_, _| {}) {
        Ok(_) => panic!("{path:?} loaded but should not"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors_fails_naming_file_and_tensor() {
    let model = tiny_model(false);
    let file = model.hf.join("model.safetensors");
    let len = std::fs::metadata(&file).expect("stat").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open");
    f.set_len(len - 1000).expect("truncate");
    let msg = load_err(&model.hf, None, WeightFormat::F32);
    println!("{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(
        msg.contains("tensor ") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn corrupt_safetensors_header_fails_naming_file() {
    let model = tiny_model(false);
    let file = model.hf.join("model.safetensors");
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&file, &bytes).expect("write");
    let msg = load_err(&model.hf, None, WeightFormat::F32);
    assert!(
        msg.contains("model.safetensors") && msg.contains("header"),
        "{msg}"
    );
    // Garbage JSON in an otherwise plausible header.
    let mut garbage = 16u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"{not json at all");
    std::fs::write(&file, &garbage).expect("write");
    let msg = load_err(&model.hf, None, WeightFormat::F32);
    assert!(
        msg.contains("model.safetensors") && msg.contains("corrupt"),
        "{msg}"
    );
}

#[test]
fn mismatched_config_fails_naming_the_tensor() {
    let model = tiny_model(false);
    let text = config_json(false).replace(
        &format!("\"intermediate_size\": {FFN}"),
        "\"intermediate_size\": 96",
    );
    std::fs::write(model.hf.join("config.json"), text).expect("config");
    let msg = load_err(&model.hf, None, WeightFormat::F32);
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("mlp.gate_proj.weight")
            && msg.contains("shape"),
        "{msg}"
    );
}

#[test]
fn truncated_gguf_fails_naming_file_and_tensor() {
    let model = tiny_model(false);
    let len = std::fs::metadata(&model.gguf_q8).expect("stat").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&model.gguf_q8)
        .expect("open");
    f.set_len(len - 500).expect("truncate");
    for format in [WeightFormat::F32, WeightFormat::Quantized] {
        let msg = load_err(&model.gguf_q8, None, format);
        println!("{msg}");
        assert!(
            msg.contains("tiny-q8_0.gguf") && msg.contains("tensor ") && msg.contains("truncated"),
            "{msg}"
        );
    }
    // Cut inside the header: the file is named, there is no tensor yet.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&model.gguf_f32)
        .expect("open");
    f.set_len(200).expect("truncate");
    let msg = load_err(&model.gguf_f32, None, WeightFormat::F32);
    assert!(
        msg.contains("tiny-f32.gguf") && msg.contains("GGUF header"),
        "{msg}"
    );
}

#[test]
fn garbage_files_and_missing_paths_fail_naming_the_path() {
    let dir = TempDir::new("garbage");
    let garbage = dir.path().join("model.gguf");
    let mut rng = Rng(engine::testing::Rng(99));
    let bytes: Vec<u8> = (0..4096)
        .map(|_| (rng.next_f32() * 127.0) as i8 as u8)
        .collect();
    std::fs::write(&garbage, &bytes).expect("write");
    let msg = load_err(&garbage, None, WeightFormat::F32);
    assert!(msg.contains("model.gguf"), "{msg}");
    // GGUF magic followed by garbage.
    let mut gguf_garbage = b"GGUF".to_vec();
    gguf_garbage.extend_from_slice(&bytes);
    std::fs::write(&garbage, &gguf_garbage).expect("write");
    let msg = load_err(&garbage, None, WeightFormat::F32);
    assert!(msg.contains("model.gguf") && msg.contains("GGUF"), "{msg}");
    let missing = dir.path().join("nope.gguf");
    let msg = load_err(&missing, None, WeightFormat::F32);
    assert!(msg.contains("nope.gguf"), "{msg}");
    assert!(read_config(&missing).is_err());
    let empty_dir = dir.path().join("empty");
    std::fs::create_dir_all(&empty_dir).expect("dir");
    std::fs::write(empty_dir.join("config.json"), config_json(false)).expect("config");
    let msg = load_err(&empty_dir, None, WeightFormat::F32);
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn unsupported_architecture_and_format_are_clear_errors() {
    let dir = TempDir::new("arch");
    let weights = tiny_weights(1, false);
    let gpt2 = dir.path().join("gpt2.gguf");
    write_gguf(&gpt2, &weights, GgmlDType::F32, "gpt2");
    let err = read_config(&gpt2).expect_err("gpt2 is not llama");
    assert!(matches!(err, EngineError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("gpt2"), "{err}");
    std::fs::write(
        dir.path().join("config.json"),
        config_json(false).replace("\"llama\"", "\"gpt2\""),
    )
    .expect("config");
    let err = read_config(dir.path()).expect_err("gpt2 config");
    assert!(
        err.to_string().contains("unsupported architecture"),
        "{err}"
    );
    let model = tiny_model(false);
    let msg = load_err(&model.hf, None, WeightFormat::Quantized);
    assert!(msg.contains("GGUF"), "{msg}");
}

#[test]
fn indivisible_tensor_degree_names_the_valid_degrees() {
    let model = tiny_model(false);
    let cfg = read_config(&model.gguf_f32).expect("config");
    assert_eq!(cfg.valid_tensor_degrees(), vec![1, 2]);
    for degree in [3, 4] {
        let spec = ShardSpec {
            layers: 0..LAYERS,
            tp_rank: 0,
            tp_degree: degree,
        };
        let msg = load_err(&model.gguf_f32, Some(spec), WeightFormat::F32);
        assert!(
            msg.contains(&format!("tensor degree {degree}")) && msg.contains("valid degrees: 1, 2"),
            "{msg}"
        );
    }
    let bad_range = ShardSpec {
        layers: 2..9,
        tp_rank: 0,
        tp_degree: 1,
    };
    let msg = load_err(&model.hf, Some(bad_range), WeightFormat::F32);
    assert!(msg.contains("layer range 2..9"), "{msg}");
}

#[test]
fn misuse_of_forward_is_an_error_not_a_panic() {
    let model = tiny_model(false);
    let cfg = read_config(&model.hf).expect("config");
    let stages: Vec<Shard> = ShardSpec::pipeline_stages(&cfg, 2)
        .iter()
        .map(|s| load(&model.hf, s, WeightFormat::F32))
        .collect();
    let (first, second) = (&stages[0], &stages[1]);
    let mut cache = first.new_cache();
    let ar = &mut NoAllReduce;
    // Out-of-vocabulary id, empty input, wrong position.
    assert!(first
        .forward(StageInput::Tokens(vec![VOCAB as u32]), 0, &mut cache, ar)
        .is_err());
    assert!(first
        .forward(StageInput::Tokens(vec![]), 0, &mut cache, ar)
        .is_err());
    assert!(first
        .forward(StageInput::Tokens(vec![1]), 5, &mut cache, ar)
        .is_err());
    // Wrong kind of input for the stage, wrong hidden width.
    let hidden = Tensor::zeros((2, HIDDEN), candle_core::DType::F32, &Device::Cpu).expect("zeros");
    assert!(first
        .forward(StageInput::Hidden(hidden.clone()), 0, &mut cache, ar)
        .is_err());
    let mut cache2 = second.new_cache();
    assert!(second
        .forward(StageInput::Tokens(vec![1]), 0, &mut cache2, ar)
        .is_err());
    let narrow =
        Tensor::zeros((2, HIDDEN - 1), candle_core::DType::F32, &Device::Cpu).expect("zeros");
    assert!(second
        .forward(StageInput::Hidden(narrow), 0, &mut cache2, ar)
        .is_err());
    // A cache of another shard.
    let full = load(&model.hf, &ShardSpec::full(&cfg), WeightFormat::F32);
    let mut wrong_cache = full.new_cache();
    assert!(first
        .forward(StageInput::Tokens(vec![1]), 0, &mut wrong_cache, ar)
        .is_err());
    // Past the context length.
    let long = vec![1u32; 257];
    assert!(first
        .forward(StageInput::Tokens(long), 0, &mut cache, ar)
        .is_err());
    // The cache is still usable after rejected calls; positions continue.
    assert!(matches!(
        first.forward(StageInput::Tokens(vec![1, 2]), 0, &mut cache, ar),
        Ok(StageOutput::Hidden(_))
    ));
    assert_eq!(cache.seq_len(), 2);
    assert!(second
        .forward(StageInput::Hidden(hidden), 0, &mut cache2, ar)
        .is_ok());
}

#[test]
fn prefill_in_pieces_equals_prefill_at_once() {
    // Chunked prefill exercises the causal mask with a cache offset.
    let model = tiny_model(false);
    let cfg = read_config(&model.hf).expect("config");
    let shard = load(&model.hf, &ShardSpec::full(&cfg), WeightFormat::F32);
    let run = |chunks: &[&[u32]]| {
        let mut cache = shard.new_cache();
        let mut pos = 0;
        let mut last = None;
        for chunk in chunks {
            last = Some(
                shard
                    .forward(
                        StageInput::Tokens(chunk.to_vec()),
                        pos,
                        &mut cache,
                        &mut NoAllReduce,
                    )
                    .expect("forward"),
            );
            pos += chunk.len();
        }
        logits_of(last.expect("ran"))
    };
    let once = run(&[&PROMPT]);
    let pieces = run(&[&PROMPT[..2], &PROMPT[2..3], &PROMPT[3..]]);
    let diff = max_abs_diff(&[once], &[pieces]);
    assert!(diff <= 1e-4, "{diff}");
}

#[test]
fn shard_and_cache_can_move_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Shard>();
    assert_send_sync::<engine::model::KvCache>();
}
