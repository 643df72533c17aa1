//! Errors. Each variant names the rule that was broken and the clients it
//! involved, so that an operator (or an auditor) can tell exactly what
//! happened without reading the code.

use thiserror::Error;

use crate::{ClientId, SessionId, ShareKind, Stage};

/// Session parameters that cannot run (§2.3).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParamsError {
    #[error("unsupported protocol version {got} (this build speaks version {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("the roster has {n} clients; at least 3 are needed")]
    TooFewClients { n: usize },
    #[error("the roster has {n} clients; at most {max} are supported")]
    TooManyClients { n: usize, max: usize },
    #[error(
        "the roster must be sorted by client id with no repeats; {client} is out of order or repeated"
    )]
    RosterNotSorted { client: ClientId },
    #[error("client id {client} is reserved")]
    ReservedId { client: ClientId },
    #[error("bits per element must be in 1..=32, got {bits}")]
    BitsOutOfRange { bits: u8 },
    #[error("vector length must be in 1..={max}, got {dim}")]
    DimOutOfRange { dim: u32, max: u32 },
    #[error("degree {degree} is invalid for {n} clients: {reason}")]
    InvalidDegree {
        degree: u32,
        n: usize,
        reason: &'static str,
    },
    #[error("threshold {threshold} is below the minimum of 2")]
    ThresholdTooLow { threshold: u32 },
    #[error("threshold {threshold} exceeds the number of neighbours {degree}")]
    ThresholdAboveDegree { threshold: u32, degree: u32 },
    #[error(
        "threshold {threshold} must exceed half the number of neighbours ({degree}): with 2t <= k a \
         malicious server could collect both share kinds of one client from disjoint neighbour sets"
    )]
    ThresholdNotMajority { threshold: u32, degree: u32 },
    #[error(
        "the minimum number of survivors must be in 1..={n} (the roster size), got {min_survivors}"
    )]
    MinSurvivorsOutOfRange { min_survivors: u32, n: usize },
}

/// Why a client refused a message. A refused message never changes the
/// client's state, and never reveals anything (§6.7).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientError {
    #[error("invalid session parameters: {0}")]
    Params(#[from] ParamsError),
    #[error("this client ({client}) is not in the session roster")]
    NotInRoster { client: ClientId },
    #[error("the roster lists a different identity key for this client ({client})")]
    IdentityMismatch { client: ClientId },
    #[error(
        "the session context (model/config/round hash) differs from the one this client holds: \
         the server may be sending different models to different clients"
    )]
    ContextMismatch,
    #[error("input has {got} elements, the session expects {expected}")]
    InputLength { expected: u32, got: usize },
    #[error("input element {index} is {value}, outside the ring Z_2^{bits}")]
    InputOutOfRing { index: usize, value: u32, bits: u8 },
    #[error(
        "message belongs to session {got}, not this session {expected} (replayed or misrouted)"
    )]
    WrongSession { expected: SessionId, got: SessionId },
    #[error("unexpected {message} message while {state} (out-of-round or replayed)")]
    UnexpectedMessage {
        state: &'static str,
        message: &'static str,
    },
    #[error("{stage}: {client} is not a neighbour of this client")]
    NonNeighbour { stage: Stage, client: ClientId },
    #[error("{stage}: {client} appears more than once")]
    RepeatedId { stage: Stage, client: ClientId },
    #[error("{stage}: the list of clients is not in ascending order at {client}")]
    NotSorted { stage: Stage, client: ClientId },
    #[error("{stage}: {client} is not in the session roster")]
    UnknownClient { stage: Stage, client: ClientId },
    #[error("{stage}: bad signature from {client}")]
    BadSignature { stage: Stage, client: ClientId },
    #[error("{stage}: {client} advertised a low-order public key")]
    BadPublicKey { stage: Stage, client: ClientId },
    #[error("{stage}: only {have} usable neighbours, at least {need} (the threshold) are needed")]
    TooFewNeighbours {
        stage: Stage,
        have: usize,
        need: usize,
    },
    #[error("{stage}: share envelope from {client} was addressed to {to}, not to this client")]
    Misaddressed {
        stage: Stage,
        client: ClientId,
        to: ClientId,
    },
    #[error("the survivor set does not include this client ({client})")]
    NotASurvivor { client: ClientId },
    #[error("{stage}: only {have} of this client's neighbours survive, the threshold is {need}")]
    TooFewSurvivors {
        stage: Stage,
        have: usize,
        need: usize,
    },
    #[error(
        "the survivor set has {have} clients, the session's floor is {need}: \
         a sum of so few inputs is refused"
    )]
    BelowMinimumSurvivors { have: usize, need: u32 },
    #[error(
        "unmask request carries {have} valid neighbour signatures of the survivor set, {need} are needed"
    )]
    TooFewSignatures { have: usize, need: usize },
    #[error("unmask request names {client} as both alive and dropped")]
    BothAliveAndDropped { client: ClientId },
    #[error(
        "unmask request names {client} as {requested}, which contradicts the signed consistency set"
    )]
    ContradictsConsistencySet {
        client: ClientId,
        requested: &'static str,
    },
    #[error(
        "unmask request asks for the {requested} share of {client}, but its {revealed} share was \
         already revealed"
    )]
    AlreadyRevealed {
        client: ClientId,
        revealed: ShareKind,
        requested: ShareKind,
    },
    #[error("{stage}: malformed message: {reason}")]
    Malformed { stage: Stage, reason: String },
    #[error("the session was aborted: {reason}")]
    Aborted { reason: String },
    #[error("internal cryptographic failure: {0}")]
    Crypto(&'static str),
}

