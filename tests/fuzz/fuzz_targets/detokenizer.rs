//! The streaming detokenizer and the stop checker on arbitrary token ids and stop
//! strings: never a panic, and the streamed text is what decoding all tokens at once
//! gives (up to where a stop string ends it).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use moeserve_core::engine::detok::{Detokenizer, StopChecker};
use moeserve_core::{LoadOptions, TextCodec};

fn codec() -> &'static TextCodec {
    static C: OnceLock<TextCodec> = OnceLock::new();
    C.get_or_init(|| {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/models/llama");
        moeserve_core::load(root, &LoadOptions::default()).unwrap().codec
    })
}

fuzz_target!(|data: &[u8]| {
    let c = codec();
    let vocab = c.tokenizer().get_vocab_size(true) as u32;
    // First byte: how many bytes after it make the stop strings.
    let (stop_len, rest) = match data.split_first() {
        Some((&n, rest)) => ((n as usize % 16).min(rest.len()), rest),
        None => return,
    };
    let (stop_bytes, ids) = rest.split_at(stop_len);
    let stops: Vec<String> = String::from_utf8_lossy(stop_bytes)
        .split('|')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let ids: Vec<u32> = ids.iter().map(|&b| u32::from(b) * 7 % vocab).collect();
    let mut detok = Detokenizer::new(false);
    let mut checker = StopChecker::new(stops.clone());
    let mut streamed = String::new();
    for &id in &ids {
        let piece = detok.push(c, id);
        let (out, _) = checker.push(&piece);
        streamed.push_str(&out);
        if checker.stopped() {
            break;
        }
    }
    if !checker.stopped() {
        let (out, _) = checker.push(&detok.flush(c));
        streamed.push_str(&out);
        streamed.push_str(&checker.flush());
    }
    if stops.is_empty() {
        assert_eq!(
            streamed,
            c.decode(&ids, false).unwrap(),
            "streamed text != decoded text"
        );
    }
});
