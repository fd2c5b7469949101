//! Finding a model's files: a local directory, or a Hugging Face repo id resolved through
//! the `hf-hub` crate and its cache.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};
use crate::progress::{HubDownload, Reporter};

/// The files of a Hugging Face style checkpoint.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user asked for (a path or `owner/name[@revision]`).
    pub spec: String,
    /// A short name for the model (the directory or repo name).
    pub name: String,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
}

/// Resolves `spec`: an existing directory is read as a checkpoint directory; otherwise
/// `owner/name` with an optional `@revision` is looked up in the Hugging Face cache
/// (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) and, unless
/// `HF_HUB_OFFLINE=1`, fetched from the hub (`HF_ENDPOINT`, else huggingface.co) when
/// missing, with progress reported as it downloads.
pub fn resolve(spec: &str) -> Result<ModelFiles> {
    resolve_with(spec, &Reporter::default())
}

/// [`resolve`], reporting download progress to `reporter`.
pub fn resolve_with(spec: &str, reporter: &Reporter) -> Result<ModelFiles> {
    let path = Path::new(spec);
    if path.is_dir() {
        return from_dir(spec, path);
    }
    if path.exists() {
        return Err(Error::ModelNotFound {
            spec: spec.into(),
            message: "is a file but not a .gguf; expected a GGUF file, a checkpoint directory or a Hugging Face repo id"
                .into(),
        });
    }
    let (repo_id, revision) = parse_repo_id(spec).ok_or_else(|| Error::ModelNotFound {
        spec: spec.into(),
        message: "no such directory, and not a Hugging Face repo id (owner/name[@revision])".into(),
    })?;
    from_hub(spec, &repo_id, &revision, reporter)
}

fn parse_repo_id(spec: &str) -> Option<(String, String)> {
    let (id, rev) = match spec.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, rev),
        Some(_) => return None,
        None => (spec, "main"),
    };
    let (owner, name) = id.split_once('/')?;
    let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    (ok(owner) && ok(name)).then(|| (id.to_string(), rev.to_string()))
}

fn from_dir(spec: &str, dir: &Path) -> Result<ModelFiles> {
    let need = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(Error::ModelNotFound {
                spec: spec.into(),
                message: format!("{} is missing", p.display()),
            })
        }
    };
    let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| spec.to_string());
    Ok(ModelFiles {
        spec: spec.into(),
        name,
        config: need("config.json")?,
        weights: crate::weights::safetensors_files(dir)?,
        tokenizer: need("tokenizer.json")?,
        tokenizer_config: optional("tokenizer_config.json"),
        generation_config: optional("generation_config.json"),
    })
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The hub cache directory, as the Python `huggingface_hub` library chooses it.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    Cache::from_env().path().clone()
}

fn from_hub(spec: &str, repo_id: &str, revision: &str, reporter: &Reporter) -> Result<ModelFiles> {
    let cache_dir = hub_cache_dir();
    let offline = env_flag("HF_HUB_OFFLINE");
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let cached = Cache::new(cache_dir.clone()).repo(repo.clone());
    let api = if offline {
        None
    } else {
        Some(
            // from_env: HF_ENDPOINT names a mirror, as for the Python library.
            hf_hub::api::sync::ApiBuilder::from_env()
                .with_cache_dir(cache_dir.clone())
                .with_progress(false)
                .build()
                .map_err(|e| Error::ModelNotFound {
                    spec: spec.into(),
                    message: format!("cannot set up the Hugging Face hub client: {e}"),
                })?
                .repo(repo),
        )
    };
    // A revision given as a commit hash has no `refs/` entry; its snapshot is named by it.
    let snapshot = cache_dir
        .join(format!("models--{}", repo_id.replace('/', "--")))
        .join("snapshots")
        .join(revision);
    let fetch = |file: &str| -> std::result::Result<PathBuf, String> {
        if let Some(p) = cached.get(file) {
            return Ok(p);
        }
        if snapshot.join(file).is_file() {
            return Ok(snapshot.join(file));
        }
        match &api {
            None => Err(format!(
                "{file} is not in the hub cache {} and HF_HUB_OFFLINE is set",
                cache_dir.display()
            )),
            Some(api) => api
                .download_with_progress(file, HubDownload::new(reporter.clone(), file))
                .map_err(|e| format!("{file}: {e}")),
        }
    };
    let need = |file: &str| {
        fetch(file).map_err(|message| Error::ModelNotFound {
            spec: spec.into(),
            message,
        })
    };
    let config = need("config.json")?;
    let weights = match fetch("model.safetensors.index.json") {
        Ok(index) => {
            let dir = index.parent().expect("cache file has a parent");
            let shards = crate::weights::safetensors_files(dir).unwrap_or_default();
            // Make sure every shard is present (fetching the missing ones).
            shards
                .iter()
                .map(|s| need(&s.file_name().unwrap().to_string_lossy()))
                .collect::<Result<Vec<_>>>()?
        }
        Err(_) => vec![need("model.safetensors")?],
    };
    Ok(ModelFiles {
        spec: spec.into(),
        name: repo_id.rsplit('/').next().unwrap_or(repo_id).to_string(),
        config,
        weights,
        tokenizer: need("tokenizer.json")?,
        tokenizer_config: fetch("tokenizer_config.json").ok(),
        generation_config: fetch("generation_config.json").ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_parse() {
        assert_eq!(parse_repo_id("a/b"), Some(("a/b".into(), "main".into())));
        assert_eq!(
            parse_repo_id("Org/Model-1.5B@v2"),
            Some(("Org/Model-1.5B".into(), "v2".into()))
        );
        assert_eq!(parse_repo_id("a/b@"), None);
        assert_eq!(parse_repo_id("nope"), None);
        assert_eq!(parse_repo_id("a/b/c"), None);
    }
}
