//! The types the decision works on: what it is given (`Facts`, the `Findings` a pass's steps
//! filled, the `Input`s read from Secrets, a `SetupOutcome`, a `Verified` token) and what it
//! returns (a `Decision`: the next `Step`, or the `Verdict` that ends a pass, with its `Waiting`
//! or `Stall` reason).

use std::ops::ControlFlow;

use crate::credentials::Credentials;
use crate::netbird::{InstanceStatus, NetbirdError, PersonalAccessToken, User, VersionInfo};
use crate::token_secret::TokenSecret;

/// An input the reconcile reads from a Secret.
#[derive(Debug, Clone)]
pub enum Input<T> {
    /// The spec does not ask for it.
    NotNeeded,
    /// The Secret does not exist (yet): wait for it.
    Missing(String),
    /// The Secret exists but its content is unusable (message for the condition).
    Invalid(String),
    Ready(T),
}

/// Outcome of the one setup call of this pass.
#[derive(Debug)]
pub enum SetupOutcome {
    /// 200 with a token, and the token is in the Secret.
    TokenStored {
        user_id: String,
        email: String,
    },
    /// 200 with a token that could not be written before the process stopped: lost (said
    /// loudly), never reported stored.
    TokenLost {
        user_id: String,
        email: String,
    },
    /// 200 without a token; recorded on the Secret.
    NoToken {
        user_id: String,
        email: String,
    },
    Failed(NetbirdError),
    /// Not called: another instance's pass called setup on the same server after this pass asked
    /// whether it needs one, and the server now says it does not.
    SetUpMeanwhile,
}

/// A token the server accepted, and when.
#[derive(Debug, Clone)]
pub struct Verified {
    pub user: User,
    pub at: jiff::Timestamp,
}

/// What the steps of this pass found out.
#[derive(Debug, Default)]
pub struct Findings {
    pub metadata_synced: bool,
    pub verify: Option<Result<Verified, NetbirdError>>,
    pub instance: Option<Result<InstanceStatus, NetbirdError>>,
    /// When this pass asked for `instance` (a setup this process called on the same server since
    /// makes the answer old: see `setup_gates.rs`).
    pub instance_asked_at: Option<tokio::time::Instant>,
    pub claimed: bool,
    pub setup: Option<SetupOutcome>,
    pub claim_released: bool,
    /// This pass ended the marker of a setup that a token put in by hand replaced.
    pub abandoned_setup_ended: bool,
    /// This pass forgot records of a token under another key.
    pub other_key_records_forgotten: bool,
    pub version: Option<Result<VersionInfo, NetbirdError>>,
    /// Tokens of the token's user, listed to identify the stored token or to clean up.
    pub token_list: Option<Result<Vec<PersonalAccessToken>, NetbirdError>>,
    pub orphans_cleaned: bool,
    pub previous_deleted: Option<Result<(), NetbirdError>>,
    /// This pass's look at the previous token's use.
    pub previous_use: Option<Result<crate::controller::previous_use::Observation, NetbirdError>>,
    /// The previous token was deleted before its grace period ended: nothing used it for
    /// `retireAfterUnused`.
    pub previous_retired: bool,
    pub rotated: bool,
    /// A rotation that failed this pass (the current token still works).
    pub rotation_error: Option<NetbirdError>,
    pub exchanged: bool,
    /// A service-user exchange that failed this pass (the current token still works).
    pub exchange_error: Option<NetbirdError>,
    /// A token creation (setup, rotation, exchange) answered with something that is not a NetBird
    /// token: what was asked and why the answer is not a token. Nothing was stored.
    pub malformed_token: Option<(&'static str, crate::netbird::pat::PatFormatError)>,
}

impl Findings {
    /// Forgets what the steps found out about the token the pass read (its verification, its
    /// user's tokens, the look at the previous one): the token Secret changed under the pass.
    pub fn forget_token_findings(&mut self) {
        self.verify = None;
        self.token_list = None;
        self.previous_use = None;
        self.previous_deleted = None;
    }
}

/// Everything the decision looks at.
#[derive(Debug)]
pub struct Facts<'a> {
    pub generation: i64,
    /// The credentials Secret still holds the credentials of the last setup attempt (or there was
    /// none).
    pub credentials_unchanged: bool,
    pub suspended: bool,
    /// A spec error the schema could not catch.
    pub spec_problem: Option<&'a str>,
    pub credentials: &'a Input<Credentials>,
    pub ca: &'a Input<Vec<u8>>,
    pub token_secret: &'a TokenSecret,
    /// Labels, annotations and owner references of the token Secret follow the spec.
    pub secret_metadata_in_sync: bool,
    /// Whether the previous status says this operator completed setup.
    pub setup_done_before: bool,
    /// Server errors (5xx) that setup answered in a row for this spec and these credentials,
    /// before this pass.
    pub setup_server_errors: u32,
    /// A version check is due (enabled, and the interval passed or never checked).
    pub version_due: bool,
    /// spec.token.rotation.enabled
    pub rotation_enabled: bool,
    /// spec.token.serviceUser.name
    pub service_user: Option<&'a str>,
    /// spec.token.rotation.retireAfterUnused (zero: never early).
    pub retire_after_unused: std::time::Duration,
    /// A look at the previous token's use is due (see `previous_use::due`).
    pub previous_use_due: bool,
    pub now: jiff::Timestamp,
    pub findings: &'a Findings,
    /// The credentials Secret's allow-list (`bootstrap.netbird.io/management-urls`), when it has
    /// one.
    pub allowed_servers: Option<&'a str>,
    /// For messages.
    pub secret_name: &'a str,
    pub secret_key: &'a str,
    pub management_url: &'a str,
    /// spec.tls.insecureSkipVerify
    pub insecure_skip_verify: bool,
}

