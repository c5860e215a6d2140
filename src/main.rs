use clap::Parser;

/// jemalloc instead of the system allocator: glibc keeps the memory of a burst (a thousand
/// bootstraps, argon2's 7 MiB blocks) in its per-thread arenas, measured 156 MiB resident with
/// 1,040 Ready instances; jemalloc returns freed pages to the system after its decay time: 38 MiB
/// in the same run (mimalloc: 96 MiB). See docs/performance.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    netbird_operator::cli::main(netbird_operator::cli::Cli::parse()).await
}
