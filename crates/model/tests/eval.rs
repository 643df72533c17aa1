//! Evaluation metrics: GSM8K answers in the formats models and the
//! dataset write them, and pass@k's sandbox on known-good and known-bad
//! programs, including an infinite loop, a memory bomb, a fork and a
//! network connection that it must stop.

use std::time::{Duration, Instant};

use fedveil_model::eval::{
    Limits, Verdict, extract_code, gsm8k_answer, gsm8k_exact_match, is_code_prompt, pass_at_k,
    run_python, test_program,
};

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
    assert_eq!(run_python(good, &limits()).unwrap(), Verdict::Passed);
    let wrong = "def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n";
    match run_python(wrong, &limits()).unwrap() {
        Verdict::Failed(why) => assert!(why.contains("AssertionError"), "{why}"),
        other => panic!("{other:?}"),
    }
    let broken = "def add(a, b)\n    return a + b\n";
    match run_python(broken, &limits()).unwrap() {
        Verdict::Failed(why) => assert!(why.contains("SyntaxError"), "{why}"),
        other => panic!("{other:?}"),
    }
}

// What this checks, and no more: the resource limits, and the
// interpreter-level guard against `os.fork` and `socket`. The guard is not
// isolation (issue 17: `posix`, `_socket` and `_posixsubprocess` get past
// it); SECURITY.md says so until an OS-level sandbox replaces it.
#[test]
fn the_sandbox_limits_time_and_memory_and_its_guard_refuses_os_fork_and_sockets() {
    let started = Instant::now();
    assert_eq!(
        run_python("while True:\n    pass\n", &limits()).unwrap(),
        Verdict::TimedOut
    );
    // Sleeping uses no CPU: the wall clock stops it.
    assert_eq!(
        run_python("import time\ntime.sleep(60)\n", &limits()).unwrap(),
        Verdict::TimedOut
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    match run_python("x = bytearray(8 << 30)\nassert False\n", &limits()).unwrap() {
        Verdict::Failed(why) => assert!(why.contains("MemoryError"), "{why}"),
        other => panic!("a memory bomb: {other:?}"),
    }
    match run_python("x = [0] * (1 << 40)\n", &limits()).unwrap() {
        Verdict::Failed(why) => assert!(why.contains("MemoryError"), "{why}"),
        other => panic!("a list bomb: {other:?}"),
    }
    match run_python("import os\nos.fork()\n", &limits()).unwrap() {
        Verdict::Failed(why) => assert!(why.contains("disabled in the sandbox"), "{why}"),
        other => panic!("a fork: {other:?}"),
    }
    let net = "import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=2)\n";
    match run_python(net, &limits()).unwrap() {
        Verdict::Failed(why) => assert!(why.contains("network access is disabled"), "{why}"),
        other => panic!("a connection: {other:?}"),
    }
    // Even below the interpreter's guard, the namespace has no route out.
    if fedveil_model::eval::network_isolation().is_some() {
        let raw =
            "import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\n";
        match run_python(raw, &limits()).unwrap() {
            Verdict::Failed(why) => assert!(why.contains("Network is unreachable"), "{why}"),
            other => panic!("a raw connection: {other:?}"),
        }
    }
    // Files go to a fresh directory that is removed afterwards.
    let write =
        "open('out.txt', 'w').write('x')\nimport os\nassert os.listdir('.') == ['out.txt']\n";
    assert_eq!(run_python(write, &limits()).unwrap(), Verdict::Passed);
}

/// HumanEval/0 as the dataset ships it (MIT): the prompt is the start of
/// the program, and the test ends by calling `check` on the entry point.
const HE_PROMPT: &str = "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n    \"\"\" Check if in given list of numbers, are any two numbers closer to each other than\n    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n    \"\"\"\n";
const HE_TEST: &str = "def check(candidate):\n    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True\n\ncheck(has_close_elements)\n";

#[test]
fn code_answers_become_programs_that_pass_or_fail_on_their_tests() {
    assert!(is_code_prompt(HE_PROMPT));
    let mbpp = "Write a function to add two numbers.\nassert add(2, 3) == 5";
    assert!(!is_code_prompt(mbpp));

    // The dataset's own completion: the body only.
    let body = "    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n            if i != j and abs(a - b) < threshold:\n                return True\n    return False\n";
    let judge = |answer: &str, prompt: &str, test: &str| {
        run_python(&test_program(prompt, answer, test), &limits()).unwrap()
    };
    assert_eq!(judge(body, HE_PROMPT, HE_TEST), Verdict::Passed);
    // A chat model's answer: the whole function in a fence, with prose.
    let fenced = format!(
        "Here is the function:\n```python\nfrom typing import List\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n{body}```\nIt compares every pair."
    );
    assert_eq!(judge(&fenced, HE_PROMPT, HE_TEST), Verdict::Passed);
    // A body that ends with a stray closing fence.
    assert_eq!(
        judge(&format!("{body}```\nDone."), HE_PROMPT, HE_TEST),
        Verdict::Passed
    );
    // Wrong answers fail: an off-by-one comparison, and prose.
    let wrong = body.replace("< threshold", "< threshold / 10");
    assert!(matches!(
        judge(&wrong, HE_PROMPT, HE_TEST),
        Verdict::Failed(_)
    ));
    assert!(matches!(
        judge("I would compare every pair of numbers.", HE_PROMPT, HE_TEST),
        Verdict::Failed(_)
    ));

    // MBPP: the prompt is prose, so the answer must define the function.
    let test = "assert add(2, 3) == 5\nassert add(-1, 1) == 0";
    let good = "```python\ndef add(a, b):\n    return a + b\n```";
    assert_eq!(judge(good, mbpp, test), Verdict::Passed);
    let looping = "def add(a, b):\n    while True:\n        pass\n";
    assert_eq!(judge(looping, mbpp, test), Verdict::TimedOut);

    assert_eq!(extract_code("no fences"), "no fences");
    assert_eq!(extract_code("```\nx = 1\n```"), "x = 1\n");
}

#[test]
fn pass_at_k_over_judged_samples() {
    // Four samples of one problem: two right, one wrong, one endless loop.
    let test = "assert add(2, 3) == 5";
    let samples = [
        "def add(a, b):\n    return a + b",
        "def add(a, b):\n    return b + a",
        "def add(a, b):\n    return a * b",
        "def add(a, b):\n    while True:\n        pass",
    ];
    let passed = samples
        .iter()
        .filter(|s| {
            run_python(&test_program("Add two numbers.", s, test), &limits()).unwrap()
                == Verdict::Passed
        })
        .count();
    assert_eq!(passed, 2);
    assert!((pass_at_k(4, passed, 1).unwrap() - 0.5).abs() < 1e-12);
    // 1 − C(2,2)/C(4,2) = 1 − 1/6.
    assert!((pass_at_k(4, passed, 2).unwrap() - 5.0 / 6.0).abs() < 1e-12);
    assert_eq!(pass_at_k(4, passed, 3).unwrap(), 1.0);
}
