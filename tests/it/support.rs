//! Real peers for the tests: a fresh database (PostgreSQL schema, MariaDB database or
//! SQLite file) per test, SMTP servers from `tests/peers`, and daemons in-process or as
//! the real binary.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use sqlx::Connection;
use teos_mailer::config::{Config, TransportKind};
use teos_mailer::settings::Settings;
use teos_mailer::store::{NewMail, RelayUpdate, Store};
use teos_mailer::token::TokenManager;
use teos_mailer::transport::Context;
use teos_mailer::worker::Worker;
use tokio::sync::{Notify, watch};

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const MYSQL_ADMIN: &str = "mysql://root@127.0.0.1:3306/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
    Sqlite,
}

/// A database of its own for one test.
pub struct TestDb {
    pub dialect: Dialect,
    pub url: String,
    name: String,
    /// Keeps the SQLite file's folder alive.
    _dir: Option<tempfile::TempDir>,
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{:08x}", std::process::id(), fastrand::u32(..))
}

impl TestDb {
    pub async fn new(dialect: Dialect) -> TestDb {
        let name = unique("teos_t");
        let (url, dir) = match dialect {
            Dialect::Postgres => {
                let mut admin = sqlx::PgConnection::connect(PG_ADMIN)
                    .await
                    .expect("PostgreSQL at 127.0.0.1:5432");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                (
                    format!("{PG_ADMIN}?options=-c%20search_path%3D{name}"),
                    None,
                )
            }
            Dialect::MySql => {
                let mut admin = sqlx::MySqlConnection::connect(MYSQL_ADMIN)
                    .await
                    .expect("MariaDB at 127.0.0.1:3306");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                (format!("mysql://root@127.0.0.1:3306/{name}"), None)
            }
            Dialect::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
                (url, Some(dir))
            }
        };
        let db = TestDb {
            dialect,
            url,
            name,
            _dir: dir,
        };
        db.store().await.migrate().await.unwrap();
        db
    }

    /// A configuration for this database, tuned so tests run in seconds.
    pub fn config(&self) -> Config {
        let mut cfg = Config::load(None).unwrap();
        cfg.database.url = SecretString::from(self.url.clone());
        cfg.delivery.poll_interval_ms = 50;
        cfg.delivery.retry_base_secs = 1;
        cfg.delivery.retry_cap_secs = 1;
        cfg.delivery.send_timeout_secs = 10;
        cfg.delivery.lease_secs = 30;
        cfg.delivery.shutdown_grace_secs = 5;
        cfg.delivery.message_id_domain = "teos.test".into();
        cfg.delivery.transport = TransportKind::Database;
        cfg
    }

    pub async fn store(&self) -> Store {
        Store::connect(&self.config().database).await.unwrap()
    }

    /// Drops what the test created (an SQLite file goes with its folder).
    pub async fn cleanup(self) {
        match self.dialect {
            Dialect::Postgres => {
                let mut admin = sqlx::PgConnection::connect(PG_ADMIN).await.unwrap();
                let sql = format!("DROP SCHEMA {} CASCADE", self.name);
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut admin)
                    .await;
            }
            Dialect::MySql => {
                let mut admin = sqlx::MySqlConnection::connect(MYSQL_ADMIN).await.unwrap();
                let sql = format!("DROP DATABASE {}", self.name);
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut admin)
                    .await;
            }
            Dialect::Sqlite => {}
        }
    }

    /// Runs one SQL statement as a module or an operator would, outside the daemon.
    pub async fn exec(&self, sql: &str) {
        let store = self.store().await;
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match &store {
            Store::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
            Store::MySql(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
            Store::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
        }
        .unwrap();
        store.close().await;
    }

    /// Count of rows a query returns in its first column, as i64.
    pub async fn count(&self, sql: &str) -> i64 {
        let store = self.store().await;
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        let n = match &store {
            Store::Postgres(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await,
            Store::MySql(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await,
            Store::Sqlite(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await,
        }
        .unwrap();
        store.close().await;
        n
    }

    /// The relay in the mail settings points at `server`, with both senders set.
    pub async fn use_relay(&self, port: u16, login: Option<(&str, &str)>) {
        let store = self.store().await;
        store
            .set_relay(&RelayUpdate {
                host: "127.0.0.1".into(),
                port,
                security: "none".into(),
                username: login.map(|(u, _)| u.to_string()),
                password: login.map(|(_, p)| SecretString::from(p.to_string())),
                general_sender: Some("TEOS <teos@contoso.test>".into()),
                reception_sender: Some("Reception <reception@contoso.test>".into()),
            })
            .await
            .unwrap();
        store.close().await;
    }
}

/// Runs `$body` (an async fn taking a `TestDb`) once per database, as three tests.
#[macro_export]
macro_rules! on_every_db {
    ($($name:ident),+ $(,)?) => {
        mod every_db {
            $(
                mod $name {
                    use $crate::support::{Dialect, TestDb};
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn postgres() {
                        let db = TestDb::new(Dialect::Postgres).await;
                        super::super::$name(&db).await;
                        db.cleanup().await;
                    }
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn mysql() {
                        let db = TestDb::new(Dialect::MySql).await;
                        super::super::$name(&db).await;
                        db.cleanup().await;
                    }
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn sqlite() {
                        let db = TestDb::new(Dialect::Sqlite).await;
                        super::super::$name(&db).await;
                        db.cleanup().await;
                    }
                }
            )+
        }
    };
}

pub fn mail(to: &str, subject: &str) -> NewMail {
    NewMail {
        module: Some("room_booking".into()),
        to: vec![to.into()],
        subject: subject.into(),
        body_text: Some(format!("Body of {subject}")),
        ..NewMail::default()
    }
}

/// A worker in this process, driven by `run_once`, with the settings as stored now.
pub async fn worker(cfg: &Config) -> Arc<Worker> {
    let store = Store::connect(&cfg.database).await.unwrap();
    let settings = Settings::from_row(store.load_settings().await.unwrap());
    let (_, rx) = watch::channel(Arc::new(settings));
    let ctx = Context::new(&cfg.delivery, &cfg.microsoft365).unwrap();
    let margin = Duration::from_secs(cfg.microsoft365.token_refresh_margin_secs);
    let tokens = TokenManager::new(ctx.http.clone(), margin);
    Arc::new(Worker::new(store, ctx, tokens, rx, Arc::new(Notify::new())))
}

/// The whole daemon (`app::run`) in this process, stopped as SIGTERM would stop it.
pub struct Daemon {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), teos_mailer::config::ConfigError>>,
}

impl Daemon {
    pub fn start(cfg: Config) -> Daemon {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async {
            stopped.await.ok();
        };
        let task = tokio::spawn(teos_mailer::app::run(cfg, shutdown, Default::default()));
        Daemon { stop, task }
    }

    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops it and waits for it to drain and return Ok.
    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the daemon drains within 20 s")
            .unwrap()
            .unwrap();
    }
}

/// A peer process from tests/peers: started with its flags, ready once it printed its
/// JSON line, stopped when dropped (its stdin closes, and it is killed to be sure).
pub struct Peer {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Peer {
    /// Starts `tests/peers/<script>` on 127.0.0.1 with `args`, in which `{dir}` stands
    /// for a fresh folder the peer owns.
    pub fn start(script: &str, args: &[&str]) -> Peer {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir_text = dir.path().to_str().unwrap().to_string();
        let mut child = Command::new("python3")
            .arg(root.join("tests/peers").join(script))
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args.iter().map(|a| a.replace("{dir}", &dir_text)))
            .current_dir(root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs the test peers");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("{script} did not start: {line:?}"));
        let port = ready["port"].as_u64().expect("port") as u16;
        Peer { child, port, dir }
    }

    /// The peer's `/_stats`, for the HTTP peers.
    pub async fn stats(&self) -> serde_json::Value {
        reqwest::get(format!("http://127.0.0.1:{}/_stats", self.port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Changes an HTTP peer's behaviour through its `/_control`.
    pub async fn control(&self, body: serde_json::Value) {
        let status = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/_control", self.port))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success());
    }

    /// The SMTP sink of tests/peers/smtp_server.py.
    pub fn smtp(args: &[&str]) -> Peer {
        let mut all = vec!["--dir", "{dir}"];
        all.extend_from_slice(args);
        Peer::start("smtp_server.py", &all)
    }

    /// Messages received so far, in arrival order, as (envelope JSON, raw bytes).
    pub fn received(&self) -> Vec<(serde_json::Value, String)> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && p.file_stem().is_some_and(|s| s != "stats")
            })
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|json| {
                let envelope = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
                let eml = std::fs::read_to_string(json.with_extension("eml")).unwrap();
                (envelope, eml)
            })
            .collect()
    }

    /// Waits until `n` messages arrived (or the time is up) and returns them.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<(serde_json::Value, String)> {
        let start = Instant::now();
        loop {
            let got = self.received();
            if got.len() >= n || start.elapsed() > limit {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of a header in raw message text (first occurrence, unfolded).
pub fn header(eml: &str, name: &str) -> Option<String> {
    let head = eml.split("\r\n\r\n").next().unwrap_or("");
    let mut value: Option<String> = None;
    for line in head.split("\r\n") {
        if let Some(v) = value.as_mut() {
            if line.starts_with([' ', '\t']) {
                v.push_str(line.trim_start());
                continue;
            }
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            if n.eq_ignore_ascii_case(name) {
                value = Some(v.trim().to_string());
            }
        }
    }
    value
}

/// Row `id` waits for its sender (pending, no attempt spent), and the one pause says why.
pub async fn assert_waits(store: &Store, id: i64, why: &str) {
    let row = &store.list(Some(id), None, 1).await.unwrap()[0];
    assert_eq!(
        (row.status.as_str(), row.attempts),
        ("pending", 0),
        "row {id} waits without spending an attempt"
    );
    let pauses = store.stats().await.unwrap().pauses;
    assert_eq!(pauses.len(), 1, "one sender is paused");
    assert!(
        pauses[0].reason.contains(why),
        "the pause should say {why:?}: {}",
        pauses[0].reason
    );
}

/// Waits (up to 10 s) until some sender is paused.
pub async fn until_paused(store: &Store) -> bool {
    eventually(Duration::from_secs(10), || async {
        !store.stats().await.unwrap().pauses.is_empty()
    })
    .await
}

/// Runs `worker` pass after pass until `n` rows are sent (at most 10 s).
pub async fn run_until_sent(worker: &Arc<Worker>, db: &TestDb, n: i64) -> bool {
    eventually(Duration::from_secs(10), || async {
        worker.run_once().await.unwrap();
        db.count("SELECT COUNT(*) FROM mail_outbox WHERE status = 'sent'")
            .await
            == n
    })
    .await
}

/// Polls `check` until it holds or `limit` passes; returns whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A TCP forwarder in front of a database, to cut it off and bring it back as an
/// outage would.
pub struct Proxy {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (up2, conns2) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { port, up, conns }
    }

    /// Up: connections go through. Down: open ones are cut, new ones closed at once.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for c in self.conns.lock().unwrap().drain(..) {
                c.abort();
            }
        }
    }
}
