//! End-to-end tests: the real binaries, PostgreSQL, NATS and websocket clients.
//! One test binary for the whole workspace keeps CI fast.

mod admin;
mod audit;
mod auth;
mod browser;
mod bus;
mod chat;
mod cluster;
mod config;
mod direct;
mod edge;
mod faults;
mod flood;
mod frames;
mod gaps;
mod listener;
mod live;
mod live_routing;
mod live_tables;
mod load;
mod metrics;
mod one;
mod pubsub;
mod recorder;
mod resume;
mod retries;
mod scale;
mod static_files;
mod telemetry;
