//! The connection registry and cohort selection: who is connected, who
//! is picked for a session, and what happens to messages between sessions.

use super::*;

/// A message from the hub once the registry has taken it in.
pub(super) enum Heard {
    /// A client connected, or reconnected: whatever session state its
    /// earlier connection had is lost.
    Joined(ClientId),
    /// A client's current connection ended.
    Left(ClientId),
    /// A frame from a client's current connection.
    Up(ClientId, Up),
    /// A masked input from a client's current connection.
    Masked(ClientId, MaskedInput),
    /// An unprotected round's raw update from a client's current
    /// connection.
    Update {
        id: ClientId,
        round: u64,
        attempt: u32,
        samples: u64,
        data: Vec<u8>,
    },
    /// Nothing to act on: the end of, or a message from, a connection a
    /// newer one has replaced.
    Nothing,
}

impl Server {
    pub(super) async fn wait_for_clients(&mut self) -> Result<(), FedError> {
        let need = self.resolved.min_clients as usize;
        let until = tokio::time::Instant::now() + self.resolved.wait;
        let mut reported = usize::MAX;
        while self.conns.len() < need {
            if reported != self.conns.len() {
                reported = self.conns.len();
                self.events.emit(Event::WaitingForClients {
                    connected: reported as u32,
                    needed: need as u32,
                });
            }
            match tokio::time::timeout_at(until, self.hub.recv()).await {
                Err(_) => {
                    return Err(FedError::Stopped(format!(
                        "waited {:?} for {need} clients; {} connected",
                        self.resolved.wait,
                        self.conns.len()
                    )));
                }
                Ok(None) => return Err(FedError::Internal("the connection hub closed".into())),
                Ok(Some(m)) => self.between_sessions(m),
            }
        }
        Ok(())
    }

    pub(super) fn select_cohort(
        &self,
        round: u64,
        attempt: u32,
    ) -> Result<Vec<ClientId>, FedError> {
        let mut rng = self.randomness.rng(Purpose::Cohort, round, attempt, 0)?;
        let connected: Vec<ClientId> = self.conns.keys().copied().collect();
        let mut cohort = match self.resolved.cohort {
            CohortRule::Fixed(n) => {
                let mut pool = connected;
                let n = (n as usize).min(pool.len());
                for i in 0..n {
                    let j = i + (rng.next_u64() % (pool.len() - i) as u64) as usize;
                    pool.swap(i, j);
                }
                pool.truncate(n);
                pool
            }
            CohortRule::Poisson(q) => {
                // Every client of the population is sampled, connected or
                // not, so that the sampling is what the accountant assumes;
                // the sampled clients that are not connected drop out.
                let sampled: Vec<ClientId> = self
                    .keys
                    .keys()
                    .copied()
                    .filter(|_| ((rng.next_u64() >> 11) as f64) < q * (1u64 << 53) as f64)
                    .collect();
                sampled
                    .into_iter()
                    .filter(|c| self.conns.contains_key(c))
                    .collect()
            }
        };
        cohort.sort();
        Ok(cohort)
    }

    /// Queues a message for a client; false if it is not connected or its
    /// queue is full (it does not read what it is sent).
    pub(super) fn send(&self, to: ClientId, out: Outbound) -> bool {
        self.conns
            .get(&to)
            .is_some_and(|c| c.tx.try_send(out).is_ok())
    }

    /// Refuses a client's message. The refusal is dropped if the client's
    /// queue is full; a client that reaches `max_violations` refusals in one
    /// session window is disconnected.
    pub(super) fn reject(&mut self, to: ClientId, reason: String) {
        let max = self.shared.limits.max_violations;
        let Some(c) = self.conns.get_mut(&to) else {
            return;
        };
        c.violations = c.violations.saturating_add(1);
        if c.violations == max {
            let why = format!("{max} rejected messages; the last: {reason}");
            tracing::info!(client = %to, "disconnecting: {why}");
            c.conn.close(CLOSE_PROTOCOL.into(), why.as_bytes());
            self.events.emit(Event::Rejected {
                client: to,
                reason: why,
            });
            return;
        }
        if c.violations > max {
            return;
        }
        tracing::debug!(client = %to, "rejected: {reason}");
        let refusal = Outbound::Frame(Down::Rejected {
            reason: reason.clone(),
        });
        if c.tx.try_send(refusal).is_ok() {
            self.events.emit(Event::Rejected { client: to, reason });
        }
    }

    /// Registers a client's connection and welcomes it.
    pub(super) fn hello(
        &mut self,
        id: ClientId,
        generation: u64,
        tx: mpsc::Sender<Outbound>,
        conn: fedveil_net::quinn::Connection,
    ) {
        let welcome = Down::Welcome {
            federation: self.state.federation,
            client: id,
            round: self.state.completed,
        };
        let _ = tx.try_send(Outbound::Frame(welcome));
        // A newer connection replaces an older one, whose writer ends when
        // its sender is dropped here.
        self.conns.insert(
            id,
            Conn {
                generation,
                tx,
                conn,
                violations: 0,
            },
        );
        tracing::debug!(client = %id, "connected");
        self.events.emit(Event::Connected(id));
    }

    /// Unregisters a connection; false if a newer one had replaced it.
    pub(super) fn gone(&mut self, id: ClientId, generation: u64, reason: String) -> bool {
        if self
            .conns
            .get(&id)
            .is_some_and(|c| c.generation == generation)
        {
            self.conns.remove(&id);
            tracing::debug!(client = %id, "disconnected: {reason}");
            self.events.emit(Event::Disconnected { client: id, reason });
            true
        } else {
            false
        }
    }

    /// Whether `generation` is `id`'s current connection.
    pub(super) fn is_current(&self, id: ClientId, generation: u64) -> bool {
        self.conns
            .get(&id)
            .is_some_and(|c| c.generation == generation)
    }

    /// Takes a message from the hub into the registry (a connection that
    /// arrives or leaves) and says what is left for the session to act on:
    /// only messages from a client's current connection get through.
    pub(super) fn hear(&mut self, m: Inbound) -> Heard {
        match m {
            Inbound::Hello {
                id,
                generation,
                tx,
                conn,
            } => {
                self.hello(id, generation, tx, conn);
                Heard::Joined(id)
            }
            Inbound::Gone {
                id,
                generation,
                reason,
            } => {
                if self.gone(id, generation, reason) {
                    Heard::Left(id)
                } else {
                    Heard::Nothing
                }
            }
            Inbound::Up { id, generation, up } if self.is_current(id, generation) => {
                Heard::Up(id, up)
            }
            Inbound::Masked {
                id,
                generation,
                input,
            } if self.is_current(id, generation) => Heard::Masked(id, input),
            Inbound::Update {
                id,
                generation,
                round,
                attempt,
                samples,
                data,
            } if self.is_current(id, generation) => Heard::Update {
                id,
                round,
                attempt,
                samples,
                data,
            },
            Inbound::Up { .. } | Inbound::Masked { .. } | Inbound::Update { .. } => Heard::Nothing,
        }
    }

    /// Handles a message while no session runs.
    pub(super) fn between_sessions(&mut self, m: Inbound) {
        match self.hear(m) {
            // A late report of a session that concluded without it.
            Heard::Up(_, Up::Decline { .. } | Up::Spent { .. })
            | Heard::Joined(_)
            | Heard::Left(_)
            | Heard::Nothing => {}
            Heard::Up(id, _) | Heard::Masked(id, _) | Heard::Update { id, .. } => {
                self.reject(id, "no session is running".into());
            }
        }
    }
}
