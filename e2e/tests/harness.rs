//! The harness's own tests: every server starts, does real work, and is gone after.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use umstore_e2e::{connect, shared, Citus, CitusUnavailable, Nats, OpenBao, PgBouncer, Postgres};

fn port_refuses(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_err()
}

fn process_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn shared_primary_answers_and_hands_out_fresh_databases() {
    let servers = shared();
    let (db_a, conninfo_a) = servers.fresh_database().await.unwrap();
    let (db_b, _) = servers.fresh_database().await.unwrap();
    assert_ne!(db_a, db_b);
    let client = connect(&conninfo_a).await.unwrap();
    let row = client
        .query_one("SELECT 1::int4, current_database()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(row.get::<_, String>(1), db_a);
    // The TCP listener answers too.
    let pg = servers.postgres().unwrap();
    let tcp = connect(&pg.tcp_conninfo(&db_a)).await.unwrap();
    tcp.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn replica_catches_up_to_primary_lsn() {
    let pg = shared().postgres().unwrap();
    let (db, conninfo) = pg.fresh_database().await.unwrap();
    let primary = connect(&conninfo).await.unwrap();
    primary
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    primary
        .execute("INSERT INTO t VALUES ($1, $2)", &[&1i32, &"replicated"])
        .await
        .unwrap();
    let lsn = pg.current_wal_lsn().await.unwrap();
    let replicas = pg.replicas().unwrap();
    assert_eq!(replicas.len(), 2);
    for (index, replica) in replicas.iter().enumerate() {
        pg.wait_for_replay(index, lsn).await.unwrap();
        let client = connect(&replica.conninfo(&db)).await.unwrap();
        let row = client
            .query_one(
                "SELECT v, pg_is_in_recovery() FROM t WHERE id = $1",
                &[&1i32],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "replicated");
        assert!(row.get::<_, bool>(1), "replica {index} is not a standby");
    }
}

#[tokio::test]
async fn pgbouncer_forwards_queries_in_transaction_mode() {
    let servers = shared();
    let (db, _) = servers.fresh_database().await.unwrap();
    let bouncer = servers.pgbouncer().unwrap();
    let client = connect(&bouncer.conninfo(&db)).await.unwrap();
    client
        .batch_execute("CREATE TABLE via_bouncer (x int); INSERT INTO via_bouncer VALUES (42)")
        .await
        .unwrap();
    let rows = client
        .simple_query("SELECT x, current_database() FROM via_bouncer")
        .await
        .unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!(row.get(0), Some("42"));
    assert_eq!(row.get(1), Some(db.as_str()));
}

/// A tiny NATS client: enough protocol to call the JetStream API and publish with ack.
struct RawNats {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawNats {
    fn connect(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut nats = Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let info = nats.line();
        assert!(info.contains("\"jetstream\":true"), "{info}");
        nats.send("CONNECT {\"verbose\":false,\"pedantic\":false}\r\nSUB _INBOX.reply 1\r\n");
        nats
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    /// Publishes `payload` to `subject` and returns the reply's payload.
    fn request(&mut self, subject: &str, payload: &str) -> String {
        self.send(&format!(
            "PUB {subject} _INBOX.reply {}\r\n{payload}\r\n",
            payload.len()
        ));
        loop {
            let line = self.line();
            if line.starts_with("PING") {
                self.send("PONG\r\n");
            } else if let Some(rest) = line.strip_prefix("MSG _INBOX.reply 1 ") {
                let len: usize = rest.trim().rsplit(' ').next().unwrap().parse().unwrap();
                let mut body = vec![0; len + 2];
                self.reader.read_exact(&mut body).unwrap();
                return String::from_utf8_lossy(&body[..len]).into_owned();
            } else {
                assert!(!line.starts_with("-ERR"), "{line}");
            }
        }
    }
}

#[test]
fn nats_jetstream_stores_and_acks_a_publish() {
    let nats = shared().nats().unwrap();
    assert!(nats.url().starts_with("nats://127.0.0.1:"));
    let mut client = RawNats::connect(nats.port());
    let created = client.request(
        "$JS.API.STREAM.CREATE.HARNESS",
        r#"{"name":"HARNESS","subjects":["harness.>"],"storage":"file"}"#,
    );
    assert!(created.contains("stream_create_response"), "{created}");
    assert!(!created.contains("\"error\""), "{created}");
    let ack = client.request("harness.event", "hello");
    assert!(ack.contains(r#""stream":"HARNESS""#), "{ack}");
    assert!(ack.contains(r#""seq":1"#), "{ack}");
}

#[test]
fn openbao_transit_encrypts_with_a_new_key() {
    let bao = shared().openbao().unwrap();
    let health = bao.http_get("/v1/sys/health").unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    bao.cli(&["write", "-f", "transit/keys/harness"]).unwrap();
    let out = bao
        .cli(&[
            "write",
            "-field=ciphertext",
            "transit/encrypt/harness",
            "plaintext=aGVsbG8=",
        ])
        .unwrap();
    assert!(out.starts_with("vault:v1:"), "{out}");
}

#[test]
fn citus_cluster_distributes_a_table_when_installed() {
    let Some(citus) = shared().citus_or_skip() else {
        return;
    };
    let coordinator = citus.coordinator();
    coordinator
        .psql(
            "postgres",
            "CREATE TABLE dist (region text, id int); SELECT create_distributed_table('dist', 'region')",
        )
        .unwrap();
    let nodes = coordinator
        .psql(
            "postgres",
            "SELECT count(*) FROM citus_get_active_worker_nodes()",
        )
        .unwrap();
    assert_eq!(nodes, "2");
}

#[tokio::test]
async fn owned_postgres_stops_on_drop() {
    let pg = Postgres::start_with_replicas(1).unwrap();
    let client = pg.connect("postgres").await.unwrap();
    client
        .batch_execute("CREATE TABLE x (y int)")
        .await
        .unwrap();
    let lsn = pg.wait_for_replicas().await.unwrap();
    assert!(u64::from(lsn) > 0);
    let ports = [pg.port(), pg.replica(0).unwrap().port()];
    let pids = [
        pg.primary().pid().unwrap(),
        pg.replica(0).unwrap().pid().unwrap(),
    ];
    let dir = pg.dir().to_path_buf();
    drop(client);
    drop(pg);
    for port in ports {
        assert!(port_refuses(port), "port {port} still open");
    }
    for pid in pids {
        assert!(process_gone(pid), "pid {pid} survived");
    }
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[test]
fn owned_nats_openbao_and_pgbouncer_stop_on_drop() {
    let pg = shared().postgres().unwrap();
    let nats = Nats::start().unwrap();
    let bao = OpenBao::start().unwrap();
    let bouncer = PgBouncer::start(pg).unwrap();
    let running = [
        (nats.port(), nats.pid().unwrap()),
        (bao.port(), bao.pid().unwrap()),
        (bouncer.port(), bouncer.pid().unwrap()),
    ];
    for (port, _) in running {
        assert!(!port_refuses(port), "port {port} not listening");
    }
    drop((nats, bao, bouncer));
    for (port, pid) in running {
        assert!(port_refuses(port), "port {port} still open");
        assert!(process_gone(pid), "pid {pid} survived");
    }
}

#[test]
fn server_outlives_the_thread_that_started_it() {
    // The parent-death signal must be tied to the process, not the starting thread.
    let nats = std::thread::spawn(|| Nats::start().unwrap())
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(nats.info().unwrap().contains("\"jetstream\":true"));
}

#[test]
fn failing_test_keeps_its_directory() {
    let (tx, rx) = std::sync::mpsc::channel();
    // An unnamed thread: its panic does not mark the run as failed, so shared server
    // directories are still removed at exit.
    let result = std::thread::spawn(move || {
        let nats = Nats::start().unwrap();
        tx.send((nats.pid().unwrap(), nats.port(), nats.dir().to_path_buf()))
            .unwrap();
        let _nats = nats;
        panic!("deliberate failure to check the directory is kept");
    })
    .join();
    assert!(result.is_err());
    let (pid, port, dir) = rx.recv().unwrap();
    assert!(
        process_gone(pid) && port_refuses(port),
        "server survived a panic"
    );
    let log = std::fs::read_to_string(dir.join("nats-server.log")).unwrap();
    assert!(log.contains(&format!("127.0.0.1:{port}")), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn citus_start_explains_a_skip() {
    if let Err(CitusUnavailable::Skip(reason)) = Citus::start() {
        assert!(reason.contains("citus.so not found in"), "{reason}");
        assert!(reason.contains("build Citus from source"), "{reason}");
    }
}
