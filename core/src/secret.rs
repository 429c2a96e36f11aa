//! Secrets are their own types: redacted `Debug`, no `Display`, zeroized on drop.
//!
//! Only [`expose`](RefreshToken::expose) hands out the raw value, so every place that
//! sends a secret anywhere is easy to find with grep.

use alloc::string::String;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

macro_rules! secret_string {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a raw value.
            pub fn new(value: impl Into<String>) -> Self {
                $name(value.into())
            }

            /// The raw value. Call only where the secret must leave the process
            /// (an HTTP request, an encrypted store row).
            pub fn expose(&self) -> &str {
                &self.0
            }

            /// Length of the raw value in bytes (safe to log).
            pub fn len(&self) -> usize {
                self.0.len()
            }

            /// Whether the raw value is empty.
            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, concat!(stringify!($name), "(<redacted {} bytes>)"), self.0.len())
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                self.0.zeroize();
            }
        }
    };
}

secret_string!(
    /// An OAuth access token (bearer credential for API calls).
    AccessToken
);
secret_string!(
    /// An OAuth refresh token: the long-lived credential of a connection.
    RefreshToken
);
secret_string!(
    /// An OAuth client secret.
    ClientSecret
);
secret_string!(
    /// Any other secret text, such as an `Authorization` header value or a form body
    /// that carries a token.
    SecretString
);

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn debug_never_shows_the_value() {
        let t = RefreshToken::new("AB11-very-secret");
        let shown = format!("{t:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert_eq!(shown, "RefreshToken(<redacted 16 bytes>)");
    }
}
