//! The machine's vocabulary: what drivers feed in, what they drain out, and the
//! errors and events callers see.

use crate::record::{
    ConnectionRecord, FailureKind, Generation, Lease, LeaseRequestId, ReauthReason, WorkerId,
};
use crate::reply::{HttpResponse, TokenGrant};
use crate::request::HttpRequest;
use crate::secret::AccessToken;
use crate::time::Timestamp;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

/// The driver's handle for one caller waiting for an access token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// What happened, fed to [`Connection::handle_input`](crate::Connection::handle_input).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// A caller wants an access token. Answered by one [`Output::Deliver`].
    AccessRequested(RequestId),
    /// The store answered an [`Output::Load`] (`None`: no such connection).
    Loaded(Option<Box<ConnectionRecord>>),
    /// The store granted an [`Output::AcquireLease`], and read the record under it.
    LeaseGranted {
        /// The lease now held.
        lease: Lease,
        /// The record as stored at the moment of the grant.
        record: Option<Box<ConnectionRecord>>,
        /// The unreleased lease row this grant replaced, whoever owned it (an
        /// expired lease of another worker, or one of an earlier incarnation of
        /// this owner): its holder never released it, so its refresh may be in
        /// flight. The store must report it even when the owner is the same.
        took_over: Option<Lease>,
    },
    /// Another worker holds the lease.
    LeaseHeld {
        /// The holder's lease.
        holder: Lease,
    },
    /// The provider answered an [`Output::Send`].
    Replied(HttpResponse),
    /// The request was certainly not sent (connect error, send deadline passed).
    NotSent,
    /// The request may have been sent but no complete reply came back (timeout
    /// after sending, connection reset mid-reply, process restarted).
    OutcomeUnknown,
    /// The store applied an [`Output::CompareAndSwap`].
    Committed {
        /// The generation now stored.
        generation: Generation,
    },
    /// The compare-and-swap found another generation stored.
    Conflict {
        /// The record stored now.
        current: Option<Box<ConnectionRecord>>,
    },
    /// The store could not carry out the last store command.
    StoreFailed,
    /// Someone committed a change to this connection (a hint, e.g. from an
    /// in-process broadcast or PostgreSQL `NOTIFY`): stop waiting and re-read.
    StoreChanged,
    /// The instant given by [`Connection::poll_timeout`](crate::Connection::poll_timeout) has come.
    Timeout,
    /// Tokens from an authorization-code exchange: store them as this connection.
    Authorized {
        /// The checked token response.
        grant: TokenGrant,
        /// Intuit realm id (company) or tenant id.
        realm_id: Option<String>,
    },
    /// The user wants to disconnect: revoke at the provider, then mark the record.
    Disconnect,
    /// A scheduler scanning the store found this connection due for work without a
    /// caller: a keep-alive refresh is due, or a lease was abandoned (a refresh may
    /// be in doubt). Refresh now for liveness, whatever the cached record says.
    Maintain,
    /// Refresh now, whatever the cached token says, and answer `request` with
    /// the outcome: the token of a refresh that committed after this input, or why
    /// there is none (what an operator's "refresh" command reports).
    RefreshNow {
        /// Who to answer.
        request: RequestId,
        /// An operator says the configuration is fixed: refresh even if a
        /// configuration failure recorded with these same credentials says to wait.
        clear_block: bool,
    },
    /// The resource API answered 401 for `token`; answer `request` with a token
    /// to retry with. If `token` is the one this machine serves, it is never
    /// served again and callers wait for one refresh (shared by every caller that
    /// reports it, and across processes through the lease: a worker that finds
    /// another token stored under the lease sends nothing). A report about any
    /// other token (an older one, a late 401) changes nothing: `request` gets the
    /// current token.
    Rejected {
        /// Who to answer.
        request: RequestId,
        /// The token the API refused.
        token: AccessToken,
    },
}

