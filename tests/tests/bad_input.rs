//! Bad input to the daemons (issues 2 and 6): config files that must be
//! refused by `--check` with the file, the key and the reason, and daemons
//! the running cluster refuses (a site it does not know, a second witness),
//! which must exit with a clear message instead of retrying forever.

use metro_tests::lab::{bin_dir, workspace, Lab};
use metroctl::certs::{self, Ca};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Exit code of `--check` for a bad config.
const EXIT_BAD_CONFIG: i32 = 2;
/// How long a refused daemon may take to give up (start, register, one join).
const REFUSAL_DEADLINE: Duration = Duration::from_secs(45);

fn check(bin: &str, config: &Path) -> Output {
    Command::new(bin_dir().join(bin)).arg("--config").arg(config).arg("--check").output().expect("runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The shipped template with its TLS paths pointing at files in `dir`.
fn template_in(dir: &Path) -> String {
    let text = std::fs::read_to_string(workspace().join("api/metro.toml.example")).expect("template");
    for (name, mode) in [("ca.pem", 0o644), ("node.pem", 0o644), ("node.key", 0o600)] {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, "x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    text.replace("/etc/metro/", &format!("{}/", dir.display()))
}

#[test]
fn check_refuses_bad_configs_naming_the_file_the_key_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = template_in(dir.path());
    let file = dir.path().join("metro.toml");
    let f = file.display().to_string();

    std::fs::write(&file, &good).unwrap();
    let out = check("metro-node", &file);
    assert!(out.status.success(), "the template passes --check: {}", stderr(&out));

    let cases: Vec<(&str, String, Vec<String>)> = vec![
        ("malformed TOML", good.replace("cluster = \"prod\"", "cluster = "), vec!["line 6".into()]),
        (
            "an unknown key",
            good.replace("[quorum]", "[quorum]\nleese_ms = 5"),
            vec!["key `leese_ms`".into(), "unknown field".into()],
        ),
        (
            "a site the cluster does not have",
            good.replace("site = \"dc-a\"", "site = \"dc-z\""),
            vec!["key `site`".into(), "dc-z".into(), "dc-a, dc-b, witness".into()],
        ),
        (
            "a second witness site",
            good.replace(
                "kind = \"data\"\n\n[[sites]]\nname = \"dc-b\"",
                "kind = \"witness\"\n\n[[sites]]\nname = \"dc-b\"",
            ),
            vec!["key `sites`".into(), "1 witness site".into()],
        ),
        (
            "http etcd endpoints with an etcd CA",
            good.replace("timeout_ms = 2000", "timeout_ms = 2000\nca_cert = \"/x/etcd-ca.pem\""),
            vec!["key `etcd.endpoints`".into(), "https://".into()],
        ),
    ];
    for (what, text, wants) in cases {
        std::fs::write(&file, text).unwrap();
        let out = check("metro-node", &file);
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(EXIT_BAD_CONFIG), "{what}: {e}");
        assert!(e.contains(&format!("config {f}")), "{what}: names the file: {e}");
        for w in wants {
            assert!(e.contains(&w), "{what}: expected `{w}` in: {e}");
        }
    }

    use std::os::unix::fs::PermissionsExt;
    std::fs::write(&file, &good).unwrap();
    let key = dir.path().join("node.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check("metro-node", &file);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(EXIT_BAD_CONFIG), "a world-readable key: {e}");
    assert!(e.contains("key `tls.key`") && e.contains("readable by group or world"), "{e}");
    assert!(e.contains(&format!("chmod 600 {}", key.display())), "says what to do: {e}");

    tracing::info!("--- the witness binary refuses a storage config");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = check("metro-witness", &file);
    assert_eq!(out.status.code(), Some(EXIT_BAD_CONFIG));
    assert!(stderr(&out).contains("key `role`"), "{}", stderr(&out));
}

/// Start `bin` with `config` and wait for it to exit (killed after `REFUSAL_DEADLINE`).
fn run_until_exit(bin: &str, config: &Path) -> (Option<i32>, String, Duration) {
    let t = Instant::now();
    let mut child = Command::new(bin_dir().join(bin))
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon starts");
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().expect("stderr").read_to_string(&mut err);
            return (status.code(), err, t.elapsed());
        }
        if t.elapsed() > REFUSAL_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return (None, "still running: it retries forever".into(), t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn daemons_the_cluster_refuses_exit_with_a_clear_message_instead_of_retrying() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up_loopback("bad-join").await?;
    let ca = Ca::load(&lab.dir.join("certs"))?;
    let scratch = tempfile::tempdir()?;
    let a1_ip = lab.info.daemon("a1").expect("a1").address.clone();
    let w1_ip = lab.info.witness.address.clone();
    // Free addresses of the lab's own /16 (host .31 is never used by the lab).
    let net = a1_ip.rsplit_once('.').expect("ipv4").0.rsplit_once('.').expect("ipv4").0.to_string();
    let c1_ip = format!("{net}.1.31");
    let w2_ip = format!("{net}.3.31");

    tracing::info!("--- a storage node claiming site dc-c, which the cluster does not have");
    let pair = certs::issue(&ca, "node:c1", &[c1_ip.parse::<IpAddr>()?], &[], 1)?;
    let c1_certs = certs::write_pair(scratch.path(), "node-c1", &pair)?;
    let a1 = std::fs::read_to_string(lab.dir.join("config/a1.toml"))?;
    let c1 = a1
        .replace("node_id = \"a1\"", "node_id = \"c1\"")
        .replace("site = \"dc-a\"", "site = \"dc-c\"")
        .replace("name = \"dc-b\"", "name = \"dc-c\"")
        .replace(&format!("{a1_ip}:"), &format!("{c1_ip}:"))
        .replace(&format!("\"{a1_ip}\""), &format!("\"{c1_ip}\""))
        .replace(
            &lab.dir.join("nodes/a1").display().to_string(),
            &scratch.path().join("c1").display().to_string(),
        )
        .replace(
            &lab.dir.join("certs/node-a1.pem").display().to_string(),
            &c1_certs.cert.display().to_string(),
        )
        .replace(
            &lab.dir.join("certs/node-a1.key").display().to_string(),
            &c1_certs.key.display().to_string(),
        );
    let c1_file = scratch.path().join("c1.toml");
    std::fs::write(&c1_file, &c1)?;
    assert!(check("metro-node", &c1_file).status.success(), "c1's config is valid on its own: {c1}");
    let (code, err, took) =
        tokio::task::spawn_blocking(move || run_until_exit("metro-node", &c1_file)).await?;
    tracing::info!(?code, ?took, "c1 exited");
    assert_eq!(code, Some(metro_node::daemon::EXIT_REFUSED as i32), "{err}");
    assert!(err.contains("the cluster refused node `c1`") && err.contains("unknown site `dc-c`"), "{err}");
    assert!(err.contains("next step") && err.contains("c1.toml"), "names the config to fix: {err}");

    tracing::info!("--- a second witness");
    let w1 = std::fs::read_to_string(lab.dir.join("config/w1.toml"))?;
    let w2 = w1.replace("node_id = \"w1\"", "node_id = \"w2\"").replace(&w1_ip, &w2_ip).replace(
        &lab.dir.join("nodes/w1").display().to_string(),
        &scratch.path().join("w2").display().to_string(),
    );
    let w2_file = scratch.path().join("w2.toml");
    std::fs::write(&w2_file, &w2)?;
    let (code, err, _) =
        tokio::task::spawn_blocking(move || run_until_exit("metro-witness", &w2_file)).await?;
    assert_eq!(code, Some(metro_node::daemon::EXIT_REFUSED as i32), "{err}");
    assert!(err.contains("the cluster refused node `w2`") && err.contains("already has a witness"), "{err}");

    tracing::info!("--- the cluster is unchanged");
    let s = lab.status()?;
    let ids: Vec<String> = metro_tests::lab::strings(&serde_json::Value::Array(
        s["nodes"].as_array().cloned().unwrap_or_default().iter().map(|n| n["id"].clone()).collect(),
    ));
    assert!(!ids.contains(&"c1".to_string()) && !ids.contains(&"w2".to_string()), "{ids:?}");
    assert_eq!(s["witness"]["id"], "w1");
    Ok(())
}
