//! The harness's control plane (`umstore_e2e::ControlPlane`): kube-controller-manager,
//! kube-scheduler and kwok beside a real kube-apiserver, built from their Go modules
//! by `scripts/install-deps.sh --test`. These tests prove that the bed acts on objects
//! the way a cluster does, so the operator's tests can rely on it: a StatefulSet
//! reaches its ready replicas and its volume claim templates give bound claims, a
//! Deployment's pod becomes ready, a Job completes, deleting an owner removes its pods
//! (garbage collector), a GPU pod lands on the GPU node, and a claim no provisioner
//! serves stays Pending with its pod unschedulable.
//!
//! No container runs: kwok marks a scheduled pod Running and Ready at once. The
//! tests share one control plane, each in its own namespace. Skips with the reason
//! where a binary is missing (fails instead under `UMSTORE_REQUIRE_COMPONENTS=1`).

#[path = "support/kubeapi.rs"]
mod kubeapi;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    Pod, PodSpec, PodTemplateSpec, ResourceRequirements, Service, ServiceAccount, ServicePort,
    ServiceSpec, Toleration, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::Client;
use umstore_e2e::controlplane::{GPU_NODE, GPU_RESOURCE, GPU_TAINT, NODE, STORAGE_CLASS};
use umstore_e2e::{shared, ControlPlane};

use kubeapi::{admin_client, fresh_namespace, wait_for};

/// How long a workload may take to become ready (about 2 s here).
const READY: Duration = Duration::from_secs(30);

/// The shared control plane and an admin client, or `None` after a skip.
async fn control_plane_or_skip() -> Option<(&'static ControlPlane, Client)> {
    let control_plane = shared().control_plane_or_skip()?;
    let client = admin_client(control_plane.api()).await;
    Some((control_plane, client))
}

/// A fresh namespace whose `default` ServiceAccount exists (the controller manager
/// makes it; pods are refused until then).
async fn namespace(client: &Client, prefix: &str) -> String {
    let ns = fresh_namespace(client, prefix).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    wait_for("the namespace's default ServiceAccount", READY, || async {
        accounts.get_opt("default").await.ok().flatten()
    })
    .await;
    ns
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_owned(), app.to_owned())])
}

/// A pod template of one container that never runs (kwok pulls no image).
fn template(app: &str, container: Container) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(app)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".into(),
                image: Some("registry.invalid/umstore/none:0".into()),
                ..container
            }],
            ..PodSpec::default()
        }),
    }
}

fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

async fn pods_of(pods: &Api<Pod>, app: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .expect("list pods")
        .items
}

fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_reaches_two_ready_replicas_with_bound_claims_and_its_deletion_removes_its_pods(
) {
    let Some((_, client)) = control_plane_or_skip().await else {
        return;
    };
    let ns = namespace(&client, "sts").await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);

    let service = Service {
        metadata: ObjectMeta {
            name: Some("db".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(labels("db")),
            ports: Some(vec![ServicePort {
                name: Some("postgres".into()),
                port: 5432,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    services
        .create(&PostParams::default(), &service)
        .await
        .expect("create the headless Service");
    let claim_template = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity("1Gi".into()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            // No class: the default one (kwok's) applies.
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    let statefulset = StatefulSet {
        metadata: ObjectMeta {
            name: Some("db".into()),
            ..ObjectMeta::default()
        },
        spec: StatefulSetSpec {
            replicas: Some(2),
            service_name: Some("db".into()),
            selector: LabelSelector {
                match_labels: Some(labels("db")),
                ..LabelSelector::default()
            },
            template: template(
                "db",
                Container {
                    volume_mounts: Some(vec![VolumeMount {
                        name: "data".into(),
                        mount_path: "/data".into(),
                        ..VolumeMount::default()
                    }]),
                    ..Container::default()
                },
            ),
            volume_claim_templates: Some(vec![claim_template]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    };
    statefulsets
        .create(&PostParams::default(), &statefulset)
        .await
        .expect("create the StatefulSet");

    // The StatefulSet controller creates the claims and the pods one at a time
    // (OrderedReady), kwok binds the claims, the scheduler places each pod and kwok
    // makes it Running and Ready.
    wait_for("the StatefulSet's 2 ready replicas", READY, || async {
        let status = statefulsets.get("db").await.ok()?.status?;
        (status.ready_replicas == Some(2)).then_some(())
    })
    .await;
    let running = pods_of(&pods, "db").await;
    let mut names: Vec<&str> = running.iter().map(name).collect();
    names.sort();
    assert_eq!(names, ["db-0", "db-1"]);
    for pod in &running {
        assert!(
            is_ready(pod),
            "{} is Running and Ready: {:?}",
            name(pod),
            pod.status
        );
        let spec = pod.spec.as_ref().expect("spec");
        // The GPU node's taint keeps pods that do not tolerate it away.
        assert_eq!(
            spec.node_name.as_deref(),
            Some(NODE),
            "{} placed",
            name(pod)
        );
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
        assert!(
            ip.is_some_and(|ip| ip.starts_with("10.244.")),
            "{} has a pod IP from kwok's range: {ip:?}",
            name(pod)
        );
    }
    for claim in ["data-db-0", "data-db-1"] {
        let claim = claims.get(claim).await.expect("the template's claim");
        let spec = claim.spec.as_ref().expect("spec");
        assert_eq!(spec.storage_class_name.as_deref(), Some(STORAGE_CLASS));
        assert!(spec.volume_name.is_some(), "a volume is bound: {spec:?}");
        assert_eq!(claim.status.and_then(|s| s.phase).as_deref(), Some("Bound"));
    }
    // The EndpointSlice controller lists both pods behind the headless Service.
    wait_for("2 ready endpoints of Service db", READY, || async {
        let listed = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=db"))
            .await
            .ok()?;
        let ready = listed
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .count();
        (ready == 2).then_some(())
    })
    .await;

    // Deleting the owner (background propagation): the garbage collector deletes the
    // pods, kwok lets them go. The claims stay: the default retention policy keeps
    // them when the StatefulSet is deleted.
    statefulsets
        .delete("db", &DeleteParams::background())
        .await
        .expect("delete the StatefulSet");
    wait_for("the StatefulSet's pods to be gone", READY, || async {
        pods_of(&pods, "db").await.is_empty().then_some(())
    })
    .await;
    for claim in ["data-db-0", "data-db-1"] {
        assert!(
            claims.get_opt(claim).await.expect("get claim").is_some(),
            "{claim} is kept after the StatefulSet's deletion"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_pod_becomes_ready() {
    let Some((_, client)) = control_plane_or_skip().await else {
        return;
    };
    let ns = namespace(&client, "deploy").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let deployment = Deployment {
        metadata: ObjectMeta {
            name: Some("api".into()),
            ..ObjectMeta::default()
        },
        spec: DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(labels("api")),
                ..LabelSelector::default()
            },
            template: template("api", Container::default()),
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    };
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create the Deployment");
    wait_for("the Deployment's available replica", READY, || async {
        let status = deployments.get("api").await.ok()?.status?;
        (status.ready_replicas == Some(1) && status.available_replicas == Some(1)).then_some(())
    })
    .await;
    let running = pods_of(&pods, "api").await;
    assert_eq!(running.len(), 1, "one pod (of one ReplicaSet)");
    assert!(is_ready(&running[0]), "{:?}", running[0].status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_completes() {
    let Some((_, client)) = control_plane_or_skip().await else {
        return;
    };
    let ns = namespace(&client, "job").await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let mut pod_template = template("once", Container::default());
    if let Some(spec) = pod_template.spec.as_mut() {
        spec.restart_policy = Some("Never".into());
    }
    let job = Job {
        metadata: ObjectMeta {
            name: Some("once".into()),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            template: pod_template,
            ..JobSpec::default()
        }),
        ..Job::default()
    };
    jobs.create(&PostParams::default(), &job)
        .await
        .expect("create the Job");
    // kwok runs the pod, then ends it with exit code 0.
    wait_for("the Job to complete", READY, || async {
        let status = jobs.get("once").await.ok()?.status?;
        let complete = status
            .conditions?
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True");
        (complete && status.succeeded == Some(1)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_pod_lands_on_the_gpu_node() {
    let Some((_, client)) = control_plane_or_skip().await else {
        return;
    };
    let ns = namespace(&client, "gpu").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut pod_template = template(
        "bulk",
        Container {
            resources: Some(ResourceRequirements {
                limits: Some(BTreeMap::from([(
                    GPU_RESOURCE.to_owned(),
                    Quantity("1".into()),
                )])),
                ..ResourceRequirements::default()
            }),
            ..Container::default()
        },
    );
    let spec = pod_template.spec.as_mut().expect("spec");
    spec.tolerations = Some(vec![Toleration {
        key: Some(GPU_TAINT.into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Toleration::default()
    }]);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("bulk".into()),
            ..pod_template.metadata.unwrap_or_default()
        },
        spec: pod_template.spec,
        ..Pod::default()
    };
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the GPU pod");
    let pod = wait_for("the GPU pod to be ready", READY, || async {
        pods.get("bulk").await.ok().filter(is_ready)
    })
    .await;
    assert_eq!(
        pod.spec.and_then(|s| s.node_name).as_deref(),
        Some(GPU_NODE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_of_a_class_without_provisioner_stays_pending_and_its_pod_unschedulable() {
    let Some((_, client)) = control_plane_or_skip().await else {
        return;
    };
    let ns = namespace(&client, "pending").await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("orphan".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: Some("no-such-class".into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity("1Gi".into()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    claims
        .create(&PostParams::default(), &claim)
        .await
        .expect("create the claim");
    let mut pod_template = template("waits", Container::default());
    let spec = pod_template.spec.as_mut().expect("spec");
    spec.volumes = Some(vec![Volume {
        name: "data".into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: "orphan".into(),
            ..PersistentVolumeClaimVolumeSource::default()
        }),
        ..Volume::default()
    }]);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("waits".into()),
            ..ObjectMeta::default()
        },
        spec: pod_template.spec,
        ..Pod::default()
    };
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    // The scheduler refuses it (an unbound claim) and says so in a condition.
    let message = wait_for("the pod to be marked unschedulable", READY, || async {
        let pod = pods.get("waits").await.ok()?;
        pod.status?.conditions?.into_iter().find_map(|c| {
            (c.type_ == "PodScheduled" && c.status == "False").then(|| {
                format!(
                    "{}: {}",
                    c.reason.unwrap_or_default(),
                    c.message.unwrap_or_default()
                )
            })
        })
    })
    .await;
    assert!(
        message.starts_with("Unschedulable: ") && message.contains("unbound"),
        "{message}"
    );
    let claim = claims.get("orphan").await.expect("the claim");
    assert_eq!(
        claim.status.and_then(|s| s.phase).as_deref(),
        Some("Pending")
    );
    assert_eq!(
        claim.spec.and_then(|s| s.volume_name),
        None,
        "no volume is bound"
    );
}
