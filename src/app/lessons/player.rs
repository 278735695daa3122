//! Playing a lesson in the app: each step's setup applied when the step begins, the view to look
//! at highlighted, the action offered ("Do it" performs it exactly as the view's own control
//! would), Next enabled once the check holds on the same state and events the views use.
//! `autoplay` walks the steps by itself (screenshots, demonstrations).

use super::{Action as LessonAction, AlertKind, Check, Lesson, Look, Measure, PlaygroundCoeff, Press, Step, Value};
use crate::app::panels::{Action, RunStatus};
use crate::app::state::Tab;
use crate::app::{Source, StudioApp};
use crate::train::protocol::{Command, SetMode, Target};

/// A lesson being played.
#[derive(Clone, Debug)]
pub struct Player {
    /// The lesson.
    pub lesson: Lesson,
    /// The current step (0-based).
    pub step: usize,
    setup_done: bool,
    /// Pause the run shown when it reaches this step (a step's `pause_at`).
    pause_at: Option<u64>,
    /// Errors the app had shown when the step began (an `alert = "error"` check waits for more).
    errors_at_start: usize,
    /// Walk by itself up to this step (0-based), performing each action.
    pub autoplay: Option<usize>,
    acted: bool,
    /// The launch settings before the lesson's first run setup (given back when it ends).
    saved_config: Option<crate::config::RunConfig>,
}

impl Player {
    /// Starts `lesson` at its first step.
    #[must_use]
    pub fn new(lesson: Lesson) -> Self {
        Self {
            lesson,
            step: 0,
            setup_done: false,
            pause_at: None,
            errors_at_start: 0,
            autoplay: None,
            acted: false,
            saved_config: None,
        }
    }

    /// The current step.
    #[must_use]
    pub fn current(&self) -> &Step {
        &self.lesson.steps[self.step.min(self.lesson.steps.len() - 1)]
    }

    /// Whether this is the last step.
    #[must_use]
    pub fn at_end(&self) -> bool {
        self.step + 1 >= self.lesson.steps.len()
    }

    /// The user's launch settings this lesson replaced, if it replaced them.
    #[must_use]
    pub fn saved_config(&self) -> Option<&crate::config::RunConfig> {
        self.saved_config.as_ref()
    }

    /// Whether autoplay has reached its target step and that step's check holds (what a
    /// screenshot waits for).
    #[must_use]
    pub fn arrived(&self, passes: bool) -> bool {
        self.autoplay.is_some_and(|t| self.step >= t) && self.setup_done && passes
    }
}

impl StudioApp {
    /// Starts a lesson (replacing one being played).
    pub fn start_lesson(&mut self, lesson: Lesson) {
        self.end_lesson();
        let mut p = Player::new(lesson);
        p.errors_at_start = self.messages.raised();
        self.lesson = Some(p);
    }

    /// The value a lesson reads, from the same state the views show.
    #[must_use]
    pub fn lesson_value(&self, v: Value) -> Option<f64> {
        let pg = &self.settings.playground.coeffs;
        match v {
            Value::Playground(c) => Some(match c {
                PlaygroundCoeff::Kappa => pg.kappa,
                PlaygroundCoeff::C => pg.c,
                PlaygroundCoeff::Eps => pg.eps,
                PlaygroundCoeff::Tau => pg.tau,
                PlaygroundCoeff::Gamma => pg.gamma,
            }),
            Value::RunCoeff(c) => self
                .sel()
                .map(|r| r.history.values(None).coeffs[c])
                .filter(|v| !v.is_nan()),
            Value::RunHyper(h) => self
                .sel()
                .map(|r| r.history.values(None).hyper(h))
                .filter(|v| !v.is_nan()),
            Value::Measured(m) => self.sel().and_then(|r| measured(&r.history, m)),
        }
    }

