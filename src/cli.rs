//! The command line: the daemon, migrations, and what an operator needs to look at and
//! steer the queue and the mail settings.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::SecretString;

use crate::config::{Config, ConfigError};
use crate::diagnose;
use crate::settings::{SenderKind, Settings};
use crate::store::{NewAttachment, NewMail, OAuthUpdate, RelayUpdate, STATUSES, Store};
use crate::transport;

#[derive(Debug, Parser)]
#[command(
    name = "teos-mailer",
    version,
    about = "Delivers the e-mail TEOS Manage modules put in the outbox table"
)]
pub struct Cli {
    /// A TOML file that overrides config/default.toml (TEOS_MAILER__* variables override both).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the delivery daemon until SIGTERM or SIGINT.
    Run {
        /// Exit once nothing is due and nothing is being sent.
        #[arg(long)]
        until_idle: bool,
    },
    /// Apply the database migrations and exit.
    Migrate,
    /// Put a message in the outbox, from flags or a JSON document on stdin.
    Enqueue(EnqueueArgs),
    /// Look at and steer the outbox.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Show or change the mail settings held in the database.
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// Send a test message with the stored settings and say what is wrong, if anything.
    TestEmail {
        /// Where the test message goes.
        #[arg(long)]
        to: String,
        /// Which mailbox sends it.
        #[arg(long, value_enum, default_value = "general")]
        sender: SenderArg,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SenderArg {
    General,
    Reception,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Read the message as JSON from stdin: {"to": [...], "subject": ..., "body_text": ..., ...}.
    #[arg(long, conflicts_with_all = ["to", "subject", "text", "html"])]
    pub json: bool,
    #[arg(long)]
    pub to: Vec<String>,
    #[arg(long)]
    pub cc: Vec<String>,
    #[arg(long)]
    pub bcc: Vec<String>,
    #[arg(long)]
    pub reply_to: Option<String>,
    #[arg(long, default_value = "")]
    pub subject: String,
    /// Plain-text body.
    #[arg(long)]
    pub text: Option<String>,
    /// HTML body.
    #[arg(long)]
    pub html: Option<String>,
    /// room_booking, catering, reception, service, report, alert, or any text.
    #[arg(long, default_value = "general")]
    pub module: String,
    /// general or reception; empty picks by module.
    #[arg(long)]
    pub sender: Option<String>,
    /// Lower goes first.
    #[arg(long)]
    pub priority: Option<i32>,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A file to attach, optionally with its content type: `invite.ics=text/calendar; method=REQUEST`.
    #[arg(long, value_name = "PATH[=TYPE]")]
    pub attach: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Rows per status, the oldest wait, and paused senders.
    Stats,
    /// The newest rows.
    List {
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(STATUSES))]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One row with its attempts.
    Show { id: i64 },
    /// Make failed (or cancelled) rows due again with fresh attempts.
    Retry {
        #[arg(required_unless_present = "all_failed")]
        id: Option<i64>,
        #[arg(long, conflicts_with = "id")]
        all_failed: bool,
    },
    /// Cancel a pending row.
    Cancel { id: i64 },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SecurityArg {
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Microsoft Graph sendMail (Mail.Send application permission).
    Graph,
    /// SMTP AUTH XOAUTH2 (SMTP.SendAsApp, Exchange service principal).
    Smtp,
}

#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// The mail settings, secrets masked.
    Show,
    /// Deliver through a plain SMTP relay. The password is read from stdin or a variable.
    SetRelay {
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 587)]
        port: u16,
        #[arg(long, value_enum, default_value = "starttls")]
        security: SecurityArg,
        #[arg(long)]
        username: Option<String>,
        /// Read the password from the first line of stdin.
        #[arg(long, requires = "username", conflicts_with = "password_env")]
        password_stdin: bool,
        /// Read the password from this environment variable.
        #[arg(long, requires = "username", value_name = "VAR")]
        password_env: Option<String>,
        #[arg(long)]
        general_sender: Option<String>,
        #[arg(long)]
        reception_sender: Option<String>,
    },
    /// Deliver through Microsoft 365 with an Entra ID app. The client secret is read from
    /// stdin or a variable; values not given keep what is stored.
    SetOauth {
        #[arg(long, value_enum, default_value = "graph")]
        mode: ModeArg,
        /// Directory (tenant) ID.
        #[arg(long)]
        tenant_id: Option<String>,
        /// Application (client) ID.
        #[arg(long)]
        client_id: Option<String>,
        /// Read the client secret from the first line of stdin.
        #[arg(long, conflicts_with = "secret_env")]
        secret_stdin: bool,
        /// Read the client secret from this environment variable.
        #[arg(long, value_name = "VAR")]
        secret_env: Option<String>,
        /// SMTP server for mode smtp (smtp.office365.com).
        #[arg(long)]
        smtp_host: Option<String>,
        /// Its port (587, STARTTLS).
        #[arg(long)]
        smtp_port: Option<u16>,
        /// login.microsoftonline.com, a sovereign cloud's, or a full URL.
        #[arg(long)]
        authority_host: Option<String>,
        /// Microsoft Graph for mode graph (https://graph.microsoft.com).
        #[arg(long)]
        graph_base_url: Option<String>,
        #[arg(long)]
        general_sender: Option<String>,
        #[arg(long)]
        reception_sender: Option<String>,
        /// Turn OAuth off again (the relay delivers).
        #[arg(long)]
        disable: bool,
    },
}

