//! The launch panel: backbone, data, method and optimisation settings, and the parameter count.

use super::{Action, RunStatus};
use crate::config::{
    DEFAULT_STEPS, DeviceChoice, MethodKind, Placement, Prior, RouterKind, RunConfig, VitConfig, count_trainable,
};

/// Draws the launch settings.
pub fn ui(
    ui: &mut egui::Ui,
    cfg: &mut RunConfig,
    status: RunStatus,
    backbone: Option<&VitConfig>,
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
        .show(ui, |ui| {
            let builtin = cfg.backbone == "builtin";
            ui.horizontal(|ui| {
                if ui
                    .selectable_label(builtin, "Built-in")
                    .on_hover_text("ViT-tiny (32 px, D 96, 4 blocks) pretrained on Fashion-MNIST")
                    .clicked()
                {
                    cfg.backbone = "builtin".into();
                }
                if ui
                    .button("File…")
                    .on_hover_text("A timm ViT checkpoint (.safetensors)")
                    .clicked()
                {
                    actions.push(Action::PickBackbone);
                }
            });
            if !builtin {
                ui.label(egui::RichText::new(&cfg.backbone).monospace().small());
                let mut heads = cfg.heads.unwrap_or(0);
                ui.horizontal(|ui| {
                    ui.label("heads");
                    if ui
                        .add(egui::DragValue::new(&mut heads).range(0..=64).prefix("heads "))
                        .on_hover_text("0: D/64 (timm files do not record it)")
                        .changed()
                    {
                        cfg.heads = (heads > 0).then_some(heads);
                    }
                });
            }
        });
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
            });
            if cuda {
                ui.horizontal(|ui| {
                    ui.label("device");
                    ui.selectable_value(&mut cfg.device, DeviceChoice::Cpu, "CPU");
                    ui.selectable_value(&mut cfg.device, DeviceChoice::Cuda(0), "CUDA");
                });
            }
        });
    if let Some(b) = backbone {
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
