//! The kube-runtime `Controller`: watches `UserMetadataStore`s (through
//! `DeserializeGuard`, so one malformed object is reported on itself and never
//! stalls the others) and the objects they own, runs the finalizer and the
//! pipeline, and retries failures with a per-object backoff.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{
    ConfigMap, ObjectReference, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::error_boundary::InvalidObject;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Config;
use kube::runtime::{predicates, reflector, watcher, Predicate, WatchStreamExt};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tracing::{info, info_span, warn, Instrument};
use umstore_crds::{condition, Phase, UserMetadataStore};

use crate::context::Context;
use crate::error::Error;
use crate::meta::{INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGER};
use crate::steps::status::merge_conditions;
use crate::steps::Reason;
use crate::{cleanup, finalizer, pipeline};

/// How long a replica that is not the leader waits before looking again.
pub const NOT_LEADER_RECHECK: Duration = Duration::from_secs(5);

/// The object as the controller sees it.
pub type Guarded = DeserializeGuard<UserMetadataStore>;

/// Reconciles one store. Without the leader Lease it does nothing (no request at
/// all) and looks again shortly.
pub async fn reconcile(obj: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.leader.is_leader() {
        return Ok(Action::requeue(NOT_LEADER_RECHECK));
    }
    let store = match &obj.0 {
        Ok(store) => store,
        Err(invalid) => return report_malformed(&ctx, invalid).await,
    };
    let namespace = store
        .metadata
        .namespace
        .clone()
        .ok_or(Error::MissingMetadata)?;
    let name = store.metadata.name.clone().ok_or(Error::MissingMetadata)?;
    let span = info_span!("reconcile", %namespace, %name, generation = store.metadata.generation);
    async {
        let _in_flight = ctx.load.enter();
        let started = ctx.metrics.reconcile_started();
        let api: Api<UserMetadataStore> = Api::namespaced(ctx.client.clone(), &namespace);
        let result = finalizer::reconcile(
            &api,
            store,
            || async { pipeline::run(&ctx, store).await.map(|report| report.action) },
            || cleanup::run(&ctx, store),
        )
        .await;
        ctx.metrics.reconcile_finished(started);
        if result.is_ok() {
            ctx.succeeded(&format!("{namespace}/{name}"));
        }
        result
    }
    .instrument(span)
    .await
}

/// Requeue with backoff after a failure, and count it by kind.
pub fn error_policy(obj: Arc<Guarded>, error: &Error, ctx: Arc<Context>) -> Action {
    let meta = obj.meta();
    let key = format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    );
    ctx.metrics.reconcile_failed(error.metric_label());
    let wait = ctx.backoff(&key);
    warn!(object = %key, %error, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// A store that does not deserialize: a Warning Event and an `Invalid` phase on the
/// object itself; then wait for it to change.
async fn report_malformed(ctx: &Context, invalid: &InvalidObject) -> Result<Action, Error> {
    let meta = &invalid.metadata;
    let (Some(name), Some(namespace)) = (meta.name.clone(), meta.namespace.clone()) else {
        return Err(Error::MissingMetadata);
    };
    warn!(%namespace, %name, error = %invalid.error, "malformed UserMetadataStore");
    let message = format!(
        "the object does not match the UserMetadataStore schema: {}",
        invalid.error
    );
    let reference = ObjectReference {
        api_version: Some("umstore.io/v1alpha1".into()),
        kind: Some("UserMetadataStore".into()),
        name: Some(name.clone()),
        namespace: Some(namespace.clone()),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..ObjectReference::default()
    };
    // The Ready condition keeps its lastTransitionTime when it was already false;
    // (a plain GET returns the status too: the chart grants no get on the
    // status subresource.)
    // the other conditions and fields are left as they were.
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &namespace,
        &ApiResource::erase::<UserMetadataStore>(&()),
    );
    // A plain GET: it returns the status too, and the chart grants no `get` on the
    // status subresource.
    let current = api.get(&name).await.map_err(Error::kube(format!(
        "reading the status of {namespace}/{name}"
    )))?;
    let old = current.data.get("status").cloned().unwrap_or_default();
    let old_conditions: Vec<Condition> = old
        .get("conditions")
        .cloned()
        .and_then(|c| serde_json::from_value(c).ok())
        .unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let ready = Condition {
        type_: condition::READY.into(),
        status: "False".into(),
        reason: Reason::Malformed.as_str().into(),
        message: message.clone(),
        observed_generation: meta.generation,
        last_transition_time: now,
    };
    let conditions = merge_conditions(&old_conditions, vec![ready]);
    let status = serde_json::json!({
        "observedGeneration": meta.generation,
        "phase": Phase::Invalid,
        "conditions": conditions,
    });
    let unchanged = ["observedGeneration", "phase", "conditions"]
        .iter()
        .all(|k| old.get(k) == status.get(k));
    if unchanged {
        return Ok(Action::await_change());
    }
    let event = Event {
        type_: EventType::Warning,
        reason: Reason::Malformed.as_str().into(),
        note: Some(message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &reference).await {
        warn!(%error, "could not publish the Malformed Event");
    }
    crate::steps::status::apply_status(&ctx.client, &namespace, &name, status).await?;
    Ok(Action::await_change())
}

fn owned_stream<K>(
    client: &Client,
    namespace: Option<&str>,
) -> impl futures_util::Stream<Item = Result<kube::core::PartialObjectMeta<K>, watcher::Error>>
       + Send
       + 'static
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    // Metadata only (`PartialObjectMeta`): enough to map a change to its owner, and
    // nothing is kept (no cache, no per-object predicate state: a fleet's objects
    // would cost memory for each); the reconcile re-lists what it needs. A relist
    // re-triggers each store once, which the debounce and the scheduler absorb.
    let api: Api<kube::core::PartialObjectMeta<K>> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    watcher(
        api,
        Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}")),
    )
    .touched_objects()
}

