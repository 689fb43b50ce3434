//! teos-mailer delivers the mail TEOS Manage modules write to the `mail_outbox` table.
//!
//! A row is claimed with a lease (committed before any network I/O), rendered into a
//! MIME message, handed to the transport the mail settings call for, and its outcome is
//! written back: sent, retried later, failed with a reason, or waiting for the settings
//! to be fixed. NOTIFY or a poll tick wakes the loop.

pub mod app;
pub mod cli;
pub mod config;
pub mod diagnose;
pub mod listen;
pub mod render;
pub mod retry;
pub mod settings;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod token;
pub mod transport;
pub mod worker;
