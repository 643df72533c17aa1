//! The claims issue 17 added: attacks that once got through, each run
//! against the real server, clients and sandbox, each with a control that
//! makes the same measurement where the protection is absent and sees the
//! failure. A claim holds only when the attack failed *and* its control
//! saw what the attack would have done.

use std::time::{Duration, Instant};

use fedveil_fed::adversary::ClientAdversary;
use fedveil_fed::client::Fault;
use fedveil_fed::config::{PlacementName, Plan, Policy};
use fedveil_fed::dp::zcdp;
use fedveil_fed::metrics::{ClientEvent, Event};
use fedveil_fed::randomness::Randomness;
use fedveil_fed::secagg::Stage;
use fedveil_fed::secagg::messages::ClientMessage;
use fedveil_fed::secagg::ring::PackedVec;
use fedveil_fed::wire::{Down, Up, VERSION};
use serde::Serialize;

use crate::harness::{self, Cast, ClientOptions, Finished, Rogue};
use crate::{AuditError, Claim, Result};

/// Every claim of this module, in report order.
pub async fn claims() -> Result<Vec<Claim>> {
    // The flood first: it measures the process's resident memory, which
    // the other federations would only blur.
    Ok(vec![
        flood().await?,
        granularity().await?,
        replayed_session().await?,
        retry_budget().await?,
        forged_weight().await?,
        tokio::task::spawn_blocking(sandbox)
            .await
            .map_err(|e| AuditError::Harness(format!("the sandbox claim: {e}")))??,
    ])
}

const DELTA: f64 = 1e-5;
const DIM: usize = 12;

fn round_epsilon(plan: &Plan, population: u32, survivors: u32) -> Result<f64> {
    sessions_epsilon(plan, population, survivors, 1.0)
}

/// The ε of `sessions` sessions at the survivor floor `survivors`, at δ.
fn sessions_epsilon(plan: &Plan, population: u32, survivors: u32, sessions: f64) -> Result<f64> {
    let noise = plan
        .resolve(population, DIM)?
        .dp
        .ok_or_else(|| AuditError::Harness("the plan has no differential privacy".into()))?
        .noise;
    Ok(zcdp::epsilon(
        sessions * zcdp::round_rho(&noise, survivors)?,
        DELTA,
    )?)
}

