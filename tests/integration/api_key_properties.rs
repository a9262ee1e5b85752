//! Property tests on the key store: it accepts its keys and nothing else.

use std::time::SystemTime;

use proptest::prelude::*;

use portcullis::api_key::{KeyRecord, KeyStore, generate_key};
use portcullis::rejection::DenialReason;

proptest! {
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
