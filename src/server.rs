//! `fedveil server`: the server of one federation across machines
//! (protocols/federation.md §6 describes its file).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args as ClapArgs;
use fedveil_fed::config::ServerFile;
use fedveil_fed::net::{ServerIdentity, load_allow_list};
use fedveil_fed::randomness::Randomness;
use fedveil_fed::server::{Server, ServerSetup};
use fedveil_task::TaskConfig;
use tokio::sync::mpsc::unbounded_channel;

use crate::display;
use crate::federate::{Output, Overrides, print_summary, runtime_failure, tokio};

#[derive(ClapArgs)]
pub struct Args {
    /// The server's TOML file (see configs/server.toml).
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    overrides: Overrides,
    #[command(flatten)]
    output: Output,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let mut file = ServerFile::load_with(&args.config, &args.overrides.set)?;
    args.output.redirect_metrics(&mut file.federation);
    let bars = display::bars(!args.output.quiet);
    display::init_logging("info", &bars);
    let listen = file.listen()?;
    let limits = file.limits()?;
    let identity = ServerIdentity::load(&file.server.certificate, &file.server.key)?;
    let allow = load_allow_list(&file.server.allow_list)?;
    let population = u32::try_from(allow.len()).context("the allow-list is too long")?;
    let plan = file.plan();
    plan.resolve(population, 1)?;
    let task = TaskConfig::parse(&file.task, file.offsite.as_ref(), &args.config)?;
    let data = task.provenance();
    let evaluator = task.evaluator(population, &mut display::task_progress(&bars))?;
    let rounds = plan.federation.rounds;
    let metrics = plan.federation.metrics.clone();
    let fingerprint = identity.fingerprint();
    let rt = tokio()?;
    rt.block_on(async move {
        let (tx, rx) = unbounded_channel();
        let server = Server::bind(ServerSetup {
            plan,
            identity,
            allow,
            listen,
            limits,
            evaluator,
            randomness: Randomness::os(),
            events: Some(tx),
            hooks: Default::default(),
        })
        .map_err(runtime_failure)?;
        tracing::info!(
            "serving {population} allowed clients on {}; clients pin {fingerprint}",
            server.local_addr()
        );
        let display = tokio::spawn(display::follow(rx, bars, rounds));
        let result = server.run().await;
        let done = display.await.unwrap_or_default();
        let summary = result.map_err(runtime_failure)?;
        print_summary(
            &done,
            &summary,
            metrics.as_deref(),
            args.output.json,
            serde_json::json!({ "data": data }),
        );
        Ok(ExitCode::SUCCESS)
    })
}
