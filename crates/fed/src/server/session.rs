//! The secure session: one SecAgg+ session over the cohort's connections,
//! from the round specification to the unmasked sum (protocols/federation.md
//! §4; protocols/secagg-plus.md §6).

use super::*;
use fedveil_secagg::params;

impl Server {
    /// Runs one SecAgg+ session of `round` with `cohort`.
    pub(super) async fn session(
        &mut self,
        round: u64,
        attempt: u32,
        cohort: Vec<ClientId>,
    ) -> Result<Ended, FedError> {
        let started = Instant::now();
        let (sent0, received0) = self.counters.snapshot();
        let n = cohort.len() as u32;
        let (spec, blob) = self.round_spec(round, attempt, &cohort)?;
        if self.resolved.unprotected {
            let counters = (sent0, received0);
            return self
                .unprotected_session(round, attempt, cohort, spec, blob, started, counters)
                .await;
        }
        let takeover = self.hooks.takeover(round, attempt);
        // What the cohort sent, for an adversary that takes the session over.
        let mut log: Vec<(ClientId, ClientMessage)> = Vec::new();
        let r = &self.resolved;
        let mut sa = match fedveil_secagg::Server::new(spec.session.clone(), r.stage_deadlines) {
            Ok(sa) => sa,
            // The session's parameters follow from the cohort; a Poisson
            // sample can be too small for the configured threshold or
            // degree. Nothing was sent yet: this session is aborted and the
            // round tried again with a fresh sample.
            Err(e) => {
                let metrics = self.round_metrics(round, attempt, n, Vec::new(), (sent0, received0));
                let reason = Abort::Unworkable { cohort: n, why: e };
                return self.aborted(metrics, started, reason);
            }
        };
        let session_id = sa.session_id();
        let bits = spec.encoding.bits();
        tracing::info!(round, attempt, cohort = n, "round started");
        self.events.emit(Event::RoundStarted {
            round,
            attempt,
            cohort: cohort.clone(),
        });
        let _ = self.expect.send(Some(Expect {
            session: session_id,
            bytes: packed_len(spec.session.dim as usize, bits),
        }));
        sa.start(self.now());
        for (to, msg) in sa.drain_transmits() {
            let delivered = match msg {
                ServerMessage::Setup(_) => match self.hooks.tampered(to, &spec, &blob) {
                    Some((s, b)) => self.send(
                        to,
                        Outbound::WithBlob(Down::Round(Box::new(s)), Arc::new(b)),
                    ),
                    None => self.send(
                        to,
                        Outbound::WithBlob(Down::Round(Box::new(spec.clone())), Arc::clone(&blob)),
                    ),
                },
                other => self.send(to, Outbound::Frame(Down::Secagg(other))),
            };
            if !delivered {
                sa.drop_client(self.now(), to);
            }
        }

        let mut stage = sa.stage();
        let mut stage_started = Instant::now();
        let mut seconds = BTreeMap::new();
        let mut declined = Vec::new();
        let mut charged = false;
        if let Some(s) = stage {
            self.events.emit(Event::StageStarted {
                round,
                attempt,
                stage: s,
            });
        }
        loop {
            // Stage bookkeeping and the privacy charge come before the
            // stage's requests go out.
            if sa.stage() != stage {
                if let Some(s) = stage {
                    seconds.insert(
                        stage_key(s).to_string(),
                        stage_started.elapsed().as_secs_f64(),
                    );
                }
                stage = sa.stage();
                stage_started = Instant::now();
                // Charge before anything can be unmasked: when the
                // unmasking requests are about to go out, or (if no request
                // was needed) when a sum exists.
                let unmasking =
                    stage == Some(Stage::Unmasking) || matches!(sa.outcome(), Some(Ok(_)));
                if unmasking && !charged {
                    charged = true;
                    self.charge(round, attempt, sa.survivors().len()).await?;
                }
                if let Some(s) = stage {
                    self.events.emit(Event::StageStarted {
                        round,
                        attempt,
                        stage: s,
                    });
                }
            }
            #[cfg(feature = "adversary")]
            if let Some(s) = takeover
                && stage == Some(s)
            {
                let requests = sa.drain_transmits();
                self.take_over(&sa, s, &cohort, requests, std::mem::take(&mut log))
                    .await?;
                let _ = self.expect.send(None);
                let reason = Abort::TakenOver(s);
                for to in &cohort {
                    let abort = ServerMessage::Abort {
                        session: session_id,
                        reason: reason.to_string(),
                    };
                    self.send(*to, Outbound::Frame(Down::Secagg(abort)));
                }
                let mut metrics =
                    self.round_metrics(round, attempt, n, declined, (sent0, received0));
                metrics.stage_seconds = seconds;
                return self.aborted(metrics, started, reason);
            }
            for (to, msg) in sa.drain_transmits() {
                if !self.send(to, Outbound::Frame(Down::Secagg(msg))) {
                    sa.drop_client(self.now(), to);
                }
            }
            if sa.outcome().is_some() {
                break;
            }
            let deadline = sa
                .poll_timeout()
                .map(|d| tokio::time::Instant::from_std(self.clock + d));
            let inbound = match deadline {
                Some(d) => match tokio::time::timeout_at(d, self.hub.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        sa.handle_timeout(self.now());
                        continue;
                    }
                },
                None => self.hub.recv().await,
            };
            let Some(m) = inbound else {
                return Err(FedError::Internal("the connection hub closed".into()));
            };
            let in_cohort = |id: &ClientId| cohort.binary_search(id).is_ok();
            match self.hear(m) {
                // A reconnecting member lost its session state; a member
                // that left answers nothing more.
                Heard::Joined(id) | Heard::Left(id) => {
                    if in_cohort(&id) {
                        sa.drop_client(self.now(), id);
                    }
                }
                Heard::Up(id, up) => match up {
                    Up::Secagg(msg) if in_cohort(&id) => {
                        if matches!(msg, ClientMessage::MaskedInput(_)) {
                            self.reject(id, "masked inputs travel as Masked with a blob".into());
                        } else {
                            let log = takeover.is_some().then_some(&mut log);
                            self.hand_over(&mut sa, id, msg, log);
                        }
                    }
                    Up::Secagg(_) => {
                        self.reject(id, format!("{id} is not in round {round}'s cohort"))
                    }
                    Up::Decline { round: r, reason } if r == round && in_cohort(&id) => {
                        tracing::info!(client = %id, round, "declined the round: {reason}");
                        declined.push(id.0);
                        sa.drop_client(self.now(), id);
                    }
                    Up::Decline { .. } => {}
                    Up::Hello { .. } => self.reject(id, "Hello was already received".into()),
                    Up::BundleReply { .. } => {
                        self.reject(id, "the bundle was offered before Welcome".into())
                    }
                    Up::Masked { .. } => {
                        self.reject(id, "internal: masked input without its vector".into())
                    }
                    Up::Update { .. } => self.reject(
                        id,
                        "raw updates are only accepted in unprotected rounds".into(),
                    ),
                },
                Heard::Update { id, .. } => self.reject(
                    id,
                    "raw updates are only accepted in unprotected rounds".into(),
                ),
                Heard::Masked(id, input) => {
                    if !in_cohort(&id) {
                        self.reject(id, format!("{id} is not in round {round}'s cohort"));
                        continue;
                    }
                    let log = takeover.is_some().then_some(&mut log);
                    self.hand_over(&mut sa, id, ClientMessage::MaskedInput(input), log);
                }
                Heard::Nothing => {}
            }
        }
        let _ = self.expect.send(None);
        let outcome = sa
            .take_outcome()
            .ok_or_else(|| FedError::Internal("the session ended without an outcome".into()))?;
        let mut metrics = self.round_metrics(round, attempt, n, declined, (sent0, received0));
        metrics.stage_seconds = seconds;
        let agg = match outcome {
            Err(reason) => return self.aborted(metrics, started, reason.into()),
            Ok(agg) => agg,
        };
        self.apply_aggregate(round, attempt, n, &spec, agg, metrics, started, charged)
            .await
    }

    /// The round specification of session `attempt` of `round` for
    /// `cohort`, and the parameters it commits to (§3.3): the encoding,
    /// the graph's degree and threshold by secagg's rules, a fresh nonce.
    fn round_spec(
        &self,
        round: u64,
        attempt: u32,
        cohort: &[ClientId],
    ) -> Result<(RoundSpec, Arc<Vec<u8>>), FedError> {
        let r = &self.resolved;
        let n = cohort.len() as u32;
        let dim = self.state.params.len();
        let mut rng = self.randomness.rng(Purpose::Session, round, attempt, 0)?;
        let encoding = match &r.dp {
            None if r.unprotected => Encoding::Unprotected,
            None => Encoding::Plain {
                bits: r.bits,
                clamp: r.clamp,
                max_clients: n,
                max_weight: r.max_weight,
            },
            Some(dp) => {
                let mut rotation_seed = [0u8; 32];
                rng.fill_bytes(&mut rotation_seed);
                Encoding::Private {
                    noise: dp.noise.clone(),
                    rotation_seed,
                }
            }
        };
        let k = params::fitting_degree(r.degree.unwrap_or(n - 1), n);
        let t = r.threshold.unwrap_or_else(|| params::majority(k));
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let roster = cohort
            .iter()
            .map(|id| RosterEntry {
                id: *id,
                identity: IdentityPublic(self.keys.get(id).map_or([0; 32], |k| k.0)),
            })
            .collect();
        let ring_len = encoding.ring_len(dim);
        let session = SessionParams {
            version: PROTOCOL_VERSION,
            nonce,
            round,
            context: [0; 32],
            dim: u32::try_from(ring_len)
                .map_err(|_| FedError::Internal(format!("{ring_len} ring elements")))?,
            bits: encoding.bits(),
            degree: k,
            threshold: t,
            min_survivors: r.min_survivors,
            roster,
        };
        let blob = Arc::new(wire::params_to_blob(&self.state.params));
        let hash = wire::params_hash(&blob);
        let mut spec = RoundSpec {
            federation: self.state.federation,
            round,
            attempt,
            dim: dim as u64,
            params_hash: hash,
            training: r.training.clone(),
            encoding,
            session,
            bundle: self.shared.bundle.as_ref().map(|b| b.hash),
        };
        spec.session.context = spec
            .context(&hash)
            .map_err(|e| FedError::Internal(e.to_string()))?;
        Ok((spec, blob))
    }

    /// Applies a session's aggregate: the metrics of who survived, the
    /// decoded mean (§3.4), the optimiser's step, then the round's records.
    #[allow(clippy::too_many_arguments)]
    async fn apply_aggregate(
        &mut self,
        round: u64,
        attempt: u32,
        n: u32,
        spec: &RoundSpec,
        agg: fedveil_secagg::Aggregate,
        mut metrics: RoundMetrics,
        started: Instant,
        charged: bool,
    ) -> Result<Ended, FedError> {
        let dim = self.state.params.len();
        metrics.survivors = agg.survivors.len() as u32;
        metrics.dropouts = agg
            .dropped
            .iter()
            .chain(&agg.late)
            .map(|(c, s)| Dropout {
                client: c.0,
                stage: stage_key(*s).to_string(),
            })
            .collect();
        let sum = Arc::new(agg.sum);
        self.events.emit(Event::Aggregated {
            round,
            survivors: agg.survivors.clone(),
            sum: Arc::clone(&sum),
            complaints: agg
                .complaints
                .iter()
                .map(|c| (c.reporter, c.accused))
                .collect(),
        });

        let t = Instant::now();
        let mut noise_rng = self
            .randomness
            .rng(Purpose::ServerNoise, round, attempt, 0)?;
        let mean = match encoding::decode(
            &spec.encoding,
            &sum,
            agg.survivors.len(),
            dim,
            &mut noise_rng,
        ) {
            Ok(mean) => mean,
            // What the sum holds is the clients' doing (one of them may
            // have forged its weight slot): this session ends, not the
            // federation. Masking hides which client it was.
            Err(FedError::Codec(e)) => {
                return self.aborted(metrics, started, Abort::Undecodable(e));
            }
            Err(e) => return Err(e),
        };
        self.state.optimizer.step(&mut self.state.params, &mean)?;
        if !charged && self.resolved.dp.is_some() {
            return Err(FedError::Internal(
                "a sum was unmasked without a privacy charge".into(),
            ));
        }
        metrics
            .stage_seconds
            .insert("aggregate".into(), t.elapsed().as_secs_f64());
        self.complete(round, n, metrics, started).await
    }

    /// Hands a member's SecAgg+ message to the session; an installed
    /// adversary sees it first, and `log` keeps it for one that takes the
    /// session over.
    pub(super) fn hand_over(
        &mut self,
        sa: &mut fedveil_secagg::Server,
        id: ClientId,
        msg: ClientMessage,
        log: Option<&mut Vec<(ClientId, ClientMessage)>>,
    ) {
        self.hooks.observe(id, &msg);
        if let Some(log) = log {
            log.push((id, msg.clone()));
        }
        if let Err(e) = sa.handle_message(self.now(), id, msg) {
            self.reject(id, e.to_string());
        }
    }
}
