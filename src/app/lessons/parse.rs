//! Lesson files: TOML into [`Lesson`], every unknown key and every word outside the fixed
//! vocabularies an error naming its line (`LINE: problem`; the caller adds the file).

use super::{
    Action, AlertKind, Check, Lesson, Look, Measure, PlaygroundCoeff, PlaygroundSetup, Press, Setup, Step, Value,
};
use crate::app::state::Tab;
use crate::config::{Coeff, Lockable, Prior, RunConfig};
use crate::train::protocol::Hyper;
use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLesson {
    title: String,
    #[serde(default)]
    summary: String,
    step: Vec<Spanned<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    text: String,
    #[serde(default)]
    setup: Option<RawSetup>,
    #[serde(default)]
    look: Option<Spanned<String>>,
    #[serde(default)]
    action: Option<Spanned<RawAction>>,
    #[serde(default)]
    check: Option<Spanned<RawCheck>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSetup {
    #[serde(default)]
    playground: Option<Spanned<RawPlayground>>,
    #[serde(default)]
    run: Option<Spanned<toml::Table>>,
    #[serde(default)]
    start: bool,
    #[serde(default)]
    pause_at: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlayground {
    prior: Option<String>,
    kappa: Option<f64>,
    c: Option<f64>,
    eps: Option<f64>,
    tau: Option<f64>,
    gamma: Option<f64>,
    image: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    set: Option<String>,
    to: Option<f64>,
    lock: Option<String>,
    press: Option<String>,
    tab: Option<String>,
    open_image: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    value: Option<String>,
    min: Option<f64>,
    max: Option<f64>,
    tab: Option<String>,
    step: Option<u64>,
    status: Option<String>,
    locked: Option<String>,
    alert: Option<String>,
}

/// A problem at a byte offset of the text, as `LINE: problem`.
fn at(text: &str, offset: usize, problem: impl std::fmt::Display) -> String {
    let line = text[..offset.min(text.len())].matches('\n').count() + 1;
    format!("{line}: {problem}")
}

fn one_of<T: Copy>(word: &str, what: &str, vocabulary: &[(T, &str)]) -> Result<T, String> {
    vocabulary
        .iter()
        .find(|(_, n)| *n == word)
        .map(|(v, _)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = vocabulary.iter().map(|(_, n)| *n).collect();
            format!("unknown {what} '{word}' (one of: {})", names.join(", "))
        })
}

fn tab(word: &str) -> Result<Tab, String> {
    let tabs: Vec<(Tab, String)> = Tab::ALL.iter().map(|t| (*t, t.label().to_lowercase())).collect();
    let tabs: Vec<(Tab, &str)> = tabs.iter().map(|(t, n)| (*t, n.as_str())).collect();
    one_of(word, "view", &tabs)
}

fn value(word: &str) -> Result<Value, String> {
    let mut names: Vec<(Value, String)> = PlaygroundCoeff::ALL
        .iter()
        .map(|c| (Value::Playground(*c), format!("playground.{}", c.name())))
        .collect();
    names.extend(
        Coeff::ALL
            .iter()
            .map(|c| (Value::RunCoeff(*c), format!("run.{}", c.name()))),
    );
    names.extend(
        [
            Hyper::Tau,
            Hyper::Gamma,
            Hyper::RouteWeight,
            Hyper::Temperature,
            Hyper::Lr,
        ]
        .iter()
        .map(|h| (Value::RunHyper(*h), format!("run.{}", h.name()))),
    );
    names.extend(Measure::ALL.iter().map(|(m, n)| (Value::Measured(*m), (*n).to_owned())));
    let names: Vec<(Value, &str)> = names.iter().map(|(v, n)| (*v, n.as_str())).collect();
    one_of(word, "value", &names)
}

fn lockable(word: &str) -> Result<Lockable, String> {
    let names: Vec<(Lockable, &str)> = Lockable::ALL.iter().map(|l| (*l, l.name())).collect();
    one_of(word, "lockable tensor", &names)
}

/// `Err(message)` unless exactly one of `given` holds.
fn exactly_one(given: &[bool], message: &str) -> Result<(), String> {
    if given.iter().filter(|g| **g).count() == 1 {
        Ok(())
    } else {
        Err(message.into())
    }
}

fn action(raw: &RawAction) -> Result<Action, String> {
    exactly_one(
        &[
            raw.set.is_some(),
            raw.lock.is_some(),
            raw.press.is_some(),
            raw.tab.is_some(),
            raw.open_image.is_some(),
        ],
        "an action is exactly one of set (with to), lock, press, tab, open_image",
    )?;
    if raw.to.is_some() != raw.set.is_some() {
        return Err("`to` goes with `set` (and `set` needs `to`)".into());
    }
    if let (Some(v), Some(to)) = (&raw.set, raw.to) {
        let value = value(v)?;
        if matches!(value, Value::Measured(_)) {
            return Err(format!("{v} is measured by the run: a step can check it, not set it"));
        }
        value.range().check(to).map_err(|e| format!("set {v}: {e}"))?;
        return Ok(Action::Set(value, to));
    }
    if let Some(l) = &raw.lock {
        return Ok(Action::Lock(lockable(l)?));
    }
    if let Some(p) = &raw.press {
        return Ok(Action::Press(one_of(p, "button", &Press::ALL)?));
    }
    if let Some(t) = &raw.tab {
        return Ok(Action::Tab(tab(t)?));
    }
    match raw.open_image.as_deref() {
        Some("sample") => Ok(Action::OpenSample),
        other => Err(format!(
            "open_image: unknown image '{}' (one of: sample)",
            other.unwrap_or_default()
        )),
    }
}

fn check(raw: &RawCheck) -> Result<Check, String> {
    exactly_one(
        &[
            raw.value.is_some(),
            raw.tab.is_some(),
            raw.step.is_some(),
            raw.status.is_some(),
            raw.locked.is_some(),
            raw.alert.is_some(),
        ],
        "a check is exactly one of value (with min and/or max), tab, step, status, locked, alert",
    )?;
    if raw.value.is_none() && (raw.min.is_some() || raw.max.is_some()) {
        return Err("`min` and `max` go with `value`".into());
    }
    if let Some(v) = &raw.value {
        let (lo, hi) = (raw.min.unwrap_or(f64::NEG_INFINITY), raw.max.unwrap_or(f64::INFINITY));
        if raw.min.is_none() && raw.max.is_none() {
            return Err(format!("value {v}: give min, max or both"));
        }
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(format!("value {v}: min {lo} is above max {hi}"));
        }
        return Ok(Check::InRange(value(v)?, lo, hi));
    }
    if let Some(t) = &raw.tab {
        return Ok(Check::Tab(tab(t)?));
    }
    if let Some(n) = raw.step {
        return Ok(Check::Step(n));
    }
    if let Some(s) = &raw.status {
        return Ok(Check::State(one_of(
            s,
            "status",
            &crate::train::protocol::RunStatus::LESSON_NAMES,
        )?));
    }
    if let Some(l) = &raw.locked {
        return Ok(Check::Locked(lockable(l)?));
    }
    let a = raw.alert.as_deref().unwrap_or_default();
    Ok(Check::Alert(one_of(a, "alert", &AlertKind::ALL)?))
}

