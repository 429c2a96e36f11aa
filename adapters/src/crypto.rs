//! Encryption at rest: AES-256-GCM with keys that rotate.
//!
//! Every sealed blob names the key that sealed it, so a [`Keyring`] can hold the
//! current key and any number of older ones: the newest key (the highest
//! [`KeyId`]) seals, every key in the ring opens. Rotating is adding a key with a
//! higher id, then re-sealing old blobs with [`Keyring::reencrypt`] (the stores do
//! this for every row with `reencrypt_all`) and finally dropping the old key.
//!
//! Each blob is bound to a context given by the caller as associated data (the
//! stores use the connection id): a blob copied to another row does not open.
//! Opening never returns garbage: a wrong key, a flipped bit, a blob from another
//! connection or a truncated blob is a typed [`CryptoError`].
//!
//! Blob format (version 1):
//!
//! ```text
//! [0x01][key id: u32 big-endian][nonce: 12 random bytes][ciphertext || 16-byte GCM tag]
//! ```
//!
//! The version byte and the key id are authenticated together with the caller's
//! associated data. Nonces come from the operating system's RNG; with 96-bit random
//! nonces a key should seal fewer than 2^32 blobs, far beyond what a token store
//! writes before its key is rotated.
//!
//! ```
//! use tokenfence::crypto::{EncryptionKey, KeyId, Keyring};
//!
//! let old = Keyring::new(KeyId(1), EncryptionKey::generate()?);
//! let blob = old.seal(b"connection-a", b"refresh token")?;
//!
//! // Rotate: key 2 seals from now on, key 1 still opens old blobs.
//! let ring = old.clone().with_key(KeyId(2), EncryptionKey::generate()?)?;
//! assert_eq!(ring.open(b"connection-a", &blob)?.as_slice(), b"refresh token");
//! let resealed = ring.reencrypt(b"connection-a", &blob)?;
//! assert_eq!(Keyring::key_id_of(&resealed)?, KeyId(2));
//!
//! // Bound to its context: the same blob under another connection does not open.
//! assert!(ring.open(b"connection-b", &resealed).is_err());
//! # Ok::<(), tokenfence::crypto::CryptoError>(())
//! ```

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use std::collections::BTreeMap;
use std::fmt;
use zeroize::Zeroizing;

/// The blob format version this module writes.
const VERSION: u8 = 1;
/// Version byte + key id.
const HEADER_LEN: usize = 1 + 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// The shortest well-formed blob: header, nonce and tag around an empty plaintext.
pub const MIN_BLOB_LEN: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// AES-256 key length in bytes.
pub const KEY_LEN: usize = 32;

/// The name of a key in a [`Keyring`], written into every blob it seals. The
/// highest id in a keyring is the one that seals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub u32);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why sealing or opening failed. Never carries key material or plaintext.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The blob is shorter than any blob this module writes.
    #[error("sealed blob is truncated: {len} bytes, a sealed blob has at least {MIN_BLOB_LEN}")]
    Truncated {
        /// The blob's length.
        len: usize,
    },
    /// The blob starts with a format version this build does not know.
    #[error("sealed blob has format version {0}, this build reads only version {VERSION}")]
    UnsupportedVersion(u8),
    /// The blob was sealed with a key that is not in the keyring.
    #[error(
        "sealed blob names key id {0}, which is not in the keyring; add that key to the keyring"
    )]
    UnknownKeyId(KeyId),
    /// Authentication failed: the key with that id is not the one that sealed the
    /// blob, the blob was altered, or it was sealed for another context (a
    /// ciphertext copied from another connection's row).
    #[error("sealed blob failed authentication under key id {0}: wrong key, tampered data, or a ciphertext from another connection")]
    Undecryptable(KeyId),
    /// Key material could not be used.
    #[error("invalid encryption key: {0}")]
    InvalidKey(&'static str),
    /// The keyring already has a key with this id.
    #[error("the keyring already holds key id {0}")]
    DuplicateKeyId(KeyId),
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Rng,
    /// The plaintext is too long for one AES-GCM message.
    #[error("plaintext too long to seal")]
    TooLong,
}

/// A 256-bit AES key. Zeroized on drop; `Debug` never shows it.
#[derive(Clone)]
pub struct EncryptionKey(Zeroizing<[u8; KEY_LEN]>);

