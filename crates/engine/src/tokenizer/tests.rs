use super::*;

#[test]
fn byte_table_is_the_gpt2_one() {
    let table = BYTE_TO_CHAR;
    assert_eq!(table[usize::from(b' ')], 'Ġ');
    assert_eq!(table[usize::from(b'\n')], 'Ċ');
    assert_eq!(table[usize::from(b'a')], 'a');
    assert_eq!(table[0], '\u{100}');
    assert_eq!(table[0xad], '\u{143}');
    let distinct: HashSet<char> = table.iter().copied().collect();
    assert_eq!(distinct.len(), 256);
}

/// A tiny byte-level vocabulary: all 256 byte chars, a few merges and two
/// added tokens, written as a `tokenizer.json`.
fn tiny_tokenizer_json(merges_as_pairs: bool) -> String {
    let mut vocab: Vec<(String, u32)> = vec![
        ("<|im_start|>".to_string(), 0),
        ("<|user_word|>".to_string(), 1),
    ];
    for (idx, c) in BYTE_TO_CHAR.iter().enumerate() {
        vocab.push((c.to_string(), idx as u32 + 2));
    }
    let merge_list = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")];
    for (id, (left, right)) in (258..).zip(merge_list) {
        vocab.push((format!("{left}{right}"), id));
    }
    let vocab_json: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .map(|(t, id)| (t, serde_json::Value::from(id)))
        .collect();
    let merges_json: Vec<serde_json::Value> = merge_list
        .iter()
        .map(|(l, r)| {
            if merges_as_pairs {
                serde_json::json!([l, r])
            } else {
                serde_json::json!(format!("{l} {r}"))
            }
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 0, "content": "<|im_start|>", "special": true, "single_word": false,
             "lstrip": false, "rstrip": false, "normalized": false},
            {"id": 1, "content": "<|user_word|>", "special": false, "single_word": false,
             "lstrip": false, "rstrip": false, "normalized": false},
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab_json, "merges": merges_json},
    })
    .to_string()
}

fn tiny(merges_as_pairs: bool) -> Tokenizer {
    let config = r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|user_word|>"}, "pad_token": null}"#;
    Tokenizer::from_json_str(&tiny_tokenizer_json(merges_as_pairs), Some(config)).unwrap()
}

#[test]
fn tiny_vocab_merges_by_rank_in_both_merge_forms() {
    for pairs in [false, true] {
        let tok = tiny(pairs);
        let ids = tok.encode("hello world", true).unwrap();
        let tokens: Vec<&str> = ids.iter().map(|id| tok.id_to_token(*id).unwrap()).collect();
        assert_eq!(tokens, ["hell", "o", "Ġw", "o", "r", "l", "d"]);
        assert_eq!(tok.decode(&ids, false), "hello world");
        assert_eq!(tok.bos_id(), Some(0));
        // No add_bos_token and no post-processor: no BOS.
        assert!(!tok.adds_bos());
        assert_eq!(
            tok.encode_prompt("he").unwrap(),
            tok.encode("he", true).unwrap()
        );
        assert_eq!(tok.eos_ids(), vec![1]);
        assert_eq!(tok.pad_id(), None);
    }
}

#[test]
fn add_bos_token_puts_bos_first_once() {
    let config = r#"{"bos_token": "<|im_start|>", "add_bos_token": true}"#;
    let tok = Tokenizer::from_json_str(&tiny_tokenizer_json(true), Some(config)).unwrap();
    assert!(tok.adds_bos());
    let ids = tok.encode_prompt("he").unwrap();
    assert_eq!(ids[0], 0);
    assert_eq!(&ids[1..], tok.encode("he", true).unwrap().as_slice());
    // A template that printed the BOS text gets no second one.
    assert_eq!(tok.encode_prompt("<|im_start|>he").unwrap(), ids);
}

#[test]
fn special_tokens_need_allow_special_but_user_defined_ones_do_not() {
    let tok = tiny(true);
    assert_eq!(tok.encode("<|im_start|>he", true).unwrap()[0], 0);
    let plain = tok.encode("<|im_start|>he", false).unwrap();
    assert!(!plain.contains(&0));
    assert_eq!(tok.decode(&plain, false), "<|im_start|>he");
    assert_eq!(
        tok.encode("x<|user_word|>", false).unwrap().last(),
        Some(&1)
    );
    assert_eq!(tok.decode(&[0, 1], true), "<|user_word|>");
    assert_eq!(tok.decode(&[0, 1], false), "<|im_start|><|user_word|>");
}

