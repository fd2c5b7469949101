//! A model file's GGUF header and metadata: a malformed file gives a clear error, never
//! a panic or a read out of bounds. The input is written to a file (the loader maps
//! files), then opened, configured and its tokenizer built, as `moeserve serve` does.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use moeserve_core::gguf::{model_config, GgufCheckpoint};
use moeserve_core::TextCodec;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("moeserve-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.gguf");
    {
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(data).unwrap();
    }
    if let Ok(ckpt) = GgufCheckpoint::open(&path) {
        let _ = model_config(&ckpt);
        let _ = TextCodec::from_gguf(ckpt.metadata(), &path);
        for name in ckpt.files[0].content.tensor_infos.keys().take(4) {
            let _ = ckpt.qtensor(name, None, &moeserve_core::Device::Cpu);
        }
    }
});