impl EncryptionKey {
    /// A fresh random key from the operating system's RNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        OsRng
            .try_fill_bytes(key.as_mut())
            .map_err(|_| CryptoError::Rng)?;
        Ok(EncryptionKey(key))
    }

    /// A key from exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != KEY_LEN {
            return Err(CryptoError::InvalidKey(
                "an AES-256 key is exactly 32 bytes",
            ));
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(bytes);
        Ok(EncryptionKey(key))
    }

    /// A key from standard base64 (with padding) of 32 bytes, as printed by
    /// [`to_base64`](Self::to_base64). Surrounding whitespace is ignored.
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| CryptoError::InvalidKey("not valid base64"))?,
        );
        Self::from_slice(&bytes)
    }

    /// The key as standard base64, to put in a secret store. Handle with care.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0.as_ref()))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(self.0.as_ref()))
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

/// Keys by id: the newest (highest id) sealing key seals, all open.
///
/// A key can be added *open only* first: a rolling deploy gives every process the
/// new key that way, and only once all have it does the next deploy let it seal
/// (so no process ever meets a row it cannot open). Spec: `"3:NEWKEY:open,2:OLDKEY"`
/// (stage 1), then `"3:NEWKEY,2:OLDKEY"` (stage 2), then `reencrypt`, then drop 2
/// (no sooner than ten minutes after stage 2: a pending authorization sealed
/// with 2 lives that long and is not re-sealed).
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<KeyId, EncryptionKey>,
    /// Keys that open but never seal.
    open_only: std::collections::BTreeSet<KeyId>,
}

impl Keyring {
    /// A keyring with one key.
    pub fn new(id: KeyId, key: EncryptionKey) -> Self {
        Keyring {
            keys: BTreeMap::from([(id, key)]),
            open_only: Default::default(),
        }
    }

    /// Adds a key that opens blobs but never seals (stage 1 of a roll-out).
    pub fn with_open_only_key(
        mut self,
        id: KeyId,
        key: EncryptionKey,
    ) -> Result<Self, CryptoError> {
        self = self.with_key(id, key)?;
        self.open_only.insert(id);
        Ok(self)
    }

    /// Adds a key. A higher id than any sealing key present makes it the sealing
    /// key; a lower one is kept to open older blobs.
    pub fn with_key(mut self, id: KeyId, key: EncryptionKey) -> Result<Self, CryptoError> {
        if self.keys.contains_key(&id) {
            return Err(CryptoError::DuplicateKeyId(id));
        }
        self.keys.insert(id, key);
        Ok(self)
    }

    /// A keyring from text such as `"2:BASE64KEY,1:BASE64KEY"` (for example from an
    /// environment variable): comma-separated `id:key` pairs, keys in standard
    /// base64; `id:key:open` adds a key that opens but does not seal. Errors name
    /// what is wrong, never a key.
    pub fn from_spec(spec: &str) -> Result<Self, CryptoError> {
        let mut keys = BTreeMap::new();
        let mut open_only = std::collections::BTreeSet::new();
        for entry in spec.split(',').filter(|e| !e.trim().is_empty()) {
            let (id, key) = entry.split_once(':').ok_or(CryptoError::InvalidKey(
                "keyring entries are `id:base64-key` or `id:base64-key:open`",
            ))?;
            let (key, only_opens) = match key.split_once(':') {
                Some((key, "open")) => (key, true),
                Some(_) => {
                    return Err(CryptoError::InvalidKey(
                        "the only flag a keyring entry takes is `:open`",
                    ))
                }
                None => (key, false),
            };
            let id = KeyId(
                id.trim()
                    .parse()
                    .map_err(|_| CryptoError::InvalidKey("key ids are unsigned 32-bit numbers"))?,
            );
            if keys.insert(id, EncryptionKey::from_base64(key)?).is_some() {
                return Err(CryptoError::DuplicateKeyId(id));
            }
            if only_opens {
                open_only.insert(id);
            }
        }
        if keys.is_empty() {
            return Err(CryptoError::InvalidKey("the keyring holds no key"));
        }
        if keys.keys().all(|id| open_only.contains(id)) {
            return Err(CryptoError::InvalidKey(
                "every key is open-only: one must seal",
            ));
        }
        Ok(Keyring { keys, open_only })
    }

