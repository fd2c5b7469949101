//! Loading checkpoints: Hugging Face hub cache resolution (offline), sharded safetensors,
//! and the errors a broken checkpoint produces.

use std::collections::HashMap;
use std::path::Path;

mod common;

use common::{fixture, prefill_logits};
use moeserve_core::LoadOptions;

/// A copy of a fixture directory that a test may break.
fn copy_fixture(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match moeserve_core::load(dir.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// The prefill logits of a fixed prompt: the same checkpoint found two ways must agree.
fn prompt_logits(spec: &str) -> Vec<f32> {
    let loaded = moeserve_core::load(spec, &LoadOptions::default()).unwrap();
    let prompt = loaded.codec.encode("The quick brown fox").unwrap();
    prefill_logits(&loaded, &prompt)
}

fn read_tensors(path: &Path) -> HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

/// Lays out `fixture` the way hf-hub / huggingface_hub store a download: content in
/// `blobs/`, `snapshots/<commit>/<file>` symlinks to them, `refs/main` naming the commit.
fn make_hub_cache(cache: &Path, repo_id: &str, fixture_name: &str, commit: &str) {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let blobs = repo.join("blobs");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for (i, entry) in std::fs::read_dir(fixture(fixture_name)).unwrap().enumerate() {
        let entry = entry.unwrap();
        let blob = blobs.join(format!("blob{i:04}"));
        std::fs::copy(entry.path(), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(entry.file_name())).unwrap();
    }
}

/// Everything that sets the HF_* environment variables lives in this one test, so that
/// parallel tests never see each other's settings.
#[test]
fn hub_repo_ids_resolve_from_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    make_hub_cache(&cache, "moeserve-test/tiny-qwen3-moe", "qwen3_moe", commit);
    let local = prompt_logits(fixture("qwen3_moe").to_str().unwrap());

    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_HUB_CACHE", &cache);
    assert_eq!(prompt_logits("moeserve-test/tiny-qwen3-moe"), local);
    assert_eq!(
        prompt_logits(&format!("moeserve-test/tiny-qwen3-moe@{commit}")),
        local
    );
    let loaded = moeserve_core::load("moeserve-test/tiny-qwen3-moe", &LoadOptions::default()).unwrap();
    assert_eq!(loaded.name, "tiny-qwen3-moe");

    // A repo that is not in the cache fails at once, saying why (no network attempt).
    let err = moeserve_core::load("moeserve-test/absent", &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("config.json"),
        "{err}"
    );

    // HF_HOME/hub is the cache when HF_HUB_CACHE is unset.
    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HOME", tmp.path());
    assert_eq!(prompt_logits("moeserve-test/tiny-qwen3-moe"), local);
    std::env::remove_var("HF_HOME");
    std::env::remove_var("HF_HUB_OFFLINE");
}

#[test]
fn sharded_checkpoints_load_through_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sharded");
    copy_fixture("mixtral", &dir);
    let tensors = read_tensors(&dir.join("model.safetensors"));
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let subset: HashMap<String, candle_core::Tensor> =
            part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&subset, dir.join(shard)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(
        prompt_logits(dir.to_str().unwrap()),
        prompt_logits(fixture("mixtral").to_str().unwrap())
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_fixture("qwen2_moe", &dir);
    let mut tensors = read_tensors(&dir.join("model.safetensors"));
    let gone = "model.layers.2.mlp.experts.5.up_proj.weight";
    tensors.remove(gone).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains(gone) && err.contains("model.safetensors"), "{err}");
}

#[test]
fn a_shape_mismatch_names_file_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_fixture("llama", &dir);
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = 100.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors")
            && err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[100, 64]")
            && err.contains("[128, 64]"),
        "{err}"
    );
}

#[test]
fn a_corrupt_file_is_reported_with_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_fixture("qwen2", &dir);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("cannot read weights"),
        "{err}"
    );
    std::fs::write(&path, b"not a safetensors file").unwrap();
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn an_unsupported_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_fixture("llama", &dir);
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, text.replace("LlamaForCausalLM", "FalconForCausalLM")).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("FalconForCausalLM") && err.contains("unsupported architecture"),
        "{err}"
    );
}

