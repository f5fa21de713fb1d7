//! How weight matrices are held in memory, and what the default (`auto`)
//! chooses for each stored type.
//!
//! candle multiplies some GGUF block types with fast kernels and others with
//! portable code; which is which depends on the CPU. `examples/weights_probe`
//! measures one 2048×2048 matrix of every stored type four ways (kept as
//! stored, requantized to Q8_0, f32, f16), for a decode step and a prefill
//! chunk; BENCHMARKS.md ("Weights per stored type") holds its tables for the
//! two x86 kernel levels candle distinguishes. [`WeightFormat::Auto`] keeps
//! a type's blocks exactly where they decode faster than the same weights
//! requantized to Q8_0, and requantizes otherwise:
//!
//! * AVX-512 VNNI / AVX-VNNI: candle's repacked tiles serve Q8_0 and Q4_K
//!   (and Q6_K only for several rows); Q4_K is kept, every other type is
//!   requantized (its own kernels are 1.4–9× slower than Q8_0's tiles).
//! * AVX2 without VNNI: Q8_0 has no tiles there, and the K-quants'
//!   dot products are 2–3.5× faster than Q8_0's; Q2_K…Q6_K are kept, as is
//!   Q8_0 (nothing to requantize); Q4_0 is within noise of Q8_0 and is
//!   requantized like Q4_1, Q5_0 and Q5_1 (about 2× slower kept).
//! * Anything else (no AVX2, other architectures): not measured; every
//!   type but Q8_0 is requantized, as before there was a choice.
//!
//! On AVX-512 VNNI CPUs every Q8_0 matrix then runs on the engine's own
//! tiles (`q8tiles`), faster again than candle's, which only strengthens
//! the choice of Q8_0 there.
//!
//! Float matrices (F32, F16, BF16) become Q8_0 under `auto`: 2.6–13× faster
//! per decode step than f32 (f16 gemm is no faster); `f32` is the exact path.
//!
//! Invariants:
//! * [`WeightFormat::for_stored`] is total and pure: every stored type and
//!   kernel level resolves to one concrete format (never `Auto`).
//! * `Auto` never picks a format that changes a Q8_0 matrix: Q8_0 blocks are
//!   always held as stored.

use candle_core::quantized::GgmlDType;

/// How weight matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WeightFormat {
    /// Every matrix dequantized / converted to f32.
    #[serde(rename = "f32")]
    F32,
    /// GGUF blocks kept as stored, as candle `QMatMul` (GGUF only; float
    /// files load as f32).
    #[serde(rename = "gguf")]
    Quantized,
    /// Every matrix (re)quantized to Q8_0 blocks; from any source format.
    /// Q8_0 holds a Q4_x or Q5_x block's 16 or 32 levels to within 1/254
    /// of the block's range.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Per stored type, `gguf` or `q8_0`, whichever this CPU multiplies
    /// faster (see the module doc).
    #[serde(rename = "auto")]
    Auto,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 4] = [
        WeightFormat::Auto,
        WeightFormat::F32,
        WeightFormat::Q8_0,
        WeightFormat::Quantized,
    ];

    /// The name used in requests and on the command line (its serde tag).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Quantized => "gguf",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Auto => "auto",
        }
    }

    /// The concrete format for one matrix stored as `stored` (float
    /// storage as `F32`/`F16`/`BF16`): `Auto` per the kernel table, the
    /// others as they are.
    pub fn for_stored(self, stored: GgmlDType, kernels: Kernels) -> WeightFormat {
        if self != WeightFormat::Auto {
            return self;
        }
        use GgmlDType as T;
        let keep = matches!(
            (kernels, stored),
            (_, T::Q8_0)
                | (Kernels::Vnni, T::Q4K)
                | (Kernels::Avx2, T::Q2K | T::Q3K | T::Q4K | T::Q5K | T::Q6K)
        );
        if keep {
            WeightFormat::Quantized
        } else {
            WeightFormat::Q8_0
        }
    }
}

/// The x86 kernel level candle's quantized matmul runs at on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// AVX-512 VNNI or AVX-VNNI: candle's repacked Q8_0/Q4_K/Q6_K tiles.
    Vnni,
    /// AVX2 and FMA without VNNI.
    Avx2,
    /// Neither (or not x86): unmeasured.
    Other,
}

impl Kernels {
    /// This CPU's level, detected as candle detects it (its x86 repacking
    /// reads the same CPU features and the same two override variables,
    /// `MISTRALRS_FORCE_AVX2=1` and `MISTRALRS_FORCE_AVXVNNI=1`); candle
    /// does not export its own answer.
    pub fn detect() -> Kernels {
        static LEVEL: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            let on = |var: &str| std::env::var(var).as_deref() == Ok("1");
            Self::from_features(on("MISTRALRS_FORCE_AVX2"), on("MISTRALRS_FORCE_AVXVNNI"))
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn from_features(force_avx2: bool, force_vnni: bool) -> Kernels {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512_vnni =
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni");
        let avx_vnni = is_x86_feature_detected!("avxvnni");
        if !force_avx2 && (avx512_vnni || ((force_vnni || avx_vnni) && avx2)) {
            Kernels::Vnni
        } else if avx2 {
            Kernels::Avx2
        } else {
            Kernels::Other
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn from_features(_force_avx2: bool, _force_vnni: bool) -> Kernels {
        Kernels::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgmlDType as T;

    const STORED: [GgmlDType; 13] = [
        T::F32,
        T::F16,
        T::BF16,
        T::Q4_0,
        T::Q4_1,
        T::Q5_0,
        T::Q5_1,
        T::Q8_0,
        T::Q2K,
        T::Q3K,
        T::Q4K,
        T::Q5K,
        T::Q6K,
    ];
    const LEVELS: [Kernels; 3] = [Kernels::Vnni, Kernels::Avx2, Kernels::Other];

    #[test]
    fn explicit_formats_are_what_they_say_for_every_stored_type() {
        for f in [
            WeightFormat::F32,
            WeightFormat::Quantized,
            WeightFormat::Q8_0,
        ] {
            for stored in STORED {
                for k in LEVELS {
                    assert_eq!(f.for_stored(stored, k), f);
                }
            }
        }
    }

    #[test]
    fn auto_keeps_exactly_the_measured_winners() {
        let kept = |k: Kernels| -> Vec<GgmlDType> {
            STORED
                .into_iter()
                .filter(|s| WeightFormat::Auto.for_stored(*s, k) == WeightFormat::Quantized)
                .collect()
        };
        assert_eq!(kept(Kernels::Vnni), [T::Q8_0, T::Q4K]);
        assert_eq!(
            kept(Kernels::Avx2),
            [T::Q8_0, T::Q2K, T::Q3K, T::Q4K, T::Q5K, T::Q6K]
        );
        assert_eq!(kept(Kernels::Other), [T::Q8_0]);
        for stored in STORED {
            for k in LEVELS {
                let f = WeightFormat::Auto.for_stored(stored, k);
                assert!(matches!(f, WeightFormat::Quantized | WeightFormat::Q8_0));
            }
        }
    }

    #[test]
    fn forcing_avx2_wins_over_every_cpu_feature() {
        assert_ne!(Kernels::from_features(true, true), Kernels::Vnni);
    }

    #[test]
    fn names_round_trip_through_serde() {
        for f in WeightFormat::ALL {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
            assert_eq!(serde_json::from_str::<WeightFormat>(&json).unwrap(), f);
        }
    }
}
