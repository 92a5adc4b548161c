//! Webhook delivery, following the Standard Webhooks specification: each due delivery of the
//! outbox is POSTed with `webhook-id` (the same on every retry), `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed by the
//! endpoint's `whsec_` secret. A 2xx answer delivers it; anything else (another status, a
//! timeout, a refused connection) is retried with exponential backoff until
//! `webhooks.max_attempts`, and counts toward the endpoint's failure run, which disables it at
//! `webhooks.disable_after`.
//!
//! Every gateway runs a dispatcher; deliveries are leased from the store, so several gateways
//! share the outbox, and a gateway that dies mid-attempt only delays a delivery until its
//! lease (`webhooks.timeout` + 30 s) runs out: delivery is at least once.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::Utc;
use hmac::{Hmac, Mac};
use orbit_config::WebhookSettings;
use orbit_core::model::{webhook_id, AttemptNext, DeliveryAttempt, DueDelivery};
use orbit_store::Store;
use rand::Rng as _;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

/// How much longer than an attempt's timeout a lease lasts: the store and the answer's
/// bookkeeping fit well within it.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A new endpoint secret: 32 random bytes, `whsec_<base64>`.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` under the secret's key.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Result<String, String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))
        .map_err(|e| format!("the endpoint's secret is not base64: {e}"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// Addresses an endpoint may not be on unless `webhooks.allow_private_targets`: loopback,
/// private, link-local, carrier-grade NAT, unspecified, multicast and the like, so that a
/// tenant cannot make the gateway call into its own network.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

/// Why `url` may not be an endpoint, if it may not: checked when the endpoint is created
/// (the host's current addresses) and again by every attempt's resolver.
pub async fn check_target(url: &url::Url, allow_private: bool) -> Result<(), TargetError> {
    if allow_private {
        return Ok(());
    }
    let host = match url.host() {
        Some(url::Host::Ipv4(ip)) => return public(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => return public(IpAddr::V6(ip)),
        Some(url::Host::Domain(host)) => host.to_owned(),
        None => return Err(TargetError::Invalid("the URL has no host".into())),
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| TargetError::Invalid(format!("cannot resolve {host}: {e}")))?
        .collect();
    match addrs.iter().find(|a| is_private(a.ip())) {
        Some(private) => Err(TargetError::Private(format!(
            "{host} resolves to {}, a private, loopback or link-local address",
            private.ip()
        ))),
        None => Ok(()),
    }
}

fn public(ip: IpAddr) -> Result<(), TargetError> {
    if is_private(ip) {
        Err(TargetError::Private(format!(
            "{ip} is a private, loopback or link-local address"
        )))
    } else {
        Ok(())
    }
}

#[derive(Debug)]
pub enum TargetError {
    /// Not a usable URL (no host, does not resolve).
    Invalid(String),
    /// On an address endpoints may not use.
    Private(String),
}

/// Resolves like the system does, then drops private addresses, so that a host that resolves
/// somewhere else at delivery time than it did at creation still reaches no internal address.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !is_private(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} has no public address").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn client(settings: &WebhookSettings) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(settings.timeout)
        // A redirect could lead anywhere, a private address included: the receiver's URL
        // is the one registered.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("Orbit-Webhooks/", env!("CARGO_PKG_VERSION")));
    if !settings.allow_private_targets {
        builder = builder.dns_resolver(Arc::new(PublicOnly));
    }
    builder.build()
}

/// The wait after failed attempt number `attempt` (1-based): `retry_base` doubled for each
/// attempt after the first, at most `retry_max`, less up to a tenth at random so that an
/// endpoint coming back is not hit by every retry at once.
pub fn backoff(settings: &WebhookSettings, attempt: u32) -> Duration {
    let full = settings
        .retry_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(settings.retry_max);
    full.mul_f64(1.0 - rand::rng().random_range(0.0..0.1))
}

/// The dispatcher, to run until `stop`: leases due deliveries, sends them, records each
/// attempt. Returned rather than spawned, so the caller's composition root (`app`'s
/// `Background`) owns the task and waits for it at shutdown.
pub fn dispatcher(
    store: Arc<dyn Store>,
    settings: WebhookSettings,
    stop: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let client = client(&settings)?;
    let settings = Arc::new(settings);
    Ok(async move {
        let lease = settings.timeout + LEASE_MARGIN;
        // Each delivery runs on its own, and a free slot is refilled as soon as one ends, so
        // that an endpoint that answers slowly (up to `timeout`) holds one slot, not a batch.
        let mut sending = tokio::task::JoinSet::new();
        loop {
            let free = settings.concurrency.saturating_sub(sending.len() as u32);
            let mut more_due = false;
            if free > 0 {
                match store.claim_deliveries(lease, free).await {
                    Ok(due) => {
                        more_due = due.len() as u32 == free;
                        for delivery in due {
                            let (store, client, settings) =
                                (store.clone(), client.clone(), settings.clone());
                            sending.spawn(async move {
                                deliver(&*store, &client, &settings, delivery).await
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not look for due webhook deliveries")
                    }
                }
            }
            tokio::select! {
                Some(_) = sending.join_next(), if !sending.is_empty() => {}
                () = tokio::time::sleep(settings.poll_interval), if !more_due => {}
                // Deliveries in flight are dropped: their leases run out and another gateway
                // (or this one, restarted) sends them again.
                () = stop.cancelled() => {
                    sending.abort_all();
                    // Aborted tasks end at their next poll; waiting for that keeps every
                    // delivery inside the dispatcher's own lifetime.
                    while sending.join_next().await.is_some() {}
                    return;
                }
            }
        }
    })
}

async fn deliver(
    store: &dyn Store,
    client: &reqwest::Client,
    settings: &WebhookSettings,
    delivery: DueDelivery,
) {
    let number = delivery.attempts + 1;
    let at = Utc::now();
    let started = Instant::now();
    let outcome = send(client, &delivery, settings.allow_private_targets).await;
    let duration_ms = started.elapsed().as_millis() as u64;
    let (status_code, error) = match outcome {
        Ok(code) if (200..300).contains(&code) => (Some(code), None),
        Ok(code) => (Some(code), Some(format!("the endpoint answered {code}"))),
        Err(e) => (None, Some(e)),
    };
    let next = if error.is_none() {
        AttemptNext::Delivered
    } else if number >= settings.max_attempts {
        AttemptNext::GiveUp
    } else {
        AttemptNext::RetryAt(at + backoff(settings, number))
    };
    let outcome = match next {
        AttemptNext::Delivered => "delivered",
        AttemptNext::RetryAt(_) => "retry",
        AttemptNext::GiveUp => "given_up",
    };
    crate::metrics::METRICS
        .webhook_attempts
        .with_label_values(&[outcome])
        .inc();
    let id = webhook_id(delivery.id);
    match &error {
        None => tracing::info!(webhook_id = id, attempt = number, "webhook delivered"),
        Some(e) => {
            tracing::warn!(webhook_id = id, attempt = number, error = %e, ?next, "webhook attempt failed")
        }
    }
    let attempt = DeliveryAttempt {
        attempt: number,
        at,
        status_code,
        error,
        duration_ms,
    };
    if let Err(e) = store
        .record_attempt(&delivery, &attempt, next, settings.disable_after)
        .await
    {
        // The lease runs out and the delivery is sent again: at least once.
        tracing::warn!(webhook_id = id, error = %e, "could not record a webhook attempt");
    }
}

/// One POST: the receiver's status code, or why there was none.
async fn send(
    client: &reqwest::Client,
    delivery: &DueDelivery,
    allow_private: bool,
) -> Result<u16, String> {
    let url = url::Url::parse(&delivery.url).map_err(|e| format!("bad URL: {e}"))?;
    // A literal address skips the resolver: check it here.
    if let Some(ip) = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    } {
        if is_private(ip) && !allow_private {
            return Err(format!("{ip} is a private address"));
        }
    }
    let id = webhook_id(delivery.id);
    let timestamp = Utc::now().timestamp();
    let signature = sign(&delivery.secret, &id, timestamp, &delivery.payload)?;
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(delivery.payload.clone())
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                "timed out".to_owned()
            } else {
                format!(
                    "{e}: {}",
                    std::error::Error::source(&e)
                        .map(ToString::to_string)
                        .unwrap_or_default()
                )
            }
        })?;
    Ok(response.status().as_u16())
}