fn refusals(events: &[ClientEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Refused { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

fn charges(events: &[ClientEvent]) -> Vec<(u64, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Charged { round, attempt, .. } => Some((*round, *attempt)),
            _ => None,
        })
        .collect()
}

fn rounds(o: &Finished) -> u64 {
    o.server.as_ref().map(|s| s.rounds).unwrap_or(0)
}

fn reason(o: &Finished) -> String {
    match &o.server {
        Ok(s) => s.reason.clone(),
        Err(e) => e.to_string(),
    }
}

const DP: &str =
    "[dp]\nplacement = \"distributed\"\nclip = 1.0\nnoise_multiplier = 1.0\nmin_survivors = 3\n";

/// A strict client's policy: distributed noise only, z ≥ 1, clip ≤ 1, and
/// at most ε = 10 per round at δ = 10^-5.
fn strict() -> Policy {
    Policy {
        min_noise_multiplier: 1.0,
        max_clip: Some(1.0),
        refuse_placements: vec![PlacementName::Central, PlacementName::Local],
        max_round_epsilon: Some(10.0),
        ..Policy::default()
    }
}

#[derive(Serialize)]
struct GranularityDetails {
    honest_round_epsilon: f64,
    coarse_round_epsilon: f64,
    policy_max_round_epsilon: f64,
    /// Strict clients, the coarse round: rounds completed and refusals.
    attack_rounds: u64,
    attack_refusals: Vec<String>,
    /// Control: clients whose policy bounds only the knobs.
    control_rounds: u64,
    control_epsilon: Option<f64>,
    /// The strict clients take part in an honest round.
    honest_rounds: u64,
}

/// federation.md §4.4: the granularity attack (finding 2).
async fn granularity() -> Result<Claim> {
    let honest = harness::plan(1, DP)?;
    let mut coarse = harness::plan(1, &format!("{DP}granularity = 10.0\n"))?;
    coarse.federation.attempts = 2;
    let cast = Cast::new(3)?;
    let knobs_only = Policy {
        max_round_epsilon: None,
        ..strict()
    };
    let attack = harness::federate(&cast, &coarse, Randomness::os(), |_| ClientOptions {
        policy: strict(),
        ..ClientOptions::default()
    })
    .await?;
    let control = harness::federate(&cast, &coarse, Randomness::os(), |_| ClientOptions {
        policy: knobs_only.clone(),
        ..ClientOptions::default()
    })
    .await?;
    let fair = harness::federate(&cast, &honest, Randomness::os(), |_| ClientOptions {
        policy: strict(),
        ..ClientOptions::default()
    })
    .await?;
    let d = GranularityDetails {
        honest_round_epsilon: round_epsilon(&honest, 3, 3)?,
        coarse_round_epsilon: round_epsilon(&coarse, 3, 3)?,
        policy_max_round_epsilon: 10.0,
        attack_rounds: rounds(&attack),
        attack_refusals: refusals(&attack.client_events),
        control_rounds: rounds(&control),
        control_epsilon: control.server.as_ref().ok().and_then(|s| s.epsilon),
        honest_rounds: rounds(&fair),
    };
    let refused = d.attack_refusals.len() >= 3
        && d.attack_refusals
            .iter()
            .all(|r| r.contains("per-round limit of 10"));
    let held = d.attack_rounds == 0
        && refused
        && d.control_rounds == 1
        && d.control_epsilon.is_some_and(|e| e > 100.0)
        && d.honest_rounds == 1;
    let evidence = format!(
        "γ = 10 makes one round cost ε = {:.1} (γ chosen by the rules: {:.2}); clients with a \
         per-round limit of 10 completed {} rounds and refused {} times; control: clients \
         whose policy bounds only z and the clip completed {} round at ε = {}; the strict \
         clients completed {} honest round",
        d.coarse_round_epsilon,
        d.honest_round_epsilon,
        d.attack_rounds,
        d.attack_refusals.len(),
        d.control_rounds,
        d.control_epsilon
            .map_or("none".into(), |e| format!("{e:.1}")),
        d.honest_rounds,
    );
    Claim::new(
        "client.coarse_granularity",
        "federation.md §4.4",
        "A client bounds the privacy loss itself, not only the server's knobs: it computes \
         each round's ε from everything the server sends and refuses a round over its \
         policy's limit.",
        "Over loopback QUIC the server keeps the noise multiplier (1) and the clip (1) within \
         three strict clients' policy but sends granularity γ = 10. Control: the same round \
         with clients whose policy bounds only the noise multiplier and the clip.",
        held,
        evidence,
        &d,
    )
}

#[derive(Serialize)]
struct ReplayDetails {
    budget: f64,
    one_session_epsilon: f64,
    two_sessions_epsilon: f64,
    first_rounds: u64,
    first_charges: Vec<(u64, u32)>,
    replay_rounds: u64,
    replay_charges: Vec<(u64, u32)>,
    replay_refusals: Vec<String>,
    /// Control: the replay against clients that lost their ledgers.
    control_rounds: u64,
    control_charges: Vec<(u64, u32)>,
}

/// federation.md §4.4: a replayed session against the clients' ledgers
/// (finding 7).
async fn replayed_session() -> Result<Claim> {
    let plan = harness::plan(
        1,
        &DP.replace("noise_multiplier = 1.0", "noise_multiplier = 2.0"),
    )?;
    let one = round_epsilon(&plan, 3, 3)?;
    let two = sessions_epsilon(&plan, 3, 3, 2.0)?;
    let budget = 0.5 * (one + two);
    let policy = Policy {
        epsilon_budget: Some(budget),
        ..strict()
    };
    let cast = Cast::new(3)?;
    let ledgers = harness::scratch("ledgers")?;
    let fresh = harness::scratch("fresh-ledgers")?;
    // One seed for both runs: the same federation id, the same session.
    let mut seed = [0u8; 32];
    rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut seed)
        .map_err(|e| AuditError::Harness(format!("the OS random generator: {e}")))?;
    let run = |dir: std::path::PathBuf| {
        let policy = policy.clone();
        let plan = plan.clone();
        let cast = &cast;
        async move {
            harness::federate(cast, &plan, Randomness::seeded(seed), |i| ClientOptions {
                policy: policy.clone(),
                ledger_dir: Some(dir.join(format!("client-{i}"))),
                ..ClientOptions::default()
            })
            .await
        }
    };
    let first = run(ledgers.clone()).await?;
    let replay = run(ledgers.clone()).await?;
    // Control: the first run again with fresh ledgers, then the replay.
    let _ = run(fresh.clone()).await?;
    std::fs::remove_dir_all(&fresh).ok();
    let control = run(harness::scratch("lost-ledgers")?).await?;
    let _ = std::fs::remove_dir_all(&ledgers);
    let d = ReplayDetails {
        budget,
        one_session_epsilon: one,
        two_sessions_epsilon: two,
        first_rounds: rounds(&first),
        first_charges: charges(&first.client_events),
        replay_rounds: rounds(&replay),
        replay_charges: charges(&replay.client_events),
        replay_refusals: refusals(&replay.client_events),
        control_rounds: rounds(&control),
        control_charges: charges(&control.client_events),
    };
    let refused = d
        .replay_refusals
        .iter()
        .any(|r| r.contains("already revealed its input"));
    let held = d.first_rounds == 1
        && d.first_charges.len() == 3
        && d.replay_rounds == 0
        && d.replay_charges.is_empty()
        && refused
        && d.control_rounds == 1
        && d.control_charges.contains(&(0, 0));
    let evidence = format!(
        "budget ε = {budget:.3} (one session {one:.3}, two {two:.3}); first run: {} round, {} \
         charges; the same federation replayed against the same ledgers: {} rounds, {} \
         charges, {} refusals; control, the replay against lost ledgers: {} round, the \
         clients revealed session (0, 0) again ({} charges), ε {:.3} in total",
        d.first_rounds,
        d.first_charges.len(),
        d.replay_rounds,
        d.replay_charges.len(),
        d.replay_refusals.len(),
        d.control_rounds,
        d.control_charges.len(),
        two
    );
    Claim::new(
        "client.replayed_session",
        "federation.md §4.4",
        "A client reveals its input in each session of a round at most once, across \
         restarts, and never past its own privacy budget: a server cannot average \
         several noisy versions of it.",
        "Over loopback QUIC a federation of three clients with persisted ledgers completes \
         one round; the server is started again from nothing with the same federation id \
         and randomness and runs the same session. Control: the replay against clients \
         whose ledger directories are new.",
        held,
        evidence,
        &d,
    )
}