/// A secret from the first line of stdin, or from an environment variable.
fn read_secret(stdin: bool, env: Option<String>, what: &str) -> anyhow::Result<Option<String>> {
    if stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .with_context(|| format!("cannot read the {what} from stdin"))?;
        Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
    } else if let Some(var) = env {
        Ok(Some(std::env::var(&var).with_context(|| {
            format!("environment variable {var} is not set")
        })?))
    } else {
        Ok(None)
    }
}

pub async fn test_email(
    store: &Store,
    cfg: &Config,
    to: &str,
    sender: SenderArg,
) -> anyhow::Result<()> {
    let ctx = transport::Context::new(&cfg.delivery, &cfg.microsoft365).map_err(ConfigError)?;
    let kind = match sender {
        SenderArg::General => SenderKind::General,
        SenderArg::Reception => SenderKind::Reception,
    };
    let report = diagnose::test_email(store.load_settings().await?, &ctx, to, kind).await;
    for step in &report.steps {
        let mark = if step.ok { "ok  " } else { "FAIL" };
        println!("{mark} {:<9} {}", step.name, step.detail);
    }
    if !report.ok() {
        bail!("the test message was not sent");
    }
    Ok(())
}

pub async fn enqueue(store: &Store, args: EnqueueArgs) -> anyhow::Result<()> {
    let mail = if args.json {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read stdin")?;
        serde_json::from_str::<NewMail>(&text).context("the JSON on stdin is not a message")?
    } else {
        if args.to.is_empty() && args.cc.is_empty() && args.bcc.is_empty() {
            bail!("give at least one --to, --cc or --bcc");
        }
        NewMail {
            module: Some(args.module),
            sender: args.sender,
            to: args.to,
            cc: args.cc,
            bcc: args.bcc,
            reply_to: args.reply_to,
            subject: args.subject,
            body_text: args.text,
            body_html: args.html,
            priority: args.priority,
            idempotency_key: args.idempotency_key,
            attachments: args
                .attach
                .iter()
                .map(|a| attachment(a))
                .collect::<Result<_, _>>()?,
            ..NewMail::default()
        }
    };
    let (id, inserted) = store.enqueue(&mail).await?;
    if inserted {
        println!("queued as {id}");
    } else {
        println!("already queued as {id} (same idempotency key)");
    }
    Ok(())
}

