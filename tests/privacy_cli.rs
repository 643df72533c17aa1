//! `fedveil privacy`, end to end through the real binary.

mod common;

use common::fedveil;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).expect("JSON")
}

const SANITY: [&str; 8] = [
    "--noise-multiplier",
    "1.1",
    "--sampling-rate",
    "0.01",
    "--steps",
    "1000",
    "--delta",
    "1e-5",
];

#[test]
fn epsilon_reports_the_key_epsilon_for_both_accountants() {
    let mut args = vec!["privacy", "epsilon"];
    args.extend(SANITY);
    args.extend(["--accountant", "rdp", "--json"]);
    let (code, out, err) = fedveil(&args);
    assert_eq!(code, 0, "{err}");
    let rdp = json(&out)["epsilon"].as_f64().unwrap();
    assert!((rdp - 1.71).abs() < 0.01, "{rdp}");
    let mut args = vec!["privacy", "epsilon"];
    args.extend(SANITY);
    args.push("--json");
    let (code, out, _) = fedveil(&args);
    assert_eq!(code, 0);
    let v = json(&out);
    assert_eq!(v["accountant"], "pld", "PLD is the default");
    let pld = v["epsilon"].as_f64().unwrap();
    assert!((pld - 1.52).abs() < 0.01, "{pld}");
    // Human output names the accountant.
    let mut args = vec!["privacy", "epsilon"];
    args.extend(SANITY);
    let (_, out, _) = fedveil(&args);
    assert!(out.starts_with("epsilon = 1.51"), "{out}");
}

#[test]
fn calibrate_returns_the_noise_multiplier_that_reaches_the_target() {
    let (code, out, err) = fedveil(&[
        "privacy",
        "calibrate",
        "--epsilon",
        "2",
        "--delta",
        "1e-5",
        "--sampling-rate",
        "0.01",
        "--steps",
        "1000",
        "--accountant",
        "rdp",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let sigma = v["noise_multiplier"].as_f64().unwrap();
    assert!(v["epsilon"].as_f64().unwrap() <= 2.0);
    // Feeding it back gives an epsilon at the target, from below.
    let s = sigma.to_string();
    let (_, out, _) = fedveil(&[
        "privacy",
        "epsilon",
        "--noise-multiplier",
        &s,
        "--sampling-rate",
        "0.01",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
        "--accountant",
        "rdp",
        "--json",
    ]);
    let eps = json(&out)["epsilon"].as_f64().unwrap();
    assert!(eps <= 2.0 && eps > 1.999, "{eps}");
}

#[test]
fn bad_arguments_get_clear_errors() {
    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "--noise-multiplier",
                "0",
                "--sampling-rate",
                "0.1",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier must be positive",
        ),
        (
            &[
                "--noise-multiplier",
                "-1",
                "--sampling-rate",
                "0.1",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier must be positive",
        ),
        (
            &[
                "--noise-multiplier",
                "1",
                "--sampling-rate",
                "0",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "--sampling-rate must be in (0, 1]",
        ),
        (
            &[
                "--noise-multiplier",
                "1",
                "--sampling-rate",
                "1.5",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "--sampling-rate must be in (0, 1]",
        ),
        (
            &[
                "--noise-multiplier",
                "1",
                "--sampling-rate",
                "0.5",
                "--steps",
                "10",
                "--delta",
                "0",
            ],
            "--delta must be in (0, 1)",
        ),
        (
            &[
                "--noise-multiplier",
                "1",
                "--sampling-rate",
                "0.5",
                "--steps",
                "10",
                "--delta",
                "1",
            ],
            "--delta must be in (0, 1)",
        ),
        (
            &[
                "--noise-multiplier",
                "1",
                "--sampling-rate",
                "0.5",
                "--steps",
                "0",
                "--delta",
                "1e-5",
            ],
            "--steps must be at least 1",
        ),
    ];
    for (rest, want) in cases {
        let mut args = vec!["privacy", "epsilon"];
        args.extend(rest);
        let (code, _, err) = fedveil(&args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (code, _, err) = fedveil(&[
        "privacy",
        "calibrate",
        "--epsilon",
        "0",
        "--delta",
        "1e-5",
        "--sampling-rate",
        "0.1",
        "--steps",
        "10",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--epsilon must be positive"), "{err}");
    let (code, _, err) = fedveil(&[
        "privacy",
        "calibrate",
        "--epsilon",
        "1",
        "--delta",
        "2",
        "--sampling-rate",
        "0.1",
        "--steps",
        "10",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--delta must be in (0, 1)"), "{err}");
    let (code, _, err) = fedveil(&[
        "privacy",
        "epsilon",
        "--noise-multiplier",
        "abc",
        "--sampling-rate",
        "0.1",
        "--steps",
        "10",
        "--delta",
        "1e-5",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid value 'abc'"), "{err}");
}
