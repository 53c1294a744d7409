//! The backend side: opening and logging in connections to the configured servers, and
//! reusing reset pass-through connections, fragment pools with their live statistics, and
//! the health checks that ban and re-admit backends and measure replay lag.

pub mod connect;
pub mod health;
pub mod pool;
pub mod session_pool;
pub mod stats;