/// How many stores are reconciled at once, and how long a burst of changes to one
/// store is gathered into one reconcile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Reconciles in flight at most (each holds its store's listed objects, so this
    /// bounds the operator's memory as the fleet grows; never two of one store).
    pub concurrency: u16,
    /// Changes to a store or its objects within this window make one reconcile
    /// (the first reconcile's creates each come back as a watch event).
    pub debounce: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 16,
            debounce: Duration::from_secs(1),
        }
    }
}

/// Runs the controller until SIGTERM/ctrl-c with the default [`Settings`].
/// `namespace` limits it to one namespace.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, ready: Arc<AtomicBool>) {
    run_with(ctx, namespace, ready, Settings::default()).await;
}

/// Runs the controller until SIGTERM/ctrl-c. `namespace` limits it to one namespace.
pub async fn run_with(
    ctx: Arc<Context>,
    namespace: Option<String>,
    ready: Arc<AtomicBool>,
    settings: Settings,
) {
    let client = ctx.client.clone();
    ctx.load.set_limit(usize::from(settings.concurrency));
    let ns = namespace.as_deref();
    let stores: Api<Guarded> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = reflector::store();
    // Status writes do not change the generation: they never trigger a reconcile.
    // Finalizer changes do (the finalizer helper waits for one after adding it).
    // The cached stores without their managedFields (often half of a small object):
    // the operator never reads them.
    let watch = watcher(stores, Config::default().any_semantic()).modify(|store| {
        store.meta_mut().managed_fields = None;
    });
    let trigger = reflector(writer, watch)
        .default_backoff()
        .touched_objects()
        .predicate_filter(
            // Annotations too: `umstore.io/switchover-to` asks for a switchover.
            predicates::generation
                .combine(predicates::finalizers)
                .combine(predicates::annotations),
            Default::default(),
        );
    let controller = Controller::for_stream(trigger, reader)
        .owns_stream(owned_stream::<ServiceAccount>(&client, ns))
        .owns_stream(owned_stream::<ConfigMap>(&client, ns))
        .owns_stream(owned_stream::<Secret>(&client, ns))
        .owns_stream(owned_stream::<Service>(&client, ns))
        .owns_stream(owned_stream::<StatefulSet>(&client, ns))
        .owns_stream(owned_stream::<Deployment>(&client, ns))
        .owns_stream(owned_stream::<PodDisruptionBudget>(&client, ns))
        .owns_stream(owned_stream::<NetworkPolicy>(&client, ns))
        .owns_stream(owned_stream::<Role>(&client, ns))
        .owns_stream(owned_stream::<RoleBinding>(&client, ns))
        .owns_stream(owned_stream::<CronJob>(&client, ns))
        // The pods (owned by the StatefulSets and ReplicaSets, not the store): a
        // pod that becomes ready, or starts failing, is looked at at once, so the
        // status names the cause without waiting for a recheck.
        .watches_stream(owned_stream::<Pod>(&client, ns), |pod| {
            let namespace = pod.metadata.namespace.clone()?;
            let store = pod.metadata.labels.as_ref()?.get(INSTANCE_LABEL)?.clone();
            Some(ObjectRef::<Guarded>::new(&store).within(&namespace))
        })
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(settings.concurrency)
                .debounce(settings.debounce),
        )
        .shutdown_on_signal();
    ready.store(true, Ordering::Release);
    info!(
        namespace = ns.unwrap_or("<all>"),
        concurrency = settings.concurrency,
        debounce = ?settings.debounce,
        "controller started"
    );
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile result");
            }
        })
        .await;
    info!("controller stopped");
}
