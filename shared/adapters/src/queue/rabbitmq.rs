//! The RabbitMQ backend (AMQP 0-9-1 through lapin).
//!
//! Topology, declared on every (re)connection so a broker that lost it gets it back:
//! - `{name}`: durable quorum queue, `x-delivery-limit` set explicitly (RabbitMQ 3.10 has no
//!   default) and `x-dead-letter-exchange = {name}.dlx`;
//! - `{name}.dlx`: durable fanout exchange, bound to
//! - `{name}.dead`: durable quorum queue where messages land once over the delivery limit (or
//!   when they cannot be decoded).
//!
//! Messages are the JSON [`ChunkRef`], persistent, published to the default exchange with
//! `mandatory` on a channel in confirm mode: `publish` returns once the broker confirmed, and a
//! nack or a returned (unroutable) message is an error.
//!
//! The supervisor is lazy: one publishing connection+channel is shared behind a lock and rebuilt
//! (topology included) by the first caller that finds it broken; `publish` retries with backoff
//! for `queue.reconnect_timeout`. Consumers get their own channel (with `basic.qos(prefetch)`)
//! on a shared consuming connection; when that channel or connection dies the consumer yields
//! `Some(Err(..))` and the worker calls `consume()` again, which reconnects. An acker keeps its
//! channel open, so deliveries taken before their consumer was dropped can still be acked; an
//! ack on a dead channel is an error (the broker redelivers the message).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Acker, Consumer, Delivery, Queue, QueueError, QueueResult, Replayed};
use orbit_config::QueueSettings;
use orbit_core::model::ChunkRef;

/// Headers carrying the W3C trace context (also in the JSON body), where tracing tools that
/// know AMQP look for it.
pub const TRACEPARENT_HEADER: &str = "traceparent";
pub const TRACESTATE_HEADER: &str = "tracestate";
/// Longest wait for one TCP+AMQP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
const PERSISTENT: u8 = 2;
/// The largest AMQP frame Orbit's connections accept, unless `queue.url` sets `frame_max`.
/// lapin keeps 32 frames of buffer each way per connection, allocated and zeroed when it
/// connects: at RabbitMQ's default of 128 KiB that was 8 MiB a connection (16 MiB of a worker's
/// peak RSS, found with heaptrack), for chunk messages well under 1 KiB. 16 KiB still fits any
/// message's header frame (trace context and `x-death` included) in one frame; bodies larger
/// than a frame are split by the protocol anyway.
const FRAME_MAX: u32 = 16 * 1024;

pub struct RabbitQueue {
    shared: Arc<Shared>,
}

struct Shared {
    url: String,
    name: String,
    dlx: String,
    dead: String,
    delivery_limit: u32,
    reconnect_timeout: Duration,
    publisher: Mutex<Option<Publisher>>,
    consuming: Mutex<Option<Arc<Connection>>>,
    generation: std::sync::atomic::AtomicU64,
}

/// The shared publishing connection and its confirm-mode channel.
#[derive(Clone)]
struct Publisher {
    connection: Arc<Connection>,
    channel: Channel,
    generation: u64,
}

