//! The training engine: one protocol ([`protocol`]), one worker thread ([`worker`]) owning a
//! [`trainer::Trainer`], the optimizer, the one evaluation loop ([`evaluate`]), the run log, the
//! benchmark, and pretraining. No GUI here, and nothing of the model in its public face: displays
//! see plain data ([`protocol`], [`crate::config`]).

pub mod ablation;
pub mod backbone;
pub mod batch;
pub mod bench;
pub mod coalesce;
pub mod error;
pub mod evaluate;
pub mod hub;
pub mod optim;
pub mod pretrain;
pub mod probe;
pub mod protocol;
pub mod record;
pub mod replay;
pub mod runfolder;
pub mod runlog;
pub mod serve;
pub mod snapfile;
pub mod stop;
pub mod trainer;
pub mod worker;

pub use error::TrainError;
pub use protocol::{Command, Event};
pub use stop::StopFlag;
pub use worker::{WorkerHandle, WorkerOptions};