#[derive(Serialize)]
struct RetryDetails {
    budget: f64,
    one_session_epsilon: f64,
    aborted_first_session: bool,
    attack_epsilon: Option<f64>,
    attack_reason: String,
    /// Control: the same run with no budget.
    control_epsilon: Option<f64>,
    control_rounds: u64,
}

/// federation.md §5.3: retried sessions past the budget (finding 4).
async fn retry_budget() -> Result<Claim> {
    let dp = DP.replace("noise_multiplier = 1.0", "noise_multiplier = 2.0");
    let control_plan = harness::plan(1, &format!("{dp}[secagg]\nthreshold = 4\n"))?;
    let one = round_epsilon(&control_plan, 5, 3)?;
    let cast = Cast::new(5)?;
    let options = |i: usize| ClientOptions {
        faults: if i >= 3 {
            vec![Fault::Disconnect {
                round: 0,
                stage: Stage::Unmasking,
            }]
        } else {
            Vec::new()
        },
        ..ClientOptions::default()
    };
    // The control first: what the retried round spends with no budget.
    // The budget then lies between one session at the survivor floor
    // (what the server must be able to afford to start the round) and
    // that: the round may start, and its retry must not complete.
    let control = harness::federate(&cast, &control_plan, Randomness::os(), options).await?;
    let control_spent = control.server.as_ref().ok().and_then(|s| s.epsilon);
    let budget = 0.5 * (one + control_spent.unwrap_or(one));
    let attack_plan = harness::plan(
        1,
        &format!("{dp}epsilon_budget = {budget}\n[secagg]\nthreshold = 4\n"),
    )?;
    let attack = harness::federate(&cast, &attack_plan, Randomness::os(), options).await?;
    let summary_epsilon = |o: &Finished| o.server.as_ref().ok().and_then(|s| s.epsilon);
    let d = RetryDetails {
        budget,
        one_session_epsilon: one,
        aborted_first_session: attack.server_events.iter().any(|e| {
            matches!(
                e,
                Event::RoundAborted {
                    round: 0,
                    attempt: 0,
                    ..
                }
            )
        }),
        attack_epsilon: summary_epsilon(&attack),
        attack_reason: reason(&attack),
        control_epsilon: summary_epsilon(&control),
        control_rounds: rounds(&control),
    };
    let held = d.aborted_first_session
        && d.attack_epsilon.is_some_and(|e| e > 0.0 && e <= budget)
        && d.attack_reason.contains("privacy budget")
        && d.control_epsilon.is_some_and(|e| e > budget);
    let evidence = format!(
        "control, no budget: {} round at ε = {} (the aborted session and its retry); with a \
         budget of ε = {budget:.3} (one session at the survivor floor: {one:.3}) the first \
         session aborted while unmasking: {}; spent ε = {} and stopped: \"{}\"",
        d.control_rounds,
        d.control_epsilon
            .map_or("none".into(), |e| format!("{e:.3}")),
        d.aborted_first_session,
        d.attack_epsilon
            .map_or("none".into(), |e| format!("{e:.3}")),
        d.attack_reason,
    );
    Claim::new(
        "server.retry_budget",
        "federation.md §5.3",
        "The server's privacy budget is checked before every session, retries included: a \
         federation never completes past it.",
        "Over loopback QUIC five clients run one round (threshold 4); two of them disconnect \
         while unmasking, so the charged session aborts and the round is retried. Control: \
         the run with no budget, whose ε sets the attack's budget between one session at \
         the survivor floor and what the retried round spent.",
        held,
        evidence,
        &d,
    )
}