impl Input {
    /// The generation of the stored record this input shows the machine, if any:
    /// what harnesses track as the newest generation a worker has seen (S5).
    pub fn shown_generation(&self) -> Option<Generation> {
        match self {
            Input::Loaded(Some(r))
            | Input::LeaseGranted {
                record: Some(r), ..
            }
            | Input::Conflict { current: Some(r) } => Some(r.generation),
            Input::Committed { generation } => Some(*generation),
            _ => None,
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Input::AccessRequested(_) => "AccessRequested",
            Input::Loaded(_) => "Loaded",
            Input::LeaseGranted { .. } => "LeaseGranted",
            Input::LeaseHeld { .. } => "LeaseHeld",
            Input::Replied(_) => "Replied",
            Input::NotSent => "NotSent",
            Input::OutcomeUnknown => "OutcomeUnknown",
            Input::Committed { .. } => "Committed",
            Input::Conflict { .. } => "Conflict",
            Input::StoreFailed => "StoreFailed",
            Input::StoreChanged => "StoreChanged",
            Input::RefreshNow { .. } => "RefreshNow",
            Input::Rejected { .. } => "Rejected",
            Input::Timeout => "Timeout",
            Input::Authorized { .. } => "Authorized",
            Input::Disconnect => "Disconnect",
            Input::Maintain => "Maintain",
        }
    }
}

/// What the machine wants done, drained with
/// [`Connection::poll_output`](crate::Connection::poll_output).
///
/// At most one store command (`Load`, `AcquireLease`, `CompareAndSwap`) or one
/// `Send` is outstanding at a time; its answer is the next non-caller input the
/// machine expects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[must_use]
pub enum Output {
    /// Read the record; answer with [`Input::Loaded`] or [`Input::StoreFailed`].
    Load,
    /// Take the lease for `ttl` if it is free, expired, or already this owner's;
    /// answer with [`Input::LeaseGranted`], [`Input::LeaseHeld`] or
    /// [`Input::StoreFailed`].
    ///
    /// The store keeps `request` with the granted row, and with it the unreleased
    /// row the grant displaced (reported as `took_over`). A request whose answer
    /// was lost is retried under the same `request`: if the stored row is still
    /// that earlier grant (same owner, same request), the store grants it again and
    /// reports, as `took_over`, what that earlier grant displaced — not the
    /// requester's own row, under which nothing was sent.
    AcquireLease {
        /// Lease owner.
        owner: WorkerId,
        /// Lease duration from the driver's now.
        ttl: Duration,
        /// This request's name (the same on a retry after a lost answer).
        request: LeaseRequestId,
    },
    /// Release the lease as [`LeaseRelease`] says. No answer expected.
    ReleaseLease(LeaseRelease),
    /// Send this request; answer with [`Input::Replied`], [`Input::NotSent`] or
    /// [`Input::OutcomeUnknown`].
    Send(HttpRequest),
    /// Store `record` only if the stored generation is `expected` (`None`: only if
    /// there is no record). Answer with [`Input::Committed`], [`Input::Conflict`] or
    /// [`Input::StoreFailed`].
    CompareAndSwap {
        /// Generation the record was derived from.
        expected: Option<Generation>,
        /// The new record (its generation is `expected + 1`).
        record: Box<ConnectionRecord>,
        /// The lease to release in the same atomic step, only if the swap
        /// commits: the commit ends the piece of work. A store that cannot do both
        /// at once may release right after a committed swap.
        release: Option<LeaseRelease>,
    },
    /// Answer a caller.
    Deliver {
        /// Which caller.
        request: RequestId,
        /// The token or why there is none.
        result: Result<AccessToken, AccessError>,
    },
    /// A lifecycle event for subscribers.
    Event(Event),
}

/// Releasing a lease: only if `owner` still holds it under `request` (expired or
/// not); otherwise nothing. With `restore`, the unreleased row the grant
/// displaced is put back instead of leaving none: the machine gives up a lease it
/// may hold (its answer was lost) or did not act on what the grant reported, so
/// the displaced holder's refresh is still in doubt for the next worker.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseRelease {
    /// Lease owner.
    pub owner: WorkerId,
    /// The request the lease was granted to.
    pub request: LeaseRequestId,
    /// Put back the row the grant displaced.
    pub restore: bool,
}

