//! Where tensors come from.
//!
//! The model code asks a [`WeightStore`] for tensors by their canonical (Hugging Face)
//! names and expected shapes. The store finds them in memory-mapped safetensors files (one
//! or several shards) or GGUF files, or makes them up (random models for benchmarks), checks the
//! shape, converts to the compute dtype and reports loading progress.
//!
//! Memory mapping: each file is mapped once; a tensor is converted straight from the
//! mapped bytes into its compute-dtype buffer, so no file is ever read into a second,
//! whole-file buffer. (candle's CPU tensors own their storage, so the mapped bytes
//! themselves cannot back a tensor; the one copy is the conversion to the compute dtype.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::backend::{Backend, Isa};
use crate::error::{Error, Result};
use crate::progress::{LoadProgress, LoadStage, Reporter};

enum Source {
    Safetensors {
        files: Vec<(PathBuf, MmapedSafetensors)>,
        /// tensor name -> index into `files`
        index: HashMap<String, usize>,
    },
    /// A GGUF checkpoint: canonical names are mapped onto llama.cpp's.
    Gguf {
        ckpt: crate::gguf::GgufCheckpoint,
        stacked_experts: bool,
    },
    /// Every tensor asked for is made up on the spot (benchmarks of model shapes that
    /// have no checkpoint): matrices ~ N(0, std), norm weights one, biases zero.
    Random { std: f64 },
}

struct Progress {
    step: LoadProgress,
    started: Instant,
}

pub struct WeightStore {
    source: Source,
    /// FP8 checkpoints: the block size of their `weight_scale_inv` tensors.
    fp8_block: Option<(usize, usize)>,
    device: Device,
    /// The kernels the model's layers will run, which decides the form weights take.
    backend: Backend,
    dtype: DType,
    progress: Mutex<Progress>,
    reporter: Reporter,
}

