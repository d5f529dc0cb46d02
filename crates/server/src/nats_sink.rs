//! The ledger outbox relay's NATS JetStream sink (cargo feature `nats`): the production
//! adapter of the outbox (DESIGN.md). Each relayed page is published in order to
//! `<prefix>.<topic>` (topics are `ledger.…`, e.g. `vaultpay.ledger.transfer.posted`)
//! in one JetStream stream, and the relay marks it published only once JetStream has
//! acknowledged every message of it.
//!
//! Delivery is at least once. A page published but not yet marked (a crash, a lost
//! acknowledgement) is published again; every message carries its outbox event id as
//! `Nats-Msg-Id`, so JetStream drops the copy within the stream's duplicate window
//! ([`DUPLICATE_WINDOW`]), and consumers that must never act twice dedupe by it.
//! Headers also carry the outbox sequence (`VaultPay-Outbox-Seq`: the order events were
//! written in, per database) and the event time (`VaultPay-Created-At`, microseconds).
//! Stream order follows it except after a reconnect in the middle of a page (a message
//! lost with the connection is stored after the ones sent behind it when the page goes
//! again): consumers that need the order sort by `VaultPay-Outbox-Seq`.
//!
//! NATS being down at start does not stop the server: the client keeps connecting in
//! the background, and events wait in the outbox (the relay retries each tick).

use async_nats::jetstream::{self, stream};
use futures::future::BoxFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use vaultpay_ledger::{EventSink, OutboxEvent};

/// How long JetStream remembers a message id to drop a re-publication.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// A server's largest message when it has not said yet (NATS's default).
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Publishes relayed outbox events to a JetStream stream.
pub struct NatsSink {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    stream: String,
    /// The stream is known to exist; cleared when a publish fails, so that a stream
    /// deleted meanwhile is made again.
    ready: AtomicBool,
    making: tokio::sync::Mutex<()>,
}

impl NatsSink {
    /// A sink for the server at `url`, publishing under `prefix` into `stream` (created
    /// on first use, with subjects `<prefix>.ledger.>`, if it does not exist).
    pub async fn connect(url: &str, prefix: &str, stream: &str) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .connect(url)
            .await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(5));
        Ok(Self {
            client,
            js,
            prefix: prefix.to_owned(),
            stream: stream.to_owned(),
            ready: AtomicBool::new(false),
            making: tokio::sync::Mutex::new(()),
        })
    }

    async fn ensure_stream(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.making.lock().await;
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        self.js
            .get_or_create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![format!("{}.ledger.>", self.prefix)],
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("JetStream stream {}: {e}", self.stream))?;
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// The body of `ev` as published: its payload, or, when that would not fit in one
    /// message of this server (which would refuse the page for good and hold every
    /// later event back), a [`stub`] flagged `truncated` (and the
    /// `VaultPay-Truncated` header), whose details a consumer reads through the API.
    fn body(&self, ev: &OutboxEvent) -> Result<(Vec<u8>, bool), String> {
        let payload = serde_json::to_vec(&ev.payload).map_err(|e| e.to_string())?;
        let max = match self.client.server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n,
        };
        // Headers and subject travel in the same message: leave them room.
        if payload.len() + 1024 <= max {
            return Ok((payload, false));
        }
        tracing::error!(event = %ev.id, topic = %ev.topic, bytes = payload.len(), max,
            "outbox event too large for NATS; publishing a truncated stub");
        metrics::counter!("ledger_outbox_events_truncated_total").increment(1);
        Ok((stub(ev).to_string().into_bytes(), true))
    }

    async fn send(&self, events: &[OutboxEvent]) -> Result<(), String> {
        // Sent in order on one connection, then every acknowledgement awaited.
        let mut acks = Vec::with_capacity(events.len());
        for ev in events {
            let (payload, truncated) = self.body(ev)?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, ev.id.as_str());
            headers.insert("VaultPay-Outbox-Seq", ev.seq.to_string().as_str());
            headers.insert("VaultPay-Created-At", ev.created_at.to_string().as_str());
            if truncated {
                headers.insert("VaultPay-Truncated", "true");
            }
            let ack = self
                .js
                .publish_with_headers(
                    format!("{}.{}", self.prefix, ev.topic),
                    headers,
                    payload.into(),
                )
                .await
                .map_err(|e| format!("publishing {}: {e}", ev.id))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await
                .map_err(|e| format!("JetStream acknowledgement: {e}"))?;
        }
        Ok(())
    }
}

impl EventSink for NatsSink {
    fn publish<'a>(&'a self, events: &'a [OutboxEvent]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.ensure_stream().await?;
            let sent = self.send(events).await;
            if sent.is_err() {
                self.ready.store(false, Ordering::Release);
            }
            sent
        })
    }
}

/// What goes out for an event too large for one message: its id and topic, the
/// payload's scalar members (the resource's ids, amounts, counts: what a consumer
/// needs to look the rest up, e.g. a batch's `batch_id`), and the names of the members
/// left out (arrays, objects, and text over 1 KiB).
fn stub(ev: &OutboxEvent) -> serde_json::Value {
    let mut kept = serde_json::Map::new();
    let mut omitted = Vec::new();
    if let Some(members) = ev.payload.as_object() {
        for (k, v) in members {
            let small = match v {
                serde_json::Value::String(t) => t.len() <= 1024,
                serde_json::Value::Array(_) | serde_json::Value::Object(_) => false,
                _ => true,
            };
            if small && k.len() <= 128 {
                kept.insert(k.clone(), v.clone());
            } else {
                omitted.push(k.chars().take(128).collect::<String>());
            }
        }
    }
    serde_json::json!({
        "id": ev.id, "topic": ev.topic, "truncated": true,
        "payload": kept, "omitted": omitted,
    })
}
