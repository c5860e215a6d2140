//! The owner account's credentials, read from the credentials Secret and checked before any call
//! to NetBird (the same checks the server makes, so a bad Secret never reaches it).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use secrecy::{ExposeSecret, SecretString};

use crate::crd::CredentialsSecretRef;

/// Email, password and display name of the owner. Debug output hides the password.
#[derive(Clone)]
pub struct Credentials {
    pub email: String,
    pub password: SecretString,
    pub name: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("email", &self.email)
            .field("password", &"[redacted]")
            .field("name", &self.name)
            .finish()
    }
}

impl Credentials {
    /// The text fingerprinted for the token Secret's `credentials-fingerprint` annotation.
    pub fn fingerprint_input(&self) -> SecretString {
        SecretString::from(format!("{}\n{}", self.email, self.password.expose_secret()))
    }
}

/// What is wrong with the credentials Secret. Messages name keys, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("credentials Secret {secret} has no key {key:?}")]
    MissingKey { secret: String, key: String },
    #[error("key {key:?} of credentials Secret {secret} is not UTF-8 text")]
    NotText { secret: String, key: String },
    #[error("key {key:?} of credentials Secret {secret} is not a valid email address ({why})")]
    InvalidEmail {
        secret: String,
        key: String,
        why: &'static str,
    },
    /// The password's length is never said (no function of a password leaves its Secret).
    #[error(
        "the password in key {key:?} of credentials Secret {secret} is {bound}; NetBird needs 8 to \
         72 bytes"
    )]
    PasswordLength {
        secret: String,
        key: String,
        bound: &'static str,
    },
    #[error(
        "the name in key {key:?} of credentials Secret {secret} is over 255 characters or holds \
         control characters"
    )]
    InvalidName { secret: String, key: String },
}

/// Reads and checks the credentials from a Secret's data.
pub fn parse(
    secret: &str,
    data: &BTreeMap<String, ByteString>,
    keys: &CredentialsSecretRef,
) -> Result<Credentials, CredentialsError> {
    let text =
        |key: &str| -> Result<Option<String>, CredentialsError> {
            match data.get(key) {
                None => Ok(None),
                Some(v) => String::from_utf8(v.0.clone()).map(Some).map_err(|_| {
                    CredentialsError::NotText {
                        secret: secret.into(),
                        key: key.into(),
                    }
                }),
            }
        };
    let required = |key: &str| -> Result<String, CredentialsError> {
        text(key)?.ok_or_else(|| CredentialsError::MissingKey {
            secret: secret.into(),
            key: key.into(),
        })
    };

    let email = required(&keys.email_key)?;
    if let Err(why) = check_email(&email) {
        return Err(CredentialsError::InvalidEmail {
            secret: secret.into(),
            key: keys.email_key.clone(),
            why,
        });
    }
    let password = required(&keys.password_key)?;
    if !(8..=72).contains(&password.len()) {
        return Err(CredentialsError::PasswordLength {
            secret: secret.into(),
            key: keys.password_key.clone(),
            bound: if password.len() < 8 {
                "shorter than 8 bytes"
            } else {
                "longer than 72 bytes"
            },
        });
    }
    let name = match text(&keys.name_key)? {
        Some(n) if !n.trim().is_empty() => {
            let n = n.trim().to_string();
            if n.chars().count() > 255 || n.chars().any(|c| c.is_control() || invisible(c)) {
                return Err(CredentialsError::InvalidName {
                    secret: secret.into(),
                    key: keys.name_key.clone(),
                });
            }
            n
        }
        _ => email.clone(),
    };
    Ok(Credentials {
        email,
        password: SecretString::from(password),
        name,
    })
}

/// Zero-width and bidirectional-control characters: they make two different strings look alike.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{feff}'
    )
}

/// A plain check of `local@domain` that matches what NetBird accepts for common mistakes.
fn check_email(email: &str) -> Result<(), &'static str> {
    if email.is_empty() {
        return Err("it is empty");
    }
    if email.len() > 254 {
        return Err("it is over 254 characters");
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it contains whitespace, perhaps a trailing newline");
    }
    if email.chars().any(invisible) {
        return Err("it contains invisible or direction-changing characters");
    }
    let (local, domain) = email.rsplit_once('@').ok_or("it has no @")?;
    if local.is_empty() || domain.is_empty() {
        return Err("it needs text on both sides of @");
    }
    if local.contains('@') {
        return Err("it has more than one @");
    }
    if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
        return Err("its domain is malformed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> CredentialsSecretRef {
        CredentialsSecretRef {
            name: "admin".into(),
            email_key: "email".into(),
            password_key: "password".into(),
            name_key: "name".into(),
        }
    }

    fn data(pairs: &[(&str, &[u8])]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
            .collect()
    }

    #[test]
    fn name_defaults_to_email() {
        let c = parse(
            "admin",
            &data(&[("email", b"a@example.com"), ("password", b"12345678")]),
            &keys(),
        )
        .unwrap();
        assert_eq!(c.name, "a@example.com");
        let c = parse(
            "admin",
            &data(&[
                ("email", b"a@example.com"),
                ("password", b"12345678"),
                ("name", b" Ada "),
            ]),
            &keys(),
        )
        .unwrap();
        assert_eq!(c.name, "Ada");
    }

    #[test]
    fn each_bad_input_names_the_key_not_the_value() {
        let cases: Vec<(BTreeMap<String, ByteString>, &str)> = vec![
            (data(&[("password", b"12345678")]), "has no key \"email\""),
            (
                data(&[("email", b"a@example.com")]),
                "has no key \"password\"",
            ),
            (
                data(&[("email", b"nope"), ("password", b"12345678")]),
                "has no @",
            ),
            (
                data(&[("email", b"a@example.com\n"), ("password", b"12345678")]),
                "trailing newline",
            ),
            (
                data(&[("email", b"a@example.com"), ("password", b"abcde")]),
                "is shorter than 8 bytes",
            ),
            (
                data(&[("email", b"a@example.com"), ("password", &[b'x'; 73])]),
                "is longer than 72 bytes",
            ),
            (
                data(&[
                    ("email", b"a@example.com"),
                    ("password", &[0xff, 0xfe, 1, 2, 3, 4, 5, 6]),
                ]),
                "not UTF-8",
            ),
        ];
        for (d, want) in cases {
            let err = parse("admin", &d, &keys()).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(!err.contains("12345678") && !err.contains("abcde"), "{err}");
            // no function of the password either: its length is not said
            assert!(!err.contains(" 5 ") && !err.contains("73"), "{err}");
        }
    }

    #[test]
    fn password_length_counts_bytes() {
        // 24 three-byte characters = 72 bytes: allowed; 25 = 75 bytes: refused
        let ok = "€".repeat(24);
        assert!(
            parse(
                "s",
                &data(&[("email", b"a@b.c"), ("password", ok.as_bytes())]),
                &keys()
            )
            .is_ok()
        );
        let long = "€".repeat(25);
        assert!(
            parse(
                "s",
                &data(&[("email", b"a@b.c"), ("password", long.as_bytes())]),
                &keys()
            )
            .is_err()
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let c = parse(
            "s",
            &data(&[("email", b"a@b.c"), ("password", b"hunter2hunter2")]),
            &keys(),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
