//! Moving a region between two clusters (`umstore_migrations::moves`), against
//! real PostgreSQL 15: two fresh databases of the e2e harness's server play the
//! home cluster (where the region starts) and "south". The writer and reader
//! connect as the production logins (`umstore_writer_login`,
//! `umstore_dashboard_login`), the mover as the superuser, as the operator's
//! step does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod support;

use support::moving::{login_role, seed, write_once};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use umstore_migrations::moves::{self, Clusters, MoveError, MoveOptions, Phase, MOVED_TABLES};
use umstore_migrations::roles::Purpose;
use umstore_migrations::Runner;

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {conninfo}: {e}"));
    tokio::spawn(connection);
    client
}

/// Two migrated databases with the same logins as production, placement
/// seeded: KA and TN in home.
struct Pair {
    home: String,
    south: String,
}

impl Pair {
    async fn new() -> Self {
        let mut urls = Vec::new();
        for _ in 0..2 {
            let (_, conninfo) = umstore_e2e::shared()
                .fresh_database()
                .await
                .expect("fresh database");
            let mut client = connect(&conninfo).await;
            Runner::default().up(&mut client).await.expect("migrate up");
            for purpose in [Purpose::Writer, Purpose::Dashboard] {
                login_role(&client, purpose).await;
            }
            urls.push(conninfo);
        }
        let pair = Self {
            south: urls.pop().expect("two"),
            home: urls.pop().expect("two"),
        };
        let home = connect(&pair.home).await;
        let layout = [("KA", "home"), ("TN", "home"), ("KL", "south")]
            .map(|(r, c)| (r.to_owned(), c.to_owned()));
        moves::seed_placement(&home, &layout).await.expect("seed");
        pair
    }

    fn url(&self, cluster: &str) -> &str {
        if cluster == "home" {
            &self.home
        } else {
            &self.south
        }
    }

    fn as_login(&self, cluster: &str, purpose: Purpose) -> String {
        format!(
            "{} user={}",
            self.url(cluster),
            purpose.login().expect("a login")
        )
    }

    /// Runs the move (or resumes it) as the superuser.
    async fn run(&self, options: &MoveOptions) -> Result<moves::MoveReport, MoveError> {
        let home = connect(&self.home).await;
        let mut source = connect(&self.home).await;
        let mut target = connect(&self.south).await;
        moves::move_region(
            Clusters {
                home: &home,
                source: &mut source,
                target: &mut target,
            },
            "KA",
            "home",
            "south",
            options,
        )
        .await
    }
}

async fn count(client: &Client, table: &str, region: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM umstore.{table} WHERE region = $1::text::bpchar"),
            &[&region],
        )
        .await
        .expect("count")
        .get(0)
}

async fn placed(home: &Client, region: &str) -> (String, i64) {
    let row = home
        .query_one(
            "SELECT cluster, epoch FROM umstore.region_placement WHERE region = $1::text::bpchar",
            &[&region],
        )
        .await
        .expect("placement");
    (row.get(0), row.get(1))
}

/// What the writer saw.
#[derive(Default)]
struct Written {
    created: Vec<String>,
    /// User → the version acknowledged last.
    updated: BTreeMap<String, i64>,
    fenced: u64,
    redirected: u64,
    /// Acknowledged after the placement named south.
    after_switch: u64,
}

