//! The tokenizer on arbitrary text and arbitrary ids (in and out of the vocabulary):
//! encode, decode, and each token's bytes, for the byte-level BPE of the fixtures
//! (tokenizer.json, and rebuilt from GGUF metadata).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use moeserve_core::{LoadOptions, TextCodec};

fn codecs() -> &'static [TextCodec] {
    static C: OnceLock<Vec<TextCodec>> = OnceLock::new();
    C.get_or_init(|| {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/models");
        ["llama", "mixtral-f16.gguf"]
            .iter()
            .map(|m| {
                moeserve_core::load(&format!("{root}/{m}"), &LoadOptions::default())
                    .unwrap()
                    .codec
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let ids: Vec<u32> = data
        .chunks(2)
        .map(|c| u32::from(c[0]) | (u32::from(*c.get(1).unwrap_or(&0)) << 8))
        .collect();
    for c in codecs() {
        if let Ok(enc) = c.encode(&text) {
            let _ = c.decode(&enc, false);
        }
        let _ = c.decode(&ids, false);
        let _ = c.decode(&ids, true);
        for &id in ids.iter().take(64) {
            let _ = c.token_bytes(id);
        }
    }
});
