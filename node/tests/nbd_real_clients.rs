//! The NBD server against real clients: nbdinfo, qemu-io, qemu-img,
//! nbdcopy, fio (nbd engine) and nbdfuse + loop + ext4. Every client runs
//! under a kill-after deadline (`nbd_support::CLIENT_TIMEOUT`).

mod nbd_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metro_node::block::ExportError;
use metro_node::nbd::NbdLimits;
use nbd_support::*;

async fn serve_one(name: &str, size: u64) -> (TestServer, Arc<MemDevice>) {
    let reg = MemRegistry::new();
    let dev = MemDevice::new(size);
    reg.add(name, dev.clone());
    (TestServer::start(reg, NbdLimits::default()).await, dev)
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_block_sizes_flags_and_the_export_list() {
    let reg = MemRegistry::new();
    reg.add("vol", MemDevice::new(64 * MIB));
    reg.add("other", MemDevice::new(MIB));
    let srv = TestServer::start(reg, NbdLimits::default()).await;

    let out = run_ok("nbdinfo", &["--json", &srv.uri("vol")]).await;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "vol");
    assert_eq!(e["export-size"], 64 * MIB);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(v["protocol"], "newstyle-fixed");

    let size = run_ok("nbdinfo", &["--size", &srv.uri("vol")]).await;
    assert_eq!(size.stdout.trim(), (64 * MIB).to_string());

    let list = run_ok("nbdinfo", &["--list", "--json", &srv.uri("")]).await;
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let mut names: Vec<_> =
        v["exports"].as_array().unwrap().iter().map(|e| e["export-name"].clone()).collect();
    names.sort_by_key(|n| n.to_string());
    assert_eq!(names, vec!["other", "vol"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_on_a_refused_export_prints_the_server_message() {
    let reg = MemRegistry::new();
    reg.refuse(
        "vol",
        ExportError::NotPrimary {
            volume: "vol".into(),
            primary: "node-b".into(),
            nbd: "10.1.0.2:10809".into(),
        },
    );
    let srv = TestServer::start(reg, NbdLimits::default()).await;
    let text = "volume `vol` is served by its primary `node-b` at nbd://10.1.0.2:10809/vol; connect there";
    // libnbd 1.14's nbdinfo reports the option failure but prints the
    // server's message only in its debug log; qemu prints it as a hint.
    let out = run("nbdinfo", &[&srv.uri("vol")]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("opt_go") && out.stderr.contains("export: vol"), "stderr: {}", out.stderr);
    let dbg = run("env", &["LIBNBD_DEBUG=1", "nbdinfo", &srv.uri("vol")]).await;
    assert!(!dbg.ok);
    assert!(dbg.stderr.contains(&format!("server error message: {text}")), "stderr: {}", dbg.stderr);
    let qi = run("qemu-img", &["info", &srv.uri("vol")]).await;
    assert!(!qi.ok);
    assert!(qi.stderr.contains(&format!("server reported: {text}")), "stderr: {}", qi.stderr);
    let out = run("qemu-img", &["info", &srv.uri("nope")]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("no volume named `nope`"), "stderr: {}", out.stderr);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_fua_discard_zeroes_and_pipelined_aio_round_trip() {
    let (srv, dev) = serve_one("vol", 64 * MIB).await;
    dev.set_op_delay(Duration::from_millis(2));
    let uri = srv.uri("vol");
    let cmds = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -f -P 0xcd 1M 64k",
        "read -P 0xcd 1M 64k",
        "write -P 0x5a 2M 1M",
        "discard 2M 512k",
        "read -P 0 2M 512k",
        "read -P 0x5a 2560k 512k",
        "write -P 0x77 4M 1M",
        "write -z 4M 256k",
        "read -P 0 4M 256k",
        "read -P 0x77 4352k 768k",
        "aio_write -P 0x21 8M 256k",
        "aio_write -P 0x22 9M 256k",
        "aio_write -P 0x23 10M 256k",
        "aio_write -P 0x24 11M 256k",
        "aio_write -P 0x25 12M 256k",
        "aio_write -P 0x26 13M 256k",
        "aio_write -P 0x27 14M 256k",
        "aio_write -P 0x28 15M 256k",
        "aio_flush",
        "read -P 0x21 8M 256k",
        "read -P 0x28 15M 256k",
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(&uri);
    let out = run_ok("qemu-io", &args).await;
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(!all.contains("fail") && !all.contains("error"), "qemu-io reported a problem:\n{all}");
    assert_eq!(all.matches("read ").count(), 8, "every read ran:\n{all}");

    let d = dev.contents();
    assert!(d[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(d[(2 * MIB) as usize..(2 * MIB + 512 * 1024) as usize].iter().all(|&b| b == 0));
    assert!(d[(15 * MIB) as usize..(15 * MIB + 256 * 1024) as usize].iter().all(|&b| b == 0x28));
    let c = &dev.counters;
    assert!(c.fua_writes.load(Ordering::SeqCst) >= 1, "write -f reached the device with FUA");
    assert!(c.trims.load(Ordering::SeqCst) >= 1, "discard reached the device as TRIM");
    assert!(c.zeroes.load(Ordering::SeqCst) >= 1, "write -z reached the device as WRITE_ZEROES");
    assert!(c.flushes.load(Ordering::SeqCst) >= 1);
    assert!(
        c.max_in_flight.load(Ordering::SeqCst) > 1,
        "aio writes overlapped on the device (max in flight {})",
        c.max_in_flight.load(Ordering::SeqCst)
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_zeroes_without_unmap_sends_no_hole() {
    let (srv, dev) = serve_one("vol", 8 * MIB).await;
    let uri = srv.uri("vol");
    // Without -u qemu asks for zeroes that must not be a hole: NBD_CMD_FLAG_NO_HOLE.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 1M", "-c", "write -z 0 1M", "-c", "read -P 0 0 1M", &uri],
    )
    .await;
    assert!(dev.counters.zeroes_no_hole.load(Ordering::SeqCst) >= 1);
    let before = dev.counters.zeroes_no_hole.load(Ordering::SeqCst);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -z -u 1M 1M", &uri]).await;
    assert_eq!(dev.counters.zeroes_no_hole.load(Ordering::SeqCst), before, "-u allows a hole");
    assert!(dev.counters.zeroes.load(Ordering::SeqCst) >= 2);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_copies_a_raw_file_in_and_out_unchanged() {
    let size = 16 * MIB;
    let (srv, dev) = serve_one("vol", size).await;
    let dir = tmpdir();
    let input = dir.path().join("in.raw");
    let output = dir.path().join("out.raw");
    let mut data = pattern(size as usize, 42);
    data[(4 * MIB) as usize..(6 * MIB) as usize].fill(0); // a zero run to exercise zero detection
    std::fs::write(&input, &data).unwrap();
    let uri = srv.uri("vol");
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", input.to_str().unwrap(), &uri]).await;
    assert!(dev.contents() == data, "device holds the converted image");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, output.to_str().unwrap()]).await;
    assert!(std::fs::read(&output).unwrap() == data, "image read back equals the input");
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", input.to_str().unwrap(), &uri]).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_copies_in_and_out_over_multiple_connections() {
    let size = 32 * MIB;
    let (srv, _dev) = serve_one("vol", size).await;
    let dir = tmpdir();
    let input = dir.path().join("in.raw");
    let output = dir.path().join("out.raw");
    std::fs::write(&input, pattern(size as usize, 7)).unwrap();
    let uri = srv.uri("vol");
    run_ok("nbdcopy", &["--connections=4", "--requests=16", input.to_str().unwrap(), &uri]).await;
    run_ok("nbdcopy", &["--connections=4", &uri, output.to_str().unwrap()]).await;
    run_ok("cmp", &[input.to_str().unwrap(), output.to_str().unwrap()]).await;
    let stats = srv.server.stats();
    assert!(stats.connections_accepted > 2, "multi-conn was used: {stats:?}");
    assert!(stats.bytes_written >= size && stats.bytes_read >= size, "{stats:?}");
    assert_eq!(stats.errors, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify_with_crc32c_at_iodepth_16() {
    let (srv, dev) = serve_one("vol", 32 * MIB).await;
    let uri = format!("--uri={}", srv.uri("vol"));
    let out = run_ok(
        "fio",
        &[
            "--name=metro-nbd",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // Otherwise fio leaves local-*-verify.state in the crate directory.
            "--verify_state_save=0",
            "--output-format=terse",
        ],
    )
    .await;
    // terse v3: field 5 is the error code of the job.
    let fields: Vec<&str> = out.stdout.lines().last().unwrap_or("").split(';').collect();
    assert!(fields.len() > 5, "terse output: {}", out.stdout);
    assert_eq!(fields[4], "0", "fio job error: {}", out.stdout);
    assert!(dev.counters.writes.load(Ordering::SeqCst) >= 4096, "16 MiB of 4k writes reached the device");
    assert!(dev.counters.max_in_flight.load(Ordering::SeqCst) >= 1);
    assert_eq!(srv.server.stats().errors, 0);
    srv.stop().await;
}

/// Why the FUSE + loop path cannot run here, if it cannot.
fn fuse_loop_unavailable() -> Option<String> {
    if !std::path::Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    if !std::path::Path::new("/dev/loop-control").exists() {
        return Some("/dev/loop-control is missing".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("losetup and mount need root".into());
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_on_nbdfuse_and_a_loop_device_survives_remount() {
    if let Some(why) = fuse_loop_unavailable() {
        eprintln!("SKIPPED ext4_on_nbdfuse: {why}");
        return;
    }
    let (srv, _dev) = serve_one("vol", 128 * MIB).await;
    let dir = tmpdir();
    let fuse_dir = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let vol_file = fuse_dir.join("vol");
    let fuse_file = vol_file.to_str().unwrap().to_owned();
    let mut nbdfuse = tokio::process::Command::new("nbdfuse")
        .args([&fuse_file, &srv.uri("vol")])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let appeared = tokio::time::timeout(Duration::from_secs(20), async {
        while tokio::fs::metadata(&vol_file).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if appeared.is_err() {
        let _ = nbdfuse.kill().await;
        eprintln!(
            "SKIPPED ext4_on_nbdfuse: nbdfuse did not expose {fuse_file} within 20 s (FUSE unusable here)"
        );
        return;
    }
    let lo = run("losetup", &["-f", "--show", &fuse_file]).await;
    if !lo.ok {
        let _ = run("fusermount3", &["-u", fuse_dir.to_str().unwrap()]).await;
        eprintln!("SKIPPED ext4_on_nbdfuse: losetup failed: {}", lo.stderr);
        return;
    }
    let loopdev = lo.stdout.trim().to_owned();
    let m = mnt.to_str().unwrap().to_owned();
    let result = {
        let (loopdev, mnt, m) = (loopdev.clone(), mnt.clone(), m.clone());
        async move {
            let m = m.as_str();
            run_ok("mkfs.ext4", &["-q", "-F", &loopdev]).await;
            run_ok("mount", &[&loopdev, m]).await;
            // File I/O on the mount runs in child processes: a thread of this
            // process blocked on the loop device would starve the NBD server
            // that backs it.
            let src = mnt.parent().unwrap().join("src.bin");
            std::fs::write(&src, pattern(3 * MIB as usize, 99)).unwrap();
            let (src, dst) =
                (src.to_str().unwrap().to_owned(), mnt.join("data.bin").to_str().unwrap().to_owned());
            run_ok("cp", &[&src, &dst]).await;
            run_ok("sync", &[]).await;
            run_ok("umount", &[m]).await;
            run_ok("mount", &[&loopdev, m]).await;
            run_ok("cmp", &[&src, &dst]).await;
            run_ok("umount", &[m]).await;
            run_ok("fsck.ext4", &["-n", "-f", &loopdev]).await;
        }
    };
    // Always clean up the loop device and the FUSE mount, even on failure.
    let outcome = tokio::time::timeout(CLIENT_TIMEOUT, tokio::spawn(result)).await;
    let _ = run("umount", &[&m]).await;
    let _ = run("losetup", &["-d", &loopdev]).await;
    let _ = run("fusermount3", &["-u", fuse_dir.to_str().unwrap()]).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), nbdfuse.wait()).await;
    let _ = nbdfuse.kill().await;
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.contains(fuse_dir.to_str().unwrap()) {
        // Never let TempDir recurse into a mount that is still live.
        let _ = run("umount", &["-l", fuse_dir.to_str().unwrap()]).await;
        std::mem::forget(dir);
    }
    outcome.expect("ext4 scenario deadline").expect("ext4 scenario passed");
    assert!(srv.server.stats().bytes_written > 3 * MIB);
    srv.stop().await;
}

/// Throughput of the server with an in-memory device, measured by fio.
/// Run: `cargo test -p metro-node --test nbd_real_clients -- --ignored --nocapture fio_throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check; prints numbers"]
async fn fio_throughput_against_a_memory_device() {
    let (srv, _dev) = serve_one("vol", 256 * MIB).await;
    let uri = format!("--uri={}", srv.uri("vol"));
    for (name, rw, bs, depth) in
        [("randwrite-4k-qd16", "randwrite", "4k", "16"), ("read-1m-qd8", "read", "1m", "8")]
    {
        let bs = format!("--bs={bs}");
        let depth = format!("--iodepth={depth}");
        let rw = format!("--rw={rw}");
        let out = run_ok(
            "fio",
            &[
                "--name=bench",
                "--ioengine=nbd",
                &uri,
                &rw,
                &bs,
                &depth,
                "--size=256M",
                "--time_based",
                "--runtime=5",
                "--output-format=json",
            ],
        )
        .await;
        // fio may print notes before the JSON document.
        let json = &out.stdout[out.stdout.find('{').unwrap_or(0)..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let job = &v["jobs"][0];
        let side = if name.contains("write") { &job["write"] } else { &job["read"] };
        println!(
            "MEASURED {name}: {:.0} IOPS, {:.1} MiB/s, p99 completion {:.0} us",
            side["iops"].as_f64().unwrap_or(0.0),
            side["bw_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0),
            side["clat_ns"]["percentile"]["99.000000"].as_f64().unwrap_or(0.0) / 1000.0
        );
    }
    srv.stop().await;
}
