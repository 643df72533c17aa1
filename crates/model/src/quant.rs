//! A quantised frozen base: weight matrices kept in GGML's block formats
//! (Q4_K, Q5_K, Q6_K, Q8_0, and the older Q4_0, Q4_1, Q5_0, Q5_1), read
//! from a GGUF file as stored or quantised on load.
//!
//! A frozen weight needs two products, `y = x Wᵀ` forward and `∂x = ∂y W`
//! backward. Both run here over bands of the weight's rows: a band is
//! dequantised into an f32 scratch buffer of at most [`BAND_ELEMS`] values
//! and multiplied with gemm, so memory holds the quantised matrix and one
//! band, never the matrix in f32. The weight's own gradient is never
//! computed. Inference on a few rows (generation, one token at a time)
//! takes candle's quantised vector product instead, which reads the blocks
//! directly; a training pass never does.
//!
//! Both products are the exact f32 products with the dequantised matrix
//! (up to summation order): in training, and in inference over more than
//! a few rows, a model on a quantised base computes what the same model
//! with the dequantised weights computes. Adapters stay f32.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::k_quants::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor, QuantizedType};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::{ModelError, Result};

/// Calls `$f::<Block>` for the block type of `$format`.
macro_rules! with_block {
    ($format:expr, $f:ident, $($arg:expr),*) => {
        match $format {
            QuantFormat::Q4_0 => $f::<BlockQ4_0>($($arg),*),
            QuantFormat::Q4_1 => $f::<BlockQ4_1>($($arg),*),
            QuantFormat::Q5_0 => $f::<BlockQ5_0>($($arg),*),
            QuantFormat::Q5_1 => $f::<BlockQ5_1>($($arg),*),
            QuantFormat::Q8_0 => $f::<BlockQ8_0>($($arg),*),
            QuantFormat::Q4K => $f::<BlockQ4K>($($arg),*),
            QuantFormat::Q5K => $f::<BlockQ5K>($($arg),*),
            QuantFormat::Q6K => $f::<BlockQ6K>($($arg),*),
        }
    };
}

/// The most f32 values a dequantised band of rows holds (8 MiB).
pub const BAND_ELEMS: usize = 1 << 21;

/// Up to this many input rows, inference takes candle's quantised vector
/// product (the activations quantised to 8 bits, as llama.cpp does);
/// above it, and in every training pass, the exact f32 product over
/// dequantised bands.
const VEC_DOT_ROWS: usize = 4;

/// A block format fedveil keeps a frozen weight in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl QuantFormat {
    /// The formats a weight can be quantised to on load, by name. The
    /// K-quants need rows of whole 256-value super-blocks; the others
    /// rows of 32 values.
    pub const ON_LOAD: [QuantFormat; 8] = [
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Q8_0,
        QuantFormat::Q4K,
        QuantFormat::Q5K,
        QuantFormat::Q6K,
    ];

    /// llama.cpp's name: `q4_k`, `q8_0`, ...
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q4_1 => "q4_1",
            QuantFormat::Q5_0 => "q5_0",
            QuantFormat::Q5_1 => "q5_1",
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4K => "q4_k",
            QuantFormat::Q5K => "q5_k",
            QuantFormat::Q6K => "q6_k",
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantFormat::Q4_0 => GgmlDType::Q4_0,
            QuantFormat::Q4_1 => GgmlDType::Q4_1,
            QuantFormat::Q5_0 => GgmlDType::Q5_0,
            QuantFormat::Q5_1 => GgmlDType::Q5_1,
            QuantFormat::Q8_0 => GgmlDType::Q8_0,
            QuantFormat::Q4K => GgmlDType::Q4K,
            QuantFormat::Q5K => GgmlDType::Q5K,
            QuantFormat::Q6K => GgmlDType::Q6K,
        }
    }

    /// The format of a GGML dtype, `None` for one fedveil does not keep
    /// quantised (f32, f16, bf16 load as f32; Q2_K, Q3_K and the 8-bit
    /// activation formats are refused by the loader).
    pub fn from_ggml(dtype: GgmlDType) -> Option<QuantFormat> {
        Some(match dtype {
            GgmlDType::Q4_0 => QuantFormat::Q4_0,
            GgmlDType::Q4_1 => QuantFormat::Q4_1,
            GgmlDType::Q5_0 => QuantFormat::Q5_0,
            GgmlDType::Q5_1 => QuantFormat::Q5_1,
            GgmlDType::Q8_0 => QuantFormat::Q8_0,
            GgmlDType::Q4K => QuantFormat::Q4K,
            GgmlDType::Q5K => QuantFormat::Q5K,
            GgmlDType::Q6K => QuantFormat::Q6K,
            _ => return None,
        })
    }

    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.ggml().type_size()
    }
}

