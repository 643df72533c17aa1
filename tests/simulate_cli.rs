//! `fedveil simulate`, end to end through the real binary.

mod common;

use common::fedveil;

#[test]
/// k = 12, t = 7: any five lost neighbours still leave t holders, so this
/// schedule must succeed whichever clients the seed picks.
fn a_round_with_drops_at_every_stage_is_correct_and_reported_as_json() {
    let (code, out, err) = fedveil(&[
        "simulate",
        "--clients",
        "16",
        "--dim",
        "2000",
        "--neighbors",
        "12",
        "--threshold",
        "7",
        "--bits",
        "24",
        "--drop",
        "advertise:1",
        "--drop",
        "share:1",
        "--drop",
        "masked:1",
        "--drop",
        "consistency:1",
        "--drop",
        "unmask:1",
        "--seed",
        "7",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(r["correct"], true);
    assert_eq!(r["exact_sum"], true);
    assert_eq!(r["outcome"], "ok");
    assert_eq!(r["survivors"], 13);
    assert_eq!(r["degree"], 12);
    assert_eq!(r["threshold"], 7);
    let stages: Vec<&str> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        ["advertise", "share", "masked", "consistency", "unmask"]
    );
    assert!(r["max_abs_error"].as_f64().unwrap() <= r["error_bound"].as_f64().unwrap());
    assert!(r["client_bytes"]["up_max"].as_u64().unwrap() >= 2000 * 3);
    assert!(r["server_received_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn the_human_report_names_the_result() {
    let (code, out, _) = fedveil(&[
        "simulate",
        "--clients",
        "6",
        "--dim",
        "100",
        "--complete",
        "--seed",
        "1",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("complete graph (SecAgg)"), "{out}");
    assert!(out.contains("result: CORRECT"), "{out}");
    // Without a degree, the parameter finder chooses one.
    let (code, out, _) = fedveil(&["simulate", "--clients", "40", "--dim", "10", "--seed", "2"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("result: CORRECT"));
}

#[test]
fn an_impossible_schedule_aborts_with_the_rule_and_exits_non_zero() {
    let (code, out, _) = fedveil(&[
        "simulate",
        "--clients",
        "8",
        "--dim",
        "10",
        "--neighbors",
        "4",
        "--threshold",
        "3",
        "--drop",
        "unmask:5",
        "--seed",
        "3",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("server aborted"), "{out}");
    assert!(out.contains("threshold is 3"), "{out}");
    assert!(out.contains("result: WRONG"));
}

#[test]
fn bad_arguments_get_clear_errors() {
    let (code, _, err) = fedveil(&[
        "simulate",
        "--clients",
        "8",
        "--dim",
        "10",
        "--drop",
        "later:1",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown stage 'later'"), "{err}");
    assert!(
        err.contains("advertise, share, masked, consistency, unmask"),
        "{err}"
    );
    let (code, _, err) = fedveil(&[
        "simulate",
        "--clients",
        "8",
        "--dim",
        "10",
        "--drop",
        "masked",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("STAGE:COUNT"), "{err}");
    let (code, _, err) = fedveil(&["simulate", "--clients", "2", "--dim", "10", "--complete"]);
    assert_eq!(code, 2);
    assert!(err.contains("at least 3"), "{err}");
    let (code, _, err) = fedveil(&[
        "simulate",
        "--clients",
        "10",
        "--dim",
        "10",
        "--neighbors",
        "4",
        "--threshold",
        "2",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("must exceed half the number of neighbours"),
        "{err}"
    );
    let (code, _, err) = fedveil(&[
        "simulate",
        "--clients",
        "10",
        "--dim",
        "10",
        "--complete",
        "--bits",
        "40",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("bits"), "{err}");
    let (code, _, err) = fedveil(&["simulate", "--clients", "10", "--dim", "0", "--complete"]);
    assert_eq!(code, 2);
    assert!(err.contains("vector length"), "{err}");
}
