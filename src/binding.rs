//! Where a stored token and the admin password may be sent.
//!
//! Whoever may edit a NetbirdInstance is not trusted with the contents of Secrets. So the token
//! Secret records the server its token belongs to (`bootstrap.netbird.io/management-url`), and the
//! credentials Secret may list the servers its password may go to
//! (`bootstrap.netbird.io/management-urls`). Both are annotations of Secrets: only someone who may
//! write the Secret can move its contents to another server.

use sha2::{Digest, Sha256};

/// Annotation of the token Secret: the managementURL its token was issued by or first verified
/// against. The token is sent to that server and no other.
pub const ANN_MANAGEMENT_URL: &str = "bootstrap.netbird.io/management-url";

/// Annotation of the token Secret, next to [`ANN_MANAGEMENT_URL`]: how the server was trusted when
/// the token was bound to it, `verified` (its TLS certificate checked) or `insecure-skip-verify`.
/// A token bound as verified is not sent without verification (`spec.tls.insecureSkipVerify`).
/// Recorded for https:// servers only (plain http has no certificate to check).
pub const ANN_MANAGEMENT_TLS: &str = "bootstrap.netbird.io/management-tls";

/// How the connection to a server is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The server's TLS certificate is verified.
    Verified,
    /// `spec.tls.insecureSkipVerify`: anyone on the path can pose as the server.
    SkipVerify,
}

impl Trust {
    pub fn of(insecure_skip_verify: bool) -> Self {
        if insecure_skip_verify {
            Trust::SkipVerify
        } else {
            Trust::Verified
        }
    }

    /// The value of [`ANN_MANAGEMENT_TLS`].
    pub fn as_str(self) -> &'static str {
        match self {
            Trust::Verified => "verified",
            Trust::SkipVerify => "insecure-skip-verify",
        }
    }

    /// A recorded trust. Text that is neither value binds to verification (the stricter).
    pub fn parse(value: &str) -> Self {
        if value.trim() == Trust::SkipVerify.as_str() {
            Trust::SkipVerify
        } else {
            Trust::Verified
        }
    }
}

/// Whether TLS trust applies to `url` (an https:// URL).
pub fn uses_tls(url: &str) -> bool {
    normalize(url).starts_with("https://")
}

/// The message when a token bound to a verified server would be sent without verification: for
/// the Stalled condition and the finalizer's Event.
pub fn weaker_trust_message(secret: &str, home: &str) -> String {
    format!(
        "the token in Secret {secret} was bound to the NetBird server at {home} with its TLS \
         certificate verified (annotation {ANN_MANAGEMENT_TLS}: verified), but \
         spec.tls.insecureSkipVerify is true: the token is not sent without verification, where \
         anyone on the path could take it. Turn insecureSkipVerify off (spec.tls.caSecretRef \
         trusts a private CA); if the weaker trust is meant, whoever may write Secret {secret} \
         sets that annotation to {}",
        Trust::SkipVerify.as_str()
    )
}

/// Annotation of the credentials Secret: the servers (URLs separated by commas or spaces) its
/// password may be sent to. Absent: any server the NetbirdInstance names.
pub const ANN_ALLOWED_URLS: &str = "bootstrap.netbird.io/management-urls";

/// A management URL in the form two URLs of the same server share: scheme and host lower-cased,
/// default port dropped, no trailing slash. Text that is not a URL is kept as written (it then
/// matches only itself).
pub fn normalize(url: &str) -> String {
    match url::Url::parse(url.trim()) {
        Ok(u) => u.as_str().trim_end_matches('/').to_string(),
        Err(_) => url.trim().trim_end_matches('/').to_string(),
    }
}

/// Whether two management URLs name the same server (and path prefix).
pub fn same_server(a: &str, b: &str) -> bool {
    normalize(a) == normalize(b)
}

/// The servers a credentials Secret's allow-list names (empty entries dropped).
pub fn allow_list(value: &str) -> Vec<String> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(normalize)
        .collect()
}

/// Whether `url` is on the allow-list `value` (the annotation's text).
pub fn allowed(value: &str, url: &str) -> bool {
    let url = normalize(url);
    allow_list(value).contains(&url)
}

/// NetBird takes any non-empty token name; the operator keeps its names to this length so they
/// stay readable in the dashboard.
pub const TOKEN_NAME_MAX: usize = 64;

/// Prefix of every token name the operator creates: `netbird-operator.`. Earlier versions used
/// `netbird-operator-` (`netbird-operator-<namespace>-<name>-<time>`, and before that
/// `netbird-operator-<time>`); no name of theirs starts with this prefix.
pub const TOKEN_NAME_PREFIX: &str = "netbird-operator.";

/// Hex digits of the digest that stands for a NetbirdInstance whose name does not fit.
const DIGEST_HEX: usize = 12;

/// The part of a token name that identifies its NetbirdInstance: `<namespace>.<name>`. A
/// namespace cannot contain `.`, so the first `.` tells where the namespace ends and two different
/// pairs never give one text (`team-a.nb`, `team.a-nb`). When it does not fit, its first characters,
/// `~` (never part of a namespace or a name, so a cut part never equals a whole one) and a digest of
/// the pair.
fn instance_part(namespace: &str, name: &str) -> String {
    let full = format!("{namespace}.{name}");
    // prefix + instance part + "." + ten digits of seconds
    let room = TOKEN_NAME_MAX - TOKEN_NAME_PREFIX.len() - 1 - 10;
    if full.len() <= room {
        return full;
    }
    let digest: String = Sha256::digest(format!("{namespace}/{name}").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..DIGEST_HEX]
        .to_string();
    let keep = room - DIGEST_HEX - 1;
    let head: String = full.chars().take(keep).collect();
    format!("{head}~{digest}")
}

