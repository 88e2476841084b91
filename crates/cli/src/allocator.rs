//! The process allocator of whet's binaries.
//!
//! Tensor code allocates and frees large buffers at a high rate; glibc's malloc hands them back
//! to the kernel each time, and the page faults of re-mapping them cost a fifth of a training
//! step. mimalloc keeps and reuses them (see [`tune`]). Linking this crate installs it.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps freed memory committed for reuse (never purged), on 2 MiB pages where the kernel
/// allows: measured on SmolLM2 LoRA SFT, this takes kernel page-zeroing from about a quarter
/// of a step's CPU time to a few percent. Call first thing in `main`. Option ids are
/// mimalloc's `mi_option_e`.
pub fn tune() {
    const ARENA_EAGER_COMMIT: i32 = 4;
    const ALLOW_LARGE_OS_PAGES: i32 = 6;
    const PURGE_DELAY: i32 = 15;
    // SAFETY: plain option setters, called before any worker thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 1);
        libmimalloc_sys::mi_option_set(ALLOW_LARGE_OS_PAGES, 1);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
}
