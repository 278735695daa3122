//! The launch panel: backbone, data, method and optimisation settings, and the parameter count.

use super::{Action, RunStatus};
use crate::app::backbones::{BackbonePicker, Source};
use crate::config::{
    DEFAULT_STEPS, DeviceChoice, MethodKind, Placement, Precision, Prior, RouterKind, RunConfig, VitConfig,
    count_trainable,
};
use crate::train::backbone::cpu_bf16_capability;

/// What bf16 means for the next run, on this machine.
fn bf16_hint(gpu: bool) -> String {
    if gpu {
        return "On the GPU: bf16 weights and activations, f32 optimizer state".into();
    }
    let speed = cpu_bf16_capability();
    format!(
        "On the CPU: the transformer's products with its weights from bf16 operands (f32 sums, \
         weight gradients and optimizer; like torch.autocast); {speed}"
    )
}

/// Draws the launch settings.
pub fn ui(
    ui: &mut egui::Ui,
    cfg: &mut RunConfig,
    status: RunStatus,
    backbone: Option<&VitConfig>,
    picker: &mut BackbonePicker,
    classes: usize,
    cuda: bool,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let editable = matches!(
        status,
        RunStatus::None | RunStatus::Ready | RunStatus::Finished | RunStatus::Failed
    );
    ui.heading("Run");
    if !editable {
        ui.label("Settings apply to the next run (Reset).");
    }
    egui::CollapsingHeader::new("Backbone")
        .default_open(true)
        .show(ui, |ui| backbone_ui(ui, cfg, picker, classes, &mut actions));
    egui::CollapsingHeader::new("Data").default_open(true).show(ui, |ui| {
        let builtin = cfg.data == "builtin:digits";
        ui.horizontal(|ui| {
            if ui
                .selectable_label(builtin, "Built-in digits")
                .on_hover_text("OpenCV digits: 3000 / 1000 / 1000 images")
                .clicked()
            {
                cfg.data = "builtin:digits".into();
            }
            if ui
                .button("Folder…")
                .on_hover_text("ImageFolder or VTAB-1K split files")
                .clicked()
            {
                actions.push(Action::PickData);
            }
        });
        if !builtin {
            ui.label(egui::RichText::new(&cfg.data).monospace().small());
        }
        let mut few = cfg.few_shot.is_some();
        ui.horizontal(|ui| {
            if ui.checkbox(&mut few, "few-shot").changed() {
                cfg.few_shot = few.then_some(10);
            }
            if let Some(n) = &mut cfg.few_shot {
                ui.add(egui::DragValue::new(n).range(1..=10_000).suffix(" / class"));
            }
        });
    });
    egui::CollapsingHeader::new("Method").default_open(true).show(ui, |ui| {
        egui::ComboBox::from_label("method")
            .selected_text(cfg.method.method.name())
            .show_ui(ui, |ui| {
                for m in [
                    MethodKind::Moppa,
                    MethodKind::Lora,
                    MethodKind::Adaptformer,
                    MethodKind::Linear,
                    MethodKind::Full,
                ] {
                    ui.selectable_value(&mut cfg.method.method, m, m.name());
                }
            });
        let m = cfg.method.method;
        if matches!(m, MethodKind::Moppa | MethodKind::Lora | MethodKind::Adaptformer) {
            ui.add(egui::Slider::new(&mut cfg.method.rank, 1..=64).text("rank"));
        }
        if m == MethodKind::Moppa {
            egui::ComboBox::from_label("placement")
                .selected_text(match cfg.method.placement {
                    Placement::PreAttn => "pre_attn",
                    Placement::ParallelMlp => "parallel_mlp",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut cfg.method.placement, Placement::PreAttn, "pre_attn");
                    ui.selectable_value(&mut cfg.method.placement, Placement::ParallelMlp, "parallel_mlp");
                });
            egui::ComboBox::from_label("router")
                .selected_text(match cfg.method.router {
                    RouterKind::Token => "token",
                    RouterKind::Image => "image",
                    RouterKind::Layer => "layer",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut cfg.method.router, RouterKind::Token, "token");
                    ui.selectable_value(&mut cfg.method.router, RouterKind::Image, "image");
                    ui.selectable_value(&mut cfg.method.router, RouterKind::Layer, "layer");
                });
            ui.horizontal(|ui| {
                for p in Prior::ALL {
                    let mut on = cfg.method.priors.contains(&p);
                    if ui.checkbox(&mut on, p.name()).changed() {
                        if on {
                            cfg.method.priors.push(p);
                            cfg.method.priors.sort();
                        } else if cfg.method.priors.len() > 1 {
                            cfg.method.priors.retain(|q| *q != p);
                        }
                    }
                }
            });
            ui.add(
                egui::Slider::new(&mut cfg.method.route_weight, 0.0..=1.0)
                    .text("λ route")
                    .logarithmic(true)
                    .smallest_positive(1e-4),
            )
            .on_hover_text("L_route = λ · mean_l KL(mean α_l ‖ uniform)");
        }
    });
    egui::CollapsingHeader::new("Optimisation")
        .default_open(true)
        .show(ui, |ui| {
            egui::Grid::new("optim").num_columns(2).show(ui, |ui| {
                ui.label("batch");
                ui.add(egui::DragValue::new(&mut cfg.batch).range(1..=1024).prefix("batch "));
                ui.end_row();
                ui.label("learning rate");
                let mut lr = cfg.lr();
                if ui
                    .add(
                        egui::DragValue::new(&mut lr)
                            .range(1e-6..=1.0)
                            .speed(1e-4)
                            .prefix("lr "),
                    )
                    .changed()
                {
                    cfg.lr = Some(lr);
                }
                ui.end_row();
                ui.label("steps");
                let mut steps = cfg.steps.unwrap_or(DEFAULT_STEPS);
                if ui
                    .add(egui::DragValue::new(&mut steps).range(1..=1_000_000).prefix("steps "))
                    .changed()
                {
                    cfg.steps = Some(steps);
                }
                ui.end_row();
                ui.label("eval every");
                ui.add(
                    egui::DragValue::new(&mut cfg.eval_every)
                        .range(0..=100_000)
                        .prefix("every "),
                );
                ui.end_row();
                ui.label("seed");
                ui.add(egui::DragValue::new(&mut cfg.seed).prefix("seed "));
                ui.end_row();
                // The augmentation in force: the data's default until changed here.
                ui.label("augment");
                let before = cfg.augment();
                let mut a = before;
                ui.horizontal(|ui| {
                    ui.add(
                        egui::DragValue::new(&mut a.rotate_deg)
                            .range(0..=90)
                            .prefix("rotate ±")
                            .suffix("°"),
                    )
                    .on_hover_text(
                        "Random rotations while training. The built-in digits default to ±10° (chosen on \
                         validation accuracy), other data to none: a rotation can change an orientation \
                         task's label.",
                    );
                    ui.checkbox(&mut a.flip, "flip")
                        .on_hover_text("Random horizontal flips while training (not for digits or text)");
                });
                if a != before {
                    cfg.augment = Some(a);
                }
                ui.end_row();
                ui.label("precision");
                ui.horizontal(|ui| {
                    ui.selectable_value(&mut cfg.dtype, Precision::F32, "f32")
                        .on_hover_text("f32 everywhere (the reference numerics)");
                    ui.selectable_value(&mut cfg.dtype, Precision::Bf16, "bf16")
                        .on_hover_ui(|ui| {
                            // Built only while hovered, not every frame.
                            ui.label(bf16_hint(cuda && cfg.device != DeviceChoice::Cpu));
                        });
                });
                ui.end_row();
            });
            if cuda {
                ui.horizontal(|ui| {
                    ui.label("device");
                    ui.selectable_value(&mut cfg.device, DeviceChoice::Cpu, "CPU");
                    ui.selectable_value(&mut cfg.device, DeviceChoice::Cuda(0), "CUDA");
                });
            }
        });
    // Before a run: the chosen backbone's count; during one: the running backbone's.
    let chosen = picker
        .summary(&cfg.backbone, cfg.heads)
        .as_ref()
        .ok()
        .map(|s| s.cfg.clone());
    if let Some(b) = backbone.cloned().or(chosen).as_ref() {
        let n = count_trainable(b, &cfg.method, classes.max(1));
        ui.label(format!("{} trainable parameters", crate::util::group_digits(n)))
            .on_hover_text(format!(
                "{} on a {}-class head, D {}, depth {}",
                cfg.method.label(),
                classes,
                b.embed_dim,
                b.depth
            ));
    }
    ui.horizontal(|ui| {
        if ui.button("Load…").on_hover_text("Load run settings (TOML)").clicked() {
            actions.push(Action::LoadConfig);
        }
        if ui.button("Save…").on_hover_text("Save run settings (TOML)").clicked() {
            actions.push(Action::SaveConfig);
        }
    });
    actions
}

