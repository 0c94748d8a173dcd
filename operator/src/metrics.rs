//! Prometheus metrics (prometheus-client) and the HTTP endpoints `/metrics`,
//! `/healthz` and `/readyz`. The per-store gauges are in [`store`].

mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use umstore_crds::{UserMetadataStore, UserMetadataStoreStatus};

pub use store::{ReplicaLabels, StoreLabels};

/// Label of the failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// [`Error::metric_label`](crate::error::Error::metric_label).
    pub error: String,
}

/// Label of the API request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    /// `get` (a GET or a LIST), `watch`, `create`, `patch`, `update` or `delete`.
    pub verb: &'static str,
}

/// The verb of a request to the Kubernetes API, from its method and query.
pub fn api_verb(method: &http::Method, query: Option<&str>) -> &'static str {
    let watching = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true"));
    match *method {
        _ if watching => "watch",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PATCH => "patch",
        http::Method::PUT => "update",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

/// Label of the per-step duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// The pipeline step: observe, credentials, provision, bootstrap, migrate,
    /// distribute, promote, keys, status.
    pub step: String,
}

fn step_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    steps: Family<StepLabels, Histogram, fn() -> Histogram>,
    objects_applied: Counter,
    leader: Gauge,
    api_requests: Family<VerbLabels, Counter>,
    stores: store::StoreGauges,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `umstore_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("umstore_operator");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let objects_applied = Counter::default();
        let leader = Gauge::default();
        let steps = Family::<StepLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            step_histogram,
        );
        registry.register(
            "step_duration_seconds",
            "Time spent in each pipeline step of a reconcile",
            steps.clone(),
        );
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error kind",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            duration.clone(),
        );
        registry.register(
            "objects_applied",
            "Objects server-side applied or created",
            objects_applied.clone(),
        );
        let api_requests = Family::<VerbLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Requests to the Kubernetes API, by verb (watches counted when opened)",
            api_requests.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        let stores = store::StoreGauges::register(&mut registry);
        Self {
            registry,
            reconciles,
            failures,
            duration,
            steps,
            objects_applied,
            leader,
            api_requests,
            stores,
        }
    }

    /// Sets the store's `umstore_operator_store_*` gauges from `status` (the status
    /// step calls it with every status it computes, written or unchanged).
    pub fn observe_store(&self, store: &UserMetadataStore, status: &UserMetadataStoreStatus) {
        if let (Some(namespace), Some(name)) = (&store.metadata.namespace, &store.metadata.name) {
            self.stores.observe(namespace, name, status);
        }
    }

    /// Removes every `umstore_operator_store_*` series of a store that is deleted.
    pub fn forget_store(&self, namespace: &str, name: &str) {
        self.stores.forget(namespace, name);
    }

    /// Counts one request to the Kubernetes API.
    pub fn api_request(&self, verb: &'static str) {
        self.api_requests.get_or_create(&VerbLabels { verb }).inc();
    }

    /// A client layer counting every request it sends in
    /// `umstore_operator_api_requests_total`.
    pub fn counting_layer(
        self: &Arc<Self>,
    ) -> tower::util::MapRequestLayer<
        impl Fn(http::Request<kube::client::Body>) -> http::Request<kube::client::Body> + Clone,
    > {
        let metrics = self.clone();
        tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
            metrics.api_request(api_verb(request.method(), request.uri().query()));
            request
        })
    }

    /// Records that `step` ran from `started` until now; returns now, the next
    /// step's start.
    pub fn step_finished(&self, step: &str, started: Instant) -> Instant {
        let now = Instant::now();
        self.steps
            .get_or_create(&StepLabels {
                step: step.to_string(),
            })
            .observe(now.duration_since(started).as_secs_f64());
        now
    }

    /// Counts a reconcile and returns its start time.
    pub fn reconcile_started(&self) -> Instant {
        self.reconciles.inc();
        Instant::now()
    }

    /// Records a reconcile's duration.
    pub fn reconcile_finished(&self, started: Instant) {
        self.duration.observe(started.elapsed().as_secs_f64());
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, error: &str) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.to_string(),
            })
            .inc();
    }

    /// Counts applied objects.
    pub fn objects_applied(&self, n: usize) {
        self.objects_applied.inc_by(n as u64);
    }

    /// Sets the leader gauge. A replica that is not the leader exports no per-store
    /// gauges: only the leader reconciles, so only its values are current.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
        if !leader {
            self.stores.clear();
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        out
    }
}

/// State of the HTTP endpoints.
#[derive(Clone)]
pub struct Health {
    /// The metrics to serve.
    pub metrics: Arc<Metrics>,
    /// Set once the controller's watches are running.
    pub ready: Arc<AtomicBool>,
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if h.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "controller not started")
    }
}

/// The router serving `/metrics`, `/healthz` and `/readyz`.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn endpoints_report_health_readiness_and_metrics() {
        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = router(Health {
            metrics: metrics.clone(),
            ready: ready.clone(),
        });
        tokio::spawn(async move { axum::serve(listener, app).await });

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(
            get(addr, "/readyz").await.starts_with("HTTP/1.1 503"),
            "not ready before the controller starts"
        );
        ready.store(true, Ordering::Release);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));

        let started = metrics.reconcile_started();
        metrics.reconcile_finished(started);
        metrics.reconcile_failed("conflict");
        metrics.set_leader(true);
        let body = get(addr, "/metrics").await;
        for line in [
            "umstore_operator_reconciles_total 1",
            "umstore_operator_reconcile_failures_total{error=\"conflict\"} 1",
            "umstore_operator_reconcile_duration_seconds_count 1",
            "umstore_operator_leader 1",
        ] {
            assert!(body.contains(line), "missing `{line}` in {body}");
        }
    }
}