    /// The id of the key that seals: the highest that is not open-only.
    pub fn current(&self) -> KeyId {
        // A keyring always holds a sealing key: `new` adds one, `from_spec`
        // refuses a ring without, `with_open_only_key` only adds.
        self.keys
            .keys()
            .rev()
            .find(|id| !self.open_only.contains(id))
            .copied()
            .unwrap_or(KeyId(0))
    }

    /// Every key id, in ascending order.
    pub fn key_ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.keys().copied()
    }

    /// The key id a blob names, without opening it.
    pub fn key_id_of(blob: &[u8]) -> Result<KeyId, CryptoError> {
        if blob.len() < MIN_BLOB_LEN {
            return Err(CryptoError::Truncated { len: blob.len() });
        }
        if blob[0] != VERSION {
            return Err(CryptoError::UnsupportedVersion(blob[0]));
        }
        Ok(KeyId(u32::from_be_bytes([
            blob[1], blob[2], blob[3], blob[4],
        ])))
    }

    /// Seals `plaintext` under the newest key, bound to `context` (associated data
    /// that must be given again to open it).
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let id = self.current();
        let key = self.keys.get(&id).ok_or(CryptoError::UnknownKeyId(id))?;
        let mut nonce = [0u8; NONCE_LEN];
        OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|_| CryptoError::Rng)?;
        let header = header(id);
        let aad = associated_data(&header, context);
        let ciphertext = key
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::TooLong)?;
        let mut blob = Vec::with_capacity(HEADER_LEN + NONCE_LEN + ciphertext.len());
        blob.extend_from_slice(&header);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ciphertext);
        Ok(blob)
    }

    /// Opens a blob sealed for `context` by any key in the ring. The plaintext is
    /// zeroized when dropped.
    pub fn open(&self, context: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let id = Self::key_id_of(blob)?;
        let key = self.keys.get(&id).ok_or(CryptoError::UnknownKeyId(id))?;
        let (header, rest) = blob.split_at(HEADER_LEN);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let aad = associated_data(header, context);
        key.cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Undecryptable(id))
    }

    /// Re-seals a blob under the newest key (a fresh nonce even when the blob is
    /// already under it). Fails, changing nothing, if the blob does not open.
    pub fn reencrypt(&self, context: &[u8], blob: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let plaintext = self.open(context, blob)?;
        self.seal(context, &plaintext)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("open_only", &self.open_only)
            .field("current", &self.current())
            .finish()
    }
}

fn header(id: KeyId) -> [u8; HEADER_LEN] {
    let id = id.0.to_be_bytes();
    [VERSION, id[0], id[1], id[2], id[3]]
}

