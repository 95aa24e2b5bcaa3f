//! `autopar run` as one process per rank (the torchrun environment, set by hand): the same
//! losses and checkpoint as one process, and errors, not hangs, when a rank fails or vanishes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const TINY: &[&str] = &[
    "run", "gpt2", "--layers", "1", "--hidden", "64", "--heads", "2", "--vocab", "256", "--batch",
    "4", "--seq", "16",
];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One rank's process, its stdout read line by line as it comes.
struct Rank {
    child: Child,
    lines: Receiver<String>,
    stdout: Vec<String>,
}

impl Rank {
    /// Waits for the process (killing it after `limit`): (exit ok, stdout, stderr).
    fn finish(mut self, limit: Duration) -> (bool, String, String) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break Some(s);
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = self.child.wait_with_output().expect("output");
        self.stdout.extend(self.lines.try_iter());
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let Some(status) = status else {
            panic!(
                "still running after {limit:?}: a hang\nstdout:\n{}\nstderr:\n{stderr}",
                self.stdout.join("\n")
            );
        };
        (status.success(), self.stdout.join("\n"), stderr)
    }

    /// Waits until a stdout line contains `what`.
    fn wait_for_line(&mut self, what: &str, limit: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(50)) {
                let hit = l.contains(what);
                self.stdout.push(l);
                if hit {
                    return;
                }
            }
        }
        panic!("no line with {what:?} within {limit:?}: {:?}", self.stdout);
    }
}

/// Starts rank `rank` of `world` with `args` and the torchrun variables (plus `env`).
fn start(rank: usize, world: usize, port: u16, args: &[String], env: &[(&str, &str)]) -> Rank {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_autopar"));
    cmd.args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env_remove("TORCHELASTIC_USE_AGENT_STORE")
        .env_remove("AUTOPAR_MASTER_PORT")
        .env_remove("AUTOPAR_MULTIPROCESS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start autopar");
    let out = child.stdout.take().expect("stdout");
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    Rank {
        child,
        lines,
        stdout: vec![],
    }
}

fn args(extra: &[&str]) -> Vec<String> {
    TINY.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn losses(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter(|l| l.starts_with("step"))
        .map(|l| {
            l.split_whitespace()
                .nth(3)
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("no loss in {l:?}"))
        })
        .collect()
}

/// Runs `world` processes with the same `args` (per-rank extra arguments from `per_rank`).
fn run_world(
    world: usize,
    args_of: impl Fn(usize) -> Vec<String>,
    env: &[(&str, &str)],
    limit: Duration,
) -> Vec<(bool, String, String)> {
    let port = free_port();
    let ranks: Vec<Rank> = (0..world)
        .map(|r| start(r, world, port, &args_of(r), env))
        .collect();
    ranks.into_iter().map(|r| r.finish(limit)).collect()
}

#[test]
fn processes_train_like_one_process_and_save_the_same_parameters() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (world, mesh) in [(2, "2"), (4, "2x2")] {
        let one_ckpt = dir.path().join(format!("one-{world}.safetensors"));
        let multi_ckpt = dir.path().join(format!("multi-{world}.safetensors"));
        let common = [
            "--mesh", mesh, "--steps", "3", "--lr", "1e-2", "--seed", "5",
        ];
        let mut one_args = args(&common);
        one_args.extend(["--save".into(), one_ckpt.display().to_string()]);
        let one = Command::new(env!("CARGO_BIN_EXE_autopar"))
            .args(&one_args)
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .output()
            .expect("run autopar");
        let one_out = String::from_utf8_lossy(&one.stdout).into_owned();
        assert!(
            one.status.success(),
            "{one_out}{}",
            String::from_utf8_lossy(&one.stderr)
        );
        let want = losses(&one_out);
        assert_eq!(want.len(), 3, "{one_out}");

        let mut multi_args = args(&common);
        multi_args.extend(["--save".into(), multi_ckpt.display().to_string()]);
        let outs = run_world(world, |_| multi_args.clone(), &[], Duration::from_secs(120));
        for (rank, (ok, out, err)) in outs.iter().enumerate() {
            assert!(ok, "rank {rank} of {world}: {out}\n{err}");
            if rank > 0 {
                assert!(out.trim().is_empty(), "rank {rank} printed {out:?}");
            }
        }
        let got = losses(&outs[0].1);
        assert_eq!(got.len(), 3, "{}", outs[0].1);
        assert!(
            outs[0]
                .1
                .contains(&format!("on {world} processes (mesh {mesh})")),
            "{}",
            outs[0].1
        );
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs(),
                "{world} processes: losses {got:?}, one process {want:?}"
            );
        }
        let a = autopar::runtime::weights::load_safetensors(&one_ckpt).expect("one-process save");
        let b =
            autopar::runtime::weights::load_safetensors(&multi_ckpt).expect("multi-process save");
        assert_eq!(a.len(), b.len());
        let (err, name) = autopar::runtime::weights::max_rel_err(&b, &a);
        assert!(
            err <= 1e-6,
            "{world} processes: parameter {name} differs by {err:e}"
        );
    }
}

