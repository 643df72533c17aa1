//! `fedveil audit`: real attacks on the real protocol and mechanism code,
//! claim by claim (docs/audit.md). The attacks live in the crates
//! (`fedveil_audit`, and still `fedveil_secagg::audit`, `fedveil_net::audit`
//! and `fedveil_dp::audit`); this file runs them and prints the report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use fedveil_audit::quic::ClientAttackKind;
use fedveil_fed::dp::audit::{AuditConfig, AuditResult, Broken, audit_round};
use fedveil_fed::dp::mechanism::{NoiseConfig, Placement};
use fedveil_fed::secagg::audit::{self as attacks, ServerAttackKind};
use rand_core::{OsRng, RngCore};
use serde::Serialize;

use crate::federate::RuntimeFailure;

#[derive(clap::Args)]
pub struct Args {
    /// Print the report as JSON: one entry per claim, with `claim`,
    /// `attack`, `held` and `evidence`.
    #[arg(long)]
    json: bool,
    /// Also write the report as Markdown to this file.
    #[arg(long, value_name = "FILE.md")]
    report: Option<PathBuf>,
    /// Trials with the canary in the DP audit (and as many without).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(200..=1_000_000))]
    trials: u32,
    /// Sessions per input set in the transcript test.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(4..=10_000))]
    sessions: u64,
    /// Seed of the in-memory protocol sessions (default: drawn from the OS),
    /// to replay a report exactly. The DP audit always draws from the OS.
    #[arg(long)]
    seed: Option<u64>,
    /// Break the mechanism under audit on purpose: `noise` (clients add
    /// none while the accountant counts it) or `clip` (updates unclipped).
    /// The audit must then fail; this never touches a real federation.
    #[arg(long = "break", value_enum, value_name = "WHAT")]
    broken: Option<BreakArg>,
    /// Run the protocol attacks over real QUIC on loopback, with the
    /// federation's server and clients, instead of the in-memory harness
    /// (the DP audit, which attacks the mechanism, is the same either way).
    #[arg(long)]
    quic: bool,
}

#[derive(Copy, Clone, Debug, clap::ValueEnum)]
enum BreakArg {
    Noise,
    Clip,
}

impl From<BreakArg> for Broken {
    fn from(b: BreakArg) -> Broken {
        match b {
            BreakArg::Noise => Broken::NoNoise,
            BreakArg::Clip => Broken::NoClip,
        }
    }
}

/// One claim of the report (its JSON keys are the report's contract).
use fedveil_audit::Claim as Entry;

#[derive(Debug, Serialize)]
struct Report {
    version: &'static str,
    /// Where the protocol attacks ran: `memory` or `quic`.
    transport: &'static str,
    seed: u64,
    held: usize,
    failed: usize,
    claims: Vec<Entry>,
}

/// Noise levels audited, each against the accountant's claim.
const NOISE_LEVELS: [f64; 3] = [0.5, 1.0, 2.0];
/// The level the broken mechanisms are audited at (its claim, ε ≈ 2.2, sits
/// well below the 5.6 a perfect test proves with 2,000 trials).
const BROKEN_LEVEL: f64 = 2.0;

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| OsRng.next_u64());
    let mut claims = Vec::new();
    // An attack that cannot run at all is a failure of the run (exit 1),
    // not bad input.
    let failure = |e: anyhow::Error| anyhow::Error::new(RuntimeFailure(format!("{e:#}")));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
        .map_err(failure)?;
    let harness = Harness {
        seed,
        quic: args.quic.then_some(&runtime),
    };
    server_attacks(&harness, &mut claims).map_err(failure)?;
    client_attacks(&harness, &mut claims).map_err(failure)?;
    network_attacks(&runtime, &mut claims).map_err(failure)?;
    hardening(&runtime, &mut claims).map_err(failure)?;
    transcript(&harness, args.sessions as usize, &mut claims).map_err(failure)?;
    dp_audits(args, &mut claims).map_err(failure)?;
    let failed = claims.iter().filter(|c| !c.held).count();
    let report = Report {
        version: env!("CARGO_PKG_VERSION"),
        transport: if args.quic { "quic" } else { "memory" },
        seed,
        held: claims.len() - failed,
        failed,
        claims,
    };
    // Printed first, so that an unwritable report file loses nothing.
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report));
    }
    if let Some(path) = &args.report {
        std::fs::write(path, markdown(&report)).map_err(|e| {
            RuntimeFailure(format!("writing the report to {}: {e}", path.display()))
        })?;
    }
    if failed > 0 {
        eprintln!(
            "error: {failed} of {} claims failed: {}",
            report.claims.len(),
            report
                .claims
                .iter()
                .filter(|c| !c.held)
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the protocol attacks run: in memory (every session derived from
/// `seed`), or over loopback QUIC with the federation's server and clients
/// (their randomness drawn from the OS).
struct Harness<'a> {
    seed: u64,
    quic: Option<&'a tokio::runtime::Runtime>,
}

impl Harness<'_> {
    fn server_attack(&self, kind: ServerAttackKind, i: u64) -> anyhow::Result<attacks::Finding> {
        Ok(match self.quic {
            Some(rt) => rt.block_on(fedveil_audit::quic::server_attack(kind))?,
            None => attacks::run_server_attack(kind, self.seed.wrapping_add(i))?,
        })
    }

    fn client_attack(&self, i: usize) -> anyhow::Result<(&'static str, attacks::ClientFinding)> {
        let (name, _, attack) = attacks::CLIENT_ATTACKS
            .get(i)
            .context("no such client attack")?;
        Ok(match self.quic {
            Some(rt) => {
                let kind = ClientAttackKind::ALL
                    .into_iter()
                    .find(|k| k.name() == *name)
                    .context("no such client attack over QUIC")?;
                (
                    *name,
                    rt.block_on(fedveil_audit::quic::client_attack(kind))?,
                )
            }
            None => (*name, attack(self.seed.wrapping_add(100 + i as u64))?),
        })
    }

    /// Where the attacks ran, for the report's attack lines.
    fn over(&self) -> &'static str {
        if self.quic.is_some() {
            " Over loopback QUIC, between the federation's server and clients."
        } else {
            ""
        }
    }
}