/// Shifts the weight slot of this client's masked input by half the ring
/// in round 0's first session: the unmasked total weight is out of range.
/// fed's own tests install it too.
#[derive(Debug, Default)]
pub struct ForgedWeight {
    done: bool,
}

impl ClientAdversary for ForgedWeight {
    fn outgoing(&mut self, round: u64, msg: ClientMessage) -> Vec<ClientMessage> {
        match msg {
            ClientMessage::MaskedInput(mut m) if round == 0 && !self.done => {
                let bits = m.masked.bits;
                if let Ok(mut v) = m.masked.unpack()
                    && let Some(last) = v.last_mut()
                {
                    *last = last.wrapping_add(1 << (bits - 1));
                    if let Ok(p) = PackedVec::pack(&v, bits) {
                        self.done = true;
                        m.masked = p;
                    }
                }
                vec![ClientMessage::MaskedInput(m)]
            }
            other => vec![other],
        }
    }
}

#[derive(Serialize)]
struct ForgedDetails {
    rounds: u64,
    reason: String,
    /// The sessions the forged sum aborted (the control: the forgery
    /// reached the decoder and was seen there).
    undecodable_sessions: Vec<(u64, u32)>,
    honest_rounds: Vec<u64>,
}

/// federation.md §4.1: a forged weight slot (finding 5).
async fn forged_weight() -> Result<Claim> {
    let plan = harness::plan(2, "")?;
    let cast = Cast::new(4)?;
    let o = harness::federate(&cast, &plan, Randomness::os(), |i| ClientOptions {
        adversary: (i == 0).then(|| Box::new(ForgedWeight::default()) as Box<dyn ClientAdversary>),
        ..ClientOptions::default()
    })
    .await?;
    let d = ForgedDetails {
        rounds: rounds(&o),
        reason: reason(&o),
        undecodable_sessions: o
            .server_events
            .iter()
            .filter_map(|e| match e {
                Event::RoundAborted {
                    round,
                    attempt,
                    reason,
                } if reason.contains("cannot be decoded") => Some((*round, *attempt)),
                _ => None,
            })
            .collect(),
        honest_rounds: o.clients[1..]
            .iter()
            .map(|c| c.as_ref().map_or(0, |s| s.rounds))
            .collect(),
    };
    let held = d.rounds == 2
        && !d.undecodable_sessions.is_empty()
        && d.honest_rounds.iter().all(|r| *r == 2);
    let evidence = format!(
        "the forged sum aborted {} session(s) as undecodable ({:?}); the federation completed \
         {} of 2 rounds and the honest clients {:?}",
        d.undecodable_sessions.len(),
        d.undecodable_sessions,
        d.rounds,
        d.honest_rounds
    );
    Claim::new(
        "client.forged_weight",
        "federation.md §4.1",
        "One client cannot end a federation with an input that makes the sum undecodable: \
         that session aborts and the round is tried again.",
        "Over loopback QUIC one of four clients shifts the weight slot of its masked input \
         by half the ring in round 0. Control: the server's abort shows the forged sum \
         reached the decoder.",
        held,
        evidence,
        &d,
    )
}

