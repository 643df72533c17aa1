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
    /// session at that stage. A client's mutated message that the server
    /// refuses changes nothing: the session then completes with the exact
    /// sum of its survivors, or aborts with a reason, never with a wrong sum
    /// (only a mutated masked input, which no one can check, may change
    /// the sum, as any client may change its own input). A stranger's copy
    /// is always refused. A server's mutated message that a client refuses
    /// leaves the client as it was: it still answers the real request.
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
            let mut own_input_changed = false;
            if let Ok(m) = messages::decode::<ClientMessage>(&bytes) {
                let masked = matches!(m, ClientMessage::MaskedInput(_));
                let accepted = fed.server.handle_message(now, to, m).is_ok();
                own_input_changed = accepted && masked && bytes != messages::encode(&reply).unwrap();
                // Also under someone else's name, and from a stranger.
                let other = ClientId((to.0 + 1) % 6);
                if let Ok(m) = messages::decode::<ClientMessage>(&bytes) {
                    let _ = fed.server.handle_message(now, other, m);
                }
                if let Ok(m) = messages::decode::<ClientMessage>(&bytes) {
                    let stranger = fed.server.handle_message(now, ClientId(77), m);
                    prop_assert!(stranger.is_err(), "a stranger's message was accepted");
                }
                // Under another member's name, an unsigned masked input
                // is indistinguishable from that member's own: the
                // transport authenticates who sends what.
                if masked {
                    own_input_changed = true;
                }
            }
            match fed.run() {
                Ok(agg) if !own_input_changed => {
                    prop_assert_eq!(&agg.sum, &fed.sum_of(&agg.survivors), "a wrong sum");
                }
                Ok(_) => {}
                Err(reason) => prop_assert!(!reason.to_string().is_empty()),
            }
        } else {
            let mut bytes = messages::encode(&request).unwrap();
            for (i, b) in &edits {
                let at = i.index(bytes.len());
                bytes[at] ^= b | 1;
            }
            if let Ok(m) = messages::decode::<ServerMessage>(&bytes)
                && fed.deliver(to, m).is_err()
            {
                let real = fed.deliver(to, request);
                prop_assert!(real.is_ok(), "a refused message changed the client: {:?}", real.err());
            }
        }
    }
}