impl WeightStore {
    /// Maps safetensors files (all shards of one checkpoint).
    pub fn from_safetensors(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        let mut bytes_total = 0;
        for (i, path) in paths.iter().enumerate() {
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on
            // the checkpoint not being modified while the server runs.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::CorruptWeights {
                path: path.clone(),
                message: e.to_string(),
            })?;
            for (name, view) in st.tensors() {
                bytes_total += view.data().len();
                index.insert(name, i);
            }
            files.push((path.clone(), st));
        }
        let tensors_total = index.len();
        Ok(Self::new(
            Source::Safetensors { files, index },
            tensors_total,
            bytes_total,
            dtype,
            device,
        ))
    }

    /// A GGUF checkpoint (all its shards). Quantized matrices stay quantized.
    pub fn from_gguf(ckpt: crate::gguf::GgufCheckpoint, device: &Device) -> Self {
        let infos = ckpt.files.iter().flat_map(|f| f.content.tensor_infos.iter());
        let (mut n, mut bytes, mut stacked) = (0, 0, false);
        for (name, info) in infos {
            n += 1;
            bytes += info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            stacked |= name.contains("_exps.");
        }
        let source = Source::Gguf {
            ckpt,
            stacked_experts: stacked,
        };
        // Quantized matmuls take f32 activations, so GGUF models compute in f32.
        Self::new(source, n, bytes, DType::F32, device)
    }

    /// Whether matmul weights may come back quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self.source, Source::Gguf { .. })
    }

    /// A store that invents weights of whatever shape the model asks for.
    pub fn random(std: f64, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Random { std }, 0, 0, dtype, device)
    }

    fn new(source: Source, tensors_total: usize, bytes_total: usize, dtype: DType, device: &Device) -> Self {
        Self {
            source,
            fp8_block: None,
            device: device.clone(),
            backend: if device.is_cpu() {
                Backend::Cpu(Isa::best())
            } else {
                Backend::Gpu
            },
            dtype,
            progress: Mutex::new(Progress {
                step: LoadProgress {
                    stage: LoadStage::Weights,
                    file: String::new(),
                    done: 0,
                    total: bytes_total as u64,
                    items_done: 0,
                    items_total: tensors_total,
                },
                started: Instant::now(),
            }),
            reporter: Reporter::default(),
        }
    }

    /// The backend the model's layers run (default: the GPU's on a GPU, else the CPU's
    /// best kernel set); the weights take its form.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Where loading progress goes (default: throttled log lines).
    pub fn with_reporter(mut self, reporter: Reporter) -> Self {
        self.reporter = reporter;
        self
    }

    /// Float8 weights are dequantized at load with their per-block `weight_scale_inv`
    /// (blocks of `rows x cols`). Dequantizing once is the fast choice on CPUs, which have
    /// no FP8 arithmetic: a per-block dequantization inside every matmul would redo that
    /// work at every step for no saving in compute.
    pub fn with_fp8_blocks(mut self, block: Option<(usize, usize)>) -> Self {
        self.fp8_block = block;
        self
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors { index, .. } => index.contains_key(name),
            Source::Random { .. } => true,
            Source::Gguf {
                ckpt,
                stacked_experts,
            } => crate::gguf::gguf_name(name, *stacked_experts).is_some_and(|g| ckpt.has_tensor(&g.name)),
        }
    }

    fn files_description(&self) -> String {
        match &self.source {
            Source::Safetensors { files, .. } => files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            Source::Random { .. } => "random weights".into(),
            Source::Gguf { ckpt, .. } => ckpt
                .files
                .iter()
                .map(|f| f.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// Loads `name`, checks that its shape is `shape`, converts it to the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_with_dtype(name, shape, self.dtype)
    }

    /// Like [`get`](Self::get) but always in f32 (norm weights, router gates, biases that
    /// are cheap and precision-sensitive).
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_with_dtype(name, shape, DType::F32)
    }

    /// A matmul weight `[out, in]`, as the type the linear layers use: dense here;
    /// quantized formats return their quantized tensor through the same type.
    pub fn get_matmul(&self, name: &str, out_features: usize, in_features: usize) -> Result<QMatMul> {
        if !self.is_quantized() {
            return Ok(QMatMul::Tensor(self.get(name, &[out_features, in_features])?));
        }
        let (q, file, gguf) = self.gguf_qtensor(name)?;
        let dims = q.shape().dims().to_vec();
        let want = [out_features, in_features];
        let q = if dims == want {
            q
        } else if dims.iter().product::<usize>() == out_features * in_features
            && matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
        {
            // A vector stored for a one-row matrix (Qwen2-MoE's shared expert gate).
            let t = q.dequantize(&self.device)?.reshape((out_features, in_features))?;
            QTensor::quantize(&t, GgmlDType::F32)?
        } else {
            return Err(self.mismatch(file, &gguf, &want, &dims));
        };
        self.report(q.storage_size_in_bytes(), &file);
        Ok(QMatMul::from_arc(std::sync::Arc::new(q))?)
    }

    /// The routed experts' matrices of one projection, `names[e]` expert `e`'s canonical
    /// name, as one stacked `[experts, out, in]` weight: GGUF's stacked tensor as it is
    /// (`ffn_gate_exps`), per-expert GGUF tensors joined, safetensors' per-expert
    /// matrices stacked.
    pub fn get_stacked_matmul(
        &self,
        names: &[String],
        out_features: usize,
        in_features: usize,
    ) -> Result<QMatMul> {
        let experts = names.len();
        let want = [experts, out_features, in_features];
        if !self.is_quantized() {
            let parts = names
                .iter()
                .map(|n| self.get(n, &[out_features, in_features]))
                .collect::<Result<Vec<_>>>()?;
            return Ok(QMatMul::Tensor(Tensor::stack(&parts, 0)?));
        }
        let Source::Gguf {
            ckpt,
            stacked_experts,
        } = &self.source
        else {
            unreachable!("quantized stores are GGUF")
        };
        let first = names.first().ok_or_else(|| Error::MissingTensor {
            name: "stacked experts (none asked for)".into(),
            files: self.files_description(),
        })?;
        let mut from = String::new();
        let q = if *stacked_experts {
            let g = crate::gguf::gguf_name(first, true).ok_or_else(|| Error::MissingTensor {
                name: format!("{first} (no GGUF equivalent)"),
                files: self.files_description(),
            })?;
            let (q, file) = ckpt.qtensor(&g.name, None, &self.device)?;
            if q.shape().dims() != want {
                return Err(self.mismatch(file, &g.name, &want, q.shape().dims()));
            }
            from = file;
            q
        } else {
            // One tensor per expert (older conversions): their bytes joined.
            let mut bytes = Vec::new();
            let mut dtype = None;
            for n in names {
                let (q, file, gguf) = self.gguf_qtensor(n)?;
                if q.shape().dims() != [out_features, in_features] || dtype.is_some_and(|d| d != q.dtype()) {
                    return Err(self.mismatch(file, &gguf, &[out_features, in_features], q.shape().dims()));
                }
                dtype = Some(q.dtype());
                bytes.extend_from_slice(&q.data()?);
                from = file;
            }
            let storage = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Owned(bytes),
                &self.device,
                dtype.expect("one expert or more"),
            )?;
            QTensor::new(storage, want.to_vec())?
        };
        self.report(q.storage_size_in_bytes(), &from);
        Ok(QMatMul::from_arc(std::sync::Arc::new(q))?)
    }

    fn mismatch(&self, file: String, name: &str, expected: &[usize], actual: &[usize]) -> Error {
        Error::ShapeMismatch {
            file,
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        }
    }

    /// The GGUF tensor behind a canonical name: (tensor, file, GGUF name).
    fn gguf_qtensor(&self, name: &str) -> Result<(QTensor, String, String)> {
        let Source::Gguf {
            ckpt,
            stacked_experts,
        } = &self.source
        else {
            unreachable!("only called for GGUF stores")
        };
        let g = crate::gguf::gguf_name(name, *stacked_experts).ok_or_else(|| Error::MissingTensor {
            name: format!("{name} (no GGUF equivalent)"),
            files: self.files_description(),
        })?;
        let (q, file) = ckpt.qtensor(&g.name, g.expert, &self.device)?;
        let gguf = match g.expert {
            Some(e) => format!("{} (expert {e})", g.name),
            None => g.name,
        };
        Ok((q, file, gguf))
    }

    fn get_with_dtype(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (tensor, file, bytes) = match &self.source {
            Source::Safetensors { files, index } => {
                let i = *index.get(name).ok_or_else(|| Error::MissingTensor {
                    name: name.to_string(),
                    files: self.files_description(),
                })?;
                let (path, st) = &files[i];
                let view = st.get(name).map_err(|e| Error::CorruptWeights {
                    path: path.clone(),
                    message: format!("tensor {name:?}: {e}"),
                })?;
                let bytes = view.data().len();
                if view.shape() != shape {
                    return Err(Error::ShapeMismatch {
                        file: path.display().to_string(),
                        name: name.to_string(),
                        expected: shape.to_vec(),
                        actual: view.shape().to_vec(),
                    });
                }
                let t = st.load(name, &self.device).map_err(|e| Error::CorruptWeights {
                    path: path.clone(),
                    message: format!("tensor {name:?}: {e}"),
                })?;
                (t, path.display().to_string(), bytes)
            }
            Source::Gguf { .. } => {
                let (q, file, gguf) = self.gguf_qtensor(name)?;
                let bytes = q.storage_size_in_bytes();
                let t = q.dequantize(&self.device)?;
                if t.dims() != shape {
                    return Err(self.mismatch(file, &gguf, shape, t.dims()));
                }
                (t, file, bytes)
            }
            Source::Random { std } => {
                let t = match shape {
                    [_] if name.contains("norm") => Tensor::ones(shape, DType::F32, &self.device)?,
                    [_] => Tensor::zeros(shape, DType::F32, &self.device)?,
                    _ => Tensor::randn(0f32, *std as f32, shape, &self.device)?,
                };
                let bytes = t.elem_count() * 4;
                (t, "random weights".to_string(), bytes)
            }
        };
        if tensor.dims() != shape {
            return Err(Error::ShapeMismatch {
                file,
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: tensor.dims().to_vec(),
            });
        }
        let tensor = if tensor.dtype() == DType::F8E4M3 {
            self.dequantize_fp8(name, &tensor)?
        } else {
            tensor
        };
        let tensor = tensor.to_dtype(dtype)?;
        self.report(bytes, &file);
        Ok(tensor)
    }

    /// `w * scale_inv[block]` for a float8 matrix and its block scales.
    fn dequantize_fp8(&self, name: &str, w: &Tensor) -> Result<Tensor> {
        let (br, bc) = self.fp8_block.ok_or_else(|| Error::CorruptWeights {
            path: self.files_description().into(),
            message: format!("tensor {name:?} is float8 but the config has no fp8 quantization_config"),
        })?;
        let (rows, cols) = w.dims2()?;
        let (rb, cb) = (rows.div_ceil(br), cols.div_ceil(bc));
        let scale_name = format!("{}_scale_inv", name);
        let scale = self.get_with_dtype(&scale_name, &[rb, cb], DType::F32)?;
        let scale = scale
            .reshape((rb, 1, cb, 1))?
            .broadcast_as((rb, br, cb, bc))?
            .reshape((rb * br, cb * bc))?
            .narrow(0, 0, rows)?
            .narrow(1, 0, cols)?;
        Ok((w.to_dtype(DType::F32)? * scale)?)
    }

    /// Counts a loaded tensor of `bytes` (as stored) from `file`.
    fn report(&self, bytes: usize, file: &str) {
        let mut p = self.progress.lock().unwrap();
        p.step.items_done += 1;
        p.step.done += bytes as u64;
        let name = Path::new(file)
            .file_name()
            .map_or(file, |n| n.to_str().unwrap_or(file));
        if p.step.file != name {
            p.step.file = name.to_string();
        }
        self.reporter.update(&p.step);
    }

    /// Reports the end of loading; called once the model is built.
    pub fn finish(&self) {
        let p = self.progress.lock().unwrap();
        self.reporter.finish(&p.step);
        tracing::info!(
            "loaded {} tensors ({:.1} MiB) in {:.2}s",
            p.step.items_done,
            p.step.done as f64 / (1 << 20) as f64,
            p.started.elapsed().as_secs_f64()
        );
    }
}

/// The safetensors files of a checkpoint directory: the shards listed in
/// `model.safetensors.index.json`, or `model.safetensors`, or every `*.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::CorruptWeights {
            path: index_path.clone(),
            message: e.to_string(),
        })?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::CorruptWeights {
                path: index_path.clone(),
                message: "no `weight_map` object".into(),
            })?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    all.sort();
    if all.is_empty() {
        return Err(Error::ModelNotFound {
            spec: dir.display().to_string(),
            message: "no *.safetensors weights in the directory".into(),
        });
    }
    Ok(all)
}