/// Lifecycle events.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// Tokens from an authorization were stored.
    Connected {
        /// Stored generation.
        generation: Generation,
    },
    /// A grant was accepted although some of its optional members were unusable;
    /// they were treated as absent (see [`TokenGrant::ignored`]).
    IgnoredReplyFields {
        /// The members' names as the provider sent them.
        fields: Vec<&'static str>,
    },
    /// A caller reported that the resource API refused the access token this
    /// machine serves ([`Input::Rejected`]): it is not served again.
    AccessRejected,
    /// A refresh committed.
    Refreshed {
        /// Stored generation.
        generation: Generation,
        /// Whether the provider issued a new refresh token.
        rotated: bool,
    },
    /// Refreshing started failing for a transient reason.
    Degraded {
        /// What failed.
        kind: FailureKind,
        /// When the next attempt is allowed.
        retry_at: Timestamp,
    },
    /// A degraded or re-auth-flagged connection works again.
    Recovered {
        /// Stored generation.
        generation: Generation,
    },
    /// The grant is gone: a human must reconnect.
    ReauthRequired {
        /// Why.
        reason: ReauthReason,
    },
    /// The refresh token's hard deadline is near: ask the user to reconnect.
    ReconnectSoon {
        /// The hard deadline.
        deadline: Timestamp,
    },
    /// The stored record cannot be read (corrupt, foreign ciphertext, a key the
    /// keyring lacks): the driver quarantines the connection instead of retrying
    /// it as if the store were down. Emitted by drivers, never by the machine.
    Quarantined,
    /// The connection was disconnected through tokenfence.
    Disconnected {
        /// Whether the provider confirmed the revocation.
        revoked: bool,
    },
}

/// Which part of a grant identity differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdentityField {
    /// Provider profile name.
    Provider,
    /// Production vs sandbox.
    Environment,
    /// Client id.
    ClientId,
}

/// A configuration problem: no refresh can fix it, a person must change settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// S7: the stored connection was authorized under another provider, environment
    /// or client id than the configured credentials. Nothing was sent.
    #[error("connection was authorized with {field:?} `{stored}` but the configured client has `{configured}`; refusing to send its refresh token")]
    IdentityMismatch {
        /// What differs.
        field: IdentityField,
        /// Stored value.
        stored: String,
        /// Configured value.
        configured: String,
    },
    /// The provider rejected the client credentials (`invalid_client`, or a 401
    /// without an OAuth body).
    #[error("the provider rejected the client credentials; check the client id and secret for this environment (these credentials are tried again at {retry_at}, other credentials at once, or clear the block)")]
    ClientRejected {
        /// When these same credentials are tried again.
        retry_at: Timestamp,
    },
    /// The provider rejected the request itself (`invalid_request`, `invalid_scope`...).
    #[error("the provider rejected the refresh request as malformed or unauthorized for this client (tried again at {retry_at}, or clear the block)")]
    RequestRejected {
        /// When these same credentials are tried again.
        retry_at: Timestamp,
    },
}

/// Why a caller got no access token. Carries no secret.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The grant is gone; a human must reconnect.
    #[error("reconnect required: {0}")]
    ReauthRequired(ReauthReason),
    /// Disconnected through tokenfence.
    #[error("connection was disconnected")]
    Disconnected,
    /// The store has no such connection.
    #[error("no such connection in the store")]
    NotConnected,
    /// Configuration must change.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Temporary trouble; the connection is fine and will be retried.
    #[error("temporarily unavailable ({kind}); next attempt at {retry_at}")]
    Transient {
        /// What failed.
        kind: FailureKind,
        /// No attempt before this instant.
        retry_at: Timestamp,
    },
}

/// The driver fed an input the machine was not waiting for. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// An answer to a command that is not outstanding.
    #[error("input {input} is not expected while the machine is {phase}")]
    Unexpected {
        /// The input's name.
        input: &'static str,
        /// The machine's phase.
        phase: &'static str,
    },
    /// An authorization without a refresh token cannot be managed.
    #[error("the authorization carried no refresh token")]
    NoRefreshToken,
}