/// Reasons of the Reconciling condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// A Kubernetes write failed, or the pass ran out of steps.
    Progressing,
    WaitingForCredentials,
    ManagementUnreachable,
    /// A token NetBird issued is held in memory: writing it to its Secret fails (retried).
    StoringToken,
}

/// Reasons of the Stalled condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    InvalidSpec,
    CredentialsRejected,
    SetupUnavailable,
    TokenNotIssued,
    TokenLost,
    TokenRejected,
    SecretConflict,
    /// The token or the password would go to a server its Secret does not allow.
    ServerNotAllowed,
}

impl Stall {
    pub fn as_str(self) -> &'static str {
        match self {
            Stall::InvalidSpec => "InvalidSpec",
            Stall::CredentialsRejected => "CredentialsRejected",
            Stall::SetupUnavailable => "SetupUnavailable",
            Stall::TokenNotIssued => "TokenNotIssued",
            Stall::TokenLost => "TokenLost",
            Stall::TokenRejected => "TokenRejected",
            Stall::SecretConflict => "SecretConflict",
            Stall::ServerNotAllowed => "ServerNotAllowed",
        }
    }
}

impl Waiting {
    pub fn as_str(self) -> &'static str {
        match self {
            Waiting::Progressing => "Progressing",
            Waiting::WaitingForCredentials => "WaitingForCredentials",
            Waiting::ManagementUnreachable => "ManagementUnreachable",
            Waiting::StoringToken => "StoringToken",
        }
    }
}

/// How a pass ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `spec.suspend`: nothing observed, nothing changed.
    Suspended,
    /// Setup done, token stored and verified.
    Ready,
    /// Will retry by itself; `retry` asks for a backoff requeue (else: wait for a watch event).
    Waiting {
        reason: Waiting,
        message: String,
        retry: bool,
    },
    /// Needs a person.
    Stalled { reason: Stall, message: String },
}

/// What the decision says: the next step of a pass, or the verdict that ends it.
pub type Decision = ControlFlow<Verdict, Step>;

/// The next step of a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Bring the token Secret's labels, annotations and owner references in line with the spec.
    SyncSecretMetadata,
    /// `GET /api/users/current` with the stored token.
    VerifyToken,
    /// `GET /api/instance`.
    CheckInstance,
    /// Create or claim the token Secret with `setup-started-at`, before setup.
    ClaimSecret,
    /// `POST /api/setup`, then store the token at once.
    Setup,
    /// Remove `setup-started-at` after setup definitively failed.
    ReleaseClaim,
    /// `GET /api/instance/version`.
    CheckVersion,
    /// The Secret's records describe a token under a key the spec no longer names: forget them.
    ForgetOtherKeyRecords,
    /// A token was put into the Secret while a setup of the operator was in flight: end that
    /// setup's marker, and say that its token (if the call reached NetBird) was never stored.
    EndAbandonedSetup,
    /// List the user's tokens; delete tokens the operator created that the Secret does not hold
    /// (left by a crash during rotation).
    CleanOrphans,
    /// List the user's tokens to learn the stored token's id and lifetime.
    IdentifyToken,
    /// Delete the token a rotation replaced.
    DeletePreviousToken,
    /// List the user's tokens to see when the previous token was last used.
    CheckPreviousTokenUse,
    /// Delete the previous token before its grace period ends: nothing used it for
    /// `retireAfterUnused`.
    RetirePreviousToken,
    /// Create a new token, store it, then (next steps) verify it and delete the old one.
    RotateToken,
    /// Find or create the service user, store and verify its token, delete the old token.
    ExchangeForServiceUser,
}
