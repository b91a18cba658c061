//! The relay's side of a run: raw JetStream as the ceiling, the relay's
//! drain of a backlog, the naive relay, idle drains and end-to-end latency.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use outbox_core::entity::outbox_message;
use outbox_core::relay::{Batch, Delivery, Publisher, Relay};
use outbox_core::uuid::Uuid;
use outbox_nats::JetStreamPublisher;
use outbox_nats::async_nats::HeaderMap;
use outbox_nats::async_nats::jetstream::message::PublishMessage;
use sea_orm::{ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryOrder, QuerySelect, Statement};

use super::measure::{DrainRun, RawRun, ServiceCpu, own_cpu_seconds};
use super::write_path::{BenchEvent, emit_backlog, place_order};
use super::{BoxError, Latency, Source, consumer};

/// Records when each event's acknowledgement arrived (the batch's, to be exact).
pub(super) struct TimedPublisher {
    pub(super) inner: JetStreamPublisher,
    pub(super) acked: Arc<Mutex<HashMap<Uuid, Instant>>>,
}

impl TimedPublisher {
    pub(super) fn record<'a>(
        &self,
        events: &[&outbox_message::Model],
        deliveries: impl IntoIterator<Item = Option<&'a Delivery>>,
    ) {
        let now = Instant::now();
        let mut acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        for (event, delivery) in events.iter().zip(deliveries) {
            if matches!(delivery, Some(Delivery::Stored { .. })) {
                acked.insert(event.id, now);
            }
        }
    }
}

impl Publisher for TimedPublisher {
    async fn publish(&self, events: &[&outbox_message::Model]) -> Vec<Delivery> {
        let deliveries = self.inner.publish(events).await;
        self.record(events, deliveries.iter().map(Some));
        deliveries
    }

    async fn publish_in_key_order(&self, batch: &Batch<'_>) -> Vec<Option<Delivery>> {
        let deliveries = self.inner.publish_in_key_order(batch).await;
        self.record(batch.events(), deliveries.iter().map(Option::as_ref));
        deliveries
    }
}

impl super::Bench {
    /// Microseconds of a drain that finds nothing (the median of 200): what
    /// each wake of an idle relay costs, scheduled events included.
    pub(super) async fn idle_drain(&self, publisher: &JetStreamPublisher) -> Result<f64, BoxError> {
        self.truncate_outbox().await?;
        let relay = Relay::builder(self.db.clone(), publisher.clone()).build();
        let mut took = Vec::with_capacity(200);
        for _ in 0..200 {
            let started = Instant::now();
            relay.drain().await?;
            took.push(started.elapsed().as_secs_f64() * 1e6);
        }
        took.sort_by(f64::total_cmp);
        Ok(took[took.len() / 2])
    }

    /// The ceiling: the same payloads straight to JetStream, `in_flight` acks
    /// pipelined, with `Nats-Msg-Id` only, or with every header the relay sends.
    pub(super) async fn raw_jetstream(&self, all_headers: bool) -> Result<f64, BoxError> {
        let messages = self.messages("raw", 0..self.args.events as u64, all_headers)?;
        let started = Instant::now();
        self.send(messages).await?;
        Ok(self.args.events as f64 / started.elapsed().as_secs_f64())
    }

    /// Events `seqs` of `exchange` as messages, with `Nats-Msg-Id` only or
    /// with every header the relay sends.
    pub(super) fn messages(
        &self,
        exchange: &str,
        seqs: std::ops::Range<u64>,
        all_headers: bool,
    ) -> Result<Vec<(String, PublishMessage)>, outbox_nats::InvalidHeader> {
        let now = chrono::Utc::now();
        seqs.map(|seq| {
            let event = BenchEvent::sized(seq, self.args.keys, self.args.payload);
            let payload = serde_json::to_vec(&event).unwrap_or_default();
            let row = outbox_message::Model {
                id: Uuid::now_v7(),
                event_type: "BenchEvent".into(),
                event_version: 1,
                exchange: exchange.into(),
                subject: format!("{exchange}.k.{}", event.key),
                partition_key: Some(event.key.to_string()),
                payload,
                headers: None,
                content_type: "application/json".into(),
                created_at: now,
                attempts: 0,
                next_attempt_at: now,
                last_error: None,
                delivered_at: None,
            };
            let headers = if all_headers {
                outbox_nats::headers(&row)?
            } else {
                let mut only_id = HeaderMap::new();
                only_id.insert(outbox_core::headers::MSG_ID, row.id.to_string().as_str());
                only_id
            };
            let subject = format!("{}.{}", self.namespace, row.subject);
            Ok((
                subject,
                PublishMessage::build()
                    .payload(row.payload.into())
                    .headers(headers),
            ))
        })
        .collect()
    }

