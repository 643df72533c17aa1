//! Dealing a dataset out to a federation's clients.
//!
//! - `iid`: a uniform random partition into near-equal parts (sizes differ
//!   by at most one);
//! - `dirichlet`: FederatedScope's label-skew split (its `lda` splitter):
//!   for each category, the proportions going to each client are drawn from
//!   Dirichlet(α, …, α), and the draw is repeated until every client holds
//!   at least `min_size` records. Small α concentrates each category on few
//!   clients; large α approaches `iid`;
//! - `meta`: by category. FS-LLM's meta splitter gives each category its
//!   own client and ignores the client count; here categories are merged
//!   (largest first, onto the client holding least) when there are more
//!   categories than clients, and the largest categories are divided among
//!   several clients when there are fewer, so that there are always exactly
//!   `clients` parts.
//!
//! Every split is a partition of the records (each index exactly once) and
//! a function of the records' categories, the client count and the seed.

use std::collections::BTreeMap;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{DataError, Record, Result};

/// How many Dirichlet draws `dirichlet` tries before giving up on
/// `min_size`.
const MAX_DRAWS: usize = 1000;

/// A splitter and its settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Splitter {
    Iid,
    Dirichlet {
        alpha: f64,
        /// Every client gets at least this many records.
        #[serde(default = "one")]
        min_size: usize,
    },
    Meta,
}

fn one() -> usize {
    1
}

/// Record indices per client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub clients: Vec<Vec<usize>>,
}

impl Splitter {
    /// `iid`, `meta`, or `dirichlet` with its α.
    pub fn name(&self) -> String {
        match self {
            Splitter::Iid => "iid".into(),
            Splitter::Dirichlet { alpha, .. } => format!("dirichlet (α = {alpha})"),
            Splitter::Meta => "meta".into(),
        }
    }

    /// Splits `records` into `clients` parts, drawing from a generator
    /// seeded with `seed`.
    pub fn split(&self, records: &[Record], clients: usize, seed: u64) -> Result<Split> {
        let n = records.len();
        if clients == 0 {
            return Err(DataError::Config(
                "a split needs at least one client".into(),
            ));
        }
        if n < clients {
            return Err(DataError::Config(format!(
                "{n} records cannot be split among {clients} clients (each needs at least one)"
            )));
        }
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut parts = match self {
            Splitter::Iid => {
                let mut order: Vec<usize> = (0..n).collect();
                shuffle(&mut order, &mut rng);
                (0..clients)
                    .map(|i| order[i * n / clients..(i + 1) * n / clients].to_vec())
                    .collect()
            }
            Splitter::Dirichlet { alpha, min_size } => {
                if !(alpha.is_finite() && *alpha > 0.0) {
                    return Err(DataError::Config(format!(
                        "dirichlet alpha must be positive, got {alpha}"
                    )));
                }
                if n < clients * min_size {
                    return Err(DataError::Config(format!(
                        "{n} records cannot give {clients} clients {min_size} each"
                    )));
                }
                dirichlet(records, clients, *alpha, *min_size, &mut rng)?
            }
            Splitter::Meta => meta(records, clients, &mut rng),
        };
        for part in &mut parts {
            shuffle(part, &mut rng);
        }
        Ok(Split { clients: parts })
    }
}

/// Records grouped by category: (category, indices), categories sorted.
fn by_category(records: &[Record]) -> Vec<(String, Vec<usize>)> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        groups.entry(r.category.as_str()).or_default().push(i);
    }
    groups
        .into_iter()
        .map(|(c, v)| (c.to_string(), v))
        .collect()
}

fn dirichlet(
    records: &[Record],
    clients: usize,
    alpha: f64,
    min_size: usize,
    rng: &mut ChaCha20Rng,
) -> Result<Vec<Vec<usize>>> {
    let groups = by_category(records);
    for _ in 0..MAX_DRAWS {
        let mut parts = vec![Vec::new(); clients];
        for (_, indices) in &groups {
            let mut idx = indices.clone();
            shuffle(&mut idx, rng);
            let p = dirichlet_draw(clients, alpha, rng);
            // Cut points at the cumulative proportions, as numpy's
            // `(cumsum(p) · len).astype(int)`.
            let mut start = 0;
            let mut cum = 0.0;
            for (j, part) in parts.iter_mut().enumerate() {
                cum += p[j];
                let end = if j + 1 == clients {
                    idx.len()
                } else {
                    ((cum * idx.len() as f64) as usize).clamp(start, idx.len())
                };
                part.extend_from_slice(&idx[start..end]);
                start = end;
            }
        }
        if parts.iter().all(|p| p.len() >= min_size) {
            return Ok(parts);
        }
    }
    Err(DataError::Config(format!(
        "{MAX_DRAWS} Dirichlet draws with alpha {alpha} all left a client with fewer than \
         {min_size} records; raise alpha, lower min_size or use fewer clients"
    )))
}