/// How a model's frozen weights are held: `none` (f32, also for a GGUF's
/// quantised tensors, dequantised on load), `gguf` (a GGUF's block
/// tensors kept as the file stores them), or one format every projection,
/// the embedding and the output layer are quantised to on load (a GGUF's
/// tensors one at a time, from their dequantised values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Quantize {
    #[default]
    None,
    Gguf,
    To(QuantFormat),
}

impl Quantize {
    /// The accepted names, for messages.
    pub const NAMES: &'static str = "\"none\", \"gguf\", \"q4_0\", \"q4_1\", \"q5_0\", \"q5_1\", \"q8_0\", \"q4_k\", \"q5_k\", \"q6_k\"";

    pub fn parse(name: &str) -> Result<Quantize> {
        match name {
            "none" => Ok(Quantize::None),
            "gguf" => Ok(Quantize::Gguf),
            other => QuantFormat::ON_LOAD
                .into_iter()
                .find(|f| f.name() == other)
                .map(Quantize::To)
                .ok_or_else(|| {
                    ModelError::Config(format!(
                        "quantize = {other:?} is not implemented (one of {})",
                        Quantize::NAMES
                    ))
                }),
        }
    }

    /// The device a model held this way runs on: the default one (a GPU
    /// where there is one) for f32, the CPU for a quantised base.
    pub fn device(self) -> Device {
        match self {
            Quantize::None => crate::default_device(),
            _ => Device::Cpu,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Quantize::None => "none",
            Quantize::Gguf => "gguf",
            Quantize::To(f) => f.name(),
        }
    }
}

/// A frozen `(rows, cols)` matrix in a block format, row by row (each row
/// `cols / block_size` blocks). Shared, never copied, by every model and
/// client that uses it.
pub struct QuantMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    blocks: Box<dyn QuantizedType>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantMatrix[{}; {}x{}]",
            self.format.name(),
            self.rows,
            self.cols
        )
    }
}

impl QuantMatrix {
    /// Takes the blocks of a candle `QTensor` of shape `(rows, cols)` (a
    /// GGUF tensor as stored); the `QTensor` can be dropped afterwards.
    pub fn from_qtensor(t: &QTensor) -> Result<QuantMatrix> {
        let Some(format) = QuantFormat::from_ggml(t.dtype()) else {
            return Err(ModelError::Config(format!(
                "{:?} blocks are not a format fedveil keeps quantised",
                t.dtype()
            )));
        };
        let (rows, cols) = t.shape().dims2()?;
        let data = t.data()?;
        QuantMatrix::from_bytes(format, rows, cols, &data)
    }

