//! A run with one party and no federation: FS-LLM's Global baseline (one
//! party holding every client's records) and its Local baseline (one
//! client's records alone), run with the same trainer, evaluator, rounds,
//! server optimiser and record-level DP as the federation they are set
//! beside (`fedveil sweep`, protocols/federation.md §6.2).
//!
//! Nothing is sent, masked or aggregated. Each round the party trains from
//! the global parameters exactly as a client would ([`Trainer::train`],
//! with the generator a client of id 0 would use), the server optimiser
//! applies its update as the aggregate of a cohort of one, and the
//! evaluator scores the result. With record-level DP the party is its own
//! accountant: ε is the subsampled Gaussian's over every DP-SGD step it
//! has taken, as a client's is (protocols/dp.md §8).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use crate::FedError;
use crate::checkpoint::RoundRecord;
use crate::config::OnePartyPlan;
use crate::metrics::{MetricsWriter, RoundMetrics, peak_rss_bytes};
use crate::optimizer::ServerOptimizer;
use crate::randomness::{Purpose, Randomness};
use crate::server::Summary;
use crate::trainer::{Evaluator, Trainer};

/// What [`run`] needs.
pub struct OnePartyRun<'a> {
    pub plan: &'a OnePartyPlan,
    pub trainer: &'a mut dyn Trainer,
    pub evaluator: &'a mut dyn Evaluator,
    pub randomness: Randomness,
    /// Where each round's metrics line is appended (the federation's
    /// format, with a cohort of one).
    pub metrics: Option<PathBuf>,
    /// Called after each completed round with its metrics.
    pub on_round: Option<&'a mut dyn FnMut(&RoundMetrics)>,
}

impl std::fmt::Debug for OnePartyRun<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnePartyRun")
            .field("plan", &self.plan)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