/// The process's resident memory now (`VmRSS`), in bytes.
fn rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// The largest resident memory seen while `f` runs, sampled every 2 ms
/// (`VmHWM` would be the whole process's peak, earlier claims included).
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Sampler {
    fn start() -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = rss().unwrap_or(0);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss().unwrap_or(0));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak.max(rss().unwrap_or(0))
        });
        Sampler { stop, thread }
    }

    fn peak(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

const FRAMES: usize = 1_000_000;
const FLOOD_BOUND: u64 = 64 << 20;

#[derive(Serialize)]
struct FloodDetails {
    frames: usize,
    seconds: f64,
    rss_before: u64,
    rss_peak: u64,
    growth_bytes: u64,
    rogue_end: String,
    rounds: u64,
    honest_rounds: Vec<u64>,
    /// Control: the same sampler while one rejection per frame is queued
    /// without bound, as the server did before the fix.
    control_growth_bytes: u64,
}

/// federation.md §3.1: a million refused frames from a client that never
/// reads (finding 3).
async fn flood() -> Result<Claim> {
    let mut plan = harness::plan(3, "")?;
    plan.federation.cohort_size = Some(4);
    plan.federation.min_clients = Some(4);
    for d in [
        &mut plan.deadlines.train,
        &mut plan.deadlines.share,
        &mut plan.deadlines.masked,
        &mut plan.deadlines.consistency,
        &mut plan.deadlines.unmask,
    ] {
        *d = 3.0;
    }
    let n = 5;
    let cast = Cast::new(n)?;
    let randomness = Randomness::os();
    // No disconnection for violations: the bound must come from the queues.
    let mut limits = harness::limits();
    limits.max_violations = u32::MAX;
    limits.idle_timeout = Duration::from_secs(60);
    let mut server = harness::start_server(&cast, &plan, randomness.clone(), limits).await?;
    let addr = server.addr;
    let mut honest = Vec::new();
    for i in 0..n - 1 {
        honest.push(harness::start_client(
            &cast,
            i,
            addr,
            &plan,
            randomness.clone(),
            ClientOptions::default(),
        )?);
    }
    let rogue = Rogue::connect(addr, &cast, n - 1).await?;
    server
        .wait_for(30, |e| matches!(e, Event::RoundStarted { .. }))
        .await?;
    let body = postcard::to_stdvec(&Up::Hello { version: VERSION })
        .map_err(|e| AuditError::Harness(format!("encoding Hello: {e}")))?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let batch = frame.repeat(10_000);
    let Rogue { conn, mut send, .. } = rogue;
    let before = rss().unwrap_or(0);
    let sampler = Sampler::start();
    let started = Instant::now();
    for _ in 0..FRAMES / 10_000 {
        send.write_all(&batch)
            .await
            .map_err(|e| AuditError::Harness(format!("flooding: {e}")))?;
    }
    let _ = send.finish();
    let seen = server
        .wait_for(
            120,
            |e| matches!(e, Event::Disconnected { client, .. } if client.0 == n as u32),
        )
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = sampler.peak();
    drop(conn);
    let (result, _) = server.end().await?;
    let honest_rounds = harness::join_clients(honest)
        .await
        .iter()
        .map(|c| c.as_ref().map_or(0, |s| s.rounds))
        .collect::<Vec<_>>();
    // Control: the rejection the server sends for this frame, queued once
    // per frame with nothing to bound the queue.
    let rejection = Down::Rejected {
        reason: "Hello is only valid as a connection's first message".into(),
    };
    let control_before = rss().unwrap_or(0);
    let sampler = Sampler::start();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Down>();
    for _ in 0..FRAMES {
        let _ = tx.send(rejection.clone());
    }
    let control_peak = sampler.peak();
    drop(rx);
    let d = FloodDetails {
        frames: FRAMES,
        seconds,
        rss_before: before,
        rss_peak: peak,
        growth_bytes: peak.saturating_sub(before),
        rogue_end: match &seen {
            Event::Disconnected { reason, .. } => reason.clone(),
            _ => String::new(),
        },
        rounds: result.as_ref().map_or(0, |s| s.rounds),
        honest_rounds,
        control_growth_bytes: control_peak.saturating_sub(control_before),
    };
    let held = d.growth_bytes < FLOOD_BOUND
        && d.rogue_end.contains("closed its stream")
        && d.rounds == 3
        && d.honest_rounds.iter().all(|r| *r == 3)
        && d.control_growth_bytes >= FLOOD_BOUND;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let evidence = format!(
        "{} refused frames in {:.1} s, every one read by the server: resident memory {:.0} → \
         {:.0} MiB at its peak (+{:.1} MiB, bound 64); the federation completed {} of 3 \
         rounds, the honest clients {:?}; control, one queued rejection per frame: +{:.0} MiB",
        d.frames,
        d.seconds,
        mib(d.rss_before),
        mib(d.rss_peak),
        mib(d.growth_bytes),
        d.rounds,
        d.honest_rounds,
        mib(d.control_growth_bytes)
    );
    Claim::new(
        "server.flood",
        "federation.md §3.1",
        "Nothing one client sends makes the server's memory grow without bound, and the \
         others' rounds go on.",
        "Over loopback QUIC an authenticated client writes a million Hello frames, each \
         refused, and never reads what the server sends back; disconnection after repeated \
         violations is off, so that the bound must come from the queues. Resident memory is \
         sampled every 2 ms. Control: the same sampler while one rejection per frame is \
         queued without bound, as the server did before the fix.",
        held,
        evidence,
        &d,
    )
}

#[derive(Serialize)]
struct SandboxDetails {
    /// Why the system cannot isolate generated code, where it cannot.
    unavailable: Option<String>,
    /// pass@k refused to run without isolation.
    refused: Option<String>,
    /// The escapes that got through, as seen from outside.
    escapes: Vec<String>,
    fork_bomb_processes: Option<u64>,
    process_limit: u64,
    /// Control: the same programs run by python3 directly.
    control_escapes: Vec<String>,
    control_fork_bomb_processes: Option<u64>,
}

/// The escapes of finding 1 as one program; `{out}` files land outside
/// the sandbox only if it is escaped, `{secret}` is a file only the host
/// may read, `{port}` a host listener. Its child lives 1.5 s, so that the
/// control run cannot leave anything behind.
fn escape_program(out: &str, secret: &str, port: u16) -> String {
    format!(
        r#"
import posix, sys, time
OUT = {out:?}
esc = []
try:
    open(OUT, "w").write("x")
except OSError:
    pass
try:
    posix.system("echo x > " + OUT + ".system")
except Exception:
    pass
try:
    if open({secret:?}).read():
        esc.append("read a host file")
except OSError:
    pass
import _socket
try:
    _socket.socket(_socket.AF_INET, _socket.SOCK_RAW, 1)
    esc.append("opened a raw socket")
except OSError:
    pass
try:
    s = _socket.socket()
    s.settimeout(1)
    s.connect(("127.0.0.1", {port}))
except OSError:
    pass
try:
    import importlib, subprocess
    importlib.reload(subprocess)
    subprocess.run(["/bin/sh", "-c", "echo x > " + OUT + ".spawn"])
except Exception:
    pass
pid = posix.fork()
if pid == 0:
    posix.setsid()
    for _ in range(30):
        time.sleep(0.05)
        try:
            open(OUT + ".late", "w").write("x")
        except OSError:
            pass
    posix._exit(0)
time.sleep(0.3)
if esc:
    raise SystemExit("escaped: " + ", ".join(esc))
"#
    )
}

/// Forks until refused, at most `cap` times; each child sleeps 2 s.
fn fork_bomb(cap: u64) -> String {
    format!(
        r#"
import posix, time
n = 0
try:
    for _ in range({cap}):
        if posix.fork() == 0:
            time.sleep(2)
            posix._exit(0)
        n += 1
except OSError:
    pass
raise SystemExit("forked %d" % n)
"#
    )
}

fn forked(message: &str) -> Option<u64> {
    message.rsplit("forked ").next()?.trim().parse().ok()
}

/// What got out, seen from the host: files, the listener, what the
/// program reported, and processes left behind.
fn escapes_seen(
    out: &std::path::Path,
    listener: &std::net::TcpListener,
    reported: &str,
    survivors: usize,
) -> Vec<String> {
    let mut seen = Vec::new();
    for (suffix, what) in [
        ("", "wrote outside its directory"),
        (".system", "ran a shell through posix.system"),
        (".spawn", "spawned a process through a reloaded subprocess"),
        (".late", "a setsid child wrote outside its directory"),
    ] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", out.display()));
        if p.exists() {
            seen.push(what.to_string());
            let _ = std::fs::remove_file(&p);
        }
    }
    if listener.accept().is_ok() {
        seen.push("connected to a host listener".into());
    }
    for what in ["read a host file", "opened a raw socket"] {
        if reported.contains(what) {
            seen.push(what.into());
        }
    }
    if survivors > 0 {
        seen.push(format!("{survivors} process(es) outlived the program"));
    }
    seen
}

