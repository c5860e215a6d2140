//! Property tests: the PAT checksum and the parsing of anything a server may answer.

use netbird_operator::netbird::{InstanceStatus, PersonalAccessToken, User, VersionInfo, pat};
use proptest::prelude::*;

fn secret() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[0-9A-Za-z]{30}").unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_minted_token_passes(s in secret()) {
        let t = pat::from_secret(&s);
        prop_assert_eq!(t.len(), 40);
        prop_assert!(pat::check(&t).is_ok());
    }

    /// CRC-32 detects every single-character change of the secret part.
    #[test]
    fn any_single_character_change_is_caught(s in secret(), pos in 0usize..30, c in proptest::char::range('0', 'z')) {
        prop_assume!(c.is_ascii_alphanumeric());
        let t = pat::from_secret(&s);
        let mut bytes = t.clone().into_bytes();
        prop_assume!(bytes[4 + pos] != c as u8);
        bytes[4 + pos] = c as u8;
        let changed = String::from_utf8(bytes).unwrap();
        prop_assert!(pat::check(&changed).is_err());
    }

    /// No input makes the checker panic, and an error never carries the input.
    #[test]
    fn the_checker_never_panics_or_echoes(input in any::<String>()) {
        if let Err(e) = pat::check(&input) {
            let msg = e.to_string();
            prop_assert!(input.len() < 8 || !msg.contains(&input));
        }
    }

    /// Arbitrary bytes from a server are an error or a value, never a panic.
    #[test]
    fn parsing_arbitrary_answers_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<InstanceStatus>(&body);
        let _ = serde_json::from_slice::<VersionInfo>(&body);
        let _ = serde_json::from_slice::<User>(&body);
        let _ = serde_json::from_slice::<Option<Vec<PersonalAccessToken>>>(&body);
    }

    /// JSON of the right shape with arbitrary field values parses or fails cleanly.
    #[test]
    fn parsing_odd_json_never_panics(a in any::<String>(), b in any::<bool>(), n in any::<i64>()) {
        let v = serde_json::json!({"management_current_version": a, "management_update_available": b,
            "dashboard_available_version": n, "setup_required": a});
        let _ = serde_json::from_value::<VersionInfo>(v.clone());
        let _ = serde_json::from_value::<InstanceStatus>(v);
    }
}
