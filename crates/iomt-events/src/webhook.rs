//! Standard Webhooks signatures (v1.0.0): `webhook-id`, `webhook-timestamp` and
//! `webhook-signature` over `id.timestamp.body`, HMAC-SHA256 with the endpoint's `whsec_`
//! secret. Receivers verify them with any Standard Webhooks library.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A signing secret: the bytes behind `whsec_<base64>`.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why a secret cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a webhook secret is `whsec_` and 24 to 64 base64-encoded random bytes")]
pub struct SecretError;

impl std::str::FromStr for Secret {
    type Err = SecretError;

    fn from_str(text: &str) -> Result<Self, SecretError> {
        let encoded = text.strip_prefix("whsec_").ok_or(SecretError)?;
        let bytes = STANDARD.decode(encoded).map_err(|_| SecretError)?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(SecretError);
        }
        Ok(Self(bytes))
    }
}

impl Secret {
    /// The `webhook-signature` header value for a message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // Any key length is accepted by HMAC.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_the_reference_libraries() {
        // The example of the Standard Webhooks reference libraries' tests.
        let secret: Secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        let signature = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!("whsec_c2hvcnQ=".parse::<Secret>().is_err());
        assert!(
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
                .parse::<Secret>()
                .is_err()
        );
        assert_eq!(format!("{secret:?}"), "Secret(***)");
    }
}
