//! The append-only list of schema migrations; `PRAGMA user_version` counts how many ran.
//!
//! Rules (cargo's `util/sqlite.rs`): never edit, remove or reorder a released entry; only append.
//! Each entry runs inside the one exclusive transaction that also bumps `user_version`.
//!
//! Tables (v1):
//! - `devices`: the diff cache, checkpointed by the writer; `meta.checkpoint_pos` says up to which
//!   event it is current (later events are replayed at start, see `writer.rs`).
//! - `events`: the append-only outbox; `pos` is commit order and what sink cursors point at.
//! - `sinks`: one row per sink: cursor and delivery status. Written only by that sink (and the CLI).
//! - `dead_letters`: events a sink gave up on, with the reason; never deleted silently.
//! - MQTT receipts ((pkid, digest) of committed messages, to drop stale redeliveries) are stored on
//!   the last event row of their commit (`events.receipts`: no extra page per commit), or in
//!   `mqtt_recent` when a commit produced no event, and when garbage collection deletes the
//!   event that carried them.
//! - `meta`: counters and markers (`checkpoint_pos`, `evicted_events`).
//!
//! Added in v2:
//! - `source_status`: one row per source, the JSON of `sources::SourceStatus` (link state, last
//!   valid data, counters, Modbus units), written by the writer at most every few seconds and
//!   only when it changed; read by `hvac-edge sources`. Status only: never needed for delivery.

//!
//! Added in v3:
//! - `mqtt_recent.pos`: the commit position a receipt row belongs to (the last `pos` committed
//!   when it was written, or the `pos` of the event it was carried from by garbage collection or
//!   eviction), so that receipts are loaded, trimmed and kept in commit order: the newest survive.

//!
//! Added in v4:
//! - `sink_control`: what a technician sets for a sink (enabled or not, a note, who and when).
//!   The daemon only reads it; its own status stays in `sinks`, so a technician's write is never
//!   overwritten by the daemon's next save.

//!
//! Added in v5 (fan-out: webhook and MQTT sinks):
//! - `sinks.successes`, `banned_until`, `disabled_at`, `config_digest`, `last_duration_ms`:
//!   delivery health of a sink (`config_digest` re-enables a `DISABLED_DUE_TO_ERRORS` sink
//!   whose configuration changed).
//! - `sink_attempts`: the last failed attempts of each sink (status, 0 = no answer; duration;
//!   error kind; a capped response snippet), for a technician. Successes are only counted in
//!   `sinks` (one row per delivered request would wear the flash for nothing).

//!
//! Added in v6 (live reload):
//! - `reloads`: the outcome of each configuration reload (who asked is the signal's sender, so
//!   only when and what): `ok`, and `outcome`, the JSON of `daemon::ReloadOutcome` (components
//!   started, stopped and restarted, or every problem that kept the old config running). The
//!   daemon writes it; `hvac-edge reload` waits for the row and prints it. The last 100 stay.
//! - `meta.daemon_pid`, `meta.daemon_started_at`: the running daemon's process id and start
//!   time (ms), written at start, so the CLI can find the process to signal.

//!
//! Added in v7 (technician control path):
//! - `control`: every change a technician makes (`queue retry`, `queue purge`, `sinks enable`,
//!   `sinks disable`, `sinks test`): who, when, what (`action`, `sink`, `args` JSON), and its
//!   outcome (`state` pending/done/failed, `applied_at`, `applied_by`, `events`, `outcome`).
//!   Most changes are applied by the CLI itself to tables the daemon only reads, so a row is
//!   written `done`; a `pending` row is work for the running daemon (a test delivery), which
//!   records the outcome in it. `hvac-edge audit` lists it.
//! - `dead_letters.requeued_at`, `requeued_by` (the `control` id): a dead letter re-queued for
//!   its sink, which sends it (original id, seq and payload) before its pending events and
//!   deletes the row once delivered; rejected again, `requeued_at` is cleared and the new
//!   reason recorded.

/// Migrations in order; index + 1 is the `user_version` after it ran.
pub const MIGRATIONS: &[&str] = &[
    // v1: initial schema.
    r#"
CREATE TABLE devices (
    device TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    seq INTEGER NOT NULL,
    last_snapshot_at INTEGER NOT NULL,
    changed_since_snapshot INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE TABLE events (
    pos INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    observed_at INTEGER NOT NULL,
    payload TEXT NOT NULL,
    receipts BLOB
);
CREATE TABLE sinks (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    cursor INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'ACTIVE',
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    last_error TEXT,
    last_status INTEGER,
    last_success_at INTEGER,
    updated_at INTEGER NOT NULL
);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY,
    sink TEXT NOT NULL,
    event_pos INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    reason TEXT NOT NULL,
    http_status INTEGER,
    response_snippet TEXT,
    at INTEGER NOT NULL
);
CREATE INDEX dead_letters_by_sink ON dead_letters (sink, id);
CREATE TABLE mqtt_recent (
    id INTEGER PRIMARY KEY,
    receipts BLOB NOT NULL
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"#,
    // v2: per-source status for `hvac-edge sources`.
    r#"
CREATE TABLE source_status (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
"#,
    // v3: receipts ordered by commit position.
    r#"
ALTER TABLE mqtt_recent ADD COLUMN pos INTEGER NOT NULL DEFAULT 0;
CREATE INDEX mqtt_recent_by_pos ON mqtt_recent (pos);
"#,
    // v4: technician-owned sink settings, apart from the daemon-owned `sinks` row.
    r#"
CREATE TABLE sink_control (
    name TEXT PRIMARY KEY,
    enabled INTEGER NOT NULL DEFAULT 1,
    note TEXT,
    updated_at INTEGER NOT NULL,
    updated_by TEXT
);
"#,
    // v5: delivery health and failed attempts of webhook/MQTT sinks.
    r#"
ALTER TABLE sinks ADD COLUMN successes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sinks ADD COLUMN banned_until INTEGER;
ALTER TABLE sinks ADD COLUMN disabled_at INTEGER;
ALTER TABLE sinks ADD COLUMN config_digest TEXT;
ALTER TABLE sinks ADD COLUMN last_duration_ms INTEGER;
CREATE TABLE sink_attempts (
    id INTEGER PRIMARY KEY,
    sink TEXT NOT NULL,
    at INTEGER NOT NULL,
    first_pos INTEGER NOT NULL,
    events INTEGER NOT NULL,
    status INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    error_kind TEXT NOT NULL,
    snippet TEXT
);
CREATE INDEX sink_attempts_by_sink ON sink_attempts (sink, id);
"#,
    // v6: reload outcomes.
    r#"
CREATE TABLE reloads (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    outcome TEXT NOT NULL
);
"#,
    // v7: technician control path.
    r#"
CREATE TABLE control (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    by TEXT NOT NULL,
    action TEXT NOT NULL,
    sink TEXT,
    args TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,
    applied_at INTEGER,
    applied_by TEXT,
    events INTEGER,
    outcome TEXT
);
CREATE INDEX control_pending ON control (sink, id) WHERE state = 'pending';
ALTER TABLE dead_letters ADD COLUMN requeued_at INTEGER;
ALTER TABLE dead_letters ADD COLUMN requeued_by INTEGER;
CREATE INDEX dead_letters_requeued ON dead_letters (sink, id) WHERE requeued_at IS NOT NULL;
"#,
];
