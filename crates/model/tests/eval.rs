//! Evaluation metrics: GSM8K answers in the formats models and the
//! dataset write them, and pass@k's sandbox on known-good and known-bad
//! programs, including an infinite loop, a memory bomb, a fork and a
//! network connection that it must stop.

use std::time::{Duration, Instant};

use fedveil_model::eval::{Limits, Outcome, gsm8k_answer, gsm8k_exact_match, run_python};

#[test]
fn gsm8k_answers_in_real_formats() {
    // The dataset's reference solutions end with "#### <answer>".
    let gold = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n\
                She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18";
    assert_eq!(gsm8k_answer(gold).as_deref(), Some("18"));
    assert_eq!(gsm8k_answer("#### 1,080").as_deref(), Some("1080"));
    assert_eq!(gsm8k_answer("so #### -3.50").as_deref(), Some("-3.5"));
    // FS-LLM's few-shot format: the first number after the trigger.
    let cot = "She has 23 - 15 = 8 dollars left. The answer is 8.";
    assert_eq!(gsm8k_answer(cot).as_deref(), Some("8"));
    assert_eq!(
        gsm8k_answer("the answer is $1,250.00 in total, not 7").as_deref(),
        Some("1250")
    );
    // Otherwise the last number.
    assert_eq!(gsm8k_answer("5 + 4 = 9 toys").as_deref(), Some("9"));
    assert_eq!(gsm8k_answer("no numbers here"), None);
    assert!(gsm8k_exact_match("... The answer is 18.", gold));
    assert!(gsm8k_exact_match("#### 18.0", gold));
    assert!(!gsm8k_exact_match("The answer is 19", gold));
    assert!(!gsm8k_exact_match("I don't know", gold));
}

fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(2),
        memory_bytes: 256 << 20,
        cpu_seconds: 2,
        ..Limits::default()
    }
}

#[test]
fn correct_programs_pass_and_wrong_ones_fail() {
    let good =
        "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nassert add(-1, 1) == 0\n";
    assert_eq!(run_python(good, &limits()).unwrap(), Outcome::Passed);
    let wrong = "def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n";
    match run_python(wrong, &limits()).unwrap() {
        Outcome::Failed(why) => assert!(why.contains("AssertionError"), "{why}"),
        other => panic!("{other:?}"),
    }
    let broken = "def add(a, b)\n    return a + b\n";
    match run_python(broken, &limits()).unwrap() {
        Outcome::Failed(why) => assert!(why.contains("SyntaxError"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_sandbox_stops_loops_bombs_forks_and_the_network() {
    let started = Instant::now();
    assert_eq!(
        run_python("while True:\n    pass\n", &limits()).unwrap(),
        Outcome::TimedOut
    );
    // Sleeping uses no CPU: the wall clock stops it.
    assert_eq!(
        run_python("import time\ntime.sleep(60)\n", &limits()).unwrap(),
        Outcome::TimedOut
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    match run_python("x = bytearray(8 << 30)\nassert False\n", &limits()).unwrap() {
        Outcome::Failed(why) => assert!(why.contains("MemoryError"), "{why}"),
        other => panic!("a memory bomb: {other:?}"),
    }
    match run_python("x = [0] * (1 << 40)\n", &limits()).unwrap() {
        Outcome::Failed(why) => assert!(why.contains("MemoryError"), "{why}"),
        other => panic!("a list bomb: {other:?}"),
    }
    match run_python("import os\nos.fork()\n", &limits()).unwrap() {
        Outcome::Failed(why) => assert!(why.contains("disabled in the sandbox"), "{why}"),
        other => panic!("a fork: {other:?}"),
    }
    let net = "import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=2)\n";
    match run_python(net, &limits()).unwrap() {
        Outcome::Failed(why) => assert!(why.contains("network access is disabled"), "{why}"),
        other => panic!("a connection: {other:?}"),
    }
    // Even below the interpreter's guard, the namespace has no route out.
    if fedveil_model::eval::network_isolation().is_some() {
        let raw =
            "import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\n";
        match run_python(raw, &limits()).unwrap() {
            Outcome::Failed(why) => assert!(why.contains("Network is unreachable"), "{why}"),
            other => panic!("a raw connection: {other:?}"),
        }
    }
    // Files go to a fresh directory that is removed afterwards.
    let write =
        "open('out.txt', 'w').write('x')\nimport os\nassert os.listdir('.') == ['out.txt']\n";
    assert_eq!(run_python(write, &limits()).unwrap(), Outcome::Passed);
}
