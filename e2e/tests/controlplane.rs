//! The control-plane harness: kube-controller-manager, kube-scheduler and kwok start
//! beside kube-apiserver, the fake nodes are Ready and schedulable, a node added later
//! is too, and all five processes are gone after drop. Skips (printing why) where a
//! binary is not built; fails there instead under `UMSTORE_REQUIRE_COMPONENTS=1`.
//! What the bed does with workloads is in `operator/tests/control_plane.rs`.

use std::path::Path;
use std::time::Instant;

use serde_json::Value;
use umstore_e2e::controlplane::{GPU_NODE, GPU_RESOURCE, GPU_TAINT, NODE};
use umstore_e2e::{ControlPlane, FakeNode};

fn process_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn node(control_plane: &ControlPlane, name: &str) -> Value {
    let api = control_plane.api();
    let (status, body) = api
        .get(&format!("/api/v1/nodes/{name}"), api.admin_token())
        .unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn is_ready(node: &Value) -> bool {
    node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn taint_keys(node: &Value) -> Vec<&str> {
    node["spec"]["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["key"].as_str())
        .collect()
}

#[test]
fn control_plane_makes_its_fake_nodes_ready_and_stops_on_drop() {
    let started = Instant::now();
    let Some(control_plane) = ControlPlane::start_or_skip() else {
        return;
    };
    eprintln!(
        "control plane ready at {} after {:.1}s",
        control_plane.api().url(),
        started.elapsed().as_secs_f64()
    );

    let names: Vec<String> = control_plane.nodes().into_iter().map(|n| n.name).collect();
    assert_eq!(names, [NODE, GPU_NODE]);
    let plain = node(&control_plane, NODE);
    assert!(is_ready(&plain), "{plain}");
    assert!(taint_keys(&plain).is_empty(), "{plain}");
    assert_eq!(plain["status"]["allocatable"]["cpu"], "32");
    assert_eq!(plain["metadata"]["labels"]["type"], "kwok");
    let gpu = node(&control_plane, GPU_NODE);
    assert!(is_ready(&gpu), "{gpu}");
    assert_eq!(taint_keys(&gpu), [GPU_TAINT], "{gpu}");
    assert_eq!(gpu["status"]["allocatable"][GPU_RESOURCE], "8");

    let extra = Instant::now();
    control_plane
        .add_node(FakeNode::cpu("kwok-node-1"))
        .unwrap();
    eprintln!(
        "kwok-node-1 Ready after {:.1}s",
        extra.elapsed().as_secs_f64()
    );
    assert!(is_ready(&node(&control_plane, "kwok-node-1")));
    assert_eq!(control_plane.nodes().len(), 3);

    let dir = control_plane.dir().to_path_buf();
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&dir.display().to_string()))
        })
        .collect();
    assert_eq!(
        pids.len(),
        5,
        "etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run \
         from the test dir"
    );
    drop(control_plane);
    for pid in pids {
        assert!(process_gone(pid), "process {pid} outlived its handle");
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