    /// The blocks and bytes a `(rows, cols)` matrix of `format` takes,
    /// checked: rows of whole blocks, and every size (elements, blocks,
    /// bytes, and each dimension as a stride) representable, so that no
    /// product below can overflow.
    pub fn size(format: QuantFormat, rows: usize, cols: usize) -> Result<(usize, usize)> {
        if cols == 0 || !cols.is_multiple_of(format.block_size()) {
            return Err(ModelError::Config(format!(
                "a {}-wide row is not whole {} blocks of {}",
                cols,
                format.name(),
                format.block_size()
            )));
        }
        let limit = isize::MAX as usize;
        let elements = rows.checked_mul(cols).filter(|&e| e <= limit);
        let blocks = rows.checked_mul(cols / format.block_size());
        let bytes = blocks.and_then(|b| b.checked_mul(format.type_size()));
        match (elements, blocks, bytes) {
            (Some(_), Some(blocks), Some(bytes)) if bytes <= limit && rows <= limit => {
                Ok((blocks, bytes))
            }
            _ => Err(ModelError::Config(format!(
                "a {rows}x{cols} {} matrix is larger than this machine can address",
                format.name()
            ))),
        }
    }

    /// A matrix from its raw GGML blocks.
    pub fn from_bytes(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<QuantMatrix> {
        let (_, expected) = QuantMatrix::size(format, rows, cols)?;
        if bytes.len() != expected {
            return Err(ModelError::Config(format!(
                "{} bytes of {} blocks for a {rows}x{cols} matrix, which needs {expected}",
                bytes.len(),
                format.name()
            )));
        }
        let blocks = format.ggml().from_data(Cow::Borrowed(bytes));
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            blocks,
        })
    }

    /// Reads a `(rows, cols)` matrix of `format` blocks from `reader`,
    /// straight into the storage it keeps (no intermediate copy).
    pub fn read_from(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        reader: &mut impl std::io::Read,
    ) -> Result<QuantMatrix> {
        let (n_blocks, _) = QuantMatrix::size(format, rows, cols)?;
        let blocks = with_block!(format, read_blocks, n_blocks, reader)?;
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            blocks,
        })
    }

    /// Quantises an f32 `(rows, cols)` tensor.
    pub fn quantize(t: &Tensor, format: QuantFormat) -> Result<QuantMatrix> {
        let (rows, cols) = t.dims2()?;
        if cols == 0 || !cols.is_multiple_of(format.block_size()) {
            return Err(ModelError::Config(format!(
                "a {rows}x{cols} weight cannot be quantised to {}: its rows are not whole \
                 blocks of {}",
                format.name(),
                format.block_size()
            )));
        }
        let values = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let blocks = with_block!(format, quantize_rows, &values, cols);
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            blocks,
        })
    }

    pub fn format(&self) -> QuantFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the blocks occupy.
    pub fn storage_bytes(&self) -> usize {
        self.blocks.storage_size_in_bytes()
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.format.block_size() * self.format.type_size()
    }

    /// The raw blocks of rows `start..start + n`.
    pub(crate) fn row_data(&self, start: usize, n: usize) -> &[u8] {
        let rb = self.row_bytes();
        // SAFETY: the storage holds `rows * row_bytes` bytes; callers keep
        // `start + n <= rows`.
        let all = unsafe { std::slice::from_raw_parts(self.blocks.as_ptr(), self.rows * rb) };
        &all[start * rb..(start + n) * rb]
    }

    /// A `(rows, cols)` matrix quantised band by band as `read(start, n)`
    /// hands over rows `start..start + n` as f32 values, `band_rows` rows
    /// at a time: the blocks of the whole matrix quantised, without ever
    /// holding more than one band in f32.
    pub(crate) fn quantize_in_bands(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        band_rows: usize,
        read: &mut dyn FnMut(usize, usize) -> std::result::Result<Vec<f32>, String>,
    ) -> std::result::Result<QuantMatrix, String> {
        if cols == 0 || !cols.is_multiple_of(format.block_size()) || band_rows == 0 {
            return Err(format!(
                "a {rows}x{cols} weight cannot be quantised to {}: its rows are not whole \
                 blocks of {}",
                format.name(),
                format.block_size()
            ));
        }
        type Read<'a> = &'a mut dyn FnMut(usize, usize) -> std::result::Result<Vec<f32>, String>;
        fn fill<T: GgmlType + 'static>(
            rows: usize,
            cols: usize,
            band_rows: usize,
            read: Read,
        ) -> std::result::Result<Box<dyn QuantizedType>, String> {
            let row_blocks = cols / T::BLCK_SIZE;
            let mut ys = vec![T::zeros(); rows * row_blocks];
            for (k, band) in ys.chunks_mut(band_rows * row_blocks).enumerate() {
                let n = band.len() / row_blocks;
                let values = read(k * band_rows, n)?;
                if values.len() != n * cols {
                    return Err(format!(
                        "a band of {n} rows came with {} values",
                        values.len()
                    ));
                }
                band.par_chunks_mut(row_blocks)
                    .zip(values.par_chunks(cols))
                    .for_each(|(y, x)| T::from_float(x, y));
            }
            Ok(Box::new(ys))
        }
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            blocks: with_block!(format, fill, rows, cols, band_rows, read)?,
        })
    }

    /// Rows `start..start + n` as a matrix of their own (a part of a fused
    /// projection), copied block for block.
    pub fn row_range(&self, start: usize, n: usize) -> Result<QuantMatrix> {
        if start.checked_add(n).is_none_or(|end| end > self.rows) || n == 0 {
            return Err(ModelError::Config(format!(
                "rows {start}..{start}+{n} are not within a matrix of {} rows",
                self.rows
            )));
        }
        fn copy<T: GgmlType + 'static>(
            m: &QuantMatrix,
            start: usize,
            n: usize,
        ) -> Box<dyn QuantizedType> {
            Box::new(blocks::<T>(m.row_data(start, n)).to_vec())
        }
        Ok(QuantMatrix {
            format: self.format,
            rows: n,
            cols: self.cols,
            blocks: with_block!(self.format, copy, self, start, n),
        })
    }

    /// The matrix with its rows reordered: row `i` is row `order[i]` of
    /// this one (`order` a permutation).
    pub fn permute_rows(&self, order: &[u32]) -> Result<QuantMatrix> {
        let mut seen = vec![false; self.rows];
        if order.len() != self.rows
            || order.iter().any(|&r| {
                (r as usize) >= self.rows || std::mem::replace(&mut seen[r as usize], true)
            })
        {
            return Err(ModelError::Config(format!(
                "a row order for {} rows is not a permutation of them",
                self.rows
            )));
        }
        fn gather<T: GgmlType + 'static>(m: &QuantMatrix, order: &[u32]) -> Box<dyn QuantizedType> {
            let mut out: Vec<T> = Vec::with_capacity(m.rows * (m.cols / T::BLCK_SIZE));
            for &r in order {
                out.extend_from_slice(blocks::<T>(m.row_data(r as usize, 1)));
            }
            Box::new(out)
        }
        Ok(QuantMatrix {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            blocks: with_block!(self.format, gather, self, order),
        })
    }

    /// A candle `QTensor` of the same blocks (to write a GGUF file).
    pub fn to_qtensor(&self) -> Result<QTensor> {
        let bytes = self.row_data(0, self.rows);
        let storage = candle_core::quantized::QStorage::from_data(
            Cow::Borrowed(bytes),
            &Device::Cpu,
            self.format.ggml(),
        )?;
        Ok(QTensor::new(storage, (self.rows, self.cols))?)
    }

    /// Rows `start..start + n` as f32, into `out` (`n * cols` values), in
    /// parallel.
    fn dequantize_rows(&self, start: usize, n: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let data = self.row_data(start, n);
        out.par_chunks_mut(self.cols)
            .zip(data.par_chunks(rb))
            .for_each(|(y, bytes)| to_float(self.format, bytes, y));
    }

    /// The whole matrix in f32 (for a trainable copy or a saved file).
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        Ok(Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// The rows of `ids`, in f32, shape `(ids, cols)`: an embedding lookup.
    pub fn select_rows(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.rows
            )));
        }
        let mut out = vec![0f32; ids.len() * self.cols];
        out.par_chunks_mut(self.cols)
            .zip(ids.par_iter())
            .for_each(|(y, &id)| to_float(self.format, self.row_data(id as usize, 1), y));
        Ok(Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)?)
    }

    /// Rows per band: as many as fit [`BAND_ELEMS`], at least one.
    fn band(&self) -> usize {
        (BAND_ELEMS / self.cols).clamp(1, self.rows.max(1))
    }

    /// `y = x Wᵀ` for `x` `(n, cols)` row-major, into `y` `(n, rows)`;
    /// `exact` asks for the f32 product whatever `n` (a pass that will be
    /// differentiated: its backward pass is that product's).
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32], exact: bool) -> candle_core::Result<()> {
        if n <= VEC_DOT_ROWS && !exact {
            return self.blocks.matmul_t((n, self.cols, self.rows), x, y);
        }
        self.forward_banded(x, n, y, self.band());
        Ok(())
    }

    /// Calls `f(start, c, w)` for each band of `c` rows from row `start`,
    /// with `w` those rows dequantised (`(c, cols)`, row-major).
    fn for_each_band(&self, band: usize, mut f: impl FnMut(usize, usize, &[f32])) {
        let mut w = vec![0f32; band * self.cols];
        let mut start = 0;
        while start < self.rows {
            let c = band.min(self.rows - start);
            let w = &mut w[..c * self.cols];
            self.dequantize_rows(start, c, w);
            f(start, c, w);
            start += c;
        }
    }

    /// The exact f32 product, `band` rows of the weight at a time.
    fn forward_banded(&self, x: &[f32], n: usize, y: &mut [f32], band: usize) {
        assert!(x.len() == n * self.cols && y.len() == n * self.rows);
        self.for_each_band(band, |start, c, w| {
            // SAFETY: y is (n, rows) (checked above); the band writes its
            // columns start..start + c of every row. x is (n, cols), w is
            // (c, cols) read transposed.
            unsafe {
                gemm::gemm(
                    n,
                    c,
                    self.cols,
                    y.as_mut_ptr().add(start),
                    1,
                    self.rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    self.cols as isize,
                    w.as_ptr(),
                    self.cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
        });
    }

    /// `∂x = ∂y W` for `∂y` `(n, rows)`, into `dx` `(n, cols)`.
    fn backward(&self, g: &[f32], n: usize, dx: &mut [f32]) {
        self.backward_banded(g, n, dx, self.band());
    }

    fn backward_banded(&self, g: &[f32], n: usize, dx: &mut [f32], band: usize) {
        assert!(g.len() == n * self.rows && dx.len() == n * self.cols);
        self.for_each_band(band, |start, c, w| {
            // SAFETY: dx is (n, cols) (checked above); g's columns
            // start..start + c are an (n, c) matrix with row stride `rows`;
            // w is (c, cols). The first band writes dx, the others add.
            unsafe {
                gemm::gemm(
                    n,
                    self.cols,
                    c,
                    dx.as_mut_ptr(),
                    1,
                    self.cols as isize,
                    start > 0,
                    g.as_ptr().add(start),
                    1,
                    self.rows as isize,
                    w.as_ptr(),
                    1,
                    self.cols as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
        });
    }
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// Whole blocks of `T` in `bytes`, which come from a `Vec<T>` (candle's
/// storage) cut at block boundaries.
fn blocks<T: GgmlType>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert!(
        bytes.len().is_multiple_of(size)
            && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()),
        "quantised rows cut inside a block"
    );
    // SAFETY: aligned, whole blocks of a plain-data block type.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) }
}

fn to_float(format: QuantFormat, bytes: &[u8], out: &mut [f32]) {
    fn go<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
        T::to_float(blocks::<T>(bytes), out)
    }
    with_block!(format, go, bytes, out)
}

/// `n` blocks of `T` read from `reader`.
fn read_blocks<T: GgmlType + 'static>(
    n: usize,
    reader: &mut impl std::io::Read,
) -> Result<Box<dyn QuantizedType>> {
    let mut blocks = vec![T::zeros(); n];
    // SAFETY: the block types are plain data (integers and f16 fields,
    // `repr(C)`), valid for every bit pattern; the byte view covers
    // exactly the vector's `n` blocks.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(blocks.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>())
    };
    reader
        .read_exact(bytes)
        .map_err(|e| ModelError::Input(format!("reading {n} blocks: {e}")))?;
    Ok(Box::new(blocks))
}

