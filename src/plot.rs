//! Loss curves as SVG: the metrics JSON lines that `train` writes (`{"step", "loss", ...}` every
//! log interval, `{"step", "val_loss", "train_loss"}` at each evaluation) drawn as one panel per
//! run, side by side on a shared loss axis so runs compare at a glance. A small self-written SVG
//! writer: lines, dots, axes with ticks, a legend.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::files;

/// The curves of one run: (step, loss) of the training steps logged and of the evaluations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curves {
    pub name: String,
    pub train: Vec<(f64, f64)>,
    pub val: Vec<(f64, f64)>,
}

impl Curves {
    pub fn new(name: impl Into<String>) -> Curves {
        Curves {
            name: name.into(),
            ..Curves::default()
        }
    }

    /// Adds one metrics record; records of other kinds (and non-finite losses) are passed over.
    /// Returns whether the record held a step.
    pub fn add(&mut self, v: &Value) -> bool {
        let Some(step) = v
            .get("step")
            .and_then(Value::as_f64)
            .filter(|s| s.is_finite())
        else {
            return false;
        };
        let finite = |k: &str| v.get(k).and_then(Value::as_f64).filter(|x| x.is_finite());
        if let Some(l) = finite("loss") {
            self.train.push((step, l));
        }
        if let Some(l) = finite("val_loss") {
            self.val.push((step, l));
        }
        true
    }

    /// Reads a metrics file; a line that is not a JSON object with a step is an error naming
    /// the file and line.
    pub fn read(path: &Path) -> Result<Curves> {
        let text = files::read(path, files::Kind::Metrics)?;
        let name = path
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().to_string());
        let mut c = Curves::new(name);
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |m: &str| Error::invalid(format!("{}:{}", path.display(), i + 1), m);
            let v: Value =
                serde_json::from_str(line).map_err(|e| bad(&format!("not JSON: {e}")))?;
            if !c.add(&v) {
                return Err(bad("a metrics record needs a numeric \"step\""));
            }
        }
        if c.train.is_empty() && c.val.is_empty() {
            return Err(Error::invalid(
                path.display().to_string(),
                "holds no loss records",
            ));
        }
        Ok(c)
    }
}

const PANEL_W: f64 = 420.0;
const PANEL_H: f64 = 300.0;
const LEFT: f64 = 56.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 44.0;
const GAP: f64 = 24.0;
const TRAIN_COLOR: &str = "#1f77b4";
const VAL_COLOR: &str = "#ff7f0e";

/// About five round tick values covering [lo, hi]: never more than eight, whatever the values
/// (each is computed from its index, so a step below the values' resolution cannot loop).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return vec![lo];
    }
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil();
    let mut out: Vec<f64> = (0..8)
        .map(|i| (first + i as f64) * step)
        .filter(|t| *t <= hi + step * 1e-9)
        .collect();
    out.dedup();
    out
}

/// Values beyond this magnitude (a diverged run's losses, a hand-made step) are drawn at the
/// edge of their axis, which says so.
pub const CLIP: f64 = 1e15;

/// Count of the values beyond `CLIP`.
fn clipped(values: impl Iterator<Item = f64>) -> usize {
    values.filter(|x| x.abs() > CLIP).count()
}

/// A tick's label: plain for everyday numbers (with `decimals` where given), in exponent form
/// for huge ones.
fn label(t: f64, decimals: Option<usize>) -> String {
    match decimals {
        _ if t.abs() >= 1e6 => format!("{t:.2e}"),
        Some(d) => format!("{t:.d$}"),
        None => format!("{t}"),
    }
}

/// The range of `values` clipped to ±`CLIP`, widened around a single value.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .map(|x| x.clamp(-CLIP, CLIP))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let magnitude = lo.abs().max(hi.abs());
    if hi - lo < 1e-9 + magnitude * 1e-12 {
        let pad = 0.5f64.max(magnitude * 1e-3);
        (lo - pad, hi + pad)
    } else {
        (lo, hi)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG of `runs`, one panel each, side by side, sharing the loss axis.
pub fn svg(runs: &[Curves]) -> String {
    let (lo, hi) = range(
        runs.iter()
            .flat_map(|r| r.train.iter().chain(&r.val).map(|p| p.1)),
    );
    let pad = (hi - lo) * 0.05;
    let (lo, hi) = (lo - pad, hi + pad);
    let width = runs.len().max(1) as f64 * (LEFT + PANEL_W + GAP) + GAP;
    let height = TOP + PANEL_H + BOTTOM;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{width:.0}" height="{height:.0}" fill="white"/>"#
    );
    for (k, run) in runs.iter().enumerate() {
        let x0 = GAP + k as f64 * (LEFT + PANEL_W + GAP) + LEFT;
        let (smin, smax) = range(run.train.iter().chain(&run.val).map(|p| p.0));
        let panel = Panel {
            x0,
            steps: (smin, smax),
            losses: (lo, hi),
            clipped: clipped(run.train.iter().chain(&run.val).flat_map(|p| [p.0, p.1])),
        };
        panel.draw(&mut s, run);
    }
    s.push_str("</svg>\n");
    s
}

