//! Standard Webhooks symmetric signing (`v1`, HMAC-SHA256) for webhook sinks and the demo receiver.
//! Owns the `whsec_` secret format, the `webhook-*` header values and verification with a timestamp
//! tolerance (see shared/design/protocols.md Part B §5, architecture.md §7).
//! Pure: it never reads the clock (callers pass `timestamp_secs` / `now_secs`) and does no I/O.
//! The secret must never reach `Debug`, `Display` or an error message.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::fmt;

/// Header carrying the message id (stable across retries; the receiver's idempotency key).
pub const HEADER_ID: &str = "webhook-id";
/// Header carrying the Unix seconds of this attempt (new on every retry).
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying the space-separated `version,base64` signature list.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// Prefix of the user-visible secret form, `whsec_<base64>`.
pub const SECRET_PREFIX: &str = "whsec_";
/// Smallest accepted secret, in bytes. The spec asks for 24..=64; 16 is a floor against typos.
pub const MIN_SECRET_BYTES: usize = 16;
/// Tolerance both reference libraries use for `webhook-timestamp`, in seconds (±5 min).
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Standard base64 that accepts input with or without `=` padding, like the Python reference
/// library (which appends `==` before decoding).
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a `whsec_` secret was refused. Messages never contain the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    /// Nothing left after trimming and removing the `whsec_` prefix.
    #[error("webhook secret is empty")]
    Empty,
    /// The part after `whsec_` is not standard base64.
    #[error("webhook secret is not valid base64 (expected whsec_<base64>)")]
    NotBase64,
    /// The decoded secret is shorter than [`MIN_SECRET_BYTES`].
    #[error("webhook secret is {len} bytes; at least {min} bytes are required")]
    TooShort {
        /// Decoded length in bytes.
        len: usize,
        /// The required minimum, [`MIN_SECRET_BYTES`].
        min: usize,
    },
}

/// Why [`verify`] refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// `webhook-timestamp` is further in the past than the tolerance.
    #[error("message timestamp too old ({age_secs} s behind now)")]
    TooOld {
        /// How far behind `now_secs` the timestamp is.
        age_secs: i64,
    },
    /// `webhook-timestamp` is further in the future than the tolerance.
    #[error("message timestamp too new ({ahead_secs} s ahead of now)")]
    TooNew {
        /// How far ahead of `now_secs` the timestamp is.
        ahead_secs: i64,
    },
    /// No `v1` entry in the signature header matched the body.
    #[error("no matching signature found")]
    NoMatchingSignature,
}

/// The raw HMAC secret of one webhook sink. `Debug` prints `SigningKey(<redacted>)`.
#[derive(Clone)]
pub struct SigningKey {
    secret: Vec<u8>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// Parses the user-visible form `whsec_<base64>`.
    ///
    /// Surrounding ASCII whitespace (a trailing newline in a secret file) is ignored; the `whsec_`
    /// prefix and the base64 `=` padding are optional, as in the Python reference library.
    ///
    /// # Errors
    /// [`SigningError::Empty`] for an empty secret, [`SigningError::NotBase64`] when it does not
    /// decode, [`SigningError::TooShort`] when it decodes to fewer than [`MIN_SECRET_BYTES`] bytes.
    pub fn from_whsec(s: &str) -> Result<SigningKey, SigningError> {
        let trimmed = s.trim_ascii();
        let encoded = trimmed.strip_prefix(SECRET_PREFIX).unwrap_or(trimmed);
        if encoded.is_empty() {
            return Err(SigningError::Empty);
        }
        // The decode error is dropped on purpose: its Display names the offending symbol, which is
        // part of the secret.
        let secret = STANDARD_LENIENT
            .decode(encoded)
            .map_err(|_| SigningError::NotBase64)?;
        if secret.is_empty() {
            return Err(SigningError::Empty);
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(SigningError::TooShort {
                len: secret.len(),
                min: MIN_SECRET_BYTES,
            });
        }
        Ok(SigningKey { secret })
    }

