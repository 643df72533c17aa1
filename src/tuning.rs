//! Process-wide settings, made as `main` starts (and by the training
//! benchmarks, which include this file), before any thread or tensor
//! exists. Each one was measured on a LoRA step of SmolLM2-135M on two
//! cores (BENCHMARKS.md, "LoRA training throughput"), and each yields to
//! the user's own setting of the same knob.
//!
//! - **mimalloc keeps the memory it frees.** Rounds allocate and free
//!   multi-megabyte vectors many times; glibc serves each from a fresh mmap
//!   (page faults, TLB shootdowns), mimalloc reuses them. By default it
//!   still gives freed memory back to the kernel ("purges" it) a second
//!   after it is freed. A training step frees and reallocates gigabytes of
//!   activations and gradients further apart than that, so every step
//!   faulted the same memory in again and the kernel zeroed it page by
//!   page: 13 % of the step went to `clear_page_erms`. Without purging the
//!   step is about 16 % faster and its peak resident memory the same; the
//!   price is that a process stays at its high-water mark between rounds,
//!   which the next round needs again anyway.
//! - **candle's worker threads park sooner.** candle's elementwise kernels
//!   run on its own pool of workers, which spin 25,000 times before parking
//!   when they run out of work; the matrix products run on rayon's threads
//!   meanwhile. On a machine with few cores the spinning workers took the
//!   cores from the products: 17 % of the step was spent in that loop.
//!   Spinning 100 times instead made the step about 12 % faster again.

/// mimalloc v3's `mi_option_purge_delay` (include/mimalloc.h: its index in
/// `mi_option_e`, which libmimalloc-sys does not name), in milliseconds.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// Its default in mimalloc v3 (src/options.c), the version libmimalloc-sys
/// builds.
const PURGE_DELAY_DEFAULT: std::os::raw::c_long = 1000;
/// candle's setting of its workers' spin before parking.
const CANDLE_SPIN: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
const CANDLE_SPIN_LIMIT: &str = "100";

/// Applies both settings. Call it first thing in `main`, while the
/// process has one thread.
pub fn tune() {
    retain_freed_memory();
    if std::env::var_os(CANDLE_SPIN).is_none() {
        // SAFETY: the process has a single thread here (the start of
        // `main`, or of a benchmark before it builds a model), so nothing
        // reads the environment concurrently.
        unsafe { std::env::set_var(CANDLE_SPIN, CANDLE_SPIN_LIMIT) };
    }
}

/// Stops mimalloc from purging freed memory. Does nothing when the option
/// does not read as the purge delay's default (another mimalloc version,
/// or `MIMALLOC_PURGE_DELAY` set by the user, which then wins).
fn retain_freed_memory() {
    // SAFETY: mi_option_get and mi_option_set read and write one entry of
    // mimalloc's option table, by index, with bounds checks on mimalloc's
    // side; they are safe to call from any thread at any time.
    unsafe {
        if libmimalloc_sys::mi_option_get(PURGE_DELAY) == PURGE_DELAY_DEFAULT {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
    }
}

#[cfg(test)]
mod tests {
    // Fails if a mimalloc upgrade moves or changes the option, so that the
    // setting would silently stop applying.
    #[test]
    fn mimalloc_stops_purging_freed_memory() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        super::retain_freed_memory();
        // SAFETY: as in retain_freed_memory.
        let delay = unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) };
        assert_eq!(
            delay, -1,
            "mimalloc's purge delay option is not where we set it"
        );
    }
}