fn playground(raw: &RawPlayground) -> Result<PlaygroundSetup, String> {
    let prior = raw
        .prior
        .as_deref()
        .map(|p| p.parse::<Prior>().map_err(|e| e.to_string()))
        .transpose()?;
    for (c, v) in PlaygroundCoeff::ALL
        .into_iter()
        .zip([raw.kappa, raw.c, raw.eps, raw.tau, raw.gamma])
    {
        if let Some(v) = v {
            c.range().check(v).map_err(|e| format!("playground {e}"))?;
        }
    }
    let sample = match raw.image.as_deref() {
        None => false,
        Some("sample") => true,
        Some(other) => return Err(format!("playground image: unknown image '{other}' (one of: sample)")),
    };
    Ok(PlaygroundSetup {
        prior,
        kappa: raw.kappa,
        c: raw.c,
        eps: raw.eps,
        tau: raw.tau,
        gamma: raw.gamma,
        sample,
    })
}

/// A run table: the built-in default with these keys over it (the run config's own checks).
fn run(table: &toml::Table) -> Result<RunConfig, String> {
    let text = toml::to_string(table).map_err(|e| e.to_string())?;
    let cfg = RunConfig::from_toml(&text)?;
    cfg.validate()?;
    Ok(cfg)
}

/// Parses the lesson `name` from `text`.
///
/// # Errors
/// `LINE: problem` for the first problem found.
pub fn parse(name: &str, text: &str) -> Result<Lesson, String> {
    let raw: RawLesson = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        at(text, offset, e.message().trim())
    })?;
    if raw.step.is_empty() {
        return Err("1: a lesson needs at least one [[step]]".into());
    }
    let mut steps = Vec::new();
    for s in &raw.step {
        let span = s.span();
        let s = s.get_ref();
        if s.text.trim().is_empty() {
            return Err(at(text, span.start, "a step needs text"));
        }
        let mut step = Step {
            text: s.text.trim().to_owned(),
            ..Step::default()
        };
        if let Some(setup) = &s.setup {
            step.setup = Setup {
                playground: setup
                    .playground
                    .as_ref()
                    .map(|p| playground(p.get_ref()).map_err(|e| at(text, p.span().start, e)))
                    .transpose()?,
                run: setup
                    .run
                    .as_ref()
                    .map(|r| run(r.get_ref()).map_err(|e| at(text, r.span().start, format!("setup.run: {e}"))))
                    .transpose()?,
                start: setup.start,
                pause_at: setup.pause_at,
            };
        }
        if let Some(l) = &s.look {
            step.look = Some(if l.get_ref() == "live" {
                Look::Live
            } else {
                Look::Tab(tab(l.get_ref()).map_err(|e| at(text, l.span().start, format!("look: {e} or live")))?)
            });
        }
        if let Some(a) = &s.action {
            step.action = Some(action(a.get_ref()).map_err(|e| at(text, a.span().start, e))?);
        }
        step.check = match &s.check {
            Some(c) => Some(check(c.get_ref()).map_err(|e| at(text, c.span().start, e))?),
            None => step.action.as_ref().and_then(Action::implied_check),
        };
        steps.push(step);
    }
    Ok(Lesson {
        name: name.to_owned(),
        title: raw.title,
        summary: raw.summary,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lesson_parses_with_implied_checks() -> Result<(), String> {
        let l = parse(
            "t",
            r#"title = "T"
[[step]]
text = "Look."
look = "live"
[[step]]
text = "Move it."
action = { set = "playground.kappa", to = 40.0 }
[step.setup.playground]
prior = "heat"
image = "sample"
[[step]]
text = "Run."
action = { press = "start" }
check = { step = 20 }
[step.setup]
run = { steps = 30, route_weight = 0.0 }
pause_at = 25
"#,
        )?;
        assert_eq!(l.steps.len(), 3);
        assert_eq!(l.steps[0].look, Some(Look::Live));
        assert_eq!(l.steps[0].check, None);
        assert_eq!(
            l.steps[1].check,
            Some(Check::InRange(Value::Playground(PlaygroundCoeff::Kappa), 36.0, 44.0))
        );
        assert!(
            l.steps[1]
                .setup
                .playground
                .as_ref()
                .is_some_and(|p| p.sample && p.prior == Some(Prior::Heat))
        );
        let run = l.steps[2].setup.run.as_ref().ok_or("step 3 sets up a run")?;
        assert_eq!((run.steps, run.method.route_weight), (Some(30), 0.0));
        assert_eq!(l.steps[2].setup.pause_at, Some(25));
        assert_eq!(l.steps[2].check, Some(Check::Step(20)));
        Ok(())
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "title = \"T\"\n[[step]]\ntext = \"a\"\nlook = \"settings\"\n",
                "4: look: unknown view 'settings'",
            ),
            (
                "title = \"T\"\n[[step]]\ntext = \"a\"\ncolour = 1\n",
                "4: unknown field `colour`",
            ),
            (
                "title = \"T\"\n[[step]]\ntext = \"a\"\n\naction = { set = \"run.kappa\" }\n",
                "5: `to` goes with `set`",
            ),
            (
                "title = \"T\"\n[[step]]\ntext = \"a\"\ncheck = { status = \"flying\" }\n",
                "4: unknown status 'flying'",
            ),
            (
                "title = \"T\"\n[[step]]\ntext = \"a\"\n[step.setup]\nrun = { rank = 0 }\n",
                "5: setup.run:",
            ),
            ("title = \"T\"\n", "missing field `step`"),
            (
                "title = \"T\"\n[[step]]\ntext = \"a\"\naction = { set = \"run.kappa\", to = 1e39 }\n",
                "4: set run.kappa: kappa = 1e39 is outside its range [1e-8, 1e8]",
            ),
            (
                "title = \"T\"\n[[step]]\ntext = \"a\"\n[step.setup]\nplayground = { eps = 1e-50 }\n",
                "eps = 1e-50 is outside its range [1e-8, 1e8]",
            ),
        ];
        for (text, want) in cases {
            let e = parse("t", text).unwrap_err();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
    }

    #[test]
    fn every_built_in_lesson_parses() {
        for (name, text) in super::super::BUILT_IN {
            let l = parse(name, text).unwrap_or_else(|e| panic!("{name}.toml:{e}"));
            assert!((3..=6).contains(&l.steps.len()), "{name}: {} steps", l.steps.len());
        }
    }
}
