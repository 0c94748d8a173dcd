//! An in-memory Kubernetes API behind kube's mocked service (`tower_test::mock::pair`),
//! in the spirit of controller-rs's `ApiServerVerifier`: every request is recorded
//! in order (method, path, query, content type, body) so tests assert exactly which
//! writes a reconcile makes and what they carry, while GET/LIST/POST/PATCH/PUT/DELETE
//! behave enough like the API server (resourceVersion, uid, generation, finalizers,
//! server-side apply, merge and JSON patches, status subresource) for the
//! controller to run unmodified.

#![allow(dead_code)]

pub mod scenario;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Decoded query string.
    pub query: String,
    /// Content-Type header.
    pub content_type: String,
    /// JSON body, if any.
    pub body: Option<Value>,
}

impl Recorded {
    /// `METHOD path`.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Default)]
struct State {
    /// collection path → name → object
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    next_rv: u64,
    next_uid: u64,
    log: Vec<Recorded>,
    /// (method, path substring, status code): fail matching requests.
    failures: Vec<(String, String, u16)>,
}

/// Handle to the fake API server.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// Splits `/api/v1/namespaces/ns/plural[/name[/sub]]` or the `/apis/g/v/...` form into
/// (collection path, name, subresource).
fn split(path: &str) -> Option<(String, Option<String>, Option<String>)> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let prefix_len = match *parts.first()? {
        "api" => 2,
        "apis" => 3,
        _ => return None,
    };
    if parts.get(prefix_len) != Some(&"namespaces") {
        return None;
    }
    let collection_len = prefix_len + 3;
    if parts.len() < collection_len {
        return None;
    }
    let collection = format!("/{}", parts[..collection_len].join("/"));
    Some((
        collection,
        parts.get(collection_len).map(|s| s.to_string()),
        parts.get(collection_len + 1).map(|s| s.to_string()),
    ))
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => obj["metadata"]["labels"][k].as_str() == Some(v),
            // `key` alone: the label exists.
            None => obj["metadata"]["labels"][term].is_string(),
        })
}

