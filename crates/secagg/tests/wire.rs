//! §7: hostile bytes. Random frames and mutated real frames never make a
//! decoder, a client or the server panic; whatever decodes is either handled
//! or refused with an error.

mod common;

use common::Fed;
use fedveil_secagg::messages::{self, ClientMessage, ServerMessage};
use fedveil_secagg::{ClientId, Stage};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = messages::decode::<ClientMessage>(&bytes);
        let _ = messages::decode::<ServerMessage>(&bytes);
    }

    /// A real frame of the given stage, with a few bytes changed, sent to a
    /// session at that stage: the receiving side answers or refuses.
    #[test]
    fn mutated_frames_are_handled_or_refused(
        stage in prop::sample::select(Stage::ALL.to_vec()),
        from_client in any::<bool>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        seed in 0u64..4,
    ) {
        let mut fed = Fed::new(6, 4, 3, 8, 12, seed);
        let requests = fed.run_until(stage);
        let (to, request) = requests[0].clone();
        if from_client {
            let Ok(Some(reply)) = fed.deliver(to, request) else { return Ok(()) };
            let mut bytes = messages::encode(&reply).unwrap();
            for (i, b) in &edits {
                let at = i.index(bytes.len());
                bytes[at] ^= b | 1;
            }
            let now = fed.now;
            if let Ok(m) = messages::decode::<ClientMessage>(&bytes) {
                let _ = fed.server.handle_message(now, to, m);
                // Also under someone else's name, and from a stranger.
                let other = ClientId((to.0 + 1) % 6);
                if let Ok(m) = messages::decode::<ClientMessage>(&bytes) {
                    let _ = fed.server.handle_message(now, other, m);
                }
                if let Ok(m) = messages::decode::<ClientMessage>(&bytes) {
                    let _ = fed.server.handle_message(now, ClientId(77), m);
                }
            }
            // The session still finishes (or aborts) cleanly.
            let _ = fed.run();
        } else {
            let mut bytes = messages::encode(&request).unwrap();
            for (i, b) in &edits {
                let at = i.index(bytes.len());
                bytes[at] ^= b | 1;
            }
            if let Ok(m) = messages::decode::<ServerMessage>(&bytes) {
                let _ = fed.deliver(to, m);
            }
        }
    }
}