/// The backbone picker: Built-in / From the cache (searchable list) / Hub id (Download, progress,
/// Cancel) / File…, then what the chosen backbone is and each method's trainable parameters.
fn backbone_ui(
    ui: &mut egui::Ui,
    cfg: &mut RunConfig,
    picker: &mut BackbonePicker,
    classes: usize,
    actions: &mut Vec<Action>,
) {
    if picker.source == Source::Builtin && cfg.backbone != "builtin" {
        picker.source = Source::of(&cfg.backbone);
    }
    ui.horizontal_wrapped(|ui| {
        for (source, label, hover) in [
            (
                Source::Builtin,
                "Built-in",
                "ViT-tiny (32 px, D 96, 4 blocks) pretrained on Fashion-MNIST",
            ),
            (
                Source::Cache,
                "From the cache",
                "timm models already in the Hugging Face cache",
            ),
            (Source::Hub, "Hub id", "Download a timm model by its Hugging Face id"),
        ] {
            if ui
                .selectable_label(picker.source == source, label)
                .on_hover_text(hover)
                .clicked()
            {
                picker.source = source;
                if source == Source::Builtin {
                    cfg.backbone = "builtin".into();
                }
            }
        }
        if ui
            .selectable_label(picker.source == Source::File, "File…")
            .on_hover_text("A timm ViT checkpoint (.safetensors; its config.json beside it is read)")
            .clicked()
        {
            picker.source = Source::File;
            actions.push(Action::PickBackbone);
        }
    });
    match picker.source {
        Source::Builtin => {}
        Source::Cache => cache_list(ui, cfg, picker),
        Source::Hub => hub_field(ui, picker, actions),
        Source::File => {
            ui.label(egui::RichText::new(&cfg.backbone).monospace().small());
        }
    }
    if cfg.backbone != "builtin" {
        let mut heads = cfg.heads.unwrap_or(0);
        ui.horizontal(|ui| {
            ui.label("heads");
            if ui
                .add(egui::DragValue::new(&mut heads).range(0..=64).prefix("heads "))
                .on_hover_text("0: from config.json, else D/64 (safetensors files do not record it)")
                .changed()
            {
                cfg.heads = (heads > 0).then_some(heads);
            }
        });
    }
    summary_ui(ui, cfg, picker, classes);
}