/// One run's panel: its left edge `x0`, and the step and loss ranges its axes span.
struct Panel {
    x0: f64,
    steps: (f64, f64),
    losses: (f64, f64),
    /// How many of the run's steps and losses lie beyond `CLIP`.
    clipped: usize,
}

impl Panel {
    /// The x coordinate of `step`.
    fn px(&self, step: f64) -> f64 {
        let (smin, smax) = self.steps;
        self.x0 + (step.clamp(-CLIP, CLIP) - smin) / (smax - smin) * PANEL_W
    }

    /// The y coordinate of `loss`.
    fn py(&self, loss: f64) -> f64 {
        let (lo, hi) = self.losses;
        TOP + (hi - loss.clamp(-CLIP, CLIP)) / (hi - lo) * PANEL_H
    }

    /// Appends the panel's group: title, frame, axes, curves and legend.
    fn draw(&self, s: &mut String, run: &Curves) {
        let x0 = self.x0;
        let _ = writeln!(
            s,
            r#"<g class="panel"><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
            x0 + PANEL_W / 2.0,
            TOP - 20.0,
            escape(&run.name)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{TOP:.1}" width="{PANEL_W:.1}" height="{PANEL_H:.1}" fill="none" stroke="#888"/>"##
        );
        self.axes(s);
        for (class, points, color) in [
            ("train", &run.train, TRAIN_COLOR),
            ("val", &run.val, VAL_COLOR),
        ] {
            self.curve(s, class, points, color);
        }
        self.legend(s);
        s.push_str("</g>\n");
    }

    /// Ticks on the loss axis (left) and the step axis (below), and the step axis's label.
    fn axes(&self, s: &mut String) {
        let x0 = self.x0;
        let (lo, hi) = self.losses;
        for t in ticks(lo, hi) {
            let y = self.py(t);
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{x0:.1}" y2="{y:.1}" stroke="#888"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                x0 - 4.0,
                x0 - 6.0,
                y + 4.0,
                label(t, Some(3))
            );
        }
        let (smin, smax) = self.steps;
        for t in ticks(smin, smax) {
            let x = self.px(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#888"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + PANEL_H,
                TOP + PANEL_H + 4.0,
                TOP + PANEL_H + 16.0,
                label(t, None)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"#,
            x0 + PANEL_W / 2.0,
            TOP + PANEL_H + 34.0
        );
        if self.clipped > 0 {
            let _ = writeln!(
                s,
                r#"<text class="clipped" x="{:.1}" y="{:.1}">{} values beyond ±{CLIP:e} drawn at the axis edge (clipped)</text>"#,
                x0 + 4.0,
                TOP + 12.0,
                self.clipped
            );
        }
    }

    /// One curve as a polyline, with a dot at each point of the validation curve.
    fn curve(&self, s: &mut String, class: &str, points: &[(f64, f64)], color: &str) {
        if points.is_empty() {
            return;
        }
        let pts: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", self.px(x), self.py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline class="{class}" fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            pts.join(" ")
        );
        if class == "val" {
            for p in &pts {
                let (x, y) = p.split_once(',').unwrap();
                let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="2.5" fill="{color}"/>"#);
            }
        }
    }

    /// The legend, in the panel's top right corner.
    fn legend(&self, s: &mut String) {
        for (i, (label, color)) in [("train loss", TRAIN_COLOR), ("val loss", VAL_COLOR)]
            .iter()
            .enumerate()
        {
            let (lx, ly) = (self.x0 + PANEL_W - 90.0, TOP + 14.0 + 14.0 * i as f64);
            let _ = writeln!(
                s,
                r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{ly:.1}">{label}</text>"#,
                ly - 4.0,
                lx + 16.0,
                ly - 4.0,
                lx + 20.0
            );
        }
    }
}

/// Writes `text` to `path` atomically: a sibling temporary file renamed over it, so a reader (or
/// a crash) never sees half a picture. A symbolic link is written through to its target; what is
/// neither absent nor a regular file is refused (see `files::check_output`).
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    files::check_output(path, &path.display().to_string(), &[])?;
    let path = files::write_target(path);
    let name = path
        .file_name()
        .map_or("plot.svg".into(), |n| n.to_string_lossy().to_string());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let written = std::fs::write(&tmp, text)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|_| std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