    /// Whether `check` holds now.
    #[must_use]
    pub fn lesson_check(&self, check: &Check) -> bool {
        let errors_at_start = self.lesson.as_ref().map_or(0, |p| p.errors_at_start);
        let run = self.sel();
        match check {
            Check::InRange(v, lo, hi) => self.lesson_value(*v).is_some_and(|x| x >= *lo && x <= *hi),
            Check::Tab(t) => self.settings.tab == *t,
            Check::Step(n) => run.is_some_and(|r| r.history.step >= *n),
            Check::State(s) => self.status() == *s,
            Check::Locked(l) => run
                .and_then(|r| r.history.snapshots.last())
                .is_some_and(|s| !s.blocks.is_empty() && s.blocks.iter().all(|b| b.locked.contains(l))),
            Check::Alert(kind) => {
                let error = self.messages.raised() > errors_at_start;
                let router = run.map_or_else(Vec::new, |r| {
                    crate::app::panels::alerts::alerts(&r.history.snapshots, &self.settings.router)
                });
                let dead = router
                    .iter()
                    .any(|a| matches!(a, crate::app::panels::alerts::Alert::Dead { .. }));
                let collapse = router
                    .iter()
                    .any(|a| matches!(a, crate::app::panels::alerts::Alert::Collapse { .. }));
                match kind {
                    AlertKind::Error => error,
                    AlertKind::Dead => dead,
                    AlertKind::Collapse => collapse,
                    AlertKind::Any => error || dead || collapse,
                }
            }
            Check::Ablated => {
                run.is_some_and(|r| r.history.ablation.is_some() && r.history.ablation_progress.is_none())
            }
        }
    }

    /// Whether the current step lets the learner go on.
    #[must_use]
    pub fn lesson_step_done(&self) -> bool {
        self.lesson
            .as_ref()
            .is_some_and(|p| p.setup_done && p.current().check.as_ref().is_none_or(|c| self.lesson_check(c)))
    }

    /// Performs a step's action as the view's own control would.
    pub(crate) fn lesson_act(&mut self, a: &LessonAction) -> Vec<Action> {
        match a {
            LessonAction::Set(Value::Playground(k), x) => {
                let pg = &mut self.settings.playground.coeffs;
                match k {
                    PlaygroundCoeff::Kappa => pg.kappa = *x,
                    PlaygroundCoeff::C => pg.c = *x,
                    PlaygroundCoeff::Eps => pg.eps = *x,
                    PlaygroundCoeff::Tau => pg.tau = *x,
                    PlaygroundCoeff::Gamma => pg.gamma = *x,
                }
                Vec::new()
            }
            LessonAction::Set(Value::RunCoeff(k), x) => {
                self.settings.controls.block = None;
                vec![Action::Send(Command::SetCoeff {
                    coeff: *k,
                    target: Target::All,
                    mode: SetMode::Set(*x),
                })]
            }
            LessonAction::Set(Value::RunHyper(h), x) => {
                vec![Action::Send(Command::SetHyper { hyper: *h, value: *x })]
            }
            // The parser refuses to set a measured value.
            LessonAction::Set(Value::Measured(_), _) => Vec::new(),
            LessonAction::Lock(l) => vec![Action::Send(Command::Lock {
                what: *l,
                target: Target::All,
                locked: true,
            })],
            LessonAction::Press(p) => vec![match p {
                Press::Start => Action::Start,
                Press::Pause => Action::Pause,
                Press::Step => Action::Step,
                Press::Stop => Action::Stop,
                Press::Reset => Action::Reset,
                Press::Evaluate => Action::Send(Command::Evaluate),
                Press::Ablate => {
                    self.settings.diagnose.view = crate::app::panels::diagnose::DiagView::Priors;
                    Action::Ablate(self.settings.diagnose.images)
                }
            }],
            LessonAction::Tab(t) => {
                self.settings.tab = *t;
                Vec::new()
            }
            LessonAction::OpenSample => {
                self.playground.load_sample();
                self.settings.playground.image = None;
                Vec::new()
            }
        }
    }

