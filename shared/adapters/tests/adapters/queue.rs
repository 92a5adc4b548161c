//! One conformance suite for every queue backend: the in-process `MemoryQueue` and
//! `RabbitQueue` on the broker named by `ORBIT_TEST_AMQP_URL`
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! The broker is shared with other test runs: every RabbitMQ test declares its own
//! `orbit-test-<uuid>` queue (plus `.dead` and `.dlx`) and deletes them when it ends, passed or
//! failed. An unreachable broker fails the RabbitMQ tests; they are never skipped.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use orbit_adapters::queue::memory::MemoryQueue;
use orbit_adapters::queue::rabbitmq::{queue_arguments, RabbitQueue};
use orbit_adapters::queue::{Consumer, Delivery, Queue};
use orbit_config::{QueueSettings, Settings};
use orbit_core::model::ChunkRef;
use orbit_testkit::{amqp_url, TestQueue};
use uuid::Uuid;

/// Long enough for a loaded 2-core machine; only failures ever wait this long.
const PATIENCE: Duration = Duration::from_secs(15);
/// How long a `next()` that must not complete is given.
const QUIET: Duration = Duration::from_millis(1500);
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const TRACESTATE: &str = "vendor=opaque";

/// What a backend promises beyond the trait's common ground.
#[derive(Clone, Copy)]
struct Caps {
    /// Unacked deliveries go back to the queue when their consumer goes.
    redelivers: bool,
}

const MEMORY: Caps = Caps {
    // The in-process queue documents that it has no redelivery (messages die with the process
    // and the start-up re-queue covers that), so the redelivery assertion is skipped for it.
    redelivers: false,
};
const RABBIT: Caps = Caps { redelivers: true };

fn chunk(traceparent: Option<&str>) -> ChunkRef {
    ChunkRef {
        directory_id: Uuid::now_v7(),
        source_id: Uuid::new_v4(),
        chunk_id: Uuid::new_v4(),
        attempt: 1,
        traceparent: traceparent.map(str::to_owned),
        tracestate: traceparent.map(|_| TRACESTATE.to_owned()),
        takeover: false,
    }
}

async fn next(consumer: &mut Box<dyn Consumer>) -> Delivery {
    match tokio::time::timeout(PATIENCE, consumer.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("next() failed: {e}"),
        Ok(None) => panic!("next() reported the queue closed"),
        Err(_) => panic!("no delivery within {PATIENCE:?}"),
    }
}

/// True if `next()` stays pending for `QUIET` (the pending call is abandoned).
async fn stays_quiet(consumer: &mut Box<dyn Consumer>) -> bool {
    tokio::time::timeout(QUIET, consumer.next()).await.is_err()
}

/// Polls `probe` until it returns `want` or `PATIENCE` runs out; returns the last value.
async fn eventually<T, F, Fut>(want: T, mut probe: F) -> T
where
    T: PartialEq + Copy,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let got = probe().await;
        if got == want || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn depth(queue: &dyn Queue) -> u64 {
    queue.depth().await.expect("depth")
}

// ---------------------------------------------------------------------------------------------
// The suite: every function takes any backend.

