//! GGUF loading: the tiny MoE fixtures' GGUF twins (written like llama.cpp's converter
//! writes them) run through the same model code as their safetensors originals, and bad
//! files are reported clearly.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
mod common;

use common::{fixture, prefill_logits};
use moeserve_core::generate::generate;
use moeserve_core::sampling::Sampler;
use moeserve_core::{BlockPool, KvStorage, LoadOptions, LoadedModel};

fn load(path: &Path) -> LoadedModel {
    moeserve_core::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

fn load_err(path: &Path) -> String {
    match moeserve_core::load(path.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

fn prompts(name: &str) -> Vec<(String, Vec<u32>)> {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap())
            .unwrap();
    r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["text"].as_str().unwrap().to_string(),
                serde_json::from_value(p["ids"].clone()).unwrap(),
            )
        })
        .collect()
}

fn greedy(m: &LoadedModel, ids: &[u32]) -> Vec<u32> {
    let mut kv = KvStorage::new(m.model.kv_layout(), 16, 16).unwrap();
    let mut alloc = BlockPool::new(16);
    generate(
        m.model.as_ref(),
        &mut kv,
        &mut alloc,
        ids,
        32,
        &mut Sampler::new(0.0, 0),
        &[],
    )
    .unwrap()
    .tokens
}

fn check_twin(gguf: &str, safetensors: &str, logit_tol: f32) {
    let q = load(&fixture(gguf));
    let s = load(&fixture(safetensors));
    assert_eq!(q.model.config().architecture, s.model.config().architecture);
    assert_eq!(q.model.config().sparse_layers, s.model.config().sparse_layers);
    assert_eq!(q.model.config().num_layers, s.model.config().num_layers);
    assert_eq!(q.model.has_mtp(), s.model.has_mtp());
    assert_eq!(q.model.kv_layout().num_layers, s.model.kv_layout().num_layers);
    for (text, ids) in prompts(safetensors) {
        // The tokenizer rebuilt from GGUF metadata encodes like tokenizer.json.
        assert_eq!(q.codec.encode(&text).unwrap(), ids, "{gguf}: {text:?}");
        let (a, b) = (prefill_logits(&q, &ids), prefill_logits(&s, &ids));
        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(
            err < logit_tol,
            "{gguf}: logits differ from {safetensors} by {err}"
        );
        assert_eq!(
            greedy(&q, &ids),
            greedy(&s, &ids),
            "{gguf}: greedy tokens differ for {text:?}"
        );
    }
    assert_eq!(q.codec.eos_token_ids(), s.codec.eos_token_ids());
    assert_eq!(q.codec.chat_template(), s.codec.chat_template());
}

#[test]
fn mixtral_in_llama_gguf_f32_matches_safetensors() {
    check_twin("mixtral-f32.gguf", "mixtral", 1e-4);
}

#[test]
fn mixtral_in_llama_gguf_f16_matches_safetensors() {
    check_twin("mixtral-f16.gguf", "mixtral", 2e-2);
}

#[test]
fn olmoe_gguf_f16_matches_safetensors() {
    check_twin("olmoe-f16.gguf", "olmoe", 2e-2);
}

#[test]
fn sharded_gguf_loads_from_the_first_shard() {
    // Split the F32 twin into two shards with candle's GGUF writer.
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("mixtral-f32.gguf");
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .iter()
        .map(|n| {
            (
                (*n).clone(),
                content.tensor(&mut f, n, &candle_core::Device::Cpu).unwrap(),
            )
        })
        .collect();
    let metadata: Vec<(&str, &Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let half = tensors.len() / 2;
    for (i, part) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let path = tmp.path().join(format!("tiny-0000{}-of-00002.gguf", i + 1));
        let mut out = std::fs::File::create(path).unwrap();
        let part: Vec<(&str, &QTensor)> = part.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut out, &metadata, &part).unwrap();
    }
    let sharded = load(&tmp.path().join("tiny-00001-of-00002.gguf"));
    let whole = load(&src);
    let ids = &prompts("mixtral")[1].1;
    assert_eq!(prefill_logits(&sharded, ids), prefill_logits(&whole, ids));
}

/// A copy of fixture `name` with metadata `key` set to `value`.
fn with_metadata(name: &str, key: &str, value: Value, out: &Path) {
    let src = fixture(name);
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| {
            (
                n.clone(),
                content.tensor(&mut f, n, &candle_core::Device::Cpu).unwrap(),
            )
        })
        .collect();
    let mut metadata = content.metadata.clone();
    metadata.insert(key.to_string(), value);
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut std::fs::File::create(out).unwrap(), &metadata, &tensors).unwrap();
}

/// llama.cpp writes `q_lora_rank = 0` for a DeepSeek model without query compression
/// (V2-Lite's shape, as the deepseek_v2 fixture): read as none, not as a rank whose
/// tensors are missing.
#[test]
fn deepseek_q_lora_rank_zero_means_no_query_compression() {
    let tmp = tempfile::tempdir().unwrap();
    let zero = tmp.path().join("deepseek_v2-q0.gguf");
    with_metadata(
        "deepseek_v2-f16.gguf",
        "deepseek2.attention.q_lora_rank",
        Value::U32(0),
        &zero,
    );
    let q = load(&zero);
    let s = load(&fixture("deepseek_v2"));
    let ids = &prompts("deepseek_v2")[0].1;
    assert_eq!(greedy(&q, ids), greedy(&s, ids));
}