/// Why the server rejected one client message. The server keeps serving: a
/// rejected message changes nothing, and the client may still send a valid
/// one before the stage deadline (§6.8).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Rejected {
    #[error("message from {client}, who is not in the session roster")]
    UnknownClient { client: ClientId },
    #[error(
        "message from {client} belongs to session {got}, not {expected} (replayed or misrouted)"
    )]
    WrongSession {
        client: ClientId,
        expected: SessionId,
        got: SessionId,
    },
    #[error("{client} sent a {got} message during {current} (out of round)")]
    OutOfRound {
        client: ClientId,
        current: Stage,
        got: Stage,
    },
    #[error("{client} already sent its {stage} message")]
    Duplicate { client: ClientId, stage: Stage },
    #[error("{client} is not taking part in {stage} (dropped or excluded earlier)")]
    NotEligible { client: ClientId, stage: Stage },
    #[error("{stage}: bad signature from {client}")]
    BadSignature { client: ClientId, stage: Stage },
    #[error("{stage}: malformed message from {client}: {reason}")]
    Malformed {
        client: ClientId,
        stage: Stage,
        reason: String,
    },
    #[error(
        "{client} sent a vector of {got} elements at {got_bits} bits, the session expects {expected} at {expected_bits} bits"
    )]
    WrongLength {
        client: ClientId,
        expected: u32,
        got: u32,
        expected_bits: u8,
        got_bits: u8,
    },
    #[error("the session is over")]
    SessionOver,
}

/// Why the server aborted the whole session (§6.9). The server then sends an
/// `Abort` message to every client that is still taking part.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AbortReason {
    #[error(
        "after {stage}, no client is left: {answered} answered, and each needs at least \
         {threshold} (the threshold) answering neighbours"
    )]
    NoClientsLeft {
        stage: Stage,
        answered: usize,
        threshold: usize,
    },
    #[error(
        "after {stage}, {client} has only {have} surviving neighbours that hold its {kind} shares; \
         the threshold is {need}, so its mask cannot be removed"
    )]
    TooFewSurvivingNeighbours {
        stage: Stage,
        client: ClientId,
        kind: ShareKind,
        have: usize,
        need: usize,
    },
    #[error(
        "unmasking received {have} {kind} shares of {client}, the threshold is {need} \
         (shares came from {holders:?})"
    )]
    MissingShares {
        client: ClientId,
        kind: ShareKind,
        have: usize,
        need: usize,
        holders: Vec<ClientId>,
    },
    #[error(
        "the {kind} shares of {client} do not reconstruct its committed secret \
         ({shares} shares from {holders:?}): some holders sent bad shares"
    )]
    Unrecoverable {
        client: ClientId,
        kind: ShareKind,
        shares: usize,
        holders: Vec<ClientId>,
    },
    #[error(
        "after {stage}, only {have} clients survive; the session's floor is {need}, \
         so their sum is not revealed"
    )]
    BelowMinimumSurvivors {
        stage: Stage,
        have: usize,
        need: u32,
    },
    #[error("internal cryptographic failure: {0}")]
    Crypto(&'static str),
}
