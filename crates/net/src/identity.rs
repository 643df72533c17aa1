//! Server certificates and client identities (protocols/federation.md §2.1).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::{CryptoRng, RngCore};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::NetError;
use crate::files::{Access, check_private, write_atomically};

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The SHA-256 of a certificate's DER encoding, written `sha256:<hex>`.
#[derive(Copy, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let h = s.strip_prefix("sha256:").unwrap_or(s);
        unhex::<32>(h).map(Fingerprint).ok_or_else(|| {
            NetError::Malformed(format!(
                "a fingerprint is sha256: and 64 hex digits, got '{s}'"
            ))
        })
    }
}

/// The server's certificate and private key. The key is zeroized on drop
/// and never printed.
#[derive(Clone)]
pub struct ServerIdentity {
    cert_der: Vec<u8>,
    key_der: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("fingerprint", &self.fingerprint())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ServerIdentity {
    /// A fresh self-signed ECDSA P-256 certificate for `names` (DNS names or
    /// IP addresses the clients will connect to).
    pub fn generate(names: &[String]) -> Result<Self, NetError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| NetError::Tls(e.to_string()))?;
        let params = rcgen::CertificateParams::new(names.to_vec())
            .map_err(|e| NetError::Tls(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| NetError::Tls(e.to_string()))?;
        Ok(ServerIdentity {
            cert_der: cert.der().to_vec(),
            key_der: Zeroizing::new(key.serialize_der()),
        })
    }

    /// The certificate's fingerprint, for clients to pin.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert_der)
    }

    pub(crate) fn cert(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.to_vec()))
    }

    /// The key of the QUIC stateless-reset tokens (RFC 9000 §10.3.2),
    /// derived from the private key so that it survives a restart: a
    /// restarted server answers packets of its predecessor's connections
    /// with resets the clients accept, and they reconnect at once instead
    /// of waiting out the idle timeout.
    /// The second value keys the check quinn makes that a connection id is
    /// one of this server's; it must survive the restart too, or packets
    /// for the old connections are dropped before a reset is considered.
    pub(crate) fn restart_stable_keys(&self) -> (aws_lc_rs::hmac::Key, u64) {
        use aws_lc_rs::hmac;
        let prf = hmac::Key::new(hmac::HMAC_SHA256, &self.key_der);
        let derive = |label: &[u8]| {
            let tag = hmac::sign(&prf, label);
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(tag.as_ref());
            out
        };
        let reset = derive(b"fedveil/v1 QUIC stateless reset key");
        let cid = derive(b"fedveil/v1 QUIC connection id key");
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&cid[..8]);
        (
            hmac::Key::new(hmac::HMAC_SHA256, &reset[..]),
            u64::from_le_bytes(cid_key),
        )
    }

    /// Writes `cert.pem` and `key.pem` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        let cert = pem_block("CERTIFICATE", &self.cert_der);
        let key = Zeroizing::new(pem_block("PRIVATE KEY", &self.key_der));
        write_file(&dir.join("cert.pem"), cert.as_bytes(), false)?;
        write_file(&dir.join("key.pem"), key.as_bytes(), true)
    }

    /// Reads a PEM certificate and PKCS#8 key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, NetError> {
        let bad = |p: &Path, e: String| NetError::BadFile {
            path: p.display().to_string(),
            reason: e,
        };
        let cert =
            CertificateDer::from_pem_file(cert_path).map_err(|e| bad(cert_path, e.to_string()))?;
        private(key_path)?;
        let key = PrivatePkcs8KeyDer::from_pem_file(key_path)
            .map_err(|e| bad(key_path, e.to_string()))?;
        Ok(ServerIdentity {
            cert_der: cert.to_vec(),
            key_der: Zeroizing::new(key.secret_pkcs8_der().to_vec()),
        })
    }
}

/// A client's public identity key.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientKey(pub [u8; 32]);

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for ClientKey {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let h = s.strip_prefix("ed25519:").unwrap_or(s);
        let bytes = unhex::<32>(h).ok_or_else(|| {
            NetError::Malformed(format!(
                "a client key is ed25519: and 64 hex digits, got '{s}'"
            ))
        })?;
        VerifyingKey::from_bytes(&bytes)
            .map_err(|_| NetError::Malformed(format!("'{s}' is not an ed25519 public key")))?;
        Ok(ClientKey(bytes))
    }
}

impl ClientKey {
    /// Strict ed25519 verification of `signature` over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify_strict(message, &Signature::from_bytes(signature))
            .is_ok()
    }
}

/// A client's ed25519 identity. Zeroized on drop; never printed.
pub struct ClientIdentity(SigningKey);

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ClientIdentity")
            .field(&self.public())
            .finish()
    }
}

