//! fedveil's language model: a llama-family decoder on candle with a
//! training-safe forward pass, PEFT adapters (LoRA, prefix-, prompt- and
//! P-tuning) and an adapter trainer.
//!
//! The base model's weights are frozen tensors shared by reference; only an
//! [`peft::Adapter`]'s variables are trained, and an adapter flattens to the
//! single `f32` vector a federation aggregates.

pub mod check;
pub mod choice;
pub mod config;
pub mod eval;
pub mod federated;
pub mod fetch;
mod files;
mod fused;
pub mod generate;
pub mod gguf_tokenizer;
pub mod interop;
pub mod load;
mod loss;
pub mod model;
pub mod offsite;
pub mod peft;
pub mod per_example;
mod pool;
pub mod quant;
mod random;
pub mod tiny;
pub mod train;

use thiserror::Error;

pub use config::{Activation, LayerType, LlamaConfig, RopeScaling};
pub use model::{KvCache, Llama, Mode, Module, Weights};
pub use peft::{
    Adapter, FullConfig, LoraConfig, PTuningConfig, PeftConfig, PrefixConfig, PromptConfig,
};
pub use quant::{QuantFormat, Quantize, Weight};
pub use train::{AdapterTrainer, Batch, EvalResult, Example, OptimConfig, PerExample, StepStats};

/// Everything that can go wrong in this crate.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A shape or hyper-parameter that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Input the model cannot take.
    #[error("invalid input: {0}")]
    Input(String),
    /// A file that is missing, unreadable or not what it claims to be.
    #[error("{path}: {why}")]
    File { path: String, why: String },
    /// Training produced a non-finite value.
    #[error("numerical failure: {0}")]
    Numerical(String),
    /// The privacy mechanism a caller supplied refused (record-level DP).
    #[error("differential privacy: {0}")]
    Privacy(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn file(path: &std::path::Path, why: impl std::fmt::Display) -> ModelError {
        ModelError::File {
            path: path.display().to_string(),
            why: why.to_string(),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// The dtype a model computes in on `device`: bf16 on a GPU (adapters keep
/// f32 weights and are cast on the way in), f32 on the CPU.
pub fn compute_dtype(device: &candle_core::Device) -> candle_core::DType {
    if device.is_cuda() {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    }
}

/// The first CUDA GPU when the crate is built with the `cuda` feature and
/// one is present, else the CPU. One per process: every caller shares its
/// stream, its cuBLAS handle and its memory pool.
pub fn default_device() -> candle_core::Device {
    static DEVICE: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            if candle_core::utils::cuda_is_available() {
                cuda_device(0).unwrap_or(candle_core::Device::Cpu)
            } else {
                candle_core::Device::Cpu
            }
        })
        .clone()
}

/// CUDA GPU `ordinal` with one stream of its own, which every thread's
/// work goes to in order. (candle's `Device::new_cuda` gives each thread
/// its own default stream, and a training step runs on a worker of rayon's
/// pool while its batch is copied from the caller's thread: on separate
/// streams nothing would order the two, nor a tensor's stream-ordered
/// allocation on one and its use or release on another.)
pub fn cuda_device(ordinal: usize) -> Result<candle_core::Device> {
    Ok(candle_core::Device::new_cuda_with_stream(ordinal)?)
}

/// The most GPU memory candle's allocations held at once since the last
/// [`reset_peak_device_memory`] (or the start), in bytes: the high-water
/// mark of the CUDA memory pool candle allocates from, the counterpart of
/// PyTorch's `torch.cuda.max_memory_allocated`. Waits for the device's
/// queued work first. `None` on the CPU, in a build without the `cuda`
/// feature, and on a GPU whose driver has no memory pools.
pub fn peak_device_memory(device: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda::cudarc::driver::{result::mem_pool, sys};
        let pool = cuda_pool(device)?;
        let mut bytes: u64 = 0;
        // SAFETY: the pool is the device's default one; USED_MEM_HIGH is a
        // cuuint64_t, which `bytes` is.
        unsafe {
            mem_pool::get_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut bytes as *mut u64).cast(),
            )
        }
        .ok()?;
        Some(bytes)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// Starts [`peak_device_memory`]'s count again from what is held now.
pub fn reset_peak_device_memory(device: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda::cudarc::driver::{result::mem_pool, sys};
        if let Some(pool) = cuda_pool(device) {
            let mut zero: u64 = 0;
            // SAFETY: as above; setting USED_MEM_HIGH takes 0 (a reset).
            let _ = unsafe {
                mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast(),
                )
            };
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// The default memory pool of `device`'s GPU, where candle's stream-ordered
/// allocations come from, after the stream's queued work is done.
#[cfg(feature = "cuda")]
fn cuda_pool(
    device: &candle_core::Device,
) -> Option<candle_core::cuda::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda::cudarc::driver::result;
    let stream = device.as_cuda_device().ok()?.cuda_stream();
    let context = stream.context();
    if !context.has_async_alloc() {
        return None;
    }
    stream.synchronize().ok()?;
    context.bind_to_thread().ok()?;
    // SAFETY: the device handle is the context's own.
    unsafe { result::device::get_default_mem_pool(context.cu_device()) }.ok()
}
