//! The backend side: opening and logging in connections to the configured servers, and
//! reusing reset pass-through connections. (Fragment pools, health checks and replay lag
//! arrive with the fan-out engine.)

pub mod connect;
pub mod pool;
pub mod session_pool;