#[test]
fn a_rank_that_fails_stops_every_rank_naming_it() {
    // rank 1 is started on a model file that does not exist
    let outs = run_world(
        2,
        |r| {
            if r == 1 {
                vec![
                    "run".into(),
                    "missing.onnx".into(),
                    "--mesh".into(),
                    "2".into(),
                ]
            } else {
                args(&["--mesh", "2", "--steps", "3"])
            }
        },
        &[("AUTOPAR_TIMEOUT", "30")],
        Duration::from_secs(60),
    );
    let (ok1, _, err1) = &outs[1];
    assert!(!ok1);
    assert!(err1.contains("rank 1: missing.onnx"), "{err1}");
    let (ok0, _, err0) = &outs[0];
    assert!(!ok0, "rank 0 must fail too");
    assert!(err0.contains("rank 1 failed: missing.onnx"), "{err0}");
    assert!(!err0.contains("panicked"), "{err0}");

    // other flags on one rank: every rank refuses, naming it
    let outs = run_world(
        2,
        |r| {
            args(&[
                "--mesh",
                "2",
                "--steps",
                "3",
                "--seed",
                if r == 1 { "7" } else { "0" },
            ])
        },
        &[("AUTOPAR_TIMEOUT", "30")],
        Duration::from_secs(60),
    );
    for (ok, _, err) in &outs {
        assert!(!ok);
        assert!(err.contains("different settings"), "{err}");
        assert!(err.contains("rank 1: 3 steps, seed 7"), "{err}");
    }
}

#[test]
fn a_killed_rank_is_an_error_on_the_others_not_a_hang() {
    let port = free_port();
    let a = args(&["--mesh", "2", "--steps", "100000"]);
    let env = [("AUTOPAR_TIMEOUT", "20")];
    let mut r0 = start(0, 2, port, &a, &env);
    let mut r1 = start(1, 2, port, &a, &env);
    r0.wait_for_line("step    2", Duration::from_secs(60));
    r1.child.kill().expect("kill rank 1");
    let t0 = Instant::now();
    let (ok, _, err) = r0.finish(Duration::from_secs(15));
    assert!(!ok);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "rank 0 noticed after {:?}",
        t0.elapsed()
    );
    assert!(
        err.contains("rank 1 aborted: its connection closed without notice")
            || err.contains("rank 1 failed: its connection closed without notice"),
        "{err}"
    );
    let _ = r1.child.wait();
}

#[test]
fn a_stopped_rank_times_out_on_the_others() {
    let port = free_port();
    let a = args(&["--mesh", "2", "--steps", "100000"]);
    let env = [("AUTOPAR_TIMEOUT", "2")];
    let mut r0 = start(0, 2, port, &a, &env);
    let mut r1 = start(1, 2, port, &a, &env);
    r0.wait_for_line("step    2", Duration::from_secs(60));
    let pid = r1.child.id().to_string();
    let stopped = Command::new("kill").args(["-STOP", &pid]).status();
    if !stopped.is_ok_and(|s| s.success()) {
        // no kill(1) here: nothing to test
        let _ = r1.child.kill();
        return;
    }
    let t0 = Instant::now();
    let (ok, _, err) = r0.finish(Duration::from_secs(30));
    let _ = r1.child.kill();
    let _ = r1.child.wait();
    assert!(!ok);
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "rank 0 gave up after {:?}",
        t0.elapsed()
    );
    assert!(err.contains("timed out after 2s"), "{err}");
    assert!(err.contains("waiting for ranks [1]"), "{err}");
}

#[test]
fn world_size_must_match_the_mesh() {
    let outs = run_world(
        2,
        |_| args(&["--mesh", "4", "--steps", "1"]),
        &[("AUTOPAR_TIMEOUT", "30")],
        Duration::from_secs(60),
    );
    for (r, (ok, _, err)) in outs.iter().enumerate() {
        assert!(!ok);
        assert!(
            err.contains(&format!(
                "rank {r}: WORLD_SIZE is 2 but the mesh 4 has 4 devices"
            )),
            "{err}"
        );
    }
    // --verify is refused, clearly
    let outs = run_world(
        2,
        |_| args(&["--mesh", "2", "--steps", "1", "--verify"]),
        &[("AUTOPAR_TIMEOUT", "30")],
        Duration::from_secs(60),
    );
    for (ok, _, err) in &outs {
        assert!(!ok);
        assert!(
            err.contains("--verify compares against one device"),
            "{err}"
        );
    }
    // a rank outside the world
    let port = free_port();
    let (ok, _, err) =
        start(2, 2, port, &args(&["--mesh", "2"]), &[]).finish(Duration::from_secs(30));
    assert!(!ok);
    assert!(
        err.contains("RANK=2 is not a rank of WORLD_SIZE=2"),
        "{err}"
    );
}
