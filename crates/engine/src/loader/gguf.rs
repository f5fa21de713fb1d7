//! GGUF files: the header, and tensors by llama.cpp's names.

use super::*;

/// Parses a GGUF file's header (metadata and tensor infos, not the data).
pub(super) fn read_gguf_header(path: &Path) -> Result<(gguf_file::Content, File)> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| EngineError::Model {
        path: shown.clone(),
        detail: format!("cannot open: {e}"),
    })?;
    let mut reader = BufReader::new(file);
    let content = match gguf_file::Content::read(&mut reader) {
        Ok(content) => content,
        Err(e) => {
            // candle stops at a tensor type it cannot read without naming
            // the tensor: find it ourselves.
            let unsupported = File::open(path)
                .ok()
                .and_then(|f| crate::gguf_types::unsupported_tensor(&mut BufReader::new(f)));
            return Err(match unsupported {
                Some((tensor, ty)) => EngineError::Tensor {
                    path: shown,
                    tensor,
                    detail: format!(
                        "stored as {} (GGML type {ty}), which this engine cannot multiply; \
                         supported types: {}. Requantize the file to one of them with \
                         llama.cpp's llama-quantize (e.g. Q4_K_M)",
                        crate::gguf_types::type_name(ty),
                        crate::gguf_types::supported_names()
                    ),
                },
                None => EngineError::Model {
                    path: shown,
                    detail: format!("corrupt or truncated GGUF header: {e}"),
                },
            });
        }
    };
    Ok((content, reader.into_inner()))
}

pub(super) struct GgufSource {
    pub(super) shown: String,
    pub(super) file: File,
    pub(super) file_len: u64,
    pub(super) content: gguf_file::Content,
}

impl GgufSource {
    pub(super) fn open(path: &Path) -> Result<Self> {
        let (content, file) = read_gguf_header(path)?;
        let shown = path.display().to_string();
        let file_len = file
            .metadata()
            .map_err(|e| EngineError::Model {
                path: shown.clone(),
                detail: format!("cannot stat: {e}"),
            })?
            .len();
        Ok(GgufSource {
            shown,
            file,
            file_len,
            content,
        })
    }
}

impl WeightSource for GgufSource {
    fn name(&self, kind: TensorKind) -> String {
        match kind {
            TensorKind::Embed => "token_embd.weight".into(),
            TensorKind::FinalNorm => "output_norm.weight".into(),
            TensorKind::LmHead => "output.weight".into(),
            TensorKind::RopeFreqs => "rope_freqs.weight".into(),
            TensorKind::AttnNorm(i) => format!("blk.{i}.attn_norm.weight"),
            TensorKind::Q(i) => format!("blk.{i}.attn_q.weight"),
            TensorKind::K(i) => format!("blk.{i}.attn_k.weight"),
            TensorKind::V(i) => format!("blk.{i}.attn_v.weight"),
            TensorKind::QBias(i) => format!("blk.{i}.attn_q.bias"),
            TensorKind::KBias(i) => format!("blk.{i}.attn_k.bias"),
            TensorKind::VBias(i) => format!("blk.{i}.attn_v.bias"),
            TensorKind::QNorm(i) => format!("blk.{i}.attn_q_norm.weight"),
            TensorKind::KNorm(i) => format!("blk.{i}.attn_k_norm.weight"),
            TensorKind::O(i) => format!("blk.{i}.attn_output.weight"),
            TensorKind::FfnNorm(i) => format!("blk.{i}.ffn_norm.weight"),
            TensorKind::Gate(i) => format!("blk.{i}.ffn_gate.weight"),
            TensorKind::Up(i) => format!("blk.{i}.ffn_up.weight"),
            TensorKind::Down(i) => format!("blk.{i}.ffn_down.weight"),
        }
    }

    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let err = |detail: String| EngineError::Tensor {
            path: self.shown.clone(),
            tensor: name.to_string(),
            detail,
        };
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| err("missing".into()))?;
        let dims = info.shape.dims().to_vec();
        let encoding = Encoding::Ggml(info.ggml_dtype);
        let (bs, ts) = (encoding.block_size(), encoding.type_size());
        let inner = dims.last().copied().unwrap_or(1);
        if inner % bs != 0 {
            return Err(err(format!(
                "rows of {inner} elements are not whole {:?} blocks of {bs}",
                info.ggml_dtype
            )));
        }
        let elems = dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d));
        let bytes = elems
            .map(|n| n / bs)
            .and_then(|blocks| blocks.checked_mul(ts))
            .ok_or_else(|| err(format!("shape {dims:?} overflows")))?;
        let start = self.content.tensor_data_offset.checked_add(info.offset);
        match start.and_then(|s| s.checked_add(bytes as u64)) {
            Some(end) if end <= self.file_len => {}
            _ => {
                return Err(err(format!(
                    "truncated: needs {bytes} bytes at offset {}, the file has {} bytes",
                    self.content.tensor_data_offset.saturating_add(info.offset),
                    self.file_len
                )))
            }
        }
        Ok(RawTensor {
            file: &self.file,
            shown: &self.shown,
            name: name.to_string(),
            dims,
            start: start.unwrap_or_default(),
            encoding,
        })
    }

    fn permutes_qk(&self) -> bool {
        true
    }
}
