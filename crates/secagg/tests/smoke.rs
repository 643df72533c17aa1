use fedveil_secagg::Stage;
use fedveil_secagg::paramfinder::{AdversaryModel, ThreatModel, find};
use fedveil_secagg::sim::{SimConfig, run};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

#[test]
fn smoke() {
    for (n, k, drops) in [
        (10, None, vec![]),
        (20, Some(6), vec![]),
        (
            20,
            Some(8),
            vec![
                (Stage::MaskedInput, 2),
                (Stage::ShareKeys, 1),
                (Stage::Unmasking, 1),
            ],
        ),
    ] {
        let mut cfg = SimConfig::new(n, 100, k, 24);
        cfg.drops = drops;
        let r = run(&cfg, &mut ChaCha20Rng::seed_from_u64(1)).unwrap();
        println!("{}", serde_json::to_string_pretty(&r).unwrap());
        assert!(r.correct, "{r:?}");
    }
}

#[test]
fn finder() {
    for n in [1000, 10_000, 1_000_000] {
        for m in [AdversaryModel::SemiHonest, AdversaryModel::SemiMalicious] {
            let p = find(n, &ThreatModel::new(0.05, 0.05, m)).unwrap();
            println!("{n} {m:?} {} {}", p.degree, p.threshold);
        }
    }
}
