//! Log setup: human-readable on a terminal, JSON lines with `--log-format
//! json`; runners always log JSON to stderr so the node can re-emit each line
//! with the runner's context.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// `RUST_LOG` wins; otherwise `default_level` for our crates.
fn filter(default_level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level))
}

pub fn init(format: LogFormat, default_level: &str) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(default_level))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Env var with the runners' log level (default `info`).
pub const RUNNER_LOG_ENV: &str = "SHARDVISOR_RUNNER_LOG";

pub fn init_runner() {
    let level = std::env::var(RUNNER_LOG_ENV).unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .try_init();
}
