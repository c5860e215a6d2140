use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    netbird_operator::cli::main(netbird_operator::cli::Cli::parse()).await
}
