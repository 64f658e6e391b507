//! The control plane under bad conditions (issue 6): mutual TLS against a
//! real daemon, viewers that may only read, an etcd outage while volumes do
//! I/O ("run flat"), metroctl against a cluster that is down or blackholed,
//! and the etcd registry over mutual TLS.
//!
//! Lab tests honour `METRO_LAB_OCTET` (loopback labs side by side); the
//! blackhole test uses `127.<octet>.9.9`, an address no lab uses.

use metro_api::pb::control::control_client::ControlClient;
use metro_api::pb::control::GetStatusRequest;
use metro_node::registry::etcd::{EtcdRegistry, EtcdTls};
use metro_node::registry::{Registry, RegistryError};
use metro_tests::lab::{bin_dir, strings, Lab};
use metroctl::certs::{self, Ca};
use serde_json::Value;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// metroctl's own bound on a failed read: connect timeouts over the
/// endpoints plus the read deadline, with slack for a loaded machine.
const CTL_GIVES_UP_WITHIN: Duration = Duration::from_secs(20);

fn octet() -> u8 {
    std::env::var("METRO_LAB_OCTET").ok().and_then(|v| v.parse().ok()).unwrap_or(94)
}

fn metroctl(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new(bin_dir().join("metroctl")).args(args).output().expect("metroctl runs");
    (out, t.elapsed())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Everything about a metroctl run, for assertion messages.
fn shown(o: &Output) -> String {
    format!(
        "{}\n--- stdout:\n{}\n--- stderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Connect with `identity` (or none) and make one RPC: the connect result
/// and the RPC's result.
async fn first_rpc(
    api: &str,
    ca_pem: &[u8],
    identity: Option<(&str, &str)>,
) -> (Result<(), String>, Result<(), tonic::Status>) {
    metro_api::tls::install_crypto_provider();
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .domain_name(metro_api::tls::SERVER_NAME)
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    if let Some((c, k)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(c, k));
    }
    let ep = tonic::transport::Channel::from_shared(api.to_string())
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    let ch = match ep.connect().await {
        Ok(c) => c,
        Err(e) => return (Err(e.to_string()), Ok(())),
    };
    let r = ControlClient::new(ch).get_status(GetStatusRequest {}).await.map(|_| ());
    (Ok(()), r)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_client_certificates_are_refused_at_the_first_rpc_and_viewers_may_only_read() -> anyhow::Result<()>
{
    metro_tests::lab::init_tracing();
    let lab = Lab::up_loopback("cp-mtls").await?;
    let api = lab.info.nodes[0].api.clone();
    let ca_pem = std::fs::read(&lab.info.ca_cert)?;
    let lab_ca = Ca::load(&lab.dir.join("certs"))?;
    let scratch = tempfile::tempdir()?;

    tracing::info!("--- a client with no certificate: TLS 1.3 connects, the first RPC fails");
    let (connected, rpc) = first_rpc(&api, &ca_pem, None).await;
    connected.expect("TLS 1.3: the handshake completes before the server checks the client");
    let err = rpc.expect_err("no client certificate must be refused");
    let msg = metroctl::client::explain_transport(&err).expect("a transport-level refusal");
    assert!(msg.contains("refused our client certificate") && msg.contains("next step"), "{msg}");

    tracing::info!("--- a certificate from another CA");
    let other = Ca::generate("metro cluster CA")?;
    let foreign =
        certs::write_pair(scratch.path(), "admin-evil", &certs::issue(&other, "admin:evil", &[], &[], 1)?)?;
    let (connected, rpc) = first_rpc(
        &api,
        &ca_pem,
        Some((&std::fs::read_to_string(&foreign.cert)?, &std::fs::read_to_string(&foreign.key)?)),
    )
    .await;
    connected.expect("handshake completes");
    assert!(rpc.is_err(), "a foreign CA's certificate must be refused");
    let (out, took) = metroctl(&[
        "--lab",
        lab.dir.to_str().unwrap(),
        "status",
        "--cert",
        foreign.cert.to_str().unwrap(),
        "--key",
        foreign.key.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("refused our client certificate") && e.contains("another CA"), "{}", shown(&out));
    assert!(e.contains("metroctl certs issue"), "names the next step: {e}");
    assert!(took < CTL_GIVES_UP_WITHIN, "took {took:?}");

    tracing::info!("--- an expired certificate from the cluster CA");
    let expired = certs::write_pair(
        scratch.path(),
        "admin-old",
        &certs::issue_expired(&lab_ca, "admin:old", &[], &[])?,
    )?;
    let (connected, rpc) = first_rpc(
        &api,
        &ca_pem,
        Some((&std::fs::read_to_string(&expired.cert)?, &std::fs::read_to_string(&expired.key)?)),
    )
    .await;
    connected.expect("handshake completes");
    assert!(rpc.is_err(), "an expired certificate must be refused");
    let (out, _) = metroctl(&[
        "--lab",
        lab.dir.to_str().unwrap(),
        "status",
        "--cert",
        expired.cert.to_str().unwrap(),
        "--key",
        expired.key.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("refused our client certificate") && e.contains("expired"), "{}", shown(&out));

    tracing::info!("--- a viewer reads status but may not create a volume");
    let status = lab.ctl_json(&["status", "--viewer"])?;
    assert!(status["leader"].is_string(), "viewer sees the leader: {status}");
    let (out, _) = metroctl(&[
        "--lab",
        lab.dir.to_str().unwrap(),
        "volume",
        "create",
        "v",
        "--size",
        "64MiB",
        "--viewer",
    ]);
    assert!(!out.status.success(), "a viewer must not create volumes");
    let e = stderr(&out);
    assert!(e.contains("MET-004") && e.contains("viewer"), "says PERMISSION_DENIED and who: {e}");
    assert!(e.contains("admin certificate"), "says what to do: {e}");
    assert!(lab.ctl_json(&["volume", "list"])?.to_string().find("\"v\"").is_none(), "nothing was created");
    Ok(())
}

/// A child process killed if the test fails before waiting for it.
struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    fn wait_with_output(mut self) -> std::io::Result<Output> {
        self.0.take().expect("not waited yet").wait_with_output()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Write-throughput samples (ms since fio started, KiB/s) from a fio bw log.
fn fio_bw_samples(path: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            Some((f.first()?.parse().ok()?, f.get(1)?.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn attached_volumes_keep_doing_io_while_etcd_is_down_and_changes_fail_with_a_clear_error(
) -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up_loopback("cp-etcd-flat").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB"])?;
    let uri = lab.volume("v")?["nbd"].as_str().expect("an NBD URI").to_string();
    let logs = tempfile::tempdir()?;
    let bw_prefix = logs.path().join("flat");

    tracing::info!("--- fio writes (and verifies) through NBD for 20 s");
    let fio_started = Instant::now();
    let fio = Command::new("fio")
        .args(["--name=flat", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bs=4k"])
        .args(["--size=32M", "--iodepth=4", "--time_based", "--runtime=20", "--verify=crc32c"])
        .args(["--log_avg_msec=500", "--output-format=json"])
        .arg(format!("--write_bw_log={}", bw_prefix.display()))
        // fio writes its verify state file into the working directory.
        .current_dir(logs.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio is installed");
    let fio = KillOnDrop(Some(fio));
    tokio::time::sleep(Duration::from_secs(3)).await;

    tracing::info!("--- stop all three etcd members");
    let outage_start = fio_started.elapsed();
    for m in ["etcd-a", "etcd-b", "etcd-w"] {
        lab.kill_node(m)?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    tracing::info!("--- volume create fails within its deadline, naming etcd and the next step");
    let (out, took) =
        metroctl(&["--lab", lab.dir.to_str().unwrap(), "volume", "create", "w", "--size", "64MiB"]);
    assert!(!out.status.success(), "create must fail without etcd");
    let e = stderr(&out);
    assert!(e.contains("MET-006") && e.contains("etcd"), "{e}");
    assert!(e.contains("next step"), "{e}");
    assert!(took < CTL_GIVES_UP_WITHIN, "create took {took:?}");

    tracing::info!("--- status still answers and shows etcd unhealthy");
    let t = Instant::now();
    let s = lab.status()?;
    assert!(t.elapsed() < CTL_GIVES_UP_WITHIN);
    let etcd = s["etcd"].as_array().cloned().unwrap_or_default();
    assert_eq!(etcd.len(), 3, "{s}");
    assert!(etcd.iter().all(|m| m["healthy"] == false), "every member unhealthy: {s}");
    assert!(s["alerts"].to_string().contains("etcd"), "an etcd alert: {s}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let outage_end = fio_started.elapsed();

    tracing::info!("--- fio finished without an error and wrote during the outage");
    let out = tokio::task::spawn_blocking(move || fio.wait_with_output()).await??;
    assert!(out.status.success(), "fio failed: {}", stderr(&out));
    // fio may print notes before its JSON report.
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .map_err(|e| anyhow::anyhow!("fio report: {e}: {text}"))?;
    assert_eq!(report["jobs"][0]["error"], 0, "fio job error: {}", report["jobs"][0]);
    let samples = fio_bw_samples(&PathBuf::from(format!("{}_bw.1.log", bw_prefix.display())));
    let during: Vec<u64> = samples
        .iter()
        .filter(|(ms, _)| {
            let t = Duration::from_millis(*ms);
            t > outage_start + Duration::from_secs(1) && t < outage_end
        })
        .map(|(_, bw)| *bw)
        .collect();
    assert!(!during.is_empty(), "fio logged samples during the outage: {samples:?}");
    assert!(during.iter().all(|bw| *bw > 0), "I/O stalled during the etcd outage: {during:?}");
    tracing::info!(samples = during.len(), min_kib_s = during.iter().min(), "I/O during the outage");

    tracing::info!("--- etcd returns: volume create works again");
    metroctl::lab::start_nodes(&lab.dir, &["etcd-a", "etcd-b", "etcd-w"]).await?;
    lab.wait_for("volume create to succeed", Duration::from_secs(60), |l| {
        l.ctl(&["volume", "create", "w", "--size", "64MiB"]).map(|_| true).or_else(|e| {
            if e.to_string().contains("already exists") {
                Ok(true)
            } else {
                Err(e)
            }
        })
    })
    .await?;
    assert!(lab.volume("w")?["primary"].is_string());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metroctl_against_a_stopped_lab_says_the_cluster_is_down_without_hanging() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up_loopback("cp-down").await?;
    tracing::info!("--- lab down (keeping lab.json and the data)");
    metroctl::lab::down(&lab.dir, false)?;
    for args in [vec!["status"], vec!["volume", "list"], vec!["volume", "create", "v", "--size", "1GiB"]] {
        let mut a = vec!["--lab", lab.dir.to_str().unwrap()];
        a.extend(args.iter().copied());
        let (out, took) = metroctl(&a);
        assert!(!out.status.success());
        let e = stderr(&out);
        assert!(e.contains("no daemon answered") && e.contains("next step"), "{args:?}: {e}");
        assert!(took < CTL_GIVES_UP_WITHIN, "{args:?} took {took:?}");
    }
    Ok(())
}

/// An nft table that silently drops every packet to one address; removed on drop.
struct Blackhole {
    table: String,
}

impl Blackhole {
    fn new(addr: &str) -> Blackhole {
        let table = format!("metro_cp_blackhole_{}", octet());
        let _ = Command::new("nft").args(["delete", "table", "inet", &table]).stderr(Stdio::null()).status();
        let script = format!(
            "table inet {table} {{\n chain input {{\n  type filter hook input priority -10;\n  ip daddr {addr} drop\n }}\n}}\n"
        );
        let ok = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(script.as_bytes())?;
            c.wait()
        });
        assert!(ok.map(|s| s.success()).unwrap_or(false), "nft must install the drop rule (run as root)");
        Blackhole { table }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metroctl_against_a_blackholed_endpoint_gives_up_within_its_deadline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, paths) = certs::init(dir.path())?;
    let admin = certs::write_pair(dir.path(), "admin-t", &certs::issue(&ca, "admin:t", &[], &[], 1)?)?;
    let addr = format!("127.{}.9.9", octet());
    let _hole = Blackhole::new(&addr);
    let endpoint = format!("{addr}:7443");
    let (out, took) = metroctl(&[
        "status",
        "--endpoint",
        &endpoint,
        "--ca",
        paths.cert.to_str().unwrap(),
        "--cert",
        admin.cert.to_str().unwrap(),
        "--key",
        admin.key.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("no daemon answered") && e.contains(&endpoint), "{e}");
    assert!(e.contains("deadline has elapsed") || e.contains("timeout"), "says it timed out: {e}");
    assert!(took < Duration::from_secs(10), "a dropped SYN must not hang metroctl: {took:?}");
    Ok(())
}

/// A single-member etcd serving clients over mutual TLS.
struct TlsEtcd {
    child: std::process::Child,
    url: String,
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_tls_etcd(dir: &Path, ca: &Ca, ca_file: &Path) -> anyhow::Result<TlsEtcd> {
    let ip: IpAddr = "127.0.0.1".parse()?;
    let server = certs::write_pair(dir, "node-etcd", &certs::issue(ca, "node:etcd", &[ip], &[], 1)?)?;
    let (client, peer) = (free_port(), free_port());
    let url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .arg("--client-cert-auth")
        .arg("--trusted-ca-file")
        .arg(ca_file)
        .arg("--cert-file")
        .arg(&server.cert)
        .arg("--key-file")
        .arg(&server.key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let etcd = TlsEtcd { child, url };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "etcd did not listen within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(etcd)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_etcd_registry_passes_the_conformance_suite_over_mutual_tls() -> anyhow::Result<()> {
    metro_api::tls::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let (ca, ca_paths) = certs::init(dir.path())?;
    let etcd = start_tls_etcd(dir.path(), &ca, &ca_paths.cert)?;
    let client = certs::issue(&ca, "node:a1", &[], &[], 1)?;
    let ca_pem = std::fs::read(&ca_paths.cert)?;
    let tls = EtcdTls {
        ca_pem: ca_pem.clone(),
        client: Some((client.cert_pem.into_bytes(), client.key_pem.into_bytes())),
    };
    let reg = EtcdRegistry::new("tls", vec![etcd.url.clone()], Duration::from_secs(3)).with_tls(Some(tls));
    // etcd may take a moment after listening to serve requests.
    let deadline = Instant::now() + Duration::from_secs(20);
    while reg.specs().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "etcd over TLS never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    metro_node::registry::conformance(&reg).await;

    tracing::info!("--- without a client certificate etcd refuses us, as a bounded, clear error");
    let anon = EtcdRegistry::new("tls", vec![etcd.url.clone()], Duration::from_secs(2))
        .with_tls(Some(EtcdTls { ca_pem, client: None }));
    let t = Instant::now();
    let err = anon.specs().await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    let plain = EtcdRegistry::new("tls", vec![etcd.url.replace("https", "http")], Duration::from_secs(2));
    assert!(plain.specs().await.is_err(), "plain http must not work against a TLS-only etcd");
    Ok(())
}

/// `lab up --external-witness` (the witness VM's lab, images/test-witness-lab):
/// the data sites form a cluster on their own; a witness and etcd member that
/// arrive later on the witness site's addresses join it as a voter and a
/// healthy member. Here the lab's own w1 and etcd-w play the late arrivals.
#[tokio::test(flavor = "multi_thread")]
async fn a_lab_without_its_witness_runs_and_a_late_witness_joins_as_voter() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up_external_witness("cp-extw").await?;
    assert!(lab.info.witness.proc.pid.is_none(), "w1 not started");
    let s = lab.status()?;
    assert!(!s["leader"].is_null(), "a leader without the witness: {s}");
    assert!(!strings(&s["voters"]).contains(&"w1".to_string()), "{s}");
    lab.start_nodes(&["etcd-w", "w1"]).await?;
    lab.wait_for("w1 a reachable voter, etcd 3/3 healthy", Duration::from_secs(60), |l| {
        let s = l.status()?;
        let etcd_ok =
            s["etcd"].as_array().is_some_and(|e| e.len() == 3 && e.iter().all(|m| m["healthy"] == true));
        Ok(strings(&s["voters"]).contains(&"w1".to_string()) && s["witness"]["reachable"] == true && etcd_ok)
    })
    .await?;
    Ok(())
}