fn attachment(spec: &str) -> anyhow::Result<NewAttachment> {
    let (path, content_type) = match spec.split_once('=') {
        Some((path, ty)) => (path, Some(ty.to_string())),
        None => (spec, None),
    };
    let path = PathBuf::from(path);
    let content =
        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let filename = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name", path.display()))?;
    let content_type = content_type.unwrap_or_else(|| guess_type(&filename).to_string());
    Ok(NewAttachment {
        filename,
        content_type,
        content,
    })
}

fn guess_type(filename: &str) -> &'static str {
    let ext = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("ics") => "text/calendar; method=REQUEST",
        Some("pdf") => "application/pdf",
        Some("csv") => "text/csv",
        Some("txt") => "text/plain",
        Some("html" | "htm") => "text/html",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        _ => "application/octet-stream",
    }
}

pub async fn queue(store: &Store, command: QueueCommand) -> anyhow::Result<()> {
    match command {
        QueueCommand::Stats => {
            let stats = store.stats().await?;
            for status in STATUSES {
                let n = stats
                    .by_status
                    .iter()
                    .find(|(s, _)| s == status)
                    .map_or(0, |(_, n)| *n);
                println!("{status:<10} {n}");
            }
            if let Some(secs) = stats.oldest_due_secs {
                println!("oldest due message has waited {secs} s");
            }
            for p in stats.pauses {
                println!(
                    "PAUSED sender {} until {}: {}",
                    p.sender,
                    p.paused_until.format("%Y-%m-%d %H:%M:%S UTC"),
                    p.reason
                );
            }
        }
        QueueCommand::List { status, limit } => {
            let rows = store.list(None, status.as_deref(), limit).await?;
            println!(
                "{:>8}  {:<9}  {:>3}  {:<14}  {:<19}  subject",
                "id", "status", "try", "module", "updated (UTC)"
            );
            for r in rows {
                println!(
                    "{:>8}  {:<9}  {:>3}  {:<14}  {:<19}  {}",
                    r.id,
                    r.status,
                    r.attempts,
                    r.module,
                    r.updated_at.format("%Y-%m-%d %H:%M:%S"),
                    r.subject
                );
            }
        }
        QueueCommand::Show { id } => {
            let Some(r) = store.list(Some(id), None, 1).await?.into_iter().next() else {
                bail!("there is no outbox row {id}");
            };
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            println!("id:              {}", r.id);
            println!("status:          {}", r.status);
            println!("module:          {}", r.module);
            println!("sender:          {}", opt(r.sender));
            println!("to:              {}", r.to_addrs);
            println!("subject:         {}", r.subject);
            println!("priority:        {}", r.priority);
            println!(
                "attempts:        {} of {}",
                r.attempts,
                r.max_attempts.map_or("default".into(), |m| m.to_string())
            );
            println!(
                "next attempt:    {}",
                r.next_attempt_at.format("%Y-%m-%d %H:%M:%S UTC")
            );
            println!("message-id:      {}", opt(r.message_id));
            println!("idempotency key: {}", opt(r.idempotency_key));
            println!("leased by:       {}", opt(r.lease_owner));
            println!("last error:      {}", opt(r.last_error));
            println!(
                "last reply:      {}",
                match (r.last_smtp_code, r.last_reply) {
                    (Some(c), Some(t)) => format!("{c} {t}"),
                    (None, Some(t)) => t,
                    (Some(c), None) => c.to_string(),
                    (None, None) => "-".into(),
                }
            );
            println!(
                "created:         {}",
                r.created_at.format("%Y-%m-%d %H:%M:%S UTC")
            );
            if let Some(sent) = r.sent_at {
                println!("sent:            {}", sent.format("%Y-%m-%d %H:%M:%S UTC"));
            }
            for a in store.attempts(id).await? {
                println!(
                    "  attempt {} at {} via {} took {} ms: {}{}{}",
                    a.attempt,
                    a.finished_at.format("%Y-%m-%d %H:%M:%S"),
                    a.transport,
                    a.duration_ms,
                    a.outcome,
                    a.smtp_code.map_or(String::new(), |c| format!(" {c}")),
                    a.detail.map_or(String::new(), |d| format!(" — {d}")),
                );
            }
        }
        QueueCommand::Retry { id: Some(id), .. } => match store.retry(id).await? {
            0 => bail!("row {id} is not failed or cancelled, or does not exist"),
            _ => println!("row {id} is due again"),
        },
        QueueCommand::Retry { id: None, .. } => {
            let n = store.retry_all_failed().await?;
            println!("{n} failed rows are due again");
        }
        QueueCommand::Cancel { id } => match store.cancel(id).await? {
            0 => bail!(
                "row {id} is not pending (it may be sending, sent or gone), so it was not cancelled"
            ),
            _ => println!("row {id} cancelled"),
        },
    }
    Ok(())
}