/// Host processes whose command line holds `needle` as a word.
fn survivors(needle: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                c.contains(" -c ") && c.split(' ').any(|w| w == needle)
            })
        })
        .count()
}

/// Runs `program` with python3 directly, without any isolation (the
/// control), tagged with `tag` on its command line; kills it after 10 s.
fn run_unsandboxed(program: &str, tag: &str, dir: &std::path::Path) -> String {
    use std::process::{Command, Stdio};
    let child = Command::new("python3")
        .args(["-I", "-S", "-B", "-c", program, tag])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        return String::new();
    };
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    err
}

/// SECURITY.md, generated code: pass@k's sandbox (finding 1).
fn sandbox() -> Result<Claim> {
    use fedveil_model::eval::{Limits, Verdict, run_python, sandbox_status};
    let host =
        |e: std::io::Error| AuditError::Harness(format!("setting up the sandbox claim: {e}"));
    let dir = harness::scratch("sandbox")?;
    let out = dir.join("escaped");
    let secret = dir.join("server.key");
    std::fs::write(&secret, "a server's key").map_err(host)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(host)?;
    listener.set_nonblocking(true).map_err(host)?;
    let port = listener.local_addr().map_err(host)?.port();
    let program = escape_program(
        &out.display().to_string(),
        &secret.display().to_string(),
        port,
    );
    // A memory figure unique to this run finds its processes on the host.
    let mut nonce = [0u8; 4];
    rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut nonce)
        .map_err(|e| AuditError::Harness(format!("the OS random generator: {e}")))?;
    let limits = Limits {
        timeout: Duration::from_secs(5),
        memory_bytes: (256 << 20) + u64::from(u32::from_le_bytes(nonce) >> 12),
        cpu_seconds: 5,
        ..Limits::default()
    };
    let tag = limits.memory_bytes.to_string();
    let mut d = SandboxDetails {
        unavailable: sandbox_status(&limits.python).err(),
        refused: None,
        escapes: Vec::new(),
        fork_bomb_processes: None,
        process_limit: limits.processes,
        control_escapes: Vec::new(),
        control_fork_bomb_processes: None,
    };
    let mut attack_ran = true;
    match run_python(&program, &limits) {
        Err(e) => {
            d.refused = Some(e.to_string());
            attack_ran = false;
        }
        Ok(outcome) => {
            std::thread::sleep(Duration::from_millis(300));
            let reported = match &outcome {
                Verdict::Failed(why) => why.clone(),
                _ => String::new(),
            };
            d.escapes = escapes_seen(&out, &listener, &reported, survivors(&tag));
            if let Ok(Verdict::Failed(why)) = run_python(&fork_bomb(100_000), &limits) {
                d.fork_bomb_processes = forked(&why);
            }
            std::thread::sleep(Duration::from_millis(300));
            if survivors(&tag) > 0 {
                d.escapes
                    .push("the fork bomb's processes outlived it".into());
            }
        }
    }
    // Control: the same programs straight on the host (the fork bomb
    // capped, so that it cannot harm the host).
    let control_tag = format!("fedveil-audit-control-{tag}");
    let reported = run_unsandboxed(&program, &control_tag, &dir);
    std::thread::sleep(Duration::from_millis(300));
    d.control_escapes = escapes_seen(&out, &listener, &reported, survivors(&control_tag));
    let cap = 2 * limits.processes;
    d.control_fork_bomb_processes = forked(&run_unsandboxed(&fork_bomb(cap), &control_tag, &dir));
    // Let the control's children (2 s) end before anything else runs.
    std::thread::sleep(Duration::from_millis(2200));
    let _ = std::fs::remove_dir_all(&dir);
    let contained = if attack_ran {
        d.escapes.is_empty() && d.fork_bomb_processes.is_some_and(|n| n < limits.processes)
    } else {
        d.unavailable.is_some() && d.refused.is_some()
    };
    // The control must see at least the escapes that need no privilege.
    let control_sees = d.control_escapes.len() >= 6
        && d.control_fork_bomb_processes
            .is_some_and(|n| n >= limits.processes);
    let held = contained && control_sees;
    let evidence = format!(
        "{}; control, the same programs run by python3 on the host: {} escape(s) seen ({}), \
         the capped fork bomb started {} processes",
        if attack_ran {
            format!(
                "in the sandbox {} escape(s) got through{}, and the fork bomb started {} of at \
                 most {} processes",
                d.escapes.len(),
                if d.escapes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", d.escapes.join("; "))
                },
                d.fork_bomb_processes
                    .map_or("an unknown number".into(), |n| n.to_string()),
                limits.processes
            )
        } else {
            format!(
                "this system cannot isolate generated code ({}), and pass@k refused to run it",
                d.unavailable.as_deref().unwrap_or("?")
            )
        },
        d.control_escapes.len(),
        d.control_escapes.join("; "),
        d.control_fork_bomb_processes
            .map_or("an unknown number of".into(), |n| n.to_string()),
    );
    Claim::new(
        "eval.sandbox",
        "SECURITY.md, generated code in pass@k",
        "Generated code run by pass@k reaches nothing of the host: no file outside its own \
         temporary directory, no network, no process that outlives it, at most a fixed number \
         of processes; where the system cannot isolate it, pass@k refuses to run it.",
        "The escapes that got past the old interpreter-level guard, as one program run by \
         pass@k's runner: writing outside its directory, posix.system, reading a host file \
         only the host should read, a raw socket and a connection to a host listener, a \
         reloaded subprocess, a setsid child that keeps writing; then a fork bomb. Each is \
         checked from the host. Control: the same programs run by python3 directly.",
        held,
        evidence,
        &d,
    )
}
