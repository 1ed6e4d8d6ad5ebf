//! The raw SQLite reference: batched inserts into the `events` table with the daemon's durability.

use super::events::{DEVICES, device_id, setpoint_event};
use rusqlite::{Connection, params};
use std::time::{Duration, Instant};

/// Rows/s of 1000-row transactions (WAL, synchronous=FULL, ~600-byte payloads), for at most
/// `max_rows` rows or `max_time`. Returns (rows/s, average payload bytes).
pub fn insert_rate(max_rows: usize, max_time: Duration) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::Builder::new()
        .prefix("hvac-bench-sqlite-")
        .tempdir()?;
    let conn = Connection::open(dir.path().join("raw.db"))?;
    conn.execute_batch(
        "PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;",
    )?;
    conn.execute_batch(hvac_edge::store::schema::MIGRATIONS[0])?;
    // A pool of realistic envelopes; ids are minted per row like the writer does.
    let now = hvac_edge::telemetry::now_ms();
    let pool: Vec<String> = (0..256)
        .map(|i| serde_json::to_string(&setpoint_event(i % DEVICES, 1 + i as u64, now)))
        .collect::<Result<_, _>>()?;
    let avg = pool.iter().map(String::len).sum::<usize>() as f64 / pool.len() as f64;
    let devices: Vec<String> = (0..DEVICES).map(device_id).collect();
    let start = Instant::now();
    let mut rows = 0usize;
    let mut conn = conn;
    while rows < max_rows && start.elapsed() < max_time {
        let tx = conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO events (pos, id, device, seq, type, observed_at, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for _ in 0..1000 {
                rows += 1;
                let d = rows % DEVICES;
                ins.execute(params![
                    rows as i64,
                    uuid::Uuid::now_v7().to_string(),
                    devices[d],
                    (rows / DEVICES + 1) as i64,
                    "setpoint",
                    now,
                    pool[rows % pool.len()]
                ])?;
            }
        }
        tx.commit()?;
    }
    Ok((rows as f64 / start.elapsed().as_secs_f64(), avg))
}