pub async fn settings(store: &Store, command: SettingsCommand) -> anyhow::Result<()> {
    match command {
        SettingsCommand::Show => {
            let s = Settings::from_row(store.load_settings().await?);
            let raw = &s.raw;
            let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            println!("general sender:   {}", opt(&raw.general_sender));
            println!("reception sender: {}", opt(&raw.reception_sender));
            println!("relay host:       {}", opt(&raw.relay_host));
            println!(
                "relay port:       {}",
                raw.relay_port.map_or("-".into(), |p| p.to_string())
            );
            println!("relay security:   {}", raw.relay_security);
            println!("relay username:   {}", opt(&raw.relay_username));
            println!(
                "relay password:   {}",
                if raw.relay_password.is_some() {
                    "(set)"
                } else {
                    "-"
                }
            );
            for problem in [
                &s.general.as_ref().err(),
                &s.reception.as_ref().err(),
                &s.relay.as_ref().err(),
            ]
            .into_iter()
            .flatten()
            {
                println!("problem: {problem}");
            }
        }
        SettingsCommand::SetRelay {
            host,
            port,
            security,
            username,
            password_stdin,
            password_env,
            general_sender,
            reception_sender,
        } => {
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("cannot read the password from stdin")?;
                Some(line.trim_end_matches(['\r', '\n']).to_string())
            } else if let Some(var) = password_env {
                Some(
                    std::env::var(&var)
                        .with_context(|| format!("environment variable {var} is not set"))?,
                )
            } else {
                None
            };
            let security = match security {
                SecurityArg::None => "none",
                SecurityArg::Starttls => "starttls",
                SecurityArg::Tls => "tls",
            };
            store
                .set_relay(&RelayUpdate {
                    host,
                    port,
                    security: security.into(),
                    username,
                    password: password.map(SecretString::from),
                    general_sender,
                    reception_sender,
                })
                .await?;
            println!("relay settings saved; running daemons pick them up within seconds");
        }
        SettingsCommand::SetOauth {
            mode,
            tenant_id,
            client_id,
            secret_stdin,
            secret_env,
            smtp_host,
            smtp_port,
            authority_host,
            graph_base_url,
            general_sender,
            reception_sender,
            disable,
        } => {
            let secret = read_secret(secret_stdin, secret_env, "client secret")?;
            store
                .set_oauth(&OAuthUpdate {
                    enabled: !disable,
                    mode: match mode {
                        ModeArg::Graph => "graph".into(),
                        ModeArg::Smtp => "smtp".into(),
                    },
                    tenant_id,
                    client_id,
                    client_secret: secret.map(SecretString::from),
                    smtp_host,
                    smtp_port,
                    authority_host,
                    graph_base_url,
                    general_sender,
                    reception_sender,
                })
                .await?;
            let s = Settings::from_row(store.load_settings().await?);
            match &s.oauth {
                Ok(_) => println!(
                    "Microsoft 365 settings saved; running daemons pick them up within seconds"
                ),
                Err(why) => println!("saved, but mail will wait: {why}"),
            }
        }
    }
    Ok(())
}
