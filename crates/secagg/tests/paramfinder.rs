//! §3.3: the parameter finder against the reference values (Google's
//! implementation, design §1): 40-bit security, 20-bit correctness, 5%
//! corrupt and 5% dropped clients.

use fedveil_secagg::paramfinder::{AdversaryModel, ParamFinderError, ThreatModel, find};

#[test]
fn reference_table_is_reproduced() {
    let table = [
        (1_000, AdversaryModel::SemiHonest, 30, 17),
        (1_000, AdversaryModel::SemiMalicious, 52, 37),
        (10_000, AdversaryModel::SemiHonest, 34, 20),
        (10_000, AdversaryModel::SemiMalicious, 62, 44),
        (1_000_000, AdversaryModel::SemiHonest, 38, 22),
        (1_000_000, AdversaryModel::SemiMalicious, 74, 52),
    ];
    for (n, model, k, t) in table {
        let p = find(n, &ThreatModel::new(0.05, 0.05, model)).unwrap();
        assert_eq!((p.degree, p.threshold), (k, t), "n = {n}, {model:?}");
        // Every result is a valid session: 2t > k, t <= k.
        assert!(2 * p.threshold > p.degree && p.threshold <= p.degree);
    }
}

#[test]
fn more_risk_needs_more_neighbours() {
    let base = find(
        1000,
        &ThreatModel::new(0.05, 0.05, AdversaryModel::SemiHonest),
    )
    .unwrap();
    let corrupt = find(
        1000,
        &ThreatModel::new(0.2, 0.05, AdversaryModel::SemiHonest),
    )
    .unwrap();
    let dropout = find(
        1000,
        &ThreatModel::new(0.05, 0.3, AdversaryModel::SemiHonest),
    )
    .unwrap();
    let mut strict = ThreatModel::new(0.05, 0.05, AdversaryModel::SemiHonest);
    strict.security_bits = 80.0;
    let strict = find(1000, &strict).unwrap();
    assert!(corrupt.degree > base.degree);
    assert!(dropout.degree > base.degree);
    assert!(strict.degree > base.degree);
}

#[test]
fn infeasible_threat_models_are_refused_with_the_rule() {
    assert!(matches!(
        find(
            1000,
            &ThreatModel::new(0.5, 0.45, AdversaryModel::SemiHonest)
        ),
        Err(ParamFinderError::Infeasible { .. })
    ));
    assert!(matches!(
        find(
            1000,
            &ThreatModel::new(0.3, 0.31, AdversaryModel::SemiMalicious)
        ),
        Err(ParamFinderError::Infeasible { .. })
    ));
    let mut bad = ThreatModel::new(0.05, 0.05, AdversaryModel::SemiHonest);
    bad.security_bits = f64::NAN;
    assert_eq!(find(1000, &bad), Err(ParamFinderError::BadBits));
}