    /// Applies the current step's setup once.
    fn lesson_setup(&mut self) -> Vec<Action> {
        let Some(p) = &mut self.lesson else { return Vec::new() };
        if p.setup_done {
            return Vec::new();
        }
        p.setup_done = true;
        p.acted = false;
        p.errors_at_start = self.messages.raised();
        let setup = p.current().setup.clone();
        if let Some(n) = setup.pause_at {
            p.pause_at = Some(n);
        }
        let mut actions = Vec::new();
        if let Some(pg) = &setup.playground {
            let s = &mut self.settings.playground;
            if let Some(prior) = pg.prior {
                s.prior = prior;
            }
            for (v, slot) in [
                (pg.kappa, &mut s.coeffs.kappa),
                (pg.c, &mut s.coeffs.c),
                (pg.eps, &mut s.coeffs.eps),
                (pg.tau, &mut s.coeffs.tau),
                (pg.gamma, &mut s.coeffs.gamma),
            ] {
                if let Some(v) = v {
                    *slot = v;
                }
            }
            if pg.sample {
                self.playground.load_sample();
                s.image = None;
            }
        }
        // Walking by itself (a demonstration, a screenshot): show what the step looks at.
        if self.lesson.as_ref().is_some_and(|p| p.autoplay.is_some()) {
            match self.lesson.as_ref().and_then(|p| p.current().look) {
                Some(Look::Tab(t)) => self.settings.tab = t,
                Some(Look::Live) if matches!(self.settings.tab, Tab::Playground | Tab::Runs) => {
                    self.settings.tab = Tab::Filters;
                }
                _ => {}
            }
        }
        if let Some(cfg) = setup.run {
            if let Some(p) = &mut self.lesson {
                p.saved_config.get_or_insert_with(|| self.settings.config.clone());
            }
            self.settings.config = cfg;
            self.launch_run(setup.start);
        } else if setup.start {
            actions.push(Action::Start);
        }
        actions
    }

    /// Once a frame: the step's setup, a pending pause, autoplay.
    pub(crate) fn lesson_frame(&mut self) -> Vec<Action> {
        let mut actions = self.lesson_setup();
        let Some(p) = &self.lesson else { return actions };
        if let Some(n) = p.pause_at {
            let run = self.sel();
            let reached = run.is_some_and(|r| r.source == Source::Local && r.history.step >= n);
            if reached {
                if self.status() == RunStatus::Running {
                    actions.push(Action::Pause);
                }
                if let Some(p) = &mut self.lesson {
                    p.pause_at = None;
                }
            }
        }
        let Some(p) = &self.lesson else { return actions };
        if let Some(target) = p.autoplay {
            let action = (!p.acted).then(|| p.current().action.clone()).flatten();
            if let Some(a) = action {
                actions.extend(self.lesson_act(&a));
            }
            if let Some(p) = &mut self.lesson {
                p.acted = true;
            }
            // Dismiss what an action raised on purpose (a lesson that breaks a run).
            self.messages.dismiss_errors();
            if self.lesson_step_done() && self.lesson.as_ref().is_some_and(|p| p.step < target && !p.at_end()) {
                self.lesson_next();
            }
        }
        actions
    }

    /// Goes to the next step (or closes the lesson after the last).
    pub(crate) fn lesson_next(&mut self) {
        if let Some(p) = &mut self.lesson {
            if p.at_end() {
                self.end_lesson();
            } else {
                p.step += 1;
                p.setup_done = false;
            }
        }
    }

    /// Ends the lesson being played: the launch settings it replaced are given back (its runs
    /// stay in the run list).
    pub fn end_lesson(&mut self) {
        if let Some(cfg) = self.lesson.take().and_then(|p| p.saved_config) {
            self.settings.config = cfg;
        }
    }

    /// Goes back one step (its setup is not applied again: the state stays as it is).
    pub(crate) fn lesson_back(&mut self) {
        if let Some(p) = &mut self.lesson {
            p.step = p.step.saturating_sub(1);
        }
    }