impl FakeApi {
    /// Starts the fake on the current tokio runtime and returns a client talking to it.
    pub fn start() -> (kube::Client, FakeApi) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = FakeApi::default();
        let server = api.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let response = server.handle(request).await;
                send.send_response(response);
            }
        });
        (kube::Client::new(service, "default"), api)
    }

    async fn handle(&self, request: Request<Body>) -> Response<Body> {
        let method = request.method().to_string();
        let path = request.uri().path().to_string();
        let query = decode(request.uri().query().unwrap_or(""));
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_default();
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        let (code, value) = {
            let mut state = self.state.lock().expect("state");
            state.log.push(Recorded {
                method: method.clone(),
                path: path.clone(),
                query: query.clone(),
                content_type: content_type.clone(),
                body: body.clone(),
            });
            let fail = state
                .failures
                .iter()
                .position(|(m, p, _)| *m == method && path.contains(p.as_str()));
            match fail {
                Some(i) => {
                    let (_, _, code) = state.failures.remove(i);
                    status(code, "InternalError", "injected failure")
                }
                None => state.dispatch(&method, &path, &query, &content_type, body),
            }
        };
        Response::builder()
            .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&value).unwrap_or_default()))
            .expect("response")
    }

    /// Stores `obj` in `collection` as if created (uid, resourceVersion, generation set).
    pub fn insert(&self, collection: &str, mut obj: Value) -> Value {
        let mut state = self.state.lock().expect("state");
        state.stamp_new(&mut obj);
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        state
            .objects
            .entry(collection.to_string())
            .or_default()
            .insert(name, obj.clone());
        obj
    }

    /// Replaces a stored object wholesale (a test's "someone else changed it").
    pub fn put_raw(&self, collection: &str, obj: Value) {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.state
            .lock()
            .expect("state")
            .objects
            .entry(collection.to_string())
            .or_default()
            .insert(name, obj);
    }

    /// Deletes a stored object behind the operator's back (`kubectl delete`).
    pub fn remove(&self, collection: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .expect("state")
            .objects
            .get_mut(collection)
            .and_then(|c| c.remove(name))
    }

    /// A stored object.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .expect("state")
            .objects
            .get(collection)
            .and_then(|c| c.get(name))
            .cloned()
    }

    /// Names in a collection.
    pub fn names(&self, collection: &str) -> Vec<String> {
        self.state
            .lock()
            .expect("state")
            .objects
            .get(collection)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Recorded> {
        self.state.lock().expect("state").log.clone()
    }

    /// Requests other than GET.
    pub fn writes(&self) -> Vec<Recorded> {
        self.log()
            .into_iter()
            .filter(|r| r.method != "GET")
            .collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_log(&self) {
        self.state.lock().expect("state").log.clear();
    }

    /// Fails the next request of `method` whose path contains `path_part` with `code`.
    pub fn fail_next(&self, method: &str, path_part: &str, code: u16) {
        self.state
            .lock()
            .expect("state")
            .failures
            .push((method.into(), path_part.into(), code));
    }

    /// Sets `status.readyReplicas` (and `replicas`) of every StatefulSet and Deployment
    /// to its desired replicas, as the kubelet and controllers would.
    pub fn mark_workloads_ready(&self) {
        let mut state = self.state.lock().expect("state");
        for (collection, objects) in state.objects.iter_mut() {
            if !(collection.ends_with("/statefulsets") || collection.ends_with("/deployments")) {
                continue;
            }
            for obj in objects.values_mut() {
                let replicas = obj["spec"]["replicas"].as_i64().unwrap_or(1);
                obj["status"] = json!({"replicas": replicas, "readyReplicas": replicas});
            }
        }
    }
}

impl State {
    fn bump_rv(&mut self) -> String {
        self.next_rv += 1;
        self.next_rv.to_string()
    }

    fn stamp_new(&mut self, obj: &mut Value) {
        self.next_uid += 1;
        let rv = self.bump_rv();
        let meta = &mut obj["metadata"];
        if meta.get("uid").and_then(Value::as_str).is_none() {
            meta["uid"] = json!(format!("uid-{}", self.next_uid));
        }
        meta["resourceVersion"] = json!(rv);
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        if meta.get("generation").is_none() {
            meta["generation"] = json!(1);
        }
    }

    fn dispatch(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        content_type: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let Some((collection, name, sub)) = split(path) else {
            return status(404, "NotFound", &format!("no such path {path}"));
        };
        match (method, name) {
            ("GET", None) => {
                let selector = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("labelSelector="))
                    .unwrap_or("")
                    .to_string();
                let items: Vec<Value> = self
                    .objects
                    .get(&collection)
                    .map(|c| {
                        c.values()
                            .filter(|o| labels_match(o, &selector))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                let rv = self.next_rv.to_string();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}),
                )
            }
            ("GET", Some(name)) => match self.objects.get(&collection).and_then(|c| c.get(&name)) {
                Some(obj) => (200, obj.clone()),
                None => status(404, "NotFound", &format!("{name} not found")),
            },
            ("POST", _) => {
                let Some(mut obj) = body else {
                    return status(400, "BadRequest", "no body");
                };
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if self
                    .objects
                    .get(&collection)
                    .is_some_and(|c| c.contains_key(&name))
                {
                    return status(409, "AlreadyExists", &format!("{name} already exists"));
                }
                self.stamp_new(&mut obj);
                self.objects
                    .entry(collection)
                    .or_default()
                    .insert(name, obj.clone());
                (201, obj)
            }
            ("PATCH", Some(name)) => self.patch(
                &collection,
                &name,
                sub.as_deref(),
                content_type,
                body.unwrap_or(Value::Null),
            ),
            ("PUT", Some(name)) => {
                let Some(mut obj) = body else {
                    return status(400, "BadRequest", "no body");
                };
                let Some(existing) = self
                    .objects
                    .get(&collection)
                    .and_then(|c| c.get(&name))
                    .cloned()
                else {
                    return status(404, "NotFound", &format!("{name} not found"));
                };
                if obj["metadata"]["resourceVersion"] != existing["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified");
                }
                obj["metadata"]["uid"] = existing["metadata"]["uid"].clone();
                obj["metadata"]["creationTimestamp"] =
                    existing["metadata"]["creationTimestamp"].clone();
                obj["metadata"]["resourceVersion"] = json!(self.bump_rv());
                self.objects
                    .entry(collection)
                    .or_default()
                    .insert(name, obj.clone());
                (200, obj)
            }
            ("DELETE", Some(name)) => {
                let Some(existing) = self
                    .objects
                    .get(&collection)
                    .and_then(|c| c.get(&name))
                    .cloned()
                else {
                    return status(404, "NotFound", &format!("{name} not found"));
                };
                if let Some(uid) = body
                    .as_ref()
                    .and_then(|b| b["preconditions"]["uid"].as_str())
                {
                    if existing["metadata"]["uid"].as_str() != Some(uid) {
                        return status(409, "Conflict", "uid precondition failed");
                    }
                }
                let has_finalizers = existing["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
                if has_finalizers {
                    let mut obj = existing;
                    obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T01:00:00Z");
                    let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                    obj["metadata"]["generation"] = json!(generation);
                    obj["metadata"]["resourceVersion"] = json!(self.bump_rv());
                    self.objects
                        .entry(collection)
                        .or_default()
                        .insert(name, obj.clone());
                    (200, obj)
                } else {
                    self.objects.entry(collection).or_default().remove(&name);
                    (
                        200,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
                    )
                }
            }
            _ => status(405, "MethodNotAllowed", method),
        }
    }

    fn patch(
        &mut self,
        collection: &str,
        name: &str,
        sub: Option<&str>,
        content_type: &str,
        body: Value,
    ) -> (u16, Value) {
        let existing = self
            .objects
            .get(collection)
            .and_then(|c| c.get(name))
            .cloned();
        let mut obj = match (
            existing.clone(),
            content_type.starts_with("application/apply-patch"),
        ) {
            (Some(obj), _) => obj,
            (None, true) if sub.is_none() => {
                let mut obj = body.clone();
                if let Some(map) = obj.as_object_mut() {
                    map.remove("status");
                }
                self.stamp_new(&mut obj);
                self.objects
                    .entry(collection.to_string())
                    .or_default()
                    .insert(name.to_string(), obj.clone());
                return (201, obj);
            }
            (None, _) => return status(404, "NotFound", &format!("{name} not found")),
        };
        let before = obj.clone();
        if content_type.starts_with("application/apply-patch") {
            if sub == Some("status") {
                obj["status"] = body["status"].clone();
            } else {
                let keep_meta = obj["metadata"].clone();
                let keep_status = obj.get("status").cloned();
                obj = body;
                for key in [
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "finalizers",
                    "deletionTimestamp",
                ] {
                    if !keep_meta[key].is_null() && obj["metadata"][key].is_null() {
                        obj["metadata"][key] = keep_meta[key].clone();
                    }
                }
                match keep_status {
                    Some(s) => obj["status"] = s,
                    None => {
                        if let Some(map) = obj.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
            }
        } else if content_type.starts_with("application/json-patch") {
            let mut patch: json_patch::Patch = match serde_json::from_value(body) {
                Ok(p) => p,
                Err(e) => return status(400, "BadRequest", &e.to_string()),
            };
            // Like the API server: `test` of null passes on a missing path.
            patch.0.retain(|op| match op {
                json_patch::PatchOperation::Test(t) => {
                    !(t.value.is_null() && obj.pointer(t.path.as_str()).is_none())
                }
                _ => true,
            });
            if let Err(e) = json_patch::patch(&mut obj, &patch) {
                return status(422, "Invalid", &e.to_string());
            }
        } else {
            // merge-patch / strategic-merge-patch: a JSON merge is close enough here.
            if sub == Some("status") {
                json_patch::merge(&mut obj["status"], &body["status"]);
            } else {
                json_patch::merge(&mut obj, &body);
            }
        }
        let spec_changed = before.get("spec") != obj.get("spec");
        if spec_changed && sub.is_none() {
            let generation = before["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            obj["metadata"]["generation"] = json!(generation);
        }
        obj["metadata"]["resourceVersion"] = json!(self.bump_rv());
        let deleting = !obj["metadata"]["deletionTimestamp"].is_null();
        let no_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if deleting && no_finalizers {
            self.objects
                .entry(collection.to_string())
                .or_default()
                .remove(name);
        } else {
            self.objects
                .entry(collection.to_string())
                .or_default()
                .insert(name.to_string(), obj.clone());
        }
        (200, obj)
    }
}

/// Collection paths used by the tests.
pub mod paths {
    /// The stores.
    pub fn stores(ns: &str) -> String {
        format!("/apis/umstore.io/v1alpha1/namespaces/{ns}/usermetadatastores")
    }
    /// Secrets.
    pub fn secrets(ns: &str) -> String {
        format!("/api/v1/namespaces/{ns}/secrets")
    }
    /// StatefulSets.
    pub fn statefulsets(ns: &str) -> String {
        format!("/apis/apps/v1/namespaces/{ns}/statefulsets")
    }
    /// Deployments.
    pub fn deployments(ns: &str) -> String {
        format!("/apis/apps/v1/namespaces/{ns}/deployments")
    }
    /// Services.
    pub fn services(ns: &str) -> String {
        format!("/api/v1/namespaces/{ns}/services")
    }
    /// ConfigMaps.
    pub fn configmaps(ns: &str) -> String {
        format!("/api/v1/namespaces/{ns}/configmaps")
    }
    /// PodDisruptionBudgets.
    pub fn pdbs(ns: &str) -> String {
        format!("/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets")
    }
    /// NetworkPolicies.
    pub fn networkpolicies(ns: &str) -> String {
        format!("/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies")
    }
    /// Pods.
    pub fn pods(ns: &str) -> String {
        format!("/api/v1/namespaces/{ns}/pods")
    }
    /// Events.
    pub fn events(ns: &str) -> String {
        format!("/apis/events.k8s.io/v1/namespaces/{ns}/events")
    }
    /// Leases.
    pub fn leases(ns: &str) -> String {
        format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases")
    }
}
