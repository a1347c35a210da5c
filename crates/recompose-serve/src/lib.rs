//! recompose-serve: an OpenAI-compatible HTTP server. Continuous batching over requests that
//! each carry their own KV policy, SSE streaming, Prometheus metrics, OpenAI error bodies.

pub mod api;
pub mod engine;
pub mod listen;
pub mod metrics;
pub mod server;

pub use engine::{Engine, EngineConfig};
pub use listen::{serve, Limits};
pub use server::{router, AppState};
