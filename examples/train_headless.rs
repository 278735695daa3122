// Drives the training engine through its public protocol only: starts MoPPA on the built-in
// backbone and digits, prints progress, sets κ of every block to 0.5 at step 40 (an `Applied`
// event confirms it and the next snapshot shows the new heat filter), stops at step 120 and
// prints the final evaluation. Expect the loss to fall from ~2.3 and validation accuracy to
// climb well above chance (0.1) by the end; with the pretrained built-in backbone it passes 0.8.
//
//     cargo run --release --example train_headless

use moppa_studio::config::RunConfig;
use moppa_studio::train::protocol::{Coeff, Command, Event, SetMode, Target};
use moppa_studio::train::{WorkerHandle, WorkerOptions};

fn main() -> anyhow::Result<()> {
    let cfg = RunConfig {
        steps: Some(400),
        eval_every: 60,
        ..RunConfig::default()
    };
    let worker = WorkerHandle::spawn(cfg, WorkerOptions::default())?;
    let mut kappa_sent = false;
    for event in worker.events() {
        match event {
            Event::Started(info) => println!(
                "{} with {} trainable parameters on {}",
                info.method, info.trainable, info.device
            ),
            Event::Progress(p) => {
                if p.step % 20 == 0 {
                    println!(
                        "step {:>4}  loss {:.3}  acc {:.2}  {:.0} img/s",
                        p.step, p.loss, p.train_acc, p.img_per_s
                    );
                }
                if p.step >= 40 && !kappa_sent {
                    kappa_sent = true;
                    let set = Command::SetCoeff {
                        coeff: Coeff::Kappa,
                        target: Target::All,
                        mode: SetMode::Set(0.5),
                    };
                    worker
                        .send(set)
                        .map_err(|c| anyhow::anyhow!("command queue full: {c:?}"))?;
                }
                if p.step >= 120 {
                    worker.stop();
                }
            }
            Event::Applied(a) => println!(
                "applied {} on {} at step {}: {:.3} -> {:.3}",
                a.command, a.target, a.step, a.old, a.new
            ),
            Event::Snapshot(s) if kappa_sent => {
                if let Some(b) = s.blocks.first() {
                    println!(
                        "snapshot at step {}: block 0 κ = {:?}",
                        s.step,
                        &b.coeffs[Coeff::Kappa][..2.min(b.coeffs[Coeff::Kappa].len())]
                    );
                }
            }
            Event::Eval(e) => println!("{} accuracy {:.3} at step {}", e.split, e.acc, e.step),
            Event::Warning(n) | Event::Error(n) => println!("{}", n.message),
            Event::Finished(f) => {
                println!(
                    "finished ({:?}) after {} steps; best val {:?}, test {:?}",
                    f.reason, f.steps, f.best_val_acc, f.test_acc
                );
                break;
            }
            _ => {}
        }
    }
    Ok(())
}