    /// Publishes `messages` with `in_flight` acks pipelined.
    pub(super) async fn send(
        &self,
        messages: Vec<(String, PublishMessage)>,
    ) -> Result<(), BoxError> {
        let context = self.publisher().context().clone();
        let mut acks = FuturesOrdered::new();
        for (subject, message) in messages {
            acks.push_back(context.send_publish(subject, message).await?.into_future());
            if acks.len() >= self.args.in_flight {
                acks.next().await.transpose()?;
            }
        }
        while let Some(ack) = acks.next().await {
            ack?;
        }
        Ok(())
    }

    /// A raw run into fresh streams, with the CPU that it and nats-server used.
    pub(super) async fn raw_run(&self) -> Result<RawRun, BoxError> {
        self.fresh_streams().await?;
        let (services, own) = (ServiceCpu::now(), own_cpu_seconds());
        let eps = self.raw_jetstream(false).await?;
        Ok(RawRun {
            eps,
            nats_cpu_s: services.since().nats,
            publisher_cpu_s: own_cpu_seconds() - own,
        })
    }

    /// A drain leaves the outbox full of dead rows until autovacuum, which
    /// the next phase's claims and commits would step over: each phase starts
    /// on an empty table instead.
    pub(super) async fn truncate_outbox(&self) -> Result<(), DbErr> {
        self.db
            .execute_unprepared("TRUNCATE outbox_messages")
            .await
            .map(drop)
    }

    /// Commits `count` events to an emptied outbox (not measured).
    pub(super) async fn backlog(&self, count: usize) -> Result<(), BoxError> {
        self.truncate_outbox().await?;
        let (count, chunk) = (count as u64, 2_500);
        for from in (0..count).step_by(chunk) {
            emit_backlog(
                &self.db,
                from,
                (from + chunk as u64).min(count),
                self.args.keys,
                self.args.payload,
            )
            .await?;
        }
        if self.args.partitions > 0 {
            self.partition_outbox(count as usize).await?;
        }
        Ok(())
    }

    /// Moves the backlog into a new `outbox_messages` partitioned by id range
    /// into `--partitions` partitions of equal size, the last one open-ended
    /// for what comes later, and vacuums it (not measured: a copy of every
    /// row).
    pub(super) async fn partition_outbox(&self, count: usize) -> Result<(), DbErr> {
        let parts = self.args.partitions;
        self.db
            .execute_unprepared(
                "ALTER TABLE outbox_messages RENAME TO outbox_messages_filled; \
                 CREATE TABLE outbox_messages (LIKE outbox_messages_filled INCLUDING ALL) \
                 PARTITION BY RANGE (id)",
            )
            .await?;
        let mut bounds = vec!["MINVALUE".to_owned()];
        for k in 1..parts {
            let nth = format!(
                "SELECT id FROM outbox_messages_filled ORDER BY id OFFSET {} LIMIT 1",
                k * count / parts
            );
            let row = self
                .db
                .query_one_raw(Statement::from_string(DbBackend::Postgres, nth));
            if let Some(row) = row.await? {
                bounds.push(format!("'{}'", row.try_get_by_index::<Uuid>(0)?));
            }
        }
        bounds.push("MAXVALUE".to_owned());
        let tag = Uuid::now_v7().simple();
        for (k, range) in bounds.windows(2).enumerate() {
            let [from, to] = range else { continue };
            self.db
                .execute_unprepared(&format!(
                    "CREATE TABLE outbox_messages_{tag}_{k} PARTITION OF outbox_messages \
                     FOR VALUES FROM ({from}) TO ({to})"
                ))
                .await?;
        }
        self.db
            .execute_unprepared(
                "INSERT INTO outbox_messages SELECT * FROM outbox_messages_filled; \
                 DROP TABLE outbox_messages_filled",
            )
            .await?;
        // What autovacuum does to a table filled over minutes, and would not
        // have done yet to a copy made a moment ago: without it, the relay's
        // first vacuum reads every partition whole during the drain.
        self.db
            .execute_unprepared("VACUUM ANALYZE outbox_messages")
            .await
            .map(drop)
    }

