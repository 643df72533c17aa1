//! `fedveil audit`'s report: every claim, run in order, and its text,
//! JSON and Markdown forms (docs/audit.md; the JSON keys are the report's
//! contract).

use serde::Serialize;

use crate::mechanism::Sabotage;
use crate::record::RecordSabotage;
use crate::secagg::{self as attacks, ClientFinding, Finding, ServerAttackKind};
use crate::{AuditError, Claim, Result};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seed of the in-memory protocol sessions.
    pub seed: u64,
    /// Run the protocol attacks over loopback QUIC, between the
    /// federation's own server and clients, instead of in memory.
    pub quic: bool,
    /// Sessions per input set in the transcript test.
    pub sessions: usize,
    /// Trials with the canary in the DP audits (and as many without; the
    /// record-level audit runs at most 1,000).
    pub trials: u32,
    /// Sabotage the DP mechanism on purpose, client-level and record-level
    /// alike (the audits must then fail).
    pub sabotage: Option<Sabotage>,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub version: &'static str,
    /// Where the protocol attacks ran: `memory` or `quic`.
    pub transport: &'static str,
    pub seed: u64,
    pub held: usize,
    pub failed: usize,
    pub claims: Vec<Claim>,
}

/// Runs every claim. An attack that cannot run at all is an error (a
/// failure of the run, not of a claim).
pub fn run(options: &Options) -> Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| AuditError::Harness(format!("starting the async runtime: {e}")))?;
    let venue = Venue {
        seed: options.seed,
        quic: options.quic.then_some(&runtime),
    };
    let mut claims = Vec::new();
    server_attacks(&venue, &mut claims)?;
    client_attacks(&venue, &mut claims)?;
    claims.extend(runtime.block_on(crate::transport::claims())?);
    claims.extend(
        runtime
            .block_on(crate::hardening::claims())
            .map_err(|e| context("the hardening claims", e))?,
    );
    claims.push(transcript(&venue, options.sessions)?);
    claims.extend(
        crate::mechanism::claims(options.trials, options.sabotage)
            .map_err(|e| context("the DP audit", e))?,
    );
    // Not beside the claims that wait on federation deadlines: its
    // computation would slow their clients past them.
    let record_sabotage = options.sabotage.map(|s| match s {
        Sabotage::NoNoise => RecordSabotage::NoNoise,
        Sabotage::NoClip => RecordSabotage::NoClip,
    });
    claims.extend(
        crate::record::claims(options.trials, record_sabotage)
            .map_err(|e| context("the record-level DP audit", e))?,
    );
    let failed = claims.iter().filter(|c| !c.held).count();
    Ok(Report {
        version: env!("CARGO_PKG_VERSION"),
        transport: if options.quic { "quic" } else { "memory" },
        seed: options.seed,
        held: claims.len() - failed,
        failed,
        claims,
    })
}

fn context(what: &str, e: impl std::fmt::Display) -> AuditError {
    AuditError::Harness(format!("{what}: {e}"))
}

/// Where the protocol attacks run: in memory (every session derived from
/// `seed`), or over loopback QUIC with the federation's server and clients
/// (their randomness drawn from the OS).
struct Venue<'a> {
    seed: u64,
    quic: Option<&'a tokio::runtime::Runtime>,
}

impl Venue<'_> {
    fn server_attack(&self, kind: ServerAttackKind, i: u64) -> Result<Finding> {
        match self.quic {
            Some(rt) => rt
                .block_on(crate::quic::server_attack(kind))
                .map_err(Into::into),
            None => attacks::run_server_attack(kind, self.seed.wrapping_add(i))
                .map_err(|e| context("the in-memory session", e)),
        }
    }

    fn client_attack(&self, i: usize) -> Result<(&'static str, ClientFinding)> {
        let (name, _, attack) = attacks::CLIENT_ATTACKS
            .get(i)
            .ok_or_else(|| AuditError::Harness(format!("no client attack {i}")))?;
        let finding = match self.quic {
            Some(rt) => {
                let kind = crate::quic::ClientAttackKind::ALL
                    .into_iter()
                    .find(|k| k.name() == *name)
                    .ok_or_else(|| {
                        AuditError::Harness(format!("no client attack {name} over QUIC"))
                    })?;
                rt.block_on(crate::quic::client_attack(kind))?
            }
            None => attack(self.seed.wrapping_add(100 + i as u64))
                .map_err(|e| context("the in-memory session", e))?,
        };
        Ok((*name, finding))
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

fn server_attacks(venue: &Venue, claims: &mut Vec<Claim>) -> Result<()> {
    for (i, kind) in ServerAttackKind::ALL.into_iter().enumerate() {
        let name = kind.name();
        let finding = venue
            .server_attack(kind, i as u64)
            .map_err(|e| context(&format!("attack {name}"), e))?;
        let (claim, attack) = kind.claim_and_attack();
        // The control must see the leak the attacks must not.
        let held = if kind == ServerAttackKind::Control {
            !finding.target_hidden()
        } else {
            finding.target_hidden()
        };
        claims.push(Claim::new(
            format!("server.{name}"),
            format!("secagg-plus.md {}", kind.section()),
            claim,
            format!("{attack}{}", venue.over()),
            held,
            finding.evidence(),
            &finding,
        )?);
    }
    Ok(())
}

fn client_attacks(venue: &Venue, claims: &mut Vec<Claim>) -> Result<()> {
    for (i, (_, section, _)) in attacks::CLIENT_ATTACKS.iter().enumerate() {
        let (name, finding) = venue
            .client_attack(i)
            .map_err(|e| context(&format!("client attack {i}"), e))?;
        let (claim, attack) = attacks::client_claim_and_attack(name)
            .ok_or_else(|| AuditError::Harness(format!("no claim for client attack {name}")))?;
        claims.push(Claim::new(
            format!("client.{name}"),
            format!("secagg-plus.md {section}"),
            claim,
            format!("{attack}{}", venue.over()),
            finding.held(),
            finding.evidence(),
            &finding,
        )?);
    }
    Ok(())
}

fn transcript(venue: &Venue, sessions: usize) -> Result<Claim> {
    let (t, inputs) = match venue.quic {
        Some(rt) => (
            rt.block_on(crate::quic::transcript(sessions))
                .map_err(|e| context("the transcript test", e))?,
            "client 1 sends +0.5 and client 2 −0.5 on every coordinate, then both 0, in two \
             federations over loopback QUIC, one round per session",
        ),
        None => (
            attacks::transcript(sessions, venue.seed)
                .map_err(|e| context("the transcript test", e))?,
            "two clients trade 2^31 on every coordinate",
        ),
    };
    Claim::new(
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
    )
}

impl Report {
    /// The report as text, one block per claim.
    pub fn text(&self) -> String {
        let mut out = format!(
            "fedveil audit {} ({}, seed {}): {} of {} claims held\n\n",
            self.version,
            self.transport,
            self.seed,
            self.held,
            self.claims.len()
        );
        for c in &self.claims {
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

    /// The report as a Markdown table.
    pub fn markdown(&self) -> String {
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        let mut out = format!(
            "# fedveil audit\n\nfedveil {}, protocol attacks {}, seed {}: **{} of {} claims \
             held**.\n\n| claim | section | attack | held | evidence |\n|---|---|---|---|---|\n",
            self.version,
            if self.transport == "quic" {
                "over loopback QUIC"
            } else {
                "in memory"
            },
            self.seed,
            self.held,
            self.claims.len()
        );
        for c in &self.claims {
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
}