fn server_attacks(h: &Harness, claims: &mut Vec<Entry>) -> anyhow::Result<()> {
    let describe = |name: &str| -> (&str, &str) {
        match name {
            "alive_and_dropped" => (
                "A client never reveals both shares of one neighbour, so a server cannot \
                 unmask a client it calls both alive and dropped.",
                "The server lists the target as alive and dropped in the unmask requests to \
                 every neighbour (Flower 1.42's flaw), then asks honestly.",
            ),
            "equivocation" => (
                "Signed survivor sets stop a server that tells different clients different \
                 dropped sets: with 2t > k no two quorums fit among k neighbours.",
                "The server shows t of the target's neighbours a survivor set with the target \
                 and the other k − t one without it, to collect self-mask shares from the first \
                 group and mask-key shares from the second.",
            ),
            "non_neighbour" => (
                "A client reveals shares only of its own neighbours.",
                "The server asks clients that are not the target's neighbours for the target's \
                 shares.",
            ),
            "replay" => (
                "Messages are bound to their session: a request from another round is refused.",
                "The server replays an earlier round's requests (which named the target as \
                 dropped) in the current round, after collecting its self-mask shares.",
            ),
            "too_few_survivors" => (
                "No sum is unmasked over fewer than t of a client's neighbours.",
                "The server fixes a survivor set of the target and t − 1 neighbours, so that \
                 the sum is nearly the target alone, and asks for shares under it.",
            ),
            "different_model" => (
                "A client's session commits to its model, so a server cannot isolate one \
                 client with a different model (Pasquini et al. 2022).",
                "The server sends the target a different model than its peers, then relabels \
                 the target's keys with the common session.",
            ),
            _ => ("", ""),
        }
    };
    for (i, kind) in ServerAttackKind::ALL.into_iter().enumerate() {
        let name = kind.name();
        let finding = h
            .server_attack(kind, i as u64)
            .with_context(|| format!("attack {name}"))?;
        let section = format!("secagg-plus.md {}", kind.section());
        let over = h.over();
        if kind == ServerAttackKind::Control {
            claims.push(Entry::new(
                "server.control",
                section,
                "The measurement above can see a leak: with both secrets of the target the \
                 server's estimate is its input.",
                format!(
                    "The same deterministic session run twice, the target alive in one and \
                     dropped in the other (what fresh per-session keys prevent), pooling the \
                     shares of both.{over}"
                ),
                !finding.target_hidden(),
                finding.evidence(),
                &finding,
            )?);
            continue;
        }
        let (claim, what) = describe(name);
        claims.push(Entry::new(
            format!("server.{name}"),
            section,
            claim,
            format!("{what}{over}"),
            finding.target_hidden(),
            finding.evidence(),
            &finding,
        )?);
    }
    Ok(())
}