/// Writes to KA wherever the placement says until `stop`, as the writer
/// login: a fenced write is retried in a moment, a refused one after reading
/// the placement again (what the data plane does).
async fn writer(pair: Arc<Pair>, seeded: Vec<String>, stop: Arc<AtomicBool>) -> Written {
    let home = connect(&pair.as_login("home", Purpose::Writer)).await;
    let mut clients = BTreeMap::new();
    for c in ["home", "south"] {
        clients.insert(c, connect(&pair.as_login(c, Purpose::Writer)).await);
    }
    let mut written = Written::default();
    let mut cluster = placed(&home, "KA").await.0;
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let existing = i
            .is_multiple_of(2)
            .then(|| seeded[(i * 7919) % seeded.len()].as_str());
        loop {
            let client = clients
                .get_mut(if cluster == "home" { "home" } else { "south" })
                .expect("client");
            match write_once(client, existing).await {
                Ok((id, version)) => {
                    if existing.is_some() {
                        written.updated.insert(id, version);
                    } else {
                        written.created.push(id);
                    }
                    if cluster == "south" {
                        written.after_switch += 1;
                    }
                    break;
                }
                Err(e) if e.code().map(SqlState::code) == Some("UMF01") => {
                    written.fenced += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) if e.code().map(SqlState::code) == Some("UMM01") => {
                    written.redirected += 1;
                    cluster = placed(&home, "KA").await.0;
                }
                Err(e) => panic!("a write failed: {e:?}"),
            }
        }
    }
    written
}

/// Reads seeded users wherever the placement says until `stop`; every read
/// must find its user. Returns the reads made.
async fn reader(pair: Arc<Pair>, seeded: Vec<String>, stop: Arc<AtomicBool>) -> u64 {
    let home = connect(&pair.as_login("home", Purpose::Dashboard)).await;
    let mut clients = BTreeMap::new();
    for c in ["home", "south"] {
        clients.insert(
            c.to_owned(),
            connect(&pair.as_login(c, Purpose::Dashboard)).await,
        );
    }
    let mut reads = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let id = &seeded[(reads as usize * 104_729) % seeded.len()];
        let cluster = placed(&home, "KA").await.0;
        let found = clients[&cluster]
            .query_opt(
                "SELECT version FROM umstore.user_metadata WHERE region = 'KA' AND user_id = $1::text::uuid",
                &[id],
            )
            .await
            .expect("a read failed");
        assert!(found.is_some(), "user {id} not found in {cluster}");
        reads += 1;
    }
    reads
}

