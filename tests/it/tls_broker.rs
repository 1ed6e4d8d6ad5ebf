//! A real mosquitto with a TLS listener, and the PKI it needs, for the MQTT-over-TLS tests
//! (issue 11 item 20).
//!
//! [`Pki::create`] runs the `openssl` command line in the test's temp dir: a CA, a server
//! certificate for 127.0.0.1 and localhost signed by it, a client certificate signed by it, and a
//! second, unrelated CA. [`TlsBroker::start`] runs mosquitto with two listeners on 127.0.0.1 at
//! free ports: TLS (optionally `require_certificate true`) for the daemon, and plain TCP so the
//! test publishes with the harness's [`Publisher`]. Logs everything (`log_type all`); killed on
//! drop. Started like `harness/mosquitto.rs` does (free port, retries, TCP wait), not by it: that
//! broker has a single plain listener.

use crate::harness::mosquitto::MISSING;
use crate::harness::wait::{POLL, wait_until_async};
use crate::harness::{Sandbox, free_port};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to tell a machine without the openssl command line.
const OPENSSL_MISSING: &str = "openssl not found: apt-get install -y openssl";
/// How long the broker may take to accept TCP connections on both listeners.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many port pairs are tried when one was taken in between.
const START_ATTEMPTS: usize = 5;

/// The PEM files made by [`Pki::create`] (keys are mode 0600).
pub struct Pki {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
    /// Server certificate: subjectAltName IP:127.0.0.1, DNS:localhost; serverAuth.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Client certificate (CN hvac-edge-it); clientAuth.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Extensions for the CA and the leaf certificates (webpki wants CA:TRUE on the CA, a
/// subjectAltName and the right extendedKeyUsage on leaves).
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{OPENSSL_MISSING} ({e})"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// Makes the certificates in `<sandbox>/pki` (EC P-256, valid for ten years).
    pub fn create(sb: &Sandbox) -> Pki {
        let dir = sb.path().join("pki");
        std::fs::create_dir(&dir).expect("pki dir");
        std::fs::write(dir.join("openssl.cnf"), OPENSSL_CNF).expect("write openssl.cnf");
        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (name, cn) in [
            ("ca", "hvac-edge-it-ca"),
            ("other-ca", "hvac-edge-it-other-ca"),
        ] {
            let (key, pem, subj) = (
                format!("{name}.key"),
                format!("{name}.pem"),
                format!("/CN={cn}"),
            );
            let mut args = vec!["req", "-x509", "-new"];
            args.extend(new_key);
            args.extend([
                "-keyout", &key, "-out", &pem, "-days", "3650", "-subj", &subj,
            ]);
            args.extend(["-config", "openssl.cnf", "-extensions", "ca"]);
            openssl(&dir, &args);
        }
        for (name, cn, serial) in [
            ("server", "localhost", "2"),
            ("client", "hvac-edge-it", "3"),
        ] {
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let subj = format!("/CN={cn}");
            let mut args = vec!["req", "-new"];
            args.extend(new_key);
            args.extend([
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &subj,
                "-config",
                "openssl.cnf",
            ]);
            openssl(&dir, &args);
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-set_serial",
                    serial,
                    "-days",
                    "3650",
                    "-out",
                    &pem,
                    "-extfile",
                    "openssl.cnf",
                    "-extensions",
                    name,
                ],
            );
        }
        for key in ["ca.key", "other-ca.key", "server.key", "client.key"] {
            std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600 a key");
        }
        Pki {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

/// A running mosquitto with a TLS and a plain listener on 127.0.0.1; killed and reaped on drop.
pub struct TlsBroker {
    child: Child,
    tls_port: u16,
    plain_port: u16,
    dir: tempfile::TempDir,
}

impl TlsBroker {
    /// Starts the broker with the server certificate of `pki`; with `require_certificate`, TLS
    /// clients must present a certificate signed by `pki.ca`. Waits until both listeners
    /// accept TCP connections.
    pub fn start(pki: &Pki, require_certificate: bool) -> TlsBroker {
        let binary = [
            "/usr/sbin",
            "/usr/local/sbin",
            "/sbin",
            "/usr/bin",
            "/usr/local/bin",
        ]
        .iter()
        .map(|d| Path::new(d).join("mosquitto"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{MISSING}"));
        let dir = tempfile::Builder::new()
            .prefix("it-mosquitto-tls-")
            .tempdir()
            .expect("temp dir for mosquitto");
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let (tls_port, plain_port) = (free_port(), free_port());
            if tls_port == plain_port {
                continue;
            }
            match spawn(
                &binary,
                dir.path(),
                pki,
                tls_port,
                plain_port,
                require_certificate,
            ) {
                Ok(child) => {
                    return TlsBroker {
                        child,
                        tls_port,
                        plain_port,
                        dir,
                    };
                }
                Err(why) => last_failure = why,
            }
        }
        panic!("mosquitto (TLS) did not start after {START_ATTEMPTS} attempts: {last_failure}");
    }

    /// The TLS listener's port.
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// The plain listener's port (for the test's publisher).
    pub fn plain_port(&self) -> u16 {
        self.plain_port
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// How many log lines contain `needle`.
    pub fn count_lines_containing(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until the broker has sent `n` SUBACKs to `client_id`.
    pub async fn wait_subscribed(&self, client_id: &str, n: usize, timeout: Duration) {
        let needle = format!("Sending SUBACK to {client_id}");
        wait_until_async(
            &format!("{n} SUBACK(s) from mosquitto to {client_id}"),
            timeout,
            || self.count_lines_containing(&needle) >= n,
        )
        .await;
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(
    binary: &Path,
    dir: &Path,
    pki: &Pki,
    tls_port: u16,
    plain_port: u16,
    require_certificate: bool,
) -> Result<Child, String> {
    let log = dir.join("mosquitto.log");
    let conf = dir.join("mosquitto.conf");
    // As root, mosquitto 2 drops to the `mosquitto` user, which cannot read our temp dir.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root\n"
    } else {
        ""
    };
    let text = format!(
        "per_listener_settings false\n\
         allow_anonymous true\n\
         persistence false\n\
         log_dest file {log}\n\
         log_type all\n\
         {user}\
         listener {plain_port} 127.0.0.1\n\
         listener {tls_port} 127.0.0.1\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         require_certificate {require_certificate}\n",
        log = log.display(),
        ca = pki.ca.display(),
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
    );
    std::fs::write(&conf, text).map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
    let stderr = std::fs::File::create(dir.join("mosquitto.stderr"))
        .map_err(|e| format!("cannot create stderr file: {e}"))?;
    let mut child = Command::new(binary)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot spawn {}: {e}", binary.display()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    let up = |port: u16| {
        TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(200),
        )
        .is_ok()
    };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let err = std::fs::read_to_string(dir.join("mosquitto.stderr")).unwrap_or_default();
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "mosquitto exited with {status} (ports {tls_port}, {plain_port})\nstderr: {err}\nlog: {log}"
            ));
        }
        if up(plain_port) && up(tls_port) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "mosquitto did not accept connections on ports {tls_port} and {plain_port} within {START_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(POLL);
    }
}
