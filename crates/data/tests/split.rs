//! The splitters: every split is a partition with the promised sizes, the
//! same seed gives the same split, and α controls the label skew.

use std::collections::BTreeSet;

use fedveil_data::{Record, Splitter};

/// `per` records in each of `categories` categories.
fn dataset(categories: usize, per: usize) -> Vec<Record> {
    let mut out = Vec::new();
    for c in 0..categories {
        for i in 0..per {
            out.push(Record {
                instruction: format!("q{c}-{i}"),
                input: String::new(),
                output: format!("a{c}-{i}"),
                category: format!("cat{c:02}"),
                test: String::new(),
                ..Default::default()
            });
        }
    }
    out
}

fn assert_partition(parts: &[Vec<usize>], n: usize) {
    let mut seen = BTreeSet::new();
    for p in parts {
        for &i in p {
            assert!(i < n, "index {i} out of range");
            assert!(seen.insert(i), "index {i} given twice");
        }
    }
    assert_eq!(seen.len(), n, "some records were given to nobody");
}

#[test]
fn every_splitter_partitions_and_is_reproducible() {
    let records = dataset(7, 31);
    let splitters = [
        Splitter::Iid,
        Splitter::Dirichlet {
            alpha: 0.5,
            min_size: 2,
        },
        Splitter::Meta,
    ];
    for s in &splitters {
        // Fifty clients over 217 records and seven categories is beyond a
        // Dirichlet draw that leaves everyone two records.
        let counts: &[usize] = match s {
            Splitter::Dirichlet { .. } => &[1, 3, 7, 10],
            _ => &[1, 3, 7, 10, 50],
        };
        for &clients in counts {
            let a = s.split(&records, clients, 11).unwrap();
            assert_eq!(a.clients.len(), clients, "{} with {clients}", s.name());
            assert_partition(&a.clients, records.len());
            assert!(
                a.sizes().iter().all(|&n| n >= 1),
                "{}: an empty client",
                s.name()
            );
            let b = s.split(&records, clients, 11).unwrap();
            assert_eq!(a, b, "{}: same seed, different split", s.name());
        }
        let a = s.split(&records, 5, 1).unwrap();
        let b = s.split(&records, 5, 2).unwrap();
        assert_ne!(a, b, "{}: the seed changes nothing", s.name());
    }
}

#[test]
fn iid_sizes_differ_by_at_most_one() {
    let records = dataset(3, 34); // 102 records
    let split = Splitter::Iid.split(&records, 10, 5).unwrap();
    let sizes = split.sizes();
    let (min, max) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
    assert!(max - min <= 1, "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 102);
}

#[test]
fn meta_merges_and_divides_to_honour_the_client_count() {
    let records = dataset(6, 20);
    // As many clients as categories: one category each.
    let split = Splitter::Meta.split(&records, 6, 0).unwrap();
    for h in split.histograms(&records) {
        assert_eq!(h.len(), 1, "{h:?}");
    }
    // Fewer clients: categories merge whole, and the sizes stay balanced.
    let split = Splitter::Meta.split(&records, 4, 0).unwrap();
    let hists = split.histograms(&records);
    for h in &hists {
        assert!(h.values().all(|&n| n == 20), "a category was cut: {h:?}");
    }
    let sizes = split.sizes();
    assert_eq!(sizes.iter().sum::<usize>(), 120);
    assert!(sizes.iter().all(|&n| n == 20 || n == 40), "{sizes:?}");
    // More clients: each client holds one category only.
    let split = Splitter::Meta.split(&records, 15, 0).unwrap();
    assert_eq!(split.clients.len(), 15);
    for h in split.histograms(&records) {
        assert_eq!(h.len(), 1, "a divided client mixes categories: {h:?}");
    }
    // Unequal categories: the big one is divided first.
    let mut records = dataset(1, 90);
    records.extend(dataset(2, 10).into_iter().skip(10).map(|mut r| {
        r.category = "small".into();
        r
    }));
    let split = Splitter::Meta.split(&records, 4, 0).unwrap();
    let hists = split.histograms(&records);
    let big = hists.iter().filter(|h| h.contains_key("cat00")).count();
    assert_eq!(big, 3, "{hists:?}");
}

/// The mean share of a client's records in its most frequent category.
fn skew(records: &[Record], split: &fedveil_data::Split) -> f64 {
    let hists = split.histograms(records);
    let shares: Vec<f64> = hists
        .iter()
        .map(|h| {
            let total: usize = h.values().sum();
            *h.values().max().unwrap() as f64 / total as f64
        })
        .collect();
    shares.iter().sum::<f64>() / shares.len() as f64
}

#[test]
fn dirichlet_alpha_controls_the_skew() {
    let records = dataset(10, 100);
    let mean_skew = |alpha: f64| {
        let s = Splitter::Dirichlet { alpha, min_size: 1 };
        (0..5)
            .map(|seed| skew(&records, &s.split(&records, 10, seed).unwrap()))
            .sum::<f64>()
            / 5.0
    };
    let skews: Vec<f64> = [0.05, 0.5, 5.0, 500.0].map(mean_skew).to_vec();
    for w in skews.windows(2) {
        assert!(w[0] > w[1], "skew does not fall as alpha grows: {skews:?}");
    }
    assert!(skews[0] > 0.6, "alpha 0.05 is not concentrated: {skews:?}");
    // Ten equal categories: IID gives each about a tenth.
    assert!(skews[3] < 0.2, "alpha 500 is not close to IID: {skews:?}");
    let iid = skew(&records, &Splitter::Iid.split(&records, 10, 0).unwrap());
    assert!((skews[3] - iid).abs() < 0.05, "{skews:?} against IID {iid}");
}

#[test]
fn impossible_splits_are_refused_with_the_reason() {
    let records = dataset(2, 3);
    let e = Splitter::Iid.split(&records, 7, 0).unwrap_err().to_string();
    assert!(
        e.contains("6 records cannot be split among 7 clients"),
        "{e}"
    );
    let e = Splitter::Dirichlet {
        alpha: 0.0,
        min_size: 1,
    }
    .split(&records, 2, 0)
    .unwrap_err()
    .to_string();
    assert!(e.contains("alpha must be positive"), "{e}");
    let e = Splitter::Dirichlet {
        alpha: 1.0,
        min_size: 4,
    }
    .split(&records, 2, 0)
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot give 2 clients 4 each"), "{e}");
}

#[test]
fn the_report_lists_sizes_and_categories() {
    let records = dataset(6, 10);
    let split = Splitter::Meta.split(&records, 2, 0).unwrap();
    let report = split.report(&records);
    assert!(
        report.starts_with("client  records  categories\n"),
        "{report}"
    );
    assert_eq!(report.lines().count(), 3, "{report}");
    assert!(report.contains("     0       30  cat"), "{report}");
}