/// Quantises row-major `values` with rows of `cols` (whole blocks), the
/// rows in parallel.
fn quantize_rows<T: GgmlType + 'static>(values: &[f32], cols: usize) -> Box<dyn QuantizedType> {
    let row_blocks = cols / T::BLCK_SIZE;
    let mut ys = vec![T::zeros(); values.len() / T::BLCK_SIZE];
    ys.par_chunks_mut(row_blocks)
        .zip(values.par_chunks(cols))
        .for_each(|(y, x)| T::from_float(x, y));
    Box::new(ys)
}

/// A frozen weight: a plain tensor, or a quantised matrix (always on the
/// CPU, computing in f32).
#[derive(Clone, Debug)]
pub enum Weight {
    Dense(Tensor),
    Quantized(Arc<QuantMatrix>),
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Weight {
        Weight::Dense(t)
    }
}

impl Weight {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Dense(t) => t.dims().to_vec(),
            Weight::Quantized(q) => vec![q.rows, q.cols],
        }
    }

    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => Ok(t.dims2()?),
            Weight::Quantized(q) => Ok((q.rows, q.cols)),
        }
    }

    /// The dtype it computes in: f32 for a quantised matrix.
    pub fn dtype(&self) -> DType {
        match self {
            Weight::Dense(t) => t.dtype(),
            Weight::Quantized(_) => DType::F32,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Weight::Dense(t) => t.device().clone(),
            Weight::Quantized(_) => Device::Cpu,
        }
    }

    pub fn is_variable(&self) -> bool {
        matches!(self, Weight::Dense(t) if t.is_variable())
    }

    /// The quantised matrix, if it is one.
    pub fn quantized(&self) -> Option<&QuantMatrix> {
        match self {
            Weight::Dense(_) => None,
            Weight::Quantized(q) => Some(q),
        }
    }

    /// A plain tensor: itself, or the quantised matrix dequantised to f32
    /// (for a trainable copy or a saved file).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Quantized(q) => q.dequantize(),
        }
    }

    /// Bytes it occupies.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quantized(q) => q.storage_bytes(),
        }
    }

    /// The same weight for a model computing in `dtype`: a quantised
    /// matrix computes in f32 only.
    pub fn to_dtype(&self, dtype: DType) -> Result<Weight> {
        self.to_device(&self.device(), dtype)
    }

    /// On `device` in `dtype` (cast, then copied). A quantised weight stays
    /// on the CPU in f32.
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<Weight> {
        match self {
            Weight::Dense(t) => Ok(Weight::Dense(t.to_dtype(dtype)?.to_device(device)?)),
            Weight::Quantized(q) if dtype == DType::F32 && device.is_cpu() => {
                Ok(Weight::Quantized(q.clone()))
            }
            Weight::Quantized(q) => Err(ModelError::Config(format!(
                "a {} base computes in f32 on the CPU, not {dtype:?} on {device:?}",
                q.format.name()
            ))),
        }
    }

    /// Quantised to `format` (a dense f32 weight), or as it is.
    pub fn quantize(&self, format: QuantFormat) -> Result<Weight> {
        match self {
            Weight::Dense(t) => Ok(Weight::Quantized(Arc::new(QuantMatrix::quantize(
                t, format,
            )?))),
            Weight::Quantized(_) => Ok(self.clone()),
        }
    }

    /// The rows of the ids `(…)` as `(ids, cols)`: an embedding lookup. No
    /// gradient reaches a frozen table.
    pub fn select_rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.index_select(&ids.flatten_all()?, 0)?),
            Weight::Quantized(q) => {
                let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                q.select_rows(&ids)
            }
        }
    }
}