/// The name of a token the operator creates for the NetbirdInstance `namespace/name` at
/// `unix_seconds`: `netbird-operator.<namespace>.<name>.<time>`, cut with a digest to
/// [`TOKEN_NAME_MAX`].
pub fn token_name(namespace: &str, name: &str, unix_seconds: i64) -> String {
    format!(
        "{TOKEN_NAME_PREFIX}{}.{unix_seconds}",
        instance_part(namespace, name)
    )
}

/// Whether a token name on the server is one the operator created for `namespace/name`. Tokens of
/// other instances (sharing the server or the service user), of people, and of older versions of
/// the operator (`netbird-operator-...`, whose names could not tell `team-a/nb` from `team/a-nb`)
/// are not: the operator never deletes a token by a name it cannot tell is its own.
pub fn is_own_token(token: &str, namespace: &str, name: &str) -> bool {
    let prefix = format!("{TOKEN_NAME_PREFIX}{}.", instance_part(namespace, name));
    token
        .strip_prefix(&prefix)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_of_the_same_server_match() {
        assert!(same_server(
            "https://NetBird.example.com/",
            "https://netbird.example.com"
        ));
        assert!(same_server(
            "https://nb.example.com:443/api-prefix/",
            "https://nb.example.com/api-prefix"
        ));
        assert!(!same_server(
            "https://nb.example.com",
            "http://nb.example.com"
        ));
        assert!(!same_server(
            "https://nb.example.com",
            "https://nb.example.com:8443"
        ));
        assert!(!same_server(
            "https://nb.example.com",
            "https://evil.example.com"
        ));
        assert!(!same_server(
            "https://nb.example.com/a",
            "https://nb.example.com/b"
        ));
    }

    #[test]
    fn allow_lists_take_commas_and_spaces() {
        let v = "https://a.example.com, https://b.example.com/\n http://127.0.0.1:8080";
        assert!(allowed(v, "https://a.example.com/"));
        assert!(allowed(v, "https://b.example.com"));
        assert!(allowed(v, "http://127.0.0.1:8080"));
        assert!(!allowed(v, "https://c.example.com"));
        assert!(!allowed("", "https://a.example.com"));
    }

    #[test]
    fn token_names_identify_their_instance() {
        let n = token_name("netbird", "nb", 1_700_000_000);
        assert_eq!(n, "netbird-operator.netbird.nb.1700000000");
        assert!(is_own_token(&n, "netbird", "nb"));
        assert!(!is_own_token(&n, "netbird", "nb2"));
        assert!(!is_own_token(&n, "other", "nb"));
        assert!(!is_own_token(
            "netbird-operator-1700000000",
            "netbird",
            "nb"
        ));
        assert!(!is_own_token("setup-token", "netbird", "nb"));
        assert!(!is_own_token(
            "netbird-operator.netbird.nb.",
            "netbird",
            "nb"
        ));
        assert!(!is_own_token(
            "netbird-operator.netbird.nb.17x",
            "netbird",
            "nb"
        ));
        // names of earlier versions are never taken for its own (they could be another
        // instance's)
        assert!(!is_own_token(
            "netbird-operator-netbird-nb-1700000000",
            "netbird",
            "nb"
        ));
    }

    #[test]
    fn pairs_that_read_alike_with_a_dash_get_different_names() {
        // team-a/nb and team/a-nb share a server and a service user: neither may take the other's
        // tokens for its own (the clean-up after a failed rotation deletes what it takes for its
        // own)
        let a = token_name("team-a", "nb", 1_700_000_000);
        let b = token_name("team", "a-nb", 1_700_000_000);
        assert_ne!(a, b);
        assert!(is_own_token(&a, "team-a", "nb"));
        assert!(is_own_token(&b, "team", "a-nb"));
        assert!(!is_own_token(&a, "team", "a-nb"), "{a}");
        assert!(!is_own_token(&b, "team-a", "nb"), "{b}");
        // names with dots (allowed in a NetbirdInstance's name, never in a namespace) too
        let c = token_name("a", "b.c", 1_700_000_000);
        assert!(
            !is_own_token(&c, "a-b", "c") && !is_own_token(&c, "a", "b"),
            "{c}"
        );
        // and when both are cut with a digest
        let ns = "x".repeat(40);
        let d = token_name(&format!("{ns}-a"), "nb", 1_700_000_000);
        let e = token_name(&ns, "a-nb", 1_700_000_000);
        assert!(!is_own_token(&d, &ns, "a-nb") && !is_own_token(&e, &format!("{ns}-a"), "nb"));
    }

    #[test]
    fn long_names_are_cut_with_a_digest() {
        let ns = "a".repeat(63);
        let a = token_name(&ns, &"b".repeat(63), 1_700_000_000);
        let b = token_name(&ns, &format!("{}c", "b".repeat(62)), 1_700_000_000);
        assert!(a.len() <= TOKEN_NAME_MAX, "{a}");
        assert_ne!(
            a, b,
            "the digest tells instances with the same beginning apart"
        );
        assert!(is_own_token(&a, &ns, &"b".repeat(63)));
        assert!(!is_own_token(&a, &ns, &format!("{}c", "b".repeat(62))));
    }
}