fn meta(records: &[Record], clients: usize, rng: &mut ChaCha20Rng) -> Vec<Vec<usize>> {
    let mut groups = by_category(records);
    if groups.len() >= clients {
        // Merge: largest category first, onto the client holding least.
        groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); clients];
        for (_, indices) in groups {
            let (j, _) = parts
                .iter()
                .enumerate()
                .min_by_key(|(j, p)| (p.len(), *j))
                .unwrap_or((0, &Vec::new()));
            parts[j].extend(indices);
        }
        return parts;
    }
    // Divide: every category gets a client; each further client goes to
    // the category with the most records per client.
    let mut alloc = vec![1usize; groups.len()];
    for _ in groups.len()..clients {
        let best = (0..groups.len())
            .max_by(|&a, &b| {
                let ra = groups[a].1.len() as f64 / alloc[a] as f64;
                let rb = groups[b].1.len() as f64 / alloc[b] as f64;
                ra.total_cmp(&rb).then(b.cmp(&a))
            })
            .unwrap_or(0);
        alloc[best] += 1;
    }
    let mut parts = Vec::with_capacity(clients);
    for ((_, indices), k) in groups.iter_mut().zip(alloc) {
        shuffle(indices, rng);
        let n = indices.len();
        for i in 0..k {
            parts.push(indices[i * n / k..(i + 1) * n / k].to_vec());
        }
    }
    parts
}

/// A draw from Dirichlet(α, …, α) over `k` outcomes, computed from log
/// gamma variates so that a tiny α does not underflow to all zeros.
fn dirichlet_draw(k: usize, alpha: f64, rng: &mut ChaCha20Rng) -> Vec<f64> {
    let logs: Vec<f64> = (0..k).map(|_| log_gamma_variate(alpha, rng)).collect();
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|x| x / sum).collect()
}

/// `ln X` for `X ~ Gamma(a, 1)`: Marsaglia and Tsang's method, with
/// `X = Y · U^{1/a}`, `Y ~ Gamma(a + 1)`, for `a < 1`.
fn log_gamma_variate(a: f64, rng: &mut ChaCha20Rng) -> f64 {
    if a < 1.0 {
        let u = open_unit(rng);
        return log_gamma_variate(a + 1.0, rng) + u.ln() / a;
    }
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = open_unit(rng);
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return (d * v).ln();
        }
    }
}

/// Uniform on (0, 1].
fn open_unit(rng: &mut ChaCha20Rng) -> f64 {
    ((rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn standard_normal(rng: &mut ChaCha20Rng) -> f64 {
    let (u, v) = (open_unit(rng), open_unit(rng));
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Fisher–Yates with unbiased bounded draws.
fn shuffle<T>(items: &mut [T], rng: &mut ChaCha20Rng) {
    for i in (1..items.len()).rev() {
        let n = i as u64 + 1;
        let zone = u64::MAX - u64::MAX % n;
        let j = loop {
            let x = rng.next_u64();
            if x < zone {
                break (x % n) as usize;
            }
        };
        items.swap(i, j);
    }
}

impl Split {
    /// Records per client.
    pub fn sizes(&self) -> Vec<usize> {
        self.clients.iter().map(Vec::len).collect()
    }

    /// Per client, records per category.
    pub fn histograms(&self, records: &[Record]) -> Vec<BTreeMap<String, usize>> {
        self.clients
            .iter()
            .map(|part| {
                let mut h = BTreeMap::new();
                for &i in part {
                    if let Some(r) = records.get(i) {
                        *h.entry(r.category.clone()).or_insert(0) += 1;
                    }
                }
                h
            })
            .collect()
    }

    /// The records of client `i`.
    pub fn records<'a>(&self, records: &'a [Record], i: usize) -> Vec<&'a Record> {
        self.clients
            .get(i)
            .map(|part| part.iter().filter_map(|&j| records.get(j)).collect())
            .unwrap_or_default()
    }

    /// A table of each client's size and categories (most frequent first).
    pub fn report(&self, records: &[Record]) -> String {
        const SHOWN: usize = 4;
        let mut out = String::from("client  records  categories\n");
        for (i, h) in self.histograms(records).iter().enumerate() {
            let mut cats: Vec<(&String, &usize)> = h.iter().collect();
            cats.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
            let mut shown: Vec<String> = cats
                .iter()
                .take(SHOWN)
                .map(|(c, n)| {
                    let name = if c.is_empty() { "(none)" } else { c.as_str() };
                    format!("{name} {n}")
                })
                .collect();
            if cats.len() > SHOWN {
                shown.push(format!("… {} more", cats.len() - SHOWN));
            }
            out.push_str(&format!(
                "{i:>6}  {:>7}  {}\n",
                self.clients[i].len(),
                shown.join(", ")
            ));
        }
        out
    }
}
