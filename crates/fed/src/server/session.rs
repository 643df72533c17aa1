//! The secure session: one SecAgg+ session over the cohort's connections,
//! from the round specification to the unmasked sum (protocols/federation.md
//! §4; protocols/secagg-plus.md §6).

use super::*;
use fedveil_secagg::params;

/// A secure session in progress: what its loop keeps between messages.
struct Live {
    round: u64,
    attempt: u32,
    /// Sorted, so membership is a binary search.
    cohort: Vec<ClientId>,
    sa: fedveil_secagg::Server,
    started: Instant,
    /// The traffic counters when the session began.
    counters: (u64, u64),
    /// The stage being timed, since when, and the finished stages' seconds.
    stage: Option<Stage>,
    stage_started: Instant,
    seconds: BTreeMap<String, f64>,
    declined: Vec<u32>,
    /// With record-level DP: the ε each member reported (`Up::Spent`).
    spent: BTreeMap<u32, f64>,
    /// Whether the privacy charge for this session has been made.
    charged: bool,
    /// The stage an adversary takes the session over at, if any, and what
    /// the cohort sent until then.
    takeover: Option<Stage>,
    log: Vec<(ClientId, ClientMessage)>,
}

impl Live {
    fn in_cohort(&self, id: &ClientId) -> bool {
        self.cohort.binary_search(id).is_ok()
    }
}

impl Server {
    /// Runs one SecAgg+ session of `round` with `cohort`.
    pub(super) async fn session(
        &mut self,
        round: u64,
        attempt: u32,
        cohort: Vec<ClientId>,
    ) -> Result<Ended, FedError> {
        let started = Instant::now();
        let counters = self.counters.snapshot();
        let n = cohort.len() as u32;
        let (spec, blob) = self.round_spec(round, attempt, &cohort)?;
        if self.resolved.unprotected {
            return self
                .unprotected_session(round, attempt, cohort, spec, blob, started, counters)
                .await;
        }
        let sa = match fedveil_secagg::Server::new(
            spec.session.clone(),
            self.resolved.stage_deadlines,
        ) {
            Ok(sa) => sa,
            // The session's parameters follow from the cohort; a Poisson
            // sample can be too small for the configured threshold or
            // degree. Nothing was sent yet: this session is aborted and the
            // round tried again with a fresh sample.
            Err(e) => {
                let metrics = self.round_metrics(round, attempt, n, Vec::new(), counters);
                let reason = Abort::Unworkable { cohort: n, why: e };
                return self.aborted(metrics, started, reason);
            }
        };
        let mut live = Live {
            round,
            attempt,
            takeover: self.hooks.takeover(round, attempt),
            cohort,
            sa,
            started,
            counters,
            stage: None,
            stage_started: Instant::now(),
            seconds: BTreeMap::new(),
            declined: Vec::new(),
            spent: BTreeMap::new(),
            charged: false,
            log: Vec::new(),
        };
        self.send_setup(&mut live, &spec, &blob);
        loop {
            self.on_stage(&mut live).await?;
            if let Some(ended) = self.taken_over(&mut live).await? {
                return Ok(ended);
            }
            for (to, msg) in live.sa.drain_transmits() {
                if !self.send(to, Outbound::Frame(Down::Secagg(msg))) {
                    live.sa.drop_client(self.now(), to);
                }
            }
            if live.sa.outcome().is_some() {
                break;
            }
            if let Some(m) = self.next_inbound(&mut live).await? {
                self.route(&mut live, m);
            }
        }
        self.conclude(live, &spec).await
    }