impl Publisher {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

fn err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> QueueError {
    QueueError::caused(format!("rabbitmq: {what}: {e}"), e)
}

/// Why one publish attempt failed: worth another try on a new connection, or final.
enum Failure {
    Retry(QueueError),
    Final(QueueError),
}

impl RabbitQueue {
    /// Connects (retrying for `reconnect_timeout`), declares the topology and enables publisher
    /// confirms; fails if the broker cannot be reached or the topology cannot be declared.
    pub async fn open(settings: &QueueSettings) -> QueueResult<Self> {
        let name = settings.name.clone();
        if name.is_empty() || name.len() > 250 {
            return Err(QueueError::new(format!(
                "rabbitmq: queue.name {name:?} must be 1 to 250 bytes"
            )));
        }
        let queue = RabbitQueue {
            shared: Arc::new(Shared {
                url: settings.url.to_string(),
                dlx: format!("{name}.dlx"),
                dead: format!("{name}.dead"),
                name,
                delivery_limit: settings.delivery_limit,
                reconnect_timeout: settings.reconnect_timeout,
                publisher: Mutex::new(None),
                consuming: Mutex::new(None),
                generation: std::sync::atomic::AtomicU64::new(0),
            }),
        };
        let deadline = Instant::now() + queue.shared.reconnect_timeout;
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            match queue.shared.publisher().await {
                Ok(_) => return Ok(queue),
                Err(e) if is_permanent(&e) => return Err(e),
                Err(e) => {
                    if Instant::now() + delay > deadline {
                        return Err(QueueError::new(format!(
                            "{} (gave up after {:?})",
                            e.message, queue.shared.reconnect_timeout
                        )));
                    }
                    tracing::warn!(error = %e, "rabbitmq not reachable yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
    }

    /// Test hook: closes this queue's connections as a broker restart would, without touching
    /// anything else on the broker.
    #[doc(hidden)]
    pub async fn close_connections_for_test(&self) {
        let publisher = self.shared.publisher.lock().await.clone();
        if let Some(p) = publisher {
            let _ = p.connection.close(320, "closed by test".into()).await;
        }
        let consuming = self.shared.consuming.lock().await.clone();
        if let Some(c) = consuming {
            let _ = c.close(320, "closed by test".into()).await;
        }
    }

    /// The AMQP connection name this queue's connections carry (visible in `rabbitmqctl
    /// list_connections client_properties`): `orbit {queue name} {publish|consume}`.
    #[doc(hidden)]
    pub fn connection_name_prefix(&self) -> String {
        format!("orbit {}", self.shared.name)
    }
}

/// Errors no reconnection will fix: bad credentials, a vhost that does not exist, a queue that
/// exists with other arguments.
fn is_permanent(e: &QueueError) -> bool {
    let m = e.message.as_str();
    m.contains("PRECONDITION_FAILED")
        || m.contains("ACCESS_REFUSED")
        || m.contains("NOT_ALLOWED")
        || m.contains("invalid URI")
}

impl Shared {
    async fn connect(&self, role: &str) -> QueueResult<Connection> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("orbit {} {role}", self.name).into());
        let mut uri: lapin::uri::AMQPUri = self
            .url
            .parse()
            .map_err(|e| QueueError::new(format!("rabbitmq: {}: {e}", redact(&self.url))))?;
        uri.query.frame_max.get_or_insert(FRAME_MAX);
        let connection =
            tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, properties))
                .await
                .map_err(|_| {
                    QueueError::new(format!(
                        "rabbitmq: connecting to {}: no answer within {CONNECT_TIMEOUT:?}",
                        redact(&self.url)
                    ))
                })?
                .map_err(|e| err(&format!("connecting to {}", redact(&self.url)), e))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| err("opening a channel", e))?;
        self.declare_topology(&channel).await?;
        let _ = channel.close(200, "OK".into()).await;
        Ok(connection)
    }

    fn queue_arguments(&self) -> FieldTable {
        queue_arguments(&self.dlx, self.delivery_limit)
    }

    async fn declare_topology(&self, channel: &Channel) -> QueueResult<()> {
        channel
            .exchange_declare(
                self.dlx.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| err(&format!("declaring exchange {}", self.dlx), e))?;
        let mut quorum = FieldTable::default();
        quorum.insert("x-queue-type".into(), long_string("quorum"));
        channel
            .queue_declare(
                self.dead.as_str().into(),
                QueueDeclareOptions::durable(),
                quorum,
            )
            .await
            .map_err(|e| err(&format!("declaring queue {}", self.dead), e))?;
        channel
            .queue_bind(
                self.dead.as_str().into(),
                self.dlx.as_str().into(),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| err(&format!("binding {} to {}", self.dead, self.dlx), e))?;
        channel
            .queue_declare(
                self.name.as_str().into(),
                QueueDeclareOptions::durable(),
                self.queue_arguments(),
            )
            .await
            .map_err(|e| {
                err(
                    &format!(
                        "declaring quorum queue {} (x-delivery-limit {}, dead-letter exchange {}; \
                         an existing queue with other arguments must be migrated by hand)",
                        self.name, self.delivery_limit, self.dlx
                    ),
                    e,
                )
            })?;
        Ok(())
    }

    /// The publishing connection, rebuilt (with its topology) if it is broken.
    async fn publisher(&self) -> QueueResult<Publisher> {
        let mut slot = self.publisher.lock().await;
        if let Some(p) = slot.as_ref() {
            if p.usable() {
                return Ok(p.clone());
            }
            tracing::warn!("rabbitmq publishing connection lost; reconnecting");
        }
        *slot = None;
        let connection = self.connect("publish").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| err("opening the publishing channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| err("enabling publisher confirms", e))?;
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = Publisher {
            connection: Arc::new(connection),
            channel,
            generation,
        };
        *slot = Some(p.clone());
        Ok(p)
    }

    /// Drops the publisher `generation` so the next caller builds a new one.
    async fn discard_publisher(&self, generation: u64) {
        let mut slot = self.publisher.lock().await;
        if slot.as_ref().is_some_and(|p| p.generation == generation) {
            *slot = None;
        }
    }

    /// The consuming connection, rebuilt (with its topology) if it is broken or `stale`.
    async fn consuming(&self, stale: Option<&Arc<Connection>>) -> QueueResult<Arc<Connection>> {
        let mut slot = self.consuming.lock().await;
        if let Some(c) = slot.as_ref() {
            let is_stale = stale.is_some_and(|s| Arc::ptr_eq(s, c));
            if c.status().connected() && !is_stale {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let connection = Arc::new(self.connect("consume").await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn publish_once(
        &self,
        payload: &[u8],
        properties: &BasicProperties,
    ) -> Result<(), Failure> {
        let p = self.publisher().await.map_err(|e| {
            if is_permanent(&e) {
                Failure::Final(e)
            } else {
                Failure::Retry(e)
            }
        })?;
        let sent = p
            .channel
            .basic_publish(
                ShortString::from(""),
                self.name.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties.clone(),
            )
            .await;
        let confirm = match sent {
            Ok(confirm) => confirm.await,
            Err(e) => Err(e),
        };
        match confirm {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
                // The queue is gone (deleted by hand?): the next publish redeclares it.
                self.discard_publisher(p.generation).await;
                Err(Failure::Final(QueueError::new(format!(
                    "rabbitmq: message to {} returned as unroutable: {} {}",
                    self.name, returned.reply_code, returned.reply_text
                ))))
            }
            Ok(Confirmation::Nack(None)) => Err(Failure::Final(QueueError::new(format!(
                "rabbitmq: the broker refused (nacked) the message to {}",
                self.name
            )))),
            Ok(Confirmation::NotRequested) => {
                self.discard_publisher(p.generation).await;
                Err(Failure::Retry(QueueError::new(
                    "rabbitmq: publish on a channel without confirms",
                )))
            }
            Err(e) => {
                self.discard_publisher(p.generation).await;
                Err(Failure::Retry(err("publishing", e)))
            }
        }
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The main queue's arguments; public for the conformance tests.
#[doc(hidden)]
pub fn queue_arguments(dlx: &str, delivery_limit: u32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(delivery_limit)),
    );
    args.insert("x-dead-letter-exchange".into(), long_string(dlx));
    args
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

struct RabbitConsumer {
    /// Field order matters: the consumer is cancelled before the channel handle goes.
    consumer: lapin::Consumer,
    channel: Channel,
    queue: String,
    failed: Option<String>,
}

struct RabbitAcker {
    acker: lapin::Acker,
    /// Keeps the channel open until the delivery is acked, even after its consumer is dropped.
    _channel: Channel,
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(self: Box<Self>) -> QueueResult<()> {
        match self.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(QueueError::new(
                "rabbitmq: cannot ack, the delivery's channel is closed (the broker will redeliver it)",
            )),
            Err(e) => Err(err("ack", e)),
        }
    }
}

fn decode(delivery: &lapin::message::Delivery) -> Result<ChunkRef, serde_json::Error> {
    let mut message: ChunkRef = serde_json::from_slice(&delivery.data)?;
    // A producer other than Orbit may put the trace context in the headers only.
    if message.traceparent.is_none() {
        let header = |name: &str| {
            delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name))
                .and_then(AMQPValue::as_long_string)
                .map(|s| String::from_utf8_lossy(s.as_bytes()).into_owned())
        };
        message.traceparent = header(TRACEPARENT_HEADER);
        message.tracestate = header(TRACESTATE_HEADER);
    }
    Ok(message)
}

#[async_trait]
impl Consumer for RabbitConsumer {
    async fn next(&mut self) -> Option<QueueResult<Delivery>> {
        loop {
            if let Some(reason) = &self.failed {
                return Some(Err(QueueError::new(reason.clone())));
            }
            let delivery = match self.consumer.next().await {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => {
                    self.failed = Some(format!(
                        "rabbitmq: consumer on {} failed: {e}; consume again",
                        self.queue
                    ));
                    continue;
                }
                None => {
                    // Cancelled by the broker (queue deleted, node down) or its channel closed:
                    // not "closed for good", so the worker must consume again.
                    self.failed = Some(format!(
                        "rabbitmq: consumer on {} was cancelled; consume again",
                        self.queue
                    ));
                    continue;
                }
            };
            match decode(&delivery) {
                Ok(message) => {
                    return Some(Ok(Delivery {
                        message,
                        acker: Box::new(RabbitAcker {
                            acker: delivery.acker,
                            _channel: self.channel.clone(),
                        }),
                    }))
                }
                Err(e) => {
                    tracing::error!(
                        queue = %self.queue,
                        error = %e,
                        "undecodable message; dead-lettering it"
                    );
                    let _ = delivery
                        .acker
                        .reject(BasicRejectOptions { requeue: false })
                        .await;
                }
            }
        }
    }
}

#[async_trait]
impl Queue for RabbitQueue {
    fn backend(&self) -> &'static str {
        "rabbitmq"
    }

    async fn ping(&self) -> QueueResult<()> {
        self.depth().await.map(|_| ())
    }

    async fn publish(&self, message: &ChunkRef) -> QueueResult<()> {
        let payload = serde_json::to_vec(message).map_err(|e| err("encoding the message", e))?;
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(PERSISTENT)
            .with_app_id("orbit".into());
        if let Some(traceparent) = &message.traceparent {
            let mut headers = FieldTable::default();
            headers.insert(TRACEPARENT_HEADER.into(), long_string(traceparent));
            if let Some(tracestate) = &message.tracestate {
                headers.insert(TRACESTATE_HEADER.into(), long_string(tracestate));
            }
            properties = properties.with_headers(headers);
        }
        let shared = &self.shared;
        let deadline = Instant::now() + shared.reconnect_timeout;
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt =
                tokio::time::timeout(remaining, shared.publish_once(&payload, &properties)).await;
            let e = match attempt {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(Failure::Final(e))) => return Err(e),
                Ok(Err(Failure::Retry(e))) => e,
                Err(_) => {
                    // No confirm in time: a half-open or blocked connection; start afresh.
                    let stale = shared.publisher.lock().await.take();
                    drop(stale);
                    QueueError::new("rabbitmq: no publisher confirm in time")
                }
            };
            if Instant::now() + delay >= deadline {
                return Err(QueueError::new(format!(
                    "{} (gave up publishing after {:?})",
                    e.message, shared.reconnect_timeout
                )));
            }
            tracing::warn!(error = %e, retry_in = ?delay, "rabbitmq publish failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }

    async fn consume(&self, prefetch: u16) -> QueueResult<Box<dyn Consumer>> {
        let shared = &self.shared;
        // A connection that died under us is only noticed when a channel fails on it: then
        // reconnect once.
        let mut connection = shared.consuming(None).await?;
        let channel = match connection.create_channel().await {
            Ok(channel) => channel,
            Err(_) => {
                connection = shared.consuming(Some(&connection)).await?;
                connection
                    .create_channel()
                    .await
                    .map_err(|e| err("opening a consumer channel", e))?
            }
        };
        // 0 would mean "unbounded" to AMQP.
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(|e| err("setting prefetch", e))?;
        let consumer = channel
            .basic_consume(
                shared.name.as_str().into(),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| err(&format!("consuming from {}", shared.name), e))?;
        Ok(Box::new(RabbitConsumer {
            consumer,
            channel,
            queue: shared.name.clone(),
            failed: None,
        }))
    }

    async fn depth(&self) -> QueueResult<u64> {
        self.shared.message_count(&self.shared.name).await
    }

    async fn dead_letters(&self) -> QueueResult<u64> {
        self.shared.message_count(&self.shared.dead).await
    }

    async fn replay_dead_letters(&self, limit: u64) -> QueueResult<Replayed> {
        let shared = &self.shared;
        let p = shared.publisher().await?;
        let channel = p
            .connection
            .create_channel()
            .await
            .map_err(|e| err("opening a channel", e))?;
        let mut replayed = 0;
        // Undecodable dead letters stay unacknowledged until the end, so `basic.get` moves past
        // them; closing the channel puts them back where they were.
        let mut kept = Vec::new();
        let outcome = async {
            while replayed + (kept.len() as u64) < limit {
                let got = channel
                    .basic_get(
                        shared.dead.as_str().into(),
                        BasicGetOptions { no_ack: false },
                    )
                    .await
                    .map_err(|e| err(&format!("reading {}", shared.dead), e))?;
                let Some(got) = got else { break };
                let delivery = got.delivery;
                match decode(&delivery) {
                    Ok(message) => {
                        // Published (and confirmed) before the dead letter goes: a failure in
                        // between leaves a duplicate, which a worker ignores, never a loss.
                        self.publish(&message).await?;
                        delivery
                            .acker
                            .ack(BasicAckOptions::default())
                            .await
                            .map_err(|e| err("acknowledging a replayed dead letter", e))?;
                        replayed += 1;
                    }
                    Err(e) => {
                        tracing::warn!(queue = %shared.dead, error = %e, "undecodable dead letter kept");
                        kept.push(delivery.acker);
                    }
                }
            }
            // Counted while the kept ones are still out, since their return to the queue
            // after the channel closes is not applied at once.
            Ok::<_, QueueError>(shared.message_count(&shared.dead).await? + kept.len() as u64)
        }
        .await;
        let _ = channel.close(200, "OK".into()).await;
        match outcome {
            Ok(left) => Ok(Replayed {
                replayed,
                kept: kept.len() as u64,
                dead_letters_left: left,
            }),
            Err(e) => Err(QueueError::new(format!(
                "{} (after replaying {replayed} dead letters)",
                e.message
            ))),
        }
    }
}

impl Shared {
    /// Messages ready in `queue`, asked with a passive declare on a channel of its own.
    async fn message_count(&self, queue: &str) -> QueueResult<u64> {
        let p = self.publisher().await?;
        let result = async {
            let channel = p.connection.create_channel().await?;
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions::default().passive(),
                    FieldTable::default(),
                )
                .await;
            let _ = channel.close(200, "OK".into()).await;
            declared
        }
        .await;
        match result {
            Ok(declared) => Ok(u64::from(declared.message_count())),
            Err(e) => {
                // Connection lost, or the queue deleted behind our back: rebuild both next time.
                self.discard_publisher(p.generation).await;
                Err(err(&format!("reading the depth of {queue}"), e))
            }
        }
    }
}
