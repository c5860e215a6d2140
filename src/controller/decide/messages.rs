//! The words of the decision's verdicts: the Stalled and Waiting verdicts it builds from a NetBird
//! error or a refusal, and the message of each Stalled reason (what happened and what a person
//! does about it).

use std::ops::ControlFlow::Break;

use super::{Decision, Facts, SETUP_SERVER_ERRORS_LIMIT, Stall, Verdict, Waiting};
use crate::netbird::NetbirdError;

pub(super) fn stalled(reason: Stall, message: String) -> Decision {
    Break(Verdict::Stalled { reason, message })
}

pub(super) fn unreachable_or_stalled(e: &NetbirdError, what: &str) -> Decision {
    match e {
        NetbirdError::Redirect { .. } => stalled(Stall::InvalidSpec, e.to_string()),
        // something in front of NetBird does not know the path: retried (an ingress may still be
        // on its way), and the message names the likely cause
        _ if e.is_wrong_path() => Break(Verdict::Waiting {
            reason: Waiting::ManagementUnreachable,
            message: format!(
                "{what}: {e}. That answer is not NetBird's: spec.managementURL or its path prefix \
                 looks wrong (the operator appends /api/... to it); retrying with backoff"
            ),
            retry: true,
        }),
        _ => Break(Verdict::Waiting {
            reason: Waiting::ManagementUnreachable,
            message: format!("{what}: {e}; retrying with backoff"),
            retry: true,
        }),
    }
}

pub(super) fn setup_server_error_message(f: &Facts<'_>, answer: &str) -> String {
    format!(
        "NetBird at {} answered the setup with a server error ({answer}) \
         {SETUP_SERVER_ERRORS_LIMIT} times in a row, or said it cannot create local users; the \
         password is not sent again until the spec or the credentials Secret changes. Likely \
         causes: the embedded identity provider runs with local users disabled, the server is an \
         old netbird-mgmt without the embedded identity provider, or its database fails. Check the \
         server's log for the request",
        f.management_url
    )
}

/// NetBird refused the setup request (400/422): a spec or credentials problem, never retried as is.
pub(super) fn rejected(status: u16, message: &str) -> Decision {
    if message.contains("pat_expire_in") {
        return stalled(
            Stall::InvalidSpec,
            format!(
                "NetBird refused spec.token.expiresInDays ({status}: {message}); setup is tried \
                 again when the spec changes"
            ),
        );
    }
    stalled(
        Stall::CredentialsRejected,
        format!(
            "NetBird refused the credentials ({status}: {message}). Fix the credentials Secret; \
             setup is tried again when it changes"
        ),
    )
}

pub(super) fn token_not_issued_message(f: &Facts<'_>) -> String {
    format!(
        "setup succeeded but NetBird returned no token: the server runs without \
         NB_SETUP_PAT_ENABLED=true. Log in to the dashboard as the owner, create a personal access \
         token and put it under key {} of Secret {}; the operator adopts it",
        f.secret_key, f.secret_name
    )
}

pub(super) fn token_not_allowed_message(f: &Facts<'_>, home: &str) -> String {
    format!(
        "the token in Secret {} belongs to the NetBird server at {home} (annotation {}), but \
         spec.managementURL is {}: the token is not sent there. If {} is the same server under a \
         new address, whoever may write Secret {} sets that annotation to the new URL; for another \
         server, set spec.token.secretName to another Secret",
        f.secret_name,
        crate::binding::ANN_MANAGEMENT_URL,
        f.management_url,
        f.management_url,
        f.secret_name
    )
}

pub(super) fn password_not_allowed_message(f: &Facts<'_>, list: &str) -> String {
    let list: Vec<String> = crate::binding::allow_list(list);
    format!(
        "the credentials Secret allows its password to be sent only to {} (annotation {}), not to \
         {}: nothing was sent. Whoever may write the credentials Secret adds the URL to that \
         annotation, or the NetbirdInstance names another credentials Secret",
        list.join(", "),
        crate::binding::ANN_ALLOWED_URLS,
        f.management_url
    )
}

pub(super) fn malformed_token_message(f: &Facts<'_>, what: &str, why: &str) -> String {
    let then = if what == "setup" {
        format!(
            "Setup is done and is never called again: log in to the dashboard as the owner, create \
             a personal access token and put it under key {} of Secret {}; the operator adopts it",
            f.secret_key, f.secret_name
        )
    } else {
        "The current token stays in use; the operator asks again when the spec changes. Check what \
         answers at spec.managementURL (a proxy rewriting answers?)"
            .to_string()
    };
    format!(
        "NetBird at {} answered the token creation ({what}) with something that is not a NetBird \
         token ({why}); nothing was stored. {then}",
        f.management_url
    )
}

pub(super) fn token_lost_message(f: &Facts<'_>, started: bool) -> String {
    if !started {
        return format!(
            "NetBird at {} is set up and the token this operator stored is gone from the Secret; \
             NetBird shows a token only once. Log in to the dashboard as the owner, create a \
             personal access token and put it under key {} of Secret {}; the operator adopts it",
            f.management_url, f.secret_key, f.secret_name
        );
    }
    format!(
        "NetBird at {} is set up, and this operator's setup call may have done it: its answer \
         never arrived (a timeout, a reset connection or a restart) and its token was never \
         stored. The owner may also have been created by someone else at the same moment. NetBird \
         shows a token only once: if the owner is the account in the credentials Secret, log in to \
         the dashboard with it, create a personal access token and put it under key {} of Secret \
         {}; if someone else set the server up, ask them for a personal access token and put it \
         there. The operator adopts it",
        f.management_url, f.secret_key, f.secret_name
    )
}

pub(super) fn token_lost_at_shutdown_message(f: &Facts<'_>) -> String {
    format!(
        "NetBird at {} is set up by this operator, but its token could not be written to Secret {} \
         before the operator stopped, and NetBird shows a token only once: it is lost. Log in to \
         the dashboard as the owner, create a personal access token and put it under key {} of \
         that Secret; the operator adopts it",
        f.management_url, f.secret_name, f.secret_key
    )
}

pub(super) fn setup_unavailable_message(f: &Facts<'_>, raced: bool) -> String {
    let why = if raced {
        "was set up by someone else just before this operator's setup call"
    } else {
        "is already set up (or uses an external identity provider)"
    };
    format!(
        "NetBird at {} {why}, and Secret {} holds no token. Create a personal access token in the \
         NetBird dashboard and put it under key {} of that Secret (with labels {}={} and \
         {}=<instance name>); the operator adopts it",
        f.management_url,
        f.secret_name,
        f.secret_key,
        crate::token_secret::LABEL_MANAGED_BY,
        crate::token_secret::MANAGED_BY,
        crate::token_secret::LABEL_INSTANCE
    )
}
