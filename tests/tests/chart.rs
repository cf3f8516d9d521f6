//! The Helm chart checks, in the test suite: `scripts/check-chart.py` renders and lints
//! charts/ballast with Helm's own engine (helm-python-sdk, which embeds Helm's Go SDK), validates
//! every object strictly against Kubernetes' OpenAPI schemas (kubernetes-validate), and asserts
//! that the objects fit together. The negative tests show the checker fails when it should: on
//! values that break values.schema.json, and on a chart whose node plugin lost its mount
//! propagation or whose StorageClass names another driver.
//!
//! The interpreter is the virtual environment made by scripts/install-prerequisites.sh
//! (`~/.cache/ballast/venv`), or `$BALLAST_PYTHON`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ballast_tests::repository_root;

/// The checker's interpreter, or None (skip) when it is not installed outside CI.
fn python() -> Option<PathBuf> {
    let interpreter = match std::env::var_os("BALLAST_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/ballast/venv/bin/python3")
        }
    };
    let usable = Command::new(&interpreter)
        .args(["-c", "import helm_python, kubernetes_validate"])
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false);
    if usable {
        return Some(interpreter);
    }
    let message = format!(
        "{} cannot import helm_python and kubernetes_validate (run scripts/install-prerequisites.sh)",
        interpreter.display()
    );
    if std::env::var("CI")
        .map(|value| value == "true")
        .unwrap_or(false)
    {
        panic!("chart checks in CI: {message}");
    }
    eprintln!("SKIPPED: {message}");
    None
}

fn check_chart(python: &Path, arguments: &[&str]) -> (Output, String) {
    let output = Command::new(python)
        .arg(repository_root().join("scripts/check-chart.py"))
        .args(arguments)
        .output()
        .expect("running scripts/check-chart.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, text)
}

fn copy_directory(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_directory(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A copy of the chart with `edit` applied to one template; the edit must change something.
fn broken_chart(template: &str, edit: impl Fn(&str) -> String) -> tempfile::TempDir {
    let directory = tempfile::Builder::new()
        .prefix("ballast-chart-")
        .tempdir()
        .unwrap();
    let chart = directory.path().join("ballast");
    copy_directory(&repository_root().join("charts/ballast"), &chart);
    let path = chart.join("templates").join(template);
    let original = std::fs::read_to_string(&path).unwrap();
    let edited = edit(&original);
    assert_ne!(original, edited, "the edit of {template} changed nothing");
    std::fs::write(&path, edited).unwrap();
    directory
}

#[test]
fn chart_renders_lints_and_validates() {
    let Some(python) = python() else { return };
    let (output, text) = check_chart(&python, &[]);
    println!("{text}");
    assert!(output.status.success(), "chart checks failed:\n{text}");
    assert!(text.contains("failed: 0"), "{text}");
    // Every step ran for the default values and for every file in ci/.
    let mut labels = vec!["default values".to_owned()];
    for entry in std::fs::read_dir(repository_root().join("charts/ballast/ci")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") {
            labels.push(format!("charts/ballast/ci/{name}"));
        }
    }
    assert!(
        labels.len() >= 4,
        "expected several non-default values files: {labels:?}"
    );
    for label in &labels {
        for step in ["lint", "render", "validate", "assert"] {
            let line = format!("ok   {step} ({label})");
            assert!(text.contains(&line), "missing `{line}` in:\n{text}");
        }
    }
    for negative in [
        "ok   schema refuses device type outside its enum",
        "ok   templates refuse two default StorageClasses",
        "ok   strict validation refuses an unknown field",
        "ok   example charts/ballast/examples/mariadb.yaml",
    ] {
        assert!(text.contains(negative), "missing `{negative}` in:\n{text}");
    }
}

#[test]
fn chart_checks_fail_on_values_that_break_the_schema() {
    let Some(python) = python() else { return };
    let directory = tempfile::tempdir().unwrap();
    let values = directory.path().join("invalid.yaml");
    std::fs::write(
        &values,
        "storage:\n  device:\n    type: nvme\n  port: \"7400\"\n",
    )
    .unwrap();
    let (output, text) = check_chart(&python, &["--values", values.to_str().unwrap()]);
    assert!(
        !output.status.success(),
        "invalid values passed the checks:\n{text}"
    );
    assert!(text.contains("FAIL render"), "{text}");
    assert!(
        text.contains("value must be one of 'file', 'block'"),
        "{text}"
    );
    assert!(text.contains("/storage/port"), "{text}");
}

#[test]
fn chart_checks_fail_without_bidirectional_mount_propagation() {
    let Some(python) = python() else { return };
    let chart = broken_chart("csi-node.yaml", |text| {
        text.replace(
            "mountPropagation: Bidirectional",
            "mountPropagation: HostToContainer",
        )
    });
    let (output, text) = check_chart(
        &python,
        &["--chart", chart.path().join("ballast").to_str().unwrap()],
    );
    assert!(
        !output.status.success(),
        "a node plugin without Bidirectional propagation passed:\n{text}"
    );
    assert!(
        text.contains("FAIL assert (default values): the node plugin must mount the kubelet directory with Bidirectional propagation"),
        "{text}"
    );
}

#[test]
fn chart_checks_fail_when_a_storage_class_names_another_driver() {
    let Some(python) = python() else { return };
    let chart = broken_chart("storageclasses.yaml", |text| {
        text.replace(
            "provisioner: {{ include \"ballast.csiDriverName\" $ }}",
            "provisioner: ballast.example.com",
        )
    });
    let (output, text) = check_chart(
        &python,
        &["--chart", chart.path().join("ballast").to_str().unwrap()],
    );
    assert!(
        !output.status.success(),
        "a StorageClass with another provisioner passed:\n{text}"
    );
    assert!(
        text.contains("provisioner ballast.example.com is not csi.ballast.io"),
        "{text}"
    );
}
