//! Hugging Face directories: `config.json` and safetensors (one file, or
//! several with an index).

use super::*;

/// One `*.safetensors` file: its header, parsed and bounds-checked lazily
/// per tensor.
pub(super) struct SafetensorsFile {
    pub(super) shown: String,
    pub(super) file: File,
    pub(super) file_len: u64,
    /// Offset of the data section (8 + header length).
    pub(super) data_start: u64,
    pub(super) tensors: HashMap<String, SafetensorsEntry>,
}

#[derive(serde::Deserialize)]
pub(super) struct SafetensorsEntry {
    pub(super) dtype: String,
    pub(super) shape: Vec<usize>,
    pub(super) data_offsets: [u64; 2],
}

/// Safetensors headers are a few hundred kB even for large models; a
/// bigger length prefix means the file is not safetensors.
pub(super) const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

impl SafetensorsFile {
    pub(super) fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let model_err = |detail: String| EngineError::Model {
            path: shown.clone(),
            detail,
        };
        let file = File::open(path).map_err(|e| model_err(format!("cannot open: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| model_err(format!("cannot stat: {e}")))?
            .len();
        let mut len_bytes = [0u8; 8];
        file.read_exact_at(&mut len_bytes, 0)
            .map_err(|e| model_err(format!("corrupt or truncated safetensors header: {e}")))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_SAFETENSORS_HEADER || header_len > file_len.saturating_sub(8) {
            return Err(model_err(format!(
                "corrupt or truncated safetensors header: declares {header_len} header bytes, the file has {file_len} bytes"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| model_err(format!("cannot read safetensors header: {e}")))?;
        let json: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| model_err(format!("corrupt safetensors header: {e}")))?;
        let mut tensors = HashMap::with_capacity(json.len());
        for (name, value) in json {
            if name == "__metadata__" {
                continue;
            }
            let entry: SafetensorsEntry =
                serde_json::from_value(value).map_err(|e| EngineError::Tensor {
                    path: shown.clone(),
                    tensor: name.clone(),
                    detail: format!("corrupt header entry: {e}"),
                })?;
            tensors.insert(name, entry);
        }
        Ok(SafetensorsFile {
            shown,
            file,
            file_len,
            data_start: 8 + header_len,
            tensors,
        })
    }

    pub(super) fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let err = |detail: String| EngineError::Tensor {
            path: self.shown.clone(),
            tensor: name.to_string(),
            detail,
        };
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| err("missing".into()))?;
        let dtype = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => {
                return Err(err(format!(
                    "dtype {other} is not supported (F32, F16, BF16)"
                )))
            }
        };
        let [begin, end] = entry.data_offsets;
        let expected = entry
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| err(format!("shape {:?} overflows", entry.shape)))?;
        if end < begin || end - begin != expected as u64 {
            return Err(err(format!(
                "data_offsets {begin}..{end} do not hold a {:?} {} tensor ({expected} bytes)",
                entry.shape, entry.dtype
            )));
        }
        if self.data_start.saturating_add(end) > self.file_len {
            return Err(err(format!(
                "truncated: data ends at byte {}, the file has {} bytes",
                self.data_start.saturating_add(end),
                self.file_len
            )));
        }
        Ok(RawTensor {
            file: &self.file,
            shown: &self.shown,
            name: name.to_string(),
            dims: entry.shape.clone(),
            start: self.data_start + begin,
            encoding: Encoding::Float(dtype),
        })
    }
}

/// A Hugging Face directory: one safetensors file, or an index mapping each
/// tensor to one of several files.
pub(super) struct HfSource {
    pub(super) files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    pub(super) index: HashMap<String, usize>,
}

#[derive(serde::Deserialize)]
pub(super) struct SafetensorsIndex {
    pub(super) weight_map: HashMap<String, String>,
}

