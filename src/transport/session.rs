//! A small pool of SMTP sessions on lettre's connection type, with TCP_NODELAY set.
//!
//! lettre writes a message's body and its final `CRLF.CRLF` in two writes; with Nagle's
//! algorithm on, the second waits for the server's delayed ACK (40 ms on Linux), which
//! capped a pooled lettre transport at about 20 messages per second per session. The
//! pool also bounds the sessions open at once, which Exchange Online limits per mailbox.

use std::sync::Mutex;
use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use lettre::transport::smtp::{self};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// How the session is encrypted.
#[derive(Clone)]
pub enum Security {
    Plain,
    /// Upgrade with STARTTLS before anything else; a server without it is refused.
    StartTls(TlsParameters),
    /// TLS from the first byte (port 465).
    Implicit(TlsParameters),
}

/// Why a send did not get a reply.
#[derive(Debug)]
pub enum SessionError {
    Smtp(smtp::Error),
    /// No TCP connection (refused, unreachable, DNS).
    Connect(std::io::Error),
    /// The server did not answer within the send timeout.
    Timeout,
}

/// An idle session older than this is checked with NOOP before it is used again.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(10);
/// An idle session older than this is closed rather than reused.
const MAX_IDLE: Duration = Duration::from_secs(60);

pub struct SessionPool {
    host: String,
    port: u16,
    security: Security,
    /// Per SMTP exchange (connect, one message).
    timeout: Duration,
    login: Option<(Vec<Mechanism>, Credentials)>,
    hello: ClientId,
    /// Sessions open at once.
    sessions: Semaphore,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
}

impl SessionPool {
    pub fn new(
        host: &str,
        port: u16,
        security: Security,
        timeout: Duration,
        login: Option<(Vec<Mechanism>, Credentials)>,
        max_sessions: u32,
    ) -> SessionPool {
        SessionPool {
            host: host.to_string(),
            port,
            security,
            timeout,
            login,
            hello: ClientId::default(),
            sessions: Semaphore::new(max_sessions.max(1) as usize),
            idle: Mutex::new(Vec::new()),
        }
    }

    pub async fn send(&self, envelope: &Envelope, bytes: &[u8]) -> Result<Response, SessionError> {
        let _session = self.sessions.acquire().await.expect("never closed");
        let mut conn = match self.reuse().await {
            Some(conn) => conn,
            None => self.within(self.connect()).await?,
        };
        let result = self
            .within(async { conn.send(envelope, bytes).await.map_err(SessionError::Smtp) })
            .await;
        // lettre breaks the session on any error; a good one goes back for the next send.
        if result.is_ok() && !conn.has_broken() {
            self.idle.lock().unwrap().push((conn, Instant::now()));
        } else {
            conn.abort().await;
        }
        result
    }

    async fn within<T>(
        &self,
        work: impl Future<Output = Result<T, SessionError>>,
    ) -> Result<T, SessionError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(SessionError::Timeout))
    }

    /// The most recently used idle session that still answers.
    async fn reuse(&self) -> Option<AsyncSmtpConnection> {
        loop {
            let (mut conn, since) = self.idle.lock().unwrap().pop()?;
            let idle = since.elapsed();
            if idle > MAX_IDLE {
                continue;
            }
            if idle < CHECK_IDLE_AFTER || conn.test_connected().await {
                return Some(conn);
            }
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SessionError> {
        let mut conn = match &self.security {
            Security::Implicit(tls) => AsyncSmtpConnection::connect_tokio1(
                (self.host.as_str(), self.port),
                Some(self.timeout),
                &self.hello,
                Some(tls.clone()),
                None,
            )
            .await
            .map_err(SessionError::Smtp)?,
            Security::Plain | Security::StartTls(_) => {
                let tcp = TcpStream::connect((self.host.as_str(), self.port))
                    .await
                    .map_err(SessionError::Connect)?;
                tcp.set_nodelay(true).map_err(SessionError::Connect)?;
                AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello)
                    .await
                    .map_err(SessionError::Smtp)?
            }
        };
        if let Security::StartTls(tls) = &self.security {
            conn.starttls(tls.clone(), &self.hello)
                .await
                .map_err(SessionError::Smtp)?;
        }
        if let Some((mechanisms, credentials)) = &self.login {
            conn.auth(mechanisms, credentials)
                .await
                .map_err(SessionError::Smtp)?;
        }
        Ok(conn)
    }
}
