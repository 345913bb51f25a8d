//! The side-by-side benchmark with serf (`tests/benches/vs_serf.rs`) in its short mode, so that
//! it cannot rot: every scenario must produce a number for both products. Nothing is checked
//! about speed. Installs serf with apt-get when it is missing; without root, or when serf cannot
//! be installed, says so and skips (the latter: serf only).

use cnsprcy_tests::vs_serf::{self, Options};
use cnsprcy_tests::{bin, is_root};

#[test]
fn short_mode_measures_every_scenario_for_both() {
    if !is_root() {
        eprintln!("skipped: the serf comparison needs root, to make network namespaces");
        return;
    }
    let bins = bin("cnspr")
        .parent()
        .expect("the binaries' directory")
        .to_owned();
    let mut options = Options::quick(bins);
    let out = tempfile::tempdir().expect("temp dir");
    options.out = out.path().to_owned();
    if let Err(why) = vs_serf::ensure_serf() {
        eprintln!("serf skipped: {why}; measuring cnsprcy alone");
        options.skip_serf = true;
    }
    let started = std::time::Instant::now();
    let report = vs_serf::run(&options);
    eprintln!(
        "{}\n(short mode took {:.0} s)",
        report.markdown,
        started.elapsed().as_secs_f64()
    );

    let keys = [
        "broadcast",
        "killed",
        "cut",
        "healed",
        "idle_bytes",
        "idle_packets",
        "idle_cpu",
        "memory",
    ];
    for key in keys.iter().chain(&["memory_services"]) {
        assert!(
            report.cnsprcy.values.contains_key(*key),
            "cnsprcy has no {key}:\n{}",
            report.markdown
        );
    }
    if let Some(serf) = &report.serf {
        // serf's return after a short cut is a matter of its timers (gossip to the dead, or its
        // 30 s reconnect interval), longer than the short mode waits: speed, not checked.
        for key in keys.iter().filter(|&&k| k != "healed") {
            assert!(
                serf.values.contains_key(*key),
                "serf has no {key}:\n{}",
                report.markdown
            );
        }
    } else {
        assert!(options.skip_serf, "serf was to run but has no results");
    }
    // An idle device sends something (keepalives, gossip), and a running one has memory.
    assert!(
        report.cnsprcy.values["idle_packets"] > 0.0,
        "{}",
        report.markdown
    );
    assert!(report.cnsprcy.values["memory"] > 1.0, "{}", report.markdown);
    for file in ["results.json", "results.svg", "results.md"] {
        assert!(out.path().join(file).exists(), "{file} was not written");
    }
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("results.json")).unwrap_or_default(),
    )
    .expect("results.json is JSON");
    assert!(json["rows"].as_array().is_some_and(|rows| !rows.is_empty()));
    assert!(
        std::fs::read_to_string(out.path().join("results.svg"))
            .is_ok_and(|s| s.starts_with("<svg"))
    );
}
