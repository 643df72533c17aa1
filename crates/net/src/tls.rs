//! rustls configurations: TLS 1.3 only, aws-lc-rs, ALPN `fedveil/1`, and on
//! the client a verifier that accepts exactly the pinned certificate.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::identity::{Fingerprint, ServerIdentity};
use crate::{ALPN, NetError};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn transport(idle: Duration) -> Result<Arc<quinn::TransportConfig>, NetError> {
    let mut t = quinn::TransportConfig::default();
    let keep_alive = (idle / 3).min(Duration::from_secs(5));
    let idle = quinn::IdleTimeout::try_from(idle).map_err(|e| NetError::Tls(e.to_string()))?;
    t.max_idle_timeout(Some(idle));
    // Keep-alives well inside the idle timeout, so that only a dead peer
    // (or network) times out.
    t.keep_alive_interval(Some(keep_alive));
    // A client needs a control stream and a few data streams, no more.
    t.max_concurrent_bidi_streams(16u32.into());
    t.max_concurrent_uni_streams(16u32.into());
    Ok(Arc::new(t))
}

/// The server's QUIC configuration.
pub(crate) fn server_config(
    identity: &ServerIdentity,
    idle: Duration,
) -> Result<quinn::ServerConfig, NetError> {
    let tls = |e: rustls::Error| NetError::Tls(e.to_string());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert()], identity.key())
        .map_err(tls)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(cfg).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport(idle)?);
    Ok(server)
}

/// Accepts exactly the certificate whose SHA-256 is pinned, and checks the
/// handshake signatures against its key.
#[derive(Debug)]
struct PinnedCert {
    pin: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Fingerprint::of(end_entity) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration offers TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client's QUIC configuration that trusts only the pinned certificate.
pub(crate) fn client_config(
    pin: Fingerprint,
    idle: Duration,
) -> Result<quinn::ClientConfig, NetError> {
    let provider = provider();
    let verifier = PinnedCert {
        pin,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(cfg).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport(idle)?);
    Ok(client)
}
