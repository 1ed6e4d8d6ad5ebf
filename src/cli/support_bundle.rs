//! `hvac-edge support-bundle`: one tar file a technician can send to the integrator, with what
//! it takes to understand a site and nothing secret: the config with secret-looking values and
//! URL credentials redacted (secret *files* are never read), `check-config`'s verdict, `queue
//! stats` and `sources` as JSON, the database's integrity, the last 2000 journal lines of the
//! service (when journalctl exists), and versions. Read-only on the database; works while the
//! daemon runs.

use crate::config;
use crate::store::{self, outbox};
use std::path::{Path, PathBuf};

/// Key names whose values are never copied (a secret put in the wrong place by hand).
fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    if k.ends_with("_file")
        || k.ends_with("_env")
        || k.ends_with("_header")
        || k.ends_with("_query")
    {
        return false;
    }
    [
        "password",
        "secret",
        "token",
        "api_key",
        "apikey",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
}

fn redact_value(key: &str, v: &mut toml::Value) {
    match v {
        toml::Value::String(s) if is_secret_key(key) => *s = "[redacted]".into(),
        toml::Value::String(s) => *s = config::redact_userinfo(s),
        toml::Value::Array(a) => a.iter_mut().for_each(|x| redact_value(key, x)),
        toml::Value::Table(t) => t.iter_mut().for_each(|(k, x)| redact_value(k, x)),
        other if is_secret_key(key) => *other = toml::Value::String("[redacted]".into()),
        _ => {}
    }
}

/// The config text with secret-looking values replaced, or why it could not be read.
fn redacted_config(path: &Path) -> String {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return format!("# cannot read {}: {e}\n", path.display()),
    };
    match toml::from_str::<toml::Table>(&text) {
        Ok(mut t) => {
            t.iter_mut().for_each(|(k, v)| redact_value(k, v));
            format!(
                "# {} as the daemon reads it, secret-looking values redacted\n{}",
                path.display(),
                toml::to_string(&t).unwrap_or_default()
            )
        }
        // Not TOML: do not copy a text we cannot redact.
        Err(e) => format!(
            "# {} is not valid TOML ({}); not copied\n",
            path.display(),
            e.message()
        ),
    }
}

fn check_config(path: &Path) -> String {
    match config::load(path) {
        Ok(cfg) => {
            let mut s = format!("valid: gateway {}\n", cfg.gateway.id);
            for w in cfg.warnings() {
                s.push_str(&format!("warning: {w}\n"));
            }
            s
        }
        Err(e) => format!("{e}\n"),
    }
}

fn database(db: &Path) -> (String, String, String) {
    let conn = match store::open(db, store::Mode::ReadOnly, &store::Options::default()) {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot open {}: {e}\n", db.display());
            return (msg.clone(), msg.clone(), msg);
        }
    };
    let now = crate::telemetry::now_ms();
    let stats = outbox::queue_stats(&conn, db, now)
        .map_err(|e| e.to_string())
        .and_then(|q| serde_json::to_string_pretty(&q).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| format!("queue stats failed: {e}"));
    let sources = outbox::source_status(&conn, db)
        .map_err(|e| e.to_string())
        .and_then(|l| {
            let v: Vec<_> = l.into_iter().map(|(s, _)| s).collect();
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())
        })
        .unwrap_or_else(|e| format!("sources failed: {e}"));
    let check: Vec<String> = conn
        .prepare("PRAGMA quick_check")
        .and_then(|mut st| {
            st.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_else(|e| vec![format!("quick_check failed: {e}")]);
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap_or(-1);
    let integrity = format!(
        "database {}\nschema version {version}\nquick_check: {}\n",
        db.display(),
        check.join("; ")
    );
    (stats, sources, integrity)
}

fn journal() -> String {
    match std::process::Command::new("journalctl")
        .args([
            "-u",
            "hvac-edge",
            "-n",
            "2000",
            "--no-pager",
            "-o",
            "short-iso",
        ])
        .output()
    {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            if !o.status.success() {
                s.push_str(&format!(
                    "\njournalctl exited {}: {}\n",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            s
        }
        Err(e) => format!("journalctl not available: {e}\n"),
    }
}

/// Writes the bundle to `out` (default `hvac-edge-support-<unix time>.tar` here); returns it.
///
/// # Errors
/// When the tar file cannot be written.
pub fn run(config_path: &Path, db: Option<&Path>, out: Option<&Path>) -> anyhow::Result<PathBuf> {
    let now = crate::telemetry::now_ms();
    let out = out.map_or_else(
        || PathBuf::from(format!("hvac-edge-support-{}.tar", now / 1000)),
        Path::to_path_buf,
    );
    let db = match db {
        Some(d) => d.to_path_buf(),
        None => config::load(config_path)
            .map(|c| c.store.path)
            .unwrap_or_else(|_| PathBuf::from("/var/lib/hvac-edge/hvac-edge.db")),
    };
    let (stats, sources, integrity) = database(&db);
    let version = format!(
        "hvac-edge {}\ncreated {}\n",
        env!("CARGO_PKG_VERSION"),
        crate::model::format_rfc3339_ms(now)
    );
    let files: [(&str, String); 7] = [
        ("version.txt", version),
        ("config.toml", redacted_config(config_path)),
        ("check-config.txt", check_config(config_path)),
        ("queue-stats.json", stats),
        ("sources.json", sources),
        ("integrity.txt", integrity),
        ("journal.txt", journal()),
    ];
    write_tar(&out, &files, now / 1000)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    Ok(out)
}

fn write_tar(out: &Path, files: &[(&str, String)], mtime: i64) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)?;
    let mut tar = tar::Builder::new(f);
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(u64::try_from(mtime).unwrap_or(0));
        h.set_cksum();
        tar.append_data(&mut h, format!("hvac-edge-support/{name}"), body.as_bytes())?;
    }
    tar.into_inner()?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_looking_values_and_url_credentials_are_redacted_paths_kept() {
        let mut t: toml::Table = toml::from_str(
            r#"
[[sinks.webhook]]
url = "https://user:pw@x.example.com/h"
client_secret = "s3cret"
signing_secret_file = "/etc/hvac-edge/secrets/w"
api_key_header = "x-api-key"
[sources]
password = 1234
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        t.iter_mut().for_each(|(k, v)| redact_value(k, v));
        let s = toml::to_string(&t).unwrap_or_default();
        assert!(
            !s.contains("s3cret") && !s.contains("pw@") && !s.contains("1234"),
            "{s}"
        );
        assert!(
            s.contains("/etc/hvac-edge/secrets/w") && s.contains("x-api-key"),
            "{s}"
        );
    }
}
