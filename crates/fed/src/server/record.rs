//! What a round ends with: the privacy budget and charge, the metrics
//! line, evaluation and the checkpoint.

use super::*;

impl Server {
    /// Why the next session (`round`, `attempt`) may not run: the privacy
    /// it could cost would take the ledger past `epsilon_budget`.
    pub(super) fn over_budget(&self, round: u64, attempt: u32) -> Result<Option<String>, FedError> {
        if let Some(rec) = &self.resolved.record {
            return self.over_record_budget(rec, round, attempt);
        }
        let Some(dp) = &self.resolved.dp else {
            return Ok(None);
        };
        let Some(budget) = dp.budget else {
            return Ok(None);
        };
        let worst = self
            .state
            .ledger
            .epsilon_after_worst_round(&dp.noise, dp.delta)?;
        if worst <= budget {
            return Ok(None);
        }
        let spent = self.state.ledger.epsilon(dp.delta)?;
        let session = if attempt == 0 {
            format!("round {round}")
        } else {
            format!("session {} of round {round}", attempt + 1)
        };
        Ok(Some(format!(
            "the privacy budget stops the federation before {session}: ε = {spent:.4} is spent, \
             and the session could take it to {worst:.4}, past the budget of {budget}"
        )))
    }

    /// With record-level DP: whether one more session would take the client
    /// that has trained in the most sessions past the clients' budget (each
    /// client refuses it on its own; stopping here ends the federation
    /// cleanly instead of with sessions nobody joins).
    fn over_record_budget(
        &self,
        rec: &crate::config::ResolvedRecordDp,
        round: u64,
        attempt: u32,
    ) -> Result<Option<String>, FedError> {
        let Some(budget) = rec.budget else {
            return Ok(None);
        };
        let ledger = &self.state.ledger;
        let most = ledger.client_sessions.values().copied().max().unwrap_or(0);
        let steps = (most + 1).saturating_mul(u64::from(self.resolved.training.local_steps));
        let worst = fedveil_dp::SubsampledGaussian {
            noise_multiplier: rec.mechanism.noise_multiplier,
            sampling_rate: rec.mechanism.sampling_rate,
            steps,
        }
        .epsilon(rec.delta, rec.accountant)?;
        if worst <= budget {
            return Ok(None);
        }
        let session = if attempt == 0 {
            format!("round {round}")
        } else {
            format!("session {} of round {round}", attempt + 1)
        };
        Ok(Some(format!(
            "the privacy budget stops the federation before {session}: a client has spent \
             ε = {:.4} on its records, and the session could take it to {worst:.4}, past the \
             budget of {budget}",
            ledger.max_client_epsilon()
        )))
    }

    /// A session's metrics so far: its traffic since `(sent0, received0)`,
    /// no survivors, no evaluation.
    pub(super) fn round_metrics(
        &self,
        round: u64,
        attempt: u32,
        cohort: u32,
        declined: Vec<u32>,
        (sent0, received0): (u64, u64),
    ) -> RoundMetrics {
        let (sent1, received1) = self.counters.snapshot();
        RoundMetrics {
            round,
            attempt,
            status: "completed".into(),
            abort_reason: None,
            loss: None,
            eval: BTreeMap::new(),
            epsilon: None,
            delta: self.delta(),
            client_epsilon: BTreeMap::new(),
            cohort,
            survivors: 0,
            dropouts: Vec::new(),
            declined,
            bytes_sent: sent1 - sent0,
            bytes_received: received1 - received0,
            stage_seconds: BTreeMap::new(),
            server_peak_rss_bytes: None,
        }
    }

    /// Records an aborted session: its metrics line and event.
    pub(super) fn aborted(
        &mut self,
        mut metrics: RoundMetrics,
        started: Instant,
        reason: Abort,
    ) -> Result<Ended, FedError> {
        let (round, attempt) = (metrics.round, metrics.attempt);
        tracing::warn!(round, attempt, "session aborted: {reason}");
        metrics.status = "aborted".into();
        metrics.abort_reason = Some(reason.to_string());
        metrics.epsilon = self.epsilon()?;
        self.finish_metrics(metrics, started)?;
        self.events.emit(Event::RoundAborted {
            round,
            attempt,
            reason: reason.to_string(),
        });
        Ok(Ended::Aborted(reason))
    }