    /// One relay, in a process of its own, drains the backlog of `events`.
    pub(super) async fn relay_drain(
        &self,
        source: Source,
        events: usize,
    ) -> Result<DrainRun, BoxError> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?);
        child
            .args(["--drain-only", &self.schema, &self.namespace])
            .args(["--database-url", &self.args.database_url])
            .args(["--events", &events.to_string()])
            .args([
                "--batch",
                &self.args.batch.to_string(),
                "--in-flight",
                &self.args.in_flight.to_string(),
                "--vacuum-after",
                &self.args.vacuum_after.to_string(),
            ]);
        if self.args.async_commit {
            child.arg("--async-commit");
        }
        if self.args.no_overlap {
            child.arg("--no-overlap");
        }
        if source == Source::Logical {
            child.arg("--drain-logical");
        }
        let output = child.output().await?;
        if !output.status.success() {
            return Err(format!(
                "the drain process failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        let figures: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let get = |name: &str| {
            figures[name]
                .as_f64()
                .ok_or_else(|| format!("the drain process printed no {name}"))
        };
        Ok(DrainRun {
            eps: get("relay_drain_eps")?,
            rss_mib: get("relay_rss_mib")?,
            relay_cpu_s: get("relay_cpu_s")?,
            services: ServiceCpu {
                nats: get("nats_cpu_s")?,
                postgres: get("postgres_cpu_s")?,
            },
        })
    }

    /// The design outbox articles show: 100 rows, one publish and ack at a time, one delete each.
    pub(super) async fn naive_relay(
        &self,
        publisher: &JetStreamPublisher,
    ) -> Result<f64, BoxError> {
        let context = publisher.context().clone();
        let started = Instant::now();
        let mut published = 0;
        loop {
            let rows = outbox_message::Entity::find()
                .order_by_asc(outbox_message::Column::Id)
                .limit(100)
                .all(&self.db)
                .await?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let subject = format!("{}.{}", self.namespace, row.subject);
                let message = PublishMessage::build()
                    .payload(row.payload.clone().into())
                    .headers(outbox_nats::headers(&row)?);
                context.send_publish(subject, message).await?.await?;
                outbox_message::Entity::delete_by_id(row.id)
                    .exec(&self.db)
                    .await?;
                published += 1;
            }
        }
        Ok(published as f64 / started.elapsed().as_secs_f64())
    }

    /// Commit → JetStream ack of single-event handlers at a fixed offered rate, relay in process.
    /// Commits single-event handlers at `--rate` for `--seconds` with a relay
    /// running, and, if `consume`, a `Consumer` of the relay's stream too.
    pub(super) async fn latency(
        &mut self,
        publisher: JetStreamPublisher,
        source: Source,
        consume: bool,
    ) -> Result<Latency, BoxError> {
        let acked = Arc::new(Mutex::new(HashMap::new()));
        let stream = self.streams()[1].name.clone();
        let (consumer, handled) = if consume {
            let (consumer, handled) = consumer::stamping(
                &self.client,
                &self.db,
                publisher.context(),
                &self.namespace,
                &stream,
            )
            .await?;
            (Some(consumer), Some(handled))
        } else {
            (None, None)
        };
        let relay = Relay::builder(
            self.db.clone(),
            TimedPublisher {
                inner: publisher,
                acked: acked.clone(),
            },
        )
        .batch_size(self.args.batch)
        .overlap_rounds(!self.args.no_overlap)
        .build();
        let relay = match source {
            Source::Polling => relay.spawn(),
            Source::Logical => self.logical_relay(relay)?.spawn(),
        };
        let total = (u64::from(self.args.rate) * self.args.seconds) as usize;
        let period = Duration::from_secs(1) / self.args.rate.max(1);
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut calls = Vec::with_capacity(total);
        for _ in 0..total {
            ticks.tick().await;
            self.next_id += 1;
            let (db, id, payload) = (self.db.clone(), self.next_id, self.args.payload);
            calls.push(tokio::spawn(async move {
                let event = place_order(&db, id, payload).await;
                event.map(|event| (event, Instant::now()))
            }));
        }
        let mut committed = Vec::with_capacity(total);
        for call in calls {
            committed.push(call.await??);
        }
        let count = |map: &Mutex<HashMap<Uuid, Instant>>| {
            map.lock().unwrap_or_else(|p| p.into_inner()).len()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let done =
            || count(&acked) >= total && handled.as_deref().is_none_or(|h| count(h) >= total);
        while !done() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        relay.shutdown().await?;
        if let Some(consumer) = consumer {
            consumer.shutdown().await?;
        }
        let percentiles = |reached: &Mutex<HashMap<Uuid, Instant>>| {
            let reached = reached.lock().unwrap_or_else(|p| p.into_inner());
            let mut millis: Vec<f64> = (committed.iter())
                .map(|(id, at)| {
                    reached.get(id).map_or(f64::INFINITY, |then| {
                        then.saturating_duration_since(*at).as_secs_f64() * 1e3
                    })
                })
                .collect();
            millis.sort_by(f64::total_cmp);
            let pick = |q: f64| millis[((millis.len() - 1) as f64 * q).round() as usize];
            [pick(0.5), pick(0.99), pick(1.0)]
        };
        Ok(Latency {
            acked: percentiles(&acked),
            handled: handled.as_deref().map(percentiles),
            events: total,
        })
    }
}
