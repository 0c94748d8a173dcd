//! The kube-apiserver harness: it starts, answers with the admin token, enforces RBAC for
//! the unprivileged user, and both processes are gone after drop. Skips (printing why)
//! where kube-apiserver or etcd is not built; fails there instead under
//! `UMSTORE_REQUIRE_COMPONENTS=1`.

use std::path::Path;
use std::time::Instant;

use umstore_e2e::{KubeApiServer, PLAIN_USER};

fn process_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn kube_apiserver_serves_the_api_with_tokens_and_rbac() {
    let started = Instant::now();
    let Some(server) = KubeApiServer::start_or_skip() else {
        return;
    };
    eprintln!(
        "kube-apiserver ready at {} after {:.1}s",
        server.url(),
        started.elapsed().as_secs_f64()
    );

    let admin = server.admin_token();
    let (status, body) = server.get("/readyz", admin).unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = server.get("/api/v1/namespaces/default", admin).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""name":"default""#), "{body}");
    let (status, body) = server.get("/version", admin).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""minor": "37""#), "{body}");

    // Authenticated but granted nothing: RBAC refuses, naming the user.
    let (status, body) = server
        .get("/api/v1/namespaces/default/secrets", server.user_token())
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains(PLAIN_USER), "{body}");
    // A wrong token is not authenticated at all.
    let (status, _) = server.get("/api/v1/namespaces", "not-a-token").unwrap();
    assert_eq!(status, 401);

    let kubeconfig = std::fs::read_to_string(server.kubeconfig()).unwrap();
    assert!(
        kubeconfig.contains(&format!("server: {}", server.url())),
        "{kubeconfig}"
    );
    assert!(kubeconfig.contains(admin), "{kubeconfig}");
    assert!(kubeconfig.contains(&server.ca_cert().display().to_string()));
    assert!(server.ca_cert().is_file());

    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c).contains(&server.dir().display().to_string())
            })
        })
        .collect();
    assert_eq!(
        pids.len(),
        2,
        "etcd and kube-apiserver run from the test dir"
    );
    let dir = server.dir().to_path_buf();
    drop(server);
    for pid in pids {
        assert!(process_gone(pid), "process {pid} outlived its handle");
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
