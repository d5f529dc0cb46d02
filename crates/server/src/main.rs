use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = vaultpay_server::cli::Cli::parse();
    match vaultpay_server::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", vaultpay_server::cli::error_text(&e));
            ExitCode::FAILURE
        }
    }
}
