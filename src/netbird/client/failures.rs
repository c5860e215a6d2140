//! What a failed call reports: NetBird's error answers, transport failures (DNS, connect, TLS,
//! timeout) and undecodable answers as `NetbirdError`s. Server messages lose token hashes,
//! redirect targets keep their origin only, and decode errors quote nothing of the body.

use reqwest::StatusCode;
use url::Url;

use crate::netbird::error::{Endpoint, NetbirdError, TransportKind};
use crate::netbird::types::ErrorBody;

/// What a decode error says, without any part of the body: serde's own message quotes the value it
/// could not take (`invalid type: string "..."`), and a server's answer may hold anything, a token
/// included. Only the kind of failure, the position, and a missing field's name (one of the
/// operator's own types) are kept.
pub(super) fn decode_detail(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Syntax => "not valid JSON".to_string(),
        Category::Eof => "the JSON ends early".to_string(),
        Category::Io => "the body could not be read".to_string(),
        Category::Data => {
            let text = e.to_string();
            match text
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(field, _)| field)
                .filter(|f| f.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            {
                Some(field) => format!("the field {field} is missing"),
                None => "a value has another type or shape than NetBird's".to_string(),
            }
        }
    };
    format!("{what}, at line {} column {}", e.line(), e.column())
}

/// An error answer: NetBird's JSON message, or a short excerpt of a non-JSON body.
pub(super) fn api_error(
    endpoint: Endpoint,
    status: StatusCode,
    body: &[u8],
    request_id: Option<String>,
) -> NetbirdError {
    let parsed = serde_json::from_slice::<ErrorBody>(body);
    let from_netbird = parsed.as_ref().is_ok_and(|b| b.code == status.as_u16());
    let message = match parsed {
        Ok(b) => b.message,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>()
                .trim()
                .to_string();
            if text.is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("no message")
                    .to_lowercase()
            } else {
                text
            }
        }
    };
    NetbirdError::Api {
        endpoint,
        status: status.as_u16(),
        message: scrub(&message),
        request_id,
        from_netbird,
    }
}

/// A server message as the operator keeps it: at most 200 characters, and long opaque words (a
/// token's hash in "invalid token: pat: <hash> not found") replaced, so no function of a token
/// reaches a condition, an Event or a log line.
fn scrub(message: &str) -> String {
    let opaque = |w: &str| {
        w.len() >= 24
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=_-".contains(&b))
            && w.bytes().any(|b| b.is_ascii_digit())
    };
    message
        .split(' ')
        .map(|w| if opaque(w) { "[redacted]" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

/// A URL with any user:password removed (for error messages).
/// A redirect target as reported: its origin only (no credentials, path or query, which an SSO
/// gateway makes new on every answer); a relative target without its query.
pub(super) fn redact_url(s: &str) -> String {
    match Url::parse(s) {
        Ok(u) if u.origin().is_tuple() => u.origin().ascii_serialization(),
        Ok(u) => format!("{}:", u.scheme()),
        Err(_) => s
            .split(['?', '#'])
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .filter(|c| !c.is_control())
            .collect(),
    }
}

pub(super) fn transport_error(endpoint: Endpoint, e: &reqwest::Error) -> NetbirdError {
    let chain = error_chain(e);
    let lower = chain.to_lowercase();
    let kind = if e.is_timeout() || lower.contains("timed out") {
        TransportKind::Timeout
    } else if lower.contains("dns error")
        || lower.contains("failed to lookup")
        || lower.contains("name or service not known")
    {
        TransportKind::Dns
    } else if has_source::<rustls::Error>(e)
        || [
            "certificate",
            "tls",
            "handshake",
            "corrupt message",
            "peer is incompatible",
            "peer misbehaved",
            "alert",
        ]
        .iter()
        .any(|w| lower.contains(w))
    {
        TransportKind::Tls
    } else if e.is_connect() {
        TransportKind::Connect
    } else {
        TransportKind::Other
    };
    NetbirdError::Transport {
        endpoint,
        kind,
        detail: chain,
    }
}

fn has_source<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        // io::Error hides its inner error from source(): look inside
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && inner.is::<E>()
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The messages of an error and its sources, joined, without repeats.
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_location_is_its_origin_only() {
        assert_eq!(
            redact_url("https://u:p@evil.example/x"),
            "https://evil.example"
        );
        assert_eq!(
            redact_url("https://sso.example:8443/oauth2/start?rd=%2F&state=4f9a"),
            "https://sso.example:8443"
        );
    }

    #[test]
    fn server_messages_lose_token_hashes() {
        assert_eq!(
            scrub("invalid token: pat: jqethtqbbwixwx67ozgcwf1huu5pcsl1eztseukpkoq= not found"),
            "invalid token: pat: [redacted] not found"
        );
        assert_eq!(scrub("setup already completed"), "setup already completed");
        assert_eq!(scrub(&"x".repeat(500)).len(), 200);
    }

    #[test]
    fn decode_errors_quote_nothing_of_the_body() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct T {
            id: u64,
            kind: K,
        }
        #[derive(Debug, serde::Deserialize)]
        enum K {
            A,
        }
        for (body, want) in [
            (r#"{"id": "nbp_echoed_value", "kind": "A"}"#, "another type"),
            (r#"{"id": 1, "kind": "nbp_echoed_value"}"#, "another type"),
            (r#"{"kind": "A"}"#, "the field id is missing"),
            (r#"{"id": 1, "nbp_echoed_value"#, "ends early"),
            ("nbp_echoed_value", "not valid JSON"),
        ] {
            let e = serde_json::from_str::<T>(body).unwrap_err();
            let d = decode_detail(&e);
            assert!(d.contains(want), "{body}: {d}");
            assert!(!d.contains("echoed"), "{body}: {d}");
        }
    }
}