    /// Announces the session and sends each member the round's
    /// specification with its parameters (the setup request).
    fn send_setup(&mut self, live: &mut Live, spec: &RoundSpec, blob: &Arc<Vec<u8>>) {
        let (round, attempt) = (live.round, live.attempt);
        tracing::info!(round, attempt, cohort = live.cohort.len(), "round started");
        self.events.emit(Event::RoundStarted {
            round,
            attempt,
            cohort: live.cohort.clone(),
        });
        let _ = self.expect.send(Some(Expect {
            session: live.sa.session_id(),
            bytes: packed_len(spec.session.dim as usize, spec.encoding.bits()),
        }));
        live.sa.start(self.now());
        for (to, msg) in live.sa.drain_transmits() {
            let delivered = match msg {
                ServerMessage::Setup(_) => match self.hooks.tampered(to, spec, blob) {
                    Some((s, b)) => self.send(
                        to,
                        Outbound::WithBlob(Down::Round(Box::new(s)), Arc::new(b)),
                    ),
                    None => self.send(
                        to,
                        Outbound::WithBlob(Down::Round(Box::new(spec.clone())), Arc::clone(blob)),
                    ),
                },
                other => self.send(to, Outbound::Frame(Down::Secagg(other))),
            };
            if !delivered {
                live.sa.drop_client(self.now(), to);
            }
        }
        live.stage = live.sa.stage();
        live.stage_started = Instant::now();
        if let Some(stage) = live.stage {
            self.events.emit(Event::StageStarted {
                round,
                attempt,
                stage,
            });
        }
    }

    /// Stage bookkeeping when the state machine has moved on: the finished
    /// stage's time, the new stage's event, and the privacy charge, which
    /// comes before anything can be unmasked (when the unmasking requests
    /// are about to go out or, if none was needed, when a sum exists).
    async fn on_stage(&mut self, live: &mut Live) -> Result<(), FedError> {
        let now = live.sa.stage();
        if now == live.stage {
            return Ok(());
        }
        if let Some(s) = live.stage {
            live.seconds.insert(
                stage_key(s).to_string(),
                live.stage_started.elapsed().as_secs_f64(),
            );
        }
        live.stage = now;
        live.stage_started = Instant::now();
        let unmasking = now == Some(Stage::Unmasking) || matches!(live.sa.outcome(), Some(Ok(_)));
        if unmasking && !live.charged {
            live.charged = true;
            self.charge(live.round, live.attempt, live.sa.survivors().len())
                .await?;
        }
        if let Some(stage) = now {
            self.events.emit(Event::StageStarted {
                round: live.round,
                attempt: live.attempt,
                stage,
            });
        }
        Ok(())
    }

    /// An adversary's takeover at this stage (the `adversary` feature):
    /// it plays the server from here, and the session is aborted.
    async fn taken_over(&mut self, live: &mut Live) -> Result<Option<Ended>, FedError> {
        #[cfg(feature = "adversary")]
        if let Some(s) = live.takeover
            && live.stage == Some(s)
        {
            let requests = live.sa.drain_transmits();
            let log = std::mem::take(&mut live.log);
            self.take_over(&live.sa, s, &live.cohort, requests, log)
                .await?;
            let _ = self.expect.send(None);
            let reason = Abort::TakenOver(s);
            for to in &live.cohort {
                let abort = ServerMessage::Abort {
                    session: live.sa.session_id(),
                    reason: reason.to_string(),
                };
                self.send(*to, Outbound::Frame(Down::Secagg(abort)));
            }
            let n = live.cohort.len() as u32;
            let declined = std::mem::take(&mut live.declined);
            let mut metrics =
                self.round_metrics(live.round, live.attempt, n, declined, live.counters);
            metrics.stage_seconds = std::mem::take(&mut live.seconds);
            return self.aborted(metrics, live.started, reason).map(Some);
        }
        let _ = live;
        Ok(None)
    }

    /// The next message from the hub, or `None` when the state machine's
    /// deadline passed first (it has handled the timeout).
    async fn next_inbound(&mut self, live: &mut Live) -> Result<Option<Inbound>, FedError> {
        let deadline = live
            .sa
            .poll_timeout()
            .map(|d| tokio::time::Instant::from_std(self.clock + d));
        let inbound = match deadline {
            Some(d) => match tokio::time::timeout_at(d, self.hub.recv()).await {
                Ok(m) => m,
                Err(_) => {
                    live.sa.handle_timeout(self.now());
                    return Ok(None);
                }
            },
            None => self.hub.recv().await,
        };
        inbound
            .map(Some)
            .ok_or_else(|| FedError::Internal("the connection hub closed".into()))
    }