impl ClientIdentity {
    /// A fresh identity from a CSPRNG.
    pub fn generate<R: RngCore + CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        ClientIdentity(SigningKey::from_bytes(&seed))
    }

    /// The identity with this 32-byte secret seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        ClientIdentity(SigningKey::from_bytes(seed))
    }

    /// The secret seed (to hand the same key to secure aggregation).
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public key.
    pub fn public(&self) -> ClientKey {
        ClientKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// Writes the seed as hex to `path` (mode 0600).
    pub fn save(&self, path: &Path) -> Result<(), NetError> {
        // Hex straight into a buffer that is wiped: no copy of the seed
        // is left on the heap.
        let mut text = Zeroizing::new([0u8; 65]);
        hex::encode_to_slice(self.seed().as_ref(), &mut text[..64]).map_err(|e| {
            NetError::BadFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            }
        })?;
        text[64] = b'\n';
        write_file(path, &text[..], true)
    }

    /// Reads an identity written by [`ClientIdentity::save`].
    pub fn load(path: &Path) -> Result<Self, NetError> {
        private(path)?;
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|e| NetError::BadFile {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?,
            );
        let seed = Zeroizing::new(unhex::<32>(text.trim()).ok_or_else(|| NetError::BadFile {
            path: path.display().to_string(),
            reason: "expected 64 hex digits (an ed25519 seed)".into(),
        })?);
        Ok(Self::from_seed(&seed))
    }
}

/// Reads an allow-list file: one `ed25519:<hex>` public key per line; blank
/// lines and lines starting with `#` are ignored, and so is anything after
/// the key on a line. An unreadable line is an error naming its number.
pub fn load_allow_list(path: &Path) -> Result<Vec<ClientKey>, NetError> {
    let bad = |reason: String| NetError::BadFile {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let word = line.split_whitespace().next().unwrap_or(line);
        let key = word
            .parse::<ClientKey>()
            .map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
        if keys.contains(&key) {
            return Err(bad(format!("line {}: {key} is listed twice", i + 1)));
        }
        keys.push(key);
    }
    Ok(keys)
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use zeroize::Zeroize;
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    let block = pem::Pem::new(label, der.to_vec());
    let text = pem::encode_config(&block, config);
    // The copy may be a private key.
    block.into_contents().zeroize();
    text
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), NetError> {
    let access = if secret {
        Access::OwnerOnly
    } else {
        Access::Default
    };
    write_atomically(path, bytes, access).map_err(|e| NetError::BadFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Refuses a key file that others may read (see [`check_private`]).
fn private(path: &Path) -> Result<(), NetError> {
    check_private(path).map_err(|reason| NetError::BadFile {
        path: path.display().to_string(),
        reason,
    })
}

/// The message a client signs to prove its key (protocols/federation.md §2.2).
pub fn transcript(nonce: &[u8; 32], exporter: &[u8; 32], key: &ClientKey) -> Vec<u8> {
    let mut m = Vec::with_capacity(128);
    m.extend_from_slice(b"fedveil/net/v1/client-auth\0");
    m.extend_from_slice(nonce);
    m.extend_from_slice(exporter);
    m.extend_from_slice(&key.0);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn keys_and_fingerprints_round_trip_through_text_and_files() {
        let dir = std::env::temp_dir().join(format!("fedveil-net-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = ServerIdentity::generate(&["localhost".into()]).unwrap();
        server.save(&dir).unwrap();
        let back = ServerIdentity::load(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
        assert_eq!(back.fingerprint(), server.fingerprint());
        let fp = server.fingerprint().to_string();
        assert_eq!(fp.parse::<Fingerprint>().unwrap(), server.fingerprint());
        assert!("sha256:12".parse::<Fingerprint>().is_err());
        assert!(!format!("{server:?}").contains("BEGIN"));

        let c = ClientIdentity::generate(&mut ChaCha20Rng::seed_from_u64(1));
        let path = dir.join("client.key");
        c.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(ClientIdentity::load(&path).unwrap().public(), c.public());
        let k = c.public().to_string();
        assert_eq!(k.parse::<ClientKey>().unwrap(), c.public());
        let sig = c.sign(b"hello");
        assert!(c.public().verify(b"hello", &sig));
        assert!(!c.public().verify(b"hellp", &sig));
        let list = dir.join("allow.txt");
        let other = ClientIdentity::generate(&mut ChaCha20Rng::seed_from_u64(2)).public();
        std::fs::write(&list, format!("# clients\n{k}  alice\n\n{other}\n")).unwrap();
        assert_eq!(load_allow_list(&list).unwrap(), vec![c.public(), other]);
        std::fs::write(&list, format!("{k}\ned25519:zz\n")).unwrap();
        let err = load_allow_list(&list).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        std::fs::write(&list, format!("{k}\n{k}\n")).unwrap();
        assert!(
            load_allow_list(&list)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        std::fs::write(&path, "not hex").unwrap();
        assert!(matches!(
            ClientIdentity::load(&path),
            Err(NetError::BadFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
