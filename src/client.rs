//! `fedveil client`: one client of a federation across machines
//! (protocols/federation.md §6 describes its file).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args as ClapArgs;
use fedveil_fed::client::{self, ClientSetup};
use fedveil_fed::config::ClientFile;
use fedveil_fed::net::{ClientIdentity, Fingerprint, Limits};
use fedveil_fed::randomness::Randomness;
use fedveil_task::TaskConfig;

use crate::display;
use crate::federate::{Overrides, runtime_failure, tokio};

#[derive(ClapArgs)]
pub struct Args {
    /// The client's TOML file (see configs/client.toml).
    #[arg(long)]
    config: PathBuf,
    /// This client's identity file (overrides client.identity; relative to
    /// the current directory).
    #[arg(long)]
    identity: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

/// The host part of `host:port` (the name the certificate is checked for).
fn host_of(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

async fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("client.server: cannot resolve '{server}' (host:port)"))?;
    addrs
        .next()
        .with_context(|| format!("client.server: '{server}' resolves to no address"))
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let file = ClientFile::load_with(&args.config, &args.overrides.set)?;
    let bars = display::bars(false);
    display::init_logging("info", &bars);
    let identity_path = args.identity.as_ref().unwrap_or(&file.client.identity);
    let identity = ClientIdentity::load(identity_path)?;
    // The client's own privacy ledger: beside its identity unless the file
    // names a directory.
    let ledger_dir = file.client.ledger_dir.clone().unwrap_or_else(|| {
        identity_path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("privacy-ledger")
    });
    let pin: Fingerprint = file.pin()?;
    let trainer = TaskConfig::parse(&file.task, None, &args.config)?.client_trainer()?;
    let bundle_cache = match &file.client.bundle_cache {
        Some(dir) => Some(dir.clone()),
        None => fedveil_model::fetch::cache_dir()
            .ok()
            .map(|d| d.join("bundles")),
    };
    let max_bundle_bytes = file
        .client
        .max_bundle_bytes
        .unwrap_or(fedveil_fed::client::MAX_BUNDLE_BYTES);
    let name = file
        .client
        .server_name
        .clone()
        .unwrap_or_else(|| host_of(&file.client.server).to_string());
    let rt = tokio()?;
    rt.block_on(async move {
        let server = resolve(&file.client.server).await?;
        tracing::info!(key = %identity.public(), "connecting to {server} ({name})");
        let summary = client::run(ClientSetup {
            server,
            server_name: name,
            pin,
            identity,
            limits: Limits::default(),
            trainer,
            policy: file.policy.clone(),
            randomness: Randomness::os(),
            reconnect: Duration::from_secs_f64(file.client.reconnect),
            max_reconnect: Duration::from_secs_f64(file.client.max_reconnect),
            give_up_after: file.client.give_up_after.map(Duration::from_secs_f64),
            events: None,
            endpoint: None,
            faults: Vec::new(),
            bundle_cache,
            max_bundle_bytes,
            hooks: Default::default(),
            ledger_dir: Some(ledger_dir),
        })
        .await
        .map_err(runtime_failure)?;
        let who = summary
            .client
            .map_or_else(|| "this client".to_string(), |c| format!("client {c}"));
        println!(
            "the federation ended after {} rounds ({}); {who} took part to the end in {} of them",
            summary.rounds, summary.reason, summary.rounds_served
        );
        Ok(ExitCode::SUCCESS)
    })
}
