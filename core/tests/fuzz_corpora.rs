//! Runs the checked-in seed corpora of the fuzz targets (`fuzz/corpus/*`) through the
//! same harness the fuzzers use, so CI exercises them without a fuzzing toolchain.

mod fuzz_harness;

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("readable corpus file"))
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "{target}: only {} seed files",
        files.len()
    );
    files
}

/// Runs `check` on every file, collecting failures so one run names all of them.
fn run_all<T>(target: &str, mut check: impl FnMut(&[u8]) -> T) -> Vec<T> {
    let mut failures = Vec::new();
    let mut results = Vec::new();
    for (name, bytes) in corpus(target) {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&bytes))) {
            Ok(r) => results.push(r),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{target}/{name}: {msg}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    results
}

#[test]
fn reply_parser_seed_corpus() {
    run_all("reply_parser", fuzz_harness::check_reply);
}

#[test]
fn machine_inputs_seed_corpus() {
    run_all("machine_inputs", fuzz_harness::check_machine);
}

/// Vacuity guards: the seeds reach the states the invariants are about, so a
/// harness or decoder change that makes them trivially pass is noticed.
#[test]
fn machine_inputs_seed_corpus_reaches_the_interesting_states() {
    let stats = run_all("machine_inputs", fuzz_harness::check_machine_stats);
    let total = |f: fn(&fuzz_harness::Stats) -> usize| stats.iter().map(f).sum::<usize>();
    let reached = [
        ("a refresh request", total(|s| s.sends)),
        ("a commit", total(|s| s.commits)),
        ("a CAS conflict", total(|s| s.conflicts)),
        ("a served token", total(|s| s.served)),
        ("a ReauthRequired", total(|s| s.reauths)),
        ("a rotation", total(|s| s.rotations)),
        (
            "a rejected reply mid-refresh",
            total(|s| s.rejected_replies),
        ),
        ("a refused driver bug", total(|s| s.refused)),
        (
            "a caller refused for another identity",
            total(|s| s.identity_refusals),
        ),
        (
            "a LostRotation (S4 from the ghost)",
            total(|s| s.lost_rotations),
        ),
        ("a store answer lost", total(|s| s.lost_answers)),
    ];
    for (what, n) in reached {
        eprintln!("{what}: {n}");
        assert!(n > 0, "no seed reaches {what}");
    }
}

/// The harness's S1 check bites: with a store that writes every compare-and-swap
/// (B1), seeds whose commits race fail S1 at the commit that lands on a newer
/// generation than its base.
#[test]
fn machine_inputs_s1_bites_with_a_store_that_writes_unconditionally() {
    let mutant = fuzz_harness::StoreMutant::WriteUnconditionally;
    let mut caught = 0;
    for (_, bytes) in corpus("machine_inputs") {
        let run = std::panic::catch_unwind(|| fuzz_harness::check_machine_mutant(&bytes, mutant));
        if let Err(panic) = run {
            let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            caught += usize::from(msg.starts_with("S1"));
        }
    }
    assert!(caught > 0, "no seed fails S1 under a store without CAS");
}

/// Every input the fuzzer (or an investigation of its findings) turned up
/// (`fuzz/findings/`), replayed: each was a failure once, and is a regression test
/// now.
#[test]
fn machine_inputs_findings_hold() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/findings");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    assert!(names.len() >= 3, "the findings are missing: {names:?}");
    for path in names {
        let bytes = std::fs::read(&path).expect("readable finding");
        let run = std::panic::catch_unwind(|| fuzz_harness::check_machine(&bytes));
        assert!(run.is_ok(), "{} fails again", path.display());
    }
}