    /// Signs one attempt: returns `v1,<base64 HMAC-SHA256(secret, "{msg_id}.{timestamp_secs}.{body}")>`.
    ///
    /// `body` must be the exact bytes sent; `msg_id` must not contain `.` (spec rule, not checked here).
    #[must_use]
    pub fn sign(&self, msg_id: &str, timestamp_secs: i64, body: &[u8]) -> String {
        let tag = self
            .mac_over(msg_id, timestamp_secs, body)
            .finalize()
            .into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }

    /// HMAC state keyed with the secret and fed the signed content, ready to finalize or verify.
    fn mac_over(&self, msg_id: &str, timestamp_secs: i64, body: &[u8]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length (long keys are hashed, short ones padded), so hmac's
        // `new_from_slice` has no failing path for `Hmac<Sha256>`.
        #[allow(clippy::expect_used)]
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC accepts keys of any length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp_secs.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

/// Checks a received message: timestamp within `±tolerance_secs` of `now_secs`, then any `v1`
/// entry of the space-separated `signature_header` matching the body (constant-time comparison of
/// the decoded MAC bytes). Entries of other versions (`v1a`, …) and undecodable entries are skipped.
///
/// # Errors
/// [`VerifyError::TooOld`] / [`VerifyError::TooNew`] when the timestamp is outside the tolerance
/// (checked first, as the reference libraries do); [`VerifyError::NoMatchingSignature`] otherwise.
pub fn verify(
    key: &SigningKey,
    msg_id: &str,
    timestamp_secs: i64,
    signature_header: &str,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let tolerance = tolerance_secs.max(0);
    let age_secs = now_secs.saturating_sub(timestamp_secs);
    if age_secs > tolerance {
        return Err(VerifyError::TooOld { age_secs });
    }
    if age_secs < -tolerance {
        return Err(VerifyError::TooNew {
            ahead_secs: age_secs.saturating_neg(),
        });
    }

    let expected = key.mac_over(msg_id, timestamp_secs, body);
    let matched = signature_header
        .split_ascii_whitespace()
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, sig)| STANDARD_LENIENT.decode(sig).ok())
        .any(|candidate| expected.clone().verify_slice(&candidate).is_ok());
    if matched {
        Ok(())
    } else {
        Err(VerifyError::NoMatchingSignature)
    }
}

/// The three `webhook-*` header values of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// Value of `webhook-id`: the message id, unchanged across retries.
    pub id: String,
    /// Value of `webhook-timestamp`: Unix seconds of this attempt, in decimal.
    pub timestamp: String,
    /// Value of `webhook-signature`: `v1,<base64>`.
    pub signature: String,
}

/// Builds the header values for one attempt at `timestamp_secs` (the caller reads the clock).
#[must_use]
pub fn headers(key: &SigningKey, msg_id: &str, timestamp_secs: i64, body: &[u8]) -> SignedHeaders {
    SignedHeaders {
        id: msg_id.to_owned(),
        timestamp: timestamp_secs.to_string(),
        signature: key.sign(msg_id, timestamp_secs, body),
    }
}

