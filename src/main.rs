//! Wires the command line to the library: configuration, logging, then the command.

use std::process::ExitCode;

use clap::Parser;
use secrecy::ExposeSecret;
use teos_mailer::app::{self, RunOptions};
use teos_mailer::cli::{self, Cli, Command};
use teos_mailer::config::{Config, ConfigError};
use teos_mailer::store::Store;
use teos_mailer::telemetry;

/// sysexits.h EX_CONFIG: systemd's RestartPreventExitStatus=78 stops a restart loop.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("teos-mailer: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(cfg.log.format, &cfg.log.level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(dispatch(cli.command, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<ConfigError>() => {
            eprintln!("teos-mailer: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("teos-mailer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, cfg: Config) -> anyhow::Result<()> {
    if let Command::Run { until_idle } = command {
        app::run(cfg, shutdown_signal(), RunOptions { until_idle }).await?;
        return Ok(());
    }
    let store = Store::connect(&cfg.database).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the database {}: {e}",
            masked(cfg.database.url.expose_secret())
        )
    })?;
    if cfg.database.migrate_on_start || matches!(command, Command::Migrate) {
        store.migrate().await?;
    }
    let result = match command {
        Command::Run { .. } => unreachable!("handled above"),
        Command::Migrate => {
            println!("migrations applied ({})", store.dialect());
            Ok(())
        }
        Command::Enqueue(args) => cli::enqueue(&store, args).await,
        Command::Queue(c) => cli::queue(&store, c).await,
        Command::Settings(c) => cli::settings(&store, c).await,
        Command::TestEmail { to, sender } => cli::test_email(&store, &cfg, &to, sender).await,
    };
    store.close().await;
    result
}

/// A database URL with its password replaced by stars.
fn masked(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stop requested");
}