async fn publish_then_consume_returns_the_same_message(queue: &dyn Queue, _caps: Caps) {
    queue.ping().await.expect("ping");
    let traced = chunk(Some(TRACEPARENT));
    let untraced = chunk(None);
    queue.publish(&traced).await.expect("publish");
    queue.publish(&untraced).await.expect("publish");
    let mut consumer = queue.consume(4).await.expect("consume");
    let first = next(&mut consumer).await;
    let second = next(&mut consumer).await;
    assert_eq!(first.message, traced);
    assert_eq!(first.message.traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(first.message.tracestate.as_deref(), Some(TRACESTATE));
    assert_eq!(second.message, untraced);
    first.acker.ack().await.expect("ack");
    second.acker.ack().await.expect("ack");
}

async fn depth_counts_ready_messages(queue: &dyn Queue, _caps: Caps) {
    assert_eq!(depth(queue).await, 0);
    for _ in 0..3 {
        queue.publish(&chunk(None)).await.expect("publish");
    }
    assert_eq!(eventually(3, || depth(queue)).await, 3);
    let mut consumer = queue.consume(1).await.expect("consume");
    let taken = next(&mut consumer).await;
    // The delivered (unacked) message is no longer ready.
    assert_eq!(eventually(2, || depth(queue)).await, 2);
    taken.acker.ack().await.expect("ack");
    for _ in 0..2 {
        next(&mut consumer).await.acker.ack().await.expect("ack");
    }
    assert_eq!(eventually(0, || depth(queue)).await, 0);
}

async fn prefetch_bounds_unacked_deliveries(queue: &dyn Queue, _caps: Caps) {
    let sent: Vec<ChunkRef> = (0..5).map(|_| chunk(None)).collect();
    for m in &sent {
        queue.publish(m).await.expect("publish");
    }
    let mut consumer = queue.consume(2).await.expect("consume");
    let d1 = next(&mut consumer).await;
    let d2 = next(&mut consumer).await;
    let mut got = vec![d1.message.clone(), d2.message.clone()];
    assert!(
        stays_quiet(&mut consumer).await,
        "a third delivery arrived while two were unacked with prefetch 2"
    );
    d1.acker.ack().await.expect("ack");
    let d3 = next(&mut consumer).await;
    got.push(d3.message.clone());
    d2.acker.ack().await.expect("ack");
    d3.acker.ack().await.expect("ack");
    for _ in 0..2 {
        let d = next(&mut consumer).await;
        got.push(d.message.clone());
        d.acker.ack().await.expect("ack");
    }
    assert_eq!(got, sent, "every message once, in order");
    assert!(stays_quiet(&mut consumer).await, "nothing left to deliver");
}

async fn unacked_delivery_is_redelivered_after_its_consumer_is_dropped(
    queue: &dyn Queue,
    caps: Caps,
) {
    let message = chunk(Some(TRACEPARENT));
    queue.publish(&message).await.expect("publish");
    let mut consumer = queue.consume(1).await.expect("consume");
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.message, message);
    drop(delivery);
    drop(consumer);
    let mut consumer = queue.consume(1).await.expect("consume again");
    if caps.redelivers {
        let again = next(&mut consumer).await;
        assert_eq!(again.message, message);
        again.acker.ack().await.expect("ack");
    }
    // An acked message is gone for good.
    assert!(
        stays_quiet(&mut consumer).await,
        "an acked message came back"
    );
    drop(consumer);
    assert_eq!(eventually(0, || depth(queue)).await, 0);
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

fn rabbit_settings(name: &str) -> QueueSettings {
    let mut settings = Settings::defaults().queue;
    settings.url = amqp_url().parse().unwrap();
    settings.name = name.to_owned();
    settings.reconnect_timeout = Duration::from_secs(20);
    settings
}

/// A `RabbitQueue` on its own queue; the guard deletes the queue, `.dead` and `.dlx` when the
/// test ends, passed or failed.
struct Rabbit {
    queue: RabbitQueue,
    name: String,
    _guard: TestQueue,
}

impl Rabbit {
    async fn new() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(configure: impl FnOnce(&mut QueueSettings)) -> Self {
        // Created first, so that whatever part of the topology a failed open declared goes too.
        let guard = TestQueue::new();
        let name = guard.name.clone();
        let mut settings = rabbit_settings(&name);
        configure(&mut settings);
        match RabbitQueue::open(&settings).await {
            Ok(queue) => Rabbit {
                queue,
                name,
                _guard: guard,
            },
            Err(e) => panic!(
                "RabbitMQ is not usable at {} ({e}); these tests need a broker: start one \
                 or point ORBIT_TEST_AMQP_URL at one",
                amqp_url()
            ),
        }
    }
}

async fn raw_connection() -> lapin::Result<Connection> {
    Connection::connect(
        &amqp_url(),
        ConnectionProperties::default().with_connection_name("orbit conformance test".into()),
    )
    .await
}

async fn raw() -> Connection {
    raw_connection()
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ is not reachable at {}: {e}", amqp_url()))
}

macro_rules! on_memory {
    ($case:path) => {{
        let queue = super::MemoryQueue::new();
        assert_eq!(super::Queue::backend(&queue), "embedded");
        $case(&queue, super::MEMORY).await;
    }};
}

macro_rules! on_rabbitmq {
    ($case:path) => {{
        let rabbit = super::Rabbit::new().await;
        assert_eq!(super::Queue::backend(&rabbit.queue), "rabbitmq");
        $case(&rabbit.queue, super::RABBIT).await;
    }};
}

orbit_testkit::conformance!(memory => on_memory, rabbitmq => on_rabbitmq; {
    publish_then_consume_returns_the_same_message,
    depth_counts_ready_messages,
    prefetch_bounds_unacked_deliveries,
    unacked_delivery_is_redelivered_after_its_consumer_is_dropped,
});

// ---------------------------------------------------------------------------------------------
// RabbitMQ only.

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Declares `name` with `args` on a fresh channel; the error text if the broker refuses.
async fn redeclare(conn: &Connection, name: &str, args: FieldTable) -> Result<(), String> {
    let ch = conn.create_channel().await.expect("channel");
    let result = ch
        .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    if result.is_ok() {
        let _ = ch.close(200, "OK".into()).await;
    }
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_topology_is_a_quorum_queue_with_delivery_limit_and_dead_letters() {
    let limit = 2;
    let rabbit = Rabbit::with(|s| s.delivery_limit = limit).await;
    let name = rabbit.name.clone();
    let dlx = format!("{name}.dlx");
    let dead = format!("{name}.dead");
    let conn = raw().await;

    // The broker accepts exactly our arguments and refuses any other (PRECONDITION_FAILED).
    redeclare(&conn, &name, queue_arguments(&dlx, limit))
        .await
        .expect("same arguments are equivalent");
    let mut classic = queue_arguments(&dlx, limit);
    classic.insert("x-queue-type".into(), long_string("classic"));
    let e = redeclare(&conn, &name, classic)
        .await
        .expect_err("not a classic queue");
    assert!(e.contains("PRECONDITION_FAILED"), "{e}");
    let e = redeclare(&conn, &name, queue_arguments(&dlx, limit + 1))
        .await
        .expect_err("delivery limit differs");
    assert!(e.contains("x-delivery-limit"), "{e}");
    let e = redeclare(&conn, &name, queue_arguments("elsewhere", limit))
        .await
        .expect_err("dead-letter exchange differs");
    assert!(e.contains("x-dead-letter-exchange"), "{e}");
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), long_string("quorum"));
    redeclare(&conn, &dead, quorum)
        .await
        .expect("the dead-letter queue is a durable quorum queue");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        dlx.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("the dead-letter exchange exists");

    // A message returned unacked more than `limit` times lands in the dead-letter queue.
    let message = chunk(Some(TRACEPARENT));
    rabbit.queue.publish(&message).await.expect("publish");
    ch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut deliveries = 0;
    let dead_count = || async {
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                dead.as_str().into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .expect("passive declare of the dead-letter queue");
        let _ = ch.close(200, "OK".into()).await;
        q.message_count()
    };
    loop {
        let got = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await;
        let Ok(Some(Ok(delivery))) = got else { break };
        deliveries += 1;
        assert!(
            deliveries <= limit + 1,
            "still delivered after {deliveries} deliveries"
        );
        delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("nack");
    }
    assert_eq!(
        deliveries,
        limit + 1,
        "delivered once plus `limit` redeliveries"
    );
    assert_eq!(eventually(1, dead_count).await, 1, "dead-lettered");
    let dead_message = ch
        .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("a dead message");
    let body: ChunkRef = serde_json::from_slice(&dead_message.delivery.data).expect("JSON body");
    assert_eq!(body, message);
    assert_eq!(depth(&rabbit.queue).await, 0);
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_messages_are_persistent_json_with_a_traceparent_header() {
    let rabbit = Rabbit::new().await;
    let message = chunk(Some(TRACEPARENT));
    rabbit.queue.publish(&message).await.expect("publish");
    let conn = raw().await;
    let ch = conn.create_channel().await.expect("channel");
    let got = ch
        .basic_get(
            rabbit.name.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
        .expect("a message");
    let props = &got.delivery.properties;
    assert_eq!(
        props.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(*props.delivery_mode(), Some(2), "persistent");
    let header = |name: &str| {
        props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name))
            .and_then(AMQPValue::as_long_string)
            .map(|s| String::from_utf8_lossy(s.as_bytes()).into_owned())
    };
    assert_eq!(header("traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(header("tracestate").as_deref(), Some(TRACESTATE));
    let body: ChunkRef = serde_json::from_slice(&got.delivery.data).expect("JSON body");
    assert_eq!(body, message);
    let _ = conn.close(200, "OK".into()).await;
}

/// The `frame_max` RabbitMQ negotiated for the queue's publishing connection, as
/// `rabbitmqctl list_connections` reports it.
async fn publishing_frame_max(rabbit: &Rabbit) -> u32 {
    let name = format!("\"{} publish\"", rabbit.queue.connection_name_prefix());
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new("rabbitmqctl")
            .args([
                "list_connections",
                "frame_max",
                "client_properties",
                "--quiet",
                "--no-table-headers",
            ])
            .output()
            .expect("rabbitmqctl runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    listing
        .lines()
        .find(|line| line.contains(&name))
        .and_then(|line| line.split('\t').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no connection {name} in:\n{listing}"))
}

/// lapin buffers 32 frames each way per connection: at RabbitMQ's default frame_max (128 KiB)
/// that was 8 MiB of every process's memory a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_connections_use_small_frames_unless_the_url_sets_them() {
    let rabbit = Rabbit::new().await;
    rabbit.queue.publish(&chunk(None)).await.expect("publish");
    assert_eq!(publishing_frame_max(&rabbit).await, 16 * 1024);

    let url = amqp_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    let rabbit = Rabbit::with(|s| {
        s.url = format!("{url}{separator}frame_max=65536").parse().unwrap();
    })
    .await;
    rabbit.queue.publish(&chunk(None)).await.expect("publish");
    assert_eq!(publishing_frame_max(&rabbit).await, 65536);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_unroutable_publish_fails_and_the_next_one_redeclares_the_queue() {
    let rabbit = Rabbit::new().await;
    let conn = raw().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(rabbit.name.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the queue behind the backend's back");
    let e = rabbit
        .queue
        .publish(&chunk(None))
        .await
        .expect_err("a mandatory message with no queue is returned");
    assert!(e.message.contains("unroutable"), "{e}");
    rabbit
        .queue
        .publish(&chunk(None))
        .await
        .expect("the next publish rebuilds the topology");
    assert_eq!(eventually(1, || depth(&rabbit.queue)).await, 1);
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_open_fails_clearly_when_the_broker_is_unreachable() {
    let mut settings = rabbit_settings(&format!("orbit-test-{}", Uuid::new_v4()));
    settings.url = "amqp://guest:secret@127.0.0.1:1/%2f".parse().unwrap();
    settings.reconnect_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let e = match RabbitQueue::open(&settings).await {
        Ok(_) => panic!("connected to a closed port"),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up in time"
    );
    assert!(e.message.contains("127.0.0.1:1"), "{e}");
    assert!(!e.message.contains("secret"), "password leaked: {e}");
}

/// Closes the queue's connections from the broker's side with `rabbitmqctl` when it is here
/// (as on the CI machines), else from the client's side through the test hook.
async fn kill_connections(rabbit: &Rabbit) {
    let prefix = rabbit.queue.connection_name_prefix();
    let rabbitmqctl = std::process::Command::new("sh")
        .args(["-c", "command -v rabbitmqctl"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if rabbitmqctl {
        let prefix2 = prefix.clone();
        let closed = tokio::task::spawn_blocking(move || close_with_rabbitmqctl(&prefix2))
            .await
            .expect("rabbitmqctl task");
        match closed {
            Ok(n) if n > 0 => {
                eprintln!("closed {n} connection(s) with rabbitmqctl");
                return;
            }
            Ok(_) => eprintln!("rabbitmqctl listed none of our connections; using the test hook"),
            Err(e) => eprintln!("rabbitmqctl failed ({e}); using the test hook"),
        }
    }
    rabbit.queue.close_connections_for_test().await;
}

fn close_with_rabbitmqctl(prefix: &str) -> Result<usize, String> {
    // One line a connection: `<rabbit@host.N.N.N>\t[{"connection_name","..."},...]`. (The JSON
    // formatter prints pids as `#PID<..>`, which `close_connection` does not accept.)
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "--quiet",
            "--no-table-headers",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let mut closed = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((pid, props)) = line.split_once('\t') else {
            continue;
        };
        // Both "{prefix} publish" and "{prefix} consume".
        if props.contains(&format!("\"{prefix} ")) {
            let status = std::process::Command::new("rabbitmqctl")
                .args([
                    "close_connection",
                    pid.trim(),
                    "orbit conformance test: simulated outage",
                ])
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|e| e.to_string())?;
            if status.success() {
                closed += 1;
            }
        }
    }
    Ok(closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_reconnects_after_its_connections_are_closed() {
    let rabbit = Rabbit::new().await;
    let queue = &rabbit.queue;
    let first = chunk(Some(TRACEPARENT));
    queue.publish(&first).await.expect("publish");
    let mut consumer = queue.consume(2).await.expect("consume");
    let held = next(&mut consumer).await;
    assert_eq!(held.message, first);

    kill_connections(&rabbit).await;

    // The consumer reports the loss (the worker then calls `consume()` again).
    match tokio::time::timeout(PATIENCE, consumer.next()).await {
        Ok(Some(Err(e))) => eprintln!("consumer reported: {e}"),
        Ok(Some(Ok(d))) => panic!("delivery {:?} after the connection died", d.message),
        Ok(None) => panic!("a lost connection must not look like a closed queue"),
        Err(_) => panic!("the consumer did not notice its connection died"),
    }
    // The delivery taken on the dead channel cannot be acked; the broker requeued it.
    let e = held.acker.ack().await.expect_err("ack on a dead channel");
    eprintln!("ack reported: {e}");
    drop(consumer);

    // Publishing reconnects transparently; consuming again works.
    let second = chunk(None);
    queue
        .publish(&second)
        .await
        .expect("publish after reconnection");
    queue.ping().await.expect("ping after reconnection");
    let mut consumer = queue.consume(2).await.expect("consume after reconnection");
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = next(&mut consumer).await;
        got.push(d.message.clone());
        d.acker.ack().await.expect("ack after reconnection");
    }
    got.sort_by_key(|m| m.chunk_id);
    let mut want = vec![first, second];
    want.sort_by_key(|m| m.chunk_id);
    assert_eq!(
        got, want,
        "the unacked message came back, the new one arrived"
    );
    assert!(stays_quiet(&mut consumer).await);
    drop(consumer);
    assert_eq!(eventually(0, || depth(queue)).await, 0);

    // And again with the client-side hook, which closes both connections cleanly.
    let mut consumer = queue.consume(1).await.expect("consume");
    queue.close_connections_for_test().await;
    assert!(
        matches!(
            tokio::time::timeout(PATIENCE, consumer.next()).await,
            Ok(Some(Err(_)))
        ),
        "the consumer reports its closed connection"
    );
    let third = chunk(None);
    queue.publish(&third).await.expect("publish after hook");
    let mut consumer = queue.consume(1).await.expect("consume after hook");
    let d = next(&mut consumer).await;
    assert_eq!(d.message, third);
    d.acker.ack().await.expect("ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_open_fails_fast_on_refused_credentials() {
    let mut url = url::Url::parse(&amqp_url()).expect("ORBIT_TEST_AMQP_URL is a URL");
    url.set_password(Some("not-the-password"))
        .expect("password");
    let mut settings = rabbit_settings(&format!("orbit-test-{}", Uuid::new_v4()));
    settings.url = url.to_string().parse().unwrap();
    let started = std::time::Instant::now();
    let e = match RabbitQueue::open(&settings).await {
        Ok(_) => panic!("logged in with a wrong password"),
        Err(e) => e,
    };
    assert!(e.message.contains("ACCESS_REFUSED"), "{e}");
    // The broker client's error is kept as the source, not only quoted.
    assert!(std::error::Error::source(&e).is_some(), "{e:?}");
    assert!(
        started.elapsed() < settings.reconnect_timeout / 2,
        "refused credentials are not retried"
    );
    assert!(
        !e.message.contains("not-the-password"),
        "password leaked: {e}"
    );
}

/// A TCP proxy in front of the broker that can simulate an outage (a broker restart): every
/// proxied connection is cut, and new ones are dropped at once until the outage ends.
struct Proxy {
    url: String,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Self {
        let mut url = url::Url::parse(&amqp_url()).expect("ORBIT_TEST_AMQP_URL is a URL");
        let broker = format!(
            "{}:{}",
            url.host_str().expect("broker host"),
            url.port().unwrap_or(5672)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(port)).expect("port");
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let is_down = down.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if is_down.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let broker = broker.clone();
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&broker).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Proxy {
            url: url.to_string(),
            down,
            cut,
            task,
        }
    }

    fn go_down(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn come_back(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_publish_rides_out_a_broker_outage() {
    let proxy = Proxy::start().await;
    let url = proxy.url.clone();
    let rabbit = Rabbit::with(|s| s.url = url.parse().unwrap()).await;
    let queue = &rabbit.queue;
    let first = chunk(None);
    queue.publish(&first).await.expect("publish");
    let mut consumer = queue.consume(1).await.expect("consume");
    let held = next(&mut consumer).await;

    proxy.go_down();
    assert!(
        matches!(
            tokio::time::timeout(PATIENCE, consumer.next()).await,
            Ok(Some(Err(_)))
        ),
        "the consumer reports the outage"
    );
    assert!(held.acker.ack().await.is_err(), "ack on a dead connection");
    drop(consumer);
    let e = match queue.consume(1).await {
        Ok(_) => panic!("consumed during the outage"),
        Err(e) => e,
    };
    eprintln!("consume during the outage: {e}");
    assert!(queue.ping().await.is_err(), "ping during the outage");

    // The broker comes back 3 s later; a publish started during the outage waits for it.
    let outage = Duration::from_secs(3);
    let started = tokio::time::Instant::now();
    let second = chunk(None);
    let (published, ()) = tokio::join!(queue.publish(&second), async {
        tokio::time::sleep(outage).await;
        proxy.come_back();
    });
    published.expect("publish across the outage");
    assert!(
        started.elapsed() >= outage,
        "published while the broker was down?"
    );
    queue.ping().await.expect("ping after the outage");

    let mut consumer = queue.consume(2).await.expect("consume after the outage");
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = next(&mut consumer).await;
        got.push(d.message.clone());
        d.acker.ack().await.expect("ack");
    }
    got.sort_by_key(|m| m.chunk_id);
    let mut want = vec![first, second];
    want.sort_by_key(|m| m.chunk_id);
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_undecodable_messages_are_dead_lettered_and_skipped() {
    let rabbit = Rabbit::new().await;
    let conn = raw().await;
    let ch = conn.create_channel().await.expect("channel");
    // Confirmed before the good message goes out on another connection: unconfirmed, the good
    // one could be queued first, and then nothing polls the consumer that would reject the
    // garbage.
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    ch.basic_publish(
        "".into(),
        rabbit.name.as_str().into(),
        lapin::options::BasicPublishOptions::default(),
        b"not json",
        lapin::BasicProperties::default(),
    )
    .await
    .expect("publish garbage")
    .await
    .expect("garbage confirmed");
    let good = chunk(None);
    rabbit.queue.publish(&good).await.expect("publish");
    let mut consumer = rabbit.queue.consume(1).await.expect("consume");
    let d = next(&mut consumer).await;
    assert_eq!(d.message, good, "the garbage was skipped");
    d.acker.ack().await.expect("ack");
    let dead = format!("{}.dead", rabbit.name);
    let dead_count = || async {
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                dead.as_str().into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = ch.close(200, "OK".into()).await;
        q.message_count()
    };
    assert_eq!(
        eventually(1, dead_count).await,
        1,
        "the garbage was dead-lettered"
    );
    let _ = conn.close(200, "OK".into()).await;
}