/// Like [`headers`], signed by every key in `keys` (during a rotation the new and the old secret
/// both sign): `webhook-signature` lists one `v1,<base64>` per key, space-separated, as the
/// Standard Webhooks spec allows; a verifier accepts any one it knows.
#[must_use]
pub fn headers_multi(
    keys: &[SigningKey],
    msg_id: &str,
    timestamp_secs: i64,
    body: &[u8],
) -> SignedHeaders {
    let signature = keys
        .iter()
        .map(|k| k.sign(msg_id, timestamp_secs, body))
        .collect::<Vec<_>>()
        .join(" ");
    SignedHeaders {
        id: msg_id.to_owned(),
        timestamp: timestamp_secs.to_string(),
        signature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_keys_sign_twice_and_each_verifies_alone() {
        let old = vector_key();
        let new = SigningKey::from_whsec("whsec_dGhpcyBpcyBhIHNlY29uZCBzZWNyZXQga2V5IQ==")
            .unwrap_or_else(|e| panic!("{e}"));
        let h = headers_multi(
            &[new.clone(), old.clone()],
            VECTOR_ID,
            VECTOR_TS,
            VECTOR_BODY,
        );
        let parts: Vec<&str> = h.signature.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], old.sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY));
        for k in [&old, &new] {
            assert!(
                verify(
                    k,
                    VECTOR_ID,
                    VECTOR_TS,
                    &h.signature,
                    VECTOR_BODY,
                    VECTOR_TS,
                    300
                )
                .is_ok()
            );
        }
    }

    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TS: i64 = 1_614_265_330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn vector_key() -> SigningKey {
        SigningKey::from_whsec(VECTOR_SECRET).unwrap()
    }

    fn check(header: &str, body: &[u8], now: i64) -> Result<(), VerifyError> {
        verify(
            &vector_key(),
            VECTOR_ID,
            VECTOR_TS,
            header,
            body,
            now,
            DEFAULT_TOLERANCE_SECS,
        )
    }

    #[test]
    fn official_test_vector_signs_to_the_published_signature() {
        assert_eq!(
            vector_key().sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY),
            VECTOR_SIG
        );
    }

    #[test]
    fn official_test_vector_verifies_at_its_own_timestamp() {
        assert_eq!(check(VECTOR_SIG, VECTOR_BODY, VECTOR_TS), Ok(()));
    }

    #[test]
    fn headers_carry_id_decimal_timestamp_and_signature() {
        let h = headers(&vector_key(), VECTOR_ID, VECTOR_TS, VECTOR_BODY);
        assert_eq!(
            h,
            SignedHeaders {
                id: VECTOR_ID.to_owned(),
                timestamp: "1614265330".to_owned(),
                signature: VECTOR_SIG.to_owned(),
            }
        );
    }

    #[test]
    fn secret_without_prefix_or_padding_or_with_newline_is_the_same_key() {
        let raw = b"0123456789abcdefghij"; // 20 bytes: base64 ends in one '='
        let padded = STANDARD.encode(raw);
        assert!(padded.ends_with('='));
        let unpadded = padded.trim_end_matches('=');
        let expected = SigningKey {
            secret: raw.to_vec(),
        }
        .sign("m", 1, b"x");
        for input in [
            format!("whsec_{padded}"),
            format!("whsec_{unpadded}"),
            padded.clone(),
            unpadded.to_owned(),
            format!("whsec_{padded}\n"),
        ] {
            let key = SigningKey::from_whsec(&input).unwrap();
            assert_eq!(key.sign("m", 1, b"x"), expected, "input {input:?}");
        }
    }

    #[test]
    fn empty_undecodable_and_short_secrets_are_refused() {
        let short = format!("whsec_{}", STANDARD.encode([7u8; 15]));
        let cases: [(&str, SigningError); 5] = [
            ("", SigningError::Empty),
            ("whsec_", SigningError::Empty),
            ("  \n", SigningError::Empty),
            ("whsec_not*base64!", SigningError::NotBase64),
            (&short, SigningError::TooShort { len: 15, min: 16 }),
        ];
        for (input, want) in cases {
            assert_eq!(
                SigningKey::from_whsec(input).unwrap_err(),
                want,
                "input {input:?}"
            );
        }
        let sixteen = format!("whsec_{}", STANDARD.encode([7u8; 16]));
        assert!(SigningKey::from_whsec(&sixteen).is_ok());
    }

    #[test]
    fn error_messages_are_lowercase_and_never_contain_the_secret() {
        let bad = "whsec_Zm9vYmFy*secretish";
        let msg = SigningKey::from_whsec(bad).unwrap_err().to_string();
        assert!(
            !msg.contains("Zm9vYmFy") && !msg.contains("secretish"),
            "{msg}"
        );
        let short = SigningKey::from_whsec("whsec_c2hvcnQ=")
            .unwrap_err()
            .to_string();
        assert_eq!(
            short,
            "webhook secret is 5 bytes; at least 16 bytes are required"
        );
        assert!(!short.contains("c2hvcnQ"));
        for m in [msg, short] {
            assert!(m.starts_with(|c: char| c.is_ascii_lowercase()), "{m}");
        }
    }

    #[test]
    fn debug_of_a_key_is_redacted() {
        let key = vector_key();
        assert_eq!(format!("{key:?}"), "SigningKey(<redacted>)");
        assert_eq!(format!("{key:#?}"), "SigningKey(<redacted>)");
    }

    #[test]
    fn any_matching_v1_entry_among_several_is_accepted() {
        let header = format!(
            "v1,AAAA v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5= v1,{}",
            &VECTOR_SIG[3..]
        );
        assert_eq!(check(&header, VECTOR_BODY, VECTOR_TS), Ok(()));
        let rotated = format!("{VECTOR_SIG}  v1,{}", STANDARD.encode([0u8; 32]));
        assert_eq!(check(&rotated, VECTOR_BODY, VECTOR_TS), Ok(()));
    }

    #[test]
    fn right_mac_under_another_version_tag_is_not_accepted() {
        let header = format!("v1a,{}", &VECTOR_SIG[3..]);
        assert_eq!(
            check(&header, VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn garbage_and_empty_signature_headers_are_rejected() {
        for header in [
            "",
            "v1",
            "v1,",
            "v1,!!!",
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ] {
            assert_eq!(
                check(header, VECTOR_BODY, VECTOR_TS),
                Err(VerifyError::NoMatchingSignature),
                "header {header:?}"
            );
        }
    }

    #[test]
    fn tampered_body_is_rejected() {
        assert_eq!(
            check(VECTOR_SIG, br#"{"test": 2432232315}"#, VECTOR_TS),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            check(VECTOR_SIG, br#"{"test": 2432232314} "#, VECTOR_TS),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn different_id_or_timestamp_breaks_the_signature() {
        let key = vector_key();
        let r = verify(
            &key,
            "msg_other",
            VECTOR_TS,
            VECTOR_SIG,
            VECTOR_BODY,
            VECTOR_TS,
            300,
        );
        assert_eq!(r, Err(VerifyError::NoMatchingSignature));
        let r = verify(
            &key,
            VECTOR_ID,
            VECTOR_TS + 1,
            VECTOR_SIG,
            VECTOR_BODY,
            VECTOR_TS,
            300,
        );
        assert_eq!(r, Err(VerifyError::NoMatchingSignature));
    }

    #[test]
    fn timestamp_tolerance_is_inclusive_at_300_seconds_either_way() {
        let cases: [(i64, Result<(), VerifyError>); 6] = [
            (299, Ok(())),
            (300, Ok(())),
            (301, Err(VerifyError::TooOld { age_secs: 301 })),
            (-299, Ok(())),
            (-300, Ok(())),
            (-301, Err(VerifyError::TooNew { ahead_secs: 301 })),
        ];
        for (age, want) in cases {
            assert_eq!(
                check(VECTOR_SIG, VECTOR_BODY, VECTOR_TS + age),
                want,
                "age {age}"
            );
        }
    }

    #[test]
    fn stale_timestamp_is_reported_before_a_bad_signature() {
        assert_eq!(
            check("v1,AAAA", VECTOR_BODY, VECTOR_TS + 1000),
            Err(VerifyError::TooOld { age_secs: 1000 })
        );
    }

    #[test]
    fn extreme_clock_values_do_not_overflow() {
        assert!(matches!(
            check(VECTOR_SIG, VECTOR_BODY, i64::MAX),
            Err(VerifyError::TooOld { .. })
        ));
        assert!(matches!(
            check(VECTOR_SIG, VECTOR_BODY, i64::MIN),
            Err(VerifyError::TooNew { .. })
        ));
    }

    #[test]
    fn sign_then_verify_round_trips_for_a_fresh_key() {
        let key =
            SigningKey::from_whsec(&format!("whsec_{}", STANDARD.encode([42u8; 32]))).unwrap();
        let body = br#"[{"id":"evt-1","eventType":"x"}]"#;
        let h = headers(&key, "msg_test123", 1_700_000_000, body);
        let ts: i64 = h.timestamp.parse().unwrap();
        assert_eq!(
            verify(&key, &h.id, ts, &h.signature, body, ts + 10, 300),
            Ok(())
        );
    }
}
