//! Loss pictures: `shaderformer plot` over the committed metrics of two short runs
//! (assets/metrics, made by scripts/make_metrics.sh), and the loss.svg that `train` keeps in its
//! output directory.

use std::path::{Path, PathBuf};

use shaderformer::gpu::test_gpu;
use shaderformer::plot::Curves;

mod common;
use common::bin;

fn metrics(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/metrics")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("plot", name)
}

/// The points of every `<polyline class="CLASS">`, in drawing order, one list per polyline.
fn polylines(svg: &str, class: &str) -> Vec<Vec<(f64, f64)>> {
    let tag = format!(r#"<polyline class="{class}""#);
    svg.match_indices(&tag)
        .map(|(i, _)| {
            let rest = &svg[i..];
            let start = rest.find("points=\"").unwrap() + 8;
            let end = start + rest[start..].find('"').unwrap();
            rest[start..end]
                .split(' ')
                .map(|p| {
                    let (x, y) = p.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect()
        })
        .collect()
}

#[test]
fn metrics_files_read_into_train_and_val_curves() {
    let c = Curves::read(&metrics("addition-lr1e-3.jsonl")).unwrap();
    assert_eq!(c.name, "addition-lr1e-3");
    assert_eq!(c.train.len(), 30);
    assert_eq!(c.val.len(), 6);
    assert!(c.train.windows(2).all(|w| w[0].0 < w[1].0), "steps ascend");
    assert_eq!(c.val[0].0, 10.0);
    // The run learned: its last evaluation is well below its first.
    assert!(c.val[5].1 < c.val[0].1 - 0.3, "{:?}", c.val);
}

#[test]
fn plot_draws_runs_side_by_side_on_a_shared_loss_axis() {
    let dir = scratch("two");
    let out = dir.join("runs.svg");
    let (a, b) = (
        metrics("addition-lr1e-3.jsonl"),
        metrics("addition-lr3e-3.jsonl"),
    );
    let o = bin()
        .args(["plot", a.to_str().unwrap(), b.to_str().unwrap(), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches(r#"<g class="panel">"#).count(), 2);
    assert!(svg.contains("addition-lr1e-3") && svg.contains("addition-lr3e-3"));
    let (train, val) = (polylines(&svg, "train"), polylines(&svg, "val"));
    let (ca, cb) = (Curves::read(&a).unwrap(), Curves::read(&b).unwrap());
    assert_eq!(train.len(), 2);
    assert_eq!(val.len(), 2);
    assert_eq!(
        (train[0].len(), val[0].len()),
        (ca.train.len(), ca.val.len())
    );
    assert_eq!(
        (train[1].len(), val[1].len()),
        (cb.train.len(), cb.val.len())
    );
    // Side by side: the second panel lies entirely right of the first.
    let right_of_first = train[0].iter().map(|p| p.0).fold(f64::MIN, f64::max);
    let left_of_second = train[1].iter().map(|p| p.0).fold(f64::MAX, f64::min);
    assert!(right_of_first < left_of_second);
    // One loss axis: equal losses sit at equal heights in both panels, and a lower loss is
    // drawn lower (SVG's y grows downwards). Compare the runs' final evaluations.
    let (la, lb) = (ca.val.last().unwrap().1, cb.val.last().unwrap().1);
    let (ya, yb) = (val[0].last().unwrap().1, val[1].last().unwrap().1);
    assert_eq!(la < lb, ya > yb, "losses {la} {lb}, heights {ya} {yb}");
    // Within one curve: falling loss, falling line.
    assert!(val[0].last().unwrap().1 > val[0][0].1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_metrics_line_is_an_error_naming_file_and_line() {
    let dir = scratch("bad");
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"step\": 1, \"loss\": 2.0}\nnot json\n").unwrap();
    let o = bin()
        .args(["plot", bad.to_str().unwrap(), "--out"])
        .arg(dir.join("x.svg"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("bad.jsonl:2"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!dir.join("x.svg").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn train_keeps_loss_svg_in_its_output_directory() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("train");
    let out = dir.join("ckpt");
    let o = bin()
        .args([
            "train",
            "--n-layer",
            "1",
            "--n-embd",
            "32",
            "--n-head",
            "2",
            "--batch-size",
            "4",
            "--max-iters",
            "6",
            "--eval-interval",
            "3",
            "--eval-iters",
            "1",
            "--log-interval",
            "1",
            "--sample-tokens",
            "0",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    let (train, val) = (polylines(&svg, "train"), polylines(&svg, "val"));
    assert_eq!(train.len(), 1);
    assert_eq!(train[0].len(), 6, "every logged step");
    assert_eq!(val[0].len(), 2, "the evaluations at steps 3 and 6");
    assert!(!out.join(".loss.svg.tmp").exists());
    // The checkpoint beside it is whole.
    shaderformer::train::checkpoint::load(&out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