#[test]
fn a_directory_without_weights_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_fixture("llama", &dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("no *.safetensors"), "{err}");
}

#[test]
fn fixture_tokenizer_matches_the_reference_ids() {
    // The generator encoded the prompts with the Python `tokenizers` library.
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama").join("reference.json")).unwrap())
            .unwrap();
    let loaded = moeserve_core::load(fixture("llama").to_str().unwrap(), &LoadOptions::default()).unwrap();
    for p in reference["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
        let text = p["text"].as_str().unwrap();
        assert_eq!(loaded.codec.encode(text).unwrap(), ids);
        assert_eq!(loaded.codec.decode(&ids, false).unwrap(), text);
    }
    let eos = loaded.codec.tokenizer().token_to_id("<|im_end|>").unwrap();
    assert_eq!(loaded.codec.eos_token_ids(), &[eos]);
    assert!(loaded.codec.chat_template().unwrap().contains("<|im_start|>"));
}

/// `--dtype bf16` and `f16` compute in half precision: close to f32, not equal.
#[test]
fn half_precision_dtypes_stay_close_to_f32() {
    let dir = fixture("qwen3_moe");
    let load = |dtype| {
        moeserve_core::load(
            dir.to_str().unwrap(),
            &LoadOptions {
                dtype: Some(dtype),
                ..LoadOptions::default()
            },
        )
        .unwrap()
    };
    let logits = |dtype| {
        let loaded = load(dtype);
        assert_eq!(loaded.dtype, dtype);
        let prompt = loaded.codec.encode("The quick brown fox jumps").unwrap();
        prefill_logits(&loaded, &prompt)
    };
    let full = logits(candle_core::DType::F32);
    let spread =
        full.iter().cloned().fold(f32::MIN, f32::max) - full.iter().cloned().fold(f32::MAX, f32::min);
    for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
        let half = logits(dtype);
        let err = half
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            err > 0.0 && err < 0.05 * spread,
            "{dtype:?}: max error {err}, logit spread {spread}"
        );
    }
}

/// Loading reports its progress: every tensor of the checkpoint, by file, ending at the
/// checkpoint's size, for safetensors and for GGUF alike.
#[test]
fn loading_reports_progress_to_the_caller() {
    use moeserve_core::progress::{LoadProgress, LoadStage, ProgressObserver, Reporter};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Recorder(Mutex<(Vec<LoadProgress>, Vec<LoadProgress>)>);
    impl ProgressObserver for Recorder {
        fn update(&self, p: &LoadProgress) {
            self.0.lock().unwrap().0.push(p.clone());
        }
        fn finish(&self, p: &LoadProgress) {
            self.0.lock().unwrap().1.push(p.clone());
        }
    }
    for (spec, file) in [
        (fixture("qwen3_moe"), "model.safetensors"),
        (fixture("mixtral-f16.gguf"), "mixtral-f16.gguf"),
    ] {
        let recorder = Arc::new(Recorder::default());
        let opts = LoadOptions {
            progress: Reporter::new(recorder.clone()),
            ..LoadOptions::default()
        };
        moeserve_core::load(spec.to_str().unwrap(), &opts).unwrap();
        let (updates, finished) = std::mem::take(&mut *recorder.0.lock().unwrap());
        assert_eq!(finished.len(), 1, "{spec:?}");
        let end = &finished[0];
        assert_eq!(end.stage, LoadStage::Weights);
        assert_eq!(end.file, file);
        assert_eq!(
            (end.done, end.items_done),
            (end.total, end.items_total),
            "{end:?}"
        );
        assert!(end.items_total > 10, "{end:?}");
        assert_eq!(updates.len(), end.items_total, "one update per tensor");
        assert!(updates.windows(2).all(|w| w[0].done < w[1].done));
    }
}