fn cache_list(ui: &mut egui::Ui, cfg: &mut RunConfig, picker: &mut BackbonePicker) {
    ui.horizontal(|ui| {
        ui.add(
            egui::TextEdit::singleline(&mut picker.search)
                .hint_text("search")
                .desired_width(150.0),
        );
        if ui
            .small_button("Refresh")
            .on_hover_text("List the cache again")
            .clicked()
        {
            picker.refresh();
        }
    });
    let search = picker.search.to_lowercase();
    let cache = picker.hub.cache.clone();
    let models = picker.cached().to_vec();
    let shown: Vec<_> = models
        .iter()
        .filter(|m| {
            search.is_empty() || m.spec.to_lowercase().contains(&search) || m.family.to_lowercase().contains(&search)
        })
        .collect();
    if models.is_empty() {
        ui.label(
            egui::RichText::new(format!(
                "No model in {} yet: use Hub id to download one.",
                cache.display()
            ))
            .small(),
        );
        return;
    }
    egui::ScrollArea::vertical()
        .max_height(180.0)
        .id_salt("cached backbones")
        .show(ui, |ui| {
            for m in shown {
                let name = m.spec.trim_start_matches("hf:");
                let size = crate::config::human_bytes(m.bytes as f64);
                match &m.summary {
                    Ok(s) => {
                        let line = format!(
                            "{} · {} · {} px/{} · {}",
                            m.family,
                            crate::util::group_digits(s.params),
                            s.cfg.img_size,
                            s.cfg.patch_size,
                            size
                        );
                        let selected = cfg.backbone == m.spec;
                        let r = ui.selectable_label(selected, egui::RichText::new(format!("{name}\n{line}")).small());
                        if r.clicked() {
                            cfg.backbone.clone_from(&m.spec);
                        }
                    }
                    Err(why) => {
                        ui.label(
                            egui::RichText::new(format!("{name}\n{} · {size} · does not load", m.family))
                                .small()
                                .weak(),
                        )
                        .on_hover_text(why);
                    }
                }
            }
        });
}

fn hub_field(ui: &mut egui::Ui, picker: &mut BackbonePicker, actions: &mut Vec<Action>) {
    ui.add(
        egui::TextEdit::singleline(&mut picker.hub_id)
            .hint_text("hf:timm/vit_base_patch16_224.mae")
            .desired_width(f32::INFINITY),
    );
    if let Some(d) = &picker.download {
        let s = d.snapshot();
        let frac = if s.total > 0 {
            s.done as f32 / s.total as f32
        } else {
            0.0
        };
        ui.add(egui::ProgressBar::new(frac).text(format!(
            "{} {} / {}",
            s.file,
            crate::config::human_bytes(s.done as f64),
            crate::config::human_bytes(s.total as f64)
        )));
        if ui
            .button("Cancel")
            .on_hover_text("Stop; the part downloaded is kept and resumes next time")
            .clicked()
        {
            d.cancel();
        }
    } else if ui
        .button("Download")
        .on_hover_text("Into the Hugging Face cache (model.safetensors and config.json), then use it")
        .clicked()
    {
        actions.push(Action::DownloadBackbone(picker.hub_id.trim().to_owned()));
    }
    if let Some(m) = &picker.message {
        ui.colored_label(ui.visuals().error_fg_color, egui::RichText::new(m).small());
    }
}

