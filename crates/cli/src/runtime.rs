//! Process-wide settings of whet's binaries: the allocator and the compute thread count.
//!
//! Tensor code allocates and frees large buffers at a high rate; glibc's malloc hands them back
//! to the kernel each time, and the page faults of re-mapping them cost a fifth of a training
//! step. mimalloc keeps and reuses them (see [`init`]). Linking this crate installs it.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Call first thing in `main`, before any thread exists.
///
/// - Allocator: freed memory stays committed for reuse (never purged), on 2 MiB pages where the
///   kernel allows. Measured on SmolLM2 LoRA SFT, this takes kernel page-zeroing from about a
///   quarter of a step's CPU time to a few percent. Option ids are mimalloc's `mi_option_e`.
/// - Threads: unless `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS` is set, the thread count
///   candle picks (the physical cores) is computed once and pinned in `RAYON_NUM_THREADS`.
///   Without it, candle re-derives the count on every matrix product by reading and parsing
///   `/proc/cpuinfo`, which cost about a sixth of the decoding time of a 135M model.
pub fn init() {
    const ARENA_EAGER_COMMIT: i32 = 4;
    const ALLOW_LARGE_OS_PAGES: i32 = 6;
    const PURGE_DELAY: i32 = 15;
    // SAFETY: plain option setters, called before any worker thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 1);
        libmimalloc_sys::mi_option_set(ALLOW_LARGE_OS_PAGES, 1);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !set("RAYON_NUM_THREADS") && !set("CANDLE_NUM_THREADS") {
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: called first thing in `main`, while the process has a single thread, so
        // nothing reads the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
}
