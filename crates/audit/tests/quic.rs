//! `fedveil audit --quic`'s cases over real QUIC on loopback
//! (protocols/secagg-plus.md §8, docs/audit.md): the malicious server's
//! attacks on the federation's real clients fail and the target stays
//! hidden, the control shows the measurement sees a leak, malicious
//! clients are rejected while the honest ones finish, and the server's view
//! depends on the inputs only through their sum.

use fedveil_audit::quic::{self as audit, ClientAttackKind};
use fedveil_audit::secagg::ServerAttackKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malicious_server_learns_nothing_of_its_target_over_quic() {
    for kind in ServerAttackKind::ALL {
        let t = std::time::Instant::now();
        let f = audit::server_attack(kind)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
        eprintln!(
            "{} ({:.1} s): {}",
            kind.name(),
            t.elapsed().as_secs_f64(),
            f.evidence()
        );
        if kind == ServerAttackKind::Control {
            assert!(f.self_seed_recovered && f.mask_seed_recovered, "{f:?}");
            assert_eq!(f.recovered_coordinates, f.dim, "{f:?}");
            continue;
        }
        assert!(f.target_hidden(), "{}: {f:?}", kind.name());
        if kind != ServerAttackKind::Equivocation {
            assert!(
                !f.refusals.is_empty(),
                "{} was not refused: {f:?}",
                kind.name()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_clients_are_rejected_and_the_honest_ones_finish_over_quic() {
    for kind in ClientAttackKind::ALL {
        let t = std::time::Instant::now();
        let f = audit::client_attack(kind)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
        eprintln!(
            "{} ({:.1} s): {}",
            kind.name(),
            t.elapsed().as_secs_f64(),
            f.evidence()
        );
        assert!(f.held(), "{}: {f:?}", kind.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_view_over_quic_depends_on_the_inputs_only_through_their_sum() {
    let t = std::time::Instant::now();
    let f = audit::transcript(16).await.unwrap();
    eprintln!(
        "transcript ({:.1} s): {}",
        t.elapsed().as_secs_f64(),
        f.evidence()
    );
    assert!(f.held(), "{f:?}");
}
