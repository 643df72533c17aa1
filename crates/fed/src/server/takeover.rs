//! A session taken over by an installed adversary (fed's `adversary`
//! feature only): the adversary plays on a blocking thread and this relays
//! its batches over the cohort's connections.

use super::*;
use crate::adversary::{Ask, RelayLink, View};

impl Server {
    /// Hands a session to the adversary at `stage` and relays its batches
    /// to the cohort until it is done.
    pub(super) async fn take_over(
        &mut self,
        sa: &fedveil_secagg::Server,
        stage: Stage,
        cohort: &[ClientId],
        requests: Vec<(ClientId, ServerMessage)>,
        log: Vec<(ClientId, ClientMessage)>,
    ) -> Result<(), FedError> {
        let Some(mut adversary) = self.hooks.adversary.take() else {
            return Ok(());
        };
        tracing::warn!(%stage, "an adversary takes the session over");
        let view = View {
            session: sa.session_id(),
            bits: sa.params().bits,
            threshold: sa.params().threshold,
            members: cohort.to_vec(),
            neighbours: cohort
                .iter()
                .map(|c| (*c, sa.neighbours_of(*c).unwrap_or_default()))
                .collect(),
            log,
        };
        let (tx, mut asks) = mpsc::unbounded_channel();
        let player = tokio::task::spawn_blocking(move || {
            let mut link = RelayLink { tx };
            adversary.play(view, requests, &mut link);
            adversary
        });
        let wait = self.resolved.stage_deadlines.get(stage);
        // The link closes when the adversary is done.
        while let Some(Ask { msgs, reply }) = asks.recv().await {
            let answers = self.relay(msgs, cohort, wait).await;
            let _ = reply.send(answers);
        }
        let adversary = player
            .await
            .map_err(|e| FedError::Internal(format!("the adversary failed: {e}")))?;
        self.hooks.adversary = Some(adversary);
        Ok(())
    }

    /// Sends an adversary's batch and collects one answer per message
    /// (a client that refuses sends none), for at most `wait`.
    pub(super) async fn relay(
        &mut self,
        msgs: Vec<(ClientId, ServerMessage)>,
        cohort: &[ClientId],
        wait: Duration,
    ) -> Vec<(ClientId, ClientMessage)> {
        let mut pending: BTreeMap<ClientId, usize> = BTreeMap::new();
        for (to, msg) in msgs {
            if cohort.contains(&to) && self.send(to, Outbound::Frame(Down::Secagg(msg))) {
                *pending.entry(to).or_default() += 1;
            }
        }
        let until = tokio::time::Instant::now() + wait;
        let mut answers = Vec::new();
        while !pending.is_empty() {
            let Ok(Some(m)) = tokio::time::timeout_at(until, self.hub.recv()).await else {
                break;
            };
            match self.hear(m) {
                // A member that reconnected or left answers nothing more.
                Heard::Joined(id) | Heard::Left(id) => {
                    pending.remove(&id);
                }
                Heard::Up(id, Up::Secagg(msg)) => {
                    if let Some(left) = pending.get_mut(&id) {
                        answers.push((id, msg));
                        *left -= 1;
                        if *left == 0 {
                            pending.remove(&id);
                        }
                    }
                }
                _ => {}
            }
        }
        answers
    }
}