/// Trains for the plan's rounds (fewer if the record-level budget would be
/// exceeded) and returns what a federation's server would: the initial and
/// final evaluations, ε and the history.
pub fn run(r: OnePartyRun<'_>) -> Result<Summary, FedError> {
    let OnePartyRun {
        plan,
        trainer,
        evaluator,
        randomness,
        metrics,
        mut on_round,
    } = r;
    let dim = evaluator.dim();
    let failed =
        |what: &str, e: crate::trainer::TrainError| FedError::Internal(format!("{what}: {}", e.0));
    let mut params = evaluator
        .initial_params()
        .map_err(|e| failed("the initial parameters", e))?;
    if params.len() != dim {
        return Err(FedError::Internal(format!(
            "the initial parameters have {} entries, the task {dim}",
            params.len()
        )));
    }
    if trainer.wants_bundle() {
        let bundle = evaluator
            .client_bundle()
            .map_err(|e| failed("the client bundle", e))?
            .ok_or_else(|| FedError::Internal("the trainer wants a bundle; none made".into()))?;
        trainer
            .install_bundle(&bundle)
            .map_err(|e| failed("installing the bundle", e))?;
    }
    // A trainer that waits for a bundle knows its size once it has it.
    if trainer.dim() != dim {
        return Err(FedError::Internal(format!(
            "the trainer has {} parameters, the evaluator {dim}",
            trainer.dim()
        )));
    }
    let initial = evaluator
        .evaluate_final(&params)
        .map_err(|e| failed("evaluating the initial model", e))?;
    let mut writer = metrics.as_deref().map(MetricsWriter::open).transpose()?;
    let mut optimizer = ServerOptimizer::new(plan.optimizer, dim);
    let mut history = Vec::new();
    let mut evaluation = None;
    let mut steps = 0u64;
    let mut epsilon = None;
    let mut reason = "completed every round".to_string();
    let mut stopped_early = false;
    let account = |steps: u64| -> Result<Option<f64>, FedError> {
        plan.record
            .as_ref()
            .map(|r| {
                fedveil_dp::SubsampledGaussian {
                    noise_multiplier: r.mechanism.noise_multiplier,
                    sampling_rate: r.mechanism.sampling_rate,
                    steps,
                }
                .epsilon(r.delta, r.accountant)
                .map_err(|e| FedError::Internal(format!("accounting: {e}")))
            })
            .transpose()
    };
    for round in 0..plan.rounds {
        let started = Instant::now();
        // A party with a budget stops before the round that would pass it.
        if let (Some(r), Some(budget)) = (&plan.record, plan.record.as_ref().and_then(|r| r.budget))
        {
            let next = steps + u64::from(plan.training.local_steps);
            if account(next)?.is_some_and(|e| e > budget) {
                reason = format!(
                    "stopped before round {round}: it would spend more than the budget \
                     ε = {budget} at δ = {}",
                    r.delta
                );
                stopped_early = true;
                break;
            }
        }
        let mut rng = randomness.rng(Purpose::Training, round, 0, 0)?;
        let t = Instant::now();
        let update = trainer
            .train(&params, &plan.training, &mut rng)
            .map_err(|e| failed(&format!("round {round}: training"), e))?;
        let train_seconds = t.elapsed().as_secs_f64();
        if update.delta.len() != dim {
            return Err(FedError::Internal(format!(
                "round {round}: the update has {} entries, the task {dim}",
                update.delta.len()
            )));
        }
        if let Some(bad) = update.delta.iter().position(|v| !v.is_finite()) {
            return Err(FedError::Internal(format!(
                "round {round}: update entry {bad} is not finite"
            )));
        }
        match (&plan.record, update.record_steps) {
            (None, None) => {}
            (Some(r), Some(s))
                if s.noise_multiplier == r.mechanism.noise_multiplier
                    && s.sampling_rate == r.mechanism.sampling_rate =>
            {
                steps += s.steps;
            }
            (want, got) => {
                return Err(FedError::Internal(format!(
                    "round {round}: the trainer reported DP-SGD steps {got:?}, the plan asks for \
                     {:?}",
                    want.as_ref().map(|r| r.mechanism)
                )));
            }
        }
        let delta: Vec<f64> = update.delta.iter().map(|&v| f64::from(v)).collect();
        optimizer.step(&mut params, &delta)?;
        epsilon = account(steps)?;
        let last = round + 1 == plan.rounds;
        let t = Instant::now();
        let e = if last {
            evaluator.evaluate_final(&params)
        } else {
            evaluator.evaluate(&params)
        }
        .map_err(|e| failed(&format!("round {round}: evaluation"), e))?;
        let eval_seconds = t.elapsed().as_secs_f64();
        if let Err(e) = evaluator.save(&params, round + 1, last) {
            tracing::warn!("round {round}: saving the model failed: {}", e.0);
        }
        let seconds = started.elapsed().as_secs_f64();
        let m = RoundMetrics {
            round,
            attempt: 0,
            status: "completed".into(),
            abort_reason: None,
            loss: Some(e.loss),
            eval: e.metrics.clone(),
            epsilon,
            delta: plan.record.as_ref().map(|r| r.delta),
            client_epsilon: BTreeMap::new(),
            cohort: 1,
            survivors: 1,
            dropouts: Vec::new(),
            declined: Vec::new(),
            bytes_sent: 0,
            bytes_received: 0,
            stage_seconds: BTreeMap::from([
                ("train".to_string(), train_seconds),
                ("evaluate".to_string(), eval_seconds),
                ("total".to_string(), seconds),
            ]),
            server_peak_rss_bytes: peak_rss_bytes(),
        };
        if let Some(w) = writer.as_mut() {
            w.write(&m)?;
        }
        if let Some(f) = on_round.as_mut() {
            f(&m);
        }
        history.push(RoundRecord {
            round,
            loss: e.loss,
            epsilon,
            survivors: 1,
            cohort: 1,
            seconds,
        });
        evaluation = Some(e);
    }
    // A party stopped by its budget writes its final model, as a server
    // does (the rounds it ran have been saved on the schedule).
    if stopped_early
        && !history.is_empty()
        && let Err(e) = evaluator.save(&params, history.len() as u64, true)
    {
        tracing::warn!("saving the final model failed: {}", e.0);
    }
    if epsilon.is_none() {
        epsilon = account(steps)?;
    }
    Ok(Summary {
        rounds: history.len() as u64,
        params,
        initial_evaluation: Some(initial),
        evaluation,
        epsilon,
        delta: plan.record.as_ref().map(|r| r.delta),
        client_epsilon: BTreeMap::new(),
        history,
        reason,
        server_peak_rss_bytes: peak_rss_bytes(),
    })
}
