//! Property tests on credential extraction and the key format.

use std::time::SystemTime;

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;

use portcullis::api_key::{KeyDigest, KeyRecord, KeyStore, check_prefix, generate_key, parse_key};
use portcullis::authenticate::{
    CredentialError, CredentialSource, extract_credential, parse_api_key_header,
    parse_authorization,
};
use portcullis::rejection::DenialReason;

/// A credential as a client could send it: printable ASCII without spaces.
fn token() -> impl Strategy<Value = String> {
    "[!-~]{1,80}"
}

fn ows() -> impl Strategy<Value = String> {
    "[ \t]{0,3}"
}

/// A scheme name in random case.
fn cased(word: &'static str) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), word.len()).prop_map(move |upper| {
        word.chars()
            .zip(upper)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

#[derive(Clone, Debug)]
enum Cred {
    Header(String),
    Bearer(String),
    ApiKey(String),
    Basic,
}

fn cred() -> impl Strategy<Value = Cred> {
    prop_oneof![
        token().prop_map(Cred::Header),
        token().prop_map(Cred::Bearer),
        token().prop_map(Cred::ApiKey),
        Just(Cred::Basic),
    ]
}

proptest! {
    #[test]
    fn api_key_header_trims_only_surrounding_whitespace(t in token(), a in ows(), b in ows()) {
        let v = format!("{a}{t}{b}");
        prop_assert_eq!(parse_api_key_header(v.as_bytes()), Ok(t.as_str()));
    }

    #[test]
    fn api_key_header_refuses_inner_whitespace_controls_and_non_ascii(
        a in token(), b in token(), bad in prop_oneof![Just(b' '), Just(b'\t'), 0u8..0x20, 0x7fu8..=0xff],
    ) {
        let v = [a.as_bytes(), &[bad], b.as_bytes()].concat();
        prop_assert_eq!(parse_api_key_header(&v), Err(CredentialError::Malformed));
    }

    #[test]
    fn authorization_schemes_in_any_case(
        scheme in prop_oneof![cased("bearer"), cased("apikey")],
        spaces in "[ ]{1,4}", t in token(), b in ows(),
    ) {
        let v = format!("{scheme}{spaces}{t}{b}");
        let want = if scheme.eq_ignore_ascii_case("bearer") {
            CredentialSource::Bearer
        } else {
            CredentialSource::ApiKeyScheme
        };
        prop_assert_eq!(parse_authorization(v.as_bytes()), Ok(Some((want, t.as_str()))));
        // The scheme alone, or with only whitespace after it, is malformed.
        let bare = format!("{scheme}{b}");
        prop_assert_eq!(parse_authorization(bare.as_bytes()), Err(CredentialError::Malformed));
    }

    #[test]
    fn other_schemes_are_left_alone(scheme in "[A-Za-z]{1,12}", rest in "[ -~]{0,40}") {
        prop_assume!(!scheme.eq_ignore_ascii_case("bearer") && !scheme.eq_ignore_ascii_case("apikey"));
        let v = format!("{scheme} {rest}");
        prop_assert_eq!(parse_authorization(v.as_bytes()), Ok(None));
    }

    #[test]
    fn exactly_one_credential_is_extracted(creds in proptest::collection::vec(cred(), 0..4)) {
        let mut h = HeaderMap::new();
        let mut ours = Vec::new();
        for c in &creds {
            let (name, value) = match c {
                Cred::Header(t) => { ours.push(t.clone()); ("x-api-key", t.clone()) }
                Cred::Bearer(t) => { ours.push(t.clone()); ("authorization", format!("Bearer {t}")) }
                Cred::ApiKey(t) => { ours.push(t.clone()); ("authorization", format!("ApiKey {t}")) }
                Cred::Basic => ("authorization", "Basic dXNlcjpwYXNz".to_owned()),
            };
            h.append(name, HeaderValue::from_str(&value).unwrap());
        }
        let got = extract_credential(&h, None, None);
        match ours.len() {
            0 => prop_assert_eq!(got, Ok(None)),
            1 => prop_assert_eq!(got.unwrap().unwrap().expose_secret(), ours[0].as_str()),
            _ => prop_assert_eq!(got, Err(CredentialError::Multiple)),
        }
    }

    #[test]
    fn generated_keys_round_trip(prefix in "[a-z][a-z0-9_]{0,20}[a-z0-9]") {
        prop_assume!(check_prefix(&prefix).is_ok());
        let k = generate_key(&prefix).unwrap();
        let parsed = parse_key(k.expose_secret()).unwrap();
        prop_assert_eq!(parsed.prefix(), prefix.as_str());
        prop_assert_eq!(KeyDigest::parse(&k.digest().to_string()).unwrap(), k.digest());
    }

    #[test]
    fn the_checksum_catches_one_substitution_or_adjacent_swap(
        pos in any::<proptest::sample::Index>(), c in "[0-9A-Za-z_]", swap in any::<bool>(),
    ) {
        let k = generate_key("pc_test").unwrap();
        let original = k.expose_secret().as_bytes();
        let mut bytes = original.to_vec();
        if swap {
            let i = pos.index(bytes.len() - 1);
            bytes.swap(i, i + 1);
        } else {
            let i = pos.index(bytes.len());
            bytes[i] = c.as_bytes()[0];
        }
        prop_assume!(bytes != original);
        let changed = String::from_utf8(bytes).unwrap();
        prop_assert!(parse_key(&changed).is_err());
    }

    #[test]
    fn a_store_accepts_its_keys_and_nothing_else(n in 1usize..8, probe in "[!-~]{0,300}") {
        let keys: Vec<_> = (0..n).map(|_| generate_key("pc_test").unwrap()).collect();
        let store = KeyStore::from_records(
            keys.iter().enumerate().map(|(i, k)| KeyRecord::new(&format!("k{i}"), k.digest()).unwrap()),
        ).unwrap();
        let now = SystemTime::now();
        for (i, k) in keys.iter().enumerate() {
            let p = store.verify(k.expose_secret(), now).unwrap();
            prop_assert_eq!(p.id(), format!("k{i}"));
        }
        let e = store.verify(&probe, now).unwrap_err();
        prop_assert!(matches!(e.reason(), DenialReason::InvalidKeyFormat | DenialReason::UnknownKey));
        prop_assert_eq!(e.key_id(), None);
    }
}