    /// Takes one message into the session: a member's SecAgg+ message or
    /// masked input to the state machine, a decline or a departure as a
    /// dropout; anything else is rejected with the rule it broke.
    fn route(&mut self, live: &mut Live, m: Inbound) {
        let round = live.round;
        match self.hear(m) {
            // A reconnecting member lost its session state; a member that
            // left answers nothing more.
            Heard::Joined(id) | Heard::Left(id) => {
                if live.in_cohort(&id) {
                    live.sa.drop_client(self.now(), id);
                }
            }
            Heard::Up(id, up) => match up {
                Up::Secagg(msg) if live.in_cohort(&id) => {
                    if matches!(msg, ClientMessage::MaskedInput(_)) {
                        self.reject(id, "masked inputs travel as Masked with a blob".into());
                    } else {
                        self.hand_over(live, id, msg);
                    }
                }
                Up::Secagg(_) => self.reject(id, format!("{id} is not in round {round}'s cohort")),
                Up::Decline { round: r, reason } if r == round && live.in_cohort(&id) => {
                    tracing::info!(client = %id, round, "declined the round: {reason}");
                    live.declined.push(id.0);
                    live.sa.drop_client(self.now(), id);
                }
                Up::Decline { .. } => {}
                Up::Spent {
                    round: r,
                    attempt,
                    epsilon,
                } if r == round
                    && attempt == live.attempt
                    && live.in_cohort(&id)
                    && self.resolved.record.is_some() =>
                {
                    if epsilon.is_finite() && epsilon >= 0.0 {
                        live.spent.insert(id.0, epsilon);
                    } else {
                        self.reject(id, format!("a reported ε of {epsilon} is not an ε"));
                    }
                }
                Up::Spent { .. } => self.reject(
                    id,
                    format!(
                        "a privacy report that is not for session {} of round {round}",
                        live.attempt + 1
                    ),
                ),
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
            Heard::Masked(id, input) if live.in_cohort(&id) => {
                self.hand_over(live, id, ClientMessage::MaskedInput(input));
            }
            Heard::Masked(id, _) => {
                self.reject(id, format!("{id} is not in round {round}'s cohort"))
            }
            Heard::Nothing => {}
        }
    }

    /// The session's outcome: aborted with its reason, or the aggregate
    /// applied.
    async fn conclude(&mut self, mut live: Live, spec: &RoundSpec) -> Result<Ended, FedError> {
        let _ = self.expect.send(None);
        let outcome = live
            .sa
            .take_outcome()
            .ok_or_else(|| FedError::Internal("the session ended without an outcome".into()))?;
        let n = live.cohort.len() as u32;
        let mut metrics =
            self.round_metrics(live.round, live.attempt, n, live.declined, live.counters);
        metrics.stage_seconds = live.seconds;
        // A client reports when it reveals its shares: spent, whether or not
        // the session then completes.
        self.state.ledger.hear_clients(&live.spent);
        metrics.client_epsilon = live.spent;
        let agg = match outcome {
            Err(reason) => return self.aborted(metrics, live.started, reason.into()),
            Ok(agg) => agg,
        };
        self.apply_aggregate(
            live.round,
            live.attempt,
            n,
            spec,
            agg,
            metrics,
            live.started,
            live.charged,
        )
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
    /// Gives a member's message to the state machine (an adversary's hooks
    /// see it first); a message it refuses is rejected with the rule broken.
    fn hand_over(&mut self, live: &mut Live, id: ClientId, msg: ClientMessage) {
        self.hooks.observe(id, &msg);
        if live.takeover.is_some() {
            live.log.push((id, msg.clone()));
        }
        if let Err(e) = live.sa.handle_message(self.now(), id, msg) {
            self.reject(id, e.to_string());
        }
    }
}
