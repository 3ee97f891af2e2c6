//! The allocator, and handing its freed pages back to the OS once the process goes quiet.

use std::time::Duration;

/// mimalloc instead of glibc malloc: the proxy and API paths allocate many small, short-lived
/// buffers, where it measured ~5% less CPU per request (bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc purges freed pages lazily: a range becomes purgeable a second after it was freed
/// (`purge_delay`), and is purged only when a later allocation looks at the arenas. A gateway
/// whose 10,000 keep-alive connections have all gone idle has just freed their buffers and
/// then allocates nothing, so those pages would stay resident for as long as it stays quiet
/// (bench/idle.sh: 1.8-12 KiB per idle connection instead of 0.4). Once a second, ask for
/// what has expired to be purged: the arenas are process-wide, so one thread can do it for
/// every worker, and when nothing is waiting the call is an atomic load.
pub async fn purge_forever() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: mi_collect takes no pointers and may be called from any thread at any
        // time; with `false` it frees only what this thread's heap no longer uses and purges
        // arena ranges whose delay has passed.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_collect(false)
        };
    }
}
