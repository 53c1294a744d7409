//! pgfan: a PostgreSQL wire-protocol proxy that passes every statement through to the primary
//! unchanged, and (with the fan-out engine) splits analytical SELECTs over backend pools.
//!
//! Data flows one way: client → [`server`] → plan → dispatch → [`backends`] → merge →
//! [`server`] → client; pass-through statements take the [`relay`].

pub mod backends;
pub mod config;
pub mod dispatch;
pub mod merge;
pub mod metrics;
pub mod plan;
pub mod protocol;
pub mod relay;
pub mod server;