#[test]
fn unsupported_tokenizer_json_is_an_error_naming_the_part() {
    let mut json: serde_json::Value = serde_json::from_str(&tiny_tokenizer_json(false)).unwrap();
    json["model"]["type"] = "WordPiece".into();
    let err = Tokenizer::from_json_str(&json.to_string(), None).unwrap_err();
    assert!(
        err.to_string().contains("model type \"WordPiece\""),
        "{err}"
    );

    let mut json: serde_json::Value = serde_json::from_str(&tiny_tokenizer_json(false)).unwrap();
    json["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
    json["decoder"] = serde_json::json!({"type": "WordPiece", "prefix": "##", "cleanup": true});
    let err = Tokenizer::from_json_str(&json.to_string(), None).unwrap_err();
    assert!(err.to_string().contains("decoder \"WordPiece\""), "{err}");

    let mut json: serde_json::Value = serde_json::from_str(&tiny_tokenizer_json(false)).unwrap();
    json["model"]["merges"] = serde_json::json!(["h e", "x y z"]);
    let err = Tokenizer::from_json_str(&json.to_string(), None).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("tokenizer: tokenizer.json: invalid"),
        "{err}"
    );

    let config = r#"{"eos_token": "</s>"}"#;
    let err = Tokenizer::from_json_str(&tiny_tokenizer_json(false), Some(config)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tokenizer: tokenizer_config.json: eos_token \"</s>\" is not in the vocabulary"
    );
}

#[test]
fn stream_decoder_holds_back_partial_characters() {
    let tok = tiny(true);
    // "é" is 0xC3 0xA9: two byte tokens.
    let ids = tok.encode("é!", false).unwrap();
    assert_eq!(ids.len(), 3);
    let mut decoder = tok.decoder();
    assert_eq!(decoder.push(ids[0]), None);
    assert_eq!(decoder.push(ids[1]).as_deref(), Some("é"));
    assert_eq!(decoder.push(ids[2]).as_deref(), Some("!"));
    assert_eq!(decoder.finish(), None);

    let mut decoder = tok.decoder();
    assert_eq!(decoder.push(ids[0]), None);
    assert_eq!(decoder.finish().as_deref(), Some("\u{fffd}"));
}

/// Pieces by hand: `▁a`, `b`, `▁ab` (highest score first), `abc`.
#[test]
fn sentencepiece_merges_rank_by_the_merged_piece_score() {
    let tokens = ["<unk>", "▁", "a", "b", "c", "▁a", "ab", "▁ab", "abc", "bc"];
    let types = [2, 1, 1, 1, 1, 1, 1, 1, 1, 1];
    let scores = [0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0];
    let merges = gguf::merges_from_scores(&tokens, &types, &scores);
    let pairs: Vec<(&str, &str)> = merges
        .iter()
        .map(|(l, r)| (l.as_str(), r.as_str()))
        .collect();
    // By piece score: ▁a, ab, ▁ab (as ▁+ab then ▁a+b, by left id), abc
    // (a+bc then ab+c), bc.
    assert_eq!(
        pairs,
        [
            ("▁", "a"),
            ("a", "b"),
            ("▁", "ab"),
            ("▁a", "b"),
            ("a", "bc"),
            ("ab", "c"),
            ("b", "c"),
        ]
    );
}

#[test]
fn a_tokenizer_with_ids_past_the_embedding_rows_does_not_fit() {
    let tok = tiny(true);
    // 2 added + 256 bytes + 4 merges: ids 0..=261.
    assert_eq!(tok.vocab_size(), 262);
    tok.check_fits(262, "t.json", "m")
        .expect("exactly the rows");
    tok.check_fits(300, "t.json", "m")
        .expect("a padded embedding");
    let err = tok
        .check_fits(261, "t.json", "vocab_size in config.json")
        .unwrap_err();
    assert!(matches!(err, EngineError::Tokenizer(_)), "{err:?}");
    assert!(err.recurs());
    let msg = err.to_string();
    assert!(
        msg.contains("t.json has ids up to 261")
            && msg.contains("261 token rows (vocab_size in config.json)"),
        "{msg}"
    );
}