impl HfSource {
    pub(super) fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        if single.exists() {
            let file = SafetensorsFile::open(&single)?;
            let index = file.tensors.keys().map(|k| (k.clone(), 0)).collect();
            return Ok(HfSource {
                files: vec![file],
                index,
            });
        }
        if !index_path.exists() {
            return Err(EngineError::Model {
                path: dir.display().to_string(),
                detail: "no model.safetensors or model.safetensors.index.json".into(),
            });
        }
        let shown = index_path.display().to_string();
        let text = std::fs::read_to_string(&index_path).map_err(|e| EngineError::Model {
            path: shown.clone(),
            detail: format!("cannot read: {e}"),
        })?;
        let parsed: SafetensorsIndex =
            serde_json::from_str(&text).map_err(|e| EngineError::Model {
                path: shown.clone(),
                detail: format!("corrupt index: {e}"),
            })?;
        let mut file_names: Vec<&String> = parsed.weight_map.values().collect();
        file_names.sort();
        file_names.dedup();
        let mut files = Vec::with_capacity(file_names.len());
        let mut file_idx: HashMap<&String, usize> = HashMap::new();
        for name in file_names {
            // The index names files relative to the directory; refuse
            // anything that would escape it.
            let rel = PathBuf::from(name);
            if rel.components().count() != 1 {
                return Err(EngineError::Model {
                    path: shown.clone(),
                    detail: format!("index names a file outside the directory: {name}"),
                });
            }
            file_idx.insert(name, files.len());
            files.push(SafetensorsFile::open(&dir.join(rel))?);
        }
        let index = parsed
            .weight_map
            .iter()
            .filter_map(|(tensor, file)| file_idx.get(file).map(|&i| (tensor.clone(), i)))
            .collect();
        Ok(HfSource { files, index })
    }
}

impl WeightSource for HfSource {
    fn name(&self, kind: TensorKind) -> String {
        match kind {
            TensorKind::Embed => "model.embed_tokens.weight".into(),
            TensorKind::FinalNorm => "model.norm.weight".into(),
            TensorKind::LmHead => "lm_head.weight".into(),
            // Hugging Face configs give the scaling as parameters instead.
            TensorKind::RopeFreqs => "rope_freqs.weight".into(),
            TensorKind::AttnNorm(i) => format!("model.layers.{i}.input_layernorm.weight"),
            TensorKind::Q(i) => format!("model.layers.{i}.self_attn.q_proj.weight"),
            TensorKind::K(i) => format!("model.layers.{i}.self_attn.k_proj.weight"),
            TensorKind::V(i) => format!("model.layers.{i}.self_attn.v_proj.weight"),
            TensorKind::QBias(i) => format!("model.layers.{i}.self_attn.q_proj.bias"),
            TensorKind::KBias(i) => format!("model.layers.{i}.self_attn.k_proj.bias"),
            TensorKind::VBias(i) => format!("model.layers.{i}.self_attn.v_proj.bias"),
            TensorKind::QNorm(i) => format!("model.layers.{i}.self_attn.q_norm.weight"),
            TensorKind::KNorm(i) => format!("model.layers.{i}.self_attn.k_norm.weight"),
            TensorKind::O(i) => format!("model.layers.{i}.self_attn.o_proj.weight"),
            TensorKind::FfnNorm(i) => format!("model.layers.{i}.post_attention_layernorm.weight"),
            TensorKind::Gate(i) => format!("model.layers.{i}.mlp.gate_proj.weight"),
            TensorKind::Up(i) => format!("model.layers.{i}.mlp.up_proj.weight"),
            TensorKind::Down(i) => format!("model.layers.{i}.mlp.down_proj.weight"),
        }
    }

    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        match self.index.get(name).and_then(|&i| self.files.get(i)) {
            Some(file) => file.raw(name),
            None => Err(EngineError::Tensor {
                path: self
                    .files
                    .first()
                    .map(|f| f.shown.clone())
                    .unwrap_or_default(),
                tensor: name.to_string(),
                detail: "missing".into(),
            }),
        }
    }

    fn permutes_qk(&self) -> bool {
        false
    }
}