    /// The end of a round with an aggregate applied: ε, evaluation, the
    /// checkpoint and the metrics.
    pub(super) async fn complete(
        &mut self,
        round: u64,
        n: u32,
        mut metrics: RoundMetrics,
        started: Instant,
    ) -> Result<Ended, FedError> {
        metrics.epsilon = self.epsilon()?;
        let t = Instant::now();
        let evaluation = self.evaluate(round + 1 == self.resolved.rounds).await?;
        metrics
            .stage_seconds
            .insert("evaluate".into(), t.elapsed().as_secs_f64());
        metrics.loss = Some(evaluation.loss);
        metrics.eval = evaluation.metrics.clone();
        self.state.evaluation = Some(evaluation);
        self.state.completed = round + 1;
        self.state.history.push(RoundRecord {
            round,
            loss: metrics.loss.unwrap_or(f64::NAN),
            epsilon: metrics.epsilon,
            survivors: metrics.survivors,
            cohort: n,
            seconds: started.elapsed().as_secs_f64(),
        });
        let t = Instant::now();
        self.checkpoint().await?;
        self.save_model(round + 1, round + 1 == self.resolved.rounds)
            .await;
        metrics
            .stage_seconds
            .insert("checkpoint".into(), t.elapsed().as_secs_f64());
        tracing::info!(
            round,
            survivors = metrics.survivors,
            loss = metrics.loss,
            epsilon = metrics.epsilon,
            "round completed"
        );
        let m = self.finish_metrics(metrics, started)?;
        self.events.emit(Event::RoundCompleted(Box::new(m)));
        Ok(Ended::Completed)
    }

    /// ε so far: the server's own account with client-level DP; the
    /// largest client report with record-level DP; none without DP.
    pub(super) fn epsilon(&self) -> Result<Option<f64>, FedError> {
        if self.resolved.record.is_some() {
            return Ok(Some(self.state.ledger.max_client_epsilon()));
        }
        self.resolved
            .dp
            .as_ref()
            .map(|d| self.state.ledger.epsilon(d.delta))
            .transpose()
    }

    /// The δ that ε is reported at.
    pub(super) fn delta(&self) -> Option<f64> {
        match (&self.resolved.dp, &self.resolved.record) {
            (Some(d), _) => Some(d.delta),
            (None, Some(r)) => Some(r.delta),
            (None, None) => None,
        }
    }

    /// Charges the round to the ledger and persists the ledger before the
    /// server can learn the sum (§5.3).
    pub(super) async fn charge(
        &mut self,
        round: u64,
        attempt: u32,
        survivors: usize,
    ) -> Result<(), FedError> {
        let Some(dp) = &self.resolved.dp else {
            return Ok(());
        };
        let rho = self
            .state
            .ledger
            .record(round, attempt, &dp.noise, survivors as u32)?;
        tracing::debug!(
            round,
            survivors,
            rho,
            "charged the round to the privacy ledger"
        );
        self.checkpoint().await
    }

    pub(super) fn finish_metrics(
        &mut self,
        mut m: RoundMetrics,
        started: Instant,
    ) -> Result<RoundMetrics, FedError> {
        m.stage_seconds
            .insert("total".into(), started.elapsed().as_secs_f64());
        m.server_peak_rss_bytes = peak_rss_bytes();
        if let Some(w) = self.metrics.as_mut() {
            w.write(&m)?;
        }
        Ok(m)
    }