/// The header is authenticated along with the caller's context, length-prefixed
/// so that no two (header, context) pairs give the same bytes.
fn associated_data(header: &[u8], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 8 + context.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(&(context.len() as u64).to_be_bytes());
    aad.extend_from_slice(context);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> EncryptionKey {
        EncryptionKey::from_slice(&[byte; KEY_LEN]).unwrap()
    }

    #[test]
    fn seal_then_open_round_trips() {
        let ring = Keyring::new(KeyId(7), key(1));
        let blob = ring.seal(b"conn-a", b"RT-secret").unwrap();
        assert_eq!(Keyring::key_id_of(&blob).unwrap(), KeyId(7));
        assert_eq!(blob.len(), MIN_BLOB_LEN + b"RT-secret".len());
        assert_eq!(
            ring.open(b"conn-a", &blob).unwrap().as_slice(),
            b"RT-secret"
        );
        // The plaintext does not appear in the blob.
        assert!(!blob.windows(9).any(|w| w == b"RT-secret"));
    }

    #[test]
    fn a_key_rolls_out_open_only_first_then_seals() {
        let b64 = |n| key(n).to_base64().as_str().to_owned();
        let old = Keyring::from_spec(&format!("1:{}", b64(1))).unwrap();
        let stage1 = Keyring::from_spec(&format!("2:{}:open,1:{}", b64(2), b64(1))).unwrap();
        let stage2 = Keyring::from_spec(&format!("2:{},1:{}", b64(2), b64(1))).unwrap();
        // Stage 1 seals with the old key, so old processes open what it writes...
        assert_eq!(stage1.current(), KeyId(1));
        let written = stage1.seal(b"c", b"RT").unwrap();
        assert_eq!(old.open(b"c", &written).unwrap().as_slice(), b"RT");
        // ...and opens what stage 2 writes with the new one.
        assert_eq!(stage2.current(), KeyId(2));
        let newer = stage2.seal(b"c", b"RT").unwrap();
        assert_eq!(stage1.open(b"c", &newer).unwrap().as_slice(), b"RT");
        // The same through the builder API.
        let built = Keyring::new(KeyId(1), key(1))
            .with_open_only_key(KeyId(2), key(2))
            .unwrap();
        assert_eq!(built.current(), KeyId(1));
        assert!(format!("{built:?}").contains("open_only"));
        // A ring must seal with something, and flags are checked.
        assert!(Keyring::from_spec(&format!("2:{}:open", b64(2))).is_err());
        let err = Keyring::from_spec(&format!("2:{}:seal", b64(2))).unwrap_err();
        assert!(!err.to_string().contains(&b64(2)), "{err}");
    }

    #[test]
    fn nonces_are_fresh_for_every_seal() {
        let ring = Keyring::new(KeyId(1), key(1));
        let a = ring.seal(b"c", b"same").unwrap();
        let b = ring.seal(b"c", b"same").unwrap();
        assert_ne!(a, b);
        assert_ne!(
            a[HEADER_LEN..HEADER_LEN + NONCE_LEN],
            b[HEADER_LEN..HEADER_LEN + NONCE_LEN]
        );
    }

    #[test]
    fn blob_for_another_context_does_not_open() {
        let ring = Keyring::new(KeyId(1), key(1));
        let blob = ring.seal(b"conn-a", b"RT").unwrap();
        assert_eq!(
            ring.open(b"conn-b", &blob),
            Err(CryptoError::Undecryptable(KeyId(1)))
        );
        // Length-prefixing keeps "conn" + "-a" distinct from "conn-a" splits.
        assert!(ring.open(b"conn-", &blob).is_err());
    }

    #[test]
    fn wrong_key_with_same_id_is_an_authentication_error() {
        let blob = Keyring::new(KeyId(1), key(1)).seal(b"c", b"RT").unwrap();
        let other = Keyring::new(KeyId(1), key(2));
        assert_eq!(
            other.open(b"c", &blob),
            Err(CryptoError::Undecryptable(KeyId(1)))
        );
    }

    #[test]
    fn unknown_key_id_is_named() {
        let blob = Keyring::new(KeyId(3), key(1)).seal(b"c", b"RT").unwrap();
        let other = Keyring::new(KeyId(1), key(1));
        let err = other.open(b"c", &blob).unwrap_err();
        assert_eq!(err, CryptoError::UnknownKeyId(KeyId(3)));
        assert!(err.to_string().contains("key id 3"), "{err}");
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let ring = Keyring::new(KeyId(1), key(1));
        let blob = ring.seal(b"c", b"refresh-token").unwrap();
        for i in 0..blob.len() {
            for bit in 0..8 {
                let mut bad = blob.clone();
                bad[i] ^= 1 << bit;
                let err = ring.open(b"c", &bad).unwrap_err();
                let expected_kind = match i {
                    0 => matches!(err, CryptoError::UnsupportedVersion(_)),
                    1..=4 => matches!(err, CryptoError::UnknownKeyId(_)),
                    _ => err == CryptoError::Undecryptable(KeyId(1)),
                };
                assert!(expected_kind, "byte {i} bit {bit}: {err:?}");
            }
        }
    }

    #[test]
    fn truncated_blobs_are_typed_errors() {
        let ring = Keyring::new(KeyId(1), key(1));
        let blob = ring.seal(b"c", b"refresh-token").unwrap();
        for len in 0..blob.len() {
            let err = ring.open(b"c", &blob[..len]).unwrap_err();
            if len < MIN_BLOB_LEN {
                assert_eq!(err, CryptoError::Truncated { len });
            } else {
                assert_eq!(err, CryptoError::Undecryptable(KeyId(1)), "len {len}");
            }
        }
    }

    #[test]
    fn newest_key_seals_and_old_keys_still_open() {
        let old = Keyring::new(KeyId(1), key(1));
        let old_blob = old.seal(b"c", b"RT-1").unwrap();
        let ring = old.with_key(KeyId(2), key(2)).unwrap();
        assert_eq!(ring.current(), KeyId(2));
        let new_blob = ring.seal(b"c", b"RT-2").unwrap();
        assert_eq!(Keyring::key_id_of(&new_blob).unwrap(), KeyId(2));
        assert_eq!(ring.open(b"c", &old_blob).unwrap().as_slice(), b"RT-1");
        // Adding an older id later does not change the sealing key.
        let ring = ring.with_key(KeyId(0), key(9)).unwrap();
        assert_eq!(ring.current(), KeyId(2));
        assert_eq!(
            ring.clone().with_key(KeyId(2), key(3)).unwrap_err(),
            CryptoError::DuplicateKeyId(KeyId(2))
        );
    }

    #[test]
    fn reencrypt_moves_a_blob_to_the_newest_key() {
        let old = Keyring::new(KeyId(1), key(1));
        let blob = old.seal(b"c", b"RT").unwrap();
        let ring = old.with_key(KeyId(5), key(5)).unwrap();
        let resealed = ring.reencrypt(b"c", &blob).unwrap();
        assert_eq!(Keyring::key_id_of(&resealed).unwrap(), KeyId(5));
        let only_new = Keyring::new(KeyId(5), key(5));
        assert_eq!(only_new.open(b"c", &resealed).unwrap().as_slice(), b"RT");
        // A blob that does not open is not re-sealed.
        assert_eq!(
            ring.reencrypt(b"other", &blob),
            Err(CryptoError::Undecryptable(KeyId(1)))
        );
    }

    #[test]
    fn unsupported_version_is_named() {
        let ring = Keyring::new(KeyId(1), key(1));
        let mut blob = ring.seal(b"c", b"RT").unwrap();
        blob[0] = 9;
        assert_eq!(
            ring.open(b"c", &blob),
            Err(CryptoError::UnsupportedVersion(9))
        );
    }

    #[test]
    fn keys_never_show_in_debug_or_errors() {
        let k = key(0xAB);
        let b64 = k.to_base64();
        let shown = format!("{k:?} {:?}", Keyring::new(KeyId(4), k.clone()));
        assert!(!shown.contains(b64.as_str()), "{shown}");
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
        // A malformed spec names no key text.
        let err = Keyring::from_spec("1:not-base64-SECRETVALUE").unwrap_err();
        assert!(!err.to_string().contains("SECRETVALUE"), "{err}");
    }

    #[test]
    fn keys_parse_from_base64_and_specs() {
        let k = EncryptionKey::generate().unwrap();
        let b64 = k.to_base64();
        let again = EncryptionKey::from_base64(&format!(" {} \n", b64.as_str())).unwrap();
        let blob = Keyring::new(KeyId(1), k).seal(b"c", b"x").unwrap();
        assert_eq!(
            Keyring::new(KeyId(1), again)
                .open(b"c", &blob)
                .unwrap()
                .as_slice(),
            b"x"
        );
        let ring = Keyring::from_spec(&format!("1:{},2:{}", b64.as_str(), b64.as_str())).unwrap();
        assert_eq!(ring.key_ids().collect::<Vec<_>>(), vec![KeyId(1), KeyId(2)]);
        assert_eq!(ring.current(), KeyId(2));
        assert!(matches!(
            EncryptionKey::from_base64("c2hvcnQ="),
            Err(CryptoError::InvalidKey(_))
        ));
        assert!(matches!(
            Keyring::from_spec(""),
            Err(CryptoError::InvalidKey(_))
        ));
        assert!(matches!(
            Keyring::from_spec(&format!("x:{}", b64.as_str())),
            Err(CryptoError::InvalidKey(_))
        ));
        assert_eq!(
            Keyring::from_spec(&format!("3:{},3:{}", b64.as_str(), b64.as_str())).unwrap_err(),
            CryptoError::DuplicateKeyId(KeyId(3))
        );
    }

    #[test]
    fn generated_keys_differ() {
        let a = EncryptionKey::generate().unwrap().to_base64();
        let b = EncryptionKey::generate().unwrap().to_base64();
        assert_ne!(a, b);
    }
}
