//! `herald serve`: parse flags and `herald.toml`, start, wait for SIGTERM/SIGINT, drain.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

#[derive(Parser)]
#[command(name = "herald", version, about = "Server-Sent Events fan-out engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve subscribers and publishers until SIGTERM/SIGINT.
    Serve {
        /// Read settings from this TOML file (flags win over it).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: herald::config::Settings,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Serve { config, settings } = Cli::parse().command;
    let config = herald::Config::load(settings, config.as_deref()).context("configuration")?;
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("signal handlers")?;
    let server = herald::start(config).context("starting herald")?;
    // Wait for a signal, or for a worker that stopped on its own.
    let signal = 'wait: loop {
        for sig in signals.pending() {
            if sig != SIGHUP {
                break 'wait Some(sig);
            }
            // SIGHUP: reopen the access log and reload certificates; nothing else
            // changes, no connection closes.
            server.reopen_access_log();
            if server.tls_addr.is_none() {
                tracing::info!("SIGHUP: no TLS configured, no certificates to reload");
                continue;
            }
            match server.reload_tls() {
                Ok(n) => tracing::info!(certificates = n, "TLS certificates reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload failed; the old certificates stay in use")
                }
            }
        }
        if server.is_stopping() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    match signal {
        Some(sig) => tracing::info!(signal = sig, "signal received"),
        None => tracing::error!("a worker stopped unexpectedly"),
    }
    server.shutdown().context("shutdown")?;
    if signal.is_none() {
        anyhow::bail!("a worker failed");
    }
    Ok(())
}
