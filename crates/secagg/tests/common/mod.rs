//! A deterministic federation for tests: the library's [`Cohort`] driver
//! with random inputs in the ring, the inputs kept for checking sums, and
//! every client message logged. Tests play the malicious server by taking
//! the server's messages from the cohort, editing or replacing them, and
//! delivering them.

#![allow(dead_code)]

use std::ops::{Deref, DerefMut};

use fedveil_secagg::messages::{ClientMessage, ServerMessage};
use fedveil_secagg::server::Aggregate;
use fedveil_secagg::sim::{Cohort, CohortSpec};
use fedveil_secagg::{AbortReason, ClientId, Stage};

pub struct Fed {
    pub cohort: Cohort,
    pub inputs: Vec<Vec<u32>>,
}

impl Deref for Fed {
    type Target = Cohort;
    fn deref(&self) -> &Cohort {
        &self.cohort
    }
}

impl DerefMut for Fed {
    fn deref_mut(&mut self) -> &mut Cohort {
        &mut self.cohort
    }
}

impl Fed {
    /// `n` clients with ids `0..n` and random inputs in `Z_2^bits`.
    pub fn new(n: u32, degree: u32, threshold: u32, dim: u32, bits: u8, seed: u64) -> Fed {
        Self::with_context(n, degree, threshold, dim, bits, seed, |_| [7u8; 32])
    }

    /// Like [`Fed::new`], with each client's own context (model hash); the
    /// session's context is `[7; 32]`.
    pub fn with_context(
        n: u32,
        degree: u32,
        threshold: u32,
        dim: u32,
        bits: u8,
        seed: u64,
        context_of: impl Fn(ClientId) -> [u8; 32],
    ) -> Fed {
        Self::build(n, degree, threshold, dim, bits, seed, 1, context_of)
    }

    /// Like [`Fed::new`], with a floor on the number of survivors.
    pub fn with_floor(
        n: u32,
        degree: u32,
        threshold: u32,
        dim: u32,
        seed: u64,
        min_survivors: u32,
    ) -> Fed {
        Self::build(n, degree, threshold, dim, 32, seed, min_survivors, |_| {
            [7u8; 32]
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        n: u32,
        degree: u32,
        threshold: u32,
        dim: u32,
        bits: u8,
        seed: u64,
        min_survivors: u32,
        context_of: impl Fn(ClientId) -> [u8; 32],
    ) -> Fed {
        let spec = CohortSpec {
            clients: n,
            degree,
            threshold,
            dim,
            bits,
            seed,
            context: [7u8; 32],
            min_survivors,
        };
        let (mut cohort, inputs) = spec
            .build(|c| Some(context_of(c)))
            .expect("valid parameters");
        cohort.enable_log();
        Fed { cohort, inputs }
    }

    /// Runs until the server has an outcome.
    pub fn run(&mut self) -> Result<Aggregate, AbortReason> {
        self.cohort.run().expect("the session runs")
    }

    /// Runs honestly until the server has just sent the requests of `stage`.
    pub fn run_until(&mut self, stage: Stage) -> Vec<(ClientId, ServerMessage)> {
        self.cohort.run_until(stage).expect("reached the stage")
    }

    /// The server's pending messages.
    pub fn take_outbox(&mut self) -> Vec<(ClientId, ServerMessage)> {
        self.cohort.take_outbox().expect("encodes")
    }

    /// Delivers a batch and feeds the answers to the server.
    pub fn exchange(&mut self, batch: Vec<(ClientId, ServerMessage)>) {
        self.cohort.exchange(batch).expect("encodes")
    }

    /// Every message clients sent, as the server saw it.
    pub fn sent(&self) -> &[(ClientId, ClientMessage)] {
        &self.cohort.log
    }

    /// The exact ring sum of the given clients' inputs.
    pub fn sum_of(&self, who: &[ClientId]) -> Vec<u32> {
        let bits = self.params.bits;
        let mask = if bits == 32 {
            u32::MAX
        } else {
            (1u32 << bits) - 1
        };
        let mut acc = vec![0u32; self.params.dim as usize];
        for c in who {
            for (a, x) in acc.iter_mut().zip(&self.inputs[c.0 as usize]) {
                *a = a.wrapping_add(*x);
            }
        }
        acc.iter().map(|v| v & mask).collect()
    }

    pub fn neighbours(&self, c: ClientId) -> Vec<ClientId> {
        self.server.neighbours_of(c).expect("in roster")
    }
}