/// `x Wᵀ` for `x` `(…, cols)` and a quantised frozen `W`, differentiable
/// in `x` only. `exact` takes the f32 product whatever the number of rows
/// (a training pass: the backward pass is that product's); otherwise up to
/// four rows take candle's quantised vector product.
pub(crate) fn quantized_matmul(
    x: &Tensor,
    weight: &Arc<QuantMatrix>,
    exact: bool,
) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Err(ModelError::Input(
            "a quantised base runs on the CPU only; this input is on a GPU".into(),
        ));
    }
    let dtype = x.dtype();
    let exact = exact || x.track_op();
    let y = x
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1(QuantLinear(weight.clone(), exact))?;
    Ok(y.to_dtype(dtype)?)
}

struct QuantLinear(Arc<QuantMatrix>, bool);

/// The rows `n` of a contiguous f32 input `(…, k)` as a slice, the
/// output's shape `(…, out)` and a zeroed buffer for it.
fn rows_of<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    k: usize,
    out: usize,
    what: &str,
) -> candle_core::Result<(&'a [f32], usize, Shape, Vec<f32>)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: a strided input");
    };
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: the input must be f32");
    };
    let dims = layout.shape().dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("{what}: a scalar input");
    };
    if lead.is_empty() || last != k {
        candle_core::bail!("{what}: input {dims:?}, the weight takes rows of {k}");
    }
    let n: usize = lead.iter().product();
    let Some(len) = n.checked_mul(out) else {
        candle_core::bail!("{what}: {n} rows of {out}");
    };
    let mut shape = lead.to_vec();
    shape.push(out);
    Ok((&data[start..end], n, Shape::from(shape), vec![0f32; len]))
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let (x, n, shape, mut y) = rows_of(x, layout, w.cols, w.rows, "quantized linear")?;
        w.forward(x, n, &mut y, self.1)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = grad
            .contiguous()?
            .apply_op1_no_bwd(&QuantLinearBackward(self.0.clone()))?;
        Ok(Some(dx.reshape(x.shape())?))
    }
}

