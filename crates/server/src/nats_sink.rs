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
//!
//! NATS being down at start does not stop the server: the client keeps connecting in
//! the background, and events wait in the outbox (the relay retries each tick).

use async_nats::jetstream::{self, stream};
use futures::future::BoxFuture;
use std::time::Duration;
use tokio::sync::OnceCell;
use vaultpay_ledger::{EventSink, OutboxEvent};

/// How long JetStream remembers a message id to drop a re-publication.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// Publishes relayed outbox events to a JetStream stream.
pub struct NatsSink {
    js: jetstream::Context,
    prefix: String,
    stream: String,
    ready: OnceCell<()>,
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
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(5));
        Ok(Self {
            js,
            prefix: prefix.to_owned(),
            stream: stream.to_owned(),
            ready: OnceCell::new(),
        })
    }

    async fn ensure_stream(&self) -> Result<(), String> {
        self.ready
            .get_or_try_init(|| async {
                self.js
                    .get_or_create_stream(stream::Config {
                        name: self.stream.clone(),
                        subjects: vec![format!("{}.ledger.>", self.prefix)],
                        duplicate_window: DUPLICATE_WINDOW,
                        ..Default::default()
                    })
                    .await
                    .map(drop)
                    .map_err(|e| format!("JetStream stream {}: {e}", self.stream))
            })
            .await
            .map(drop)
    }
}

impl EventSink for NatsSink {
    fn publish<'a>(&'a self, events: &'a [OutboxEvent]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.ensure_stream().await?;
            // Sent in order on one connection, then every acknowledgement awaited.
            let mut acks = Vec::with_capacity(events.len());
            for ev in events {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(async_nats::header::NATS_MESSAGE_ID, ev.id.as_str());
                headers.insert("VaultPay-Outbox-Seq", ev.seq.to_string().as_str());
                headers.insert("VaultPay-Created-At", ev.created_at.to_string().as_str());
                let payload = serde_json::to_vec(&ev.payload).map_err(|e| e.to_string())?;
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
        })
    }
}
