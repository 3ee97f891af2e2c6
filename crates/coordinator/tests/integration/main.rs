//! Coordinator integration tests, one binary: real participant services on loopback
//! ports, the coordinator's real HTTP API, and its real stores (SQLite in a temp dir;
//! PostgreSQL in a fresh database on the machine's server).

#![allow(clippy::unwrap_used)]

mod postgres;
mod sagas;
mod support;
mod tcc;