/// What the chosen backbone is, what loading it assumes, and each method's trainable parameters.
fn summary_ui(ui: &mut egui::Ui, cfg: &RunConfig, picker: &mut BackbonePicker, classes: usize) {
    if cfg.backbone == "builtin" && picker.source == Source::Builtin {
        return;
    }
    match picker.summary(&cfg.backbone, cfg.heads) {
        Ok(s) => {
            let g = s.cfg.grid();
            ui.label(
                egui::RichText::new(format!(
                    "{} · {} parameters · {} px, patch {}, {g}×{g} tokens · D {}, depth {}, {} heads",
                    s.family,
                    crate::util::group_digits(s.params),
                    s.cfg.img_size,
                    s.cfg.patch_size,
                    s.cfg.embed_dim,
                    s.cfg.depth,
                    s.cfg.num_heads
                ))
                .small(),
            );
            if !s.assumed.is_empty() {
                ui.colored_label(
                    ui.visuals().warn_fg_color,
                    egui::RichText::new(format!("No config.json: assumed {}", s.assumed.join(", "))).small(),
                );
            }
            let cfg_b = s.cfg.clone();
            egui::Grid::new("trainable per method").num_columns(2).show(ui, |ui| {
                // One row per method (the catalogue's first entry of each kind, at this rank).
                let mut seen = Vec::new();
                for m in crate::config::METHOD_CATALOGUE.iter().map(|m| m.config(&cfg.method)) {
                    if seen.contains(&m.method) {
                        continue;
                    }
                    seen.push(m.method);
                    ui.label(egui::RichText::new(m.label()).small());
                    ui.label(
                        egui::RichText::new(crate::util::group_digits(count_trainable(&cfg_b, &m, classes.max(1))))
                            .small(),
                    );
                    ui.end_row();
                }
            });
        }
        Err(e) => {
            ui.colored_label(ui.visuals().error_fg_color, egui::RichText::new(e.clone()).small());
        }
    }
}

/// Keys of a run's configuration not worth a line in its summary (the folder is named above;
/// the sha and revision are for resuming).
const NOT_SHOWN: [&str; 4] = ["out", "resume", "backbone_sha256", "backbone_revision"];

/// A configuration value in a few characters.
fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => a.iter().map(value_text).collect::<Vec<_>>().join(", "),
        serde_json::Value::Object(o) => o
            .iter()
            .filter(|(_, v)| !matches!(v, serde_json::Value::Null | serde_json::Value::Bool(false)))
            .filter(|(_, v)| v.as_f64() != Some(0.0))
            .map(|(k, v)| format!("{k} {}", value_text(v)))
            .reduce(|a, b| format!("{a}, {b}"))
            .unwrap_or_else(|| "none".into()),
        other => other.to_string(),
    }
}

/// The settings of a run that has started (or was written elsewhere), read-only: a run's
/// settings cannot change once it trains. `New run from these settings` copies them to a new
/// run of this app's, where they can be edited.
pub fn summary(ui: &mut egui::Ui, name: &str, config: &serde_json::Value, copyable: bool) -> Vec<Action> {
    let mut actions = Vec::new();
    ui.heading("Run");
    ui.label(egui::RichText::new(name).strong());
    ui.label(egui::RichText::new("Its settings (read-only: the run has started)").small());
    if ui
        .add_enabled(copyable, egui::Button::new("New run from these settings"))
        .on_hover_text("A new run of this app's with these settings, to edit and start (this app's run in training stops, as with Reset)")
        .on_disabled_hover_text("This run's settings are not a fine-tuning run's")
        .clicked()
    {
        actions.push(Action::NewRunFrom);
    }
    let Some(obj) = config.as_object() else {
        ui.label("(its settings are not known yet)");
        return actions;
    };
    egui::Grid::new("run-settings")
        .num_columns(2)
        .striped(true)
        .show(ui, |ui| {
            for (k, v) in obj {
                if NOT_SHOWN.contains(&k.as_str()) || v.is_null() || k.ends_with("_given") {
                    continue;
                }
                // A path recorded absolute is shown as it was given.
                let given = obj.get(&format!("{k}_given")).filter(|g| g.is_string());
                ui.label(k);
                let text = value_text(given.unwrap_or(v));
                let r = ui.label(egui::RichText::new(&text).monospace());
                if given.is_some() {
                    r.on_hover_text(value_text(v));
                }
                ui.end_row();
            }
        });
    actions
}