fn client_attacks(h: &Harness, claims: &mut Vec<Entry>) -> anyhow::Result<()> {
    let describe = |name: &str| -> (&str, &str) {
        match name {
            "forged_signature" => (
                "A client cannot enter a session with keys it did not sign, nor under another \
                 client's name; the others finish without it.",
                "The attacker advertises keys changed after signing, then another client's \
                 signed keys under its own name, and nothing valid.",
            ),
            "tampered_ciphertext" => (
                "A tampered share envelope is detected by its recipient and reported; the round \
                 still completes exactly.",
                "One bit of a relayed share envelope is flipped in transit.",
            ),
            "wrong_length" => (
                "Vectors of the wrong length, width or encoding are rejected; the sender counts \
                 as dropped and the others' sum is exact.",
                "The attacker sends a 3-element vector, a 16-bit one and a truncated encoding \
                 as its masked input, and no valid one.",
            ),
            "out_of_round" => (
                "Out-of-round, other-session and duplicate messages are rejected without \
                 harming the sender's genuine messages or anyone else's.",
                "The attacker sends a consistency signature during key advertisement, its keys \
                 under another session, and its genuine advertisement twice.",
            ),
            _ => ("", ""),
        }
    };
    for (i, (_, section, _)) in attacks::CLIENT_ATTACKS.iter().enumerate() {
        let (name, finding) = h
            .client_attack(i)
            .with_context(|| format!("client attack {i}"))?;
        let (claim, what) = describe(name);
        claims.push(Entry::new(
            format!("client.{name}"),
            format!("secagg-plus.md {section}"),
            claim,
            format!("{what}{}", h.over()),
            finding.held(),
            finding.evidence(),
            &finding,
        )?);
    }
    Ok(())
}

/// The transport's cases, over real loopback QUIC.
fn network_attacks(
    runtime: &tokio::runtime::Runtime,
    claims: &mut Vec<Entry>,
) -> anyhow::Result<()> {
    use fedveil_fed::net::audit as net;
    let cases = [
        (
            "network.unauthenticated_client",
            "federation.md §2.2",
            "A client whose key is not on the server's allow-list is refused before any \
             protocol state exists, and the server keeps serving.",
            "A client with the right certificate pin but an unknown key connects over QUIC, \
             proves its own key and sends a frame; an allowed client connects afterwards.",
            runtime.block_on(net::unauthenticated_client()),
        ),
        (
            "network.oversized_frame",
            "federation.md §2.3",
            "A frame over the size limit is refused from its header, before anything is \
             allocated, and the server keeps serving.",
            "An authenticated client opens a stream and announces a 4 GiB frame; another \
             client connects afterwards.",
            runtime.block_on(net::oversized_frame()),
        ),
    ];
    for (id, section, claim, attack, finding) in cases {
        let finding = finding.with_context(|| format!("the {id} case"))?;
        claims.push(Entry::new(
            id,
            section,
            claim,
            attack,
            finding.held(),
            finding.evidence(),
            &finding,
        )?);
    }
    Ok(())
}

/// The attacks that once got through (issue 17), each with its control,
/// over real loopback QUIC and against the real sandbox.
fn hardening(runtime: &tokio::runtime::Runtime, claims: &mut Vec<Entry>) -> anyhow::Result<()> {
    claims.extend(
        runtime
            .block_on(fedveil_audit::hardening::claims())
            .context("the hardening claims")?,
    );
    Ok(())
}

fn transcript(h: &Harness, sessions: usize, claims: &mut Vec<Entry>) -> anyhow::Result<()> {
    let (t, inputs) = match h.quic {
        Some(rt) => (
            rt.block_on(fedveil_audit::quic::transcript(sessions))
                .context("the transcript test")?,
            "client 1 sends +0.5 and client 2 −0.5 on every coordinate, then both 0, in two \
             federations over loopback QUIC, one round per session",
        ),
        None => (
            attacks::transcript(sessions, h.seed).context("the transcript test")?,
            "two clients trade 2^31 on every coordinate",
        ),
    };
    claims.push(Entry::new(
        "transcript.same_sum",
        "secagg-plus.md §8.1",
        "The server's view depends on the inputs only through their sum.",
        format!(
            "The same federation run with two input sets of equal sum ({inputs}), over fresh \
             sessions; a chi-square test compares the masked inputs the server saw, with the \
             unmasked inputs as the control."
        ),
        t.held(),
        t.evidence(),
        &t,
    )?);
    Ok(())
}

