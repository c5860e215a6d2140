//! Client-side check of the NetBird personal access token format.
//!
//! `nbp_` + 30 characters of `[0-9A-Za-z]` + a 6-character checksum: the CRC-32 (IEEE) of the
//! 30 characters, base62-encoded (most significant digit first), left-padded with `0`.

const PREFIX: &str = "nbp_";
const SECRET_LEN: usize = 30;
const CHECKSUM_LEN: usize = 6;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a string is not a NetBird PAT. Never carries the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PatFormatError {
    #[error("the token does not start with nbp_")]
    Prefix,
    #[error("the token is {0} characters long, a NetBird token has 40")]
    Length(usize),
    #[error("the token contains characters other than letters and digits")]
    Charset,
    #[error("the token's checksum does not match (a character was changed or cut off)")]
    Checksum,
}

/// Checks the format and checksum of a PAT without contacting the server.
pub fn check(token: &str) -> Result<(), PatFormatError> {
    let rest = token.strip_prefix(PREFIX).ok_or(PatFormatError::Prefix)?;
    if token.len() != PREFIX.len() + SECRET_LEN + CHECKSUM_LEN {
        return Err(PatFormatError::Length(token.chars().count()));
    }
    if !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(PatFormatError::Charset);
    }
    let (secret, checksum) = rest.split_at(SECRET_LEN);
    if checksum != checksum_of(secret) {
        return Err(PatFormatError::Checksum);
    }
    Ok(())
}

/// The 6-character base62 checksum of the 30-character secret part.
pub fn checksum_of(secret: &str) -> String {
    let mut n = crc32fast::hash(secret.as_bytes());
    let mut digits = [b'0'; CHECKSUM_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&digits).into_owned()
}

/// Builds a well-formed PAT from a 30-character secret (used by test servers).
pub fn from_secret(secret: &str) -> String {
    format!("{PREFIX}{secret}{}", checksum_of(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "abcdefghijABCDEFGHIJ0123456789";

    #[test]
    fn accepts_a_well_formed_token() {
        let t = from_secret(SECRET);
        assert_eq!(t.len(), 40);
        assert_eq!(check(&t), Ok(()));
    }

    #[test]
    fn checksum_is_base62_crc32_left_padded() {
        // crc32("abcdefghijABCDEFGHIJ0123456789") in base62 with the 0-9A-Za-z alphabet
        let n = crc32fast::hash(SECRET.as_bytes());
        let mut m = n;
        let mut s = Vec::new();
        while m > 0 {
            s.push(ALPHABET[(m % 62) as usize]);
            m /= 62;
        }
        s.reverse();
        let expected = format!("{:0>6}", String::from_utf8(s).unwrap());
        assert_eq!(checksum_of(SECRET), expected);
        // a value that needs padding: crc32 of the empty string is 0
        assert_eq!(checksum_of(""), "000000");
    }

    #[test]
    fn rejects_each_kind_of_damage() {
        let t = from_secret(SECRET);
        assert_eq!(
            check(&t.replacen("nbp_", "nbx_", 1)),
            Err(PatFormatError::Prefix)
        );
        assert_eq!(check(&t[..39]), Err(PatFormatError::Length(39)));
        assert_eq!(check(&format!("{t}\n")), Err(PatFormatError::Length(41)));
        let mut bad = t.clone().into_bytes();
        bad[10] = b'-';
        assert_eq!(
            check(std::str::from_utf8(&bad).unwrap()),
            Err(PatFormatError::Charset)
        );
        let mut flipped = t.into_bytes();
        flipped[10] = if flipped[10] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            check(std::str::from_utf8(&flipped).unwrap()),
            Err(PatFormatError::Checksum)
        );
    }

    #[test]
    fn errors_never_contain_the_token() {
        let t = from_secret(SECRET);
        let damaged = format!("{}X", &t[..39]);
        let msg = check(&damaged).unwrap_err().to_string();
        assert!(!msg.contains(SECRET));
    }
}
