//! The communication graph (§3): a k-regular Harary graph whose vertex labels
//! are permuted by a seed derived from the session id.
//!
//! The session id commits to the roster, the parameters and the server's
//! nonce before any client generates keys, and the permutation is a
//! deterministic function of it. So the server fixes the graph before it sees
//! a single key, and every client recomputes its own neighbourhood instead of
//! trusting the server's word for it.
//!
//! Harary graph `H(k, n)` on ring positions `0..n`: position `p` is adjacent to
//! `p ± 1, …, p ± ⌊k/2⌋` (mod n), and for odd `k` (even `n`) also to
//! `p + n/2`. Client at roster index `i` sits at position `π(i)`.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::crypto::CryptoFailure;
use crate::crypto::kdf::{self, label};
use crate::{ClientId, SessionId, SessionParams};

/// Neighbourhoods of every client, by roster index.
#[derive(Debug, Clone)]
pub struct Graph {
    n: usize,
    k: usize,
    complete: bool,
    /// position -> roster index
    at: Vec<u32>,
    /// roster index -> position
    pos: Vec<u32>,
}

/// An unbiased integer in `0..bound` (bound > 0), by rejection sampling on
/// 64-bit words (§3.1).
fn uniform_below(rng: &mut ChaCha20Rng, bound: u64) -> u64 {
    // Reject the top `2^64 mod bound` values so that every residue is equally likely.
    let zone = u64::MAX - (u64::MAX % bound + 1) % bound;
    loop {
        let v = rng.next_u64();
        if v <= zone {
            return v % bound;
        }
    }
}

impl Graph {
    /// Builds the graph of a validated session.
    pub fn new(params: &SessionParams, session: &SessionId) -> Result<Graph, CryptoFailure> {
        let n = params.clients();
        let k = params.effective_degree() as usize;
        let complete = params.is_complete();
        let mut at: Vec<u32> = (0..n as u32).collect();
        if !complete {
            let seed = kdf::derive::<32>(&session.0, session, label::GRAPH, &[])?;
            let mut rng = ChaCha20Rng::from_seed(*seed);
            // Fisher–Yates, from the last position down.
            for i in (1..n).rev() {
                let j = uniform_below(&mut rng, i as u64 + 1) as usize;
                at.swap(i, j);
            }
        }
        let mut pos = vec![0u32; n];
        for (p, &i) in at.iter().enumerate() {
            pos[i as usize] = p as u32;
        }
        Ok(Graph {
            n,
            k,
            complete,
            at,
            pos,
        })
    }

    /// The number of clients.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the graph has no clients.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The degree of every vertex.
    pub fn degree(&self) -> usize {
        self.k
    }

    /// The roster indices adjacent to roster index `i`, sorted.
    pub fn neighbours_of_index(&self, i: usize) -> Vec<u32> {
        if i >= self.n {
            return Vec::new();
        }
        let mut out: Vec<u32> = if self.complete {
            (0..self.n as u32).filter(|&j| j as usize != i).collect()
        } else {
            let p = self.pos[i] as usize;
            let n = self.n;
            let mut v = Vec::with_capacity(self.k);
            for d in 1..=self.k / 2 {
                v.push(self.at[(p + d) % n]);
                v.push(self.at[(p + n - d) % n]);
            }
            if self.k % 2 == 1 {
                v.push(self.at[(p + n / 2) % n]);
            }
            v
        };
        out.sort_unstable();
        out
    }

    /// The neighbours of `id` in `params`' roster, sorted by id.
    pub fn neighbours(&self, params: &SessionParams, id: ClientId) -> Option<Vec<ClientId>> {
        let i = params.index_of(id)?;
        Some(
            self.neighbours_of_index(i)
                .into_iter()
                .filter_map(|j| params.roster.get(j as usize).map(|e| e.id))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::identity::IdentityPublic;
    use crate::params::RosterEntry;

    fn params(n: u32, k: u32) -> SessionParams {
        SessionParams {
            version: crate::PROTOCOL_VERSION,
            nonce: [4; 32],
            round: 0,
            context: [0; 32],
            dim: 1,
            bits: 32,
            degree: k,
            threshold: k.min(n - 1) / 2 + 1,
            min_survivors: 1,
            roster: (0..n)
                .map(|i| RosterEntry {
                    id: ClientId(i + 100),
                    identity: IdentityPublic([0; 32]),
                })
                .collect(),
        }
    }

    #[test]
    fn harary_graphs_are_regular_symmetric_and_seeded() {
        for (n, k) in [
            (10, 4),
            (10, 3),
            (11, 6),
            (50, 7 + 1),
            (200, 30),
            (8, 7),
            (9, 20),
        ] {
            let p = params(n, k);
            p.validate().unwrap();
            let g = Graph::new(&p, &p.session_id()).unwrap();
            let k_eff = p.effective_degree() as usize;
            for i in 0..n as usize {
                let nb = g.neighbours_of_index(i);
                assert_eq!(nb.len(), k_eff, "n={n} k={k} i={i}");
                assert!(!nb.contains(&(i as u32)));
                assert!(nb.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
                for j in nb {
                    assert!(
                        g.neighbours_of_index(j as usize).contains(&(i as u32)),
                        "symmetric"
                    );
                }
            }
        }
        // A different nonce (so a different session id) permutes the graph.
        let p1 = params(100, 10);
        let mut p2 = p1.clone();
        p2.nonce[0] ^= 1;
        let g1 = Graph::new(&p1, &p1.session_id()).unwrap();
        let g2 = Graph::new(&p2, &p2.session_id()).unwrap();
        let differ = (0..100)
            .filter(|&i| g1.neighbours_of_index(i) != g2.neighbours_of_index(i))
            .count();
        assert!(differ > 90, "only {differ} neighbourhoods changed");
        // The same session id gives the same graph.
        let again = Graph::new(&p1, &p1.session_id()).unwrap();
        assert!((0..100).all(|i| g1.neighbours_of_index(i) == again.neighbours_of_index(i)));
    }

    #[test]
    fn uniform_below_is_unbiased_on_small_bounds() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            counts[uniform_below(&mut rng, 3) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }
}
