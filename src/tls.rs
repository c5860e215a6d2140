//! Process-wide TLS setup.

/// Installs ring as the process's rustls crypto provider. kube and reqwest both use rustls; with
/// one provider chosen explicitly, neither can panic on an ambiguous default. Idempotent.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // another thread may have won the race: that provider is the same
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