/// A model bigger than the memory left (here: a KV reserve past any machine's memory)
/// is refused before loading, with the numbers.
#[test]
fn a_model_past_the_memory_left_is_refused_before_loading() {
    if moeserve_core::process::available_memory().is_none() {
        return;
    }
    let opts = LoadOptions {
        reserve_bytes: usize::MAX / 4,
        ..LoadOptions::default()
    };
    let err = match moeserve_core::load(fixture("olmoe-f16.gguf").to_str().unwrap(), &opts) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("GB of memory is available") && err.contains("KV pool"),
        "{err}"
    );
}

fn write_gguf(path: &Path, arch: &str) {
    let md = [("general.architecture", Value::String(arch.into()))];
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t = QTensor::quantize(
        &candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &[("token_embd.weight", &t)]).unwrap();
}

#[test]
fn bad_gguf_files_are_reported_with_the_file_and_the_problem() {
    let tmp = tempfile::tempdir().unwrap();

    let wrong_magic = tmp.path().join("wrong-magic.gguf");
    std::fs::write(&wrong_magic, b"GGML\x03\0\0\0 and then nonsense").unwrap();
    let err = load_err(&wrong_magic);
    assert!(
        err.contains("wrong-magic.gguf") && err.contains("wrong magic"),
        "{err}"
    );

    let truncated = tmp.path().join("truncated.gguf");
    let bytes = std::fs::read(fixture("olmoe-f16.gguf")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_err(&truncated);
    assert!(
        err.contains("truncated.gguf") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&truncated, &bytes[..100]).unwrap();
    let err = load_err(&truncated);
    assert!(err.contains("truncated.gguf"), "{err}");

    let unsupported = tmp.path().join("gptneox.gguf");
    write_gguf(&unsupported, "gptneox");
    let err = load_err(&unsupported);
    assert!(
        err.contains("unsupported architecture") && err.contains("gptneox") && err.contains("gptneox.gguf"),
        "{err}"
    );

    // An unknown quantization type id (99) in the tensor table.
    let unknown = tmp.path().join("unknown-quant.gguf");
    write_gguf(&unknown, "llama");
    let mut bytes = std::fs::read(&unknown).unwrap();
    let name_at = bytes.windows(17).position(|w| w == b"token_embd.weight").unwrap();
    // name, n_dims (u32), dims (2 x u64), then the type (u32).
    let type_at = name_at + 17 + 4 + 16;
    assert_eq!(
        u32::from_le_bytes(bytes[type_at..type_at + 4].try_into().unwrap()),
        0,
        "F32 is type 0"
    );
    bytes[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&unknown, bytes).unwrap();
    let err = load_err(&unknown);
    assert!(
        err.contains("unknown-quant.gguf") && err.contains("unknown quantization type"),
        "{err}"
    );

    // Dimensions whose product overflows (found by the gguf_header fuzz target: the
    // size computation panicked, and wrapped in release builds), and a row that is not
    // whole quantization blocks.
    let huge = tmp.path().join("huge-dims.gguf");
    write_gguf(&huge, "llama");
    let mut bytes = std::fs::read(&huge).unwrap();
    let dims_at = bytes.windows(17).position(|w| w == b"token_embd.weight").unwrap() + 17 + 4;
    bytes[dims_at..dims_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    bytes[dims_at + 8..dims_at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&huge, &bytes).unwrap();
    let err = load_err(&huge);
    assert!(
        err.contains("huge-dims.gguf") && err.contains("too large"),
        "{err}"
    );
    bytes[dims_at..dims_at + 8].copy_from_slice(&3u64.to_le_bytes());
    bytes[dims_at + 8..dims_at + 16].copy_from_slice(&1u64.to_le_bytes());
    bytes[dims_at + 16..dims_at + 20].copy_from_slice(&2u32.to_le_bytes()); // Q4_0: blocks of 32
    std::fs::write(&huge, &bytes).unwrap();
    let err = load_err(&huge);
    assert!(err.contains("not whole blocks"), "{err}");
}

/// llama.cpp's `deepseek2` layout: latent attention with kv_b split into k_b/v_b.
#[test]
fn deepseek_v2_gguf_f16_matches_safetensors() {
    check_twin("deepseek_v2-f16.gguf", "deepseek_v2", 2e-2);
}

/// The same with V3's sigmoid routing, groups, correction bias (exp_probs_b) and YaRN.
#[test]
fn deepseek_v3_gguf_f16_matches_safetensors() {
    check_twin("deepseek_v3-f16.gguf", "deepseek_v3", 2e-2);
}

/// With a multi-token prediction block after the main layers (block_count counts it,
/// `deepseek2.nextn_predict_layers` says so): the main model is the same three layers, and
/// the MTP module loads from `blk.3.*` and `blk.3.nextn.*` (its draft logits are checked
/// against the torch reference in tests/reference.rs).
#[test]
fn deepseek_v3_with_mtp_gguf_f16_matches_safetensors() {
    check_twin("deepseek_v3_mtp-f16.gguf", "deepseek_v3_mtp", 2e-2);
    let q = load(&fixture("deepseek_v3_mtp-f16.gguf"));
    assert!(q.model.has_mtp());
    assert_eq!(q.model.config().num_layers, 3);
    assert_eq!(q.model.config().mtp_sparse_layers, vec![true]);
}
