//! Process-wide TLS setup: rustls with the `ring` provider (no OpenSSL anywhere, clean ARM builds).

use std::sync::Once;

static INSTALL: Once = Once::new();

/// Installs `ring` as rustls' process-wide crypto provider; idempotent.
pub fn install_crypto_provider() {
    INSTALL.call_once(|| {
        // Err only when another provider was installed first, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