    /// Evaluates the current parameters; `last` asks for the thorough
    /// evaluation of a run's first and last model.
    pub(super) async fn evaluate(&mut self, last: bool) -> Result<Evaluation, FedError> {
        if let Some(e) = self.take_initial().await? {
            self.initial_done = Some(e);
        }
        let evaluator = self
            .evaluator
            .take()
            .ok_or_else(|| FedError::Internal("the evaluator is gone".into()))?;
        let (evaluator, result) =
            evaluate_in_background(evaluator, self.state.params.clone(), last)
                .await
                .map_err(|e| FedError::Internal(format!("evaluation task: {e}")))?;
        self.evaluator = Some(evaluator);
        Ok(result?)
    }

    /// Waits for the initial evaluation, if one is running or has ended,
    /// and takes the evaluator back.
    pub(super) async fn take_initial(&mut self) -> Result<Option<Evaluation>, FedError> {
        let Some(task) = self.initial.take() else {
            return Ok(self.initial_done.take());
        };
        let (evaluator, result) = task
            .await
            .map_err(|e| FedError::Internal(format!("evaluation task: {e}")))?;
        self.evaluator = Some(evaluator);
        let e = result?;
        tracing::info!(loss = e.loss, "the initial model");
        self.events.emit(Event::InitialEvaluation(e.clone()));
        Ok(Some(e))
    }

    /// Has the evaluator write the model of `completed` rounds out, when
    /// its task saves models ([`crate::trainer::Evaluator::save`]). A
    /// failure is logged and the federation goes on: the checkpoint holds
    /// the same parameters.
    pub(super) async fn save_model(&mut self, completed: u64, last: bool) {
        let Some(mut evaluator) = self.evaluator.take() else {
            tracing::error!("the evaluator is gone: the model of round {completed} is not saved");
            return;
        };
        let params = self.state.params.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let r = evaluator.save(&params, completed, last);
            (evaluator, r)
        })
        .await;
        match joined {
            Ok((evaluator, result)) => {
                self.evaluator = Some(evaluator);
                self.saved_final |= last;
                match result {
                    Ok(Some(path)) => {
                        tracing::info!(round = completed, path = %path.display(), "saved the model");
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(
                        round = completed,
                        "could not save the model (the checkpoint keeps it): {e}"
                    ),
                }
            }
            Err(e) => tracing::error!(round = completed, "the saving task failed: {e}"),
        }
    }

    pub(super) async fn checkpoint(&mut self) -> Result<(), FedError> {
        let Some(dir) = self.resolved.checkpoint_dir.clone() else {
            return Ok(());
        };
        let s = &self.state;
        let ck = Checkpoint {
            header: Header {
                federation: hex::encode(s.federation),
                completed_rounds: s.completed,
                dim: s.params.len() as u64,
                optimizer: s.optimizer.hyper().kind.name().into(),
                task: s.task.clone(),
                ledger: s.ledger.clone(),
                history: s.history.clone(),
                moments: s.optimizer.m.len() as u64,
            },
            params: s.params.clone(),
            m: s.optimizer.m.clone(),
            v: s.optimizer.v.clone(),
        };
        tokio::task::spawn_blocking(move || ck.save(&dir))
            .await
            .map_err(|e| FedError::Internal(format!("checkpoint task: {e}")))?
    }

    /// Tells every client the federation is over and lets them go.
    pub(super) async fn finish(&mut self, reason: &str) {
        let rounds = self.state.completed;
        for (id, c) in &self.conns {
            let last = Outbound::Last(
                Down::Finished {
                    rounds,
                    reason: reason.to_string(),
                },
                CLOSE_FINISHED,
                "federation finished".into(),
            );
            if c.tx.try_send(last).is_err() {
                c.conn.close(CLOSE_FINISHED.into(), b"federation finished");
            }
            tracing::debug!(client = %id, "finished");
        }
        self.events.emit(Event::Finished {
            rounds,
            reason: reason.to_string(),
        });
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while !self.conns.is_empty() {
            match tokio::time::timeout_at(until, self.hub.recv()).await {
                Ok(Some(Inbound::Gone {
                    id,
                    generation,
                    reason,
                })) => {
                    self.gone(id, generation, reason);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
}
