//! Leader election against the mocked API: one holder at a time, takeover only after
//! expiry, optimistic concurrency on renew, release on shutdown.

mod support;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use support::{paths, FakeApi};
use umstore_operator::leader::LeaseLock;

const NS: &str = "umstore-system";

fn lock(client: &kube::Client, identity: &str) -> LeaseLock {
    LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), NS),
        "umstore-operator",
        identity,
        Duration::from_secs(15),
    )
}

#[tokio::test]
async fn only_one_replica_holds_the_lease_until_it_expires() {
    let (client, api) = FakeApi::start();
    let (a, b) = (lock(&client, "a"), lock(&client, "b"));
    let t0 = Timestamp::now();
    assert!(
        a.try_acquire(t0).await.expect("a acquires"),
        "first comer gets the Lease"
    );
    assert!(
        !b.try_acquire(t0 + SignedDuration::from_secs(5))
            .await
            .expect("b asks"),
        "held and fresh"
    );
    assert!(a
        .try_acquire(t0 + SignedDuration::from_secs(5))
        .await
        .expect("a renews"));
    // a stops renewing; after the lease duration b takes over.
    let later = t0 + SignedDuration::from_secs(25);
    assert!(b.try_acquire(later).await.expect("b takes over"));
    let lease = api
        .get(&paths::leases(NS), "umstore-operator")
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert!(
        !a.try_acquire(later + SignedDuration::from_secs(1))
            .await
            .expect("a asks"),
        "a lost it"
    );
}

#[tokio::test]
async fn a_concurrent_renewal_loses_on_resource_version() {
    let (client, api) = FakeApi::start();
    let a = lock(&client, "a");
    let t0 = Timestamp::now();
    assert!(a.try_acquire(t0).await.expect("a acquires"));
    // Make the replace fail as if someone wrote in between the read and the write.
    api.fail_next("PUT", "/leases/umstore-operator", 409);
    assert!(!a
        .try_acquire(t0 + SignedDuration::from_secs(5))
        .await
        .expect("conflict is not an error"));
}

#[tokio::test]
async fn release_lets_another_replica_lead_at_once() {
    let (client, _api) = FakeApi::start();
    let (a, b) = (lock(&client, "a"), lock(&client, "b"));
    let t0 = Timestamp::now();
    assert!(a.try_acquire(t0).await.expect("a"));
    a.release().await.expect("release");
    assert!(
        b.try_acquire(t0 + SignedDuration::from_secs(1))
            .await
            .expect("b"),
        "no wait for expiry"
    );
}
