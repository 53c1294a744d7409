//! The backend side: opening and logging in connections to the configured servers.
//! (Pools, health checks and replay lag arrive with the fan-out engine.)

pub mod connect;
