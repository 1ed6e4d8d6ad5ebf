//! MQTT load: a QoS 1 publisher (as fast as it can, or paced) and the bare-subscriber reference.

use super::Deadline;
use anyhow::Context as _;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::time::{Duration, Instant};

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_inflight(1000)
        .set_max_packet_size(64 * 1024, 64 * 1024);
    o
}

/// What a publisher run did.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub sent: usize,
    pub acked: usize,
    pub elapsed: Duration,
}

/// Publishes `msgs` at QoS 1 on one connection, as fast as possible (`rate` = None) or paced at
/// `rate` messages/s; waits for every PUBACK. Bounded by `deadline`.
pub async fn publish(
    port: u16,
    msgs: Vec<(String, Vec<u8>)>,
    rate: Option<f64>,
    deadline: Deadline,
) -> anyhow::Result<Published> {
    let n = msgs.len();
    let id = format!("bench-pub-{}", fastrand::u32(..));
    let (client, mut el) = AsyncClient::new(options(&id, port), 1024);
    let (conn_tx, conn_rx) = tokio::sync::oneshot::channel();
    let poller = tokio::spawn(async move {
        let mut acked = 0usize;
        let mut conn_tx = Some(conn_tx);
        while acked < n {
            match tokio::time::timeout_at(deadline.tokio(), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    if let Some(tx) = conn_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        (acked, el)
    });
    tokio::time::timeout_at(deadline.tokio(), conn_rx)
        .await
        .context("publisher: no CONNACK in time")?
        .context("publisher: connection failed")?;
    let start = Instant::now();
    let mut sent = 0usize;
    for (i, (topic, payload)) in msgs.into_iter().enumerate() {
        if let Some(r) = rate {
            let at = start + Duration::from_secs_f64(i as f64 / r);
            tokio::time::sleep_until(at.into()).await;
        }
        if deadline.passed() {
            break;
        }
        match tokio::time::timeout_at(
            deadline.tokio(),
            client.publish(topic, QoS::AtLeastOnce, false, payload),
        )
        .await
        {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    let (acked, mut el) = poller.await.context("publisher event loop panicked")?;
    let elapsed = start.elapsed();
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(300), el.poll()).await;
    if acked < n {
        anyhow::bail!("publisher: only {acked} of {n} messages acknowledged before the deadline");
    }
    Ok(Published {
        sent,
        acked,
        elapsed,
    })
}

/// A connected subscriber (automatic acks) on `filter`, ready to receive.
async fn subscriber(
    port: u16,
    filter: &str,
    deadline: Deadline,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let id = format!("bench-sub-{}", fastrand::u32(..));
    let (client, mut el) = AsyncClient::new(options(&id, port), 64);
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    loop {
        match tokio::time::timeout_at(deadline.tokio(), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("subscriber: {e}"),
            Err(_) => anyhow::bail!("subscriber: no SUBACK in time"),
        }
    }
    Ok((client, el))
}

/// The bare-subscriber reference: one QoS 1 subscriber with automatic acks receives `n`
/// messages a publisher pushes as fast as it can. Messages/s from the first to the last received.
///
/// The subscriber runs on its own OS thread with its own runtime, like the daemon's source runs
/// in its own process: it does not share a scheduler with the publisher.
pub async fn bare_subscriber_rate(
    port: u16,
    msgs: Vec<(String, Vec<u8>)>,
    filter: &str,
    deadline: Deadline,
) -> anyhow::Result<f64> {
    let n = msgs.len();
    let filter = filter.to_string();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let sub = std::thread::Builder::new()
        .name("bare-subscriber".into())
        .spawn(
            move || -> anyhow::Result<(usize, Option<Instant>, Instant)> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let (_client, mut el) = match subscriber(port, &filter, deadline).await {
                        Ok(s) => {
                            let _ = ready_tx.send(Ok(()));
                            s
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                            return Err(e);
                        }
                    };
                    let mut got = 0usize;
                    let mut first = None;
                    let mut last = Instant::now();
                    while got < n {
                        match tokio::time::timeout_at(deadline.tokio(), el.poll()).await {
                            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                                last = Instant::now();
                                first.get_or_insert(last);
                                got += 1;
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(_)) | Err(_) => break,
                        }
                    }
                    Ok((got, first, last))
                })
            },
        )?;
    tokio::time::timeout_at(deadline.tokio(), ready_rx)
        .await
        .context("subscriber: not ready in time")?
        .context("subscriber thread ended")??;
    let published = publish(port, msgs, None, deadline).await;
    let joined = tokio::task::spawn_blocking(move || sub.join())
        .await?
        .map_err(|_| anyhow::anyhow!("subscriber thread panicked"))?;
    published?;
    let (got, first, last) = joined?;
    let first = first.context("subscriber received nothing")?;
    if got < n {
        anyhow::bail!("bare subscriber got only {got} of {n} messages before the deadline");
    }
    Ok(n as f64 / last.duration_since(first).as_secs_f64().max(1e-6))
}
