//! The commands that change a run while it trains: coefficients, hyper-parameters, locks, the
//! probe image and the filter view's channel. Each returns what changed or a message why not;
//! the model owns how the values are represented (`MoppaUnit::set_coeff`).

use super::Trainer;
use crate::config::{Coeff, Lockable, MethodKind};
use crate::train::protocol::{Applied, Hyper, Rgb, SetMode, Target};

type Outcome<T> = std::result::Result<T, String>;

impl Trainer {
    fn applied(&self, command: String, target: Target, old: f64, new: f64) -> Applied {
        Applied {
            step: self.step,
            command,
            target: target.to_string(),
            old,
            new,
            time_s: self.time_s(),
        }
    }

    /// The MoPPA blocks a command addresses.
    fn blocks_of(&self, target: Target) -> Outcome<Vec<usize>> {
        let moppa = self.model.moppa_blocks();
        match target {
            Target::All => Ok(moppa),
            Target::Block(b) if moppa.contains(&b) => Ok(vec![b]),
            Target::Block(b) => Err(format!(
                "block {b} has no MoPPA unit (blocks 0..{})",
                self.model.adapters.len()
            )),
        }
    }

    /// Changes κ, c or ε; returns what changed (channel means), or a message why not.
    pub fn set_coeff(&mut self, coeff: Coeff, target: Target, mode: SetMode) -> Outcome<Applied> {
        match mode {
            SetMode::Set(v) => {
                coeff.range().check(v).map_err(|e| e.to_string())?;
            }
            SetMode::Scale(f) if !(f.is_finite() && f > 0.0) => {
                return Err(format!("{} scale factor must be > 0 (got {f})", coeff.name()));
            }
            SetMode::Scale(_) => {}
        }
        if self.cfg.method.method != MethodKind::Moppa {
            return Err(format!(
                "{} applies to MoPPA; this run is {}",
                coeff.name(),
                self.cfg.method.label()
            ));
        }
        if !self.cfg.method.active_priors().contains(&coeff.prior()) {
            return Err(format!(
                "{} belongs to the {} prior, which is not active in this run",
                coeff.name(),
                coeff.prior()
            ));
        }
        // Every block's new values are computed and checked before any block changes: a scale
        // that takes one channel out of range changes nothing.
        let mut plan = Vec::new();
        for b in self.blocks_of(target)? {
            let Some(unit) = self.model.moppa_unit(b) else { continue };
            let old = unit.coeff_values(coeff);
            let new: Vec<f64> = old
                .iter()
                .map(|o| match mode {
                    SetMode::Scale(f) => o * f,
                    SetMode::Set(v) => v,
                })
                .collect();
            for v in &new {
                coeff.range().check(*v).map_err(|e| e.to_string())?;
            }
            plan.push((b, old, new));
        }
        let mut old_all = Vec::new();
        let mut new_all = Vec::new();
        for (b, _, new) in &plan {
            if let Some(unit) = self.model.moppa_unit(*b) {
                unit.set_coeff(coeff, new).map_err(|e| e.to_string())?;
            }
        }
        if let Err(why) = self.filters_finite() {
            // Put every block back as it was: the change is refused, not half-applied.
            for (b, old, _) in &plan {
                if let Some(unit) = self.model.moppa_unit(*b) {
                    unit.set_coeff(coeff, old).map_err(|e| e.to_string())?;
                }
            }
            return Err(format!("{} refused: {why}", coeff.name()));
        }
        for (_, old, new) in plan {
            old_all.extend(old);
            new_all.extend(new);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let mode_name = if matches!(mode, SetMode::Scale(_)) {
            " scale"
        } else {
            ""
        };
        Ok(self.applied(
            format!("{}{mode_name}", coeff.name()),
            target,
            mean(&old_all),
            mean(&new_all),
        ))
    }

    /// Changes τ, γ, λ, T or the peak learning rate.
    pub fn set_hyper(&mut self, hyper: Hyper, value: f64) -> Outcome<Applied> {
        hyper.range().check(value).map_err(|e| e.to_string())?;
        let live = &mut self.model.live;
        let slot = match hyper {
            Hyper::Tau => &mut live.tau,
            Hyper::Gamma => &mut live.gamma,
            Hyper::RouteWeight => &mut live.route_weight,
            Hyper::Temperature => &mut live.temperature,
            Hyper::Lr => &mut self.peak_lr,
        };
        let old = std::mem::replace(slot, value);
        if matches!(hyper, Hyper::Tau | Hyper::Gamma)
            && let Err(why) = self.filters_finite()
        {
            let live = &mut self.model.live;
            if hyper == Hyper::Tau {
                live.tau = old;
            } else {
                live.gamma = old;
            }
            return Err(format!("{} refused: {why}", hyper.name()));
        }
        Ok(self.applied(hyper.name().into(), Target::All, old, value))
    }

    /// Every MoPPA filter is finite in the precision it is computed in (a live change that would
    /// make one NaN or infinite is refused before a step uses it).
    fn filters_finite(&self) -> Outcome<()> {
        for b in self.model.moppa_blocks() {
            let Some(unit) = self.model.moppa_unit(b) else { continue };
            let filters = unit
                .filters(&self.model.grid, &self.model.live, false)
                .map_err(|e| e.to_string())?;
            for (prior, f) in self.cfg.method.active_priors().iter().zip(filters) {
                let values = f
                    .to_dtype(candle_core::DType::F32)
                    .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                    .map_err(|e| e.to_string())?;
                if values.iter().any(|v| !v.is_finite()) {
                    return Err(format!("block {b}'s {prior} filter would not be finite"));
                }
            }
        }
        Ok(())
    }

    /// Locks or releases a coefficient (or the source map).
    pub fn set_lock(&mut self, what: Lockable, target: Target, locked: bool) -> Outcome<Applied> {
        let mut n = 0;
        for b in self.blocks_of(target)? {
            if let Some(name) = self.model.lock_name(b, what) {
                self.opt.set_locked(&name, locked);
                n += 1;
            }
        }
        if n == 0 {
            return Err(format!("{} is not trained in this run", what.name()));
        }
        let verb = if locked { "lock" } else { "unlock" };
        let (old, new) = if locked { (0.0, 1.0) } else { (1.0, 0.0) };
        Ok(self.applied(format!("{verb} {}", what.name()), target, old, new))
    }

    /// The tensors of block `block` that are locked now.
    #[must_use]
    pub fn locked_in(&self, block: usize) -> Vec<Lockable> {
        Lockable::ALL
            .into_iter()
            .filter(|&l| {
                self.model
                    .lock_name(block, l)
                    .is_some_and(|name| self.opt.is_locked(&name))
            })
            .collect()
    }

    /// Chooses the probe image (an index into the validation split).
    pub fn set_probe(&mut self, index: usize) -> Outcome<()> {
        if index >= self.val.len() {
            return Err(format!(
                "probe index {index} is outside the validation split (0..{})",
                self.val.len()
            ));
        }
        self.probe = index;
        self.probe_image = None;
        Ok(())
    }

    /// Makes the user's image the probe (it replaces the validation image until another
    /// `set_probe`); it must be square at the backbone's input size.
    pub fn set_probe_image(&mut self, name: &str, image: Rgb) -> Outcome<()> {
        // The name is stored in every later snapshot record: bounded, without control characters.
        let name = crate::train::serve::frame::tame(name, crate::train::serve::server::MAX_REMOTE_TEXT);
        let size = self.model.backbone.cfg.img_size;
        if image.size != size || image.pixels.len() != size * size * 3 {
            return Err(format!(
                "{name}: the probe must be {size}×{size} RGB (the backbone's input), got {}×{} with {} bytes",
                image.size,
                image.size,
                image.pixels.len()
            ));
        }
        self.probe_image = Some((name, image));
        Ok(())
    }

    /// Chooses the channel of the per-channel filter view.
    pub fn set_channel(&mut self, channel: Option<usize>) -> Outcome<()> {
        let r = self.cfg.method.rank;
        match channel {
            Some(c) if c >= r || self.cfg.method.method != MethodKind::Moppa => {
                Err(format!("channel {c} does not exist (rank {r})"))
            }
            _ => {
                self.channel = channel;
                Ok(())
            }
        }
    }
}
