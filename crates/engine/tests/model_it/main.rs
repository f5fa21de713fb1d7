//! Integration tests of the engine's model part: a tiny random llama that
//! the tests write themselves (Hugging Face safetensors, GGUF F32 with
//! llama.cpp's q/k permutation, GGUF Q8_0), run single-process, as pipeline
//! stages and as tensor-parallel ranks on threads; corrupt files; the wire
//! format; and a smoke check on the real SmolLM2 GGUF when it is present.
//!
//! Invariants the tests rely on: weights come from a seeded PRNG, so every
//! run sees the same model; tensor-parallel ranks sum their partials in
//! rank order, so all ranks see bit-identical sums; every wait in the
//! in-memory all-reduce has a deadline, so a failing rank fails the test
//! instead of hanging it.

mod agreement;
mod batch;
mod common;
mod errors;
mod smollm2;
mod wire;