struct QuantLinearBackward(Arc<QuantMatrix>);

impl CustomOp1 for QuantLinearBackward {
    fn name(&self) -> &'static str {
        "quantized-linear-backward"
    }

    fn cpu_fwd(&self, g: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let (g, n, shape, mut dx) =
            rows_of(g, layout, w.rows, w.cols, "quantized linear backward")?;
        w.backward(g, n, &mut dx);
        Ok((CpuStorage::F32(dx), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        // A fixed, irregular sequence in (-1, 1).
        (0..n)
            .map(|i| {
                let z = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed);
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn dense(m: &QuantMatrix) -> Vec<f32> {
        m.dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// `a b` for row-major `a` `(n, k)` and `b` `(k, m)`, in f64.
    fn reference(
        a: &[f32],
        b: impl Fn(usize, usize) -> f32,
        n: usize,
        k: usize,
        m: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; n * m];
        for i in 0..n {
            for j in 0..m {
                out[i * m + j] = (0..k).map(|l| a[i * k + l] as f64 * b(l, j) as f64).sum();
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f64, |a, (&g, &w)| a.max((g as f64 - w).abs()));
        assert!(diff <= 1e-5 * scale, "{what}: {diff} of {scale}");
    }

    #[test]
    fn banded_products_equal_the_products_with_the_dequantised_matrix_for_every_format() {
        let (rows, cols, n) = (13, 512, 6);
        let formats = [
            QuantFormat::Q4_0,
            QuantFormat::Q4_1,
            QuantFormat::Q5_0,
            QuantFormat::Q5_1,
            QuantFormat::Q8_0,
            QuantFormat::Q4K,
            QuantFormat::Q5K,
            QuantFormat::Q6K,
        ];
        let w = Tensor::from_vec(values(rows * cols, 1), (rows, cols), &Device::Cpu).unwrap();
        let x = values(n * cols, 2);
        let g = values(n * rows, 3);
        for format in formats {
            let q = QuantMatrix::quantize(&w, format).unwrap();
            let d = dense(&q);
            // Quantisation is lossy but not absent.
            let err = d
                .iter()
                .zip(w.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(err > 0.0 && err < 0.2, "{}: error {err}", format.name());
            let y_want = reference(&x, |l, j| d[j * cols + l], n, cols, rows);
            let dx_want = reference(&g, |l, j| d[l * cols + j], n, rows, cols);
            // Bands of 1, 4 (uneven) and all rows give the same products.
            for band in [1, 4, rows] {
                let mut y = vec![f32::NAN; n * rows];
                q.forward_banded(&x, n, &mut y, band);
                assert_close(
                    &y,
                    &y_want,
                    &format!("{} forward, band {band}", format.name()),
                );
                let mut dx = vec![f32::NAN; n * cols];
                q.backward_banded(&g, n, &mut dx, band);
                assert_close(
                    &dx,
                    &dx_want,
                    &format!("{} backward, band {band}", format.name()),
                );
            }
        }
    }

    #[test]
    fn rows_select_and_permute_by_their_blocks() {
        let (rows, cols) = (5, 256);
        let w = Tensor::from_vec(values(rows * cols, 4), (rows, cols), &Device::Cpu).unwrap();
        let q = QuantMatrix::quantize(&w, QuantFormat::Q4K).unwrap();
        let d = dense(&q);
        let picked: Vec<f32> = q
            .select_rows(&[3, 0, 3])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = [3, 0, 3]
            .iter()
            .flat_map(|&r| d[r * cols..(r + 1) * cols].to_vec())
            .collect();
        assert_eq!(picked, want);
        let p = q.permute_rows(&[4, 2, 0, 1, 3]).unwrap();
        let pd = dense(&p);
        for (i, &r) in [4, 2, 0, 1, 3].iter().enumerate() {
            assert_eq!(pd[i * cols..(i + 1) * cols], d[r * cols..(r + 1) * cols]);
        }
        assert!(
            q.select_rows(&[5])
                .unwrap_err()
                .to_string()
                .contains("token id 5")
        );
        assert!(q.permute_rows(&[0, 0, 1, 2, 3]).is_err());
        assert!(q.permute_rows(&[0, 1]).is_err());
        // A row that is not whole blocks, and bytes that are not the matrix.
        assert!(
            QuantMatrix::quantize(
                &Tensor::zeros((2, 100), DType::F32, &Device::Cpu).unwrap(),
                QuantFormat::Q8_0
            )
            .is_err()
        );
        assert!(QuantMatrix::from_bytes(QuantFormat::Q8_0, 2, 32, &[0u8; 33]).is_err());
        // Sizes that overflow are refused before anything is allocated or
        // read.
        for (rows, cols) in [(1usize << 58, 64), (usize::MAX / 32, 64), (1 << 62, 1 << 8)] {
            assert!(QuantMatrix::from_bytes(QuantFormat::Q8_0, rows, cols, &[]).is_err());
            let mut empty: &[u8] = &[];
            let err = QuantMatrix::read_from(QuantFormat::Q8_0, rows, cols, &mut empty)
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains("larger than this machine can address"),
                "{err}"
            );
        }
        assert_eq!(q.storage_bytes(), rows * 144);
    }
}