async fn seeded_ids(client: &Client, region: &str) -> Vec<String> {
    client
        .query(
            "SELECT user_id::text FROM umstore.user_directory WHERE region = $1::text::bpchar ORDER BY 1",
            &[&region],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn quick() -> MoveOptions {
    MoveOptions {
        grace: Duration::from_millis(300),
        ..MoveOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_moves_under_a_writer_and_a_reader_with_no_write_lost_or_doubled() {
    moves_under_load(Arc::new(Pair::new().await), 20_000).await;
}

/// Two Citus clusters of the harness (a coordinator and two workers each),
/// migrated and distributed as the operator's steps leave them: the same move,
/// through the coordinators. Skipped, saying so, where Citus is not built.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_moves_between_two_citus_clusters_under_a_writer_and_a_reader() {
    let Some(home) = umstore_e2e::Citus::start_or_skip() else {
        return;
    };
    let Some(south) = umstore_e2e::Citus::start_or_skip() else {
        return;
    };
    for citus in [&home, &south] {
        let mut admin = connect(&citus.conninfo("postgres")).await;
        Runner::default().up(&mut admin).await.expect("migrate up");
        for purpose in [Purpose::Writer, Purpose::Dashboard] {
            login_role(&admin, purpose).await;
        }
        umstore_migrations::citus::distribute(&admin, |_, _, _| {})
            .await
            .expect("distribute");
    }
    let pair = Pair {
        home: home.conninfo("postgres"),
        south: south.conninfo("postgres"),
    };
    let layout = [("KA", "home"), ("TN", "home"), ("KL", "south")]
        .map(|(r, c)| (r.to_owned(), c.to_owned()));
    moves::seed_placement(&connect(&pair.home).await, &layout)
        .await
        .expect("seed");
    moves_under_load(Arc::new(pair), 5_000).await;
}

/// Seeds `users` KA users (and 500 TN) in home, moves KA to south while a
/// writer and a reader go on, and checks every write and read.
async fn moves_under_load(pair: Arc<Pair>, users: i64) {
    let home = connect(&pair.home).await;
    let south = connect(&pair.south).await;
    seed(&home, "KA", users).await;
    seed(&home, "TN", 500).await;
    let ids = seeded_ids(&home, "KA").await;

    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(pair.clone(), ids.clone(), stop.clone()));
    let r = tokio::spawn(reader(pair.clone(), ids.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = pair.run(&quick()).await.expect("move");
    // Writes continue on the new cluster for a while.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let written = w.await.expect("writer");
    let reads = r.await.expect("reader");

    assert_eq!(report.phase, Phase::Done);
    assert_eq!(report.attempts, 1);
    let fence = report.fence_ms.expect("the fence is measured");
    println!(
        "moved {} rows; {} users caught up in {} rounds; fence {fence:.1} ms; writes: {} new, \
         {} updates ({} fenced and retried, {} redirected, {} after the switch); {reads} reads",
        report.rows_copied,
        report.users_caught_up,
        report.catch_up_rounds,
        written.created.len(),
        written.updated.len(),
        written.fenced,
        written.redirected,
        written.after_switch
    );
    assert!(written.after_switch > 0, "no write reached south");
    assert!(reads > 0);

    assert_eq!(placed(&home, "KA").await, ("south".to_owned(), 2));
    // Every seeded and every acknowledged user is in south once; none left in home.
    assert_eq!(
        count(&south, "user_metadata", "KA").await,
        users + written.created.len() as i64
    );
    assert_eq!(
        count(&south, "user_directory", "KA").await,
        users + written.created.len() as i64
    );
    for table in MOVED_TABLES {
        assert_eq!(count(&home, table, "KA").await, 0, "{table} left in home");
    }
    let created_in_south: i64 = south
        .query_one(
            "SELECT count(*) FROM umstore.user_metadata WHERE region = 'KA' AND user_id = ANY($1::text[]::uuid[])",
            &[&written.created],
        )
        .await
        .expect("created")
        .get(0);
    assert_eq!(created_in_south, written.created.len() as i64);
    // Each acknowledged update is there with its version, and its history row.
    for (id, version) in &written.updated {
        let row = south
            .query_one(
                "SELECT version, (SELECT count(*) FROM umstore.user_metadata_history h
                                  WHERE h.region = 'KA' AND h.user_id = m.user_id)
                 FROM umstore.user_metadata m WHERE region = 'KA' AND user_id = $1::text::uuid",
                &[id],
            )
            .await
            .expect("updated user");
        assert_eq!(row.get::<_, i64>(0), *version, "user {id}");
        assert_eq!(row.get::<_, i64>(1), *version, "user {id}'s history rows");
    }
    // TN stayed where it was.
    assert_eq!(count(&home, "user_metadata", "TN").await, 500);
    assert_eq!(count(&south, "user_metadata", "TN").await, 0);
    // The source refuses the region's writes from now on, naming where it went.
    let mut writer_home = connect(&pair.as_login("home", Purpose::Writer)).await;
    let err = write_once(&mut writer_home, None)
        .await
        .expect_err("home no longer takes KA");
    assert_eq!(err.code().map(SqlState::code), Some("UMM01"));
    let text = format!("{:?}", err);
    assert!(text.contains("moved to cluster south"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_stopped_after_each_phase_resumes_to_the_same_end() {
    for phase in [
        Phase::Copying,
        Phase::CatchingUp,
        Phase::Fenced,
        Phase::Switched,
    ] {
        let pair = Pair::new().await;
        let home = connect(&pair.home).await;
        let south = connect(&pair.south).await;
        seed(&home, "KA", 2_000).await;
        let options = MoveOptions {
            pause_after: Some(phase),
            ..quick()
        };
        let err = pair.run(&options).await.expect_err("paused");
        assert!(matches!(err, MoveError::Paused(p) if p == phase), "{err}");

        // Stopped here, the region is served by exactly one cluster.
        let (cluster, _) = placed(&home, "KA").await;
        let expected = if phase >= Phase::Switched {
            "south"
        } else {
            "home"
        };
        assert_eq!(cluster, expected, "after {phase}");
        let mut writer_home = connect(&pair.as_login("home", Purpose::Writer)).await;
        let mut writer_south = connect(&pair.as_login("south", Purpose::Writer)).await;
        let at_home = write_once(&mut writer_home, None).await;
        let at_south = write_once(&mut writer_south, None).await;
        let code = |r: &Result<(String, i64), tokio_postgres::Error>| {
            r.as_ref()
                .err()
                .and_then(|e| e.code().map(|c| c.code().to_owned()))
        };
        match phase {
            Phase::Copying | Phase::CatchingUp => {
                assert!(at_home.is_ok(), "after {phase}: {at_home:?}");
                assert_eq!(code(&at_south).as_deref(), Some("UMM01"), "after {phase}");
            }
            Phase::Fenced => {
                assert_eq!(code(&at_home).as_deref(), Some("UMF01"), "after {phase}");
                assert_eq!(code(&at_south).as_deref(), Some("UMM01"), "after {phase}");
            }
            _ => {
                assert_eq!(code(&at_home).as_deref(), Some("UMM01"), "after {phase}");
                assert!(at_south.is_ok(), "after {phase}: {at_south:?}");
            }
        }
        let written = usize::from(at_home.is_ok()) + usize::from(at_south.is_ok());

        let report = pair.run(&quick()).await.expect("resumed");
        assert_eq!(report.phase, Phase::Done);
        assert_eq!(report.attempts, 2, "after {phase}");
        assert_eq!(placed(&home, "KA").await, ("south".to_owned(), 2));
        assert_eq!(
            count(&south, "user_metadata", "KA").await,
            2_000 + written as i64,
            "after {phase}"
        );
        assert_eq!(count(&south, "user_metadata_history", "KA").await, 2_000);
        for table in MOVED_TABLES {
            assert_eq!(count(&home, table, "KA").await, 0, "{table} after {phase}");
        }
        // A second run has nothing to do.
        let again = pair.run(&quick()).await.expect("again");
        assert_eq!(again.attempts, 0);
    }
}

#[tokio::test]
async fn a_move_that_cannot_be_made_is_refused_with_what_to_do() {
    let pair = Pair::new().await;
    let home = connect(&pair.home).await;
    let mut a = connect(&pair.home).await;
    let mut b = connect(&pair.south).await;
    let refused = |r: Result<moves::MoveReport, MoveError>| match r {
        Err(MoveError::Refused(m)) => m,
        other => panic!("not refused: {other:?}"),
    };
    let opts = quick();
    async fn attempt(
        home: &Client,
        a: &mut Client,
        b: &mut Client,
        opts: &MoveOptions,
        region: &str,
        from: &str,
        to: &str,
    ) -> Result<moves::MoveReport, MoveError> {
        moves::move_region(
            Clusters {
                home,
                source: a,
                target: b,
            },
            region,
            from,
            to,
            opts,
        )
        .await
    }
    let m = refused(attempt(&home, &mut a, &mut b, &opts, "XX", "home", "south").await);
    assert!(m.contains("not one of the store's region codes"), "{m}");
    let m = refused(attempt(&home, &mut a, &mut b, &opts, "KL", "home", "west").await);
    assert!(m.contains("is in cluster south, not home"), "{m}");
    let m = refused(attempt(&home, &mut a, &mut b, &opts, "GA", "home", "south").await);
    assert!(m.contains("seed the placement first"), "{m}");
    let m = refused(attempt(&home, &mut a, &mut b, &opts, "KA", "home", "home").await);
    assert!(m.contains("to itself"), "{m}");
    // Nothing was recorded by a refusal.
    assert!(moves::journal(&home, 10).await.expect("journal").is_empty());
}
