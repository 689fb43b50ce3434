//! Integration tests against real PostgreSQL, MariaDB and SQLite, real SMTP servers on
//! loopback and the real binary.

mod support;

mod cli;
mod daemons;
mod delivery;
mod microsoft365;
mod outbox;
