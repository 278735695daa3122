//! The training engine: one protocol ([`protocol`]), one worker thread ([`worker`]) owning a
//! [`trainer::Trainer`], the run configuration, the optimizer and the run log. No GUI here.

pub mod bench;
pub mod config;
pub mod eval;
pub mod mae;
pub mod optim;
pub mod pretrain;
pub mod protocol;
pub mod runlog;
pub mod trainer;
pub mod worker;

pub use config::RunConfig;
pub use protocol::{Command, Event};
pub use worker::{WorkerHandle, WorkerOptions};