    /// The lesson panel (under the views while a lesson is played).
    pub(crate) fn lesson_panel(&mut self, ui: &mut egui::Ui) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(p) = &self.lesson else { return actions };
        let (title, n, total, step) = (
            p.lesson.title.clone(),
            p.step,
            p.lesson.steps.len(),
            p.current().clone(),
        );
        let done = self.lesson_step_done();
        let mut next = false;
        let mut back = false;
        let mut close = false;
        ui.horizontal(|ui| {
            ui.label(egui::RichText::new(format!("Lesson: {title}")).strong());
            ui.label(format!("step {} of {total}", n + 1));
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                close = ui.button("Close lesson").clicked();
            });
        });
        ui.label(egui::RichText::new(&step.text).size(15.0));
        ui.horizontal_wrapped(|ui| {
            if let Some(look) = step.look {
                let name = match look {
                    Look::Tab(t) => format!("the {} view", t.label()),
                    Look::Live => "the live panel (right)".to_owned(),
                };
                ui.label(egui::RichText::new(format!("Look at {name}.")).color(HIGHLIGHT));
            }
            if let Some(a) = &step.action {
                ui.label(format!("Do: {}.", a.describe()));
                if ui
                    .button("Do it")
                    .on_hover_text("Performs the step's action for you, as the control would")
                    .clicked()
                {
                    actions.extend(self.lesson_act(a));
                }
            }
        });
        ui.horizontal(|ui| {
            if let Some(c) = &step.check {
                if done {
                    ui.colored_label(
                        egui::Color32::from_rgb(120, 200, 120),
                        format!("Done: {}.", c.describe()),
                    );
                } else {
                    ui.spinner();
                    // The run's last steps are done and it tests its final model: say so.
                    let testing = self.sel().is_some_and(|r| r.history.testing());
                    let now = if testing {
                        " (the run is testing its final model)"
                    } else {
                        ""
                    };
                    ui.label(format!("Waiting for {}…{now}", c.describe()));
                }
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                let label = if n + 1 == total { "Finish" } else { "Next" };
                next = ui.add_enabled(done, egui::Button::new(label)).clicked();
                back = ui.add_enabled(n > 0, egui::Button::new("Back")).clicked();
            });
        });
        if next {
            self.lesson_next();
        } else if back {
            self.lesson_back();
        }
        if close {
            self.end_lesson();
        }
        actions
    }

    /// Outlines what the current step says to look at: the view (or its tab, when another is
    /// shown) or the live panel.
    pub(crate) fn lesson_highlight(&self, ctx: &egui::Context) {
        let Some(look) = self.lesson.as_ref().and_then(|p| p.current().look) else {
            return;
        };
        let rect = match look {
            Look::Tab(t) if t == self.settings.tab => self.frame.view_rects.central,
            Look::Tab(t) => self
                .frame
                .view_rects
                .tabs
                .iter()
                .find(|(x, _)| *x == t)
                .map(|(_, r)| *r),
            Look::Live => self.frame.view_rects.live.or_else(|| {
                self.frame
                    .view_rects
                    .tabs
                    .iter()
                    .find(|(x, _)| *x == Tab::Filters)
                    .map(|(_, r)| *r)
            }),
        };
        if let Some(r) = rect {
            let t = ctx.input(|i| i.time);
            let alpha = (0.6 + 0.4 * (t * 3.0).sin()) as f32;
            let painter = ctx.layer_painter(egui::LayerId::new(
                egui::Order::Foreground,
                egui::Id::unique("lesson-look"),
            ));
            painter.rect_stroke(
                r.shrink(1.0),
                6.0,
                egui::Stroke::new(3.0, HIGHLIGHT.gamma_multiply(alpha)),
                egui::StrokeKind::Inside,
            );
            ctx.request_repaint_after(std::time::Duration::from_millis(50));
        }
    }
}

/// The colour of what a lesson points at.
const HIGHLIGHT: egui::Color32 = egui::Color32::from_rgb(255, 200, 60);

/// Where the views are on screen (for highlighting), recorded as the layout draws them.
#[derive(Clone, Debug, Default)]
pub struct ViewRects {
    /// The main view.
    pub central: Option<egui::Rect>,
    /// The live controls panel.
    pub live: Option<egui::Rect>,
    /// Each tab's button in the top bar.
    pub tabs: Vec<(Tab, egui::Rect)>,
}

/// A measured value of a run, as the router and ablation views show it.
fn measured(h: &crate::app::history::RunHistory, m: Measure) -> Option<f64> {
    match m {
        Measure::TopShare | Measure::Entropy => {
            let snap = h.snapshots.last()?;
            let stats: Vec<_> = snap.blocks.iter().filter_map(|b| b.router.as_ref()).collect();
            if stats.is_empty() {
                return None;
            }
            Some(if m == Measure::TopShare {
                stats
                    .iter()
                    .flat_map(|r| r.argmax_share.iter())
                    .map(|v| f64::from(*v))
                    .fold(0.0, f64::max)
            } else {
                stats.iter().map(|r| f64::from(r.entropy_norm)).sum::<f64>() / stats.len() as f64
            })
        }
        Measure::Ablation(p) => {
            let a = h.ablation.as_ref()?;
            let row = a
                .rows
                .iter()
                .find(|r| r.prior == p && r.block == crate::train::protocol::AblationBlock::ALL)?;
            Some(100.0 * (row.score.acc - a.base.acc))
        }
    }
}
