use clap::Parser;

/// jemalloc instead of the system allocator: glibc keeps the memory of a burst (a thousand
/// bootstraps, argon2's 7 MiB blocks) in its per-thread arenas, measured 156 MiB resident with
/// 1,040 Ready instances; jemalloc returns freed pages to the system after its decay time: 38 MiB
/// in the same run (mimalloc: 96 MiB). Its background thread (feature `background_threads`) purges
/// while the process is idle: without it, pages freed after a burst stay resident until the process
/// allocates again (1,000 Ready instances after 30 s idle: 30.8 MiB with it, 33.1 without; 30.4
/// with dirty_decay_ms:1000 as well, not worth a malloc_conf). See docs/performance.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    netbird_operator::cli::main(netbird_operator::cli::Cli::parse()).await
}