fn noise_config(z: f64) -> anyhow::Result<NoiseConfig> {
    let mut noise = NoiseConfig {
        placement: Placement::Distributed,
        dim: 64,
        clip: 1.0,
        noise_multiplier: z,
        granularity: 1.0,
        beta: (-0.5f64).exp(),
        bits: 32,
        min_survivors: 3,
    };
    noise.granularity = noise.default_granularity(3, 8.0)?;
    Ok(noise)
}

fn dp_entry(
    id: String,
    claim: String,
    attack: String,
    r: &AuditResult,
    held: bool,
) -> anyhow::Result<Entry> {
    let (tpr, fpr) = r.rates();
    let evidence = format!(
        "ε lower bound {:.2} ({:.0} % confidence) against the claimed ε {:.2} at δ = {:e} \
             (this many trials can prove at most {:.2}); TPR {:.3}, FPR {:.3} on {} held-out \
             trials each way (threshold chosen on {} more)",
        r.epsilon_lower_bound,
        100.0 * r.confidence,
        r.claimed_epsilon,
        r.delta,
        r.ceiling,
        tpr,
        fpr,
        r.outcome.positives,
        r.trials as u64 - r.outcome.positives
    );
    Ok(Entry::new(
        id,
        "dp.md §7",
        claim,
        attack,
        held,
        evidence,
        r,
    )?)
}

fn dp_audits(args: &Args, claims: &mut Vec<Entry>) -> anyhow::Result<()> {
    let broken = args.broken.map(Broken::from);
    let audit = |z: f64, broken: Option<Broken>| -> anyhow::Result<AuditResult> {
        let config = AuditConfig {
            noise: noise_config(z)?,
            clients: 3,
            trials: args.trials,
            delta: 1e-5,
            alpha: 0.05,
            broken,
        };
        Ok(audit_round(&config, &mut OsRng)?)
    };
    let attack = "A canary client sends a clipped update or zero, alternately, in one round of \
                  the distributed discrete Gaussian mechanism with 3 clients; the adversary \
                  knows the others' updates and thresholds the decoded sum's projection on the \
                  canary (threshold chosen on half the trials, rates measured on the other \
                  half, Clopper–Pearson bounds).";
    for z in NOISE_LEVELS {
        let r = audit(z, broken).with_context(|| format!("the DP audit at z = {z}"))?;
        let held = r.held();
        let mechanism = match broken {
            None => String::new(),
            Some(b) => format!(" (with the mechanism deliberately broken: {})", b.name()),
        };
        claims.push(dp_entry(
            format!("dp.noise_{z}"),
            format!(
                "At noise multiplier {z} one round spends at most the ε the accountant \
                 claims{mechanism}."
            ),
            attack.into(),
            &r,
            held,
        )?);
    }
    for b in [Broken::NoNoise, Broken::NoClip] {
        let r =
            audit(BROKEN_LEVEL, Some(b)).with_context(|| format!("the DP audit, {}", b.name()))?;
        claims.push(dp_entry(
            format!("dp.catches_{}", b.name().replace(' ', "_")),
            format!(
                "The DP audit catches a mechanism with {} (at noise multiplier {BROKEN_LEVEL}).",
                b.name()
            ),
            format!("The same attack on a mechanism with {}.", b.name()),
            &r,
            !r.held(),
        )?);
    }
    Ok(())
}

fn text(report: &Report) -> String {
    let mut out = format!(
        "fedveil audit {} ({}, seed {}): {} of {} claims held\n\n",
        report.version,
        report.transport,
        report.seed,
        report.held,
        report.claims.len()
    );
    for c in &report.claims {
        out.push_str(&format!(
            "[{}] {}  ({})\n  claim:    {}\n  attack:   {}\n  evidence: {}\n\n",
            if c.held { "held" } else { "FAILED" },
            c.id,
            c.section,
            c.claim,
            c.attack,
            c.evidence
        ));
    }
    out
}

fn markdown(report: &Report) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut out = format!(
        "# fedveil audit\n\nfedveil {}, protocol attacks {}, seed {}: **{} of {} claims \
         held**.\n\n| claim | section | attack | held | evidence |\n|---|---|---|---|---|\n",
        report.version,
        if report.transport == "quic" {
            "over loopback QUIC"
        } else {
            "in memory"
        },
        report.seed,
        report.held,
        report.claims.len()
    );
    for c in &report.claims {
        out.push_str(&format!(
            "| **{}**: {} | {} | {} | {} | {} |\n",
            c.id,
            cell(&c.claim),
            c.section,
            cell(&c.attack),
            if c.held { "yes" } else { "**NO**" },
            cell(&c.evidence)
        ));
    }
    out
}
