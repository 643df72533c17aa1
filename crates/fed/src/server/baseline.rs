//! The unprotected baseline: raw updates over the same connections, for
//! the baselines of a sweep (`federation.unprotected`; nothing is masked).

use super::*;

impl Server {
    /// One session of an unprotected round (the insecure baseline,
    /// protocols/federation.md §4.6): the cohort trains and sends raw
    /// updates, which the server averages weighted by samples.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn unprotected_session(
        &mut self,
        round: u64,
        attempt: u32,
        cohort: Vec<ClientId>,
        spec: RoundSpec,
        blob: Arc<Vec<u8>>,
        started: Instant,
        (sent0, received0): (u64, u64),
    ) -> Result<Ended, FedError> {
        let n = cohort.len() as u32;
        let dim = self.state.params.len();
        let max_weight = u64::from(self.resolved.max_weight);
        tracing::info!(round, attempt, cohort = n, "unprotected round started");
        self.events.emit(Event::RoundStarted {
            round,
            attempt,
            cohort: cohort.clone(),
        });
        let _ = self.expect.send(Some(Expect {
            session: fedveil_secagg::SessionId([0; 32]),
            bytes: dim * 4,
        }));
        let mut waiting = std::collections::BTreeSet::new();
        let mut dropouts = Vec::new();
        for &to in &cohort {
            let round_msg = Down::Round(Box::new(spec.clone()));
            if self.send(to, Outbound::WithBlob(round_msg, Arc::clone(&blob))) {
                waiting.insert(to);
            } else {
                dropouts.push(to);
            }
        }
        self.events.emit(Event::StageStarted {
            round,
            attempt,
            stage: Stage::AdvertiseKeys,
        });
        let deadline = tokio::time::Instant::now() + self.resolved.train_deadline;
        let mut sum = vec![0f64; dim];
        let mut weight = 0f64;
        let mut contributed = 0u32;
        let mut declined = Vec::new();
        while !waiting.is_empty() {
            let m = match tokio::time::timeout_at(deadline, self.hub.recv()).await {
                Err(_) => break,
                Ok(None) => return Err(FedError::Internal("the connection hub closed".into())),
                Ok(Some(m)) => m,
            };
            match self.hear(m) {
                // A member that reconnected lost its round; one that left
                // sends nothing more.
                Heard::Joined(id) | Heard::Left(id) => {
                    if waiting.remove(&id) {
                        dropouts.push(id);
                    }
                }
                Heard::Update {
                    id,
                    round: r,
                    attempt: a,
                    samples,
                    data,
                } => {
                    if r != round || a != attempt || !waiting.contains(&id) {
                        self.reject(
                            id,
                            format!("no update for round {r}, session {a} is expected from {id}"),
                        );
                        continue;
                    }
                    waiting.remove(&id);
                    match wire::blob_to_params(&data, dim)
                        .filter(|d| d.iter().all(|v| v.is_finite()))
                    {
                        Some(delta) => {
                            let w = samples.clamp(1, max_weight) as f64;
                            for (acc, d) in sum.iter_mut().zip(&delta) {
                                *acc += w * f64::from(*d);
                            }
                            weight += w;
                            contributed += 1;
                        }
                        None => {
                            self.reject(id, format!("the update is not {dim} finite f32 values"));
                            dropouts.push(id);
                        }
                    }
                }
                Heard::Up(id, Up::Decline { round: r, reason }) => {
                    if r == round && waiting.remove(&id) {
                        tracing::info!(client = %id, round, "declined the round: {reason}");
                        declined.push(id.0);
                    }
                }
                Heard::Up(id, _) | Heard::Masked(id, _) => {
                    self.reject(id, "an unprotected round expects an Update".into());
                }
                Heard::Nothing => {}
            }
        }
        dropouts.extend(waiting);
        let _ = self.expect.send(None);
        let mut seconds = BTreeMap::new();
        seconds.insert("train".to_string(), started.elapsed().as_secs_f64());
        let mut metrics = self.round_metrics(round, attempt, n, declined, (sent0, received0));
        metrics.stage_seconds = seconds;
        metrics.survivors = contributed;
        metrics.dropouts = dropouts
            .iter()
            .map(|c| Dropout {
                client: c.0,
                stage: "train".into(),
            })
            .collect();
        if contributed == 0 {
            return self.aborted(metrics, started, Abort::NoUpdates);
        }
        let t = Instant::now();
        let mean: Vec<f64> = sum.iter().map(|s| s / weight).collect();
        self.state.optimizer.step(&mut self.state.params, &mean)?;
        metrics
            .stage_seconds
            .insert("aggregate".into(), t.elapsed().as_secs_f64());
        self.complete(round, n, metrics, started).await
    }
}
